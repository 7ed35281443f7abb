"""sources.amqp without a broker: config, secrets, the CMQ mapping, the dead-letter URL."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from bridge import log as logsetup
from bridge.abc import DeadLetterContext, EndOfInput, NotConnected, SourceContext
from bridge.config import parse
from bridge.errors import ConfigError
from bridge.events import dumps, render
from bridge.testing import MemoryStore
from sources.amqp import (
    BASE64_TAG,
    AmqpConfig,
    AmqpDeadLetterSink,
    AmqpSource,
    explain,
    header_tags,
    message_event,
    parse_sink_url,
    plain,
    redact,
    with_password,
)

URL = "amqp://bridge:s3cr3t-pw@rabbit.example:5672/prod"


def config(**fields: Any) -> AmqpConfig:
    body = {"type": "amqp", "function": "f", "queue": "jobs", **fields}
    return AmqpConfig.model_validate(body, context={})


def source(**fields: Any) -> AmqpSource:
    ctx = SourceContext(
        name="jobs",
        function="f",
        store=MemoryStore(),
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger("test.amqp"),
    )
    return AmqpSource(config(**fields), ctx)


@dataclasses.dataclass
class FakeMessage:
    """The attributes of aio_pika's IncomingMessage that the source reads."""

    body: bytes
    message_id: str | None = None
    timestamp: datetime | None = None
    exchange: str = ""
    routing_key: str = "jobs"
    correlation_id: str | None = None
    headers: dict[str, Any] = dataclasses.field(default_factory=dict)
    redelivered: bool = False
    content_type: str | None = None
    content_encoding: str | None = None
    type: str | None = None
    app_id: str | None = None
    user_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    priority: int | None = None
    delivery_tag: int = 1


def cmq(msg: FakeMessage, fmt: str = "scf") -> dict[str, Any]:
    ev = message_event("jobs", "jobs", msg)  # type: ignore[arg-type]
    out = render(ev, fmt)
    dumps(out)  # always renderable: a render failure would requeue the message forever
    return out


# --- config and secrets -----------------------------------------------------------------------


def test_config_defaults_and_docs() -> None:
    c = config(url=URL)
    assert (c.declare, c.prefetch, c.exchange, c.routing_key) == (True, 100, None, None)
    assert c.exchange_type == "topic" and c.connect_timeout == 10.0
    for name, field in AmqpConfig.model_fields.items():
        assert field.description, name


def test_the_url_never_shows_in_repr_or_errors(tmp_path: Path) -> None:
    assert "s3cr3t" not in repr(config(url=URL))
    with pytest.raises(ValidationError) as e:
        config(url="http://bridge:s3cr3t-pw@host/")
    assert "amqp:// or amqps://" in str(e.value)
    # the loader reports the message, not the input value
    with pytest.raises(ConfigError) as ce:
        parse(
            {
                "functions": {"f": {"code": str(tmp_path)}},
                "triggers": {"q": {"type": "amqp", "function": "f", "queue": "x", "url": "x:1"}},
            },
            base_dir=tmp_path,
            env={},
        )
    assert "triggers.q" in str(ce.value)
    # a URL urllib cannot read says why, which broker, and under which key
    with pytest.raises(ValidationError) as e:
        config(url="amqp://guest:s3cr3t-pw@127.0.0.1:notaport/")
    message = str(e.value).split("input_value")[0]
    assert "url: invalid AMQP URL amqp://guest:***@127.0.0.1:<invalid port>/: Port" in message
    assert "s3cr3t" not in message
    # one urllib cannot split at all is said without its reason (which may quote the password)
    for url in ("amqp://guest:pa[s3cr3t]word@host/", "amqp://guest:s3cr\uff03et/x@host/"):
        with pytest.raises(ValidationError) as e:
            config(url=url)
        message = str(e.value).split("input_value")[0]
        assert "invalid AMQP URL (its host part cannot be read)" in message
        assert "s3cr" not in message
    with pytest.raises(ValidationError, match="exactly one of url and url_file"):
        config()
    with pytest.raises(ValidationError, match="routing_key needs an exchange"):
        config(url=URL, routing_key="a.*")


def test_url_file_and_password_file(tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    url_file.write_text(URL + "\n")
    pw = tmp_path / "pw"
    pw.write_text("n3w/p@ss\n")
    c = config(url_file=str(url_file))
    assert c.broker_url() == URL
    c = config(url=URL, password_file=str(pw))
    assert c.broker_url() == "amqp://bridge:n3w%2Fp%40ss@rabbit.example:5672/prod"
    with pytest.raises(ValidationError, match="cannot read secret file"):
        config(url_file=str(tmp_path / "missing"))
    (tmp_path / "bad").write_text("https://user:hunter22@x/")
    with pytest.raises(ValidationError) as e:
        config(url_file=str(tmp_path / "bad"))
    assert "hunter22" not in str(e.value).split("input_value")[0]
    assert f"url_file {tmp_path / 'bad'}" in str(e.value)


def test_redact() -> None:
    assert redact(URL) == "amqp://bridge:***@rabbit.example:5672/prod"
    assert redact("amqps://host/") == "amqps://host/"
    assert redact("amqp://user@[::1]:5672/?heartbeat=5") == "amqp://user@[::1]:5672/"
    assert "pw" not in redact("amqp://u:pw@h:99999/")
    assert with_password("amqp://u:old@h:1/v?x=1", "a b") == "amqp://u:a%20b@h:1/v?x=1"


def test_connection_errors_are_explained_without_the_secret() -> None:
    import aiormq.exceptions as ae

    where = redact(URL)
    refused = ae.AMQPConnectionError(111, "Connect call failed ('127.0.0.1', 5673)")
    assert explain(refused, where) == (
        f"cannot reach AMQP broker {where}: Connect call failed ('127.0.0.1', 5673)"
    )
    auth = ae.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")
    text = explain(auth, where, user="bridge")
    assert "refused the credentials of user 'bridge'" in text and "s3cr3t" not in text
    missing = ae.ChannelNotFoundEntity(404, "NOT_FOUND - no queue 'jobs' in vhost 'prod'")
    assert explain(missing, f"{where} queue 'jobs'").endswith("no queue 'jobs' in vhost 'prod'")
    assert "declare = false" in explain(ae.ChannelPreconditionFailed(406, "x"), where)
    assert "did not answer" in explain(TimeoutError(), where)


async def test_a_source_registers_its_secret_and_closes_without_connecting() -> None:
    src = source(url="amqp://u:not-a-real-pw@127.0.0.1:1/")
    assert "not-a-real-pw" not in src.where
    with pytest.raises(Exception, match="cannot reach AMQP broker") as e:
        await src.connect()
    assert "not-a-real-pw" not in str(e.value)
    assert logsetup.redact("pw=not-a-real-pw") == "pw=***"
    with pytest.raises(NotConnected):
        await src.read()
    await src.close()
    await src.close()
    with pytest.raises(EndOfInput):
        await src.read()


# --- the CMQ mapping --------------------------------------------------------------------------


def test_a_message_becomes_a_publisher_style_cmq_record() -> None:
    t = datetime(2026, 3, 1, 8, 35, 11, tzinfo=UTC)
    msg = FakeMessage(
        b'{"order": 1}',
        message_id="m-1",
        timestamp=t,
        exchange="orders",
        routing_key="order.created",
        correlation_id="req-9",
        headers={"tags": ["eu", "vip"]},
    )
    rec = cmq(msg)["Records"][0]["CMQ"]
    assert rec == {
        "type": "topic",
        "topicOwner": "",
        "topicName": "orders",
        "subscriptionName": "jobs",
        "publishTime": "2026-03-01T08:35:11Z",
        "msgId": "m-1",
        "requestId": "req-9",
        "msgBody": '{"order": 1}',
        "msgTag": ["order.created", "eu", "vip"],
    }


def test_a_message_published_to_the_queue_directly() -> None:
    rec = cmq(FakeMessage(b"plain text, not JSON", headers={"msgTag": "a, b"}))
    r = rec["Records"][0]["CMQ"]
    assert (r["type"], r["topicName"], r["msgBody"]) == ("queue", "jobs", "plain text, not JSON")
    assert r["msgTag"] == ["a", "b"]  # the routing key is just the queue name: no tag
    assert len(r["msgId"]) == 32  # no message_id: a random one
    assert r["publishTime"].endswith("Z")


def test_a_body_that_is_not_utf8_is_base64_with_a_flag() -> None:
    body = b"\xff\xfe\x00binary"
    ev = message_event("jobs", "jobs", FakeMessage(body))  # type: ignore[arg-type]
    assert ev.records[0]["body_base64"] is True
    r = render(ev)["Records"][0]["CMQ"]
    assert base64.b64decode(r["msgBody"]) == body
    assert r["msgTag"] == [BASE64_TAG]
    native = render(ev, "native")
    assert native["body_base64"] is True and base64.b64decode(native["body"]) == body


def test_odd_header_values_never_break_rendering() -> None:
    headers = {
        "d": Decimal("1.5"),
        "t": datetime(2026, 1, 1),
        "b": b"\xffraw",
        "s": "lone \udcff surrogate",
        "n": None,
        "nested": {"k": [1, b"x", float("nan")]},
    }
    native = cmq(FakeMessage(b"x", headers=headers), "native")
    assert native["headers"]["d"] == "1.5"
    assert native["headers"]["t"] == "2026-01-01T00:00:00+00:00"
    assert native["headers"]["b"] == {"base64": base64.b64encode(b"\xffraw").decode()}
    assert native["headers"]["nested"] == {"k": [1, "x", "nan"]}
    json.dumps(native)
    assert plain(object()).startswith("<object")
    assert header_tags({"tags": [b"x", 1, " "]}) == ["x", "1"]


def test_sample_event() -> None:
    src = source(url=URL, exchange="orders")
    r = render(src.sample_event(datetime(2026, 1, 1, tzinfo=UTC)))["Records"][0]["CMQ"]
    assert (r["type"], r["topicName"], r["subscriptionName"]) == ("topic", "orders", "jobs")
    assert src.status()["broker"] == "amqp://bridge:***@rabbit.example:5672/prod"


# --- the dead-letter sink ---------------------------------------------------------------------


def test_sink_urls() -> None:
    t = parse_sink_url("amqp://u:p@h:5672/v?queue=dlq&heartbeat=10")
    assert (t.queue, t.exchange, t.routing_key) == ("dlq", None, "dlq")
    assert t.url == "amqp://u:p@h:5672/v?heartbeat=10"
    t = parse_sink_url("amqp://u:p@h/?exchange=dead&routing_key=fn.thumbnail&password_file=/run/p")
    assert (t.queue, t.exchange, t.routing_key) == (None, "dead", "fn.thumbnail")
    assert t.password_file == Path("/run/p") and t.url == "amqp://u:p@h/"
    for bad, problem in (
        ("amqp://u:p@h/", "give either"),
        ("amqp://u:p@h/?queue=a&exchange=b", "give either"),
        ("amqp://u:p@h/?queue=a&routing_key=k", "routing_key goes with exchange"),
        ("amqp://u:p@h/?queue=a&queue=b", 'parameter "queue" is given twice'),
        ("amqp://u:p@:5672/?queue=a", "no host after amqp://"),
        ("amqp://u:p@h:port/?queue=a", "not a valid URL"),
    ):
        with pytest.raises(ValueError, match=problem) as e:
            parse_sink_url(bad)
        assert str(e.value).startswith('dead_letter = "amqp://u:***@')
        assert ":p@" not in str(e.value)
    assert parse_sink_url("amqps://u:p@h/?queue=q").url == "amqps://u:p@h/"


async def test_a_sink_that_cannot_publish_raises_clearly() -> None:
    ctx = DeadLetterContext(store=MemoryStore(), logger=logging.getLogger("test.dl"))
    sink = AmqpDeadLetterSink("amqp://u:sink-secret-pw@127.0.0.1:1/?queue=dlq", ctx)
    with pytest.raises(ConnectionError, match="cannot reach AMQP broker") as e:
        await sink.put({"RequestId": "r1", "Body": {}})
    assert "sink-secret-pw" not in str(e.value)
    await sink.close()
    await sink.close()
