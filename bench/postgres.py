"""Scale-out benchmark: replicas sharing one PostgreSQL database, beside SQLite.

In one run (each replica is a process of its own, like a daemon):

1. Durable accept -> complete, events/s: every replica accepts its share of the events
   (committed before the ack) while its runner claims and runs due events through a no-op
   SCF-style python function (concurrency 4 per replica): SQLite with one replica,
   PostgreSQL with 1 and with 2.
2. A -> B latency: replica A only accepts, replica B only runs; one event at a time, the
   time from A's accept to B's completion (p50, p99) — NOTIFY wakes B.
3. Timers: 3 ``event-bridge run`` replicas with the same N every-second timers for D
   seconds; every invocation is counted: duplicates (a tick run twice) and misses (a tick
   in the window never run).

    .venv/bin/python bench/postgres.py [--events 20000] [--timers 1000] [--duration 20]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust), as the tests do; each part uses
a database of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NOOP = "def main_handler(event, context):\n    return None\n"


def create_db() -> tuple[str, str]:
    name = f"eb_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return name, f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_db(name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- 1 and 2: replicas as processes --------------------------------------------------------


def replica(
    url: str | None,
    accept: int,
    run: bool,
    producers: int,
    go: Any,
    stop: Any,
    done: Any,
    out: Any,
    spaced_s: float,
) -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_replica(url, accept, run, producers, go, stop, done, out, spaced_s))


async def _replica(
    url: str | None,
    accept: int,
    run: bool,
    producers: int,
    go: Any,
    stop: Any,
    done: Any,
    out: Any,
    spaced_s: float,
) -> None:
    from bridge import config as cfg
    from bridge.abc import DeadLetterContext, Delivery
    from bridge.deadletter import LocalSink
    from bridge.dispatcher import Dispatcher
    from bridge.events import Format, timer_event
    from bridge.queue import DurableQueue
    from bridge.store import SqliteStore, StateStore
    from bridge.wiring import build_targets

    class D(Delivery):
        async def ack(self) -> None:
            pass

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "noop").mkdir()
        (Path(tmp) / "noop" / "index.py").write_text(NOOP)
        config = cfg.parse(
            {
                "daemon": {"state_dir": "state", "queue_poll": "500ms"},
                "functions": {"noop": {"code": "noop", "concurrency": 4}},
            },
            base_dir=Path(tmp),
            env={},
        )
        store: StateStore
        if url is None:
            store = SqliteStore(config.state_dir)
        else:
            from bridge.pgstore import PgStore

            store = PgStore(url, replica=f"bench-{os.getpid()}")
        await store.open()
        dispatcher = Dispatcher(build_targets(config))
        await dispatcher.start()
        sink = LocalSink("local", DeadLetterContext(store=store, logger=logging.getLogger("dl")))
        q = DurableQueue(config, store, dispatcher, {"noop": sink})
        await q.start()
        latencies: list[float] = []
        invoke = dispatcher.invoke

        async def timed(function: str, event: Any, **kw: Any) -> Any:
            result = await invoke(function, event, **kw)
            done.value += 1
            if event["Message"] != "bench":  # A's accept time (the A -> B run)
                latencies.append(time.time() - float(event["Message"]))
            return result

        invoke_many = dispatcher.invoke_many

        async def timed_many(function: str, calls: Any, **kw: Any) -> Any:
            results = await invoke_many(function, calls, **kw)  # a batch (python runtime)
            done.value += len(calls)
            now = time.time()
            for call in calls:
                if call.event["Message"] != "bench":
                    latencies.append(now - float(call.event["Message"]))
            return results

        dispatcher.invoke = timed  # type: ignore[method-assign]
        dispatcher.invoke_many = timed_many  # type: ignore[method-assign]
        stop_ev = asyncio.Event()
        runner = asyncio.create_task(q.run(stop_ev)) if run else None
        out.put(("ready", os.getpid()))
        await asyncio.to_thread(go.wait)
        t = datetime.now(UTC)
        remaining = accept

        async def producer() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                msg = f"{time.time():.6f}" if spaced_s else "bench"
                await q.accept(
                    D(timer_event("tick", t, msg)), trigger="tick", function="noop", fmt=Format.SCF
                )
                if spaced_s:
                    await asyncio.sleep(spaced_s)

        await asyncio.gather(*(producer() for _ in range(1 if spaced_s else producers)))
        await asyncio.to_thread(stop.wait)
        stop_ev.set()
        if runner is not None:
            await runner
        out.put(("latencies", latencies))
        await dispatcher.close()
        await store.close()


def throughput(url: str | None, replicas: int, events: int, producers: int) -> float:
    ctx = mp.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    counters = [ctx.Value("l", 0, lock=False) for _ in range(replicas)]
    share = [events // replicas + (1 if i < events % replicas else 0) for i in range(replicas)]
    procs = [
        ctx.Process(
            target=replica,
            args=(url, share[i], True, producers, go, stop, counters[i], out, 0.0),
        )
        for i in range(replicas)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=120)[0] == "ready"
    t0 = time.perf_counter()
    go.set()
    while sum(c.value for c in counters) < events:
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    stop.set()
    for _ in procs:
        out.get(timeout=120)
    for p in procs:
        p.join(60)
    return events / elapsed


def a_to_b(url: str, n: int) -> list[float]:
    ctx = mp.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    ca, cb = ctx.Value("l", 0, lock=False), ctx.Value("l", 0, lock=False)
    a = ctx.Process(target=replica, args=(url, n, False, 1, go, stop, ca, out, 0.02))
    b = ctx.Process(target=replica, args=(url, 0, True, 1, go, stop, cb, out, 0.0))
    b.start()
    a.start()
    for _ in range(2):
        assert out.get(timeout=120)[0] == "ready"
    go.set()
    while cb.value < n:
        time.sleep(0.01)
    stop.set()
    lat: list[float] = []
    for _ in range(2):
        lat += out.get(timeout=120)[1]
    a.join(60)
    b.join(60)
    # B measured them: B's own completions carry A's accept time in the message
    return sorted(x * 1000 for x in lat)


# --- 3: timers across real daemons ----------------------------------------------------------

RECORD = """
import os
def main_handler(event, context):
    with open(os.environ["OUT"], "a") as f:
        f.write(event["TriggerName"] + " " + event["Time"] + "\\n")
"""


def timers(url: str, n: int, duration: float, names: str = "abc") -> tuple[int, int, int, float]:
    exe = str(Path(sys.executable).with_name("event-bridge"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "rec").mkdir()
        (root / "rec" / "index.py").write_text(RECORD)
        out = root / "out.txt"
        lines = [
            "[daemon]",
            'database_url = "${DATABASE_URL}"',
            'replica = "${REPLICA}"',
            'log_level = "warning"',
            "[functions.rec]",
            'code = "rec"',
            "concurrency = 8",
            f'environment = {{ OUT = "{out}" }}',
        ]
        for i in range(n):
            lines += [
                f"[triggers.t{i}]",
                'type = "timer"',
                'function = "rec"',
                'cron = "* * * * * * *"',
            ]
        (root / "bridge.toml").write_text("\n".join(lines) + "\n")
        procs = []
        for r in names:
            (root / r).mkdir()
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "REPLICA": r,
                "STATE_DIRECTORY": str(root / r),
            }
            log = open(root / f"{r}.log", "w")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [exe, "run", "-c", str(root / "bridge.toml")], env=env, stderr=log, stdout=log
                )
            )
        deadline = time.time() + 180
        for r in names:  # every replica is ready (its timers connected): ask each one
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "REPLICA": r,
                "STATE_DIRECTORY": str(root / r),
            }
            while time.time() < deadline:
                st = subprocess.run(
                    [exe, "status", "--json", "-c", str(root / "bridge.toml")],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if st.returncode == 0 and json.loads(st.stdout).get("ready"):
                    break
                time.sleep(0.5)
        start = int(time.time()) + 3  # the window opens once their timers run
        end = start + int(duration)
        time.sleep(end - time.time() + 3)  # the last ticks of the window are accepted
        # then every replica's timers reach the window's end (replicas behind fire late ticks
        # rather than skip them) and the queue drains: every accepted tick runs (the lag says
        # how far behind)
        last = datetime.fromtimestamp(end - 1, UTC)
        with psycopg.connect(url, autocommit=True) as c:
            while time.time() < end + 300:
                row = c.execute(
                    "SELECT count(*) FROM timer_state WHERE last_fire >= %s", (last,)
                ).fetchone()
                if row and row[0] == n:
                    break
                time.sleep(0.2)
            fired = time.time()
            while time.time() < end + 300:
                row = c.execute(  # the replicas go on firing: only the window's ticks
                    "SELECT count(*) FROM async_queue WHERE accepted_at < %s", (fired,)
                ).fetchone()
                if row and row[0] == 0:
                    break
                time.sleep(0.2)
        lag = time.time() - end
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
        seen: collections.Counter[tuple[str, int]] = collections.Counter()
        for line in out.read_text().splitlines():
            name, iso = line.split()
            ts = int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
            if start <= ts < end:
                seen[(name, ts)] += 1
        expected = n * (end - start)
        dups = sum(c - 1 for c in seen.values())
        misses = expected - len(seen)
        return expected, dups, misses, lag


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--producers", type=int, default=100)
    ap.add_argument("--latency-events", type=int, default=300)
    ap.add_argument("--timers", type=int, default=1000)
    ap.add_argument(
        "--duration", type=float, default=20.0, help="timer window, seconds (60 for the full run)"
    )
    args = ap.parse_args()
    print(
        f"scale-out benchmark: {args.events} events, python no-op, concurrency 4 per replica, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STATE_DIRECTORY"] = tmp
        rate = throughput(None, 1, args.events, args.producers)
    print(f"  SQLite, 1 replica:     {rate:8,.0f} events/s accept -> complete")
    for n in (1, 2):
        name, url = create_db()
        try:
            rate = throughput(url, n, args.events, args.producers)
        finally:
            drop_db(name)
        print(
            f"  PostgreSQL, {n} replica{'s' if n > 1 else ' '}: {rate:8,.0f} events/s accept -> complete"
        )
    name, url = create_db()
    try:
        lat = a_to_b(url, args.latency_events)
    finally:
        drop_db(name)
    p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]  # noqa: E731
    print(
        f"  accepted on A, run on B: p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms ({len(lat)} events)"
    )
    name, url = create_db()
    try:
        expected, dups, misses, lag = timers(url, args.timers, args.duration)
    finally:
        drop_db(name)
    print(
        f"  3 replicas x {args.timers} timers at 1 Hz for {args.duration:.0f}s: {expected} ticks, "
        f"{dups} duplicates, {misses} misses; the queue drained {lag:.1f}s after the window"
    )


if __name__ == "__main__":
    main()
