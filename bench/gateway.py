"""Gateway benchmark: HTTP triggers against the admin Invoke API and a bare aiohttp server.

Starts the real daemon (``event-bridge run``) with both listeners, ``[gateway]``
and ``[api]``, and one no-op python function that returns an integrated response
(``{"statusCode": 200, "body": "ok"}``), reserved concurrency = connections. Also
starts a bare aiohttp hello-world server, the ceiling of what any aiohttp server
does here. Then, one after the other in this run, a load generator in its own
process (aiohttp client, keep-alive, C connections, each sending its next request
when the previous one is answered) sends a bounded number of requests (and stops
at --max-seconds) to:

1. ``GET /noop`` on the gateway (an ``apigw`` trigger: event built, function
   invoked, integrated response rendered),
2. ``POST /functions/noop/invocations`` on the admin API (RequestResponse),
3. ``GET /`` on the bare aiohttp server,

and prints requests/s and latency p50/p99 for each, with the ratios. Only 200s
count; any other status is reported.

    .venv/bin/python bench/gateway.py [--requests 20000] [--connections 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bridge.testing import free_port

EXE = str(Path(sys.executable).with_name("event-bridge"))
TOKEN = "bench-token-0123456789abcdef"

NOOP = """
def main_handler(event, context):
    return {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": "ok"}
"""

HELLO = """
import sys
from aiohttp import web

async def hello(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


async def _load(
    method: str, url: str, headers: dict[str, str], body: bytes | None, n: int, c: int, limit: float
) -> dict[str, object]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    remaining = n
    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(max(200, c * 20)):  # warm the workers and the connections
            async with s.request(method, url, data=body, headers=headers) as r:
                await r.read()
        t_end = time.perf_counter() + limit

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.perf_counter() < t_end:
                remaining -= 1
                t0 = time.perf_counter()
                async with s.request(method, url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append((time.perf_counter() - t0) * 1000)
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        elapsed = time.perf_counter() - t0
    return {
        "rps": len(latencies) / elapsed,
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        "ok": len(latencies),
        "statuses": statuses,
    }


def client_main(spec: str) -> None:
    """``--client JSON``: run one load in this (separate) process; print the result as JSON."""
    a = json.loads(spec)
    body = a["body"].encode() if a["body"] is not None else None
    out = asyncio.run(_load(a["method"], a["url"], a["headers"], body, a["n"], a["c"], a["limit"]))
    print(json.dumps(out))


def run_load(
    method: str,
    url: str,
    *,
    n: int,
    c: int,
    limit: float,
    headers: dict[str, str] | None = None,
    body: str | None = None,
) -> dict[str, object]:
    spec = json.dumps(
        {
            "method": method,
            "url": url,
            "headers": headers or {},
            "body": body,
            "n": n,
            "c": c,
            "limit": limit,
        }
    )
    out = subprocess.run(
        [sys.executable, __file__, "--client", spec], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client)
        return

    c = args.connections
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "fn").mkdir()
        (root / "fn" / "index.py").write_text(NOOP)
        gw, api, hello = free_port(), free_port(), free_port()
        (root / "bridge.toml").write_text(
            textwrap.dedent(
                f"""
                [daemon]
                state_dir = "state"
                [api]
                enabled = true
                listen = "127.0.0.1:{api}"
                [[api.tokens]]
                name = "bench"
                secret = "{TOKEN}"
                [gateway]
                listen = "127.0.0.1:{gw}"
                [functions.noop]
                code = "fn"
                concurrency = {c}
                [triggers.noop]
                type = "apigw"
                function = "noop"
                path = "/noop"
                method = "GET"
                """
            )
        )
        log = (root / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [EXE, "run", "-c", str(root / "bridge.toml")], stdout=log, stderr=log, cwd=root
        )
        server = subprocess.Popen([sys.executable, "-c", HELLO, str(hello)], env=os.environ)
        try:
            wait_port(gw, daemon, "the daemon")
            wait_port(api, daemon, "the daemon")
            wait_port(hello, server, "the aiohttp server")
            loads = {
                "gateway (apigw trigger)": lambda: run_load(
                    "GET",
                    f"http://127.0.0.1:{gw}/noop",
                    n=args.requests,
                    c=c,
                    limit=args.max_seconds,
                ),
                "admin Invoke API": lambda: run_load(
                    "POST",
                    f"http://127.0.0.1:{api}/functions/noop/invocations",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    body="{}",
                    n=args.requests,
                    c=c,
                    limit=args.max_seconds,
                ),
                "bare aiohttp hello-world": lambda: run_load(
                    "GET",
                    f"http://127.0.0.1:{hello}/",
                    n=args.requests,
                    c=c,
                    limit=args.max_seconds,
                ),
            }
            results: dict[str, list[dict[str, object]]] = {k: [] for k in loads}
            for _ in range(args.rounds):
                for name, load in loads.items():
                    results[name].append(load())
        finally:
            daemon.send_signal(signal.SIGTERM)
            server.send_signal(signal.SIGTERM)
            daemon.wait(30)
            server.wait(30)
            log.close()

    print(
        f"gateway bench: up to {args.requests} requests per target, {c} keep-alive connections, "
        f"{args.rounds} round(s), {os.cpu_count()} CPUs, load generator in its own process"
    )
    print(f"  {'target':28} {'requests/s':>10} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    best: dict[str, dict[str, object]] = {}
    for name, rs in results.items():
        r = max(rs, key=lambda x: float(x["rps"]))  # type: ignore[arg-type]
        best[name] = r
        print(
            f"  {name:28} {float(r['rps']):>10,.0f} {float(r['p50']):>8.2f} {float(r['p99']):>8.2f}"  # type: ignore[arg-type]
            f"  {r['statuses']}"
        )
    g, a, h = (best[k] for k in loads)
    print(
        f"  gateway vs admin API: p50 {float(g['p50']) - float(a['p50']):+.2f} ms, "  # type: ignore[arg-type]
        f"throughput x{float(g['rps']) / float(a['rps']):.2f}; "  # type: ignore[arg-type]
        f"gateway vs bare aiohttp: throughput x{float(g['rps']) / float(h['rps']):.2f}"  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
