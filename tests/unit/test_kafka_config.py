"""[triggers.NAME] with type = "kafka": defaults, and clear errors at the key path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bridge import log as logsetup
from bridge.abc import SourceContext
from bridge.config import parse
from bridge.errors import ConfigError
from bridge.testing import MemoryStore
from sources.kafka import KafkaConfig, KafkaSource, parse_start

BASE = {"type": "kafka", "function": "f", "bootstrap_servers": "k1:9092", "topic": "orders"}


def load(tmp_path: Path, **trigger: Any) -> KafkaConfig:
    raw = {
        "functions": {"f": {"runtime": "command", "command": ["cat"]}},
        "triggers": {"orders": {**BASE, **trigger}},
    }
    config = parse(raw, base_dir=tmp_path, env={})
    return config.triggers["orders"]  # type: ignore[return-value]


def problems(tmp_path: Path, **trigger: Any) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, **trigger)
    return str(e.value)


def test_defaults(tmp_path: Path) -> None:
    c = load(tmp_path)
    assert c.group_id == "event-bridge-orders"  # derived from the trigger name
    assert (c.start, c.batch_size, c.batch_window, c.max_batch_bytes) == (
        "latest",
        100,
        0.5,
        6_000_000,
    )
    assert c.retry.retry_attempts == 10_000 and c.drain_timeout == 10.0
    assert c.topics == ["orders"]


def test_values_are_parsed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-password\n")
    c = load(
        tmp_path,
        bootstrap_servers=["k1:9092", "k2:9093"],
        topic=["a", "^b-.*"],
        group_id="mine",
        start="2024-05-01T08:00:00+08:00",
        batch_size=10_000,
        batch_window="2s",
        max_batch_bytes="1MiB",
        options={"session.timeout.ms": 6000, "enable.partition.eof": False},
        options_file={"sasl.password": "pw"},
        retry={"retry_attempts": 3, "backoff_initial": "100ms"},
    )
    assert c.bootstrap_servers == "k1:9092,k2:9093"
    assert c.group_id == "mine" and c.topics == ["a", "^b-.*"]
    assert c.batch_window == 2.0 and c.max_batch_bytes == 1024**2
    assert c.options == {"session.timeout.ms": "6000", "enable.partition.eof": "false"}
    assert c.options_file == {"sasl.password": secret}  # relative to the config folder
    assert c.retry.retry_attempts == 3


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"batch_size": 0}, "triggers.orders.batch_size", "greater than or equal to 1"),
        ({"batch_size": 10_001}, "triggers.orders.batch_size", "less than or equal to 10000"),
        ({"start": "yesterday"}, "triggers.orders.start", 'invalid start "yesterday"'),
        ({"start": "2024-13-01T00:00:00Z"}, "triggers.orders.start", "ISO 8601"),
        ({"batch_window": 5}, "triggers.orders.batch_window", "needs a unit"),
        ({"max_batch_bytes": "7MiB"}, "triggers.orders.max_batch_bytes", "less than or equal"),
        ({"bootstrap_servers": "kafka"}, "triggers.orders.bootstrap_servers", "host:port"),
        ({"bootstrap_servers": ""}, "triggers.orders.bootstrap_servers", "no broker"),
        ({"topic": []}, "triggers.orders.topic", "at least one topic"),
        ({"topic": "^orders-(["}, "triggers.orders.topic", "invalid topic regex"),
        ({"group_id": " "}, "triggers.orders.group_id", "cannot be empty"),
        (
            {"options": {"enable.auto.commit": "true"}},
            "triggers.orders.options",
            '"enable.auto.commit" is set by the bridge: the bridge commits offsets itself',
        ),
        (
            {"options": {"enable.auto.offset.store": "true"}},
            "triggers.orders.options",
            "only once records are settled",
        ),
        ({"options": {"group.id": "x"}}, "triggers.orders.options", "use group_id"),
        ({"options": {"auto.offset.reset": "earliest"}}, "triggers.orders.options", "use start"),
        ({"options": {"bootstrap.servers": "x:1"}}, "triggers.orders.options", "use bootstrap_servers"),
        ({"options": {"on_commit": "x"}}, "triggers.orders.options", "is a callback"),
        ({"options": {"a": ["list"]}}, "triggers.orders.options", "must be a string"),
        ({"options": {"sesion.timeout.ms": "6000"}}, "triggers.orders.options", 'librdkafka rejects the options: No such configuration property: "sesion.timeout.ms"'),
        ({"options": {"session.timeout.ms": "soon"}}, "triggers.orders.options", 'Invalid value for configuration property "session.timeout.ms"'),
        ({"options": {"default.topic.config": "x"}}, "triggers.orders.options", "librdkafka rejects the options"),
        ({"options": {"sasl.password": "hunter2-pw", "security.protocol": "carrier-pigeon"}}, "triggers.orders.options", 'Invalid value "carrier-pigeon" for configuration property "security.protocol"'),
        ({"options_file": {"sasl.password": "missing"}}, "triggers.orders.options_file", "cannot read secret file"),
        ({"retry": {"retry_attempts": -1}}, "triggers.orders.retry.retry_attempts", "greater than"),
        ({"colour": "red"}, "triggers.orders.colour", "unknown key"),
    ],
)  # fmt: skip
def test_errors_name_the_key(tmp_path: Path, fields: dict[str, Any], where: str, says: str) -> None:
    text = problems(tmp_path, **fields)
    assert where in text and says in text, text
    assert "hunter2-pw" not in text


def test_a_property_cannot_be_both_inline_and_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    text = problems(
        tmp_path, options={"sasl.password": "inline"}, options_file={"sasl.password": "pw"}
    )
    assert "sasl.password: set in both options and options_file" in text


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = problems(tmp_path, batch_size=0, start="soon", options={"group.id": "g"})
    assert "3 problems" in text


def test_start_times() -> None:
    utc, shanghai = ZoneInfo("UTC"), ZoneInfo("Asia/Shanghai")
    assert parse_start("latest", utc) is None and parse_start("earliest", utc) is None
    assert parse_start("2024-05-01T00:00:00Z", utc) == 1_714_521_600_000
    # without an offset, the time is in the daemon's zone
    assert parse_start("2024-05-01T08:00:00", shanghai) == 1_714_521_600_000


def test_client_config_reads_secrets_at_connect_and_masks_them(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("first-secret-value")
    c = load(
        tmp_path,
        start="earliest",
        options={"security.protocol": "SASL_SSL", "ssl.key.password": "inline-key-pass"},
        options_file={"sasl.password": "pw"},
    )
    src = KafkaSource(
        c,
        SourceContext(
            name="orders",
            function="f",
            store=MemoryStore(),
            timezone=ZoneInfo("UTC"),
            logger=logging.getLogger("t"),
        ),
    )
    pw.write_text("rotated-secret-value")  # a credential rotated after validation
    conf = src.client_config()
    assert conf["sasl.password"] == "rotated-secret-value"
    assert conf["group.id"] == "event-bridge-orders" and conf["bootstrap.servers"] == "k1:9092"
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["queued.max.messages.kbytes"] == "16384"  # a default the options may override
    line = logsetup.redact("sasl rotated-secret-value and inline-key-pass")
    assert "rotated-secret-value" not in line and "inline-key-pass" not in line
    assert "inline-key-pass" not in repr(c)


def test_cooperative_rebalancing_is_detected(tmp_path: Path) -> None:
    c = load(tmp_path, options={"partition.assignment.strategy": "cooperative-sticky"})
    ctx = SourceContext(
        name="orders", function="f", store=MemoryStore(), timezone=ZoneInfo("UTC"), logger=logging.getLogger("t")
    )  # fmt: skip
    assert KafkaSource(c, ctx).incremental
    assert not KafkaSource(load(tmp_path), ctx).incremental
