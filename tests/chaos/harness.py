"""The chaos suite's machinery: a real daemon per scenario, load generators, faults, and the
oracle that counts every event.

The oracle's three promises (DESIGN.md, "Invocation semantics"):

- nothing accepted is lost: every event the bridge acknowledged (a 202 from the API, a file
  in the watched directory, a message the broker handed over) is invoked at least once;
- duplicates stay within what was in flight: only an invocation running when the process died
  may run again, so duplicates <= kills x concurrency;
- memory is bounded: the daemon's RSS, sampled all along, stays under a ceiling.

``CHAOS_FULL=1`` (``make chaos``) runs every seed and the long fault windows; without it a
bounded subset runs in ``make test``. Every random choice comes from a seeded
``random.Random``, so a failing seed reproduces (``CHAOS_SEEDS=7``).
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.integration.conftest import DaemonProcess, wait_for

TOKEN = "chaos-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FULL = os.environ.get("CHAOS_FULL") == "1"
#: every figure a scenario measured, printed at the end of the run (docs/reliability.md)
RESULTS: list[dict[str, Any]] = []

# The function: one line per invocation, one write(2) with O_APPEND (atomic for a small line,
# so a worker killed with its daemon leaves whole lines or nothing).
RECORDER = """
import json, os

def keys(event):
    if isinstance(event, dict) and "Records" in event:
        out = []
        for r in event["Records"]:
            if "cos" in r:
                out.append(r["cos"]["cosObject"]["key"].rsplit("/", 1)[-1])
            elif "Ckafka" in r:
                out.append(r["Ckafka"]["msgBody"])
            else:
                out.append(r["CMQ"]["msgBody"])
        return out
    if isinstance(event, dict) and event.get("Type") == "Timer":
        return [event["Time"]]
    return [event["id"]]

def main_handler(event, context):
    lines = "".join(json.dumps({"key": k, "pid": os.getpid()}) + "\\n" for k in keys(event))
    fd = os.open(os.environ["OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)
    return "ok"
"""


def seeds(subset: list[int], full: int = 10) -> list[int]:
    """The seeds a scenario runs: ``CHAOS_SEEDS=1,2`` picks, the full run takes ``full``."""
    if os.environ.get("CHAOS_SEEDS"):
        return [int(s) for s in os.environ["CHAOS_SEEDS"].split(",")]
    return list(range(1, full + 1)) if FULL else subset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Bridge:
    """A project folder, its config, and the daemon processes started on it."""

    root: Path
    concurrency: int = 4
    port: int = field(default_factory=free_port)
    started: list[DaemonProcess] = field(default_factory=list)
    rss_max: int = 0
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    @property
    def out(self) -> Path:
        return self.root / "out.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def write(
        self, extra: str = "", function: str = "", rec: str | None = None, **daemon: str
    ) -> Path:
        """The config: the recorder function ``rec`` (or the ``rec`` block given), the API
        with an all-powerful token, ``extra`` appended (triggers)."""
        fn = self.root / "functions" / "rec"
        fn.mkdir(parents=True, exist_ok=True)
        (fn / "index.py").write_text(textwrap.dedent(RECORDER))
        settings = {"state_dir": '"state"', "queue_poll": '"100ms"', **daemon}
        body = "\n".join(f"{k} = {v}" for k, v in settings.items())
        (self.root / "token").write_text(TOKEN)
        cfg = self.root / "bridge.toml"
        cfg.write_text(
            f"[daemon]\n{body}\n\n"
            f'[api]\nenabled = true\nlisten = "127.0.0.1:{self.port}"\n'
            '[[api.tokens]]\nname = "chaos"\nsecret_file = "token"\n'
            'actions = ["invoke", "read", "admin"]\n\n'
            + (
                textwrap.dedent(rec)
                if rec is not None
                else f'[functions.rec]\ncode = "functions/rec"\nconcurrency = {self.concurrency}\n'
                f'environment = {{ OUT = "{self.out}" }}\n'
            )
            + f"{textwrap.dedent(function)}\n"
            + textwrap.dedent(extra)
        )
        return cfg

    def start(self, **env: str) -> DaemonProcess:
        d = DaemonProcess(
            self.root / "bridge.toml", self.root / f"daemon-{len(self.started)}.log", env
        )
        self.started.append(d)
        self._watch(d.proc.pid)
        return d

    def ready(self, d: DaemonProcess, timeout: float = 60) -> None:
        def up() -> bool:
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log()}")
            try:
                return request(self.port, "GET", "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(up, timeout, "the daemon to be ready")

    def _watch(self, pid: int) -> None:
        def sample() -> None:
            try:
                p = psutil.Process(pid)
                while not self._stop_sampling.is_set() and p.is_running():
                    self.rss_max = max(self.rss_max, p.memory_info().rss)
                    self._stop_sampling.wait(0.2)
            except psutil.Error:
                pass

        t = threading.Thread(target=sample, daemon=True)
        t.start()

    def close(self) -> None:
        self._stop_sampling.set()
        for d in self.started:
            d.kill()

    def delivered(self) -> collections.Counter[str]:
        if not self.out.exists():
            return collections.Counter()
        keys = []
        for line in self.out.read_text().splitlines():
            try:
                keys.append(json.loads(line)["key"])
            except ValueError:  # pragma: no cover - a torn line would be a finding
                raise AssertionError(f"torn output line: {line!r}") from None
        return collections.Counter(keys)


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={**AUTH, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class ApiLoad:
    """Event invocations through the API in a thread: ``accepted`` holds every id the bridge
    answered 202 for; ``attempted`` every id sent (a request cut by a kill may or may not have
    been accepted, so delivering it is allowed but not required)."""

    def __init__(self, port: int, prefix: str, rate: float = 100.0) -> None:
        self.port, self.prefix, self.rate = port, prefix, rate
        self.accepted: list[str] = []
        self.attempted: set[str] = set()
        self.refused: collections.Counter[int] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApiLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            key = f"{self.prefix}-{n}"
            n += 1
            self.attempted.add(key)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request(
                    "POST",
                    "/functions/rec/invocations",
                    body=json.dumps({"id": key}),
                    headers={
                        **AUTH,
                        "X-Invocation-Type": "Event",
                        "Content-Type": "application/json",
                    },
                )
                r = conn.getresponse()
                r.read()
                if r.status == 202:
                    self.accepted.append(key)
                else:
                    self.refused[r.status] += 1
                    self._stop.wait(0.05)
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.05)  # the daemon is down: try again shortly
            self._stop.wait(1 / self.rate)
        if conn is not None:
            conn.close()


def check(
    bridge: Bridge,
    accepted: list[str] | set[str],
    *,
    allowed: set[str] | None = None,
    other: Callable[[str], bool] = lambda key: False,
    dup_bound: int,
    rss_bound_mb: float = 400,
    timeout: float = 120,
    **figures: Any,
) -> dict[str, Any]:
    """The oracle: wait until every accepted key was delivered, then check duplicates, strays
    (keys in neither ``allowed`` nor ``other``) and memory; record the figures."""
    want = set(accepted)
    wait_for(
        lambda: not (want - set(bridge.delivered())),
        timeout,
        f"every accepted event delivered ({len(want)})",
    )
    got = bridge.delivered()
    dups = sum(c - 1 for c in got.values())
    strays = {k for k in set(got) - (allowed if allowed is not None else want) if not other(k)}
    result = {
        "accepted": len(want),
        "delivered": len(got),
        "lost": len(want - set(got)),
        "duplicates": dups,
        "dup_bound": dup_bound,
        "rss_max_mb": round(bridge.rss_max / 2**20, 1),
        **figures,
    }
    RESULTS.append(result)
    print("CHAOS", json.dumps(result))
    assert not strays, f"delivered events nobody sent: {sorted(strays)[:5]}"
    assert dups <= dup_bound, f"{dups} duplicates, more than the {dup_bound} in flight"
    assert bridge.rss_max < rss_bound_mb * 2**20, f"RSS {result['rss_max_mb']} MB"
    return result


def kill_loop(
    bridge: Bridge, rng: random.Random, kills: int, low: float = 0.3, high: float = 2.5
) -> DaemonProcess:
    """Start the daemon, and ``kills`` times: let it run a random while, kill -9, restart."""
    d = bridge.start()
    bridge.ready(d)
    for _ in range(kills):
        time.sleep(rng.uniform(low, high))  # a random point in the load, not a wait for a state
        d.kill()
        d = bridge.start()
        bridge.ready(d)
    return d


def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_for(predicate, timeout, what)


def term(d: DaemonProcess, timeout: float = 60) -> int:
    d.signal(signal.SIGTERM)
    return d.wait(timeout)
