"""Timer firing benchmark: N timer triggers firing every second for S seconds.

Runs the real daemon core in-process (Daemon, TimerSource, SQLite state store,
dispatcher, acceptor) with an in-process no-op function, so the figures are
the timer path's own: firing lateness = when the function is invoked minus
the tick's scheduled time (the event's ``Time``), and missed fires = ticks
scheduled in the window that never reached the function.

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
    lateness_ms: list[float] = []
    seen: dict[str, set[int]] = defaultdict(set)

    def record(event: Any, inv: Any) -> None:
        now = time.time()
        tick = (
            datetime.strptime(event["Time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        )
        lateness_ms.append((now - tick) * 1000)
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
            run = asyncio.create_task(d.run_until_stopped())
            await d.ready.wait()
            # measure whole seconds only: from the next full second + 1, for `seconds` seconds
            start = int(time.time()) + 2
            await asyncio.sleep(start - time.time())
            lateness_ms.clear()
            await asyncio.sleep(seconds + 0.5)
            d.request_stop()
            await run
    window = range(start, start + seconds)
    expected = n * seconds
    got = sum(len([t for t in s if t in window]) for s in seen.values())
    print(
        f"timers: {n} triggers x every 1 s for {seconds} s (in-process no-op function, SQLite state)"
    )
    print(f"  fires expected {expected}, delivered {got}, missed {expected - got}")
    print(
        f"  lateness p50 {statistics.median(lateness_ms):.2f} ms  p99 {pct(lateness_ms, 0.99):.2f} ms"
        f"  max {max(lateness_ms):.2f} ms  (n={len(lateness_ms)})"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triggers", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=30)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args.triggers, args.seconds))
