"""The ``event-bridge`` command, run for real: validate's error paths, local invoke, fire,
next (time zones, Sunday = 0, the year field), plugins and --version."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from bridge import __version__

from .conftest import Project, cli

EX_CONFIG = 78

BASE = """
[functions.rec]
code = "functions/rec"
environment = { OUT = "@OUT@" }
"""


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_validate_ok(project: Project) -> None:
    project.function("rec")
    cfg = project.config(
        BASE + '[triggers.t]\ntype = "timer"\nfunction = "rec"\ncron = "*/5 * * * * * *"\n'
    )
    r = cli("validate", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("config OK: 1 functions, 1 triggers")


def test_config_from_environment_variable(project: Project) -> None:
    project.function("rec")
    cfg = project.config(BASE)
    r = cli("validate", env={"EVENT_BRIDGE_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "[functions.rec\ncode = 1\n", ["malformed TOML", "line 1"], id="malformed-toml"
        ),
        pytest.param(
            BASE + "concurrency = 'four'\n", ["functions.rec.concurrency"], id="wrong-type"
        ),
        pytest.param(
            BASE + "colour = 'red'\n", ["functions.rec.colour: unknown key"], id="unknown-key"
        ),
        pytest.param(
            BASE + '[triggers.t]\ntype = "timer"\nfunction = "rec"\ncron = "0 61 * * * * *"\n',
            ["triggers.t.cron", "61"],
            id="bad-cron",
        ),
        pytest.param(
            BASE
            + '[triggers.t]\ntype = "timer"\nfunction = "rec"\ncron = "@daily"\ntimezone = "Asia/Atlantis"\n',
            ["triggers.t.timezone", "Asia/Atlantis"],
            id="unknown-zone",
        ),
        pytest.param(
            BASE.replace(
                'code = "functions/rec"', 'code = "functions/rec"\nhandler = "index.nope"'
            ),
            ['functions.rec.handler: handler function "nope" not found in index.py'],
            id="missing-handler",
        ),
        pytest.param(
            BASE.replace(
                'code = "functions/rec"', 'code = "functions/rec"\nhandler = "main.handler"'
            ),
            ['functions.rec.handler: entry file "main.py" not found'],
            id="missing-entry-file",
        ),
        pytest.param(
            BASE + '[triggers.t]\ntype = "timer"\nfunction = "ghost"\ncron = "@daily"\n',
            ['triggers.t.function: unknown function "ghost" (defined: rec)'],
            id="unknown-function",
        ),
        pytest.param(
            BASE + '[triggers.t]\ntype = "kafkaesque"\nfunction = "rec"\n',
            ['triggers.t.type: unknown trigger type "kafkaesque" (installed: ', "timer"],
            id="unknown-type",
        ),
        pytest.param(
            BASE + 'timeout = "901s"\n', ["functions.rec.timeout"], id="timeout-over-900s"
        ),
        pytest.param(
            BASE
            + '[triggers.t]\ntype = "timer"\nfunction = "rec"\ncron = "@daily"\nmessage = "${NOT_SET_ANYWHERE}"\n',
            ["triggers.t.message: environment variable NOT_SET_ANYWHERE is not set"],
            id="unset-variable",
        ),
        pytest.param(
            BASE
            + '[triggers.t]\ntype = "timer"\nfunction = "rec"\ncron = "@daily"\nmessage = "'
            + "x" * 4097
            + '"\n',
            ["triggers.t.message", "4096"],
            id="message-over-4k",
        ),
    ],
)
def test_validate_names_each_problem_and_exits_78(
    project: Project, text: str, expected: list[str]
) -> None:
    project.function("rec")
    cfg = project.config(text)
    r = cli("validate", "-c", str(cfg))
    assert r.returncode == EX_CONFIG, r.stdout + r.stderr
    for piece in expected:
        assert piece in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_reports_all_problems_at_once(project: Project) -> None:
    project.function("rec")
    cfg = project.config(
        BASE
        + "colour = 'red'\n"
        + '[triggers.a]\ntype = "timer"\nfunction = "rec"\ncron = "99 * * * * * *"\n'
        + '[triggers.b]\ntype = "timer"\nfunction = "ghost"\ncron = "@hourly"\n'
    )
    r = cli("validate", "-c", str(cfg))
    assert r.returncode == EX_CONFIG
    assert "(3 problems)" in r.stderr
    for loc in ("functions.rec.colour", "triggers.a.cron", "triggers.b.function"):
        assert loc in r.stderr


def test_missing_config_file_exits_78(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = cli("validate", "-c", str(tmp_path / "nope.toml"))
    assert r.returncode == EX_CONFIG
    assert "config file not found" in r.stderr


def test_run_with_bad_config_exits_78(project: Project) -> None:
    cfg = project.config("[daemon]\ntimezone = 'Nowhere/Land'\n")
    r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode == EX_CONFIG
    assert "daemon.timezone" in r.stderr


# --- local invoke ------------------------------------------------------------------------------


def test_invoke_prints_result_json_and_logs_on_stderr(project: Project) -> None:
    project.function("rec")
    cfg = project.config(BASE)
    r = cli("invoke", "-c", str(cfg), "--event", '{"hello": "world"}')
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["event"] == {"hello": "world"}
    rid = result["request_id"]
    assert f"START RequestId: {rid}" in r.stderr
    assert f"REPORT RequestId: {rid} Duration: " in r.stderr
    assert "MemUsage: " in r.stderr
    assert project.records()[0]["event"] == {"hello": "world"}


def test_invoke_event_from_file_and_stdin(project: Project) -> None:
    project.function("rec")
    cfg = project.config(BASE)
    (project.root / "ev.json").write_text('{"from": "file"}')
    r = cli("invoke", "rec", "-c", str(cfg), "--event", f"@{project.root / 'ev.json'}")
    assert json.loads(r.stdout)["event"] == {"from": "file"}
    r = cli("invoke", "rec", "-c", str(cfg), "--event", "-", input='{"from": "stdin"}')
    assert json.loads(r.stdout)["event"] == {"from": "stdin"}


def test_invoke_with_several_functions_lists_choices(project: Project) -> None:
    project.function("rec")
    project.function("other")
    cfg = project.config(BASE + '[functions.other]\ncode = "functions/other"\n')
    r = cli("invoke", "-c", str(cfg))
    assert r.returncode == 2
    assert "choices: other, rec" in r.stderr


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (
            "{not json",
            "--event is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        ("[1, 2]", "the event must be a JSON object, not list"),
    ],
)
def test_invoke_bad_event(project: Project, arg: str, message: str) -> None:
    project.function("rec")
    cfg = project.config(BASE)
    r = cli("invoke", "-c", str(cfg), "--event", arg)
    assert r.returncode == 2
    assert message in r.stderr


def test_invoke_bad_event_file_names_file_and_line(project: Project) -> None:
    project.function("rec")
    cfg = project.config(BASE)
    bad = project.root / "bad.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    r = cli("invoke", "-c", str(cfg), "--event", f"@{bad}")
    assert r.returncode == 2
    assert f"{bad} is not valid JSON" in r.stderr and "line 3 column 3" in r.stderr


HANDLERS = """
import time

def sleeper(event, context):
    time.sleep(30)

def hog(event, context):
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(16 * 1024 * 1024))
    return len(blocks)

def not_json(event, context):
    return {1, 2, 3}

def raiser(event, context):
    raise KeyError("missing-key")
"""


@pytest.mark.parametrize(
    ("handler", "extra", "error_type", "error_class", "message"),
    [
        ("sleeper", 'timeout = "1s"', "FunctionTimeout", "function_error", "timed out after 1"),
        ("hog", 'memory = "128MiB"', "OutOfMemory", "function_error", ""),
        ("not_json", "", "BadResult", "function_error", "not JSON serializable"),
        ("raiser", "", "HandlerFailed", "function_error", "KeyError"),
    ],
)
def test_invoke_failures_are_classified(
    project: Project, handler: str, extra: str, error_type: str, error_class: str, message: str
) -> None:
    project.function("h", HANDLERS, file="handlers.py")
    cfg = project.config(
        f'[functions.h]\ncode = "functions/h"\nhandler = "handlers.{handler}"\n{extra}\n'
    )
    t0 = datetime.now()
    r = cli("invoke", "-c", str(cfg), timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    err = json.loads(r.stdout)
    assert err["errorType"] == error_type, err
    assert err["errorClass"] == error_class
    assert message in err["errorMessage"]
    assert err["requestId"]
    if handler == "sleeper":
        # the hard timeout killed the worker instead of waiting for the 30 s sleep
        assert (datetime.now() - t0).total_seconds() < 20


def test_invoke_missing_entry_file_at_runtime_is_clear(project: Project) -> None:
    d = project.function("gone")
    cfg = project.config('[functions.gone]\ncode = "functions/gone"\n')
    assert cli("validate", "-c", str(cfg)).returncode == 0
    (d / "index.py").unlink()  # removed after validation, e.g. during a deploy
    r = cli("invoke", "-c", str(cfg))
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["errorType"] == "HandlerNotFound"
    assert 'entry file "index.py" not found' in err["errorMessage"]


# --- fire and next -----------------------------------------------------------------------------


def test_fire_local_invokes_with_the_timer_event(project: Project) -> None:
    project.function("rec")
    cfg = project.config(
        BASE
        + '[triggers.nightly]\ntype = "timer"\nfunction = "rec"\ncron = "0 0 2 * * * *"\nmessage = "from fire"\n'
    )
    r = cli("fire", "nightly", "--local", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    event = json.loads(r.stdout)["event"]
    assert (
        event["Type"] == "Timer"
        and event["TriggerName"] == "nightly"
        and event["Message"] == "from fire"
    )
    assert datetime.strptime(event["Time"], "%Y-%m-%dT%H:%M:%SZ")
    r = cli("fire", "ghost", "-c", str(cfg))
    assert r.returncode == 2 and 'unknown trigger "ghost"' in r.stderr


def _next(project: Project, trigger_toml: str, n: int, after: str) -> list[str]:
    project.function("rec")
    cfg = project.config(BASE + '[triggers.t]\ntype = "timer"\nfunction = "rec"\n' + trigger_toml)
    r = cli("next", "t", "-c", str(cfg), "-n", str(n), "--after", after)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_next_in_trigger_time_zone(project: Project) -> None:
    times = _next(
        project,
        'cron = "0 0 2 * * * *"\ntimezone = "Asia/Shanghai"\n',
        2,
        "2026-11-29T00:00:00+00:00",
    )
    assert times == ["2026-11-30T02:00:00+08:00", "2026-12-01T02:00:00+08:00"]


def test_next_uses_daemon_time_zone_by_default(project: Project) -> None:
    project.function("rec")
    cfg = project.config(
        '[daemon]\ntimezone = "America/New_York"\n'
        + BASE
        + '[triggers.t]\ntype = "timer"\nfunction = "rec"\ncron = "0 30 9 * * * *"\n'
    )
    r = cli("next", "t", "-c", str(cfg), "-n", "1", "--after", "2026-07-01T00:00:00+00:00")
    assert r.stdout.split() == ["2026-07-01T09:30:00-04:00"]


@pytest.mark.parametrize("week", ["0", "7", "SUN", "sun"])
def test_next_sunday_is_zero(project: Project, week: str) -> None:
    times = _next(project, f'cron = "0 0 12 * * {week} *"\n', 4, "2026-11-29T13:00:00+00:00")
    days = [datetime.fromisoformat(t) for t in times]
    assert all(d.weekday() == 6 for d in days), times  # Python: Monday=0 … Sunday=6
    assert times[0] == "2026-12-06T12:00:00+00:00"


def test_next_five_field_weekdays(project: Project) -> None:
    times = _next(project, 'cron = "0 9 * * 1-5"\n', 5, "2026-11-28T00:00:00+00:00")  # a Saturday
    assert [datetime.fromisoformat(t).strftime("%a") for t in times] == [
        "Mon",
        "Tue",
        "Wed",
        "Thu",
        "Fri",
    ]


def test_next_year_field(project: Project) -> None:
    times = _next(project, 'cron = "0 0 0 1 1 * 2030"\n', 3, "2026-11-29T00:00:00+00:00")
    assert times == ["2030-01-01T00:00:00+00:00"]


def test_next_every(project: Project) -> None:
    times = _next(project, 'cron = "@every 90s"\n', 3, "2026-11-29T00:00:10+00:00")
    assert times == [
        "2026-11-29T00:01:30+00:00",
        "2026-11-29T00:03:00+00:00",
        "2026-11-29T00:04:30+00:00",
    ]


# --- plugins -------------------------------------------------------------------------------------


def test_plugins_lists_builtins_with_fields() -> None:
    r = cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    by = {(row["group"], row["name"]): row for row in rows}
    for key in [
        ("bridge.sources", "timer"),
        ("bridge.targets", "python"),
        ("bridge.targets", "http"),
        ("bridge.targets", "command"),
    ]:
        assert key in by and by[key]["version"] == __version__
    timer_fields = {f["name"]: f for f in by[("bridge.sources", "timer")]["fields"]}
    assert timer_fields["cron"]["required"] and timer_fields["cron"]["doc"]
    assert timer_fields["catchup"]["default"] == "skip"
    assert all(f["doc"] for row in rows for f in row.get("fields", []))
    human = cli("plugins").stdout
    assert "bridge.sources timer" in human and "cron" in human
