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

import pytest

from bridge import errors
from bridge.abc import DeadLetterContext, DeadLetterSink, Delivery, Undeliverable
from bridge.deadletter import LocalSink
from bridge.dispatcher import Dispatcher
from bridge.events import Event, Format, Kind, ckafka_record
from bridge.models import FunctionConfig
from bridge.ordered import ALL, OrderedInvoker
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
        second = inv.policy("k")
        assert second.config.retry_attempts == 0
        # and a reload that builds equal settings anew keeps the policy
        current["cfg"] = OrderedConfig(retry_attempts=0)
        assert inv.policy("k") is second
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


# --- consecutive batches of one partition (Delivery.order_key) ---------------------------------


class Record(Delivery):
    """Batch ``offset`` of partition 0; notes its settling in ``log``."""

    def __init__(self, offset: int, log: list[str]) -> None:
        rec = ckafka_record(topic="t", partition=0, offset=offset, key=b"k", value=b"v")
        super().__init__(
            Event(kind=Kind.CKAFKA, trigger="k", time=datetime.now(UTC), records=(rec,))
        )
        self.offset, self.log = offset, log
        self.gone = False

    async def ack(self) -> None:
        self.log.append(f"ack {self.offset}")

    async def nack(self, error: BaseException | None = None) -> None:
        self.log.append(f"nack {self.offset}")

    @property
    def abandoned(self) -> bool:
        return self.gone


def offset_of(event: Mapping[str, Any]) -> int:
    return int(event["Records"][0]["Ckafka"]["offset"]) if "Records" in event else -1


class Pipelining(RecordingTarget):
    """Takes several invocations in one round trip (as the python runtime does) and stops at
    the first failure when asked to; records each round trip's offsets."""

    def __init__(self, behaviour: Any = None) -> None:
        super().__init__(behaviour=behaviour)
        self.trips: list[list[int]] = []

    async def invoke_many(
        self, events: list[Any], invocations: list[Any], *, stop_at_failure: bool = False
    ) -> list[Any]:
        self.trips.append([offset_of(e) for e in events])
        out: list[Any] = []
        for event, invocation in zip(events, invocations, strict=True):
            try:
                out.append(await self.invoke(event, invocation))
            except errors.InvocationError as e:
                out.append(e)
                if stop_at_failure:
                    break
        return out


def fails_at(offset: int, times: int) -> Any:
    left = [times]

    def behaviour(event: Mapping[str, Any], inv: Any) -> str:
        if offset_of(event) == offset and left[0] > 0:
            left[0] -= 1
            raise errors.HandlerFailed(f"offset {offset} fails")
        return "ok"

    return behaviour


async def measured(inv: OrderedInvoker) -> None:
    """One invocation first: until a function's duration is measured, one at a time."""
    await inv.dispatcher.invoke("f", {"warm": True})


async def test_consecutive_batches_share_a_round_trip_that_stops_at_the_first_failure(
    tmp_path: Path,
) -> None:
    # Given six consecutive batches of a partition, the third failing once
    target = Pipelining(behaviour=fails_at(2, times=1))
    inv, store = await invoker(tmp_path, target)
    await measured(inv)
    settled: list[str] = []
    batches = [Record(o, settled) for o in range(6)]
    # When they are accepted together
    ok = await inv.accept_in_order(batches, trigger="k", function="f", fmt=Format.SCF)
    # Then all went in one round trip that stopped at the failure (3, 4 and 5 did not run),
    # the failed one was retried alone before anything after it, and the rest went in one
    # more round trip
    assert target.trips == [[0, 1, 2, 3, 4, 5], [3, 4, 5]]
    ran = [offset_of(e) for e, _ in target.calls[1:]]
    assert ran == [0, 1, 2, 2, 3, 4, 5]
    # And each was acked once, in order, nothing dead-lettered
    assert ok and settled == [f"ack {o}" for o in range(6)]
    assert await store.list_dead_letters() == []
    await store.close()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one at a time", "round trips"])
async def test_a_stop_hands_back_what_was_not_started_and_finishes_what_runs(
    tmp_path: Path, pipelining: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given six consecutive batches of trigger k, and a stop of k (or of every trigger)
    # that comes while batch 0 runs
    inv: OrderedInvoker | None = None
    stops = iter(["k", ALL])

    def behaviour(event: Mapping[str, Any], call: Any) -> str:
        if offset_of(event) == 0:
            assert inv is not None
            inv.stop_starting(next(stops))
        return "ok"

    target = Pipelining(behaviour) if pipelining else RecordingTarget(behaviour=behaviour)
    inv, store = await invoker(tmp_path, target)
    await measured(inv)
    if pipelining:  # round trips of two (as a function of ~25 ms would have)
        monkeypatch.setattr(inv.dispatcher, "batch_size", lambda function: 2)
    for _ in range(2):
        settled: list[str] = []
        trips = len(target.trips) if isinstance(target, Pipelining) else 0
        ok = await inv.accept_in_order(
            [Record(o, settled) for o in range(6)], trigger="k", function="f", fmt=Format.SCF
        )
        # Then what ran (batch 0, or the round trip it was in) was acked, and the rest was
        # handed back without running
        ran = len([s for s in settled if s.startswith("ack")])
        assert not ok and ran == (2 if pipelining else 1)
        if isinstance(target, Pipelining):
            assert target.trips[trips:] == [[0, 1]]
        assert settled == [f"ack {o}" for o in range(ran)] + [f"nack {o}" for o in range(ran, 6)]
        inv.resume("k")
        inv.resume()
    # And a stop of another trigger, or after a resume, changes nothing for k
    inv.stop_starting("other")
    settled = []
    ok = await inv.accept_in_order(
        [Record(o, settled) for o in range(1, 4)], trigger="k", function="f", fmt=Format.SCF
    )
    assert ok and settled == ["ack 1", "ack 2", "ack 3"]
    await store.close()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one at a time", "round trips"])
async def test_a_stop_hands_back_a_unit_still_waiting_for_a_concurrency_slot(
    tmp_path: Path, pipelining: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a function of concurrency 1 running partition 0's batch, held open, and
    # partition 1's two batches waiting for its slot
    release = asyncio.Event()

    async def held(event: Mapping[str, Any], call: Any) -> str:
        if offset_of(event) == 0:
            await release.wait()
        return "ok"

    target = Pipelining(held) if pipelining else RecordingTarget(behaviour=held)
    target.config = FunctionConfig(concurrency=1)
    inv, store = await invoker(tmp_path, target)
    if pipelining:  # partition 1's two batches in one round trip
        monkeypatch.setattr(inv.dispatcher, "batch_size", lambda function: 2)
    waits: list[str] = []
    wait_for_room = inv.dispatcher.wait_for_room

    async def counted(function: str) -> None:
        waits.append(function)
        await wait_for_room(function)

    inv.dispatcher.wait_for_room = counted  # type: ignore[method-assign]
    settled: list[str] = []
    first = asyncio.create_task(
        inv.accept_in_order([Record(0, settled)], trigger="k", function="f", fmt=Format.SCF)
    )
    await until(lambda: len(target.calls) == 1, what="batch 0 running")
    waiting = asyncio.create_task(
        inv.accept_in_order(
            [Record(o, settled) for o in (100, 101)], trigger="k", function="f", fmt=Format.SCF
        )
    )
    # (batch 0 waited twice: before its stop check and before its first attempt)
    await until(lambda: len(waits) == 3, what="partition 1 waiting for the slot")
    # When the trigger stops, then the slot frees
    inv.stop_starting("k")
    release.set()
    # Then what ran settles, and the waiting batches go back without running
    assert await first is True
    assert await waiting is False
    assert [offset_of(e) for e, _ in target.calls] == [0]
    assert sorted(settled) == ["ack 0", "nack 100", "nack 101"]
    await store.close()


async def test_a_batch_dead_lettered_in_a_run_is_acked_in_its_place(tmp_path: Path) -> None:
    target = Pipelining(behaviour=fails_at(1, times=100))
    inv, store = await invoker(tmp_path, target, retry_attempts=2)
    await measured(inv)
    settled: list[str] = []
    ok = await inv.accept_in_order(
        [Record(o, settled) for o in range(4)], trigger="k", function="f", fmt=Format.SCF
    )
    # 1 fails its attempts (the partition waits), is dead-lettered, then 2 and 3 go on
    assert [offset_of(e) for e, _ in target.calls[1:]] == [0, 1, 1, 1, 2, 3]
    assert ok and settled == ["ack 0", "ack 1", "ack 2", "ack 3"]
    assert len(await store.list_dead_letters()) == 1
    await store.close()


async def test_batches_after_one_given_up_are_nacked_without_running(tmp_path: Path) -> None:
    # Given the third batch fails, and the partition is revoked while it is retried
    settled: list[str] = []
    batches = [Record(o, settled) for o in range(5)]

    def revoke_on_failure(event: Mapping[str, Any], invocation: Any) -> str:
        if offset_of(event) == 2:
            for b in batches:
                b.gone = True
            raise errors.HandlerFailed("fails")
        return "ok"

    target = Pipelining(behaviour=revoke_on_failure)
    inv, store = await invoker(tmp_path, target, retry_attempts=100)
    await measured(inv)
    ok = await inv.accept_in_order(batches, trigger="k", function="f", fmt=Format.SCF)
    # Then it and everything after it were handed back, none of those after it ran
    assert [offset_of(e) for e, _ in target.calls[1:]] == [0, 1, 2]
    assert not ok and settled == ["ack 0", "ack 1", "nack 2", "nack 3", "nack 4"]
    assert await store.list_dead_letters() == []
    await store.close()


@pytest.mark.parametrize("batching", [False, True], ids=["one at a time", "one round trip"])
async def test_a_failed_ack_hands_back_the_rest(tmp_path: Path, batching: bool) -> None:
    class AckFails(Record):
        async def ack(self) -> None:
            raise RuntimeError("commit failed")

    target = Pipelining() if batching else RecordingTarget()
    inv, store = await invoker(tmp_path, target)
    await measured(inv)
    settled: list[str] = []
    batches = [Record(0, settled), AckFails(1, settled), Record(2, settled)]
    with pytest.raises(RuntimeError, match="commit failed"):
        await inv.accept_in_order(batches, trigger="k", function="f", fmt=Format.SCF)
    # 2 is handed back, not acked, after 1 could not be acked (the upstream delivers both
    # again, in order); one at a time it did not even run
    assert settled == ["ack 0", "nack 1", "nack 2"]
    ran = [offset_of(e) for e, _ in target.calls[1:]]
    assert ran == ([0, 1, 2] if batching else [0, 1])
    await store.close()


async def test_a_target_that_does_not_batch_gets_them_one_at_a_time_in_order(
    tmp_path: Path,
) -> None:
    target = RecordingTarget(behaviour=fails_at(1, times=1))
    inv, store = await invoker(tmp_path, target)
    await measured(inv)
    settled: list[str] = []
    ok = await inv.accept_in_order(
        [Record(o, settled) for o in range(3)], trigger="k", function="f", fmt=Format.SCF
    )
    assert [offset_of(e) for e, _ in target.calls[1:]] == [0, 1, 1, 2]
    assert ok and settled == ["ack 0", "ack 1", "ack 2"]
    await store.close()


async def test_a_round_trip_is_bounded_by_the_batch_budget(tmp_path: Path) -> None:
    # Given a function measured at 10 ms per invocation: about BATCH_BUDGET_S (50 ms) of
    # work goes in one round trip
    target = Pipelining()
    inv, store = await invoker(tmp_path, target)
    inv.dispatcher._measured("f", 0.010, 1)
    settled: list[str] = []
    await inv.accept_in_order(
        [Record(o, settled) for o in range(12)], trigger="k", function="f", fmt=Format.SCF
    )
    # (the next ones by what the first trip measured)
    assert target.trips[0] == [0, 1, 2, 3, 4] and len(target.calls) == 12
    assert settled == [f"ack {o}" for o in range(12)]
    await store.close()
