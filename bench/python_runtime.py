"""Round trip and throughput of the ``python`` runtime with a no-op handler.

Run: ``.venv/bin/python bench/python_runtime.py [--calls N] [--concurrency C] [--event-bytes B]
[--profile]``

Prints the sequential round trip (p50/p99 over N calls, one caller) and the throughput with C
concurrent callers on C workers (with p50/p99 under that load), each with the CPU time per
invocation of the daemon's side and of the workers. Aims on a 2-core machine: p50 under 1 ms
and at least 5,000 invocations/s with concurrency 4. ``--event-bytes``: events of about that
many bytes of JSON (a timer's event with a longer ``Message``), encoded once as the queue
does (a large API request or Kafka batch); the default is a timer's event, ~100 bytes.

The script puts its own tree first on ``sys.path``: to compare two trees, run a copy of it
that lies in each.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.abc import Invocation, TargetContext
from bridge.events import RawEvent
from bridge.targets.python import PythonConfig, PythonTarget

HANDLER = "def main_handler(event, context):\n    return {'ok': True}\n"
EVENT = {"Type": "Timer", "TriggerName": "bench", "Time": "2024-01-01T00:00:00Z", "Message": ""}


def cpu_s(target: PythonTarget) -> tuple[float, float]:
    """CPU seconds so far: this process's, and its live workers' (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    workers = 0.0
    for w in target._alive:
        try:
            with open(f"/proc/{w.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        workers += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return time.process_time(), workers


def per_call(before: tuple[float, float], after: tuple[float, float], calls: int) -> str:
    own, workers = ((b - a) / calls * 1e6 for a, b in zip(before, after, strict=True))
    return f"CPU per invocation: daemon {own:.0f} us, workers {workers:.0f} us"


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000


async def caller(
    target: PythonTarget, n: int, out: list[float], tag: str, event: object = EVENT
) -> None:
    for i in range(n):
        inv = Invocation(request_id=f"{tag}-{i}", function="bench", timeout_s=10.0)
        t0 = time.perf_counter()
        await target.invoke(event, inv)  # type: ignore[arg-type]
        out.append(time.perf_counter() - t0)


async def run(calls: int, concurrency: int, profile: bool, event_bytes: int) -> None:
    event: object = EVENT
    if event_bytes:
        event = RawEvent.encode({**EVENT, "Message": "x" * event_bytes})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp, "code")
        code.mkdir()
        (code / "index.py").write_text(HANDLER)
        config = PythonConfig.model_validate(
            {"code": str(code), "concurrency": concurrency, "timeout": "10s"}
        )
        ctx = TargetContext(
            name="bench", state_dir=Path(tmp, "state"), logger=logging.getLogger("bench")
        )
        target = PythonTarget(config, ctx)
        await target.start()
        try:
            # Warm up: all workers started, code paths hot.
            await asyncio.gather(
                *(caller(target, 200, [], f"w{c}", event) for c in range(concurrency))
            )

            seq: list[float] = []
            before = cpu_s(target)
            await caller(target, calls, seq, "seq", event)
            print(f"sequential: {calls} calls, round trip p50 {pct(seq, 0.5):.3f} ms, p99 {pct(seq, 0.99):.3f} ms, "
                  f"{calls / sum(seq):,.0f} invocations/s; {per_call(before, cpu_s(target), calls)}")  # fmt: skip

            total = calls * 4
            per = total // concurrency
            lat: list[float] = []
            prof = cProfile.Profile() if profile else None
            if prof:
                prof.enable()
            before = cpu_s(target)
            t0 = time.perf_counter()
            await asyncio.gather(
                *(caller(target, per, lat, f"c{c}", event) for c in range(concurrency))
            )
            elapsed = time.perf_counter() - t0
            after = cpu_s(target)
            if prof:
                prof.disable()
            print(f"concurrent: {per * concurrency} calls, {concurrency} callers, "
                  f"{per * concurrency / elapsed:,.0f} invocations/s, "
                  f"p50 {pct(lat, 0.5):.3f} ms, p99 {pct(lat, 0.99):.3f} ms; "
                  f"{per_call(before, after, per * concurrency)}")  # fmt: skip
            if prof:
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        finally:
            await target.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000, help="sequential calls (x4 concurrent)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="cProfile the concurrent run")
    ap.add_argument("--event-bytes", type=int, default=0, help="events of about this size")
    args = ap.parse_args()
    if args.event_bytes < 0:
        ap.error("--event-bytes must be 0 or more")
    asyncio.run(run(args.calls, args.concurrency, args.profile, args.event_bytes))


if __name__ == "__main__":
    main()
