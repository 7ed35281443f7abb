"""Checkpoints for sources: what may be committed upstream when acks arrive out of order.

A source commits a *position* (an offset, a last fire time, a cursor) only past positions
whose deliveries were all settled (bridge/abc.py, "No over-commit"). :class:`SettledPrefix`
keeps that rule in one place: :meth:`~SettledPrefix.track` what is handed out,
:meth:`~SettledPrefix.settle` it from ``ack()``, commit
:attr:`~SettledPrefix.committable` when it moved. Deliveries settle themselves through
:class:`bridge.abc.SettleDelivery`.

Not thread-safe (one event loop). Nothing here is persisted: the source writes the
committable position where it keeps it (``ctx.store.put``, a Kafka commit).
"""

from __future__ import annotations

import bisect


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
