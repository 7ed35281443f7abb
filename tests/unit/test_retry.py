"""Retry policies: the decision for each error class, with SCF's defaults and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge import errors
from bridge.config import AsyncConfig, parse
from bridge.errors import ConfigError
from bridge.retry import Action, AsyncPolicy, History, OrderedConfig, OrderedPolicy

DEFAULT = AsyncPolicy(AsyncConfig())


def h(attempts: int, fn_errors: int = 0, age: float = 0.0) -> History:
    return History(attempts=attempts, function_errors=fn_errors, age_s=age)


def test_scf_defaults() -> None:
    c = AsyncConfig()
    assert (c.retry_attempts, c.retry_interval, c.max_event_age) == (2, 60.0, 21600.0)
    assert (c.throttle_interval, c.backoff_initial, c.backoff_max) == (60.0, 1.0, 300.0)
    assert c.dead_letter == "local"


def test_function_errors_retry_twice_60s_apart_then_dead_letter() -> None:
    e = errors.HandlerFailed("boom")
    assert DEFAULT.decide(e, h(1, 1)) == DEFAULT.decide(e, h(1, 1, age=1))
    d1 = DEFAULT.decide(e, h(1, 1))
    d2 = DEFAULT.decide(e, h(2, 2, age=60))
    d3 = DEFAULT.decide(e, h(3, 3, age=120))
    assert (d1.action, d1.delay_s) == (Action.RETRY, 60.0)
    assert (d2.action, d2.delay_s) == (Action.RETRY, 60.0)
    assert d3.action is Action.DEAD_LETTER and "after 2 retries" in d3.reason


def test_function_error_count_ignores_other_classes() -> None:
    # two throttles then a function error: the function error is the first of its kind
    d = DEFAULT.decide(errors.FunctionTimeout(), h(3, 1, age=120))
    assert d.action is Action.RETRY


def test_throttled_retries_every_interval_until_max_age() -> None:
    e = errors.Throttled()
    assert DEFAULT.decide(e, h(50, age=3000)).delay_s == 60.0
    late = DEFAULT.decide(e, h(360, age=21550))
    assert late.action is Action.DEAD_LETTER and "max_event_age" in late.reason


def test_retry_after_wins_for_throttled_and_system_errors() -> None:
    assert DEFAULT.decide(errors.Throttled(retry_after_s=7), h(1)).delay_s == 7
    assert DEFAULT.decide(errors.SystemFault(retry_after_s=3), h(1)).delay_s == 3


def test_system_errors_back_off_exponentially_with_jitter_capped() -> None:
    e = errors.WorkerCrashed()
    for attempt, low in [(1, 1), (2, 2), (3, 4), (4, 8), (6, 32)]:
        delays = [DEFAULT.decide(e, h(attempt)).delay_s for _ in range(50)]
        assert all(low <= d <= low + 1 for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered
    assert all(DEFAULT.decide(e, h(30)).delay_s <= 300 for _ in range(50))


def test_invalid_request_is_dead_lettered_at_once() -> None:
    d = DEFAULT.decide(errors.EventTooLarge(), h(1))
    assert d.action is Action.DEAD_LETTER


def test_handler_signals() -> None:
    d = DEFAULT.decide(errors.RetryRequested(retry_after_s=30), h(9, 9, age=100))
    assert (d.action, d.delay_s) == (Action.RETRY, 30)
    assert DEFAULT.decide(errors.Dropped("spam"), h(1)).action is Action.DROP
    beyond = DEFAULT.decide(errors.RetryRequested(retry_after_s=30), h(1, age=21590))
    assert beyond.action is Action.DEAD_LETTER


def test_overrides() -> None:
    p = AsyncPolicy(AsyncConfig(retry_attempts=0, retry_interval="5s", max_event_age="1m"))  # type: ignore[arg-type]
    assert p.decide(errors.HandlerFailed(), h(1, 1)).action is Action.DEAD_LETTER
    p = AsyncPolicy(AsyncConfig(retry_attempts=5, retry_interval="5s", max_event_age="1m"))  # type: ignore[arg-type]
    assert p.decide(errors.HandlerFailed(), h(1, 1)).delay_s == 5
    assert p.decide(errors.HandlerFailed(), h(3, 3, age=56)).action is Action.DEAD_LETTER


def test_ordered_policy() -> None:
    p = OrderedPolicy(OrderedConfig())
    assert p.config.retry_attempts == 10_000
    assert p.decide(errors.HandlerFailed(), 1).action is Action.RETRY
    assert p.decide(errors.HandlerFailed(), 10_001).action is Action.DEAD_LETTER
    assert p.decide(errors.InvalidRequest(), 1).action is Action.DEAD_LETTER
    assert p.decide(errors.HandlerFailed(), 50).delay_s <= 61


@pytest.mark.parametrize("spec", ["local"])
def test_known_sinks(spec: str) -> None:
    assert AsyncConfig(dead_letter=spec).dead_letter == spec


def test_unknown_sink_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "index.py").write_text("def main_handler(event, context): pass\n")
    raw = {
        "functions": {"f": {"code": str(tmp_path), "async": {"dead_letter": "carrier://pigeon"}}}
    }
    with pytest.raises(ConfigError) as e:
        parse(raw, base_dir=tmp_path)
    [(where, why)] = e.value.problems
    assert where == "functions.f.async.dead_letter"
    assert re.match(r'unknown dead-letter sink "carrier" \(installed: .*local', why)


def test_ordered_policy_caps_a_functions_retry_after_at_backoff_max() -> None:
    # Given a function answering 429 with Retry-After: 86400 (a day)
    p = OrderedPolicy(OrderedConfig(backoff_max=30))
    # Then the partition waits at most backoff_max, not a day
    throttled = errors.Throttled("slow down", retry_after_s=86_400)
    assert p.decide(throttled, 1).delay_s == 30
    assert p.decide(errors.Throttled("soon", retry_after_s=2), 1).delay_s == 2
