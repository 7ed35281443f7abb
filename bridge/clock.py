"""A timer that fires on time.

asyncio's timers are late by 1 to 2 ms on Linux: the event loop sleeps in ``epoll_wait``,
whose timeout Python rounds up to the millisecond, and the kernel lets a wait of that kind
end late by 0.1 % of its length (``select_estimate_accuracy``: 1 ms of a 1 s wait).
A bare ``loop.call_later`` aimed at whole seconds ran 0.9 to 2.2 ms late on a 2-core VM,
where ``time.sleep`` and a condition variable's timed wait (what APScheduler's scheduler
thread waits on) wake 0.1 to 0.2 ms late: they sleep on a high-resolution timer, with the
thread's timer slack (50 us) as the only allowance.

:class:`PreciseTimer` waits in a thread of its own (a timed wait on a condition variable,
until a monotonic deadline) and hands the call to the loop with ``call_soon_threadsafe``,
which wakes it at once: on an idle loop the call ran 0.3 to 0.5 ms after its time, against
0.9 to 2.5 ms for ``call_later`` alternating with it. The durable queue uses it for the
events held until their due time (a timer's ticks), which are compared with the clock they
were due by. The thread needs the GIL to hand the call over: while other threads keep it
busy, it waits for it (up to the 5 ms switch interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any


class PreciseTimer:
    """At most one pending call of a callback on the event loop, at a time of ``clock``
    (Unix seconds, as the caller's store keeps time): a new :meth:`call_at` replaces it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._thread: _Wait | None = None
        #: which call is pending: one that was replaced or cancelled is not made
        self._generation = 0

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the running loop at ``when`` (at once if it is past)."""
        self.cancel()
        loop = asyncio.get_running_loop()
        # the thread waits until a monotonic deadline, counted from now: a thread takes a
        # while to start (threading.Timer would wait its interval from then)
        deadline = time.monotonic() + (when - self._clock())
        thread = _Wait(deadline, (loop, self._fire, self._generation, callback))
        thread.start()
        self._thread = thread

    def cancel(self) -> None:
        """The pending call is not made (its thread ends)."""
        self._generation += 1
        if self._thread is not None:
            self._thread.cancelled.set()
            self._thread = None

    def _fire(self, generation: int, callback: Callable[[], None]) -> None:
        if generation == self._generation:
            self._thread = None
            callback()


class _Wait(threading.Thread):
    """Waits until a ``time.monotonic()`` deadline, unless cancelled, then hands the call
    over to the loop."""

    def __init__(self, deadline: float, call: tuple[Any, ...]) -> None:
        super().__init__(name="bridge-timer", daemon=True)
        self.deadline, self.call = deadline, call
        self.cancelled = threading.Event()

    def run(self) -> None:
        while (rest := self.deadline - time.monotonic()) > 0:
            if self.cancelled.wait(min(rest, threading.TIMEOUT_MAX)):
                return
        if not self.cancelled.is_set():
            _hand_over(*self.call)


def _hand_over(
    loop: asyncio.AbstractEventLoop,
    fire: Callable[[int, Callable[[], None]], None],
    generation: int,
    callback: Callable[[], None],
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to call
        loop.call_soon_threadsafe(fire, generation, callback)
