"""sources.timer: the timer trigger, with an in-memory state store."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from bridge.abc import EndOfInput, NotConnected, SourceContext
from bridge.config import parse
from bridge.errors import ConfigError
from bridge.events import Kind, render
from bridge.testing import MemoryStore
from sources.timer import TimerConfig, TimerSource


def config(**fields: Any) -> TimerConfig:
    body = {"type": "timer", "function": "f", **fields}
    return TimerConfig.model_validate(body, context={"timezone": "UTC"})


def timer(store: MemoryStore | None = None, zone: str = "UTC", **fields: Any) -> TimerSource:
    ctx = SourceContext(
        name="t",
        function="f",
        store=store or MemoryStore(),
        timezone=ZoneInfo(zone),
        logger=logging.getLogger("test.timer"),
    )
    return TimerSource(config(**fields), ctx)


def whole_second(t: datetime) -> datetime:
    return t.replace(microsecond=0)


# --- config -----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = config(cron="@every 30s")
    assert (c.timezone, c.message, c.catchup, c.catchup_limit) == (None, "", "skip", 1000)
    assert TimerSource.Config is TimerConfig


def test_every_config_field_is_documented() -> None:
    for name, field in TimerConfig.model_fields.items():
        assert field.description, name


def test_message_over_4_kb_is_rejected() -> None:
    assert config(cron="@hourly", message="x" * 4096).message == "x" * 4096
    with pytest.raises(ValidationError, match="message is 4097 bytes; SCF allows at most 4096"):
        config(cron="@hourly", message="x" * 4097)
    # bytes, not characters: é is two bytes in UTF-8
    with pytest.raises(ValidationError, match="message is 4098 bytes"):
        config(cron="@hourly", message="é" * 2049)


@pytest.mark.parametrize(
    ("fields", "loc", "message"),
    [
        ({"cron": "0 61 * * * * *"}, "cron", 'minute field "61" is out of range 0-59'),
        ({"cron": "@hourly", "timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
        ({"cron": "@hourly", "catchup": "some"}, "catchup", "'skip', 'once' or 'all'"),
        ({"cron": "@hourly", "catchup_limit": 0}, "catchup_limit", "greater than or equal to 1"),
        ({"cron": "@hourly", "cronn": "x"}, "cronn", "Extra inputs"),
        ({}, "cron", "Field required"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, Any], loc: str, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        config(**fields)
    errors = {err["loc"][0]: err["msg"] for err in e.value.errors()}
    assert message in errors[loc]


@pytest.fixture
def function_dir(tmp_path: Path) -> Path:
    (tmp_path / "index.py").write_text("def main_handler(event, context):\n    return event\n")
    return tmp_path


def document(function_dir: Path, **trigger: Any) -> dict[str, Any]:
    return {
        "functions": {"f": {"runtime": "python", "code": str(function_dir)}},
        "triggers": {"t": {"type": "timer", "function": "f", **trigger}},
    }


def test_config_file_errors_report_key_paths(function_dir: Path) -> None:
    doc = document(function_dir, cron="0 61 * * * * *", timezone="Mars/Olympus", message="x" * 5000)
    with pytest.raises(ConfigError) as e:
        parse(doc, env={})
    assert e.value.problems == [
        (
            "triggers.t.cron",
            'invalid cron expression "0 61 * * * * *": minute field "61" is out of range 0-59',
        ),
        (
            "triggers.t.timezone",
            'unknown time zone "Mars/Olympus" (use an IANA name such as "Asia/Shanghai")',
        ),
        ("triggers.t.message", "message is 5000 bytes; SCF allows at most 4096"),
    ]


def test_a_valid_config_file(function_dir: Path) -> None:
    doc = document(function_dir, cron="*/5 * * * * * *", timezone="Asia/Shanghai", catchup="once")
    trig = parse(doc, env={}).triggers["t"]
    assert isinstance(trig, TimerConfig)
    assert (trig.cron, trig.timezone, trig.catchup) == ("*/5 * * * * * *", "Asia/Shanghai", "once")


# --- catch-up ---------------------------------------------------------------------------------


async def connected(catchup: str, missed_s: int = 5, **fields: Any) -> tuple[TimerSource, datetime]:
    """A every-second timer whose last fire was `missed_s` seconds ago, connected."""
    store = MemoryStore()
    last = whole_second(datetime.now(UTC)) - timedelta(seconds=missed_s)
    store.last_fire["t"] = last
    src = timer(store, cron="* * * * * * *", catchup=catchup, **fields)
    await src.connect()
    return src, last


async def test_catchup_all_fires_every_missed_tick_oldest_first() -> None:
    src, last = await connected("all")
    # Given a last fire 5 s ago, the next 5 reads return the missed ticks without waiting
    times = [(await src.read()).event.time for _ in range(5)]
    assert times == [last + timedelta(seconds=i) for i in range(1, 6)]
    await src.close()


async def test_catchup_ticks_come_in_batches_and_checkpoint_only_a_settled_prefix() -> None:
    src, last = await connected("all", missed_s=5)
    store = src.ctx.store
    assert isinstance(store, MemoryStore)
    # Given 5 missed ticks, read_many hands them out in batches no larger than asked
    first = await src.read_many(3)
    rest = await src.read_many(10)
    assert [len(first), len(rest)] == [3, 2]
    ticks = [*first, *rest]
    assert [d.event.time for d in ticks] == [last + timedelta(seconds=i) for i in range(1, 6)]
    # When the later ones are acked first, the checkpoint does not move past the unsettled
    for d in ticks[1:]:
        await d.ack()
    assert store.last_fire["t"] == last
    # Then acking the first moves it to the newest tick of the whole settled prefix
    await ticks[0].ack()
    assert store.last_fire["t"] == last + timedelta(seconds=5)
    await src.close()


async def test_catchup_all_stops_at_catchup_limit(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "test.timer"):
        src, last = await connected("all", missed_s=30, catchup_limit=3)
    times = [(await src.read()).event.time for _ in range(3)]
    assert times == [last + timedelta(seconds=i) for i in (1, 2, 3)]
    assert "more than 3 ticks were missed" in caplog.text
    # the 4th read is a live tick, not a missed one
    assert (await src.read()).event.time > last + timedelta(seconds=29)
    await src.close()


async def test_catchup_once_fires_only_the_latest_missed_tick() -> None:
    before = whole_second(datetime.now(UTC))
    src, last = await connected("once")
    after = whole_second(datetime.now(UTC))
    first = (await src.read()).event.time
    assert before <= first <= after  # the latest tick not after connect(), not last + 1 s
    assert first - last >= timedelta(seconds=5)
    second = (await src.read()).event.time
    assert second - first >= timedelta(seconds=1)  # then live ticks
    await src.close()


async def test_catchup_after_a_year_down_stays_cheap() -> None:
    # a year of every-second ticks: 31.5 million missed, but only what is fired is computed
    before = whole_second(datetime.now(UTC))
    src, _ = await connected("once", missed_s=366 * 86400)
    after = whole_second(datetime.now(UTC))
    # the latest tick at connect(), computed without walking 31.5 million (the per-test
    # timeout catches that), bracketed by the clock instead of bounded by a duration
    assert before <= (await src.read()).event.time <= after
    await src.close()
    src, last = await connected("all", missed_s=366 * 86400, catchup_limit=10)
    assert (await src.read()).event.time == last + timedelta(seconds=1)
    await src.close()


async def test_catchup_skip_fires_nothing_missed() -> None:
    start = datetime.now(UTC)
    src, _ = await connected("skip")
    assert (await src.read()).event.time > start
    await src.close()


async def test_first_start_misses_nothing() -> None:
    start = datetime.now(UTC)
    src = timer(cron="* * * * * * *", catchup="all")
    await src.connect()
    assert (await src.read()).event.time > start
    await src.close()


# --- checkpoint -------------------------------------------------------------------------------


async def test_ack_stores_the_scheduled_time_as_last_fire() -> None:
    src, last = await connected("all")
    store = src.ctx.store
    assert isinstance(store, MemoryStore)
    first, second = await src.read(), await src.read()
    await second.nack(RuntimeError("not accepted"))
    assert store.last_fire["t"] == last  # nack stores nothing
    await first.ack()
    assert store.last_fire["t"] == last + timedelta(seconds=1)
    want = (last + timedelta(seconds=1)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert src.status()["last_fire"] == want
    await src.close()


async def test_a_nacked_tick_fires_again_and_holds_the_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sources.timer._REDELIVER_BASE_S", 0.01)
    src, last = await connected("all")
    store = src.ctx.store
    assert isinstance(store, MemoryStore)
    first, second = await src.read(), await src.read()
    await first.nack(RuntimeError("disk full"))
    await second.ack()
    assert store.last_fire["t"] == last  # not past the tick that was not accepted
    again = await src.read()
    assert again.event.time == first.event.time
    await again.ack()
    assert store.last_fire["t"] == last + timedelta(seconds=2)
    await src.close()


async def test_read_before_connect_asks_for_a_connection() -> None:
    with pytest.raises(NotConnected):
        await timer(cron="@hourly").read()


# --- live ticks -------------------------------------------------------------------------------


async def test_read_returns_the_next_tick_on_time() -> None:
    # three timers due at the same instant (they share one loop callback)
    sources = [timer(cron="* * * * * * *", message="hello") for _ in range(3)]
    before = time.time()
    for src in sources:
        await src.connect()
    deliveries = await asyncio.gather(*(src.read() for src in sources))
    now = time.time()
    ev = deliveries[0].event
    assert {d.event.time for d in deliveries} == {ev.time}
    assert ev.kind is Kind.TIMER
    assert ev.time.microsecond == 0
    # never early, and the first tick after connect() (how late it fires is measured by
    # bench/timers.py: a wall-clock bound here would flake on a loaded machine)
    assert before < ev.time.timestamp() <= now
    assert render(ev) == {
        "Type": "Timer",
        "TriggerName": "t",
        "Time": ev.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "Message": "hello",
    }
    for src in sources:
        await src.close()


async def test_a_late_read_fires_the_latest_tick_and_skips_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = timer(cron="* * * * * * *")
    await src.connect()
    # Given the core held read() back for 5 s (simulated by moving the timer's cursor back)
    start = datetime.now(UTC)
    cursor = src._cursor = whole_second(start) - timedelta(seconds=5)
    with caplog.at_level(logging.WARNING, "test.timer"):
        delivery = await src.read()
    # Then it fires the most recent passed tick at once and warns about the ones between
    # (4, or more if the clock moved on meanwhile: a loaded machine is not a failure)
    assert delivery.event.time <= datetime.now(UTC)
    assert delivery.event.time >= whole_second(start)
    found = re.search(r"skipping (\d+) tick\(s\)", caplog.text)
    assert found is not None, caplog.text
    skipped = int(found.group(1))
    assert skipped >= 4 and delivery.event.time == cursor + timedelta(seconds=skipped + 1)
    await src.close()


class SharedStore(MemoryStore):
    """A store replicas share (PostgreSQL's role)."""

    shared = True


async def test_replicas_sharing_a_store_fire_late_ticks_instead_of_skipping_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = timer(SharedStore(), cron="* * * * * * *")
    await src.connect()
    # Given this replica is 5 s late (another may be as late: a tick skipped by all is lost)
    cursor = src._cursor = whole_second(datetime.now(UTC)) - timedelta(seconds=5)
    with caplog.at_level(logging.WARNING, "test.timer"):
        fired = [(await src.read()).event.time for _ in range(5)]
    # Then every passed tick fires, oldest first, none skipped
    assert fired == [cursor + timedelta(seconds=i) for i in range(1, 6)]
    assert "skipping" not in caplog.text
    # but a tick more than a minute late is skipped as on one host
    src._cursor = whole_second(datetime.now(UTC)) - timedelta(seconds=90)
    with caplog.at_level(logging.WARNING, "test.timer"):
        late = (await src.read()).event.time
    assert late >= whole_second(datetime.now(UTC)) - timedelta(seconds=1)
    assert "skipping" in caplog.text
    await src.close()


async def test_an_exhausted_schedule_ends_the_input() -> None:
    src = timer(cron="0 0 0 1 1 * 2020")
    await src.connect()
    with pytest.raises(EndOfInput):
        await src.read()
    await src.close()


async def test_close_wakes_a_pending_read_with_end_of_input() -> None:
    src = timer(cron="@yearly")
    await src.connect()
    reading = asyncio.create_task(src.read())
    await asyncio.sleep(0)  # read() runs until it sleeps
    assert not reading.done()
    await src.close()
    with pytest.raises(EndOfInput):
        await reading
    await src.close()  # idempotent
    with pytest.raises(EndOfInput):
        await src.read()


async def test_cancelling_a_pending_read_raises_cancelled_error() -> None:
    src = timer(cron="@yearly")
    await src.connect()
    reading = asyncio.create_task(src.read())
    await asyncio.sleep(0)
    assert not reading.done()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await src.close()


# --- CLI capabilities -------------------------------------------------------------------------


def test_sample_event_is_the_scf_timer_event_for_now() -> None:
    src = timer(cron="@hourly", message="hello")
    ev = src.sample_event(datetime(2019, 2, 21, 11, 49, 0, 654321, tzinfo=UTC))
    assert render(ev) == {
        "Type": "Timer",
        "TriggerName": "t",
        "Time": "2019-02-21T11:49:00Z",
        "Message": "hello",
    }


def test_next_fire_times_in_the_trigger_zone() -> None:
    src = timer(cron="0 0 2 * * * *", timezone="Asia/Shanghai")
    times = src.next_fire_times(datetime(2024, 6, 5, 12, tzinfo=UTC), 3)
    assert [t.isoformat() for t in times] == [
        "2024-06-06T02:00:00+08:00",
        "2024-06-07T02:00:00+08:00",
        "2024-06-08T02:00:00+08:00",
    ]
    # the daemon's zone when the trigger has none
    src = timer(zone="Asia/Shanghai", cron="0 0 2 * * * *")
    assert src.next_fire_times(datetime(2024, 6, 5, 12, tzinfo=UTC), 1)[0].hour == 2
    assert timer(cron="0 0 0 1 1 * 2030").next_fire_times(datetime(2029, 6, 1, tzinfo=UTC), 5) == [
        datetime(2030, 1, 1, tzinfo=ZoneInfo("UTC"))
    ]


async def test_status() -> None:
    src = timer(cron="@hourly")
    await src.connect()
    status = src.status()
    assert status["schedule"] == "@hourly"
    assert status["last_fire"] is None
    assert status["next_fire"].endswith("Z")
    nxt = datetime.fromisoformat(status["next_fire"])
    assert nxt > datetime.now(UTC)
    assert (nxt.minute, nxt.second) == (0, 0)
    await src.close()


async def test_a_wall_clock_step_back_does_not_stall_the_timer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # found by the chaos suite (tests/chaos/test_clock.py): after a step back of the wall
    # clock, a per-second timer waited for the clock to reach its last tick again (an hour)
    import types

    import sources.timer as tm

    shift = {"s": 3600.0}
    real_time = time.time

    class Shifted(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=shift["s"])

    monkeypatch.setattr(tm, "datetime", Shifted)
    monkeypatch.setattr(tm, "time", types.SimpleNamespace(time=lambda: real_time() + shift["s"]))
    src = timer(cron="* * * * * * *")
    # the store reads the same (host) clock: timers fire by the store's time
    monkeypatch.setattr(src.ctx.store, "time", lambda: real_time() + shift["s"])
    # Given a timer ticking on a wall clock an hour ahead
    await src.connect()
    first = await src.read()
    reading = asyncio.create_task(src.read())
    await asyncio.sleep(0)  # read() runs until it waits for the next tick
    # When the wall clock steps back an hour while it waits
    shift["s"] = 0.0
    with caplog.at_level(logging.WARNING, "test.timer"):
        async with asyncio.timeout(30):
            second = await reading
    # Then it goes on from the new time (within the 30 s re-read), with a warning
    assert second.event.time < first.event.time - timedelta(minutes=59)
    assert "the wall clock went back" in caplog.text
    await src.close()
