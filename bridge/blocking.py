"""The one bridge between blocking SDKs and the event loop (confluent-kafka, boto3, watchdog).

Plugins never create threads or executors of their own; they use:

- :class:`Worker`: a dedicated thread for a client that is not thread-safe or whose
  calls block (a Kafka consumer, a boto3 client). ``await worker.run(fn, *args)``
  runs ``fn`` on that thread; calls run one at a time, in order.
- :class:`Feed`: a bounded hand-off from a thread to asyncio (watchdog's observer
  thread). ``feed.put(item)`` blocks the producing thread while the feed is full —
  back-pressure instead of an unbounded buffer — and ``await feed.get()`` takes
  items in order (``feed.take(n)`` what is at hand). ``close()`` wakes both sides.

Both shut down cleanly: ``aclose()`` waits for the thread without blocking the loop
(``Worker.abandon()`` does not wait, for a call its caller gave up on).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The feed or worker was closed."""


class Worker:
    """A single dedicated thread for one blocking client.

    The thread starts with the first call and is a daemon thread: a process never waits at
    exit for a call that :meth:`abandon` gave up on (a blocking connect attempt against a
    broker that is down, say); :meth:`aclose` waits for it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: _Thread | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker's thread, after the calls before it. Cancelling the
        caller cancels a call not started yet; one already running runs to its end."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """:meth:`run` without waiting: the call's future, for a caller that must reach its
        outcome after it gave up waiting for it (to close what an abandoned call made)."""
        if self._closed:
            raise Closed(f"worker {self.name} is closed")
        if self._thread is None:
            self._thread = _Thread(
                target=self._serve, args=(self._calls,), name=f"bridge-{self.name}", daemon=True
            )
            self._thread.start()
            # a worker dropped without aclose() ends its thread too
            weakref.finalize(self, self._calls.put, None)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, fn, args))
        return future

    async def aclose(self) -> None:
        """Take no more calls; wait (without blocking the loop) for those taken to end."""
        thread = self._close()
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    def abandon(self) -> None:
        """Take no more calls and do not wait for those taken: the thread makes them, then
        ends, and the process does not wait for it at exit. For a caller that gave up on a
        call that cannot be interrupted (the call must clean up after itself)."""
        thread = self._close()
        if thread is not None:
            thread.abandoned = True

    def _close(self) -> _Thread | None:
        if self._closed:
            return None
        self._closed = True
        if self._thread is not None:
            self._calls.put(None)  # after the calls already taken
        return self._thread

    @staticmethod
    def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
        while (call := calls.get()) is not None:
            future, fn, args = call
            del call
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as e:
                    future.set_exception(e)
                else:
                    future.set_result(result)
                    del result
            del future, fn, args  # nothing of a call outlives it on this thread


class _Thread(threading.Thread):
    """A :class:`Worker`'s thread; ``abandoned`` once the worker stopped waiting for it."""

    abandoned = False


_Call = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...]]


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
