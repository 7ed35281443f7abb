"""The state store: what must survive a restart (timer last-fire times, and later the
durable async queue and dead letters).

:class:`StateStore` is the interface; :class:`SqliteStore` the embedded
implementation (WAL, one connection owned by one worker thread so the event
loop never blocks on disk). The interface makes no SQLite-only assumptions: a
PostgreSQL store implements the same coroutines with the same plain SQL types
(text keys, text timestamps in ISO-8601 UTC).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class StateStore(abc.ABC):
    """Durable key/value state shared by the daemon's parts."""

    async def open(self) -> None:  # noqa: B027
        """Create tables if needed. Called once before use."""

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

    async def close(self) -> None:  # noqa: B027
        """Flush and release; idempotent."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS timer_state (
    trigger TEXT PRIMARY KEY,
    last_fire TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""


class SqliteStore(StateStore):
    """SQLite in WAL mode in ``state_dir/bridge.db``; all SQL runs on one dedicated thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "bridge.db"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        if self._pool is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bridge-store")
        await self._run(self._connect)

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise RuntimeError("state store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _q(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        return self._conn.execute(sql, params).fetchall()

    async def get_last_fire(self, trigger: str) -> datetime | None:
        rows = await self._run(
            self._q, "SELECT last_fire FROM timer_state WHERE trigger = ?", (trigger,)
        )
        return datetime.fromisoformat(rows[0][0]) if rows else None

    async def set_last_fire(self, trigger: str, when: datetime) -> None:
        iso = when.astimezone(UTC).isoformat()
        await self._run(
            self._q,
            "INSERT INTO timer_state (trigger, last_fire) VALUES (?, ?) "
            "ON CONFLICT (trigger) DO UPDATE SET last_fire = excluded.last_fire "
            "WHERE excluded.last_fire > timer_state.last_fire",
            (trigger, iso),
        )

    async def get(self, namespace: str, key: str) -> str | None:
        rows = await self._run(
            self._q, "SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
        )
        return str(rows[0][0]) if rows else None

    async def put(self, namespace: str, key: str, value: str | None) -> None:
        if value is None:
            await self._run(
                self._q, "DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key)
            )
        else:
            await self._run(
                self._q,
                "INSERT INTO kv (namespace, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
                (namespace, key, value),
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, self._conn.close)
        finally:
            self._conn = None
            pool.shutdown(wait=True)
