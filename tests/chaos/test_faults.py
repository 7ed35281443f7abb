"""Faults around a running daemon under API Event load: 100 SIGHUPs, the target down, the
state database locked by another process, the state disk full."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .harness import FULL, ApiLoad, Bridge, check, request, term, until

# a loaded 2-core machine: a kill loop and its drain can take minutes
pytestmark = pytest.mark.timeout(600)


def test_100_sighups_while_events_flow(bridge: Bridge) -> None:
    bridge.write()
    d = bridge.start()
    bridge.ready(d)
    # Given Event invocations flowing in, when the daemon gets 100 SIGHUPs (reloads)
    with ApiLoad(bridge.port, "hup") as load:
        for _ in range(100):
            d.signal(signal.SIGHUP)
            time.sleep(0.02)  # a signal rate, not a wait for a state
        until(lambda: d.log().count("reload") >= 1, 30, "a reload logged")
        time.sleep(0.5)
    # Then the daemon is still serving, nothing is lost, nothing runs twice
    assert request(bridge.port, "GET", "/readyz")[0] == 200
    check(bridge, load.accepted, allowed=load.attempted, dup_bound=0, scenario="100 SIGHUPs")
    assert term(d) == 0


class Target:
    """A web function (HTTP target) that can be taken down and brought back on its port."""

    def __init__(self, out: Path, port: int) -> None:
        self.out, self.port = out, port
        self.server: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def up(self) -> None:
        out = self.out

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with out.open("a") as f:
                    f.write(json.dumps({"key": event["id"]}) + "\n")
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            assert self.thread is not None
            self.thread.join(10)
            self.server = None


def test_target_down_then_back(bridge: Bridge) -> None:
    from .harness import free_port

    down_for = 120.0 if FULL else 8.0
    port = free_port()
    target = Target(bridge.out, port)
    bridge.write(
        rec=f"""
        [functions.rec]
        runtime = "http"
        url = "http://127.0.0.1:{port}/"
        concurrency = {bridge.concurrency}
        [functions.rec.async]
        backoff_max = "{"30s" if FULL else "2s"}"
        max_event_age = "1h"
        """
    )
    target.up()
    d = bridge.start()
    bridge.ready(d)
    try:
        # Given Event invocations flowing in, when the web function is down for a while
        with ApiLoad(bridge.port, "down", rate=50) as load:
            time.sleep(1)
            target.down()
            rss_before = bridge.rss_max
            time.sleep(down_for)  # the fault window
            # Then the events keep being accepted meanwhile (durable queue, bounded memory)
            during = len(load.accepted)
            target.up()
            time.sleep(1)
        assert during > 0
        check(
            bridge,
            load.accepted,
            allowed=load.attempted,
            dup_bound=bridge.concurrency,  # what was in flight when the target went down
            timeout=300,
            scenario=f"target down {down_for:g} s",
            rss_before_mb=round(rss_before / 2**20, 1),
        )
        assert term(d) == 0
    finally:
        target.down()


def test_state_database_locked_by_another_process(bridge: Bridge) -> None:
    hold = 15.0 if FULL else 4.0
    bridge.write()
    d = bridge.start()
    bridge.ready(d)
    with ApiLoad(bridge.port, "lock") as load:
        until(lambda: len(load.accepted) > 20, 30, "some events accepted")
        # Given events flowing, when another process holds the database's write lock
        with subprocess.Popen(
            [
                "python3",
                "-c",
                "import sqlite3, sys, time\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\n"
                "time.sleep(float(sys.argv[2]))\nc.execute('COMMIT')\n",
                str(bridge.state / "bridge.db"),
                str(hold),
            ],
            stdout=subprocess.PIPE,
            text=True,
        ) as locker:
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            accepted_at_lock = len(load.accepted)
            assert locker.wait(hold + 30) == 0
        # Then, once it lets go, the daemon accepts again
        until(lambda: len(load.accepted) > accepted_at_lock + 20, 60, "accepting again")
    assert d.proc.poll() is None, d.log()
    check(
        bridge,
        load.accepted,
        allowed=load.attempted,
        dup_bound=bridge.concurrency,
        scenario=f"state database locked {hold:g} s",
        refused=sum(load.refused.values()),
    )
    assert term(d) == 0


@contextmanager
def small_filesystem(path: Path, size: str = "2m") -> Iterator[Path]:
    """A size-capped tmpfs at ``path`` (root only: the suite runs as root in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"the disk-full scenario needs root to mount a tmpfs: {r.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write zeros into ``path`` until its filesystem has no room left."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_state_disk_full(bridge: Bridge) -> None:
    full_for = 10.0 if FULL else 3.0
    bridge.write()
    with small_filesystem(bridge.state, "4m"):
        d = bridge.start()
        bridge.ready(d)
        with ApiLoad(bridge.port, "full") as load:
            until(lambda: len(load.accepted) > 20, 30, "some events accepted")
            # Given events flowing, when the state directory's filesystem fills up
            filler = fill(bridge.state)
            time.sleep(full_for)  # the fault window
            # Then the daemon lives on, and accepts again once there is room
            assert d.proc.poll() is None, d.log()
            filler.unlink()
            at_free = len(load.accepted)
            until(lambda: len(load.accepted) > at_free + 20, 60, "accepting again")
        check(
            bridge,
            load.accepted,
            allowed=load.attempted,
            dup_bound=bridge.concurrency,
            scenario=f"state disk full {full_for:g} s",
            refused=dict(load.refused),
        )
        # what the full disk refused was a clear 503 (try again), never a 500
        assert set(load.refused) == {503}, load.refused
        assert term(d) == 0
    assert not os.path.ismount(bridge.state)
