"""The contract suite itself: correct sources pass it, and each check fails on the source it
exists to catch.

- The in-memory doubles (``MemorySource``) and the two easier tiers of bridge.abc
  (``GeneratorSource``, ``PollingSource``) run the whole suite, as any plugin would.
- Deliberately broken sources — one fault each — run the check aimed at that fault, and
  that check must fail with an AssertionError saying what is wrong. A suite that cannot
  fail proves nothing.
- The doubles work with the real core: the daemon pumps a MemorySource into a
  RecordingTarget, and the durable queue dead-letters into a MemoryDeadLetterSink.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import Field, field_validator

from bridge.abc import (
    BackOff,
    Delivery,
    EndOfInput,
    GeneratorSource,
    NotConnected,
    PollingSource,
    Source,
    SourceContext,
)
from bridge.config import AsyncConfig, Config, DaemonConfig, FunctionConfig
from bridge.daemon import Daemon
from bridge.dispatcher import Dispatcher
from bridge.errors import HandlerFailed
from bridge.events import Event, Kind, cmq_record, timer_event
from bridge.queue import DurableQueue
from bridge.store import SqliteStore
from bridge.testing import (
    MemoryBroker,
    MemoryDeadLetterSink,
    MemorySource,
    MemorySourceConfig,
    MemoryStore,
    RecordingTarget,
    SourceContract,
    until,
)

# --- correct sources ----------------------------------------------------------------------------


class MemoryContract(SourceContract):
    """The suite wired to a MemoryBroker; subclasses pick the source class."""

    source_class: Any = MemorySource
    sample_config = {"topic": "orders"}

    async def setup_upstream(self) -> None:
        self.broker = MemoryBroker()

    def make_source(self, ctx: SourceContext, data: Any = None) -> Source[Any]:
        return self.source_class(self.make_config(data), ctx, broker=self.broker)  # type: ignore[no-any-return]

    async def publish(self, payloads: Sequence[str]) -> None:
        self.broker.publish(*payloads)


class TestMemorySourceContract(MemoryContract):
    pass


class TestHooksCanUsePytestFixtures(MemoryContract):
    """A plugin brings pytest fixtures (a broker started once per session, tmp_path) into
    the hooks with an autouse fixture method: pytest calls it on the instance that runs
    the check."""

    @pytest.fixture(autouse=True)
    def _workdir(self, tmp_path: Path) -> None:
        self.workdir = tmp_path

    async def setup_upstream(self) -> None:
        assert self.workdir.is_dir()
        await super().setup_upstream()


def memory_event(source: Source[Any], broker: MemoryBroker, offset: int) -> Event:
    now = datetime.now(UTC)
    record = cmq_record(msg_id=str(offset), body=broker.messages[offset], publish_time=now)
    return Event(kind=Kind.CMQ, trigger=source.ctx.name, time=now, records=(record,))


def offset_of(event: Event) -> int:
    return int(event.records[0]["msg_id"])


class GeneratedMemorySource(GeneratorSource[MemorySourceConfig]):
    """The generator tier over a MemoryBroker, redelivering nacked messages itself."""

    Config = MemorySourceConfig

    def __init__(
        self, config: MemorySourceConfig, ctx: SourceContext, broker: MemoryBroker
    ) -> None:
        super().__init__(config, ctx)
        self.broker = broker
        self.in_flight: set[int] = set()
        self.redeliver: list[int] = []
        self.wake = asyncio.Event()

    async def events(self) -> AsyncIterator[Event]:
        unlisten = self.broker.listen(self.wake.set)
        try:
            cursor = 0
            while True:
                while self.redeliver:
                    offset = self.redeliver.pop(0)
                    self.in_flight.add(offset)
                    yield memory_event(self, self.broker, offset)
                if cursor < len(self.broker.messages):
                    offset, cursor = cursor, cursor + 1
                    if offset not in self.broker.acked and offset not in self.in_flight:
                        self.in_flight.add(offset)
                        yield memory_event(self, self.broker, offset)
                    continue
                self.wake.clear()
                await self.wake.wait()
        finally:
            unlisten()

    async def on_ack(self, event: Event) -> None:
        self.in_flight.discard(offset_of(event))
        self.broker.ack(offset_of(event))

    async def on_nack(self, event: Event, error: BaseException | None) -> None:
        self.in_flight.discard(offset_of(event))
        self.redeliver.append(offset_of(event))
        self.wake.set()


class TestGeneratorSourceContract(MemoryContract):
    source_class = GeneratedMemorySource


class PolledMemorySource(PollingSource[MemorySourceConfig]):
    """The polling tier over a MemoryBroker: every poll returns what is not acked."""

    Config = MemorySourceConfig
    poll_interval_s = 0.01

    def __init__(
        self, config: MemorySourceConfig, ctx: SourceContext, broker: MemoryBroker
    ) -> None:
        super().__init__(config, ctx)
        self.broker = broker

    async def poll(self) -> Sequence[Event]:
        return [memory_event(self, self.broker, o) for o in self.broker.unacked()[:10]]

    def identity(self, event: Event) -> Hashable:
        return offset_of(event)

    async def on_ack(self, event: Event) -> None:
        self.broker.ack(offset_of(event))


class TestPollingSourceContract(MemoryContract):
    source_class = PolledMemorySource


# --- broken sources: one fault each ---------------------------------------------------------------


class AcksInRead(MemorySource):
    """Commits upstream as soon as it reads (auto-commit)."""

    async def read(self) -> Delivery:
        d = await super().read()
        self.broker.ack(int(d.event.records[0]["msg_id"]))
        return d


class CommitsOnClose(MemorySource):
    """Acks everything still outstanding when it closes."""

    async def close(self) -> None:
        for offset in list(self._outstanding):
            self.broker.ack(offset)
        await super().close()


class Patched(Delivery):
    """A delivery whose ack or nack is replaced."""

    def __init__(
        self,
        inner: Delivery,
        ack: Callable[[], Awaitable[None]] | None = None,
        nack: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(inner.event)
        self.inner, self._ack, self._nack = inner, ack, nack

    async def ack(self) -> None:
        await (self._ack() if self._ack else self.inner.ack())

    async def nack(self, error: BaseException | None = None) -> None:
        await (self._nack() if self._nack else self.inner.nack(error))


async def nothing() -> None:
    pass


class AckKeepsTheMessage(MemorySource):
    """ack() forgets to remove the message upstream."""

    async def read(self) -> Delivery:
        return Patched(await super().read(), ack=nothing)


class NackLosesTheMessage(MemorySource):
    """nack() does nothing, though the source claims to redeliver."""

    async def read(self) -> Delivery:
        return Patched(await super().read(), nack=nothing)


class OverCommits(MemorySource):
    """A positional source that commits up to the highest acked offset, gaps or not."""

    async def read(self) -> Delivery:
        d = await super().read()
        broker, offset = self.broker, int(d.event.records[0]["msg_id"])

        async def ack() -> None:
            for o in range(offset + 1):
                broker.ack(o)

        return Patched(d, ack=ack)


class CloseDoesNotWakeRead(MemorySource):
    async def close(self) -> None:
        self.closed = True  # forgets to wake a pending read()


class CloseTwiceFails(MemorySource):
    async def close(self) -> None:
        if self.closed:
            raise RuntimeError("already closed")
        await super().close()


class CloseWithoutConnectFails(MemorySource):
    async def close(self) -> None:
        if not self.connects:
            raise AttributeError("'NoneType' object has no attribute 'disconnect'")
        await super().close()


class ReadAfterCloseReconnects(MemorySource):
    async def read(self) -> Delivery:
        if self.closed:
            raise NotConnected("closed")
        return await super().read()


class IdleReadReturns(MemorySource):
    """Returns an empty event instead of waiting when there is nothing to read."""

    async def read(self) -> Delivery:
        if not self.closed and not self.broker.unacked():
            return _Empty(timer_event(self.ctx.name, datetime.now(UTC)))
        return await super().read()


class _Empty(Delivery):
    async def ack(self) -> None:
        pass


class CancelBreaksIt(MemorySource):
    """A cancelled read() leaves the source dead: every later read ends the input."""

    async def read(self) -> Delivery:
        try:
            return await super().read()
        except asyncio.CancelledError:
            self.closed = True
            raise


class WrongTrigger(MemorySource):
    def _event(self, offset: int) -> Event:
        ev = super()._event(offset)
        return Event(kind=ev.kind, trigger="somebody-else", time=ev.time, records=ev.records)


class UndocumentedConfig(MemorySourceConfig):
    region: str = "here"


class UndocumentedField(MemorySource):
    Config = UndocumentedConfig


class DriftingConfig(MemorySourceConfig):
    prefix: str = Field("q", description="Prefixed with 'x-' when validated (not idempotent).")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return f"x-{v}"


class ConfigDoesNotRoundTrip(MemorySource):
    Config = DriftingConfig


BROKEN: list[tuple[type[MemorySource], str, str, dict[str, Any]]] = [
    (AcksInRead, "test_unacked_deliveries_come_back_after_a_reconnect", "did not come", {}),
    (AcksInRead, "test_nothing_is_committed_before_ack", "did not come", {}),
    (CommitsOnClose, "test_unacked_deliveries_come_back_after_a_reconnect", "did not come", {}),
    (AckKeepsTheMessage, "test_ack_removes", "delivered again, though it was acked", {}),
    (NackLosesTheMessage, "test_nack_redelivers", "did not come", {}),
    (
        OverCommits,
        "test_out_of_order_acks_do_not_over_commit",
        "did not come",
        {"has_positions": True},
    ),
    (CloseDoesNotWakeRead, "test_close_unblocks_a_pending_read", "still waits", {}),
    (CloseTwiceFails, "test_close_is_idempotent", "second time raised", {}),
    (
        CloseWithoutConnectFails,
        "test_close_without_connect",
        r"close\(\) without connect\(\) raised",
        {},
    ),
    (ReadAfterCloseReconnects, "test_connect_and_close", "must raise EndOfInput", {}),
    (IdleReadReturns, "test_close_unblocks_a_pending_read", "idle upstream returned", {}),
    (CancelBreaksIt, "test_a_cancelled_read_leaves_the_source_usable", "EndOfInput", {}),
    (WrongTrigger, "test_published_messages_arrive_as_well_formed_events", "ctx.name", {}),
    (UndocumentedField, "test_config_model_documents_every_field", "region", {}),
    (ConfigDoesNotRoundTrip, "test_config_round_trips", "does not validate back", {}),
]


@pytest.mark.parametrize(
    ("source_class", "check", "message", "flags"),
    BROKEN,
    ids=[f"{cls.__name__}-{check.removeprefix('test_')}" for cls, check, _, _ in BROKEN],
)
def test_the_suite_catches_a_broken_source(
    source_class: type[MemorySource], check: str, message: str, flags: dict[str, Any]
) -> None:
    # Given a suite over a source with one fault (and otherwise the memory source's flags)
    suite_class = type(f"{source_class.__name__}Contract", (MemoryContract,), {
        "source_class": source_class, "quiet_s": 0.1, "redelivery_timeout_s": 0.5,
        "close_timeout_s": 0.5, **flags,
    })  # fmt: skip
    # When the check aimed at that fault runs, then it fails, saying why
    with pytest.raises(AssertionError, match=message):
        getattr(suite_class(), check)()
    # ... and the same check passes on the correct memory source with the same flags
    good = type("GoodContract", (MemoryContract,), {"source_class": MemorySource, **flags})
    getattr(good(), check)()


def test_the_suite_checks_the_entry_point_name() -> None:
    wrong = type("WrongName", (MemoryContract,), {"entry_point": "timer"})
    with pytest.raises(AssertionError):
        wrong().test_entry_point_loads_the_class()


def test_a_check_that_hangs_fails_at_its_deadline() -> None:
    class Hangs(MemoryContract):
        check_timeout_s = 0.2

    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(AssertionError, match=r"did not finish within check_timeout_s=0\.2"):
        Hangs().run(forever)


def test_capabilities_a_source_lacks_skip_their_checks() -> None:
    class NoPublish(MemoryContract):
        can_publish = False

    with pytest.raises(pytest.skip.Exception, match="can_publish is False"):
        NoPublish().test_ack_removes()


# --- the doubles with the real core -------------------------------------------------------------


def ctx(store: Any, name: str = "t") -> SourceContext:
    return SourceContext(
        name=name,
        function="f",
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger(name),
    )


async def test_the_daemon_pumps_a_memory_source_and_acks_after_acceptance(tmp_path: Path) -> None:
    target = RecordingTarget(FunctionConfig(concurrency=4))
    trigger = MemorySourceConfig(type="memory", function="f", topic="orders")
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05),
        functions={"f": target.config},
        triggers={"t": trigger},
    )
    store = SqliteStore(tmp_path)
    broker = MemoryBroker()
    src = MemorySource(trigger, ctx(store), broker)
    async with Daemon(config, store=store, targets={"f": target}, sources={"t": src}) as daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        broker.publish("a", "b", "c")
        await until(lambda: len(target.calls) == 3 and len(broker.acked) == 3)
        bodies = sorted(e["Records"][0]["CMQ"]["msgBody"] for e in target.events)
        assert bodies == ["a", "b", "c"]
        assert target.events[0]["Records"][0]["CMQ"]["topicName"] == "orders"
        daemon.request_stop()
        await run


async def test_the_queue_dead_letters_into_a_memory_sink(tmp_path: Path) -> None:
    def fail(event: Any, inv: Any) -> None:
        raise HandlerFailed("boom")

    fc = FunctionConfig(async_=AsyncConfig(retry_attempts=0))
    target = RecordingTarget(fc, behaviour=fail)
    config = Config(daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05), functions={"f": fc})
    store = SqliteStore(tmp_path)
    await store.open()
    sink = MemoryDeadLetterSink()
    sink.fail_with = ConnectionError("sink down")
    queue = DurableQueue(config, store, Dispatcher({"f": target}), {"f": sink})
    await queue.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(queue.run(stop))
    try:
        # Given a sink that is down, an event that fails stays queued (nothing is lost)
        await queue.submit("f", {"n": 1})
        await until(lambda: sink.attempts >= 1)
        assert sink.records == [] and queue.depth == 1
        # When the sink works again, then the next failed event is dead-lettered into it
        sink.fail_with = None
        await queue.submit("f", {"n": 2})
        await until(lambda: len(sink.records) == 1)
        record = sink.records[0]
        assert record["ErrorClass"] == "function_error"
        assert json.loads(record["Body"]["ClientContext"]) == {"n": 2}
    finally:
        stop.set()
        await runner
        await sink.close()
        await store.close()
    assert sink.closed


async def test_memory_source_semantics() -> None:

    broker = MemoryBroker()
    config = MemorySourceConfig(type="memory", function="f")
    src = MemorySource(config, ctx(MemoryStore()), broker)
    await src.connect()
    broker.publish("a", "b")
    a, b = await src.read(), await src.read()
    await b.nack(RuntimeError("x"))
    again = await src.read()
    assert again.event.records[0]["body"] == "b"
    await a.ack()
    assert broker.acked == {0} and broker.nack_log == [1]
    reading = asyncio.create_task(src.read())
    await asyncio.sleep(0)
    await src.close()
    with pytest.raises(EndOfInput):
        await reading


# --- the easier tiers, beyond the suite ---------------------------------------------------------


async def test_a_generator_that_fails_is_started_again_by_connect() -> None:

    class Flaky(GeneratorSource[MemorySourceConfig]):
        Config = MemorySourceConfig
        starts = 0

        async def events(self) -> AsyncIterator[Event]:
            self.starts += 1
            yield timer_event(self.ctx.name, datetime.now(UTC), f"start {self.starts}")
            raise ConnectionResetError("upstream went away")

    src = Flaky(MemorySourceConfig(type="memory", function="f"), ctx(MemoryStore()))
    await src.connect()
    assert (await src.read()).event.records[0]["message"] == "start 1"
    with pytest.raises(ConnectionResetError):  # the core logs it and reads again
        await src.read()
    with pytest.raises(NotConnected):  # ... and is told to reconnect
        await src.read()
    await src.connect()
    assert (await src.read()).event.records[0]["message"] == "start 2"
    await src.close()


async def test_a_polling_source_skips_what_is_in_flight_and_backs_off() -> None:

    broker = MemoryBroker()
    src = PolledMemorySource(
        MemorySourceConfig(type="memory", function="f"), ctx(MemoryStore()), broker
    )
    await src.connect()
    broker.publish("a")
    d = await src.read()
    # Given "a" in flight, a poll that finds it again delivers nothing: the core backs off
    with pytest.raises(BackOff) as e:
        await src.read()
    assert e.value.delay_s == PolledMemorySource.poll_interval_s
    # When it is nacked, the next poll delivers it again; once acked, never again
    await d.nack(RuntimeError("not accepted"))
    again = await src.read()
    assert again.event.records[0]["body"] == "a"
    await again.ack()
    with pytest.raises(BackOff):
        await src.read()
    await src.close()
    with pytest.raises(EndOfInput):
        await src.read()


def test_an_unreachable_service_fails_the_test_instead_of_skipping_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bridge.testing import free_port
    from tests.contract.conftest import require_service

    monkeypatch.delenv("CI", raising=False)  # not only under CI
    with pytest.raises(pytest.fail.Exception, match=r"Nothing is not reachable at 127\.0\.0\.1"):
        require_service("127.0.0.1", free_port(), "Nothing", timeout=1)


def _ctx() -> SourceContext:
    return SourceContext(
        name="orders",
        function="f",
        store=MemoryStore(),
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger("t"),
    )


async def test_a_source_is_an_async_context_manager() -> None:
    # Given a broker with one message
    broker = MemoryBroker()
    broker.publish("hello")
    config = MemorySourceConfig(type="memory", function="f")
    # When a block runs under `async with`, the source is connected in it and closed after
    async with MemorySource(config, _ctx(), broker=broker) as source:
        assert source.connected and not source.closed
        d = await source.read()
        await d.ack()
    assert source.closed and broker.acked == {0}


class ConnectFails(MemorySource):
    async def connect(self) -> None:
        raise ConnectionRefusedError("upstream down")


async def test_an_async_with_whose_connect_fails_closes_the_source() -> None:
    source = ConnectFails(MemorySourceConfig(type="memory", function="f"), _ctx())
    with pytest.raises(ConnectionRefusedError):
        async with source:
            pytest.fail("the block must not run")
    assert source.closed
