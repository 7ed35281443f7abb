"""Prometheus metrics, all under the ``bridge_`` prefix, in a registry owned by one daemon.

Counters are incremented where things happen (the dispatcher, the queue, the
daemon); gauges that describe state — in-flight invocations, queue depth,
source lag, timer misfires — are read from the live objects at scrape time by
a collector, so they cannot drift.

Outcomes are kept apart on purpose: a retried failure is counted under
``bridge_retries_total`` (the event is still queued), an intentional drop under
``bridge_dropped_total``, and only ``bridge_dead_letters_total`` means the
bridge gave up on an event. Nothing accepted is ever silently lost, so there is
no "lost" counter to watch: ``bridge_queue_depth`` must drain and dead letters
must be looked at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the scrape size

_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_received = Counter(
            "bridge_events_received", "Events read from sources.", ["trigger", "type"], registry=r
        )
        self.invocations = Counter(
            "bridge_invocations",
            "Invocations by function and outcome (success or error class).",
            ["function", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "bridge_invocation_duration_seconds",
            "Invocation duration.",
            ["function"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "bridge_retries",
            "Async retries scheduled, by error class.",
            ["function", "error_class"],
            registry=r,
        )
        self.dead_letters = Counter(
            "bridge_dead_letters",
            "Events dead-lettered, by error class.",
            ["function", "error_class"],
            registry=r,
        )
        self.dropped = Counter(
            "bridge_dropped", "Events dropped on purpose by the function.", ["function"], registry=r
        )
        self.accepted = Counter(
            "bridge_events_accepted",
            "Async events durably accepted into the queue.",
            ["function"],
            registry=r,
        )
        self.reloads = Counter(
            "bridge_reloads", "Config reloads by result.", ["result"], registry=r
        )
        self.build_info = Gauge("bridge_build_info", "Build information.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)

    def observe(self, function: str, outcome: str, seconds: float | None = None) -> None:
        self.invocations.labels(function, outcome).inc()
        if seconds is not None:
            self.duration.labels(function).observe(seconds)

    def add_state(self, read: Callable[[], Mapping[str, Any]]) -> None:
        """Register a callable returning live state for the gauges (see _State)."""
        self.registry.register(_State(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _State(Collector):
    """Gauges read at scrape time from ``read()``, which returns::

    {"in_flight": {function: n}, "queue_depth": n, "sources": {trigger: status}}

    where a source's status may hold ``lag`` ({partition: n} or n), ``misfires``, ``fires``.
    """

    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self.read = read

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        state = self.read()
        inflight = GaugeMetricFamily(
            "bridge_in_flight", "Invocations running now.", labels=["function"]
        )
        for fn, n in state.get("in_flight", {}).items():
            inflight.add_metric([fn], n)
        yield inflight
        yield GaugeMetricFamily(
            "bridge_queue_depth",
            "Async events queued (due or scheduled for retry).",
            value=state.get("queue_depth", 0),
        )
        lag = GaugeMetricFamily(
            "bridge_source_lag", "Upstream messages not yet read.", labels=["trigger", "partition"]
        )
        fires = CounterMetricFamily(
            "bridge_timer_fires", "Timer ticks fired since start.", labels=["trigger"]
        )
        misfires = CounterMetricFamily(
            "bridge_timer_misfires",
            "Timer ticks skipped because they were late.",
            labels=["trigger"],
        )
        for trig, st in state.get("sources", {}).items():
            value = st.get("lag")
            if isinstance(value, Mapping):
                for part, n in value.items():
                    if n is not None:
                        lag.add_metric([trig, str(part)], n)
            elif isinstance(value, int | float):
                lag.add_metric([trig, ""], value)
            if "fires" in st:
                fires.add_metric([trig], st["fires"])
            if "misfires" in st:
                misfires.add_metric([trig], st["misfires"])
        yield lag
        yield fires
        yield misfires
