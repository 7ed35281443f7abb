"""The PostgreSQL state store: several replicas share one queue, one set of dead letters and
one set of timer ticks (``[daemon] database_url``; docs/scale-out.md).

:class:`PgStore` implements :class:`~bridge.store.StateStore` with psycopg 3 (async) and a
psycopg-pool connection pool.

Lifecycle: ``open()`` connects, applies the schema migrations under an advisory lock (or
refuses a schema newer than this code knows), and — for a replica, not for a CLI client —
starts a heartbeat task and one ``LISTEN`` connection; ``close()`` stops both, deletes the
replica's heartbeat row and closes the pool (idempotent).

Rules:

- **Claims** take due rows per function with ``FOR UPDATE SKIP LOCKED`` in one transaction,
  as many as the runner asks for (a batch), and remove the completed rows in the same
  transaction. A lease is (owner, expiry); the runner renews it while the row waits or runs.
- **Fire once**: an item with a ``dedupe`` key (a timer tick: trigger + scheduled time) is
  inserted only if the key is new, in the same transaction as its ``fired`` row: the first
  replica to insert wins, the others' inserts are no-ops. Keys are kept for
  ``FIRED_KEEP_S``.
- **Replicas**: each writes a heartbeat row every ``takeover / 5``; every replica releases the
  leases of replicas whose heartbeat is older than ``0.6 * takeover`` (database clock), so a
  dead replica's events run elsewhere within ``takeover`` (default 15 s).
- **Wake-ups**: an insert sends ``NOTIFY``; :meth:`watch` callbacks run on each notification
  and after the listening connection reconnects (notifications may have been missed). The
  listener checks its connection every ``LISTEN_CHECK_S``; the queue's poll stays the backstop.
- **Clock**: :meth:`time` is the database clock (measured at each heartbeat), which timers
  fire by, so replicas with skewed host clocks fire a tick at the same instant.
- **Faults**: a connection broken under an operation (restart, ``pg_terminate_backend``, a
  network cut) is retried on a new connection; while the database is unreachable operations
  raise ``psycopg.OperationalError`` after ``CONNECT_TIMEOUT_S`` (accepts are then nacked,
  the queue runner backs off) and everything resumes when it answers again.

Not guaranteed: a replica that stalls longer than ``0.6 * takeover`` (not dead) loses its
leases and its running events may run a second time (at-least-once, as everywhere); queue
due times and lease expiries use each host's clock (skew shifts retries by the skew).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from bridge.errors import BridgeError
from bridge.pgschema import MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, describe
from bridge.store import (
    _QCOLS,
    DeadLetterQuery,
    DeadLetterRow,
    QueueItem,
    StateStore,
    _dl,
    _item,
    lease_owner,
)

log = logging.getLogger("bridge.pgstore")
T = TypeVar("T")

CHANNEL = "event_bridge"
#: the PostgreSQL types of _QCOLS, in order
_QTYPES = (
    "text", "text", "text", "text", "text", "float8", "float8", "int4", "int4",
    "text", "text", "text", "text",
)  # fmt: skip
#: pg_advisory_lock key of the migrations ("evbr" in ASCII)
MIGRATION_LOCK = 0x65766272
CONNECT_TIMEOUT_S = 10.0
LISTEN_CHECK_S = 5.0
OP_TIMEOUT_S = 10.0
#: for claims, completions and renewals, as SQLite's synchronous=NORMAL: a crash of the
#: database server may forget the last ones (a lease expires, a completed event runs again:
#: at least once), never an accepted event
_NO_FLUSH = "SET LOCAL synchronous_commit = off"
#: claim by walking the (function, due_at) index from its oldest entry: the planner, whose
#: statistics lag behind a queue's churn, otherwise sorts every due row for each claim
_IN_ORDER = (
    "SET LOCAL enable_bitmapscan = off",
    "SET LOCAL enable_seqscan = off",
    "SET LOCAL enable_sort = off",
)
#: accepts written in one transaction at most
MAX_BATCH = 500
FIRED_KEEP_S = 2 * 86400.0
#: a replica whose heartbeat is this old is removed from the table (status shows it until then)
REPLICA_FORGET_S = 3600.0

_EPOCH = "extract(epoch from clock_timestamp())"


def _broken(e: BaseException) -> bool:
    """A connection-level failure worth one more try on a fresh connection."""
    return isinstance(e, psycopg.OperationalError) and not isinstance(
        e, psycopg.errors.QueryCanceled
    )


class PgStore(StateStore):
    """The shared store on PostgreSQL (see the module docstring). ``replica`` names this
    process in the replicas table; None for a client (the CLI) that only reads and writes."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        replica: str | None = None,
        takeover_s: float = 15.0,
        migrate: bool | None = True,
        max_connections: int = 8,
    ) -> None:
        self.url = url
        self.replica = replica
        self.takeover_s = takeover_s
        self.migrate = migrate
        self.owner = lease_owner()
        self._max = max_connections
        self._pool: AsyncConnectionPool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Callable[[], None]] = []
        self._offset = 0.0  # database clock - host clock
        self._closed = False
        self.listening = False
        self._pending: list[tuple[Sequence[QueueItem], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._fires: dict[str, datetime] = {}
        self._fire_waiters: list[asyncio.Future[None]] = []
        self._fire_writer: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _conninfo(self) -> str:
        return self.url

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._closed = False
        pool = AsyncConnectionPool(
            self._conninfo(),
            min_size=1,
            max_size=self._max,
            open=False,
            timeout=CONNECT_TIMEOUT_S,
            kwargs={"connect_timeout": int(CONNECT_TIMEOUT_S), **_KEEPALIVE},
            name="event-bridge",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except Exception as e:
            await pool.close()
            raise BridgeError(
                f"cannot connect to the state database {describe(self.url)}: {_why(e)}"
            ) from None
        self._pool = pool
        try:
            if self.migrate is not None:  # None: `db migrate`, which reports what it does
                await self._schema(apply=self.migrate)
            await self._measure_clock()
            if self.replica is not None:
                await self._heartbeat()
                self._tasks = [
                    asyncio.create_task(self._heartbeats(), name="pgstore:heartbeat"),
                    asyncio.create_task(self._listen(), name="pgstore:listen"),
                ]
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self.replica is not None:
            with contextlib.suppress(Exception):
                async with pool.connection(timeout=2.0) as c:
                    await c.execute("DELETE FROM replicas WHERE owner = %s", (self.owner,))
        await pool.close()

    async def _schema(self, *, apply: bool) -> int:
        """Bring the schema to SCHEMA_VERSION, or refuse a newer one: one transaction under a
        transaction-level advisory lock, so replicas starting together migrate once and a
        failed migration leaves nothing behind (PostgreSQL's DDL is transactional)."""
        async with self._conn() as c:
            await c.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur = await c.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            row = await cur.fetchone()
            have = int(row[0]) if row else 0
            if have > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the state database {describe(self.url)} has schema version {have}, "
                    f"newer than this event-bridge knows ({SCHEMA_VERSION}): a newer release "
                    "migrated it; upgrade this replica to that release"
                )
            if have < SCHEMA_VERSION and not apply:
                raise BridgeError(
                    f"the state database {describe(self.url)} has schema version {have}; "
                    f"this event-bridge needs {SCHEMA_VERSION}: run `event-bridge db migrate`"
                )
            for version, sql in MIGRATIONS:
                if version > have:
                    await c.execute(sql)
                    await c.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                    log.info("state database: applying migration %d", version)
            return max(have, SCHEMA_VERSION)

    async def schema_version(self) -> int:
        async def run(c: psycopg.AsyncConnection[Any]) -> int:
            cur = await c.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version"
                if await _has_table(c, "schema_version")
                else "SELECT 0"
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(run)

    async def migrate_now(self) -> tuple[int, int]:
        """Apply pending migrations (``event-bridge db migrate``): (version before, after)."""
        before = await self.schema_version()
        return before, await self._schema(apply=True)

    @contextlib.asynccontextmanager
    async def _conn(self) -> Any:
        if self._pool is None:
            raise BridgeError("the state store is not open")
        async with self._pool.connection() as c:
            yield c

    async def _run(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction; a broken connection gets one more try on another
        (every operation here is idempotent or harmless to repeat)."""
        for attempt in range(3):
            try:
                # a connection into a network cut hangs (TCP keepalives cannot tell when
                # something in the path still answers them): bound every operation
                async with asyncio.timeout(OP_TIMEOUT_S):
                    async with self._conn() as c:
                        return await fn(c)
            except TimeoutError:
                raise psycopg.OperationalError(
                    f"the state database did not answer within {OP_TIMEOUT_S:.0f}s"
                ) from None
            except Exception as e:
                if attempt == 2 or not _broken(e) or self._pool is None:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # --- replicas, clock, notifications --------------------------------------------------------

    def clock_offset(self) -> float:
        return self._offset

    def watch(self, callback: Callable[[], None]) -> None:
        self._watchers.append(callback)

    def _wake(self) -> None:
        for cb in self._watchers:
            with contextlib.suppress(Exception):
                cb()

    async def _measure_clock(self) -> None:
        async def run(c: psycopg.AsyncConnection[Any]) -> float:
            t0 = time.time()
            cur = await c.execute(f"SELECT {_EPOCH}")
            row = await cur.fetchone()
            t1 = time.time()
            assert row is not None
            return float(row[0]) - (t0 + t1) / 2

        self._offset = await self._run(run)

    async def _heartbeat(self) -> int:
        """Write this replica's heartbeat; release the leases of dead replicas (the count)."""
        stale = 0.6 * self.takeover_s

        async def run(c: psycopg.AsyncConnection[Any]) -> int:
            await c.execute(
                "INSERT INTO replicas (owner, name, host, pid, started_at, heartbeat_at) "
                f"VALUES (%s, %s, %s, %s, {_EPOCH}, {_EPOCH}) ON CONFLICT (owner) DO UPDATE "
                "SET heartbeat_at = excluded.heartbeat_at, name = excluded.name",
                (self.owner, self.replica, socket.gethostname(), os.getpid()),
            )
            cur = await c.execute(
                "UPDATE async_queue SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner IN (SELECT owner FROM replicas "
                f"WHERE heartbeat_at < {_EPOCH} - %s AND owner <> %s)",
                (stale, self.owner),
            )
            released = cur.rowcount
            await c.execute(
                f"DELETE FROM replicas WHERE heartbeat_at < {_EPOCH} - %s", (REPLICA_FORGET_S,)
            )
            if released:
                await c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            return released

        released = await self._run(run)
        if released:
            log.warning("took over %d events leased by a replica that stopped answering", released)
        return released

    async def _heartbeats(self) -> None:
        every = self.takeover_s / 5
        rounds = 0
        while True:
            await asyncio.sleep(every)
            rounds += 1
            try:
                await self._heartbeat()
                await self._measure_clock()
                if rounds % max(1, int(60 / every)) == 0:
                    await self._run(
                        lambda c: c.execute(
                            f"DELETE FROM fired WHERE at < {_EPOCH} - %s", (FIRED_KEEP_S,)
                        )
                    )
            except Exception as e:
                log.warning("state database: heartbeat failed (%s); retrying", _why(e))

    async def _listen(self) -> None:
        """One LISTEN connection: wake the watchers on each notification; check the connection
        every LISTEN_CHECK_S; reconnect with backoff (and wake, in case one was missed)."""
        backoff = 0.5
        first = True
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo(),
                    autocommit=True,
                    connect_timeout=int(CONNECT_TIMEOUT_S),
                    **_KEEPALIVE,
                )
            except Exception as e:
                self.listening = False
                log.warning("state database: LISTEN connection failed (%s)", _why(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
                self.listening = True
                backoff = 0.5
                if not first:
                    self._wake()
                first = False
                while True:
                    async for _ in conn.notifies(timeout=LISTEN_CHECK_S):
                        self._wake()
                    async with asyncio.timeout(LISTEN_CHECK_S):
                        await conn.execute("SELECT 1")  # still there?
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.listening = False
                log.warning("state database: LISTEN connection lost (%s); reconnecting", _why(e))
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def replicas(self) -> list[dict[str, Any]]:
        """The replicas sharing this database: name, host, last heartbeat, leases held."""

        async def run(c: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
            cur = await c.execute(
                f"SELECT r.name, r.host, r.pid, r.heartbeat_at, {_EPOCH} - r.heartbeat_at, "
                "(SELECT COUNT(*) FROM async_queue q WHERE q.lease_owner = r.owner), r.owner "
                "FROM replicas r ORDER BY r.name, r.owner"
            )
            return [
                {
                    "name": r[0],
                    "host": r[1],
                    "pid": r[2],
                    "last_heartbeat": datetime.fromtimestamp(r[3], UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                    "heartbeat_age_s": round(float(r[4]), 1),
                    "alive": float(r[4]) < 0.6 * self.takeover_s,
                    "leases": int(r[5]),
                    "self": r[6] == self.owner,
                }
                for r in await cur.fetchall()
            ]

        return await self._run(run)

    # --- timers and plugin state -------------------------------------------------------------

    async def get_last_fire(self, trigger: str) -> datetime | None:
        async def run(c: psycopg.AsyncConnection[Any]) -> datetime | None:
            cur = await c.execute(
                "SELECT last_fire FROM timer_state WHERE trigger_name = %s", (trigger,)
            )
            row = await cur.fetchone()
            return None if row is None else row[0].astimezone(UTC)

        return await self._run(run)

    async def set_last_fire(self, trigger: str, when: datetime) -> None:
        """Coalesced: the fires of every timer acked while a write is in flight go into the
        next transaction (a thousand every-second timers ack a thousand times a second)."""
        when = when.astimezone(UTC)
        if trigger not in self._fires or when > self._fires[trigger]:
            self._fires[trigger] = when
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fire_waiters.append(fut)
        if self._fire_writer is None or self._fire_writer.done():
            self._fire_writer = asyncio.create_task(self._write_fires(), name="pgstore:fires")
        await fut

    async def _write_fires(self) -> None:
        while self._fires:
            fires, self._fires = self._fires, {}
            waiters, self._fire_waiters = self._fire_waiters, []

            async def run(
                c: psycopg.AsyncConnection[Any], fires: dict[str, datetime] = fires
            ) -> None:
                await c.execute(_NO_FLUSH)  # the tick itself is durably queued already
                async with c.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO timer_state (trigger_name, last_fire) VALUES (%s, %s) "
                        "ON CONFLICT (trigger_name) DO UPDATE SET last_fire = "
                        "GREATEST(timer_state.last_fire, excluded.last_fire)",
                        sorted(fires.items()),
                    )

            try:
                await self._run(run)
            except Exception as e:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)

    async def get(self, namespace: str, key: str) -> str | None:
        async def run(c: psycopg.AsyncConnection[Any]) -> str | None:
            cur = await c.execute(
                "SELECT value FROM kv WHERE namespace = %s AND key = %s", (namespace, key)
            )
            row = await cur.fetchone()
            return None if row is None else str(row[0])

        return await self._run(run)

    async def put(self, namespace: str, key: str, value: str | None) -> None:
        if value is None:
            await self._run(
                lambda c: c.execute(
                    "DELETE FROM kv WHERE namespace = %s AND key = %s", (namespace, key)
                )
            )
        else:
            await self._run(
                lambda c: c.execute(
                    "INSERT INTO kv (namespace, key, value) VALUES (%s, %s, %s) "
                    "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                    (namespace, key, value),
                )
            )

    # --- queue -------------------------------------------------------------------------------

    @staticmethod
    def _params(i: QueueItem) -> tuple[Any, ...]:
        return (
            i.id, i.function, i.payload, i.request_source, i.trigger, i.accepted_at, i.due_at,
            i.attempts, i.function_errors, i.last_error_class, i.last_error, i.last_detail,
            i.dead_letter_reason,
        )  # fmt: skip

    async def _insert(self, c: psycopg.AsyncConnection[Any], items: Sequence[QueueItem]) -> None:
        """One statement for the batch (column arrays); NOTIFY only when a row went in (a
        replica that lost every tick of the batch to another wakes nobody)."""
        seen: set[str] = set()
        batch = []
        for i in items:  # one tick twice in a batch (a redelivery) must not insert twice
            if i.dedupe is None or i.dedupe not in seen:
                batch.append(i)
                if i.dedupe is not None:
                    seen.add(i.dedupe)
        cols = list(zip(*(self._params(i) for i in batch), strict=True))
        arrays = ", ".join(f"%s::{t}[]" for t in _QTYPES)
        rows = f"unnest({arrays}, %s::text[]) AS v({_QCOLS}, dedupe)"
        keys = [i.dedupe for i in batch if i.dedupe is not None]
        # the first replica to insert a tick's key wins; the others insert nothing
        cur = await c.execute(
            f"WITH k AS (INSERT INTO fired (key, at) SELECT unnest(%s::text[]), {_EPOCH} "
            "ON CONFLICT (key) DO NOTHING RETURNING key) "
            f"INSERT INTO async_queue ({_QCOLS}) SELECT {_QCOLS} FROM {rows} "
            "WHERE v.dedupe IS NULL OR v.dedupe IN (SELECT key FROM k) "
            "ON CONFLICT (id) DO NOTHING",
            (keys, *[list(col) for col in cols], [i.dedupe for i in batch]),
        )
        if cur.rowcount:
            await c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

    async def enqueue(self, items: Sequence[QueueItem]) -> None:
        """Group commit: accepts that arrive while a commit is in flight go into the next
        transaction together (one round trip and one WAL flush for the lot)."""
        if not items:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((items, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="pgstore:enqueue")
        await fut

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            items = [i for its, _ in batch for i in its]
            try:
                await self._run(functools.partial(self._insert, items=items))
            except Exception as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def claim(
        self,
        owner: str,
        now: float,
        limits: Mapping[str, int],
        lease_s: Mapping[str, float],
        complete: Sequence[str] = (),
    ) -> list[QueueItem]:
        async def run(c: psycopg.AsyncConnection[Any]) -> list[QueueItem]:
            # one round trip for the lot (pipeline mode): settings, completions, claims
            cursors = []
            async with c.pipeline():
                await c.execute(_NO_FLUSH)
                for setting in _IN_ORDER:
                    await c.execute(setting)
                if complete:
                    await c.execute("DELETE FROM async_queue WHERE id = ANY(%s)", (list(complete),))
                for fn, n in limits.items():
                    if n > 0:
                        cursors.append(
                            await c.execute(
                                "UPDATE async_queue SET lease_owner = %s, lease_until = %s "
                                "WHERE id IN (SELECT id FROM async_queue WHERE function = %s "
                                "AND due_at <= %s AND (lease_until IS NULL OR lease_until < %s) "
                                f"ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {_QCOLS}",
                                (owner, now + lease_s.get(fn, 60.0), fn, now, now, n),
                            )
                        )
            out: list[QueueItem] = []
            for cur in cursors:
                rows = await cur.fetchall()
                out.extend(_item(r) for r in sorted(rows, key=lambda r: r[6]))
            return out

        return await self._run(run)

    async def complete(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:

            async def run(c: psycopg.AsyncConnection[Any]) -> None:
                await c.execute(_NO_FLUSH)
                await c.execute("DELETE FROM async_queue WHERE id = ANY(%s)", (ids,))

            await self._run(run)

    async def reschedule(self, item: QueueItem) -> None:
        await self._run(
            lambda c: c.execute(
                "UPDATE async_queue SET due_at = %s, attempts = %s, function_errors = %s, "
                "last_error_class = %s, last_error = %s, last_detail = %s, "
                "dead_letter_reason = %s, lease_owner = NULL, lease_until = NULL WHERE id = %s",
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

            async def run(c: psycopg.AsyncConnection[Any]) -> None:
                await c.execute(
                    "UPDATE async_queue SET lease_owner = NULL, lease_until = NULL "
                    "WHERE id = ANY(%s)",
                    (ids,),
                )
                await c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

            await self._run(run)

    async def renew(self, owner: str, until: Mapping[str, float]) -> None:
        if until:
            await self._run(
                lambda c: c.execute(
                    "UPDATE async_queue q SET lease_until = u.t FROM "
                    "unnest(%s::text[], %s::float8[]) AS u(id, t) "
                    "WHERE q.id = u.id AND q.lease_owner = %s",
                    (list(until), list(until.values()), owner),
                )
            )

    async def release_dead_owners(self) -> int:
        """Leases of replicas whose heartbeat stopped, and of dead processes on this host."""
        from bridge.store import owner_alive

        async def owners(c: psycopg.AsyncConnection[Any]) -> list[str]:
            cur = await c.execute(
                "SELECT DISTINCT lease_owner FROM async_queue WHERE lease_owner IS NOT NULL"
            )
            return [r[0] for r in await cur.fetchall()]

        dead = [o for o in await self._run(owners) if owner_alive(o) is False]
        n = 0
        if dead:

            async def run(c: psycopg.AsyncConnection[Any]) -> int:
                cur = await c.execute(
                    "UPDATE async_queue SET lease_owner = NULL, lease_until = NULL "
                    "WHERE lease_owner = ANY(%s)",
                    (dead,),
                )
                return cur.rowcount

            n = await self._run(run)
        if self.replica is not None:
            n += await self._heartbeat()
        return n

    async def queue_stats(self) -> dict[str, Any]:
        async def run(c: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
            cur = await c.execute("SELECT function, COUNT(*) FROM async_queue GROUP BY function")
            depth = {r[0]: int(r[1]) for r in await cur.fetchall()}
            cur = await c.execute("SELECT MIN(due_at), MIN(accepted_at) FROM async_queue")
            row = await cur.fetchone()
            nxt, oldest = row if row else (None, None)
            cur = await c.execute("SELECT function, COUNT(*) FROM dead_letters GROUP BY function")
            dls = {r[0]: int(r[1]) for r in await cur.fetchall()}
            return {"depth": depth, "next_due": nxt, "oldest": oldest, "dead_letters": dls}

        return await self._run(run)

    async def next_due(self, now: float) -> float | None:
        async def run(c: psycopg.AsyncConnection[Any]) -> float | None:
            cur = await c.execute(
                "SELECT MIN(due_at) FROM async_queue WHERE lease_until IS NULL OR lease_until < %s",
                (now,),
            )
            row = await cur.fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._run(run)

    # --- dead letters ------------------------------------------------------------------------

    _DLCOLS = "id, function, trigger_name, error_class, created_at, record"

    async def dead_letter(self, queue_id: str | None, row: DeadLetterRow) -> None:
        async def run(c: psycopg.AsyncConnection[Any]) -> None:
            await c.execute(
                f"INSERT INTO dead_letters ({self._DLCOLS}) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET record = excluded.record, "
                "created_at = excluded.created_at, error_class = excluded.error_class",
                (row.id, row.function, row.trigger, row.error_class, row.created_at, row.record),
            )
            if queue_id is not None:
                await c.execute("DELETE FROM async_queue WHERE id = %s", (queue_id,))

        await self._run(run)

    async def _dls(self, sql: str, params: Sequence[Any]) -> list[DeadLetterRow]:
        async def run(c: psycopg.AsyncConnection[Any]) -> list[DeadLetterRow]:
            cur = await c.execute(sql, params)
            return [_dl(r) for r in await cur.fetchall()]

        return await self._run(run)

    async def list_dead_letters(
        self, function: str | None = None, older_than: float | None = None, limit: int | None = None
    ) -> list[DeadLetterRow]:
        sql = f"SELECT {self._DLCOLS} FROM dead_letters WHERE 1 = 1"
        params: list[Any] = []
        if function is not None:
            sql += " AND function = %s"
            params.append(function)
        if older_than is not None:
            sql += " AND created_at < %s"
            params.append(older_than)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return await self._dls(sql, params)

    async def get_dead_letter(self, id: str) -> DeadLetterRow | None:
        rows = await self._dls(f"SELECT {self._DLCOLS} FROM dead_letters WHERE id = %s", (id,))
        return rows[0] if rows else None

    async def requeue_dead_letter(self, id: str, item: QueueItem) -> bool:
        return bool(await self.requeue_dead_letters([item])) if item.id == id else False

    async def requeue_dead_letters(self, items: Sequence[QueueItem]) -> list[str]:
        if not items:
            return []

        async def run(c: psycopg.AsyncConnection[Any]) -> list[str]:
            cur = await c.execute(
                "DELETE FROM dead_letters WHERE id = ANY(%s) RETURNING id", ([i.id for i in items],)
            )
            gone = {r[0] for r in await cur.fetchall()}
            moved = [i for i in items if i.id in gone]
            if moved:
                await self._insert(c, moved)
            return [i.id for i in moved]

        return await self._run(run)

    async def delete_dead_letters(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0

        async def run(c: psycopg.AsyncConnection[Any]) -> int:
            cur = await c.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", (ids,))
            return cur.rowcount

        return await self._run(run)

    async def find_dead_letters(
        self,
        query: DeadLetterQuery,
        *,
        before: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetterRow]:
        where, params = query.sql()
        where = where.replace("?", "%s")
        if before is not None:
            where += " AND (created_at < %s OR (created_at = %s AND id < %s))"
            params += [before[0], before[0], before[1]]
        sql = f"SELECT {self._DLCOLS} FROM dead_letters WHERE {where} ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return await self._dls(sql, params)

    async def count_dead_letters(self, query: DeadLetterQuery) -> int:
        where, params = query.sql()

        async def run(c: psycopg.AsyncConnection[Any]) -> int:
            cur = await c.execute(
                f"SELECT COUNT(*) FROM dead_letters WHERE {where.replace('?', '%s')}",
                params,
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(run)

    async def dead_letter_facets(self) -> dict[str, list[str]]:
        async def run(c: psycopg.AsyncConnection[Any]) -> dict[str, list[str]]:
            out = {}
            for key, col in (
                ("function", "function"),
                ("trigger", "trigger_name"),
                ("error_class", "error_class"),
            ):
                cur = await c.execute(
                    f"SELECT DISTINCT {col} FROM dead_letters WHERE {col} IS NOT NULL"
                )
                out[key] = sorted(r[0] for r in await cur.fetchall())
            return out

        return await self._run(run)

    async def list_retries(self, limit: int = 500) -> list[QueueItem]:
        async def run(c: psycopg.AsyncConnection[Any]) -> list[QueueItem]:
            cur = await c.execute(
                f"SELECT {_QCOLS} FROM async_queue WHERE attempts > 0 ORDER BY due_at LIMIT %s",
                (limit,),
            )
            return [_item(r) for r in await cur.fetchall()]

        return await self._run(run)


#: libpq TCP keepalives: a dead peer (a network cut) is noticed in about 15 s, not hours
_KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,
}


async def _has_table(c: psycopg.AsyncConnection[Any], name: str) -> bool:
    cur = await c.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    row = await cur.fetchone()
    return bool(row and row[0])


def _why(e: BaseException) -> str:
    """One line about a driver error, never the connection string."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
