"""The plugin contracts: sources, function runtimes (targets) and dead-letter sinks.

Plugins register through the entry-point groups ``bridge.sources``,
``bridge.targets`` and ``bridge.deadletters`` (built-ins use the same groups)
and are loaded only when the configuration names them.

Sources (the Benthos shape: connect, read, close)
-------------------------------------------------
The core calls, from one asyncio task per trigger:

1. ``connect()`` once before the first ``read()``, and again after ``read()``
   raised :class:`NotConnected`. It may raise any exception: the core logs it,
   keeps the other triggers running and calls ``connect()`` again with backoff.
2. ``read()`` to get the next :class:`Delivery`. It waits as long as it needs
   to (a timer sleeps until its next tick). The core calls ``read()`` only when
   it has room for another in-flight event, so a source never has to buffer
   without bound: **back-pressure is the core not calling read()**. ``read()``
   may raise :class:`EndOfInput` (the source is finished), :class:`NotConnected`
   (reconnect first) or :class:`BackOff` (call again after a delay).
3. For every delivery, exactly one of ``ack()`` / ``nack()``, after the event
   was accepted (async triggers: durably queued) or settled (sync triggers).
   A source commits, deletes or checkpoints upstream **only inside ack()**;
   ``nack()`` hands the event back upstream (redelivery where the upstream
   supports it). Acks may arrive out of order; a source that checkpoints a
   position must only advance past positions whose deliveries were all acked.
4. ``close()`` once, at shutdown or when the trigger is removed, possibly while
   deliveries are still unsettled (they are then neither acked nor nacked: the
   upstream must treat them as not handled). ``close()`` must be idempotent and
   must release its resources even when it fails.

What is not guaranteed: that ``ack()`` is ever called (the process may die),
so upstream state must be safe to redeliver — delivery is at least once.
Sources never retry function invocations: retry and dead-letter policy live in
the dispatcher only.

Targets (function runtimes)
---------------------------
``start()`` once before the first invocation; ``invoke(event, invocation)``
concurrently up to the function's ``concurrency`` (the dispatcher throttles
beyond it, so a target never queues); ``close()`` once. ``invoke`` returns the
function's JSON-compatible result or raises an
:class:`~bridge.errors.InvocationError` subclass whose ``error_class`` says what
went wrong; any other exception is reported as a system error.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from bridge.events import Event

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from bridge.config import FunctionConfig, TriggerConfig
    from bridge.store import StateStore


# --- source signals ---------------------------------------------------------------------------


class SourceSignal(Exception):
    """Base of the control-flow signals a source raises from ``read()``."""


class EndOfInput(SourceSignal):
    """The source has no more events, ever."""


class NotConnected(SourceSignal):
    """The connection was lost; the core calls ``connect()`` again before reading."""


class BackOff(SourceSignal):
    """Nothing to read now; the core calls ``read()`` again after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"back off for {delay_s:.3f}s")
        self.delay_s = delay_s


# --- deliveries -------------------------------------------------------------------------------


class Delivery(abc.ABC):
    """One event read from a source, with the means to settle it upstream."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    @abc.abstractmethod
    async def ack(self) -> None:
        """The event is accepted or settled: commit/delete/checkpoint it upstream."""

    async def nack(self, error: BaseException | None = None) -> None:  # noqa: B027
        """The event was not handled: hand it back upstream. The default does nothing."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceContext:
    """What the core gives a source besides its config."""

    name: str  # trigger name
    function: str
    store: StateStore
    timezone: ZoneInfo  # daemon.timezone, the default for timers
    logger: logging.Logger


ConfigT = TypeVar("ConfigT", bound="TriggerConfig")


class Source(abc.ABC, Generic[ConfigT]):
    """A trigger plugin. Subclasses set ``Config`` to a :class:`~bridge.config.TriggerConfig`
    subclass with their own fields; the core validates the trigger table against it."""

    Config: ClassVar[type[TriggerConfig]]
    #: False (default): an asynchronous trigger — each delivery is acked once it is
    #: durably queued, and the queue owns retries. True: a synchronous ordered trigger
    #: (Kafka) — each delivery is invoked in place and acked only once it succeeded or
    #: was dead-lettered (bridge.ordered); the source must not deliver the next batch of
    #: the same partition before the previous one is acked.
    ordered: ClassVar[bool] = False

    def __init__(self, config: ConfigT, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def read(self) -> Delivery: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # Optional capabilities used by the CLI (``fire`` and ``next``).

    def sample_event(self, now: datetime) -> Event:
        """The event this trigger would produce now (``event-bridge fire``)."""
        raise NotImplementedError(f"a {self.config.type} trigger cannot be fired by hand")

    def next_fire_times(self, after: datetime, n: int) -> list[datetime]:
        """The next ``n`` scheduled times after ``after`` (``event-bridge next``)."""
        raise NotImplementedError(f"a {self.config.type} trigger has no schedule")

    def status(self) -> Mapping[str, Any]:
        """A small JSON-compatible summary for ``status`` (next fire time, lag, ...)."""
        return {}


# --- targets ----------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Invocation:
    """One call of a function. The dispatcher creates it; the target may fill in the report
    fields (``max_memory_bytes``) for the REPORT log line."""

    request_id: str
    function: str
    invocation_type: str = "Event"  # Event | RequestResponse (SCF)
    trigger: str | None = None
    timeout_s: float = 3.0
    started: float = dataclasses.field(default_factory=time.monotonic)
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_memory_bytes: int | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetContext:
    name: str  # function name
    state_dir: Path
    logger: logging.Logger


FunctionT = TypeVar("FunctionT", bound="FunctionConfig")


class Target(abc.ABC, Generic[FunctionT]):
    """A function runtime plugin (``runtime = "python"`` ...)."""

    Config: ClassVar[type[FunctionConfig]]

    def __init__(self, config: FunctionT, ctx: TargetContext) -> None:
        self.config = config
        self.ctx = ctx

    async def start(self) -> None:
        """Prepare to invoke (start warm workers, supervised servers...)."""

    @abc.abstractmethod
    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> Any:
        """Run the function once; return its result or raise an InvocationError."""

    async def close(self) -> None:
        """Stop workers; idempotent."""


# --- dead-letter sinks ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeadLetterContext:
    store: StateStore
    logger: logging.Logger


class DeadLetterSink(abc.ABC):
    """Where events go when retrying cannot help (``dead_letter = "scheme://…"``).

    ``put`` is called with the SCF-shaped dead-letter record (see
    :mod:`bridge.deadletter`) and must return only once the record is durably
    written there, and raise otherwise: the event then stays in the durable
    queue and dead-lettering is retried, so nothing is lost. A record may be
    put more than once (a crash between ``put`` and the queue update).
    """

    def __init__(self, url: str, ctx: DeadLetterContext) -> None:
        self.url = url
        self.ctx = ctx

    @abc.abstractmethod
    async def put(self, record: Mapping[str, Any]) -> None: ...

    async def close(self) -> None:  # noqa: B027
        """Release connections; idempotent."""
