"""The trigger pumps and readiness, a part of :class:`~bridge.daemon.Daemon` kept apart.

A pump per enabled trigger reads while a global in-flight slot is free and hands each
delivery, with a slot taken for it, to its acceptor — the durable queue, or the ordered
invoker for Kafka-style sources — in a task that gives the slot back when the delivery is
settled; a source that reads in batches is asked for as many as slots are free, and holds
none while it waits for events. An ordered source's consecutive deliveries of one unit of
order (``Delivery.order_key``) go to the ordered invoker together, in one task. A source that fails to connect is retried with backoff (1 s
doubling to 60 s) while the other triggers keep running; the daemon is ready (READY=1) once
every source had its first connect attempt, or after ``daemon.start_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

from bridge import systemd
from bridge.abc import BackOff, Delivery, EndOfInput, NotConnected, Source
from bridge.dispatcher import Acceptor, Dispatcher
from bridge.log import redact
from bridge.metrics import Metrics
from bridge.models import Config, TriggerConfig
from bridge.ordered import OrderedInvoker
from bridge.queue import Accepting, DurableQueue
from bridge.schedule import Batch, Scheduled, SchedulePump
from bridge.store import StateStore

if TYPE_CHECKING:
    from bridge.gateway import Gateway
    from bridge.host import RunState

log = logging.getLogger("bridge.daemon")

#: the most deliveries one Source.read_many() call is offered
READ_BATCH = 1000


class Pumps:
    """The pumps and readiness of the daemon (a base of :class:`~bridge.daemon.Daemon`,
    which sets these attributes)."""

    config: Config
    state: RunState
    dispatcher: Dispatcher
    metrics: Metrics
    store: StateStore
    queue: DurableQueue | None
    ordered: OrderedInvoker | None
    acceptor: Acceptor | None
    gateway: Gateway | None
    sources: dict[str, Source[Any]]
    ready: asyncio.Event
    #: unix time of the last event read per trigger; the last connect error per trigger
    last_event: dict[str, float]
    last_error: dict[str, str]
    _pumps: dict[str, asyncio.Task[None]]
    #: serves the timers, while running
    _schedule: SchedulePump | None
    _inflight: dict[str, set[asyncio.Task[None]]]
    _tg: asyncio.TaskGroup | None
    _connected: set[str]
    #: sources that had their first connect attempt
    _attempted: set[str]
    _t0: float

    def acceptor_for(self, trigger: str) -> Acceptor:
        """Ordered sources are invoked in place; every other delivery goes to the queue."""
        src = self.sources.get(trigger)
        if src is not None and type(src).ordered and self.ordered is not None:
            return self.ordered
        assert self.acceptor is not None, "the daemon is not entered"
        return self.acceptor

    def _mark_ready(self) -> None:
        if not self.ready.is_set():
            ms = (time.monotonic() - self._t0) * 1000
            down = self.not_connected()
            log.log(
                logging.WARNING if down else logging.INFO,
                "ready: %d functions, %d triggers running (started in %.0f ms)%s",
                len(self.dispatcher.functions),
                self._running_triggers(),
                ms,
                f"; not connected yet (retried with backoff): {_describe(down)}" if down else "",
            )
            systemd.notify("READY=1", f"STATUS={self.summary()}")
            self.ready.set()

    def not_connected(self) -> dict[str, str]:
        """Running triggers that are not connected, with their last connect error."""
        return {
            n: self.last_error.get(n, "connecting")
            for n in sorted(self.sources)
            if n not in self._connected
        }

    async def _start_timeout(self) -> None:
        await asyncio.sleep(self.config.daemon.start_timeout)
        if not self.ready.is_set():
            log.warning(
                "start timeout (%.0fs): ready without every trigger's first connect attempt",
                self.config.daemon.start_timeout,
            )
        self._mark_ready()

    def _running_triggers(self) -> int:
        """Sources with a pump, plus HTTP triggers served by the gateway."""
        return len(self.sources) + (len(self.gateway.table) if self.gateway is not None else 0)

    def summary(self) -> str:
        depth = self.queue.depth if self.queue is not None else 0
        down = self.not_connected()
        not_run = [  # (a disabled one is not expected to run)
            name for name, (*_, enabled) in self.config.skipped_triggers.items() if enabled
        ]
        return (
            f"{self.state.value}: {len(self.dispatcher.functions)} functions, "
            f"{self._running_triggers()} triggers, {self.dispatcher.in_flight()} in flight, "
            f"{depth} queued"
            + (f"; {len(down)} not connected: {_describe(down)}" if down else "")
            + (f"; not run: {', '.join(not_run)} (see the log)" if not_run else "")
        )

    def _start_pump(self, name: str, src: Source[Any]) -> None:
        assert self._tg is not None
        self._inflight[name] = set()
        pump = (
            self._join_schedule(name, src) if isinstance(src, Scheduled) else self._pump(name, src)
        )
        self._pumps[name] = self._tg.create_task(pump, name=f"pump:{name}")

    async def _join_schedule(self, name: str, src: Scheduled) -> None:
        """A scheduled source (timers) is read by the one schedule pump (bridge/schedule.py):
        connect it, hand it over, take it back when this task is cancelled (stop, reload)."""
        assert isinstance(src, Source) and self._schedule is not None
        await self._connect(name, src)
        self._schedule.add(name, src)
        try:
            await asyncio.Event().wait()
        finally:
            self._schedule.remove(name)

    def _scheduled_batch(self, batch: Batch) -> None:
        """Accept what the schedule pump took (one in-flight slot held per delivery): the
        deliveries bound for the durable queue in one transaction, the others one by one."""
        assert self._tg is not None
        tg, now, queued = self._tg, time.time(), []
        received = self.metrics.events_received
        for name, n in collections.Counter(name for name, _ in batch).items():
            received.labels(name, self.config.triggers[name].type).inc(n)
            self.last_event[name] = now
        for name, delivery in batch:
            tc = self.config.triggers[name]
            acceptor = self.acceptor_for(name)
            if isinstance(acceptor, DurableQueue):
                queued.append((delivery, name, tc.function, tc.format))
            else:  # not a queue, which would hold it until due: wait for its time here
                self._track(name, tg.create_task(self._handle(name, tc, delivery, due=True)))
        if queued and self.queue is not None:
            task = tg.create_task(self._handle_batch(self.queue, queued))
            for name in {trigger for _, trigger, _, _ in queued}:
                self._track(name, task)

    def _track(self, name: str, task: asyncio.Task[None]) -> None:
        inflight = self._inflight.get(name)
        if inflight is not None:
            inflight.add(task)
            task.add_done_callback(inflight.discard)

    async def _connect(self, name: str, src: Source[Any]) -> None:
        delay = 1.0
        while True:
            try:
                await src.connect()
            except Exception as e:
                log.error(
                    "trigger %s cannot connect: %s; retrying in %.0fs",
                    name,
                    e,
                    delay,
                    extra={"trigger": name},
                )
                # shown in STATUS=, /readyz and `status`: masked like a log line
                self.last_error[name] = redact(str(e) or type(e).__name__)
                self._first_attempt(name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            self._connected.add(name)
            if name in self.last_error:
                log.info("trigger %s connected", name, extra={"trigger": name})
            self._first_attempt(name)
            return

    def _first_attempt(self, name: str) -> None:
        self._attempted.add(name)
        if self._attempted >= set(self.sources):
            self._mark_ready()
        elif self.ready.is_set():
            systemd.notify(f"STATUS={self.summary()}")

    async def _pump(self, name: str, src: Source[Any]) -> None:
        """Read ``name`` while there is room. A plain source takes an in-flight slot, then
        reads. A batching source waits for a free slot without keeping it, asks for as many
        deliveries as slots are free, and takes a slot per delivery it got: a source with
        nothing to read holds no slot that another trigger could use."""
        tc = self.config.triggers[name]
        slots = self.dispatcher.slots
        received = self.metrics.events_received.labels(name, tc.type)
        batched = type(src).read_many is not Source.read_many
        held = 0 if batched else 1  # slots held while reading
        room = 1
        await self._connect(name, src)
        while True:
            #: per unit of order, whether the part of it started before was all acked (when
            #: the room shrank since the read, a unit's deliveries start in several parts)
            tails: dict[Hashable, asyncio.Future[bool]] = {}
            await slots.acquire()
            if batched:
                room = min(READ_BATCH, 1 + _free(slots))
                slots.release()
            try:
                deliveries = list(await src.read_many(room)) if batched else [await src.read()]
            except EndOfInput:
                _release(slots, held)
                self._no_more_events(name)
                return
            except NotConnected:
                _release(slots, held)
                self._connected.discard(name)
                await self._connect(name, src)
                continue
            except BackOff as b:
                _release(slots, held)
                await asyncio.sleep(b.delay_s)
                continue
            except asyncio.CancelledError:
                _release(slots, held)
                raise
            except Exception as e:
                _release(slots, held)
                log.error(
                    "trigger %s failed to read: %s; reconnecting",
                    name,
                    e,
                    exc_info=True,
                    extra={"trigger": name},
                )
                await asyncio.sleep(1.0)
                continue
            if not deliveries:
                continue
            received.inc(len(deliveries))
            self.last_event[name] = time.time()
            if not batched:
                self._start(name, tc, deliveries)
                continue
            if len(deliveries) > room:  # a broken contract; the slots still bound what runs
                log.error(
                    "trigger %s returned %d deliveries for room for %d",
                    name,
                    len(deliveries),
                    room,
                )
            # a slot per delivery; each run of free slots taken is started at once, so no
            # slot is held while waiting for the next (the room may be gone since the read)
            while deliveries:
                await slots.acquire()
                n = 1
                while n < len(deliveries) and not slots.locked():
                    await slots.acquire()  # free: returns at once
                    n += 1
                self._start(name, tc, deliveries[:n], tails)
                del deliveries[:n]

    def _start(
        self,
        name: str,
        tc: TriggerConfig,
        deliveries: list[Delivery],
        tails: dict[Hashable, asyncio.Future[bool]] | None = None,
    ) -> None:
        """Hand deliveries, a slot taken for each, to their acceptor in tasks of their own
        (a batch for the queue in one transaction; an ordered unit's deliveries in order,
        after the part of that unit started before, if any, in ``tails``)."""
        assert self._tg is not None
        acceptor = self.acceptor_for(name)
        if len(deliveries) > 1 and isinstance(acceptor, DurableQueue):
            entries = [(d, name, tc.function, tc.format) for d in deliveries]
            tasks = [self._tg.create_task(self._handle_batch(acceptor, entries))]
        elif isinstance(acceptor, OrderedInvoker):
            units: dict[Hashable, list[Delivery]] = {}
            tasks = []
            for d in deliveries:
                if d.order_key is None:
                    tasks.append(self._tg.create_task(self._handle(name, tc, d)))
                else:
                    units.setdefault(d.order_key, []).append(d)
            tails = {} if tails is None else tails
            for key, unit in units.items():
                after, done = tails.get(key), asyncio.get_running_loop().create_future()
                tails[key] = done
                run = self._handle_in_order(acceptor, name, tc, unit, after, done)
                tasks.append(self._tg.create_task(run))
        else:  # one at a time
            tasks = [self._tg.create_task(self._handle(name, tc, d)) for d in deliveries]
        for task in tasks:
            self._track(name, task)

    async def _handle(
        self, name: str, tc: TriggerConfig, delivery: Delivery, *, due: bool = False
    ) -> None:
        try:
            if due and delivery.not_before is not None:
                await asyncio.sleep(delivery.not_before - self.store.time())
            await self.acceptor_for(name).accept(
                delivery, trigger=name, function=tc.function, fmt=tc.format
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # One bad event must never take the daemon down; it is logged with its trigger.
            self._failed_accept(name, e)
            with contextlib.suppress(Exception):
                await delivery.nack(e)
        finally:
            self.dispatcher.slots.release()

    async def _handle_in_order(
        self,
        ordered: OrderedInvoker,
        name: str,
        tc: TriggerConfig,
        deliveries: list[Delivery],
        after: asyncio.Future[bool] | None,
        done: asyncio.Future[bool],
    ) -> None:
        """Consecutive deliveries of one unit of order, once the part before them (``after``)
        is settled, and only if it was all acked; ``done`` says whether these were."""
        acked = False
        try:
            if after is not None and not await after:
                for delivery in deliveries:  # one before them was handed back: so are they
                    await delivery.nack(None)
                return
            acked = await ordered.accept_in_order(
                deliveries, trigger=name, function=tc.function, fmt=tc.format
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed_accept(name, e)  # the unsettled ones were nacked
        finally:
            if not done.done():
                done.set_result(acked)
            _release(self.dispatcher.slots, len(deliveries))

    async def _handle_batch(self, queue: DurableQueue, entries: list[Accepting]) -> None:
        """One transaction for the batch; each delivery acked after it (or all nacked)."""
        try:
            await queue.accept_batch(entries)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            for name in dict.fromkeys(trigger for _, trigger, _, _ in entries):
                self._failed_accept(name, e)
            for delivery, *_ in entries:
                with contextlib.suppress(Exception):
                    await delivery.nack(e)
        finally:
            _release(self.dispatcher.slots, len(entries))

    @staticmethod
    def _no_more_events(name: str) -> None:
        log.info("trigger %s has no more events", name, extra={"trigger": name})

    @staticmethod
    def _failed_accept(name: str, e: Exception) -> None:
        log.error(
            "handling an event of trigger %s failed: %s",
            name,
            e,
            exc_info=True,
            extra={"trigger": name},
        )


def _free(slots: asyncio.Semaphore) -> int:
    """In-flight slots free now, without taking them (none while others wait for one)."""
    return 0 if slots.locked() else slots._value


def _release(slots: asyncio.Semaphore, n: int) -> None:
    for _ in range(n):
        slots.release()


def _describe(down: Mapping[str, str]) -> str:
    return ", ".join(f"{n} ({why})" for n, why in down.items())
