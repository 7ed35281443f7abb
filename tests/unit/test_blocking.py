"""The blocking-SDK bridge: a dedicated worker thread and a bounded thread→asyncio feed."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bridge.blocking import Closed, Feed, Worker
from bridge.testing import until


async def test_worker_runs_calls_in_order_on_one_thread() -> None:
    w = Worker("t")
    names = await asyncio.gather(
        *(w.run(lambda: threading.current_thread().name) for _ in range(5))
    )
    assert len(set(names)) == 1 and names[0].startswith("bridge-t")
    await w.aclose()
    with pytest.raises(Closed):
        await w.run(lambda: 1)


async def test_feed_is_bounded_and_ordered() -> None:
    feed: Feed[int] = Feed(maxsize=3)
    produced: list[int] = []

    def producer() -> None:
        for i in range(10):
            if not feed.put(i):
                return
            produced.append(i)

    t = threading.Thread(target=producer)
    t.start()
    # Given nobody reads, the producer stops at the bound
    await until(lambda: len(produced) == 3)
    await asyncio.sleep(0.05)
    assert len(produced) == 3 and len(feed) == 3
    got = [await feed.get() for _ in range(10)]
    assert got == list(range(10))
    t.join()


async def test_close_wakes_both_sides() -> None:
    feed: Feed[int] = Feed(maxsize=1)
    assert feed.put(1)
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(feed.put(2)))
    t.start()
    feed.close()
    t.join()
    assert results == [False]
    assert await feed.get() == 1
    with pytest.raises(Closed):
        await feed.get()


async def test_take_drains_what_is_at_hand_and_makes_room_for_a_blocked_producer() -> None:
    feed: Feed[int] = Feed(maxsize=4)
    done = threading.Event()

    def producer() -> None:
        for i in range(8):
            feed.put(i)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    await until(lambda: len(feed) == 4)
    # Given a full feed and a producer waiting for room, take() gets the lot and wakes it
    assert feed.take(10) == [0, 1, 2, 3]
    await until(done.is_set)
    assert feed.take(2) == [4, 5]
    assert [await feed.get(), await feed.get()] == [6, 7]
    assert feed.take(5) == []
    t.join()
