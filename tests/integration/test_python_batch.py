"""The ``python`` runtime's batches (``invoke_many``): several invocations in one round trip to
one worker, each with its own outcome, time limit and log lines; and the dispatcher giving a
batch one slot of the function's concurrency."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge import errors
from bridge.abc import Invocation, TargetContext
from bridge.dispatcher import Call, Dispatcher, Result
from bridge.events import RawEvent, dumps
from bridge.targets.python import PythonConfig, PythonTarget
from bridge.testing import until

pytestmark = pytest.mark.integration

CODE = Path(__file__).parent / "functions" / "pyfuncs"
LOGGER = "bridge.functions.pyfunc"


def inv(timeout_s: float = 10.0) -> Invocation:
    return Invocation(request_id=uuid.uuid4().hex, function="pyfunc", timeout_s=timeout_s)


@pytest.fixture
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PythonTarget]:
    handler, fields = request.param
    config = PythonConfig.model_validate({"code": str(CODE), "handler": handler, **fields})
    ctx = TargetContext(name="pyfunc", state_dir=tmp_path, logger=logging.getLogger(LOGGER))
    t = PythonTarget(config, ctx)
    await t.start()
    yield t
    await t.close()


@pytest.mark.parametrize("target", [("index.signals", {})], indirect=True)
async def test_each_invocation_of_a_batch_has_its_own_outcome(target: PythonTarget) -> None:
    invs = [inv() for _ in range(3)]
    got = await target.invoke_many([{}, {"drop": True}, {}], invs)
    assert [type(g) for g in got] == [errors.RetryRequested, errors.Dropped, errors.RetryRequested]
    assert [g.request_id for g in got] == [i.request_id for i in invs]


@pytest.mark.parametrize("target", [("index.sleepy", {"timeout": "1s"})], indirect=True)
async def test_each_time_limit_runs_from_its_own_start(target: PythonTarget) -> None:
    # three of 0.4 s under a 1 s limit: 1.2 s for the batch, each within its own limit
    got = await target.invoke_many([{"sleep": 0.4}] * 3, [inv(1.0) for _ in range(3)])
    assert len({g["pid"] for g in got}) == 1  # one worker, one round trip


@pytest.mark.parametrize("target", [("index.sleepy", {"timeout": "500ms"})], indirect=True)
async def test_a_timeout_fails_its_invocation_and_the_rest_did_not_run(
    target: PythonTarget, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    events: list[Any] = [{"sleep": 0}, {"sleep": 30}, {"sleep": 0, "pidfile": str(ran)}]
    got = await target.invoke_many(events, [inv(0.5) for _ in range(3)])
    assert isinstance(got[0], dict)
    assert isinstance(got[1], errors.FunctionTimeout)
    assert isinstance(got[2], errors.SystemFault)
    assert "went away before this invocation ran" in got[2].message
    assert not ran.exists()
    # the next call gets a new worker
    assert (await target.invoke({"sleep": 0}, inv(5)))["pid"] != got[0]["pid"]


@pytest.mark.parametrize("target", [("index.chatty", {})], indirect=True)
async def test_log_lines_carry_the_request_id_of_their_invocation(
    target: PythonTarget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    invs = [inv(), inv()]
    assert await target.invoke_many([{}, {}], invs) == ["done", "done"]
    for i in invs:
        lines = [
            r.getMessage() for r in caplog.records if getattr(r, "request_id", 0) == i.request_id
        ]
        assert lines.count("first line") == 1 and "straight to fd 1" in lines


@pytest.mark.parametrize("target", [("index.chatty", {})], indirect=True)
async def test_the_worker_marker_never_reaches_the_log(
    target: PythonTarget, caplog: pytest.LogCaptureFixture
) -> None:
    # a batch of one, a batch of two, then a single invocation, all on the same worker
    caplog.set_level(logging.INFO, logger=LOGGER)
    one, two, three, four = inv(), inv(), inv(), inv()
    assert await target.invoke_many([{}], [one]) == ["done"]
    assert await target.invoke_many([{}, {}], [two, three]) == ["done", "done"]
    assert await target.invoke({}, four) == "done"
    await until(
        lambda: sum(r.getMessage() == "straight to fd 1" for r in caplog.records) == 4,
        what="every invocation's fd-1 output",
    )
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "next invocation" in m or "\x00" in m], messages
    for i in (one, two, three, four):  # and each line still carries its own request id
        lines = [
            r.getMessage() for r in caplog.records if getattr(r, "request_id", 0) == i.request_id
        ]
        assert lines.count("first line") == 1 and lines.count("straight to fd 1") == 1, lines


@pytest.mark.parametrize("target", [("index.sleepy", {"concurrency": 2})], indirect=True)
async def test_a_batch_takes_one_slot_of_concurrency(target: PythonTarget) -> None:
    dispatcher = Dispatcher({"pyfunc": target})
    calls = [Call(RawEvent(dumps({"sleep": 0.2})), uuid.uuid4().hex, "t") for _ in range(4)]
    batch = asyncio.create_task(dispatcher.invoke_many("pyfunc", calls))
    await until(lambda: dispatcher.in_flight("pyfunc") == 1, what="the batch running")
    # the second slot is free for another invocation meanwhile
    single = await dispatcher.invoke("pyfunc", {"sleep": 0})
    assert not batch.done()
    results = await batch
    assert all(isinstance(r, Result) for r in results)
    assert [r.request_id for r in results if isinstance(r, Result)] == [c.request_id for c in calls]
    assert single.value["pid"] not in {r.value["pid"] for r in results if isinstance(r, Result)}
    assert dispatcher.in_flight("pyfunc") == 0


@pytest.mark.parametrize("target", [("index.ledger", {})], indirect=True)
@pytest.mark.parametrize("encoded", [False, True], ids=["S-frames", "plain-s-frames"])
async def test_a_batch_that_stops_at_failure_runs_nothing_after_it(
    target: PythonTarget, tmp_path: Path, caplog: pytest.LogCaptureFixture, encoded: bool
) -> None:
    # (an ordered trigger's consecutive batches: bridge/ordered.py, whose events are encoded
    # with orjson and travel in plain frames)
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = str(tmp_path / "ledger")
    events: list[Any] = [{"n": n, "path": path, "fail": n == 1} for n in range(4)]
    if encoded:
        events = [RawEvent.encode(e) for e in events]
        assert all(e.plain for e in events)
    invs = [inv() for _ in events]
    got = await target.invoke_many(events, invs, stop_at_failure=True)
    # Then the answers end with the failure, and the worker ran nothing after it
    assert got[0] == 0 and isinstance(got[1], errors.HandlerFailed) and len(got) == 2
    assert Path(path).read_text() == "0\n1\n"
    # And the same worker goes on with the next batch; each line is its invocation's
    more = [inv() for _ in range(2)]
    got = await target.invoke_many(events[2:], more, stop_at_failure=True)
    assert got == [2, 3] and Path(path).read_text() == "0\n1\n2\n3\n"
    await until(lambda: sum("ledger" in r.getMessage() for r in caplog.records) == 4)
    lines = {
        getattr(r, "request_id", None): r.getMessage()
        for r in caplog.records
        if "ledger" in r.getMessage()
    }
    assert lines == {i.request_id: f"ledger {n}" for n, i in enumerate([*invs[:2], *more])}
    assert not [r for r in caplog.records if "next invocation" in r.getMessage()]


async def test_the_dispatcher_reports_what_did_not_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = PythonConfig.model_validate({"code": str(CODE), "handler": "index.ledger"})
    ctx = TargetContext(name="pyfunc", state_dir=tmp_path, logger=logging.getLogger(LOGGER))
    target = PythonTarget(config, ctx)
    dispatcher = Dispatcher({"pyfunc": target})
    await dispatcher.start()
    try:
        caplog.set_level(logging.INFO)
        path = str(tmp_path / "ledger")
        calls = [
            Call(RawEvent(dumps({"n": n, "path": path, "fail": n == 1})), uuid.uuid4().hex, "t")
            for n in range(3)
        ]
        got = await dispatcher.invoke_many("pyfunc", calls, stop_at_failure=True)
        assert isinstance(got[0], Result) and isinstance(got[1], errors.HandlerFailed)
        assert got[2] is None  # not run
        assert Path(path).read_text() == "0\n1\n"
        reports = [r for r in caplog.records if r.getMessage().startswith("REPORT")]
        assert {r.request_id for r in reports} == {calls[0].request_id, calls[1].request_id}
        (not_run,) = [r for r in caplog.records if getattr(r, "outcome", "") == "not_run"]
        assert not_run.request_id == calls[2].request_id
    finally:
        await dispatcher.close()


@pytest.mark.parametrize("target", [("index.echo", {})], indirect=True)
async def test_a_batch_of_large_raw_events_with_one_refused_reaches_the_worker_whole(
    target: PythonTarget,
) -> None:
    # Given a batch whose events are each larger than a socket's default send buffer
    # (208 KiB), some already encoded (as the queue and Kafka hand them over), and whose
    # second invocation is refused before it runs (no time left)
    events: list[Any] = [
        RawEvent(dumps({"n": i, "pad": "x" * 300_000}), plain=True) for i in range(3)
    ] + [{"n": 3, "pad": "é" * 100_000}]
    invs = [inv(), inv(timeout_s=0.0), inv(), inv()]
    # When it is invoked in one round trip
    got = await target.invoke_many(events, invs)
    # Then the refused one failed alone and every other one got its own event, intact
    assert isinstance(got[1], errors.FunctionTimeout)
    assert [g["event"]["n"] for g in (got[0], got[2], got[3])] == [0, 2, 3]
    assert got[0]["event"]["pad"] == "x" * 300_000 and got[3]["event"]["pad"] == "é" * 100_000
    # and a single invocation of such an event too
    one = await target.invoke(RawEvent(dumps({"n": 9, "pad": "y" * 500_000}), plain=True), inv())
    assert one["event"] == {"n": 9, "pad": "y" * 500_000}


def by_column(n: int, writes: list[int], keyless: bool = False) -> tuple[RawEvent, bytes]:
    """An SCF batch of ``n`` Kafka records sent by column (``scf_event``), with a writer of
    its JSON that counts its calls in ``writes``; and that JSON."""
    import confluent_kafka

    from sources.kafka.partition import scf_event

    messages = [
        confluent_kafka.Message(
            topic="orders",
            partition=2,
            offset=98 + i,
            key=None if keyless else b"%d" % i,
            value=b"v%d" % i,
        )
        for i in range(n)
    ]
    keys, values = [m.key() for m in messages], [m.value() for m in messages]
    ev = scf_event("orders", 2, messages, keys, values)
    assert ev is not None and ev.columns is not None
    raw = ev.raw

    def write() -> bytes:
        writes.append(1)
        return raw

    return RawEvent.deferred(write, ev.size, ev.columns), raw


@pytest.mark.parametrize("target", [("index.reprs", {})], indirect=True)
@pytest.mark.parametrize("many", [False, True], ids=["one", "a-batch-of-them"])
async def test_an_event_sent_by_column_is_the_one_its_json_reads(
    target: PythonTarget, many: bool
) -> None:
    # Given Kafka batches whose JSON is written only if something reads it
    writes: list[int] = []
    events = [by_column(5, writes), by_column(3, writes, keyless=True)]
    # When the python runtime invokes the function with them
    if many:
        got = await target.invoke_many([e for e, _ in events], [inv(), inv()], stop_at_failure=True)
    else:
        got = [await target.invoke(e, inv()) for e, _ in events]
    # Then the handler got the event the JSON reads, its keys in the same order, and the
    # JSON was never written
    assert got == [repr(json.loads(raw)) for _, raw in events]
    assert "'msgKey': '4'" in got[0] and "'msgKey': ''" in got[1]
    assert not writes


@pytest.mark.parametrize("target", [("index.echo", {})], indirect=True)
async def test_an_event_by_column_that_is_not_one_fails_and_the_worker_goes_on(
    target: PythonTarget,
) -> None:
    # Given columns that do not add up (a bug on the bridge's side)
    bad = RawEvent.deferred(
        lambda: b"{}", 2, b'{"records":2,"wrap":"W","names":["a"],"columns":[{"each":[1]}]}'
    )
    # When it is invoked, the invocation fails as a system fault that says why
    with pytest.raises(errors.SystemFault, match="1 values for 2 records"):
        await target.invoke(bad, inv())
    # And the worker serves the next one
    assert (await target.invoke({"n": 1}, inv()))["event"] == {"n": 1}
