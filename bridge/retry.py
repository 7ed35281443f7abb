"""Retry policies by error class: what to do after a failed invocation.

A policy looks at the error's class (never at exception types) and the
event's history and returns a :class:`Decision`: retry at a given time, give
up (dead-letter), or drop. Delays are computed with tenacity's ``wait_*`` and
``stop_*`` primitives; this module only maps error classes to them.

Asynchronous invocations (``[functions.NAME.async]``, SCF's defaults):

=================  ==========================================================
invalid_request    no retry: dead-letter at once
throttled          every ``throttle_interval`` (60 s), or the function's
                   ``Retry-After``, until ``max_event_age``
function_error     ``retry_attempts`` (2) retries, ``retry_interval`` (60 s)
                   apart, then dead-letter
system_error       exponential backoff from ``backoff_initial`` (1 s) doubling,
                   capped at ``backoff_max`` (5 min), with jitter, until
                   ``max_event_age``
=================  ==========================================================

Every retry is also bounded by ``max_event_age`` (SCF ``MsgTTL``): a retry
that would be due after the event is that old is not scheduled; the event is
dead-lettered instead. A handler may ask for a retry after a delay
(:class:`~bridge.errors.RetryRequested`, e.g. ``raise bridge.handler.Retry(30)``)
— bounded by ``max_event_age`` only — or drop the event on purpose
(:class:`~bridge.errors.Dropped`).

Ordered synchronous triggers (Kafka) use :class:`OrderedPolicy`: up to
``retry_attempts`` (SCF: 10,000) retries with exponential backoff, then
dead-letter and move on; invalid requests are dead-lettered at once. A function's
``Retry-After`` is honoured up to ``backoff_max`` (the whole partition waits).
"""

from __future__ import annotations

import dataclasses
import enum

import tenacity
from pydantic import Field

from bridge.config import AsyncConfig, Duration, Model
from bridge.errors import Dropped, ErrorClass, InvocationError, RetryRequested


class Action(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    DROP = "drop"


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """What the policy knows about an event: how many invocations failed so far (including
    the one just failed), how many of those were function errors, and its age in seconds."""

    attempts: int
    function_errors: int
    age_s: float


def _state(attempt: int, elapsed_s: float) -> tenacity.RetryCallState:
    rs = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    rs.attempt_number = attempt
    rs.start_time = 0.0
    rs.outcome_timestamp = elapsed_s
    return rs


class AsyncPolicy:
    """SCF's async retry policy for one function (see the module docstring)."""

    def __init__(self, config: AsyncConfig) -> None:
        self.config = config
        c = config
        self._fixed = tenacity.wait_fixed(c.retry_interval)
        self._throttle = tenacity.wait_fixed(c.throttle_interval)
        self._backoff = tenacity.wait_exponential_jitter(
            multiplier=c.backoff_initial, max=c.backoff_max, jitter=c.backoff_initial
        )
        self._function_stop = tenacity.stop_after_attempt(c.retry_attempts + 1)
        self._age_stop = tenacity.stop_after_delay(c.max_event_age)

    def decide(self, error: InvocationError, history: History) -> Decision:
        cls = error.error_class
        if isinstance(error, Dropped):
            return Decision(Action.DROP, reason=error.message)
        if cls is ErrorClass.INVALID_REQUEST:
            return Decision(Action.DEAD_LETTER, reason="invalid request: retrying cannot help")
        if isinstance(error, RetryRequested):
            delay = error.retry_after_s or 0.0
        elif cls is ErrorClass.FUNCTION_ERROR:
            if self._function_stop(_state(history.function_errors, history.age_s)):
                return Decision(
                    Action.DEAD_LETTER,
                    reason=f"function error after {self.config.retry_attempts} retries",
                )
            delay = self._fixed(_state(history.function_errors, history.age_s))
        elif cls is ErrorClass.THROTTLED:
            delay = (
                error.retry_after_s
                if error.retry_after_s is not None
                else self._throttle(_state(history.attempts, history.age_s))
            )
        else:  # system_error
            delay = (
                error.retry_after_s
                if error.retry_after_s is not None
                else self._backoff(_state(history.attempts, history.age_s))
            )
        if self._age_stop(_state(history.attempts, history.age_s + delay)):
            return Decision(
                Action.DEAD_LETTER,
                reason=f"max_event_age {self.config.max_event_age:g}s reached",
            )
        return Decision(Action.RETRY, delay_s=max(0.0, delay))


class OrderedConfig(Model):
    """Retry knobs of ordered synchronous triggers (Kafka); sources embed it as ``retry``."""

    retry_attempts: int = Field(
        10_000, ge=0, le=1_000_000, description="Retries before dead-lettering (SCF: 10,000)."
    )
    backoff_initial: Duration = Field(
        1.0, gt=0, description="First retry delay; doubles each time."
    )
    backoff_max: Duration = Field(
        60.0, gt=0, description="Cap of the retry delay, a function's Retry-After included."
    )


#: a trigger's ordered retry when it sets none (models are frozen: one object serves all)
DEFAULT_ORDERED = OrderedConfig()


class OrderedPolicy:
    """Retry in place (the partition waits), then dead-letter and move on."""

    def __init__(self, config: OrderedConfig) -> None:
        self.config = config
        self._stop = tenacity.stop_after_attempt(config.retry_attempts + 1)
        self._wait = tenacity.wait_exponential_jitter(
            multiplier=config.backoff_initial, max=config.backoff_max, jitter=config.backoff_initial
        )

    def decide(self, error: InvocationError, attempts: int) -> Decision:
        if isinstance(error, Dropped):
            return Decision(Action.DROP, reason=error.message)
        if error.error_class is ErrorClass.INVALID_REQUEST:
            return Decision(Action.DEAD_LETTER, reason="invalid request: retrying cannot help")
        if self._stop(_state(attempts, 0.0)):
            return Decision(
                Action.DEAD_LETTER, reason=f"failed after {self.config.retry_attempts} retries"
            )
        if error.retry_after_s is not None:
            # a function's Retry-After is honoured up to backoff_max: the whole partition
            # waits, so "Retry-After: 86400" must not park it for a day
            delay = min(max(0.0, error.retry_after_s), self.config.backoff_max)
        else:
            delay = self._wait(_state(attempts, 0.0))
        return Decision(Action.RETRY, delay_s=delay)
