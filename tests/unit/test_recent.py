"""The console's recent-invocations window: error rate, throttles, percentiles, expiry."""

from __future__ import annotations

import pytest

from bridge import metrics
from bridge.metrics import Metrics


def test_summary_over_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    m = Metrics()
    for i in range(1, 101):
        m.observe("f", "success", i / 1000)  # 1..100 ms
    m.observe("f", "function_error", 0.5)
    m.observe("f", "throttled")  # rejected: no duration
    s = m.recent.summary("f")
    assert (s["count"], s["errors"], s["throttles"]) == (102, 2, 1)
    assert s["error_rate"] == pytest.approx(2 / 102)
    assert s["p50_ms"] == pytest.approx(51.0)
    assert s["p99_ms"] == pytest.approx(100.0)
    assert m.recent.summary("other")["error_rate"] is None
    now[0] += m.recent.window_s + 1  # everything ages out
    assert m.recent.summary("f")["count"] == 0 and m.recent.summary("f")["p99_ms"] is None


async def test_the_window_has_every_outcome_observed_before_the_flush() -> None:
    # Given outcomes observed on the loop, one by one and many at once, not yet flushed
    m = Metrics()
    m.observe("f", "success", 0.001)
    m.observe_many("f", "success", [0.002, 0.003])
    m.observe("g", "throttled")
    m.observe_many("g", "success", [])  # nothing
    # Then a look at the window sees them all (the look flushes)
    assert m.recent.summary("f")["count"] == 3
    assert m.recent.summary("f")["p99_ms"] == pytest.approx(3.0)
    assert m.recent.summary("g")["throttles"] == 1
    assert 'bridge_invocations_total{function="f",outcome="success"} 3.0' in m.render().decode()
