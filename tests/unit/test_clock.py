"""bridge.clock.PreciseTimer: the callback runs on the loop, never before its time, once; a
new time replaces the pending one, and a cancelled call is not made."""

from __future__ import annotations

import asyncio
import threading
import time

from bridge.clock import PreciseTimer


async def test_the_callback_runs_on_the_loop_at_its_time_not_before() -> None:
    loop = asyncio.get_running_loop()
    timer = PreciseTimer()
    fired = loop.create_future()
    when = time.time() + 0.05
    timer.call_at(when, lambda: fired.set_result((time.time(), threading.get_ident())))
    at, thread = await asyncio.wait_for(fired, 5)
    assert at >= when
    assert thread == threading.get_ident()  # the loop's thread, not the timer's


async def test_a_new_time_replaces_the_pending_call() -> None:
    loop = asyncio.get_running_loop()
    timer = PreciseTimer()
    calls: list[str] = []
    done = loop.create_future()
    timer.call_at(time.time() + 0.05, lambda: calls.append("first"))
    timer.call_at(time.time() + 0.1, lambda: (calls.append("second"), done.set_result(None)))
    await asyncio.wait_for(done, 5)
    assert calls == ["second"]  # the first one's time came first: it was not made


async def test_a_cancelled_call_is_not_made_even_when_its_thread_already_woke() -> None:
    loop = asyncio.get_running_loop()
    timer = PreciseTimer(clock=lambda: 0.0)
    calls: list[str] = []
    timer.call_at(0.0, lambda: calls.append("late"))  # due at once: handed to the loop
    thread = timer._thread
    assert thread is not None
    thread.join(5)  # the hand-over is queued on the loop, not run yet
    timer.cancel()
    after = loop.create_future()
    loop.call_soon(after.set_result, None)  # queued after the hand-over
    await after
    assert calls == []
    # a past time: at once
    done = loop.create_future()
    timer.call_at(-1.0, lambda: done.set_result("now"))
    assert await asyncio.wait_for(done, 5) == "now"


async def test_a_clock_of_its_own_sets_the_time() -> None:
    # a store's clock ahead of the host's by an hour: due now by that clock
    loop = asyncio.get_running_loop()
    timer = PreciseTimer(clock=lambda: time.time() + 3600)
    done = loop.create_future()
    timer.call_at(time.time() + 3600, lambda: done.set_result(True))
    assert await asyncio.wait_for(done, 5)
