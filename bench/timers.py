"""Timer firing benchmark: N timer triggers firing every second for S seconds.

Runs the real daemon core in-process (Daemon, TimerSource, the durable queue
on SQLite, dispatcher) with an in-process no-op function. For every tick it
records, relative to the tick's scheduled time (the event's ``Time``):

- fired: the timer source's read() returned the tick's delivery to the core;
- accepted: the event was committed to the durable queue (and the source acked);
- invoked: the function was called (after the queue's runner claimed it).

Missed fires are ticks scheduled in the window that never reached the function.

    .venv/bin/python bench/timers.py [--triggers 1000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.config import Config, DaemonConfig, FunctionConfig
from bridge.daemon import Daemon
from bridge.testing import RecordingTarget
from sources.timer import TimerConfig


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def main(n: int, seconds: int) -> None:
    invoked_ms: list[float] = []
    fired_ms: list[float] = []
    accepted_ms: list[float] = []
    seen: dict[str, set[int]] = defaultdict(set)

    def record(event: Any, inv: Any) -> None:
        now = time.time()
        tick = (
            datetime.strptime(event["Time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        )
        invoked_ms.append((now - tick) * 1000)
        seen[event["TriggerName"]].add(int(tick))

    with tempfile.TemporaryDirectory() as tmp:
        triggers = {
            f"t{i}": TimerConfig.model_validate(
                {"type": "timer", "function": "f", "cron": "* * * * * * *"},
                context={"timezone": "UTC"},
            )
            for i in range(n)
        }
        config = Config(
            daemon=DaemonConfig(state_dir=Path(tmp), max_in_flight=10 * n),
            functions={"f": FunctionConfig(concurrency=1000)},
            triggers=triggers,
        )
        target = RecordingTarget(config.functions["f"], behaviour=record)
        async with Daemon(config, targets={"f": target}) as d:
            queue = d.queue
            assert queue is not None
            accept = queue.accept

            for src in d.sources.values():

                async def timed_read(read: Any = src.read) -> Any:
                    delivery = await read()
                    fired_ms.append((time.time() - delivery.event.time.timestamp()) * 1000)
                    return delivery

                src.read = timed_read  # type: ignore[method-assign]

            async def timed_accept(delivery: Any, **kw: Any) -> None:
                await accept(delivery, **kw)
                accepted_ms.append((time.time() - delivery.event.time.timestamp()) * 1000)

            queue.accept = timed_accept  # type: ignore[method-assign]
            run = asyncio.create_task(d.run_until_stopped())
            await d.ready.wait()
            # measure whole seconds only: from the next full second + 1, for `seconds` seconds
            start = int(time.time()) + 2
            await asyncio.sleep(start - time.time())
            for xs in (invoked_ms, fired_ms, accepted_ms):
                xs.clear()
            await asyncio.sleep(seconds + 0.5)
            d.request_stop()
            await run
    window = range(start, start + seconds)
    expected = n * seconds
    got = sum(len([t for t in s if t in window]) for s in seen.values())
    print(
        f"timers: {n} triggers x every 1 s for {seconds} s (durable queue on SQLite, in-process no-op function)"
    )
    print(f"  fires expected {expected}, delivered {got}, missed {expected - got}")
    for name, xs in (("fired", fired_ms), ("accepted", accepted_ms), ("invoked", invoked_ms)):
        print(
            f"  {name:<9} lateness p50 {statistics.median(xs):7.2f} ms  p99 {pct(xs, 0.99):7.2f} ms"
            f"  max {max(xs):7.2f} ms  (n={len(xs)})"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triggers", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args.triggers, args.seconds))
