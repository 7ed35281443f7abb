"""Dead letters: the record shape and the sinks.

A dead letter keeps SCF's DLQ message shape, plus what an operator needs to
understand and replay it::

    {
      "RequestId": "…",                 # the async request id (stable across retries)
      "ErrorCode": 1,
      "ErrorMessage": "ValueError: …",
      "Body": {
        "RequestSource": "TRIGGER_TIMER",
        "FunctionName": "thumbnail",
        "TriggerName": "every-5s",
        "InvocationType": "Event",
        "ClientContext": "{…the original event as a JSON string…}",
        "RetryNum": 2,                  # retries after the first attempt
        "PushTime": "2026-11-29T13:00:00Z"
      },
      "ErrorClass": "function_error",
      "ErrorDetail": "Traceback … / response body",
      "Attempts": 3,
      "AcceptedTime": "2026-11-29T12:58:00Z",
      "Reason": "function error after 2 retries"
    }

Sinks are plugins in the ``bridge.deadletters`` group, chosen per function by
``[functions.NAME.async] dead_letter``: ``local`` (the state store; listed,
shown, replayed and purged by ``event-bridge dlq``), a URL whose scheme names
the plugin (``sqs://…``, ``kafka://…``, ``amqp://…``), or a plugin name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bridge import registry
from bridge.abc import DeadLetterContext, DeadLetterSink
from bridge.errors import InvocationError
from bridge.events import utc_iso
from bridge.store import DeadLetterRow, QueueItem

MAX_DETAIL = 64 * 1024


def sink_name(spec: str) -> str:
    """The plugin name of a ``dead_letter`` value: ``local``, ``sqs://q`` → ``sqs``, ``name``."""
    return spec.split("://", 1)[0] if "://" in spec else spec


def record(
    item: QueueItem,
    error: InvocationError,
    *,
    reason: str,
    now: float,
    invocation_type: str = "Event",
) -> dict[str, Any]:
    """The dead-letter record of ``item`` that failed with ``error`` (shape: module docstring)."""
    return {
        "RequestId": item.id,
        "ErrorCode": error.error_code,
        "ErrorMessage": error.message,
        "Body": {
            "RequestSource": item.request_source,
            "FunctionName": item.function,
            "TriggerName": item.trigger or "",
            "InvocationType": invocation_type,
            "ClientContext": item.payload,
            "RetryNum": max(0, item.attempts - 1),
            "PushTime": utc_iso(datetime.fromtimestamp(now, UTC)),
        },
        "ErrorClass": error.error_class.value,
        "ErrorDetail": (error.detail or "")[-MAX_DETAIL:],
        "Attempts": item.attempts,
        "AcceptedTime": utc_iso(datetime.fromtimestamp(item.accepted_at, UTC)),
        "Reason": reason,
    }


def row(rec: Mapping[str, Any], now: float) -> DeadLetterRow:
    body = rec["Body"]
    return DeadLetterRow(
        id=rec["RequestId"],
        function=body["FunctionName"],
        trigger=body["TriggerName"] or None,
        error_class=rec["ErrorClass"],
        created_at=now,
        record=json.dumps(rec, ensure_ascii=False),
    )


class LocalSink(DeadLetterSink):
    """Dead letters kept in the state store (``dead_letter = "local"``, the default).

    The queue stores a local dead letter and removes the queue row in one
    transaction (:meth:`~bridge.store.StateStore.dead_letter`); ``put`` is for
    records that have no queue row (a sync ordered trigger's).
    """

    async def put(self, record: Mapping[str, Any]) -> None:
        import time

        await self.ctx.store.dead_letter(None, row(record, time.time()))


def open_sink(spec: str, ctx: DeadLetterContext) -> DeadLetterSink:
    cls = registry.deadletter(sink_name(spec))
    return cls(spec, ctx)
