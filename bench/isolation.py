"""What ``isolation = "sandbox"`` costs next to ``isolation = "process"``, in one run.

Run (as root, with bubblewrap and a memory cgroup, as for the sandbox itself):
``.venv/bin/python bench/isolation.py [--calls N] [--concurrency C] [--starts S]``

For each isolation, with a no-op handler, in alternating rounds (a change of load on the machine
hits both): the warm invoke (p50/p99 of N sequential calls on a
warm worker, and invocations/s with C concurrent callers on C workers) and the cold start (S
times: a new target's first worker started, handler imported and one call answered; p50/p99).
Then the command runtime, which starts a process per call: p50/p99 of 2*S calls of ``cat``.
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
from bridge.targets.command import CommandConfig, CommandTarget
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
    code: Path, state: Path, calls: int, concurrency: int, starts: int, rounds: int = 10
) -> dict[str, dict[str, float]]:
    """Both isolations in alternating rounds, so a load change on the machine hits both."""
    modes = ("process", "sandbox")
    seq: dict[str, list[float]] = {m: [] for m in modes}
    busy: dict[str, float] = dict.fromkeys(modes, 0.0)
    done: dict[str, int] = dict.fromkeys(modes, 0)
    cold: dict[str, list[float]] = {m: [] for m in modes}
    targets = {m: make(code, state, m, concurrency) for m in modes}
    for t in targets.values():
        await t.start()
    try:
        for m, t in targets.items():  # warm up: all workers started, code paths hot
            await asyncio.gather(*(caller(t, 100, [], f"w{m}{c}") for c in range(concurrency)))
        per = max(1, calls * 2 // concurrency // rounds)
        for r in range(rounds):
            for m, t in targets.items():
                await caller(t, calls // rounds, seq[m], f"s{m}{r}")
                t0 = time.perf_counter()
                await asyncio.gather(
                    *(caller(t, per, [], f"c{m}{r}{c}") for c in range(concurrency))
                )
                busy[m] += time.perf_counter() - t0
                done[m] += per * concurrency
    finally:
        for t in targets.values():
            await t.close()
    for i in range(starts):
        for m in modes:
            t = make(code, state, m, 1)
            t0 = time.perf_counter()
            await t.start()
            await t.invoke(EVENT, inv(f"cold-{i}"))
            cold[m].append(time.perf_counter() - t0)
            await t.close()
    return {
        m: {
            "p50": pct(seq[m], 0.5),
            "p99": pct(seq[m], 0.99),
            "seq_rate": len(seq[m]) / sum(seq[m]),
            "rate": done[m] / busy[m],
            "cold50": pct(cold[m], 0.5),
            "cold99": pct(cold[m], 0.99),
        }
        for m in modes
    }


async def measure_command(state: Path, runs: int) -> dict[str, list[float]]:
    """The command runtime starts a process per invocation (`cat`: the event back)."""
    out: dict[str, list[float]] = {"process": [], "sandbox": []}
    targets = {}
    for m in out:
        config = CommandConfig.model_validate(
            {"runtime": "command", "command": ["cat"], "isolation": m, "timeout": "20s"}
        )
        ctx = TargetContext(name="benchcmd", state_dir=state, logger=logging.getLogger("bench"))
        targets[m] = CommandTarget(config, ctx)
        await targets[m].start()
    for i in range(runs):
        for m, t in targets.items():
            t0 = time.perf_counter()
            await t.invoke(EVENT, inv(f"cmd-{m}-{i}"))
            out[m].append(time.perf_counter() - t0)
    for t in targets.values():
        await t.close()
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
        results = await measure(code, state, calls, concurrency, starts)
        for isolation, r in results.items():
            print(f"{isolation:8} warm: p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms, "
                  f"{r['seq_rate']:,.0f} invocations/s sequential, "
                  f"{r['rate']:,.0f} invocations/s with {concurrency} callers | "
                  f"cold start: p50 {r['cold50']:.1f} ms, p99 {r['cold99']:.1f} ms "
                  f"({starts} starts)")  # fmt: skip
        cmd = await measure_command(state, starts * 2)
        for isolation, lat in cmd.items():
            print(f"{isolation:8} command runtime (a process per call): "
                  f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms ({len(lat)} calls)")  # fmt: skip
        p, s = results["process"], results["sandbox"]
        print(f"sandbox/process: warm p50 x{s['p50'] / p['p50']:.2f}, "
              f"throughput x{s['rate'] / p['rate']:.2f}, cold start x{s['cold50'] / p['cold50']:.2f} "
              f"(+{s['cold50'] - p['cold50']:.1f} ms), "
              f"command call x{pct(cmd['sandbox'], 0.5) / pct(cmd['process'], 0.5):.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--starts", type=int, default=30)
    a = ap.parse_args()
    asyncio.run(run(a.calls, a.concurrency, a.starts))


if __name__ == "__main__":
    main()
