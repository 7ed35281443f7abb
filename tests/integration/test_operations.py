"""Day two, through the real CLI and a real daemon: operator commands reach the running service
(control socket, same state path), a start that survives a dead broker and a missing folder, code
reloads, one daemon per state, one-line start-up errors, and the checks `validate` makes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import free_port

from .conftest import Project, cli, wait_for
from .test_service import Notify

FAILING = """
import json, os

VERSION = "@VERSION@"

def main_handler(event, context):
    if VERSION == "broken":
        raise ValueError("not fixed yet")
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"event": event, "request_id": context.request_id, "version": VERSION}) + "\\n")
    return VERSION
"""


def versioned(project: Project, version: str) -> None:
    project.function("fn", FAILING.replace("@VERSION@", version))


def config(project: Project, state: Path | str = "state", extra: str = "") -> Path:
    return project.config(
        f"""
        [daemon]
        state_dir = "{state}"
        queue_poll = "100ms"
        shutdown_grace = "5s"

        [functions.fn]
        code = "functions/fn"
        environment = {{ OUT = "@OUT@" }}
        [functions.fn.async]
        retry_attempts = 0
        """
        + textwrap.dedent(extra)
    )


def versions(project: Project) -> list[str]:
    return [r["version"] for r in project.records()]


def invoke_async(cfg: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    r = cli("invoke", "fn", "--async", "-c", str(cfg), *extra, env=env)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["RequestId"])


# --- operator commands reach the service ----------------------------------------------------------


def test_dlq_list_sees_the_services_state(project: Project, tmp_path: Path, daemon: Any) -> None:
    # Given a daemon started as systemd starts it: $STATE_DIRECTORY set, the config naming the
    # same path (as the shipped config and unit do)
    versioned(project, "broken")
    svc = tmp_path / "var-lib"
    cfg = config(project, state=svc)
    d = daemon(cfg, STATE_DIRECTORY=str(svc))
    d.wait_log("ready")
    # When an operator's shell (no $STATE_DIRECTORY) queues an event that fails
    shell = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    rid = invoke_async(cfg, env=shell)
    # Then `dlq list` from that shell lists the service's dead letter, through the socket
    rows = wait_for(
        lambda: [
            json.loads(line)
            for line in cli("dlq", "list", "--json", "-c", str(cfg), env=shell).stdout.splitlines()
        ],
        what="the dead letter",
    )
    assert [r["RequestId"] for r in rows] == [rid]
    assert (svc / "control.sock").exists()
    st = json.loads(cli("status", "--json", "-c", str(cfg)).stdout)
    assert st["dead_letters"] == 1 and st["functions"]["fn"]["dead_letters"] == 1
    # and `-c` works before the subcommand too
    r = cli("dlq", "-c", str(cfg), "list")
    assert r.returncode == 0 and "1 dead letter" in r.stderr
    r = cli("-c", str(cfg), "dlq", "show", rid)
    assert r.returncode == 0 and json.loads(r.stdout)["RequestId"] == rid
    assert d.stop() == 0
    # With the daemon stopped, the same commands read the store directly
    r = cli("dlq", "list", "--json", "-c", str(cfg))
    assert [json.loads(line)["RequestId"] for line in r.stdout.splitlines()] == [rid]
    assert not (svc / "control.sock").exists()


def test_a_wrong_state_dir_is_never_an_empty_store(project: Project) -> None:
    versioned(project, "v1")
    cfg = config(project, state="typo")
    r = cli("dlq", "list", "-c", str(cfg))
    assert r.returncode == 0 and r.stdout == ""
    assert "no state store at" in r.stderr and str(project.root / "typo") in r.stderr
    assert not (project.root / "typo").exists()
    r = cli("status", "-c", str(cfg))
    assert r.returncode == 1 and "no event-bridge daemon is running" in r.stderr
    # adding an event creates it, and says so
    r = cli("invoke", "fn", "--async", "-c", str(cfg))
    assert r.returncode == 0 and "creating it" in r.stderr
    assert (project.root / "typo" / "bridge.db").exists()


def test_control_socket_refuses_other_users(project: Project, daemon: Any) -> None:
    versioned(project, "v1")
    # a state directory another user can reach (pytest's tmp_path is private to root)
    state = Path(tempfile.mkdtemp(prefix="eb-"))
    state.chmod(0o755)
    try:
        _refuses_other_users(project, daemon, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _refuses_other_users(project: Project, daemon: Any, state: Path) -> None:
    cfg = config(project, state=state)
    d = daemon(cfg)
    d.wait_log("ready")
    sock = state / "control.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    # this uid is served (a bad request gets its answer)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b'{"op": "nope"}\n')
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    # another uid is refused by its peer credentials even where the file mode would let it in
    sock.chmod(0o666)
    probe = (
        "import json, os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "print(s.makefile().readline())\n"  # answered (and closed) before it asks anything
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(sock)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    assert "uid 65534" in reply["error"]["message"]
    assert d.stop() == 0


# --- degraded start ---------------------------------------------------------------------------------


def test_ready_with_a_dead_broker_and_a_missing_folder(
    project: Project, tmp_path: Path, daemon: Any
) -> None:
    versioned(project, "v1")
    port = free_port()
    cfg = config(
        project,
        extra=f"""
        [api]
        enabled = true
        listen = "127.0.0.1:{free_port()}"
        [[api.tokens]]
        name = "reader"
        secret = "reader-token-0123456789"
        actions = ["read"]

        [triggers.tick]
        type = "timer"
        function = "fn"
        cron = "* * * * * * *"

        [triggers.rabbit]
        type = "amqp"
        function = "fn"
        url = "amqp://guest:guest@127.0.0.1:{port}/"
        queue = "nothing-listens"

        [triggers.inbox]
        type = "filesystem"
        function = "fn"
        path = "{tmp_path / "not-there"}"
        """,
    )
    notify = Notify(tmp_path / "n.sock")
    try:
        d = daemon(cfg, NOTIFY_SOCKET=str(notify.path))
        # READY=1 comes once every source had its first attempt, well within the start timeout
        wait_for(lambda: notify.has("READY=1"), timeout=15, what="READY=1")
        ready = next(m for m in notify.poll() if "READY=1" in m)
        assert "STATUS=running: 1 functions, 3 triggers" in ready
        assert "2 not connected: inbox (directory" in ready and "rabbit (cannot reach" in ready
        assert "guest:guest" not in ready
        # and the timer fires meanwhile
        wait_for(lambda: len(project.records()) >= 2, what="timer ticks")
    finally:
        notify.close()
    st = json.loads(cli("status", "--json", "-c", str(cfg)).stdout)
    assert st["triggers"]["tick"]["connected"] is True
    assert st["triggers"]["rabbit"]["connected"] is False
    assert "cannot reach AMQP broker" in st["triggers"]["rabbit"]["last_error"]
    assert "does not exist" in st["triggers"]["inbox"]["last_error"]
    human = cli("status", "-c", str(cfg)).stdout
    inbox = next(ln for ln in human.splitlines() if "trigger  inbox" in ln)
    assert "not connected" in inbox and "last error: directory" in inbox
    listen = next(ln for ln in cfg.read_text().splitlines() if ln.startswith("listen"))
    url = "http://" + listen.split('"')[1] + "/readyz"
    req = urllib.request.Request(url, headers={"Authorization": "Bearer reader-token-0123456789"})
    with urllib.request.urlopen(req) as resp:
        body = json.loads(resp.read())
    assert body["ready"] is True and sorted(body["not_connected"]) == ["inbox", "rabbit"]
    # the folder appears: the trigger connects on its next retry
    (tmp_path / "not-there").mkdir()
    d.wait_log("trigger inbox connected", timeout=30)
    assert d.stop() == 0


# --- code reloads -------------------------------------------------------------------------------


def test_sighup_runs_the_edited_handler(project: Project, daemon: Any) -> None:
    versioned(project, "v1")
    cfg = config(project)
    d = daemon(cfg)
    d.wait_log("ready")
    invoke_async(cfg)
    wait_for(lambda: versions(project) == ["v1"], what="v1")
    # When only the handler changes (the config does not) and the daemon gets SIGHUP
    versioned(project, "v2")
    d.signal(signal.SIGHUP)
    d.wait_log("reload: function fn updated")
    invoke_async(cfg)
    # Then the new code runs
    wait_for(lambda: versions(project) == ["v1", "v2"], what="v2")
    assert d.stop() == 0


def test_fix_then_replay_runs_the_fix(project: Project, daemon: Any) -> None:
    versioned(project, "broken")
    cfg = config(project)
    d = daemon(cfg)
    d.wait_log("ready")
    rid = invoke_async(cfg)
    wait_for(
        lambda: cli("dlq", "list", "--json", "-c", str(cfg)).stdout.strip(), what="dead letter"
    )
    # When the handler is fixed and the dead letter replayed (no SIGHUP)
    versioned(project, "fixed")
    r = cli("dlq", "replay", "--id", rid, "-c", str(cfg))
    assert r.returncode == 0 and "requeued 1 dead letter" in r.stdout
    # Then the replay runs the fixed code
    wait_for(lambda: versions(project) == ["fixed"], what="the fixed code")
    assert project.records()[0]["request_id"] == rid
    assert d.stop() == 0


def test_run_watch_reloads_changed_code(project: Project, daemon: Any) -> None:
    versioned(project, "v1")
    cfg = config(project)
    d = daemon(cfg, "--watch")
    d.wait_log("ready")
    versioned(project, "v2")
    d.wait_log("watch: function code changed")
    d.wait_log("reload: function fn updated")
    invoke_async(cfg)
    wait_for(lambda: versions(project) == ["v2"], what="v2 without a signal")
    assert d.stop() == 0


# --- one daemon per state -----------------------------------------------------------------------


def test_second_daemon_on_the_same_state_exits_naming_the_pid(
    project: Project, daemon: Any
) -> None:
    versioned(project, "v1")
    cfg = config(project)
    d = daemon(cfg)
    d.wait_log("ready")
    r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"pid {d.proc.pid}" in lines[0] and "state directory" in lines[0]
    assert d.stop() == 0


# --- errors an operator reads -------------------------------------------------------------------


@pytest.mark.parametrize("section", ["api", "gateway"])
def test_port_in_use_is_one_line(project: Project, section: str) -> None:
    versioned(project, "v1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = config(project, extra=f'[{section}]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
        r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: {section}.listen: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another process uses this port)"
    ], r.stderr
    assert "Traceback" not in r.stderr


def test_an_unusable_state_dir_is_one_line(project: Project) -> None:
    versioned(project, "v1")
    (project.root / "afile").write_text("")
    cfg = config(project, state="afile/state")
    r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if "Traceback" in ln] == []
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Not a directory" in errors[0], r.stderr
    assert "afile/state" in errors[0]


def test_validate_catches_what_run_would_fail_on(project: Project) -> None:
    versioned(project, "v1")
    (project.root / "empty").write_text("\n")
    (project.root / "short").write_text("x")
    cfg = config(
        project,
        extra=f"""
        [api]
        [[api.tokens]]
        name = "a"
        secret_file = "{project.root / "empty"}"
        [[api.tokens]]
        name = "b"
        secret_file = "{project.root / "short"}"

        [triggers.past]
        type = "timer"
        function = "fn"
        cron = "0 0 0 1 1 * 2020"
        """,
    )
    cfg.write_text(
        cfg.read_text().replace("[functions.fn.async]", "concurency = 2\n[functions.fn.async]")
    )
    (project.root / "conf.d").mkdir()
    (project.root / "conf.d" / "50-extra.toml").write_text('[daemon]\nshutdown_grase = "1s"\n')
    r = cli("validate", "-c", str(cfg))
    assert r.returncode == 78, r.stderr
    err = r.stderr
    assert "api.tokens[0]: secret file" in err and "is empty; a token needs at least 16" in err
    assert "api.tokens[1]: secret file" in err and "holds 1 characters" in err
    assert 'triggers.past.cron: "0 0 0 1 1 * 2020" never fires' in err
    assert 'functions.fn.concurency: unknown key (did you mean "concurrency"?)' in err
    assert (
        'daemon.shutdown_grase: unknown key (did you mean "shutdown_grace"?) '
        f"(set in {project.root / 'conf.d' / '50-extra.toml'})"
    ) in err
    assert "(5 problems)" in err
    # and `run` says the same, with the same exit code (no restart loop under systemd)
    assert cli("run", "-c", str(cfg)).returncode == 78


# --- consistency --------------------------------------------------------------------------------


def test_api_errors_have_one_shape(project: Project, daemon: Any) -> None:
    versioned(project, "v1")
    port = free_port()
    cfg = config(
        project,
        extra=f"""
        [api]
        enabled = true
        listen = "127.0.0.1:{port}"
        [[api.tokens]]
        name = "admin"
        secret = "admin-token-0123456789"
        actions = ["admin"]
        """,
    )
    d = daemon(cfg)
    d.wait_log("ready")
    auth = {"Authorization": "Bearer admin-token-0123456789"}

    def call(method: str, path: str) -> tuple[int, Any, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=auth)
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, resp.headers, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    code, _, body = call("GET", "/nowhere")
    assert code == 404 and body["error"]["code"] == "not_found"
    code, headers, body = call("GET", "/functions/fn/invocations")
    assert code == 405 and body["error"]["code"] == "method_not_allowed"
    assert "POST" in headers["Allow"]
    code, _, body = call("GET", "/deadletters/nope")
    assert code == 404 and set(body["error"]) == {"code", "message"}
    assert d.stop() == 0


def test_next_json_gives_utc_with_z(project: Project) -> None:
    versioned(project, "v1")
    cfg = config(
        project,
        extra='[triggers.t]\ntype = "timer"\nfunction = "fn"\ncron = "0 0 2 * * * *"\n'
        'timezone = "Asia/Shanghai"\n',
    )
    r = cli(
        "next", "t", "-n", "1", "--after", "2026-11-29T00:00:00+00:00", "--json", "-c", str(cfg)
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "time": "2026-11-29T18:00:00Z",
        "local": "2026-11-30T02:00:00+08:00",
    }


def test_an_edit_within_the_same_second_is_not_hidden_by_a_stale_pyc(project: Project) -> None:
    # Given a handler imported once (its .pyc written next to it)
    versioned(project, "v1")
    cfg = config(project)
    assert json.loads(cli("invoke", "fn", "-c", str(cfg)).stdout) == "v1"
    index = project.root / "functions" / "fn" / "index.py"
    assert list((index.parent / "__pycache__").glob("index.*.pyc"))
    # When it is edited to the same size within the same second of mtime
    before = index.stat().st_mtime_ns
    versioned(project, "v2")
    second = before // 10**9 * 10**9
    stamp = second + (1 if before != second + 1 else 2)
    os.utime(index, ns=(stamp, stamp))
    assert index.stat().st_mtime_ns // 10**9 == before // 10**9
    assert index.stat().st_mtime_ns != before
    # Then the next worker runs the new code (Python alone would trust the old .pyc)
    assert json.loads(cli("invoke", "fn", "-c", str(cfg)).stdout) == "v2"


def test_an_unreachable_state_database_is_one_line_for_every_command(project: Project) -> None:
    versioned(project, "v1")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql://postgres:hunter2-secret-pw@127.0.0.1:{port}/bridge"
    cfg = config(project)
    cfg.write_text(cfg.read_text().replace("[daemon]\n", f'[daemon]\ndatabase_url = "{url}"\n', 1))
    for args in (("dlq", "list"), ("invoke", "fn", "--async", "-e", "{}")):
        r = cli(*args, "-c", str(cfg), timeout=60)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"127.0.0.1:{port}/bridge" in errors[0], r.stderr
        assert "hunter2-secret-pw" not in r.stderr


def test_a_log_store_that_cannot_be_read_is_one_line(project: Project) -> None:
    versioned(project, "v1")
    cfg = config(project)
    (project.root / "state").mkdir()
    (project.root / "state" / "logs.db").write_bytes(b"not a database" * 512)
    r = cli("logs", "-n", "1", "-c", str(cfg))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert "cannot read the log store" in r.stderr and "logs.db" in r.stderr, r.stderr
