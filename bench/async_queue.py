"""Durable async queue benchmark.

1. Accepted events/s: concurrent producers accept timer deliveries into the
   queue (SQLite, WAL, synchronous=FULL: each accept returns only once its
   group commit is on disk, and only then is the delivery acked). The runner is
   not started, so this measures acceptance alone.
2. Drain events/s: the events accepted in 1, already queued, through queue →
   dispatcher → a no-op SCF-style ``python`` function with concurrency 4 (warm
   workers), each row removed after success. Only the runner works here.
3. End to end, concurrently: the runner is started first and the producers
   accept the same number of fresh events while it runs, so accepting and
   invoking compete for the loop, the store and the CPU as in the daemon. Reports
   events/s from the first accept to the last completion, and each event's
   accept → completion latency (p50, p99, max).

    .venv/bin/python bench/async_queue.py [--events 20000] [--producers 200]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge import config as cfg
from bridge.abc import DeadLetterContext, Delivery
from bridge.deadletter import LocalSink
from bridge.dispatcher import Dispatcher
from bridge.events import Format, render, timer_event
from bridge.queue import DurableQueue
from bridge.store import SqliteStore
from bridge.testing import until
from bridge.wiring import build_targets

NOOP = "def main_handler(event, context):\n    return None\n"


class BenchDelivery(Delivery):
    acked = 0

    async def ack(self) -> None:
        BenchDelivery.acked += 1


async def main(events: int, producers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "noop"
        code.mkdir()
        (code / "index.py").write_text(NOOP)
        config = cfg.parse(
            {
                "daemon": {"state_dir": "state", "queue_poll": "50ms"},
                "functions": {"noop": {"code": "noop", "concurrency": 4}},
            },
            base_dir=Path(tmp),
            env={},
        )
        store = SqliteStore(config.state_dir)
        await store.open()
        dispatcher = Dispatcher(build_targets(config))
        await dispatcher.start()
        sink = LocalSink("local", DeadLetterContext(store=store, logger=logging.getLogger("dl")))
        q = DurableQueue(config, store, dispatcher, {"noop": sink})
        await q.start()
        t = datetime.now(UTC)

        # 0. the runtime alone: 4 callers invoking the dispatcher back to back (what the
        # queue path is compared with)
        ev = render(timer_event("tick", t, "bench"), Format.SCF)
        left = events

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await dispatcher.invoke("noop", ev, invocation_type="Event")

        await asyncio.gather(*(caller() for _ in range(4)))  # warm up
        left = events
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(4)))
        runtime = events / (time.perf_counter() - t0)
        runtime_cpu = (time.process_time() - cpu0) / events * 1e6

        # 1. acceptance
        remaining = events

        async def producer() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                d = BenchDelivery(timer_event("tick", t, "bench"))
                await q.accept(d, trigger="tick", function="noop", fmt=Format.SCF)

        c0 = store.commits
        t0 = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(producers)))
        accept_s = time.perf_counter() - t0
        commits = store.commits - c0
        assert BenchDelivery.acked == events
        print(
            f"durable queue: {events} events, {producers} concurrent producers, SQLite WAL synchronous=FULL"
        )
        print(f"  accepted (committed before ack): {events / accept_s:,.0f} events/s")
        print(f"  group commits: {commits} (avg {events / max(commits, 1):.0f} events per fsync)")

        # 2. end to end through the runner to a python no-op function (concurrency 4)
        stop = asyncio.Event()
        t1, cpu1 = time.perf_counter(), time.process_time()
        runner = asyncio.create_task(q.run(stop))
        await until(lambda: q.stats["succeeded"] >= events, timeout=600, interval=0.05)
        e2e_s = time.perf_counter() - t1
        drain_cpu = (time.process_time() - cpu1) / events * 1e6
        stop.set()
        await runner
        print(
            f"  the runtime alone (dispatcher -> python no-op, 4 callers): {runtime:,.0f} invocations/s"
            f" ({runtime_cpu:.0f} us CPU per call in this process)"
        )
        print(
            f"  drain of the pre-filled queue -> python no-op (concurrency 4): {events / e2e_s:,.0f} events/s"
            f" ({events / e2e_s / runtime:.2f} of the runtime; {drain_cpu:.0f} us CPU per event"
            " in this process: loop and store thread)"
        )

        # 3. accept -> complete, concurrently (a fresh queue object on the same store)
        q3 = DurableQueue(config, store, dispatcher, {"noop": sink})
        await q3.start()
        accepted_at: dict[str, float] = {}
        done_at: dict[str, float] = {}
        invoke = dispatcher.invoke

        async def timed_invoke(function: str, event: Any, **kw: Any) -> Any:
            result = await invoke(function, event, **kw)
            done_at[event["Message"]] = time.perf_counter()
            return result

        invoke_many = dispatcher.invoke_many

        async def timed_invoke_many(function: str, calls: Any, **kw: Any) -> Any:
            results = await invoke_many(function, calls, **kw)  # a batch: done at its end
            now = time.perf_counter()
            for call in calls:
                done_at[call.event["Message"]] = now
            return results

        dispatcher.invoke = timed_invoke  # type: ignore[method-assign]
        dispatcher.invoke_many = timed_invoke_many  # type: ignore[method-assign]
        stop3 = asyncio.Event()
        runner3 = asyncio.create_task(q3.run(stop3))
        seq = iter(range(events))

        async def live_producer() -> None:
            for i in seq:
                key = f"e2e-{i}"
                accepted_at[key] = time.perf_counter()
                d = BenchDelivery(timer_event("tick", t, key))
                await q3.accept(d, trigger="tick", function="noop", fmt=Format.SCF)

        t3 = time.perf_counter()
        await asyncio.gather(*(live_producer() for _ in range(producers)))
        await until(lambda: len(done_at) >= events, timeout=600, interval=0.05)
        live_s = time.perf_counter() - t3
        stop3.set()
        await runner3
        lat = sorted((done_at[k] - accepted_at[k]) * 1000 for k in done_at)
        print(
            f"  end to end, accepting while running: {events / live_s:,.0f} events/s; "
            f"accept -> complete p50 {lat[len(lat) // 2]:,.0f} ms, "
            f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:,.0f} ms, max {lat[-1]:,.0f} ms"
            f" ({events / live_s / runtime:.2f} of the runtime)"
        )
        await dispatcher.close()
        await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--producers", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args.events, args.producers))
