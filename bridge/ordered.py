"""Synchronous, ordered invocation for triggers such as Kafka (SCF's CKafka trigger).

A source whose class sets ``ordered = True`` delivers one batch at a time per
partition (or whatever its unit of order is) and does not deliver the next
batch of that partition before the previous one is acked. For each delivery
the :class:`OrderedInvoker`:

1. invokes the function synchronously (``RequestResponse``) with the batch;
2. on failure asks the trigger's :class:`~bridge.retry.OrderedPolicy`
   (``[triggers.NAME.retry]``; SCF: up to 10,000 retries with backoff, invalid
   requests at once) and retries *in place*: the partition waits, nothing
   after it is delivered, the offset is not committed;
3. when the policy gives up, writes the SCF dead-letter record to the
   function's sink — retrying the sink with backoff until it succeeds, so a
   record is never skipped without being dead-lettered;
4. only then acks the delivery (the source commits its offset).

Cancellation (shutdown) abandons the delivery without acking it: the source
redelivers it after the restart. A delivery whose source gave it up
(``Delivery.abandoned``: its Kafka partition was revoked while it was retried)
is neither retried further nor dead-lettered: it is nacked, and the partition's
next owner delivers it again.

A source may hand out several consecutive batches of one partition at once
(``Delivery.order_key``): :meth:`OrderedInvoker.accept_in_order` settles them in
order as above, and passes a target that batches (the python runtime) as many as
``Dispatcher.batch_size`` allows (about ``BATCH_BUDGET_S`` of work) in one round
trip that stops at the first failure: the worker does not run the ones after it.
The failed one is retried (or dead-lettered) as above while the rest wait; then
the rest go on. Once one is nacked (abandoned, or its ack failed) the rest are
nacked without running, as are those found abandoned before they run: nothing
after a batch handed back runs before it. Once the daemon stops, or reloads the
trigger (:meth:`OrderedInvoker.stop_starting`), no new round trip starts: what
was handed out and not started is handed back, and only what runs gets the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from bridge.abc import DeadLetterSink, Delivery, Undeliverable
from bridge.deadletter import DeadLetters, undeliverable_item
from bridge.dispatcher import SYNC, Call, Dispatcher, Result
from bridge.errors import BadEvent, InvocationError
from bridge.events import Format, RawEvent, salvage
from bridge.events import request_id as new_request_id
from bridge.metrics import Metrics
from bridge.retry import Action, OrderedConfig, OrderedPolicy
from bridge.store import QueueItem, StateStore

log = logging.getLogger("bridge.ordered")

SINK_RETRY_MAX_S = 60.0
#: :meth:`OrderedInvoker.stop_starting` for every trigger (not a trigger's name: a name is
#: an identifier)
ALL = "*"


#: how often a retry delay looks at ``Delivery.abandoned``
ABANDON_CHECK_S = 0.5


async def _sleep_unless_abandoned(delivery: Delivery, delay_s: float) -> bool:
    """Sleep ``delay_s``; True (early) as soon as the delivery is abandoned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay_s
    while True:
        if delivery.abandoned:
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, ABANDON_CHECK_S))


class OrderedInvoker:
    """The acceptor of ordered synchronous triggers (see the module docstring)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        store: StateStore,
        sinks: Mapping[str, DeadLetterSink],
        policy_for: Callable[[str], OrderedConfig],
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.store = store
        #: the dead-letter service (the function's sinks)
        self.dead_letters = DeadLetters(store, sinks, metrics)
        self._policy_for = policy_for
        self._policies: dict[str, OrderedPolicy] = {}
        #: triggers whose runs start no new round trip (all of them: ``ALL``)
        self._stopping: set[str] = set()

    def policy(self, trigger: str) -> OrderedPolicy:
        """The trigger's current policy (a reload that changes ``retry`` takes effect with the
        next delivery)."""
        config = self._policy_for(trigger)
        cached = self._policies.get(trigger)
        # the same object until a reload (a pydantic ``==`` is ~0.8 us, once per delivery)
        if cached is None or (cached.config is not config and cached.config != config):
            self._policies[trigger] = cached = OrderedPolicy(config)
        return cached

    def stop_starting(self, trigger: str = ALL) -> None:
        """A stop (of every trigger, or of one for a reload): from now on, runs of
        consecutive deliveries of ``trigger`` start no new round trip and hand back what
        they have not started (their source, or its next owner, delivers it again; none of
        it ran). What runs finishes, or is retried, as before."""
        self._stopping.add(trigger)

    def resume(self, trigger: str = ALL) -> None:
        """``trigger``'s runs start round trips again (it was stopped; it starts anew); all
        triggers' for ``ALL``."""
        if trigger == ALL:
            self._stopping.clear()
        else:
            self._stopping.discard(trigger)

    def _stopped(self, trigger: str) -> bool:
        stopping = self._stopping
        return bool(stopping) and (ALL in stopping or trigger in stopping)

    def reconfigure(self, sinks: Mapping[str, DeadLetterSink]) -> None:
        """A reload: dead letters written from now on go to these sinks."""
        self.dead_letters.reconfigure(sinks)

    async def accept(self, delivery: Delivery, *, trigger: str, function: str, fmt: Format) -> None:
        await self._accept(delivery, trigger, function, fmt)

    async def accept_in_order(
        self, deliveries: Sequence[Delivery], *, trigger: str, function: str, fmt: Format
    ) -> bool:
        """Consecutive deliveries of one unit of order, oldest first (see the module
        docstring): each settled as :meth:`accept` settles it, one after another; runs of
        them in one round trip where the target batches. True if all were acked."""
        todo = deque(deliveries)  # not settled yet, oldest first
        try:
            while todo and not todo[0].abandoned and not self._stopped(trigger):
                events = self._encoded_run(todo, function, fmt)
                if len(events) > 1:
                    settled = await self._run_together(todo, events, trigger, function)
                else:
                    # (more partitions than concurrency: the stop may come while it waits)
                    await self.dispatcher.wait_for_room(function)
                    if self._stopped(trigger):
                        break
                    settled = await self._accept(todo[0], trigger, function, fmt)
                    todo.popleft()
                if not settled:  # handed back: so is everything after it
                    break
        except Exception as e:
            # an ack or the bookkeeping failed: hand this one back (as the pump would) and
            # the rest with it
            for d in todo:
                with contextlib.suppress(Exception):
                    await d.nack(e)
            raise
        for d in todo:
            await d.nack(None)
        return not todo

    def _encoded_run(self, todo: deque[Delivery], function: str, fmt: Format) -> list[RawEvent]:
        """The events of the deliveries at the front of ``todo`` that may go to the function
        in one round trip (up to the first that is undeliverable or cannot be encoded:
        :meth:`_accept` deals with that one alone)."""
        size = self.dispatcher.batch_size(function)
        events: list[RawEvent] = []
        if size < 2 or len(todo) < 2:
            return events
        for delivery in itertools.islice(todo, size):
            if isinstance(delivery, Undeliverable):
                break
            try:
                events.append(delivery.encoded(fmt))
            except Exception:
                break
        return events

    async def _run_together(
        self, todo: deque[Delivery], events: list[RawEvent], trigger: str, function: str
    ) -> bool:
        """Invoke the first ``len(events)`` deliveries of ``todo`` in one round trip that
        stops at the first failure, and settle them (popped from ``todo``): the one that
        failed through the retry policy. False once one was nacked."""
        await self.dispatcher.wait_for_room(function)
        if self._stopped(trigger):
            return False  # none of them started: handed back with the rest
        calls = [Call(event, new_request_id(), trigger) for event in events]
        accepted_at = time.time()
        outcomes = await self.dispatcher.invoke_many(
            function, calls, invocation_type=SYNC, stop_at_failure=True
        )
        for call, outcome in zip(calls, outcomes, strict=True):
            if outcome is None:
                break  # not run (the one before failed and is settled now): goes on next
            delivery = todo[0]
            if isinstance(outcome, Result):
                await delivery.ack()
            elif not await self._invoke(
                delivery, call.event, call.request_id, accepted_at, trigger, function, outcome
            ):
                todo.popleft()
                return False
            todo.popleft()
        return True

    async def _accept(self, delivery: Delivery, trigger: str, function: str, fmt: Format) -> bool:
        """Settle one delivery: True once acked, False if it was nacked."""
        if isinstance(delivery, Undeliverable):
            # the source could never make an event of it: dead-letter it, then ack
            item, bad = undeliverable_item(delivery, trigger=trigger, function=function)
            if await self._dead_letter(item, bad, "retrying cannot help", delivery):
                await delivery.ack()
                return True
            await self._abandon(delivery, bad, 1, {"request_id": item.id, "trigger": trigger})
            return False
        rid = new_request_id()
        accepted_at = time.time()
        try:
            # encoded once (fails the same way each time); the bytes go on to the runtime
            event = delivery.encoded(fmt)
        except Exception as e:
            # retrying cannot help: dead-letter at once, then ack (never a retry loop)
            item = QueueItem(
                id=rid,
                function=function,
                payload=salvage(delivery.event, fmt),
                request_source=delivery.event.request_source,
                trigger=trigger,
                accepted_at=accepted_at,
                due_at=accepted_at,
                attempts=1,
            )
            bad = BadEvent(f"trigger {trigger} produced an event that cannot be encoded: {e}")
            if await self._dead_letter(item, bad, "retrying cannot help", delivery):
                await delivery.ack()
                return True
            await self._abandon(delivery, bad, 1, {"request_id": rid, "trigger": trigger})
            return False
        return await self._invoke(delivery, event, rid, accepted_at, trigger, function)

    async def _invoke(
        self,
        delivery: Delivery,
        event: RawEvent,
        rid: str,
        accepted_at: float,
        trigger: str,
        function: str,
        failed: InvocationError | None = None,
    ) -> bool:
        """Invoke until it succeeds or the policy gives up (dead letter, drop), then ack: True.
        ``failed``: the first attempt was made already and failed so. False: nacked (the
        source gave the delivery up)."""
        policy = self.policy(trigger)
        attempts = 0
        extra = {"request_id": rid, "function": function, "trigger": trigger}
        while True:
            try:
                if failed is not None:  # the first attempt, made by the caller
                    first, failed = failed, None
                    raise first
                # more partitions than reserved concurrency: wait for a slot, not a throttle
                await self.dispatcher.wait_for_room(function)
                await self.dispatcher.invoke(
                    function,
                    event,
                    invocation_type=SYNC,
                    trigger=trigger,
                    request_id=rid,
                    size=event.size,
                )
                break
            except InvocationError as e:
                attempts += 1
                if delivery.abandoned:
                    await self._abandon(delivery, e, attempts, extra)
                    return False
                decision = policy.decide(e, attempts)
                if decision.action is Action.RETRY:
                    if self.metrics is not None:
                        self.metrics.retries.labels(function, e.error_class.value).inc()
                    log.info(
                        "ordered retry %d in %.1fs after %s (the partition waits)",
                        attempts,
                        decision.delay_s,
                        e.error_class.value,
                        extra={**extra, "error_class": e.error_class.value},
                    )
                    if await _sleep_unless_abandoned(delivery, decision.delay_s):
                        await self._abandon(delivery, e, attempts, extra)
                        return False
                    continue
                if decision.action is Action.DEAD_LETTER:
                    item = QueueItem(
                        id=rid,
                        function=function,
                        payload=event.raw.decode(),
                        request_source=delivery.event.request_source,
                        trigger=trigger,
                        accepted_at=accepted_at,
                        due_at=accepted_at,
                        attempts=attempts,
                    )
                    if not await self._dead_letter(item, e, decision.reason, delivery):
                        await self._abandon(delivery, e, attempts, extra)
                        return False
                else:
                    if self.metrics is not None:
                        self.metrics.dropped.labels(function).inc()
                    log.info("dropped by the function: %s", decision.reason, extra=extra)
                break
        await delivery.ack()
        return True

    async def _abandon(
        self, delivery: Delivery, error: InvocationError, attempts: int, extra: dict[str, str]
    ) -> None:
        """The upstream took the delivery back (e.g. its partition was revoked): stop."""
        log.warning(
            "stopped retrying after %d attempt(s) (last: %s): the source gave the event up "
            "(its partition was revoked); the next owner delivers it again",
            attempts,
            error.error_class.value,
            extra=extra,
        )
        await delivery.nack(error)

    async def _dead_letter(
        self, item: QueueItem, error: InvocationError, reason: str, delivery: Delivery
    ) -> bool:
        """Write the dead letter, retrying the sink until it succeeds (True) or the delivery
        is abandoned by its source (False: the next owner handles the event)."""
        delay = 1.0
        while True:
            try:
                await self.dead_letters.write(item, error, reason=reason, invocation_type=SYNC)
                return True
            except Exception as e:
                # The record is not skipped until it is dead-lettered: the partition waits.
                log.error(
                    "dead-letter sink failed (%s); retrying in %.0fs, the partition waits",
                    e,
                    delay,
                    extra={
                        "request_id": item.id,
                        "function": item.function,
                        "trigger": item.trigger,
                    },
                )
                if await _sleep_unless_abandoned(delivery, delay):
                    return False
                delay = min(delay * 2, SINK_RETRY_MAX_S)
