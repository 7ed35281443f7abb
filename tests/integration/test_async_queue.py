"""The durable async queue through the real daemon and CLI: kill -9 with retries pending,
dead letters in SCF's shape, replay, purge, and `fire` / `invoke --async` as ways in."""

from __future__ import annotations

import json
from typing import Any

from .conftest import Project, cli, wait_for

FLAKY = """
import json, os

def main_handler(event, context):
    if not os.path.exists(os.environ["FIXED"]):
        raise ValueError("not fixed yet: " + json.dumps(event))
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"event": event, "request_id": context.request_id}) + "\\n")
    return "ok"
"""


def config(project: Project, attempts: int = 3, interval: str = "1s") -> Any:
    project.function("flaky", FLAKY)
    return project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"

        [functions.flaky]
        code = "functions/flaky"
        concurrency = 2
        environment = {{ OUT = "@OUT@", FIXED = "{project.root / "FIXED"}" }}
        [functions.flaky.async]
        retry_attempts = {attempts}
        retry_interval = "{interval}"

        [triggers.nightly]
        type = "timer"
        function = "flaky"
        cron = "0 0 3 * * * *"
        """
    )


def dead_letters(cfg: Any, *extra: str) -> list[dict[str, Any]]:
    r = cli("dlq", "list", "--json", "-c", str(cfg), *extra)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def submit(cfg: Any, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = cli("invoke", "flaky", "--async", "-c", str(cfg), "--event", json.dumps({"n": i}))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["accepted"] is True
        ids.append(out["RequestId"])
    return ids


def test_kill_9_with_pending_retries_loses_nothing(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    cfg = config(project, attempts=3, interval="1s")
    # Given 5 accepted events whose function keeps failing
    ids = submit(cfg, 5)
    d = daemon(cfg)
    d.wait_log(r"retry 2 of ", count=5, timeout=60)
    # When the daemon is killed -9 while their retries are pending
    d.kill()
    assert dead_letters(cfg) == []
    # Then a new daemon resumes every one of them and dead-letters each after 3 retries
    d2 = daemon(cfg)
    dls = wait_for(
        lambda: len(x := dead_letters(cfg)) == 5 and x, timeout=60, what="5 dead letters"
    )
    assert d2.stop() == 0
    assert sorted(r["RequestId"] for r in dls) == sorted(ids)
    for r in dls:
        assert r["Body"]["RetryNum"] == 3 and r["Attempts"] == 4
        assert r["ErrorClass"] == "function_error"
        assert r["ErrorMessage"].startswith("ValueError: not fixed yet")
        assert "Traceback" in r["ErrorDetail"]
        assert r["Body"]["RequestSource"] == "API" and r["Body"]["InvocationType"] == "Event"
    assert sorted(json.loads(r["Body"]["ClientContext"])["n"] for r in dls) == [0, 1, 2, 3, 4]


def test_replay_delivers_and_empties_the_dlq(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    cfg = config(project, attempts=0)
    ids = submit(cfg, 3)
    d = daemon(cfg)
    wait_for(lambda: len(dead_letters(cfg)) == 3, what="3 dead letters")
    one = dead_letters(cfg)[0]["RequestId"]
    shown = cli("dlq", "show", one, "-c", str(cfg))
    assert shown.returncode == 0 and json.loads(shown.stdout)["RequestId"] == one
    human = cli("dlq", "list", "-c", str(cfg))
    assert human.stdout.count("function_error") == 3 and "3 dead letters" in human.stderr
    # When the function is fixed and the dead letters replayed
    (project.root / "FIXED").touch()
    r = cli("dlq", "replay", "--id", one, "-c", str(cfg))
    assert r.returncode == 0 and "requeued 1 dead letter" in r.stdout
    wait_for(lambda: len(project.records()) == 1, what="the replayed event")
    assert project.records()[0]["request_id"] == one
    r = cli("dlq", "replay", "--function", "flaky", "-c", str(cfg))
    assert "requeued 2 dead letters" in r.stdout
    # Then every event is delivered, once, and the DLQ is empty
    wait_for(lambda: len(project.records()) == 3, what="all replayed events")
    assert d.stop() == 0
    assert sorted(r["request_id"] for r in project.records()) == sorted(ids)
    assert dead_letters(cfg) == []
    missing = cli("dlq", "replay", "--id", "nope", "-c", str(cfg))
    assert missing.returncode == 1 and 'no dead letter with id "nope"' in missing.stderr


def test_purge(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    cfg = config(project, attempts=0)
    submit(cfg, 2)
    d = daemon(cfg)
    wait_for(lambda: len(dead_letters(cfg)) == 2, what="2 dead letters")
    assert d.stop() == 0
    r = cli("dlq", "purge", "-c", str(cfg))
    assert r.returncode == 2 and "--all" in r.stderr
    assert (
        "purged 0 dead letters" in cli("dlq", "purge", "--older-than", "1h", "-c", str(cfg)).stdout
    )
    assert (
        "purged 2 dead letters" in cli("dlq", "purge", "--function", "flaky", "-c", str(cfg)).stdout
    )
    assert dead_letters(cfg) == []
    bad = cli("dlq", "purge", "--older-than", "soon", "-c", str(cfg))
    assert bad.returncode == 2 and "invalid duration" in bad.stderr


def test_fire_goes_through_the_queue(project: Project, daemon) -> None:  # type: ignore[no-untyped-def]
    cfg = config(project)
    (project.root / "FIXED").touch()
    # accepted while no daemon runs: delivered once one starts
    r = cli("fire", "nightly", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    rid = json.loads(r.stdout)["RequestId"]
    d = daemon(cfg)
    wait_for(lambda: len(project.records()) == 1, what="the fired event")
    rec = project.records()[0]
    assert rec["request_id"] == rid
    assert rec["event"]["Type"] == "Timer" and rec["event"]["TriggerName"] == "nightly"
    # and while it runs
    cli("fire", "nightly", "-c", str(cfg))
    wait_for(lambda: len(project.records()) == 2, what="the second fired event")
    assert d.stop() == 0


def test_async_invoke_of_unknown_function_or_huge_event_is_refused(project: Project) -> None:
    cfg = config(project)
    big = json.dumps({"x": "a" * 140_000})
    r = cli("invoke", "flaky", "--async", "-c", str(cfg), "--event", "-", input=big)
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["errorClass"] == "invalid_request" and "131072" in err["errorMessage"]
