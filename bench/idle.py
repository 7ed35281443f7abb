"""Idle daemon footprint and start-up time with the example config.

Starts ``event-bridge run`` on a copy of examples/bridge.toml (state in a temp
dir), measures the time from spawning the process to its "ready:" log line
(all sources running), then after it has idled for a few seconds reports the
resident memory of the daemon alone and with its warm function workers.

    .venv/bin/python bench/idle.py [--runs 5] [--idle 5]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("event-bridge"))


def one(idle: float) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(
            ROOT / "examples", tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("state")
        )
        log = Path(tmp) / "log"
        with log.open("w") as fh:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [EXE, "run", "-c", f"{tmp}/bridge.toml"], stdout=fh, stderr=subprocess.STDOUT
            )
            try:
                while "ready:" not in log.read_text():
                    if proc.poll() is not None:
                        raise SystemExit(f"daemon exited:\n{log.read_text()}")
                    time.sleep(0.002)
                ready_ms = (time.monotonic() - t0) * 1000
                time.sleep(idle)
                p = psutil.Process(proc.pid)
                own = p.memory_info().rss
                total = own + sum(c.memory_info().rss for c in p.children(recursive=True))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    return ready_ms, own / 2**20, total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=5.0)
    args = ap.parse_args()
    rows = [one(args.idle) for _ in range(args.runs)]
    ready = [r[0] for r in rows]
    print(f"idle daemon, examples/bridge.toml, {args.runs} runs")
    print(
        f"  start → all sources running: median {statistics.median(ready):.0f} ms (min {min(ready):.0f}, max {max(ready):.0f})"
    )
    print(f"  RSS daemon: median {statistics.median(r[1] for r in rows):.1f} MiB")
    print(f"  RSS daemon + warm workers: median {statistics.median(r[2] for r in rows):.1f} MiB")


if __name__ == "__main__":
    main()
