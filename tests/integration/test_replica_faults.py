"""Replicas on PostgreSQL through faults (docs/scale-out.md, "Faults"): every connection
terminated, the server restarted, the network cut for 30 s, a database with an older schema
and one with a newer schema, and two hosts whose clocks are 5 s apart. Each time the
replicas keep running and resume within 10 s, without a process restart."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.integration.conftest import DaemonProcess, Project, cli, wait_for
from tests.integration.test_replicas import RECORDER, epoch, replica_env, start, ticks
from tests.pg_server import PrivateServer, Proxy

pytestmark = pytest.mark.integration

CONFIG = """
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
"""


@pytest.fixture
def server() -> Iterator[PrivateServer]:
    s = PrivateServer()
    try:
        s.start()
        with psycopg.connect(s.url(), autocommit=True) as c:
            c.execute("CREATE DATABASE bridge")
        yield s
    finally:
        s.close()


def two_replicas(
    project: Project, daemon: Callable[..., DaemonProcess], url: str
) -> tuple[Path, dict[str, DaemonProcess]]:
    project.function("rec", RECORDER)
    config = project.config(CONFIG)
    return config, {n: start(daemon, config, replica_env(project, url, n)) for n in "ab"}


def resumes(project: Project, t0: float, within: float = 10.0) -> None:
    """A tick due after ``t0`` runs, and an event accepted from the CLI runs, within ``within``."""
    wait_for(
        lambda: any(epoch(t) > t0 for t in ticks(project)), within + 1, "a tick after the fault"
    )


def exactly_once(project: Project) -> None:
    for t, ids in ticks(project).items():
        assert len(ids) == 1, f"tick {t} accepted {len(ids)} times"


def test_every_connection_terminated(
    pg_url: str, pg_db: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    config, reps = two_replicas(project, daemon, pg_url)
    wait_for(lambda: len(ticks(project)) >= 2, 20, "ticks")
    # When every connection of the replicas (pool and LISTEN) is terminated
    with psycopg.connect(pg_url, autocommit=True) as c:
        n = c.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (pg_db,),
        ).fetchone()
    assert n and n[0] >= 4
    t0 = time.time()
    # Then they keep running, and ticks are accepted again within 10 s
    resumes(project, t0)
    env = replica_env(project, pg_url, "cli")
    r = cli("invoke", "rec", "--async", "-e", '{"x": 1}', "-c", str(config), env=env)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any(x["event"] == {"x": 1} for x in project.records()), 10, "the event")
    assert all(d.proc.poll() is None for d in reps.values())
    exactly_once(project)


def test_server_restarted(
    server: PrivateServer, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    _, reps = two_replicas(project, daemon, server.url("bridge"))
    wait_for(lambda: len(ticks(project)) >= 2, 20, "ticks")
    # When the server goes down hard and comes back 3 s later
    server.stop()
    time.sleep(3)  # the outage itself (not a wait for a condition)
    server.start()
    t0 = time.time()
    # Then ticks flow again within 10 s, the processes never restarted
    resumes(project, t0)
    assert all(d.proc.poll() is None for d in reps.values())
    exactly_once(project)


def test_network_cut_for_30s(
    server: PrivateServer, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    proxy = Proxy(server.port)
    try:
        _, reps = two_replicas(project, daemon, server.url("bridge", proxy.port))
        wait_for(lambda: len(ticks(project)) >= 2, 20, "ticks")
        # When the path to the database moves nothing for 30 s
        proxy.cut()
        time.sleep(30)  # the outage itself
        proxy.restore()
        t0 = time.time()
        # Then both replicas are still running and ticks flow again within 10 s
        resumes(project, t0)
        assert all(d.proc.poll() is None for d in reps.values())
        exactly_once(project)
        for d in reps.values():
            d.stop()
    finally:
        proxy.close()


def test_hosts_with_clocks_5s_apart_fire_each_tick_once_on_time(
    pg_url: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    # Given two replicas whose host clocks are 2.5 s fast and 2.5 s slow (a test hook shifts
    # what the replica reads as the host clock)
    project.function("rec", RECORDER)
    config = project.config(CONFIG)
    reps = {}
    for n, offset in (("a", "2.5"), ("b", "-2.5")):
        env = {**replica_env(project, pg_url, n), "EVENT_BRIDGE_TEST_CLOCK_OFFSET_S": offset}
        reps[n] = start(daemon, config, env)
    wait_for(lambda: len(ticks(project)) >= 8, 20, "8 ticks")
    for d in reps.values():
        d.stop()
    # Then each tick was accepted once, and ran after its time by the database clock (a
    # replica firing by its own fast clock would run it 2.5 s early)
    exactly_once(project)
    early = [r for r in project.records() if r["t"] < epoch(r["event"]["Time"]) - 0.5]
    assert not early, early
    assert collections.Counter(r["replica"] for r in project.records())


def test_older_schema_is_migrated_and_newer_refused(
    pg_url: str, pg_db: str, project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    from bridge.pgschema import MIGRATIONS, SCHEMA_VERSION

    # Given a database at schema version 1 (an older release)
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        c.execute(MIGRATIONS[0][1])
        c.execute("INSERT INTO schema_version (version) VALUES (1)")
    project.function("rec", RECORDER)
    config = project.config(CONFIG)
    env = replica_env(project, pg_url, "a")
    # `db migrate` brings it up to date ahead of the replicas
    r = cli("db", "migrate", "-c", str(config), env=env)
    assert r.returncode == 0 and f"from version 1 to {SCHEMA_VERSION}" in r.stdout, r.stderr
    assert "is current" in cli("db", "migrate", "-c", str(config), env=env).stdout
    a = start(daemon, config, env)
    wait_for(lambda: ticks(project), 20, "a tick")
    a.stop()
    # A database migrated by a newer release is refused with a clear message
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    d = daemon(config, **env)
    assert d.wait(30) != 0
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this event-bridge knows" in d.log()
