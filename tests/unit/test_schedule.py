"""bridge.schedule: one pump serving every timer, ticks due at one instant in one batch; and
the daemon accepting such a batch in one store transaction, across a reload."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bridge.abc import SourceContext
from bridge.config import Config, DaemonConfig, FunctionConfig
from bridge.daemon import Daemon
from bridge.schedule import LEAD_S, Batch, Scheduled, SchedulePump
from bridge.store import SqliteStore
from bridge.testing import MemoryStore, RecordingTarget, until
from sources.timer import TimerConfig, TimerSource


def timer_config(cron: str = "* * * * * * *", **fields: Any) -> TimerConfig:
    return TimerConfig.model_validate(
        {"type": "timer", "function": "f", "cron": cron, **fields}, context={"timezone": "UTC"}
    )


def timer(name: str, store: Any, cron: str = "* * * * * * *", **fields: Any) -> TimerSource:
    ctx = SourceContext(
        name=name,
        function="f",
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger(f"test.{name}"),
    )
    return TimerSource(timer_config(cron, **fields), ctx)


@contextlib.asynccontextmanager
async def pump(
    slots: int, sources: dict[str, TimerSource]
) -> AsyncIterator[tuple[SchedulePump, list[Batch], list[str], asyncio.Semaphore]]:
    batches: list[Batch] = []
    ended: list[str] = []
    sem = asyncio.Semaphore(slots)
    p = SchedulePump(sem, batches.append, ended.append)
    for name, src in sources.items():
        await src.connect()
        p.add(name, src)
    task = asyncio.create_task(p.run())
    try:
        yield p, batches, ended, sem
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_timer_source_is_scheduled() -> None:
    assert isinstance(timer("t", MemoryStore()), Scheduled)


async def test_ticks_due_at_one_instant_come_as_one_batch() -> None:
    store = MemoryStore()
    sources = {f"t{i}": timer(f"t{i}", store) for i in range(20)}
    async with pump(100, sources) as (_, batches, _, _):
        await until(lambda: batches, timeout=3, what="a batch")
        first = batches[0]
        assert sorted(name for name, _ in first) == sorted(sources)
        assert len({d.event.time for _, d in first}) == 1  # one instant
        await until(lambda: len(batches) >= 2, timeout=3, what="the next second's batch")
        assert len(batches[1]) == 20
        assert batches[1][0][1].event.time > first[0][1].event.time


async def test_without_room_the_rest_stay_due_for_the_next_round() -> None:
    store = MemoryStore()
    sources = {f"t{i}": timer(f"t{i}", store) for i in range(12)}
    async with pump(5, sources) as (_, batches, _, sem):
        await until(lambda: batches, timeout=3, what="a batch")
        assert len(batches[0]) == 5  # the slots bound what is taken
        await asyncio.sleep(0)
        assert len(batches) == 1  # no room: the pump waits for it
        for _ in range(5):
            sem.release()  # the batch settled
        await until(lambda: len(batches) >= 2, timeout=3, what="the next round")
        assert len(batches[1]) == 5
        for _ in range(5):
            sem.release()
        await until(lambda: len(batches) >= 3, timeout=3, what="the last round")
        names = [name for batch in batches[:3] for name, _ in batch]
        assert sorted(names) == sorted(sources)  # every timer once, none twice
        assert len({d.event.time for batch in batches[:3] for _, d in batch}) == 1


async def test_a_removed_timer_is_not_served_and_an_exhausted_one_ends() -> None:
    store = MemoryStore()
    sources = {"keep": timer("keep", store), "gone": timer("gone", store)}
    sources["old"] = timer("old", store, cron="0 0 0 1 1 * 2020")
    async with pump(100, sources) as (p, batches, ended, _):
        assert ended == ["old"]
        p.remove("gone")
        await until(lambda: len(batches) >= 2, timeout=4, what="two batches")
        assert {name for batch in batches for name, _ in batch} == {"keep"}


async def test_a_nacked_tick_wakes_the_pump() -> None:
    store = MemoryStore()
    await store.set_last_fire("hourly", datetime.now(UTC) - timedelta(hours=2))
    # catch-up: the tick missed an hour ago is due now, the next one in up to an hour
    sources = {"hourly": timer("hourly", store, cron="@hourly", catchup="once")}
    async with pump(100, sources) as (_, batches, _, sem):
        await until(lambda: batches, timeout=3, what="the missed tick")
        (_, tick), *_ = batches[0]
        sem.release()
        await tick.nack(RuntimeError("store down"))
        # handed out again after the backoff, not at the next hourly tick
        await until(lambda: len(batches) >= 2, timeout=3, what="the nacked tick again")
        assert batches[1][0][1] is tick


# --- in the daemon -------------------------------------------------------------------------


class CountingStore(SqliteStore):
    """Records the size of each enqueue (one transaction each)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.enqueued: list[int] = []

    async def enqueue(self, items: Any) -> None:
        self.enqueued.append(len(items))
        await super().enqueue(items)

    async def enqueue_leased(self, items: Any, *args: Any) -> Any:
        self.enqueued.append(len(items))
        return await super().enqueue_leased(items, *args)


def daemon_config(tmp_path: Path, names: list[str]) -> Config:
    return Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05),
        functions={"f": FunctionConfig(concurrency=100)},
        triggers={n: timer_config() for n in names},
    )


async def test_the_daemon_accepts_an_instant_in_one_transaction_across_a_reload(
    tmp_path: Path,
) -> None:
    store = CountingStore(tmp_path / "state.db")
    target = RecordingTarget(FunctionConfig(concurrency=100))
    names = [f"t{i}" for i in range(30)]
    seen: collections.Counter[tuple[str, str]] = collections.Counter()

    def ticks() -> collections.Counter[tuple[str, str]]:
        seen.clear()
        seen.update((e["TriggerName"], e["Time"]) for e in target.events)
        return seen

    async with Daemon(daemon_config(tmp_path, names), store=store, targets={"f": target}) as d:
        run = asyncio.create_task(d.run_until_stopped())
        await until(lambda: len(target.events) >= 60, timeout=10, what="two seconds of ticks")
        assert 30 in store.enqueued  # 30 timers' ticks of one instant: one transaction
        # SIGHUP's path: 10 timers go, 10 come, 20 stay
        new = names[10:] + [f"n{i}" for i in range(10)]
        assert await d.reload(daemon_config(tmp_path, new))
        reloaded_at = time.time()
        mark = len(target.events)
        await until(
            lambda: {e["TriggerName"] for e in target.events[mark:]} >= set(new),
            timeout=10,
            what="every timer of the new config firing",
        )
        last = max(e["Time"] for e in target.events)
        await until(
            lambda: {e["TriggerName"] for e in target.events if e["Time"] > last} >= set(new),
            timeout=5,
            what="one more second of ticks",
        )
        d.request_stop()
        await run
    counts = ticks()
    assert max(counts.values()) == 1  # no tick twice
    # the timers that stayed missed no second between their first and last tick
    for name in names[10:]:
        times = sorted(t for n, t in counts if n == name)
        assert len(times) == len(set(times))
        first, end = times[0], times[-1]
        span = int(_ts(end) - _ts(first)) + 1
        assert len(times) == span, (name, times)
    # the removed ones fired nothing after the reload (a tick in flight then, at most: one
    # taken ahead of its time, up to LEAD_S, was accepted before the reload)
    assert all(_ts(t) <= reloaded_at + LEAD_S for n, t in counts if n in names[:10])


async def test_ticks_are_taken_ahead_of_their_time_and_carry_it() -> None:
    store = MemoryStore()
    sources = {f"t{i}": timer(f"t{i}", store) for i in range(5)}
    taken: list[tuple[float, Batch]] = []
    p = SchedulePump(asyncio.Semaphore(100), lambda b: taken.append((time.time(), b)), print)
    for name, src in sources.items():
        await src.connect()
        p.add(name, src)
    task = asyncio.create_task(p.run())
    try:
        await until(lambda: len(taken) >= 3, timeout=5, what="three instants")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for _, batch in taken:
        # each tick carries its own time (the queue holds it until then)
        assert {d.not_before for _, d in batch} == {d.event.time.timestamp() for _, d in batch}
    # taken ahead of it, by up to LEAD_S (one instant late on a loaded machine, at most)
    ahead = [min(d.not_before or 0 for _, d in batch) - at for at, batch in taken]
    assert any(0.05 < a <= LEAD_S for a in ahead), ahead


async def test_ticks_taken_ahead_start_at_their_time_never_before(tmp_path: Path) -> None:
    started: list[tuple[str, float]] = []
    target = RecordingTarget(
        FunctionConfig(concurrency=100),
        behaviour=lambda event, inv: started.append((event["Time"], time.time())),
    )
    names = [f"t{i}" for i in range(20)]
    async with Daemon(daemon_config(tmp_path, names), targets={"f": target}) as d:
        run = asyncio.create_task(d.run_until_stopped())
        await until(lambda: len(started) >= 60, timeout=10, what="three seconds of ticks")
        d.request_stop()
        await run
    early = [(t, at - _ts(t)) for t, at in started if at < _ts(t)]
    assert not early, early[:5]


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
