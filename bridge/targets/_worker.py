"""The worker process of the ``python`` runtime: one SCF handler, called invocation after invocation.

:class:`bridge.targets.python.PythonTarget` starts it as ``PYTHON .../_worker.py FD SETTINGS``
(``python -m bridge.targets._worker FD SETTINGS`` works too) with the code folder as working
directory, stdin on /dev/null and stdout/stderr on a pipe the parent reads. It uses the standard
library only and imports nothing of ``bridge``, so it runs under whatever interpreter a function
configures (Python 3.8 or later) and starts quickly. It decodes frames with orjson where the
interpreter has it (half the standard library's time on a batch of Kafka records), and with the
standard library what orjson refuses (NaN, lone surrogates) or would read differently (an
integer beyond 64 bits, which orjson makes a float): the handler sees what ``json`` reads.

The control channel FD is one end of a socketpair. Frames are a 4-byte big-endian length and a
payload whose first byte says what it is::

    parent → worker  I  JSON [request_id, deadline, time_limit_ms, event]
                        (deadline on CLOCK_MONOTONIC, which parent and worker share)
                     B  JSON [[request_id, deadline, time_limit_ms, event], ...]: a batch, run
                        one after another, each answered as it ends, each with its own
                        time limit from its start (its deadline is not used); after each,
                        the line NEXT on fd 1 tells the parent whose output follows
                     S  the same as B, but the batch stops at the first invocation that
                        failed (answered E): the rest of it is not run and not answered
                        (an ordered trigger's consecutive batches: bridge/ordered.py)
                     i, b, s  the same as I, B and S, with JSON that orjson wrote (no integer
                        beyond 64 bits: the parent's RawEvent.encode), read with orjson
                        without looking for long runs of digits first
                     an invocation [request_id, deadline, time_limit_ms, columns, 1] (any of
                        these kinds) sends its event by column (RawEvent.deferred):
                        columns_event builds it
                     M  a frame of any of these kinds in the shared region (a large one):
                        its kind (1 byte) and its size (4 bytes); it lies at the region's
                        start. The region is a memfd whose fd and size the settings give
                        ("shared"); the worker maps it read-only and says so when ready
    worker → parent  R  JSON {"pid", "error", "shared"}: ready; error: the handler could not be
                        loaded; shared: it mapped the region (else no M frame is sent)
                     L  one line the handler printed or logged (raw bytes, no newline)
                     O  8-byte peak RSS in bytes, then the JSON result
                     E  JSON {"type", "message", "detail", "rss", "retire"}

One invocation at a time; the log frames of an invocation come before its O/E frame. A batch
stops at an answer with ``retire``: the rest of it is not run. The worker
exits on EOF of the channel (the parent is gone or closing) and after an answer with ``retire``
(out of memory, or a handler that cannot be loaded: the next worker imports afresh).
"""

from __future__ import annotations

import os
import sys

# Run by path, Python puts this folder first on sys.path, where http.py and command.py would
# shadow standard modules: replace it with the code folder before importing anything else.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]

import io
import itertools
import json
import logging
import threading
import time
import traceback
from typing import Any, Callable  # noqa: UP035  (3.8 compatible)

try:  # imported before the code folder is on sys.path: a module of the function cannot shadow it
    import orjson

    _orjson_loads: Callable[[Any], Any] | None = orjson.loads
    _OrjsonError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # an interpreter without it: the standard library
    _orjson_loads = None
    _OrjsonError = ValueError

MAX_LINE = 64 * 1024  # a longer line is cut into several log records
NEXT = b"\x00event-bridge: next invocation\x00\n"  # between a batch's outputs on fds 1/2
_HDR = 4


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return (len(payload) + 1).to_bytes(_HDR, "big") + kind + payload


class Channel:
    """Writes frames to the parent; safe to use from the handler's threads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            try:
                n = os.write(self.fd, data)
                while n < len(data):  # only for frames larger than the socket buffer
                    data = data[n:]
                    n = os.write(self.fd, data)
            except OSError:
                os._exit(0)  # the parent is gone: nobody is left to answer


class LineSink(io.RawIOBase):
    """The bytes under ``sys.stdout``/``sys.stderr``: each complete line becomes a log frame."""

    def __init__(self, channel: Channel, fd: int) -> None:
        super().__init__()
        self._channel = channel
        self._fd = fd
        self._buf = bytearray()
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        # Code that writes to the descriptor itself (faulthandler, C libraries) reaches the
        # output pipe, which the parent logs too.
        return self._fd

    def isatty(self) -> bool:
        return False

    def write(self, b: Any) -> int:
        n = len(b)
        with self._lock:
            start = len(self._buf)
            self._buf += b
            if self._buf.find(b"\n", start) >= 0 or len(self._buf) > MAX_LINE:
                self._emit(final=False)
        return n

    def end(self) -> None:
        """Send a last unterminated line (the invocation is over)."""
        with self._lock:
            if self._buf:
                self._emit(final=True)

    def _emit(self, final: bool) -> None:
        lines = self._buf.split(b"\n")
        rest = lines.pop()
        if final and rest:
            lines.append(rest)
            rest = bytearray()
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._buf = bytearray(rest)
        if lines:
            self._channel.send(b"".join(frame(b"L", bytes(ln.rstrip(b"\r"))) for ln in lines))


class ChannelLogHandler(logging.Handler):
    """The root logger's handler: every line of a record becomes a log frame."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(logging.INFO)
        self._channel = channel
        self.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        lines = text.encode("utf-8", "backslashreplace").split(b"\n")
        self._channel.send(b"".join(frame(b"L", ln[:MAX_LINE]) for ln in lines))


class Context(dict):  # type: ignore[type-arg]
    """SCF's ``context``: a dict of the invocation's facts that also allows attribute access."""

    __slots__ = ("_deadline",)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Context.__slots__:
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class NotSerializable(TypeError):
    pass


#: digits → "0", every other byte → " ": 19 digits in a row may be an integer beyond 64 bits
_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_DIGITS = b"0" * 19


def _loads(data: bytes | memoryview, plain: bool = False) -> Any:
    """A frame's JSON as the standard library reads it: orjson where the two agree (a third
    of the time), ``json`` for what orjson refuses or reads otherwise (19 or more digits in
    a row, anywhere, may be an integer it would make a float). ``plain``: orjson wrote it,
    so the two agree (looking for those digits takes half of orjson's time to read it).
    ``data``: bytes, or a view of a plain frame's bytes (orjson reads it where it is)."""
    if _orjson_loads is not None and (
        plain or (isinstance(data, bytes) and data.translate(_DIGITS).find(_LONG_DIGITS) < 0)
    ):
        try:
            return _orjson_loads(data)
        except _OrjsonError:
            pass
    return json.loads(bytes(data) if isinstance(data, memoryview) else data)


_BUILDERS: dict[int, Callable[..., list[Any]]] = {}


def _builder(k: int) -> Callable[..., list[Any]]:
    """``build(wrap, name_0, ..., name_k-1, columns)``: the records ``{wrap: {name_0: v_0,
    ...}}`` of the rows of ``columns``, each record's dict written as a display (half the
    time of ``dict(zip(names, row))``). The code depends on ``k`` alone: no name or value
    goes into it."""
    build = _BUILDERS.get(k)
    if build is None:
        names = "".join(f"n{i}, " for i in range(k))
        pairs = ", ".join(f"n{i}: v{i}" for i in range(k))
        row = "".join(f"v{i}, " for i in range(k))
        code = f"def build(wrap, {names}columns):\n"
        code += f"    return [{{wrap: {{{pairs}}}}} for {row}in zip(*columns)]\n"
        space: dict[str, Any] = {}
        exec(code, space)
        build = _BUILDERS[k] = space["build"]
    return build


def columns_event(spec: dict[str, Any]) -> dict[str, Any]:
    """The event ``{"Records": [...]}`` a frame sends by column (``RawEvent.deferred`` in
    bridge/events.py says how): N records ``{WRAP: {NAME: value, ...}}``, their keys in the
    order of the names. Raises ValueError for a spec that is not one."""
    n, wrap, names, columns = spec["records"], spec["wrap"], spec["names"], spec["columns"]
    if len(columns) != len(names):
        raise ValueError(f"{len(columns)} columns for {len(names)} names")
    if not names:
        return {"Records": [{wrap: {}} for _ in range(n)]}
    rows: list[Any] = []
    for name, column in zip(names, columns):  # noqa: B905  (3.8 compatible; lengths checked)
        if "same" in column:
            value = column["same"]
            if isinstance(value, (dict, list)):  # one object in every record
                raise ValueError(f"column {name!r}: a same value must not be an object or array")
            rows.append(itertools.repeat(value, n))
        elif "from" in column:
            rows.append(range(column["from"], column["from"] + n))
        elif len(column["each"]) == n:
            rows.append(column["each"])
        else:
            raise ValueError(f"column {name!r}: {len(column['each'])} values for {n} records")
    return {"Records": _builder(len(names))(wrap, *names, rows)}


#: the buffer a worker reads frames into starts at ``_START`` bytes, grows to the largest
#: frame and is kept up to ``_KEEP``. Frames of 64 KiB or more come through the shared
#: region instead (``M``), so it grows only without one or beyond it (16 MiB)
_START, _KEEP = 1 << 16, 1 << 20


def _orjson_reads_views() -> bool:
    """Whether orjson reads a memoryview (3.5 and later; an older one refuses it)."""
    try:
        return _orjson_loads is not None and _orjson_loads(memoryview(b"[1]")) == [1]
    except Exception:
        return False


_ORJSON_VIEWS = _orjson_reads_views()


def _read_into(fd: int, buf: bytearray, at: int) -> int:
    """Read what ``fd`` has into ``buf`` from ``at`` on (at most to its end; the callers
    leave room, so 0 means EOF)."""
    with memoryview(buf) as view, view[at:] as room:
        return os.readv(fd, [room])


def _map_shared(shared: list[int] | None) -> Any:
    """The parent's region for large frames (``[fd, size]``), mapped read-only, its fd closed
    (the handler has no use for it); None if there is none or it cannot be mapped (the
    parent then sends every frame on the socket)."""
    if not shared:
        return None
    fd, size = shared
    try:
        import mmap

        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (ImportError, OSError, ValueError):
        return None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _not_json(o: Any) -> Any:
    raise NotSerializable(type(o).__name__)


def _error(type_: str, message: str, detail: str | None = None) -> dict[str, Any]:
    return {"type": type_, "message": message, "detail": detail}


_SKIP_DIRS = (os.path.join(os.path.dirname(os.path.dirname(json.__file__)), "asyncio") + os.sep,)


def _signal(e: BaseException) -> dict[str, Any] | None:
    """bridge.handler.Retry / Drop raised by the handler: settle on purpose, not an error."""
    if type(e).__module__ != "bridge.handler":
        return None
    if type(e).__name__ == "Retry":
        out = _error("RetryRequested", str(e))
        out["retry_after"] = float(getattr(e, "delay", 0.0))
        return out
    if type(e).__name__ == "Drop":
        return _error("Dropped", str(e))
    return None


def _user_traceback(e: BaseException) -> str:
    """The traceback without the worker's, importlib's and asyncio's leading frames."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (
            name == __file__
            or name.startswith("<frozen importlib")
            or name.startswith(_SKIP_DIRS)
            or name.endswith(os.sep + "importlib" + os.sep + "__init__.py")
        ):
            break
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def _describe(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:
        text = ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _exact_bytecode_checks(code: str) -> None:
    """Modules under the code folder trust a cached .pyc only if the source's mtime matches to
    the microsecond (Python compares whole seconds and the size): an edit within the same
    second, then a reload, must run the new code. Everything else imports as usual."""
    from importlib.machinery import (
        BYTECODE_SUFFIXES,
        EXTENSION_SUFFIXES,
        SOURCE_SUFFIXES,
        ExtensionFileLoader,
        FileFinder,
        SourceFileLoader,
        SourcelessFileLoader,
    )

    class ExactLoader(SourceFileLoader):
        def path_stats(self, path: str) -> dict[str, int]:
            st = os.stat(path)
            # stored in the .pyc header modulo 2**32 (about 71 minutes of microseconds)
            return {"mtime": st.st_mtime_ns // 1000, "size": st.st_size}

    finder = FileFinder.path_hook(
        (ExtensionFileLoader, EXTENSION_SUFFIXES),
        (ExactLoader, SOURCE_SUFFIXES),
        (SourcelessFileLoader, BYTECODE_SUFFIXES),
    )
    root = os.path.realpath(code)

    def hook(path: str) -> Any:
        real = os.path.realpath(path or ".")
        if real == root or real.startswith(root + os.sep):
            return finder(path)
        raise ImportError("not in the function's code folder")

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


class Worker:
    def __init__(self, fd: int, settings: dict[str, Any]) -> None:
        self.fd = fd
        self.code: str = settings["code"]
        self.handler_name: str = settings["handler"]
        self.memory: int = settings["memory"]
        self.bridge_path: str | None = settings.get("bridge_path")
        self.rlimit: bool = settings.get("rlimit", True)  # False: a cgroup caps memory
        #: the parent's shared memory region for large frames, ``[fd, size]`` (mapped in setup)
        self._shared_settings: list[int] | None = settings.get("shared")
        self.shared: Any = None
        self.channel = Channel(fd)
        self.encode = json.JSONEncoder(separators=(",", ":"), default=_not_json).encode
        self.handler: Callable[..., Any] | None = None
        self.load_error: dict[str, Any] | None = None
        self.failed = False  # the last invocation answered an error
        self.loop: Any = None  # an asyncio loop, created for the first async handler
        self.context = Context(
            function_name=settings["name"],
            function_version=os.environ.get("SCF_FUNCTIONVERSION", "$LATEST"),
            namespace=os.environ.get("SCF_NAMESPACE", "default"),
            memory_limit_in_mb=self.memory // (1024 * 1024),
            time_limit_in_ms=settings["timeout_ms"],
            request_id="",
            environ=";".join(f"{k}={v}" for k, v in os.environ.items()),
            callbackWaitsForEmptyEventLoop=False,
        )
        self._status_fd = os.open("/proc/self/status", os.O_RDONLY)
        try:
            self._clear_fd: int | None = os.open("/proc/self/clear_refs", os.O_WRONLY)
            os.write(self._clear_fd, b"5")
        except OSError:  # no CONFIG_PROC_PAGE_MONITOR, or not permitted: lifetime peak instead
            self._clear_fd = None

    # --- setup -----------------------------------------------------------------------------

    def setup(self, ppid: int | None) -> None:
        os.set_inheritable(self.fd, False)  # the handler's subprocesses must not hold the channel
        self.shared = _map_shared(self._shared_settings)  # before the limit: counted in its base
        _die_with_parent(ppid)
        import faulthandler

        faulthandler.enable(2)  # a crash leaves its traceback on the output pipe
        sys.stdin = open(os.devnull)  # noqa: SIM115
        self.stdout = LineSink(self.channel, 1)
        self.stderr = LineSink(self.channel, 2)
        sys.stdout = io.TextIOWrapper(
            self.stdout, encoding="utf-8", errors="backslashreplace", write_through=True
        )
        sys.stderr = io.TextIOWrapper(
            self.stderr, encoding="utf-8", errors="backslashreplace", write_through=True
        )
        root = logging.getLogger()
        root.addHandler(ChannelLogHandler(self.channel))
        root.setLevel(logging.INFO)
        if self.code not in sys.path[:1]:
            sys.path.insert(0, self.code)
        # `from bridge.handler import Retry, Drop` works in handlers; the function's own
        # modules still come first.
        if self.bridge_path and self.bridge_path not in sys.path:
            sys.path.append(self.bridge_path)
        _exact_bytecode_checks(self.code)
        if self.rlimit:
            self._limit_memory()

    def _limit_memory(self) -> None:
        """RLIMIT_AS = the address space in use now + the function's memory."""
        import resource

        vmsize = self._status_field(b"VmSize:")
        if vmsize is None:
            return
        limit = vmsize + self.memory
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        # The hard limit too: the function cannot lift its own limit.
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def _status_field(self, key: bytes) -> int | None:
        data = os.pread(self._status_fd, 4096, 0)
        i = data.find(key)
        if i < 0:
            return None
        return int(data[i + len(key) : data.index(b"k", i)]) * 1024

    def peak_rss(self) -> int:
        if self._clear_fd is not None:
            return self._status_field(b"VmHWM:") or 0
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def load(self) -> None:
        module_name, _, func_name = self.handler_name.rpartition(".")
        parts = module_name.split(".")
        base = os.path.join(self.code, *parts)
        entry = base + ".py"
        if not os.path.isfile(entry):
            if os.path.isfile(os.path.join(base, "__init__.py")):
                entry = os.path.join(base, "__init__.py")
            elif not os.access(self.code, os.R_OK | os.X_OK):
                self.load_error = _error(
                    "HandlerNotFound",
                    f"the code folder {self.code} is not readable by the function's user "
                    f"(uid {os.getuid()}): make it readable by others (chmod o+rX)",
                )
                return
            else:
                rel = os.path.relpath(entry, self.code)
                self.load_error = _error(
                    "HandlerNotFound",
                    f'entry file "{rel}" not found in {self.code} (handler "{self.handler_name}")',
                )
                return
        rel = os.path.relpath(entry, self.code)
        clash = sys.modules.get(parts[0])
        clash_file = getattr(clash, "__file__", None) or ""
        if clash is not None and not clash_file.startswith(self.code + os.sep):
            self.load_error = _error(
                "HandlerNotFound",
                f'entry module "{parts[0]}" has the name of a Python standard module; rename it',
            )
            return
        import importlib

        oom = False
        try:
            module = importlib.import_module(module_name)
        except MemoryError:
            oom = True
        except BaseException as e:
            self.load_error = _error(
                "HandlerFailed",
                f'importing "{module_name}" failed: {_describe(e)}',
                _user_traceback(e),
            )
            return
        if oom:
            self.load_error = self._oom_error()
            return
        func = getattr(module, func_name, None)
        if func is None:
            self.load_error = _error(
                "HandlerNotFound", f'handler function "{func_name}" not found in {rel}'
            )
        elif not callable(func):
            self.load_error = _error("HandlerNotFound", f'"{func_name}" in {rel} is not a function')
        else:
            self.handler = func

    def _oom_error(self) -> dict[str, Any]:
        mb = self.memory / (1024 * 1024)
        return _error(
            "OutOfMemory", f"Memory limit exceeded: the function used more than {mb:g} MB"
        )

    # --- serving ---------------------------------------------------------------------------

    def ready(self) -> None:
        info = {"pid": os.getpid(), "error": self.load_error, "shared": self.shared is not None}
        self.channel.send(frame(b"R", json.dumps(info).encode()))

    def serve(self) -> None:
        """Read frames and run them until EOF. A frame is read into one buffer kept from
        frame to frame (``readv`` into it: no new bytes object per read, no copy into a
        payload) and decoded from there: of a 6 MB event, one copy in the worker instead
        of three; the buffer shrinks back after a frame larger than ``_KEEP``."""
        fd = self.fd
        buf = bytearray(_START)
        start = have = 0  # the bytes not handled yet are buf[start:have]
        while True:
            while have - start < _HDR:
                if len(buf) - have < _HDR:  # room for a header (buf is larger than frames)
                    buf[: have - start] = buf[start:have]
                    have, start = have - start, 0
                got = _read_into(fd, buf, have)
                if not got:
                    return
                have += got
            end = start + _HDR + int.from_bytes(buf[start : start + _HDR], "big")
            if end > len(buf):  # move what is here to the front, make room for the rest
                buf[: have - start] = buf[start:have]
                have, end, start = have - start, end - start, 0
                if end > len(buf):
                    buf += bytes(end - len(buf))
            while have < end:
                got = _read_into(fd, buf, have)
                if not got:
                    return
                have += got
            kind = bytes(buf[start + _HDR : start + _HDR + 1])
            if kind == b"M":  # the frame lies in the shared region: its kind, then its size
                kind = bytes(buf[start + _HDR + 1 : start + _HDR + 2])
                source, lo, hi = self.shared, 0, int.from_bytes(buf[start + _HDR + 2 : end], "big")
            else:
                source, lo, hi = buf, start + _HDR + 1, end
            plain = kind.islower()
            kind = kind.upper()
            with memoryview(source) as view, view[lo:hi] as payload:
                # orjson reads the buffer itself; json (and the check for long digits) bytes
                data = _loads(payload if plain and _ORJSON_VIEWS else bytes(payload), plain)
            start = end
            if start == have:
                start = have = 0
                if len(buf) > _KEEP:
                    buf = bytearray(_START)
            if kind == b"I" and not self.run(data):
                return
            if kind == b"B" or kind == b"S":
                for body in data:
                    if not self.run(body, batch=True):
                        return
                    os.write(1, NEXT)  # what follows on fds 1/2 is the next invocation's
                    if self.failed and kind == b"S":
                        break
            del data

    def run(self, body: list[Any], batch: bool = False) -> bool:
        """Run a frame's invocation ``[request_id, deadline, time_limit_ms, event]`` (or
        ``[..., columns, 1]``: the event sent by column); in a ``batch``, its time limit
        starts now. False when this worker must go away."""
        rid, deadline, limit_ms, event = body[:4]
        if batch:
            deadline = time.monotonic() + limit_ms / 1000
        if len(body) > 4:
            try:
                event = columns_event(event)
            except (KeyError, TypeError, ValueError) as e:  # the parent's bug: said, not fatal
                self.failed = True
                self.answer_error(_error("SystemFault", f"the event sent by column: {e!r}"))
                return True
        return self.invoke(rid, deadline, limit_ms, event)

    def invoke(self, rid: str, deadline: float, limit_ms: int, event: Any) -> bool:
        """Run one invocation and answer it; False when this worker must go away."""
        handler = self.handler
        if handler is None:
            assert self.load_error is not None
            self.answer_error(self.load_error, retire=True)
            return False
        context = Context(self.context)
        context["request_id"] = rid
        context["time_limit_in_ms"] = limit_ms
        context._deadline = deadline
        if self._clear_fd is not None:
            os.write(self._clear_fd, b"5")  # reset VmHWM: the peak of this invocation only
        oom = False
        error = None
        result: Any = None
        out = b""
        try:
            result = handler(event, context)
            if getattr(type(result), "__await__", None) is not None:
                result = self.run_async(result)
        except MemoryError:
            oom = True
        except BaseException as e:
            error = _signal(e) or _error("HandlerFailed", _describe(e), _user_traceback(e))
        if error is None and not oom:
            try:
                out = self.encode(result).encode()
            except MemoryError:
                oom = True
            except NotSerializable as e:
                error = _error(
                    "BadResult", f"return value is not JSON serializable: object of type {e}"
                )
            except (TypeError, ValueError) as e:
                error = _error("BadResult", f"return value is not JSON serializable: {e}")
        del result
        self.stdout.end()
        self.stderr.end()
        if oom:
            # Only now, with the frames of the failed call released, is there memory to talk.
            self.answer_error(self._oom_error(), retire=True)
            return False
        self.failed = error is not None
        if error is not None:
            self.answer_error(error)
            return True
        self.channel.send(frame(b"O", self.peak_rss().to_bytes(8, "big") + out))
        return True

    def answer_error(self, error: dict[str, Any], *, retire: bool = False) -> None:
        out = dict(error, rss=self.peak_rss(), retire=retire)
        self.channel.send(frame(b"E", json.dumps(out).encode()))

    def run_async(self, awaitable: Any) -> Any:
        """Await on a loop kept for the worker's life: clients bound to it stay usable, and
        tasks a handler leaves behind go on running during later invocations (as in SCF, where
        ``callbackWaitsForEmptyEventLoop`` is false)."""
        if self.loop is None:
            import asyncio

            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(awaitable)


def _die_with_parent(ppid: int | None) -> None:
    """SIGKILL this worker when its parent dies, even by kill -9 (Linux PR_SET_PDEATHSIG): the
    daemon, or in the sandbox bwrap's init (``ppid`` None), which dies with the daemon."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # not Linux, or no libc: EOF on the channel still ends the worker
        pass
    if ppid is not None and os.getppid() != ppid:  # the parent died before prctl
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) != 3:
        sys.exit("usage: _worker.py FD SETTINGS_JSON (started by event-bridge)")
    settings = json.loads(argv[2])
    worker = Worker(int(argv[1]), settings)
    worker.setup(settings["ppid"])
    worker.load()
    worker.ready()
    worker.serve()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main()
