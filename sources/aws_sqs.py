"""The SQS trigger (``type = "aws_sqs"``) and the ``sqs://`` dead-letter sink.

The trigger long-polls one SQS queue (standard or FIFO) and turns each message
into one SCF CMQ event: ``msgBody`` is the body, ``msgId`` the message id,
``publishTime`` SQS' ``SentTimestamp``, ``topicName`` the queue name,
``topicOwner`` the account, and ``msgTag`` the message attributes as
``name=value`` strings (binary attributes as ``name:base64=…``; ``:`` cannot
occur in an attribute name). ``format = "native"`` gives the function the
AWS Lambda SQS event instead (``{"Records": [{"messageId", "body",
"attributes", "messageAttributes", …}]}``), so Lambda handlers run unchanged.

Delivery (bridge/abc.py's contract; :class:`sources._aws.SqsConsumer` does the SQS work):

- a message is deleted only inside ``ack()``, i.e. after the event was durably
  queued; ``nack()`` sets its visibility to 0 so SQS redelivers it at once, and
  so does a failed delete (``ack()`` then raises: a duplicate, never a stuck message). A
  crash before acceptance deletes nothing: the message comes back when its
  ``visibility_timeout`` ends.
- while a message waits to be accepted (the daemon is saturated) its visibility
  is extended every ``visibility_timeout / 3``, so no other consumer gets it.
- FIFO queues (``.fifo``) are *ordered* triggers (:class:`SqsFifoSource`): each
  message is invoked in place and deleted only once it succeeded or was
  dead-lettered (retried meanwhile under ``[triggers.NAME.retry]``, as Kafka
  batches are), and the next message of its group is handed out only after
  that, so group order survives retries; a nack hands back the whole rest of
  the group, so the order survives the redelivery too.
- poison messages never loop: a body above the 128 KB async limit is
  dead-lettered by the core at acceptance (``invalid_request``) and then acked;
  a body that is not valid Unicode text (only an SQS-compatible server that does
  not validate can send one) is delivered base64-encoded, with the tag
  ``bridge:msgBodyBase64`` (and ``"bodyBase64": true`` in the native format).

The dead-letter sink ``dead_letter = "sqs://…"`` sends each dead letter as one
message whose body is the SCF-shaped record (bridge/deadletter.py) and whose
attributes are ``FunctionName``, ``TriggerName``, ``ErrorClass`` and
``RequestId``. URL forms:

- ``sqs://NAME?region=eu-west-1`` — a queue by name;
- ``sqs://HOST/ACCOUNT/NAME`` — a queue URL (``https://HOST/ACCOUNT/NAME``);
- query keys: ``region``, ``endpoint_url`` (an S3/SQS-compatible server; the
  queue URL's scheme then follows it), ``profile``, ``access_key_id_file``,
  ``secret_access_key_file``, ``session_token_file``, ``max_bytes``.

A record larger than the queue's ``MaximumMessageSize`` (or ``max_bytes``)
keeps its head: ``Body.ClientContext`` is cut and ``ClientContextTruncated`` set
(an event dead-lettered for being too large must not block its queue forever).
FIFO queues (``.fifo``) get ``MessageGroupId`` = the function name and
``MessageDeduplicationId`` = the request id.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from pydantic import Field

from bridge.plugin import (
    Closed,
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    Duration,
    EndOfInput,
    Event,
    Kind,
    NotConnected,
    OrderedConfig,
    SettleDelivery,
    Source,
    SourceContext,
    Worker,
    cmq_record,
    parse_sink,
    sink_error,
)
from sources._aws import (
    SQS_BATCH,
    AwsConfig,
    AwsError,
    Connection,
    QueueInfo,
    SqsConsumer,
    SqsMessage,
    explain,
    region_of_queue_url,
)

BASE64_TAG = "bridge:msgBodyBase64"


class SqsConfig(AwsConfig):
    """``[triggers.NAME]`` with ``type = "aws_sqs"``."""

    queue_url: str = Field(
        description="The queue's URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), or its name."
    )
    wait_time: Duration = Field(
        20.0,
        ge=0,
        le=20,
        description="Long-poll wait of each receive (SQS allows up to 20s). Shutdown may wait "
        "for the current poll.",
    )
    visibility_timeout: Duration = Field(
        30.0,
        ge=1,
        le=43200,
        description="How long a received message stays invisible to other consumers; extended "
        "while the message waits to be accepted.",
    )
    batch_size: int = Field(
        SQS_BATCH, ge=1, le=SQS_BATCH, description="Messages per receive (1-10)."
    )
    retry: OrderedConfig = Field(
        default_factory=OrderedConfig,
        description="FIFO queues only (they are invoked in place, in group order): retries "
        "of a failed message before it is dead-lettered, while the rest of its group waits.",
    )


def consumer_for(
    config: AwsConfig,
    ctx: SourceContext,
    queue: str,
    *,
    wait_time_s: float,
    visibility_timeout_s: float,
    batch_size: int = SQS_BATCH,
) -> SqsConsumer:
    return SqsConsumer(
        Connection.of(config, region_of_queue_url(queue)),
        queue,
        name=ctx.name,
        logger=ctx.logger,
        wait_time_s=wait_time_s,
        visibility_timeout_s=visibility_timeout_s,
        batch_size=batch_size,
    )


class SqsSource(Source[SqsConfig]):
    """One CMQ event per SQS message; deleted in ``ack()``, made visible again in ``nack()``.

    A FIFO queue (its name ends in ``.fifo``) is read by :class:`SqsFifoSource` instead,
    which the constructor picks."""

    Config = SqsConfig

    def __new__(cls, config: SqsConfig, ctx: SourceContext) -> SqsSource:
        if cls is SqsSource and is_fifo(config.queue_url):
            cls = SqsFifoSource
        return super().__new__(cls)

    def __init__(self, config: SqsConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.consumer = consumer_for(
            config,
            ctx,
            config.queue_url,
            wait_time_s=config.wait_time,
            visibility_timeout_s=config.visibility_timeout,
            batch_size=config.batch_size,
        )
        self._closed = False

    async def connect(self) -> None:
        if self._closed:
            return
        info = await self.consumer.open()
        self.ctx.logger.info(
            "trigger %s: reading SQS queue %s%s",
            self.ctx.name,
            info.url,
            " (FIFO)" if info.fifo else "",
            extra={"trigger": self.ctx.name},
        )

    async def read(self) -> Delivery:
        try:
            m = await self.consumer.next()
        except Closed:
            raise EndOfInput from None
        except AwsError as e:
            raise NotConnected(str(e)) from None
        consumer, info = self.consumer, self.consumer.info
        assert info is not None

        async def nack(error: BaseException | None) -> None:
            consumer.stats["nacked"] += 1
            await consumer.release(m)

        return SettleDelivery(
            message_event(self.ctx.name, m, info),
            functools.partial(consumer.delete, m),
            nack,
            key=m,
        )

    async def close(self) -> None:
        self._closed = True
        await self.consumer.aclose()

    def status(self) -> Mapping[str, Any]:
        c = self.consumer
        return {
            "queue": c.info.url if c.info else self.config.queue_url,
            "fifo": c.info.fifo if c.info else None,
            "received": c.stats["received"],
            "acked": c.stats["deleted"],
            "nacked": c.stats["nacked"],
            "released": c.stats["released"],
            "visibility_extended": c.stats["extended"],
            "buffered": c.buffered,
            "handed_out": c.handed_out,
        }


class SqsFifoSource(SqsSource):
    """An SQS FIFO queue: an *ordered* trigger (bridge.ordered), like Kafka.

    The consumer hands out one message per message group at a time and the next one of
    that group only once the previous one was deleted; being ordered, a message is
    deleted only once its invocation succeeded or it was dead-lettered (retried in place
    under ``[triggers.NAME.retry]`` meanwhile, its visibility extended). So a retry holds
    the rest of its group back and group order survives it — which queueing each message
    for asynchronous retries could not keep. Groups proceed independently."""

    ordered: ClassVar[bool] = True


def is_fifo(queue_url: str) -> bool:
    """SQS FIFO queue names end in ``.fifo`` (a URL or a bare name)."""
    return queue_url.rstrip("/").endswith(".fifo")


# --- mapping ----------------------------------------------------------------------------------


def text_body(body: str) -> tuple[str, bool]:
    """The body as valid Unicode text, or base64 of its bytes and True when it is not."""
    try:
        body.encode("utf-8")
        return body, False
    except UnicodeEncodeError:
        try:
            raw = body.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = body.encode("utf-8", "surrogatepass")
        return base64.b64encode(raw).decode("ascii"), True


def sent_time(m: SqsMessage) -> datetime:
    try:
        return datetime.fromtimestamp(int(m.attributes["SentTimestamp"]) / 1000, UTC)
    except (KeyError, ValueError, OverflowError, OSError):  # absent, not a number, out of range
        return datetime.now(UTC)


def attribute_tags(attrs: Mapping[str, Any]) -> list[str]:
    """``name=value`` per attribute; binary values as ``name:base64=…``."""
    tags = []
    for name in sorted(attrs):
        a = attrs[name]
        if "StringValue" in a:
            tags.append(f"{name}={a['StringValue']}")
        elif "BinaryValue" in a:
            tags.append(f"{name}:base64={base64.b64encode(bytes(a['BinaryValue'])).decode()}")
    return tags


def native_attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, a in attrs.items():
        v: dict[str, Any] = {
            "dataType": a.get("DataType", "String"),
            "stringListValues": [],
            "binaryListValues": [],
        }
        if "StringValue" in a:
            v["stringValue"] = a["StringValue"]
        if "BinaryValue" in a:
            v["binaryValue"] = base64.b64encode(bytes(a["BinaryValue"])).decode()
        out[name] = v
    return out


def message_event(trigger: str, m: SqsMessage, q: QueueInfo) -> Event:
    body, b64 = text_body(m.body)
    tags = attribute_tags(m.message_attributes)
    if b64:
        tags.append(BASE64_TAG)
    when = sent_time(m)
    record = cmq_record(
        msg_id=m.id,
        body=body,
        publish_time=when,
        topic=q.name,
        owner=q.account,
        tags=tags,
        type="queue",
    )
    if b64:
        record["body_base64"] = True
    native: dict[str, Any] = {
        "messageId": m.id,
        "receiptHandle": m.receipt,
        "body": body,
        "attributes": dict(m.attributes),
        "messageAttributes": native_attributes(m.message_attributes),
        "md5OfBody": m.md5,
        "eventSource": "aws:sqs",
        "eventSourceARN": q.arn,
        "awsRegion": q.region,
    }
    if b64:
        native["bodyBase64"] = True
    return Event(
        kind=Kind.CMQ, trigger=trigger, time=when, records=(record,), native={"Records": [native]}
    )


# --- dead-letter sink -------------------------------------------------------------------------

_SINK_KEYS = {
    "region",
    "endpoint_url",
    "profile",
    "access_key_id_file",
    "secret_access_key_file",
    "session_token_file",
    "max_bytes",
}


class SqsDeadLetterSink(DeadLetterSink):
    """``dead_letter = "sqs://…"``: each dead letter becomes one SQS message (module docstring)."""

    def __init__(self, url: str, ctx: DeadLetterContext) -> None:
        super().__init__(url, ctx)
        self.queue, self.conn, self.max_bytes = parse_sink_url(url)
        self._worker: Worker | None = None
        self._client: Any = None
        self._url: str | None = None
        self._limit = self.max_bytes or 262_144

    @property
    def what(self) -> str:
        return f'dead-letter queue "{self.queue}"'

    async def put(self, record: Mapping[str, Any]) -> None:
        if self._worker is None:
            self._worker = Worker("sqs-deadletter")
        await self._worker.run(self._send, record)

    def _send(self, record: Mapping[str, Any]) -> None:
        try:
            if self._client is None:
                self._client = self.conn.client("sqs", what=self.what)
            if self._url is None:
                url = self.queue
                if "://" not in url:
                    url = str(self._client.get_queue_url(QueueName=url)["QueueUrl"])
                attrs = self._client.get_queue_attributes(
                    QueueUrl=url, AttributeNames=["MaximumMessageSize"]
                )["Attributes"]
                server = int(attrs.get("MaximumMessageSize", 262_144))
                self._limit = min(server, self.max_bytes) if self.max_bytes else server
                self._url = url
            body = fit(record, self._limit - 1024)  # room for the attributes
            body_info = record.get("Body", {})
            attrs = {
                "FunctionName": str(body_info.get("FunctionName", "")),
                "TriggerName": str(body_info.get("TriggerName", "")),
                "ErrorClass": str(record.get("ErrorClass", "")),
                "RequestId": str(record.get("RequestId", "")),
            }
            kw: dict[str, Any] = {
                "QueueUrl": self._url,
                "MessageBody": body,
                "MessageAttributes": {
                    k: {"DataType": "String", "StringValue": v} for k, v in attrs.items() if v
                },
            }
            if self._url.endswith(".fifo"):
                kw["MessageGroupId"] = attrs["FunctionName"] or "event-bridge"
                if attrs["RequestId"]:
                    kw["MessageDeduplicationId"] = attrs["RequestId"][:128]
            self._client.send_message(**kw)
        except AwsError:
            raise
        except Exception as e:
            raise explain(
                e, service="SQS", what=self.what, endpoint=self.conn.endpoint_url
            ) from None

    async def close(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            await w.aclose()


def fit(record: Mapping[str, Any], limit: int) -> str:
    """The record as JSON text of at most ``limit`` UTF-8 bytes: ClientContext is cut if needed."""
    text = json.dumps(record, ensure_ascii=False)
    size = len(text.encode())
    if size <= limit:
        return text
    body = dict(record.get("Body", {}))
    ctx = str(body.get("ClientContext", ""))
    keep = max(0, len(ctx.encode()) - (size - limit) - 256)
    body["ClientContext"] = ctx.encode()[:keep].decode("utf-8", "ignore")
    out = {
        **record,
        "Body": body,
        "ClientContextTruncated": True,
        "ClientContextBytes": len(ctx.encode()),
    }
    return json.dumps(out, ensure_ascii=False)


def parse_sink_url(url: str) -> tuple[str, Connection, int | None]:
    """``sqs://…`` → (queue URL or name, connection, max_bytes). Raises ValueError."""
    usage = "sqs://NAME or sqs://HOST/ACCOUNT/NAME"
    parts = parse_sink(url, "sqs", usage=usage, host="queue", params=_SINK_KEYS)
    q = parts.params
    endpoint = q.get("endpoint_url") or None
    if parts.path.strip("/"):
        scheme = urlsplit(endpoint).scheme if endpoint else "https"
        queue = f"{scheme}://{parts.netloc}{parts.path}"
    else:
        queue = parts.netloc
    try:
        max_bytes = int(q["max_bytes"]) if q.get("max_bytes") else None
    except ValueError:
        raise sink_error(url, "max_bytes is not a number", usage) from None

    def path(key: str) -> Path | None:
        return Path(q[key]) if q.get(key) else None

    conn = Connection(
        endpoint_url=endpoint,
        region=q.get("region") or region_of_queue_url(queue),
        profile=q.get("profile") or None,
        access_key_id_file=path("access_key_id_file"),
        secret_access_key_file=path("secret_access_key_file"),
        session_token_file=path("session_token_file"),
    )
    if (conn.access_key_id_file is None) != (conn.secret_access_key_file is None):
        raise sink_error(url, "access_key_id_file and secret_access_key_file go together")
    return queue, conn, max_bytes
