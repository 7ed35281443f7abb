"""sources.kafka.OffsetTracker: commit only the end of the contiguous settled prefix, whatever
the order of acks."""

from __future__ import annotations

import random

import pytest

from sources.kafka import OffsetTracker


def test_in_order_settles_advance_to_the_end_of_each_range() -> None:
    t = OffsetTracker()
    a, b = t.track(0, 10), t.track(10, 20)
    assert t.committable is None
    assert t.settle(a) and t.committable == 10
    assert t.settle(b) and t.committable == 20
    assert t.pending == 0


def test_out_of_order_acks_never_commit_past_an_unsettled_range() -> None:
    t = OffsetTracker(committable=100)
    a, b, c = t.track(100, 110), t.track(110, 120), t.track(120, 130)
    # Given the last two settled first
    assert not t.settle(c)
    assert not t.settle(b)
    assert t.committable == 100  # 100..109 is not settled: nothing past it moves
    # When the first settles, the whole run is committable at once
    assert t.settle(a)
    assert t.committable == 130


def test_gaps_between_ranges_do_not_block() -> None:
    # compacted topics and transaction markers leave offsets that are never delivered
    t = OffsetTracker()
    a, b = t.track(0, 5), t.track(9, 12)
    t.settle(a)
    t.settle(b)
    assert t.committable == 12


def test_ranges_tracked_out_of_order_are_ordered_by_offset() -> None:
    t = OffsetTracker()
    later = t.track(20, 30)
    earlier = t.track(10, 20)
    t.settle(later)
    assert t.committable is None
    t.settle(earlier)
    assert t.committable == 30


def test_a_settled_range_can_be_tracked_directly() -> None:
    # records skipped before a start time, or covered by a batch of a previous assignment
    t = OffsetTracker()
    t.track(0, 3, settled=True)
    assert t.committable == 3
    b = t.track(3, 6)
    t.settle(b)
    assert t.committable == 6


def test_cancel_forgets_an_unsettled_range_so_it_can_be_tracked_again() -> None:
    t = OffsetTracker()
    a = t.track(0, 10)
    t.cancel(a)
    assert t.pending == 0 and t.committable is None
    a = t.track(0, 10)  # the same records handed out again (after a nack)
    t.settle(a)
    assert t.committable == 10


def test_committable_never_moves_back() -> None:
    t = OffsetTracker(committable=50)
    t.settle(t.track(40, 45))
    assert t.committable == 50


@pytest.mark.parametrize(
    ("first", "end"),
    [(5, 5), (6, 5)],
)
def test_empty_ranges_are_refused(first: int, end: int) -> None:
    with pytest.raises(ValueError, match="empty"):
        OffsetTracker().track(first, end)


def test_misuse_is_an_error() -> None:
    t = OffsetTracker()
    a = t.track(0, 1)
    with pytest.raises(ValueError, match="already tracked"):
        t.track(0, 2)
    with pytest.raises(KeyError):
        t.settle(7)
    t.track(1, 2)
    t.settle(a)  # a is consumed into the committable prefix...
    with pytest.raises(KeyError):
        t.cancel(a)  # ...so it is no longer tracked
    b = t.track(5, 6)
    t.track(3, 4)
    t.settle(b)  # settled but behind an unsettled range: still tracked
    with pytest.raises(ValueError, match="settled"):
        t.cancel(b)


def test_random_ack_orders_match_the_definition() -> None:
    rng = random.Random(7)
    for _ in range(200):
        t = OffsetTracker()
        bounds = sorted(rng.sample(range(1, 500), 20))
        ranges = list(zip([0, *bounds[:-1]], bounds, strict=True))
        tokens = [t.track(a, b) for a, b in ranges]
        settled: set[int] = set()
        for i in rng.sample(range(len(ranges)), len(ranges)):
            t.settle(tokens[i])
            settled.add(i)
            prefix = 0
            while prefix in settled:
                prefix += 1
            expected = ranges[prefix - 1][1] if prefix else None
            assert t.committable == expected


def test_pending_counts_the_unsettled_ranges() -> None:
    # found by the mutation run (scripts/mutation.py): counting the settled ranges instead
    # passed every test
    t = OffsetTracker()
    a = t.track(0, 10)
    b = t.track(10, 20)
    assert t.pending == 2
    t.settle(b)  # out of order: tracked until the gap before it is settled
    assert t.pending == 1
    t.settle(a)
    assert t.pending == 0 and t.committable == 20
