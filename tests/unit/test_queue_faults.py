"""The durable queue under faults (issue 15): store errors in the runner, leases that must be
renewed, reloads that change sinks or remove functions, handler signals and the retry budget,
dead letters whose sink or bookkeeping fails, and oversized error messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bridge import deadletter, errors
from bridge.abc import DeadLetterContext
from bridge.config import AsyncConfig, Config, DaemonConfig, FunctionConfig
from bridge.deadletter import LocalSink
from bridge.dispatcher import Dispatcher
from bridge.events import Format
from bridge.queue import DurableQueue, new_item
from bridge.store import SqliteStore
from bridge.testing import MemoryDeadLetterSink, RecordingTarget, until
from tests.unit.test_queue import FakeDelivery, FlakySink, running


async def test_store_errors_in_the_runner_are_retried_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("bridge.queue.STORE_RETRY_S", 0.01)
    target = RecordingTarget()
    async with running(tmp_path, target) as (q, store):
        real_claim, real_next_due = store.claim, store.next_due
        faults = Counter[str]()

        async def locked_claim(*a: Any, **kw: Any) -> Any:
            if faults["claim"] < 3:
                faults["claim"] += 1
                raise sqlite3.OperationalError("database is locked")
            return await real_claim(*a, **kw)

        async def full_next_due(now: float) -> Any:
            if faults["next_due"] < 2:
                faults["next_due"] += 1
                raise sqlite3.OperationalError("database or disk is full")
            return await real_next_due(now)

        store.claim = locked_claim  # type: ignore[method-assign]
        store.next_due = full_next_due  # type: ignore[method-assign]
        # Given the store fails for a while, when another process (the CLI) queues an event
        # (one accepted here would start without a claim),
        await store.enqueue([new_item("f", {"n": 1})])
        # then the runner logs, backs off and runs it once the store works again
        await until(lambda: q.stats["succeeded"] == 1)
        assert faults["claim"] == 3
        assert "the state store failed in the queue runner" in caplog.text


async def test_leases_are_renewed_while_events_wait_or_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a lease of 2 x 0.1 s + 0.3 s, renewed every 0.1 s
    monkeypatch.setattr("bridge.queue.LEASE_MARGIN_S", 0.3)
    monkeypatch.setattr("bridge.queue.RENEW_EVERY_S", 0.1)
    gate = asyncio.Event()

    async def hold(event: Any, inv: Any) -> str:
        await gate.wait()
        return "ok"

    target = RecordingTarget(behaviour=hold)
    fc = FunctionConfig(timeout=0.1, concurrency=2)
    target.config = fc
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05, max_in_flight=1),
        functions={"f": fc},
    )
    store = SqliteStore(tmp_path)
    await store.open()
    ctx = DeadLetterContext(store=store, logger=logging.getLogger("dl"))
    q = DurableQueue(config, store, Dispatcher({"f": target}), {"f": LocalSink("local", ctx)})
    await q.start()
    stop = asyncio.Event()
    task = asyncio.create_task(q.run(stop))
    try:
        # Given one event runs and one waits behind max_in_flight = 1,
        await q.submit("f", {"n": 1})
        await q.submit("f", {"n": 2})
        await until(lambda: len(target.calls) == 1)
        # when both wait longer than their first lease,
        first = max(_leases(store))
        await until(lambda: time.time() > first + 0.5)  # the runner polls every 50 ms
        # then their leases were extended, and neither was claimed again: each runs once
        assert min(_leases(store)) > first
        gate.set()
        await until(lambda: _depth(store) == 0 and q._total == 0 and not any(q._ready.values()))
        assert sorted(e["n"] for e in target.events) == [1, 2]
        assert q.stats["succeeded"] == 2
    finally:
        gate.set()
        stop.set()
        await task
        await store.close()


async def test_rows_of_a_removed_function_do_not_hold_back_accepts(tmp_path: Path) -> None:
    def fail(event: Any, inv: Any) -> None:
        raise errors.HandlerFailed("not now")

    target, g_target = RecordingTarget(), RecordingTarget(behaviour=fail)
    fc, g_fc = FunctionConfig(), FunctionConfig(async_=AsyncConfig(retry_interval="1h"))
    target.config, g_target.config = fc, g_fc
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05, max_queued=2),
        functions={"f": fc, "g": g_fc},
    )
    store = SqliteStore(tmp_path)
    await store.open()
    ctx = DeadLetterContext(store=store, logger=logging.getLogger("dl"))
    local = LocalSink("local", ctx)
    dispatcher = Dispatcher({"f": target, "g": g_target})
    q = DurableQueue(config, store, dispatcher, {"f": local, "g": local})
    await q.start()
    stop = asyncio.Event()
    task = asyncio.create_task(q.run(stop))
    try:
        # Given g's two events wait an hour for their retry and fill max_queued,
        await q.submit("g", {})
        await q.submit("g", {})
        await until(lambda: q.stats["retried"] == 2)
        # when a reload removes g,
        await dispatcher.replace("g", None, 0)
        await q.reconfigure(Config(daemon=config.daemon, functions={"f": fc}), {"f": local})
        # then its rows (kept for when it comes back) do not block f's accepts
        await asyncio.wait_for(q.submit("f", {}), 10)
        await until(lambda: q.stats["succeeded"] == 1 and _depth(store) == 2)
        assert (await store.queue_stats())["depth"] == {"g": 2}
    finally:
        stop.set()
        await task
        await store.close()


async def test_reconfigure_sends_dead_letters_to_the_new_sink(tmp_path: Path) -> None:
    def bad(event: Any, inv: Any) -> None:
        raise errors.InvalidRequest("never valid")

    async with running(tmp_path, RecordingTarget(behaviour=bad)) as (q, store):
        sink = MemoryDeadLetterSink("memory")
        # Given a reload moved f's dead letters to another sink,
        await q.reconfigure(q.config, {"f": sink})
        await q.submit("f", {"x": 1})
        # then the next dead letter goes there, not to the start-up sink
        await until(lambda: len(sink.records) == 1)
        assert await store.list_dead_letters() == []


async def test_a_handler_retry_does_not_use_the_function_error_budget(tmp_path: Path) -> None:
    seen: list[int] = []

    def behaviour(event: Mapping[str, Any], inv: Any) -> str:
        seen.append(1)
        n = len(seen)
        if n <= 3:  # the handler asks three times to be retried later
            raise errors.RetryRequested(retry_after_s=0.01)
        if n == 4:  # then fails once: one function error of the two allowed
            raise errors.HandlerFailed("ValueError: once")
        return "ok"

    target = RecordingTarget(behaviour=behaviour)
    async with running(tmp_path, target, retry_attempts=2, retry_interval="10ms") as (q, _):
        await q.submit("f", {})
        await until(lambda: q.stats["succeeded"] + q.stats["dead_lettered"] == 1)
        assert q.stats["succeeded"] == 1 and len(seen) == 5


async def test_acceptance_time_dead_letter_with_a_failing_sink_keeps_the_event_unacked(
    tmp_path: Path,
) -> None:
    sink = FlakySink()
    async with running(tmp_path, RecordingTarget(), sink=sink) as (q, store):
        # Given an event too large to ever run, and a dead-letter sink that is down,
        d = FakeDelivery("x" * 200_000)
        # when it is accepted, the dead letter fails and so does the accept:
        with pytest.raises(ConnectionError):
            await q.accept(d, trigger="tick", function="f", fmt=Format.SCF)
        # then the source is not acknowledged (it redelivers: nothing is lost)
        assert d.acked == 0 and sink.calls == 1
        assert (await store.queue_stats())["depth"] == {}


async def test_a_dead_letter_is_put_once_when_removing_its_row_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("bridge.queue.SINK_RETRY_S", 0.05)

    def bad(event: Any, inv: Any) -> None:
        raise errors.InvalidRequest("never valid")

    sink = FlakySink()
    sink.failing = False
    async with running(tmp_path, RecordingTarget(behaviour=bad), sink=sink) as (q, store):
        real = store.complete
        failed = []

        async def complete_fails_once(ids: Any) -> None:
            if not failed:
                failed.append(ids)
                raise sqlite3.OperationalError("disk I/O error")
            await real(ids)

        store.complete = complete_fails_once  # type: ignore[method-assign]
        # Given the record is in the sink but removing the queue row fails once,
        await q.submit("f", {"keep": "me"})
        await until(lambda: q.stats["dead_lettered"] == 1 and failed != [])
        await until(lambda: _depth(store) == 0)
        # then the record was put once and nothing calls the sink a failure
        assert sink.calls == 1
        assert "dead-letter sink" not in caplog.text


def _depth(store: SqliteStore) -> int:
    """Rows in the queue table, read on a connection of its own (a sync check for until)."""
    with contextlib.closing(sqlite3.connect(store.path)) as c:
        return int(c.execute("SELECT COUNT(*) FROM async_queue").fetchone()[0])


def _leases(store: SqliteStore) -> list[float]:
    with contextlib.closing(sqlite3.connect(store.path)) as c:
        return [float(u) for (u,) in c.execute("SELECT lease_until FROM async_queue")]


async def test_a_huge_error_message_is_bounded_in_the_dead_letter(tmp_path: Path) -> None:
    def huge(event: Any, inv: Any) -> None:
        raise errors.InvalidRequest("x" * 400_000, detail="Traceback: short")

    sink = MemoryDeadLetterSink("memory")
    async with running(tmp_path, RecordingTarget(behaviour=huge), sink=sink) as (q, _):
        await q.submit("f", {})
        await until(lambda: len(sink.records) == 1)
    rec = sink.records[0]
    assert len(rec["ErrorMessage"].encode()) <= deadletter.MAX_MESSAGE
    assert "truncated: 400000 bytes" in rec["ErrorMessage"]
    assert rec["ErrorDetail"].endswith("Traceback: short")
    assert len(json.dumps(rec)) < 100_000  # fits an SQS message (256 KB)
