"""bridge.cron: parsing SCF/cron expressions and computing fire times, with fixed datetimes."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from bridge.cron import Schedule, parse_schedule

UTC_ZONE = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")
SHANGHAI = ZoneInfo("Asia/Shanghai")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def in_utc(times: list[datetime]) -> list[datetime]:
    # Compare instants in UTC: a time inside a repeated hour never == another zone's (PEP 495).
    return [t.astimezone(UTC) for t in times]


def fires(expr: str, after: datetime, n: int, tz: ZoneInfo = UTC_ZONE) -> list[datetime]:
    """The next n fire times in UTC, each computed from the previous one (the timer's pattern)."""
    s = parse_schedule(expr, tz)
    out: list[datetime] = []
    t: datetime | None = after
    while len(out) < n:
        t = s.next_after(t)  # type: ignore[arg-type]
        if t is None:
            break
        assert t.tzinfo is tz
        out.append(t)
    return in_utc(out)


# --- the three syntaxes -----------------------------------------------------------------------


def test_scf_seven_fields() -> None:
    assert fires("*/5 * * * * * *", utc(2024, 6, 5, 12, 0, 3), 3) == [
        utc(2024, 6, 5, 12, 0, 5),
        utc(2024, 6, 5, 12, 0, 10),
        utc(2024, 6, 5, 12, 0, 15),
    ]
    assert fires("0 0 2 1 * * *", utc(2024, 6, 5), 2) == [utc(2024, 7, 1, 2), utc(2024, 8, 1, 2)]
    # 2024-06-07 is a Friday: the next weekday 09:30 is Monday the 10th
    assert fires("0 30 9 * * MON-FRI *", utc(2024, 6, 7, 10), 2) == [
        utc(2024, 6, 10, 9, 30),
        utc(2024, 6, 11, 9, 30),
    ]


def test_classic_five_fields_fire_at_second_zero_in_any_year() -> None:
    assert fires("30 9 * * 1-5", utc(2024, 6, 7, 10), 1) == [utc(2024, 6, 10, 9, 30)]
    assert fires("*/10 * * * *", utc(2024, 6, 5, 12, 0, 1), 2) == [
        utc(2024, 6, 5, 12, 10),
        utc(2024, 6, 5, 12, 20),
    ]
    assert fires("0 0 1 1 *", utc(2098, 6, 1), 2) == [utc(2099, 1, 1), utc(2100, 1, 1)]


def test_six_fields_are_seconds_to_week() -> None:
    assert fires("15 30 9 * * *", utc(2024, 6, 5, 10), 1) == [utc(2024, 6, 6, 9, 30, 15)]


def test_next_after_is_strictly_after() -> None:
    s = parse_schedule("0 0 * * * * *", UTC_ZONE)
    assert s.next_after(utc(2024, 6, 5, 12)) == utc(2024, 6, 5, 13)
    assert s.next_after(utc(2024, 6, 5, 12) - timedelta(microseconds=1)) == utc(2024, 6, 5, 12)
    assert s.next_after(utc(2024, 6, 5, 12, 0, 0) + timedelta(microseconds=1)) == utc(
        2024, 6, 5, 13
    )


def test_results_are_aware_whole_seconds_in_the_schedule_zone() -> None:
    for expr in ("* * * * * * *", "0 30 9 * * * *", "@every 90s", "@daily"):
        t = parse_schedule(expr, SHANGHAI).next_after(utc(2024, 6, 5, 12, 0, 0, 500))
        assert t is not None
        assert t.tzinfo is SHANGHAI
        assert t.microsecond == 0


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        parse_schedule("@hourly", UTC_ZONE).next_after(datetime(2024, 1, 1))


# --- macros -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("@hourly", [utc(2024, 6, 5, 13), utc(2024, 6, 5, 14)]),
        ("@daily", [utc(2024, 6, 6), utc(2024, 6, 7)]),
        ("@midnight", [utc(2024, 6, 6), utc(2024, 6, 7)]),
        ("@weekly", [utc(2024, 6, 9), utc(2024, 6, 16)]),  # Sundays 00:00
        ("@monthly", [utc(2024, 7, 1), utc(2024, 8, 1)]),
        ("@yearly", [utc(2025, 1, 1), utc(2026, 1, 1)]),
        ("@annually", [utc(2025, 1, 1), utc(2026, 1, 1)]),
        ("@DAILY", [utc(2024, 6, 6), utc(2024, 6, 7)]),
    ],
)
def test_macros(expr: str, expected: list[datetime]) -> None:
    assert fires(expr, utc(2024, 6, 5, 12, 30), 2) == expected
    if expr == "@weekly":
        assert all(t.weekday() == 6 for t in expected)  # Python: Sunday = 6


def test_every_is_aligned_to_the_unix_epoch() -> None:
    assert fires("@every 30s", utc(2024, 6, 5, 12, 0, 7), 3) == [
        utc(2024, 6, 5, 12, 0, 30),
        utc(2024, 6, 5, 12, 1),
        utc(2024, 6, 5, 12, 1, 30),
    ]
    # 7 s does not divide a minute: still multiples of 7 s since 1970-01-01T00:00:00Z
    times = fires("@every 7s", utc(2024, 6, 5, 12, 0, 0, 123), 5)
    assert [int(t.timestamp()) % 7 for t in times] == [0] * 5
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(times)] == [7.0] * 4
    # 1h30m: the same instants whatever the zone and wherever one starts counting
    ny = fires("@every 1h30m", utc(2024, 6, 5, 12, 5), 3, NEW_YORK)
    assert ny == fires("@every 1h30m", utc(2024, 6, 5, 12, 5), 3, UTC_ZONE)
    assert all(int(t.timestamp()) % 5400 == 0 for t in ny)
    # strictly after a fire time
    assert fires("@every 1h", utc(2024, 6, 5, 12), 1) == [utc(2024, 6, 5, 13)]


# --- field syntax -----------------------------------------------------------------------------


def weekdays(expr: str) -> set[int]:
    """Python weekday numbers (Monday = 0) a daily-at-midnight schedule fires on over two weeks."""
    return {t.weekday() for t in fires(expr, utc(2024, 6, 2), 14)}  # from Sunday 2024-06-02


@pytest.mark.parametrize("week", ["0", "7", "SUN", "sun", "Sun"])
def test_sunday_is_zero_and_seven_and_sun(week: str) -> None:
    times = fires(f"0 0 0 * * {week} *", utc(2024, 6, 5), 3)
    assert times == [utc(2024, 6, 9), utc(2024, 6, 16), utc(2024, 6, 23)]


@pytest.mark.parametrize(
    ("week", "python_weekdays"),
    [
        ("1-5", {0, 1, 2, 3, 4}),  # Monday to Friday
        ("MON-FRI", {0, 1, 2, 3, 4}),
        ("0,6", {6, 5}),
        ("5-7", {4, 5, 6}),  # Friday to Sunday
        ("SAT-SUN", {5, 6}),
        ("*/2", {6, 1, 3, 5}),  # Sunday, Tuesday, Thursday, Saturday
        ("1-5/2", {0, 2, 4}),
        ("3/2", {2, 4}),  # Wednesday and Friday (to Saturday = 6)
        ("?", set(range(7))),
    ],
)
def test_week_field(week: str, python_weekdays: set[int]) -> None:
    assert weekdays(f"0 0 0 * * {week} *") == python_weekdays


def test_lists_ranges_steps_and_names() -> None:
    assert fires("0 5,10-12,50/5 9 * * * *", utc(2024, 6, 5), 6) == [
        utc(2024, 6, 5, 9, m) for m in (5, 10, 11, 12, 50, 55)
    ]
    assert [t.month for t in fires("0 0 0 1 JAN,apr-Jun/2,10 * *", utc(2024, 1, 1, 1), 4)] == [
        4,
        6,
        10,
        1,
    ]
    assert fires("0 0 0 1 */5 * *", utc(2024, 1, 2), 3) == [
        utc(2024, 6, 1),
        utc(2024, 11, 1),
        utc(2025, 1, 1),
    ]


def test_day_l_is_the_last_day_of_the_month() -> None:
    assert fires("0 0 0 L * * *", utc(2024, 1, 15), 4) == [
        utc(2024, 1, 31),
        utc(2024, 2, 29),
        utc(2024, 3, 31),
        utc(2024, 4, 30),
    ]
    assert fires("0 0 0 L 2 * *", utc(2025, 1, 1), 1) == [utc(2025, 2, 28)]
    assert fires("0 0 0 1,L * * *", utc(2024, 4, 2), 2) == [utc(2024, 4, 30), utc(2024, 5, 1)]


def test_day_and_week_both_restricted_fire_on_either() -> None:
    # June 2024: the 13th is a Thursday; Fridays are the 7th, 14th, 21st and 28th
    days = [t.day for t in fires("0 0 0 13 * FRI *", utc(2024, 6, 1), 5)]
    assert days == [7, 13, 14, 21, 28]


def test_day_or_week_wildcard_means_and() -> None:
    assert [t.day for t in fires("0 0 0 * * FRI *", utc(2024, 6, 1), 2)] == [7, 14]
    assert [t.day for t in fires("0 0 0 13 * ? *", utc(2024, 6, 1), 2)] == [13, 13]
    # a field starting with * counts as unrestricted even with a step (as in Vixie cron):
    # odd-numbered days that are Mondays
    assert [t.day for t in fires("0 0 0 */2 * MON *", utc(2024, 6, 1), 3)] == [3, 17, 1]


def test_year_field() -> None:
    assert fires("0 0 0 1 1 * 2030", utc(2024, 6, 5), 2) == [utc(2030, 1, 1)]
    assert fires("0 0 12 * * * 2026-2028", utc(2026, 12, 31, 13), 1) == [utc(2027, 1, 1, 12)]
    assert fires("0 0 0 1 1 * 2026-2028", utc(2026, 6, 1), 5) == [utc(2027, 1, 1), utc(2028, 1, 1)]


def test_an_exhausted_schedule_returns_none() -> None:
    past = parse_schedule("0 0 0 1 1 * 2020", UTC_ZONE)
    assert past.next_after(utc(2024, 6, 5)) is None
    assert past.times_between(utc(2024, 1, 1), utc(2025, 1, 1)) == []
    assert past.latest_between(utc(2024, 1, 1), utc(2025, 1, 1)) is None
    # Feb 29 in a year that has none
    assert parse_schedule("0 0 0 29 2 * 2027", UTC_ZONE).next_after(utc(2024, 6, 5)) is None


def test_whitespace_is_flexible() -> None:
    assert fires("  0   0 * *   *  ", utc(2024, 6, 5, 12, 30), 1) == [utc(2024, 6, 6)]


# --- errors -----------------------------------------------------------------------------------


def test_error_message_names_the_expression_and_the_field() -> None:
    with pytest.raises(ValueError) as e:
        parse_schedule("0 61 * * * * *", UTC_ZONE)
    assert str(e.value) == (
        'invalid cron expression "0 61 * * * * *": minute field "61" is out of range 0-59'
    )


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("* * * *", "expected 7 fields (second minute hour day month week year), 6 (no year) or 5"),
        ("* * * * * * * *", "got 8"),
        ("60 * * * * * *", 'second field "60" is out of range 0-59'),
        ("0 0 24 * * * *", 'hour field "24" is out of range 0-23'),
        ("0 0 0 0 * * *", 'day field "0" is out of range 1-31'),
        ("0 0 0 32 * * *", 'day field "32" is out of range 1-31'),
        ("0 0 0 * 13 * *", 'month field "13" is out of range 1-12'),
        ("0 0 0 * * 8 *", 'week field "8" is out of range 0-7 (Sunday is 0 or 7)'),
        ("0 0 0 * * * 1969", 'year field "1969" is out of range 1970-2099'),
        ("0 0 0 * * * 2100", 'year field "2100" is out of range 1970-2099'),
        ("0 5-61 * * * * *", 'minute field "5-61": "61" is out of range 0-59'),
        ("0 1,99 * * * * *", 'minute field "1,99": "99" is out of range 0-59'),
        ("0 0 0 * FOO * *", 'month field "FOO" is not a month name (JAN-DEC) or number (1-12)'),
        ("0 0 0 * * FUN *", 'week field "FUN" is not a weekday name (SUN-SAT) or number (0-7)'),
        ("0 0 0 * * MON-FUN *", 'week field "MON-FUN": "FUN" is not a weekday name'),
        ("0 a * * * * *", 'minute field "a" is not a number, range (a-b) or step'),
        ("-1 * * * * * *", 'second field "-1" is not a number'),
        ("0 0 0 15W * * *", 'day field "15W" is not a number'),
        ("0 0 0 L-2 * * *", 'day field "L-2": "L" is not a number'),
        ("0 0 0 * * 5#3 *", 'week field "5#3" is not a number'),
        ("*/0 * * * * * *", 'second field "*/0" has an invalid step "0" (use 1-59)'),
        ("*/x * * * * * *", 'second field "*/x" has an invalid step "x"'),
        ("*/60 * * * * * *", 'second field "*/60" has an invalid step "60" (use 1-59)'),
        ("0 0 0 * * 1-5/ *", 'week field "1-5/" has an invalid step ""'),
        ("0 0 */0 * * * *", 'hour field "*/0" has an invalid step'),
        ("0 30-10 * * * * *", 'minute field "30-10" is a range whose start is after its end'),
        ("0 0 0 * * FRI-MON *", 'week field "FRI-MON" is a range whose start is after its end'),
        ("0 1,,2 * * * *", 'minute field "1,,2" has an empty list item'),
        ("0 1, * * * * *", 'minute field "1," has an empty list item'),
        ("0 0 0 30 2 * *", 'day field "30" never falls in month field "2"'),
        ("0 0 0 31 4,6 * *", 'day field "31" never falls in month field "4,6"'),
        ("@fortnightly", "unknown macro (use @yearly, @annually, @monthly, @weekly, @daily"),
        ("@reboot", "unknown macro"),
        ("@daily 5", "@daily takes no argument"),
        ("@every", "@every needs a duration such as 30s or 1h30m"),
        ("@every 5", 'invalid duration "5"'),
        ("@every soon", 'invalid duration "soon"'),
        ("@every 500ms", "@every 500ms is too short: the minimum is 1s"),
        ("@every 1.5s", "@every 1.5s is not a whole number of seconds"),
    ],
)
def test_bad_expressions(expr: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_schedule(expr, UTC_ZONE)
    assert str(e.value).startswith(f'invalid cron expression "{expr}": ')
    assert message in str(e.value)


# --- time zones -------------------------------------------------------------------------------


def test_each_schedule_evaluates_in_its_zone() -> None:
    # 02:00 in Shanghai (UTC+8, no DST) is 18:00 UTC the day before
    t = parse_schedule("0 0 2 * * * *", SHANGHAI).next_after(utc(2024, 6, 5, 12))
    assert t == utc(2024, 6, 5, 18)
    assert (t.hour, t.tzinfo) == (2, SHANGHAI)
    assert parse_schedule("0 0 2 * * * *", UTC_ZONE).next_after(utc(2024, 6, 5, 12)) == utc(
        2024, 6, 6, 2
    )
    # New York is UTC-4 in June, UTC-5 in January
    assert parse_schedule("@daily", NEW_YORK).next_after(utc(2024, 6, 5, 12)) == utc(2024, 6, 6, 4)
    assert parse_schedule("@daily", NEW_YORK).next_after(utc(2024, 1, 5, 12)) == utc(2024, 1, 6, 5)


# America/New_York, 2024: clocks spring forward on 10 March at 02:00 EST (07:00 UTC) to 03:00
# EDT, and fall back on 3 November at 02:00 EDT (06:00 UTC) to 01:00 EST.
SPRING = utc(2024, 3, 10, 7)
FALL = utc(2024, 11, 3, 6)


def test_dst_spring_forward_fires_a_skipped_time_once_at_the_change() -> None:
    # 02:30 does not exist on 10 March: that day it fires at 03:00 EDT, the moment of the change
    got = fires("0 30 2 * * * *", utc(2024, 3, 8, 12), 3, NEW_YORK)
    assert got == [utc(2024, 3, 9, 7, 30), SPRING, utc(2024, 3, 11, 6, 30)]
    assert got[1].astimezone(NEW_YORK).strftime("%H:%M %Z") == "03:00 EDT"


def test_dst_spring_forward_wildcard_schedules_keep_real_time() -> None:
    # every 15 minutes: 01:45 EST, then 03:00 EDT (the skipped 02:xx collapse onto the change)
    got = fires("0 */15 * * * * *", utc(2024, 3, 10, 6, 40), 4, NEW_YORK)
    assert got == [
        utc(2024, 3, 10, 6, 45),
        SPRING,
        SPRING + timedelta(minutes=15),
        SPRING + timedelta(minutes=30),
    ]
    # hourly: one fire per real hour
    got = fires("@hourly", utc(2024, 3, 10, 5, 30), 4, NEW_YORK)
    assert got == [utc(2024, 3, 10, h) for h in (6, 7, 8, 9)]


def test_dst_fall_back_fixed_times_fire_once() -> None:
    # 01:30 happens twice on 3 November; a fixed-time schedule fires at the first (EDT) only
    got = fires("0 30 1 * * * *", utc(2024, 11, 2, 12), 3, NEW_YORK)
    assert got == [utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30), utc(2024, 11, 5, 6, 30)]
    local = [t.astimezone(NEW_YORK).strftime("%H:%M %Z") for t in got]
    assert local == ["01:30 EDT", "01:30 EST", "01:30 EST"]


def test_dst_fall_back_wildcard_schedules_fire_in_the_repeated_hour() -> None:
    # every 15 minutes of real time through the repeated hour: no gap, nothing twice
    got = fires("0 */15 * * * * *", utc(2024, 11, 3, 4, 50), 10, NEW_YORK)
    assert got == [utc(2024, 11, 3, 5) + timedelta(minutes=15 * i) for i in range(10)]
    local = [t.astimezone(NEW_YORK).strftime("%H:%M%z") for t in got[3:6]]
    assert local == ["01:45-0400", "01:00-0500", "01:15-0500"]
    got = fires("@hourly", utc(2024, 11, 3, 4, 30), 4, NEW_YORK)
    assert got == [utc(2024, 11, 3, h) for h in (5, 6, 7, 8)]
    # every second across the change
    got = fires("* * * * * * *", FALL - timedelta(seconds=2), 3, NEW_YORK)
    assert got == [FALL - timedelta(seconds=1), FALL, FALL + timedelta(seconds=1)]


def reference(
    matches: Callable[[datetime], bool],
    fixed_time: bool,
    tz: ZoneInfo,
    start: datetime,
    end: datetime,
) -> list[datetime]:
    """Fire times by brute force, minute by minute, from the rules in bridge.cron's docstring."""
    out = []
    t = start
    while t <= end:
        local, before = t.astimezone(tz), (t - timedelta(minutes=1)).astimezone(tz)
        skipped = []  # wall times that do not exist because clocks sprang forward at t
        if local.utcoffset() > before.utcoffset():  # type: ignore[operator]
            w = before.replace(tzinfo=None) + timedelta(minutes=1)
            while w < local.replace(tzinfo=None):
                skipped.append(w)
                w += timedelta(minutes=1)
        fire = matches(local) and not (fixed_time and local.fold)
        if fire or any(matches(w) for w in skipped):
            out.append(t)
        t += timedelta(minutes=1)
    return out


@pytest.mark.parametrize(
    ("expr", "matches", "fixed_time"),
    [
        ("0 */15 * * * * *", lambda d: d.minute % 15 == 0, False),
        ("0 0 * * * * *", lambda d: d.minute == 0, False),
        ("0 * 1 * * * *", lambda d: d.hour == 1, False),
        ("0 30 1 * * * *", lambda d: (d.hour, d.minute) == (1, 30), True),
        ("0 30 2 * * * *", lambda d: (d.hour, d.minute) == (2, 30), True),
        ("0 10,50 1-2 * * * *", lambda d: d.hour in (1, 2) and d.minute in (10, 50), True),
        ("0 0 0 * * * *", lambda d: (d.hour, d.minute) == (0, 0), True),
    ],
)
@pytest.mark.parametrize("day", [SPRING, FALL])
def test_dst_days_against_brute_force(
    expr: str, matches: Callable[[datetime], bool], fixed_time: bool, day: datetime
) -> None:
    start, end = day - timedelta(hours=12), day + timedelta(hours=12)
    expected = reference(matches, fixed_time, NEW_YORK, start, end)
    s = parse_schedule(expr, NEW_YORK)
    assert in_utc(s.times_between(start - timedelta(seconds=1), end, limit=10_000)) == expected
    # a fresh query from any point agrees with the chain (e.g. from inside the repeated hour)
    rng = random.Random(expr)
    for _ in range(200):
        x = start + timedelta(seconds=rng.randrange(int((end - start).total_seconds())))
        want = next((t for t in expected if t > x), None)
        if want is not None:
            assert s.next_after(x).astimezone(UTC) == want, x  # type: ignore[union-attr]


@pytest.mark.parametrize("tz", ["America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "UTC"])
@pytest.mark.parametrize("seconds", ["*", "*/5", "7,13,59", "0"])
def test_second_only_fast_path_matches_the_general_path(tz: str, seconds: str) -> None:
    zone = ZoneInfo(tz)
    fast = parse_schedule(f"{seconds} * * * * * *", zone)
    general = parse_schedule(f"{seconds} * * * * * 2000-2099", zone)  # a year: no fast path
    rng = random.Random(tz + seconds)
    for _ in range(300):
        # around the DST changes of New York and Lord Howe (a 30-minute shift) in 2024
        base = rng.choice([FALL, SPRING, utc(2024, 4, 6, 15), utc(2024, 10, 5, 16)])
        x = base + timedelta(seconds=rng.uniform(-7200, 7200))
        assert in_utc([fast.next_after(x)]) == in_utc([general.next_after(x)]), x  # type: ignore[list-item]


# --- ranges of fire times ---------------------------------------------------------------------


def test_times_between_is_a_half_open_interval_with_a_limit() -> None:
    s = parse_schedule("@every 10s", UTC_ZONE)
    a, b = utc(2024, 6, 5, 12, 0, 0), utc(2024, 6, 5, 12, 1, 0)
    got = s.times_between(a, b)
    assert got[0] == utc(2024, 6, 5, 12, 0, 10)  # a excluded
    assert got[-1] == b  # b included
    assert len(got) == 6
    assert s.times_between(a, b, limit=2) == got[:2]
    assert s.times_between(b, a) == []


@pytest.mark.parametrize(
    ("expr", "a", "b"),
    [
        ("* * * * * * *", utc(2024, 6, 5, 12), utc(2024, 6, 5, 12, 0, 0, 999999)),
        ("* * * * * * *", utc(2023, 6, 5, 12), utc(2024, 6, 5, 12, 0, 3, 500)),
        ("0 30 9 * * 1-5 *", utc(2020, 1, 1), utc(2024, 6, 9, 12)),  # a Sunday: Friday's
        ("@every 7s", utc(2024, 6, 5), utc(2024, 6, 5, 23, 59, 59)),
        ("0 */15 * * * * *", FALL - timedelta(hours=3), FALL + timedelta(minutes=50)),
        ("0 0 0 1 1 * 2020", utc(2024, 1, 1), utc(2025, 1, 1)),
    ],
)
def test_latest_between(expr: str, a: datetime, b: datetime) -> None:
    s = parse_schedule(expr, NEW_YORK)
    latest = s.latest_between(a, b)
    if latest is None:
        assert s.times_between(a, b) == []
    else:
        assert a < latest <= b
        assert s.next_after(latest) is None or s.next_after(latest) > b  # type: ignore[operator]
        window = s.times_between(latest - timedelta(hours=1), b, limit=100_000)
        assert window[-1].astimezone(UTC) == latest.astimezone(UTC)


def test_schedule_repr_names_expression_and_zone() -> None:
    s: Schedule = parse_schedule("@hourly", SHANGHAI)
    assert repr(s) == "Schedule('@hourly', 'Asia/Shanghai')"
