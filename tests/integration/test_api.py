"""The HTTP API against the real daemon: auth matrix, invocation types and errors, body limits,
metrics that move as events flow, status, dead letters, the CLI's remote commands, and a
schemathesis run against the OpenAPI description."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import free_port

from .conftest import DaemonProcess, Project, cli, wait_for

ADMIN = "admin-token-0123456789abcdef"
INVOKER = "invoke-echo-only-0123456789"
READER = "read-only-token-0123456789ab"

FUNCS = """
import json, os, time

def echo(event, context):
    return {"event": event, "request_id": context.request_id}

def boom(event, context):
    raise RuntimeError("boom")

def slow(event, context):
    time.sleep(float(event.get("sleep", 0)))
    return "done"

def record(event, context):
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"event": event, "request_id": context.request_id}) + "\\n")
    return "ok"
"""


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        **headers: str,
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), _decode(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), _decode(e.read())


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode()


@pytest.fixture
def api(project: Project, daemon: Any) -> Iterator[tuple[Client, Path, DaemonProcess]]:
    project.function("f", FUNCS, file="funcs.py")
    port = free_port()
    (project.root / "reader.token").write_text(READER + "\n")
    cfg = project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"

        [api]
        enabled = true
        listen = "127.0.0.1:{port}"
        [[api.tokens]]
        name = "admin"
        secret = "{ADMIN}"
        actions = ["admin"]
        [[api.tokens]]
        name = "ci"
        secret = "${{INVOKER_TOKEN}}"
        functions = ["echo", "slo*"]
        actions = ["invoke"]
        [[api.tokens]]
        name = "reader"
        secret_file = "reader.token"
        actions = ["read"]

        [functions.echo]
        code = "functions/f"
        handler = "funcs.echo"
        [functions.boom]
        code = "functions/f"
        handler = "funcs.boom"
        [functions.boom.async]
        retry_attempts = 0
        [functions.slow]
        code = "functions/f"
        handler = "funcs.slow"
        concurrency = 1
        [functions.record]
        code = "functions/f"
        handler = "funcs.record"
        environment = {{ OUT = "@OUT@" }}
        """
    )
    import os

    os.environ["INVOKER_TOKEN"] = INVOKER
    try:
        d = daemon(cfg)
        d.wait_log("API listening")
        d.wait_log("ready:")
        yield Client(f"http://127.0.0.1:{port}"), cfg, d
    finally:
        os.environ.pop("INVOKER_TOKEN", None)


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("GET", "/healthz", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/status", None, 401),
        ("GET", "/status", "not-a-token-at-all-000000", 401),
        ("GET", "/status", READER, 200),
        ("GET", "/status", INVOKER, 403),
        ("GET", "/status", ADMIN, 200),
        ("GET", "/metrics", None, 401),
        ("GET", "/metrics", READER, 200),
        ("GET", "/readyz", READER, 200),
        ("POST", "/functions/echo/invocations", None, 401),
        ("POST", "/functions/echo/invocations", INVOKER, 200),
        ("POST", "/functions/slow/invocations", INVOKER, 200),
        ("POST", "/functions/record/invocations", INVOKER, 403),
        ("POST", "/functions/echo/invocations", READER, 403),
        ("POST", "/functions/record/invocations", ADMIN, 200),
        ("GET", "/deadletters", INVOKER, 403),
        ("GET", "/deadletters", READER, 200),
        ("POST", "/deadletters/replay", READER, 403),
        ("POST", "/deadletters/replay", ADMIN, 200),
        ("GET", "/nowhere", ADMIN, 404),
    ],
)
def test_auth_matrix(api: Any, method: str, path: str, token: str | None, status: int) -> None:
    client, _, _ = api
    body = {} if method == "POST" else None
    code, headers, out = client.call(method, path, token, body)
    assert code == status, out
    if code == 401:
        assert headers.get("WWW-Authenticate") == "Bearer"
        assert out["error"]["code"] == "unauthorized"
    if code == 403:
        assert "may not" in out["error"]["message"]


def test_tokens_never_appear_in_the_log(api: Any) -> None:
    client, _, d = api
    client.call("GET", "/status", INVOKER)
    client.call("POST", "/functions/echo/invocations", ADMIN, {"x": ADMIN})
    for secret in (ADMIN, INVOKER, READER):
        # the event above carries the admin token as data: it is masked in logs too
        assert secret not in d.log()


def test_request_response_and_error_classes(api: Any) -> None:
    client, _, _ = api
    code, headers, out = client.call("POST", "/functions/echo/invocations", ADMIN, {"a": 1})
    assert code == 200 and out["event"] == {"a": 1}
    assert headers["X-Request-Id"] == out["request_id"]
    code, headers, out = client.call("POST", "/functions/boom/invocations", ADMIN, {})
    assert (
        code == 500
        and out["errorClass"] == "function_error"
        and "RuntimeError: boom" in out["errorMessage"]
    )
    assert headers["X-Error-Class"] == "function_error"
    code, _, out = client.call("POST", "/functions/ghost/invocations", ADMIN, {})
    assert code == 404 and out["errorClass"] == "invalid_request"


def test_throttled_beyond_concurrency_through_the_api(api: Any) -> None:
    import threading

    client, _, _ = api
    results: list[int] = []
    t = threading.Thread(
        target=lambda: results.append(
            client.call("POST", "/functions/slow/invocations", INVOKER, {"sleep": 2})[0]
        )
    )
    t.start()
    wait_for(
        lambda: _metric(client, 'bridge_in_flight{function="slow"}') == 1,
        what="the slow call running",
    )
    code, _, out = client.call("POST", "/functions/slow/invocations", INVOKER, {})
    assert code == 429 and out["errorClass"] == "throttled"
    assert "Resource limit exceed for function slow" in out["errorMessage"]
    t.join()
    assert results == [200]


def test_event_invocation_is_accepted_into_the_queue(api: Any, project: Project) -> None:
    client, _, _ = api
    code, headers, out = client.call(
        "POST", "/functions/record/invocations", ADMIN, {"k": "v"}, **{"X-Invocation-Type": "Event"}
    )
    assert code == 202 and out["accepted"] is True and headers["X-Request-Id"] == out["RequestId"]
    wait_for(lambda: project.records(), what="the async invocation")
    assert project.records()[0] == {"event": {"k": "v"}, "request_id": out["RequestId"]}


@pytest.mark.parametrize(
    ("kind", "size", "status"),
    [
        ("RequestResponse", 6 * 1024 * 1024 + 10, 413),
        ("Event", 128 * 1024 + 10, 413),
        ("Event", 100 * 1024, 202),
    ],
)
def test_body_limits(api: Any, kind: str, size: int, status: int) -> None:
    client, _, _ = api
    body = json.dumps({"x": "a" * (size - 10)}).encode()
    code, _, out = client.call(
        "POST", "/functions/record/invocations", ADMIN, raw=body, **{"X-Invocation-Type": kind}
    )
    assert code == status, out
    if status == 413:
        assert "invocations allow at most" in out["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"a": ', "the request body is not valid JSON: Expecting value at line 1 column 7"),
        (b"[1, 2]", "the event must be a JSON object, not list"),
        (b"\xff\xfe", "the request body is not valid JSON"),
        (b'{"a": "x\\ud800"}', "the request body is not valid JSON: a lone surrogate"),
    ],
)
def test_malformed_bodies(api: Any, raw: bytes, message: str) -> None:
    client, _, _ = api
    for kind in ("RequestResponse", "Event"):
        code, _, out = client.call(
            "POST", "/functions/echo/invocations", ADMIN, raw=raw, **{"X-Invocation-Type": kind}
        )
        assert code == 400 and out["error"]["message"].startswith(message), (kind, out)
    code, _, out = client.call(
        "POST", "/functions/echo/invocations", ADMIN, {}, **{"X-Invocation-Type": "Later"}
    )
    assert code == 400 and "X-Invocation-Type" in out["error"]["message"]


def _metric(client: Client, series: str) -> float:
    _, _, text = client.call("GET", "/metrics", READER)
    m = re.search(re.escape(series) + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


def test_metrics_move_as_events_flow(api: Any) -> None:
    client, _, _ = api
    ok = 'bridge_invocations_total{function="echo",outcome="success"}'
    failed = 'bridge_invocations_total{function="boom",outcome="function_error"}'
    dead = 'bridge_dead_letters_total{error_class="function_error",function="boom"}'
    before = (_metric(client, ok), _metric(client, failed), _metric(client, dead))
    client.call("POST", "/functions/echo/invocations", ADMIN, {})
    client.call("POST", "/functions/echo/invocations", ADMIN, {})
    client.call("POST", "/functions/boom/invocations", ADMIN, {}, **{"X-Invocation-Type": "Event"})
    wait_for(lambda: _metric(client, dead) == before[2] + 1, what="the dead letter counted")
    assert _metric(client, ok) == before[0] + 2
    assert _metric(client, failed) == before[1] + 1
    _, _, text = client.call("GET", "/metrics", READER)
    for name in (
        "bridge_build_info",
        "bridge_queue_depth",
        "bridge_invocation_duration_seconds_bucket",
        "bridge_in_flight",
    ):
        assert name in text


def test_status_and_dead_letters(api: Any) -> None:
    client, cfg, _ = api
    _, _, out = client.call(
        "POST", "/functions/boom/invocations", ADMIN, {"n": 1}, **{"X-Invocation-Type": "Event"}
    )
    rid = out["RequestId"]
    wait_for(
        lambda: client.call("GET", "/deadletters", READER)[2]["count"] == 1, what="the dead letter"
    )
    code, _, dl = client.call("GET", f"/deadletters/{rid}", READER)
    assert (
        code == 200
        and dl["Body"]["FunctionName"] == "boom"
        and json.loads(dl["Body"]["ClientContext"]) == {"n": 1}
    )
    assert client.call("GET", "/deadletters/nope", READER)[0] == 404
    code, _, st = client.call("GET", "/status", READER)
    assert (
        st["dead_letters"] == 1
        and st["functions"]["boom"]["dead_letters"] == 1
        and st["ready"] is True
    )
    # the CLI reads the same through the API (token from the environment)
    r = cli("status", "-c", str(cfg), "--json", env={"EVENT_BRIDGE_TOKEN": READER})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dead_letters"] == 1
    human = cli("status", "-c", str(cfg), env={"EVENT_BRIDGE_TOKEN": READER})
    assert "function boom" in human.stdout and "1 dead letter\n" in human.stdout
    code, _, out = client.call("POST", "/deadletters/replay", ADMIN, {"ids": [rid]})
    assert code == 200 and out["replayed"] == [rid]
    assert client.call("POST", "/deadletters/replay", ADMIN, {"ids": "x"})[0] == 400


def test_cli_remote_invoke(api: Any) -> None:
    _, cfg, _ = api
    r = cli(
        "invoke",
        "echo",
        "--remote",
        "-c",
        str(cfg),
        "--event",
        '{"r": 1}',
        env={"EVENT_BRIDGE_TOKEN": INVOKER},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["event"] == {"r": 1}
    r = cli(
        "invoke", "echo", "--remote", "--async", "-c", str(cfg), env={"EVENT_BRIDGE_TOKEN": INVOKER}
    )
    assert r.returncode == 0 and json.loads(r.stdout)["accepted"] is True
    r = cli("invoke", "record", "--remote", "-c", str(cfg), env={"EVENT_BRIDGE_TOKEN": INVOKER})
    assert r.returncode == 1 and "may not invoke on function record" in r.stdout


def test_cli_remote_unreachable(project: Project) -> None:
    project.function("f", FUNCS, file="funcs.py")
    cfg = project.config(
        f'[api]\nlisten = "127.0.0.1:{free_port()}"\n[functions.echo]\ncode = "functions/f"\nhandler = "funcs.echo"\n'
    )
    r = cli("status", "-c", str(cfg))
    assert r.returncode == 1 and "no event-bridge daemon is running on state directory" in r.stderr
    r = cli("status", "-c", str(cfg), "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "cannot reach the event-bridge API" in r.stderr


def test_schemathesis_against_the_openapi_description(api: Any) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    client, _, _ = api
    schema = schemathesis.openapi.from_url(client.base + "/openapi.json")
    failures: list[str] = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(
            max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ADMIN}"}
            response = case.call()
            try:
                case.validate_response(response)
            except Exception as e:  # schemathesis' FailureGroup: every failed check
                failures.append(f"{case.method} {case.formatted_path}: {e}")

        check()
    assert failures == []
