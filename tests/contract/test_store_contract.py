"""The StateStore contract, run on both stores: embedded SQLite and shared PostgreSQL.

Every rule the queue, the timers and the sources rely on: idempotent accepts, claims that
lease (never the same row twice), completions in the claim's transaction, renewals only by
the owner, dead letters and replay, fire-once keys, last-fire times that never go back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.store import DeadLetterQuery, DeadLetterRow, QueueItem, SqliteStore, StateStore
from tests.pg_fixtures import create_database, drop_database, url

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    if request.param == "sqlite":
        s: StateStore = SqliteStore(tmp_path)
        await s.open()
        yield s
        await s.close()
        return
    from bridge.pgstore import PgStore

    name = create_database()
    s = PgStore(url(name), replica="contract")
    try:
        await s.open()
        yield s
    finally:
        await s.close()
        drop_database(name)


def item(id: str, fn: str = "f", due: float | None = None, **kw: object) -> QueueItem:
    now = time.time()
    return QueueItem(
        id=id,
        function=fn,
        payload='{"n": 1}',
        request_source="API",
        accepted_at=now,
        due_at=now if due is None else due,
        **kw,  # type: ignore[arg-type]
    )


async def test_enqueue_is_idempotent_and_claim_leases_once(store: StateStore) -> None:
    await store.enqueue([item("a"), item("b"), item("c", fn="g")])
    await store.enqueue([item("a")])  # the same event again: left as is
    now = time.time()
    got = await store.claim("o1", now, {"f": 10, "g": 10}, {"f": 60.0, "g": 60.0})
    assert sorted(i.id for i in got) == ["a", "b", "c"]
    # leased: another owner gets nothing until the lease expires
    assert await store.claim("o2", now, {"f": 10, "g": 10}, {"f": 60.0}) == []
    later = now + 61
    again = await store.claim("o2", later, {"f": 10}, {"f": 60.0})
    assert sorted(i.id for i in again) == ["a", "b"]


async def test_claim_respects_limits_due_time_and_order(store: StateStore) -> None:
    now = time.time()
    await store.enqueue([item(f"i{n}", due=now - 10 + n) for n in range(5)])
    await store.enqueue([item("future", due=now + 100)])
    got = await store.claim("o", now, {"f": 3}, {"f": 60.0})
    assert [i.id for i in got] == ["i0", "i1", "i2"]
    got = await store.claim("o", now, {"f": 10}, {"f": 60.0})
    assert [i.id for i in got] == ["i3", "i4"]
    assert await store.next_due(now) == pytest.approx(now + 100)


async def test_completions_ride_on_the_next_claim(store: StateStore) -> None:
    await store.enqueue([item("a"), item("b")])
    now = time.time()
    got = await store.claim("o", now, {"f": 1}, {"f": 60.0})
    got2 = await store.claim("o", now, {"f": 1}, {"f": 60.0}, complete=[got[0].id])
    assert len(got2) == 1
    stats = await store.queue_stats()
    assert stats["depth"] == {"f": 1}
    await store.complete([got2[0].id])
    assert (await store.queue_stats())["depth"] == {}


async def test_renew_only_by_the_owner_and_release(store: StateStore) -> None:
    await store.enqueue([item("a")])
    now = time.time()
    await store.claim("o1", now, {"f": 1}, {"f": 10.0})
    await store.renew("o2", {"a": now + 1000})  # not the owner: no effect
    assert [i.id for i in await store.claim("o2", now + 11, {"f": 1}, {"f": 10.0})] == ["a"]
    await store.renew("o2", {"a": now + 1000})
    assert await store.claim("o3", now + 500, {"f": 1}, {"f": 10.0}) == []
    await store.release(["a"])
    assert [i.id for i in await store.claim("o3", now, {"f": 1}, {"f": 10.0})] == ["a"]


async def test_reschedule_keeps_history(store: StateStore) -> None:
    await store.enqueue([item("a")])
    now = time.time()
    [a] = await store.claim("o", now, {"f": 1}, {"f": 60.0})
    failed = QueueItem(
        id="a", function="f", payload=a.payload, request_source="API", accepted_at=a.accepted_at,
        due_at=now + 5, attempts=1, function_errors=1, last_error_class="function_error",
        last_error="boom", last_detail="tb",
    )  # fmt: skip
    await store.reschedule(failed)
    assert await store.claim("o", now, {"f": 1}, {"f": 60.0}) == []
    [again] = await store.claim("o2", now + 6, {"f": 1}, {"f": 60.0})
    assert (again.attempts, again.last_error, again.last_detail) == (1, "boom", "tb")
    assert [r.id for r in await store.list_retries()] == ["a"]


async def test_dedupe_key_accepts_once_even_after_completion(store: StateStore) -> None:
    tick = "timer:t:2026-01-01T00:00:00+00:00"
    await store.enqueue([item("r1", dedupe=tick)])
    await store.enqueue([item("r2", dedupe=tick)])  # another replica, the same tick
    got = await store.claim("o", time.time(), {"f": 10}, {"f": 60.0})
    assert [i.id for i in got] == ["r1"]
    await store.complete(["r1"])
    await store.enqueue([item("r3", dedupe=tick)])  # still the same tick, after it ran
    assert await store.claim("o", time.time(), {"f": 10}, {"f": 60.0}) == []
    await store.enqueue([item("r4", dedupe=tick + "x"), item("r5")])
    got = await store.claim("o", time.time(), {"f": 10}, {"f": 60.0})
    assert sorted(i.id for i in got) == ["r4", "r5"]


async def test_concurrent_accepts_of_one_tick_insert_one_row(store: StateStore) -> None:
    tick = "timer:t:2026-01-01T00:00:01+00:00"
    await asyncio.gather(*(store.enqueue([item(f"r{n}", dedupe=tick)]) for n in range(10)))
    assert (await store.queue_stats())["depth"] == {"f": 1}


async def test_dead_letters_and_replay(store: StateStore) -> None:
    await store.enqueue([item("a"), item("b")])
    now = time.time()
    for id in ("a", "b"):
        await store.dead_letter(
            id,
            DeadLetterRow(
                id=id, function="f", trigger="t", error_class="function_error", created_at=now,
                record=f"{{\"RequestId\": \"{id}\"}}",
            ),
        )  # fmt: skip
    assert (await store.queue_stats())["depth"] == {}
    assert [r.id for r in await store.list_dead_letters("f")] == ["a", "b"]
    assert (await store.get_dead_letter("a")) is not None
    q = DeadLetterQuery(function="f", error_class="function_error")
    assert await store.count_dead_letters(q) == 2
    assert [r.id for r in await store.find_dead_letters(q, limit=1)] == ["b"]
    assert (await store.dead_letter_facets())["trigger"] == ["t"]
    assert await store.requeue_dead_letter("a", item("a"))
    assert not await store.requeue_dead_letter("a", item("a"))
    assert await store.requeue_dead_letters([item("b"), item("zz")]) == ["b"]
    assert (await store.queue_stats())["depth"] == {"f": 2}
    assert await store.delete_dead_letters(["a"]) == 0


async def test_last_fire_never_moves_back_and_kv(store: StateStore) -> None:
    t = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert await store.get_last_fire("t") is None
    await store.set_last_fire("t", t)
    await store.set_last_fire("t", t - timedelta(seconds=5))
    assert await store.get_last_fire("t") == t
    await store.set_last_fire("t", t + timedelta(seconds=1))
    assert await store.get_last_fire("t") == t + timedelta(seconds=1)
    await store.put("ns", "k", "v1")
    await store.put_position("ns", "k", "v2")
    assert await store.get("ns", "k") == "v2"
    await store.put("ns", "k", None)
    assert await store.get("ns", "k") is None


async def test_clock_is_close_to_the_host_clock(store: StateStore) -> None:
    assert abs(store.time() - time.time()) < 5


# --- source checkpoints (bridge.checkpoint.ShardedState) ---------------------------------------


def _pair(key: str, raw: object) -> tuple[int, int] | None:
    return (raw[0], raw[1]) if isinstance(raw, list) and len(raw) == 2 else None


async def test_sharded_source_state_round_trips_with_concurrent_acks(store: StateStore) -> None:
    from bridge.checkpoint import ShardedState

    def sharded() -> ShardedState[tuple[int, int]]:
        return ShardedState(
            store, "src:t", shards=16, name=lambda i: f"s{i:02x}", decode=_pair, field="files"
        )

    # Given 300 keys acked concurrently, then every other one removed
    s = sharded()
    await asyncio.gather(*(s.put(f"k{i}", (i, -i)) for i in range(300)))
    await asyncio.gather(*(s.put(f"k{i}", None) for i in range(0, 300, 2)))
    # Then a fresh reader sees exactly what was acked last, and far fewer writes than acks
    again = sharded()
    await again.load()
    assert dict(again.items()) == {f"k{i}": (i, -i) for i in range(1, 300, 2)}
    assert s.writes < 600


async def test_filesystem_state_survives_a_restart_and_is_per_host_on_a_shared_store(
    store: StateStore, tmp_path: Path
) -> None:
    import logging
    import socket
    from zoneinfo import ZoneInfo

    from bridge.abc import SourceContext
    from sources.filesystem import FilesystemConfig, FilesystemSource

    root = tmp_path / "inbox"
    root.mkdir()
    for i in range(20):
        (root / f"f{i}").write_text("x")

    def source() -> FilesystemSource:
        cfg = FilesystemConfig.model_validate(
            {"type": "filesystem", "function": "f", "path": str(root), "settle": "0s"}
        )
        ctx = SourceContext(
            name="inbox",
            function="f",
            store=store,
            timezone=ZoneInfo("UTC"),
            logger=logging.getLogger("test.fs"),
        )
        return FilesystemSource(cfg, ctx)

    # Given every file emitted (in batches) and acked
    src = source()
    await src.connect()
    try:
        keys: list[str] = []
        while len(keys) < 20:
            batch = await asyncio.wait_for(src.read_many(100), 10)
            await asyncio.gather(*(d.ack() for d in batch))
            keys += [d.event.records[0]["key"] for d in batch]
        assert sorted(keys) == sorted(f"f{i}" for i in range(20))
    finally:
        await src.close()
    # Then the states are kept per host on a shared store
    host = f"@{socket.gethostname()}"
    assert src.namespace == "filesystem:inbox" + (host if store.shared else "")
    # When it restarts and one file changed
    (root / "f3").write_text("changed")
    again = source()
    await again.connect()
    try:
        # Then only that file comes again
        batch = await asyncio.wait_for(again.read_many(100), 10)
        assert [d.event.records[0]["key"] for d in batch] == ["f3"]
        await batch[0].ack()
    finally:
        await again.close()


async def test_enqueue_leased_leases_to_the_owner_in_the_insert(store: StateStore) -> None:
    now = time.time()
    await store.enqueue([item("dup", dedupe="tick-1")])
    mine = await store.enqueue_leased(
        [item("a"), item("b"), item("c"), item("d", dedupe="tick-1")],
        "o1",
        {"a": now + 60, "b": now + 60, "d": now + 60},
    )
    # the leased rows that went in (d lost its tick to dup), not the unleased c
    assert sorted(i.id for i in mine) == ["a", "b"]
    # another owner claims only the unleased rows until the leases expire
    got = await store.claim("o2", now + 1, {"f": 10}, {"f": 60.0})
    assert sorted(i.id for i in got) == ["c", "dup"]
    later = await store.claim("o3", now + 62, {"f": 10}, {"f": 60.0})
    assert sorted(i.id for i in later) == ["a", "b", "c", "dup"]
    # the same id again is not leased to anyone: it is there already
    assert await store.enqueue_leased([item("a")], "o4", {"a": now + 60}) == []
