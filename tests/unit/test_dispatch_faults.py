"""Dispatcher and ordered invoker across reloads, and what unknown names may cost: a function
removed while it runs, retry policies that follow the config, one metrics series for every
unknown function name."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.dispatcher import Dispatcher
from bridge.errors import FunctionNotFound
from bridge.metrics import MAX_PENDING, Metrics
from bridge.ordered import OrderedInvoker
from bridge.retry import OrderedConfig
from bridge.store import SqliteStore
from bridge.testing import MemoryDeadLetterSink, RecordingTarget, until


async def test_a_function_removed_while_it_runs_finishes_cleanly() -> None:
    gate = asyncio.Event()

    async def hold(event: Any, inv: Any) -> str:
        await gate.wait()
        return "done"

    target = RecordingTarget(behaviour=hold)
    d = Dispatcher({"f": target})
    running = asyncio.create_task(d.invoke("f", {}))
    await until(lambda: target.calls)
    # Given a reload removes f while an invocation of it runs (grace over at once),
    await d.replace("f", None, 0)
    gate.set()
    # then the invocation reports and returns its result (no KeyError in the bookkeeping)
    result = await asyncio.wait_for(running, 10)
    assert result.value == "done"
    assert d.functions == []


async def test_unknown_function_names_share_one_metrics_series() -> None:
    metrics = Metrics()
    d = Dispatcher({"f": RecordingTarget()}, metrics=metrics)
    for i in range(50):
        try:
            await d.invoke(f"typo-{i}", {})
        except FunctionNotFound:
            pass
    text = metrics.render().decode()
    assert "typo-" not in text
    assert 'bridge_invocations_total{function="<unknown>",outcome="invalid_request"} 50.0' in text


async def test_ordered_retry_policy_follows_a_reloaded_config(tmp_path: Any) -> None:
    configs = {"k": OrderedConfig(retry_attempts=5)}
    store = SqliteStore(tmp_path)
    invoker = OrderedInvoker(
        Dispatcher({"f": RecordingTarget()}),
        store,
        {"f": MemoryDeadLetterSink()},
        lambda trigger: configs[trigger],
    )
    assert invoker.policy("k").config.retry_attempts == 5
    # Given a reload changes the trigger's [retry],
    configs["k"] = OrderedConfig(retry_attempts=1)
    # then the next delivery uses it (the policy is not cached for good)
    assert invoker.policy("k").config.retry_attempts == 1
    assert invoker.policy("k") is invoker.policy("k")  # and unchanged ones are reused


async def test_outcomes_reach_their_series_on_the_loop_and_before_a_render() -> None:
    metrics = Metrics()
    d = Dispatcher({"f": RecordingTarget()}, metrics=metrics)
    for _ in range(3):
        await d.invoke("f", {})
    series = 'bridge_invocations_total{function="f",outcome="success"}'
    # written soon after, on the event loop, without a render
    await until(
        lambda: (
            metrics.registry.get_sample_value(
                "bridge_invocations_total", {"function": "f", "outcome": "success"}
            )
            == 3
        )
    )
    for _ in range(MAX_PENDING + 5):  # more than may wait: written at once, loop or not
        metrics.observe("g", "success", 0.001)
    assert (
        metrics.registry.get_sample_value(
            "bridge_invocations_total", {"function": "g", "outcome": "success"}
        )
        >= MAX_PENDING
    )
    assert f"{series} 3.0" in metrics.render().decode()
    text = metrics.render().decode()
    assert f'bridge_invocation_duration_seconds_count{{function="g"}} {MAX_PENDING + 5}.0' in text
