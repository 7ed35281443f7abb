"""bridge.checkpoint: ShardedState (against an in-memory store) and GroupTurns."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bridge.checkpoint import GroupTurns, ShardedState, shard_of
from bridge.testing import MemoryStore


def pair(key: str, raw: Any) -> tuple[int, int] | None:
    if isinstance(raw, list) and len(raw) == 2 and all(type(x) is int for x in raw):
        return (raw[0], raw[1])
    return None


def state(store: MemoryStore, field: str | None = "files") -> ShardedState[tuple[int, int]]:
    return ShardedState(store, "ns", shards=8, name=lambda i: f"s{i}", decode=pair, field=field)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def put(self, namespace: str, key: str, value: str | None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.puts.append(key)
        await super().put(namespace, key, value)


async def test_puts_survive_a_reload_and_only_the_changed_shard_is_written() -> None:
    store = CountingStore()
    s = state(store)
    await s.put("a", (1, 2))
    await s.put("b", (3, 4))
    assert store.puts == [f"s{shard_of('a', 8)}", f"s{shard_of('b', 8)}"]
    doc = json.loads(store.kv[("ns", f"s{shard_of('a', 8)}")])
    assert doc["v"] == 1 and doc["files"]["a"] == [1, 2]
    await s.put("a", None)  # removed: its shard (if now empty) is deleted
    again = state(store)
    await again.load()
    assert dict(again.items()) == {"b": (3, 4)}
    assert "a" not in again and again.get("b") == (3, 4) and len(again) == 1


async def test_concurrent_puts_share_one_write_per_shard() -> None:
    store = CountingStore()
    s = state(store)
    store.gate = asyncio.Event()
    first = asyncio.ensure_future(s.put("k0", (0, 0)))
    await asyncio.sleep(0)  # the first write is under way (blocked in the store)
    rest = [asyncio.ensure_future(s.put(f"k{i}", (i, i))) for i in range(1, 50)]
    await asyncio.sleep(0)
    store.gate.set()
    await asyncio.gather(first, *rest)
    # one write for the first, then one batch for the other 49 keys: at most 8 shards
    assert len(store.puts) <= 1 + 8
    again = state(store)
    await again.load()
    assert len(again) == 50


async def test_a_failed_write_raises_and_the_change_is_written_by_the_next_flush() -> None:
    store = CountingStore()
    s = state(store)
    store.fail = OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        await s.put("a", (1, 1))
    store.fail = None
    await s.flush()
    again = state(store)
    await again.load()
    assert again.get("a") == (1, 1)


async def test_unreadable_documents_and_entries_are_reported_not_loaded() -> None:
    # Given shards holding a good entry, a malformed one, one in the wrong shard, and junk
    store = MemoryStore()
    keys = [f"k{i}" for i in range(64)]
    by_shard = {shard_of(k, 8): k for k in keys}
    good, bad, moved = by_shard[0], by_shard[1], by_shard[2]
    await store.put("ns", "s0", json.dumps({"v": 1, "files": {good: [1, 2]}}))
    await store.put("ns", "s1", json.dumps({"v": 1, "files": {bad: ["x", 2]}}))
    await store.put("ns", "s3", json.dumps({"v": 1, "files": {moved: [1, 1]}}))
    await store.put("ns", "s4", "not json")
    await store.put("ns", "s5", json.dumps({"v": 1}))
    # When it is loaded
    s = state(store)
    await s.load()
    # Then only the good entry is there, and the rest is counted
    assert dict(s.items()) == {good: (1, 2)}
    assert s.dropped == 2
    assert s.unreadable == ["s4", "s5"]


async def test_replace_rewrites_every_shard_and_plain_documents_without_a_field() -> None:
    store = CountingStore()
    s = state(store, field=None)
    await s.put("old", (9, 9))
    s.replace({"x": (1, 1), "y": (2, 2)})
    await s.flush()
    assert len(store.puts) == 1 + 8
    assert json.loads(store.kv[("ns", f"s{shard_of('x', 8)}")])["x"] == [1, 1]
    again = state(store, field=None)
    await again.load()
    assert dict(again.items()) == {"x": (1, 1), "y": (2, 2)}


def test_group_turns_hand_out_one_per_group_in_order() -> None:
    turns: GroupTurns[str] = GroupTurns()
    assert turns.offer("g", "g1") and turns.offer("h", "h1")
    assert not turns.offer("g", "g2") and not turns.offer("g", "g3")
    assert len(turns) == 2 and list(turns.held()) == ["g2", "g3"]
    assert turns.done("g") == "g2"  # g1 settled: g2's turn
    assert turns.done("h") is None  # h free again
    assert turns.offer("h", "h2")
    # g2 handed back: g3 goes back with it, and g is free for the redelivery
    assert turns.drop("g") == ["g3"]
    assert turns.offer("g", "g2")
    assert not turns.offer("g", "g3")
    assert turns.clear() == ["g3"] and len(turns) == 0
    assert turns.offer("g", "again")


async def test_a_key_with_a_lone_surrogate_round_trips() -> None:
    store = MemoryStore()
    await state(store).put("odd-\ud800-key", (1, 2))
    again = state(store)
    await again.load()
    assert dict(again.items()) == {"odd-\ud800-key": (1, 2)}


async def test_a_cancelled_writer_leaves_its_changes_to_the_next_batch() -> None:
    store = CountingStore()
    s = state(store)
    store.gate = asyncio.Event()
    writer = asyncio.ensure_future(s.put("a", (1, 1)))
    await asyncio.sleep(0)  # writing "a", blocked in the store
    waiter = asyncio.ensure_future(s.put("b", (2, 2)))  # waits for the next batch
    await asyncio.sleep(0)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    # The waiter writes the next batch, "a" included (it stayed staged)
    store.gate.set()
    await asyncio.wait_for(waiter, 5)
    again = state(store)
    await again.load()
    assert dict(again.items()) == {"a": (1, 1), "b": (2, 2)}
