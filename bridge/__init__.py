"""event-bridge: the trigger side of a serverless platform (Tencent Cloud SCF) for any Linux box."""

__version__ = "0.1.0"
