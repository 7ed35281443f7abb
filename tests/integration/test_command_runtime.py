"""The ``command`` runtime against real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from bridge.abc import Invocation, TargetContext
from bridge.errors import (
    BadResult,
    FunctionError,
    FunctionTimeout,
    HandlerNotFound,
    NonZeroExit,
    OutOfMemory,
)
from bridge.targets.command import MAX_RESULT, CommandConfig, CommandTarget
from bridge.testing import until

from .conftest import gone

pytestmark = pytest.mark.integration

FUNCTIONS = Path(__file__).parent / "functions"
PY = sys.executable
ECHO = [PY, "-c", "import sys, json; print(json.dumps(json.load(sys.stdin)))"]
LOGGER = "bridge.functions.test-cmd"


def target(tmp_path: Path, **fields: Any) -> CommandTarget:
    config = CommandConfig.model_validate(
        {"runtime": "command", **fields}, context={"base_dir": tmp_path, "name": "cmd"}
    )
    ctx = TargetContext(name="cmd", state_dir=tmp_path / "state", logger=logging.getLogger(LOGGER))
    return CommandTarget(config, ctx)


def invocation(timeout_s: float = 20.0) -> Invocation:
    return Invocation(request_id=str(uuid.uuid4()), function="cmd", timeout_s=timeout_s)


def py(code: str) -> list[str]:
    return [PY, "-c", code]


async def test_echo_returns_the_event(tmp_path: Path) -> None:
    event = {"Type": "Timer", "Message": "héllo", "n": [1, 2, 3]}
    assert await target(tmp_path, command=ECHO).invoke(event, invocation()) == event


async def test_relative_program_runs_from_code_dir(tmp_path: Path) -> None:
    # Given a script referred to relative to the code dir
    t = target(tmp_path, code=str(FUNCTIONS / "cmd"), command=["./cat.sh"])
    # Then it is resolved there and the event comes back through cat
    assert t.config.command == [str(FUNCTIONS / "cmd" / "cat.sh")]
    assert await t.invoke({"a": 1}, invocation()) == {"a": 1}


async def test_text_results(tmp_path: Path) -> None:
    assert await target(tmp_path, command=["echo", " plain words "]).invoke({}, invocation()) == (
        "plain words"
    )
    # text mode does not parse JSON
    t = target(tmp_path, command=["echo", '{"a": 1}'], result="text")
    assert await t.invoke({}, invocation()) == '{"a": 1}'


async def test_json_result_that_is_not_json(tmp_path: Path) -> None:
    t = target(tmp_path, command=["echo", "not json"], result="json")
    with pytest.raises(BadResult, match="not valid JSON") as e:
        await t.invoke({}, invocation())
    assert e.value.detail == "not json\n"


async def test_nonzero_exit_carries_stderr_tail(tmp_path: Path) -> None:
    code = "import sys\nfor i in range(30): print(f'line {i}', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(NonZeroExit, match=r"^command exited with status 3$") as e:
        await target(tmp_path, command=py(code)).invoke({}, invocation())
    assert e.value.detail is not None
    lines = e.value.detail.splitlines()
    assert lines == [f"line {i}" for i in range(10, 30)]


async def test_stderr_lines_logged_with_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    inv = invocation()
    code = "import sys; print('first', file=sys.stderr); sys.stderr.write('no newline'); print(42)"
    assert await target(tmp_path, command=py(code)).invoke({}, inv) == 42
    mine = [r for r in caplog.records if r.name == LOGGER]
    assert [r.getMessage() for r in mine] == ["first", "no newline"]
    assert all(getattr(r, "request_id", None) == inv.request_id for r in mine)
    assert all(getattr(r, "function", None) == "cmd" for r in mine)


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    # Given a command that starts a grandchild and then sleeps
    pidfile = tmp_path / "pids.json"
    t = target(tmp_path, command=[PY, str(FUNCTIONS / "cmd" / "spawn_and_sleep.py")])
    # When it runs out of time
    with pytest.raises(FunctionTimeout, match=r"^Invoking task timed out after 3 seconds$") as e:
        await t.invoke({"pidfile": str(pidfile)}, invocation(timeout_s=3))
    # Then both processes are gone
    pids = json.loads(pidfile.read_text())
    await until(lambda: gone(pids["child"]) and gone(pids["grandchild"]), what="the group to die")
    assert "started" in (e.value.detail or "")


async def test_leftover_background_process_is_killed_when_the_command_exits(
    tmp_path: Path,
) -> None:
    # The background sleep keeps stdout open: the invocation must not wait for it.
    pidfile = tmp_path / "bg.pid"
    t = target(tmp_path, command=["sh", "-c", f"sleep 600 & echo $! > {pidfile}; echo done"])
    assert await t.invoke({}, invocation(timeout_s=10)) == "done"
    pid = int(pidfile.read_text())
    await until(lambda: gone(pid), what="the background process to die")


async def test_program_not_found(tmp_path: Path) -> None:
    t = target(tmp_path, command=["no-such-program-for-event-bridge", "x"])
    with pytest.raises(
        HandlerNotFound, match=r"no-such-program-for-event-bridge.* not found on PATH"
    ):
        await t.invoke({}, invocation())


async def test_program_not_executable(tmp_path: Path) -> None:
    # Given a script that was executable when the config was validated, but is not any more
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    t = target(tmp_path, command=["./run.sh"])
    script.chmod(0o644)
    with pytest.raises(HandlerNotFound, match=r"run.sh is not executable \(chmod \+x\)"):
        await t.invoke({}, invocation())
    script.unlink()
    with pytest.raises(HandlerNotFound, match=r"run\.sh does not exist"):
        await t.invoke({}, invocation())


async def test_environment_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a secret in the daemon's environment and a configured variable
    monkeypatch.setenv("EB_TEST_SECRET", "s3cr3t")
    code = "import json, os; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))"
    t = target(tmp_path, command=py(code), environment={"GREETING": "hi", "TZ": "Asia/Shanghai"})
    out = await t.invoke({}, invocation())
    env = out["env"]
    # Then the function sees only the minimal base, the SCF variables and its own
    assert "EB_TEST_SECRET" not in env
    assert env["GREETING"] == "hi"
    assert env["TZ"] == "Asia/Shanghai"
    assert env["SCF_FUNCTIONNAME"] == "cmd"
    assert env["SCF_RUNTIME"] == "command"
    assert env["PATH"] == os.environ["PATH"]
    # with its own temp dir, removed afterwards, and the state dir as working dir
    assert Path(env["TMPDIR"]).parent == tmp_path / "state" / "tmp" / "cmd"
    assert list((tmp_path / "state" / "tmp" / "cmd").iterdir()) == []
    assert out["cwd"] == str(tmp_path / "state")


async def test_default_tz_is_utc(tmp_path: Path) -> None:
    t = target(tmp_path, command=["sh", "-c", "echo $TZ"])
    assert await t.invoke({}, invocation()) == "UTC"


async def test_killed_by_signal(tmp_path: Path) -> None:
    term = py("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    with pytest.raises(FunctionError, match="killed by SIGTERM") as e:
        await target(tmp_path, command=term).invoke({}, invocation())
    assert type(e.value) is FunctionError
    kill = py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(OutOfMemory, match="killed by SIGKILL"):
        await target(tmp_path, command=kill).invoke({}, invocation())


async def test_memory_limit(tmp_path: Path) -> None:
    code = "x = bytearray(512 * 1024 * 1024)"
    with pytest.raises(NonZeroExit) as e:
        await target(tmp_path, command=py(code), memory="64MiB").invoke({}, invocation())
    assert "MemoryError" in (e.value.detail or "")


async def test_result_too_large(tmp_path: Path) -> None:
    code = f"import sys; sys.stdout.write('x' * {MAX_RESULT + 10})"
    with pytest.raises(BadResult, match="result too large"):
        await target(tmp_path, command=py(code)).invoke({}, invocation())


async def test_command_that_ignores_its_input(tmp_path: Path) -> None:
    # A large event the command never reads must not block or fail the invocation.
    event = {"blob": "x" * 1_000_000}
    assert await target(tmp_path, command=["true"]).invoke(event, invocation()) == ""


async def test_concurrent_invocations(tmp_path: Path) -> None:
    t = target(tmp_path, command=ECHO)
    results = await asyncio.gather(*(t.invoke({"i": i}, invocation()) for i in range(8)))
    assert results == [{"i": i} for i in range(8)]
    assert list((tmp_path / "state" / "tmp" / "cmd").iterdir()) == []
