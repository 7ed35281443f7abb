"""Child processes of the ``http`` (supervised web server) and ``command`` runtimes.

What both runtimes need from a child, and nothing more: a clean environment
(never the daemon's own, which may hold secrets), its own process group so a
timeout or a shutdown can kill everything it started, its output split into
lines as it arrives, and two awaitable moments — the leader *exited* and every
pipe is *closed*. They differ because a grandchild may keep a pipe open after
the leader exited; ``asyncio.subprocess.Process.wait()`` waits for both, which
is why this module talks to the event loop's subprocess protocol directly.

Output is pushed to sinks from ``pipe_data_received``: no reader tasks to
own, and a chatty child never blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

#: The only variables taken from the daemon's environment.
BASE_ENV = ("PATH", "LANG", "HOME")
#: A line longer than this is logged in pieces.
MAX_LINE = 16 * 1024


def function_env(
    name: str,
    runtime: str,
    environment: Mapping[str, str],
    **runtime_vars: str,
) -> dict[str, str]:
    """The environment of a function's process.

    In order, later wins: PATH/LANG/HOME from the daemon; the SCF variables
    (``SCF_FUNCTIONNAME``, ``SCF_RUNTIME``, ..., ``TZ=UTC`` as in SCF); the
    function's configured ``environment``; ``runtime_vars`` (``PORT``,
    ``TMPDIR``), which the runtime relies on and so cannot be overridden.
    """
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.setdefault("LANG", "C.UTF-8")
    env.update(
        SCF_FUNCTIONNAME=name,
        SCF_FUNCTIONVERSION="$LATEST",
        SCF_NAMESPACE="default",
        SCF_RUNTIME=runtime,
        TZ="UTC",
    )
    env.update(environment)
    env.update(runtime_vars)
    return env


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def executable_problem(path: Path) -> str | None:
    """Why ``path`` cannot be executed, or None."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    if not os.access(path, os.X_OK):
        return f"{path} is not executable (chmod +x)"
    return None


def describe_exit(returncode: int | None) -> str:
    """``status 3`` or ``signal SIGKILL``, from a returncode (negative for a signal)."""
    if returncode is None:
        return "unknown status"
    if returncode < 0:
        return f"signal {signal_name(-returncode)}"
    return f"status {returncode}"


class Sink(Protocol):
    """Where a child's output goes, as it arrives."""

    def feed(self, data: bytes) -> None: ...

    def flush(self) -> None:
        """The pipe closed."""


class Lines:
    """Splits a byte stream into text lines, handing each to ``emit`` (no trailing newline)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) < MAX_LINE:
                    return
                self._out(self._buf[:MAX_LINE])
                del self._buf[:MAX_LINE]
            else:
                self._out(self._buf[:nl])
                del self._buf[: nl + 1]

    def flush(self) -> None:
        if self._buf:
            self._out(self._buf)
            self._buf.clear()

    def _out(self, raw: bytes | bytearray) -> None:
        self._emit(bytes(raw).decode("utf-8", "replace").rstrip("\r"))


class Child(asyncio.SubprocessProtocol):
    """A child process in its own process group: create, then :meth:`spawn`.

    ``stderr=None`` merges the child's stderr into ``stdout``. Always finish with
    :meth:`close`, which releases the event loop's transport.
    """

    def __init__(self, stdout: Sink, stderr: Sink | None = None) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._transport: asyncio.SubprocessTransport | None = None
        loop = asyncio.get_running_loop()
        #: set when the leader process has exited (and was reaped)
        self.exited: asyncio.Future[None] = loop.create_future()
        #: set when the leader exited and every pipe is closed
        self.closed: asyncio.Future[None] = loop.create_future()
        self.pid = 0

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdin: bool = False,
        memory_limit: int | None = None,
    ) -> None:
        """Start ``argv`` in a new session (so a new process group).

        ``memory_limit`` sets RLIMIT_AS in the child. It caps *virtual* address
        space, not resident memory, so runtimes that reserve large address
        ranges up front (JVM, Go, Node.js) need a ``memory`` well above their
        real use, and a process that hits it sees failed allocations (Python:
        MemoryError) rather than being killed. It is applied with
        ``preexec_fn``, which runs Python in the forked child before exec; it
        only calls setrlimit, which takes no lock another thread could hold.
        Raises OSError (FileNotFoundError, PermissionError, ...) when exec fails.
        """
        loop = asyncio.get_running_loop()
        await loop.subprocess_exec(
            lambda: self,
            *argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if self._stderr is not None else subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            preexec_fn=_rlimit_as(memory_limit) if memory_limit else None,
        )

    # -- protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport
        self.pid = transport.get_pid()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        sink = self._stdout if fd == 1 else self._stderr
        if sink is not None:
            sink.feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        # fd 0 with EPIPE: the child did not read all of its input — its business, not an error
        sink = self._stdout if fd == 1 else self._stderr if fd == 2 else None
        if sink is not None:
            sink.flush()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    # -- control

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode() if self._transport else None

    def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` as the child's whole input; stdin is closed after it."""
        assert self._transport is not None
        pipe = self._transport.get_pipe_transport(0)
        assert isinstance(pipe, asyncio.WriteTransport)
        pipe.write(data)
        pipe.close()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (the leader may be gone, its group not)."""
        if self.pid:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM the group, wait up to ``grace_s`` for the leader, then SIGKILL the group."""
        if not self.exited.done():
            self.signal_group(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await asyncio.shield(self.exited)
            except TimeoutError:
                pass
        # also reaches stragglers that outlived a leader which exited in time
        self.signal_group(signal.SIGKILL)
        await asyncio.shield(self.exited)

    async def close(self, drain_s: float = 1.0) -> None:
        """Kill what is left of the group, let the pipes drain, release the transport."""
        if self._transport is None:
            return
        self.signal_group(signal.SIGKILL)
        try:
            await asyncio.shield(self.exited)
            if not self.closed.done():
                try:
                    async with asyncio.timeout(drain_s):
                        await asyncio.shield(self.closed)
                except TimeoutError:
                    pass  # a process that left the group holds a pipe: stop listening to it
        finally:
            self._transport.close()


def _rlimit_as(limit: int) -> Callable[[], None]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply
