"""The gateway in the real ``event-bridge run`` process: SIGHUP adds and removes routes while
a request is in flight, START/END/REPORT lines carry the request id, metrics count requests
by trigger and status, throttling answers 429."""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import free_port

from .conftest import DaemonProcess, Project, wait_for

pytestmark = pytest.mark.integration

FUNCS = """
import os, time

def ok(event, context):
    return {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": "ok " + event["path"]}

def gated(event, context):
    gate = os.environ["GATE"]
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"statusCode": 200, "body": "finished"}
"""


READER = "metrics-reader-0123456789abcdef"


def call(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def config(project: Project, gw: int, api: int, *, gated_route: bool, extra_route: bool) -> Path:
    text = f"""
    [daemon]
    state_dir = "state"

    [api]
    enabled = true
    listen = "127.0.0.1:{api}"
    [[api.tokens]]
    name = "reader"
    secret = "{READER}"
    actions = ["read"]

    [gateway]
    listen = "127.0.0.1:{gw}"

    [functions.ok]
    code = "functions/f"
    handler = "funcs.ok"

    [functions.gated]
    code = "functions/f"
    handler = "funcs.gated"
    timeout = "40s"
    concurrency = 1
    environment = {{ GATE = "{project.root / "gate"}" }}

    [triggers.a]
    type = "apigw"
    function = "ok"
    path = "/a"
    """
    if gated_route:
        text += """
    [triggers.gated]
    type = "apigw"
    function = "gated"
    path = "/gated"
    timeout = "40s"
    """
    if extra_route:
        text += """
    [triggers.b]
    type = "function_url"
    function = "ok"
    path = "/b"
    """
    return project.config(text)


def test_reload_routes_with_a_request_in_flight(
    project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    project.function("f", FUNCS, file="funcs.py")
    gw, api = free_port(), free_port()
    base = f"http://127.0.0.1:{gw}"
    cfg = config(project, gw, api, gated_route=True, extra_route=False)
    d = daemon(cfg)
    d.wait_log(r"gateway listening on http://127\.0\.0\.1:\d+ \(2 routes\)")

    # Given a request in flight on the route that the reload removes
    results: dict[str, Any] = {}
    in_flight = threading.Thread(target=lambda: results.update(gated=call(base + "/gated")))
    in_flight.start()
    d.wait_log(r"START RequestId")
    # and a second one, throttled: the function's reserved concurrency is 1
    status, headers, body = call(base + "/gated")
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert json.loads(body)["error"].startswith("Resource limit exceed for function gated")

    # When the config drops /gated, adds /b, and the daemon gets SIGHUP
    config(project, gw, api, gated_route=False, extra_route=True)
    d.signal(signal.SIGHUP)
    d.wait_log(r"gateway routes: 2 \(\+b -gated\)")

    # Then the new table serves at once, while the old request is still running
    assert call(base + "/b/x")[:1] == (200,)
    assert call(base + "/b/x")[2] == b"ok /b/x"
    assert call(base + "/gated")[0] == 404
    assert "gated" not in results
    # and the request in flight finishes normally
    (project.root / "gate").touch()
    in_flight.join(30)
    assert results["gated"][0] == 200
    assert results["gated"][2] == b"finished"
    d.wait_log("reload applied")

    # START / END / REPORT lines carry the request id the response named
    status, headers, _ = call(base + "/a")
    rid = headers["X-Request-Id"]
    for line in ("START", "END", "REPORT"):
        d.wait_log(rf"{line} RequestId: {rid}")

    # and the metrics count requests by trigger and status code
    def metrics() -> str:
        return call(f"http://127.0.0.1:{api}/metrics", Authorization=f"Bearer {READER}")[2].decode()

    text = wait_for(lambda: 'trigger="a"' in metrics() and metrics(), what="gateway metrics")
    assert 'bridge_gateway_requests_total{status="200",trigger="a"} 1.0' in text
    assert 'bridge_gateway_requests_total{status="200",trigger="b"} 2.0' in text
    assert 'bridge_gateway_requests_total{status="404",trigger=""} 1.0' in text
    assert 'bridge_gateway_requests_total{status="429",trigger="gated"} 1.0' in text
    assert 'bridge_gateway_request_duration_seconds_count{trigger="a"} 1.0' in text
    assert d.stop() == 0


def test_listen_change_needs_a_restart(
    project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    project.function("f", FUNCS, file="funcs.py")
    gw, api = free_port(), free_port()
    cfg = config(project, gw, api, gated_route=False, extra_route=False)
    d = daemon(cfg)
    d.wait_log("gateway listening")
    cfg.write_text(cfg.read_text().replace(f"127.0.0.1:{gw}", f"127.0.0.1:{free_port()}"))
    d.signal(signal.SIGHUP)
    d.wait_log(r"\[gateway\] listen or TLS changed; it takes effect after a restart")
    assert call(f"http://127.0.0.1:{gw}/a")[0] == 200
    assert d.stop() == 0
