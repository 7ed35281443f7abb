"""The console's dead-letter queries: SqliteStore's indexed SQL and the StateStore defaults
(which other stores inherit) give the same answers; bulk requeue moves rows atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.queue import new_item
from bridge.store import DeadLetterQuery, DeadLetterRow, SqliteStore, StateStore


class DefaultsStore(SqliteStore):
    """SqliteStore answering the console's queries with the generic defaults."""

    find_dead_letters = StateStore.find_dead_letters  # type: ignore[assignment]
    count_dead_letters = StateStore.count_dead_letters  # type: ignore[assignment]
    dead_letter_facets = StateStore.dead_letter_facets  # type: ignore[assignment]
    requeue_dead_letters = StateStore.requeue_dead_letters  # type: ignore[assignment]


def row(i: int) -> DeadLetterRow:
    return DeadLetterRow(
        id=f"id{i:03d}",
        function=("f", "g", "h")[i % 3],
        trigger=None if i % 4 == 0 else f"t{i % 2}",
        error_class=("function_error", "throttled")[i % 2],
        created_at=1000.0 + i // 2,  # pairs share a time: the id breaks the tie
        record='{"Body": {"ClientContext": "{}"}}',
    )


QUERIES = [
    DeadLetterQuery(),
    DeadLetterQuery(function="f"),
    DeadLetterQuery(functions=["g", "h"], error_class="throttled"),
    DeadLetterQuery(trigger="t1", since=1010, until=1030),
    DeadLetterQuery(functions=[]),
]


@pytest.mark.parametrize("cls", [SqliteStore, DefaultsStore])
async def test_queries_filter_order_and_page(tmp_path: Path, cls: type[SqliteStore]) -> None:
    store = cls(tmp_path)
    await store.open()
    try:
        rows = [row(i) for i in range(90)]
        for r in rows:
            await store.dead_letter(None, r)
        for q in QUERIES:
            want = sorted(
                (r for r in rows if q.matches(r)), key=lambda r: (r.created_at, r.id), reverse=True
            )
            assert await store.count_dead_letters(q) == len(want)
            got, before = [], None
            while page := await store.find_dead_letters(q, before=before, limit=7):
                got += page
                before = (page[-1].created_at, page[-1].id)
            assert [r.id for r in got] == [r.id for r in want]
        facets = await store.dead_letter_facets()
        assert facets == {
            "function": ["f", "g", "h"],
            "trigger": ["t0", "t1"],
            "error_class": ["function_error", "throttled"],
        }
        items = [new_item(r.function, "{}", request_id=r.id) for r in rows[:10]]
        items.append(new_item("f", "{}", request_id="not-a-dead-letter"))
        moved = await store.requeue_dead_letters(items)
        assert moved == [r.id for r in rows[:10]]
        assert await store.count_dead_letters(DeadLetterQuery()) == 80
        assert (await store.queue_stats())["depth"] == {"f": 4, "g": 3, "h": 3}
    finally:
        await store.close()


async def test_bulk_replay_of_10000_moves_all_in_chunks_and_skips_unknown_functions(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from bridge.console import CHUNK, replay_rows

    store = SqliteStore(tmp_path)
    await store.open()
    try:
        n = 2 * CHUNK + 1
        rows = [
            DeadLetterRow(
                id=f"r{i}",
                function="gone" if i % 1000 == 0 else "f",
                trigger="t",
                error_class="function_error",
                created_at=float(i),
                record='{"Body": {"ClientContext": "{\\"n\\": 1}", "RequestSource": "TRIGGER_TIMER"}}',
            )
            for i in range(n + 10)
        ]
        await store._write(  # one transaction: the fixture, not what is measured
            lambda c: c.executemany(
                "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (r.id, r.function, r.trigger, r.error_class, r.created_at, r.record)
                    for r in rows
                ],
            )
        )
        daemon = SimpleNamespace(
            config=SimpleNamespace(functions={"f": None}), store=store, queue=None
        )
        replayed, skipped = await replay_rows(daemon, rows)  # type: ignore[arg-type]
        assert skipped == 11 and len(replayed) == len(rows) - 11
        assert await store.count_dead_letters(DeadLetterQuery()) == 11
        stats = await store.queue_stats()
        assert stats["depth"] == {"f": len(rows) - 11}
        (item,) = [i for i in await store.claim("me", 1e12, {"f": 1}, {"f": 60})]
        assert item.payload == '{"n": 1}' and item.request_source == "TRIGGER_TIMER"
    finally:
        await store.close()
