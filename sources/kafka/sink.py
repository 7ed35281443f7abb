"""The Kafka dead-letter sink: ``dead_letter = "kafka://TOPIC?bootstrap_servers=HOST:PORT"``
(see :class:`KafkaDeadLetterSink`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from bridge.plugin import (
    DeadLetterContext,
    DeadLetterSink,
    Worker,
    parse_sink,
    read_secret_file,
    register_secret,
    sink_error,
)

from .config import SECRET_OPTION

SINK_TIMEOUT_S = 30.0  # a dead letter not acknowledged by the brokers within this raises
SINK_MAX_BYTES = 1_000_000  # Kafka's default message.max.bytes
USAGE = "kafka://TOPIC?bootstrap_servers=HOST:PORT"


@dataclasses.dataclass(frozen=True)
class SinkTarget:
    """Where a :class:`KafkaDeadLetterSink` produces, parsed from its URL."""

    topic: str
    options: Mapping[str, str]  # librdkafka producer properties, bootstrap.servers included
    option_files: Mapping[str, Path]
    max_bytes: int


def parse_sink_url(spec: str) -> SinkTarget:
    """``kafka://TOPIC?bootstrap_servers=HOST:PORT[,HOST:PORT][&PROPERTY=VALUE…]``.

    Other query parameters are librdkafka producer properties
    (``security.protocol=SASL_SSL``); ``PROPERTY_file=/path`` reads a property's value
    from a file at the first ``put`` (``sasl.password_file=/run/credentials/…``).
    """
    url = parse_sink(spec, "kafka", usage=USAGE, host="topic")
    options: dict[str, str] = {}
    files: dict[str, Path] = {}
    for name, value in url.params.items():
        if name in ("bootstrap_servers", "bootstrap.servers"):
            if "bootstrap.servers" in options:
                raise sink_error(spec, "bootstrap_servers is given twice", USAGE)
            options["bootstrap.servers"] = value
        elif name.endswith("_file"):
            files[name.removesuffix("_file")] = Path(value)
        else:
            options[name] = value
    if not options.get("bootstrap.servers"):
        raise sink_error(spec, "no brokers (?bootstrap_servers=HOST:PORT)", USAGE)
    if url.port is not None or url.path.strip("/"):
        raise sink_error(spec, f'"{url.netloc}{url.path}" is not a topic name', USAGE)
    try:
        max_bytes = int(options.get("message.max.bytes", SINK_MAX_BYTES))
    except ValueError:
        raise sink_error(spec, "message.max.bytes is not a number", USAGE) from None
    return SinkTarget(url.netloc, options, files, max_bytes)


class KafkaDeadLetterSink(DeadLetterSink):
    """Dead letters produced to a Kafka topic: ``dead_letter = "kafka://TOPIC?
    bootstrap_servers=HOST:PORT"`` (see :func:`parse_sink_url` for the other parameters).

    Each record is one message: the SCF dead-letter record as JSON, keyed by its
    source ``topic/partition`` (dead letters of one partition stay in order), with
    headers ``ErrorClass``, ``ErrorCode``, ``RequestId``, ``FunctionName``,
    ``TriggerName`` and, for Kafka triggers, ``SourceTopic``, ``SourcePartition``,
    ``SourceOffset`` and ``SourceLastOffset`` (the batch's first and last offsets, read
    from ``ClientContext``). The producer is idempotent with ``acks=all``; ``put``
    returns only once the brokers acknowledged the message and raises otherwise, so
    the caller keeps the event and retries: nothing is lost.

    A record larger than ``message.max.bytes`` (1,000,000 unless the URL says more)
    would be refused by the brokers; its ``ClientContext`` is then replaced by a
    small JSON object naming the source range (``{"truncated": true, "topic": …,
    "partition": …, "offsets": [first, last], "bytes": …}``) and
    ``ClientContextTruncated`` is set: the records are still in the source topic.
    """

    #: builds the producer from the librdkafka configuration (tests pass a fake)
    producer_factory: Callable[[dict[str, Any]], Any] = staticmethod(confluent_kafka.Producer)

    def __init__(self, url: str, ctx: DeadLetterContext) -> None:
        super().__init__(url, ctx)
        self.target = parse_sink_url(url)
        for name, value in self.target.options.items():
            if SECRET_OPTION.search(name):
                register_secret(value)
        self._worker: Worker | None = None
        self._producer: Any = None

    def _conf(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "acks": "all",
            "enable.idempotence": True,
            "message.timeout.ms": int(SINK_TIMEOUT_S * 1000),
            **self.target.options,
        }
        for name, path in self.target.option_files.items():
            conf[name] = read_secret_file(path)
            register_secret(conf[name])
        conf["error_cb"] = self._on_error
        return conf

    def _on_error(self, err: KafkaError) -> None:
        self.ctx.logger.warning("kafka dead-letter sink %s: %s", self.target.topic, err.str())

    async def put(self, record: Mapping[str, Any]) -> None:
        if self._worker is None:
            self._worker = Worker(f"kafka-dlq-{self.target.topic}")
        value, headers, key = self.encode(record)
        await self._worker.run(self._produce, value, headers, key)

    def encode(
        self, record: Mapping[str, Any]
    ) -> tuple[bytes, list[tuple[str, bytes]], bytes | None]:
        """The message value, headers and key of a dead-letter record."""
        body = record.get("Body") or {}
        source = source_range(str(body.get("ClientContext") or ""))
        value = _json(record)
        if len(value) > self.target.max_bytes - 4096:
            small = dict(record)
            small["Body"] = {
                **body,
                "ClientContext": json.dumps(
                    {
                        "truncated": True,
                        **(source or {}),
                        "bytes": len(str(body.get("ClientContext") or "").encode()),
                    }
                ),
            }
            small["ClientContextTruncated"] = True
            detail = str(small.get("ErrorDetail") or "")
            small["ErrorDetail"] = detail[-16384:]
            value = _json(small)
        headers = {
            "ErrorClass": record.get("ErrorClass"),
            "ErrorCode": record.get("ErrorCode"),
            "RequestId": record.get("RequestId"),
            "FunctionName": body.get("FunctionName"),
            "TriggerName": body.get("TriggerName"),
        }
        key = None
        if source is not None:
            headers.update(
                SourceTopic=source["topic"],
                SourcePartition=source["partition"],
                SourceOffset=source["offsets"][0],
                SourceLastOffset=source["offsets"][1],
            )
            key = f"{source['topic']}/{source['partition']}".encode()
        out = [(k, str(v).encode()) for k, v in headers.items() if v is not None and v != ""]
        return value, out, key

    def _produce(self, value: bytes, headers: list[tuple[str, bytes]], key: bytes | None) -> None:
        """On the worker thread: produce one message and wait for the brokers' acknowledgement."""
        if self._producer is None:
            self._producer = self.producer_factory(self._conf())
        outcome: list[KafkaError | None] = []
        self._producer.produce(
            self.target.topic,
            value=value,
            key=key,
            headers=headers,
            on_delivery=lambda err, _msg: outcome.append(err),
        )
        deadline = time.monotonic() + SINK_TIMEOUT_S + min(5.0, SINK_TIMEOUT_S)
        while not outcome and time.monotonic() < deadline:
            self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        if not outcome:
            raise TimeoutError(
                f"dead letter not acknowledged by Kafka topic {self.target.topic} within "
                f"{SINK_TIMEOUT_S:.0f}s"
            )
        if outcome[0] is not None:
            if outcome[0].fatal():  # an idempotent producer that is fenced: start afresh
                self._producer = None
            raise KafkaException(outcome[0])

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        try:
            if self._producer is not None:
                await worker.run(self._producer.flush, 5.0)
        finally:
            self._producer = None
            await worker.aclose()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def source_range(client_context: str) -> dict[str, Any] | None:
    """The Kafka topic, partition and first/last offsets of a dead-lettered batch, from its
    ``ClientContext`` (the event as the function got it: scf, native or cloudevents)."""
    if '"partition"' not in client_context:
        return None
    try:
        event = json.loads(client_context)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if isinstance(event.get("data"), dict):  # cloudevents
        event = event["data"]
    rows: list[Any] = []
    if isinstance(event.get("Records"), list):
        rows = [r.get("Ckafka") for r in event["Records"] if isinstance(r, dict)]
    elif isinstance(event.get("records"), list):  # native
        rows = event["records"]
    rows = [r for r in rows if isinstance(r, dict) and {"topic", "partition", "offset"} <= r.keys()]
    if not rows:
        return None
    offsets = [r["offset"] for r in rows]
    return {
        "topic": rows[0]["topic"],
        "partition": rows[0]["partition"],
        "offsets": [min(offsets), max(offsets)],
    }
