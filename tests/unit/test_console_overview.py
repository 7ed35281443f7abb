"""The console's overview page lists the replicas sharing a PostgreSQL database (and none on
SQLite, whose status has no replicas)."""

from __future__ import annotations

import types
from typing import Any

from bridge.console import PREFIX, Console


def render(status: dict[str, Any], triggers: list[dict[str, Any]] | None = None) -> str:
    daemon = types.SimpleNamespace(state=types.SimpleNamespace(value="running"))
    console = Console(daemon, [])  # type: ignore[arg-type]
    return console.env.get_template("overview.html").render(
        session=None,
        version="test",
        state="running",
        prefix=PREFIX,
        daemon=status,
        functions=[],
        triggers=triggers or [],
        window_min=15,
    )


STATUS: dict[str, Any] = {
    "state": "running",
    "ready": True,
    "version": "test",
    "uptime_s": 12.0,
    "in_flight": 0,
    "queue": {"depth": 0, "oldest_accepted": None},
    "dead_letters": 0,
}


def test_replicas_are_listed_with_their_heartbeat_and_leases() -> None:
    replicas = [
        {"name": "web-1", "host": "h1", "last_heartbeat": "2026-11-30T13:00:00Z",
         "heartbeat_age_s": 1.2, "alive": True, "leases": 3, "self": True},
        {"name": "web-2", "host": "h2", "last_heartbeat": "2026-11-30T12:59:00Z",
         "heartbeat_age_s": 61.0, "alive": False, "leases": 0, "self": False},
    ]  # fmt: skip
    html = render({**STATUS, "replicas": replicas})
    assert 'id="replicas"' in html
    assert "web-1" in html and "(this one)" in html and "web-2" in html
    assert "not answering" in html and ">3<" in html


def test_a_single_sqlite_daemon_shows_no_replica_table() -> None:
    assert 'id="replicas"' not in render(STATUS)


def _trigger(name: str, **st: Any) -> dict[str, Any]:
    base = {"type": "kafka", "function": "f", "enabled": True, "connected": False}
    return {"name": name, **base, **st, "lag": None, "last_event": None, "next_fires": []}


def test_a_trigger_that_is_not_run_says_why_and_a_disabled_one_is_disabled() -> None:
    why = "trigger type plugin \"mqtt\" failed to load: No module named 'paho'"
    html = render(
        STATUS,
        [
            _trigger("sensors", not_run=why),
            _trigger("queue", enabled=False, not_run='disabled; a CMQ topic "t" is not bound'),
            _trigger("orders"),
        ],
    )
    rows = {r.split("</td>")[0].split("<td>")[-1]: r for r in html.split("<tr>")[1:]}
    assert ">not run</span>" in rows["sensors"] and "paho" in rows["sensors"]
    assert ">disabled</span>" in rows["queue"] and "not run" not in rows["queue"].split("title")[0]
    assert ">disconnected</span>" in rows["orders"]
