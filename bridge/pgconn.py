"""The PostgreSQL store's connection layer: one psycopg-pool pool, every operation in one
transaction, bounded in time and retried once on a fresh connection when the connection broke
(bridge/pgstore.py; docs/scale-out.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from bridge.errors import BridgeError
from bridge.store import StateStore

T = TypeVar("T")

#: the NOTIFY channel of inserts and released leases
CHANNEL = "event_bridge"
CONNECT_TIMEOUT_S = 10.0
OP_TIMEOUT_S = 10.0
#: for claims, completions and renewals, as SQLite's synchronous=NORMAL: a crash of the
#: database server may forget the last ones (a lease expires, a completed event runs again:
#: at least once), never an accepted event
NO_FLUSH = "SET LOCAL synchronous_commit = off"
#: the database clock in SQL (unix seconds)
EPOCH = "extract(epoch from clock_timestamp())"
#: libpq TCP keepalives: a dead peer (a network cut) is noticed in about 15 s, not hours
KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15000,
}


def broken(e: BaseException) -> bool:
    """A connection-level failure worth one more try on a fresh connection."""
    return isinstance(e, psycopg.OperationalError) and not isinstance(
        e, psycopg.errors.QueryCanceled
    )


def why(e: BaseException) -> str:
    """One line about a driver error, never the connection string."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


async def has_table(c: psycopg.AsyncConnection[Any], name: str) -> bool:
    cur = await c.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    row = await cur.fetchone()
    return bool(row and row[0])


class PgConnections(StateStore):
    """The pool (opened by the subclass' ``open``) and :meth:`_run`."""

    shared = True

    def __init__(self, url: str, *, max_connections: int) -> None:
        self.url = url
        self._max = max_connections
        self._pool: AsyncConnectionPool | None = None

    def _conninfo(self) -> str:
        return self.url

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
                if attempt == 2 or not broken(e) or self._pool is None:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")
