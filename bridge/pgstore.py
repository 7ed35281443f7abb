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
- **Clock**: :meth:`time` is the database clock (measured at open and at each heartbeat).
  Timers fire by it, so replicas with skewed host clocks fire a tick at the same instant, and
  the queue computes accept and due times and lease expiries by it (bridge/queue.py asks
  ``store.time()``), so a skewed host neither holds back nor hurries another's events.
- **Faults**: a connection broken under an operation (restart, ``pg_terminate_backend``, a
  network cut) is retried on a new connection; while the database is unreachable operations
  raise ``psycopg.OperationalError`` after ``CONNECT_TIMEOUT_S`` (accepts are then nacked,
  the queue runner backs off) and everything resumes when it answers again.

Not guaranteed: a replica that stalls longer than ``0.6 * takeover`` (not dead) loses its
leases and its running events may run a second time (at-least-once, as everywhere).

Layout: the pool and :meth:`_run` in bridge/pgconn.py, the queue and dead letters in
bridge/pgqueue.py, the schema in bridge/pgschema.py; lifecycle, replicas, clock and timer
state here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from bridge.errors import BridgeError
from bridge.pgconn import (
    CHANNEL,
    CONNECT_TIMEOUT_S,
    EPOCH,
    KEEPALIVE,
    NO_FLUSH,
    has_table,
    why,
)
from bridge.pgqueue import PgQueue
from bridge.pgschema import MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, describe
from bridge.store import lease_owner

log = logging.getLogger("bridge.pgstore")
#: pg_advisory_lock key of the migrations ("evbr" in ASCII)
MIGRATION_LOCK = 0x65766272
LISTEN_CHECK_S = 5.0
FIRED_KEEP_S = 2 * 86400.0
#: a replica whose heartbeat is this old is removed from the table (status shows it until then)
REPLICA_FORGET_S = 3600.0


class PgStore(PgQueue):
    """The shared store on PostgreSQL (see the module docstring). ``replica`` names this
    process in the replicas table; None for a client (the CLI) that only reads and writes.
    The queue and dead letters are in bridge/pgqueue.py, the pool in bridge/pgconn.py."""

    def __init__(
        self,
        url: str,
        *,
        replica: str | None = None,
        takeover_s: float = 15.0,
        migrate: bool | None = True,
        max_connections: int = 8,
    ) -> None:
        super().__init__(url, max_connections=max_connections)
        self.replica = replica
        self.takeover_s = takeover_s
        self.migrate = migrate
        self.owner = lease_owner()
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Callable[[], None]] = []
        self._offset = 0.0  # database clock - host clock
        self._closed = False
        self.listening = False
        self._fires: dict[str, datetime] = {}
        self._fire_waiters: list[asyncio.Future[None]] = []
        self._fire_writer: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

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
            kwargs={"connect_timeout": int(CONNECT_TIMEOUT_S), **KEEPALIVE},
            name="event-bridge",
        )
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except Exception as e:
            await pool.close()
            raise BridgeError(
                f"cannot connect to the state database {describe(self.url)}: {why(e)}"
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
                if await has_table(c, "schema_version")
                else "SELECT 0"
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._run(run)

    async def migrate_now(self) -> tuple[int, int]:
        """Apply pending migrations (``event-bridge db migrate``): (version before, after)."""
        before = await self.schema_version()
        return before, await self._schema(apply=True)

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
            cur = await c.execute(f"SELECT {EPOCH}")
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
                f"VALUES (%s, %s, %s, %s, {EPOCH}, {EPOCH}) ON CONFLICT (owner) DO UPDATE "
                "SET heartbeat_at = excluded.heartbeat_at, name = excluded.name",
                (self.owner, self.replica, socket.gethostname(), os.getpid()),
            )
            cur = await c.execute(
                "UPDATE async_queue SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner IN (SELECT owner FROM replicas "
                f"WHERE heartbeat_at < {EPOCH} - %s AND owner <> %s)",
                (stale, self.owner),
            )
            released = cur.rowcount
            await c.execute(
                f"DELETE FROM replicas WHERE heartbeat_at < {EPOCH} - %s", (REPLICA_FORGET_S,)
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
                            f"DELETE FROM fired WHERE at < {EPOCH} - %s", (FIRED_KEEP_S,)
                        )
                    )
            except Exception as e:
                log.warning("state database: heartbeat failed (%s); retrying", why(e))

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
                    **KEEPALIVE,
                )
            except Exception as e:
                self.listening = False
                log.warning("state database: LISTEN connection failed (%s)", why(e))
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
                log.warning("state database: LISTEN connection lost (%s); reconnecting", why(e))
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def replicas(self) -> list[dict[str, Any]]:
        """The replicas sharing this database: name, host, last heartbeat, leases held."""

        async def run(c: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
            cur = await c.execute(
                f"SELECT r.name, r.host, r.pid, r.heartbeat_at, {EPOCH} - r.heartbeat_at, "
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

    async def shared_status(self) -> dict[str, Any]:
        """What ``event-bridge status`` shows on a host where no daemon runs: the replicas,
        the shared queue's depth and the dead letters, read from the database."""
        stats = await self.queue_stats()
        return {
            "state": "no daemon on this host",
            "database": describe(self.url),
            "queue": {"depth": sum(stats["depth"].values()), "functions": stats["depth"]},
            "dead_letters": sum(stats["dead_letters"].values()),
            "replicas": await self.replicas(),
        }

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
                await c.execute(NO_FLUSH)  # the tick itself is durably queued already
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
