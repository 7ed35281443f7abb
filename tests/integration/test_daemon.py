"""The real daemon as a subprocess: timers end to end, catch-up after downtime, throttling at
reserved concurrency, draining on SIGTERM, and surviving failing events."""

from __future__ import annotations

import asyncio
import itertools
import re
from datetime import UTC, datetime, timedelta

from bridge.store import SqliteStore

from .conftest import Project, wait_for

BASE = """
[daemon]
state_dir = "state"

[functions.rec]
code = "functions/rec"
concurrency = 4
environment = { OUT = "@OUT@" }
"""


def _time(rec: dict) -> datetime:  # type: ignore[type-arg]
    return datetime.strptime(rec["event"]["Time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_timer_fires_scf_events_every_second(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    project.function("rec")
    cfg = project.config(
        BASE
        + '[triggers.tick]\ntype = "timer"\nfunction = "rec"\ncron = "* * * * * * *"\nmessage = "hi"\n'
    )
    d = daemon(cfg)
    d.wait_log(r"ready: 1 functions, 1 triggers running")
    recs = wait_for(
        lambda: len(project.records()) >= 3 and project.records(), what="3 timer events"
    )
    assert d.stop() == 0
    for r in recs:
        assert set(r["event"]) == {"Type", "TriggerName", "Time", "Message"}
        assert (
            r["event"]["Type"] == "Timer"
            and r["event"]["TriggerName"] == "tick"
            and r["event"]["Message"] == "hi"
        )
        # delivered within a second of its scheduled time
        assert 0 <= r["start"] - _time(r).timestamp() < 1.0
    times = sorted(_time(r) for r in recs)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times))
    log = d.log()
    assert "START RequestId:" in log and "REPORT RequestId:" in log


def _seed_last_fire(project: Project, trigger: str, when: datetime) -> None:
    async def seed() -> None:
        store = SqliteStore(project.root / "state")
        await store.open()
        await store.set_last_fire(trigger, when)
        await store.close()

    asyncio.run(seed())


def _catchup(project: Project, daemon, mode: str) -> tuple[datetime, list[datetime], str]:  # type: ignore[no-untyped-def]
    project.function("rec")
    cfg = project.config(
        BASE
        + f'[triggers.tick]\ntype = "timer"\nfunction = "rec"\ncron = "*/2 * * * * * *"\ncatchup = "{mode}"\n'
    )
    # Given the daemon was last fired 20 s ago (10 ticks of "every 2 s" were missed)
    now = datetime.now(UTC).replace(microsecond=0)
    _seed_last_fire(project, "tick", now - timedelta(seconds=20))
    d = daemon(cfg)
    d.wait_log("ready:")
    # When it has run long enough for one live tick
    wait_for(lambda: any(_time(r) > now for r in project.records()), what="a live tick")
    assert d.stop() == 0
    return now, sorted(_time(r) for r in project.records()), d.log()


def test_catchup_all_replays_every_missed_tick(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    now, times, _ = _catchup(project, daemon, "all")
    last = now - timedelta(seconds=20)
    expected = [last + timedelta(seconds=s) for s in range(1, 21) if (last.second + s) % 2 == 0]
    # every tick of "every 2 s" in the 20 s gap, oldest first, each once
    assert [t for t in times if t <= now] == expected
    assert len(set(times)) == len(times)


def test_catchup_once_fires_the_latest_missed_tick(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    now, times, log = _catchup(project, daemon, "once")
    # the catch-up tick the daemon chose at connect (however late it started): the latest
    # missed one, so at least the last "every 2 s" tick before `now`
    found = re.search(r"firing 1 missed tick\(s\) from (\S+) to \1 \(catchup = once\)", log)
    assert found is not None, log
    tick = datetime.fromisoformat(found.group(1))
    assert tick >= now - timedelta(seconds=2)
    # fired once, and nothing older than it: the rest are live ticks
    assert times.count(tick) == 1 and min(times) == tick


def test_catchup_skip_fires_nothing_old(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    now, times, log = _catchup(project, daemon, "skip")
    # only live ticks, all after the daemon connected (which is after `now`)
    assert [t for t in times if t <= now] == []
    assert "missed tick" not in log


def test_reserved_concurrency_caps_parallelism_and_queues_the_rest(
    project: Project, daemon
) -> None:  # type: ignore[no-untyped-def]
    # Given a function with concurrency 1 whose handler takes 1.5 s, fired every second by 2 timers
    project.function("rec")
    cfg = project.config(
        BASE.replace("concurrency = 4", "concurrency = 1").replace(
            'OUT = "@OUT@"', 'OUT = "@OUT@", DELAY = "1.5"'
        )
        + '[triggers.a]\ntype = "timer"\nfunction = "rec"\ncron = "* * * * * * *"\n'
        + '[triggers.b]\ntype = "timer"\nfunction = "rec"\ncron = "* * * * * * *"\n'
    )
    d = daemon(cfg)
    wait_for(lambda: len(project.records()) >= 3, what="3 completed invocations")
    assert d.stop() == 0
    # Then the function never ran two invocations at once: the rest waited in the durable
    # queue (accepted, not throttled away) — async events beyond the reservation are kept
    spans = sorted((r["start"], r["end"]) for r in project.records())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert {r["event"]["TriggerName"] for r in project.records()} <= {"a", "b"}


def test_sigterm_drains_in_flight_invocations(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    project.function("rec")
    cfg = project.config(
        BASE.replace('OUT = "@OUT@"', 'OUT = "@OUT@", DELAY = "2"')
        + '[triggers.tick]\ntype = "timer"\nfunction = "rec"\ncron = "* * * * * * *"\n'
    )
    d = daemon(cfg)
    d.wait_log("START RequestId")
    # When SIGTERM arrives while an invocation is running, it finishes before the exit
    started = d.log().count("START RequestId")
    assert d.stop() == 0
    assert len(project.records()) >= started
    assert "stopped" in d.log()


def test_failing_events_do_not_stop_the_daemon(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    project.function("rec")
    cfg = project.config(
        BASE
        + '[triggers.bad]\ntype = "timer"\nfunction = "rec"\ncron = "* * * * * * *"\nmessage = "fail"\n'
        + '[triggers.good]\ntype = "timer"\nfunction = "rec"\ncron = "* * * * * * *"\nmessage = "ok"\n'
    )
    d = daemon(cfg)
    d.wait_log(r"rec failed \(function_error\): ValueError: asked to fail", count=3)
    wait_for(lambda: len(project.records()) >= 3, what="good events")
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert {r["event"]["Message"] for r in project.records()} == {"ok"}
