"""A wall-clock jump (an NTP step or an operator's ``date -s``): the daemon runs under
libfaketime (Debian's ``faketime``) whose offset is read from a file on every call, so the
test moves the wall clock of the running daemon an hour forward, then back. The monotonic
clock is left alone, as a real step leaves it."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from .harness import ApiLoad, Bridge, check, term, until

# The thread-safe build: with FAKETIME_NO_CACHE, libfaketime.so.1 re-parses the offset in a
# static buffer on every call, and a thread reading it while another writes it gets the real
# time (0.2 % of calls from 4 threads here: an hour's step back and forth that no real clock
# makes, which stalled the timer for 30 s). libfaketime's maintainers point to the MT build for
# this (wolfcw/libfaketime#151; the race itself: #547).
LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def set_offset(path: Path, offset: str) -> None:
    """Replace the offset file whole: a reader never sees it half-written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(offset + "\n")
    os.replace(tmp, path)


@pytest.mark.timeout(300)
def test_wall_clock_jumps_forward_and_back(bridge: Bridge) -> None:
    assert LIB.exists(), "the wall-clock scenario needs Debian's faketime (make services)"
    offset = bridge.root / "faketime"
    set_offset(offset, "+0")
    bridge.write(
        """
        [triggers.tick]
        type = "timer"
        function = "rec"
        cron = "* * * * * * *"
        catchup = "once"
        """
    )
    d = bridge.start(
        LD_PRELOAD=str(LIB),
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",  # every clock call reads the offset: the step is at once
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    bridge.ready(d)

    def ticks() -> list[dt.datetime]:
        return sorted(
            dt.datetime.fromisoformat(k.replace("Z", "+00:00"))
            for k in bridge.delivered()
            if k.endswith("Z")
        )

    with ApiLoad(bridge.port, "ahead") as ahead:
        until(lambda: len(ticks()) >= 2, 30, "the timer firing")
        # When the wall clock jumps an hour forward while events flow
        set_offset(offset, "+3600")
        until(lambda: ticks()[-1] > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=59), 30,
              "a tick on the new time")  # fmt: skip
        jumped = len(ticks())
        until(lambda: len(ticks()) >= jumped + 3, 30, "ticks going on after the jump forward")
    # (events accepted while the clock is ahead are due at that time: they would wait for
    # the clock to get there again after the step back, see docs/reliability.md)
    until(lambda: set(ahead.accepted) <= set(bridge.delivered()), 120, "the events so far")
    # And back again (then new events: one accepted before the step would wait an hour)
    set_offset(offset, "+0")
    back = time.monotonic()
    at_back = len(ticks())
    with ApiLoad(bridge.port, "back") as back_load:
        until(lambda: len(ticks()) >= at_back + 3, 60, "ticks going on after the jump back")
        resumed_s = time.monotonic() - back
    # Then the API events accepted on either side of the jumps are all delivered, once
    check(
        bridge,
        ahead.accepted + back_load.accepted,
        allowed=ahead.attempted | back_load.attempted,
        other=lambda key: key.endswith("Z"),  # the timer's ticks, which go on meanwhile
        dup_bound=0,
        scenario="wall clock +1 h then back",
        ticks=len(ticks()),
        timer_resumed_after_back_s=round(resumed_s, 1),
    )
    assert term(d) == 0
