"""The normalized event and its renderers into the JSON functions receive.

A source turns whatever it read upstream into one immutable :class:`Event`:
its kind (``timer``, ``cos``, ``cmq``, ``ckafka``, ``api``), the trigger that
produced it, when it happened, and a tuple of normalized records. The same
event can then be rendered in any trigger ``format``:

- ``scf`` (default): exactly what a Tencent Cloud SCF function receives from
  that trigger type (DESIGN.md, "Event formats");
- ``native``: the upstream payload as the source got it (``Event.native``),
  falling back to the SCF rendering when a source has none;
- ``cloudevents``: a CloudEvents 1.0 JSON envelope around the SCF rendering.

Renderers are pure functions from an Event to a JSON-compatible dict; sources
added later (object storage, queues, Kafka) build Events with the helpers here
rather than writing SCF JSON by hand.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import orjson

_random = random.Random()


class Kind(enum.StrEnum):
    TIMER = "timer"
    COS = "cos"
    CMQ = "cmq"
    CKAFKA = "ckafka"
    API = "api"


#: SCF's ``RequestSource`` per event kind (used in dead letters).
REQUEST_SOURCE = {
    Kind.TIMER: "TRIGGER_TIMER",
    Kind.COS: "TRIGGER_COS",
    Kind.CMQ: "TRIGGER_CMQ",
    Kind.CKAFKA: "TRIGGER_CKAFKA",
    Kind.API: "API",
}


class Format(enum.StrEnum):
    SCF = "scf"
    NATIVE = "native"
    CLOUDEVENTS = "cloudevents"


def freeze(value: Any) -> Any:
    """A deeply immutable copy of a JSON-like value (dicts → mapping proxies, lists → tuples)."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON-compatible copy of a frozen value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


def utc_iso(t: datetime) -> str:
    """``2019-02-21T11:49:00Z``: UTC, whole seconds, a ``Z`` suffix (SCF's timer format)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id() -> str:
    # An event id only has to be unique, not unguessable: 128 random bits without the
    # urandom syscall of uuid4 (timers create a thousand of these in the same instant).
    return f"{_random.getrandbits(128):032x}"


def request_id() -> str:
    """A new request id in the UUID 4 text form. Unique, not unguessable (no urandom
    syscall: a thousand timers accept their ticks in the same instant)."""
    h = f"{_random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One normalized event. Immutable: records and native payload are frozen."""

    kind: Kind
    trigger: str
    time: datetime
    records: tuple[Mapping[str, Any], ...] = ()
    native: Any = None
    id: str = dataclasses.field(default_factory=_new_id)

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise ValueError("Event.time must be timezone-aware")
        if type(self.kind) is not Kind:
            object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "records", tuple(freeze(r) for r in self.records))
        if self.native is not None:
            object.__setattr__(self, "native", freeze(self.native))

    @property
    def request_source(self) -> str:
        return REQUEST_SOURCE[self.kind]

    @classmethod
    def fresh(
        cls,
        *,
        kind: Kind,
        trigger: str,
        time: datetime,
        records: tuple[Mapping[str, Any], ...],
        native: Any = None,
    ) -> Event:
        """An event whose records (and native payload) were just built and are held by
        nobody else: they are kept as they are, not copied and frozen record by record (a
        third of a Kafka batch's cost). For built-in sources that build records with the
        helpers below and never touch them again; plugins use the constructor."""
        if time.tzinfo is None:
            raise ValueError("Event.time must be timezone-aware")
        ev = object.__new__(cls)
        for name, value in (
            ("kind", kind),
            ("trigger", trigger),
            ("time", time),
            ("records", records),
            ("native", native),
            ("id", _new_id()),
        ):
            object.__setattr__(ev, name, value)
        return ev


# --- builders ---------------------------------------------------------------------------------


def timer_event(trigger: str, time: datetime, message: str = "") -> Event:
    return Event.fresh(kind=Kind.TIMER, trigger=trigger, time=time, records=({"message": message},))


def cos_record(
    *,
    bucket: str,
    key: str,
    event_name: str,
    time: datetime,
    size: int = 0,
    etag: str = "",
    region: str = "",
    appid: str = "",
    url: str = "",
    version_id: str = "",
    meta: Mapping[str, str] | None = None,
    request_id: str = "",
    notification_id: str = "",
    source_ip: str = "",
) -> dict[str, Any]:
    """A normalized object-storage record. ``key`` is the object key, not yet prefixed."""
    return {
        "bucket": bucket,
        "key": key,
        "event_name": event_name,
        "time": time.astimezone(UTC).isoformat(),
        "size": size,
        "etag": etag,
        "region": region,
        "appid": appid,
        "url": url,
        "version_id": version_id,
        "meta": dict(meta or {}),
        "request_id": request_id,
        "notification_id": notification_id,
        "source_ip": source_ip,
    }


def cmq_record(
    *,
    msg_id: str,
    body: str,
    publish_time: datetime,
    topic: str = "",
    owner: str = "",
    subscription: str = "",
    request_id: str = "",
    tags: Iterable[str] = (),
    type: str = "topic",
    body_base64: bool = False,
) -> dict[str, Any]:
    """A message-queue record. ``body_base64``: the body was not text and is base64."""
    rec: dict[str, Any] = {
        "type": type,
        "owner": owner,
        "topic": topic,
        "subscription": subscription,
        "publish_time": publish_time.astimezone(UTC).isoformat(),
        "msg_id": msg_id,
        "request_id": request_id,
        "body": body,
        "tags": list(tags),
    }
    if body_base64:
        rec["body_base64"] = True
    return rec


def ckafka_record(
    *, topic: str, partition: int, offset: int, key: bytes | str | None, value: bytes | str | None
) -> dict[str, Any]:
    """A Kafka record. Binary keys/values that are not UTF-8 are base64-encoded with a flag."""
    k, k_b64 = _text(key)
    v, v_b64 = _text(value)
    rec: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": k,
        "value": v,
    }
    if k_b64:
        rec["key_base64"] = True
    if v_b64:
        rec["value_base64"] = True
    return rec


def _text(data: bytes | str | None) -> tuple[str, bool]:
    if data is None:
        return "", False
    if isinstance(data, str):
        return data, False
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), True


# --- SCF renderers ----------------------------------------------------------------------------


def _scf_timer(ev: Event) -> dict[str, Any]:
    message = ev.records[0].get("message", "") if ev.records else ""
    return {
        "Type": "Timer",
        "TriggerName": ev.trigger,
        "Time": utc_iso(ev.time),
        "Message": message,
    }


def _unix(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


def _scf_cos(ev: Event) -> dict[str, Any]:
    out = []
    for r in ev.records:
        out.append(
            {
                "cos": {
                    "cosSchemaVersion": "1.0",
                    "cosObject": {
                        "url": r["url"],
                        "meta": {
                            "x-cos-request-id": r["request_id"],
                            "Content-Type": "",
                            **({"ETag": r["etag"]} if r.get("etag") else {}),
                            **dict(r["meta"]),
                        },
                        "vid": r["version_id"],
                        "key": f"/{r['appid']}/{r['bucket']}/{r['key']}",
                        "size": r["size"],
                    },
                    "cosBucket": {"region": r["region"], "name": r["bucket"], "appid": r["appid"]},
                    "cosNotificationId": r["notification_id"],
                },
                "event": {
                    "eventName": r["event_name"],
                    "eventVersion": "1.0",
                    "eventTime": _unix(r["time"]),
                    "eventSource": "qcs::cos",
                    "requestParameters": {
                        "requestSourceIP": r["source_ip"],
                        "requestHeaders": {"Authorization": ""},
                    },
                    "eventQueue": f"qcs:0:scf:{r['region']}:appid/{r['appid']}:default.{ev.trigger}",
                    "reservedInfo": "",
                    "reqid": 0,
                },
            }
        )
    return {"Records": out}


def _scf_cmq(ev: Event) -> dict[str, Any]:
    out = []
    for r in ev.records:
        out.append(
            {
                "CMQ": {
                    "type": r["type"],
                    "topicOwner": r["owner"],
                    "topicName": r["topic"],
                    "subscriptionName": r["subscription"],
                    "publishTime": r["publish_time"].replace("+00:00", "Z"),
                    "msgId": r["msg_id"],
                    "requestId": r["request_id"],
                    "msgBody": r["body"],
                    "msgTag": list(r["tags"]),
                    **({"msgBodyBase64": True} if r.get("body_base64") else {}),
                }
            }
        )
    return {"Records": out}


def _scf_ckafka(ev: Event) -> dict[str, Any]:
    # one comprehension: this runs once per Kafka record (a third of a batch's encoding)
    return {
        "Records": [
            {
                "Ckafka": {
                    "topic": r["topic"],
                    "partition": r["partition"],
                    "offset": r["offset"],
                    "msgKey": r["key"],
                    "msgBody": r["value"],
                }
            }
            if len(r) == 5  # topic, partition, offset, key, value: no base64 flags
            else {"Ckafka": _ckafka_flagged(r)}
            for r in ev.records
        ]
    }


def _ckafka_flagged(r: Mapping[str, Any]) -> dict[str, Any]:
    rec = {
        "topic": r["topic"],
        "partition": r["partition"],
        "offset": r["offset"],
        "msgKey": r["key"],
        "msgBody": r["value"],
    }
    if r.get("key_base64"):
        rec["msgKeyBase64"] = True
    if r.get("value_base64"):
        rec["msgBodyBase64"] = True
    return rec


def _scf_api(ev: Event) -> dict[str, Any]:
    # API invocations carry the caller's JSON object as the single record, verbatim.
    return thaw(ev.records[0]) if ev.records else {}


_SCF: dict[Kind, Callable[[Event], dict[str, Any]]] = {
    Kind.TIMER: _scf_timer,
    Kind.COS: _scf_cos,
    Kind.CMQ: _scf_cmq,
    Kind.CKAFKA: _scf_ckafka,
    Kind.API: _scf_api,
}

_CE_TYPES = {
    Kind.TIMER: "com.tencentcloud.scf.timer",
    Kind.COS: "com.tencentcloud.cos.object",
    Kind.CMQ: "com.tencentcloud.cmq.message",
    Kind.CKAFKA: "com.tencentcloud.ckafka.records",
    Kind.API: "com.tencentcloud.scf.invoke",
}


def to_scf(ev: Event) -> dict[str, Any]:
    return _SCF[ev.kind](ev)


def to_cloudevent(ev: Event) -> dict[str, Any]:
    """A CloudEvents 1.0 structured-mode JSON envelope; ``data`` is the SCF rendering."""
    return {
        "specversion": "1.0",
        "id": ev.id,
        "source": f"event-bridge/triggers/{ev.trigger}",
        "type": _CE_TYPES[ev.kind],
        "time": ev.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": to_scf(ev),
    }


def render(ev: Event, fmt: Format | str = Format.SCF) -> dict[str, Any]:
    """The JSON object a function receives for ``ev`` in trigger format ``fmt``."""
    fmt = Format(fmt)
    if fmt is Format.NATIVE:
        return thaw(ev.native) if ev.native is not None else to_scf(ev)
    if fmt is Format.CLOUDEVENTS:
        return to_cloudevent(ev)
    return to_scf(ev)


#: what the standard library refuses, orjson must refuse too (no datetime or dataclass magic)
_STRICT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the form events travel in.

    orjson (20x the standard library on an event: bench/encoding.py); what orjson refuses
    and the standard library takes (integers beyond 64 bits, non-string keys) goes through
    the standard library, so the encoding accepts exactly what it always did."""
    return _encode(obj)[0]


def _encode(obj: Any) -> tuple[bytes, bool]:
    """:func:`dumps`, and whether orjson wrote the bytes."""
    try:
        return orjson.dumps(obj, option=_STRICT), True
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode(), False


#: digits → "0", every other byte → " ": 19 digits in a row may be an integer beyond 64 bits
_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_DIGITS = b"0" * 19


def loads(data: bytes | str) -> Any:
    """Parse JSON as the standard library does: orjson where the two agree, ``json`` for what
    orjson refuses (NaN) or reads otherwise (19 or more digits in a row may be an integer
    beyond 64 bits, which orjson makes a float; the python worker does the same)."""
    raw = data.encode() if isinstance(data, str) else data
    if raw.translate(_DIGITS).find(_LONG_DIGITS) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


_log = logging.getLogger("bridge.events")


class RawEvent(Mapping[str, Any]):
    """An event that is already encoded: a JSON object kept as its UTF-8 bytes.

    The durable queue hands these to the dispatcher, so an event is encoded once, when it
    is accepted, and its bytes travel to a runtime that can take them as they are
    (``Target.takes_raw``, the ``python`` runtime). Reading it as a mapping decodes it
    once, on first use. ``raw`` must hold a JSON object (``{...}``).

    A source that can write its event by column as well (:meth:`deferred`: Kafka's SCF
    batches) writes the JSON only when something reads ``raw`` (a dead letter, an ``http``
    or ``command`` function); the ``python`` runtime sends the ``columns`` instead, from
    which its worker builds the same event."""

    __slots__ = ("_obj", "_raw", "_write", "columns", "plain", "size")

    def __init__(self, raw: bytes, obj: dict[str, Any] | None = None, *, plain: bool = False):
        """``obj``: the object ``raw`` encodes, when the caller still has it. ``plain``: orjson
        wrote ``raw`` (see :meth:`encode`); it is trusted (the queue, the ordered path and
        the python runtime then read ``raw`` with orjson alone), so a source sets it only
        for bytes orjson wrote, or that orjson reads as ``json`` does (no integer beyond 64
        bits, no NaN)."""
        self._raw: bytes | None = raw
        self._write: Callable[[], bytes] | None = None
        self._obj: dict[str, Any] | None = obj
        self.plain = plain
        #: the length of ``raw``, known without writing it
        self.size = len(raw)
        #: the event by column (:meth:`deferred`), or None
        self.columns: bytes | None = None

    @classmethod
    def encode(cls, obj: dict[str, Any]) -> RawEvent:
        """``obj`` encoded as :func:`dumps` does. When orjson wrote the bytes (it refuses
        integers beyond 64 bits; NaN and Infinity become null), orjson and the standard
        library read them alike: the event is ``plain``, and a reader may skip the check
        :func:`loads` makes for long runs of digits (the python worker does)."""
        raw, plain = _encode(obj)
        return cls(raw, obj, plain=plain)

    @classmethod
    def deferred(cls, write: Callable[[], bytes], size: int, columns: bytes) -> RawEvent:
        """A plain event whose JSON object ``write()`` writes when ``raw`` is first read;
        ``size`` is its length. ``columns`` is the same event, ``{"Records": [{WRAP: {NAME:
        value, ...}}, ...]}``, by column, in JSON::

            {"records": N, "wrap": WRAP, "names": [NAME, ...], "columns": [COLUMN, ...]}

        a COLUMN per name, each one of ``{"same": VALUE}`` (every record's), ``{"from":
        INTEGER}`` (the first record's, each next one 1 more) or ``{"each": [VALUE, ...]}``
        (N of them). The ``python`` runtime sends these bytes, and its worker builds the
        event from them (``bridge.targets._worker.columns_event``): a record's dict has its
        keys in the order of ``names``, as the JSON has. The bytes must be orjson's reading,
        like ``plain`` ones (no integer beyond 64 bits, no NaN)."""
        event = cls(b"{}", plain=True)
        event._raw, event._write, event.size, event.columns = None, write, size, columns
        return event

    @property
    def raw(self) -> bytes:
        """The JSON (written on first use, for a :meth:`deferred` event)."""
        raw = self._raw
        if raw is None:
            assert self._write is not None
            raw, self._write = self._write(), None
            if len(raw) != self.size:  # a source's bug: said, and the JSON still written
                _log.error("a deferred event's JSON is %d bytes, not %d", len(raw), self.size)
                self.size = len(raw)
            self._raw = raw
        return raw

    @property
    def obj(self) -> dict[str, Any]:
        """The decoded object (decoded once)."""
        if self._obj is None:
            # plain: orjson wrote it, so orjson reads it as the standard library would
            obj = orjson.loads(self.raw) if self.plain else loads(self.raw)
            if not isinstance(obj, dict):
                raise TypeError(f"the event must be a JSON object, not {type(obj).__name__}")
            self._obj = obj
        return self._obj

    def is_object(self) -> bool:
        """Whether ``raw`` holds a JSON object, judged by its first byte (cheap); a deferred
        event is one."""
        raw = self._raw
        if raw is None:
            return True
        return raw[:1] == b"{" or raw.lstrip()[:1] == b"{"

    def __getitem__(self, key: str) -> Any:
        return self.obj[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.obj)

    def __len__(self) -> int:
        return len(self.obj)

    def __repr__(self) -> str:
        if self._raw is None:
            return f"RawEvent(deferred, {self.size} bytes)"
        return f"RawEvent({self._raw[:80]!r})"


def salvage(ev: Event, fmt: Format | str = Format.SCF) -> str:
    """The event as ASCII JSON text for a dead letter when :func:`dumps` of its rendering
    failed (a lone surrogate, a value JSON cannot hold): escapes and ``repr`` where needed,
    so that what was wrong is kept and can be looked at. Never raises."""
    try:
        obj: Any = render(ev, fmt)
    except Exception as e:
        obj = {"unrenderable": repr(ev), "error": repr(e)}
    return json.dumps(obj, separators=(",", ":"), default=repr)
