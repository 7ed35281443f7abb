"""The S3 trigger (``type = "aws_s3"``): object events of any S3-compatible store as SCF COS events.

Two modes:

``mode = "notifications"`` (AWS S3, MinIO, Ceph RGW, COS' S3 API...)
    The bucket sends its event notifications to an SQS queue (``queue_url``),
    directly or through an SNS topic (the SNS envelope is unwrapped). Each SQS
    message becomes one event whose records are the notification's records
    that pass the filters; a message none of whose records pass, and S3's
    ``s3:TestEvent``, are deleted without an event. Keys arrive URL-encoded and
    are decoded (``unquote_plus``). Reading, deleting (only in ``ack()``) and
    visibility extension are :class:`sources._aws.SqsConsumer`'s, as for
    ``aws_sqs``. A message that is not an S3 event notification (not JSON, JSON
    of another shape, or a field of the wrong type — a ``size`` of ``"12KB"``, an
    ``object`` that is a string, text with a lone surrogate: every mapped field
    is checked when the message is parsed) is dead-lettered at once as
    ``invalid_request`` and deleted, never redelivered in a loop (see
    :class:`bridge.abc.Undeliverable`: the core dead-letters it, then acks).

``mode = "polling"`` (stores without notifications)
    Every ``interval`` the bucket (``prefix``) is listed, page by page, and
    compared with the last listing kept in the state store (ETag, size,
    last-modified): a new or changed object gives ``cos:ObjectCreated:Put``, a
    vanished one ``cos:ObjectRemove:Delete``. The stored listing changes only
    inside ``ack()``, one object at a time: each event is about one key, so acks
    may arrive in any order, and a key whose event is still in flight is left
    out of the next comparison. A crash after some acks resumes exactly there
    (no duplicates); objects created while the daemon was down differ from the
    stored listing and are emitted by the first scan. The very first scan of a
    trigger (nothing stored) records a baseline and emits nothing, so enabling
    a trigger on a full bucket does not fire for every existing object. Each
    event carries a dedupe key (key, event and object version), so replicas that
    share a PostgreSQL store and all list the bucket queue each change once. The
    listing is stored in 64 shards by key hash (:class:`bridge.checkpoint.ShardedState`),
    so an ack rewrites 1/64th of it, and concurrent acks share one write.

Records (bridge.events.cos_record, rendered by the core): ``key`` is the
decoded object key (the renderer writes ``/<appid>/<bucket>/<key>``),
``eventTime`` the event's unix time, event names ``cos:`` + S3's name
(``cos:ObjectCreated:Put``, ``…:Copy``, ``…:CompleteMultipartUpload``,
``cos:ObjectRemove:Delete``...). ``appid`` (default ``"0"``) and ``cos_region``
(default: the bucket's AWS region) fill the COS-only fields. Filters:
``prefix``, ``suffix`` and ``events`` (patterns such as
``"cos:ObjectCreated:*"``; ``s3:`` names are accepted too). ``format =
"native"`` gives the S3 notification itself (polling synthesizes one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal
from urllib.parse import quote, quote_plus, unquote_plus

from pydantic import Field, field_validator, model_validator

from bridge.plugin import (
    Closed,
    Delivery,
    Duration,
    EndOfInput,
    Event,
    Kind,
    NotConnected,
    SettleDelivery,
    ShardedState,
    Source,
    SourceContext,
    Undeliverable,
    Worker,
    cos_record,
)
from sources._aws import SQS_BATCH, AwsConfig, AwsError, Connection, SqsMessage, explain
from sources.aws_sqs import consumer_for

SHARDS = 64
_NS = "aws_s3"
_EVENT_PATTERN = "Category:Name, e.g. cos:ObjectCreated:* or cos:ObjectRemove:Delete"


class S3Config(AwsConfig):
    """``[triggers.NAME]`` with ``type = "aws_s3"``."""

    mode: Literal["notifications", "polling"] = Field(
        "notifications",
        description="notifications: read S3 event notifications from an SQS queue; polling: "
        "list the bucket every interval.",
    )
    queue_url: str | None = Field(
        None, description="notifications: the SQS queue (URL or name) the bucket notifies."
    )
    bucket: str | None = Field(
        None, description="polling: the bucket to list; notifications: only this bucket's events."
    )
    interval: Duration = Field(60.0, ge=0.1, description="polling: time between two listings.")
    prefix: str = Field("", description="Only keys starting with this.")
    suffix: str = Field("", description="Only keys ending with this.")
    events: list[str] = Field(
        ["cos:ObjectCreated:*", "cos:ObjectRemove:*"],
        description="Event names to deliver; patterns like cos:ObjectCreated:* (s3: names too).",
    )
    appid: str = Field(
        "0", description="The COS AppId written into keys (/<appid>/<bucket>/<key>)."
    )
    cos_region: str | None = Field(
        None, description='Short region in the COS records (e.g. "gz"); default: the AWS region.'
    )
    wait_time: Duration = Field(
        20.0, ge=0, le=20, description="notifications: long-poll wait of each SQS receive."
    )
    visibility_timeout: Duration = Field(
        30.0, ge=1, le=43200, description="notifications: SQS visibility timeout while accepting."
    )

    @field_validator("events")
    @classmethod
    def _check_events(cls, v: list[str]) -> list[str]:
        for pattern in v:
            name = _bare(pattern)
            if name != "*" and (":" not in name or not all(name.split(":"))):
                raise ValueError(f'invalid event name "{pattern}": use {_EVENT_PATTERN}')
        return v

    @model_validator(mode="after")
    def _mode_keys(self) -> S3Config:
        if self.mode == "notifications" and not self.queue_url:
            raise ValueError('mode = "notifications" needs queue_url (the queue S3 notifies)')
        if self.mode == "polling" and not self.bucket:
            raise ValueError('mode = "polling" needs bucket')
        return self


def _bare(name: str) -> str:
    """The S3 spelling without prefix: ``cos:ObjectRemove:*`` and ``s3:ObjectRemoved:*`` are
    both ``ObjectRemoved:*`` (COS says ObjectRemove where S3 says ObjectRemoved)."""
    for p in ("cos:", "s3:"):
        if name.startswith(p):
            name = name[len(p) :]
            break
    if name.startswith("ObjectRemove:"):
        name = "ObjectRemoved:" + name[len("ObjectRemove:") :]
    return name


def cos_event_name(s3_name: str) -> str:
    """``s3:ObjectCreated:Put`` → ``cos:ObjectCreated:Put``; ``ObjectRemoved:Delete`` →
    ``cos:ObjectRemove:Delete`` (COS's own spelling, as SCF functions receive it)."""
    bare = _bare(s3_name)
    if bare.startswith("ObjectRemoved:"):
        return "cos:ObjectRemove:" + bare[len("ObjectRemoved:") :]
    return "cos:" + bare


@dataclasses.dataclass(frozen=True)
class Filter:
    prefix: str
    suffix: str
    events: tuple[str, ...]

    @classmethod
    def of(cls, c: S3Config) -> Filter:
        return cls(c.prefix, c.suffix, tuple(_bare(e) for e in c.events))

    def key(self, key: str) -> bool:
        return key.startswith(self.prefix) and key.endswith(self.suffix)

    def event(self, cos_name: str) -> bool:
        bare = _bare(cos_name)
        return any(fnmatch.fnmatchcase(bare, p) for p in self.events)


def object_url(endpoint: str | None, region: str, bucket: str, key: str) -> str:
    k = quote(key, safe="/")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{bucket}/{k}"
    return f"https://{bucket}.s3.{region or 'us-east-1'}.amazonaws.com/{k}"


# --- notifications ----------------------------------------------------------------------------


class NotANotification(ValueError):
    """The SQS message is not an S3 event notification."""


def parse_notification(body: str) -> Mapping[str, Any] | None:
    """The S3 notification in an SQS body (SNS envelope unwrapped); None for ``s3:TestEvent``.
    Raises NotANotification for anything else, naming the field at fault: every field that
    is mapped is checked here (types, sizes, valid Unicode), so that a message accepted
    here can always be turned into an event and rendered."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise NotANotification(f"not JSON ({e})") from None
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        try:
            doc = json.loads(doc["Message"])
        except (TypeError, ValueError) as e:
            raise NotANotification(f"SNS message is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise NotANotification(f"JSON {type(doc).__name__}, not an object")
    if doc.get("Event") == "s3:TestEvent":
        return None
    records = doc.get("Records")
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("s3"), dict) for r in records
    ):
        raise NotANotification("no S3 Records")
    for i, r in enumerate(records):
        _check_record(r, f"Records[{i}]")
    _check_text(doc, "")
    return doc


#: (path in a record, the types allowed there); absent or null is always allowed
_FIELDS: tuple[tuple[tuple[str, ...], type | tuple[type, ...]], ...] = (
    (("eventName",), str),
    (("eventTime",), str),
    (("awsRegion",), str),
    (("requestParameters",), dict),
    (("requestParameters", "sourceIPAddress"), str),
    (("responseElements",), dict),
    (("responseElements", "x-amz-request-id"), str),
    (("s3", "configurationId"), str),
    (("s3", "bucket"), dict),
    (("s3", "bucket", "name"), str),
    (("s3", "object"), dict),
    (("s3", "object", "key"), str),
    (("s3", "object", "size"), (int, str)),
    (("s3", "object", "eTag"), str),
    (("s3", "object", "versionId"), str),
    (("s3", "object", "contentType"), str),
)


def _check_record(r: Mapping[str, Any], where: str) -> None:
    """Every field :func:`notification_record` maps has the type it needs (so that mapping
    and rendering cannot fail after the message was taken). Raises NotANotification."""
    for path, types in _FIELDS:
        node: Any = r
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            continue
        loc = f"{where}.{'.'.join(path)}"
        if not isinstance(node, types) or isinstance(node, bool):
            raise NotANotification(f"{loc}: {type(node).__name__} {_short(node)} is not allowed")
        if path[-1] == "size":
            digits = isinstance(node, str) and node.isascii() and node.isdigit()
            if not (digits or (isinstance(node, int) and node >= 0)):
                raise NotANotification(f"{loc}: {_short(node)} is not a size in bytes")
    key = ((r.get("s3") or {}).get("object") or {}).get("key")
    if isinstance(key, str):
        _check_text(unquote_plus(key), f"{where}.s3.object.key (decoded)")


def _check_text(node: Any, where: str) -> None:
    """Every string in ``node`` encodes as UTF-8 (a lone surrogate, which JSON's ``\\ud800``
    escape can carry, cannot be rendered or sent). Raises NotANotification."""
    if isinstance(node, str):
        try:
            node.encode()
        except UnicodeEncodeError:
            raise NotANotification(
                f"{where or 'the message'}: {_short(node)} is not valid Unicode text "
                "(a lone surrogate)"
            ) from None
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_text(k, f"{where}.{_short(k)} (a name)" if where else f"{_short(k)} (a name)")
            _check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_text(v, f"{where}[{i}]")


def _short(value: Any) -> str:
    """A short, printable, ASCII-safe rendering of a value for an error message."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _iso(value: Any) -> datetime:
    try:
        t = datetime.fromisoformat(str(value))
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    except ValueError:
        return datetime.now(UTC)


def notification_record(
    r: Mapping[str, Any], *, appid: str, cos_region: str | None, endpoint: str | None
) -> dict[str, Any]:
    """One S3 notification record → a normalized COS record (key decoded)."""
    s3 = r["s3"]
    obj = s3.get("object") or {}
    bucket = str((s3.get("bucket") or {}).get("name", ""))
    key = unquote_plus(str(obj.get("key", "")))
    region = str(r.get("awsRegion") or "")
    meta = {"Content-Type": str(obj["contentType"])} if obj.get("contentType") else {}
    return cos_record(
        bucket=bucket,
        key=key,
        event_name=cos_event_name(str(r.get("eventName", ""))),
        time=_iso(r.get("eventTime")),
        size=int(obj.get("size") or 0),
        etag=str(obj.get("eTag") or ""),
        region=cos_region or region,
        appid=appid,
        url=object_url(endpoint, region, bucket, key),
        version_id=str(obj.get("versionId") or ""),
        meta=meta,
        request_id=str((r.get("responseElements") or {}).get("x-amz-request-id", "")),
        notification_id=str(s3.get("configurationId") or ""),
        source_ip=str((r.get("requestParameters") or {}).get("sourceIPAddress", "")),
    )


# --- polling ----------------------------------------------------------------------------------

Entry = tuple[str, int, float]  # ETag, size, last-modified (unix)


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    key: str
    name: str  # S3 name: ObjectCreated:Put | ObjectRemoved:Delete
    entry: Entry | None  # the new entry; None when removed
    old: Entry | None


def diff(current: Mapping[str, Entry], stored: Mapping[str, Entry], busy: set[str]) -> list[Change]:
    """What changed from ``stored`` to ``current``, ignoring keys with an event in flight.
    Created/changed objects oldest first, then removals."""
    created = [
        Change(k, "ObjectCreated:Put", e, stored.get(k))
        for k, e in current.items()
        if k not in busy and stored.get(k) != e
    ]
    created.sort(key=lambda c: (c.entry[2] if c.entry else 0.0, c.key))
    removed = [
        Change(k, "ObjectRemoved:Delete", None, e)
        for k, e in stored.items()
        if k not in current and k not in busy
    ]
    removed.sort(key=lambda c: c.key)
    return created + removed


def _entry(key: str, raw: Any) -> Entry | None:
    """A stored listing entry, or None if it is not one."""
    if not (isinstance(raw, list) and len(raw) == 3 and isinstance(raw[0], str)):
        return None
    try:
        return (raw[0], int(raw[1]), float(raw[2]))
    except (TypeError, ValueError):
        return None


def _shard_name(i: int) -> str:
    return f"listing-{i:02d}"


class S3Source(Source[S3Config]):
    """Object events of one bucket (polling) or one notification queue (see the module docstring)."""

    Config = S3Config

    def __init__(self, config: S3Config, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.filter = Filter.of(config)
        self.stats: collections.Counter[str] = collections.Counter()
        self._closed = False
        self._wake = asyncio.Event()
        self.consumer = (
            consumer_for(
                config,
                ctx,
                config.queue_url or "",
                wait_time_s=config.wait_time,
                visibility_timeout_s=config.visibility_timeout,
                batch_size=SQS_BATCH,
            )
            if config.mode == "notifications"
            else None
        )
        # polling state
        self.conn = Connection.of(config)
        self._worker: Worker | None = None
        self._client: Any = None
        self._listing: ShardedState[Entry] = ShardedState(
            ctx.store, f"{_NS}/{ctx.name}", shards=SHARDS, name=_shard_name, decode=_entry
        )
        self._loaded = False
        self._baseline = False
        self._inflight: dict[str, Change] = {}
        self._pending: collections.deque[Change] = collections.deque()
        self._next_scan = 0.0
        self.last_scan: datetime | None = None

    @property
    def what(self) -> str:
        if self.config.mode == "polling":
            return f'bucket "{self.config.bucket}" (trigger {self.ctx.name})'
        return f'queue "{self.config.queue_url}" (trigger {self.ctx.name})'

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._closed:
            return
        if self.consumer is not None:
            info = await self.consumer.open()
            self.ctx.logger.info(
                "trigger %s: reading S3 notifications from %s",
                self.ctx.name,
                info.url,
                extra={"trigger": self.ctx.name},
            )
            return
        if self._worker is None:
            self._worker = Worker(f"{self.ctx.name}-s3")
        await self._worker.run(self._check_bucket)
        if not self._loaded:
            await self._load()
        if self._baseline:
            # What exists when the trigger first connects is the baseline: no events for it.
            await self._scan()
        self._next_scan = 0.0

    def _check_bucket(self) -> None:
        try:
            if self._client is None:
                self._client = self.conn.client("s3", what=self.what)
            self._client.head_bucket(Bucket=self.config.bucket)
        except Exception as e:
            raise self._err(e) from None

    def _err(self, e: BaseException) -> AwsError:
        return explain(e, service="S3", what=self.what, endpoint=self.conn.endpoint_url)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        try:
            if self.consumer is not None:
                await self.consumer.aclose()
        finally:
            w, self._worker = self._worker, None
            if w is not None:
                await w.aclose()

    async def read(self) -> Delivery:
        if self.consumer is not None:
            return await self._read_notification()
        return await self._read_polling()

    def status(self) -> Mapping[str, Any]:
        out: dict[str, Any] = {"mode": self.config.mode, **self.stats}
        if self.consumer is not None:
            c = self.consumer
            out.update(
                queue=c.info.url if c.info else self.config.queue_url,
                received=c.stats["received"],
                acked=c.stats["deleted"],
                buffered=c.buffered,
            )
        else:
            out.update(
                bucket=self.config.bucket,
                objects=len(self._listing),
                in_flight=len(self._inflight),
                pending=len(self._pending),
                last_scan=self.last_scan.isoformat() if self.last_scan else None,
            )
        return out

    # --- notifications -----------------------------------------------------------------------

    async def _read_notification(self) -> Delivery:
        assert self.consumer is not None
        while True:
            try:
                m = await self.consumer.next()
            except Closed:
                raise EndOfInput from None
            except AwsError as e:
                raise NotConnected(str(e)) from None
            try:
                doc = parse_notification(m.body)
            except NotANotification as e:
                return self._reject(m, str(e))
            try:
                records = [] if doc is None else self._records(doc)
            except Exception as e:  # parse_notification checks every field: a bug if here
                return self._reject(m, f"cannot be mapped to an event ({type(e).__name__}: {e})")
            if not records:
                self.stats["skipped" if doc is not None else "test_events"] += 1
                await self._drop(m)
                continue
            self.stats["events"] += 1
            native = {**doc, "Records": [r for r, _ in records]} if doc else None
            event = Event(
                kind=Kind.COS,
                trigger=self.ctx.name,
                time=datetime.fromisoformat(records[0][1]["time"]),
                records=tuple(rec for _, rec in records),
                native=native,
            )
            return SettleDelivery(event, partial(self._delete, m), partial(self._release, m), key=m)

    async def _delete(self, m: SqsMessage) -> None:
        assert self.consumer is not None
        await self.consumer.delete(m)

    async def _release(self, m: SqsMessage, error: BaseException | None) -> None:
        assert self.consumer is not None
        self.stats["nacked"] += 1
        await self.consumer.release(m)

    async def _nack_change(self, change: Change, error: BaseException | None) -> None:
        self._nacked(change)

    def _records(self, doc: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], dict[str, Any]]]:
        out = []
        for r in doc["Records"]:
            rec = notification_record(
                r,
                appid=self.config.appid,
                cos_region=self.config.cos_region,
                endpoint=self.config.endpoint_url,
            )
            if self.config.bucket and rec["bucket"] != self.config.bucket:
                continue
            if self.filter.key(rec["key"]) and self.filter.event(rec["event_name"]):
                out.append((r, rec))
        return out

    async def _drop(self, m: SqsMessage) -> None:
        """Delete a message that yields no event (a test event, or filtered out)."""
        assert self.consumer is not None
        try:
            await self.consumer.delete(m)
        except AwsError as e:
            self.ctx.logger.warning("%s", e, extra={"trigger": self.ctx.name})
            await self.consumer.release(m)

    def _reject(self, m: SqsMessage, why: str) -> Delivery:
        """A message that is not an S3 notification, handed to the core as undeliverable:
        it dead-letters it (durably) and only then acks, which deletes the message."""
        assert self.consumer is not None and self.consumer.info is not None
        self.stats["rejected"] += 1
        return Undeliverable(
            {"messageId": m.id, "body": m.body, "attributes": dict(m.attributes)},
            f"SQS message {m.id} is not an S3 event notification: {why}",
            partial(self._delete, m),
            partial(self._release, m),
            kind=Kind.COS,
            trigger=self.ctx.name,
            detail=f"queue {self.consumer.info.url}, body starts: {m.body[:512]!r}",
        )

    # --- polling -----------------------------------------------------------------------------

    async def _read_polling(self) -> Delivery:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise EndOfInput
            if self._pending:
                change = self._pending.popleft()
                self._inflight[change.key] = change
                return SettleDelivery(
                    self._object_event(change),
                    partial(self._acked, change),
                    partial(self._nack_change, change),
                    key=change,
                    dedupe_key=self._dedupe_key(change),
                )
            delay = self._next_scan - loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            started = loop.time()
            try:
                await self._scan()
            except AwsError as e:
                raise NotConnected(str(e)) from None
            self._next_scan = started + self.config.interval

    def _dedupe_key(self, c: Change) -> str:
        """The change's name for good: replicas sharing a store all list the bucket and
        emit the same change; the queue accepts it once (and once after a crash between
        the accept and the ack)."""
        e = c.entry or c.old or ("", 0, 0.0)
        what = repr((c.key, c.entry is not None, *e)).encode("utf-8", "surrogatepass")
        return f"aws_s3:{self.ctx.name}:{hashlib.sha256(what).hexdigest()[:32]}"

    async def _scan(self) -> None:
        assert self._worker is not None
        current = await self._worker.run(self._list)
        self.stats["scans"] += 1
        self.last_scan = datetime.now(UTC)
        if self._baseline:
            self._listing.replace(current)
            await self._listing.flush()
            await self.ctx.store.put(self._listing.namespace, "meta", json.dumps(self._meta()))
            self._baseline = False
            self.ctx.logger.info(
                "trigger %s: first listing of %s: %d object(s) recorded as the baseline",
                self.ctx.name,
                self.config.bucket,
                len(current),
                extra={"trigger": self.ctx.name},
            )
            return
        stored = dict(self._listing.items())
        changes = await self._worker.run(diff, current, stored, set(self._inflight))
        silent = False
        for c in changes:
            if self.filter.event(cos_event_name(c.name)):
                self._pending.append(c)
            else:  # filtered out: no event, but the listing moves on
                self._listing.stage(c.key, c.entry)
                silent = True
        if silent:
            await self._listing.flush()

    def _list(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=self.config.prefix
            )
            for page in pages:
                for o in page.get("Contents") or ():
                    key = str(o["Key"])
                    if self.filter.key(key):
                        out[key] = (
                            str(o.get("ETag", "")).strip('"'),
                            int(o.get("Size", 0)),
                            o["LastModified"].timestamp(),
                        )
        except Exception as e:
            raise self._err(e) from None
        return out

    def _object_event(self, c: Change) -> Event:
        assert self.config.bucket is not None
        e = c.entry or c.old or ("", 0, time.time())
        when = datetime.fromtimestamp(e[2], UTC) if c.entry else datetime.now(UTC)
        region = self.conn.region or ""
        url = object_url(self.config.endpoint_url, region, self.config.bucket, c.key)
        rec = cos_record(
            bucket=self.config.bucket,
            key=c.key,
            event_name=cos_event_name(c.name),
            time=when,
            size=e[1],
            etag=e[0],
            region=self.config.cos_region or region,
            appid=self.config.appid,
            url=url,
        )
        native = {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": region,
            "eventTime": when.isoformat().replace("+00:00", "Z"),
            "eventName": c.name,
            "s3": {
                "s3SchemaVersion": "1.0",
                "bucket": {"name": self.config.bucket},
                "object": {"key": quote_plus(c.key, safe="/"), "size": e[1], "eTag": e[0]},
            },
        }
        return Event(
            kind=Kind.COS,
            trigger=self.ctx.name,
            time=when,
            records=(rec,),
            native={"Records": [native]},
        )

    # --- the stored listing --------------------------------------------------------------------

    async def _load(self) -> None:
        store, ns = self.ctx.store, self._listing.namespace
        meta_text = await store.get(ns, "meta")
        if meta_text is None or json.loads(meta_text) != self._meta():
            if meta_text is not None:
                self.ctx.logger.warning(
                    "trigger %s: bucket, prefix or suffix changed; the next listing is a new "
                    "baseline (no events for what it finds)",
                    self.ctx.name,
                    extra={"trigger": self.ctx.name},
                )
            self._baseline = True
        else:
            await self._listing.load()
            if self._listing.dropped or self._listing.unreadable:
                self.ctx.logger.warning(
                    "trigger %s: %d unreadable listing entries and %d unreadable shards "
                    "ignored (their objects count as new)",
                    self.ctx.name,
                    self._listing.dropped,
                    len(self._listing.unreadable),
                    extra={"trigger": self.ctx.name},
                )
        self._loaded = True

    def _meta(self) -> dict[str, Any]:
        c = self.config
        return {
            "v": 1,
            "shards": SHARDS,
            "bucket": c.bucket,
            "prefix": c.prefix,
            "suffix": c.suffix,
        }

    async def _acked(self, c: Change) -> None:
        try:
            await self._listing.put(c.key, c.entry)
        finally:
            if self._inflight.get(c.key) is c:
                del self._inflight[c.key]
        self.stats["created" if c.entry else "removed"] += 1

    def _nacked(self, c: Change) -> None:
        if self._inflight.get(c.key) is c:
            del self._inflight[c.key]  # the next scan finds the difference again
        self.stats["nacked"] += 1
