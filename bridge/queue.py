"""The durable async queue: accept, invoke, retry by error class, dead-letter.

Every asynchronous path — timer ticks, ``event-bridge fire``, ``invoke
--async``, and later object-storage and queue sources and the HTTP API's
``Event`` invocations — comes in through :meth:`DurableQueue.accept` (a source
delivery) or :meth:`DurableQueue.submit` (anything else). An event is
*accepted* once its row is committed to the state store; only then is the
source acknowledged. From there the queue owns it:

1. The runner claims due rows (a lease, so a crashed process' rows come back)
   up to each function's free reserved concurrency and ``daemon.max_in_flight``
   overall, and invokes them through the dispatcher. Rows accepted by this
   process while the runner runs are leased to it in the insert's transaction
   and start without a claim (``_local_leases``), under the same bounds.
2. Success removes the row. A failure asks the function's
   :class:`~bridge.retry.AsyncPolicy`: *retry* stores a new due time in the
   row (never a sleeping coroutine: a restart, even ``kill -9``, resumes it);
   *dead-letter* writes the SCF-shaped record to the function's sink and only
   then removes the row — if the sink fails, the row stays and dead-lettering
   is retried; *drop* removes it on the handler's request.
3. Rows are claimed again when due. New rows written by this process wake the
   runner at once; rows written by other processes (the CLI) are seen within
   ``daemon.queue_poll``, or at once where the store notifies (``StateStore.watch``:
   PostgreSQL, whose replicas share one queue; docs/scale-out.md).
4. While a claimed row waits for room or runs, its lease is renewed every
   ``RENEW_EVERY_S``: a row is never claimed twice because it waited long.

A store error in the runner (busy beyond ``busy_timeout``, disk full, I/O
error) is logged and retried with backoff; it never ends the daemon.

Back-pressure: while ``daemon.max_queued`` events of configured functions are
queued, ``accept`` waits, which holds the pump's in-flight slot, so sources stop
being read. Rows of a function removed by a reload wait for it to come back and
do not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any

from bridge.abc import DeadLetterSink, Delivery, Undeliverable
from bridge.clock import PreciseTimer
from bridge.config import Config
from bridge.deadletter import DeadLetters
from bridge.dispatcher import ASYNC, MAX_ASYNC_EVENT, Call, Dispatcher, Lane
from bridge.errors import (
    BadEvent,
    EventTooLarge,
    FunctionNotFound,
    InvalidRequest,
    InvocationError,
    error_for_class,
)
from bridge.events import Format, RawEvent, dumps, salvage
from bridge.events import request_id as new_request_id
from bridge.metrics import Metrics
from bridge.retry import Action, AsyncPolicy, History
from bridge.store import QueueItem, StateStore, lease_owner

log = logging.getLogger("bridge.queue")

#: a delivery to accept, with its trigger, function and format
Accepting = tuple[Delivery, str, str, Format]

#: extra lease time beyond the function timeout before another runner may take a row
LEASE_MARGIN_S = 30.0
#: delay before retrying a dead letter whose sink failed
SINK_RETRY_S = 5.0
#: how often the leases of claimed rows (waiting or running) are extended
RENEW_EVERY_S = 10.0
#: rows of a function the runner holds at most (running and ready), beyond 2 x concurrency:
#: a claim takes this many, so one store round trip serves many invocations
PREFETCH = 64
#: rows of a function accepted by this process that its runner leases at insert and holds
#: at most (ready and running), on a store of its own (see _local_leases)
LOCAL_HOLD = 4096
#: rows accepted here that come due within this long are leased at insert too, and held in
#: memory until due (timer ticks taken ahead of their time: bridge/schedule.py LEAD_S)
HOLD_AHEAD_S = 1.0
#: a row held until due is started this close to its due time
DUE_SKEW_S = 0.0005
#: a task running a quick function's ready events one after another (on the loop) gives
#: the ones it has not started to other slots once it has been running this long and one
#: of its invocations waits (DurableQueue._run_inline)
HAND_BACK_S = 0.001
#: completed rows are removed from the store with the next claim, or once this many wait,
#: or after FLUSH_AFTER_S (a crash before then runs them again: at least once)
FLUSH_EVERY = 256
FLUSH_AFTER_S = 1.0
#: first and longest wait after the state store failed in the runner
STORE_RETRY_S = 1.0
STORE_RETRY_MAX_S = 30.0
#: how often a shared store's queue depth is read back (see _resync)
RESYNC_EVERY_S = 2.0


def new_item(
    function: str,
    payload: Mapping[str, Any] | str,
    *,
    trigger: str | None = None,
    request_source: str = "API",
    request_id: str | None = None,
    now: float | None = None,
    dedupe: str | None = None,
    due_at: float | None = None,
    plain: bool = False,
) -> QueueItem:
    """A queue row for an event accepted now, due at once or at ``due_at`` if that is later;
    ``dedupe``: its fire-once key; ``plain``: orjson wrote ``payload`` (QueueItem.plain)."""
    t = time.time() if now is None else now
    text = payload if isinstance(payload, str) else dumps(payload).decode()
    return QueueItem(
        id=request_id or new_request_id(),
        function=function,
        payload=text,
        request_source=request_source,
        trigger=trigger,
        accepted_at=t,
        due_at=t if due_at is None else max(t, due_at),
        dedupe=dedupe,
        plain=plain,
    )


async def _ack(delivery: Delivery, trigger: str) -> None:
    """Ack an accepted delivery. If the ack itself fails the event is already safe on disk:
    log it and nack it, as bridge/abc.py promises, so that the source settles it (a source
    may otherwise hold it, e.g. an SQS message kept invisible); the upstream may redeliver
    it, a duplicate that at-least-once delivery allows."""
    try:
        await delivery.ack()
    except Exception as e:
        log.error(
            "trigger %s: event accepted, but acknowledging it upstream failed (%s); the "
            "upstream may deliver it again",
            trigger,
            e,
            extra={"trigger": trigger},
        )
        with contextlib.suppress(Exception):
            await delivery.nack(e)


def check_submission(
    config: Config, function: str, payload_text: str, *, size: int | None = None
) -> None:
    """Reject what can never succeed before accepting it (API ``Event`` callers get the error).
    ``size``: the payload's UTF-8 length, when the caller has it."""
    if function not in config.functions:
        raise FunctionNotFound(
            f"function {function} not found (defined: {', '.join(sorted(config.functions)) or 'none'})"
        )
    if size is None:
        size = len(payload_text.encode())
    if size > MAX_ASYNC_EVENT:
        raise EventTooLarge(
            f"event is {size} bytes; Event invocations allow at most {MAX_ASYNC_EVENT}"
        )


class DurableQueue:
    """Acceptor of async deliveries and runner of the durable queue (see module docstring)."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        dispatcher: Dispatcher,
        sinks: Mapping[str, DeadLetterSink],
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.dispatcher = dispatcher
        #: the dead-letter service (the function's sinks)
        self.dead_letters = DeadLetters(store, sinks, metrics)
        self.policies = {n: AsyncPolicy(f.async_) for n, f in config.functions.items()}
        self.owner = lease_owner()
        self.poll_s = config.daemon.queue_poll
        self.max_queued = config.daemon.max_queued
        self.max_running = config.daemon.max_in_flight
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._waiting = 0  # accepts waiting for room (max_queued)
        #: rows queued per function (this process' view)
        self._depth: Counter[str] = Counter()
        self._running: Counter[str] = Counter()
        self._total = 0
        self._ready: defaultdict[str, deque[QueueItem]] = defaultdict(deque)
        self._done: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: id → function of every row this runner holds a lease on (ready or running)
        self._leased: dict[str, str] = {}
        #: rows leased at insert that are not due yet, by due time (a thousand ticks of one
        #: second share one entry), and the heap of those due times: started when due
        self._later: dict[float, list[QueueItem]] = {}
        self._later_at: list[float] = []
        self._later_timer = PreciseTimer(self.store.time)
        self._renew_at = 0.0
        self._resync_at = 0.0
        self._stopping = False
        #: the runner is running (rows accepted here may be leased to it at insert)
        self._serving = False
        #: the last claim found fewer due rows than it asked for: claim again only once new
        #: rows came (``_fresh``) or the poll interval passed
        self._dry = False
        self._fresh = True
        #: the earliest due time of a row not yet due, if known (None: ask the store)
        self._due_hint: float | None = None
        self._done_since = 0.0
        #: counters for status and benchmarks
        self.stats: Counter[str] = Counter()

    async def reconfigure(self, config: Config, sinks: Mapping[str, DeadLetterSink]) -> None:
        """A reloaded config: new policies, functions and dead-letter sinks apply from the next
        claim (and a dead letter written after this call goes to the new sink)."""
        self.config = config
        self.dead_letters.reconfigure(sinks)
        self.policies = {n: AsyncPolicy(f.async_) for n, f in config.functions.items()}
        self.poll_s = config.daemon.queue_poll
        self._wake.set()
        async with self._room:  # rows of removed functions no longer hold back accepts
            self._room.notify_all()

    def notify_requeued(self, functions: Iterable[str]) -> None:
        """Rows of ``functions`` (one name per row) were put back into the queue by this
        process (dead-letter replay)."""
        self._depth.update(functions)
        self._fresh = True
        self._wake.set()

    def _notified(self) -> None:
        """Another replica queued events (or released leases): claim again, even after a
        claim that found nothing due (a wake-up alone would wait for the poll)."""
        self._fresh = True
        self._wake.set()

    @property
    def depth(self) -> int:
        """Rows queued for configured functions (what ``max_queued`` bounds)."""
        return sum(n for f, n in self._depth.items() if f in self.config.functions)

    async def start(self) -> None:
        self.store.watch(self._notified)
        released = await self.store.release_dead_owners()
        if released:
            log.info("took back %d events leased by a process that died", released)
        stats = await self.store.queue_stats()
        self._depth = Counter(stats["depth"])
        if self._depth:
            log.info("%d async events queued from before", sum(self._depth.values()))

    # --- accepting ---------------------------------------------------------------------------

    async def accept(self, delivery: Delivery, *, trigger: str, function: str, fmt: Format) -> None:
        """Acceptor: render, commit to the queue, then ack the source."""
        await self.accept_many([delivery], trigger=trigger, function=function, fmt=fmt)

    async def accept_many(
        self, deliveries: Sequence[Delivery], *, trigger: str, function: str, fmt: Format
    ) -> None:
        """Acceptor of a batch: render and encode each event once, commit them all in one
        transaction, then ack each. If the commit fails nothing is acked (the caller nacks)."""
        await self.accept_batch([(d, trigger, function, fmt) for d in deliveries])

    async def accept_batch(self, entries: Sequence[Accepting]) -> None:
        """:meth:`accept_many` for deliveries of several triggers (timers due at one instant)."""
        items: list[QueueItem] = []
        accepted: list[tuple[Delivery, str]] = []
        for delivery, trigger, function, fmt in entries:
            item = await self._prepare(delivery, trigger, function, fmt)
            if item is not None:
                items.append(item)
                accepted.append((delivery, trigger))
        if items:
            await self._enqueue(items)
        if len(accepted) == 1:
            await _ack(*accepted[0])
        elif accepted:
            await asyncio.gather(*(_ack(d, trigger) for d, trigger in accepted))

    async def _prepare(
        self, delivery: Delivery, trigger: str, function: str, fmt: Format
    ) -> QueueItem | None:
        """The queue row of ``delivery``; None if it can never be handled (then it is
        dead-lettered durably and acked here)."""
        if isinstance(delivery, Undeliverable):
            # the source could never make an event of it: dead-letter it (durably), then ack
            await self.dead_letters.write_undeliverable(
                delivery, trigger=trigger, function=function
            )
            self.stats["dead_lettered"] += 1
            await _ack(delivery, trigger)
            return None
        try:
            encoded = delivery.encoded(fmt)
            raw = encoded.raw
            payload = raw.decode()
        except Exception as e:
            # The same event fails the same way every time: a nack would hand it back for
            # a hot redelivery loop (SQS). Dead-letter it (durably), then ack.
            bad = BadEvent(f"trigger {trigger} produced an event that cannot be encoded: {e}")
            salvaged = new_item(
                function,
                salvage(delivery.event, fmt),
                trigger=trigger,
                request_source=delivery.event.request_source,
                now=self.store.time(),
            )
            await self._dead_letter(salvaged, bad, "retrying cannot help", queued=False)
            await _ack(delivery, trigger)
            return None
        item = new_item(
            function,
            payload,
            trigger=trigger,
            request_source=delivery.event.request_source,
            now=self.store.time(),
            dedupe=delivery.dedupe_key,  # scale-out: fire once across replicas
            due_at=delivery.not_before,  # taken ahead of its time: runs when due
            plain=encoded.plain,
        )
        try:
            check_submission(self.config, function, payload, size=len(raw))
        except InvalidRequest as e:
            # Retrying cannot help: dead-letter at once (durably), then ack.
            await self._dead_letter(item, e, "invalid request: retrying cannot help", queued=False)
            await _ack(delivery, trigger)
            return None
        return item

    async def submit(
        self,
        function: str,
        payload: Mapping[str, Any],
        *,
        trigger: str | None = None,
        request_source: str = "API",
        request_id: str | None = None,
    ) -> str:
        """Accept an event that has no source delivery (API ``Event`` invocations, replays).
        Raises InvalidRequest for what can never succeed; returns the request id once durable."""
        text = dumps(payload).decode()
        check_submission(self.config, function, text)
        item = new_item(
            function,
            text,
            trigger=trigger,
            request_source=request_source,
            request_id=request_id,
            now=self.store.time(),
        )
        await self._enqueue([item])
        return item.id

    async def _enqueue(self, items: Sequence[QueueItem]) -> None:
        """Commit ``items`` in one transaction (durable once this returns). A batch waits
        while ``max_queued`` is reached and then goes in whole (it may pass the bound by
        less than its size)."""
        if self.depth >= self.max_queued:
            self._waiting += 1
            try:
                async with self._room:
                    await self._room.wait_for(lambda: self.depth < self.max_queued)
            finally:
                self._waiting -= 1
        counts = Counter(it.function for it in items)
        self._depth.update(counts)
        leases = self._local_leases(items)
        try:
            if leases:
                mine = await self.store.enqueue_leased(items, self.owner, leases)
            else:
                await self.store.enqueue(items)
                mine = []
        except BaseException:
            self._depth.subtract(counts)
            raise
        if len(mine) < len(items):
            self._fresh = True  # rows for the runner to claim
        if self._serving:
            self._run_here(mine)
        elif mine:  # the runner stopped meanwhile: another process may run them
            with contextlib.suppress(Exception):
                await self.store.release([it.id for it in mine])
        self.stats["accepted"] += len(items)
        if self.metrics is not None:
            for name, n in counts.items():
                self.metrics.accepted.labels(name).inc(n)
        self._wake.set()

    def _local_leases(self, items: Sequence[QueueItem]) -> dict[str, float]:
        """Rows accepted here that this runner leases at insert and runs without a claim
        (id → lease expiry): while it runs, up to what it may hold of each function
        (``LOCAL_HOLD`` on a store of its own; on a shared one what a claim would take)."""
        if not self._serving or self._stopping:
            return {}
        leases, now = self._leases(), self.store.time()
        room: dict[str, int] = {}
        out: dict[str, float] = {}
        for it in items:
            fn = it.function
            if fn not in room:
                f = self.config.functions.get(fn)
                if f is None:
                    room[fn] = 0
                    continue
                hold = 2 * f.concurrency + PREFETCH if self.store.shared else LOCAL_HOLD
                room[fn] = hold - self._running[fn] - len(self._ready[fn])
            if room[fn] > 0 and it.due_at <= now + HOLD_AHEAD_S:
                room[fn] -= 1
                out[it.id] = now + leases[fn]
        return out

    def _run_here(self, items: Sequence[QueueItem]) -> None:
        """Rows leased to this runner at insert: ready to start, as if claimed (or held
        until due)."""
        if not items:
            return
        if not self._leased:
            self._renew_at = time.monotonic() + RENEW_EVERY_S
        now, first = self.store.time(), self._later_at[0] if self._later_at else None
        later = self._later
        for it in items:
            if it.id not in self._leased:
                self._leased[it.id] = it.function
                if it.due_at - now > DUE_SKEW_S:
                    held = later.get(it.due_at)
                    if held is None:
                        held = later[it.due_at] = []
                        heapq.heappush(self._later_at, it.due_at)
                    held.append(it)
                else:
                    self._ready[it.function].append(it)
        if self._later_at and self._later_at[0] != first:
            self._hold()
        if not self._stopping:
            self._launch(self._tasks)

    def _hold(self) -> None:
        """Wake up when the first row held until due is due (bridge.clock: on time)."""
        if self._later_at:
            self._later_timer.call_at(self._later_at[0], self._come_due)
        else:
            self._later_timer.cancel()

    def _come_due(self) -> None:
        """Rows held until due that are due now become ready, and start."""
        now, at, ready = self.store.time(), self._later_at, self._ready
        while at and at[0] - now <= DUE_SKEW_S:
            for it in self._later.pop(heapq.heappop(at)):
                ready[it.function].append(it)
        self._hold()
        if not self._stopping:
            self._launch(self._tasks)

    def _settled(self, function: str, n: int = 1) -> bool:
        """``n`` events of ``function`` left the queue: whether an accept waits for the room
        they made (then await :meth:`_room_freed`)."""
        self._depth[function] = max(0, self._depth[function] - n)
        return bool(self._waiting)

    async def _room_freed(self) -> None:
        """Wake the accepts waiting for room in the queue."""
        async with self._room:
            self._room.notify_all()

    # --- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and invoke until ``stop`` is set; then wait up to shutdown_grace for running
        invocations and give the unfinished ones back.

        Each round trip to the store removes the rows completed since the last one and
        claims enough due rows to keep every function busy plus a prefetch of one more
        ``concurrency`` worth, held in memory (their lease covers the wait)."""
        tasks = self._tasks
        stop_wait = asyncio.ensure_future(stop.wait())
        backoff = STORE_RETRY_S
        self._serving = True
        try:
            while not stop.is_set():
                # cleared before looking, so a wake-up during the look is not lost
                self._wake.clear()
                try:
                    await self._renew()
                    if self.store.shared and time.monotonic() >= self._resync_at:
                        await self._resync()
                    launched = self._launch(tasks)
                    claimed = await self._claim()
                    launched += self._launch(tasks)
                    if not (claimed or launched):
                        await self._idle(stop_wait)
                except Exception as e:
                    # SQLite busy beyond busy_timeout, disk full, an I/O error: the rows are
                    # safe where they are; wait and look again, never end the daemon
                    log.error(
                        "the state store failed in the queue runner (%s); retrying in %.0fs",
                        e,
                        backoff,
                        exc_info=True,
                    )
                    await asyncio.wait({stop_wait}, timeout=backoff)
                    backoff = min(backoff * 2, STORE_RETRY_MAX_S)
                    continue
                backoff = STORE_RETRY_S
        finally:
            self._stopping = True
            stop_wait.cancel()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.config.daemon.shutdown_grace)
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.wait(pending)
            with contextlib.suppress(Exception):
                done, self._done = self._done, []
                await self.store.complete(done)
            self._serving = False  # rows leased at insert from now on are given back there
            self._later_timer.cancel()
            self._later.clear()  # leased: given back below
            self._later_at.clear()
            if self._leased:
                with contextlib.suppress(Exception):
                    await self.store.release(list(self._leased))
                self._leased.clear()
            self._ready.clear()

    def _launch(self, tasks: set[asyncio.Task[None]]) -> int:
        """Start ready (claimed) events while their function and the daemon have room."""
        n = 0
        for name, ready in self._ready.items():
            if not ready:
                continue
            limit = self.config.functions[name].concurrency if name in self.config.functions else 1
            while ready and self._running[name] < limit and self._total < self.max_running:
                self._running[name] += 1
                self._total += 1
                # a target that batches takes up to Dispatcher.batch_size events (about
                # BATCH_BUDGET_S of work) in one round trip: what is ready is split evenly
                # among the free slots, so a thousand ticks due at once start on every
                # worker in one round trip each. Quick invocations of a target that runs on
                # the loop go in full batches, one task each (a task costs more than they do)
                spread = self.dispatcher.batches(name)
                size = (
                    self.dispatcher.batch_size(name)
                    if spread
                    else self.dispatcher.loop_batch_size(name)
                )
                if size > 1 and ready[0].dead_letter_reason is None:
                    size = min(len(ready), size)
                    if spread:
                        free = min(limit - self._running[name], self.max_running - self._total)
                        size = min(size, -(-len(ready) // (free + 1)))
                    batch = deque([ready.popleft()])
                    while len(batch) < size and ready[0].dead_letter_reason is None:
                        batch.append(ready.popleft())
                    run: Coroutine[Any, Any, None] = (
                        self._run_batch(list(batch)) if spread else self._run_inline(batch)
                    )
                else:
                    run = self._run_one(ready.popleft())
                tasks.add(asyncio.create_task(run))  # each removes itself when it ends
                n += 1
        return n

    def _must_flush(self) -> bool:
        """Whether the completed rows must be removed from the store now."""
        return bool(self._done) and (
            self._total == 0
            or len(self._done) >= FLUSH_EVERY
            or time.monotonic() - self._done_since >= FLUSH_AFTER_S
        )

    async def _idle(self, stop_wait: asyncio.Future[Any]) -> None:
        if self._must_flush():
            return  # completions to write: go round again at once
        now = self.store.time()
        nxt: float | None = None
        if self._dry:  # nothing due in the store: wake up when the next row is
            if self._due_hint is None:
                self._due_hint = await self.store.next_due(now) or float("inf")
            nxt = self._due_hint if self._due_hint != float("inf") else None
        timeout = self.poll_s if nxt is None else max(0.0, min(self.poll_s, nxt - now))
        if timeout <= 0:
            timeout = self.poll_s  # due work waits for room; a finishing task wakes us
        if self._leased:  # wake up in time to renew the leases
            timeout = max(0.0, min(timeout, self._renew_at - time.monotonic()))
        if self._done:  # in time to flush the completions
            timeout = max(0.0, min(timeout, self._done_since + FLUSH_AFTER_S - time.monotonic()))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait(
                {waker, stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waker.cancel()
        if not done:  # timed out: rows may have come due or been written by another process
            self._fresh = True

    async def _resync(self) -> None:
        """Shared store: other replicas settle (and skip duplicates of) the events this one
        accepted, so the depth that ``max_queued`` bounds is read back from the store."""
        self._resync_at = time.monotonic() + RESYNC_EVERY_S
        self._depth = Counter((await self.store.queue_stats())["depth"])
        async with self._room:
            self._room.notify_all()

    async def _claim(self) -> list[QueueItem]:
        limits: dict[str, int] = {}
        look = self._fresh or not self._dry
        for name, f in self.config.functions.items():
            # keep `concurrency` running and up to `hold` claimed; refill at half of it
            hold = 2 * f.concurrency + PREFETCH
            ready, running = len(self._ready[name]), self._running[name]
            if look and ready < f.concurrency + PREFETCH // 2 and running + ready < hold:
                limits[name] = hold - running - ready
        flush = self._must_flush() or (bool(limits) and bool(self._done))
        if not limits and not flush:
            return []
        done: list[str] = []
        if flush:
            done, self._done = self._done, []
        self._fresh = False
        try:
            items = await self.store.claim(
                self.owner, self.store.time(), limits, self._leases(), complete=done
            )
        except BaseException:
            self._done.extend(done)
            self._fresh = True
            raise
        self._due_hint = None
        if limits:
            self._dry = len(items) < sum(limits.values())
        if not self._leased:
            self._renew_at = time.monotonic() + RENEW_EVERY_S
        # a row of ours that ended during the claim is taken back when its lease looks expired
        # (the wall clock jumped): it is settled, in _done, not to be run again
        ended = set(self._done)
        fresh = [it for it in items if it.id not in self._leased and it.id not in ended]
        for it in fresh:
            self._ready[it.function].append(it)
            self._leased[it.id] = it.function
        return fresh

    def _leases(self) -> dict[str, float]:
        # a prefetched row may wait for one full round of invocations before its own; the
        # lease is renewed while it waits (_renew), so this only bounds a dead runner's hold
        return {n: 2 * f.timeout + LEASE_MARGIN_S for n, f in self.config.functions.items()}

    async def _renew(self) -> None:
        """Extend the leases of the rows this runner holds (waiting for room or running)."""
        if not self._leased or time.monotonic() < self._renew_at:
            return
        leases, now = self._leases(), self.store.time()
        default = 2 * 900 + LEASE_MARGIN_S  # a function removed by a reload: the longest
        await self.store.renew(
            self.owner, {i: now + leases.get(f, default) for i, f in self._leased.items()}
        )
        self._renew_at = time.monotonic() + RENEW_EVERY_S

    async def _run_one(self, item: QueueItem) -> None:
        try:
            await self._settle_leased(item)
        finally:
            self._slot_ended(item.function)

    async def _run_inline(self, items: deque[QueueItem]) -> None:
        """Ready events of a function whose target runs on the loop and whose invocations
        take microseconds (``Dispatcher.loop_batch_size``): invoked one after another on this
        task, in one slot of its concurrency (a :class:`~bridge.dispatcher.Lane`), each
        settled as :meth:`_run_one` settles it. One of them that waits (I/O, a lock) holds
        back no other for long: the loop runs :meth:`_hand_back` once ``HAND_BACK_S`` has
        passed, which gives the ones not started to other slots. A stop gives them back to
        the store."""
        function = items[0].function
        try:
            lane = self.dispatcher.lane(function, invocation_type=ASYNC)
        except InvocationError:  # gone, or no room: each one is refused as it would be
            lane = None
        loop = asyncio.get_running_loop()
        later = loop.call_later(HAND_BACK_S, self._hand_back, items, lane)
        try:
            while items:
                await self._settle_leased(items.popleft(), lane)
        finally:
            later.cancel()
            if lane is not None:
                lane.close()
            self._slot_ended(function)

    def _slot_ended(self, function: str) -> None:
        """A task of :meth:`_launch` ends: its slot is free, and the next ready events start
        without a round trip to the store."""
        self._running[function] -= 1
        self._total -= 1
        self._tasks.discard(asyncio.current_task())
        if not self._stopping:
            self._launch(self._tasks)
        self._wake.set()

    def _hand_back(self, items: deque[QueueItem], lane: Lane | None = None) -> None:
        """A batch of :meth:`_run_inline` is still running: the events it has not started go
        back to the front of the ready queue, in order, and start in the function's free
        slots (a quick function's invocation that waits delays the others by this long);
        what its lane ran so far is counted now, not when the one that waits ends."""
        if lane is not None:
            lane.flush()
        if not items or self._stopping:
            return
        self._ready[items[0].function].extendleft(reversed(items))
        items.clear()
        self._launch(self._tasks)

    def _completed(self, item_id: str) -> None:
        """The row is settled: removed from the store with the next claim (one transaction
        for many)."""
        if not self._done:
            self._done_since = time.monotonic()
        self._done.append(item_id)

    async def _settle_leased(self, item: QueueItem, lane: Lane | None = None) -> None:
        """Invoke one ready event (in ``lane`` if given) and settle it: done, retried or
        dead-lettered; after which the row is no longer held here, unless a stop cancelled
        it: then it stays held, and is given back with the rows not started."""
        try:
            if item.dead_letter_reason is not None:
                await self._retry_dead_letter(item)
            else:
                # encoded once when accepted: the bytes go on to the runtime as they are
                event = RawEvent(item.payload.encode(), plain=item.plain)
                try:
                    if lane is not None:
                        await lane.invoke(event, item.id, item.trigger)
                    else:
                        await self.dispatcher.invoke(
                            item.function,
                            event,
                            invocation_type=ASYNC,
                            trigger=item.trigger,
                            request_id=item.id,
                            size=event.size,
                        )
                except InvocationError as e:
                    await self._failed(item, e)
                else:
                    self._completed(item.id)
                    self.stats["succeeded"] += 1
                    if self._settled(item.function):
                        await self._room_freed()
        except Exception as e:
            # The store failed: the row keeps its lease and comes back when the lease expires.
            extra = {"request_id": item.id, "function": item.function, "trigger": item.trigger}
            log.error("queue bookkeeping for %s failed: %s", item.id, e, exc_info=True, extra=extra)
        except BaseException:
            if not self._stopping:
                self._leased.pop(item.id, None)
            raise
        self._leased.pop(item.id, None)

    async def _run_batch(self, items: list[QueueItem]) -> None:
        """Ready events of one function in one round trip (``Dispatcher.invoke_many``): one
        slot of its concurrency, each event settled as :meth:`_run_one` settles it."""
        function = items[0].function
        forget = True  # popped from _leased at the end (settled or given up)
        try:
            calls = [
                Call(RawEvent(it.payload.encode(), plain=it.plain), it.id, it.trigger)
                for it in items
            ]
            outcomes = await self.dispatcher.invoke_many(function, calls, invocation_type=ASYNC)
            succeeded = 0
            for item, outcome in zip(items, outcomes, strict=True):
                try:
                    if isinstance(outcome, InvocationError):
                        await self._failed(item, outcome)
                        continue
                except Exception as e:
                    log.error(
                        "queue bookkeeping for %s failed: %s",
                        item.id,
                        e,
                        exc_info=True,
                        extra={"request_id": item.id, "function": function},
                    )
                    continue
                self._completed(item.id)
                succeeded += 1
            self.stats["succeeded"] += succeeded
            if succeeded and self._settled(function, succeeded):
                await self._room_freed()
        except asyncio.CancelledError:
            # a stop after shutdown_grace: the rows go back to the store (a row settled
            # meanwhile is completed first), and the next runner runs them
            forget = not self._stopping
            raise
        finally:
            if forget:
                for item in items:
                    self._leased.pop(item.id, None)
            self._slot_ended(function)

    async def _failed(self, item: QueueItem, error: InvocationError) -> None:
        now = self.store.time()
        fn_errors = item.function_errors + (1 if error.uses_retry_budget else 0)
        attempts = item.attempts + 1
        history = History(
            attempts=attempts, function_errors=fn_errors, age_s=now - item.accepted_at
        )
        policy = self.policies.get(item.function)
        failed = _with(item, attempts=attempts, function_errors=fn_errors, error=error)
        extra = {"request_id": item.id, "function": item.function, "trigger": item.trigger}
        if policy is None:  # the function was removed from the config
            await self._dead_letter(
                failed,
                FunctionNotFound(f"function {item.function} is not configured"),
                "function not configured",
            )
            return
        decision = policy.decide(error, history)
        if decision.action is Action.RETRY:
            due = now + decision.delay_s
            await self.store.reschedule(_replace(failed, due_at=due))
            if self._due_hint is not None:
                self._due_hint = min(self._due_hint, due)
            self.stats["retried"] += 1
            if self.metrics is not None:
                self.metrics.retries.labels(item.function, error.error_class.value).inc()
            log.info(
                "retry %d of %s in %.1fs after %s",
                attempts,
                item.id,
                decision.delay_s,
                error.error_class.value,
                extra={**extra, "error_class": error.error_class.value},
            )
        elif decision.action is Action.DROP:
            await self.store.complete([item.id])
            self.stats["dropped"] += 1
            if self.metrics is not None:
                self.metrics.dropped.labels(item.function).inc()
            if self._settled(item.function):
                await self._room_freed()
            log.info("dropped by the function: %s", decision.reason, extra=extra)
        else:
            await self._dead_letter(failed, error, decision.reason)

    async def _dead_letter(
        self, item: QueueItem, error: InvocationError, reason: str, *, queued: bool = True
    ) -> None:
        """Dead-letter ``item`` through the service. ``queued``: it is a queue row, kept and
        retried in :data:`SINK_RETRY_S` if the sink fails; else (an event being accepted) the
        failure is raised, so the source is not acknowledged."""
        now = time.time()
        if not queued and item.attempts == 0:
            item = _replace(item, attempts=1)
        extra = {
            "request_id": item.id,
            "function": item.function,
            "trigger": item.trigger,
            "error_class": error.error_class.value,
        }
        try:
            removed = await self.dead_letters.write(item, error, reason=reason, queued=queued)
        except Exception as e:
            if not queued:
                raise  # the source is not acknowledged: nothing is lost
            log.error(
                "dead-letter sink %s failed (%s); the event stays queued and is retried in %.0fs",
                self.dead_letters.sink_url(item.function),
                e,
                SINK_RETRY_S,
                extra=extra,
            )
            pending = _replace(
                item,
                due_at=now + SINK_RETRY_S,
                dead_letter_reason=reason,
                last_error_class=error.error_class.value,
                last_error=error.message[:4096],
                last_detail=(error.detail or "")[-65536:],
            )
            await self.store.reschedule(pending)
            if self._due_hint is not None:
                self._due_hint = min(self._due_hint, pending.due_at)
            return
        if queued and not removed:
            try:
                await self.store.complete([item.id])
            except Exception as e:
                # The record is in the sink: do not put it again, remove the row with the
                # next claim (its lease holds it until then)
                log.warning(
                    "dead letter written to %s, but removing the event from the queue failed "
                    "(%s); retried with the next claim",
                    self.dead_letters.sink_url(item.function),
                    e,
                    extra=extra,
                )
                self._completed(item.id)
        self.stats["dead_lettered"] += 1
        if queued and self._settled(item.function):
            await self._room_freed()

    async def _retry_dead_letter(self, item: QueueItem) -> None:
        cls = error_for_class(item.last_error_class or "system_error")
        err = cls(item.last_error or "unknown error", detail=item.last_detail)
        await self._dead_letter(item, err, item.dead_letter_reason or "retrying cannot help")


def _replace(item: QueueItem, **kw: Any) -> QueueItem:
    return dataclasses.replace(item, **kw)


def _with(
    item: QueueItem, *, attempts: int, function_errors: int, error: InvocationError
) -> QueueItem:
    return _replace(
        item,
        attempts=attempts,
        function_errors=function_errors,
        last_error_class=error.error_class.value,
        last_error=error.message[:4096],
        last_detail=(error.detail or "")[-65536:],
    )
