"""The daemon's Prometheus series: the invocation histogram kept in plain lists renders what
``prometheus_client.Histogram`` renders, and outcomes are counted once each."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bridge.metrics import _BUCKETS, Durations, Metrics


def _reference(observations: list[tuple[str, float]]) -> str:
    registry = CollectorRegistry(auto_describe=True)
    h = Histogram(
        "bridge_invocation_duration_seconds",
        "Invocation duration.",
        ["function"],
        buckets=_BUCKETS,
        registry=registry,
    )
    for function, seconds in observations:
        h.labels(function).observe(seconds)
    return generate_latest(registry).decode()


def _pending(m: Metrics) -> int:
    """How many outcomes wait for the next flush."""
    return sum(len(outcomes) for outcomes, _ in m._pending.values())


def _histogram(text: str) -> str:
    return "".join(
        line + "\n"
        for line in text.splitlines()
        if line.startswith(("bridge_invocation_duration_seconds", "# HELP bridge_invocation_d"))
        or line.startswith("# TYPE bridge_invocation_duration")
    )


def test_the_duration_histogram_renders_as_prometheus_client_renders_it() -> None:
    rng = random.Random(13)
    # the series in the order their functions were first seen (h, g, f: not sorted); every
    # bound exactly (a value equal to a bound is in that bucket), just above each, 0, past
    # the last bound (+Inf only), and a spread of ordinary ones
    observations: list[tuple[str, float]] = [("h", 901.0), ("h", 3600.0), ("g", 0.0)]
    for bound in _BUCKETS:
        observations += [("f", float(bound)), ("g", bound * 1.000001)]
    observations += [(rng.choice("fg"), rng.expovariate(20)) for _ in range(2000)]
    m = Metrics()
    for function, seconds in observations:
        m.observe(function, "success", seconds)
    m.observe("f", "throttled")  # counted, no duration
    got = _histogram(m.render().decode())
    assert got == _histogram(_reference(observations))
    assert 'seconds_bucket{function="h",le="900.0"} 0.0\n' in got  # past the last bound
    assert 'seconds_bucket{function="h",le="+Inf"} 2.0\n' in got
    assert got.count("_count{") == 3
    assert set(m.registry._collector_to_names[m.duration]) == {  # type: ignore[attr-defined]
        "bridge_invocation_duration_seconds" + suffix
        for suffix in ("", "_bucket", "_count", "_sum", "_created")
    }


async def test_observations_flushed_together_render_the_same() -> None:
    # on the loop many wait for one flush; a NaN is in no bucket, only in the sum
    observations = [("f", 0.003), ("g", 0.0005), ("f", float("nan")), ("f", 42.0)] * 50
    m = Metrics()
    for function, seconds in observations:
        m.observe(function, "success", seconds)
    assert _pending(m) == len(observations)
    assert _histogram(m.render().decode()) == _histogram(_reference(observations))


def test_bucket_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing order"):
        Durations("x_seconds", "x", (1.0, 0.5))
    assert Durations("x_seconds", "x", (0.5, math.inf)).bounds == [0.5, math.inf]


async def test_outcomes_are_counted_once_each_across_flushes() -> None:
    m = Metrics()
    # on the loop, outcomes wait for one flush: counted together, by how many
    for i in range(10):
        m.observe("f", "success" if i % 3 else "function_error", 0.01)
    assert _pending(m) == 10
    await asyncio.sleep(0)  # the flush scheduled with the first
    assert _pending(m) == 0
    m.observe("f", "success", 0.02)
    text = m.render().decode()
    assert 'bridge_invocations_total{function="f",outcome="success"} 7.0' in text
    assert 'bridge_invocations_total{function="f",outcome="function_error"} 4.0' in text
    assert 'bridge_invocation_duration_seconds_count{function="f"} 11.0' in text
    assert 'bridge_invocation_duration_seconds_sum{function="f"} 0.12\n' in text


async def test_a_function_with_only_refused_calls_has_no_duration_series() -> None:
    m = Metrics()
    m.observe("<unknown>", "function_not_found")  # refused: no duration
    m.observe("f", "throttled")
    m.observe("f", "success", 0.5)
    text = m.render().decode()
    assert 'bridge_invocations_total{function="<unknown>",outcome="function_not_found"} 1.0' in text
    assert 'duration_seconds_count{function="<unknown>"}' not in text
    assert 'bridge_invocation_duration_seconds_count{function="f"} 1.0' in text
