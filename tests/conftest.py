"""Suite-wide fixtures: no leaked threads or child processes after a test."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from bridge import blocking

# Contract checks that do not apply to a source (a capability it lacks) are not collected,
# so a run reports only checks that ran.
pytest_plugins = ["bridge.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads = set(threading.enumerate())
    me = psutil.Process(os.getpid())
    children = {p.pid for p in me.children(recursive=True)}
    yield
    # Given time to reap what was already told to stop, nothing the test started may remain.
    deadline = time.monotonic() + 5
    while True:
        leaked_t = [
            t
            for t in threading.enumerate()
            if t not in threads
            and t.is_alive()
            # a Worker's thread is a daemon thread: it leaks unless its worker abandoned it
            and (not t.daemon or (isinstance(t, blocking._Thread) and not t.abandoned))
        ]
        leaked_p = [
            p
            for p in me.children(recursive=True)
            if p.pid not in children and p.status() != psutil.STATUS_ZOMBIE
        ]
        if not leaked_t and not leaked_p:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    names = [t.name for t in leaked_t] + [f"pid {p.pid}: {' '.join(p.cmdline())}" for p in leaked_p]
    for p in leaked_p:
        p.kill()
    pytest.fail(f"test leaked threads/processes: {names}")
