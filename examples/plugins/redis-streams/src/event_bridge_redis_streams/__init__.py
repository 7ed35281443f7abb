"""event-bridge-redis-streams: a Redis Streams trigger for event-bridge.

Installed with pip, it registers ``redis_streams`` in the ``bridge.sources``
entry-point group (see pyproject.toml), so a trigger table with
``type = "redis_streams"`` loads :class:`RedisStreamsSource`.
"""

from event_bridge_redis_streams.source import RedisStreamsConfig, RedisStreamsSource

__all__ = ["RedisStreamsConfig", "RedisStreamsSource"]
__version__ = "0.1.0"
