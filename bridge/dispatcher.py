"""The dispatcher: invokes functions with SCF's semantics.

- **Reserved concurrency** per function: an invocation beyond ``concurrency``
  in-flight calls fails at once with :class:`~bridge.errors.Throttled`
  ("Resource limit exceed for function"), as in SCF; it is never queued in
  memory. What happens next is the caller's policy (async triggers retry).
- **A global bound on in-flight events** (``daemon.max_in_flight``): trigger
  pumps take a slot *before* reading the next event from their source, so when
  the bound is reached sources are simply not read — back-pressure instead of
  an unbounded buffer.
- A **request id** per invocation, START / END / REPORT log lines, and an
  error class on every failure: anything that is not an
  :class:`~bridge.errors.InvocationError` is wrapped as a system error.

Deliveries reach the dispatcher through an :class:`Acceptor`: the durable
queue (:mod:`bridge.queue`) for async triggers, the ordered invoker
(:mod:`bridge.ordered`) for Kafka-style ones. An acceptor acks a delivery only
once the event is accepted (queued durably) or settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import traceback
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from bridge.abc import Delivery, Invocation, Target
from bridge.config import FunctionConfig
from bridge.errors import (
    BadEvent,
    EventTooLarge,
    FunctionNotFound,
    InvocationError,
    SystemFault,
    Throttled,
)
from bridge.events import Format, RawEvent, dumps
from bridge.events import request_id as new_request_id
from bridge.log import HotLog
from bridge.metrics import Metrics

log = logging.getLogger("bridge.dispatcher")
#: an invocation's START, END and REPORT lines (bridge.log.HotLog: the same records, cheaper)
hot = HotLog(log)

#: SCF's payload limits: 6 MB for synchronous, 128 KB for asynchronous invocations.
MAX_SYNC_EVENT = 6 * 1024 * 1024
MAX_ASYNC_EVENT = 128 * 1024

#: the most invocations of a function handed over in one round trip (targets that batch)
MAX_BATCH = 256
#: a round trip holds a worker for about this long at the most, by the function's recent
#: duration per invocation: a stop (SIGTERM) waits for what a worker was handed, and
#: invocations of seconds each go one at a time. Until a function has run once, its
#: invocations go one at a time (its first ones give the measure).
BATCH_BUDGET_S = 0.05
#: a target without a round trip of its own (its invocations run on the event loop: a
#: plugin's) whose invocations take less than this each does not wait for anything: a
#: task each would cost more than the invocation, so the queue runs its ready events one
#: after another on one task (bridge.queue: a thousand ticks due at once, 4 tasks, not
#: 1,000). One that waits (I/O, a lock) takes longer and keeps a task per invocation.
LOOP_BATCH_EVENT_S = 50e-6

SYNC = "RequestResponse"
ASYNC = "Event"
#: the metrics label of invocations of functions that do not exist
UNKNOWN_FUNCTION = "<unknown>"


@dataclasses.dataclass(slots=True)
class Result:
    request_id: str
    value: Any
    duration_ms: float
    max_memory_bytes: int | None = None


@dataclasses.dataclass(slots=True)
class _Function:
    name: str
    config: FunctionConfig
    target: Target[Any]
    in_flight: int = 0
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: set while in_flight < concurrency
    room: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.room.set()


def _check_room(fn: _Function, function: str) -> None:
    if fn.in_flight >= fn.config.concurrency:
        raise Throttled(
            f"Resource limit exceed for function {function} (concurrency {fn.config.concurrency})"
        )


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class Call(NamedTuple):
    """One invocation of :meth:`Dispatcher.invoke_many`."""

    event: Any
    request_id: str
    trigger: str | None


def _fitting(per_event: float) -> int:
    """How many invocations of ``per_event`` seconds each fit in :data:`BATCH_BUDGET_S`
    (1 to :data:`MAX_BATCH`)."""
    return max(1, min(MAX_BATCH, int(BATCH_BUDGET_S / max(per_event, 1e-6))))


def _end(fn: _Function) -> None:
    """Give back the slot :meth:`Dispatcher._begin` took."""
    fn.in_flight -= 1
    fn.room.set()
    if not fn.in_flight:
        fn.idle.set()


class Dispatcher:
    """Owns the function targets; ``invoke`` runs one invocation."""

    def __init__(
        self,
        targets: Mapping[str, Target[Any]],
        *,
        max_in_flight: int = 1000,
        metrics: Metrics | None = None,
    ) -> None:
        self._functions = {name: _Function(name, t.config, t) for name, t in targets.items()}
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.slots = asyncio.Semaphore(max_in_flight)
        self._started: list[Target[Any]] = []
        #: each function's recent duration per invocation (seconds), once it has run
        self._per_event: dict[str, float] = {}

    @property
    def functions(self) -> list[str]:
        return sorted(self._functions)

    def in_flight(self, function: str | None = None) -> int:
        if function is not None:
            return self._functions[function].in_flight
        return sum(f.in_flight for f in self._functions.values())

    def batches(self, function: str) -> bool:
        """Whether ``function``'s target takes several invocations in one round trip (it
        has ``invoke_many``: the python runtime, whose workers run them in parallel)."""
        fn = self._functions.get(function)
        return fn is not None and hasattr(fn.target, "invoke_many")

    def runs_together(self, function: str) -> bool:
        """Whether ``function`` takes several invocations in one round trip now
        (:meth:`batch_size` over 1): what an ordered source's ``ctx.batches()`` answers."""
        return self.batch_size(function) > 1

    def batch_size(self, function: str) -> int:
        """The most invocations of ``function`` one round trip may take: what its recent
        duration per invocation fits in :data:`BATCH_BUDGET_S` (1 until it has run once, or
        if its target does not batch)."""
        per_event = self._per_event.get(function)
        if per_event is None or not self.batches(function):
            return 1
        return _fitting(per_event)

    def loop_batch_size(self, function: str) -> int:
        """For a target that runs on the loop (no ``invoke_many``): how many ready events one
        task may invoke one after another (each with :meth:`invoke`), as :meth:`batch_size`
        counts, once its recent invocations took under :data:`LOOP_BATCH_EVENT_S` each;
        else 1 (a task each)."""
        per_event = self._per_event.get(function)
        if per_event is None or per_event >= LOOP_BATCH_EVENT_S or self.batches(function):
            return 1
        return _fitting(per_event)

    def _measured(self, function: str, seconds: float, n: int) -> None:
        per_event = seconds / n
        old = self._per_event.get(function)
        self._per_event[function] = per_event if old is None else 0.7 * old + 0.3 * per_event

    async def wait_for_room(self, function: str) -> None:
        """Wait until ``function`` has a free slot of its reserved concurrency (ordered
        triggers wait here instead of being throttled; another caller may still take the
        slot first). Returns at once for an unknown function (invoke will say so)."""
        while (
            fn := self._functions.get(function)
        ) is not None and fn.in_flight >= fn.config.concurrency:
            await fn.room.wait()

    async def start(self) -> None:
        for f in self._functions.values():
            await f.target.start()
            self._started.append(f.target)

    async def replace(
        self, name: str, target: Target[Any] | None, grace: float, *, started: bool = False
    ) -> None:
        """Route new invocations of ``name`` to ``target`` (started here unless ``started``;
        None removes the function). Invocations already running on the old target finish there
        (SCF: during an update requests are served by the old or the new code); the old target
        is closed once they are done, or after ``grace`` seconds (a failure to close it is
        logged). If the new target fails to start, the old one stays and the error
        propagates."""
        if target is not None:
            if not started:
                await target.start()
            self._started.append(target)
        old = self._functions.pop(name, None)
        if target is not None:
            self._functions[name] = _Function(name, target.config, target)
        if old is None:
            return
        if old.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.idle.wait(), grace)
        if old.in_flight:
            log.warning(
                "closing the previous %s with %d invocations still running", name, old.in_flight
            )
        if old.target in self._started:
            self._started.remove(old.target)
        try:
            await old.target.close()
        except Exception as e:  # the new target already serves: not a reason to fail
            log.error("closing the previous %s failed: %s", name, e, exc_info=True)

    async def close(self) -> None:
        errors = []
        while self._started:
            t = self._started.pop()
            try:
                await t.close()
            except Exception as e:  # keep closing the others; report all
                log.error("closing function %s failed: %s", t.ctx.name, e, exc_info=True)
                errors.append(e)
        if errors:
            raise errors[0]

    async def invoke(
        self,
        function: str,
        event: Any,
        *,
        invocation_type: str = SYNC,
        trigger: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        size: int | None = None,
    ) -> Result:
        """Invoke ``function`` once with ``event`` (a JSON object). Raises InvocationError.

        ``event`` may be a :class:`~bridge.events.RawEvent` (the queue's stored bytes): a
        target that ``takes_raw`` gets it as it is, any other the decoded dict. ``size`` is
        the event's JSON size when the caller already knows it."""
        rid = request_id or new_request_id()
        extra = {"request_id": rid, "function": function, "trigger": trigger}
        fn = self._functions.get(function)
        try:
            fn = self._found(fn, function)
            event = self._checked(fn, event, invocation_type, size)
            _check_room(fn, function)
        except InvocationError as e:
            self._rejected(e, fn, function, rid, extra)
            raise

        inv = self._begin(fn, rid, invocation_type, trigger, headers, extra)
        t0 = time.perf_counter()
        try:
            value = await fn.target.invoke(event, inv)
        except Exception as e:
            err = self._failed(e, inv)
            self._report(inv, _ms(t0), extra, fn.config, error=err)
            if err is e:
                raise
            raise err from e
        finally:
            _end(fn)
            self._measured(function, time.perf_counter() - t0, 1)
        ms = self._report(inv, _ms(t0), extra, fn.config)
        return Result(rid, value, ms, inv.max_memory_bytes)

    def lane(self, function: str, *, invocation_type: str = ASYNC) -> Lane:
        """Invocations of ``function`` one after another on the calling task, in one slot of
        its reserved concurrency, until :meth:`Lane.close`: each as :meth:`invoke` runs it,
        what is the same for all of them done once (for the queue's quick in-process
        invocations, whose per-call overhead is most of their cost). Raises FunctionNotFound
        or Throttled, counted and logged by nobody: the caller invokes one by one instead."""
        fn = self._found(self._functions.get(function), function)
        _check_room(fn, function)
        self._begin_slot(fn)
        return Lane(self, fn, invocation_type)

    async def invoke_many(
        self,
        function: str,
        calls: Sequence[Call],
        *,
        invocation_type: str = ASYNC,
        stop_at_failure: bool = False,
    ) -> list[Result | InvocationError | None]:
        """Invoke ``function`` once per call, as :meth:`invoke` does, taking one slot of its
        reserved concurrency for them all: a target with ``invoke_many`` (the python runtime)
        gets them in one round trip and runs them one after another, any other one by one.
        Returns each call's Result or its InvocationError (never raises one).

        ``stop_at_failure`` (an ordered trigger's consecutive batches): nothing runs after
        the first call that failed (or was refused); each call not run is None."""
        out: list[Result | InvocationError | None] = [None] * len(calls)
        fn = self._functions.get(function)
        runs: list[tuple[int, Any, str | None, dict[str, Any]]] = []
        for i, call in enumerate(calls):
            extra: dict[str, Any] = {
                "request_id": call.request_id,
                "function": function,
                "trigger": call.trigger,
            }
            try:
                fn = self._found(fn, function)
                event = self._checked(fn, call.event, invocation_type, None)
                if not runs:
                    _check_room(fn, function)
            except InvocationError as e:
                self._rejected(e, fn, function, call.request_id, extra)
                out[i] = e
                if stop_at_failure:
                    break
                continue
            runs.append((i, event, call.trigger, extra))
        if runs:
            assert fn is not None
            invs = [  # one slot for the batch
                self._begin(
                    fn, calls[i].request_id, invocation_type, trigger, None, extra, take=n == 0
                )
                for n, (i, _, trigger, extra) in enumerate(runs)
            ]
            t0 = time.perf_counter()
            try:
                values = await self._run_many(
                    fn.target, [e for _, e, _, _ in runs], invs, stop_at_failure
                )
            finally:
                _end(fn)
            self._measured(function, time.perf_counter() - t0, len(values) or 1)
            for (i, _, _, extra), inv in zip(runs[len(values) :], invs[len(values) :], strict=True):
                out[i] = None  # an earlier one failed: this one did not run
                hot.info("END RequestId: %s", inv.request_id, extra={**extra, "outcome": "not_run"})
            # each one ran from its start to the next one's start (the last: until now)
            ends = [inv.started for inv in invs[1:]] + [time.monotonic()]
            for (i, _, _, extra), inv, value, end in zip(runs, invs, values, ends, strict=False):
                ms = (end - inv.started) * 1000
                if isinstance(value, Exception):
                    err = self._failed(value, inv)
                    self._report(inv, ms, extra, fn.config, error=err)
                    out[i] = err
                else:
                    self._report(inv, ms, extra, fn.config)
                    out[i] = Result(inv.request_id, value, ms, inv.max_memory_bytes)
        if stop_at_failure:
            first = next((k for k, o in enumerate(out) if not isinstance(o, Result)), len(out))
            return [*out[: first + 1], *[None] * (len(out) - first - 1)]
        return out

    @staticmethod
    async def _run_many(
        target: Target[Any], events: list[Any], invs: list[Invocation], stop: bool
    ) -> list[Any]:
        """Each invocation's value or exception; ``stop``: up to the first exception."""
        many = getattr(target, "invoke_many", None)
        if many is not None:
            try:
                if stop:
                    values: list[Any] = await many(events, invs, stop_at_failure=True)
                else:
                    values = await many(events, invs)
            except Exception as e:
                values = [e] * (1 if stop else len(invs))
            return values
        values = []
        for event, inv in zip(events, invs, strict=True):
            inv.started = time.monotonic()
            try:
                values.append(await target.invoke(event, inv))
            except Exception as e:
                values.append(e)
                if stop:
                    break
        return values

    def _found(self, fn: _Function | None, function: str) -> _Function:
        if fn is None:
            raise FunctionNotFound(
                f"function {function} not found (defined: {', '.join(self.functions) or 'none'})"
            )
        return fn

    @staticmethod
    def _checked(fn: _Function, event: Any, invocation_type: str, size: int | None) -> Any:
        """The event as ``fn``'s target takes it; raises what makes it invalid."""
        if type(event) is RawEvent:  # encoded once, by the queue
            if not event.is_object():
                raise BadEvent("the event must be a JSON object")
            if size is None:
                size = event.size
            if not fn.target.takes_raw:
                try:
                    event = event.obj
                except ValueError as e:
                    raise BadEvent(f"the event is not valid JSON: {e}") from None
        elif not isinstance(event, Mapping):
            raise BadEvent(f"the event must be a JSON object, not {type(event).__name__}")
        limit = MAX_ASYNC_EVENT if invocation_type == ASYNC else MAX_SYNC_EVENT
        if size is None:
            size = len(dumps(event))
        if size > limit:
            raise EventTooLarge(
                f"event is {size} bytes; {invocation_type} invocations allow at most {limit}"
            )
        return event

    @contextlib.asynccontextmanager
    async def session(
        self,
        function: str,
        *,
        trigger: str | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[tuple[Target[Any], Invocation]]:
        """One synchronous invocation that the caller carries out on the target itself (the
        gateway streaming a raw request to a web function), with what :meth:`invoke` gives
        every invocation: the reserved-concurrency check (:class:`Throttled`), the request id,
        START / END / REPORT lines and metrics. An exception leaving the block is the
        invocation's error; one that is not an InvocationError is reported as a system error.
        """
        rid = request_id or new_request_id()
        extra = {"request_id": rid, "function": function, "trigger": trigger}
        fn = self._functions.get(function)
        try:
            if fn is None:
                raise FunctionNotFound(f"function {function} not found")
            _check_room(fn, function)
        except InvocationError as e:
            self._rejected(e, fn, function, rid, extra)
            raise
        inv = self._begin(fn, rid, SYNC, trigger, headers, extra)
        t0 = time.perf_counter()
        try:
            yield fn.target, inv
        except Exception as e:
            err = self._failed(e, inv)
            self._report(inv, _ms(t0), extra, fn.config, error=err)
            if err is e:
                raise
            raise err from e
        except asyncio.CancelledError:
            err = SystemFault("the invocation was cancelled (the client left, or shutdown)")
            self._report(inv, _ms(t0), extra, fn.config, error=err)
            raise
        else:
            self._report(inv, _ms(t0), extra, fn.config)
        finally:
            _end(fn)

    def _rejected(
        self,
        e: InvocationError,
        fn: _Function | None,
        function: str,
        rid: str,
        extra: dict[str, Any],
    ) -> None:
        """An invocation refused before it ran: tag, count and log the error."""
        e.request_id, e.function = rid, function
        if self.metrics is not None:
            # a name from a caller is not a label: one series per typo would grow forever
            self.metrics.observe(UNKNOWN_FUNCTION if fn is None else function, e.error_class.value)
        log.warning(
            "%s rejected: %s",
            function,
            e.message,
            extra={**extra, "error_class": e.error_class.value},
        )

    @staticmethod
    def _begin(
        fn: _Function,
        rid: str,
        invocation_type: str,
        trigger: str | None,
        headers: Mapping[str, str] | None,
        extra: dict[str, Any],
        *,
        take: bool = True,
    ) -> Invocation:
        """Take a slot of ``fn``'s reserved concurrency (unless not ``take``) and log START."""
        inv = Invocation(
            request_id=rid,
            function=fn.name,
            invocation_type=invocation_type,
            trigger=trigger,
            timeout_s=fn.config.timeout,
            headers=headers or {},
        )
        if take:
            Dispatcher._begin_slot(fn)
        hot.info("START RequestId: %s", rid, extra=extra)
        return inv

    @staticmethod
    def _begin_slot(fn: _Function) -> None:
        """Take a slot of ``fn``'s reserved concurrency (:func:`_end` gives it back)."""
        fn.in_flight += 1
        if fn.in_flight == 1:
            fn.idle.clear()
        if fn.in_flight >= fn.config.concurrency:
            fn.room.clear()

    @staticmethod
    def _failed(e: Exception, inv: Invocation) -> InvocationError:
        """The invocation's error: an InvocationError as it is, anything else a system fault."""
        err = (
            e
            if isinstance(e, InvocationError)
            else SystemFault(f"{type(e).__name__}: {e}", detail=traceback.format_exc())
        )
        err.request_id, err.function = inv.request_id, inv.function
        return err

    def target(self, function: str) -> Target[Any] | None:
        """The target now serving ``function`` (None if there is none)."""
        fn = self._functions.get(function)
        return fn.target if fn is not None else None

    def _report(
        self,
        inv: Invocation,
        ms: float,
        extra: dict[str, Any],
        config: FunctionConfig,
        error: InvocationError | None = None,
    ) -> float:
        # the config the invocation ran with: a reload may have removed the function since
        outcome = "success" if error is None else error.error_class.value
        if self.metrics is not None:
            self.metrics.observe(inv.function, outcome, ms / 1000)
        if error is not None:
            log.error(
                "%s failed (%s): %s",
                inv.function,
                error.error_class.value,
                error.message,
                extra={**extra, "outcome": outcome, "error_class": error.error_class.value},
            )
        if log.isEnabledFor(logging.INFO):
            _lines(inv, ms, extra, config, outcome)
        return ms


def _lines(
    inv: Invocation, ms: float, extra: dict[str, Any], config: FunctionConfig, outcome: str
) -> None:
    """An invocation's END and REPORT lines (at ``info``)."""
    extra = {**extra, "outcome": outcome}
    hot.info("END RequestId: %s", inv.request_id, extra=extra)
    mem = (
        f" MemUsage: {inv.max_memory_bytes / 1048576:.2f} MB"
        if inv.max_memory_bytes is not None
        else ""
    )
    hot.info(
        "REPORT RequestId: %s Duration: %.3f ms Memory: %d MB%s",
        inv.request_id,
        ms,
        config.memory // 1048576,
        mem,
        # the log store keeps one row per invocation from these (bridge.logstore)
        extra={**extra, "duration_ms": ms, "memory_bytes": inv.max_memory_bytes},
    )


class Lane:
    """Invocations of one function one after another, in the one slot of its reserved
    concurrency that :meth:`Dispatcher.lane` took; :meth:`close` gives it back. Checked
    once for them all: whether ``info`` lines are logged; the metrics and the function's
    duration per invocation get its successful invocations at :meth:`flush`.

    What differs from :meth:`Dispatcher.invoke` is only what it skips: an invocation that
    fails gives the slot back (the caller's bookkeeping of the failure does not hold it),
    and the next one takes it again, throttled as ``invoke`` would be; once a reload has
    replaced or removed the function, each invocation is ``invoke``'s."""

    __slots__ = (
        "_dispatcher",
        "_durations",
        "_fn",
        "_held",
        "_info",
        "_invocation_type",
        "_limit",
        "_n",
        "_seconds",
        "closed",
    )

    def __init__(self, dispatcher: Dispatcher, fn: _Function, invocation_type: str) -> None:
        self._dispatcher, self._fn, self._invocation_type = dispatcher, fn, invocation_type
        self._limit = MAX_ASYNC_EVENT if invocation_type == ASYNC else MAX_SYNC_EVENT
        self._info = log.isEnabledFor(logging.INFO)
        self._held = True  # the slot Dispatcher.lane took
        #: since the last flush: the durations of the successful invocations (seconds), and
        #: how many ran and their time
        self._durations: list[float | None] = []
        self._n, self._seconds = 0, 0.0
        self.closed = False

    async def invoke(self, event: Any, request_id: str, trigger: str | None = None) -> Result:
        """Invoke the function once, as :meth:`Dispatcher.invoke` does, in the lane's slot.
        Raises InvocationError."""
        d, fn = self._dispatcher, self._fn
        if self.closed:
            raise RuntimeError("the lane is closed")
        function = fn.name
        if d._functions.get(function) is not fn:  # a reload replaced or removed it
            return await d.invoke(
                function,
                event,
                invocation_type=self._invocation_type,
                trigger=trigger,
                request_id=request_id,
            )
        extra = {"request_id": request_id, "function": function, "trigger": trigger}
        # the queue's events (a RawEvent of a JSON object within the limit), checked here
        ok = type(event) is RawEvent and event.is_object() and event.size <= self._limit
        if ok and not fn.target.takes_raw:
            try:
                event = event.obj
            except ValueError:
                ok = False  # _checked says what is wrong with it
        try:
            if not ok:
                event = d._checked(fn, event, self._invocation_type, None)
            if not self._held:  # given back after a failure: taken again
                _check_room(fn, function)
                d._begin_slot(fn)
                self._held = True
        except InvocationError as e:
            d._rejected(e, fn, function, request_id, extra)
            raise
        inv = Invocation(
            request_id=request_id,
            function=function,
            invocation_type=self._invocation_type,
            trigger=trigger,
            timeout_s=fn.config.timeout,
            headers={},
        )
        if self._info:
            hot.info("START RequestId: %s", request_id, extra=extra)
        t0 = time.perf_counter()
        try:
            value = await fn.target.invoke(event, inv)
        except Exception as e:
            seconds = self._ran(t0)
            self._release()
            err = d._failed(e, inv)
            d._report(inv, seconds * 1000, extra, fn.config, error=err)
            if err is e:
                raise
            raise err from e
        seconds = self._ran(t0)
        self._durations.append(seconds)
        ms = seconds * 1000
        if self._info:
            _lines(inv, ms, extra, fn.config, "success")
        return Result(request_id, value, ms, inv.max_memory_bytes)

    def _ran(self, t0: float) -> float:
        """An invocation started at ``t0`` ended now: its duration in seconds."""
        seconds = time.perf_counter() - t0
        self._n += 1
        self._seconds += seconds
        return seconds

    def _release(self) -> None:
        """Give the slot back, if held."""
        if self._held:
            self._held = False
            _end(self._fn)

    def flush(self) -> None:
        """Count the successful invocations so far in the metrics, and the time of all that
        ran in the function's duration per invocation."""
        d, name, durations = self._dispatcher, self._fn.name, self._durations
        if self._n:
            d._measured(name, self._seconds, self._n)
            self._n, self._seconds = 0, 0.0
        if durations:
            self._durations = []
            if d.metrics is not None:
                d.metrics.observe_many(name, "success", durations)

    def close(self) -> None:
        """Count what ran and give the slot back (once)."""
        if not self.closed:
            self.closed = True
            self.flush()
            self._release()


class Acceptor(Protocol):
    """Takes an async trigger's delivery and acks it once the event is accepted."""

    async def accept(
        self, delivery: Delivery, *, trigger: str, function: str, fmt: Format
    ) -> None: ...
