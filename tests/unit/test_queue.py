"""The durable queue against the real SQLite store: acceptance before ack, retries by error
class with intervals from config, dead letters in SCF's shape, failing sinks, handler signals."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge import errors
from bridge.abc import DeadLetterContext, DeadLetterSink, Delivery, Undeliverable
from bridge.config import AsyncConfig, Config, DaemonConfig, FunctionConfig
from bridge.deadletter import LocalSink
from bridge.dispatcher import Dispatcher
from bridge.events import Format, Kind, RawEvent, timer_event
from bridge.queue import DUE_SKEW_S, DurableQueue
from bridge.store import SqliteStore
from bridge.testing import RecordingTarget, until


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    target: RecordingTarget,
    *,
    sink: DeadLetterSink | None = None,
    concurrency: int = 4,
    grace: float = 30.0,
    **policy: Any,
) -> AsyncIterator[tuple[DurableQueue, SqliteStore]]:
    fc = FunctionConfig(concurrency=concurrency, async_=AsyncConfig(**policy))
    target.config = fc
    daemon = DaemonConfig(state_dir=tmp_path, queue_poll=0.05, shutdown_grace=grace)
    config = Config(daemon=daemon, functions={"f": fc})
    store = SqliteStore(tmp_path)
    await store.open()
    ctx = DeadLetterContext(store=store, logger=logging.getLogger("dl"))
    q = DurableQueue(
        config, store, Dispatcher({"f": target}), {"f": sink or LocalSink("local", ctx)}
    )
    await q.start()
    stop = asyncio.Event()
    task = asyncio.create_task(q.run(stop))
    await asyncio.sleep(0)  # the runner is running: accepted rows are leased to it at insert
    try:
        yield q, store
    finally:
        stop.set()
        await task
        await store.close()


async def _claim_nothing(*args: Any, **kw: Any) -> list[Any]:
    return []


class FakeDelivery(Delivery):
    def __init__(self, message: str = "m") -> None:
        super().__init__(timer_event("tick", datetime(2026, 11, 29, 13, 0, tzinfo=UTC), message))
        self.acked = self.nacked = 0

    async def ack(self) -> None:
        self.acked += 1

    async def nack(self, error: BaseException | None = None) -> None:
        self.nacked += 1


async def test_accept_commits_then_acks_and_invokes(tmp_path: Path) -> None:
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        d = FakeDelivery("hello")
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        assert d.acked == 1
        await until(lambda: len(target.calls) == 1)
        event, inv = target.calls[0]
        assert event == {
            "Type": "Timer",
            "TriggerName": "tick",
            "Time": "2026-11-29T13:00:00Z",
            "Message": "hello",
        }
        assert inv.invocation_type == "Event"
        await until(lambda: q.stats["succeeded"] == 1)
        assert (await store.queue_stats())["depth"] == {}


async def test_an_event_accepted_here_starts_without_a_claim(tmp_path: Path) -> None:
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        # Given a store whose claims find nothing (only the insert's lease can start it)
        store.claim = _claim_nothing  # type: ignore[method-assign]
        d = FakeDelivery("here")
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        # Then it runs, leased to this runner until then
        await until(lambda: len(target.calls) == 1)
        assert target.events[0]["Message"] == "here" and d.acked == 1
        assert q.stats["succeeded"] == 1


async def test_a_delivery_taken_ahead_of_its_time_is_held_until_then(tmp_path: Path) -> None:
    started: list[float] = []
    target = RecordingTarget(behaviour=lambda event, inv: started.append(time.time()))
    async with running(tmp_path, target) as (q, store):
        # Given a store whose claims find nothing (only the insert's lease can start it)
        store.claim = _claim_nothing  # type: ignore[method-assign]
        d = FakeDelivery("early")
        d.not_before = due = time.time() + 0.5  # type: ignore[misc]
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        # accepted and acked at once, started at its time, not before
        assert d.acked == 1 and not started
        await until(lambda: started, what="the start at its time")
        assert started[0] >= due - DUE_SKEW_S


async def test_a_row_held_until_due_is_given_back_at_a_stop_and_runs_later(
    tmp_path: Path,
) -> None:
    first = RecordingTarget()
    async with running(tmp_path, first) as (q, _):
        d = FakeDelivery("held")
        d.not_before = time.time() + 0.5  # type: ignore[misc]
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        assert d.acked == 1
    # stopped before it was due: nothing ran, and the next runner runs it (not leased away)
    assert not first.calls
    second = RecordingTarget()
    async with running(tmp_path, second):
        await until(lambda: second.calls, what="the held row run by the next runner")
        assert second.events[0]["Message"] == "held"


class RawRecordingTarget(RecordingTarget):
    """Takes the queue's bytes as they are (as the python runtime does)."""

    takes_raw = True


class BigIntDelivery(FakeDelivery):
    """An event with an integer beyond 64 bits, which orjson refuses to write."""

    def encoded(self, fmt: Format) -> RawEvent:
        return RawEvent.encode({"Type": "Timer", "big": 2**64 + 1})


async def test_an_event_accepted_here_says_whether_orjson_wrote_it_and_a_stored_row_does_not(
    tmp_path: Path,
) -> None:
    # Given events accepted by a running queue: one orjson wrote, one it refused
    target = RawRecordingTarget()
    async with running(tmp_path, target) as (q, _):
        await q.accept(FakeDelivery("plain"), trigger="tick", function="f", fmt=Format.SCF)
        await q.accept(BigIntDelivery(), trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: len(target.calls) == 2)
    # Then the target takes the bytes with that mark (the python worker then skips its check
    # for long integers): read back alike, the big integer exact
    plain, big = (event for event, _ in target.calls)
    assert isinstance(plain, RawEvent) and plain.plain and plain["Message"] == "plain"
    assert isinstance(big, RawEvent) and not big.plain and big["big"] == 2**64 + 1
    # Given a row accepted while no runner serves (not leased at insert: read back later)
    q2 = DurableQueue(
        Config(daemon=DaemonConfig(state_dir=tmp_path), functions={"f": FunctionConfig()}),
        store := SqliteStore(tmp_path),
        Dispatcher({"f": RecordingTarget()}),
        {},
    )
    await store.open()
    try:
        await q2.accept(FakeDelivery("stored"), trigger="tick", function="f", fmt=Format.SCF)
    finally:
        await store.close()
    # Then the row read from the store is not known to be orjson's: checked as it is read
    later = RawRecordingTarget()
    async with running(tmp_path, later):
        await until(lambda: later.calls, what="the stored row run")
    stored = later.calls[0][0]
    assert isinstance(stored, RawEvent) and not stored.plain and stored["Message"] == "stored"


async def test_rows_held_for_two_instants_start_each_at_its_own(tmp_path: Path) -> None:
    # Given ticks of two instants taken ahead (held by due time, several to one instant)
    started: list[tuple[str, float]] = []
    target = RecordingTarget(
        behaviour=lambda event, inv: started.append((event["Message"], time.time()))
    )
    async with running(tmp_path, target, concurrency=8) as (q, store):
        store.claim = _claim_nothing  # type: ignore[method-assign]
        now = time.time()
        dues = {"a": now + 0.6, "b": now + 0.3}
        ds = [FakeDelivery(m) for m in ("a", "a", "a", "b", "b")]
        for d in ds:
            d.not_before = dues[d.event.records[0]["message"]]  # type: ignore[misc]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: len(started) == 5, what="all five started")
    # Then each started at its own instant, not before: the later ones after the earlier
    assert [m for m, _ in started] == ["b", "b", "a", "a", "a"]
    assert all(t >= dues[m] - DUE_SKEW_S for m, t in started)


async def quick(q: DurableQueue, n: int = 50) -> None:
    """Run ``n`` events one at a time, so that the function's duration is measured."""
    for i in range(n):
        await q.accept(FakeDelivery(f"warm {i}"), trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda i=i: q.stats["succeeded"] == i + 1)
    assert q.dispatcher.loop_batch_size("f") > 1  # measured quick: under LOOP_BATCH_EVENT_S


async def test_quick_invocations_on_the_loop_run_in_batches_not_a_task_each(
    tmp_path: Path,
) -> None:
    tasks: set[asyncio.Task[Any] | None] = set()
    target = RecordingTarget(behaviour=lambda event, inv: tasks.add(asyncio.current_task()))
    async with running(tmp_path, target, concurrency=1000) as (q, store):
        store.claim = _claim_nothing  # type: ignore[method-assign]
        # Given a function measured quick (a no-op: microseconds per invocation)
        await quick(q)
        for burst in range(2):  # and again: the measure stays quick
            tasks.clear()
            # When 600 events are ready at once, with room for 1,000 at a time
            ds = [FakeDelivery(str(i)) for i in range(600)]
            await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
            await until(lambda b=burst: q.stats["succeeded"] == 50 + 600 * (b + 1))
            # Then they ran one after another in a few tasks (MAX_BATCH each), not in 600
            assert len(tasks) <= 3
    ran = [e["Message"] for e in target.events[50:]]
    assert ran == [str(i) for i in range(600)] * 2  # each once, in order


async def test_failures_in_a_quick_batch_are_settled_each_as_one_alone(tmp_path: Path) -> None:
    tasks: set[asyncio.Task[Any] | None] = set()

    def every_tenth_fails(event: Mapping[str, Any], inv: Any) -> None:
        tasks.add(asyncio.current_task())
        if event["Message"].isdigit() and int(event["Message"]) % 10 == 7:
            raise errors.HandlerFailed("ValueError: on purpose")

    target = RecordingTarget(behaviour=every_tenth_fails)
    async with running(tmp_path, target, concurrency=1000, retry_attempts=0) as (q, store):
        store.claim = _claim_nothing  # type: ignore[method-assign]
        await quick(q)
        tasks.clear()
        # When 100 events are ready at once and every tenth fails
        ds = [FakeDelivery(str(i)) for i in range(100)]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: q.stats["succeeded"] + q.stats["dead_lettered"] == 150)
        # in batches: a failure's bookkeeping waits for the store, and its batch hands the
        # events not started on to one new task
        assert len(tasks) <= 11
        # Then the 90 are done, the 10 dead-lettered (no retries), each with its own id
        assert (q.stats["succeeded"], q.stats["dead_lettered"]) == (140, 10)
        dls = await store.list_dead_letters()
        failed = sorted(
            json.loads(json.loads(d.record)["Body"]["ClientContext"])["Message"] for d in dls
        )
        assert failed == sorted(str(i) for i in range(100) if i % 10 == 7)
        assert q.depth == 0
    assert q.dispatcher.in_flight("f") == 0


async def test_a_quick_function_whose_invocation_waits_holds_back_no_other(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()

    async def one_waits(event: Mapping[str, Any], inv: Any) -> None:
        if event["Message"] == "10":
            await release.wait()  # e.g. a lock or a token refresh, once

    target = RecordingTarget(behaviour=one_waits)
    async with running(tmp_path, target, concurrency=4) as (q, store):
        store.claim = _claim_nothing  # type: ignore[method-assign]
        await quick(q)
        # When 100 events are ready at once and the 11th waits
        ds = [FakeDelivery(str(i)) for i in range(100)]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        # Then the other 99 run meanwhile, in the function's other slots
        await until(lambda: q.stats["succeeded"] == 50 + 99, what="the 99 that do not wait")
        assert not release.is_set()
        release.set()
        await until(lambda: q.stats["succeeded"] == 50 + 100)
    assert sorted(int(e["Message"]) for e in target.events[50:]) == list(range(100))


async def test_a_stop_in_a_quick_batch_gives_back_what_did_not_run(tmp_path: Path) -> None:
    forever = asyncio.Event()

    async def waits_on_10(event: Mapping[str, Any], inv: Any) -> None:
        if event["Message"] == "10":
            await forever.wait()  # still running at the stop: cancelled after the grace

    first = RecordingTarget(behaviour=waits_on_10)
    async with running(tmp_path, first, concurrency=1, grace=0.2) as (q, _):
        await quick(q)
        ds = [FakeDelivery(str(i)) for i in range(30)]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: first.events[-1]["Message"] == "10", what="the 11th running")
    # The 10 before it ran once and are done; it and the 19 after it were given back
    assert [e["Message"] for e in first.events[50:]] == [str(i) for i in range(11)]
    second = RecordingTarget()
    async with running(tmp_path, second, concurrency=1) as (q, _):
        await until(lambda: q.stats["succeeded"] == 20, what="the 20 given back")
    assert sorted(int(e["Message"]) for e in second.events) == list(range(10, 30))


async def test_invocations_that_wait_keep_a_task_each(tmp_path: Path) -> None:
    running_now = peak = 0

    async def waits(event: Mapping[str, Any], inv: Any) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.005)  # I/O: longer than LOOP_BATCH_EVENT_S
        running_now -= 1

    target = RecordingTarget(behaviour=waits)
    async with running(tmp_path, target, concurrency=50) as (q, store):
        store.claim = _claim_nothing  # type: ignore[method-assign]
        await q.accept(FakeDelivery("first"), trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: q.stats["succeeded"] == 1)
        ds = [FakeDelivery(str(i)) for i in range(100)]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: q.stats["succeeded"] == 101, what="the 100 events")
    # Then they ran side by side, up to the function's concurrency
    assert peak == 50


async def test_a_stop_in_a_round_trip_gives_its_rows_back(tmp_path: Path) -> None:
    forever = asyncio.Event()

    class Batching(RecordingTarget):
        """Takes batches (as the python runtime does); this one never answers."""

        async def invoke_many(self, events: list[Any], invs: list[Any]) -> list[Any]:
            await forever.wait()
            return []

    first = Batching()
    async with running(tmp_path, first, concurrency=1, grace=0.2) as (q, _):
        await q.accept(FakeDelivery("first"), trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: q.stats["succeeded"] == 1)  # one at a time: measured
        assert q.dispatcher.batch_size("f") > 1
        ds = [FakeDelivery(str(i)) for i in range(30)]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: q._running["f"] == 1 and not q._ready["f"], what="the round trip")
    # Then the stop (after its grace) gave the 30 back, and the next runner runs them
    second = RecordingTarget()
    async with running(tmp_path, second, concurrency=1) as (q, _):
        await until(lambda: q.stats["succeeded"] == 30, what="the 30 given back")
    assert sorted(int(e["Message"]) for e in second.events) == list(range(30))


async def test_no_ack_before_the_commit(tmp_path: Path) -> None:
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        gate = asyncio.Event()
        real = store.enqueue_leased

        entered = asyncio.Event()

        async def slow_enqueue(*args: Any) -> Any:
            entered.set()
            await gate.wait()
            return await real(*args)

        store.enqueue_leased = slow_enqueue  # type: ignore[method-assign]
        d = FakeDelivery()
        accepting = asyncio.create_task(q.accept(d, trigger="tick", function="f", fmt=Format.SCF))
        await entered.wait()  # the commit has begun and cannot finish
        assert d.acked == 0  # not committed yet, so not acknowledged
        gate.set()
        await accepting
        assert d.acked == 1


async def test_a_failing_commit_is_not_acked(tmp_path: Path) -> None:
    async with running(tmp_path, RecordingTarget()) as (q, store):

        async def broken(*args: Any) -> Any:
            raise OSError("disk full")

        store.enqueue = store.enqueue_leased = broken  # type: ignore[method-assign]
        d = FakeDelivery()
        with pytest.raises(OSError):
            await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        assert d.acked == 0


async def test_function_error_retried_exactly_retry_attempts_then_dead_lettered(
    tmp_path: Path,
) -> None:
    def fail(event: Any, inv: Any) -> None:
        raise errors.HandlerFailed("ValueError: on purpose", detail="Traceback: on purpose")

    target = RecordingTarget(behaviour=fail)
    async with running(tmp_path, target, retry_attempts=2, retry_interval="300ms") as (q, store):
        rid = await q.submit("f", {"n": 1}, trigger="tick", request_source="TRIGGER_TIMER")
        await until(lambda: q.stats["dead_lettered"] == 1)
        starts = [inv.started for _, inv in target.calls]
        assert len(starts) == 3  # the first attempt and exactly 2 retries
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(g >= 0.3 for g in gaps), gaps  # never early (how late: not asserted)
        assert {inv.request_id for _, inv in target.calls} == {rid}
        dls = await store.list_dead_letters()
        assert len(dls) == 1
        rec = json.loads(dls[0].record)
        assert rec["RequestId"] == rid
        assert rec["ErrorClass"] == "function_error"
        assert rec["ErrorMessage"] == "ValueError: on purpose"
        assert rec["ErrorDetail"] == "Traceback: on purpose"
        assert rec["Attempts"] == 3
        body = rec["Body"]
        assert body["RetryNum"] == 2
        assert body["RequestSource"] == "TRIGGER_TIMER"
        assert body["FunctionName"] == "f" and body["TriggerName"] == "tick"
        assert body["InvocationType"] == "Event"
        assert json.loads(body["ClientContext"]) == {"n": 1}
        assert body["PushTime"].endswith("Z")
        assert (await store.queue_stats())["depth"] == {}


async def test_throttled_is_retried_until_it_has_room(tmp_path: Path) -> None:
    outcomes = [errors.Throttled(), errors.Throttled(), errors.Throttled(retry_after_s=0.05), "ok"]

    def behaviour(event: Any, inv: Any) -> Any:
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out

    target = RecordingTarget(behaviour=behaviour)
    async with running(tmp_path, target, throttle_interval="100ms", retry_attempts=0) as (
        q,
        _store,
    ):
        await q.submit("f", {})
        await until(lambda: q.stats["succeeded"] == 1)
        assert len(target.calls) == 4
        assert q.stats["dead_lettered"] == 0


async def test_invalid_request_is_dead_lettered_at_once(tmp_path: Path) -> None:
    def bad(event: Any, inv: Any) -> None:
        raise errors.InvalidRequest("HTTP 400 from the function")

    target = RecordingTarget(behaviour=bad)
    async with running(tmp_path, target) as (q, store):
        await q.submit("f", {})
        await until(lambda: q.stats["dead_lettered"] == 1)
        assert len(target.calls) == 1
        rec = json.loads((await store.list_dead_letters())[0].record)
        assert rec["ErrorClass"] == "invalid_request" and rec["Body"]["RetryNum"] == 0


async def test_oversized_trigger_event_is_dead_lettered_and_acked(tmp_path: Path) -> None:
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        d = FakeDelivery("x" * 200_000)
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        assert d.acked == 1
        rec = json.loads((await store.list_dead_letters())[0].record)
        assert rec["ErrorClass"] == "invalid_request" and "131072" in rec["ErrorMessage"]
        assert target.calls == []


async def test_submit_rejects_unknown_function(tmp_path: Path) -> None:
    async with running(tmp_path, RecordingTarget()) as (q, _):
        with pytest.raises(errors.FunctionNotFound):
            await q.submit("nope", {})


async def test_system_errors_back_off_until_success(tmp_path: Path) -> None:
    fails = [errors.WorkerCrashed(), errors.WorkerCrashed(), errors.WorkerCrashed()]

    def behaviour(event: Any, inv: Any) -> str:
        if fails:
            raise fails.pop(0)
        return "ok"

    target = RecordingTarget(behaviour=behaviour)
    async with running(tmp_path, target, backoff_initial="50ms", retry_attempts=0) as (q, _):
        await q.submit("f", {})
        await until(lambda: q.stats["succeeded"] == 1)
        starts = [inv.started for _, inv in target.calls]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # 50ms·2^(n-1) plus up to 50ms of jitter
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2, gaps


async def test_max_event_age_bounds_retries(tmp_path: Path) -> None:
    def fail(event: Any, inv: Any) -> None:
        raise errors.HandlerFailed("again")

    target = RecordingTarget(behaviour=fail)
    async with running(
        tmp_path, target, retry_attempts=100, retry_interval="100ms", max_event_age="1s"
    ) as (q, store):
        await q.submit("f", {})
        await until(lambda: q.stats["dead_lettered"] == 1)
        # retried (the first failure is far younger than 1 s), and never past the age: at
        # most one attempt per 100 ms within it, however slow the machine
        assert 2 <= len(target.calls) <= 10
        rec = json.loads((await store.list_dead_letters())[0].record)
        assert "max_event_age" in rec["Reason"]


async def test_handler_retry_and_drop_signals(tmp_path: Path) -> None:
    seen: list[str] = []

    def behaviour(event: Mapping[str, Any], inv: Any) -> str:
        seen.append(event["k"])
        if event["k"] == "drop":
            raise errors.Dropped("spam")
        if event["k"] == "later" and seen.count("later") == 1:
            raise errors.RetryRequested(retry_after_s=0.2)
        return "ok"

    target = RecordingTarget(behaviour=behaviour)
    async with running(tmp_path, target, retry_attempts=0) as (q, store):
        await q.submit("f", {"k": "drop"})
        t0 = time.monotonic()
        await q.submit("f", {"k": "later"})
        await until(lambda: q.stats["succeeded"] == 1 and q.stats["dropped"] == 1)
        assert time.monotonic() - t0 >= 0.2
        assert seen.count("later") == 2 and seen.count("drop") == 1
        assert await store.list_dead_letters() == []


class FlakySink(DeadLetterSink):
    def __init__(self) -> None:
        super().__init__("flaky://", None)  # type: ignore[arg-type]
        self.failing = True
        self.records: list[Mapping[str, Any]] = []
        self.calls = 0

    async def put(self, record: Mapping[str, Any]) -> None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("sink is down")
        self.records.append(record)


async def test_a_failing_dead_letter_sink_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.queue.SINK_RETRY_S", 0.1)

    def bad(event: Any, inv: Any) -> None:
        raise errors.InvalidRequest("never valid")

    sink = FlakySink()
    target = RecordingTarget(behaviour=bad)
    async with running(tmp_path, target, sink=sink) as (q, store):
        await q.submit("f", {"keep": "me"})
        await until(lambda: sink.calls >= 2)
        # Given the sink keeps failing, the event is still in the queue
        assert sum((await store.queue_stats())["depth"].values()) == 1
        assert len(target.calls) == 1  # dead-lettering is retried, not the invocation
        sink.failing = False
        await until(lambda: len(sink.records) == 1)
        assert json.loads(sink.records[0]["Body"]["ClientContext"]) == {"keep": "me"}
        assert sink.records[0]["ErrorClass"] == "invalid_request"
        await until(lambda: q.stats["dead_lettered"] == 1)
        assert (await store.queue_stats())["depth"] == {}


async def test_queue_runs_at_most_concurrency_at_once(tmp_path: Path) -> None:
    running_now = 0
    peak = 0

    async def slow(event: Any, inv: Any) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.02)
        running_now -= 1

    target = RecordingTarget(behaviour=slow)
    async with running(tmp_path, target, concurrency=3) as (q, _):
        for i in range(20):
            await q.submit("f", {"i": i})
        await until(lambda: q.stats["succeeded"] == 20)
    assert peak == 3
    assert q.stats["retried"] == 0  # waiting in the queue is not throttling


class BatchingTarget(RecordingTarget):
    """A target that takes several invocations in one call (as the python runtime does),
    each taking ``per_event_s``; records the size of every batch it was handed."""

    def __init__(self, per_event_s: float) -> None:
        super().__init__(behaviour=self._work)
        self.per_event_s = per_event_s
        self.sizes: list[int] = []

    async def _work(self, event: Any, inv: Any) -> None:
        await asyncio.sleep(self.per_event_s)

    async def invoke_many(self, events: list[Any], invocations: list[Any]) -> list[Any]:
        self.sizes.append(len(events))
        return [await self.invoke(e, i) for e, i in zip(events, invocations, strict=True)]


@pytest.mark.parametrize(
    ("per_event_s", "batched"),
    [(0.0005, True), (0.2, False)],
    ids=["quick events share a round trip", "slow events go one at a time"],
)
async def test_a_batch_holds_a_worker_for_a_bounded_time(
    tmp_path: Path, per_event_s: float, batched: bool
) -> None:
    # Given a function that batches, with 40 events ready at once
    target = BatchingTarget(per_event_s)
    async with running(tmp_path, target, concurrency=2) as (q, _):
        await q.submit("f", {"first": True})  # its duration is measured first
        await until(lambda: q.stats["succeeded"] == 1)
        n = 40 if batched else 6
        deliveries = [FakeDelivery(f"m{i}") for i in range(n)]  # one commit: all ready at once
        await q.accept_many(deliveries, trigger="tick", function="f", fmt=Format.SCF)
        await until(lambda: q.stats["succeeded"] == n + 1, timeout=30)
    # Then the first event went alone (no measure yet: it is not in a batch), quick ones
    # were handed over many at a time, and slow ones one at a time: a stop (SIGTERM)
    # waits for at most a batch of about BATCH_BUDGET_S
    assert len(target.calls) == n + 1 and sum(target.sizes) <= n
    if batched:
        assert max(target.sizes) > 1 and max(target.sizes) * per_event_s <= 0.05
    else:
        assert target.sizes == []


async def test_pending_events_survive_a_restart(tmp_path: Path) -> None:
    def fail(event: Any, inv: Any) -> None:
        raise errors.HandlerFailed("not yet")

    async with running(tmp_path, RecordingTarget(behaviour=fail), retry_interval="1h") as (q, _):
        await q.submit("f", {"x": 1})
        await until(lambda: q.stats["retried"] == 1)
    # a new queue over the same store sees the scheduled retry, with its history
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        stats = await store.queue_stats()
        assert stats["depth"] == {"f": 1}
        assert stats["next_due"] > time.time() + 3000
    finally:
        await store.close()


async def test_an_ack_that_fails_is_followed_by_a_nack(tmp_path: Path) -> None:
    # bridge/abc.py: "if ack() raises, the core logs it and calls nack()"
    class AckFails(FakeDelivery):
        async def ack(self) -> None:
            self.acked += 1
            raise RuntimeError("delete failed")

    async with running(tmp_path, RecordingTarget()) as (q, _):
        d = AckFails()
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        assert (d.acked, d.nacked) == (1, 1)


async def test_an_event_that_cannot_be_encoded_is_dead_lettered_not_nacked(
    tmp_path: Path,
) -> None:
    # Given an event that cannot be encoded (a lone surrogate): the same every time, so a
    # nack would only hand it back for a hot redelivery loop (SQS)
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        d = FakeDelivery("bad \ud800 text")
        await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        # Then it is dead-lettered as an invalid request, and acked
        assert (d.acked, d.nacked) == (1, 0)
        [dl] = await store.list_dead_letters()
        rec = json.loads(dl.record)
        assert rec["ErrorClass"] == "invalid_request" and "cannot be encoded" in rec["ErrorMessage"]
        assert "\\ud800" in rec["Body"]["ClientContext"]  # kept, escaped
        assert target.calls == []


async def test_a_batch_is_committed_in_one_transaction_then_each_delivery_acked(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        # Given a commit that cannot finish yet
        gate, entered = asyncio.Event(), asyncio.Event()
        real = store.enqueue_leased
        batches: list[int] = []

        async def slow_enqueue(items: Any, *args: Any) -> Any:
            batches.append(len(items))
            entered.set()
            await gate.wait()
            return await real(items, *args)

        store.enqueue_leased = slow_enqueue  # type: ignore[method-assign]
        ds = [FakeDelivery(f"m{i}") for i in range(5)]
        # When a batch of five is accepted
        accepting = asyncio.create_task(
            q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        )
        await entered.wait()
        # Then nothing is acked before the one commit of all five is done
        assert [d.acked for d in ds] == [0] * 5
        gate.set()
        await accepting
        assert batches == [5]
        assert [d.acked for d in ds] == [1] * 5
        await until(lambda: len(target.calls) == 5)
        assert sorted(e["Message"] for e in target.events) == [f"m{i}" for i in range(5)]


async def test_a_batch_whose_commit_fails_acks_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, RecordingTarget()) as (q, store):

        async def broken(*args: Any) -> Any:
            raise OSError("disk full")

        store.enqueue = store.enqueue_leased = broken  # type: ignore[method-assign]
        ds = [FakeDelivery(f"m{i}") for i in range(3)]
        with pytest.raises(OSError):
            await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        assert [d.acked for d in ds] == [0, 0, 0]
        assert q.depth == 0


async def test_an_oversized_event_in_a_batch_is_dead_lettered_the_rest_queued(
    tmp_path: Path,
) -> None:
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        ds = [FakeDelivery("small"), FakeDelivery("x" * 200_000), FakeDelivery("small2")]
        await q.accept_many(ds, trigger="tick", function="f", fmt=Format.SCF)
        assert [d.acked for d in ds] == [1, 1, 1]
        await until(lambda: len(target.calls) == 2)
        assert len(await store.list_dead_letters()) == 1


async def test_an_event_that_finishes_while_a_claim_takes_it_again_runs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # found by the chaos suite's wall-clock jump (tests/chaos/test_clock.py): with the clock
    # an hour on, every lease looks expired, so a claim may take back a row of this runner;
    # if its invocation ended during that claim, the row ran a second time
    release = asyncio.Event()

    async def slow(event: Mapping[str, Any], inv: Any) -> str:
        await release.wait()
        return "ok"

    target = RecordingTarget(behaviour=slow)
    async with running(tmp_path, target) as (q, store):
        real_claim = store.claim

        async def claim(owner: str, now: float, *args: Any, **kw: Any) -> Any:
            if not target.calls or release.is_set():
                return await real_claim(owner, now, *args, **kw)
            # Given the wall clock jumped an hour while the event runs
            items = await real_claim(owner, now + 3600, *args, **kw)
            # When its invocation ends while this claim (which took it again) is out
            release.set()
            await until(lambda: q._done, what="the invocation to end")
            return items

        monkeypatch.setattr(store, "claim", claim)
        await q.submit("f", {"n": 1})
        await until(lambda: release.is_set(), what="the claim during the invocation")
        # nothing running and every completion written (the next claim removes the rows)
        await until(lambda: q._total == 0 and not q._done, what="the queue to settle")
        # Then it ran once, and its row is gone
        assert sum((await store.queue_stats())["depth"].values()) == 0
        assert len(target.calls) == 1


async def test_depth_counts_what_waits_and_drops_when_it_ran(tmp_path: Path) -> None:
    # found by the mutation run (scripts/mutation.py): never decrementing the depth (what
    # max_queued bounds) passed every queue test
    release = asyncio.Event()

    async def held(event: Mapping[str, Any], inv: Any) -> str:
        await release.wait()
        return "ok"

    target = RecordingTarget(behaviour=held)
    async with running(tmp_path, target) as (q, _):
        await q.submit("f", {"n": 1})
        await q.submit("f", {"n": 2})
        assert q.depth == 2
        release.set()
        await until(lambda: len(target.calls) == 2 and q.depth == 0, what="the depth back to 0")


async def test_an_undeliverable_delivery_is_dead_lettered_to_the_functions_sink_then_acked(
    tmp_path: Path,
) -> None:
    # Given a source that hands the core a message it can never turn into an event
    settled: list[str] = []

    async def ack() -> None:
        settled.append("ack")

    async def nack(error: BaseException | None) -> None:
        settled.append("nack")

    sink = FlakySink()
    target = RecordingTarget()
    async with running(tmp_path, target, sink=sink) as (q, _store):
        d = Undeliverable(
            {"body": "not json \ud800"},
            "not a notification",
            ack,
            nack,
            kind=Kind.COS,
            trigger="s3",
            detail="queue q",
        )
        # When the sink fails, the delivery is not acked (the pump nacks it: nothing lost)
        with pytest.raises(OSError):
            await q.accept(d, trigger="s3", function="f", fmt=Format.SCF)
        assert settled == [] and sink.records == []
        # When it works, the dead letter is written first, then the delivery acked
        sink.failing = False
        await q.accept(d, trigger="s3", function="f", fmt=Format.SCF)
        assert settled == ["ack"]
        [rec] = sink.records
        assert rec["ErrorClass"] == "invalid_request"
        assert rec["ErrorMessage"] == "trigger s3: not a notification"
        assert rec["ErrorDetail"] == "queue q" and rec["Body"]["RequestSource"] == "TRIGGER_COS"
        assert json.loads(rec["Body"]["ClientContext"]) == {"body": "not json \ud800"}
        assert target.calls == []
