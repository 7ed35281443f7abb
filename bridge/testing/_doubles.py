"""The test doubles: in-memory parts that follow the same contracts as the real ones (see
:mod:`bridge.testing`)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from bridge.abc import (
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    EndOfInput,
    Invocation,
    NotConnected,
    SettleDelivery,
    Source,
    SourceContext,
    Target,
    TargetContext,
)
from bridge.config import FunctionConfig, TriggerConfig
from bridge.events import Event, Kind, cmq_record
from bridge.store import StateStore


class MemoryStore(StateStore):
    def __init__(self) -> None:
        self.last_fire: dict[str, datetime] = {}
        self.kv: dict[tuple[str, str], str] = {}
        self.closed = False

    async def get_last_fire(self, trigger: str) -> datetime | None:
        return self.last_fire.get(trigger)

    async def set_last_fire(self, trigger: str, when: datetime) -> None:
        prev = self.last_fire.get(trigger)
        if prev is None or when > prev:
            self.last_fire[trigger] = when

    async def get(self, namespace: str, key: str) -> str | None:
        return self.kv.get((namespace, key))

    async def put(self, namespace: str, key: str, value: str | None) -> None:
        if value is None:
            self.kv.pop((namespace, key), None)
        else:
            self.kv[(namespace, key)] = value

    async def close(self) -> None:
        self.closed = True


class RecordingTarget(Target[FunctionConfig]):
    """Records ``(event, invocation)`` pairs. ``behaviour(event, invocation)`` may return a
    value, raise, or be a coroutine (to hold an invocation open until a test releases it)."""

    Config = FunctionConfig

    def __init__(
        self,
        config: FunctionConfig | None = None,
        ctx: TargetContext | None = None,
        *,
        behaviour: Callable[[Mapping[str, Any], Invocation], Any] | None = None,
    ) -> None:
        super().__init__(
            config or FunctionConfig(),
            ctx
            or TargetContext(
                name="recorder", state_dir=Path("."), logger=logging.getLogger("fn.recorder")
            ),
        )
        self.behaviour = behaviour
        self.calls: list[tuple[Mapping[str, Any], Invocation]] = []
        self.started = self.closed = False

    @property
    def events(self) -> list[Mapping[str, Any]]:
        """The events received so far, in call order."""
        return [event for event, _ in self.calls]

    async def start(self) -> None:
        self.started = True

    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> Any:
        self.calls.append((event, invocation))
        if self.behaviour is None:
            return {"ok": True}
        out = self.behaviour(event, invocation)
        if asyncio.iscoroutine(out):
            out = await out
        return out

    async def close(self) -> None:
        self.closed = True


class ListSource(Source[TriggerConfig]):
    """Serves ``events`` once each, then raises EndOfInput."""

    Config = TriggerConfig

    def __init__(
        self, config: TriggerConfig, ctx: SourceContext, events: Iterable[Event] = ()
    ) -> None:
        super().__init__(config, ctx)
        self.pending = list(events)
        self.acked: list[Event] = []
        self.nacked: list[Event] = []
        self.connected = self.closed = False

    async def connect(self) -> None:
        self.connected = True

    async def read(self) -> Delivery:
        if self.closed or not self.pending:
            raise EndOfInput
        event = self.pending.pop(0)
        return SettleDelivery(event, partial(self._ack, event), partial(self._nack, event))

    async def _ack(self, event: Event) -> None:
        self.acked.append(event)

    async def _nack(self, event: Event, error: BaseException | None) -> None:
        self.nacked.append(event)

    async def close(self) -> None:
        self.closed = True


# --- an in-memory upstream and its source ------------------------------------------------------


class MemoryBroker:
    """An in-memory queue upstream: messages by offset, acked ones removed.

    Shared by any number of :class:`MemorySource` instances (one after the other, like a
    consumer that restarts): what one instance read but did not ack is served again to
    the next ``connect()`` or the next instance. Single event loop; not thread-safe.
    """

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.acked: set[int] = set()
        self.ack_log: list[int] = []  # offsets in the order they were acked
        self.nack_log: list[int] = []
        self._listeners: list[Callable[[], None]] = []

    def publish(self, *payloads: str) -> list[int]:
        """Append messages; returns their offsets."""
        first = len(self.messages)
        self.messages.extend(payloads)
        self._notify()
        return list(range(first, len(self.messages)))

    def ack(self, offset: int) -> None:
        self.acked.add(offset)
        self.ack_log.append(offset)

    def unacked(self) -> list[int]:
        return [i for i in range(len(self.messages)) if i not in self.acked]

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on every publish; returns the function that stops it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _notify(self) -> None:
        for cb in list(self._listeners):
            cb()


class MemorySourceConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "memory"`` (tests only)."""

    topic: str = Field("memory", description="Shown as the CMQ topicName of every event.")


class MemorySource(Source[MemorySourceConfig]):
    """A queue consumer over a :class:`MemoryBroker`, meeting the whole source contract.

    Events are CMQ events (``cmq_record``: ``msg_id`` is the offset, ``body`` the payload).
    ``ack()`` removes the message upstream; ``nack()`` serves it again at once; a
    ``connect()`` (or a new instance) serves again everything not acked and not still
    handed out by this instance; ``close()`` makes a pending ``read()`` raise EndOfInput.
    """

    Config = MemorySourceConfig

    def __init__(
        self, config: MemorySourceConfig, ctx: SourceContext, broker: MemoryBroker | None = None
    ) -> None:
        super().__init__(config, ctx)
        self.broker = broker if broker is not None else MemoryBroker()
        self.connects = 0
        self.connected = self.closed = False
        self._cursor = 0
        self._outstanding: set[int] = set()
        self._redeliver: deque[int] = deque()
        self._wake = asyncio.Event()
        self._unlisten: Callable[[], None] | None = None

    async def connect(self) -> None:
        if self.closed:
            return
        self.connects += 1
        self._cursor = 0  # everything not acked and not handed out is served again
        if self._unlisten is None:
            self._unlisten = self.broker.listen(self._wake.set)
        self.connected = True

    async def read(self) -> Delivery:
        while True:
            if self.closed:
                raise EndOfInput
            if not self.connected:
                raise NotConnected("read() before connect()")
            offset = self._next()
            if offset is not None:
                self._outstanding.add(offset)
                return SettleDelivery(
                    self._event(offset),
                    partial(self._ack, offset),
                    partial(self._nack, offset),
                    key=offset,
                )
            self._wake.clear()
            await self._wake.wait()

    async def _ack(self, offset: int) -> None:
        self._outstanding.discard(offset)
        self.broker.ack(offset)

    async def _nack(self, offset: int, error: BaseException | None) -> None:
        self._outstanding.discard(offset)
        self.broker.nack_log.append(offset)
        self._redeliver.append(offset)
        self._wake.set()

    def _next(self) -> int | None:
        while self._redeliver:
            offset = self._redeliver.popleft()
            if offset not in self.broker.acked and offset not in self._outstanding:
                return offset
        while self._cursor < len(self.broker.messages):
            offset, self._cursor = self._cursor, self._cursor + 1
            if offset not in self.broker.acked and offset not in self._outstanding:
                return offset
        return None

    def _event(self, offset: int) -> Event:
        now = datetime.now(UTC)
        body = self.broker.messages[offset]
        record = cmq_record(
            msg_id=str(offset), body=body, publish_time=now, topic=self.config.topic
        )
        native = {"offset": offset, "body": body}
        return Event(
            kind=Kind.CMQ, trigger=self.ctx.name, time=now, records=(record,), native=native
        )

    async def close(self) -> None:
        self.closed = True
        self.connected = False
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        self._wake.set()


# --- dead letters -----------------------------------------------------------------------------


class MemoryDeadLetterSink(DeadLetterSink):
    """Keeps records in ``records``. Set ``fail_with`` to make ``put`` raise it (a sink that
    is down: the queue must keep the event and retry)."""

    def __init__(self, url: str = "memory", ctx: DeadLetterContext | None = None) -> None:
        super().__init__(
            url,
            ctx
            or DeadLetterContext(
                store=MemoryStore(), logger=logging.getLogger("bridge.deadletter")
            ),
        )
        self.records: list[Mapping[str, Any]] = []
        self.attempts = 0
        self.fail_with: BaseException | None = None
        self.closed = False

    async def put(self, record: Mapping[str, Any]) -> None:
        self.attempts += 1
        if self.fail_with is not None:
            raise self.fail_with
        self.records.append(record)

    async def close(self) -> None:
        self.closed = True


# --- waiting ----------------------------------------------------------------------------------


async def until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.002,
    *,
    what: str | None = None,
) -> Any:
    """Wait until ``predicate()`` is true and return its value; fail with AssertionError after
    ``timeout`` seconds (naming ``what`` is awaited). The way tests wait on a condition —
    never a fixed sleep standing in for one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (got := predicate()):
        if loop.time() > deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout}s waiting for {name}")
        await asyncio.sleep(interval)
    return got


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
