"""sources.kafka.KafkaDeadLetterSink: the URL, the message it writes (SCF record, headers
with the error class and the source range), and raising unless the brokers acknowledged."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from bridge import log as logsetup
from bridge.abc import DeadLetterContext
from bridge.deadletter import record
from bridge.errors import HandlerFailed
from bridge.events import Event, Kind, ckafka_record, dumps, render
from bridge.store import QueueItem
from bridge.testing import MemoryStore
from sources.kafka import KafkaDeadLetterSink, parse_sink_url, source_range

URL = "kafka://dead-letters?bootstrap_servers=k1:9092,k2:9092&compression.type=lz4"


def sink(url: str = URL) -> KafkaDeadLetterSink:
    return KafkaDeadLetterSink(
        url, DeadLetterContext(store=MemoryStore(), logger=logging.getLogger("dl"))
    )


def batch_event(fmt: str, offsets: range = range(40, 43)) -> str:
    from datetime import UTC, datetime

    records = tuple(
        ckafka_record(topic="orders", partition=3, offset=o, key=b"k", value=b"v") for o in offsets
    )
    native = {"records": [dict(r) for r in records]}
    ev = Event(
        kind=Kind.CKAFKA, trigger="t", time=datetime.now(UTC), records=records, native=native
    )
    return dumps(render(ev, fmt)).decode()


def dead_letter(client_context: str, **over: Any) -> dict[str, Any]:
    item = QueueItem(
        id="req-1",
        function="fn",
        payload=client_context,
        request_source="TRIGGER_CKAFKA",
        trigger="orders-trigger",
        accepted_at=1_700_000_000.0,
        due_at=1_700_000_000.0,
        attempts=3,
    )
    error = HandlerFailed("ValueError: poison", detail="Traceback ...")
    rec = record(item, error, reason="failed after 2 retries", now=1_700_000_100.0)
    rec.update(over)
    return rec


def test_the_url() -> None:
    t = parse_sink_url(URL)
    assert t.topic == "dead-letters"
    assert t.options == {"bootstrap.servers": "k1:9092,k2:9092", "compression.type": "lz4"}
    assert t.max_bytes == 1_000_000
    t = parse_sink_url(
        "kafka://dlq?bootstrap.servers=k:1&sasl.password_file=/run/pw&message.max.bytes=5000000"
    )
    assert t.option_files == {"sasl.password": Path("/run/pw")}
    assert t.max_bytes == 5_000_000


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://dlq", r'^dead_letter = "kafka://dlq": no brokers \(\?bootstrap_servers='),
        ("kafka://?bootstrap_servers=k:1", "no topic after kafka://; use kafka://TOPIC"),
        ("sqs://dlq?bootstrap_servers=k:1", 'the scheme is "sqs", not kafka://'),
        ("kafka://dlq/x?bootstrap_servers=k:1", '"dlq/x" is not a topic name'),
        ("kafka://dlq?bootstrap_servers=k:1&message.max.bytes=lots", "not a number"),
    ],
)
def test_bad_urls(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_sink_url(url)


@pytest.mark.parametrize("fmt", ["scf", "native", "cloudevents"])
def test_the_source_range_is_read_from_client_context_in_every_format(fmt: str) -> None:
    assert source_range(batch_event(fmt)) == {
        "topic": "orders",
        "partition": 3,
        "offsets": [40, 42],
    }


def test_no_source_range_for_other_events() -> None:
    assert source_range(json.dumps({"Type": "Timer", "Message": "x"})) is None
    assert source_range('not json but has a "partition"') is None
    assert source_range("") is None


def test_the_message_carries_the_record_and_headers() -> None:
    rec = dead_letter(batch_event("scf"))
    value, headers, key = sink().encode(rec)
    assert json.loads(value) == rec
    assert dict(headers) == {
        "ErrorClass": b"function_error",
        "ErrorCode": str(HandlerFailed.error_code).encode(),
        "RequestId": b"req-1",
        "FunctionName": b"fn",
        "TriggerName": b"orders-trigger",
        "SourceTopic": b"orders",
        "SourcePartition": b"3",
        "SourceOffset": b"40",
        "SourceLastOffset": b"42",
    }
    assert key == b"orders/3"  # dead letters of a partition keep their order


def test_a_timer_dead_letter_has_no_source_headers() -> None:
    rec = dead_letter(json.dumps({"Type": "Timer"}), ErrorClass="invalid_request")
    _, headers, key = sink().encode(rec)
    assert key is None and "SourceTopic" not in dict(headers)


def test_a_record_too_large_for_the_topic_keeps_its_source_range_instead_of_the_event() -> None:
    big = batch_event("scf", range(0, 20_000))
    rec = dead_letter(big)
    value, headers, _ = sink().encode(rec)
    assert len(value) < 1_000_000 - 4096
    out = json.loads(value)
    assert out["ClientContextTruncated"] is True
    assert json.loads(out["Body"]["ClientContext"]) == {
        "truncated": True,
        "topic": "orders",
        "partition": 3,
        "offsets": [0, 19_999],
        "bytes": len(big.encode()),
    }
    assert dict(headers)["SourceLastOffset"] == b"19999"


class FakeProducer:
    def __init__(self, conf: dict[str, Any], outcome: str) -> None:
        self.conf = conf
        self.outcome = outcome
        self.produced: list[dict[str, Any]] = []
        self._pending: list[Callable[[Any, Any], None]] = []

    def produce(self, topic: str, *, on_delivery: Callable[[Any, Any], None], **kw: Any) -> None:
        self.produced.append({"topic": topic, **kw})
        self._pending.append(on_delivery)

    def flush(self, timeout: float) -> int:
        if self.outcome == "never":
            return len(self._pending)
        while self._pending:
            cb = self._pending.pop()
            cb(None if self.outcome == "ok" else KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
        return 0


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[FakeProducer]]:
    def install(outcome: str) -> list[FakeProducer]:
        made: list[FakeProducer] = []

        def factory(conf: dict[str, Any]) -> FakeProducer:
            made.append(FakeProducer(conf, outcome))
            return made[-1]

        monkeypatch.setattr(KafkaDeadLetterSink, "producer_factory", staticmethod(factory))
        monkeypatch.setattr("sources.kafka.sink.SINK_TIMEOUT_S", 0.2)
        return made

    return install


async def test_put_returns_once_acknowledged(fake_producer: Any, tmp_path: Path) -> None:
    made = fake_producer("ok")
    pw = tmp_path / "pw"
    pw.write_text("dlq-sasl-secret")
    s = sink(f"{URL}&sasl.password_file={pw}")
    await s.put(dead_letter(batch_event("scf")))
    (p,) = made
    assert p.conf["acks"] == "all" and p.conf["enable.idempotence"] is True
    assert p.conf["sasl.password"] == "dlq-sasl-secret"
    assert "dlq-sasl-secret" not in logsetup.redact("dlq-sasl-secret")
    assert p.produced[0]["topic"] == "dead-letters" and p.produced[0]["key"] == b"orders/3"
    await s.close()
    await s.close()


@pytest.mark.parametrize(("outcome", "error"), [("error", KafkaException), ("never", TimeoutError)])
async def test_put_raises_unless_acknowledged(
    fake_producer: Any, outcome: str, error: type[Exception]
) -> None:
    fake_producer(outcome)
    s = sink()
    with pytest.raises(error):
        await s.put(dead_letter(batch_event("scf")))
    await s.close()
