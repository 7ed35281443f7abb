"""The running daemon as its listeners see it: the HTTP API, the web console, the control
socket and the public gateway are handed a :class:`Host` (the :class:`~bridge.daemon.Daemon`
satisfies it) instead of importing the daemon that builds them, so the listeners sit below
the daemon and nothing imports in a circle."""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bridge.abc import Source
    from bridge.dispatcher import Dispatcher
    from bridge.metrics import Metrics
    from bridge.models import Config
    from bridge.queue import DurableQueue
    from bridge.store import StateStore


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Host(Protocol):
    """What a listener may use of the daemon. ``config`` follows reloads; ``queue`` is None
    until the daemon is entered."""

    config: Config
    store: StateStore
    state: RunState
    queue: DurableQueue | None
    metrics: Metrics
    dispatcher: Dispatcher
    ready: asyncio.Event
    sources: dict[str, Source[Any]]
    #: unix time of the last event read per trigger
    last_event: dict[str, float]

    def not_connected(self) -> dict[str, str]:
        """Running triggers that are not connected, with their last connect error."""
        ...

    async def status(self) -> dict[str, Any]:
        """What ``event-bridge status`` and ``GET /status`` show."""
        ...

    async def refresh_stats(self) -> None:
        """Read the counts the scrape-time gauges show."""
        ...

    async def refresh_code(self) -> None:
        """Swap the functions whose code folder changed."""
        ...
