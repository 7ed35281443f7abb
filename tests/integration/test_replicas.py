"""Several replicas on one PostgreSQL database, as separate ``event-bridge run`` processes
(docs/scale-out.md): every timer tick accepted once through a kill -9, a dead replica's
leased event run by another, the CLI working from any host against the shared database."""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DaemonProcess, Project, cli, wait_for
from tests.pg_fixtures import query

pytestmark = pytest.mark.integration

RECORDER = """
import json, os, time

def main_handler(event, context):
    rec = {"event": event, "request_id": context.request_id, "replica": os.environ["REPLICA"],
           "t": time.time()}
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps(rec) + "\\n")
    return "ok"
"""

# On replica "a": the first attempt fails, the second hangs (until a is killed); elsewhere it
# succeeds. Every attempt is recorded.
FLAKY = """
import json, os, time

def main_handler(event, context):
    me = os.environ["REPLICA"]
    marker = os.environ["OUT"] + ".failed"
    first = not os.path.exists(marker)
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"request_id": context.request_id, "replica": me,
                            "what": "fail" if me == "a" and first else
                                    "hang" if me == "a" else "done"}) + "\\n")
    if me == "a":
        if first:
            open(marker, "w").close()
            raise RuntimeError("first attempt fails")
        time.sleep(120)
    return "ok"
"""


def replica_env(project: Project, url: str, name: str) -> dict[str, str]:
    state = project.root / f"state-{name}"
    state.mkdir(exist_ok=True)
    return {
        "DATABASE_URL": url,
        "REPLICA": name,
        "STATE_DIRECTORY": str(state),
        "OUT": str(project.out),
    }


def start(daemon: Callable[..., DaemonProcess], config: Path, env: dict[str, str]) -> DaemonProcess:
    d: DaemonProcess = daemon(config, **env)
    d.wait_log(r"ready", timeout=30)
    return d


def test_three_replicas_fire_every_tick_once_through_a_kill_9(
    pg_url: str, pg_db: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given three replicas on one database, with an every-second timer
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
        concurrency = 2
        [triggers.tick]
        type = "timer"
        function = "rec"
        cron = "* * * * * * *"
        """
    )
    reps = {n: start(daemon, config, replica_env(project, pg_url, n)) for n in "abc"}
    t_all = time.time()  # from here on three replicas fire every tick

    # When one of them is killed -9 after a few ticks, and the others run on
    def ticks_after(t0: float) -> int:
        return sum(1 for t in ticks(project) if epoch(t) > t0)

    wait_for(lambda: ticks_after(t_all) >= 4, 20, "4 ticks")
    os.kill(reps["b"].proc.pid, signal.SIGKILL)
    reps["b"].proc.wait()
    t_kill = time.time()
    wait_for(lambda: ticks_after(t_kill + 1) >= 10, 30, "10 ticks after the kill")
    # the status of a live replica lists all three; b stops answering
    st = json.loads(
        cli("status", "--json", "-c", str(config), env=replica_env(project, pg_url, "a")).stdout
    )
    names = {r["name"]: r for r in st["replicas"]}
    assert {"a", "c"} <= set(names) and names["a"]["alive"] and names["c"]["alive"]
    for n in "ac":
        reps[n].stop()
    t_end = time.time()

    # Then every tick from when all three ran to the end was accepted once (one request id)
    # and run; a run repeated with the same request id can only be b's last one, cut by kill
    by_time = ticks(project)
    window = [t for t in by_time if t_all + 1 <= epoch(t) <= t_end - 2]
    assert len(window) >= 10
    for t in window:
        assert len(by_time[t]) == 1, f"tick {t} accepted {len(by_time[t])} times"
    seconds = sorted(int(epoch(t)) for t in window)
    assert seconds == list(range(seconds[0], seconds[-1] + 1)), "a tick was missed"
    runs = collections.Counter(r["request_id"] for r in project.records())
    assert sum(n - 1 for n in runs.values()) <= 1
    # ticks were fired by more than one replica (shared work), and a and c went on after b died
    after = {r["replica"] for r in project.records() if r["t"] > t_kill + 1}
    assert after <= {"a", "c"} and after


def ticks(project: Project) -> dict[str, set[str]]:
    out: dict[str, set[str]] = collections.defaultdict(set)
    for r in project.records():
        if isinstance(r.get("event"), dict) and "Time" in r["event"]:
            out[r["event"]["Time"]].add(r["request_id"])
    return out


def epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_an_event_retried_on_a_replica_that_dies_is_run_by_another(
    pg_url: str, pg_db: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given replica a alone, and an event accepted from the CLI on another "host"
    project.function("flaky", FLAKY)
    config = project.config(
        """
        [daemon]
        database_url = "${DATABASE_URL}"
        replica = "${REPLICA}"
        takeover = "3s"
        [functions.flaky]
        runtime = "python"
        code = "functions/flaky"
        timeout = "300s"
        environment = { OUT = "@OUT@", REPLICA = "${REPLICA}" }
        [functions.flaky.async]
        retry_attempts = 2
        retry_interval = "1s"
        """
    )
    a = start(daemon, config, replica_env(project, pg_url, "a"))
    cli_env = replica_env(project, pg_url, "cli")
    r = cli("invoke", "flaky", "--async", "-e", '{"n": 1}', "-c", str(config), env=cli_env)
    assert r.returncode == 0, r.stderr
    request_id = r.stdout.strip().split()[-1].strip('"')

    # When its first attempt fails on a, the retry hangs on a, and a is killed -9
    wait_for(lambda: [x for x in project.records() if x["what"] == "hang"], 30, "a's retry")
    leased = query(pg_db, "SELECT lease_owner FROM async_queue")
    assert len(leased) == 1 and leased[0][0] is not None
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    b = start(daemon, config, replica_env(project, pg_url, "b"))

    # Then b takes the event over once a's heartbeat is stale and runs it
    done = wait_for(
        lambda: [x for x in project.records() if x["what"] == "done"], 30, "the run on b"
    )
    assert done[0]["replica"] == "b"
    assert {x["request_id"] for x in project.records()} == {done[0]["request_id"]}
    assert request_id in r.stdout
    wait_for(lambda: not query(pg_db, "SELECT id FROM async_queue"), 10, "the row removed")
    b.stop()


def test_dead_letters_are_shared_and_replayed_from_any_host(
    pg_url: str, pg_db: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    project.function("rec", RECORDER.replace('return "ok"', 'raise ValueError("no")'))
    config = project.config(
        """
        [daemon]
        database_url = "${DATABASE_URL}"
        replica = "${REPLICA}"
        [functions.rec]
        runtime = "python"
        code = "functions/rec"
        environment = { OUT = "@OUT@", REPLICA = "${REPLICA}" }
        [functions.rec.async]
        retry_attempts = 0
        """
    )
    a = start(daemon, config, replica_env(project, pg_url, "a"))
    other = replica_env(project, pg_url, "elsewhere")
    assert cli("invoke", "rec", "--async", "-c", str(config), env=other).returncode == 0

    def listed() -> list[Any]:
        out = cli("dlq", "list", "--json", "-c", str(config), env=other)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    [dl] = wait_for(listed, 30, "the dead letter, seen from another host")
    r = cli("dlq", "replay", "--id", dl["RequestId"], "-c", str(config), env=other)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(project.records()) == 2, 30, "the replayed run")
    a.stop()
    # the password of a URL never shows: a bad one is reported without it
    bad = cli(
        "dlq",
        "list",
        "-c",
        str(config),
        env={**other, "DATABASE_URL": pg_url.replace("postgres@", "postgres:s3cretpw@") + "x"},
    )
    assert bad.returncode != 0 and "s3cretpw" not in bad.stderr + bad.stdout
