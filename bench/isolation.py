"""What ``isolation = "sandbox"`` costs next to ``isolation = "process"``, in one run.

Run (as root, with bubblewrap and a memory cgroup, as for the sandbox itself):
``.venv/bin/python bench/isolation.py [--calls N] [--concurrency C] [--starts S]``

For each isolation, with a no-op handler: the warm invoke (p50/p99 of N sequential calls on a
warm worker, and invocations/s with C concurrent callers on C workers) and the cold start (S
times: a new target's first worker started, handler imported and one call answered; p50/p99).
The sandbox's one-off host probe is printed on its own. Ratios sandbox/process at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import sandbox
from bridge.abc import Invocation, TargetContext
from bridge.targets.python import PythonConfig, PythonTarget

HANDLER = "def main_handler(event, context):\n    return {'ok': True}\n"
EVENT = {"Type": "Timer", "TriggerName": "bench", "Time": "2024-01-01T00:00:00Z", "Message": ""}


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000


def inv(tag: str) -> Invocation:
    return Invocation(request_id=tag, function="bench", timeout_s=20.0)


def make(code: Path, state: Path, isolation: str, concurrency: int) -> PythonTarget:
    config = PythonConfig.model_validate(
        {"code": str(code), "concurrency": concurrency, "timeout": "20s", "isolation": isolation}
    )
    ctx = TargetContext(name="bench", state_dir=state, logger=logging.getLogger("bench"))
    return PythonTarget(config, ctx)


async def caller(target: PythonTarget, n: int, out: list[float], tag: str) -> None:
    for i in range(n):
        t0 = time.perf_counter()
        await target.invoke(EVENT, inv(f"{tag}-{i}"))
        out.append(time.perf_counter() - t0)


async def measure(
    code: Path, state: Path, isolation: str, calls: int, concurrency: int, starts: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    target = make(code, state, isolation, concurrency)
    await target.start()
    try:
        await asyncio.gather(*(caller(target, 100, [], f"w{c}") for c in range(concurrency)))
        seq: list[float] = []
        await caller(target, calls, seq, "seq")
        out["p50"], out["p99"] = pct(seq, 0.5), pct(seq, 0.99)
        out["seq_rate"] = calls / sum(seq)
        per = calls * 2 // concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(target, per, [], f"c{c}") for c in range(concurrency)))
        out["rate"] = per * concurrency / (time.perf_counter() - t0)
    finally:
        await target.close()
    cold: list[float] = []
    for i in range(starts):
        t = make(code, state, isolation, 1)
        t0 = time.perf_counter()
        await t.start()
        await t.invoke(EVENT, inv(f"cold-{i}"))
        cold.append(time.perf_counter() - t0)
        await t.close()
    out["cold50"], out["cold99"] = pct(cold, 0.5), pct(cold, 0.99)
    return out


async def run(calls: int, concurrency: int, starts: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    host = await sandbox.probe()
    probe_ms = (time.perf_counter() - t0) * 1000
    if host.problem:
        sys.exit(host.describe())
    print(f"{host.describe()}; host probe (once per daemon) {probe_ms:.0f} ms")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        code = Path(tmp, "code")
        code.mkdir(mode=0o755)
        (code / "index.py").write_text(HANDLER)
        Path(tmp).chmod(0o755)
        state = Path(tmp, "state")
        results = {}
        for isolation in ("process", "sandbox"):
            r = await measure(code, state, isolation, calls, concurrency, starts)
            results[isolation] = r
            print(f"{isolation:8} warm: p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms, "
                  f"{r['seq_rate']:,.0f} invocations/s sequential, "
                  f"{r['rate']:,.0f} invocations/s with {concurrency} callers | "
                  f"cold start: p50 {r['cold50']:.1f} ms, p99 {r['cold99']:.1f} ms "
                  f"({starts} starts)")  # fmt: skip
        p, s = results["process"], results["sandbox"]
        print(f"sandbox/process: warm p50 x{s['p50'] / p['p50']:.2f}, "
              f"throughput x{s['rate'] / p['rate']:.2f}, cold start x{s['cold50'] / p['cold50']:.2f} "
              f"(+{s['cold50'] - p['cold50']:.1f} ms)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--starts", type=int, default=30)
    a = ap.parse_args()
    asyncio.run(run(a.calls, a.concurrency, a.starts))


if __name__ == "__main__":
    main()
