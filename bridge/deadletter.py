"""Dead letters: the record shape, the sinks, and the one service that writes and replays
them (:class:`DeadLetters`: ``write``; :func:`replay`).

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

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge import registry, sinks
from bridge.abc import DeadLetterContext, DeadLetterSink, Undeliverable
from bridge.errors import BadEvent, InvocationError
from bridge.events import request_id as new_request_id
from bridge.events import utc_iso
from bridge.store import DeadLetterRow, QueueItem, StateStore

if TYPE_CHECKING:
    from bridge.metrics import Metrics

log = logging.getLogger("bridge.deadletter")

MAX_DETAIL = 64 * 1024
#: cap of ``ErrorMessage`` (UTF-8 bytes): SQS takes 256 KB per message, Kafka 1 MB
MAX_MESSAGE = 4 * 1024
#: dead letters moved back into the queue per store transaction by :func:`replay`
REPLAY_CHUNK = 5000


@dataclasses.dataclass(frozen=True)
class Replayed:
    """What :func:`replay` did: the ids moved back into the queue, and those left where
    they are, each with why (its function is not configured)."""

    replayed: list[str]
    skipped: list[tuple[str, str]]


def replay_item(r: DeadLetterRow, now: float) -> QueueItem:
    """The queue row that replays dead letter ``r``: its original event, due ``now``,
    under the same request id."""
    body = json.loads(r.record)["Body"]
    return QueueItem(
        id=r.id,
        function=r.function,
        payload=body["ClientContext"],
        request_source=body.get("RequestSource", "API"),
        trigger=r.trigger,
        accepted_at=now,
        due_at=now,
    )


async def replay(
    store: StateStore,
    rows: Sequence[DeadLetterRow],
    functions: Collection[str],
    notify: Callable[[Iterable[str]], None] | None = None,
) -> Replayed:
    """The one replay of local dead letters (API, control socket and CLI, console): move
    ``rows`` back into the durable queue, :data:`REPLAY_CHUNK` per transaction. Rows of a
    function not in ``functions`` stay. ``notify`` (the running queue's
    ``notify_requeued``) gets the function of each row moved, so it runs them at once."""
    now = time.time()
    items: list[QueueItem] = []
    skipped: list[tuple[str, str]] = []
    for r in rows:
        if r.function not in functions:
            skipped.append((r.id, f"function {r.function} is not configured"))
        else:
            items.append(replay_item(r, now))
    replayed: list[str] = []
    for i in range(0, len(items), REPLAY_CHUNK):
        replayed += await store.requeue_dead_letters(items[i : i + REPLAY_CHUNK])
    if replayed and notify is not None:
        function_of = {i.id: i.function for i in items}
        notify([function_of[i] for i in replayed])
    return Replayed(replayed, skipped)


class DeadLetters:
    """The dead-letter service: :meth:`write` is the only place a dead letter is written
    (the durable queue, the ordered path and undeliverable source messages all go through
    it), :func:`replay` the only place one is moved back.

    Lifecycle: the daemon builds one per state store with the sinks of the configured
    functions and hands it to the queue and the ordered invoker; :meth:`reconfigure` swaps
    the sinks on a reload (a record written after it goes to the new sink).

    Rules: :meth:`write` returns only once the record is durable in the function's sink
    (``local``, the default, or a :class:`~bridge.abc.DeadLetterSink` plugin) and raises
    otherwise, having written nothing the caller must undo: the caller keeps the event
    (the queue reschedules it, the ordered path retries, a source delivery is nacked).

    Not guaranteed: that a record is written only once (a crash between the sink and the
    queue update writes it again on the next attempt)."""

    def __init__(
        self,
        store: StateStore,
        sinks: Mapping[str, DeadLetterSink] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.sinks: Mapping[str, DeadLetterSink] = dict(sinks or {})
        self.metrics = metrics

    def reconfigure(self, sinks: Mapping[str, DeadLetterSink]) -> None:
        self.sinks = dict(sinks)

    def is_local(self, function: str) -> bool:
        """Whether ``function``'s dead letters go to the state store."""
        sink = self.sinks.get(function)
        return sink is None or isinstance(sink, LocalSink)

    def sink_url(self, function: str) -> str:
        """Where ``function``'s dead letters go, for log lines (``local`` or the URL)."""
        sink = self.sinks.get(function)
        return "local" if sink is None or isinstance(sink, LocalSink) else sink.url

    async def write(
        self,
        item: QueueItem,
        error: InvocationError,
        *,
        reason: str,
        invocation_type: str = "Event",
        queued: bool = False,
    ) -> bool:
        """Write ``item``'s dead letter (failed with ``error``; ``reason`` says why it is
        given up) to its function's sink. ``queued``: ``item`` is a row of the durable
        queue; a local dead letter then removes that row in the same transaction. Returns
        whether it did (False: the caller removes the row). Raises if nothing was written."""
        now = time.time()
        rec = record(item, error, reason=reason, now=now, invocation_type=invocation_type)
        local = self.is_local(item.function)
        if local:
            await self.store.dead_letter(item.id if queued else None, row(rec, now))
        else:
            await self.sinks[item.function].put(rec)
        if self.metrics is not None:
            self.metrics.dead_letters.labels(item.function, error.error_class.value).inc()
        log.warning(
            "dead-lettered %s: %s (%s)",
            item.id,
            reason,
            error.message,
            extra={
                "request_id": item.id,
                "function": item.function,
                "trigger": item.trigger,
                "error_class": error.error_class.value,
            },
        )
        return local and queued

    async def write_undeliverable(
        self,
        delivery: Undeliverable,
        *,
        trigger: str,
        function: str,
        invocation_type: str = "Event",
    ) -> None:
        """Dead-letter a delivery its source could never turn into an event (see
        :class:`~bridge.abc.Undeliverable`). Raises if nothing was written."""
        item, error = undeliverable_item(delivery, trigger=trigger, function=function)
        await self.write(
            item,
            error,
            reason="retrying cannot help",
            invocation_type=invocation_type,
        )


def undeliverable_item(
    delivery: Undeliverable, *, trigger: str, function: str
) -> tuple[QueueItem, InvocationError]:
    """The dead-letter row of an undeliverable delivery, and its error (``invalid_request``)."""
    now = time.time()
    item = QueueItem(
        id=new_request_id(),
        function=function,
        # ASCII escapes: an original with a lone surrogate still makes a storable record
        payload=json.dumps(delivery.original, separators=(",", ":"), default=repr),
        request_source=delivery.event.request_source,
        trigger=trigger,
        accepted_at=now,
        due_at=now,
        attempts=1,
    )
    return item, BadEvent(f"trigger {trigger}: {delivery.why}", detail=delivery.detail)


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
        "ErrorMessage": bounded_message(error.message),
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
        "ErrorDetail": _detail(error),
        "Attempts": item.attempts,
        "AcceptedTime": utc_iso(datetime.fromtimestamp(item.accepted_at, UTC)),
        "Reason": reason,
    }


def bounded_message(message: str) -> str:
    """``message`` cut to :data:`MAX_MESSAGE` bytes, saying how long it was."""
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE:
        return message
    head = raw[: MAX_MESSAGE - 64].decode(errors="ignore")
    return f"{head}… [truncated: {len(raw)} bytes]"


def _detail(error: InvocationError) -> str:
    """The traceback or response body, bounded; a truncated message is kept there in full
    (bounded too) so nothing the operator needs is lost."""
    detail = error.detail or ""
    if len(error.message.encode()) > MAX_MESSAGE:
        detail = f"{error.message[: MAX_DETAIL // 2]}\n\n{detail}"
    return detail[-MAX_DETAIL:]


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


def check_sink(spec: str) -> str | None:
    """Why the sink ``spec`` cannot be used (its URL lacks what the sink needs), or None.

    Builds the sink without a store and drops it: sink constructors parse their URL and
    must not connect (see :class:`~bridge.abc.DeadLetterSink`). The message never holds the
    URL's secrets."""
    import logging

    cls = registry.deadletter(sink_name(spec))
    ctx = DeadLetterContext(store=None, logger=logging.getLogger("bridge.deadletter"))  # type: ignore[arg-type]
    try:
        cls(spec, ctx)
    except Exception as e:  # a plugin's own error type: say what it said, without secrets
        return sinks.redact(str(e) or type(e).__name__, spec)
    return None


def open_sink(spec: str, ctx: DeadLetterContext) -> DeadLetterSink:
    cls = registry.deadletter(sink_name(spec))
    return cls(spec, ctx)
