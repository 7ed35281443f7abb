"""What was emitted per file: acked (checkpointed), in flight, or remembered at start.

A file's state is ``(mtime_ns, size)``. It is written to the state store only in
``ack()``, through :class:`bridge.checkpoint.ShardedState` (1024 shard documents per root
under the namespace ``filesystem:<trigger>``, group-committed). A file is emitted again
only when its state differs from the last one emitted (:meth:`FileState.view`)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from bridge.plugin import ShardedState, StateStore
from sources.filesystem.paths import FileId, Root, Sig, safe_key

SHARDS = 1024  # state documents per root


def namespace(trigger: str, store: StateStore) -> str:
    """The store namespace of a trigger's file states. A shared store (PostgreSQL) is shared
    by replicas on several hosts, each watching its own directories: each host keeps its
    own states there, under its host name."""
    if store.shared:
        return f"filesystem:{trigger}@{socket.gethostname()}"
    return f"filesystem:{trigger}"


def _shard_name(sid: str, i: int) -> str:
    return f"{sid}/{i:03x}"


class Emit:
    """One file event handed out, as its delivery settles it."""

    __slots__ = ("fid", "path", "seq", "sig")

    def __init__(self, fid: FileId, path: str, sig: Sig | None, seq: int) -> None:
        self.fid = fid
        self.path = path
        self.sig = sig  # None: a removal
        self.seq = seq


class FileState:
    """The last state emitted for every file (:meth:`view`), from three layers: events in
    flight (newest last), acked ones (checkpointed, one :class:`ShardedState` per root),
    and what was remembered at start without an event (``scan_on_start = false``)."""

    def __init__(
        self,
        store: StateStore,
        namespace: str,
        roots: Sequence[Root],
        wanted: Callable[[str], bool],
    ) -> None:
        self._wanted = wanted
        self.acked: list[ShardedState[Sig]] = [
            ShardedState(
                store,
                namespace,
                shards=SHARDS,
                name=partial(_shard_name, root.sid),
                decode=self._decode,
                field="files",
            )
            for root in roots
        ]
        self.baseline: list[dict[str, Sig]] = [{} for _ in roots]
        self.inflight: dict[FileId, list[Emit]] = {}
        self._acked_seq: dict[FileId, int] = {}
        self._seq = 0

    def _decode(self, key: str, raw: Any) -> Sig | None:
        if (
            safe_key(key)
            and self._wanted(key)
            and isinstance(raw, list)
            and len(raw) == 2
            and all(type(x) is int for x in raw)
        ):
            return (raw[0], raw[1])
        return None

    async def load(self) -> tuple[int, list[str]]:
        """Read the checkpoints: (entries dropped as unsafe or unwanted, unreadable shards)."""
        dropped, unreadable = 0, []
        for state in self.acked:
            await state.load()
            dropped += state.dropped
            unreadable += state.unreadable
        return dropped, unreadable

    def shard_name(self, fid: FileId) -> str:
        """The store key of the shard that holds ``fid``."""
        state = self.acked[fid[0]]
        return state.name(state.shard(fid[1]))

    def view(self, fid: FileId) -> Sig | None:
        """The last state emitted for a file: in flight, else acked, else remembered."""
        es = self.inflight.get(fid)
        if es:
            return es[-1].sig
        sig = self.acked[fid[0]].get(fid[1])
        if sig is not None:
            return sig
        return self.baseline[fid[0]].get(fid[1])

    def present_keys(self, ri: int) -> set[str]:
        """Keys of root ``ri`` whose last emitted (or remembered) state is 'present'."""
        keys = set(self.baseline[ri])
        keys.update(self.acked[ri].keys())
        for (r, key), es in self.inflight.items():
            if r == ri and es:
                if es[-1].sig is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return keys

    def remember(self, ri: int, files: Mapping[str, Sig]) -> None:
        self.baseline[ri] = dict(files)

    def emit(self, fid: FileId, path: str, sig: Sig | None) -> Emit:
        self._seq += 1
        e = Emit(fid, path, sig, self._seq)
        self.inflight.setdefault(fid, []).append(e)
        return e

    def settle(self, e: Emit, *, acked: bool) -> ShardedState[Sig] | None:
        """Forget an event in flight; on ack stage its state. Returns the state to flush."""
        fid = e.fid
        es = self.inflight.get(fid)
        if es is None or e not in es:
            return None
        es.remove(e)
        staged: ShardedState[Sig] | None = None
        if acked and e.seq > self._acked_seq.get(fid, 0):  # an older ack must not win
            staged = self.acked[fid[0]]
            staged.stage(fid[1], e.sig)
            self.baseline[fid[0]].pop(fid[1], None)
            self._acked_seq[fid] = e.seq
        if not es:  # nothing older can still be acked: the sequence guard is not needed
            del self.inflight[fid]
            self._acked_seq.pop(fid, None)
        return staged

    @property
    def tracked(self) -> int:
        return sum(len(s) for s in self.acked)
