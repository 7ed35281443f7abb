"""Timer firing benchmark: N timer triggers firing every second for S seconds.

Runs the real daemon core in-process (Daemon, TimerSource, the durable queue on
SQLite, dispatcher) and, side by side in the same run, APScheduler 3 with the same
N jobs (one ``BackgroundScheduler``, a cron trigger every second, a plain Python
function): what a Python user would otherwise pick for cron.

Two event-bridge runs:

- ``inprocess``: an in-process no-op function (the core's own cost). For every
  tick it records when the function was called (after the tick was committed to the
  queue and the runner took it), relative to the tick's scheduled time (the event's
  ``Time``).
- ``python``: a real ``python`` function (warm workers, ``--concurrency``); the
  handler itself writes the time it started, so lateness is the handler's start.

Missed fires are ticks scheduled in the window that never reached the function.
APScheduler's lateness is the job function's start minus the whole second it was
due (its ticks are whole seconds and it is never a second late here).

    .venv/bin/python bench/timers.py [--triggers 1000] [--seconds 10] [--concurrency 4]
        [--only inprocess,python,apscheduler]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge import config as cfg
from bridge.config import Config, DaemonConfig, FunctionConfig
from bridge.daemon import Daemon
from bridge.plugin import Invocation, Target, TargetContext
from sources.timer import TimerConfig

# The handler writes "<Time> <unix time at its start>" to a file named by the bench.
HANDLER = """import os, time
_fd = os.open(os.environ["BENCH_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def main_handler(event, context):
    os.write(_fd, ("%s %.6f\\n" % (event["Time"], time.time())).encode())
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def tick_of(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def line(name: str, xs: list[float]) -> str:
    if not xs:
        return f"  {name:<22} no samples"
    return (
        f"  {name:<22} lateness p50 {statistics.median(xs):8.2f} ms  p99 {pct(xs, 0.99):8.2f} ms"
        f"  max {max(xs):8.2f} ms  (n={len(xs)})"
    )


def timer_triggers(n: int) -> dict[str, Any]:
    return {
        f"t{i}": TimerConfig.model_validate(
            {"type": "timer", "function": "f", "cron": "* * * * * * *"},
            context={"timezone": "UTC"},
        )
        for i in range(n)
    }


async def window(d: Daemon, seconds: int, reset: Callable[[], None]) -> range:
    run = asyncio.create_task(d.run_until_stopped())
    await d.ready.wait()
    # measure whole seconds only: from the next full second + 1, for `seconds` seconds
    start = int(time.time()) + 2
    # half a second ahead: the first ticks may be on time to a fraction of a millisecond,
    # before this sleep ends (the loop's timers are late by up to 2 ms; bridge.clock); ticks
    # of earlier seconds that arrive after it are left out by their time
    await asyncio.sleep(start - 0.5 - time.time())
    reset()
    await asyncio.sleep(seconds + 1.4)
    d.request_stop()
    await run
    return range(start, start + seconds)


class Stamp(Target[FunctionConfig]):
    """The in-process no-op function: it notes when it was called, parsed after the run. It
    must cost next to nothing (the calls run one after another on the loop, so its own cost
    would delay every later one), and it keeps no event, as a no-op function would (the
    test double ``bridge.testing.RecordingTarget`` keeps every event and invocation)."""

    Config = FunctionConfig

    def __init__(self, calls: list[tuple[str, str, float]]) -> None:
        ctx = TargetContext(name="f", state_dir=Path("."), logger=logging.getLogger("fn.f"))
        super().__init__(FunctionConfig(concurrency=1000), ctx)
        self.calls = calls

    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> None:
        self.calls.append((event["Time"], event["TriggerName"], time.time()))


async def inprocess(n: int, seconds: int) -> None:
    calls: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            daemon=DaemonConfig(state_dir=Path(tmp), max_in_flight=10 * n),
            functions={"f": FunctionConfig(concurrency=1000)},
            triggers=timer_triggers(n),
        )
        async with Daemon(config, targets={"f": Stamp(calls)}) as d:
            span = await window(d, seconds, calls.clear)
    invoked: list[tuple[float, float]] = []
    seen: dict[str, set[int]] = defaultdict(set)
    ticks = {when: tick_of(when) for when in {when for when, _, _ in calls}}
    for when, trigger, now in calls:
        tick = ticks[when]
        invoked.append((tick, (now - tick) * 1000))
        seen[trigger].add(int(tick))
    invoked_ms = [ms for tick, ms in invoked if int(tick) in span]
    got = sum(len([t for t in s if t in span]) for s in seen.values())
    print(
        f"event-bridge, in-process no-op function: fires expected {n * seconds}, missed {n * seconds - got}"
    )
    print(line("invoked", invoked_ms))


async def python(n: int, seconds: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "fn"
        code.mkdir()
        (code / "index.py").write_text(HANDLER)
        out = Path(tmp) / "starts.txt"
        config = cfg.parse(
            {
                "daemon": {"state_dir": "state", "max_in_flight": 10 * n},
                "functions": {
                    "f": {
                        "code": "fn",
                        "concurrency": concurrency,
                        "environment": {"BENCH_OUT": str(out)},
                    }
                },
                "triggers": {
                    f"t{i}": {"type": "timer", "function": "f", "cron": "* * * * * * *"}
                    for i in range(n)
                },
            },
            base_dir=Path(tmp),
            env={},
        )
        async with Daemon(config) as d:
            offset = [0]

            def reset() -> None:
                offset[0] = out.stat().st_size if out.exists() else 0

            span = await window(d, seconds, reset)
        started: list[float] = []
        got = 0
        with out.open() as f:
            f.seek(offset[0])
            for row in f:
                when, at = row.split()
                tick = tick_of(when)
                if int(tick) in span:
                    got += 1
                    started.append((float(at) - tick) * 1000)
    print(
        f"event-bridge, python function (concurrency {concurrency}): "
        f"fires expected {n * seconds}, missed {n * seconds - got}"
    )
    print(line("handler start", started))


def apscheduler(n: int, seconds: int) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    started: list[float] = []
    lock = threading.Lock()

    def job() -> None:
        now = time.time()
        with lock:
            started.append(now)

    sched = BackgroundScheduler(timezone="UTC")
    for i in range(n):
        sched.add_job(job, "cron", second="*", id=f"j{i}", misfire_grace_time=5, coalesce=True)
    sched.start()
    start = int(time.time()) + 2
    time.sleep(start - time.time())
    with lock:
        started.clear()
    time.sleep(seconds + 0.9)
    sched.shutdown(wait=True)
    late = [(t - math.floor(t)) * 1000 for t in started if start <= t < start + seconds]
    # ticks that ran past a whole second cannot be told from the next: count what ran
    print(f"APScheduler 3 BackgroundScheduler, plain function: runs {len(late)} of {n * seconds}")
    print(line("job start", late))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triggers", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--only", default="inprocess,python,apscheduler")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{args.triggers} timers x every 1 s for {args.seconds} s, side by side")
    only = args.only.split(",")
    if "apscheduler" in only:
        apscheduler(args.triggers, args.seconds)
    if "inprocess" in only:
        asyncio.run(inprocess(args.triggers, args.seconds))
    if "python" in only:
        asyncio.run(python(args.triggers, args.seconds, args.concurrency))


if __name__ == "__main__":
    main()
