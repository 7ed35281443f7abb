"""Control-flow signals a Python handler may raise (importable inside function workers).

    from bridge.handler import Retry, Drop

    def main_handler(event, context):
        if not ready():
            raise Retry(30)          # try again in 30 s (bounded by max_event_age only)
        if is_spam(event):
            raise Drop("spam")       # settled on purpose: no retry, no dead letter

These are signals, not errors (arq's ``Retry``): the async queue reschedules or
removes the event; a RequestResponse caller sees them as function errors.
"""

from __future__ import annotations


class Retry(Exception):
    """Retry this event after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {delay:g}s")
        self.delay = float(delay)


class Drop(Exception):
    """Drop this event on purpose."""

    def __init__(self, reason: str = "dropped by the handler") -> None:
        super().__init__(reason)
