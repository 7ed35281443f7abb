"""The plugin contracts: sources, function runtimes (targets) and dead-letter sinks.

Plugins register through the entry-point groups ``bridge.sources``,
``bridge.targets`` and ``bridge.deadletters`` (built-ins use the same groups)
and are loaded only when the configuration names them (:mod:`bridge.registry`).
``docs/writing-a-source.md`` walks through writing, packaging and testing one;
:mod:`bridge.testing` has the contract suite every source runs. Plugins import these
names from :mod:`bridge.plugin`, the declared plugin API.

Sources (the Benthos shape: connect, read, close)
-------------------------------------------------
A source turns an upstream (a schedule, a queue, a log, a bucket) into
:class:`Delivery` objects: a normalized :class:`~bridge.events.Event` plus
``ack()`` and ``nack()``. The core drives it from one asyncio task per
trigger (the *pump*), and settles each delivery in a task of its own:

1. ``__init__(config, ctx)`` builds it without I/O: the CLI constructs sources
   just to ask for ``sample_event`` and ``next_fire_times``.
2. ``connect()`` once before the first ``read()``, and again after ``read()``
   raised :class:`NotConnected`. Load checkpoints from ``ctx.store`` here. It may
   raise anything: the core logs it, keeps the other triggers running and calls
   ``connect()`` again with backoff (1 s doubling to 60 s). The daemon reports
   READY only once every source connected, so connect when the upstream is
   reachable, not lazily on the first read.
3. ``read()`` returns the next :class:`Delivery`, waiting as long as it needs to
   (a timer sleeps until its next tick, a queue consumer long-polls). Never two
   at a time for one source. The core calls it only when it has room for one
   more event in flight, so **back-pressure is the core not calling read()**: do
   not read ahead beyond a small bounded batch. ``read()`` may raise
   :class:`EndOfInput` (nothing will ever come again), :class:`NotConnected`
   (call ``connect()`` first) or :class:`BackOff` (nothing now; call again after
   ``delay_s``). Any other exception is logged and ``read()`` is called again
   after a second, without ``connect()``: raise :class:`NotConnected` when the
   connection is gone.
4. For every delivery the core calls ``ack()`` once the event is accepted
   (async triggers: durably written to the local queue; ``ordered`` triggers:
   invoked successfully or dead-lettered), or ``nack(error)`` when it could not
   be accepted (or, ``ordered`` triggers, once ``Delivery.abandoned`` turned true). Deliveries are settled concurrently and **in any order**, possibly
   after a reconnect or after ``close()``.
5. ``close()`` once at shutdown or when the trigger is removed by a reload.

``async with source:`` runs steps 2 and 5 around a block (tests, scripts).

The rules:

- **Commit only inside ack().** A source commits, deletes or checkpoints
  upstream only in ``Delivery.ack()``, never in ``read()`` or ``close()``, and
  never with a client's auto-commit. What was read but not acked must be
  delivered again by a later ``connect()`` or a new instance (a restart).
- **No over-commit.** Acks arrive out of order. A source that checkpoints a
  *position* (an offset, a last-fire time, a cursor) may advance it only past
  positions whose deliveries were all acked (Benthos' checkpointer): acking
  offset 7 while 5 is unsettled commits at most up to 4.
- **nack() hands the event back** upstream: redelivery now or later where the
  upstream can (an AMQP basic.nack with requeue, an SQS visibility timeout of
  0), nothing where it cannot (a tick). It must not raise. It is not a retry:
  sources never retry invocations or dead-letter events; the dispatcher does.
- **What can never be an event goes to the core.** An upstream message a source
  cannot turn into an event (not JSON, the wrong shape) is returned from ``read()``
  as an :class:`Undeliverable`: the core dead-letters it, then acks it. Never nack
  it (a redelivery loop) and never write dead letters yourself.
- **Cancellation loses nothing.** At shutdown or reload the core cancels a
  pending ``read()``. It must raise ``CancelledError`` promptly and leave the
  source closeable; anything it had taken from the upstream and not returned
  must still be unacknowledged there, so it comes back.
- **close() is idempotent and unblocks.** It may be called twice, without a
  ``connect()``, or while a ``read()`` waits: that ``read()`` must then raise
  :class:`EndOfInput` promptly, as must every ``read()`` after ``close()``. It
  releases its resources even when a step fails. Deliveries still unsettled
  are simply not acked: the upstream must treat them as not handled.
- **Build events with** :mod:`bridge.events` (``timer_event``, ``cmq_record``,
  ``cos_record``, ``ckafka_record``), never SCF JSON by hand; keep the upstream
  message in ``Event.native`` for ``format = "native"``.
- **Blocking SDKs** go through :mod:`bridge.blocking` (``Worker``, ``Feed``);
  plugins create no threads of their own.

What is *not* guaranteed: that ``ack()`` or ``nack()`` is ever called (the
process may be killed), that acks come in read order, or that an event is
delivered only once. Delivery is **at least once**; upstream state must be safe
to redeliver.

Three ways to write one, from most control to least:

- :class:`Source` itself: connect/read/close and a :class:`Delivery` subclass.
  Every guarantee is yours to keep, and so is every optimisation.
- :class:`GeneratorSource`: one async generator that yields events; for push
  upstreams (a subscription, a socket). See its docstring for what it costs.
- :class:`PollingSource`: one ``poll()`` that returns what is new; for upstreams
  you can only ask (an HTTP API, a listing). See its docstring for the costs.

HTTP triggers (``apigw``, ``function_url``) are sources of another kind: see
:class:`HttpTrigger`. The public gateway serves them; no pump reads them.

Targets (function runtimes)
---------------------------
``start()`` once before the first invocation; ``invoke(event, invocation)``
concurrently up to the function's ``concurrency`` (the dispatcher throttles
beyond it, so a target never queues); ``close()`` once. ``invoke`` returns the
function's JSON-compatible result or raises an
:class:`~bridge.errors.InvocationError` subclass whose ``error_class`` says what
went wrong; any other exception is reported as a system error. ``invoke`` must
honour ``invocation.remaining_s()``: raise
:class:`~bridge.errors.FunctionTimeout` rather than run past the deadline.

Dead-letter sinks
-----------------
See :class:`DeadLetterSink`: ``put`` returns only once the record is durable,
and raises otherwise; a record may be put twice.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from bridge.events import Event, Format, Kind, RawEvent, render

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from bridge.models import FunctionConfig, TriggerConfig
    from bridge.store import StateStore


# --- source signals ---------------------------------------------------------------------------


class SourceSignal(Exception):
    """Base of the control-flow signals a source raises from ``read()``."""


class EndOfInput(SourceSignal):
    """The source has no more events, ever (an exhausted schedule, a closed source).

    The pump of that trigger ends; the rest of the daemon keeps running."""


class NotConnected(SourceSignal):
    """The connection was lost; the core calls ``connect()`` again (with backoff if it
    fails) before the next ``read()``. Deliveries handed out before stay valid: they may
    still be acked after the reconnect."""


class BackOff(SourceSignal):
    """Nothing to read now; the core calls ``read()`` again after ``delay_s`` (a polling
    source between polls, an upstream that asked to slow down)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(f"back off for {delay_s:.3f}s")
        self.delay_s = delay_s


# --- deliveries -------------------------------------------------------------------------------


class Delivery(abc.ABC):
    """One event read from a source, with the means to settle it upstream.

    The core settles each delivery once, from a task of its own, in no particular order
    relative to other deliveries: :meth:`ack` or :meth:`nack` — or neither, if the process
    dies or the trigger stops first. (One case calls both: if ``ack()`` raises, the core
    logs it and calls ``nack()``; the event was accepted, so a redelivery is a duplicate,
    not a loss.) Where the upstream allows it, a delivery carries what it needs to settle
    itself (an SQS receipt handle, a Kafka offset, a stream entry id) so that it can still
    be acked after a reconnect; where it cannot (an AMQP delivery tag belongs to its
    channel), such an ack raises and the upstream redelivers.
    """

    __slots__ = ("_event",)

    #: A name this event keeps for good, or None. The queue accepts an event with a key at
    #: most once (across replicas sharing a store): a timer tick's is its trigger and time.
    dedupe_key: str | None = None
    #: ``ordered`` sources only: the unit of order this delivery belongs to (a Kafka
    #: partition), or None. Deliveries of one ``read_many()`` result with the same key are
    #: consecutive batches of that unit, oldest first: the core invokes them in that order,
    #: stops at the first failure and retries it before the next ones (bridge/ordered.py),
    #: and may pass several to a worker in one round trip. The source hands out nothing
    #: more of that unit until all of them are settled.
    order_key: Hashable | None = None
    #: Store-clock time (Unix seconds) before which the event must not start, or None: a
    #: delivery handed out ahead of its time (the schedule pump takes timer ticks a little
    #: early, so that accepting them is done when they are due). The queue holds it until then.
    not_before: float | None = None

    def __init__(self, event: Event | Callable[[], Event]) -> None:
        """``event``, or a function that builds it: called once, when the core first needs
        the event (a source that hands the event over already encoded, :meth:`encoded`,
        spares the ordered path building it unless it dead-letters it; the durable queue
        reads the event's kind for its row)."""
        if not isinstance(event, Event) and not callable(event):
            raise TypeError(
                f"a delivery takes an Event or a function that builds one, not {event!r}"
            )
        self._event = event

    @property
    def event(self) -> Event:
        ev = self._event
        if not isinstance(ev, Event):  # built on first use
            ev = self._event = ev()
        return ev

    @event.setter
    def event(self, event: Event) -> None:
        self._event = event

    def encoded(self, fmt: Format) -> RawEvent:
        """The event as the function receives it in trigger format ``fmt``, encoded once:
        ``RawEvent.encode(render(self.event, fmt))``, which may raise what encoding raises.
        :class:`SettleDelivery` takes it ready-made (``encoded=``) from a source that
        writes the JSON straight from the upstream bytes (Kafka's SCF batches)."""
        return RawEvent.encode(render(self.event, fmt))

    @abc.abstractmethod
    async def ack(self) -> None:
        """The event is accepted (durably queued) or settled (an ordered trigger's batch
        succeeded or was dead-lettered): commit, delete or checkpoint it upstream — the
        only place a source may. Positions advance only past contiguous acked ones. May
        raise (the upstream then redelivers: a duplicate). May be called after ``close()``:
        commit if still possible, else raise."""

    async def nack(self, error: BaseException | None = None) -> None:  # noqa: B027
        """The event was not accepted (``error`` says why): hand it back upstream for
        redelivery where the upstream supports it. Must not raise. The default does
        nothing, which is right for an upstream that redelivers what is never acked."""

    @property
    def abandoned(self) -> bool:
        """True once settling this delivery can no longer do anything here: the upstream
        took it back and gives it to someone else (a Kafka partition revoked or lost while
        its batch still runs). An ordered acceptor checks it between retries: it stops
        retrying, does not dead-letter, and nacks. Default: never. Not guaranteed to be
        seen at once (an invocation already running is not interrupted)."""
        return False


class SettleDelivery(Delivery):
    """The generic delivery: ``ack()`` and ``nack()`` call the functions it was given
    (Benthos hands an ack function back with each message), so a source needs no
    :class:`Delivery` subclass that only forwards to itself::

        return SettleDelivery(event, partial(self.consumer.delete, msg),
                              partial(self.consumer.release, msg))

    ``on_ack()`` may raise (the core then nacks; the upstream redelivers a duplicate);
    ``on_nack(error)`` must not raise; without one, ``nack()`` does nothing (right for an
    upstream that redelivers what is never acked). ``key`` is free for the source (a
    message, a position), ``abandoned`` may be a callable the source answers, and
    ``dedupe_key`` and ``order_key`` are :attr:`Delivery.dedupe_key` and
    :attr:`Delivery.order_key`. ``encoded``: ``(format, raw)``, the event already encoded
    for that trigger format (what :meth:`Delivery.encoded` returns for it; ``raw`` must
    decode to what ``render(event, format)`` returns)."""

    __slots__ = (
        "_abandoned",
        "_encoded",
        "_on_ack",
        "_on_nack",
        "dedupe_key",
        "key",
        "order_key",
    )

    def __init__(
        self,
        event: Event | Callable[[], Event],
        on_ack: Callable[[], Awaitable[None]],
        on_nack: Callable[[BaseException | None], Awaitable[None]] | None = None,
        *,
        key: Any = None,
        abandoned: Callable[[], bool] | None = None,
        dedupe_key: str | None = None,
        order_key: Hashable | None = None,
        encoded: tuple[Format, RawEvent] | None = None,
    ) -> None:
        super().__init__(event)
        self._encoded = encoded
        self._on_ack = on_ack
        self._on_nack = on_nack
        self._abandoned = abandoned
        self.key = key
        self.dedupe_key = dedupe_key
        self.order_key = order_key

    async def ack(self) -> None:
        await self._on_ack()

    async def nack(self, error: BaseException | None = None) -> None:
        if self._on_nack is not None:
            await self._on_nack(error)

    @property
    def abandoned(self) -> bool:
        return self._abandoned is not None and self._abandoned()

    def encoded(self, fmt: Format) -> RawEvent:
        ready = self._encoded
        if ready is not None and ready[0] == fmt:
            return ready[1]
        return super().encoded(fmt)


class Undeliverable(SettleDelivery):
    """What a source returns from ``read()`` for an upstream message it can never turn into
    an event (a malformed notification, a body that is not the expected JSON): the core's
    path for poison messages, so that no source dead-letters by itself.

    ::

        except NotANotification as e:
            return Undeliverable(
                {"messageId": m.id, "body": m.body}, f"not an S3 notification: {e}",
                partial(self.consumer.delete, m), partial(self.consumer.release, m),
                kind=Kind.COS, trigger=self.ctx.name,
            )

    The core writes it to the function's dead letters at once (``invalid_request``,
    "retrying cannot help"; ``original`` becomes the record's ``ClientContext``) through
    :class:`bridge.deadletter.DeadLetters`, and acks it only once that record is durable;
    if the write fails it is nacked, so the upstream hands it back (nothing is lost). It
    takes a slot like any delivery and is never invoked.

    ``original`` is what the upstream gave, JSON-compatible (values JSON cannot hold are
    written with ``repr``); ``why`` says what is wrong with it, for the operator."""

    __slots__ = ("detail", "original", "why")

    def __init__(
        self,
        original: Any,
        why: str,
        on_ack: Callable[[], Awaitable[None]],
        on_nack: Callable[[BaseException | None], Awaitable[None]] | None = None,
        *,
        kind: Kind,
        trigger: str,
        detail: str | None = None,
    ) -> None:
        now = datetime.now(UTC)
        super().__init__(Event(kind=kind, trigger=trigger, time=now), on_ack, on_nack)
        self.original = original
        self.why = why
        #: more for the operator (where it came from, how it starts); ``ErrorDetail``
        self.detail = detail


def _one_at_a_time() -> bool:
    return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceContext:
    """What the core gives a source besides its config."""

    name: str  # trigger name
    function: str
    store: StateStore
    timezone: ZoneInfo  # daemon.timezone, the default for timers
    logger: logging.Logger
    #: Whether the function now takes several deliveries in one round trip (a ``python``
    #: function whose recent invocations are short enough that two or more fit in one;
    #: not before it has run), asked each time it matters (it follows the measurement,
    #: and a reload may change the function). An
    #: ordered source that hands out consecutive deliveries together so that they share a
    #: round trip (Kafka) hands out fewer when not: they would run one at a time anyway,
    #: and what a crash delivers twice grows with what was handed out.
    batches: Callable[[], bool] = dataclasses.field(
        default=_one_at_a_time, repr=False, compare=False
    )


ConfigT = TypeVar("ConfigT", bound="TriggerConfig")


class Source(abc.ABC, Generic[ConfigT]):
    """A trigger plugin (see the module docstring for the whole contract).

    Subclasses set ``Config`` to a :class:`~bridge.config.TriggerConfig` subclass with
    their own fields, each with a ``Field(description=...)``; the core validates the
    ``[triggers.NAME]`` table against it (unknown keys are errors) and passes the
    validated model as ``config``. ``ctx`` carries the trigger name, its function, the
    state store (checkpoints: ``ctx.store.get``/``put`` under your own namespace, or
    ``get_last_fire``/``set_last_fire``), the daemon time zone and a logger.
    """

    Config: ClassVar[type[TriggerConfig]]
    #: False (default): an asynchronous trigger — each delivery is acked once it is
    #: durably queued, and the queue owns retries. True: a synchronous ordered trigger
    #: (Kafka) — each delivery is invoked in place and acked only once it succeeded or
    #: was dead-lettered (bridge.ordered); the source must not deliver the next batch of
    #: the same partition before the previous one is acked — except as consecutive
    #: deliveries of one ``read_many()`` result that share a :attr:`Delivery.order_key`.
    ordered: ClassVar[bool] = False

    def __init__(self, config: ConfigT, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx

    @abc.abstractmethod
    async def connect(self) -> None:
        """Reach the upstream and load checkpoints. Called before the first ``read()`` and
        after ``read()`` raised NotConnected; any exception is retried with backoff."""

    @abc.abstractmethod
    async def read(self) -> Delivery:
        """The next delivery; wait as long as needed. Raises EndOfInput, NotConnected or
        BackOff; EndOfInput after (or during) ``close()``. Cancellable without loss."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything; idempotent; callable without ``connect()``; wakes a pending
        ``read()`` (which raises EndOfInput). Never commits unacked deliveries."""

    async def __aenter__(self) -> Self:
        """``async with source:`` connects it (and closes it again if that fails), for tests
        and scripts that drive a source by hand::

            async with TimerSource(config, ctx) as source:
                delivery = await source.read()
                await delivery.ack()

        The core does not use it: it connects with backoff and closes on its own."""
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Closes the source (``close()`` is idempotent; unsettled deliveries stay unacked)."""
        await self.close()

    async def read_many(self, max_n: int) -> Sequence[Delivery]:
        """Up to ``max_n`` deliveries (at least one), waiting for the first as ``read()``
        does; the optional batch form of :meth:`read`, for sources that get many at once
        (a Kafka poll, a directory scan, catch-up ticks).

        The core calls it instead of ``read()``, with ``max_n`` the room it has now (at
        least 1; it holds no in-flight slot while the call waits, and takes one per
        delivery returned), and accepts the batch together (split only if the room
        shrank meanwhile): an async trigger's batch is committed to the queue in one
        transaction and each delivery is then acked on its own. Same
        signals and rules as ``read()``; return what is at hand rather than wait to fill
        ``max_n``. Never return more than ``max_n``. The default wraps ``read()``, so a
        source that only writes ``read()`` keeps working unchanged."""
        return [await self.read()]

    # Optional capabilities used by the CLI (``fire`` and ``next``).

    def sample_event(self, now: datetime) -> Event:
        """The event this trigger would produce now (``event-bridge fire``)."""
        raise NotImplementedError(f"a {self.config.type} trigger cannot be fired by hand")

    def next_fire_times(self, after: datetime, n: int) -> list[datetime]:
        """The next ``n`` scheduled times after ``after`` (``event-bridge next``)."""
        raise NotImplementedError(f"a {self.config.type} trigger has no schedule")

    def status(self) -> Mapping[str, Any]:
        """A small JSON-compatible summary for ``status`` (next fire time, lag, ...)."""
        return {}


# --- easier tiers -----------------------------------------------------------------------------


class _HookSource(Source[ConfigT]):
    """The hooks both easier tiers share. Not a public base: subclass a tier."""

    def __init__(self, config: ConfigT, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self._closed = False

    async def open(self) -> None:
        """Reach the upstream; called by ``connect()``. Raise to be retried with backoff."""

    async def shutdown(self) -> None:
        """Release what ``open()`` acquired; called once by ``close()``, even if open() was
        never called."""

    async def on_ack(self, event: Event) -> None:
        """Commit or checkpoint ``event`` upstream (it is accepted). Acks come in any
        order: checkpoint a position only past contiguous acked ones."""

    async def on_nack(self, event: Event, error: BaseException | None) -> None:
        """Hand ``event`` back upstream if it can be redelivered. Must not raise."""

    def _settled(self, key: Hashable | None) -> None:
        """A delivery of this source was acked or nacked."""

    async def _ack_hook(self, event: Event, key: Hashable | None) -> None:
        try:
            await self.on_ack(event)
        finally:
            self._settled(key)

    async def _nack_hook(
        self, event: Event, key: Hashable | None, error: BaseException | None
    ) -> None:
        try:
            await self.on_nack(event, error)
        finally:
            self._settled(key)

    def _wrap(self, item: Event | Delivery, key: Hashable | None = None) -> Delivery:
        """An event yielded or polled becomes a delivery whose settling calls the hooks."""
        if isinstance(item, Delivery):
            return item
        if isinstance(item, Event):
            return SettleDelivery(
                item, partial(self._ack_hook, item, key), partial(self._nack_hook, item, key)
            )
        raise TypeError(f"a source must produce Event or Delivery objects, not {type(item)!r}")


def _cancelled_from_outside() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class GeneratorSource(_HookSource[ConfigT]):
    """The easiest tier: write one async generator that yields events.

    ::

        class Mqtt(GeneratorSource[MqttConfig]):
            Config = MqttConfig

            async def open(self) -> None:
                self.client = await connect_somehow(self.config.url)

            async def events(self) -> AsyncIterator[Event]:
                async for msg in self.client.messages():
                    yield Event(kind=Kind.CMQ, trigger=self.ctx.name, time=..., records=...)

            async def on_ack(self, event: Event) -> None:
                await self.client.ack(event.records[0]["msg_id"])

            async def shutdown(self) -> None:
                await self.client.disconnect()

    ``connect()`` calls :meth:`open` and starts the generator; each ``read()`` takes
    its next item; ``close()`` interrupts it and calls :meth:`shutdown`. Yield an
    :class:`~bridge.events.Event` (settling it calls :meth:`on_ack` / :meth:`on_nack`)
    or a :class:`Delivery` of your own for full control. Raise :class:`NotConnected`
    inside the generator when the upstream connection drops; returning from it means
    :class:`EndOfInput`.

    What it costs, honestly:

    - **No prefetch**: the generator runs only while the core is in ``read()``, so
      back-pressure is free, but each event costs a round trip through the generator
      and one small task (so that ``close()`` can interrupt it).
    - **Interruptions restart it**: a ``read()`` cancelled by the core (shutdown, a
      reload), an exception, or :class:`NotConnected` inside the generator ends it,
      and the next ``connect()`` starts a fresh one. Local variables are lost: keep
      state on ``self``. Whatever the generator had taken from the upstream but not yet
      yielded is lost too, unless the upstream redelivers what is never acked — an
      upstream without acks (MQTT QoS 0, a plain socket) loses those events.
    - **Redelivery is yours**: ``nack()`` only calls :meth:`on_nack`; nothing is
      retried unless the upstream redelivers.
    """

    def __init__(self, config: ConfigT, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self._gen: AsyncIterator[Event | Delivery] | None = None
        self._step: asyncio.Future[Event | Delivery] | None = None

    @abc.abstractmethod
    def events(self) -> AsyncIterator[Event | Delivery]:
        """Yield events as they arrive; an ``async def`` with ``yield``."""

    async def connect(self) -> None:
        if self._closed:
            return
        await self._stop_generator()
        await self.open()
        self._gen = self.events()

    async def read(self) -> Delivery:
        if self._closed:
            raise EndOfInput
        gen = self._gen
        if gen is None:
            raise NotConnected("the generator is not running; connect() starts it")
        self._step = step = asyncio.ensure_future(anext(gen))
        try:
            item = await step
        except StopAsyncIteration:
            self._gen = None
            raise EndOfInput from None
        except asyncio.CancelledError:
            self._gen = None
            if self._closed and not _cancelled_from_outside():
                raise EndOfInput from None  # close() interrupted the generator
            raise
        except BaseException:
            self._gen = None
            raise
        finally:
            self._step = None
        if self._closed:  # it yielded as close() ran: not handed out, so never acked
            raise EndOfInput
        return self._wrap(item)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_generator()
        finally:
            await self.shutdown()

    async def _stop_generator(self) -> None:
        step, gen = self._step, self._gen
        self._gen = None
        if step is not None and not step.done():
            step.cancel()  # the generator gets CancelledError at its await and finishes
        elif gen is not None and isinstance(gen, AsyncGenerator):
            await gen.aclose()


class PollingSource(_HookSource[ConfigT]):
    """The tier for upstreams you can only ask "anything new?" (an HTTP API, a directory
    or bucket listing, a database table).

    ::

        class Tickets(PollingSource[TicketsConfig]):
            Config = TicketsConfig

            async def poll(self) -> Sequence[Event]:
                rows = await self.api.get("/tickets", params={"after": self.cursor, "limit": 50})
                return [Event(kind=Kind.CMQ, trigger=self.ctx.name, ...) for r in rows]

            def identity(self, event: Event) -> Hashable:
                return event.records[0]["msg_id"]

            async def on_ack(self, event: Event) -> None:
                await self.api.post(f"/tickets/{event.records[0]['msg_id']}/done")

    Each ``read()`` serves the next item of the last batch; when the batch is used up it
    calls :meth:`poll` again, and raises :class:`BackOff` with ``poll_interval_s`` when
    that found nothing new, so the core waits between polls. Items handed out and not yet
    settled are remembered by :meth:`identity` and left out of later polls, so a slow
    acceptance does not deliver an item twice.

    What it costs, honestly:

    - **Latency and idle load**: an event waits up to ``poll_interval_s``, and an idle
      trigger still asks the upstream every interval.
    - **poll() must not consume**: only :meth:`on_ack` may mark an item done (delete it,
      move a cursor). Items of a batch not yet handed out when ``close()`` runs are
      dropped and must be found again by a later poll.
    - **Batches are buffered**: keep what one ``poll()`` returns small; the core's
      back-pressure applies per ``read()``, not per poll.
    - **Positions are yours**: acks arrive out of order; a cursor may only move past
      items that were all acked.
    - **No dedup without identity()**: the default (``None``) keeps no memory, and an
      item still in flight is delivered again by the next poll.
    - **A poll is not interrupted**: ``close()`` takes effect once the current poll
      returns, so keep each poll short (use :class:`GeneratorSource` for long polls).
    """

    #: seconds between polls that found nothing new
    poll_interval_s: float = 5.0

    def __init__(self, config: ConfigT, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self._batch: collections.deque[Event | Delivery] = collections.deque()
        self._in_flight: set[Hashable] = set()
        self._connected = False

    @abc.abstractmethod
    async def poll(self) -> Sequence[Event | Delivery]:
        """What is new upstream, oldest first; empty if nothing. Consumes nothing."""

    def identity(self, event: Event) -> Hashable | None:
        """A stable key of the upstream item behind ``event`` (a message id, an object key
        and version), used to skip items still in flight. None: no dedup."""
        return None

    async def connect(self) -> None:
        if self._closed:
            return
        await self.open()
        self._connected = True

    async def read(self) -> Delivery:
        if self._closed:
            raise EndOfInput
        if not self._connected:
            raise NotConnected("read() before connect()")
        if not self._batch:
            polled = await self.poll()
            if self._closed:
                raise EndOfInput
            for item in polled:
                key = self.identity(item) if isinstance(item, Event) else None
                if key is None or key not in self._in_flight:
                    self._batch.append(item)
            if not self._batch:
                raise BackOff(self.poll_interval_s)
        item = self._batch.popleft()
        key = self.identity(item) if isinstance(item, Event) else None
        if key is not None:
            self._in_flight.add(key)
        return self._wrap(item, key)

    def _settled(self, key: Hashable | None) -> None:
        if key is not None:
            self._in_flight.discard(key)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = False
        self._batch.clear()
        await self.shutdown()


# --- HTTP triggers -----------------------------------------------------------------------------


class HttpTrigger(Source[ConfigT]):
    """A trigger served by the public HTTP gateway (``[gateway]``), not read by a pump.

    Registered in ``bridge.sources`` like any source, so its ``[triggers.NAME]`` table is
    validated by the normal config path and ``event-bridge plugins`` lists it.

    Lifecycle: the daemon builds no pump for it and never calls ``connect``, ``read`` or
    ``close``; the gateway (:mod:`bridge.gateway`) builds its route table from every enabled
    trigger whose class is an ``HttpTrigger`` and rebuilds it on reload (the new table is
    swapped in at once; a request in flight keeps the route it matched). Each request is one
    synchronous invocation (``RequestResponse``) through the dispatcher, or one proxied
    exchange with a web function; nothing is queued or retried.

    Rules: ``Config`` must have ``path`` (a template or prefix, see :mod:`bridge.routes`);
    :meth:`event` builds the function's event from the request and must not do I/O.

    Not guaranteed: that a request reaches the function exactly once (a client that gives up
    and retries makes a second invocation), or that anything runs after the client has gone.
    """

    #: "apigw" (a path template and methods) or "function_url" (a prefix, every method)
    route_kind: ClassVar[str] = "apigw"

    @abc.abstractmethod
    def event(self, request: Any) -> dict[str, Any]:
        """The event for one request (a :class:`bridge.apigw.HttpRequest`)."""

    async def connect(self) -> None:
        """Nothing to connect: the gateway listens for every HTTP trigger."""

    async def read(self) -> Delivery:
        raise EndOfInput

    async def close(self) -> None:
        """Nothing to release."""


# --- targets ----------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Invocation:
    """One call of a function. The dispatcher creates it; the target may fill in the report
    fields (``max_memory_bytes``) for the REPORT log line."""

    request_id: str
    function: str
    invocation_type: str = "Event"  # Event | RequestResponse (SCF)
    trigger: str | None = None
    timeout_s: float = 3.0
    started: float = dataclasses.field(default_factory=time.monotonic)
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_memory_bytes: int | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetContext:
    name: str  # function name
    state_dir: Path
    logger: logging.Logger
    #: the config files and the secret files they name: a sandboxed function must not read them
    private_files: tuple[Path, ...] = ()


FunctionT = TypeVar("FunctionT", bound="FunctionConfig")


class Target(abc.ABC, Generic[FunctionT]):
    """A function runtime plugin (``runtime = "python"`` ...)."""

    Config: ClassVar[type[FunctionConfig]]
    #: True: ``invoke`` also takes a :class:`~bridge.events.RawEvent` (the event still as
    #: the JSON bytes the queue stored) and sends ``event.raw`` on untouched. False
    #: (default): the dispatcher decodes it first, so ``event`` is a plain dict.
    takes_raw: ClassVar[bool] = False

    def __init__(self, config: FunctionT, ctx: TargetContext) -> None:
        self.config = config
        self.ctx = ctx

    async def start(self) -> None:
        """Prepare to invoke (start warm workers, supervised servers...)."""

    @abc.abstractmethod
    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> Any:
        """Run the function once; return its result or raise an InvocationError."""

    async def close(self) -> None:
        """Stop workers; idempotent."""


# --- dead-letter sinks ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeadLetterContext:
    store: StateStore
    logger: logging.Logger


class DeadLetterSink(abc.ABC):
    """Where events go when retrying cannot help (``dead_letter = "scheme://…"``).

    ``put`` is called with the SCF-shaped dead-letter record (see
    :mod:`bridge.deadletter`) and must return only once the record is durably
    written there, and raise otherwise: the event then stays in the durable
    queue and dead-lettering is retried, so nothing is lost. A record may be
    put more than once (a crash between ``put`` and the queue update).

    The constructor only parses ``url`` and raises ``ValueError`` naming what it
    lacks; it must not connect or use ``ctx.store``: ``validate`` builds each
    configured sink this way to check it before anything runs.
    """

    def __init__(self, url: str, ctx: DeadLetterContext) -> None:
        self.url = url
        self.ctx = ctx

    @abc.abstractmethod
    async def put(self, record: Mapping[str, Any]) -> None: ...

    async def close(self) -> None:  # noqa: B027
        """Release connections; idempotent."""
