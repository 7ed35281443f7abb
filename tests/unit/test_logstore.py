"""The log store: what it keeps, trigger tagging from START lines, retention oldest first."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest

from bridge import logstore
from bridge.log import register_secret
from bridge.logstore import LogReader, LogStoreHandler, enforce_retention, used_bytes
from bridge.testing import until


def _record(msg: str, created: float | None = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("fn.f", logging.INFO, __file__, 1, msg, None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    if created is not None:
        rec.created = created
    return rec


async def test_keeps_invocation_lines_and_tags_handler_output_with_the_trigger(
    tmp_path: Path,
) -> None:
    h = LogStoreHandler(tmp_path / "logs.db", retention_s=3600, max_bytes=64 << 20)
    register_secret("hunter2-secret-value")
    try:
        h.handle(_record("START RequestId: r1", request_id="r1", function="f", trigger="tick"))
        h.handle(_record("hello hunter2-secret-value", request_id="r1", function="f"))
        h.handle(_record("not about an invocation"))
        h.handle(
            _record(
                "REPORT RequestId: r1",
                request_id="r1",
                function="f",
                trigger="tick",
                outcome="function_error",
                duration_ms=12.5,
                memory_bytes=2048,
            )
        )
        h.handle(_record("START RequestId: r2", request_id="r2", function="g"))
        h.flush()
        reader = LogReader(tmp_path / "logs.db")
        try:
            await until(lambda: len(reader.lines()) == 4)
            lines = reader.lines(request_id="r1")
            assert [ln.message for ln in lines] == [
                "START RequestId: r1",
                "hello ***",
                "REPORT RequestId: r1",
            ]
            assert {ln.trigger for ln in lines} == {"tick"}
            assert [ln.request_id for ln in reader.lines(function="g")] == ["r2"]
            assert [ln.request_id for ln in reader.lines(trigger="tick")] == ["r1"] * 3
            (inv,) = reader.invocations("f")
            assert (inv.request_id, inv.outcome, inv.duration_ms, inv.memory_bytes) == (
                "r1",
                "function_error",
                12.5,
                2048,
            )
            assert reader.lines(limit=1)[0].request_id == "r2"
        finally:
            reader.close()
    finally:
        h.close()


def test_retention_deletes_by_age_then_oldest_first_by_size(tmp_path: Path) -> None:
    conn = logstore._connect(tmp_path / "logs.db")
    now = time.time()
    rows = [(now - 10_000 + i, "INFO", "f", f"r{i}", None, "x" * 500) for i in range(4000)]
    conn.executemany(
        "INSERT INTO lines (ts, level, function, request_id, trigger_name, message) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    # by age: everything older than now - 9000 goes (the first 1000 rows)
    enforce_retention(conn, now - 9000, 1 << 40)
    ids = [r for (r,) in conn.execute("SELECT request_id FROM lines ORDER BY id")]
    assert ids[0] == "r1000" and len(ids) == 3000
    # by size: the oldest go first until the pages in use fit
    limit = used_bytes(conn) // 2
    enforce_retention(conn, 0, limit)
    assert used_bytes(conn) <= limit
    left = [r for (r,) in conn.execute("SELECT request_id FROM lines ORDER BY id")]
    assert left and left[-1] == "r3999"
    assert left == ids[len(ids) - len(left) :]
    conn.close()


@pytest.mark.parametrize("max_variables", [None, 60], ids=["usual_limit", "limit_60"])
async def test_values_are_stored_as_they_were_logged(
    tmp_path: Path, max_variables: int | None
) -> None:
    """A write's rows go in as statements of 512 rows, the last padded with rows it leaves
    out (fewer each where SQLite's limit on bound variables is lower: with 60, 10 lines or
    8 invocations): every value comes back as it was, in the order logged."""
    h = LogStoreHandler(tmp_path / "logs.db", retention_s=3600, max_bytes=64 << 20)
    assert h._max_variables >= 999
    if max_variables is not None:  # SQLite's own limit too: a statement with more fails
        h._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, max_variables)
        h._max_variables = max_variables
    messages = [
        'quotes " and \\ backslash \\" and a tab\t',
        "two\nlines\r\n",
        "云函数 🚀 ünïcödé",
        '[1, 2] {"a": null} $[0] \'; DROP TABLE lines; --',
        "",
        *(f"line {i}" for i in range(600)),  # 607 in all: 512, then 95 padded to 512
    ]
    ts = round(time.time()) + 0.0381234  # within the retention of an hour
    try:
        for i, msg in enumerate(messages):
            h.handle(_record(msg, ts + i, request_id=f"r{i}", function="f"))
        h.handle(
            _record(
                "REPORT RequestId: r0",
                ts + 9,
                request_id="r0",
                function="f",
                trigger=None,
                outcome="timeout",
                duration_ms=0.1 + 0.2,
                memory_bytes=2**40 + 1,
            )
        )
        h.handle(
            _record(
                "REPORT RequestId: r1",
                ts + 10,
                request_id="r1",
                function="f",
                duration_ms=3.0,
                memory_bytes=None,
            )
        )
        h.flush()
        reader = LogReader(tmp_path / "logs.db")
        try:
            await until(lambda: len(reader.lines()) == len(messages) + 2)
            got = reader.lines()
            assert [(ln.message, ln.ts, ln.request_id, ln.level) for ln in got] == [
                *[(m, ts + i, f"r{i}", "INFO") for i, m in enumerate(messages)],
                ("REPORT RequestId: r0", ts + 9, "r0", "INFO"),
                ("REPORT RequestId: r1", ts + 10, "r1", "INFO"),
            ]
            assert all(ln.trigger is None and ln.function == "f" for ln in got)
            assert [
                (i.request_id, i.outcome, i.duration_ms, i.memory_bytes, i.ts)
                for i in reader.invocations("f")
            ] == [
                ("r1", "success", 3.0, None, ts + 10),
                ("r0", "timeout", 0.1 + 0.2, 2**40 + 1, ts + 9),
            ]
        finally:
            reader.close()
    finally:
        h.close()


async def test_a_line_utf8_cannot_hold_is_stored_mended_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    """A lone surrogate (a request id decoded with ``surrogateescape``, say) used to end the
    writer thread: no line was stored after it."""
    h = LogStoreHandler(tmp_path / "logs.db", retention_s=3600, max_bytes=64 << 20)
    try:
        h.handle(_record("START RequestId: bad\udc80", request_id="bad\udc80", function="f"))
        h.flush()
        reader = LogReader(tmp_path / "logs.db")
        try:
            await until(lambda: len(reader.lines()) == 1)
            h.handle(_record("START RequestId: ok", request_id="ok", function="f"))
            h.flush()
            await until(lambda: len(reader.lines()) == 2)
            assert [(ln.message, ln.request_id) for ln in reader.lines()] == [
                ("START RequestId: bad?", "bad?"),
                ("START RequestId: ok", "ok"),
            ]
            assert h._thread.is_alive() and h.dropped == 0
        finally:
            reader.close()
    finally:
        h.close()


async def test_a_failed_write_counts_its_lines_as_dropped_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    h = LogStoreHandler(tmp_path / "logs.db", retention_s=3600, max_bytes=64 << 20)
    try:
        h._conn.execute("ALTER TABLE lines RENAME TO gone")  # every insert fails
        for i in range(3):
            h.handle(_record(f"line {i}", request_id=f"r{i}", function="f"))
        h.flush()
        await until(lambda: h.dropped == 3)
        h._conn.execute("ALTER TABLE gone RENAME TO lines")
        h.handle(_record("after", request_id="r9", function="f"))
        h.flush()
        await until(lambda: h.written == 1)
        assert h._thread.is_alive() and h.dropped == 3
    finally:
        h.close()
