"""Logging: one line per record on stderr, human or JSON, with journald priority prefixes.

Records may carry ``request_id``, ``function``, ``trigger`` and ``error_class``
as ``extra`` fields; both formats show them. When stderr is connected to the
journal (``$JOURNAL_STREAM`` names stderr's device and inode), each line starts
with ``<N>`` so journald stores the right priority — or, when the journal's native socket
is there, records go to it with structured fields instead (:mod:`bridge.journal`). Values
registered with
:func:`register_secret` are masked in every line, whatever logged them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, TextIO

from bridge.redact import redact, register_secret

#: re-exported: ``bridge.log.register_secret`` and ``redact`` are where callers look
__all__ = [
    "FIELDS",
    "HotLog",
    "HumanFormatter",
    "JsonFormatter",
    "journald_stream",
    "redact",
    "register_secret",
    "setup",
]

FIELDS = ("request_id", "function", "trigger", "error_class", "outcome")
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


#: (second, its text): the lines of one second share it (strftime is most of a line's cost)
_second: tuple[int | None, str] = (None, "")


def _stamp(created: float) -> str:
    global _second
    sec = int(created // 1)  # floor: before 1970 too
    known = _second  # one read: another thread may replace it meanwhile
    if known[0] != sec:
        known = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{known[1]}.{int(created % 1 * 1000):03d}Z"


def journald_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd gave us."""
    js = os.environ.get("JOURNAL_STREAM")
    if not js:
        return False
    try:
        st = os.fstat(stream.fileno())
        dev, ino = (int(x) for x in js.split(":"))
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class HumanFormatter(logging.Formatter):
    def __init__(self, *, timestamps: bool = True, priority: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps
        self.priority = priority

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        tags = " ".join(f"{k}={v}" for k in FIELDS if (v := getattr(record, k, None)) is not None)
        line = f"{record.levelname:<7} {record.name}: {msg}"
        if tags:
            line += f" [{tags}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.timestamps:
            line = f"{_stamp(record.created)} {line}"
        line = redact(line)
        if self.priority:
            prio = _PRIORITY.get(record.levelno, 6)
            line = "\n".join(f"<{prio}>{ln}" for ln in line.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, *, priority: bool = False) -> None:
        super().__init__()
        self.priority = priority

    def format(self, record: logging.LogRecord) -> str:
        # masked before encoding: JSON escapes a secret holding " or \ out of recognition
        out: dict[str, Any] = {
            "time": _stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for k in FIELDS:
            v = getattr(record, k, None)
            if v is not None:
                out[k] = redact(v) if isinstance(v, str) else v
        if record.exc_info:
            out["traceback"] = redact(self.formatException(record.exc_info))
        line = json.dumps(out, ensure_ascii=False, default=lambda o: redact(str(o)))
        if self.priority:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class HotLog:
    """``logger.info(msg, *args, extra=extra)`` for lines a hot path writes thousands of times
    a second (an invocation's START, END and REPORT), the same records made cheaper.

    ``Logger.info`` looks up its caller's frame and runs ``LogRecord.__init__`` for every
    line: a line to a handler that does nothing costs 60,001 instructions that way and 35,292
    here (callgrind). The first line from a call site (on a thread) is made by the logger
    itself, and its attributes are kept as that site's template; later lines copy the
    template and set what differs from line to line: the message's arguments, the ``extra``
    fields and the time. The record is then handed to ``logger.handle``, as ``Logger._log``
    hands it: the logger's level, filters, ``disabled`` flag, handlers and propagation all
    apply as they do to any other line. Attributes that vary by line on other Python versions
    (``taskName``, the time in nanoseconds) are set for each line. While a record factory
    other than ``LogRecord`` is installed, or where the logger overrides ``makeRecord``, every
    line is made by the logger (such a factory may set something of its own on each)."""

    __slots__ = ("__weakref__", "_plain", "_sites", "logger")

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        #: the logger makes its records as logging.Logger does (else every line goes to it)
        self._plain = type(logger).makeRecord is logging.Logger.makeRecord
        #: (code, line, thread) of a call site -> the attributes of its first record (but its
        #: message) and the ``extra`` keys the logger checked then. A thread that reuses the
        #: id of one that ended would get its name: the lines this serves come from the loop
        self._sites: dict[tuple[Any, int, int], tuple[dict[str, Any], Any]] = {}
        _hot_logs.add(self)  # a child process forgets the templates (see _forget_sites)

    def info(self, msg: str, *args: Any, extra: dict[str, Any]) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        caller = sys._getframe(1)
        key = (caller.f_code, caller.f_lineno, threading.get_ident())
        site = self._sites.get(key)
        if (
            site is None
            or extra.keys() != site[1]
            or (len(args) == 1 and isinstance(args[0], Mapping))
            or logging.getLogRecordFactory() is not logging.LogRecord
        ):
            # the logger makes the line: the first of this site, ``extra`` with other keys
            # (the logger refuses one that would overwrite an attribute), a single mapping
            # argument (the one case LogRecord.__init__ treats specially), or a record
            # factory of someone's, which may set something of its own on every line
            record = logger.makeRecord(
                logger.name,
                logging.INFO,
                caller.f_code.co_filename,
                caller.f_lineno,
                msg,
                args,
                None,
                caller.f_code.co_name,
                extra,
            )
            if site is None and self._plain and type(record) is logging.LogRecord:
                template = dict(record.__dict__)
                template["msg"] = template["args"] = None  # not kept alive by the template
                self._sites[key] = (template, frozenset(extra))
        else:
            d = site[0].copy()
            d["msg"], d["args"] = msg, args
            _stamp_record(d)
            if "taskName" in d:  # Python 3.12+: the asyncio task of this line
                d["taskName"] = _task_name() if logging.logAsyncioTasks else None  # type: ignore[attr-defined]
            d.update(extra)
            record = _new_record(logging.LogRecord)
            record.__dict__ = d
        logger.handle(record)


if isinstance(logging._startTime, int):  # type: ignore[attr-defined]

    def _stamp_record(d: dict[str, Any]) -> None:
        """The record's time, as LogRecord.__init__ sets it on Python 3.13+ (nanoseconds)."""
        ns = time.time_ns()
        d["created"] = ns / 1e9
        d["msecs"] = (ns % 1_000_000_000) // 1_000_000 + 0.0
        d["relativeCreated"] = (ns - logging._startTime) / 1e6  # type: ignore[attr-defined]

else:

    def _stamp_record(d: dict[str, Any]) -> None:
        """The record's time, as LogRecord.__init__ sets it on Python 3.11 and 3.12."""
        now = time.time()
        d["created"] = now
        d["msecs"] = int((now - int(now)) * 1000) + 0.0
        d["relativeCreated"] = (now - logging._startTime) * 1000  # type: ignore[attr-defined]


_new_record = object.__new__
#: every HotLog there is: their templates hold the process and thread ids
_hot_logs: weakref.WeakSet[HotLog] = weakref.WeakSet()


def _forget_sites() -> None:
    for hot in list(_hot_logs):
        hot._sites.clear()


os.register_at_fork(after_in_child=_forget_sites)


def _task_name() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop on this thread
        return None
    return task.get_name() if task is not None else None


def setup(
    fmt: str = "human",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    journal_native: bool = True,
) -> None:
    """Configure the root logger once (idempotent: replaces our previous handler)."""
    stream = stream or sys.stderr
    journal = journald_stream(stream)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(priority=journal)
    else:
        # journald adds its own timestamps
        formatter = HumanFormatter(timestamps=not journal, priority=journal)
    handler: logging.Handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    from bridge import journal as journald

    if journal_native and journal and journald.available():
        # records go to journald with REQUEST_ID=, FUNCTION=, TRIGGER= fields; stderr (with
        # its priority prefixes) only takes what the journal socket refuses
        native = journald.JournalHandler(fallback=handler)
        native.setFormatter(HumanFormatter(timestamps=False) if fmt != "json" else JsonFormatter())
        handler = native
    handler.set_name("event-bridge")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "event-bridge":
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
