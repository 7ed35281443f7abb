"""Helpers for tests that run the real ``event-bridge`` command as a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

# PostgreSQL: a fresh database per test (tests/pg_fixtures.py)
from tests.pg_fixtures import pg_db, pg_url  # noqa: F401

EXE = str(Path(sys.executable).with_name("event-bridge"))

RECORDER = """
import json, os, time

def main_handler(event, context):
    rec = {"event": event, "request_id": context.request_id, "pid": os.getpid(), "start": time.time()}
    delay = float(os.environ.get("DELAY", "0"))
    if delay:
        time.sleep(delay)
    if isinstance(event, dict) and event.get("Message") == "fail":
        raise ValueError("asked to fail")
    rec["end"] = time.time()
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps(rec) + "\\n")
    return rec
"""


def gone(pid: int) -> bool:
    """The process ended (a zombie not yet reaped by its parent counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input,
    )


class Project:
    """A temp folder with a bridge.toml and function code dirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out.jsonl"

    def function(self, name: str, code: str = RECORDER, file: str = "index.py") -> Path:
        d = self.root / "functions" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / file).write_text(textwrap.dedent(code))
        return d

    def config(self, text: str, name: str = "bridge.toml") -> Path:
        p = self.root / name
        p.write_text(textwrap.dedent(text).replace("@OUT@", str(self.out)))
        return p

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


class DaemonProcess:
    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [EXE, "run", "-c", str(config), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> list[str]:
        rx = re.compile(pattern)

        def found() -> list[str]:
            if self.proc.poll() is not None and len(rx.findall(self.log())) < count:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            hits = rx.findall(self.log())
            return hits if len(hits) >= count else []

        return wait_for(found, timeout, f"{count}x /{pattern}/ in the daemon log")  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, **env: str) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path / f"daemon-{len(started)}.log", env, args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def frame_kinds(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The kinds of the frames the ``python`` runtime sends its workers during the test
    (upper case; ``M``: written into the worker's shared memory region)."""
    from bridge.targets._pyworker import WorkerProcess

    kinds: list[bytes] = []
    real_call_many = WorkerProcess.call_many

    async def spy(self: WorkerProcess, frame: bytes, invocations: Any) -> Any:
        kinds.append(frame[4:5].upper())
        return await real_call_many(self, frame, invocations)

    monkeypatch.setattr(WorkerProcess, "call_many", spy)
    return kinds
