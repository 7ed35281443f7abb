"""`event-bridge logs` against the log store of a real daemon: by function, by request id, by
trigger, as JSON, and --follow."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.testing import free_port

from .conftest import EXE, DaemonProcess, Project, cli, wait_for

pytestmark = pytest.mark.integration

TOKEN = "admin-token-0123456789abcdef"
CODE = """
def main_handler(event, context):
    print("hello from", context.function_name, event.get("n"))
    return "ok"
"""


def invoke(port: int, function: str, n: int) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/functions/{function}/invocations",
        data=json.dumps({"n": n}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["X-Request-Id"]


@pytest.fixture
def running(project: Project, daemon: Callable[..., DaemonProcess]) -> tuple[Path, int]:
    port = free_port()
    project.function("f", CODE)
    project.function("g", CODE)
    cfg = project.config(
        f"""
        [daemon]
        state_dir = "state"
        [api]
        enabled = true
        listen = "127.0.0.1:{port}"
        [[api.tokens]]
        name = "ci"
        secret = "{TOKEN}"
        actions = ["admin"]
        [logs]
        retention = "1d"
        max_size = "16MiB"
        [functions.f]
        code = "functions/f"
        [functions.g]
        code = "functions/g"
        [triggers.tick]
        type = "timer"
        function = "g"
        cron = "* * * * * * *"
        """
    )
    daemon(cfg).wait_log("ready")
    return cfg, port


def logs(cfg: Path, *args: str) -> list[str]:
    r = cli("logs", "-c", str(cfg), *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_logs_by_function_request_id_and_trigger(running: tuple[Path, int]) -> None:
    cfg, port = running
    rid = invoke(port, "f", 1)
    invoke(port, "f", 2)

    def four_lines() -> list[str] | None:
        lines = logs(cfg, "--request-id", rid)
        return lines if len(lines) >= 4 else None

    got = wait_for(four_lines, what="the four lines of the invocation")
    assert [ln.split()[2] for ln in got] == ["START", "hello", "END", "REPORT"]
    assert all(f"request_id={rid}" in ln for ln in got)
    assert "hello from f 1" in got[1]

    of_f = logs(cfg, "f")
    assert of_f and all("function=f " in ln for ln in of_f)
    assert sum("START RequestId" in ln for ln in of_f) == 2

    # the timer's invocations of g carry the trigger, handler output included
    by_trigger = wait_for(lambda: logs(cfg, "--trigger", "tick", "--json"))
    records = [json.loads(ln) for ln in by_trigger]
    assert {r["function"] for r in records} == {"g"} and {r["trigger"] for r in records} == {"tick"}
    assert any(r["message"].startswith("hello from g") for r in records)
    assert logs(cfg, "f", "--since", "1h") == of_f
    assert logs(cfg, "f", "-n", "1") == of_f[-1:]


def test_logs_follow_prints_new_lines(running: tuple[Path, int]) -> None:
    cfg, port = running
    invoke(port, "f", 1)
    proc = subprocess.Popen(
        [EXE, "logs", "-c", str(cfg), "f", "--follow"], stdout=subprocess.PIPE, text=True
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: any("hello from f 1" in ln for ln in seen), what="the existing lines")
        rid = invoke(port, "f", 42)
        wait_for(
            lambda: any(f"REPORT RequestId: {rid}" in ln for ln in seen), what="the new invocation"
        )
        assert any("hello from f 42" in ln for ln in seen)
        assert not any("function=g" in ln for ln in seen)
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(10)
        proc.stdout.close()  # type: ignore[union-attr]


def test_logs_without_a_store_says_so(project: Project) -> None:
    cfg = project.config('[daemon]\nstate_dir = "state"\n')
    r = cli("logs", "-c", str(cfg))
    assert r.returncode == 1 and "no log store" in r.stderr
