"""Ordered synchronous invocation (Kafka-style): retry in place, dead-letter then ack, never
ack a batch that was neither handled nor dead-lettered."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge import errors
from bridge.abc import DeadLetterContext, DeadLetterSink, Delivery, Undeliverable
from bridge.deadletter import LocalSink
from bridge.dispatcher import Dispatcher
from bridge.events import Event, Format, Kind, ckafka_record
from bridge.ordered import OrderedInvoker
from bridge.retry import OrderedConfig
from bridge.store import SqliteStore
from bridge.testing import RecordingTarget, until


class Batch(Delivery):
    def __init__(self) -> None:
        rec = ckafka_record(topic="t", partition=0, offset=5, key=b"k", value=b"v")
        super().__init__(
            Event(kind=Kind.CKAFKA, trigger="k", time=datetime.now(UTC), records=(rec,))
        )
        self.acked = 0

    async def ack(self) -> None:
        self.acked += 1


def failing(n: int, exc: type[errors.InvocationError] = errors.HandlerFailed) -> Any:
    left = [n]

    def behaviour(event: Mapping[str, Any], inv: Any) -> str:
        if left[0] > 0:
            left[0] -= 1
            raise exc("not yet")
        return "ok"

    return behaviour


async def invoker(
    tmp_path: Path, target: RecordingTarget, sink: DeadLetterSink | None = None, **retry: Any
) -> tuple[OrderedInvoker, SqliteStore]:
    store = SqliteStore(tmp_path)
    await store.open()
    sink = sink or LocalSink(
        "local", DeadLetterContext(store=store, logger=logging.getLogger("dl"))
    )
    cfg = OrderedConfig(backoff_initial=0.01, backoff_max=0.05, **retry)
    return OrderedInvoker(Dispatcher({"f": target}), store, {"f": sink}, lambda _: cfg), store


async def test_retries_in_place_then_acks(tmp_path: Path) -> None:
    target = RecordingTarget(behaviour=failing(2))
    inv, store = await invoker(tmp_path, target)
    b = Batch()
    await inv.accept(b, trigger="k", function="f", fmt=Format.SCF)
    assert b.acked == 1 and len(target.calls) == 3
    event, invocation = target.calls[0]
    assert invocation.invocation_type == "RequestResponse"
    assert event == {
        "Records": [
            {"Ckafka": {"topic": "t", "partition": 0, "offset": 5, "msgKey": "k", "msgBody": "v"}}
        ]
    }
    assert await store.list_dead_letters() == []
    await store.close()


async def test_dead_letters_after_retry_attempts_then_acks(tmp_path: Path) -> None:
    target = RecordingTarget(behaviour=failing(100))
    inv, store = await invoker(tmp_path, target, retry_attempts=3)
    b = Batch()
    await inv.accept(b, trigger="k", function="f", fmt=Format.SCF)
    assert b.acked == 1 and len(target.calls) == 4
    rec = json.loads((await store.list_dead_letters())[0].record)
    assert rec["Body"]["RequestSource"] == "TRIGGER_CKAFKA"
    assert rec["Body"]["InvocationType"] == "RequestResponse"
    assert rec["Body"]["RetryNum"] == 3
    assert json.loads(rec["Body"]["ClientContext"])["Records"][0]["Ckafka"]["offset"] == 5
    await store.close()


async def test_invalid_request_is_dead_lettered_at_once(tmp_path: Path) -> None:
    target = RecordingTarget(behaviour=failing(100, errors.InvalidRequest))
    inv, store = await invoker(tmp_path, target)
    b = Batch()
    await inv.accept(b, trigger="k", function="f", fmt=Format.SCF)
    assert b.acked == 1 and len(target.calls) == 1
    assert len(await store.list_dead_letters()) == 1
    await store.close()


class DownSink(DeadLetterSink):
    def __init__(self) -> None:
        super().__init__("down://", None)  # type: ignore[arg-type]
        self.up = False
        self.calls = 0
        self.records: list[Mapping[str, Any]] = []

    async def put(self, record: Mapping[str, Any]) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError("sink down")
        self.records.append(record)


async def test_no_ack_until_dead_lettered(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("bridge.ordered.SINK_RETRY_MAX_S", 0.05)
    sink = DownSink()
    target = RecordingTarget(behaviour=failing(100, errors.InvalidRequest))
    inv, store = await invoker(tmp_path, target, sink=sink)
    b = Batch()
    task = asyncio.create_task(inv.accept(b, trigger="k", function="f", fmt=Format.SCF))
    await until(lambda: sink.calls >= 2)
    assert b.acked == 0  # the partition waits: nothing is skipped
    sink.up = True
    await task
    assert b.acked == 1 and len(sink.records) == 1
    await store.close()


async def test_cancel_abandons_without_ack(tmp_path: Path) -> None:
    target = RecordingTarget(behaviour=failing(100, errors.WorkerCrashed))
    inv, store = await invoker(tmp_path, target)
    b = Batch()
    task = asyncio.create_task(inv.accept(b, trigger="k", function="f", fmt=Format.SCF))
    await until(lambda: len(target.calls) >= 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert b.acked == 0
    await store.close()


async def test_more_partitions_than_concurrency_wait_instead_of_being_throttled(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()

    async def slow(event: Any, inv: Any) -> str:
        await gate.wait()
        return "ok"

    from bridge.config import FunctionConfig

    target = RecordingTarget(FunctionConfig(concurrency=1), behaviour=slow)
    inv, store = await invoker(tmp_path, target, retry_attempts=0)
    batches = [Batch(), Batch(), Batch()]
    tasks = [
        asyncio.create_task(inv.accept(b, trigger="k", function="f", fmt=Format.SCF))
        for b in batches
    ]
    await until(lambda: len(target.calls) == 1)
    gate.set()
    await asyncio.gather(*tasks)
    # every batch ran once, none was throttled (retry_attempts=0 would have dead-lettered it)
    assert len(target.calls) == 3 and all(b.acked == 1 for b in batches)
    assert await store.list_dead_letters() == []
    await store.close()


async def test_an_event_that_cannot_be_encoded_is_dead_lettered_then_acked(
    tmp_path: Path,
) -> None:
    from bridge.events import timer_event

    target = RecordingTarget()
    inv, store = await invoker(tmp_path, target)
    b = Batch()
    b.event = timer_event("k", datetime(2026, 11, 29, tzinfo=UTC), "bad \ud800 text")
    await inv.accept(b, trigger="k", function="f", fmt=Format.SCF)
    # Then it is never invoked (no worker can receive it), dead-lettered at once, acked
    assert target.calls == [] and b.acked == 1
    [dl] = await store.list_dead_letters()
    assert json.loads(dl.record)["ErrorClass"] == "invalid_request"
    await store.close()


async def test_an_abandoned_delivery_stops_retrying_and_is_neither_acked_nor_dead_lettered(
    tmp_path: Path,
) -> None:
    # Given a batch that fails every time, whose partition is revoked during its retries
    class Revocable(Batch):
        def __init__(self) -> None:
            super().__init__()
            self.gone = False
            self.nacked = 0

        @property
        def abandoned(self) -> bool:
            return self.gone

        async def nack(self, error: BaseException | None = None) -> None:
            self.nacked += 1

    b = Revocable()

    def behaviour(event: Mapping[str, Any], inv: Any) -> str:
        if len(target.calls) >= 3:
            b.gone = True  # revoked: the next owner delivers it again
        raise errors.HandlerFailed("always")

    target = RecordingTarget(behaviour=behaviour)
    inv, store = await invoker(tmp_path, target, retry_attempts=10_000)
    # When it is accepted, the retries stop at once after the revoke (not 10,000 of them)
    await asyncio.wait_for(inv.accept(b, trigger="k", function="f", fmt=Format.SCF), 10)
    # Then it is handed back, not acked (the offset is not ours to commit) nor dead-lettered
    assert len(target.calls) == 3 and (b.acked, b.nacked) == (0, 1)
    assert await store.list_dead_letters() == []
    await store.close()


async def test_an_abandoned_delivery_stops_waiting_for_a_down_sink(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr("bridge.ordered.SINK_RETRY_MAX_S", 0.05)

    class Revocable(Batch):
        gone = False
        nacked = 0

        @property
        def abandoned(self) -> bool:
            return self.gone

        async def nack(self, error: BaseException | None = None) -> None:
            self.nacked += 1

    sink = DownSink()
    inv, store = await invoker(
        tmp_path, RecordingTarget(behaviour=failing(100, errors.InvalidRequest)), sink=sink
    )
    b = Revocable()
    task = asyncio.create_task(inv.accept(b, trigger="k", function="f", fmt=Format.SCF))
    await until(lambda: sink.calls >= 2)
    # When the partition is revoked while the dead letter cannot be written
    b.gone = True
    await asyncio.wait_for(task, 10)
    # Then it stops waiting: handed back (the next owner handles it), not acked
    assert (b.acked, b.nacked) == (0, 1) and sink.records == []
    await store.close()


async def test_a_reload_that_changes_retry_takes_effect_with_the_next_delivery(
    tmp_path: Path,
) -> None:
    # found by the mutation run (scripts/mutation.py): flipping the cache check in
    # OrderedInvoker.policy() passed every test
    target = RecordingTarget()
    inv, store = await invoker(tmp_path, target)
    current = {"cfg": OrderedConfig(retry_attempts=3)}
    inv._policy_for = lambda _: current["cfg"]
    try:
        first = inv.policy("k")
        assert inv.policy("k") is first  # unchanged config: the same policy
        # When a reload changes the trigger's retry settings
        current["cfg"] = OrderedConfig(retry_attempts=0)
        # Then the next delivery gets a policy built from them
        assert inv.policy("k").config.retry_attempts == 0
    finally:
        await store.close()


async def test_an_undeliverable_message_is_dead_lettered_then_acked_never_invoked(
    tmp_path: Path,
) -> None:
    # Given an ordered source that hands the core a message it cannot parse
    acked: list[bool] = []

    async def ack() -> None:
        acked.append(True)

    target = RecordingTarget()
    inv, store = await invoker(tmp_path, target)
    d = Undeliverable({"value": "\x00garbage"}, "not JSON", ack, kind=Kind.CKAFKA, trigger="k")
    await inv.accept(d, trigger="k", function="f", fmt=Format.SCF)
    # Then it is in the dead letters (a sync invocation's), acked, and the function never ran
    [dl] = await store.list_dead_letters()
    rec = json.loads(dl.record)
    assert rec["ErrorClass"] == "invalid_request" and rec["ErrorMessage"] == "trigger k: not JSON"
    assert rec["Body"]["InvocationType"] == "RequestResponse"
    assert rec["Body"]["RequestSource"] == "TRIGGER_CKAFKA"
    assert json.loads(rec["Body"]["ClientContext"]) == {"value": "\x00garbage"}
    assert acked == [True] and target.calls == []
    await store.close()
