"""A timer that fires on time.

asyncio's timers are late by 1 to 2 ms on Linux: the event loop sleeps in ``epoll_wait``,
whose timeout Python rounds up to the millisecond, and the kernel lets a wait of that kind
end late by 0.1 % of its length (``select_estimate_accuracy``: 1 ms of a 1 s wait).
A bare ``loop.call_later`` aimed at whole seconds ran 0.9 to 2.2 ms late on a 2-core VM,
where ``time.sleep`` and a condition variable's timed wait (what APScheduler's scheduler
thread waits on) wake 0.1 to 0.2 ms late: they sleep on a high-resolution timer, with the
thread's timer slack (50 us) as the only allowance.

:class:`PreciseTimer` waits in a thread of its own (``threading.Timer``: a timed wait on a
condition variable) and hands the call to the loop with ``call_soon_threadsafe``, which
wakes it at once. The durable queue uses it for the events held until their due time (a
timer's ticks), which are compared with the clock they were due by.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable


class PreciseTimer:
    """At most one pending call of a callback on the event loop, at a time of ``clock``
    (Unix seconds, as the caller's store keeps time): a new :meth:`call_at` replaces it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._thread: threading.Timer | None = None
        #: which call is pending: one that was replaced or cancelled is not made
        self._generation = 0

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the running loop at ``when`` (at once if it is past)."""
        self.cancel()
        loop = asyncio.get_running_loop()
        thread = threading.Timer(
            max(0.0, when - self._clock()),
            _hand_over,
            (loop, self._fire, self._generation, callback),
        )
        thread.daemon = True
        thread.name = "bridge-timer"
        thread.start()
        self._thread = thread

    def cancel(self) -> None:
        """The pending call is not made (its thread ends)."""
        self._generation += 1
        if self._thread is not None:
            self._thread.cancel()
            self._thread = None

    def _fire(self, generation: int, callback: Callable[[], None]) -> None:
        if generation == self._generation:
            self._thread = None
            callback()


def _hand_over(
    loop: asyncio.AbstractEventLoop,
    fire: Callable[[int, Callable[[], None]], None],
    generation: int,
    callback: Callable[[], None],
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to call
        loop.call_soon_threadsafe(fire, generation, callback)
