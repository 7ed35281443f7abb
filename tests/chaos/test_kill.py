"""kill -9 at seeded random points under load from each local source (API Event
invocations, a watched directory, a timer), and SIGTERM mid-load."""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time

import pytest

from .harness import FULL, ApiLoad, Bridge, check, kill_loop, seeds, term

# a loaded 2-core machine: a kill loop and its drain can take minutes
pytestmark = pytest.mark.timeout(600)

KILLS = 5 if FULL else 3


@pytest.mark.parametrize("seed", seeds([1]))
def test_kill_9_under_api_load(bridge: Bridge, seed: int) -> None:
    rng = random.Random(seed)
    bridge.write()
    # Given Event invocations flowing in, when the daemon is killed -9 at random points
    with ApiLoad(bridge.port, f"s{seed}") as load:
        d = kill_loop(bridge, rng, KILLS)
        time.sleep(rng.uniform(0.3, 1.0))
    # Then every 202 is invoked, and only what was running at a kill runs twice
    check(
        bridge,
        load.accepted,
        allowed=load.attempted,
        dup_bound=KILLS * bridge.concurrency,
        scenario="kill -9, API Event load",
        seed=seed,
        kills=KILLS,
    )
    assert term(d) == 0


class DirectoryLoad:
    """Files appear in the watched directory (renamed in whole) from a thread."""

    def __init__(self, inbox: os.PathLike[str], prefix: str, rate: float = 50.0) -> None:
        self.inbox, self.prefix, self.rate = os.fspath(inbox), prefix, rate
        self.staging = self.inbox + ".staging"
        os.makedirs(self.inbox, exist_ok=True)
        os.makedirs(self.staging, exist_ok=True)
        self.written: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DirectoryLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            name = f"{self.prefix}-{n}"
            n += 1
            tmp = os.path.join(self.staging, name)
            with open(tmp, "w") as f:
                f.write(name)
            os.rename(tmp, os.path.join(self.inbox, name))
            self.written.append(name)
            self._stop.wait(1 / self.rate)


@pytest.mark.parametrize("seed", seeds([2]))
def test_kill_9_under_directory_load(bridge: Bridge, seed: int) -> None:
    rng = random.Random(seed)
    bridge.write(
        f"""
        [triggers.inbox]
        type = "filesystem"
        function = "rec"
        path = "{bridge.root / "inbox"}"
        settle = "100ms"
        """
    )
    # Given files landing in the watched directory, when the daemon is killed -9 at random
    with DirectoryLoad(bridge.root / "inbox", f"s{seed}") as load:
        d = kill_loop(bridge, rng, KILLS)
        time.sleep(rng.uniform(0.3, 1.0))
    # Then every file is one event at least, and only what was in flight runs twice
    check(
        bridge,
        load.written,
        dup_bound=KILLS * bridge.concurrency,
        scenario="kill -9, directory load",
        seed=seed,
        kills=KILLS,
    )
    assert term(d) == 0


@pytest.mark.parametrize("seed", seeds([3], full=3))
def test_kill_9_with_a_timer_every_second(bridge: Bridge, seed: int) -> None:
    rng = random.Random(seed)
    bridge.write(
        """
        [triggers.tick]
        type = "timer"
        function = "rec"
        cron = "* * * * * * *"
        catchup = "all"
        """
    )
    # Given a timer firing every second (catch-up "all"), killed -9 at random points
    d = kill_loop(bridge, rng, KILLS, low=1.0, high=3.0)
    time.sleep(2)
    # Then every second from the first fire to the last is invoked: none skipped by a kill
    first = min(bridge.delivered())
    t0 = dt.datetime.fromisoformat(first.replace("Z", "+00:00"))
    last = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=2)
    want = []
    while t0 <= last:
        want.append(t0.strftime("%Y-%m-%dT%H:%M:%SZ"))
        t0 += dt.timedelta(seconds=1)
    assert term(d) == 0
    d = bridge.start()  # what was due during the stop is caught up too
    bridge.ready(d)
    check(
        bridge,
        want,
        allowed=set(want),
        other=lambda key: key.endswith("Z"),  # later ticks, which go on meanwhile
        dup_bound=KILLS * bridge.concurrency,
        scenario="kill -9, timer every second",
        seed=seed,
        kills=KILLS,
        fires=len(want),
    )
    assert term(d) == 0


def test_sigterm_mid_load_finishes_what_it_accepted(bridge: Bridge) -> None:
    bridge.write()
    d = bridge.start()
    bridge.ready(d)
    # Given Event invocations flowing in, when SIGTERM arrives mid-load
    with ApiLoad(bridge.port, "term") as load:
        time.sleep(1.5)
        assert term(d) == 0
        d = bridge.start()
        bridge.ready(d)
        time.sleep(1.0)
    # Then the stop is clean (exit 0) and nothing is lost or run twice
    check(bridge, load.accepted, allowed=load.attempted, dup_bound=0, scenario="SIGTERM mid-load")
    assert term(d) == 0
