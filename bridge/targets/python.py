"""The ``python`` runtime: SCF handlers, ``file.function(event, context)``, in warm worker processes.

Each function gets up to ``concurrency`` worker processes (``bridge/targets/_worker.py``), started
on demand and reused from one invocation to the next, so a handler's module is imported once per
worker and what it keeps at module level (clients, caches) stays warm, as in SCF. ``start()``
starts the first one, so the first call is warm too.

A worker runs with the code folder as working directory and first on ``sys.path``, its own
temporary folder (``STATE_DIR/tmp/FUNCTION/WORKER``, removed with the worker), a small environment
(``PATH``, ``LANG``/``LC_*``, ``HOME``, SCF's variables, ``TZ=UTC``, then the configured
``environment``, which wins — never the daemon's own environment, which may hold secrets), an
address-space limit of ``memory`` beyond what the interpreter uses at start, and a hard timeout:
a worker that does not answer by the invocation's deadline is killed (with its process group)
and replaced.

Parent and worker talk over a socketpair in length-prefixed frames (the protocol is described in
``_worker.py``); what the handler prints or logs comes back as log frames, which this module
logs through ``TargetContext.logger`` tagged with the request id, before the invocation returns.
Output written to file descriptors 1 and 2 directly (C extensions, subprocesses) goes through a
pipe and is logged the same way. Workers die with the daemon (``PR_SET_PDEATHSIG`` and EOF of
the channel) and are always reaped (a pidfd per worker: no threads, no SIGCHLD handler).

With ``isolation = "sandbox"`` (``bridge/sandbox.py``) a worker runs in bubblewrap as the
function's own uid with a private ``/tmp`` instead of the temporary folder, and a cgroup per
worker caps its memory instead of the address-space limit: a worker the kernel kills for going
over it fails its invocation with OutOfMemory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from bridge import deps, errors, sandbox
from bridge.abc import Invocation, Target, TargetContext
from bridge.config import FunctionConfig, LayerRef, RelPath, handler_problems
from bridge.events import RawEvent, loads

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")

#: How long a worker may take to start (interpreter and handler import) outside an invocation.
START_TIMEOUT_S = 10.0
#: Between SIGTERM and SIGKILL when closing.
STOP_GRACE_S = 2.0
#: Longer output lines are logged in pieces (as the worker does for prints).
MAX_LINE = 64 * 1024

_HDR = struct.Struct(">I")
_ids = itertools.count(1)  # worker ids unique in this process, across targets and reloads

#: the folder holding the bridge package, so handlers can import bridge.handler
BRIDGE_PATH = str(Path(__file__).resolve().parent.parent.parent)

_ERRORS: dict[str, type[errors.InvocationError]] = {
    "RetryRequested": errors.RetryRequested,
    "Dropped": errors.Dropped,
    "HandlerNotFound": errors.HandlerNotFound,
    "HandlerFailed": errors.HandlerFailed,
    "BadResult": errors.BadResult,
    "OutOfMemory": errors.OutOfMemory,
}


class PythonConfig(FunctionConfig, sandbox.IsolationFields):
    """``[functions.NAME]`` with ``runtime = "python"``: an SCF-style Python function."""

    code: RelPath = Field(
        description="Folder holding the function's code (relative to the config file)."
    )
    handler: str = Field(
        "index.main_handler",
        description="FILE.FUNCTION: function main_handler of index.py by default; "
        "FILE may be dotted (pkg.module) for a file in a subfolder.",
    )
    python: str | None = Field(
        None, description="Interpreter that runs the workers (default: the daemon's own)."
    )

    dependencies: RelPath | None = Field(
        None,
        description="Requirements file installed for this function alone (default: "
        "requirements.txt in `code`, if any); see docs/scf-projects.md.",
    )
    layers: list[LayerRef] = Field(
        [], description="Names of [layers.NAME] whose content is importable, as under SCF's /opt."
    )
    namespace: str = Field("default", description="SCF namespace (SCF_NAMESPACE, context).")
    credentials_file: RelPath | None = Field(
        None,
        description="File with a Tencent Cloud secret id/key/token, given to the function as "
        "TENCENTCLOUD_SECRETID/SECRETKEY/SESSIONTOKEN (never logged).",
    )

    @field_validator("dependencies", "credentials_file")
    @classmethod
    def _is_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file {v} does not exist")
        return v

    @field_validator("code")
    @classmethod
    def _code_dir(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"code directory {v} does not exist")
        if not os.access(v, os.R_OK | os.X_OK):
            raise ValueError(f"code directory {v} is not readable by this user")
        return v

    @field_validator("handler")
    @classmethod
    def _handler(cls, v: str, info: ValidationInfo) -> str:
        code = info.data.get("code")
        if code is None:  # the code folder is wrong: reported at its own key
            return v
        problem = handler_problems(code, v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("python")
    @classmethod
    def _interpreter(cls, v: str | None) -> str | None:
        if v is None:
            return v
        found = shutil.which(os.path.expanduser(v))
        if found is None:
            raise ValueError(f'python interpreter "{v}" not found or not executable')
        return os.path.abspath(found)


def _jsonable(o: Any) -> Any:
    if isinstance(o, Mapping):
        return dict(o)
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


def _timeout_message(timeout_s: float) -> str:
    return f"Invoking task timed out after {timeout_s:g} seconds"


class PythonTarget(Target[PythonConfig]):
    """Runs an SCF Python handler in a pool of warm worker processes."""

    Config = PythonConfig
    takes_raw = True  # the queue's bytes go into the frame as they are

    def __init__(self, config: PythonConfig, ctx: TargetContext) -> None:
        super().__init__(config, ctx)
        self._code = os.path.abspath(config.code)
        self._python = config.python or sys.executable
        self._tmp_root = Path(ctx.state_dir) / "tmp" / ctx.name
        self._env = self._base_environment()
        self._encode = json.JSONEncoder(separators=(",", ":"), default=_jsonable).encode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: set[_Worker] = set()  # usable or starting: what counts against concurrency
        self._idle: list[_Worker] = []  # LIFO: the most recently used worker is the warmest
        self._waiters: deque[asyncio.Future[_Worker | None]] = deque()
        self._alive: set[_Worker] = set()  # every process not reaped yet
        self._replenisher: asyncio.Task[None] | None = None
        self._closed = False
        self._sandbox: sandbox.Sandbox | None = None  # isolation = "sandbox", once started
        # what a sandboxed worker needs to see, should it lie under /tmp or a hidden folder
        self._expose = [Path(p) for p in (self._code, BRIDGE_PATH, sys.prefix, sys.base_prefix)]
        self._expose.append(Path(os.path.dirname(os.path.abspath(self._python))))
        self._cgroups = sandbox.Sweeper()  # removes the cgroups of reaped workers
        self._unavailable: str | None = None  # why the function cannot start (dependencies)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._remove_stale_tmp()
        try:  # requirements, layers, credentials: built before the first worker (and READY)
            self._env.update(
                await deps.prepare(self.ctx.name, self.config, self.ctx.state_dir, self.ctx.logger)
            )
        except errors.DependencyError as e:
            self._unavailable = e.message
            self.ctx.logger.error("%s; the function does not start", e.message)
            return
        await self._isolate()
        try:
            w = await self._spawn(time.monotonic() + max(START_TIMEOUT_S, self.config.timeout))
        except errors.InvocationError as e:
            self.ctx.logger.warning("function %s: no warm worker: %s", self.ctx.name, e.message)
            return
        w.prestarted = True
        if w.load_error:
            self.ctx.logger.warning(
                "function %s: %s", self.ctx.name, w.load_error.get("message", "cannot load handler")
            )
        self._release(w)

    async def close(self) -> None:
        self._closed = True
        try:
            if self._replenisher is not None:
                self._replenisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._replenisher
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_exception(self._error(errors.SystemFault, self._shutting_down()))
        finally:
            workers = list(self._alive)
            for w in workers:
                w.terminate()
            if workers:
                done = [w.reaped for w in workers]
                await asyncio.wait(done, timeout=STOP_GRACE_S)
                for w in workers:
                    if not w.reaped.done():
                        w.kill()
                _, pending = await asyncio.wait(done, timeout=5.0)
                if pending:
                    self.ctx.logger.error(
                        "function %s: %d worker(s) could not be reaped", self.ctx.name, len(pending)
                    )
            with contextlib.suppress(OSError):
                self._tmp_root.rmdir()
            await self._cgroups.aclose(self.ctx.logger, STOP_GRACE_S)

    # --- invoking --------------------------------------------------------------------------

    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> Any:
        if self._unavailable:
            raise self._error(errors.SystemFault, self._unavailable, invocation)
        if self._closed:
            raise self._error(errors.SystemFault, self._shutting_down(), invocation)
        if invocation.remaining_s() <= 0:
            raise self._error(
                errors.FunctionTimeout, _timeout_message(invocation.timeout_s), invocation
            )
        head = [invocation.request_id, invocation.deadline, int(invocation.timeout_s * 1000)]
        if type(event) is RawEvent:
            # encoded once, when the queue accepted it: the bytes go to the worker untouched
            body = b"".join((self._encode(head)[:-1].encode(), b",", event.raw, b"]"))
        else:
            try:
                body = self._encode([*head, event]).encode()
            except (TypeError, ValueError) as e:
                raise self._error(
                    errors.BadEvent, f"the event is not JSON: {e}", invocation
                ) from None
        frame = _HDR.pack(len(body) + 1) + b"I" + body
        w = self._idle.pop() if self._idle else await self._acquire(invocation)
        try:
            data = await w.call(frame, invocation)
        finally:
            self._release(w)
        return loads(data)

    async def _acquire(self, invocation: Invocation) -> _Worker:
        """An idle worker, a new one while below ``concurrency``, else the next one freed."""
        loop = self._running_loop()
        while True:
            if self._idle:
                return self._idle.pop()
            if self._closed:
                raise self._error(errors.SystemFault, self._shutting_down(), invocation)
            if len(self._workers) < self.config.concurrency:
                return await self._spawn(invocation.deadline, invocation)
            fut: asyncio.Future[_Worker | None] = loop.create_future()
            self._waiters.append(fut)

            def expire(fut: asyncio.Future[_Worker | None] = fut) -> None:
                if not fut.done():
                    fut.set_exception(
                        self._error(
                            errors.FunctionTimeout,
                            _timeout_message(invocation.timeout_s),
                            invocation,
                        )
                    )

            timer = loop.call_later(invocation.remaining_s(), expire)
            try:
                w = await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    got = fut.result()
                    if got is not None:  # handed over just as we gave up: pass it on
                        self._release(got)
                raise
            finally:
                timer.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if w is not None:
                return w

    def _release(self, w: _Worker) -> None:
        """``w`` finished an invocation (or started): give it to a waiter or make it idle."""
        if not w.usable or self._closed:
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(w)
                return
        self._idle.append(w)

    def _forget(self, w: _Worker) -> None:
        """``w`` can take no more invocations (stopped, crashed, retired): free its slot."""
        if w not in self._workers:
            return
        self._workers.discard(w)
        with contextlib.suppress(ValueError):
            self._idle.remove(w)
        while self._waiters:  # one waiter may now start a worker of its own
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break
        # Keep one worker warm after a crash, a timeout or a retirement; a replacement that
        # dies before serving anything is not replaced again (no crash loop).
        if (
            not self._workers
            and not self._closed
            and (w.served or w.prestarted)
            and (self._replenisher is None or self._replenisher.done())
        ):
            self._replenisher = self._running_loop().create_task(self._replenish())

    async def _replenish(self) -> None:
        if self._workers or self._closed:
            return
        try:
            w = await self._spawn(time.monotonic() + max(START_TIMEOUT_S, self.config.timeout))
        except errors.InvocationError as e:
            self.ctx.logger.warning(
                "function %s: cannot replace worker: %s", self.ctx.name, e.message
            )
            return
        self._release(w)

    # --- workers ---------------------------------------------------------------------------

    def sandbox_binds(self) -> list[tuple[Path, Path]]:
        """Extra read-only ``(host_path, sandbox_path)`` binds of a sandboxed worker: the
        function's dependency environment and layers (bridge/deps.py), at the paths its
        ``PYTHONPATH`` names (they live under the state directory, which the sandbox hides)."""
        entries = self._env.get("PYTHONPATH", "").split(os.pathsep)
        return [(Path(p), Path(p)) for p in dict.fromkeys(entries) if p and Path(p).exists()]

    async def _isolate(self) -> None:
        """``isolation = "sandbox"``: what this host can do, or the configured fallback."""
        self._sandbox = await sandbox.for_target(
            self.ctx.name,
            self.config,
            memory=self.config.memory,
            state_dir=self.ctx.state_dir,
            logger=self.ctx.logger,
            private_files=self.ctx.private_files,
            binds=self.sandbox_binds(),
        )

    def _base_environment(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        for k, v in os.environ.items():
            if k in ("LANG", "LANGUAGE", "HOME") or k.startswith("LC_"):
                env[k] = v
        env.update(
            SCF_FUNCTIONNAME=self.ctx.name,
            SCF_FUNCTIONVERSION="$LATEST",
            SCF_NAMESPACE=self.config.namespace,
            SCF_RUNTIME="Python3",
            TENCENTCLOUD_RUNENV="SCF",
            USER_CODE_ROOT=self._code,
            TZ="UTC",
            MALLOC_ARENA_MAX="2",  # fewer 64 MiB malloc arenas reserved against RLIMIT_AS
        )
        return env

    async def _spawn(self, deadline: float, invocation: Invocation | None = None) -> _Worker:
        """Start a worker and wait until it is ready (or the deadline passes)."""
        loop = self._running_loop()
        wid = f"{os.getpid()}-{next(_ids)}"
        box = self._sandbox
        cgroup: sandbox.Cgroup | None = None
        tmp: Path | None = None
        if box is not None:  # a private /tmp in the sandbox; the cgroup caps memory
            try:
                cgroup = box.cgroup(wid)
            except OSError as e:
                raise self._error(
                    errors.SystemFault, f"cannot create the worker's cgroup: {e}", invocation
                ) from None
            env = {**self._env, "TMPDIR": "/tmp", "TMP": "/tmp", "TEMP": "/tmp", "HOME": "/tmp"}
        else:
            tmp = self._tmp_root / wid
            try:
                tmp.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self._error(
                    errors.SystemFault, f"cannot create temp dir {tmp}: {e.strerror}", invocation
                ) from None
            env = {**self._env, "TMPDIR": str(tmp), "TMP": str(tmp), "TEMP": str(tmp)}
        env.update(self.config.environment)
        settings = json.dumps(
            {
                "name": self.ctx.name,
                "code": self._code,
                "handler": self.config.handler,
                "memory": self.config.memory,
                "timeout_ms": int(self.config.timeout * 1000),
                # in the sandbox its parent is bwrap's init, and the cgroup caps memory
                "ppid": None if box else os.getpid(),
                "rlimit": box is None,
                "bridge_path": BRIDGE_PATH,
            }
        )
        psock, csock = socket.socketpair()
        out_r, out_w = os.pipe()
        argv = [self._python, str(WORKER_SCRIPT), str(csock.fileno()), settings]
        if box is not None and cgroup is not None:
            argv = box.command(argv, cwd=Path(self._code), cgroup=cgroup, expose=self._expose)
        try:
            # Blocking, but only for the fork/exec (a millisecond or two): the interpreter's
            # start and the handler's import are awaited below.
            popen = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                pass_fds=(csock.fileno(),),
                cwd=self._code,
                env=env,
                start_new_session=True,  # its own process group: killed as one, no terminal ^C
            )
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            psock.close()
            os.close(out_r)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if cgroup is not None:
                cgroup.remove()
            raise self._error(
                errors.SystemFault, f"cannot start a worker with {self._python}: {e}", invocation
            ) from None
        finally:
            csock.close()
            os.close(out_w)
        w = _Worker(self, wid, popen, tmp, out_r, cgroup)
        self._workers.add(w)
        self._alive.add(w)
        try:
            try:
                await loop.connect_accepted_socket(lambda: w, psock)
            except BaseException:
                psock.close()
                raise
            await w.wait_ready(deadline, invocation)
        except BaseException:
            w.kill()
            raise
        return w

    def _remove_stale_tmp(self) -> None:
        """Temp folders left by a daemon that was killed (their pid prefix is not running)."""
        if not self._tmp_root.is_dir():
            return
        for d in self._tmp_root.iterdir():
            pid = d.name.split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:  # someone else's live process
                pass

    # --- helpers ---------------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _shutting_down(self) -> str:
        return f'function "{self.ctx.name}" is shutting down'

    def _error(
        self,
        cls: type[errors.InvocationError],
        message: str,
        invocation: Invocation | None = None,
        detail: str | None = None,
    ) -> errors.InvocationError:
        e = cls(message, detail=detail)
        e.function = self.ctx.name
        if invocation is not None:
            e.request_id = invocation.request_id
        return e

    def _log(self, line: bytes, request_id: str | None) -> None:
        self.ctx.logger.info(
            line.decode("utf-8", "replace"),
            extra={"request_id": request_id, "function": self.ctx.name},
        )


class _Worker(asyncio.Protocol):
    """The parent's side of one worker process: its channel, output pipe and exit."""

    def __init__(
        self,
        target: PythonTarget,
        wid: str,
        popen: subprocess.Popen[bytes],
        tmp: Path | None,
        out_fd: int,
        cgroup: sandbox.Cgroup | None = None,
    ) -> None:
        self.target = target
        self.wid = wid
        self.popen = popen
        self.pid = popen.pid
        self.tmp = tmp
        self.cgroup = cgroup
        self.oom_killed = False  # by the kernel, for going over the cgroup's memory cap
        self.loop = target._running_loop()
        self.transport: asyncio.Transport | None = None
        self.usable = True
        self.prestarted = False
        self.served = 0
        self.load_error: dict[str, Any] | None = None
        self.ready: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.reaped: asyncio.Future[int] = self.loop.create_future()
        self.returncode: int | None = None
        self.eof = False
        self.fut: asyncio.Future[bytes] | None = None
        self.invocation: Invocation | None = None
        self.request_id: str | None = None
        self._chunks: list[bytes] = []  # an incomplete frame
        self._have = self._need = 0
        self._out_fd: int | None = out_fd
        self._out_buf = b""
        self.tail: deque[str] = deque(maxlen=40)  # last output lines, for crash reports
        os.set_blocking(out_fd, False)
        self.loop.add_reader(out_fd, self._on_output)
        self._pidfd: int | None = None
        self._timers: list[asyncio.TimerHandle] = []
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # old kernel: poll once the channel closes
            pass
        else:
            self.loop.add_reader(self._pidfd, self._check_exit)

    # --- calls -----------------------------------------------------------------------------

    async def wait_ready(self, deadline: float, invocation: Invocation | None) -> None:
        def expire() -> None:
            if not self.ready.done():
                timeout_s = invocation.timeout_s if invocation else deadline - time.monotonic()
                msg = (
                    _timeout_message(timeout_s)
                    if invocation
                    else "the worker did not start in time"
                )
                self.ready.set_exception(
                    self.target._error(errors.FunctionTimeout, msg, invocation, self._tail())
                )
                self.kill()

        timer = self.loop.call_later(deadline - time.monotonic(), expire)
        try:
            info = await self.ready
        finally:
            timer.cancel()
        self.load_error = info.get("error")

    async def call(self, frame: bytes, invocation: Invocation) -> bytes:
        assert self.transport is not None
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.fut = fut
        self.invocation = invocation
        self.request_id = invocation.request_id
        self.served += 1
        self.transport.write(frame)
        timer = self.loop.call_later(invocation.remaining_s(), self._on_deadline)
        try:
            return await fut
        except asyncio.CancelledError:
            if not fut.done():  # its answer would arrive during someone else's invocation
                self.kill()
            raise
        finally:
            timer.cancel()
            self.fut = self.invocation = None
            self.request_id = None

    def _on_deadline(self) -> None:
        fut, invocation = self.fut, self.invocation
        if fut is None or fut.done() or invocation is None:
            return
        self.kill()
        self._drain_output(final=True)
        fut.set_exception(
            self.target._error(
                errors.FunctionTimeout, _timeout_message(invocation.timeout_s), invocation
            )
        )

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._chunks:  # the rest of a large frame: join once, when it is complete
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._chunks)
            self._chunks = []
        pos, size = 0, len(data)
        unpack = _HDR.unpack_from
        while size - pos >= 4:
            end = pos + 4 + unpack(data, pos)[0]
            if end > size:
                break
            self._frame(data[pos + 4 : end])
            pos = end
        if pos < size:
            rest = data[pos:]
            self._chunks = [rest]
            self._have = len(rest)
            self._need = 4 + unpack(rest)[0] if len(rest) >= 4 else 4

    def _frame(self, frame: bytes) -> None:
        kind = frame[0]
        if kind == 0x4C:  # L
            self.target._log(frame[1:], self.request_id)
            return
        fut, invocation = self.fut, self.invocation
        if kind == 0x4F:  # O
            if fut is not None and not fut.done() and invocation is not None:
                invocation.max_memory_bytes = int.from_bytes(frame[1:9], "big")
                self._drain_output()
                fut.set_result(frame[9:])
        elif kind == 0x45:  # E
            info = json.loads(frame[1:])
            if info.get("retire"):
                self._retire()
            if fut is not None and not fut.done() and invocation is not None:
                invocation.max_memory_bytes = info.get("rss") or None
                self._drain_output(final=True)
                cls = _ERRORS.get(info.get("type"), errors.SystemFault)
                err = self.target._error(cls, info.get("message"), invocation, info.get("detail"))
                if info.get("retry_after") is not None:
                    err.retry_after_s = float(info["retry_after"])
                fut.set_exception(err)
        elif kind == 0x52 and not self.ready.done():  # R
            self.ready.set_result(json.loads(frame[1:]))

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.eof = True
        self._set_unusable()
        if self.returncode is None:
            if self._pidfd is None:
                self._timers.append(self.loop.call_later(0.01, self._poll_exit))
            # The channel closes only when the worker exits; make sure it does.
            self._timers.append(self.loop.call_later(STOP_GRACE_S, self._kill_if_running))
        self._maybe_finish()

    # --- exit --------------------------------------------------------------------------------

    def _retire(self) -> None:
        """The worker said it goes away after this answer: free its slot now."""
        self._set_unusable()
        self._timers.append(self.loop.call_later(STOP_GRACE_S, self._kill_if_running))

    def _set_unusable(self) -> None:
        if self.usable:
            self.usable = False
            self.target._forget(self)

    def _kill_if_running(self) -> None:
        if self.returncode is None:
            self.kill()

    def terminate(self) -> None:
        self._set_unusable()
        if self.transport is not None:
            self.transport.close()  # EOF: an idle worker exits by itself
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._set_unusable()
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        # The unreaped worker holds its pid, so its process group id cannot have been reused.
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def _check_exit(self) -> None:
        if self.returncode is not None:
            return
        # Before reaping, while the group id is still ours: end what the handler left running.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        rc = self.popen.poll()
        if rc is None:
            return
        self.returncode = rc
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._set_unusable()
        self._maybe_finish()

    def _poll_exit(self) -> None:
        self._check_exit()
        if self.returncode is None:
            self._timers.append(self.loop.call_later(0.02, self._poll_exit))

    def _maybe_finish(self) -> None:
        """Once the process is reaped and its channel drained: fail what waits, clean up."""
        if self.returncode is None or not self.eof or self.reaped.done():
            return
        self._drain_output(final=True)
        if self.cgroup is not None:
            self.oom_killed = self.cgroup.oom_killed()
            self.target._cgroups.dispose(self.cgroup)
        fut, invocation = self.fut, self.invocation
        if fut is not None and not fut.done():
            fut.set_exception(self._crash_error(invocation))
        if not self.ready.done():
            self.ready.set_exception(self._crash_error(None, before_ready=True))
            self.ready.exception()  # retrieved: the spawn may have given up on it already
        for t in self._timers:
            t.cancel()
        self._close_output()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.target._alive.discard(self)
        self.reaped.set_result(self.returncode)

    def _crash_error(
        self, invocation: Invocation | None, before_ready: bool = False
    ) -> errors.InvocationError:
        """The worker died: a system error (WorkerCrashed), except an exit with a status during
        an invocation, which only the function's code does (``os._exit``): NonZeroExit."""
        rc = self.returncode
        assert rc is not None
        if self.target._closed:
            return self.target._error(
                errors.WorkerCrashed,
                f"worker {self.pid} was stopped: {self.target._shutting_down()}",
                invocation,
            )
        if self.oom_killed:
            mb = self.target.config.memory / (1024 * 1024)
            return self.target._error(
                errors.OutOfMemory,
                f"Memory limit exceeded: the function used more than {mb:g} MB",
                invocation,
                self._tail(),
            )
        cls: type[errors.InvocationError] = errors.WorkerCrashed
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            how = f"was killed by signal {name}"
            if -rc == signal.SIGKILL:
                how += " (out of memory, or killed by an operator)"
        else:
            how = f"exited with status {rc}"
            if rc and not before_ready:
                cls = errors.NonZeroExit
        when = "before it was ready" if before_ready else "during the invocation"
        msg = f"worker process {self.pid} {how} {when}"
        if before_ready and self.tail:  # e.g. the interpreter cannot run the worker
            msg += f": {self.tail[-1]}"
        return self.target._error(cls, msg, invocation, self._tail())

    # --- output pipe -------------------------------------------------------------------------

    def _on_output(self) -> None:
        if self._out_fd is None:
            return
        try:
            data = os.read(self._out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._output(data)
        else:
            self._output(b"", final=True)
            self._close_output()

    def _drain_output(self, final: bool = False) -> None:
        """Log what the worker wrote to fds 1/2 so far (before the answer it sent after)."""
        while self._out_fd is not None:
            try:
                data = os.read(self._out_fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            self._output(data)
        if final and self._out_buf:
            self._output(b"", final=True)

    def _output(self, data: bytes, final: bool = False) -> None:
        data = self._out_buf + data if self._out_buf else data
        lines = data.split(b"\n")
        rest = lines.pop()
        if final and rest:
            lines.append(rest)
            rest = b""
        while len(rest) > MAX_LINE:  # no newline in sight: log it in pieces
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._out_buf = rest
        for line in lines:
            line = line.rstrip(b"\r")
            self.tail.append(line.decode("utf-8", "replace"))
            self.target._log(line, self.request_id)

    def _close_output(self) -> None:
        if self._out_fd is not None:
            self.loop.remove_reader(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = None

    def _tail(self) -> str | None:
        return "\n".join(self.tail) or None
