"""Timer schedules: parse SCF and cron expressions, compute their fire times in a time zone.

Accepted expressions (``parse_schedule``)::

    */5 * * * * * *        SCF, 7 fields: second minute hour day month week year
    0 30 9 * * MON-FRI *   (9:30:00 on weekdays)
    30 9 * * 1-5           classic cron, 5 fields: minute hour day month week (second 0)
    0 30 9 * * 1-5         6 fields: second minute hour day month week
    @hourly  @daily (= @midnight)  @weekly (Sunday 00:00)  @monthly  @yearly (= @annually)
    @every 30s             elapsed time, see below

======  =====================  ================================================
field   values                 also
======  =====================  ================================================
second  0-59
minute  0-59
hour    0-23
day     1-31                   ``L``: the last day of the month
month   1-12                   JAN-DEC
week    0-7 (0 and 7: Sunday)  SUN-SAT
year    1970-2099
======  =====================  ================================================

Every field takes ``*`` (any), ``?`` (same as ``*``), lists ``a,b``, ranges
``a-b``, steps ``*/n``, ``a-b/n`` and ``a/n`` (from ``a`` to the field's end,
Saturday for the week); names are case-insensitive. A bad expression raises ``ValueError`` naming the
field, e.g. ``invalid cron expression "0 61 * * * * *": minute field "61" is out
of range 0-59``.

Rules worth knowing:

- **Sunday is 0** (and 7) in the week field, as in cron and SCF. APScheduler 3.x
  numbers weekdays from Monday = 0, so the field is expanded here and handed
  to APScheduler as day names, never as numbers.
- **Day or week.** When both the day and the week field are restricted (neither
  starts with ``*`` or ``?``), the schedule fires on days matching *either*, as
  classic cron does: ``0 0 0 1 * MON *`` fires on the 1st and on every Monday.
  It is an ``OrTrigger`` of two ``CronTrigger``.
- **@every** counts elapsed time, not the wall clock: fire times are the
  multiples of the interval since the Unix epoch, so every replica and every
  restart agrees on them. ``@every 24h`` fires at 00:00 UTC whatever the zone;
  use ``@daily`` for local midnight. The interval is whole seconds, at least 1 s.
- **Daylight saving time**, as Vixie cron handles it. When clocks spring forward,
  a wall time that does not exist that day (02:30 in New York on the second
  Sunday of March) fires once, at the moment of the change (03:00 EDT). When
  clocks fall back, the repeated hour runs once more for schedules with a
  wildcard minute or hour (``*/15 * * * *`` and ``@hourly`` keep firing every 15
  minutes / hour of real time), but not for fixed-time schedules
  (``30 1 * * *`` fires at 01:30 EDT only, not again at 01:30 EST).

How: APScheduler 3.11's ``CronTrigger`` does the calendar arithmetic on wall-clock
time in UTC, where it is exact, and this module maps wall times to instants in
the schedule's zone. (APScheduler's own zone handling returns times that go
backwards inside a fall-back hour, so it is not used directly.) Schedules with
only a second field (``* * * * * * *``, ``*/5 * * * * * *``) skip APScheduler:
their fire times are computed with integer arithmetic, which keeps thousands of
every-second timers cheap.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bridge.config import parse_duration

__all__ = ["Schedule", "parse_schedule"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_SECOND = timedelta(seconds=1)
# Time zones change their UTC offset far less often than this (since 1970 the closest
# two changes of any zone in tzdata are ~7 days apart), so probing the offset once per
# day between two instants finds every change between them.
_PROBE = timedelta(days=1)

_MACROS = {
    "@yearly": "0 0 0 1 1 * *",
    "@annually": "0 0 0 1 1 * *",
    "@monthly": "0 0 0 1 * * *",
    "@weekly": "0 0 0 * * 0 *",
    "@daily": "0 0 0 * * * *",
    "@midnight": "0 0 0 * * * *",
    "@hourly": "0 0 * * * * *",
}
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # index = cron weekday number
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    lo: int
    hi: int
    names: Mapping[str, int] = dataclasses.field(default_factory=dict)
    noun: str = ""  # what a name in this field is: "month", "weekday"
    hint: str = ""  # appended to "out of range" messages
    top: int | None = None  # where * and a/n end when not at hi (week: Saturday, not 7)

    def values(self) -> frozenset[int]:
        return frozenset(range(self.lo, self.hi + 1))


_FIELDS = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day", 1, 31),
    _Field("month", 1, 12, {n: i + 1 for i, n in enumerate(_MONTH_NAMES)}, "month"),
    _Field(
        "week", 0, 7, {n: i for i, n in enumerate(_DAY_NAMES)}, "weekday", " (Sunday is 0 or 7)", 6
    ),
    _Field("year", 1970, 2099),
)
_SEC, _MIN, _HOUR, _DAY, _MONTH, _WEEK, _YEAR = _FIELDS


class _Bad(ValueError):
    pass


def _expand(f: _Field, text: str) -> tuple[frozenset[int], bool]:
    """The values a field matches, and whether it contains ``L`` (day field only)."""

    def bad(piece: str, problem: str) -> _Bad:
        where = f'{f.name} field "{text}"'
        return _Bad(f"{where} {problem}" if piece == text else f'{where}: "{piece}" {problem}')

    def number(token: str, item: str) -> int:
        if token.isascii() and token.isdigit():
            value = int(token)
        elif token.lower() in f.names:
            value = f.names[token.lower()]
        elif token.isalpha() and f.names:
            names = list(f.names)
            span = f"{names[0]}-{names[-1]}".upper()
            raise bad(token, f"is not a {f.noun} name ({span}) or number ({f.lo}-{f.hi})")
        else:
            raise bad(token or item, "is not a number, range (a-b) or step (*/n, a-b/n, a/n)")
        if not f.lo <= value <= f.hi:
            raise bad(token, f"is out of range {f.lo}-{f.hi}{f.hint}")
        return value

    values: set[int] = set()
    last = False
    for item in text.split(","):
        if not item:
            raise bad(text, "has an empty list item")
        if f is _DAY and item.upper() == "L":
            last = True
            continue
        base, slash, step_text = item.partition("/")
        top = f.hi if f.top is None else f.top
        if base in ("*", "?"):
            lo, hi = f.lo, top
        else:
            first, dash, end = base.partition("-")
            lo = number(first, item)
            hi = number(end, item) if dash else (top if slash else lo)
            if dash and f is _WEEK and end.lower() == "sun":
                hi = 7  # SAT-SUN, FRI-SUN: Sunday at the end of a range is day 7
            if lo > hi:
                raise bad(item, "is a range whose start is after its end")
        step = 1
        if slash:
            span = top - f.lo
            if not (step_text.isascii() and step_text.isdigit() and 1 <= int(step_text) <= span):
                raise bad(item, f'has an invalid step "{step_text}" (use 1-{span})')
            step = int(step_text)
        values.update(range(lo, hi + 1, step))
    if f is _WEEK:
        values = {v % 7 for v in values}  # 7 is Sunday too
    return frozenset(values), last


def _aps(values: frozenset[int], full: frozenset[int]) -> str:
    """An APScheduler field expression for a set of numbers: ``*``, ``a-b/n`` or ``a-b,c``."""
    if values >= full:
        return "*"
    v = sorted(values)
    steps = {b - a for a, b in itertools.pairwise(v)}
    if len(v) > 2 and len(steps) == 1 and v[1] - v[0] > 1:
        return f"{v[0]}-{v[-1]}/{v[1] - v[0]}"
    runs: list[list[int]] = []
    for x in v:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


class Schedule:
    """A parsed schedule: when it fires, in its time zone. Build it with :func:`parse_schedule`.

    All methods take aware datetimes (in any zone) and return aware datetimes in
    the schedule's zone, at whole seconds. Compare them in UTC: datetimes sharing a
    tzinfo compare by wall time, and one inside a repeated hour never equals a
    datetime of another zone (PEP 495).
    """

    __slots__ = ("_fixed_time", "_interval", "_seconds_ahead", "_wall", "expr", "tz")

    def __init__(
        self,
        expr: str,
        tz: ZoneInfo,
        *,
        wall: BaseTrigger | None = None,
        interval: IntervalTrigger | None = None,
        seconds: frozenset[int] | None = None,
        fixed_time: bool = False,
    ) -> None:
        self.expr = expr
        self.tz = tz
        self._wall = wall  # fires on wall-clock times, computed in UTC (see the module docstring)
        self._interval = interval
        self._fixed_time = fixed_time
        # Fast path for second-only schedules: seconds from second-of-minute s to the next fire.
        self._seconds_ahead: tuple[int, ...] | None = None
        if seconds:
            self._seconds_ahead = tuple(
                next(d for d in range(1, 61) if (s + d) % 60 in seconds) for s in range(60)
            )

    def __repr__(self) -> str:
        return f"Schedule({self.expr!r}, {self.tz.key!r})"

    def next_after(self, t: datetime) -> datetime | None:
        """The first fire time strictly after ``t``; None when the schedule is exhausted."""
        if t.tzinfo is None:
            raise ValueError("next_after() needs an aware datetime")
        if self._interval is not None:
            nxt = self._interval.get_next_fire_time(None, t)  # the first multiple >= t
            if nxt is not None and nxt <= t:
                nxt = self._interval.get_next_fire_time(nxt, t)
            return None if nxt is None else nxt.astimezone(self.tz)
        if self._seconds_ahead is not None:
            ts = (t - _EPOCH) // _SECOND
            nxt = datetime.fromtimestamp(ts + self._seconds_ahead[ts % 60], self.tz)
            # UTC and local seconds-of-minute agree unless the offset has seconds (only old LMT).
            if not nxt.utcoffset().seconds % 60:  # type: ignore[union-attr]
                return nxt
        return self._next_wall(t)

    def times_between(self, a: datetime, b: datetime, limit: int = 1000) -> list[datetime]:
        """Fire times ``t`` with ``a < t <= b``, oldest first, at most ``limit`` of them."""
        b = b.astimezone(UTC)  # aware datetimes sharing a tzinfo compare by wall time: use UTC
        out: list[datetime] = []
        t = self.next_after(a)
        while t is not None and t <= b and len(out) < limit:
            out.append(t)
            t = self.next_after(t)
        return out

    def latest_between(self, a: datetime, b: datetime) -> datetime | None:
        """The last fire time ``t`` with ``a < t <= b``, or None; cheap even over years.

        Bisects on ``next_after``: fire times are whole seconds, so once no fire
        time lies in ``(hi, b]`` and ``hi - lo < 1 s``, the fire time ``lo`` is the last.
        """
        b = b.astimezone(UTC)
        first = self.next_after(a)
        if first is None or first > b:
            return None
        lo, hi = first.astimezone(UTC), b
        while hi - lo >= _SECOND:
            mid = lo + (hi - lo) / 2
            nxt = self.next_after(mid)
            if nxt is not None and nxt <= b:
                lo = nxt.astimezone(UTC)
            else:
                hi = mid
        return lo.astimezone(self.tz)

    # --- wall-clock schedules in a zone -------------------------------------------------------

    def _offset(self, t: datetime) -> timedelta:
        return t.astimezone(self.tz).utcoffset()  # type: ignore[return-value]

    def _next_wall(self, t: datetime) -> datetime | None:
        assert self._wall is not None
        # Fire instants >= lo. Between changes of the zone's UTC offset, wall time is
        # instant + offset, so the next matching wall time gives the next instant.
        lo = t.astimezone(UTC) + _US
        off = self._offset(lo)
        while True:
            wall: datetime | None = self._wall.get_next_fire_time(None, lo + off)
            if wall is None:
                return None
            nxt = wall - off
            local = nxt.astimezone(self.tz)
            if local.utcoffset() == off and nxt - lo <= _PROBE:
                change = None  # the common case, short of the probing below
            else:
                change = self._offset_change(lo, nxt, off)
            if change is None:
                if local.fold and self._fixed_time:  # a repeated hour: fixed times fire once
                    lo = nxt + _US
                    continue
                return local
            new = self._offset(change)
            if new > off and wall < change + new:  # clocks sprang forward over this wall time
                return change.astimezone(self.tz)
            lo, off = change, new  # go on in the new offset, from the change on

    def _offset_change(self, a: datetime, b: datetime, off: timedelta) -> datetime | None:
        """The first instant in ``(a, b]`` whose UTC offset is not ``off``, or None."""
        lo = a
        while lo < b:
            hi = min(lo + _PROBE, b)
            if self._offset(hi) != off:
                # Offsets change on whole seconds: bisect to the exact second.
                s_lo = math.floor(lo.timestamp())
                s_hi = math.ceil(hi.timestamp())
                while s_hi - s_lo > 1:
                    mid = (s_lo + s_hi) // 2
                    if datetime.fromtimestamp(mid, self.tz).utcoffset() == off:
                        s_lo = mid
                    else:
                        s_hi = mid
                return datetime.fromtimestamp(s_hi, UTC)
            lo = hi
        return None


def parse_schedule(expr: str, tz: ZoneInfo) -> Schedule:
    """Parse a timer expression (see the module docstring) for time zone ``tz``.

    Raises ValueError with a message naming the expression and the bad field.
    """
    try:
        return _parse(expr.strip(), tz)
    except _Bad as e:
        raise ValueError(f'invalid cron expression "{expr}": {e}') from None


def _parse(expr: str, tz: ZoneInfo) -> Schedule:
    if not expr:
        raise _Bad("it is empty")
    if expr.startswith("@"):
        macro, _, arg = expr.partition(" ")
        macro = macro.lower()
        if macro == "@every":
            return _every(expr, arg.strip(), tz)
        if macro not in _MACROS:
            raise _Bad(f"unknown macro (use {', '.join(_MACROS)} or @every <duration>)")
        if arg.strip():
            raise _Bad(f"{macro} takes no argument")
        return _cron(expr, _MACROS[macro].split(), tz)
    parts = expr.split()
    if len(parts) == 5:
        parts = ["0", *parts, "*"]
    elif len(parts) == 6:
        parts = [*parts, "*"]
    elif len(parts) != 7:
        raise _Bad(
            f"expected 7 fields (second minute hour day month week year), 6 (no year) "
            f"or 5 (minute hour day month week), got {len(parts)}"
        )
    return _cron(expr, parts, tz)


def _every(expr: str, arg: str, tz: ZoneInfo) -> Schedule:
    try:
        seconds = parse_duration(arg)
    except ValueError as e:
        raise _Bad(f"@every needs a duration such as 30s or 1h30m: {e}") from None
    if seconds < 1:
        raise _Bad(f"@every {arg} is too short: the minimum is 1s")
    if seconds != int(seconds):
        raise _Bad(f"@every {arg} is not a whole number of seconds")
    trigger = IntervalTrigger(seconds=int(seconds), start_date=_EPOCH, timezone=UTC)
    return Schedule(expr, tz, interval=trigger)


def _cron(expr: str, parts: list[str], tz: ZoneInfo) -> Schedule:
    (sec, _), (minute, _), (hour, _), (day, last), (month, _), (week, _), (year, _) = (
        _expand(f, text) for f, text in zip(_FIELDS, parts, strict=True)
    )
    unrestricted = [text[0] in "*?" for text in parts]
    day_restricted, week_restricted = not unrestricted[3], not unrestricted[5]
    if day_restricted and not last and not any(d <= _MONTH_DAYS[m - 1] for d in day for m in month):
        raise _Bad(f'day field "{parts[3]}" never falls in month field "{parts[4]}"')

    # Cron fixed-time jobs (minute and hour without a wildcard) skip a repeated hour.
    fixed_time = not (unrestricted[1] or unrestricted[2])
    any_minute = minute >= _MIN.values() and hour >= _HOUR.values()
    any_day = day >= _DAY.values() and week >= _WEEK.values() - {7} and month >= _MONTH.values()
    if any_minute and any_day and year >= _YEAR.values() and not fixed_time:
        return Schedule(expr, tz, seconds=sec)  # only the second matters: no APScheduler

    days = _aps(day, _DAY.values()) if day else ""
    if last:
        days = f"{days},last" if days else "last"
    weekdays = "*" if len(week) == 7 else ",".join(_DAY_NAMES[d] for d in sorted(week))
    common = {
        "second": _aps(sec, _SEC.values()),
        "minute": _aps(minute, _MIN.values()),
        "hour": _aps(hour, _HOUR.values()),
        "month": _aps(month, _MONTH.values()),
        "year": _aps(year, _YEAR.values()),
        "timezone": UTC,
    }
    wall: BaseTrigger
    if day_restricted and week_restricted:  # classic cron: day OR week
        wall = OrTrigger(
            [
                CronTrigger(day=days, day_of_week="*", **common),
                CronTrigger(day="*", day_of_week=weekdays, **common),
            ]
        )
    else:
        wall = CronTrigger(day=days, day_of_week=weekdays, **common)
    return Schedule(expr, tz, wall=wall, fixed_time=fixed_time)
