"""The timer trigger: invoke a function on a schedule, like SCF's timer trigger.

This is the reference source plugin: copy it to write your own. A source plugin is
three things.

1. **A config model**, a :class:`~bridge.config.TriggerConfig` subclass. The core
   validates each ``[triggers.NAME]`` table against it, so every key is declared
   here with a ``Field(description=...)`` (the reference docs are generated from
   them) and checked by a validator whose ``ValueError`` message the operator
   reads next to the key path (``triggers.nightly.cron: invalid cron expression
   ...``). The core passes ``daemon.timezone`` as ``info.context["timezone"]``.

2. **A Source subclass** with ``Config`` set to that model and three coroutines
   (bridge/abc.py has the full contract):

   - ``connect()``: reach the upstream and load your checkpoint from
     ``ctx.store``. Here: the last fire time, and the ticks missed while the
     daemon was down (the ``catchup`` policy).
   - ``read()``: wait for the next event and return it as a ``Delivery``. The
     core calls it only when it has room for one more event in flight, so never
     buffer ahead; a timer simply sleeps until its next tick. Raise
     ``EndOfInput`` when nothing will ever come again.
   - ``close()``: release everything; idempotent; wakes a pending ``read()``
     (here it then raises ``EndOfInput``; a cancelled ``read()`` raises
     ``CancelledError`` as usual).

   Build events with the helpers in :mod:`bridge.events` (``timer_event`` here),
   never SCF JSON by hand: the trigger's ``format`` is rendered by the core.

3. **A Delivery subclass** whose ``ack()`` is the only place that checkpoints
   (here: ``store.set_last_fire``), called once the event is durably queued. Acks
   may come out of order: checkpoint only the prefix of deliveries that are all
   settled (here: ``_settle``), never past one still in flight.
   ``nack()`` hands the event back upstream when the upstream can redeliver; a
   tick cannot be, so it only logs. Never retry invocations in a source: retries
   and dead letters belong to the dispatcher.

Register the class under the ``bridge.sources`` entry-point group (setup.cfg:
``timer = sources.timer:TimerSource``) and it is found like a built-in. Test it
with an in-memory ``StateStore`` and no real upstream, as
tests/unit/test_timer_source.py does.

Timer behaviour:

- Schedules and time zones are :mod:`bridge.cron`'s (SCF 7-field cron, 5- and
  6-field cron, ``@every``, ``@daily``...); a trigger's ``timezone`` defaults
  to ``daemon.timezone``.
- Sleeping uses the event loop's monotonic clock, aimed at the tick's wall
  time, in steps of at most 30 s, so a step of the system clock or a suspend
  delays a tick by at most that much. A step back past the last tick goes on from
  the new time (cron's rule for recurring jobs; a time fired before may fire again)
  rather than waiting for the clock to catch up. Each tick is computed from the schedule,
  never by adding an interval to "now", so timers do not drift.
- In the daemon, timers are not read one by one: :class:`TimerSource` is a
  :class:`bridge.schedule.Scheduled` source (``next_due``, ``take_due``), and the
  daemon's one schedule pump serves all of them, so the ticks of every timer due
  at the same instant are accepted as one batch (one store transaction). ``read()``
  remains for the CLI and the contract suite; there, timers due at the same
  instant share one loop callback (see "sleeping" below).
- A late ``read()`` (the core held it back, the clock jumped, or catch-up
  events took a while) fires the most recent tick that has passed at once and
  skips the older ones, with a warning: ticks are not piled up. Replicas sharing
  a database (docs/scale-out.md) fire the ticks they passed, oldest first, as long
  as they are at most 60 s late: the others may be as late, and a tick skipped by
  every replica would be lost; the fire-once key keeps each tick once.
- After downtime, ``catchup`` decides what happens to ticks missed between the
  stored last fire and the start: ``skip`` them, fire the latest ``once``, or
  fire ``all`` of them, oldest first, at most ``catchup_limit``. Replayed
  events carry their scheduled time as ``Time``. On a first start nothing was
  missed.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import Field, ValidationInfo, field_validator

from bridge.plugin import (
    Delivery,
    EndOfInput,
    Event,
    NotConnected,
    SettledPrefix,
    Source,
    SourceContext,
    TimeZone,
    TriggerConfig,
    parse_schedule,
    timer_event,
)

MAX_MESSAGE_BYTES = 4096  # SCF's limit on a timer trigger's message
_MAX_SLEEP_S = 30.0  # re-read the wall clock at least this often while sleeping
_CLOCK_SKEW_S = 0.0005  # woken this close to a deadline, a tick is on time
_STEP_BACK_S = 1.0  # the wall clock going back more than this is a step, not jitter
_REDELIVER_BASE_S = 0.5  # a nacked tick fires again after this, doubling per nack
_REDELIVER_MAX_S = 60.0
_LATE_COUNT_LIMIT = 1000  # count skipped ticks up to this many for the warning
_SHARED_LATE_S = 60.0  # replicas sharing a store fire late ticks up to this late, not skip them


class TimerConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "timer"``."""

    cron: str = Field(
        description='When to fire: SCF cron "sec min hour day month week year" (e.g. '
        '"*/5 * * * * * *"), 5- or 6-field cron, @hourly, @daily, @weekly, @monthly, '
        "@yearly, or @every <duration>."
    )
    timezone: TimeZone | None = Field(
        None, description="IANA time zone the schedule is read in; default daemon.timezone."
    )
    message: str = Field(
        "", description="Passed to the function as event.Message; at most 4096 bytes (UTF-8)."
    )
    catchup: Literal["skip", "once", "all"] = Field(
        "skip",
        description="Ticks missed while the daemon was down: skip them, fire the latest once, "
        "or fire all (oldest first).",
    )
    catchup_limit: int = Field(
        1000, ge=1, description="At most this many missed ticks are fired by catchup = all."
    )

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, v: str, info: ValidationInfo) -> str:
        # The syntax does not depend on the zone; the source builds the schedule in its own.
        schedule = parse_schedule(v, ZoneInfo((info.context or {}).get("timezone", "UTC")))
        # From a config file, a schedule whose every time is past is a mistake (code may build
        # one on purpose: the source then ends its input).
        if (
            info.context
            and info.context.get("base_dir") is not None
            and (schedule.next_after(datetime.now(UTC)) is None)
        ):
            raise ValueError(f'"{v}" never fires: every time it names is in the past')
        return v

    @field_validator("message")
    @classmethod
    def _check_message(cls, v: str) -> str:
        size = len(v.encode())
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(f"message is {size} bytes; SCF allows at most {MAX_MESSAGE_BYTES}")
        return v


class TimerSource(Source[TimerConfig]):
    """Fires ``timer_event(name, scheduled_time, message)`` on each tick of ``config.cron``.

    ``close()`` while ``read()`` waits makes that ``read()`` raise ``EndOfInput``.
    One ``read()`` at a time (the core's way of calling it).
    """

    Config = TimerConfig

    def __init__(self, config: TimerConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.zone = ZoneInfo(config.timezone) if config.timezone else ctx.timezone
        self.schedule = parse_schedule(config.cron, self.zone)
        self.last_fire: datetime | None = None  # last acked tick, in UTC (for status)
        self._cursor: datetime | None = None  # last tick handed out; set by connect()
        self._catchup: collections.deque[datetime] = collections.deque()
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        # the checkpoint: ticks by hand-out number, committed up to the settled prefix
        self._prefix = SettledPrefix()
        self._handed: dict[int, datetime] = {}
        self._seq = 0
        self._redeliver: collections.deque[_Tick] = collections.deque()  # nacked, to fire again
        self._wake: Callable[[], None] | None = None  # the schedule pump's, once it serves us
        self._next: tuple[datetime, datetime | None] | None = None  # see _upcoming()
        self.fires = 0  # live ticks handed out (metrics: bridge_timer_fires_total)
        self.misfires = 0  # ticks skipped because read() came late

    async def connect(self) -> None:
        self.last_fire = await self.ctx.store.get_last_fire(self.ctx.name)
        now = self._now()
        self._catchup = collections.deque(self._missed(self.last_fire, now))
        self._cursor = now
        if self._catchup:
            self.ctx.logger.info(
                "timer %s: firing %d missed tick(s) from %s to %s (catchup = %s)",
                self.ctx.name,
                len(self._catchup),
                _utc(self._catchup[0]),
                _utc(self._catchup[-1]),
                self.config.catchup,
            )

    def _missed(self, last: datetime | None, now: datetime) -> list[datetime]:
        if last is None or self.config.catchup == "skip":
            return []
        if self.config.catchup == "once":
            latest = self.schedule.latest_between(last, now)
            return [latest] if latest else []
        limit = self.config.catchup_limit
        missed = self.schedule.times_between(last, now, limit + 1)
        if len(missed) > limit:
            self.ctx.logger.warning(
                "timer %s: more than %d ticks were missed since %s; firing the oldest %d "
                "(up to %s) and skipping the rest (raise catchup_limit to fire more)",
                self.ctx.name,
                limit,
                _utc(last),
                limit,
                _utc(missed[limit - 1]),
            )
            del missed[limit:]
        return missed

    async def read(self) -> Delivery:
        while True:
            if self._closed:
                raise EndOfInput
            if self._cursor is None:
                raise NotConnected("read() before connect()")
            taken = self.take_due(1)
            if taken:
                return taken[0]
            deadline = self.next_due()
            if deadline is None:
                raise EndOfInput
            # steady on this host's clock, so timers due at the same instant share one alarm
            self._waiter = _alarm(deadline)
            try:
                await self._waiter
            finally:
                self._waiter = None
            # due now, or woken early (the wall clock went back, see _ring): look again

    # --- the daemon's schedule pump (bridge/schedule.py) reads timers through these ------------

    def next_due(self) -> float | None:
        """When the next tick is due, on this host's clock (the store's, a shared database's,
        aimed at it); a past time when some are ready (catch-up, nacked), None if never."""
        if self._closed or self._cursor is None:
            return None
        if self._redeliver or self._catchup:
            return 0.0
        while True:
            due = self._upcoming()
            if due is None:
                return None
            deadline = due.timestamp() - self.ctx.store.clock_offset()
            if deadline - time.time() < _CLOCK_SKEW_S or not self._after_step_back():
                return deadline

    def take_due(self, max_n: int, ahead: float = 0.0) -> list[Delivery]:
        """The ticks due now, or within ``ahead`` seconds, up to ``max_n``: nacked ones to fire
        again, catch-up ticks, then the schedule's (the latest that has passed, if late). A
        tick taken early carries its time as ``not_before``."""
        out: list[Delivery] = []
        if self._closed or self._cursor is None:
            return out
        while self._redeliver and len(out) < max_n:
            out.append(self._redeliver.popleft())
        while self._catchup and len(out) < max_n:
            out.append(_Tick(self, self._catchup.popleft()))
        if len(out) < max_n:
            due = self._upcoming()
            offset = self.ctx.store.clock_offset()
            if due is not None and due.timestamp() - offset - time.time() < _CLOCK_SKEW_S + ahead:
                due = self._latest_due(due)
                self._cursor = due
                self.fires += 1
                out.append(_Tick(self, due))
        return out

    def on_ready(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def _upcoming(self) -> datetime | None:
        """The schedule's next time after the cursor (kept until the cursor moves)."""
        if self._next is None or self._next[0] is not self._cursor:
            assert self._cursor is not None
            self._next = (self._cursor, self.schedule.next_after(self._cursor))
        return self._next[1]

    def _track(self, tick: _Tick) -> int:
        seq, self._seq = self._seq, self._seq + 1
        self._prefix.track(seq, seq + 1)
        self._handed[seq] = tick.scheduled
        return seq

    async def read_many(self, max_n: int) -> list[Delivery]:
        """``read()``, plus the ticks already due behind it up to ``max_n``: catch-up after
        downtime is accepted in batches."""
        out = [await self.read()]
        out.extend(self.take_due(max_n - 1))
        return out

    async def _settle(self, tick: _Tick) -> None:
        """The checkpoint: the last fire moves to the newest tick of the settled prefix."""
        if tick.settled:
            return
        tick.settled = True
        if not self._prefix.settle(tick.seq):
            return
        upto = self._prefix.committable
        assert upto is not None
        newest = None
        while self._handed:  # in hand-out order
            seq = next(iter(self._handed))
            if seq >= upto:
                break
            newest = self._handed.pop(seq)
        if newest is None:
            return
        await self.ctx.store.set_last_fire(self.ctx.name, newest)
        if self.last_fire is None or newest > self.last_fire:
            # UTC: aware datetimes sharing a tzinfo compare by wall time, wrong in a repeated hour
            self.last_fire = newest.astimezone(UTC)

    def _after_step_back(self) -> bool:
        """The wall clock went back past the last tick (an NTP step, ``date -s``): go on from
        the new time instead of waiting for the clock to reach the old one again (cron's
        rule for recurring jobs). Times fired before the step may fire again."""
        assert self._cursor is not None
        now = self._now()  # the store's clock, as the cursor is
        back = (self._cursor - now).total_seconds()
        if back > _STEP_BACK_S:
            self.ctx.logger.warning(
                "timer %s: the wall clock went back %.1fs (last tick %s); going on from %s",
                self.ctx.name,
                back,
                _utc(self._cursor),
                _utc(now),
            )
            self._cursor = now.replace(microsecond=0)
            return True
        return False

    def _latest_due(self, due: datetime) -> datetime:
        """read() came late: fire the latest tick that has passed, skip the older ones."""
        assert self._cursor is not None
        now = self._now()
        after = self.schedule.next_after(due)
        # on time (the usual case); or, replicas sharing the store, late but recent: another
        # replica may be as late and skip it too, so it fires (the fire-once key keeps it once)
        if (
            after is None
            or after > now
            or (self.ctx.store.shared and (now - due).total_seconds() <= _SHARED_LATE_S)
        ):
            self._next = (due, after)  # the next _upcoming(), once due is the cursor
            return due
        passed = self.schedule.times_between(self._cursor, now, _LATE_COUNT_LIMIT)
        if len(passed) < _LATE_COUNT_LIMIT:
            latest, skipped = passed[-1], str(len(passed) - 1)
            self.misfires += len(passed) - 1
        else:
            latest = self.schedule.latest_between(self._cursor, now) or due
            skipped = f"at least {_LATE_COUNT_LIMIT - 1}"
            self.misfires += _LATE_COUNT_LIMIT - 1
        self.ctx.logger.warning(
            "timer %s is %.1fs behind: skipping %s tick(s) from %s, firing %s",
            self.ctx.name,
            (now - due).total_seconds(),
            skipped,
            _utc(due),
            _utc(latest),
        )
        return latest

    def _now(self) -> datetime:
        """Now by the store's clock: replicas sharing a database fire by the database's."""
        return datetime.fromtimestamp(self.ctx.store.time(), UTC)

    async def close(self) -> None:
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- optional capabilities (CLI: fire, next, status) --------------------------------------

    def sample_event(self, now: datetime) -> Event:
        return timer_event(self.ctx.name, now.replace(microsecond=0), self.config.message)

    def next_fire_times(self, after: datetime, n: int) -> list[datetime]:
        out: list[datetime] = []
        t = self.schedule.next_after(after)
        while t is not None and len(out) < n:
            out.append(t)
            t = self.schedule.next_after(t)
        return out

    def status(self) -> Mapping[str, Any]:
        nxt = self.schedule.next_after(datetime.now(UTC))
        return {  # UTC with a Z, like every time event-bridge prints
            "next_fire": _utc(nxt),
            "last_fire": _utc(self.last_fire),
            "schedule": self.config.cron,
            "fires": self.fires,
            "misfires": self.misfires,
        }


def _utc(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Tick(Delivery):
    """One tick. Acking it advances the trigger's last fire past every tick handed out
    before it that is acked too — never past one still in flight (acks may come out of
    order). A nacked tick was not accepted: it is handed out again after a backoff, and
    the checkpoint waits for it."""

    __slots__ = ("nacks", "scheduled", "seq", "settled", "source")

    def __init__(self, source: TimerSource, scheduled: datetime) -> None:
        super().__init__(timer_event(source.ctx.name, scheduled, source.config.message))
        self.source = source
        self.scheduled = scheduled
        self.settled = False
        self.nacks = 0
        self.seq = source._track(self)

    @property
    def not_before(self) -> float:  # type: ignore[override]
        """Taken ahead of time by the schedule pump: not to start before its time."""
        return self.scheduled.timestamp()

    @property
    def dedupe_key(self) -> str:  # type: ignore[override]
        """Replicas sharing a store each fire every tick; the queue accepts it once."""
        return f"timer:{self.source.ctx.name}:{self.scheduled.astimezone(UTC).isoformat()}"

    async def ack(self) -> None:
        await self.source._settle(self)

    async def nack(self, error: BaseException | None = None) -> None:
        self.nacks += 1
        delay = min(_REDELIVER_BASE_S * 2 ** (self.nacks - 1), _REDELIVER_MAX_S)
        self.source.ctx.logger.warning(
            "timer %s: tick %s was not accepted (%s); firing it again in %.1fs",
            self.source.ctx.name,
            _utc(self.scheduled),
            error,
            delay,
        )
        await asyncio.sleep(delay)
        self.source._redeliver.append(self)
        if self.source._wake is not None:
            self.source._wake()


# --- sleeping --------------------------------------------------------------------------------
# Timers due at the same instant share one event-loop callback. Only timers need this: a
# thousand every-second triggers each sleeping on its own call_later make the loop sort a
# thousand timer handles every second, which doubles the lateness of the last one to fire.

_Waiters = dict[float, list[asyncio.Future[None]]]  # by deadline (Unix time)
_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waiters] = (
    weakref.WeakKeyDictionary()
)


def _alarm(deadline: float) -> asyncio.Future[None]:
    """A future resolved at wall-clock time ``deadline``.

    It sleeps on the loop's monotonic clock, aimed at the deadline, and re-reads the wall
    clock at least every 30 s, so a clock step or a suspend delays a tick by at most that.
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    pending = _waiters.setdefault(loop, {})
    if deadline in pending:
        pending[deadline].append(waiter)
    else:
        pending[deadline] = [waiter]
        _ring(pending, deadline)
    return waiter


def _ring(
    pending: _Waiters, deadline: float, wall: float | None = None, mono: float | None = None
) -> None:
    loop = asyncio.get_running_loop()
    now, mono_now = time.time(), loop.time()
    remaining = deadline - now
    # the wall clock went back since the last look (less wall than monotonic time passed):
    # wake the waiters early, each computes its next tick from the new time
    stepped_back = (
        wall is not None and mono is not None and ((mono_now - mono) - (now - wall) > _STEP_BACK_S)
    )
    if remaining >= _CLOCK_SKEW_S and not stepped_back:  # not yet, or woken to re-read the clock
        loop.call_later(min(remaining, _MAX_SLEEP_S), _ring, pending, deadline, now, mono_now)
        return
    for waiter in pending.pop(deadline):
        if not waiter.done():  # close() or a cancellation got there first
            waiter.set_result(None)
