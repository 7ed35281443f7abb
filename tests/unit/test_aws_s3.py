"""sources.aws_s3: notification parsing and mapping, filters, and polling mode against an
in-memory bucket double and an in-memory state store (restart, out-of-order acks, nack)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from bridge.abc import Delivery, EndOfInput, SourceContext, Undeliverable
from bridge.deadletter import DeadLetters
from bridge.events import render
from bridge.store import DeadLetterRow
from bridge.testing import MemoryStore
from sources.aws_s3 import (
    Filter,
    NotANotification,
    S3Config,
    S3Source,
    cos_event_name,
    diff,
    notification_record,
    parse_notification,
)

S3_RECORD = {
    "eventVersion": "2.1",
    "eventSource": "aws:s3",
    "awsRegion": "us-east-1",
    "eventTime": "2026-11-29T13:58:01.699Z",
    "eventName": "ObjectCreated:Put",
    "s3": {
        "configurationId": "cfg",
        "bucket": {"name": "photos"},
        "object": {"key": "a+b%2Fc%2Bd+%C3%BC.txt", "size": 5, "eTag": "5d41"},
    },
}


def test_parse_notification_shapes() -> None:
    doc = parse_notification(json.dumps({"Records": [S3_RECORD]}))
    assert doc is not None and doc["Records"][0]["eventName"] == "ObjectCreated:Put"
    sns = {"Type": "Notification", "Message": json.dumps({"Records": [S3_RECORD]})}
    assert parse_notification(json.dumps(sns)) == doc
    assert parse_notification('{"Service":"Amazon S3","Event":"s3:TestEvent"}') is None
    for bad in ("not json", "[1, 2]", '{"Records": [{"x": 1}]}', '{"hello": 1}'):
        with pytest.raises(NotANotification):
            parse_notification(bad)


def test_record_mapping_decodes_keys() -> None:
    rec = notification_record(S3_RECORD, appid="1250000000", cos_region="gz", endpoint=None)
    assert rec["key"] == "a b/c+d ü.txt" and rec["size"] == 5 and rec["bucket"] == "photos"
    assert rec["event_name"] == "cos:ObjectCreated:Put" and rec["region"] == "gz"
    assert rec["url"] == "https://photos.s3.us-east-1.amazonaws.com/a%20b/c%2Bd%20%C3%BC.txt"
    from bridge.events import Event, Kind

    ev = Event(kind=Kind.COS, trigger="t", time=datetime.now(UTC), records=(rec,))
    cos = render(ev)["Records"][0]
    assert cos["cos"]["cosObject"]["key"] == "/1250000000/photos/a b/c+d ü.txt"
    assert cos["event"]["eventTime"] == int(
        datetime(2026, 11, 29, 13, 58, 1, tzinfo=UTC).timestamp()
    )
    assert cos["event"]["eventName"] == "cos:ObjectCreated:Put"


def test_event_names_and_filters() -> None:
    assert cos_event_name("s3:ObjectRemoved:Delete") == "cos:ObjectRemove:Delete"
    assert cos_event_name("ObjectCreated:CompleteMultipartUpload") == (
        "cos:ObjectCreated:CompleteMultipartUpload"
    )
    f = Filter("img/", ".jpg", ("ObjectCreated:*",))
    assert f.key("img/a.jpg") and not f.key("img/a.png") and not f.key("doc/a.jpg")
    assert f.event("cos:ObjectCreated:Copy") and not f.event("cos:ObjectRemove:Delete")


def test_config_keys() -> None:
    base = {"type": "aws_s3", "function": "f"}
    with pytest.raises(ValidationError, match="needs queue_url"):
        S3Config.model_validate(base)
    with pytest.raises(ValidationError, match="needs bucket"):
        S3Config.model_validate({**base, "mode": "polling"})
    with pytest.raises(ValidationError, match="invalid event name"):
        S3Config.model_validate({**base, "queue_url": "q", "events": ["Put"]})
    c = S3Config.model_validate({**base, "queue_url": "q", "events": ["s3:ObjectCreated:*"]})
    assert c.appid == "0" and c.mode == "notifications"


def test_diff_skips_keys_in_flight() -> None:
    stored = {"a": ("e1", 1, 1.0), "b": ("e2", 2, 2.0), "gone": ("e3", 3, 3.0)}
    current = {"a": ("e1", 1, 1.0), "b": ("e9", 9, 9.0), "new": ("e4", 4, 0.5)}
    changes = diff(current, stored, busy={"gone"})
    assert [(c.key, c.name) for c in changes] == [
        ("new", "ObjectCreated:Put"),
        ("b", "ObjectCreated:Put"),
    ]


# --- polling ----------------------------------------------------------------------------------


class FakeS3:
    """A bucket listing in memory, paginated like ListObjectsV2 (page size 2)."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[str, int, float]] = {}

    def put(self, key: str, body: bytes, t: float = 1_800_000_000.0) -> None:
        self.objects[key] = (f"etag-{hash(body) & 0xFFFF:x}", len(body), t)

    def head_bucket(self, **kw: Any) -> None:
        pass

    def get_paginator(self, name: str) -> Any:
        assert name == "list_objects_v2"
        bucket = self

        class P:
            def paginate(self, **kw: Any) -> Any:
                keys = sorted(k for k in bucket.objects if k.startswith(kw.get("Prefix", "")))
                for i in range(0, max(len(keys), 1), 2):
                    yield {
                        "Contents": [
                            {
                                "Key": k,
                                "ETag": f'"{bucket.objects[k][0]}"',
                                "Size": bucket.objects[k][1],
                                "LastModified": datetime.fromtimestamp(bucket.objects[k][2], UTC),
                            }
                            for k in keys[i : i + 2]
                        ]
                    }

        return P()


def polling(store: MemoryStore, bucket: FakeS3, **fields: Any) -> S3Source:
    body = {
        "type": "aws_s3",
        "function": "f",
        "mode": "polling",
        "bucket": "b",
        "interval": "100ms",
        "region": "us-east-1",
        **fields,
    }
    ctx = SourceContext(
        name="s3",
        function="f",
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger("t"),
    )
    src = S3Source(S3Config.model_validate(body), ctx)
    src._client = bucket
    return src


def keys(ds: list[Delivery]) -> list[tuple[str, str]]:
    return [(d.event.records[0]["event_name"], d.event.records[0]["key"]) for d in ds]


async def test_polling_baseline_changes_and_restart_without_duplicates() -> None:
    store, bucket = MemoryStore(), FakeS3()
    bucket.put("old.txt", b"x")
    src = polling(store, bucket)
    await src.connect()  # the baseline: old.txt gives no event
    bucket.put("a.txt", b"hello", t=1_800_000_001)
    bucket.put("b.txt", b"hi", t=1_800_000_002)
    got = [await src.read(), await src.read()]
    assert keys(got) == [("cos:ObjectCreated:Put", "a.txt"), ("cos:ObjectCreated:Put", "b.txt")]
    assert got[0].event.records[0]["size"] == 5
    # Acks out of order; a.txt is acked, b.txt never is (the process dies)
    await got[0].ack()
    await src.close()
    # Given a.txt was modified and old.txt deleted while down
    bucket.put("a.txt", b"hello again", t=1_800_000_005)
    del bucket.objects["old.txt"]
    src2 = polling(store, bucket)
    await src2.connect()
    got2 = [await src2.read() for _ in range(3)]
    assert keys(got2) == [
        ("cos:ObjectCreated:Put", "b.txt"),  # never acked: delivered again
        ("cos:ObjectCreated:Put", "a.txt"),  # changed while down
        ("cos:ObjectRemove:Delete", "old.txt"),
    ]
    for d in reversed(got2):
        await d.ack()
    # Then nothing more, and a third instance sees nothing new either
    reader = asyncio.ensure_future(src2.read())
    await asyncio.sleep(0.35)
    assert not reader.done()
    await src2.close()
    with pytest.raises(EndOfInput):
        await reader
    src3 = polling(store, bucket)
    await src3.connect()
    reader = asyncio.ensure_future(src3.read())
    await asyncio.sleep(0.35)
    assert not reader.done()
    await src3.close()
    with pytest.raises(EndOfInput):
        await reader
    assert src3.status()["objects"] == 2


async def test_polling_nack_is_found_again_and_in_flight_keys_are_not_repeated() -> None:
    store, bucket = MemoryStore(), FakeS3()
    src = polling(store, bucket)
    await src.connect()
    bucket.put("k", b"1")
    d = await src.read()
    # While d is in flight, later scans do not deliver k again
    bucket.put("other", b"2", t=1_800_000_009)
    d2 = await src.read()
    assert keys([d2]) == [("cos:ObjectCreated:Put", "other")]
    await d.nack()
    again = await asyncio.wait_for(src.read(), 2)
    assert keys([again]) == [("cos:ObjectCreated:Put", "k")]
    await again.ack()
    await d2.ack()
    await src.close()


async def test_polling_filters_checkpoint_without_events() -> None:
    store, bucket = MemoryStore(), FakeS3()
    bucket.put("x.jpg", b"1")
    src = polling(store, bucket, suffix=".jpg", events=["cos:ObjectCreated:*"])
    await src.connect()
    del bucket.objects["x.jpg"]  # removed: filtered out, but the listing moves on
    bucket.put("y.png", b"2")  # suffix filtered
    bucket.put("z.jpg", b"3")
    d = await src.read()
    assert keys([d]) == [("cos:ObjectCreated:Put", "z.jpg")]
    await d.ack()
    await src.close()
    src2 = polling(store, bucket, suffix=".jpg", events=["cos:ObjectCreated:*"])
    await src2.connect()
    assert src2.status()["objects"] == 1  # z.jpg only
    await src2.close()


# --- notifications: a message that is not a notification -------------------------------------


class DlqStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.dead: list[DeadLetterRow] = []

    async def dead_letter(self, queue_id: str | None, row: DeadLetterRow) -> None:
        self.dead.append(row)


async def read_through_core(src: S3Source, store: DlqStore) -> Delivery:
    """The next event delivery, settling undeliverable ones as the core does: dead-letter
    through the service, then ack."""
    while True:
        d = await asyncio.wait_for(src.read(), 5)
        if not isinstance(d, Undeliverable):
            return d
        await DeadLetters(store).write_undeliverable(d, trigger="s3", function="f")
        await d.ack()


async def test_a_message_that_is_no_notification_is_dead_lettered_and_deleted() -> None:
    from tests.unit.test_aws_sqs import URL, FakeSqs

    fake = FakeSqs()
    fake.send('{"Service":"Amazon S3","Event":"s3:TestEvent"}')
    fake.send("garbage")
    fake.send(json.dumps({"Records": [S3_RECORD]}))
    store = DlqStore()
    ctx = SourceContext(
        name="s3",
        function="f",
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger("t"),
    )
    src = S3Source(
        S3Config.model_validate(
            {"type": "aws_s3", "function": "f", "queue_url": URL, "wait_time": "0s"}
        ),
        ctx,
    )
    assert src.consumer is not None
    src.consumer.client = fake
    await src.connect()
    d = await read_through_core(src, store)
    assert keys([d]) == [("cos:ObjectCreated:Put", "a b/c+d ü.txt")]
    await d.ack()
    assert fake.messages == {}
    [row] = store.dead
    rec = json.loads(row.record)
    assert rec["ErrorClass"] == "invalid_request" and rec["Body"]["RequestSource"] == "TRIGGER_COS"
    assert "not an S3 event notification: not JSON" in rec["ErrorMessage"]
    assert json.loads(rec["Body"]["ClientContext"])["body"] == "garbage"
    assert src.status()["rejected"] == 1 and src.status()["test_events"] == 1
    await src.close()


def _with(path: tuple[str, ...], value: Any, *, ascii: bool = True) -> str:
    rec = json.loads(json.dumps(S3_RECORD))
    node = rec
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    # ascii: a lone surrogate travels as its \\ud800 escape; else raw (a non-validating server)
    return json.dumps({"Records": [rec]}, ensure_ascii=ascii)


MALFORMED = {
    "size": (_with(("s3", "object", "size"), "12KB"), r"Records\[0\]\.s3\.object\.size"),
    "object": (_with(("s3", "object"), "a string"), r"Records\[0\]\.s3\.object"),
    "surrogate": (_with(("s3", "object", "key"), "bad\ud800key"), "not valid Unicode"),
    "raw surrogate": (
        _with(("s3", "object", "eTag"), "e\udcff", ascii=False),
        r"Records\[0\]\.s3\.object\.eTag.*not valid Unicode",
    ),
    "bucket": (_with(("s3", "bucket"), ["x"]), r"Records\[0\]\.s3\.bucket"),
    "time": (_with(("eventTime",), 12), r"Records\[0\]\.eventTime"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parse_notification_validates_every_field_it_maps(case: str) -> None:
    body, where = MALFORMED[case]
    with pytest.raises(NotANotification, match=where):
        parse_notification(body)


async def test_malformed_notifications_are_dead_lettered_not_held() -> None:
    from tests.unit.test_aws_sqs import URL, FakeSqs

    fake = FakeSqs()
    for case in sorted(MALFORMED):
        fake.send(MALFORMED[case][0])
    fake.send(json.dumps({"Records": [S3_RECORD]}))
    store = DlqStore()
    ctx = SourceContext(
        name="s3",
        function="f",
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger("t"),
    )
    src = S3Source(
        S3Config.model_validate(
            {"type": "aws_s3", "function": "f", "queue_url": URL, "wait_time": "0s"}
        ),
        ctx,
    )
    assert src.consumer is not None
    src.consumer.client = fake
    await src.connect()
    # When the malformed ones come first, read() hands them to the core as undeliverable
    d = await read_through_core(src, store)
    assert keys([d]) == [("cos:ObjectCreated:Put", "a b/c+d ü.txt")]
    await d.ack()
    # Then none is held invisible: all dead-lettered (durably) and deleted
    assert fake.messages == {}
    assert len(store.dead) == len(MALFORMED)
    for row in store.dead:
        rec = json.loads(row.record)
        assert rec["ErrorClass"] == "invalid_request"
        row.record.encode()  # storable and sendable as UTF-8
    assert src.status()["rejected"] == len(MALFORMED)
    await src.close()


async def test_replicas_name_a_change_alike_so_the_queue_accepts_it_once() -> None:
    # Given two replicas polling one bucket with one shared store
    store, bucket = MemoryStore(), FakeS3()
    a, b = polling(store, bucket), polling(store, bucket)
    await a.connect()
    await b.connect()
    bucket.put("k", b"1", t=1_800_000_001)
    da, db = await a.read(), await b.read()
    # Then both emit the change under one dedupe key (the queue's fire-once key)
    assert da.dedupe_key is not None and da.dedupe_key == db.dedupe_key
    await da.ack()
    await db.ack()
    # And a new version of the object, and its removal, are other changes
    bucket.put("k", b"22", t=1_800_000_002)
    changed = await a.read()
    await changed.ack()
    del bucket.objects["k"]
    removed = await a.read()
    await removed.ack()
    assert len({da.dedupe_key, changed.dedupe_key, removed.dedupe_key}) == 3
    await a.close()
    await b.close()
