"""The ``python`` runtime with real worker processes: results, context, warm reuse, isolation,
limits, crashes, errors, captured output, concurrency and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from bridge import errors
from bridge.abc import Invocation, TargetContext
from bridge.events import RawEvent
from bridge.targets import _pyworker
from bridge.targets._pyworker import WorkerProcess
from bridge.targets.python import PythonConfig, PythonTarget
from bridge.testing import until

pytestmark = pytest.mark.integration

CODE = Path(__file__).parent / "functions" / "pyfuncs"
LOGGER = "bridge.functions.pyfunc"

Factory = Callable[..., Awaitable[PythonTarget]]


def inv(timeout_s: float = 10.0) -> Invocation:
    return Invocation(request_id=uuid.uuid4().hex, function="pyfunc", timeout_s=timeout_s)


def gone(pid: int) -> bool:
    """The process is reaped (not even a zombie any more)."""
    return not psutil.pid_exists(pid)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Factory]:
    """Build and start PythonTargets; every one is closed at the end of the test."""
    started: list[PythonTarget] = []

    async def factory(
        handler: str = "index.echo", *, validate: bool = True, **fields: Any
    ) -> PythonTarget:
        body = {"code": str(CODE), "handler": handler, **fields}
        if validate:
            config = PythonConfig.model_validate(body)
        else:  # a handler that went missing after the config was validated
            config = PythonConfig.model_construct(code=CODE, handler=handler)
        ctx = TargetContext(
            name="pyfunc", state_dir=tmp_path / "state", logger=logging.getLogger(LOGGER)
        )
        target = PythonTarget(config, ctx)
        started.append(target)
        await target.start()
        return target

    yield factory
    for target in started:
        await target.close()


# --- results and context ------------------------------------------------------------------------


async def test_result_round_trip(make: Factory) -> None:
    target = await make("index.echo")
    event = {"Type": "Timer", "Message": "héllo ✓", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    invocation = inv()

    got = await target.invoke(event, invocation)

    assert got == {"event": event, "type": "dict"}
    assert invocation.max_memory_bytes is not None
    assert 1024 * 1024 < invocation.max_memory_bytes < 512 * 1024 * 1024


async def test_what_orjson_would_change_reaches_the_handler_as_json_reads_it(
    make: Factory,
) -> None:
    # Given events orjson refuses (a lone surrogate) or reads differently from the standard
    # library (integers beyond 64 bits become floats), as a dict and as bytes encoded once
    # (a RawEvent, as the queue and the Kafka trigger send them)
    target = await make("index.reprs")
    event = {"big": 2**70 + 1, "text": "\ud800 lone", "Records": [{"n": -(2**65) - 3}]}
    raw = b'{"big": 123456789012345678901234567890, "x": [1.5, -9223372036854775809]}'
    # When each is invoked
    got = await target.invoke(event, inv())
    got_raw = await target.invoke(RawEvent(raw), inv())
    # and the integers encoded as the ordered path encodes events: orjson refuses them, so
    # they do not travel as plain JSON
    ints = {"big": event["big"], "Records": event["Records"]}
    encoded = RawEvent.encode(ints)
    assert not encoded.plain
    got_encoded = await target.invoke(encoded, inv())
    # Then the handler sees what the standard library reads (the repr is its answer)
    assert got == repr(event) and got_encoded == repr(ints)
    assert got_raw == repr(json.loads(raw))


async def test_plain_json_travels_in_plain_frames_and_reads_the_same(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an event orjson encodes (the largest 64-bit integers, 19 digits in a string)
    target = await make("index.reprs")
    event = {"u": 2**64 - 1, "i": -(2**63), "s": "1234567890123456789012", "f": 0.1}
    encoded = RawEvent.encode(event)
    assert encoded.plain
    sent: list[bytes] = []
    real_call_many = WorkerProcess.call_many

    async def spy(self: WorkerProcess, frame: bytes, invocations: Any) -> Any:
        sent.append(frame[4:5])
        return await real_call_many(self, frame, invocations)

    monkeypatch.setattr(WorkerProcess, "call_many", spy)
    # When it is invoked alone and in a batch, beside one that is not plain
    one = await target.invoke(encoded, inv())
    many = await target.invoke_many([encoded, encoded], [inv(), inv()])
    mixed = await target.invoke_many([encoded, RawEvent(encoded.raw)], [inv(), inv()])
    # Then plain frames went (i, b) only where every event was plain, and the handler saw
    # what the standard library reads each time
    assert sent == [b"i", b"b", b"B"]
    assert one == repr(event) and many == mixed == [repr(event)] * 2


@pytest.mark.parametrize(
    "region", [_pyworker.SHARED_BYTES, 1 << 20, 0], ids=["shared", "some-shared", "no-region"]
)
async def test_large_frames_and_small_ones_between_them(
    make: Factory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    frame_kinds: list[bytes],
    region: int,
) -> None:
    # Given one worker whose region for large frames holds them all, some (1 MiB: the 3 MiB
    # batches go on the socket), or where there is none (no memfd), and batches whose frames
    # take many reads on a socket (plain and not), medium ones and small ones between them
    if region:
        monkeypatch.setattr(_pyworker, "SHARED_BYTES", region)
    else:
        monkeypatch.setattr(_pyworker.SharedFrames, "create", classmethod(lambda cls: None))
    target = await make("index.echo", concurrency=1)
    big = [{"n": i, "text": "é" * 2000} for i in range(800)]  # ~3 MiB of JSON
    assert len(json.dumps(big).encode()) > 3 * 1024 * 1024
    medium = [{"n": i, "text": "m" * 200_000} for i in range(3)]
    # When they are invoked, large and small alternating, concurrently
    results = await asyncio.gather(
        target.invoke_many([RawEvent.encode(e) for e in big], [inv() for _ in big]),
        target.invoke({"small": 1}, inv()),
        target.invoke_many(big, [inv() for _ in big]),
        *(target.invoke({"small": i}, inv()) for i in range(20)),
        *(target.invoke(e, inv()) for e in medium),
        target.invoke_many(medium, [inv() for _ in medium]),
    )
    # Then each handler saw its own event, whole
    assert results[0] == results[2] == [{"event": e, "type": "dict"} for e in big]
    assert results[1] == {"event": {"small": 1}, "type": "dict"}
    assert results[3:23] == [{"event": {"small": i}, "type": "dict"} for i in range(20)]
    assert results[23:26] == [{"event": e, "type": "dict"} for e in medium]
    assert results[26] == [{"event": e, "type": "dict"} for e in medium]
    # and the large frames went through the region where it could hold them, the small ones
    # always on the socket
    # (2 batches of 3 MiB, 3 single events of 200 KB and a batch of 3 of them)
    on_socket = {"shared": [], "some-shared": [b"B", b"B"]}.get(request.node.callspec.id)
    if on_socket is None:  # no region: every frame
        on_socket = [b"B", b"B", b"I", b"I", b"I", b"B"]
    expected = [b"I"] * 21 + on_socket + [b"M"] * (6 - len(on_socket))
    assert Counter(frame_kinds) == Counter(expected)


async def test_a_worker_that_cannot_map_the_region_gets_every_frame_on_its_socket(
    make: Factory, monkeypatch: pytest.MonkeyPatch, frame_kinds: list[bytes]
) -> None:
    # Given a region the worker cannot map (it is announced larger than it is)
    def announced_larger(cls: type[_pyworker.SharedFrames]) -> _pyworker.SharedFrames:
        region = cls(1 << 20)
        region.size = 1 << 30
        return region

    monkeypatch.setattr(_pyworker.SharedFrames, "create", classmethod(announced_larger))
    target = await make("index.echo", concurrency=1)
    # When it gets large events, alone and in a batch
    event = {"pad": "w" * 300_000}
    one = await target.invoke(event, inv())
    many = await target.invoke_many([event, event], [inv(), inv()])
    # Then they went on the socket, whole, and the parent let the region go
    assert one == {"event": event, "type": "dict"} and many == [one, one]
    assert frame_kinds == [b"I", b"B"]
    assert [w.shared for w in target._alive] == [None]


def memfds() -> list[str]:
    """This process's fds open on a region of large frames."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "event-bridge-frames" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(fd)
    return out


async def test_regions_and_their_fds_go_with_their_workers(make: Factory) -> None:
    # Given the daemon's fds before, and three workers that had large events
    fds = set(os.listdir("/proc/self/fd"))
    target = await make("index.sleepy", concurrency=3)
    pad = "r" * 300_000
    await asyncio.gather(*(target.invoke({"sleep": 0.2, "pad": pad}, inv()) for _ in range(3)))
    workers = set(target._alive)
    assert len(workers) == 3 and all(w.shared is not None for w in workers)
    # one fd each, the mapping's own (Python's mmap keeps one): the worker's closed once it
    # started
    assert len(memfds()) == 3
    # When the target closes
    await target.close()
    # Then every region is closed and no fd is left open
    assert all(w.shared is None for w in workers)
    assert set(os.listdir("/proc/self/fd")) <= fds and memfds() == []


async def test_large_frames_after_a_timeout_reach_a_fresh_worker(
    make: Factory, tmp_path: Path, frame_kinds: list[bytes]
) -> None:
    # Given a worker killed while it ran a large event (a timeout)
    target = await make("index.sleepy", timeout="1s", concurrency=1)
    pad, pidfile = "t" * 400_000, tmp_path / "pid"
    with pytest.raises(errors.FunctionTimeout):
        await target.invoke({"sleep": 30, "pad": pad, "pidfile": str(pidfile)}, inv(1.0))
    killed = int(pidfile.read_text())
    # When the next large events come
    after = await target.invoke_many(
        [{"sleep": 0, "pad": pad}, {"sleep": 0, "pad": "u" * 900_000}], [inv(1.0), inv(1.0)]
    )
    # Then a fresh worker ran them, read from its own region
    assert len({a["pid"] for a in after}) == 1 and after[0]["pid"] != killed
    assert frame_kinds == [b"M", b"M"]


async def test_the_function_cannot_shrink_grow_or_seal_the_region_of_large_frames(
    make: Factory,
) -> None:
    # Given a worker whose handler reaches the region its large frames lie in (as root does,
    # through /proc/self/map_files) and tries to shrink it under the daemon's next write
    # (which would kill the daemon with SIGBUS), grow it or seal it against writes
    target = await make("index.reach_frames", concurrency=1)
    event = {"pad": "p" * 300_000}
    # When it runs with a large event
    got = await target.invoke(event, inv())
    # Then it saw the region, and every attempt failed: the seals hold
    assert got["mapped"] is True and got["size"] == len(json.dumps(event))
    if os.geteuid() == 0:
        assert {k: got[k] for k in ("shrink", "grow", "seal")} == dict.fromkeys(
            ("shrink", "grow", "seal"), "PermissionError"
        )
    else:  # not root: it cannot even open it
        assert got["open"] == "PermissionError"
    # and the next large frames are written and read whole
    again = await target.invoke_many([event, {"pad": "q" * 500_000}], [inv(), inv()])
    assert [a["size"] for a in again] == [len(json.dumps(event)), 500_000 + len('{"pad": ""}')]


async def test_context_fields_attribute_access_and_remaining_time(make: Factory) -> None:
    target = await make("index.describe", timeout="5s", memory="64MiB")
    invocation = inv(timeout_s=5.0)

    got = await target.invoke({}, invocation)

    assert {
        "request_id", "function_name", "function_version", "namespace", "memory_limit_in_mb",
        "time_limit_in_ms", "environ", "callbackWaitsForEmptyEventLoop",
    } <= set(got["keys"])  # fmt: skip
    assert got["request_id"] == got["by_key"] == invocation.request_id
    assert got["function_name"] == "pyfunc"
    assert got["function_version"] == "$LATEST"
    assert got["namespace"] == "default"
    assert got["memory_limit_in_mb"] == 64
    assert got["time_limit_in_ms"] == 5000
    assert got["wait"] is False
    assert "SCF_FUNCTIONNAME=pyfunc" in got["environ"].split(";")
    assert 0 < got["remaining_ms"] <= 5000


async def test_the_head_of_a_frame_carries_any_request_id_and_the_time_limit(
    make: Factory,
) -> None:
    # Given events encoded once (RawEvent: the head of the frame is written separately), in
    # plain frames (orjson reads them as they are) and not, with request ids as the API may
    # take them: plain, non-ASCII, a lone surrogate (which orjson refuses: the standard
    # library writes that head)
    target = await make("index.describe", timeout="5s")
    plain = RawEvent.encode({})
    assert plain.plain
    for event in (RawEvent(b"{}"), plain):
        for rid in ("plain-id", "idé-✓\u2028", "lone-\ud800"):
            invocation = Invocation(request_id=rid, function="pyfunc", timeout_s=5.0)
            # When it is invoked alone and in a batch
            one = await target.invoke(event, invocation)
            many = await target.invoke_many([event], [invocation])
            # Then the handler sees the request id and the time limit as they were
            for got in (one, many[0]):
                assert got["request_id"] == rid
                assert got["time_limit_in_ms"] == 5000
                assert 0 < got["remaining_ms"] <= 5000


async def test_async_handler(make: Factory) -> None:
    target = await make("index.coroutine")
    invocation = inv()
    assert await target.invoke({}, invocation) == {
        "async": True,
        "request_id": invocation.request_id,
    }
    assert (await target.invoke({}, inv()))["async"] is True  # the worker's loop is reused


async def test_handler_in_subfolder(make: Factory) -> None:
    target = await make("pkg.nested.main_handler")
    got = await target.invoke({}, inv())
    assert got == {"file": str(CODE / "pkg" / "nested.py"), "cwd": str(CODE)}


# --- warm workers and their isolation -----------------------------------------------------------


async def test_warm_worker_is_reused(make: Factory) -> None:
    target = await make("index.counter")

    results = [await target.invoke({}, inv()) for _ in range(3)]

    assert [r["calls"] for r in results] == [1, 2, 3]
    assert len({r["pid"] for r in results}) == 1


async def test_each_concurrent_worker_has_its_own_temp_dir_and_runs_in_the_code_dir(
    make: Factory, tmp_path: Path
) -> None:
    target = await make("index.instance", concurrency=4)
    barrier = tmp_path / "barrier"
    barrier.mkdir()

    # When four invocations wait for each other at a barrier
    results = await asyncio.gather(
        *(target.invoke({"barrier": str(barrier), "n": 4}, inv()) for _ in range(4))
    )

    # Then they ran at once, in four workers with four temp dirs
    assert len({r["pid"] for r in results}) == 4
    tmps = {r["tmp"] for r in results}
    assert len(tmps) == 4
    for r in results:
        assert Path(r["tmp"]).parent == tmp_path / "state" / "tmp" / "pyfunc"
        assert r["env_tmp"] == [r["tmp"]] * 3
        assert r["probe"] == "writable"
        assert r["cwd"] == r["sys_path0"] == str(CODE)
        assert Path(r["tmp"]).is_dir()

    await target.close()
    assert not any(Path(t).exists() for t in tmps)


async def test_environment_is_minimal_plus_configured(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRIDGE_TEST_SECRET", "hunter2")
    target = await make("index.environment", environment={"GREETING": "hi"})

    env = await target.invoke({}, inv())

    assert env["GREETING"] == "hi"
    assert env["TZ"] == "UTC"
    assert env["SCF_FUNCTIONNAME"] == "pyfunc"
    assert env["SCF_RUNTIME"] == "Python3"
    assert env["TENCENTCLOUD_RUNENV"] == "SCF"
    assert "BRIDGE_TEST_SECRET" not in env
    assert "hunter2" not in env.values()


async def test_configured_environment_wins(make: Factory) -> None:
    target = await make("index.environment", environment={"TZ": "Asia/Shanghai"})
    assert (await target.invoke({}, inv()))["TZ"] == "Asia/Shanghai"


# --- limits -------------------------------------------------------------------------------------


async def test_timeout_kills_the_worker_and_the_next_invocation_works(make: Factory) -> None:
    target = await make("index.sleepy", timeout="500ms")
    pidfile = target.ctx.state_dir / "pid"

    with pytest.raises(errors.FunctionTimeout) as e:
        await target.invoke({"pidfile": str(pidfile), "sleep": 30}, inv(timeout_s=0.5))

    assert e.value.message == "Invoking task timed out after 0.5 seconds"
    assert e.value.error_class is errors.ErrorClass.FUNCTION_ERROR
    old = int(pidfile.read_text())
    await until(lambda: gone(old), what=f"timed-out worker {old} to be reaped")
    got = await target.invoke({"sleep": 0}, inv(timeout_s=5))
    assert got["pid"] != old


async def test_memory_limit(make: Factory) -> None:
    target = await make("index.hog", memory="64MiB")

    with pytest.raises(errors.OutOfMemory) as e:
        await target.invoke({"mib": 512}, inv())

    assert "64 MB" in e.value.message
    assert await target.invoke({"mib": 8}, inv()) == 8  # a fresh worker


# --- crashes ------------------------------------------------------------------------------------


async def test_worker_killed_between_invocations_is_replaced(make: Factory) -> None:
    target = await make("index.counter")
    first = await target.invoke({}, inv())

    os.kill(first["pid"], signal.SIGKILL)
    await until(lambda: gone(first["pid"]), what="killed worker to be reaped")

    second = await target.invoke({}, inv())
    assert second["pid"] != first["pid"]
    assert second["calls"] == 1


async def test_worker_killed_during_an_invocation(make: Factory) -> None:
    target = await make("index.sleepy")
    pidfile = target.ctx.state_dir / "pid"
    call = asyncio.ensure_future(target.invoke({"pidfile": str(pidfile), "sleep": 30}, inv(30)))
    try:
        pid = int(await until(lambda: pidfile.exists() and pidfile.read_text(), what="pid file"))

        os.kill(pid, signal.SIGKILL)

        with pytest.raises(errors.WorkerCrashed) as e:
            await call
    finally:
        call.cancel()
    assert "killed by signal SIGKILL" in e.value.message
    assert e.value.error_class is errors.ErrorClass.SYSTEM_ERROR
    assert (await target.invoke({"sleep": 0}, inv()))["pid"] != pid


async def test_worker_that_kills_itself(make: Factory) -> None:
    target = await make("index.suicide")
    with pytest.raises(errors.WorkerCrashed):
        await target.invoke({}, inv())


async def test_worker_that_exits(make: Factory) -> None:
    target = await make("index.exits")
    with pytest.raises(errors.NonZeroExit, match="exited with status 3"):
        await target.invoke({}, inv())


# --- function errors ----------------------------------------------------------------------------


async def test_missing_entry_file(make: Factory) -> None:
    target = await make("nope.main_handler", validate=False)
    with pytest.raises(errors.HandlerNotFound) as e:
        await target.invoke({}, inv())
    assert e.value.message == (
        f'entry file "nope.py" not found in {CODE} (handler "nope.main_handler")'
    )


async def test_missing_handler_function(make: Factory) -> None:
    target = await make("index.nothere", validate=False)
    with pytest.raises(errors.HandlerNotFound) as e:
        await target.invoke({}, inv())
    assert e.value.message == 'handler function "nothere" not found in index.py'


async def test_import_error(make: Factory) -> None:
    target = await make("broken.main_handler")

    for _ in range(2):  # each time a fresh worker tries again
        with pytest.raises(errors.HandlerFailed) as e:
            await target.invoke({}, inv())
        assert e.value.message == 'importing "broken" failed: ZeroDivisionError: division by zero'
        assert e.value.detail is not None
        assert "Traceback" in e.value.detail
        assert "broken.py" in e.value.detail
        assert "importlib" not in e.value.detail


async def test_handler_raises(make: Factory) -> None:
    target = await make("index.boom")
    invocation = inv()

    with pytest.raises(errors.HandlerFailed) as e:
        await target.invoke({}, invocation)

    assert e.value.message == "ValueError: boom"
    assert e.value.request_id == invocation.request_id
    assert e.value.detail is not None
    assert 'raise ValueError("boom")' in e.value.detail
    assert "_worker.py" not in e.value.detail


async def test_handler_asks_for_retry_or_drop(make: Factory) -> None:
    target = await make("index.signals")
    with pytest.raises(errors.RetryRequested) as e:
        await target.invoke({}, inv())
    assert e.value.retry_after_s == 30.0
    with pytest.raises(errors.Dropped, match="spam"):
        await target.invoke({"drop": True}, inv())


async def test_handler_error_keeps_the_worker(make: Factory) -> None:
    boom = await make("index.boom")
    pids = set()
    for _ in range(2):
        with pytest.raises(errors.HandlerFailed):
            await boom.invoke({}, inv())
        pids |= {p.pid for p in psutil.Process().children()}
    assert len(pids) == 1


async def test_result_not_json(make: Factory) -> None:
    target = await make("index.bad_result")
    with pytest.raises(errors.BadResult) as e:
        await target.invoke({}, inv())
    assert e.value.message == "return value is not JSON serializable: object of type set"


# --- output -------------------------------------------------------------------------------------


async def test_prints_and_logs_are_logged_with_the_request_id(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    target = await make("index.chatty")
    caplog.set_level(logging.INFO, logger=LOGGER)
    invocation = inv()

    assert await target.invoke({}, invocation) == "done"

    # Every line is already logged when the invocation returns, tagged with its request id.
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == invocation.request_id]
    lines = [r.getMessage() for r in mine]
    assert all(r.name == LOGGER and r.levelno == logging.INFO for r in mine)
    assert all(getattr(r, "function", None) == "pyfunc" for r in mine)
    in_channel_order = [
        "first line",
        "two",
        "lines",
        "to stderr",
        "[WARNING] a warning from logging",
        "[INFO] child logger",
        "no newline at the end",
    ]
    assert [ln for ln in lines if ln in in_channel_order] == in_channel_order
    assert "straight to fd 1" in lines


# --- concurrency and shutdown -------------------------------------------------------------------


async def test_never_more_workers_than_concurrency(make: Factory, tmp_path: Path) -> None:
    target = await make("index.instance", concurrency=2)
    barrier = tmp_path / "barrier"
    barrier.mkdir()

    # Three invocations, two workers: the third waits for a free worker.
    results = await asyncio.gather(
        *(target.invoke({"barrier": str(barrier), "n": 2}, inv()) for _ in range(3))
    )

    assert len({r["pid"] for r in results}) == 2
    assert len(psutil.Process().children()) == 2


async def test_close_leaves_no_processes_and_is_idempotent(make: Factory) -> None:
    target = await make("index.sleepy", concurrency=3)
    calls = [asyncio.ensure_future(target.invoke({"sleep": 30}, inv(30))) for _ in range(2)]
    try:
        # Given two workers in the middle of an invocation (start()'s worker took the first)
        await until(lambda: len(psutil.Process().children()) == 2, what="two workers")
        children = psutil.Process().children(recursive=True)

        # When the target is closed (twice)
        await target.close()
        await target.close()

        # Then nothing is left, and the calls in flight failed
        assert psutil.Process().children(recursive=True) == []
        assert all(gone(p.pid) for p in children)
        for call in calls:
            with pytest.raises(errors.WorkerCrashed, match="shutting down"):
                await call
        with pytest.raises(errors.SystemFault, match="shutting down"):
            await target.invoke({}, inv())
        assert not (target.ctx.state_dir / "tmp" / "pyfunc").exists()
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
