"""Fuzzing the parsers of outside input: the config loader, the cron parser, durations and
sizes, the event renderers, the S3/SQS/AMQP message parsers and the API-gateway event and
response mapping. The promise: a value, or a clear error (ConfigError/ValueError with a
message); never another exception, and what was accepted always renders to JSON."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st

from bridge import config as cfgmod
from bridge import cron, events
from bridge.apigw import (
    ApigwConfig,
    ApigwTrigger,
    FunctionUrlConfig,
    FunctionUrlTrigger,
    HttpRequest,
    InvalidResponse,
    integrated_response,
    passthrough_response,
)
from bridge.errors import ConfigError
from sources import amqp, aws_s3, aws_sqs
from sources._aws import QueueInfo, SqsMessage

# --- building blocks ---------------------------------------------------------------------------

text = st.text(max_size=40)
#: strings, including lone surrogates (JSON's "\ud800" escape can carry them)
any_text = st.text(st.characters(codec=None), max_size=40) | text
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)


def must_render(obj: Any) -> None:
    """What a parser accepted becomes an event that encodes as the bytes functions receive."""
    json.loads(events.dumps(obj))


# --- config --------------------------------------------------------------------------------------

DURATIONS = st.sampled_from(["500ms", "60s", "6h", "1d", "0s", "-1s", "1.5m", "x", "", "9" * 30])
toml_values = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | text | DURATIONS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
SECTIONS = {
    "daemon": ["state_dir", "timezone", "max_in_flight", "queue_poll", "log_format", "isolation"],
    "api": ["enabled", "listen", "tokens"],
    "functions": [],
    "triggers": [],
    "logs": ["enabled", "retention", "max_size"],
}
FUNCTION_KEYS = ["runtime", "code", "handler", "timeout", "memory", "concurrency", "environment",
                 "async", "url", "command", "isolation"]  # fmt: skip
TRIGGER_KEYS = ["type", "function", "cron", "message", "catchup", "path", "queue", "url",
                "format", "enabled", "topics", "bootstrap_servers"]  # fmt: skip
RUNTIMES = st.sampled_from(["python", "http", "command", "nope"])
TYPES = st.sampled_from(["timer", "filesystem", "amqp", "kafka", "sqs", "s3", "apigw", "nope"])


@st.composite
def config_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A TOML-ish document: mostly the real sections and keys with random values, plus
    unknown keys and wrong types."""
    doc: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        if not draw(st.booleans()):
            continue
        if section == "functions":
            doc[section] = {
                draw(st.sampled_from(["f", "g", "", "a.b"])): {
                    k: draw(RUNTIMES if k == "runtime" else toml_values)
                    for k in draw(st.lists(st.sampled_from(FUNCTION_KEYS), max_size=5))
                }
                for _ in range(draw(st.integers(0, 2)))
            }
        elif section == "triggers":
            doc[section] = {
                draw(st.sampled_from(["t", "u", "x y"])): {
                    k: draw(TYPES if k == "type" else st.sampled_from(["f", "g"]) | toml_values)
                    for k in draw(st.lists(st.sampled_from(TRIGGER_KEYS), max_size=6))
                }
                for _ in range(draw(st.integers(0, 2)))
            }
        else:
            doc[section] = draw(
                st.dictionaries(st.sampled_from([*keys, "bogus"]), toml_values, max_size=4)
                | toml_values
            )
    if draw(st.booleans()):
        doc[draw(text)] = draw(toml_values)
    return doc


@given(doc=config_docs())
def test_config_parse_gives_a_config_or_a_config_error(tmp_path: Path, doc: dict[str, Any]) -> None:
    try:
        cfgmod.parse(doc, base_dir=tmp_path, env={})
    except ConfigError as e:
        assert e.problems and all(msg for _, msg in e.problems), e
        assert str(e).startswith("invalid configuration")


@given(src=st.text(string.printable, max_size=200))
def test_config_file_of_any_text_is_a_config_error(tmp_path: Path, src: str) -> None:
    p = tmp_path / "bridge.toml"
    p.write_text(src)
    try:
        cfgmod.load(p, env={})
    except ConfigError as e:
        assert str(e).strip()


@given(value=st.text(max_size=60), env=st.dictionaries(st.sampled_from("ABC"), text, max_size=3))
def test_interpolation_of_any_string(value: str, env: dict[str, str]) -> None:
    problems: list[tuple[str, str]] = []
    out = cfgmod.interpolate({"k": value}, env, "", problems)
    assert all(msg for _, msg in problems)
    assert isinstance(out, dict)


@given(value=scalars | st.text("0123456789.smhdµnu KMGiB-+e", max_size=12))
def test_durations_and_sizes(value: Any) -> None:
    for parse in (cfgmod.parse_duration, cfgmod.parse_size):
        try:
            got = parse(value)
        except ValueError as e:
            assert str(e)
        else:
            assert isinstance(got, int | float) and got >= 0


# --- cron ----------------------------------------------------------------------------------------

cron_text = st.text("0123456789*/,-?LW# ", max_size=40) | st.builds(
    lambda a, b: f"@{a} {b}".strip(),
    st.sampled_from(["every", "hourly", "daily", "weekly", "monthly", "yearly", "x"]),
    st.text("0123456789smhd", max_size=6),
)
ZONES = st.sampled_from(["UTC", "Asia/Shanghai", "America/New_York", "Europe/London"])
instants = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2098, 1, 1), timezones=st.just(UTC)
)


@given(expr=cron_text | any_text, zone=ZONES, t=instants)
def test_cron_parses_or_names_the_problem(expr: str, zone: str, t: datetime) -> None:
    try:
        s = cron.parse_schedule(expr, ZoneInfo(zone))
    except ValueError as e:
        assert "invalid cron expression" in str(e)
        return
    nxt = s.next_after(t)
    if nxt is not None:
        assert nxt.astimezone(UTC) > t and nxt.microsecond == 0


@given(
    fields=st.lists(
        st.sampled_from(["*", "*/5", "0", "1-5", "10,20", "59", "?", "L", "1/2", "2024"]),
        min_size=5,
        max_size=7,
    ),
    zone=ZONES,
    t=instants,
)
def test_cron_field_combinations(fields: list[str], zone: str, t: datetime) -> None:
    test_cron_parses_or_names_the_problem.hypothesis.inner_test(" ".join(fields), zone, t)  # type: ignore[attr-defined]


# --- events --------------------------------------------------------------------------------------

FORMATS = list(events.Format)


@given(trigger=any_text, message=any_text, fmt=st.sampled_from(FORMATS))
def test_timer_events_render(trigger: str, message: str, fmt: events.Format) -> None:
    ev = events.timer_event(trigger, datetime(2026, 1, 1, tzinfo=UTC), message)
    out = events.render(ev, fmt)
    try:
        must_render(out)
    except UnicodeEncodeError:
        # a lone surrogate cannot be sent; the dead letter keeps it escaped
        json.loads(events.salvage(ev, fmt))


@given(key=st.binary(max_size=30) | st.none() | text, value=st.binary(max_size=60) | st.none())
def test_kafka_records_of_any_bytes_render(key: Any, value: Any) -> None:
    rec = events.ckafka_record(topic="t", partition=0, offset=1, key=key, value=value)
    ev = events.Event(kind=events.Kind.CKAFKA, trigger="k", time=datetime.now(UTC), records=(rec,))
    for fmt in FORMATS:
        must_render(events.render(ev, fmt))


# --- S3 notifications -----------------------------------------------------------------------------

S3_FIELDS = {
    "eventName": st.sampled_from(["ObjectCreated:Put", "ObjectRemoved:Delete", "x"]) | scalars,
    "eventTime": st.sampled_from(["2026-01-01T00:00:00.000Z", "bad"]) | scalars,
    "awsRegion": st.sampled_from(["us-east-1"]) | scalars,
    "requestParameters": st.fixed_dictionaries({"sourceIPAddress": scalars}) | scalars,
    "responseElements": st.fixed_dictionaries({"x-amz-request-id": scalars}) | scalars,
}
s3_objects = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from(["a%2Fb+c", "%ZZ", "%ED%A0%80", "x"]) | any_text | scalars,
        "size": st.integers(-5, 2**70) | st.sampled_from(["12", "12KB", "-1", "١٢"]) | scalars,
        "eTag": scalars,
        "versionId": scalars,
        "contentType": scalars,
    },
)
s3_records = st.fixed_dictionaries(
    {"s3": st.fixed_dictionaries(
        {},
        optional={
            "bucket": st.fixed_dictionaries({}, optional={"name": any_text | scalars}) | scalars,
            "object": s3_objects | scalars,
            "configurationId": scalars,
        },
    )},
    optional=S3_FIELDS,
)  # fmt: skip


@st.composite
def s3_bodies(draw: st.DrawFn) -> str:
    doc: Any = {"Records": draw(st.lists(s3_records, max_size=3))}
    if draw(st.booleans()):
        doc = draw(json_values)
    text = json.dumps(doc)
    if draw(st.booleans()):  # wrapped by SNS
        text = json.dumps({"Type": "Notification", "Message": text})
    if draw(st.integers(0, 9)) == 0:
        text = draw(any_text)
    return text


@given(body=s3_bodies())
def test_s3_notifications_are_parsed_or_refused(body: str) -> None:
    try:
        doc = aws_s3.parse_notification(body)
    except aws_s3.NotANotification as e:
        assert str(e)
        return
    if doc is None:
        return
    # accepted: every record maps and renders (else the message would be stuck after the take)
    for r in doc["Records"]:
        rec = aws_s3.notification_record(r, appid="1", cos_region=None, endpoint=None)
        ev = events.Event(
            kind=events.Kind.COS, trigger="s3", time=datetime.now(UTC), records=(rec,)
        )
        for fmt in FORMATS:
            must_render(events.render(ev, fmt))


# --- SQS messages --------------------------------------------------------------------------------

sqs_attrs = st.dictionaries(
    any_text,
    st.fixed_dictionaries(
        {}, optional={"StringValue": any_text, "BinaryValue": st.binary(max_size=8),
                      "DataType": st.sampled_from(["String", "Binary", "Number"])}
    ),
    max_size=3,
)  # fmt: skip
QUEUE = QueueInfo(url="u", arn="a", name="q", account="1", region="r", fifo=False)


@given(
    raw=st.fixed_dictionaries(
        {"ReceiptHandle": text},
        optional={
            "MessageId": any_text,
            "Body": any_text,
            "MD5OfBody": text,
            "Attributes": st.dictionaries(
                st.sampled_from(["SentTimestamp", "MessageGroupId"]),
                any_text | st.integers().map(str),
            ),
            "MessageAttributes": sqs_attrs,
        },
    )
)
@example(raw={"ReceiptHandle": "r", "Attributes": {"SentTimestamp": "9" * 20}})  # found by fuzzing
@example(raw={"ReceiptHandle": "r", "Attributes": {"SentTimestamp": "-" + "9" * 16}})
def test_sqs_messages_become_events_that_render(raw: dict[str, Any]) -> None:
    m = SqsMessage.of(raw, 0.0)
    ev = aws_sqs.message_event("q", m, QUEUE)
    for fmt in FORMATS:
        try:
            must_render(events.render(ev, fmt))
        except UnicodeEncodeError:
            # only through what the queue itself let in (ids, attributes): kept as a dead letter
            json.loads(events.salvage(ev, fmt))


# --- AMQP messages --------------------------------------------------------------------------------

amqp_values = st.recursive(
    scalars | st.binary(max_size=8) | st.decimals(allow_nan=True) | st.datetimes(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=10,
)


@given(
    body=st.binary(max_size=64),
    headers=st.none() | st.dictionaries(any_text, amqp_values, max_size=4),
    exchange=any_text,
    routing_key=any_text,
    message_id=st.none() | any_text,
    correlation_id=st.none() | any_text,
    timestamp=st.none() | st.datetimes(),
)
def test_amqp_messages_become_events_that_render(**fields: Any) -> None:
    keys = ["content_type", "content_encoding", "type", "app_id", "user_id", "reply_to"]
    msg = SimpleNamespace(
        **fields,
        redelivered=False,
        expiration=None,
        priority=None,
        **dict.fromkeys(keys),
    )
    ev = amqp.message_event("t", "q", msg, now=datetime.now(UTC))  # type: ignore[arg-type]
    for fmt in FORMATS:
        must_render(events.render(ev, fmt))


# --- API gateway ---------------------------------------------------------------------------------


def _trigger(cls: Any, config_cls: Any, **kw: Any) -> Any:
    t = cls.__new__(cls)
    t.config = config_cls.model_validate({"type": "x", "function": "f", "path": "/", **kw})
    return t


@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    path=any_text,
    query=st.dictionaries(any_text, any_text | st.lists(any_text, max_size=3), max_size=3),
    headers=st.dictionaries(any_text, any_text, max_size=4),
    body=st.binary(max_size=64),
    content_type=st.sampled_from(["application/json", "text/plain", "image/png", ""]),
)
def test_gateway_events_of_any_request_render(
    method: str,
    path: str,
    query: dict[str, Any],
    headers: dict[str, str],
    body: bytes,
    content_type: str,
) -> None:
    req = HttpRequest(
        method=method, path=path, template="/", path_params={}, query=query, headers=headers,
        body=body, content_type=content_type, source_ip="127.0.0.1", request_id="r",
        service_id="s", identity={},
    )  # fmt: skip
    for cls, conf in ((ApigwTrigger, ApigwConfig), (FunctionUrlTrigger, FunctionUrlConfig)):
        t = _trigger(cls, conf)
        event = t.event(req)
        if event["body"] and not event.get("isBase64Encoded"):
            assert event["body"].encode() == body


results = json_values | st.fixed_dictionaries(
    {},
    optional={
        "statusCode": scalars | st.integers(0, 1000),
        "headers": json_values,
        "body": json_values,
        "isBase64Encoded": scalars | st.booleans(),
    },
)


@given(value=results)
def test_function_results_map_to_a_response_or_a_clear_error(value: Any) -> None:
    for mapping in (integrated_response, passthrough_response):
        try:
            r = mapping(value)
        except InvalidResponse as e:
            assert str(e)
        else:
            assert 100 <= r.status <= 599
