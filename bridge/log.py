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

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from bridge.redact import redact, register_secret

#: re-exported: ``bridge.log.register_secret`` and ``redact`` are where callers look
__all__ = [
    "FIELDS",
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
