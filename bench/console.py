"""Console and log-store benchmark, against the real daemon (``event-bridge run``).

1. **Dead-letter list at 50,000 records**: the state store is filled with 50,000 dead letters
   (40,000 of function ``f`` over a week, 10,000 of ``bulk``) before the daemon starts; a signed-in
   client then loads ``/ui/deadletters`` — first page, filtered by function, by error class,
   by time, and a later page through the cursor — and the page times (p50/p95/max) are printed.
2. **Bulk replay of 10,000**: ``POST /ui/deadletters/replay`` with ``scope=all&function=bulk``
   (every dead letter matching the filter); the time until the response (all 10,000 moved back
   into the durable queue) is printed, then the time until the queue drained (invoked).
3. **Invocation throughput with the log store on vs off**: the same daemon config with
   ``[logs] enabled = true`` and ``false``, alternately (on, off, on, off, ...), each serving
   synchronous API invocations of a no-op function that prints a line from C connections;
   the best and median invocations/s of each and their ratios (on / off) are printed, and
   the daemon's CPU time per invocation (its capacity, steadier than wall-clock rates when the
   machine is shared).

    .venv/bin/python bench/console.py [--requests 4000] [--connections 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote_plus

import aiohttp
import psutil

from bridge.store import DeadLetterRow, SqliteStore
from bridge.testing import free_port

EXE = str(Path(sys.executable).with_name("event-bridge"))
TOKEN = "bench-admin-token-0123456789abcdef"
CODE = """
def main_handler(event, context):
    print("handled", context.request_id)
    return "ok"
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def write_config(root: Path, port: int, logs: bool) -> Path:
    (root / "fn").mkdir(parents=True, exist_ok=True)
    (root / "fn" / "index.py").write_text(CODE)
    cfg = root / f"bridge-{port}.toml"
    cfg.write_text(
        f"""
[daemon]
state_dir = "state"
queue_poll = "100ms"
[api]
enabled = true
listen = "127.0.0.1:{port}"
[[api.tokens]]
name = "bench"
secret = "{TOKEN}"
actions = ["admin"]
[logs]
enabled = {"true" if logs else "false"}
[functions.f]
code = "fn"
concurrency = 4
[functions.bulk]
code = "fn"
concurrency = 8
"""
    )
    return cfg


async def fill(state: Path, n_f: int, n_bulk: int) -> None:
    store = SqliteStore(state)
    await store.open()
    now = time.time()
    classes = ["function_error", "system_error", "invalid_request", "throttled"]
    rows = []
    for i in range(n_f + n_bulk):
        fn = "bulk" if i >= n_f else "f"
        rid = str(uuid.uuid4())
        created = now - (i % 7 * 86400) - i * 0.01
        rec = {
            "RequestId": rid,
            "ErrorCode": 1,
            "ErrorMessage": f"ValueError: failure number {i}",
            "Body": {
                "RequestSource": "TRIGGER_TIMER",
                "FunctionName": fn,
                "TriggerName": f"t{i % 5}",
                "InvocationType": "Event",
                "ClientContext": json.dumps({"n": i, "payload": "x" * 200}),
                "RetryNum": 2,
                "PushTime": "2026-11-29T13:00:00Z",
            },
            "ErrorClass": classes[i % 4],
            "ErrorDetail": "Traceback (most recent call last):\n  ...\nValueError: failure",
            "Attempts": 3,
            "AcceptedTime": "2026-11-29T12:58:00Z",
            "Reason": "function error after 2 retries",
        }
        rows.append(
            DeadLetterRow(
                id=rid,
                function=fn,
                trigger=f"t{i % 5}",
                error_class=classes[i % 4],
                created_at=created,
                record=json.dumps(rec),
            )
        )
    for i in range(0, len(rows), 5000):
        await asyncio.gather(*(store.dead_letter(None, r) for r in rows[i : i + 5000]))
    await store.close()


def start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [EXE, "run", "-c", str(cfg)], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


async def wait_up(base: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            try:
                async with s.get(base + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("the daemon did not start")


async def console_bench(root: Path) -> None:
    port = free_port()
    cfg = write_config(root, port, logs=True)
    print("filling 50,000 dead letters ...", flush=True)
    await fill(root / "state", 40_000, 10_000)
    proc = start(cfg, root / "daemon-console.log")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_up(base)
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            async with s.post(base + "/ui/login", data={"token": TOKEN}) as r:
                assert r.status == 200, r.status
            pages = [
                "/ui/deadletters",
                "/ui/deadletters?function=f",
                "/ui/deadletters?error_class=system_error",
                "/ui/deadletters?since=24h&trigger=t3",
                "/ui/deadletters?function=f&error_class=throttled&since=7d",
            ]
            async with s.get(base + pages[0]) as r:
                html = await r.text()
            nxt = re.search(r'href="(/ui/deadletters\?[^"]*before=[^"]*)" id="next-page"', html)
            assert nxt, "no next page link"
            pages.append(nxt.group(1).replace("&amp;", "&"))
            times: list[float] = []
            for _ in range(40):
                for p in pages:
                    t0 = time.perf_counter()
                    async with s.get(base + p) as r:
                        body = await r.read()
                        assert r.status == 200 and b'class="dl"' in body, (p, r.status)
                    times.append((time.perf_counter() - t0) * 1000)
            total = re.search(r'id="total">(\d+)<', html)
            print(
                f"dead-letter list, {total.group(1) if total else '?'} records: "
                f"{len(times)} page loads over {len(pages)} views, "
                f"p50 {pct(times, 0.5):.1f} ms, p95 {pct(times, 0.95):.1f} ms, "
                f"max {max(times):.1f} ms (aim: p95 < 200 ms)"
            )
            async with s.get(base + "/ui/deadletters?function=bulk") as r:
                html = await r.text()
            csrf = re.search(r'name="csrf" value="([^"]+)"', html)
            assert csrf
            t0 = time.perf_counter()
            async with s.post(
                base + "/ui/deadletters/replay",
                data={"csrf": csrf.group(1), "scope": "all", "function": "bulk"},
                allow_redirects=False,
            ) as r:
                assert r.status == 303, r.status
                done = r.headers["Location"]
            replay_s = time.perf_counter() - t0
            what = unquote_plus(done.split("done=")[1])
            print(f"bulk replay: {what} in {replay_s:.2f} s (aim: 10,000 < 5 s)")
            headers = {"Authorization": f"Bearer {TOKEN}"}
            while True:
                async with s.get(base + "/status", headers=headers) as r:
                    st = await r.json()
                if st["queue"]["depth"] == 0:
                    break
                await asyncio.sleep(0.1)
            print(
                f"  ... and all of them invoked (queue drained) {time.perf_counter() - t0:.2f} s "
                "after the click"
            )
    finally:
        proc.terminate()
        proc.wait(30)


async def throughput(
    root: Path, logs: bool, requests: int, connections: int
) -> tuple[float, float]:
    port = free_port()
    cfg = write_config(root, port, logs)
    proc = start(cfg, root / f"daemon-{port}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_up(base)
        url = base + "/functions/f/invocations"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn) as s:
            for _ in range(200):
                async with s.post(url, data=b"{}", headers=headers) as r:
                    await r.read()
            remaining = requests
            ok = 0

            async def worker() -> None:
                nonlocal remaining, ok
                while remaining > 0:
                    remaining -= 1
                    async with s.post(url, data=b'{"k":"v"}', headers=headers) as r:
                        await r.read()
                        ok += r.status == 200

            me = psutil.Process(proc.pid)
            c0 = me.cpu_times()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            rate = ok / (time.perf_counter() - t0)
            c1 = me.cpu_times()
            cpu_us = (c1.user + c1.system - c0.user - c0.system) / ok * 1e6
    finally:
        proc.terminate()
        proc.wait(30)
    return rate, cpu_us


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="on/off pairs, alternated")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        await console_bench(Path(d) / "console")
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    for logs in [True, False] * args.rounds:
        with tempfile.TemporaryDirectory() as d:
            rate, cpu = await throughput(Path(d), logs, args.requests, args.connections)
            rates[logs].append(rate)
            cpus[logs].append(cpu)
            print(
                f"  log store {'on ' if logs else 'off'}: {rate:.0f} invocations/s, "
                f"daemon CPU {cpu:.0f} us per invocation"
            )
    on, off = max(rates[True]), max(rates[False])
    mon, moff = statistics.median(rates[True]), statistics.median(rates[False])
    print(
        f"invocation throughput, sync API, {args.connections} connections, {args.rounds} rounds: "
        f"best: log store on {on:.0f}/s, off {off:.0f}/s, ratio {on / off:.3f}; "
        f"median: on {mon:.0f}/s, off {moff:.0f}/s, ratio {mon / moff:.3f} (aim: >= 0.95)"
    )
    con, coff = statistics.median(cpus[True]), statistics.median(cpus[False])
    print(
        f"daemon CPU per invocation (median; steadier than wall-clock rates on a shared "
        f"machine): on {con:.0f} us, off {coff:.0f} us: capacity ratio off/on {coff / con:.3f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
