"""The blocking-SDK bridge: a dedicated worker thread and a bounded thread→asyncio feed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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


async def test_aclose_waits_for_the_call_running_and_a_cancelled_call_not_started_never_runs() -> (
    None
):
    w = Worker("t")
    release, ran = threading.Event(), []
    running = asyncio.ensure_future(w.run(release.wait))
    await until(lambda: w._thread is not None and w._thread.is_alive())
    # Given a call queued behind the running one, whose caller gives up
    queued = asyncio.ensure_future(w.run(ran.append, "queued"))
    await asyncio.sleep(0)
    queued.cancel()
    closing = asyncio.ensure_future(w.aclose())
    # Then aclose waits for the running call, and the given-up one is never made
    done, _ = await asyncio.wait({closing}, timeout=0.2)
    assert not done
    release.set()
    await closing
    assert await running is True and ran == [] and queued.cancelled()
    assert not w._thread.is_alive()


async def test_abandon_returns_at_once_and_the_thread_ends_after_its_call() -> None:
    w = Worker("t")
    release = threading.Event()
    call = asyncio.ensure_future(w.run(release.wait))
    await until(lambda: w._thread is not None and w._thread.is_alive())
    call.cancel()
    w.abandon()  # does not wait for the call
    with pytest.raises(Closed):
        await w.run(lambda: 1)
    assert w._thread.is_alive() and w._thread.daemon
    release.set()
    await until(lambda: not w._thread.is_alive(), what="the thread ended after its call")


def test_a_process_does_not_wait_at_exit_for_a_call_abandoned() -> None:
    # Given a program whose worker is stuck in a call that never returns, abandoned
    program = (
        "import asyncio, threading\n"
        "from bridge.blocking import Worker\n"
        "async def main():\n"
        "    w = Worker('stuck')\n"
        "    call = asyncio.ensure_future(w.run(threading.Event().wait))\n"
        "    await asyncio.sleep(0.1)\n"
        "    call.cancel()\n"
        "    w.abandon()\n"
        "asyncio.run(main())\n"
        "print('ended')\n"
    )
    # Then it exits (a thread pool's thread would hold it until the call returned: never)
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == "ended\n"


async def test_a_worker_dropped_without_aclose_ends_its_thread() -> None:
    w = Worker("dropped")
    assert await w.run(lambda: 1) == 1
    thread = w._thread
    assert thread is not None and thread.is_alive()
    del w
    await until(lambda: not thread.is_alive(), what="the dropped worker's thread ended")
