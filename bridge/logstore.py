"""The invocation log store: START/END/REPORT lines and the handlers' own output, kept bounded.

What ``event-bridge logs`` and the console's invocation view read. The daemon installs a
:class:`LogStoreHandler` on the root logger; it keeps every record that carries a
``request_id`` or a ``function`` (the dispatcher's START/END/REPORT and error lines, and what a
handler printed or logged, which the targets tag with the request id). Each kept line is stored
with its time, level, function, request id and trigger (a handler's own lines do not carry the
trigger: it is taken from the START line of the same request id). A REPORT line, which the
dispatcher tags with ``duration_ms``, ``memory_bytes`` and ``outcome``, also becomes a row of
the ``invocations`` table: one row per finished invocation.

Lifecycle and rules:

- ``handle`` runs on the logging thread (usually the event loop) and only appends the record to
  an in-memory buffer: no formatting, no I/O, no SQL on the hot path (so a record's ``args``
  are formatted a moment later, on the writer thread: log immutable values). A writer thread takes the buffer every
  :data:`FLUSH_INTERVAL_S` (or sooner when it holds :data:`FLUSH_LINES` lines) and writes it in
  one transaction to ``STATE_DIR/logs.db``, a SQLite file separate from the state store so log
  writes never wait for, or delay, queue commits. It is written with ``synchronous=OFF``: logs
  are diagnostics, and a power loss may lose the last lines.
- Retention runs on the same thread every :data:`RETENTION_EVERY_S`: lines older than
  ``[logs] retention`` go, then, while the pages in use exceed ``[logs] max_size``, the oldest
  lines go (oldest first, a tenth at a time); freed pages are reused, so the file stays bounded.
- ``close()`` writes what is buffered and stops the thread.

Not guaranteed: if the writer falls behind by more than :data:`MAX_BUFFER` lines the newest are
dropped (counted in ``dropped``, as are the lines of a write that failed) rather than growing
memory; lines logged after ``close()``
are not stored. Values registered as secrets (:func:`bridge.log.register_secret`) are masked
before a line is stored.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bridge.log import redact

FLUSH_INTERVAL_S = 0.25
FLUSH_LINES = 2000
MAX_BUFFER = 200_000
RETENTION_EVERY_S = 30.0
#: remember the trigger of this many running request ids
MAX_OPEN_REQUESTS = 20_000
_formatter = logging.Formatter()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    function TEXT,
    request_id TEXT,
    trigger_name TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lines_request ON lines (request_id);
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    function TEXT NOT NULL,
    trigger_name TEXT,
    outcome TEXT NOT NULL,
    duration_ms REAL,
    memory_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS invocations_function ON invocations (function, id);
"""


#: rows per INSERT statement: a write's rows go in ROWS_PER_INSERT at a time, the last
#: statement padded with rows it leaves out (``LIMIT``), so the one statement stays
#: prepared (one of another size would be parsed anew: 3.7 against 1.2 us a row)
ROWS_PER_INSERT = 512


@dataclasses.dataclass(frozen=True)
class _Table:
    """An INSERT of many rows in one statement: ``INSERT INTO t (a, b) SELECT * FROM
    (VALUES (?, ?), (?, ?)) LIMIT ?``, the limit the number of real rows.

    ``sqlite3`` lets other threads run while a statement steps and takes the GIL back after,
    so one row per statement waited for the GIL once per row: beside a busy event loop the
    writer fell behind, buffered up to MAX_BUFFER lines and dropped the newest.
    ``bench/logstore.py``, three runs: beside a thread spinning in Python 29,088-33,815
    lines/s against 242-1,894 with one row per statement; with nothing beside it
    110,373-126,849 against 85,563-99,591."""

    table: str
    columns: tuple[str, ...]

    @functools.cache  # noqa: B019 (two module-level tables, a few sizes)
    def statement(self, size: int) -> str:
        """The INSERT of up to ``size`` rows."""
        group = "(" + ", ".join("?" * len(self.columns)) + ")"
        values = ", ".join([group] * size)
        return f"INSERT INTO {self.table} ({', '.join(self.columns)}) SELECT * FROM (VALUES {values}) LIMIT ?"

    def insert(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], max_variables: int
    ) -> None:
        """``rows`` in statements of ``ROWS_PER_INSERT``, or fewer if SQLite's limit on bound
        variables is lower."""
        size = max(1, min(ROWS_PER_INSERT, (max_variables - 1) // len(self.columns)))
        sql = self.statement(size)
        for i in range(0, len(rows), size):
            part = rows[i : i + size]
            params = list(itertools.chain.from_iterable(part))
            if len(part) < size:
                params += [None] * (len(self.columns) * (size - len(part)))
            params.append(len(part))
            conn.execute(sql, params)


_LINES = _Table("lines", ("ts", "level", "function", "request_id", "trigger_name", "message"))
_INVOCATIONS = _Table(
    "invocations",
    ("ts", "request_id", "function", "trigger_name", "outcome", "duration_ms", "memory_bytes"),
)


def _valid(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with what UTF-8 cannot hold (lone surrogates) replaced: one such line must not
    stop the writer."""
    return tuple(v.encode("utf-8", "replace").decode() if isinstance(v, str) else v for v in row)


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    id: int
    ts: float
    level: str
    function: str | None
    request_id: str | None
    trigger: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class InvocationRow:
    id: int
    ts: float
    request_id: str
    function: str
    trigger: str | None
    outcome: str
    duration_ms: float | None
    memory_bytes: int | None


def db_path(state_dir: Path) -> Path:
    return Path(state_dir) / "logs.db"


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.executescript(_SCHEMA)
    return conn


class LogStoreHandler(logging.Handler):
    """A logging handler that stores invocation lines in ``logs.db`` (module docstring)."""

    def __init__(
        self, path: Path, *, retention_s: float, max_bytes: int, level: int = logging.DEBUG
    ) -> None:
        super().__init__(level)
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.dropped = 0
        self.written = 0
        self._buf: list[logging.LogRecord] = []
        self._triggers: dict[str, str] = {}
        self._wake = threading.Event()
        self._swap = threading.Lock()  # the writer takes the buffers whole under it
        self._stop = False
        self._conn = _connect(self.path)
        self._max_variables = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._last_retention = 0.0
        self._thread = threading.Thread(target=self._run, name="bridge-logstore", daemon=True)
        self._thread.start()

    # --- hot path ----------------------------------------------------------------------------

    def handle(self, record: logging.LogRecord) -> bool:
        # no handler lock, no formatting: the record is queued as it is and the writer thread
        # does the rest (message, trigger, masking, SQL) in logging order
        if (
            getattr(record, "request_id", None) is None
            and getattr(record, "function", None) is None
        ) or self._stop:
            return False
        with self._swap:
            if len(self._buf) >= MAX_BUFFER:
                self.dropped += 1
                return False
            self._buf.append(record)
            n = len(self._buf)
        if n >= FLUSH_LINES:
            self._wake.set()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    # --- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            stopping = self._stop
            try:
                self._write()
                now = time.time()
                if now - self._last_retention >= RETENTION_EVERY_S:
                    self._last_retention = now
                    enforce_retention(self._conn, now - self.retention_s, self.max_bytes)
            except Exception as e:  # never let the logs take the daemon down, nor stop the writer
                logging.getLogger("bridge.logstore").warning("log store write failed: %s", e)
            if stopping:
                return

    def _rows(
        self, records: list[logging.LogRecord]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        lines: list[tuple[Any, ...]] = []
        invs: list[tuple[Any, ...]] = []
        triggers = self._triggers
        add_line, add_inv = lines.append, invs.append
        for record in records:
            d = record.__dict__  # what extra= set; a plain dict read is the cheapest
            rid, function, trigger = d.get("request_id"), d.get("function"), d.get("trigger")
            if rid is not None:
                if trigger is not None:
                    if len(triggers) >= MAX_OPEN_REQUESTS and rid not in triggers:
                        del triggers[next(iter(triggers))]
                    triggers[rid] = trigger
                else:
                    trigger = triggers.get(rid)
            try:
                msg = record.getMessage()
            except Exception:  # bad args: keep the template rather than lose the line
                msg = str(record.msg)
            if record.exc_info:
                msg += "\n" + _formatter.formatException(record.exc_info)
            ts = record.created
            add_line((ts, record.levelname, function, rid, trigger, redact(msg)))
            ms = d.get("duration_ms")
            if ms is not None and rid is not None and function is not None:
                add_inv(
                    (
                        ts,
                        rid,
                        function,
                        trigger,
                        d.get("outcome") or "success",
                        ms,
                        d.get("memory_bytes"),
                    )
                )
                triggers.pop(rid, None)
        return lines, invs

    def _write(self) -> None:
        with self._swap:
            records, self._buf = self._buf, []
        if not records:
            return
        try:
            lines, invs = self._rows(records)
            try:
                self._insert(lines, invs)
            except UnicodeEncodeError:  # a lone surrogate, say: what UTF-8 cannot hold
                self._insert([_valid(r) for r in lines], [_valid(r) for r in invs])
        except Exception:
            self.dropped += len(records)  # the write was rolled back: its lines are lost
            raise
        self.written += len(lines)

    def _insert(self, lines: list[tuple[Any, ...]], invs: list[tuple[Any, ...]]) -> None:
        """One transaction (rolled back if it fails)."""
        with self._conn:
            self._conn.execute("BEGIN")
            _LINES.insert(self._conn, lines, self._max_variables)
            _INVOCATIONS.insert(self._conn, invs, self._max_variables)

    def flush(self) -> None:
        """Ask the writer to write what is buffered now (it does not wait for the write)."""
        self._wake.set()

    def close(self) -> None:
        if not self._stop:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._conn.close()
        super().close()


def enforce_retention(conn: sqlite3.Connection, older_than: float, max_bytes: int) -> int:
    """Delete lines older than ``older_than`` (unix time), then the oldest lines while the
    pages in use exceed ``max_bytes``. Returns how many lines were deleted.

    Rows are in logging order (``id``), so "older than" is "below the first id that is not":
    found by reading from the oldest row, which costs what is deleted, with no time index to
    keep up on every insert."""
    deleted = 0
    for table in ("lines", "invocations"):
        row = conn.execute(
            f"SELECT id FROM {table} WHERE ts >= ? ORDER BY id LIMIT 1", (older_than,)
        ).fetchone()
        if row is None:
            n = conn.execute(f"DELETE FROM {table}").rowcount
        else:
            n = conn.execute(f"DELETE FROM {table} WHERE id < ?", (row[0],)).rowcount
        if table == "lines":
            deleted += n
    for _ in range(50):
        if used_bytes(conn) <= max_bytes:
            break
        (count,) = conn.execute("SELECT COUNT(*) FROM lines").fetchone()
        if not count:
            break
        cut = max(1, count // 10)
        row = conn.execute(
            "SELECT id, ts FROM lines ORDER BY id LIMIT 1 OFFSET ?", (cut,)
        ).fetchone()
        if row is None:
            deleted += conn.execute("DELETE FROM lines").rowcount
            conn.execute("DELETE FROM invocations")
            break
        deleted += conn.execute("DELETE FROM lines WHERE id < ?", (row[0],)).rowcount
        conn.execute("DELETE FROM invocations WHERE ts < ?", (row[1],))
    return deleted


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the pages in use (the file may be larger: free pages are reused)."""
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    (size,) = conn.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


class LogReader:
    """Queries over ``logs.db`` (the CLI and the console; safe while the daemon writes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = _connect(self.path)

    def close(self) -> None:
        self._conn.close()

    def lines(
        self,
        *,
        function: str | None = None,
        request_id: str | None = None,
        trigger: str | None = None,
        since: float | None = None,
        after_id: int | None = None,
        limit: int | None = None,
        functions: list[str] | None = None,
    ) -> list[Line]:
        """Matching lines in the order they were logged; with ``limit``, the newest ``limit``.
        ``functions`` restricts to those names (a token's scope, already expanded)."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        for col, val in (("function", function), ("request_id", request_id)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if trigger is not None:
            where.append("trigger_name = ?")
            params.append(trigger)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if after_id is not None:
            where.append("id > ?")
            params.append(after_id)
        if functions is not None:
            where.append(f"function IN ({', '.join('?' * len(functions))})")
            params.extend(functions)
        sql = (
            "SELECT id, ts, level, function, request_id, trigger_name, message FROM lines "
            f"WHERE {' AND '.join(where)} ORDER BY id DESC"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._conn.execute(sql, params).fetchall()
        return [Line(*r) for r in reversed(rows)]

    def invocations(self, function: str, *, limit: int = 50) -> list[InvocationRow]:
        """The newest finished invocations of ``function``, newest first."""
        rows = self._conn.execute(
            "SELECT id, ts, request_id, function, trigger_name, outcome, duration_ms, "
            "memory_bytes FROM invocations WHERE function = ? ORDER BY id DESC LIMIT ?",
            (function, limit),
        ).fetchall()
        return [InvocationRow(*r) for r in rows]

    def last_id(self) -> int:
        (last,) = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM lines").fetchone()
        return int(last)

    def follow(
        self,
        *,
        after_id: int | None = None,
        poll_s: float = 0.5,
        stop: threading.Event | None = None,
        **filters: Any,
    ) -> Iterator[Line]:
        """Lines as they are written after ``after_id`` (default: the current last one),
        until ``stop`` is set."""
        last = self.last_id() if after_id is None else after_id
        while stop is None or not stop.is_set():
            got = self.lines(after_id=last, **filters)
            for ln in got:
                last = ln.id
                yield ln
            if not got:
                time.sleep(poll_s)


def format_line(ln: Line) -> str:
    t = time.gmtime(ln.ts)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(ln.ts % 1 * 1000):03d}Z"
    tags = " ".join(
        f"{k}={v}"
        for k, v in (
            ("function", ln.function),
            ("request_id", ln.request_id),
            ("trigger", ln.trigger),
        )
        if v
    )
    return f"{stamp} {ln.level:<7} {ln.message} [{tags}]"


def install_log_store(state_dir: Path, *, retention_s: float, max_bytes: int) -> LogStoreHandler:
    """Open ``STATE_DIR/logs.db`` and store invocation lines from the root logger on."""
    handler = LogStoreHandler(db_path(state_dir), retention_s=retention_s, max_bytes=max_bytes)
    handler.set_name("event-bridge-logstore")
    logging.getLogger().addHandler(handler)
    return handler


def uninstall_log_store(handler: LogStoreHandler) -> None:
    """Stop storing lines, write what is buffered and close the file."""
    logging.getLogger().removeHandler(handler)
    handler.close()
