"""The ``command`` runtime: run an argv with the event JSON on stdin; stdout is the result.

Each invocation is one fresh process in its own process group, with a clean
environment (PATH, LANG and HOME from the daemon, the SCF variables, the
function's ``environment``), a private ``TMPDIR`` removed afterwards, and
RLIMIT_AS set to the function's ``memory`` (see :meth:`bridge.targets._proc.Child.spawn`
for what that limit does and does not cover). The invocation ends when the
command exits: whatever it left running in its process group is killed then,
and everything is killed when the time limit is reached. Lines on stderr are
logged tagged with the request id.

Outcomes: exit 0 → the result (``result = "json" | "text" | "auto"``); a
non-zero status → NonZeroExit with the stderr tail; killed by a signal →
FunctionError naming it (SIGKILL, which the kernel's OOM killer sends →
OutOfMemory); the time limit → FunctionTimeout; a missing or non-executable
program → HandlerNotFound.

With ``isolation = "sandbox"`` (``bridge/sandbox.py``) each run is in bubblewrap as the
function's uid, with a private ``/tmp`` (also its working directory without ``code``) and a
cgroup capping its memory instead of RLIMIT_AS: a run the kernel kills for going over it is
OutOfMemory ("Memory limit exceeded").
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from bridge import sandbox
from bridge.abc import Invocation, Target
from bridge.config import FunctionConfig, RelPath
from bridge.errors import (
    BadEvent,
    BadResult,
    FunctionError,
    FunctionTimeout,
    HandlerNotFound,
    NonZeroExit,
    OutOfMemory,
    SystemFault,
)
from bridge.events import RawEvent, dumps, thaw
from bridge.targets import _proc

#: Largest result read from stdout (SCF's synchronous result limit).
MAX_RESULT = 6 * 1000**2
#: stderr lines kept for the error detail.
TAIL_LINES = 20

_runs = itertools.count(1)  # names the cgroups of sandboxed runs


class CommandConfig(FunctionConfig, sandbox.IsolationFields):
    """``[functions.NAME]`` with ``runtime = "command"``: run a program per invocation."""

    code: RelPath | None = Field(
        None, description="Working directory of the command (default: the function's state folder)."
    )
    command: list[str] = Field(
        min_length=1,
        description="The argv. A program with a slash is a path, relative to `code` (or to the "
        "config file's folder without `code`); a bare name is looked up on PATH.",
    )
    result: Literal["json", "text", "auto"] = Field(
        "auto",
        description="How stdout becomes the result: json (must parse), text (stripped), or auto "
        "(JSON when it parses, else text).",
    )

    @field_validator("code")
    @classmethod
    def _check_code(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"code directory {v} does not exist")
        return v

    @field_validator("command")
    @classmethod
    def _check_command(cls, v: list[str], info: ValidationInfo) -> list[str]:
        program = v[0]
        if not program.strip():
            raise ValueError("the program (first item) must not be empty")
        if "/" not in program:
            return v  # looked up on PATH when invoked: the daemon's PATH may differ from ours
        path = Path(program).expanduser()
        if not path.is_absolute():
            if "code" not in info.data:
                return v  # code is invalid and reported there
            base = info.data["code"] or (info.context or {}).get("base_dir")
            if base is None:
                return v
            path = Path(os.path.normpath(Path(base) / path))
        problem = _proc.executable_problem(path)
        if problem:
            raise ValueError(f'program "{program}": {problem}')
        return [str(path), *v[1:]]


class CommandTarget(Target[CommandConfig]):
    """Runs the configured command once per invocation."""

    Config = CommandConfig
    takes_raw = True  # the queue's bytes are sent as they are
    _sandbox: sandbox.Sandbox | None = None
    _cgroups: sandbox.Sweeper | None = None  # removes the cgroups of finished sandboxed runs

    async def start(self) -> None:
        self._sandbox = await sandbox.for_target(
            self.ctx.name,
            self.config,
            memory=self.config.memory,
            state_dir=self.ctx.state_dir,
            logger=self.ctx.logger,
            private_files=self.ctx.private_files,
        )
        if self._sandbox is not None:
            self._cgroups = sandbox.Sweeper()

    async def close(self) -> None:
        if self._cgroups is not None:
            await self._cgroups.aclose(self.ctx.logger)

    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> Any:
        try:
            payload = event.raw if type(event) is RawEvent else dumps(thaw(event))
        except (TypeError, ValueError) as e:
            raise BadEvent(f"the event is not JSON-serializable: {e}") from None
        if self._sandbox is not None:
            return await self._run_sandboxed(self._sandbox, payload, invocation)
        cwd = self.config.code or self.ctx.state_dir
        tmp_base = self.ctx.state_dir / "tmp" / self.ctx.name
        tmp_base.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="inv-", dir=tmp_base)
        try:
            env = _proc.function_env(
                self.ctx.name, self.config.runtime, self.config.environment, TMPDIR=tmp
            )
            self._check_program(cwd, env)
            return await self._run(payload, cwd, env, invocation)
        finally:
            # a function may leave many files behind: keep the event loop free meanwhile
            await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)

    def _check_program(self, cwd: Path, env: Mapping[str, str]) -> None:
        program = self.config.command[0]
        if "/" in program:
            problem = _proc.executable_problem(cwd / program)  # an absolute path stays absolute
            if problem:
                raise HandlerNotFound(f'program "{program}" of function {self.ctx.name}: {problem}')
        elif shutil.which(program, path=env["PATH"]) is None:
            raise HandlerNotFound(
                f'program "{program}" of function {self.ctx.name} not found on PATH ({env["PATH"]})'
            )

    async def _run_sandboxed(
        self, box: sandbox.Sandbox, payload: bytes, invocation: Invocation
    ) -> Any:
        cwd = self.config.code or Path("/tmp")
        env = _proc.function_env(
            self.ctx.name, self.config.runtime, self.config.environment, TMPDIR="/tmp"
        )
        env["HOME"] = "/tmp"
        if self.config.code is not None:
            self._check_program(cwd, env)
        try:
            cgroup = box.cgroup(f"{os.getpid()}-c{next(_runs)}")
        except OSError as e:
            raise SystemFault(
                f"cannot create the cgroup of function {self.ctx.name}: {e}"
            ) from None
        program = Path(self.config.command[0])
        expose = [cwd, program.parent] if program.is_absolute() else [cwd]
        expose += sandbox.interpreter_paths()
        argv = box.command(self.config.command, cwd=cwd, cgroup=cgroup, expose=expose)
        try:
            return await self._run(payload, cwd, env, invocation, argv=argv, cgroup=cgroup)
        finally:
            # not waited for: the sandbox's last processes may take a moment to go
            assert self._cgroups is not None
            self._cgroups.dispose(cgroup)

    async def _run(
        self,
        payload: bytes,
        cwd: Path,
        env: Mapping[str, str],
        invocation: Invocation,
        *,
        argv: list[str] | None = None,
        cgroup: sandbox.Cgroup | None = None,
    ) -> Any:
        extra = {"request_id": invocation.request_id, "function": self.ctx.name}
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

        def on_stderr(line: str) -> None:
            tail.append(line)
            self.ctx.logger.info(line, extra=extra)

        stdout = _Capture(MAX_RESULT)
        child = _proc.Child(stdout, _proc.Lines(on_stderr))
        stdout.on_overflow = lambda: child.signal_group(signal.SIGKILL)
        try:
            await child.spawn(
                argv or self.config.command,
                cwd=cwd,
                env=env,
                stdin=True,
                memory_limit=None if cgroup else self.config.memory,
            )
        except OSError as e:
            raise HandlerNotFound(
                f'cannot run "{self.config.command[0]}" of function {self.ctx.name}: {e.strerror or e}'
            ) from None
        timed_out = False
        try:
            child.write_stdin(payload)
            try:
                async with asyncio.timeout(invocation.remaining_s()):
                    await asyncio.shield(child.exited)
            except TimeoutError:
                timed_out = True
        finally:
            # the invocation ends with the command: this kills all it left in its group
            await child.close()

        detail = "\n".join(tail) or None
        rc = child.returncode
        assert rc is not None  # close() waited for the exit
        if timed_out:
            raise FunctionTimeout(
                f"Invoking task timed out after {invocation.timeout_s:g} seconds", detail=detail
            )
        if cgroup is not None and cgroup.oom_killed():
            raise OutOfMemory(
                "Memory limit exceeded: the function used more than "
                f"{self.config.memory / 1024**2:g} MB",
                detail=detail,
            )
        if stdout.overflow:
            raise BadResult(
                f"result too large: more than {MAX_RESULT} bytes on stdout", detail=detail
            )
        if rc < 0:
            sig = -rc
            if sig == signal.SIGKILL:
                raise OutOfMemory(
                    f"command was killed by SIGKILL (out of memory? limit {self.config.memory // 1024**2} MiB)",
                    detail=detail,
                )
            raise FunctionError(f"command was killed by {_proc.signal_name(sig)}", detail=detail)
        if rc != 0:
            raise NonZeroExit(f"command exited with status {rc}", detail=detail)
        return self._result(bytes(stdout.data))

    def _result(self, out: bytes) -> Any:
        mode = self.config.result
        if mode == "json":
            try:
                return json.loads(out)
            except ValueError as e:
                raise BadResult(
                    f"stdout is not valid JSON: {e}",
                    detail=out[:4096].decode("utf-8", "replace") or None,
                ) from None
        text = out.decode("utf-8", "replace")
        if mode == "auto":
            try:
                return json.loads(text)
            except ValueError:
                pass
        return text.strip()


class _Capture:
    """stdout, kept up to ``limit`` bytes; past it, ``on_overflow`` is called once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.overflow = False
        self.on_overflow: Callable[[], None] | None = None

    def feed(self, data: bytes) -> None:
        if self.overflow:
            return
        self.data += data
        if len(self.data) > self.limit:
            self.overflow = True
            self.data.clear()
            if self.on_overflow is not None:
                self.on_overflow()

    def flush(self) -> None:
        pass
