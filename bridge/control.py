"""How operator commands reach the running daemon: the state-directory lock and the control socket.

One daemon per state directory. :class:`StateLock` is an exclusive ``flock`` on
``STATE_DIR/daemon.lock`` holding the daemon's pid; a second daemon on the same
state fails at start with one line naming the holder. (Replicas share state only
through a shared database, each with its own state directory.)

The control socket ``STATE_DIR/control.sock`` (mode 0600; peers must also be
root or the daemon's own uid, checked with ``SO_PEERCRED``) is what ``status``,
``dlq``, ``fire`` and ``invoke --async`` use while a daemon runs, so they see
and change the service's state — its queue wakes at once, its dead letters are
the ones listed — whatever the caller's environment. The socket lives in the
state directory because that is the one path the service and a shell agree on:
the unit's ``StateDirectory=event-bridge`` and the shipped config's
``state_dir = "/var/lib/event-bridge"``.

:func:`call` decides: a daemon holds the lock → the request goes over the
socket; none does → the same operation runs here against the store, which must
already exist (``create=True`` for commands that add events, and then it says
so on stderr): a mistyped ``state_dir`` never silently yields an empty store.

Protocol: one request per connection, one JSON line ``{"op": NAME, "args": {…}}``;
one JSON line back, ``{"ok": true, "result": …}`` or ``{"ok": false, "error":
{"code": …, "message": …}}``.

Not guaranteed: the socket is local only (no TCP; use the HTTP API remotely);
a path longer than the kernel's 107 bytes gets no socket (logged at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import deadletter
from bridge.errors import BridgeError, InvocationError

if TYPE_CHECKING:
    from bridge.config import Config
    from bridge.host import Host
    from bridge.queue import DurableQueue
    from bridge.store import StateStore

log = logging.getLogger("bridge.control")

LOCK_NAME = "daemon.lock"
SOCKET_NAME = "control.sock"
_MAX_LINE = 8 * 1024 * 1024
_SUN_PATH_MAX = 107
#: how long a connected client may take to send its request
_REQUEST_TIMEOUT_S = 30.0


class StateLocked(BridgeError):
    """Another daemon runs on this state directory."""


class ControlError(BridgeError):
    """The running daemon could not be asked."""


class NoState(BridgeError):
    """There is no state store at this path."""


# --- the lock ----------------------------------------------------------------------------------


class StateLock:
    """An exclusive lock on a state directory, held for the daemon's lifetime.

    Lifecycle: :meth:`acquire` at start (raises :class:`StateLocked` naming the
    holder's pid), :meth:`release` at exit; the kernel drops it if the process dies.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateLocked(
                f"another event-bridge daemon (pid {pid or '?'}) is running on state directory "
                f"{self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def holder(state_dir: Path) -> int | None:
    """The pid of the daemon running on ``state_dir`` (0 if unknown), or None if none runs."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ControlError(
            f"cannot tell whether a daemon runs on {state_dir}: {path}: permission denied "
            "(run as root or as the service's user)"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None
    finally:
        os.close(fd)


# --- operations (the same code serves the socket and direct store access) ----------------------


class Operations:
    """What operator commands can do. Over the socket ``queue`` and ``daemon`` are the running
    daemon's; direct access (no daemon) has only the store."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        queue: DurableQueue | None = None,
        daemon: Host | None = None,
    ) -> None:
        self._config = config
        self.store = store
        self.queue = queue
        self.daemon = daemon

    @property
    def config(self) -> Config:
        """The daemon's current config (it follows reloads), else the one given."""
        return self.daemon.config if self.daemon is not None else self._config

    async def status(self) -> dict[str, Any]:
        if self.daemon is None:
            raise ControlError("status needs a running daemon")
        return await self.daemon.status()

    async def dlq_list(self, function: str | None = None) -> list[dict[str, Any]]:
        rows = await self.store.list_dead_letters(function)
        return [
            {
                "id": r.id,
                "function": r.function,
                "trigger": r.trigger,
                "error_class": r.error_class,
                "created_at": r.created_at,
                "record": json.loads(r.record),
            }
            for r in rows
        ]

    async def dlq_show(self, id: str) -> dict[str, Any] | None:
        r = await self.store.get_dead_letter(id)
        return None if r is None else dict(json.loads(r.record))

    async def dlq_replay(
        self, function: str | None = None, ids: list[str] | None = None
    ) -> dict[str, Any]:
        if self.daemon is not None:
            await self.daemon.refresh_code()  # replayed events run the code that is there now
        rows = [r for r in await self.store.list_dead_letters(function) if not ids or r.id in ids]
        found = {r.id for r in rows}
        queue = self.queue
        done = await deadletter.replay(
            self.store,
            rows,
            self.config.functions,
            queue.notify_requeued if queue is not None else None,
        )
        replayed, skipped = done.replayed, [list(s) for s in done.skipped]
        return {
            "replayed": replayed,
            "skipped": skipped,
            "missing": [i for i in ids or [] if i not in found],
        }

    async def dlq_purge(
        self, function: str | None = None, older_than_s: float | None = None
    ) -> int:
        cutoff = None if older_than_s is None else time.time() - older_than_s
        rows = await self.store.list_dead_letters(function, cutoff)
        return await self.store.delete_dead_letters([r.id for r in rows])

    async def enqueue(
        self,
        function: str,
        event: dict[str, Any],
        trigger: str | None = None,
        source: str = "API",
    ) -> str:
        """Accept an event into the durable queue; raises InvocationError for what cannot run."""
        if self.queue is not None:
            return await self.queue.submit(function, event, trigger=trigger, request_source=source)
        from bridge.queue import check_submission, new_item

        item = new_item(
            function, event, trigger=trigger, request_source=source, now=self.store.time()
        )
        check_submission(self.config, function, item.payload)
        await self.store.enqueue([item])
        return item.id

    OPS = ("status", "dlq_list", "dlq_show", "dlq_replay", "dlq_purge", "enqueue")


# --- the server --------------------------------------------------------------------------------


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


class ControlServer:
    """Serves :class:`Operations` on the control socket.

    Lifecycle: :meth:`start` once the queue is open (the daemon holds the state lock, so an
    existing socket file is stale and replaced), :meth:`close` at stop (the file is removed).
    Rules: one request per connection; a peer that is neither root nor this uid is refused.
    """

    def __init__(self, ops: Operations, state_dir: Path) -> None:
        self.ops = ops
        self.path = socket_path(state_dir)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            log.warning(
                "no control socket: %s is longer than %d bytes; operator commands will not "
                "reach this daemon",
                self.path,
                _SUN_PATH_MAX,
            )
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=_MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid not in (0, os.geteuid()):
                reply = _error("forbidden", f"uid {uid} may not use this daemon's control socket")
            else:
                line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
                reply = await self._handle(line)
            writer.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            pass  # the client went away, sent an oversized line or nothing; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            op, args = req["op"], req.get("args") or {}
            if op not in Operations.OPS or not isinstance(args, dict):
                raise ValueError(op)
        except (ValueError, KeyError, TypeError):
            return _error("bad_request", "expected one JSON line {op, args}")
        fn: Callable[..., Awaitable[Any]] = getattr(self.ops, op)
        try:
            return {"ok": True, "result": await fn(**args)}
        except InvocationError as e:
            return {"ok": False, "error": e.to_dict(), "invocation_error": True}
        except TypeError as e:
            return _error("bad_request", str(e))
        except Exception as e:
            log.error("control request %s failed: %s", op, e, exc_info=True)
            return _error("internal", f"{type(e).__name__}: {e}")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


# --- the client --------------------------------------------------------------------------------


class _NotListening(Exception):
    """No socket yet (the daemon is starting) or any more (it is stopping)."""


class RemoteInvocationError(BridgeError):
    """The daemon refused the event (an invocation error, as a dict in ``error``)."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        super().__init__(str(error.get("ErrorMessage") or error))


def request(state_dir: Path, op: str, args: dict[str, Any], timeout: float = 60.0) -> Any:
    """Send one request to the daemon on ``state_dir``; raise ControlError when it cannot answer."""
    path = socket_path(state_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            try:
                s.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise _NotListening() from None
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise ControlError(
            f"a daemon runs on {state_dir} but its control socket {path} cannot be used: "
            f"{e.strerror or e}"
        ) from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"the daemon closed {path} without an answer") from None
    if reply.get("ok"):
        return reply.get("result")
    if reply.get("invocation_error"):
        raise RemoteInvocationError(reply["error"])
    err = reply.get("error") or {}
    raise ControlError(f"the daemon refused {op}: {err.get('message', err)}")


async def call(config: Config, op: str, args: dict[str, Any], *, create: bool = False) -> Any:
    """Run ``op`` where the state is: in the running daemon, else here on the store.

    A missing store is never created unless ``create``: reads say so on stderr and find
    nothing; ``status`` raises :class:`NoState` when no daemon runs. :class:`ControlError`:
    a daemon runs but cannot be asked (its socket does not appear within 30 s)."""
    state_dir = config.state_dir
    deadline = time.monotonic() + 30.0
    while holder(state_dir) is not None:
        try:
            return await asyncio.to_thread(request, state_dir, op, args)
        except _NotListening:
            # the daemon holds the lock but is still starting (or already stopping): wait for
            # its socket, or for the lock to go
            if time.monotonic() > deadline:
                raise ControlError(
                    f"a daemon runs on {state_dir} but does not answer on {socket_path(state_dir)}"
                ) from None
            await asyncio.sleep(0.1)
    if op == "status":
        raise NoState(f"no event-bridge daemon is running on state directory {state_dir}")
    from bridge.store import SqliteStore
    from bridge.stores import store_for

    store = store_for(config, replica=False)
    if isinstance(store, SqliteStore) and not store.path.exists():
        if not create:
            # said on stderr, and nothing is created: a mistyped state_dir is visible
            print(
                f"note: no state store at {store.path}: no daemon has run with this state "
                "directory (check daemon.state_dir; the service's is /var/lib/event-bridge)",
                file=sys.stderr,
            )
            return _EMPTY[op](args)
        print(f"note: no state store at {store.path} yet: creating it", file=sys.stderr)
    await store.open()
    try:
        return await getattr(Operations(config, store), op)(**args)
    finally:
        await store.close()
        _keep_owner(state_dir)


_EMPTY: dict[str, Callable[[dict[str, Any]], Any]] = {
    "dlq_list": lambda a: [],
    "dlq_show": lambda a: None,
    "dlq_purge": lambda a: 0,
    "dlq_replay": lambda a: {"replayed": [], "skipped": [], "missing": list(a.get("ids") or [])},
}


def _keep_owner(state_dir: Path) -> None:
    """Root writing into the service's state must not leave root-owned files the service's
    (dynamic) user then cannot open."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(state_dir)
    except OSError:
        return
    if owner.st_uid == 0:
        return
    for p in Path(state_dir).iterdir():
        with contextlib.suppress(OSError):
            if p.stat().st_uid == 0:
                os.chown(p, owner.st_uid, owner.st_gid)
