"""The parent's side of one ``python`` worker process (``bridge/targets/python.py`` keeps the
pool of them): the length-prefixed channel it talks over (the protocol is described in
``_worker.py``) and the shared memory its large frames go through, the pipe its fds 1 and 2
write to, deadlines, and its exit (a pidfd: no threads, no SIGCHLD handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import signal
import struct
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from bridge import errors, sandbox
from bridge.abc import Invocation
from bridge.config import FunctionConfig

#: Between SIGTERM and SIGKILL when closing.
STOP_GRACE_S = 2.0
#: Longer output lines are logged in pieces (as the worker does for prints).
MAX_LINE = 64 * 1024

log = logging.getLogger(__name__)

HDR = struct.Struct(">I")
#: an ``M`` frame: its length (6), ``M``, the kind of the frame in the shared region, its size
_SHARED_FRAME = struct.Struct(">Icci")

#: A frame of at least ``SHARED_MIN`` bytes (up to the region's ``SHARED_BYTES``) goes to the
#: worker through a shared memory region instead of its socket: written there once, read by the
#: worker where it lies, with one small frame on the socket that points at it. A megabyte sent
#: on the socket cost the event loop ~0.4 ms (the kernel's buffers, and a wake-up of the worker
#: for each piece of it) and the worker a copy. Pages the region's frames touched stay
#: resident up to ``SHARED_KEEP`` bytes; a larger frame's are given back after its answer.
SHARED_MIN = 64 * 1024
SHARED_BYTES = 16 * 1024 * 1024
SHARED_KEEP = 2 * 1024 * 1024
#: the line (without its newline) a worker writes to fd 1 after each invocation of a batch
_NEXT = b"\x00event-bridge: next invocation\x00"

_ERRORS: dict[str, type[errors.InvocationError]] = {
    "RetryRequested": errors.RetryRequested,
    "Dropped": errors.Dropped,
    "HandlerNotFound": errors.HandlerNotFound,
    "HandlerFailed": errors.HandlerFailed,
    "BadResult": errors.BadResult,
    "OutOfMemory": errors.OutOfMemory,
}


def timeout_message(timeout_s: float) -> str:
    return f"Invoking task timed out after {timeout_s:g} seconds"


class SharedFrames:
    """The shared memory region (a memfd) a worker reads its large frames from. It is sealed at
    its size before the worker gets it, so that the worker (the function's own process, which
    as root may reach it through ``/proc``) can neither shrink it under the parent's writes
    (which would kill the daemon with SIGBUS) nor seal it further; and the worker gets a
    read-only fd of it, which it maps and closes: it cannot write into it. One frame at a
    time: the parent writes the next only after the answer to the last, by which time the
    worker has decoded it."""

    def __init__(self, size: int) -> None:
        fd = _memfd()
        try:
            os.ftruncate(fd, size)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self.map = mmap.mmap(fd, size)
            try:  # the worker's: a mapping of it cannot be made writable
                readonly = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                self.map.close()
                raise
        finally:
            os.close(fd)
        #: read-only, for the worker to inherit; closed once it is started (:meth:`close_fd`)
        self.fd = readonly
        self.size = size
        self._high = 0  # the largest frame since pages were last given back

    @classmethod
    def create(cls) -> SharedFrames | None:
        """A region of ``SHARED_BYTES``; None where the system has none to give (frames then
        go on the socket, as they always can): said once."""
        global _NO_REGION
        try:
            if not hasattr(mmap, "MADV_REMOVE"):
                raise OSError("no MADV_REMOVE")
            return cls(SHARED_BYTES)
        except (AttributeError, OSError, ValueError) as e:
            if _NO_REGION is None:
                _NO_REGION = str(e)
                log.info("python workers get every frame on their socket: no shared memory (%s)", e)
            return None

    def frame(self, kind: bytes, pieces: Sequence[bytes], size: int) -> bytes:
        """Write a frame of ``kind`` whose payload is ``pieces`` joined (``size`` bytes, at
        most the region's) at the region's start: the ``M`` frame that tells the worker."""
        region, at = self.map, 0
        for piece in pieces:
            end = at + len(piece)
            region[at:end] = piece
            at = end
        if size > self._high:
            self._high = size
        return _SHARED_FRAME.pack(6, b"M", kind, size)

    def trim(self) -> None:
        """Give back the pages a frame larger than ``SHARED_KEEP`` touched beyond it (after
        its answer: the worker is done with it)."""
        if self._high > SHARED_KEEP:
            with contextlib.suppress(OSError):
                self.map.madvise(mmap.MADV_REMOVE, SHARED_KEEP, self._high - SHARED_KEEP)
            self._high = SHARED_KEEP

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        self.map.close()


_NO_REGION: str | None = None  # why there is no region for large frames (said once)
#: memfd_create's MFD_NOEXEC_SEAL (Linux 6.3; os has it from Python 3.12): a kernel that asks
#: for it (vm.memfd_noexec) may refuse a memfd without it, and logs a warning for each
_MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)


def _memfd() -> int:
    """A new memfd for a region, that seals apply to; not executable where the kernel knows
    the flag."""
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create("event-bridge-frames", flags | _MFD_NOEXEC_SEAL)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a kernel older than the flag
            raise
        return os.memfd_create("event-bridge-frames", flags)


class Pool(Protocol):
    """What a worker needs of the pool that started it (:class:`PythonTarget`)."""

    _alive: set[WorkerProcess]
    _cgroups: sandbox.Sweeper
    _closed: bool

    @property
    def config(self) -> FunctionConfig: ...

    def _running_loop(self) -> asyncio.AbstractEventLoop: ...

    def _shutting_down(self) -> str: ...

    def _forget(self, w: WorkerProcess) -> None: ...

    def _log(self, line: bytes, request_id: str | None) -> None: ...

    def _error(
        self,
        cls: type[errors.InvocationError],
        message: str,
        invocation: Invocation | None = None,
        detail: str | None = None,
    ) -> errors.InvocationError: ...


class WorkerProcess(asyncio.Protocol):
    """The parent's side of one worker process: its channel, output pipe and exit."""

    def __init__(
        self,
        target: Pool,
        wid: str,
        popen: subprocess.Popen[bytes],
        tmp: Path | None,
        out_fd: int,
        cgroup: sandbox.Cgroup | None = None,
        shared: SharedFrames | None = None,
    ) -> None:
        self.target = target
        #: where its large frames go, once the worker said it mapped it (:meth:`wait_ready`)
        self.shared = shared
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
        #: the invocations of the current call: outcomes so far, the one running, those to come
        self.fut: asyncio.Future[list[bytes | errors.InvocationError]] | None = None
        self._outcomes: list[bytes | errors.InvocationError] = []
        self.invocation: Invocation | None = None
        self._queue: deque[Invocation] = deque()
        #: an ``S`` frame: the batch stops at its first failure (the rest are not run)
        self._stop = False
        self._deadline: asyncio.TimerHandle | None = None
        self._due = 0.0  # the running invocation's deadline (loop time); the timer may be earlier
        #: a batch: the request ids whose output on fds 1/2 is still to come, in order
        self._piped: deque[str] = deque()
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
                    timeout_message(timeout_s) if invocation else "the worker did not start in time"
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
        if not info.get("shared") and self.shared is not None:  # it could not map it
            self.shared.close()
            self.shared = None

    def frame(self, kind: bytes, pieces: Sequence[bytes]) -> bytes:
        """A frame of ``kind`` for this worker whose payload is ``pieces`` joined: in the
        shared region when it is large (one copy of the bytes either way)."""
        size = sum(map(len, pieces))
        shared = self.shared
        if shared is not None and SHARED_MIN <= size <= shared.size:
            return shared.frame(kind, pieces, size)
        return b"".join((HDR.pack(size + 1), kind, *pieces))

    async def call(self, frame: bytes, invocation: Invocation) -> bytes:
        """Run one invocation (an ``I`` frame): its JSON answer, or its error raised."""
        (outcome,) = await self.call_many(frame, [invocation])
        if isinstance(outcome, errors.InvocationError):
            raise outcome
        return outcome

    async def call_many(
        self, frame: bytes, invocations: Sequence[Invocation]
    ) -> list[bytes | errors.InvocationError]:
        """Run ``invocations`` (one ``I`` frame, or a ``B`` or ``S`` frame of them all; in lower
        case when their JSON is plain, which changes nothing here) one after
        another: each one's JSON answer or error. Each one's time limit runs from its start
        (the answer to the one before): ``Invocation.started`` is set then. An ``S`` frame
        stops at the first error: the answers end there (the rest did not run)."""
        assert self.transport is not None
        fut: asyncio.Future[list[bytes | errors.InvocationError]] = self.loop.create_future()
        self.fut = fut
        self._queue = deque(invocations)
        self._outcomes = []
        # a B or S frame (a batch, even of one): whose output on fds 1/2 it is follows the
        # worker's NEXT lines, one after each invocation (the frame: a 4-byte length, then
        # its kind)
        kind = frame[5:6] if frame[4:5] == b"M" else frame[4:5]  # M: in the shared region
        kind = kind.upper()  # lower case: the same, with plain JSON
        self._stop = kind == b"S"
        batch = kind == b"B" or self._stop
        self._piped = deque(inv.request_id for inv in invocations if batch)
        self._next(first=True)
        self.transport.write(frame)
        try:
            return await fut
        except asyncio.CancelledError:
            if not fut.done():  # its answer would arrive during someone else's invocation
                self.kill()
            raise
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self.fut = self.invocation = None
            self.request_id = None
            if self.shared is not None:
                self.shared.trim()

    def _next(self, first: bool = False) -> None:
        """The current invocation ended (or, ``first``, none had begun): start the next one's
        clock, or hand the outcomes over when there is none."""
        if not self._queue:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self.invocation = self.request_id = None
            if self.fut is not None and not self.fut.done():
                self.fut.set_result(self._outcomes)
            return
        inv = self.invocation = self._queue.popleft()
        if not first:
            inv.started = time.monotonic()
        self.request_id = inv.request_id
        self.served += 1
        # One timer serves a batch: moved earlier at once, later only when it goes off (a
        # timer per invocation was ~5 % of the event loop at Kafka batch_size = 1)
        self._due = due = inv.deadline  # time.monotonic(): asyncio's loop.time()
        timer = self._deadline
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._deadline = self.loop.call_at(due, self._on_deadline)

    def _answer(self, outcome: bytes | errors.InvocationError) -> None:
        self._outcomes.append(outcome)
        if self._stop and isinstance(outcome, errors.InvocationError):
            # an S frame: the worker runs nothing more of it, and writes no NEXT line for it
            for _ in self._queue:
                self._piped.pop()
            self._queue.clear()
        self._next()

    def _fail(self, error: errors.InvocationError) -> None:
        """The current invocation failed with ``error`` and the worker is gone: the rest of
        the batch did not run (an ``S`` frame's are left out of the answers)."""
        rest = [] if self._stop else list(self._queue)
        self._queue.clear()
        self._outcomes.append(error)
        for inv in rest:
            self._outcomes.append(
                self.target._error(
                    errors.SystemFault,
                    f"worker process {self.pid} went away before this invocation ran",
                    inv,
                )
            )
        self._next()

    def _on_deadline(self) -> None:
        timer = self._deadline
        if timer is not None and self._due > timer.when():
            # set for an earlier invocation of the batch: the one running now has until _due
            self._deadline = self.loop.call_at(self._due, self._on_deadline)
            return
        self._deadline = None
        fut, invocation = self.fut, self.invocation
        if fut is None or fut.done() or invocation is None:
            return
        self.kill()
        self._drain_output(final=True)
        self._fail(
            self.target._error(
                errors.FunctionTimeout, timeout_message(invocation.timeout_s), invocation
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
        unpack = HDR.unpack_from
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
                if not self._piped or not self._queue:
                    # a batch's output is told apart by its NEXT lines, not by when it is
                    # read: drained before its last answer only (two reads fewer each)
                    self._drain_output()
                self._answer(frame[9:])
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
                if info.get("retire"):
                    self._fail(err)  # the worker runs nothing more
                else:
                    self._answer(err)
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
            self._fail(self._crash_error(invocation))
        if not self.ready.done():
            self.ready.set_exception(self._crash_error(None, before_ready=True))
            self.ready.exception()  # retrieved: the spawn may have given up on it already
        for t in self._timers:
            t.cancel()
        self._close_output()
        if self.shared is not None:
            self.shared.close()
            self.shared = None
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
            end = line.endswith(_NEXT)  # never the handler's own output: never logged
            if end:
                line = line[: -len(_NEXT)]
            if line or not end:
                line = line.rstrip(b"\r")
                self.tail.append(line.decode("utf-8", "replace"))
                self.target._log(line, self._piped[0] if self._piped else self.request_id)
            if end and self._piped:
                self._piped.popleft()

    def _close_output(self) -> None:
        if self._out_fd is not None:
            self.loop.remove_reader(self._out_fd)
            os.close(self._out_fd)
            self._out_fd = None

    def _tail(self) -> str | None:
        return "\n".join(self.tail) or None
