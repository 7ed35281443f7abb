"""One pump for every scheduled source of a daemon (the timers).

A source that implements :class:`Scheduled` is not read by a pump task of its own: once
connected it joins the daemon's :class:`SchedulePump`, one task and one heap of next due
times for all of them. Deliveries due at the same instant are taken together and handed
to the core as one batch (accepted in one store transaction, then each acked), however
many triggers they come from: a thousand every-second timers cost one wake-up, one
transaction and one hand-over a second instead of a thousand of each.

The pump sleeps on the loop's monotonic clock, aimed at the earliest due time (wall
clock), in steps of at most ``MAX_SLEEP_S``; after each step, and whenever the wall clock
went back (less wall time than monotonic time passed), it asks every source for its next
due time again, so a step of the clock, a suspend or a drifting database clock delays a
tick by at most that much.

Deliveries are taken ``LEAD_S`` ahead of their time, each carrying it as ``not_before``:
taking, rendering and committing a thousand ticks is done by the time they are due, and the
queue starts them then (``DurableQueue`` holds a row until its due time). A reload that
removes a timer in that last ``LEAD_S`` does not take back the tick already accepted.

Back-pressure is the daemon's in-flight slots, as for every source: one slot per delivery
is taken before it is taken from its source (waiting for one, then as many as are free),
and given back when the batch is settled. Sources left over wait, due, for the next round.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from bridge.abc import Delivery

log = logging.getLogger("bridge.schedule")

#: re-read every source's next due time at least this often
MAX_SLEEP_S = 30.0
#: woken this close to a due time, it is due
CLOCK_SKEW_S = 0.0005
#: deliveries are taken this long before they are due (see the module docstring): enough for
#: a thousand ticks' commit on a loaded machine, short enough that a reload is not surprised
LEAD_S = 0.25
#: the wall clock going back more than this is a step, not jitter
STEP_BACK_S = 1.0

#: a batch of (trigger name, delivery) due at one instant
Batch = list[tuple[str, Delivery]]


@runtime_checkable
class Scheduled(Protocol):
    """A source served by the daemon's schedule pump instead of ``read()`` (``read()`` still
    works, for the CLI and the contract suite). Called from the event loop only."""

    def next_due(self) -> float | None:
        """The host's wall-clock time (Unix seconds) its next delivery is due: a past time
        when some are ready now, None when there will never be another."""

    def take_due(self, max_n: int, ahead: float = 0.0) -> Sequence[Delivery]:
        """The deliveries due now or within ``ahead`` seconds, at most ``max_n`` (none if
        woken early); one taken ahead of its time says so in ``Delivery.not_before``."""

    def on_ready(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` when a delivery became due outside the schedule (a nacked one to
        hand out again)."""


class SchedulePump:
    """Serves every :class:`Scheduled` source added to it (see the module docstring).
    ``dispatch(batch)`` takes each batch with its in-flight slots and gives them back when
    the batch is settled; ``ended(name)`` is told when a source will never fire again."""

    def __init__(
        self,
        slots: asyncio.Semaphore,
        dispatch: Callable[[Batch], None],
        ended: Callable[[str], None],
    ) -> None:
        self._slots = slots
        self._dispatch = dispatch
        self._ended = ended
        self._sources: dict[str, Scheduled] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, int] = {}  # name -> the number of its one valid heap entry
        self._numbers = itertools.count()
        self._wake = asyncio.Event()

    def add(self, name: str, source: Scheduled) -> None:
        self._sources[name] = source
        source.on_ready(lambda: self._requeue(name))
        self._push(name)
        self._wake.set()

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (its deliveries in flight are the caller's to settle)."""
        self._sources.pop(name, None)
        self._live.pop(name, None)

    def _requeue(self, name: str) -> None:
        if name in self._sources:
            self._push(name)
            self._wake.set()

    def _push(self, name: str) -> None:
        due = self._sources[name].next_due()
        if due is None:
            self.remove(name)
            self._ended(name)
            return
        number = next(self._numbers)
        self._live[name] = number
        heapq.heappush(self._heap, (due, number, name))

    def _refresh(self) -> None:
        """Ask every source for its next due time again (the clock moved, or time passed)."""
        self._heap.clear()
        self._live.clear()
        for name in list(self._sources):
            self._push(name)

    def _earliest(self) -> float | None:
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # superseded or removed
        return heap[0][0] if heap else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wall, mono = time.time(), loop.time()
        refresh_at = mono + MAX_SLEEP_S
        while True:
            self._wake.clear()
            now, mono_now = time.time(), loop.time()
            if (mono_now - mono) - (now - wall) > STEP_BACK_S or mono_now >= refresh_at:
                self._refresh()
                refresh_at = mono_now + MAX_SLEEP_S
            wall, mono = now, mono_now
            earliest = self._earliest()
            if earliest is not None and earliest - now < CLOCK_SKEW_S + LEAD_S:
                await self._fire(now)
                continue
            timeout = min(refresh_at - mono_now, MAX_SLEEP_S)
            if earliest is not None:
                timeout = min(timeout, earliest - LEAD_S - now)
            await _wait(self._wake, timeout)

    async def _fire(self, now: float) -> None:
        """Take every delivery due now, or within ``LEAD_S``, that there is room for, as one
        batch."""
        heap, live = self._heap, self._live
        due: list[str] = []
        while heap and heap[0][0] - now < CLOCK_SKEW_S + LEAD_S:
            _, number, name = heapq.heappop(heap)
            if live.get(name) == number:
                del live[name]
                due.append(name)
        slots = self._slots
        await slots.acquire()
        room = 1
        while room < len(due) and not slots.locked():
            await slots.acquire()  # free: returns at once
            room += 1
        batch: Batch = []
        for name in due:
            source = self._sources.get(name)
            if source is None:  # removed while we waited for room
                continue
            if len(batch) < room:
                try:
                    taken = source.take_due(room - len(batch), LEAD_S)
                except Exception as e:
                    log.error("trigger %s failed to fire: %s", name, e, exc_info=True)
                    taken = ()
                batch.extend((name, d) for d in taken)
            self._push(name)  # next time; still due if it got no room this round
        for _ in range(room - len(batch)):
            slots.release()
        if batch:
            self._dispatch(batch)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
    finally:
        waiter.cancel()
