"""Checkpoints for sources: what may be committed upstream when acks arrive out of order.

Three shapes, one place each (sources settle deliveries through
:class:`bridge.abc.SettleDelivery`; nothing here is thread-safe: one event loop):

- :class:`SettledPrefix` — a position (an offset, a hand-out number) that may advance only
  past deliveries that were all settled (bridge/abc.py, "No over-commit"): Kafka per
  partition, the timer per trigger. :meth:`~SettledPrefix.track` what is handed out,
  :meth:`~SettledPrefix.settle` it from ``ack()``, commit :attr:`~SettledPrefix.committable`
  when it moved, where the source keeps it (``ctx.store.put``, a Kafka commit).
- :class:`ShardedState` — a map of objects (files, a bucket listing) settled one key at a
  time, stored as shard documents in the state store: the filesystem source, S3 polling.
- :class:`GroupTurns` — SQS FIFO message groups. There is no position to commit there (each
  message is deleted by its own receipt handle, in any order), so a settled prefix has
  nothing to do; what group order needs is a gate on *hand-out*: the next message of a
  group goes out only once the previous one was settled, and a message handed back takes
  the rest of its group with it. A prefix tracker would let two messages of one group be
  in flight at once, and a retry of the first would run after the second.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

if TYPE_CHECKING:
    from bridge.store import StateStore


class SettledPrefix:
    """The contiguous settled prefix of handed-out positions (Benthos' checkpointer): what
    a source may commit when acks come in any order. Kafka keeps one per partition
    (positions are offsets), the timer one per trigger (positions are hand-out numbers).

    Ranges ``[first, end)`` of offsets are :meth:`track`-ed as they are handed out and
    :meth:`settle`-d when acked, in any order. :attr:`committable` is the ``end`` of
    the longest run of settled ranges at the front (ordered by offset) — the offset
    to commit — and never moves back. Gaps between ranges (compacted topics,
    transaction markers) do not block it: only tracked ranges count.
    """

    __slots__ = ("_done", "_ends", "_starts", "committable")

    def __init__(self, committable: int | None = None) -> None:
        self.committable = committable
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._done: list[bool] = []

    def track(self, first: int, end: int, *, settled: bool = False) -> int:
        """Register ``[first, end)``; returns its token (its first offset)."""
        if end <= first:
            raise ValueError(f"empty offset range [{first}, {end})")
        i = bisect.bisect_left(self._starts, first)
        if i < len(self._starts) and self._starts[i] == first:
            raise ValueError(f"offset {first} is already tracked")
        self._starts.insert(i, first)
        self._ends.insert(i, end)
        self._done.insert(i, settled)
        if settled:
            self._advance()
        return first

    def settle(self, token: int) -> bool:
        """Mark a range settled; True if :attr:`committable` moved."""
        i = self._index(token)
        self._done[i] = True
        return self._advance()

    def cancel(self, token: int) -> None:
        """Forget an unsettled range (its records will be handed out, and tracked, again)."""
        i = self._index(token)
        if self._done[i]:
            raise ValueError(f"range at {token} is settled")
        del self._starts[i], self._ends[i], self._done[i]

    @property
    def pending(self) -> int:
        """Ranges tracked and not yet settled."""
        return self._done.count(False)

    def _index(self, token: int) -> int:
        i = bisect.bisect_left(self._starts, token)
        if i == len(self._starts) or self._starts[i] != token:
            raise KeyError(f"no range tracked at offset {token}")
        return i

    def _advance(self) -> bool:
        n = 0
        while n < len(self._done) and self._done[n]:
            n += 1
        if n == 0:
            return False
        end = self._ends[n - 1]
        del self._starts[:n], self._ends[:n], self._done[:n]
        if self.committable is None or end > self.committable:
            self.committable = end
            return True
        return False


# --- sharded state ----------------------------------------------------------------------------

V = TypeVar("V")


def shard_of(key: str, shards: int) -> int:
    """The shard of ``key``: CRC-32 of its UTF-8 bytes (lone surrogates kept) modulo ``shards``."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % shards


class ShardedState(Generic[V]):
    """A map ``key → value`` checkpointed in the state store as ``shards`` JSON documents
    (by :func:`shard_of`), for a source whose position is a set of objects rather than an
    offset: the filesystem source's files, S3 polling's listing. Each key is settled on its
    own (events are about one key each, acks come in any order), so there is no prefix to
    wait for: an ack :meth:`put`-s its key and only that key's shard is rewritten.

    Writes are group-committed: :meth:`flush` returns once a store write that includes
    every change staged before the call is committed; changes staged while a write runs
    go out together in the next one, written by one of their callers (no task of its
    own). On the PostgreSQL store the documents live in the shared ``kv`` table like
    every source checkpoint; a source that runs on several replicas picks a namespace
    per replica if their states differ (the filesystem source: per host).

    ``decode(key, value)`` turns a stored JSON value back into a ``V`` (or None: the
    entry is dropped and counted in :attr:`dropped`); values are written as JSON (tuples
    as arrays). ``name(i)`` is the store key of shard ``i``; ``field`` wraps each document
    as ``{"v": 1, field: {...}}``. Not thread-safe (one event loop).
    """

    def __init__(
        self,
        store: StateStore,
        namespace: str,
        *,
        shards: int,
        name: Callable[[int], str],
        decode: Callable[[str, Any], V | None],
        field: str | None = None,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.shards = shards
        self.name = name
        self._decode = decode
        self._field = field
        self._data: list[dict[str, V]] = [{} for _ in range(shards)]
        self._dirty: set[int] = set()
        self._next: asyncio.Future[None] | None = None  # the batch being collected
        self._current: asyncio.Future[None] | None = None  # the batch being written
        self.dropped = 0  # entries decode() refused at load
        self.unreadable: list[str] = []  # shard documents that were not JSON of the form
        self.writes = 0  # shard documents written

    # --- reading -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read every shard (replacing what is in memory)."""
        docs = await asyncio.gather(
            *(self.store.get(self.namespace, self.name(i)) for i in range(self.shards))
        )
        self._data = [{} for _ in range(self.shards)]
        self._dirty.clear()
        self.dropped, self.unreadable = 0, []
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            try:
                try:
                    entries = orjson.loads(doc)
                except ValueError:  # what only the standard library reads (a lone surrogate)
                    entries = json.loads(doc)
                if self._field is not None:
                    entries = entries[self._field]
                if not isinstance(entries, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self.unreadable.append(self.name(i))
                continue
            shard = self._data[i]
            for key, raw in entries.items():
                value = self._decode(key, raw)
                if value is None or shard_of(key, self.shards) != i:
                    self.dropped += 1
                else:
                    shard[key] = value

    def shard(self, key: str) -> int:
        """The shard index of ``key``."""
        return shard_of(key, self.shards)

    def get(self, key: str) -> V | None:
        return self._data[shard_of(key, self.shards)].get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._data[shard_of(key, self.shards)]

    def __len__(self) -> int:
        return sum(len(s) for s in self._data)

    def keys(self) -> Iterator[str]:
        for shard in self._data:
            yield from shard

    def items(self) -> Iterator[tuple[str, V]]:
        for shard in self._data:
            yield from shard.items()

    # --- writing -------------------------------------------------------------------------------

    def stage(self, key: str, value: V | None) -> None:
        """Change ``key`` in memory (None removes it); :meth:`flush` writes it."""
        i = shard_of(key, self.shards)
        if value is None:
            self._data[i].pop(key, None)
        else:
            self._data[i][key] = value
        self._dirty.add(i)

    def replace(self, entries: Mapping[str, V]) -> None:
        """Stage a whole new map (every shard is rewritten by the next :meth:`flush`)."""
        self._data = [{} for _ in range(self.shards)]
        for key, value in entries.items():
            self._data[shard_of(key, self.shards)][key] = value
        self._dirty = set(range(self.shards))

    async def put(self, key: str, value: V | None) -> None:
        """:meth:`stage` and :meth:`flush`: returns once the change is committed."""
        self.stage(key, value)
        await self.flush()

    async def flush(self) -> None:
        """Return once every change staged so far is committed to the store. Raises what
        the store raised (the change stays staged: a later flush writes it again)."""
        if not self._dirty:
            if self._current is not None:  # a write that took my change is still running
                await asyncio.shield(self._current)
            return
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # mark the outcome retrieved even if every waiter was cancelled
            self._next.add_done_callback(_retrieve)
        mine = self._next
        while not mine.done():
            current = self._current
            if current is None:
                # nobody is writing and mine is not done: mine is the batch being collected.
                # Only that one: the caller's ack must not wait for later batches.
                await self._write()
            else:
                with contextlib.suppress(Exception):  # its outcome is its own callers'
                    await asyncio.shield(current)
        mine.result()

    async def _write(self) -> None:
        batch, self._dirty = self._dirty, set()
        this, self._next = self._next, None
        assert this is not None
        self._current = this
        try:
            await asyncio.gather(
                *(self.store.put(self.namespace, self.name(i), self._doc(i)) for i in batch)
            )
            self.writes += len(batch)
        except Exception as e:
            self._dirty |= batch
            this.set_exception(e)
        except BaseException:  # cancelled: a waiter of the next batch writes these too
            self._dirty |= batch
            this.set_exception(RuntimeError("checkpoint interrupted"))
            raise
        else:
            this.set_result(None)
        finally:
            self._current = None

    def _doc(self, i: int) -> str | None:
        shard = self._data[i]
        if not shard:
            return None  # nothing to keep: the document is deleted
        body: Any = shard if self._field is None else {"v": 1, self._field: shard}
        try:
            return orjson.dumps(body).decode()
        except TypeError:  # a lone surrogate (an S3 key): the standard library escapes it
            return json.dumps(body, separators=(",", ":"))


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


# --- FIFO groups ------------------------------------------------------------------------------

T = TypeVar("T")


class GroupTurns(Generic[T]):
    """One item out per group at a time, the others held in arrival order (SQS FIFO message
    groups; see the module docstring for why this is not a :class:`SettledPrefix`).

    :meth:`offer` each item as it arrives: True means it may be handed out now (its group
    was free; the group is now busy), False that it is held. When the item out is
    settled, :meth:`done` gives the group's next item (its turn now) or frees the group;
    when it is handed back, :meth:`drop` frees the group and returns the held ones, which
    go back too so the group's order survives the redelivery.
    """

    __slots__ = ("_busy", "_held")

    def __init__(self) -> None:
        self._busy: set[str] = set()  # groups with an item out (or ready to go out)
        self._held: dict[str, collections.deque[T]] = {}

    def offer(self, group: str, item: T) -> bool:
        if group in self._busy:
            self._held.setdefault(group, collections.deque()).append(item)
            return False
        self._busy.add(group)
        return True

    def done(self, group: str) -> T | None:
        """The group's item out was settled: its next item (now out), or None (group free)."""
        held = self._held.get(group)
        if held:
            item = held.popleft()
            if not held:
                del self._held[group]
            return item
        self._busy.discard(group)
        return None

    def drop(self, group: str) -> list[T]:
        """The group's item out was handed back: the held items (handed back too); the group
        is free."""
        self._busy.discard(group)
        return list(self._held.pop(group, ()))

    def held(self) -> Iterator[T]:
        for d in self._held.values():
            yield from d

    def __len__(self) -> int:
        """Items held."""
        return sum(len(d) for d in self._held.values())

    def clear(self) -> list[T]:
        """Forget every group; the items that were held."""
        out = list(self.held())
        self._busy.clear()
        self._held.clear()
        return out
