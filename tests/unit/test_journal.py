"""The journald native protocol, against a fake journal socket (a unix datagram socket)."""

from __future__ import annotations

import io
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import journal, log
from bridge.journal import JournalHandler


def parse(data: bytes) -> dict[str, str]:
    """Decode a native-protocol datagram (both the KEY=value and the binary form)."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            out[line.decode()] = data[nl + 9 : nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
    if fds:  # a record too large for a datagram comes in a memfd
        with os.fdopen(fds[0], "rb") as f:
            f.seek(0)  # journald maps it; the offset is wherever the sender left it
            data = f.read()
    return parse(data)


def test_records_carry_request_id_function_and_trigger_fields(
    fake_journal: tuple[socket.socket, str],
) -> None:
    sock, path = fake_journal
    h = JournalHandler(path=path)
    h.setFormatter(log.HumanFormatter(timestamps=False))
    log.register_secret("s3cr3t-value-for-journal")
    rec = logging.LogRecord(
        "bridge.dispatcher",
        logging.WARNING,
        __file__,
        7,
        "START %s s3cr3t-value-for-journal",
        ("r1",),
        None,
    )
    rec.request_id, rec.function, rec.trigger = "r1", "thumbnail", "every-5s"
    rec.error_class = "function_error"
    try:
        h.handle(rec)
        got = receive(sock)
    finally:
        h.close()
    assert got["REQUEST_ID"] == "r1"
    assert got["FUNCTION"] == "thumbnail"
    assert got["TRIGGER"] == "every-5s"
    assert got["ERROR_CLASS"] == "function_error"
    assert got["PRIORITY"] == "4"
    assert got["SYSLOG_IDENTIFIER"] == "event-bridge"
    assert "START r1 ***" in got["MESSAGE"] and "s3cr3t" not in str(got)


def test_multiline_and_oversized_messages(fake_journal: tuple[socket.socket, str]) -> None:
    sock, path = fake_journal
    h = JournalHandler(path=path)
    try:
        h.handle(logging.LogRecord("fn.f", logging.INFO, __file__, 1, "a\nb", None, None))
        assert receive(sock)["MESSAGE"] == "a\nb"
        big = "x" * (4 << 20)  # beyond any datagram: sent in a memfd
        h.handle(logging.LogRecord("fn.f", logging.INFO, __file__, 1, big, None, None))
        assert receive(sock)["MESSAGE"] == big
    finally:
        h.close()


def test_a_refusing_journal_falls_back_to_stderr(tmp_path: Path) -> None:
    out = io.StringIO()
    fallback = logging.StreamHandler(out)
    h = JournalHandler(fallback, path=str(tmp_path / "nobody-listens"))
    try:
        h.handle(logging.LogRecord("x", logging.ERROR, __file__, 1, "kept", None, None))
    finally:
        h.close()
    assert "kept" in out.getvalue()


def test_setup_uses_the_native_protocol_under_systemd(
    fake_journal: tuple[socket.socket, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = fake_journal
    stream = (tmp_path / "stderr").open("w")
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.setattr(journal, "SOCKET", path)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        log.setup("human", "info", stream)
        logging.getLogger("bridge.dispatcher").info(
            "END RequestId: r9", extra={"request_id": "r9", "function": "f", "trigger": "t"}
        )
        got = receive(sock)
        assert (got["REQUEST_ID"], got["FUNCTION"], got["TRIGGER"]) == ("r9", "f", "t")
        assert got["PRIORITY"] == "6"
    finally:
        for h in root.handlers[:]:
            if h.get_name() == "event-bridge":
                root.removeHandler(h)
                h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        stream.close()
    assert (tmp_path / "stderr").read_text() == ""  # nothing duplicated on stderr
