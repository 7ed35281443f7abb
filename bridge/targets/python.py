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
``_worker.py``); a frame of 64 KiB or more is written into a shared memory region of the
worker's instead (``_pyworker.SharedFrames``), and a small frame on the socket points at it.
What the handler prints or logs comes back as log frames, which this module logs through
``TargetContext.logger`` tagged with the request id, before the invocation returns.
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
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field, ValidationInfo, field_validator

from bridge import deps, errors, sandbox
from bridge.abc import Invocation, Target, TargetContext
from bridge.config import FunctionConfig, LayerRef, RelPath, handler_problems
from bridge.events import RawEvent, loads
from bridge.log import HotLog
from bridge.targets._pyworker import (
    STOP_GRACE_S,
    SharedFrames,
    WorkerProcess,
    timeout_message,
)

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")

#: How long a worker may take to start (interpreter and handler import) outside an invocation.
START_TIMEOUT_S = 10.0
#: SO_SNDBUF asked for on the parent's end of a worker's channel (see ``_spawn``)
SEND_BUFFER = 4 * 1024 * 1024
_ids = itertools.count(1)  # worker ids unique in this process, across targets and reloads

#: the folder holding the bridge package, so handlers can import bridge.handler
BRIDGE_PATH = str(Path(__file__).resolve().parent.parent.parent)


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


def _plain(event: Any) -> bool:
    """Whether the frame's JSON for ``event`` is orjson's (:meth:`RawEvent.encode`): the
    worker then reads it without looking for integers beyond 64 bits. The frame's head,
    ``[request_id, deadline, time_limit_ms, ...]`` (:meth:`PythonTarget._body`), holds none:
    a string, a monotonic time and at most 900,000 ms. A new field there must keep it so."""
    return type(event) is RawEvent and event.plain


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
        self._lines = HotLog(ctx.logger)  # what the function prints, one line at a time
        self._workers: set[WorkerProcess] = (
            set()
        )  # usable or starting: what counts against concurrency
        self._idle: list[WorkerProcess] = []  # LIFO: the most recently used worker is the warmest
        self._waiters: deque[asyncio.Future[WorkerProcess | None]] = deque()
        self._alive: set[WorkerProcess] = set()  # every process not reaped yet
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
        self._check(invocation)
        body = self._body(event, invocation)
        w = self._idle.pop() if self._idle else await self._acquire(invocation)
        try:
            data = await w.call(w.frame(b"i" if _plain(event) else b"I", body), invocation)
        finally:
            self._release(w)
        return loads(data)

    async def invoke_many(
        self,
        events: Sequence[Any],
        invocations: Sequence[Invocation],
        *,
        stop_at_failure: bool = False,
    ) -> list[Any]:
        """Several invocations in one round trip: one worker gets them in one frame, runs them
        one after another and answers each as it ends. Each one's value, or its
        InvocationError (returned, not raised). ``stop_at_failure``: nothing runs after the
        first one that failed, and the list ends with it (the rest did not run)."""
        out: list[Any] = [None] * len(invocations)
        pieces: list[bytes] = [b"["]  # the bodies in a JSON array
        runs: list[int] = []
        for i, (event, inv) in enumerate(zip(events, invocations, strict=True)):
            try:
                self._check(inv)
                body = self._body(event, inv)
            except errors.InvocationError as e:
                out[i] = e
                if stop_at_failure:  # those before it run (and may fail first), none after
                    del out[i + 1 :]
                    break
                continue
            pieces += body
            pieces.append(b",")
            runs.append(i)
        if not runs:
            return out
        pieces[-1] = b"]"
        kind = b"S" if stop_at_failure else b"B"
        if all(_plain(events[i]) for i in runs):
            kind = kind.lower()
        batch = [invocations[i] for i in runs]
        try:
            w = self._idle.pop() if self._idle else await self._acquire(batch[0])
        except errors.InvocationError as e:
            for i in runs:
                out[i] = self._error(type(e), e.message, invocations[i], e.detail)
            return out[: runs[0] + 1] if stop_at_failure else out
        try:
            answers = await w.call_many(w.frame(kind, pieces), batch)
        finally:
            self._release(w)
        for i, answer in zip(runs, answers, strict=not stop_at_failure):
            out[i] = answer if isinstance(answer, errors.InvocationError) else loads(answer)
        if len(answers) < len(runs):  # stopped at a failure
            del out[runs[len(answers)] :]
        return out

    def _check(self, invocation: Invocation) -> None:
        if self._unavailable:
            raise self._error(errors.SystemFault, self._unavailable, invocation)
        if self._closed:
            raise self._error(errors.SystemFault, self._shutting_down(), invocation)
        if invocation.remaining_s() <= 0:
            raise self._error(
                errors.FunctionTimeout, timeout_message(invocation.timeout_s), invocation
            )

    def _body(self, event: Any, invocation: Invocation) -> list[bytes]:
        """``[request_id, deadline, time_limit_ms, event]`` in JSON, in pieces (joined once,
        into the frame: an event may be megabytes); ``[..., columns, 1]`` for an event sent
        by column (:meth:`RawEvent.deferred`)."""
        head = [invocation.request_id, invocation.deadline, int(invocation.timeout_s * 1000)]
        if type(event) is RawEvent:
            # encoded once, when the queue accepted it: the bytes go to the worker untouched.
            # The head by orjson (0.8 us against 6 for json, per invocation); json takes what
            # orjson refuses (a request id with a lone surrogate)
            try:
                start = orjson.dumps(head)[:-1]
            except orjson.JSONEncodeError:
                start = self._encode(head)[:-1].encode()
            if event.columns is not None:  # the worker builds the event from its columns
                return [start, b",", event.columns, b",1]"]
            return [start, b",", event.raw, b"]"]
        try:
            return [self._encode([*head, event]).encode()]
        except (TypeError, ValueError) as e:
            raise self._error(errors.BadEvent, f"the event is not JSON: {e}", invocation) from None

    async def _acquire(self, invocation: Invocation) -> WorkerProcess:
        """An idle worker, a new one while below ``concurrency``, else the next one freed."""
        loop = self._running_loop()
        while True:
            if self._idle:
                return self._idle.pop()
            if self._closed:
                raise self._error(errors.SystemFault, self._shutting_down(), invocation)
            if len(self._workers) < self.config.concurrency:
                return await self._spawn(invocation.deadline, invocation)
            fut: asyncio.Future[WorkerProcess | None] = loop.create_future()
            self._waiters.append(fut)

            def expire(fut: asyncio.Future[WorkerProcess | None] = fut) -> None:
                if not fut.done():
                    fut.set_exception(
                        self._error(
                            errors.FunctionTimeout,
                            timeout_message(invocation.timeout_s),
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

    def _release(self, w: WorkerProcess) -> None:
        """``w`` finished an invocation (or started): give it to a waiter or make it idle."""
        if not w.usable or self._closed:
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(w)
                return
        self._idle.append(w)

    def _forget(self, w: WorkerProcess) -> None:
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

    async def _spawn(self, deadline: float, invocation: Invocation | None = None) -> WorkerProcess:
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
        psock, csock = socket.socketpair()
        with contextlib.suppress(OSError):
            # room for a whole large frame where it cannot go through the shared region
            # (none, or beyond it): one send, not the rest copied into the transport's
            # buffer and sent in pieces. The kernel caps it at net.core.wmem_max
            psock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        out_r, out_w = os.pipe()
        shared = SharedFrames.create()  # where its large frames go
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
                "shared": None if shared is None else [shared.fd, shared.size],
            }
        )
        argv = [self._python, str(WORKER_SCRIPT), str(csock.fileno()), settings]
        try:
            if box is not None and cgroup is not None:
                argv = box.command(argv, cwd=Path(self._code), cgroup=cgroup, expose=self._expose)
            # Blocking, but only for the fork/exec (a millisecond or two): the interpreter's
            # start and the handler's import are awaited below.
            popen = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                pass_fds=[csock.fileno(), *([] if shared is None else [shared.fd])],
                cwd=self._code,
                env=env,
                start_new_session=True,  # its own process group: killed as one, no terminal ^C
            )
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            psock.close()
            os.close(out_r)
            if shared is not None:
                shared.close()
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
            if shared is not None:
                shared.close_fd()
        w = WorkerProcess(self, wid, popen, tmp, out_r, cgroup, shared)
        self._workers.add(w)
        self._alive.add(w)
        try:
            try:
                await loop.connect_accepted_socket(lambda: w, psock)
            except BaseException:
                psock.close()
                w.eof = True  # no channel will close: cleaned up once it is reaped
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
        self._lines.info(
            line.decode("utf-8", "replace"),
            extra={"request_id": request_id, "function": self.ctx.name},
        )
