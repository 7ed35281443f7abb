"""Replicas on PostgreSQL, as separate ``event-bridge run`` processes (docs/scale-out.md):
a replica killed -9 while it holds claimed events, timer ticks missed while every replica was
down, ``status`` on a host where no daemon runs, and a host whose clock is a minute off."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import DaemonProcess, Project, cli, wait_for
from tests.integration.test_replicas import RECORDER, epoch, replica_env, start, ticks
from tests.pg_fixtures import query

pytestmark = pytest.mark.integration

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

# Each run is recorded when it starts and when it ends; the monotonic clock is the same for
# every process on the host (and libfaketime leaves it alone).
WORK = """
import json, os, time

def record(what, context):
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"request_id": context.request_id, "replica": os.environ["REPLICA"],
                            "what": what, "mono": time.monotonic()}) + "\\n")

def main_handler(event, context):
    record("start", context)
    if event.get("fail_first") and not os.path.exists(os.environ["OUT"] + ".failed"):
        open(os.environ["OUT"] + ".failed", "w").close()
        raise RuntimeError("the first attempt fails")
    if event.get("hold"):  # until the test lets it go
        deadline = time.monotonic() + 60
        while not os.path.exists(os.environ["OUT"] + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(event.get("sleep", 0))
    record("done", context)
    return "ok"
"""

CONFIG = """
[daemon]
database_url = "${DATABASE_URL}"
replica = "${REPLICA}"
takeover = "3s"
[functions.work]
runtime = "python"
code = "functions/work"
concurrency = 4
timeout = "90s"
environment = { OUT = "@OUT@", REPLICA = "${REPLICA}" }
[functions.work.async]
retry_attempts = 1
retry_interval = "8s"
"""


def enqueue(url: str, events: list[dict[str, object]]) -> list[str]:
    """Accept ``events`` into the shared queue as ``invoke --async`` does (one transaction)."""
    from bridge.pgstore import PgStore
    from bridge.queue import new_item

    async def run() -> list[str]:
        store = PgStore(url)
        await store.open()
        try:
            items = [new_item("work", e, now=store.time()) for e in events]
            await store.enqueue(items)
            return [i.id for i in items]
        finally:
            await store.close()

    return asyncio.run(run())


def runs(project: Project, what: str = "start") -> collections.Counter[str]:
    return collections.Counter(r["request_id"] for r in project.records() if r["what"] == what)


def test_a_replica_killed_during_claims_loses_no_event(
    pg_url: str, pg_db: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given three replicas sharing a queue of 300 events (each runs 50 ms; a replica claims
    # up to 72 at a time, so each holds many claimed events that wait for room)
    project.function("work", WORK)
    config = project.config(CONFIG)
    reps = {n: start(daemon, config, replica_env(project, pg_url, n)) for n in "abc"}
    [(owner_a,)] = query(pg_db, "SELECT owner FROM replicas WHERE name = 'a'")
    ids = enqueue(pg_url, [{"n": i, "sleep": 0.05} for i in range(300)])

    # When a is killed -9 while it runs some and holds more
    wait_for(lambda: sum(1 for r in project.records() if r["replica"] == "a") >= 4, 30, "runs on a")
    os.kill(reps["a"].proc.pid, signal.SIGKILL)
    reps["a"].proc.wait()
    t_kill = time.monotonic()
    in_flight = {r[0] for r in query(pg_db, "SELECT id FROM async_queue WHERE lease_owner = %s", (owner_a,))}  # fmt: skip
    assert in_flight, "a held no claimed event when it was killed"

    # Then the others take a's claims over within `takeover` (3 s) ...
    wait_for(
        lambda: not query(pg_db, "SELECT 1 FROM async_queue WHERE lease_owner = %s", (owner_a,)),
        3.0 - (time.monotonic() - t_kill),
        "a's claims released",
    )
    # ... and every event runs to its end, none lost
    wait_for(lambda: not query(pg_db, "SELECT 1 FROM async_queue"), 60, "the queue drained")
    done = runs(project, "done")
    assert set(ids) <= set(done), f"{len(set(ids) - set(done))} events never ran"
    # an event ran twice only if a held it when it died; each of those ran again on b or c
    started = runs(project)
    twice = {i for i, n in started.items() if n > 1}
    assert twice <= in_flight, twice - in_flight
    assert all(n <= 2 for n in started.values())
    again = {r["request_id"] for r in project.records() if r["replica"] != "a"}
    assert in_flight <= again
    for n in "bc":
        reps[n].stop()


def test_ticks_missed_while_every_replica_was_down_fire_once(
    pg_url: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given two replicas with an every-second timer whose missed ticks are all fired
    project.function("rec", RECORDER)
    config = project.config(
        """
        [daemon]
        database_url = "${DATABASE_URL}"
        replica = "${REPLICA}"
        takeover = "3s"
        [functions.rec]
        runtime = "python"
        code = "functions/rec"
        environment = { OUT = "@OUT@", REPLICA = "${REPLICA}" }
        [triggers.tick]
        type = "timer"
        function = "rec"
        cron = "* * * * * * *"
        catchup = "all"
        """
    )
    envs = {n: replica_env(project, pg_url, n) for n in "ab"}
    reps = {n: start(daemon, config, envs[n]) for n in "ab"}
    wait_for(lambda: len(ticks(project)) >= 3, 20, "3 ticks")

    # When both go down (one stopped, one killed -9) for 5 s and come back
    reps["a"].stop()
    os.kill(reps["b"].proc.pid, signal.SIGKILL)
    reps["b"].proc.wait()
    t_down = time.time()
    time.sleep(5)  # the downtime itself: ticks fall due with no replica running
    t_up = time.time()
    reps = {n: start(daemon, config, envs[n]) for n in "ab"}
    wait_for(lambda: any(epoch(t) > t_up + 2 for t in ticks(project)), 20, "ticks after")
    for d in reps.values():
        d.stop()

    # Then every second from the first tick to the last was fired, each once, whichever
    # replica fired it; the ones missed during the downtime ran after the replicas came back
    by_time = ticks(project)
    seconds = sorted(int(epoch(t)) for t in by_time)
    assert seconds == list(range(seconds[0], seconds[-1] + 1)), "a tick is missing"
    assert all(len(ids) == 1 for ids in by_time.values()), by_time
    missed = [t for t in by_time if t_down + 1 < epoch(t) < t_up - 1]
    assert len(missed) >= 3
    ran = {r["event"]["Time"]: r["t"] for r in project.records()}
    assert all(ran[t] > t_up for t in missed)


def test_status_without_a_local_daemon_lists_the_replicas(
    pg_url: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given replica a running an event it holds
    project.function("work", WORK)
    config = project.config(CONFIG)
    a = start(daemon, config, replica_env(project, pg_url, "a"))
    enqueue(pg_url, [{"hold": True}])
    wait_for(lambda: runs(project), 30, "the run on a")

    # When status is asked on a host with no daemon (its own state directory)
    elsewhere = replica_env(project, pg_url, "elsewhere")
    r = cli("status", "--json", "-c", str(config), env=elsewhere)
    text = cli("status", "-c", str(config), env=elsewhere)
    Path(str(project.out) + ".go").touch()

    # Then the replicas come from the shared database: name, host, heartbeat, leases held
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    [rep] = body["replicas"]
    assert (rep["name"], rep["host"], rep["leases"], rep["alive"]) == ("a", socket.gethostname(), 1, True)  # fmt: skip
    assert abs(epoch(rep["last_heartbeat"]) - time.time()) < 5
    assert body["queue"]["depth"] == 1 and body["state"] == "no daemon on this host"
    assert text.returncode == 0, text.stderr
    assert "no daemon on this host" in text.stdout
    assert f"replica  a{' ' * 19} {socket.gethostname()}" in text.stdout
    assert "leases 1" in text.stdout
    wait_for(lambda: runs(project, "done"), 30, "the run's end")
    a.stop()
    # with no database configured, status still says no daemon runs here
    plain = project.config('[functions.work]\nruntime = "python"\ncode = "functions/work"\n', "plain.toml")  # fmt: skip
    r = cli("status", "-c", str(plain), env=elsewhere)
    assert r.returncode != 0 and "no event-bridge daemon is running" in r.stderr


def test_a_host_clock_a_minute_off_neither_holds_back_nor_hurries_events(
    pg_url: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    assert FAKETIME.exists(), "this test needs Debian's faketime (make services)"
    ahead = {
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME": "+60",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    project.function("work", WORK)
    config = project.config(CONFIG)
    # Given replica b on a right clock, and an event accepted on a host a minute ahead
    b = start(daemon, config, replica_env(project, pg_url, "b"))
    r = cli(
        "invoke", "work", "--async", "-e", '{"fail_first": true}', "-c", str(config),
        env={**replica_env(project, pg_url, "cli"), **ahead},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # Then b runs it at once (by that host's clock it is due a minute from now)
    wait_for(lambda: runs(project), 15, "the first attempt, on b")
    b.stop()  # its retry is due 8 s after the failure, by the database clock

    # When replica a, a minute ahead, is the one left
    a = start(daemon, config, {**replica_env(project, pg_url, "a"), **ahead})
    [second] = wait_for(
        lambda: [x for x in project.records() if x["what"] == "done"], 30, "the retry"
    )
    a.stop()
    # Then a ran the retry when it was due, not at once (by a's clock it was long due)
    [first] = [x for x in project.records() if x["what"] == "start" and x["replica"] == "b"]
    assert second["replica"] == "a"
    assert second["mono"] - first["mono"] >= 7.5, second["mono"] - first["mono"]


def test_an_event_queued_by_another_host_wakes_a_replica_at_once(
    pg_url: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given a replica that polls only every 60 s, idle after a claim that found nothing
    project.function("work", WORK)
    config = project.config(
        CONFIG.replace('takeover = "3s"', 'takeover = "3s"\nqueue_poll = "60s"')
    )
    b = start(daemon, config, replica_env(project, pg_url, "b"))
    # When other hosts queue events one after the other
    for _ in range(3):
        enqueue(pg_url, [{}])
    # Then each runs at once, woken by the NOTIFY, not by the poll
    wait_for(lambda: len(runs(project, "done")) == 3, 15, "the 3 events run")
    b.stop()
