"""The one bridge between blocking SDKs and the event loop (confluent-kafka, boto3, watchdog).

Plugins never create threads or executors of their own; they use:

- :class:`Worker`: a dedicated thread for a client that is not thread-safe or whose
  calls block (a Kafka consumer, a boto3 client). ``await worker.run(fn, *args)``
  runs ``fn`` on that thread; calls run one at a time, in order.
- :class:`Feed`: a bounded hand-off from a thread to asyncio (watchdog's observer
  thread). ``feed.put(item)`` blocks the producing thread while the feed is full —
  back-pressure instead of an unbounded buffer — and ``await feed.get()`` takes
  items in order (``feed.take(n)`` what is at hand). ``close()`` wakes both sides.

Both shut down cleanly: ``aclose()`` waits for the thread without blocking the loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The feed or worker was closed."""


class Worker:
    """A single dedicated thread for one blocking client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"bridge-{name}")
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise Closed(f"worker {self.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)


class Feed(Generic[T]):
    """A bounded FIFO from producer threads to one asyncio consumer."""

    def __init__(self, maxsize: int = 1000) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, item: T, timeout: float | None = None) -> bool:
        """From a thread: enqueue, waiting while full. False if closed or timed out."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._closed or len(self._items) < self.maxsize, timeout
            ):
                return False
            if self._closed:
                return False
            self._items.append(item)
            # the consumer waits only on an empty feed: one wake-up of the loop per burst
            wake = len(self._items) == 1
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)
        return True

    async def get(self) -> T:
        """Next item; raises Closed once closed and drained."""
        while True:
            with self._cond:
                if self._items:
                    if len(self._items) == self.maxsize:  # a producer may wait for room
                        self._cond.notify()
                    return self._items.popleft()
                if self._closed:
                    raise Closed("feed closed")
                self._ready.clear()
            await self._ready.wait()

    def take(self, n: int) -> list[T]:
        """Up to ``n`` items at hand, without waiting (one lock for the lot)."""
        with self._cond:
            items = self._items
            full = len(items) == self.maxsize
            out = [items.popleft() for _ in range(min(n, len(items)))]
            if full and out:
                self._cond.notify(len(out))
        return out

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Wake producers (their put returns False) and the consumer (get raises Closed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is already closed
            pass
