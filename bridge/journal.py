"""Log records to the systemd journal over its native protocol, with structured fields.

Under systemd (``$JOURNAL_STREAM`` names our stderr) :func:`bridge.log.setup` sends every
record here instead of writing a line to stderr, so the journal keeps, besides ``MESSAGE`` and
``PRIORITY``, the record's ``REQUEST_ID=``, ``FUNCTION=``, ``TRIGGER=``, ``ERROR_CLASS=`` and
``OUTCOME=`` fields: ``journalctl -u event-bridge REQUEST_ID=…`` shows one invocation's START,
END, REPORT and handler output.

Protocol (systemd's ``sd_journal_send``): one datagram to :data:`SOCKET` per record holding
``KEY=value\\n`` fields; a value with a newline is sent as ``KEY\\n`` + its length as 64-bit
little endian + the bytes + ``\\n``. A record too large for a datagram goes in a sealed memfd
whose descriptor is passed with ``SCM_RIGHTS``.

Not guaranteed: if the journal socket refuses a record (journald restarting, or gone), the
record is written to the fallback handler (stderr, with its priority prefix) instead; it is
never dropped silently. Secrets are masked in every field (:func:`bridge.log.redact`).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "event-bridge"
#: record attribute → journal field
FIELDS = {
    "request_id": "REQUEST_ID",
    "function": "FUNCTION",
    "trigger": "TRIGGER",
    "error_class": "ERROR_CLASS",
    "outcome": "OUTCOME",
}
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def field(key: str, value: object) -> bytes:
    data = str(value).encode("utf-8", "backslashreplace")
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def available(path: str | None = None) -> bool:
    return os.path.exists(path or SOCKET)


class JournalHandler(logging.Handler):
    """Sends records to journald (module docstring); ``fallback`` takes what it refuses."""

    def __init__(self, fallback: logging.Handler | None = None, *, path: str | None = None) -> None:
        super().__init__()
        self.path = path or SOCKET
        self.fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(True)

    def encode(self, record: logging.LogRecord) -> bytes:
        from bridge.redact import redact

        parts = [
            field("MESSAGE", self.format(record)),
            field("PRIORITY", _PRIORITY.get(record.levelno, 6)),
            field("SYSLOG_IDENTIFIER", IDENTIFIER),
            field("LOGGER", record.name),
            field("CODE_FILE", record.pathname),
            field("CODE_LINE", record.lineno),
            field("CODE_FUNC", record.funcName),
        ]
        for attr, key in FIELDS.items():
            value = getattr(record, attr, None)
            if value is not None:
                parts.append(field(key, redact(str(value))))
        return b"".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.encode(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(data)
        except OSError:
            if self.fallback is not None:
                self.fallback.handle(record)
            else:
                self.handleError(record)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("event-bridge-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd]).tobytes()
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self._sock.close()
            if self.fallback is not None:
                self.fallback.close()
        finally:
            super().close()
