"""The PostgreSQL store's queue and dead letters: batched accepts (group commit, one
statement per batch), claims in batches with ``FOR UPDATE SKIP LOCKED``, completions with the
next claim, lease renewals in one statement (bridge/pgstore.py; docs/scale-out.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg

from bridge.pgconn import CHANNEL, EPOCH, NO_FLUSH, PgConnections
from bridge.store import _QCOLS, DeadLetterQuery, DeadLetterRow, QueueItem, _dl, _item

#: the PostgreSQL types of _QCOLS, in order
_QTYPES = (
    "text", "text", "text", "text", "text", "float8", "float8", "int4", "int4",
    "text", "text", "text", "text",
)  # fmt: skip
#: a claim's settings, in one statement: NO_FLUSH, and walk the (function, due_at) index from
#: its oldest entry (the planner, whose statistics lag behind a queue's churn, otherwise sorts
#: every due row for each claim)
_CLAIMING = (
    "SELECT set_config('synchronous_commit', 'off', true), "
    "set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true), "
    "set_config('enable_sort', 'off', true)"
)
#: one statement inserts a batch: its fire-once keys, its rows (some leased to the replica that
#: accepts them, which runs them without a claim), and a NOTIFY when a row went in for any
#: replica to claim (a replica that lost every tick of the batch to another wakes nobody);
#: it returns the ids of the leased rows that went in
_INSERT = (
    f"WITH k AS (INSERT INTO fired (key, at) SELECT unnest(%b::text[]), {EPOCH} "
    "ON CONFLICT (key) DO NOTHING RETURNING key), "
    f"ins AS (INSERT INTO async_queue ({_QCOLS}, lease_owner, lease_until) "
    f"SELECT {_QCOLS}, lease_owner, lease_until FROM "
    f"unnest({', '.join(f'%b::{t}[]' for t in _QTYPES)}, %b::text[], %b::text[], %b::float8[]) "
    f"AS v({_QCOLS}, dedupe, lease_owner, lease_until) "
    "WHERE v.dedupe IS NULL OR v.dedupe IN (SELECT key FROM k) "
    "ON CONFLICT (id) DO NOTHING RETURNING id, lease_owner) "
    "SELECT id FROM ins WHERE lease_owner IS NOT NULL UNION ALL "
    "SELECT pg_notify(%s, '')::text FROM (SELECT 1 FROM ins WHERE lease_owner IS NULL LIMIT 1) AS n"
)
#: accepts written in one transaction at most
MAX_BATCH = 500


class PgQueue(PgConnections):
    """The queue and dead-letter half of :class:`~bridge.pgstore.PgStore`."""

    def __init__(self, url: str, *, max_connections: int) -> None:
        super().__init__(url, max_connections=max_connections)
        self._pending: list[
            tuple[Sequence[QueueItem], str | None, Mapping[str, float], asyncio.Future[set[str]]]
        ] = []
        self._flusher: asyncio.Task[None] | None = None

    # --- queue -------------------------------------------------------------------------------

    @staticmethod
    def _params(i: QueueItem) -> tuple[Any, ...]:
        return (
            i.id, i.function, i.payload, i.request_source, i.trigger, i.accepted_at, i.due_at,
            i.attempts, i.function_errors, i.last_error_class, i.last_error, i.last_detail,
            i.dead_letter_reason,
        )  # fmt: skip

    async def _insert(
        self,
        c: psycopg.AsyncConnection[Any],
        items: Sequence[tuple[QueueItem, str | None, float | None]],
    ) -> set[str]:
        """One statement for the batch (column arrays, ``_INSERT``): (row, lease owner, lease
        expiry) each; the ids of the leased rows that went in."""
        seen: set[str] = set()
        batch = []
        for row in items:  # one tick twice in a batch (a redelivery) must not insert twice
            i = row[0]
            if i.dedupe is None or i.dedupe not in seen:
                batch.append(row)
                if i.dedupe is not None:
                    seen.add(i.dedupe)
        cols = list(zip(*(self._params(i) for i, _, _ in batch), strict=True))
        keys = [i.dedupe for i, _, _ in batch if i.dedupe is not None]
        # the first replica to insert a tick's key wins; the others insert nothing. Arrays in
        # binary (%b): psycopg quotes every element of a text array with a regex otherwise
        cur = await c.execute(
            _INSERT,
            (
                keys,
                *[list(col) for col in cols],
                [i.dedupe for i, _, _ in batch],
                [owner for _, owner, _ in batch],
                [until for _, _, until in batch],
                CHANNEL,
            ),
            prepare=True,
        )
        return {r[0] for r in await cur.fetchall()}

    async def enqueue(self, items: Sequence[QueueItem]) -> None:
        await self._enqueue(items, None, {})

    async def enqueue_leased(
        self, items: Sequence[QueueItem], owner: str, lease_until: Mapping[str, float]
    ) -> list[QueueItem]:
        mine = await self._enqueue(items, owner, lease_until)
        return [i for i in items if i.id in mine and i.id in lease_until]

    async def _enqueue(
        self, items: Sequence[QueueItem], owner: str | None, lease_until: Mapping[str, float]
    ) -> set[str]:
        """Group commit: accepts that arrive while a commit is in flight go into the next
        transaction together (one round trip and one WAL flush for the lot)."""
        if not items:
            return set()
        fut: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._pending.append((items, owner, lease_until, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="pgstore:enqueue")
        return await fut

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            rows = [
                (i, owner, leases[i.id]) if i.id in leases else (i, None, None)
                for its, owner, leases, _ in batch
                for i in its
            ]
            try:
                mine = await self._run(functools.partial(self._insert, items=rows))
            except Exception as e:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_result(mine)

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
                await c.execute(_CLAIMING)
                if complete:
                    await c.execute("DELETE FROM async_queue WHERE id = ANY(%b)", (list(complete),))
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
                await c.execute(NO_FLUSH)
                await c.execute("DELETE FROM async_queue WHERE id = ANY(%b)", (ids,))

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
                    "unnest(%b::text[], %b::float8[]) AS u(id, t) "
                    "WHERE q.id = u.id AND q.lease_owner = %s",
                    (list(until), list(until.values()), owner),
                )
            )

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

        # the replay's rows carry the host's clock (bridge/deadletter.py): the queue's is the
        # database's (a skewed host would otherwise hold them back or hurry them)
        shift = self.clock_offset()
        items = [
            dataclasses.replace(i, accepted_at=i.accepted_at + shift, due_at=i.due_at + shift)
            for i in items
        ]

        async def run(c: psycopg.AsyncConnection[Any]) -> list[str]:
            cur = await c.execute(
                "DELETE FROM dead_letters WHERE id = ANY(%s) RETURNING id", ([i.id for i in items],)
            )
            gone = {r[0] for r in await cur.fetchall()}
            moved = [i for i in items if i.id in gone]
            if moved:
                await self._insert(c, [(i, None, None) for i in moved])
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
