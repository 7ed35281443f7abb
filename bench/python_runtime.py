"""Round trip and throughput of the ``python`` runtime with a no-op handler.

Run: ``.venv/bin/python bench/python_runtime.py [--calls N] [--concurrency C] [--profile]``

Prints the sequential round trip (p50/p99 over N calls, one caller) and the throughput with C
concurrent callers on C workers (with p50/p99 under that load). Aims on a 2-core machine:
p50 under 1 ms and at least 5,000 invocations/s with concurrency 4.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.abc import Invocation, TargetContext
from bridge.targets.python import PythonConfig, PythonTarget

HANDLER = "def main_handler(event, context):\n    return {'ok': True}\n"
EVENT = {"Type": "Timer", "TriggerName": "bench", "Time": "2024-01-01T00:00:00Z", "Message": ""}


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000


async def caller(target: PythonTarget, n: int, out: list[float], tag: str) -> None:
    for i in range(n):
        inv = Invocation(request_id=f"{tag}-{i}", function="bench", timeout_s=10.0)
        t0 = time.perf_counter()
        await target.invoke(EVENT, inv)
        out.append(time.perf_counter() - t0)


async def run(calls: int, concurrency: int, profile: bool) -> None:
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
            await asyncio.gather(*(caller(target, 200, [], f"w{c}") for c in range(concurrency)))

            seq: list[float] = []
            await caller(target, calls, seq, "seq")
            print(f"sequential: {calls} calls, round trip p50 {pct(seq, 0.5):.3f} ms, p99 {pct(seq, 0.99):.3f} ms, "
                  f"{calls / sum(seq):,.0f} invocations/s")  # fmt: skip

            total = calls * 4
            per = total // concurrency
            lat: list[float] = []
            prof = cProfile.Profile() if profile else None
            if prof:
                prof.enable()
            t0 = time.perf_counter()
            await asyncio.gather(*(caller(target, per, lat, f"c{c}") for c in range(concurrency)))
            elapsed = time.perf_counter() - t0
            if prof:
                prof.disable()
            print(f"concurrent: {per * concurrency} calls, {concurrency} callers, "
                  f"{per * concurrency / elapsed:,.0f} invocations/s, "
                  f"p50 {pct(lat, 0.5):.3f} ms, p99 {pct(lat, 0.99):.3f} ms")  # fmt: skip
            if prof:
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        finally:
            await target.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000, help="sequential calls (x4 concurrent)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="cProfile the concurrent run")
    args = ap.parse_args()
    asyncio.run(run(args.calls, args.concurrency, args.profile))


if __name__ == "__main__":
    main()
