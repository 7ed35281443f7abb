"""The SQLite store under faults: a commit that fails (and a ROLLBACK that fails too) fails
only its own writes, the next writes go through, and accepts are fsynced before they return."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from bridge.events import Format
from bridge.store import SqliteStore
from bridge.testing import RecordingTarget
from tests.unit.test_queue import FakeDelivery, running


class Faulty:
    """A connection that fails chosen statements once each (the flusher's view of a bad disk)."""

    def __init__(self, conn: sqlite3.Connection, fail: set[str]) -> None:
        self._conn = conn
        self.fail = set(fail)
        #: (statement, synchronous level at that moment) for every COMMIT and queue insert
        self.seen: list[tuple[str, int]] = []

    def execute(self, sql: str, *args: Any) -> Any:
        word = sql.split()[0].upper()
        if word in self.fail:
            self.fail.discard(word)
            raise sqlite3.OperationalError(f"disk I/O error ({word})")
        if word == "COMMIT":
            level = self._conn.execute("PRAGMA synchronous").fetchone()[0]
            self.seen.append(("COMMIT", level))
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        if sql.startswith("INSERT INTO async_queue"):
            self.seen.append(("INSERT", -1))
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_failed_commit_and_rollback_do_not_wedge_later_writes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        assert store._conn is not None
        store._conn = Faulty(store._conn, {"COMMIT", "ROLLBACK"})  # type: ignore[assignment]
        # Given the commit fails and so does the rollback after it,
        # when a write is made, it fails (it must not hang: the flusher must not die)
        try:
            await asyncio.wait_for(store.put("ns", "k", "v1"), 10)
        except sqlite3.OperationalError:
            pass
        else:
            raise AssertionError("the failed commit was reported as durable")
        # then the next writes still go through
        await asyncio.wait_for(store.put("ns", "k", "v2"), 10)
        assert await store.get("ns", "k") == "v2"
        assert not store._flushing
    finally:
        await store.close()


async def test_accepts_are_fsynced_before_the_source_is_acked(tmp_path: Path) -> None:
    """A check of what is synced before the ack: kill -9 tests cannot see a missing fsync."""
    async with running(tmp_path, RecordingTarget()) as (q, store):
        assert store._conn is not None
        conn = Faulty(store._conn, set())
        store._conn = conn  # type: ignore[assignment]
        at_ack: list[list[tuple[str, int]]] = []

        class Watched(FakeDelivery):
            async def ack(self) -> None:
                at_ack.append(list(conn.seen))
                await super().ack()

        for i in range(3):
            await q.accept(Watched(f"m{i}"), trigger="tick", function="f", fmt=Format.SCF)
        assert len(at_ack) == 3
        for seen in at_ack:
            # the last insert before the ack was committed, and that commit was an fsync
            last_insert = max(i for i, (what, _) in enumerate(seen) if what == "INSERT")
            commits = [level for what, level in seen[last_insert:] if what == "COMMIT"]
            assert commits, "acknowledged before the accepting transaction committed"
            assert commits[0] == 2, f"the accept was committed with synchronous={commits[0]}"


async def test_a_renewed_lease_keeps_the_row_from_other_claims(tmp_path: Path) -> None:
    # found by the mutation run (scripts/mutation.py): dropping the write in
    # SqliteStore.renew passed every store and queue test
    from bridge.queue import new_item

    store = SqliteStore(tmp_path)
    await store.open()
    try:
        t0 = 1_000_000.0
        item = new_item("f", "{}", now=t0)
        await store.enqueue([item])
        # Given a row claimed by a with a 30 s lease, renewed until t0 + 300
        assert [i.id for i in await store.claim("a", t0, {"f": 1}, {"f": 30.0})] == [item.id]
        await store.renew("a", {item.id: t0 + 300})
        # Then b cannot claim it after the first lease ran out, only after the renewed one
        assert await store.claim("b", t0 + 60, {"f": 1}, {"f": 30.0}) == []
        assert [i.id for i in await store.claim("b", t0 + 301, {"f": 1}, {"f": 30.0})] == [item.id]
    finally:
        await store.close()
