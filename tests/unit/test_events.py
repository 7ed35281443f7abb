"""Event model and renderers: the exact JSON SCF functions receive."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bridge import events as ev


def test_timer_event_is_exactly_scf() -> None:
    t = datetime(2019, 2, 21, 19, 49, 0, 731000, tzinfo=timezone(timedelta(hours=8)))
    e = ev.timer_event("every-5s", t, "hello")
    assert ev.render(e) == {
        "Type": "Timer",
        "TriggerName": "every-5s",
        "Time": "2019-02-21T11:49:00Z",
        "Message": "hello",
    }


def test_event_is_immutable_deeply() -> None:
    rec = {"message": "m", "nested": {"a": [1, 2]}}
    e = ev.Event(kind=ev.Kind.TIMER, trigger="t", time=datetime.now(UTC), records=(rec,))
    rec["message"] = "changed"
    assert e.records[0]["message"] == "m"
    with pytest.raises(TypeError):
        e.records[0]["nested"]["a"] = 3  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.trigger = "x"  # type: ignore[misc]
    # thawed renderings are plain and independent
    out = ev.thaw(e.records[0])
    out["nested"]["a"].append(3)
    assert e.records[0]["nested"]["a"] == (1, 2)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ev.Event(kind=ev.Kind.TIMER, trigger="t", time=datetime(2020, 1, 1))


def test_cos_rendering() -> None:
    t = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    r = ev.cos_record(
        bucket="photos-1250000000",
        key="dir/a b.jpg",
        event_name="cos:ObjectCreated:Put",
        time=t,
        size=42,
        region="ap-guangzhou",
        appid="1250000000",
        url="http://photos-1250000000.cos.ap-guangzhou.myqcloud.com/dir/a%20b.jpg",
        request_id="req-1",
        notification_id="n1",
    )
    e = ev.Event(kind=ev.Kind.COS, trigger="uploads", time=t, records=(r,))
    out = ev.render(e)
    rec = out["Records"][0]
    assert rec["cos"]["cosObject"]["key"] == "/1250000000/photos-1250000000/dir/a b.jpg"
    assert rec["cos"]["cosObject"]["size"] == 42
    assert rec["cos"]["cosObject"]["meta"]["x-cos-request-id"] == "req-1"
    assert rec["cos"]["cosBucket"] == {
        "region": "ap-guangzhou",
        "name": "photos-1250000000",
        "appid": "1250000000",
    }
    assert rec["cos"]["cosSchemaVersion"] == "1.0"
    assert rec["event"]["eventName"] == "cos:ObjectCreated:Put"
    assert rec["event"]["eventTime"] == int(t.timestamp())
    assert rec["event"]["eventSource"] == "qcs::cos"
    assert set(rec["event"]) >= {
        "eventVersion",
        "requestParameters",
        "eventQueue",
        "reservedInfo",
        "reqid",
    }
    json.dumps(out)


def test_cmq_rendering() -> None:
    t = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    r = ev.cmq_record(
        msg_id="m1",
        body="payload",
        publish_time=t,
        topic="orders",
        owner="123",
        subscription="sub",
        request_id="r1",
        tags=["a", "b"],
    )
    out = ev.render(ev.Event(kind=ev.Kind.CMQ, trigger="q", time=t, records=(r,)))
    assert out == {
        "Records": [
            {
                "CMQ": {
                    "type": "topic",
                    "topicOwner": "123",
                    "topicName": "orders",
                    "subscriptionName": "sub",
                    "publishTime": "2024-05-01T12:00:00.500000Z",
                    "msgId": "m1",
                    "requestId": "r1",
                    "msgBody": "payload",
                    "msgTag": ["a", "b"],
                }
            }
        ]
    }


def test_ckafka_rendering_with_binary_payload() -> None:
    t = datetime(2024, 5, 1, tzinfo=UTC)
    recs = (
        ev.ckafka_record(topic="t", partition=0, offset=7, key=b"k", value=b"hello"),
        ev.ckafka_record(topic="t", partition=0, offset=8, key=None, value=b"\xff\x00"),
    )
    out = ev.render(ev.Event(kind=ev.Kind.CKAFKA, trigger="k", time=t, records=recs))
    assert out["Records"][0] == {
        "Ckafka": {"topic": "t", "partition": 0, "offset": 7, "msgKey": "k", "msgBody": "hello"}
    }
    second = out["Records"][1]["Ckafka"]
    assert (
        second["msgKey"] == "" and second["msgBody"] == "/wA=" and second["msgBodyBase64"] is True
    )


def test_cloudevents_and_native() -> None:
    t = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    e = ev.Event(
        kind=ev.Kind.TIMER, trigger="t", time=t, records=({"message": "m"},), native={"raw": [1]}
    )
    ce = ev.render(e, "cloudevents")
    assert ce["specversion"] == "1.0"
    assert ce["id"] == e.id
    assert ce["type"] == "com.tencentcloud.scf.timer"
    assert ce["time"] == "2024-05-01T08:00:00Z"
    assert ce["data"] == ev.render(e)
    assert ev.render(e, "native") == {"raw": [1]}
    no_native = ev.timer_event("t", t, "m")
    assert ev.render(no_native, "native") == ev.render(no_native)
    with pytest.raises(ValueError):
        ev.render(e, "xml")


def test_request_source() -> None:
    assert ev.timer_event("t", datetime.now(UTC)).request_source == "TRIGGER_TIMER"


def test_dumps_takes_what_the_standard_library_takes_and_refuses_what_it_refuses() -> None:
    from bridge.events import dumps

    assert (
        dumps({"a": "é", "n": 2**70, 1: [1.5, None]})
        == '{"a":"é","n":1180591620717411303424,"1":[1.5,null]}'.encode()
    )
    for bad in ({"t": datetime(2026, 1, 1, tzinfo=UTC)}, {"s": "\ud800"}, {"o": object()}):
        with pytest.raises((TypeError, ValueError)):
            dumps(bad)


def test_a_raw_event_keeps_its_bytes_and_decodes_once_on_demand() -> None:
    from bridge.events import RawEvent

    ev = RawEvent(b'{"Type":"Timer","Message":"m"}')
    assert ev.raw == b'{"Type":"Timer","Message":"m"}' and ev._obj is None
    assert ev.is_object() and not RawEvent(b"[1]").is_object()
    assert ev["Message"] == "m" and dict(ev) == {"Type": "Timer", "Message": "m"}
    assert ev.obj is ev.obj


def test_a_deferred_event_is_written_once_when_read_and_checked_against_its_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from bridge.events import RawEvent

    calls: list[int] = []

    def write() -> bytes:
        calls.append(1)
        return b'{"Records":[]}'

    # Given an event whose JSON is written on demand
    ev = RawEvent.deferred(write, 14, b'{"records":0,"wrap":"W","names":[],"columns":[]}')
    # Then what the core asks before invoking does not write it
    assert ev.is_object() and ev.size == 14 and ev.plain and "deferred" in repr(ev)
    assert not calls
    # When something reads it, it is written once
    assert ev.raw == b'{"Records":[]}' and ev.raw is ev.raw and ev["Records"] == []
    assert calls == [1] and ev.is_object() and ev.size == 14
    # And a writer whose bytes are not the size announced is a bug, said at once; the
    # JSON is still there (for a dead letter) and its size the true one
    wrong = RawEvent.deferred(write, 15, b"{}")
    assert wrong.raw == b'{"Records":[]}' and wrong.size == 14
    assert "JSON is 14 bytes, not 15" in caplog.text


def test_an_event_encoded_by_orjson_is_plain_and_one_it_refuses_is_not() -> None:
    from bridge.events import RawEvent, dumps

    ok = {"Records": [{"offset": 2**64 - 1, "n": -(2**63), "f": 1e16, "s": "é\u2028"}]}
    ev = RawEvent.encode(ok)
    assert ev.plain and ev.raw == dumps(ok) and ev.obj is ok
    assert json.loads(ev.raw) == ok  # what orjson wrote, the standard library reads alike
    for refused in ({"big": 2**64}, {1: "non-string key"}):  # the standard library's then
        ev = RawEvent.encode(refused)
        assert not ev.plain and ev.raw == dumps(refused)
    with pytest.raises(ValueError):  # what neither encodes fails as dumps fails
        RawEvent.encode({"s": "\ud800"})
    assert not RawEvent(b'{"a": 1}').plain  # bytes from elsewhere: not known to be plain


def test_request_ids_are_uuid4_text() -> None:
    import uuid

    from bridge.events import request_id

    ids = {request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in list(ids)[:200]:
        u = uuid.UUID(rid)
        assert str(u) == rid and u.version == 4 and u.variant == uuid.RFC_4122


def test_loads_reads_json_as_the_standard_library_does() -> None:
    from bridge.events import RawEvent, loads

    big = '{"id": 123456789012345678901234567890, "n": [1, 2.5], "s": "12345678901234567890"}'
    # an integer beyond 64 bits stays an integer (orjson alone makes it a float)
    assert loads(big) == json.loads(big)
    assert isinstance(loads(big)["id"], int)
    assert RawEvent(big.encode()).obj == json.loads(big)
    assert loads(b'{"x": NaN}')["x"] != 0  # what orjson refuses, json reads
