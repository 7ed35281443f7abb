"""Dispatcher: throttling at reserved concurrency, request ids, error classes, size limits,
back-pressure of the daemon's pumps on sources."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bridge import errors
from bridge.abc import Delivery, SettleDelivery, SourceContext
from bridge.config import AsyncConfig, Config, DaemonConfig, FunctionConfig, TriggerConfig
from bridge.daemon import Daemon
from bridge.dispatcher import ASYNC, MAX_ASYNC_EVENT, SYNC, Dispatcher
from bridge.errors import ErrorClass
from bridge.events import RawEvent, dumps, timer_event
from bridge.metrics import Metrics
from bridge.store import SqliteStore
from bridge.testing import ListSource, RecordingTarget, until


def make(
    concurrency: int = 2, behaviour: Any = None, **kw: Any
) -> tuple[Dispatcher, RecordingTarget]:
    t = RecordingTarget(FunctionConfig(concurrency=concurrency), behaviour=behaviour)
    return Dispatcher({"f": t}, **kw), t


async def test_result_and_request_id(caplog: pytest.LogCaptureFixture) -> None:
    d, t = make()
    caplog.set_level(logging.INFO)
    r = await d.invoke("f", {"a": 1})
    assert r.value == {"ok": True}
    assert len(r.request_id) == 36
    event, inv = t.calls[0]
    assert event == {"a": 1} and inv.request_id == r.request_id and inv.timeout_s == 3.0
    lines = [
        rec.getMessage()
        for rec in caplog.records
        if getattr(rec, "request_id", None) == r.request_id
    ]
    assert lines[0] == f"START RequestId: {r.request_id}"
    assert lines[1] == f"END RequestId: {r.request_id}"
    assert lines[2].startswith(f"REPORT RequestId: {r.request_id} Duration: ")
    assert "Memory: 128 MB" in lines[2]


async def test_throttled_beyond_reserved_concurrency() -> None:
    gate = asyncio.Event()

    async def slow(event: Any, inv: Any) -> str:
        await gate.wait()
        return "done"

    d, t = make(concurrency=2, behaviour=slow)
    running = [asyncio.create_task(d.invoke("f", {})) for _ in range(2)]
    await until(lambda: len(t.calls) >= 2)
    assert d.in_flight("f") == 2
    with pytest.raises(errors.Throttled) as exc:
        await d.invoke("f", {})
    assert exc.value.error_class is ErrorClass.THROTTLED
    assert "Resource limit exceed for function f" in exc.value.message
    assert exc.value.request_id
    gate.set()
    assert [r.value for r in await asyncio.gather(*running)] == ["done", "done"]
    assert d.in_flight("f") == 0
    assert (await d.invoke("f", {})).value == "done"


@pytest.mark.parametrize(
    ("raised", "cls"),
    [
        (errors.HandlerFailed("boom"), ErrorClass.FUNCTION_ERROR),
        (errors.FunctionTimeout(), ErrorClass.FUNCTION_ERROR),
        (errors.WorkerCrashed(), ErrorClass.SYSTEM_ERROR),
        (errors.InvalidRequest("bad"), ErrorClass.INVALID_REQUEST),
        (RuntimeError("bug in a plugin"), ErrorClass.SYSTEM_ERROR),
    ],
)
async def test_every_failure_has_an_error_class(raised: Exception, cls: ErrorClass) -> None:
    def fail(event: Any, inv: Any) -> None:
        raise raised

    d, _ = make(behaviour=fail)
    with pytest.raises(errors.InvocationError) as exc:
        await d.invoke("f", {}, request_id="rid-1")
    assert exc.value.error_class is cls
    assert exc.value.request_id == "rid-1" and exc.value.function == "f"
    assert d.in_flight("f") == 0
    if isinstance(raised, RuntimeError):
        assert "RuntimeError: bug in a plugin" in exc.value.message
        assert exc.value.detail and "Traceback" in exc.value.detail


async def test_invalid_requests() -> None:
    d, t = make()
    with pytest.raises(errors.FunctionNotFound, match="function nope not found"):
        await d.invoke("nope", {})
    with pytest.raises(errors.BadEvent, match="must be a JSON object, not list"):
        await d.invoke("f", [1, 2])
    big = {"x": "a" * MAX_ASYNC_EVENT}
    with pytest.raises(errors.EventTooLarge, match="Event invocations allow at most 131072"):
        await d.invoke("f", big, invocation_type=ASYNC)
    assert (await d.invoke("f", big, invocation_type=SYNC)).value == {"ok": True}
    assert len(t.calls) == 1


async def test_a_lane_invokes_as_invoke_does_in_one_slot(caplog: pytest.LogCaptureFixture) -> None:
    # Given a function whose invocations fail for the messages "fail" and "bug"
    def behaviour(event: Any, inv: Any) -> str:
        if event["m"] == "fail":
            raise errors.HandlerFailed("boom")
        if event["m"] == "bug":
            raise RuntimeError("bug in a plugin")
        return event["m"]

    metrics = Metrics()
    d, t = make(concurrency=2, behaviour=behaviour, metrics=metrics)
    caplog.set_level(logging.INFO)
    # When a lane invokes queued events (the queue's encoded bytes) one after another
    lane = d.lane("f")
    assert d.in_flight("f") == 1  # one slot for the lane
    results = []
    for m in ("a", "b"):
        results.append(await lane.invoke(RawEvent(dumps({"m": m})), f"rid-{m}", "tick"))
    with pytest.raises(errors.HandlerFailed) as failed:
        await lane.invoke(RawEvent(dumps({"m": "fail"})), "rid-fail", "tick")
    assert d.in_flight("f") == 0  # given back while the caller settles the failure
    results.append(await lane.invoke(RawEvent(dumps({"m": "c"})), "rid-c", "tick"))
    assert d.in_flight("f") == 1  # and taken again
    with pytest.raises(errors.SystemFault, match="RuntimeError: bug in a plugin") as bug:
        await lane.invoke(RawEvent(dumps({"m": "bug"})), "rid-bug", "tick")
    for raw, refused in [
        (b"[1]", errors.BadEvent),
        (b"{not json", errors.BadEvent),
        (dumps({"m": "x" * MAX_ASYNC_EVENT}), errors.EventTooLarge),
    ]:
        with pytest.raises(refused):
            await lane.invoke(RawEvent(raw), "rid-bad", "tick")
    lane.close()
    lane.close()  # once only
    with pytest.raises(RuntimeError, match="closed"):
        await lane.invoke(RawEvent(dumps({"m": "late"})), "rid-late")
    # Then each ran as invoke runs it: its value, the decoded event, the error classes
    assert [r.value for r in results] == ["a", "b", "c"]
    assert [
        (r.request_id, e["m"], i.trigger)
        for r, (e, i) in zip(results[:2], t.calls[:2], strict=True)
    ] == [
        ("rid-a", "a", "tick"),
        ("rid-b", "b", "tick"),
    ]
    assert failed.value.request_id == "rid-fail" and failed.value.function == "f"
    assert bug.value.error_class is ErrorClass.SYSTEM_ERROR and bug.value.request_id == "rid-bug"
    assert len(t.calls) == 5  # the refused ones did not run
    assert d.in_flight("f") == 0
    # with its START / END / REPORT lines, and counted: the successes when the lane closed
    lines = [r.getMessage() for r in caplog.records if getattr(r, "request_id", None) == "rid-a"]
    assert lines[:2] == ["START RequestId: rid-a", "END RequestId: rid-a"]
    assert lines[2].startswith("REPORT RequestId: rid-a Duration: ")
    text = metrics.render().decode()
    assert 'bridge_invocations_total{function="f",outcome="success"} 3.0' in text
    assert 'bridge_invocations_total{function="f",outcome="function_error"} 1.0' in text
    assert 'bridge_invocations_total{function="f",outcome="system_error"} 1.0' in text
    assert 'bridge_invocations_total{function="f",outcome="invalid_request"} 3.0' in text
    assert 'bridge_invocation_duration_seconds_count{function="f"} 5.0' in text


async def test_a_lane_whose_function_a_reload_replaced_invokes_as_invoke_does() -> None:
    d, old = make()
    new = RecordingTarget(FunctionConfig(concurrency=2))
    lane = d.lane("f")
    await lane.invoke(RawEvent(dumps({"m": "before"})), "r1")
    # When a reload replaces the function while the lane is open
    replacing = asyncio.create_task(d.replace("f", new, grace=10))
    await until(lambda: d.target("f") is new)
    await lane.invoke(RawEvent(dumps({"m": "after"})), "r2")
    assert not old.closed  # the lane's slot still holds the old target open
    lane.close()
    await replacing
    # Then the next invocation ran on the new code, and the old target closed once done
    assert [e["m"] for e in old.events] == ["before"]
    assert [e["m"] for e in new.events] == ["after"]
    assert old.closed
    # and once the function is removed, an invocation is refused as invoke refuses it
    lane = d.lane("f")
    removing = asyncio.create_task(d.replace("f", None, grace=10))
    await until(lambda: d.target("f") is None)
    with pytest.raises(errors.FunctionNotFound):
        await lane.invoke(RawEvent(dumps({"m": "gone"})), "r3")
    lane.close()
    await removing
    assert new.closed and len(new.events) == 1


async def test_a_lane_cancelled_mid_invocation_gives_its_slot_back_and_counts_what_ran() -> None:
    gate = asyncio.Event()

    async def behaviour(event: Any, inv: Any) -> None:
        if event["m"] == "wait":
            await gate.wait()

    metrics = Metrics()
    d, t = make(behaviour=behaviour, metrics=metrics)
    lane = d.lane("f")

    async def run() -> None:
        try:
            for m in ("a", "b", "wait"):
                await lane.invoke(RawEvent(dumps({"m": m})), f"r-{m}")
        finally:
            lane.close()

    task = asyncio.create_task(run())
    await until(lambda: len(t.calls) == 3)
    lane.flush()  # what the queue does when one of a batch waits (DurableQueue._hand_back)
    assert 'outcome="success"} 2.0' in metrics.render().decode()
    assert d.in_flight("f") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.in_flight("f") == 0 and d._functions["f"].idle.is_set()
    assert 'outcome="success"} 2.0' in metrics.render().decode()  # counted once
    assert d.loop_batch_size("f") > 1  # the two quick ones measured


async def test_a_lane_is_not_opened_without_room_or_function() -> None:
    gate = asyncio.Event()

    async def wait(event: Any, inv: Any) -> None:
        await gate.wait()

    d, t = make(concurrency=1, behaviour=wait)
    with pytest.raises(errors.FunctionNotFound):
        d.lane("nope")
    running = asyncio.create_task(d.invoke("f", {}))
    await until(lambda: len(t.calls) == 1)
    with pytest.raises(errors.Throttled):
        d.lane("f")
    gate.set()
    await running
    assert d.in_flight("f") == 0


def test_http_status_mapping() -> None:
    m = errors.http_status_error
    assert m(200) is None and m(302) is None
    assert {m(s) for s in (400, 401, 403, 404, 413)} == {errors.InvalidRequest}
    assert m(429) is errors.Throttled
    assert m(500) is errors.FunctionError
    assert {m(s) for s in (502, 503, 504)} == {errors.SystemFault}


def test_error_dict_and_default_message() -> None:
    e = errors.Throttled()
    assert e.message == "Resource limit exceed for function."
    e.request_id = "r"
    d = e.to_dict()
    assert d == {
        "errorCode": 429,
        "errorMessage": e.message,
        "errorType": "Throttled",
        "errorClass": "throttled",
        "requestId": "r",
    }


# --- the daemon's pumps: back-pressure and one bad event ---------------------------------------


def _daemon(
    tmp_path: Path, events: int, target: RecordingTarget, **daemon_kw: Any
) -> tuple[Daemon, ListSource]:
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05, **daemon_kw),
        functions={"f": target.config},
        triggers={"t": TriggerConfig(type="list", function="f")},
    )
    store = SqliteStore(tmp_path)
    ctx = SourceContext(
        name="t", function="f", store=store, timezone=ZoneInfo("UTC"), logger=logging.getLogger("t")
    )
    src = ListSource(
        config.triggers["t"],
        ctx,
        [timer_event("t", datetime.now(UTC), str(i)) for i in range(events)],
    )
    return Daemon(config, store=store, targets={"f": target}, sources={"t": src}), src


async def test_sources_are_not_read_beyond_the_bounds(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def slow(event: Any, inv: Any) -> None:
        await gate.wait()

    target = RecordingTarget(FunctionConfig(concurrency=100), behaviour=slow)
    daemon, src = _daemon(tmp_path, 10, target, max_queued=3, max_in_flight=2)
    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        # Given at most 3 queued events and 2 deliveries in flight, when the function holds
        # every event, then 3 are accepted (and acked), 2 wait unacked for room, and the
        # source is not read any further.
        await until(lambda: len(src.acked) == 3 and len(src.pending) == 5)
        for _ in range(100):
            await asyncio.sleep(0)
        assert len(src.pending) == 5 and len(src.acked) == 3
        assert daemon.queue is not None and daemon.queue.depth == 3
        gate.set()
        await until(lambda: len(src.acked) == 10 and len(target.calls) == 10)
        daemon.request_stop()
        await run
    assert sorted(c[0]["Message"] for c in target.calls) == [str(i) for i in range(10)]
    assert target.started and target.closed


async def test_a_bad_event_does_not_stop_the_daemon(tmp_path: Path) -> None:
    def fail_on_two(event: Any, inv: Any) -> str:
        if event["Message"] == "2":
            raise errors.HandlerFailed("ValueError: cannot handle 2")
        return "ok"

    target = RecordingTarget(
        FunctionConfig(async_=AsyncConfig(retry_attempts=0)), behaviour=fail_on_two
    )
    daemon, src = _daemon(tmp_path, 4, target)
    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        await until(lambda: len(src.acked) >= 4)
        assert daemon.queue is not None
        queue = daemon.queue
        await until(lambda: queue.stats["succeeded"] == 3 and queue.stats["dead_lettered"] == 1)
        daemon.request_stop()
        await run
    assert len(target.calls) == 4


class _BatchListSource(ListSource):
    """A ListSource that hands out what it has through read_many()."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.asked: list[int] = []

    async def read_many(self, max_n: int) -> list[Delivery]:
        self.asked.append(max_n)
        out = [await self.read()]
        while len(out) < max_n and self.pending:
            out.append(await self.read())
        return out


async def test_a_batch_source_is_read_within_the_room_and_accepted_in_one_commit(
    tmp_path: Path,
) -> None:
    target = RecordingTarget(FunctionConfig(concurrency=100))
    daemon, plain = _daemon(tmp_path, 0, target, max_in_flight=50)
    src = _BatchListSource(
        plain.config,
        plain.ctx,
        [timer_event("t", datetime.now(UTC), str(i)) for i in range(120)],
    )
    daemon._given_sources = {"t": src}
    async with daemon:
        assert daemon.queue is not None
        enqueued: list[int] = []
        real = daemon.store.enqueue_leased

        async def counting(items: Any, *args: Any) -> Any:
            enqueued.append(len(items))
            return await real(items, *args)

        daemon.store.enqueue_leased = counting  # type: ignore[method-assign]
        run = asyncio.create_task(daemon.run_until_stopped())
        # Given 120 events and room for 50 in flight, when the source hands out batches
        await until(lambda: len(src.acked) == 120 and len(target.calls) == 120)
        daemon.request_stop()
        await run
    # Then no read asked for more than the room, batches were committed whole, and every
    # event reached the function once
    assert src.asked and max(src.asked) <= 50 and max(enqueued) > 1
    assert sum(enqueued) == 120
    assert sorted(int(c[0]["Message"]) for c in target.calls) == list(range(120))


class _IdleBatchSource(ListSource):
    """Reads in batches and waits (never ends) while it has nothing: an idle topic."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.arrived = asyncio.Event()
        self.asked: list[int] = []

    def publish(self, *events: Any) -> None:
        self.pending.extend(events)
        self.arrived.set()

    async def read_many(self, max_n: int) -> list[Delivery]:
        self.asked.append(max_n)
        while not self.pending:
            self.arrived.clear()
            await self.arrived.wait()
        out = []
        while len(out) < max_n and self.pending:
            out.append(await self.read())
        return out


async def test_an_idle_batch_source_holds_no_slot_from_a_busy_trigger(tmp_path: Path) -> None:
    target = RecordingTarget(FunctionConfig(concurrency=100))
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05, max_in_flight=4),
        functions={"f": target.config},
        triggers={n: TriggerConfig(type="list", function="f") for n in ("idle", "busy")},
    )
    store = SqliteStore(tmp_path)

    def ctx(name: str) -> SourceContext:
        return SourceContext(
            name=name,
            function="f",
            store=store,
            timezone=ZoneInfo("UTC"),
            logger=logging.getLogger(name),
        )

    def events(trigger: str, n: int) -> list[Any]:
        return [timer_event(trigger, datetime.now(UTC), f"{trigger}{i}") for i in range(n)]

    idle = _IdleBatchSource(config.triggers["idle"], ctx("idle"))
    busy = ListSource(config.triggers["busy"], ctx("busy"), events("busy", 100))
    # the idle trigger's pump starts first, with every slot free
    daemon = Daemon(
        config, store=store, targets={"f": target}, sources={"idle": idle, "busy": busy}
    )
    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        # Given a batch source with nothing to read beside a trigger with 100 events and
        # room for 4 in flight, then the busy trigger's events all get through
        await until(lambda: len(busy.acked) == 100, timeout=10)
        # and when the idle one gets events, they get through too, within the room
        idle.publish(*events("idle", 10))
        await until(lambda: len(idle.acked) == 10 and len(target.calls) == 110, timeout=10)
        daemon.request_stop()
        await run
    assert idle.asked and max(idle.asked) <= 4
    assert {c[0]["Message"] for c in target.calls} == {
        f"{t}{i}" for t, n in (("busy", 100), ("idle", 10)) for i in range(n)
    }


class _OrderedListSource(ListSource):
    ordered = True


def _ordered_daemon(tmp_path: Path) -> tuple[Daemon, RecordingTarget, asyncio.Event]:
    """A daemon with an ordered source ``t`` and a function whose invocation of message "0"
    is held open until the event returned is set."""
    gate = asyncio.Event()

    async def hold_first(event: Any, inv: Any) -> None:
        if event["Message"] == "0":
            await gate.wait()

    target = RecordingTarget(FunctionConfig(concurrency=10), behaviour=hold_first)
    daemon, plain = _daemon(tmp_path, 0, target)
    daemon._given_sources = {"t": _OrderedListSource(plain.config, plain.ctx)}
    return daemon, target, gate


def _unit_delivery(n: int, settled: list[str], *, ack_fails: bool = False) -> Delivery:
    """Delivery ``n`` of the unit of order "p": notes "ack n"/"nack n" in ``settled``; its
    ack raises when ``ack_fails``."""

    async def ack() -> None:
        if ack_fails:
            raise RuntimeError("commit failed")
        settled.append(f"ack {n}")

    async def nack(error: BaseException | None) -> None:
        settled.append(f"nack {n}")

    return SettleDelivery(timer_event("t", datetime.now(UTC), str(n)), ack, nack, order_key="p")


@pytest.mark.parametrize("how", ["daemon stop", "trigger reload"])
async def test_a_stop_hands_back_the_deliveries_of_a_unit_that_have_not_started(
    tmp_path: Path, how: str
) -> None:
    # Given an ordered source's unit of three deliveries, the first held open
    daemon, target, gate = _ordered_daemon(tmp_path)
    settled: list[str] = []

    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        await until(lambda: daemon._tg is not None)
        for _ in range(3):
            await daemon.dispatcher.slots.acquire()  # a slot per delivery, as the pump does
        unit = [_unit_delivery(n, settled) for n in range(3)]
        daemon._start("t", daemon.config.triggers["t"], unit)
        await until(lambda: len(target.calls) == 1)
        # When the daemon stops, or the trigger is stopped for a reload, while 0 runs
        ordered = daemon.ordered
        assert ordered is not None
        if how == "daemon stop":
            daemon.request_stop()
        else:
            stop = asyncio.create_task(daemon._stop_trigger("t", 5.0))
        await until(lambda: ordered._stopped("t"), what="the stop")
        gate.set()
        await until(lambda: len(settled) == 3)
        # Then 0 finishes, 1 and 2 go back without running
        assert [c[0]["Message"] for c in target.calls] == ["0"]
        assert settled == ["ack 0", "nack 1", "nack 2"]
        if how == "trigger reload":  # and a trigger started anew under its name runs again
            await stop
            assert not ordered._stopped("t")
            daemon.request_stop()
        await run


@pytest.mark.parametrize("first_part_acked", [True, False], ids=["acked", "handed back"])
async def test_a_unit_of_order_started_in_two_parts_runs_the_second_after_the_first(
    tmp_path: Path, first_part_acked: bool
) -> None:
    # Given an ordered source's unit (order_key "p") whose deliveries start in two parts
    # (the room shrank since the read), the first part's first invocation held open
    daemon, target, gate = _ordered_daemon(tmp_path)
    settled: list[str] = []

    def delivery(n: int) -> Delivery:
        return _unit_delivery(n, settled, ack_fails=n == 1 and not first_part_acked)

    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        await until(lambda: daemon._tg is not None)
        tc = daemon.config.triggers["t"]
        tails: dict[Any, asyncio.Future[bool]] = {}
        for _ in range(3):
            await daemon.dispatcher.slots.acquire()  # a slot per delivery, as the pump does
        daemon._start("t", tc, [delivery(0), delivery(1)], tails)
        daemon._start("t", tc, [delivery(2)], tails)
        await until(lambda: len(target.calls) == 1)
        for _ in range(50):
            await asyncio.sleep(0)
        # Then the second part waits for the first (2 has not run while 0 runs)
        assert [c[0]["Message"] for c in target.calls] == ["0"]
        gate.set()
        await until(lambda: len(settled) == 3)
        daemon.request_stop()
        await run
    ran = [c[0]["Message"] for c in target.calls]
    if first_part_acked:  # And runs after it, in order
        assert ran == ["0", "1", "2"] and settled == ["ack 0", "ack 1", "ack 2"]
    else:  # or, once the first part was handed back, is handed back without running
        assert ran == ["0", "1"] and settled == ["ack 0", "nack 1", "nack 2"]
