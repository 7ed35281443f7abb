"""HTTP API benchmark: synchronous invocations through the API to a no-op python function.

Starts the real daemon (``event-bridge run``) with the API on a free loopback
port and a no-op SCF-style function (concurrency 4), then an aiohttp client
sends ``POST /functions/noop/invocations`` (RequestResponse) from C concurrent
connections for a bounded number of requests. The headline figures — invocations/s
and latency percentiles — count only successful answers (200); throttled answers (429:
more callers than the function's concurrency, answered at once without invoking) and
any other status are counted and timed apart, so a flood of cheap 429s cannot inflate
the throughput or flatter the latency.

    .venv/bin/python bench/api.py [--requests 20000] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bridge.testing import free_port

EXE = str(Path(sys.executable).with_name("event-bridge"))
TOKEN = "bench-token-0123456789abcdef"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def summary(xs: list[float]) -> str:
    return f"p50 {statistics.median(xs):.2f} ms  p99 {pct(xs, 0.99):.2f} ms  max {max(xs):.2f} ms"


async def load(base: str, requests: int, connections: int) -> None:
    url = f"{base}/functions/noop/invocations"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: dict[int, list[float]] = {}  # per status
    remaining = requests
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        for _ in range(200):  # warm up the workers
            async with session.post(url, data=b"{}", headers=headers) as r:
                await r.read()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with session.post(url, data=b'{"k":"v"}', headers=headers) as r:
                    await r.read()
                latencies.setdefault(r.status, []).append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    ok = latencies.get(200, [])
    print(
        f"API: {requests} RequestResponse invocations, {connections} connections, no-op python function (concurrency 4)"
    )
    print(
        f"  {len(ok) / elapsed:,.0f} successful invocations/s (200 only), {len(ok)} of {requests}"
    )
    if ok:
        print(f"  latency of 200s: {summary(ok)}")
    for status, xs in sorted(latencies.items()):
        if status != 200:
            what = "throttled" if status == 429 else "other"
            print(f"  {status} ({what}), not counted above: {len(xs)} answers, {summary(xs)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp, "noop")
        code.mkdir()
        (code / "index.py").write_text("def main_handler(event, context):\n    return None\n")
        Path(tmp, "bridge.toml").write_text(
            f"""
[daemon]
state_dir = "state"
log_level = "warning"
[api]
enabled = true
listen = "127.0.0.1:{port}"
[[api.tokens]]
name = "bench"
secret = "{TOKEN}"
actions = ["invoke"]
[functions.noop]
code = "noop"
concurrency = 4
"""
        )
        log = Path(tmp, "log")
        with log.open("w") as fh:
            proc = subprocess.Popen(
                [EXE, "run", "-c", f"{tmp}/bridge.toml"], stdout=fh, stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise SystemExit(f"daemon did not start:\n{log.read_text()}") from None
                        time.sleep(0.05)
                asyncio.run(load(f"http://127.0.0.1:{port}", args.requests, args.connections))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


if __name__ == "__main__":
    main()
