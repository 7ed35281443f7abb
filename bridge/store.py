"""The state store: everything that must survive a restart — timer last-fire times, plugin
state, the durable async queue and the local dead letters.

:class:`StateStore` is the interface; :class:`SqliteStore` the embedded
implementation. The interface makes no SQLite-only assumptions: times are unix
seconds (double precision), ids and payloads are text, a claim is a lease
(owner + expiry) rather than a lock held by a connection, so a PostgreSQL store
implements the same coroutines with the same SQL (``FOR UPDATE SKIP LOCKED``
for claims) and several replicas can share it.

Durability: every write coroutine returns only after its transaction is
committed with ``synchronous=FULL`` (fsync). Concurrent writes are *group
committed*: the store thread runs every write queued while the previous commit
was in flight in one transaction, each in its own savepoint so one failing
write does not fail the others. That is how thousands of accepts per second
stay durable with one fsync per batch.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QueueItem:
    """One accepted async event (a row of the durable queue)."""

    id: str  # the request id; stays the same across retries
    function: str
    payload: str  # the rendered event, JSON text
    request_source: str  # TRIGGER_TIMER, API, ...
    trigger: str | None = None
    accepted_at: float  # unix seconds
    due_at: float
    attempts: int = 0  # failed invocations so far
    function_errors: int = 0
    last_error_class: str | None = None
    last_error: str | None = None
    last_detail: str | None = None
    #: set when retrying gave up but the dead-letter sink failed: the row waits to be
    #: dead-lettered again (nothing is lost)
    dead_letter_reason: str | None = None
    #: fire-once key (a timer tick: trigger and scheduled time): ``enqueue`` inserts the row
    #: only if no row with this key was ever inserted (kept two days), in the same transaction
    dedupe: str | None = None
    #: orjson wrote ``payload`` (:meth:`bridge.events.RawEvent.encode`): read back with
    #: orjson alone, without the check :func:`bridge.events.loads` makes. Known only for a
    #: row accepted by this process; not stored (a row read from the store says False)
    plain: bool = dataclasses.field(default=False, compare=False)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterRow:
    id: str
    function: str
    trigger: str | None
    error_class: str
    created_at: float
    record: str  # the SCF-shaped dead-letter record, JSON text


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetterQuery:
    """A filter over dead letters (the console): every field that is set must match."""

    functions: Sequence[str] | None = None  # only these functions (a token's scope)
    function: str | None = None
    trigger: str | None = None
    error_class: str | None = None
    since: float | None = None  # created_at >= since (unix seconds)
    until: float | None = None  # created_at < until

    def matches(self, r: DeadLetterRow) -> bool:
        return (
            (self.functions is None or r.function in self.functions)
            and (self.function is None or r.function == self.function)
            and (self.trigger is None or r.trigger == self.trigger)
            and (self.error_class is None or r.error_class == self.error_class)
            and (self.since is None or r.created_at >= self.since)
            and (self.until is None or r.created_at < self.until)
        )

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE clause with ``?`` placeholders, and its parameters."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if self.functions is not None:
            where.append(f"function IN ({', '.join('?' * len(self.functions)) or 'NULL'})")
            params.extend(self.functions)
        for col, val in (
            ("function", self.function),
            ("trigger_name", self.trigger),
            ("error_class", self.error_class),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if self.since is not None:
            where.append("created_at >= ?")
            params.append(self.since)
        if self.until is not None:
            where.append("created_at < ?")
            params.append(self.until)
        return " AND ".join(where), params


#: tests play a host whose clock is off by this many seconds (the store's clock, which timers
#: fire by, is then off by as much; a shared store measures the database's instead)
_TEST_OFFSET = float(os.environ.get("EVENT_BRIDGE_TEST_CLOCK_OFFSET_S") or 0)


def lease_owner() -> str:
    """``host:pid:start`` of this process: unique, and checkable for liveness on this host."""
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_alive(owner: str) -> bool | None:
    """Whether the process that holds a lease is alive; None when it is on another host."""
    try:
        host, pid, start = owner.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return _proc_start(int(pid)) == start


class StateStore(abc.ABC):
    """Durable state shared by the daemon's parts (and by replicas, for shared stores)."""

    #: True for a store several daemons share (PostgreSQL): the queue then re-reads its depth
    #: from the store, as other replicas settle the events this one accepted
    shared = False

    def time(self) -> float:
        """The clock timers fire by (unix seconds): the host's here; a shared store's is the
        database's, so replicas on skewed hosts agree."""
        return time.time() + self.clock_offset()

    def clock_offset(self) -> float:
        """:meth:`time` minus ``time.time()``; steady between measurements."""
        return _TEST_OFFSET

    def watch(self, callback: Callable[[], None]) -> None:  # noqa: B027
        """Call ``callback`` (on the loop) when another process may have queued events. The
        default never does (the queue polls)."""

    async def open(self) -> None:  # noqa: B027
        """Create tables if needed. Called once before use."""

    async def close(self) -> None:  # noqa: B027
        """Flush and release; idempotent."""

    # --- timers and plugin state -------------------------------------------------------------

    @abc.abstractmethod
    async def get_last_fire(self, trigger: str) -> datetime | None:
        """The last time (UTC) a timer trigger fired and was accepted, or None."""

    @abc.abstractmethod
    async def set_last_fire(self, trigger: str, when: datetime) -> None:
        """Record that ``trigger`` fired at ``when``; never moves backwards."""

    @abc.abstractmethod
    async def get(self, namespace: str, key: str) -> str | None:
        """A plugin's stored value (sources keep listings, cursors... here)."""

    @abc.abstractmethod
    async def put(self, namespace: str, key: str, value: str | None) -> None:
        """Store (or with None, delete) a plugin's value."""

    # --- the durable async queue -------------------------------------------------------------
    # Stores used only for timers and plugin state (test doubles) may leave these unimplemented.

    async def enqueue(self, items: Sequence[QueueItem]) -> None:
        """Insert accepted events; durable when this returns. An existing id is left as is
        (re-accepting the same event is idempotent)."""
        raise NotImplementedError

    async def enqueue_leased(
        self, items: Sequence[QueueItem], owner: str, lease_until: Mapping[str, float]
    ) -> list[QueueItem]:
        """:meth:`enqueue`, with the rows whose id is in ``lease_until`` leased to ``owner``
        until then in the same transaction (this process runs them without a claim). Returns
        the leased rows that went in (not those skipped as duplicates). A store without it
        leases none: the runner claims them."""
        await self.enqueue(items)
        return []

    async def claim(
        self,
        owner: str,
        now: float,
        limits: Mapping[str, int],
        lease_s: Mapping[str, float],
        complete: Sequence[str] = (),
    ) -> list[QueueItem]:
        """Remove the ``complete`` rows, then lease up to ``limits[function]`` due events per
        function, oldest due first — in one transaction."""
        raise NotImplementedError

    async def complete(self, ids: Iterable[str]) -> None:
        """Remove settled events."""
        raise NotImplementedError

    async def reschedule(self, item: QueueItem) -> None:
        """Store a failed event's new due time and history, and release its lease."""
        raise NotImplementedError

    async def release(self, ids: Iterable[str]) -> None:
        """Give leased events back without changing them (shutdown)."""
        raise NotImplementedError

    async def renew(self, owner: str, until: Mapping[str, float]) -> None:
        """Extend the leases ``owner`` holds: row id → new lease expiry (unix seconds). Rows
        leased by another owner meanwhile (or gone) are left alone."""
        raise NotImplementedError

    async def release_dead_owners(self) -> int:
        """Release leases of processes on this host that no longer exist (after kill -9)."""
        raise NotImplementedError

    async def queue_stats(self) -> dict[str, Any]:
        """``{"depth": {fn: n}, "next_due": unix|None, "oldest": unix|None, "dead_letters": {fn: n}}``."""
        raise NotImplementedError

    async def next_due(self, now: float) -> float | None:
        """The earliest due time among rows not leased (or whose lease expired)."""
        raise NotImplementedError

    # --- local dead letters ------------------------------------------------------------------

    async def dead_letter(self, queue_id: str | None, row: DeadLetterRow) -> None:
        """Store a dead letter and, in the same transaction, remove the queue row."""
        raise NotImplementedError

    async def list_dead_letters(
        self, function: str | None = None, older_than: float | None = None, limit: int | None = None
    ) -> list[DeadLetterRow]:
        raise NotImplementedError

    async def get_dead_letter(self, id: str) -> DeadLetterRow | None:
        raise NotImplementedError

    async def requeue_dead_letter(self, id: str, item: QueueItem) -> bool:
        """Move a dead letter back into the queue atomically; False if it was gone."""
        raise NotImplementedError

    async def delete_dead_letters(self, ids: Iterable[str]) -> int:
        raise NotImplementedError

    # --- source positions (branch srcfix: sources/kafka.py) ----------------------------------

    async def put_position(self, namespace: str, key: str, value: str) -> None:
        """:meth:`put` for a value rewritten on every ack (a Kafka partition's settled
        offset). It must survive the process being killed (``kill -9``), not necessarily a
        power loss, whose worst case is events delivered again. Default: :meth:`put`."""
        await self.put(namespace, key, value)

    # The console's queries. These defaults work on any store that lists dead letters;
    # stores override them with indexed queries (pages must stay fast at 50,000 records).

    async def find_dead_letters(
        self,
        query: DeadLetterQuery,
        *,
        before: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetterRow]:
        """Matching dead letters, newest first; ``before`` = (created_at, id) of the last row
        of the previous page (keyset pagination)."""
        rows = [r for r in await self.list_dead_letters() if query.matches(r)]
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        if before is not None:
            rows = [r for r in rows if (r.created_at, r.id) < before]
        return rows[:limit] if limit is not None else rows

    async def count_dead_letters(self, query: DeadLetterQuery) -> int:
        return len(await self.find_dead_letters(query))

    async def dead_letter_facets(self) -> dict[str, list[str]]:
        """The distinct ``function``, ``trigger`` and ``error_class`` values (filter menus)."""
        rows = await self.list_dead_letters()
        return {
            "function": sorted({r.function for r in rows}),
            "trigger": sorted({r.trigger for r in rows if r.trigger}),
            "error_class": sorted({r.error_class for r in rows}),
        }

    async def requeue_dead_letters(self, items: Sequence[QueueItem]) -> list[str]:
        """Move many dead letters (``item.id`` each) back into the queue; the ids moved."""
        return [i.id for i in items if await self.requeue_dead_letter(i.id, i)]

    async def list_retries(self, limit: int = 500) -> list[QueueItem]:
        """Queued events that failed at least once (pending retries), soonest due first."""
        raise NotImplementedError


_SCHEMA = """
CREATE TABLE IF NOT EXISTS timer_state (
    trigger_name TEXT PRIMARY KEY,
    last_fire TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS async_queue (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    trigger_name TEXT,
    request_source TEXT NOT NULL,
    payload TEXT NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL,
    due_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    function_errors INTEGER NOT NULL DEFAULT 0,
    last_error_class TEXT,
    last_error TEXT,
    last_detail TEXT,
    dead_letter_reason TEXT,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS async_queue_due ON async_queue (function, due_at);
CREATE TABLE IF NOT EXISTS fired (
    key TEXT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS fired_at ON fired (at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    trigger_name TEXT,
    error_class TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_fn ON dead_letters (function, created_at);
CREATE INDEX IF NOT EXISTS dead_letters_created ON dead_letters (created_at, id);
-- the console's filters and menus (covering: no scan of the records themselves)
CREATE INDEX IF NOT EXISTS dead_letters_class ON dead_letters (error_class, created_at);
CREATE INDEX IF NOT EXISTS dead_letters_trigger ON dead_letters (trigger_name, created_at);
"""

_QCOLS = (
    "id, function, payload, request_source, trigger_name, accepted_at, due_at, attempts,"
    " function_errors, last_error_class, last_error, last_detail, dead_letter_reason"
)


def _item(row: Sequence[Any]) -> QueueItem:
    return QueueItem(
        id=row[0],
        function=row[1],
        payload=row[2],
        request_source=row[3],
        trigger=row[4],
        accepted_at=row[5],
        due_at=row[6],
        attempts=row[7],
        function_errors=row[8],
        last_error_class=row[9],
        last_error=row[10],
        last_detail=row[11],
        dead_letter_reason=row[12],
    )


def _dl(row: Sequence[Any]) -> DeadLetterRow:
    return DeadLetterRow(
        id=row[0],
        function=row[1],
        trigger=row[2],
        error_class=row[3],
        created_at=row[4],
        record=row[5],
    )


class SqliteStore(StateStore):
    """SQLite in WAL mode in ``state_dir/bridge.db``; all SQL runs on one dedicated thread,
    writes are group-committed (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "bridge.db"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending: list[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], bool]
        ] = []
        self._sync_full = True
        self._flushing = False
        self._flusher: concurrent.futures.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fires: dict[str, str] = {}  # last fires to write, by trigger (set_last_fire)
        self._fire_write: asyncio.Future[None] | None = None
        #: commits done and writes in them, for benchmarks
        self.commits = 0
        self.writes = 0

    async def open(self) -> None:
        if self._pool is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bridge-store")
        await self._read(self._connect)

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            if self._flusher is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(self._flusher)
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, self._conn.close)
        finally:
            self._conn = None
            pool.shutdown(wait=True)

    # --- plumbing ----------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise RuntimeError("state store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        return self._conn.execute(sql, params).fetchall()

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(conn)`` inside the next group commit; return once it is committed.

        ``durable`` writes (accepts, dead letters, retry schedules) are fsynced
        (``synchronous=FULL``): they survive a power loss. Bookkeeping that is
        safe to lose on a power loss (claims, completions: the worst case is an
        event delivered again, which at-least-once allows) is committed with
        ``synchronous=NORMAL``, which in WAL mode still survives ``kill -9``.
        """
        if self._pool is None:
            raise RuntimeError("state store is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._pending.append((fn, fut, durable))
            start = not self._flushing
            self._flushing = True
        if start:
            self._flusher = self._pool.submit(self._flush)
        return await fut

    def _flush(self) -> None:
        assert self._conn is not None and self._loop is not None
        conn, loop = self._conn, self._loop
        batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], bool]] = []
        try:
            while True:
                with self._lock:
                    batch, self._pending = self._pending, []
                    if not batch:
                        self._flushing = False
                        return
                # one wake-up of the loop per group commit, not one per write
                loop.call_soon_threadsafe(_settle_all, self._commit(conn, batch))
                batch = []
        except BaseException as e:
            # The flusher must never end with _flushing still set: every later write would
            # wait for a flusher that is gone. Fail what it held; the next write starts anew.
            with self._lock:
                rest, self._pending = self._pending, []
                self._flushing = False
            for _, fut, _ in batch + rest:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(_settle, fut, False, e)
            raise

    def _commit(
        self,
        conn: sqlite3.Connection,
        batch: Sequence[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], bool]],
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        """Run one group commit; never raises: a failure fails the futures of its batch."""
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        durable = any(d for _, _, d in batch)
        try:
            if conn.in_transaction:  # a ROLLBACK that failed earlier
                conn.execute("ROLLBACK")
            if durable != self._sync_full:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._sync_full = durable
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut, _ in batch:
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn)
                    if isinstance(value, sqlite3.Cursor):
                        # never hand a cursor to the loop thread: freeing it there would
                        # touch the connection from two threads at once
                        value.close()
                        value = None
                    results.append((fut, True, value))
                    conn.execute("RELEASE w")
                except Exception as e:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    results.append((fut, False, e))
            conn.execute("COMMIT")
            self.commits += 1
            self.writes += len(batch)
        except Exception as e:  # the commit failed: nothing in this batch is durable
            with contextlib.suppress(Exception):  # else retried before the next BEGIN
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            results = [(fut, False, e) for _, fut, _ in batch]
        return results

    # --- timers and plugin state -------------------------------------------------------------

    async def get_last_fire(self, trigger: str) -> datetime | None:
        rows = await self._read(
            self._q, "SELECT last_fire FROM timer_state WHERE trigger_name = ?", (trigger,)
        )
        return datetime.fromisoformat(rows[0][0]) if rows else None

    async def set_last_fire(self, trigger: str, when: datetime) -> None:
        """Coalesced: the fires acked before the write starts go into one statement (a
        thousand every-second timers ack a thousand times a second)."""
        iso = when.astimezone(UTC).isoformat()
        if iso > self._fires.get(trigger, ""):
            self._fires[trigger] = iso
        if self._fire_write is None:
            self._fire_write = asyncio.ensure_future(self._write_fires())
        await asyncio.shield(self._fire_write)

    async def _write_fires(self) -> None:
        fires, self._fires, self._fire_write = list(self._fires.items()), {}, None
        await self._write(
            lambda c: c.executemany(
                "INSERT INTO timer_state (trigger_name, last_fire) VALUES (?, ?) "
                "ON CONFLICT (trigger_name) DO UPDATE SET last_fire = excluded.last_fire "
                "WHERE excluded.last_fire > timer_state.last_fire",
                fires,
            ),
            # the tick itself is already durably queued; losing this on a power loss only
            # means catch-up may fire that tick again (at least once)
            durable=False,
        )

    async def get(self, namespace: str, key: str) -> str | None:
        rows = await self._read(
            self._q, "SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
        )
        return str(rows[0][0]) if rows else None

    async def put(self, namespace: str, key: str, value: str | None) -> None:
        if value is None:
            await self._write(
                lambda c: c.execute(
                    "DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
                )
            )
        else:
            await self._write(
                lambda c: c.execute(
                    "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                    (namespace, key, value),
                )
            )

    # --- queue -------------------------------------------------------------------------------

    @staticmethod
    def _insert_items(
        c: sqlite3.Connection,
        items: Sequence[QueueItem],
        owner: str | None = None,
        lease_until: Mapping[str, float] | None = None,
    ) -> list[QueueItem]:
        """Insert ``items`` (those in ``lease_until`` leased to ``owner``); the leased ones
        that went in."""
        if any(i.dedupe is not None for i in items):
            now = time.time()
            c.execute("DELETE FROM fired WHERE at < ?", (now - 2 * 86400.0,))
            items = [
                i
                for i in items
                if i.dedupe is None
                or c.execute(
                    "INSERT INTO fired (key, at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                    (i.dedupe, now),
                ).rowcount
            ]
        leases = lease_until or {}
        cur = c.executemany(
            f"INSERT INTO async_queue ({_QCOLS}, lease_owner, lease_until) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            [
                (
                    i.id, i.function, i.payload, i.request_source, i.trigger, i.accepted_at, i.due_at,
                    i.attempts, i.function_errors, i.last_error_class, i.last_error, i.last_detail,
                    i.dead_letter_reason, owner if i.id in leases else None, leases.get(i.id),
                )
                for i in items
            ],
        )  # fmt: skip
        leased = [i for i in items if i.id in leases]
        if leased and cur.rowcount != len(items):  # an id was there already: not ours to run
            ours = {
                r[0]
                for r in c.execute(
                    "SELECT id FROM async_queue WHERE lease_owner = ? AND id IN "
                    f"({', '.join('?' * len(leased))})",
                    (owner, *(i.id for i in leased)),
                )
            }
            leased = [i for i in leased if i.id in ours]
        return leased

    async def enqueue(self, items: Sequence[QueueItem]) -> None:
        if items:
            await self._write(lambda c: self._insert_items(c, items))

    async def enqueue_leased(
        self, items: Sequence[QueueItem], owner: str, lease_until: Mapping[str, float]
    ) -> list[QueueItem]:
        if not items:
            return []
        return await self._write(lambda c: self._insert_items(c, items, owner, lease_until))

    async def claim(
        self,
        owner: str,
        now: float,
        limits: Mapping[str, int],
        lease_s: Mapping[str, float],
        complete: Sequence[str] = (),
    ) -> list[QueueItem]:
        def run(c: sqlite3.Connection) -> list[QueueItem]:
            if complete:
                c.executemany("DELETE FROM async_queue WHERE id = ?", [(i,) for i in complete])
            out: list[QueueItem] = []
            for fn, n in limits.items():
                if n <= 0:
                    continue
                rows = c.execute(
                    f"SELECT {_QCOLS} FROM async_queue WHERE function = ? AND due_at <= ? "
                    "AND (lease_until IS NULL OR lease_until < ?) ORDER BY due_at LIMIT ?",
                    (fn, now, now, n),
                ).fetchall()
                if not rows:
                    continue
                c.executemany(
                    "UPDATE async_queue SET lease_owner = ?, lease_until = ? WHERE id = ?",
                    [(owner, now + lease_s.get(fn, 60.0), r[0]) for r in rows],
                )
                out.extend(_item(r) for r in rows)
            return out

        return await self._write(run, durable=False)

    async def complete(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            await self._write(
                lambda c: c.executemany(
                    "DELETE FROM async_queue WHERE id = ?", [(i,) for i in ids]
                ),
                durable=False,
            )

    async def reschedule(self, item: QueueItem) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE async_queue SET due_at = ?, attempts = ?, function_errors = ?, "
                "last_error_class = ?, last_error = ?, last_detail = ?, dead_letter_reason = ?, "
                "lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (
                    item.due_at,
                    item.attempts,
                    item.function_errors,
                    item.last_error_class,
                    item.last_error,
                    item.last_detail,
                    item.dead_letter_reason,
                    item.id,
                ),
            )
        )

    async def release(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            await self._write(
                lambda c: c.executemany(
                    "UPDATE async_queue SET lease_owner = NULL, lease_until = NULL WHERE id = ?",
                    [(i,) for i in ids],
                )
            )

    async def renew(self, owner: str, until: Mapping[str, float]) -> None:
        if until:
            await self._write(
                lambda c: c.executemany(
                    "UPDATE async_queue SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                    [(t, i, owner) for i, t in until.items()],
                ),
                durable=False,
            )

    async def release_dead_owners(self) -> int:
        owners = await self._read(
            self._q, "SELECT DISTINCT lease_owner FROM async_queue WHERE lease_owner IS NOT NULL"
        )
        dead = [o for (o,) in owners if owner_alive(o) is False]
        if not dead:
            return 0

        def run(c: sqlite3.Connection) -> int:
            n = 0
            for o in dead:
                n += c.execute(
                    "UPDATE async_queue SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                    (o,),
                ).rowcount
            return n

        return await self._write(run)

    async def queue_stats(self) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            depth = dict(self._q("SELECT function, COUNT(*) FROM async_queue GROUP BY function"))
            nxt, oldest = self._q("SELECT MIN(due_at), MIN(accepted_at) FROM async_queue")[0]
            dls = dict(self._q("SELECT function, COUNT(*) FROM dead_letters GROUP BY function"))
            return {"depth": depth, "next_due": nxt, "oldest": oldest, "dead_letters": dls}

        return await self._read(run)

    async def next_due(self, now: float) -> float | None:
        """The earliest due time among unleased (or expired) rows."""
        rows = await self._read(
            self._q,
            "SELECT MIN(due_at) FROM async_queue WHERE lease_until IS NULL OR lease_until < ?",
            (now,),
        )
        due = rows[0][0]
        return None if due is None else float(due)

    # --- dead letters ------------------------------------------------------------------------

    async def dead_letter(self, queue_id: str | None, row: DeadLetterRow) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO dead_letters (id, function, trigger_name, error_class, created_at, record) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET record = excluded.record, "
                "created_at = excluded.created_at, error_class = excluded.error_class",
                (row.id, row.function, row.trigger, row.error_class, row.created_at, row.record),
            )
            if queue_id is not None:
                c.execute("DELETE FROM async_queue WHERE id = ?", (queue_id,))

        await self._write(run)

    async def list_dead_letters(
        self, function: str | None = None, older_than: float | None = None, limit: int | None = None
    ) -> list[DeadLetterRow]:
        sql = "SELECT id, function, trigger_name, error_class, created_at, record FROM dead_letters WHERE 1 = 1"
        params: list[Any] = []
        if function is not None:
            sql += " AND function = ?"
            params.append(function)
        if older_than is not None:
            sql += " AND created_at < ?"
            params.append(older_than)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_dl(r) for r in await self._read(self._q, sql, params)]

    async def get_dead_letter(self, id: str) -> DeadLetterRow | None:
        rows = await self._read(
            self._q,
            "SELECT id, function, trigger_name, error_class, created_at, record FROM dead_letters WHERE id = ?",
            (id,),
        )
        return _dl(rows[0]) if rows else None

    async def requeue_dead_letter(self, id: str, item: QueueItem) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            if c.execute("DELETE FROM dead_letters WHERE id = ?", (id,)).rowcount == 0:
                return False
            self._insert_items(c, [item])
            return True

        return await self._write(run)

    async def delete_dead_letters(self, ids: Iterable[str]) -> int:
        ids = list(ids)

        def run(c: sqlite3.Connection) -> int:
            return sum(
                c.execute("DELETE FROM dead_letters WHERE id = ?", (i,)).rowcount for i in ids
            )

        return await self._write(run) if ids else 0

    # --- source positions (branch srcfix: sources/kafka.py) ----------------------------------

    async def put_position(self, namespace: str, key: str, value: str) -> None:
        # synchronous=NORMAL: in WAL mode it survives kill -9, without an fsync per ack
        await self._write(
            lambda c: c.execute(
                "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                (namespace, key, value),
            ),
            durable=False,
        )

    _DLCOLS = "id, function, trigger_name, error_class, created_at, record"

    async def find_dead_letters(
        self,
        query: DeadLetterQuery,
        *,
        before: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetterRow]:
        where, params = query.sql()
        if before is not None:
            where += " AND (created_at < ? OR (created_at = ? AND id < ?))"
            params += [before[0], before[0], before[1]]
        sql = f"SELECT {self._DLCOLS} FROM dead_letters WHERE {where} ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_dl(r) for r in await self._read(self._q, sql, params)]

    async def count_dead_letters(self, query: DeadLetterQuery) -> int:
        where, params = query.sql()
        rows = await self._read(self._q, f"SELECT COUNT(*) FROM dead_letters WHERE {where}", params)
        return int(rows[0][0])

    async def dead_letter_facets(self) -> dict[str, list[str]]:
        def run() -> dict[str, list[str]]:
            out = {}
            for key, col in (
                ("function", "function"),
                ("trigger", "trigger_name"),
                ("error_class", "error_class"),
            ):
                rows = self._q(f"SELECT DISTINCT {col} FROM dead_letters WHERE {col} IS NOT NULL")
                out[key] = sorted(r[0] for r in rows)
            return out

        return await self._read(run)

    async def requeue_dead_letters(self, items: Sequence[QueueItem]) -> list[str]:
        def run(c: sqlite3.Connection) -> list[str]:
            moved = [
                i
                for i in items
                if c.execute("DELETE FROM dead_letters WHERE id = ?", (i.id,)).rowcount
            ]
            self._insert_items(c, moved)
            return [i.id for i in moved]

        return await self._write(run) if items else []

    async def list_retries(self, limit: int = 500) -> list[QueueItem]:
        rows = await self._read(
            self._q,
            f"SELECT {_QCOLS} FROM async_queue WHERE attempts > 0 ORDER BY due_at LIMIT ?",
            (limit,),
        )
        return [_item(r) for r in rows]


def _settle_all(results: Sequence[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        _settle(fut, ok, value)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
