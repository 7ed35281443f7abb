"""In-memory doubles for tests of the core and of plugins.

- :class:`MemoryStore`: a :class:`~bridge.store.StateStore` in a dict.
- :class:`RecordingTarget`: a function runtime that records every event and
  returns, raises or waits as a test tells it to.
- :class:`ListSource`: a source that serves a fixed list of events and records
  acks and nacks.

They follow the same contracts as the real parts, so a test written against
them can fail for the same reasons.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from bridge.abc import (
    Delivery,
    EndOfInput,
    Invocation,
    Source,
    SourceContext,
    Target,
    TargetContext,
)
from bridge.config import FunctionConfig, TriggerConfig
from bridge.events import Event
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
        import logging

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


class _ListDelivery(Delivery):
    __slots__ = ("source",)

    def __init__(self, event: Event, source: ListSource) -> None:
        super().__init__(event)
        self.source = source

    async def ack(self) -> None:
        self.source.acked.append(self.event)

    async def nack(self, error: BaseException | None = None) -> None:
        self.source.nacked.append(self.event)


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
        return _ListDelivery(self.pending.pop(0), self)

    async def close(self) -> None:
        self.closed = True


async def until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.002
) -> None:
    """Wait until ``predicate()`` is true; fail with AssertionError after ``timeout`` seconds.

    The way tests wait on a condition (never a fixed sleep standing in for one).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(
                f"condition not met within {timeout}s: {getattr(predicate, '__name__', predicate)}"
            )
        await asyncio.sleep(interval)
