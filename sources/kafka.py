"""The Kafka trigger: a consumer group's records as ordered SCF CKafka batches, and a Kafka
dead-letter sink.

**Source** (``type = "kafka"``, ``ordered = True``). It consumes ``topic`` (names, or
a regex starting with ``^``) in the consumer group ``group_id`` and hands the core one
batch per partition at a time: up to ``batch_size`` records and ``max_batch_bytes``
bytes, or fewer once the oldest has waited ``batch_window``. The core invokes the
function synchronously with the batch (``Records[].Ckafka``), retries it *in place*
under ``[triggers.NAME.retry]`` and dead-letters it when the policy gives up
(:mod:`bridge.ordered`); only then is the batch acked. The next batch of a partition
is handed out only after the previous one was acked; partitions progress
independently, each with at most one batch in flight.

- **Threads.** The consumer lives on one :class:`~bridge.blocking.Worker` thread and
  every call to it is made there, between polls (confluent-kafka's consumer must
  not be called from two threads at once: a call from a second thread can wait for
  seconds). A task of this source runs *poll cycles* on that thread: apply the
  pause/resume/commit the event loop asked for, poll (at most 100 ms, 10 ms while a
  partition is paused), return up to 1,000 records. The loop never waits for the
  function to poll, so a slow function never pushes the consumer past
  ``max.poll.interval.ms``. Rebalance callbacks run on the worker thread inside a
  poll and hand their work to the event loop, which owns all the partition state.
- **Back-pressure** is pause/resume per partition, never a blocked poll: a partition
  whose buffer holds ``max(2 * batch_size, 5000)`` records or ``max_batch_bytes``, or
  any partition while all buffers together hold 32 MiB, is paused, and resumed once
  its buffer is half drained. librdkafka's own prefetch is capped at 16 MiB
  (``queued.max.messages.kbytes``); ``fetch.wait.max.ms`` is 100 and
  ``fetch.queue.backoff.ms`` 10 (librdkafka's 1 s stalled every resumed partition);
  all three may be overridden in ``options``.
- **Offsets.** ``enable.auto.commit`` and ``enable.auto.offset.store`` are off; the
  bridge commits. Each partition has an :class:`OffsetTracker` (Benthos'
  checkpointer): the offset committed is the end of the longest prefix of handed-out
  batches that are all settled, so an ack that comes out of order never commits
  past an unsettled record. Commits are asynchronous, one at a time, at most every
  100 ms, plus synchronous ones on revoke and at close. After a crash (``kill -9``),
  only what was in flight is delivered again: each ack also writes the partition's
  settled position to the state store (before it returns; it survives kill -9, and a
  power loss at worst delivers more again), and an assigned
  partition starts from the later of that and the committed offset. At least once,
  never lost. (A stored position is ignored once the group's committed offset was
  moved back below the one known when it was stored: a reset wins.)
- **Rebalance.** On revoke, the partitions' buffers are dropped at once and the
  callback waits up to ``drain_timeout`` for their in-flight batches, then commits
  what is settled. A batch still running after that is abandoned: its ack commits
  nothing (the next owner delivers it again). If the same partition comes back to
  this process while such a batch still runs, its next batch waits for it, and the
  records it covered are not delivered twice. Such a batch reports ``abandoned``, so
  :mod:`bridge.ordered` stops retrying it (and does not dead-letter it). Lost partitions (the session timed
  out) commit nothing; when one comes back to this process and it had settled
  further than the group's committed offset (its commits failed meanwhile), it
  resumes after what it settled. The eager protocol (librdkafka's default) and
  ``cooperative-sticky`` both work.
- **Shutdown.** The daemon stops reading and gives in-flight batches
  ``shutdown_grace`` to settle; then ``close()`` stops polling, commits what is
  settled (synchronously) and leaves the group. Records read but not settled are
  not committed: the next owner delivers them.
- **start.** A partition without a committed offset starts at the ``latest`` or
  ``earliest`` record, or at the first record at or after a timestamp (looked up
  with ``offsets_for_times``; records older than the timestamp are skipped too, for
  brokers that cannot look it up). A committed offset always wins.
- **Records.** ``msgKey``/``msgBody`` are the key and value as UTF-8 text; those that
  are not UTF-8 are base64-encoded and flagged (``msgKeyBase64``/``msgBodyBase64``).
  A null key or value is ``""``. ``format = "native"`` gives ``{"records": [...]}``
  with offset, timestamp, key, value (``null`` kept) and headers per record (see
  ``docs/kafka.md``). A record larger than ``max_batch_bytes`` travels alone; one
  larger than the 6 MB sync limit is dead-lettered by the core (invalid request).
- **Secrets.** ``options_file`` maps librdkafka properties to files holding their
  values (``"sasl.password" = "/run/credentials/…"``), read at ``connect()``; those
  values and inline ``*password*``/``*secret*`` options are masked in logs.
- **Lag.** ``status()["lag"]`` maps each assigned partition (``topic/N``) to its
  lag, the high watermark (from fetch responses) minus the first unsettled offset:
  the ``bridge_source_lag{trigger, partition}`` metric and ``event-bridge status``.
  ``status()["partitions"]`` adds the committed offset, the settled position, the
  buffered count and whether it is paused.

**Dead-letter sink** (``dead_letter = "kafka://TOPIC?bootstrap_servers=HOST:PORT"``):
see :class:`KafkaDeadLetterSink`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from pydantic import Field, ValidationInfo, field_validator, model_validator

from bridge import log as logsetup
from bridge.abc import (
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    EndOfInput,
    NotConnected,
    Source,
    SourceContext,
)
from bridge.blocking import Worker
from bridge.checkpoint import SettledPrefix
from bridge.config import Duration, RelPath, Size, TriggerConfig, read_secret_file
from bridge.events import Event, Kind, ckafka_record
from bridge.retry import OrderedConfig

T = TypeVar("T")

MAX_BATCH_SIZE = 10_000  # SCF's CKafka trigger allows up to 10,000 records per batch
MAX_EVENT_BYTES = 6 * 1024 * 1024  # the dispatcher's sync event limit (SCF: 6 MB)
POLL_TIMEOUT_S = 0.1  # longest one poll cycle blocks: how late a pause or commit can be
POLL_PAUSED_S = 0.01  # ... while a partition is paused (so that it resumes promptly)
CONSUME_CHUNK = 1000  # records taken from librdkafka per cycle, at most (~3 ms of the loop)
COMMIT_INTERVAL_S = 0.1  # settled offsets are committed at most this often
COMMIT_STALL_S = 10.0  # a commit without a result after this long no longer blocks the next
WATERMARK_INTERVAL_S = 1.0
CALL_TIMEOUT_S = 10.0  # broker calls made while (re)joining: metadata, committed offsets
PREFETCH_MIN_RECORDS = 5000  # a partition buffers up to this many records ahead, at least
BUFFER_BYTES = 32 * 1024 * 1024  # all partitions' buffers together (estimated JSON bytes)
RECORD_OVERHEAD = 100  # JSON bytes of one Ckafka record besides its key, value and topic
NACK_DELAY_S = (0.5, 30.0)  # a nacked batch comes back after this, doubling
WARN_EVERY_S = 60.0  # the same consumer error is logged at most this often
CHECKPOINT_NS = "kafka"  # state-store namespace of settled positions (group, topic, partition)

#: librdkafka properties the bridge sets itself, and the key that sets them instead
OWNED_OPTIONS = {
    "bootstrap.servers": "use bootstrap_servers",
    "metadata.broker.list": "use bootstrap_servers",
    "group.id": "use group_id",
    "auto.offset.reset": "use start",
    "enable.auto.commit": "the bridge commits offsets itself, only once records are settled",
    "enable.auto.offset.store": "the bridge stores offsets itself, only once records are settled",
}
#: confluent-kafka keys that take Python callables: the bridge installs its own
CALLBACK_OPTIONS = ("error_cb", "throttle_cb", "stats_cb", "oauth_cb", "on_commit", "logger")
#: defaults a trigger's ``options`` may override
DEFAULT_OPTIONS = {
    "queued.max.messages.kbytes": "16384",  # librdkafka's prefetch, all partitions (16 MiB)
    "fetch.wait.max.ms": "100",  # a resumed partition waits for the fetch in flight
    # librdkafka backs a partition off for 1 s when its prefetch queue looked full: with a
    # buffer drained in bursts (a batch of 1,000 at a time) that stalled every partition
    "fetch.queue.backoff.ms": "10",
}
_SECRET_OPTION = re.compile(r"password|secret|\.key\.pem|sasl\.jaas|credential", re.IGNORECASE)
_SERVER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
_TS_NOT_AVAILABLE = confluent_kafka.TIMESTAMP_NOT_AVAILABLE
_TS_TYPES = {
    confluent_kafka.TIMESTAMP_CREATE_TIME: "create_time",
    confluent_kafka.TIMESTAMP_LOG_APPEND_TIME: "log_append_time",
}

Key = tuple[str, int]  # (topic, partition)


# --- config -----------------------------------------------------------------------------------


def parse_start(value: str, zone: ZoneInfo) -> int | None:
    """``"latest"``/``"earliest"`` → None; an ISO 8601 time → Unix milliseconds (a time
    without an offset is read in ``zone``)."""
    if value in ("latest", "earliest"):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f'invalid start "{value}": use "latest", "earliest" or an ISO 8601 time such '
            'as "2024-05-01T08:00:00Z"'
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=zone)
    return int(t.timestamp() * 1000)


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"a librdkafka property value must be a string, not {type(value).__name__}")


def _check_option_names(names: Iterable[str], where: str) -> None:
    for name in names:
        if name in OWNED_OPTIONS:
            raise ValueError(f'{where} "{name}" is set by the bridge: {OWNED_OPTIONS[name]}')
        if name in CALLBACK_OPTIONS:
            raise ValueError(f'{where} "{name}" is a callback; the bridge installs its own')


class KafkaConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "kafka"``."""

    bootstrap_servers: str = Field(
        description='Brokers to bootstrap from: "host:port", comma-separated or a list.'
    )
    topic: str | list[str] = Field(
        description="Topic(s) to consume: a name, a list of names, or a regex starting with ^ "
        '(e.g. "^orders-.*").'
    )
    group_id: str | None = Field(
        None,
        validate_default=True,
        description='Consumer group; default "event-bridge-<trigger name>". Replicas of the '
        "bridge with the same group split the partitions.",
    )
    start: str = Field(
        "latest",
        description='Where a partition without a committed offset starts: "latest", '
        '"earliest", or an ISO 8601 time (the first record at or after it; without an '
        "offset the time is in daemon.timezone).",
    )
    batch_size: int = Field(
        100, ge=1, le=MAX_BATCH_SIZE, description="Most records per invocation (1-10,000)."
    )
    batch_window: Duration = Field(
        0.5,
        ge=0,
        le=900,
        description="How long the oldest buffered record of a partition waits for the batch to "
        'fill before a partial batch is delivered ("0s": at once).',
    )
    max_batch_bytes: Size = Field(
        6_000_000,
        gt=0,
        le=MAX_EVENT_BYTES,
        description="Most bytes of records per invocation (SCF: 6 MB); a larger record travels "
        "alone.",
    )
    options: dict[str, str] = Field(
        {},
        repr=False,
        description='librdkafka properties passed as-is, e.g. {"session.timeout.ms" = "6000", '
        '"security.protocol" = "SASL_SSL"}. group.id, bootstrap.servers, auto.offset.reset and '
        "auto commit are the bridge's.",
    )
    options_file: dict[str, RelPath] = Field(
        {},
        description='librdkafka properties read from files (secrets), e.g. {"sasl.password" = '
        '"/run/credentials/event-bridge.service/kafka"}; read at connect, masked in logs.',
    )
    drain_timeout: Duration = Field(
        10.0,
        ge=0,
        le=900,
        description="On a rebalance, how long in-flight batches of revoked partitions may take "
        "to settle (and be committed) before they are abandoned to the next owner. Keep it "
        "well under max.poll.interval.ms: the group waits.",
    )
    retry: OrderedConfig = Field(
        OrderedConfig(),
        description="Retry policy of a failed batch (in place: the partition waits), then "
        "dead-letter.",
    )

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _servers(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = ",".join(str(s) for s in v)
        if not isinstance(v, str):
            return v
        servers = [s.strip() for s in v.split(",") if s.strip()]
        if not servers:
            raise ValueError('no broker given: use "host:port"')
        for s in servers:
            if not _SERVER.match(s.removeprefix("PLAINTEXT://").removeprefix("SSL://")):
                raise ValueError(f'invalid broker "{s}": use host:port, e.g. "kafka-1:9092"')
        return ",".join(servers)

    @field_validator("topic")
    @classmethod
    def _topics(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("give at least one topic")
        for name in names:
            if not name.strip():
                raise ValueError("a topic name cannot be empty")
            if name.startswith("^"):
                try:
                    re.compile(name)
                except re.error as e:
                    raise ValueError(f'invalid topic regex "{name}": {e}') from None
        return v

    @field_validator("group_id")
    @classmethod
    def _group(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("group_id cannot be empty")
        name = (info.context or {}).get("name")
        return v if v is not None or name is None else f"event-bridge-{name}"

    @field_validator("start")
    @classmethod
    def _start(cls, v: str, info: ValidationInfo) -> str:
        parse_start(v, ZoneInfo((info.context or {}).get("timezone", "UTC")))
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = {str(k): _option_text(x) for k, x in v.items()}
            _check_option_names(v, "option")
        return v

    @field_validator("options_file")
    @classmethod
    def _options_file(cls, v: dict[str, Path]) -> dict[str, Path]:
        _check_option_names(v, "options_file")
        for path in v.values():
            read_secret_file(path)  # readable now, or a clear error at the key path
        return v

    @model_validator(mode="after")
    def _no_overlap(self) -> KafkaConfig:
        both = sorted(set(self.options) & set(self.options_file))
        if both:
            raise ValueError(f"{', '.join(both)}: set in both options and options_file")
        return self

    @property
    def topics(self) -> list[str]:
        return [self.topic] if isinstance(self.topic, str) else list(self.topic)


# --- the consumer, as far as this module uses it (fakes in tests implement this) ------------


class Message(Protocol):
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...
    def error(self) -> KafkaError | None: ...


Rebalance = Callable[[Any, list[TopicPartition]], None]


class Consumer(Protocol):
    """The part of ``confluent_kafka.Consumer`` this source calls (all from one thread)."""

    def subscribe(
        self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance, on_lost: Rebalance
    ) -> None: ...
    def poll(self, timeout: float) -> Message | None: ...
    def consume(self, num_messages: int, timeout: float) -> Sequence[Message]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> Any: ...
    def committed(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]: ...
    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]: ...
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int] | None: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...
    def close(self) -> None: ...


def _real_consumer(conf: dict[str, Any]) -> Consumer:
    return cast(Consumer, confluent_kafka.Consumer(conf))


# --- offsets ----------------------------------------------------------------------------------


#: the contiguous settled-prefix tracker of bridge.checkpoint, one per partition
OffsetTracker = SettledPrefix


# --- partitions and batches -------------------------------------------------------------------


def _raw_size(m: Message) -> int:
    """Bytes a buffered record is counted for (its exact JSON size is known when batched)."""
    k, v = m.key(), m.value()
    return RECORD_OVERHEAD + (len(k) if k else 0) + (len(v) if v else 0)


class _Buffer:
    """Records fetched and not yet handed out, oldest first, with when they arrived (kept
    per poll cycle, not per record) and how many bytes they are counted for."""

    __slots__ = ("arrivals", "bytes", "messages", "sizes")

    def __init__(self) -> None:
        self.messages: collections.deque[Message] = collections.deque()
        self.sizes: collections.deque[int] = collections.deque()
        self.arrivals: collections.deque[list[Any]] = collections.deque()  # [count, monotonic]
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.messages)

    def __bool__(self) -> bool:
        return bool(self.messages)

    @property
    def head_arrived(self) -> float:
        return float(self.arrivals[0][1])

    @property
    def head_offset(self) -> int | None:
        return self.messages[0].offset() if self.messages else None

    def add(self, messages: list[Message], sizes: list[int], now: float) -> int:
        """Append one poll cycle's records of this partition; returns their bytes."""
        nbytes = sum(sizes)
        self.messages.extend(messages)
        self.sizes.extend(sizes)
        self.arrivals.append([len(messages), now])
        self.bytes += nbytes
        return nbytes

    def pop(self) -> tuple[Message, int]:
        """The oldest record and the bytes it was counted for."""
        m, size = self.messages.popleft(), self.sizes.popleft()
        run = self.arrivals[0]
        run[0] -= 1
        if not run[0]:
            self.arrivals.popleft()
        self.bytes -= size
        return m, size

    def push_front(self, messages: list[Message]) -> int:
        """Put records back at the front (a nacked batch), due at once; returns their bytes."""
        sizes = [_raw_size(m) for m in messages]
        self.messages.extendleft(reversed(messages))
        self.sizes.extendleft(reversed(sizes))
        self.arrivals.appendleft([len(messages), 0.0])
        nbytes = sum(sizes)
        self.bytes += nbytes
        return nbytes

    def clear(self) -> int:
        """Drop everything; returns the bytes freed."""
        freed, self.bytes = self.bytes, 0
        self.messages.clear()
        self.sizes.clear()
        self.arrivals.clear()
        return freed


class _Partition:
    """One assigned partition; touched by the event loop thread only."""

    def __init__(
        self,
        topic: str,
        partition: int,
        committed: int | None,
        since_ms: int | None,
        settled: int | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.key: Key = (topic, partition)
        self.tp = TopicPartition(topic, partition)
        self.committed = committed  # last offset the group holds for us
        self.commit_sent = committed  # last offset asked to commit
        start = settled if settled is not None else committed
        self.tracker = OffsetTracker(start)
        self.buffer = _Buffer()
        self.next_offset: int | None = start  # records below were handed out already
        self.since_ms = since_ms  # start = <time>: skip records older than this
        self.inflight: _Batch | None = None
        self.prior: _Batch | None = None  # still running from before a revoke
        self.revoked = False  # being given up: no new batches, buffer dropped
        self.gone = False  # given up: what settles now is not ours to commit
        self.paused = False
        self.not_before = 0.0  # after a nack
        self.nack_delay = 0.0
        self.high_watermark: int | None = None
        self.skipped = 0

    @property
    def name(self) -> str:
        return f"{self.topic}/{self.partition}"

    @property
    def busy(self) -> bool:
        return self.inflight is not None or self.prior is not None

    @property
    def position(self) -> int | None:
        """Where the settled records end (what would be committed)."""
        return self.tracker.committable

    def lag(self) -> int | None:
        """Records not yet settled: the high watermark minus the first unsettled offset."""
        hw = self.high_watermark
        pos = self.tracker.committable
        if pos is None:  # nothing settled yet: the first record known to be pending
            first = self.prior or self.inflight
            pos = first.first if first else self.buffer.head_offset
        if hw is None:
            return None
        return 0 if pos is None and hw == 0 else None if pos is None else max(0, hw - pos)


class _Batch(Delivery):
    """One partition batch. ``ack()`` settles its offsets; ``nack()`` hands its records back
    to the partition's buffer (delivered again first, after a pause)."""

    __slots__ = ("done", "end", "first", "messages", "part", "source")

    def __init__(
        self, source: KafkaSource, part: _Partition, messages: list[Message], event: Event
    ) -> None:
        super().__init__(event)
        self.source = source
        self.part = part
        self.messages = messages
        self.first: int = event.records[0]["offset"]
        self.end: int = event.records[-1]["offset"] + 1
        self.done = False

    def __repr__(self) -> str:
        return f"<batch {self.part.name} offsets {self.first}..{self.end - 1}>"

    async def ack(self) -> None:
        try:
            self.source._settle(self)
        finally:
            await self.source._checkpoint(self.part)

    async def nack(self, error: BaseException | None = None) -> None:
        self.source._give_back(self, error)

    @property
    def abandoned(self) -> bool:
        """Its partition was given up (revoked past ``drain_timeout``, or lost) while it ran:
        the next owner delivers it again, so retrying it here is pointless."""
        return self.part.gone and not self.done


@dataclasses.dataclass(slots=True)
class _Ops:
    """What the event loop asks the polling thread to do before its next poll."""

    pause: list[TopicPartition] = dataclasses.field(default_factory=list)
    resume: list[TopicPartition] = dataclasses.field(default_factory=list)
    commit: list[TopicPartition] = dataclasses.field(default_factory=list)
    watermarks: list[TopicPartition] = dataclasses.field(default_factory=list)
    timeout: float = POLL_TIMEOUT_S


@dataclasses.dataclass(slots=True)
class _Polled:
    messages: list[Message]
    watermarks: dict[Key, int]
    commit_error: str | None = None


_ESCAPED = re.compile(rb'[\x00-\x1f"\\]')  # bytes JSON writes as two or six


def _text(data: bytes | None) -> tuple[str | bytes | None, int]:
    """The value as text if it is UTF-8 (else the bytes), and its JSON size in an event."""
    if data is None:
        return None, 0
    if data.isascii():
        text = data.decode("ascii")
        if _ESCAPED.search(data) is None:
            return text, len(data)
        return text, len(encode_basestring(text)) - 2
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return data, 4 * ((len(data) + 2) // 3)  # base64
    return text, len(data) + len(encode_basestring(text)) - 2 - len(text)


def _native(rec: Mapping[str, Any], m: Message) -> dict[str, Any]:
    """A record of ``format = "native"``: nulls kept, timestamp, headers."""
    kind, ts = m.timestamp()
    out = {
        "topic": rec["topic"],
        "partition": rec["partition"],
        "offset": rec["offset"],
        "timestamp": ts if kind != _TS_NOT_AVAILABLE else None,
        "timestamp_type": _TS_TYPES.get(kind),
        "key": None if m.key() is None else rec["key"],
        "value": None if m.value() is None else rec["value"],
        "headers": _headers(m),
    }
    if rec.get("key_base64"):
        out["key_base64"] = True
    if rec.get("value_base64"):
        out["value_base64"] = True
    return out


def _headers(msg: Message) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, raw in msg.headers() or ():
        value, _ = _text(raw)
        if isinstance(value, bytes):
            out.append(
                {"key": name, "value": base64.b64encode(value).decode(), "value_base64": True}
            )
        else:
            out.append({"key": name, "value": value})
    return out


# --- the source -------------------------------------------------------------------------------


class KafkaSource(Source[KafkaConfig]):
    """Consumes ``config.topic`` in a consumer group; one ordered batch per partition at a
    time (see the module docstring). One ``read()`` at a time, as the core calls it."""

    Config = KafkaConfig
    ordered: ClassVar[bool] = True
    #: builds the consumer from the librdkafka configuration (tests pass a fake)
    consumer_factory: Callable[[dict[str, Any]], Consumer] = staticmethod(_real_consumer)

    def __init__(self, config: KafkaConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.group_id = config.group_id or f"event-bridge-{ctx.name}"
        self.topics = config.topics
        self.start_ms = parse_start(config.start, ctx.timezone)
        opts = {**config.options, **{k: "" for k in config.options_file}}
        strategy = opts.get("partition.assignment.strategy", "")
        # cooperative rebalancing (and KIP-848's protocol) assign and revoke incrementally
        self.incremental = "cooperative" in strategy or opts.get("group.protocol") == "consumer"
        self._native = config.format == "native"
        # a partition is paused with two batches buffered, resumed below one
        self._rec_hw = max(2 * config.batch_size, PREFETCH_MIN_RECORDS)
        self._closed = False
        self._stopping = False  # closing or dropping a failed consumer: revokes do not wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: Worker | None = None
        self._consumer: Consumer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._parts: dict[Key, _Partition] = {}
        self._order: list[_Partition] = []
        self._rr = 0
        self._orphans: dict[Key, _Batch] = {}  # in flight when their partition was revoked
        self._gone: set[Key] = set()  # revoked and not assigned again
        self._settled_before: dict[Key, int] = {}  # where partitions we gave up were settled
        self._stored: dict[Key, int] = {}  # settled positions written to the state store
        self._bytes = 0
        self._wake = asyncio.Event()
        self._settled_evt = asyncio.Event()
        self._commit_pending_since: float | None = None
        self._last_commit = 0.0
        self._last_marks = 0.0
        self._warned: dict[str, float] = {}
        self._connected = False
        self.stats = collections.Counter[str]()

    # --- lifecycle ----------------------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        """The librdkafka configuration, with secrets read from ``options_file`` now."""
        conf: dict[str, Any] = {**DEFAULT_OPTIONS, **self.config.options}
        for name, path in self.config.options_file.items():
            conf[name] = read_secret_file(path)
            logsetup.register_secret(conf[name])
        for name, value in conf.items():
            if _SECRET_OPTION.search(name):
                logsetup.register_secret(value)
        conf.update(
            {
                "bootstrap.servers": self.config.bootstrap_servers,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "latest" if self.config.start == "latest" else "earliest",
                "error_cb": self._on_error,
                "on_commit": self._on_commit,
                "logger": self.ctx.logger,
            }
        )
        return conf

    async def connect(self) -> None:
        if self._closed:
            return
        await self._teardown()
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        worker = Worker(f"kafka-{self.ctx.name}")
        try:
            consumer = await worker.run(self._open, self.client_config())
        except BaseException:
            await worker.aclose()
            raise
        self._worker, self._consumer, self._failure = worker, consumer, None
        self._connected = True
        self._poller = asyncio.create_task(
            self._poll_forever(worker, consumer), name=f"kafka-poll:{self.ctx.name}"
        )
        self.ctx.logger.info(
            "kafka trigger %s: consuming %s in group %s from %s",
            self.ctx.name,
            ", ".join(self.topics),
            self.group_id,
            self.config.bootstrap_servers,
            extra={"trigger": self.ctx.name},
        )

    def _open(self, conf: dict[str, Any]) -> Consumer:
        """On the worker thread: create, check the brokers answer, subscribe."""
        consumer = self.consumer_factory(conf)
        try:
            try:
                meta = consumer.list_topics(timeout=CALL_TIMEOUT_S)
            except KafkaException as e:
                raise ConnectionError(
                    f"no Kafka broker answered at {self.config.bootstrap_servers} within "
                    f"{CALL_TIMEOUT_S:.0f}s ({_describe(e)})"
                ) from None
            known = getattr(meta, "topics", {}) or {}
            missing = [t for t in self.topics if not t.startswith("^") and t not in known]
            if missing:
                self.ctx.logger.warning(
                    "kafka trigger %s: topic(s) %s do not exist (yet); waiting for them",
                    self.ctx.name,
                    ", ".join(missing),
                    extra={"trigger": self.ctx.name},
                )
            consumer.subscribe(
                self.topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                consumer.close()
            raise
        return consumer

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = self._stopping = True
        self._wake.set()
        self._settled_evt.set()  # a revoke waiting for in-flight batches stops waiting
        try:
            await self._stop_polling()
            if self._consumer is not None:
                assert self._worker is not None
                await self._worker.run(self._shutdown, self._consumer, self._commits(force=True))
        finally:
            await self._release()

    async def _teardown(self) -> None:
        """Drop a consumer that failed (before a reconnect): nothing in flight is committed."""
        if self._consumer is None and self._worker is None:
            return
        self._stopping = True
        self._settled_evt.set()
        await self._stop_polling()
        try:
            if self._consumer is not None and self._worker is not None:
                await self._worker.run(self._shutdown, self._consumer, [])
        finally:
            await self._release()

    async def _release(self) -> None:
        self._consumer, self._connected = None, False
        for part in list(self._parts.values()):
            self._forget(part, gone=True)
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.aclose()

    async def _stop_polling(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    def _shutdown(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        """On the worker thread: commit what is settled, leave the group."""
        if offsets:
            self._commit_sync(consumer, offsets, "at shutdown")
        try:
            consumer.close()
        except Exception as e:
            self.ctx.logger.warning(
                "kafka trigger %s: closing the consumer failed: %s",
                self.ctx.name,
                _describe(e),
                extra={"trigger": self.ctx.name},
            )

    # --- polling ------------------------------------------------------------------------------

    async def _poll_forever(self, worker: Worker, consumer: Consumer) -> None:
        try:
            while True:
                polled = await worker.run(self._cycle, consumer, self._ops())
                self._ingest(polled)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.ctx.logger.error(
                "kafka trigger %s: polling failed: %s; reconnecting",
                self.ctx.name,
                _describe(e),
                extra={"trigger": self.ctx.name},
            )
            self._failure = e
            self._wake.set()

    def _cycle(self, consumer: Consumer, ops: _Ops) -> _Polled:
        """On the worker thread: apply what the loop asked for, then poll once."""
        polled = _Polled([], {})
        if ops.pause:
            self._quietly(consumer.pause, ops.pause)
        if ops.resume:
            self._quietly(consumer.resume, ops.resume)
        if ops.commit:
            try:
                consumer.commit(offsets=ops.commit, asynchronous=True)
            except KafkaException as e:
                polled.commit_error = _describe(e)
        for tp in ops.watermarks:
            try:
                marks = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if marks is not None and marks[1] >= 0:
                polled.watermarks[(tp.topic, tp.partition)] = marks[1]
        first = consumer.poll(ops.timeout)
        if first is not None:
            polled.messages.append(first)
            polled.messages.extend(consumer.consume(CONSUME_CHUNK, 0))
        return polled

    def _quietly(
        self, call: Callable[[list[TopicPartition]], None], tps: list[TopicPartition]
    ) -> None:
        try:
            call(tps)
        except KafkaException as e:  # e.g. a partition revoked since the loop asked
            self.ctx.logger.debug("kafka trigger %s: %s", self.ctx.name, _describe(e))

    def _ops(self) -> _Ops:
        """Pause/resume decisions, due commits and watermark reads for the next cycle."""
        ops = _Ops()
        over = self._bytes >= BUFFER_BYTES
        under = self._bytes < BUFFER_BYTES // 2
        limit = self.config.max_batch_bytes
        for part in self._order:
            n, nbytes = len(part.buffer), part.buffer.bytes
            if not part.paused and n and (n >= self._rec_hw or nbytes >= limit or over):
                part.paused = True
                ops.pause.append(part.tp)
            elif part.paused and n < self._rec_hw // 2 and nbytes < limit // 2 and under:
                part.paused = False
                ops.resume.append(part.tp)
            if part.paused:
                ops.timeout = POLL_PAUSED_S
        now = time.monotonic()
        pending = self._commit_pending_since
        if (pending is None or now - pending > COMMIT_STALL_S) and (
            now - self._last_commit >= COMMIT_INTERVAL_S
        ):
            ops.commit = self._commits()
            if ops.commit:
                self._last_commit = self._commit_pending_since = now
        if now - self._last_marks >= WATERMARK_INTERVAL_S:
            self._last_marks = now
            ops.watermarks = [p.tp for p in self._order]
        return ops

    def _commits(self, *, force: bool = False) -> list[TopicPartition]:
        """Offsets settled and not yet sent (``force``: not yet known to be committed)."""
        out = []
        for part in self._parts.values():
            pos = part.position
            ref = part.committed if force else part.commit_sent
            if pos is not None and (ref is None or pos > ref):
                part.commit_sent = pos
                out.append(TopicPartition(part.topic, part.partition, pos))
        return out

    def _ingest(self, polled: _Polled) -> None:
        if polled.commit_error is not None:
            self._commit_failed(polled.commit_error)
        for key, hw in polled.watermarks.items():
            part = self._parts.get(key)
            if part is not None:
                part.high_watermark = hw
        if not polled.messages:
            return
        parts = self._parts
        fresh: dict[_Partition, tuple[list[Message], list[int]]] = {}
        for m in polled.messages:
            if m.error() is not None:
                self._message_error(m, m.error())  # type: ignore[arg-type]
                continue
            where = cast(Key, (m.topic(), m.partition()))
            part = parts.get(where)
            if part is None:
                if where in self._gone:  # revoked: the next owner reads it
                    self.stats["revoked_dropped"] += 1
                    continue
                # assigned without our callback seeing it (it timed out): own it now
                part = self._add_partition(where[0], where[1], None, None)
            offset: int = m.offset()  # type: ignore[assignment]
            if part.next_offset is not None and offset < part.next_offset:
                self.stats["duplicates_dropped"] += 1
                continue
            part.next_offset = offset + 1
            if part.since_ms is not None:
                kind, ts = m.timestamp()
                if kind != _TS_NOT_AVAILABLE and ts < part.since_ms:
                    part.tracker.track(offset, offset + 1, settled=True)
                    part.skipped += 1
                    continue
                part.since_ms = None
            got = fresh.get(part)
            if got is None:
                got = fresh[part] = ([], [])
            got[0].append(m)
            k, v = m.key(), m.value()
            got[1].append(RECORD_OVERHEAD + (len(k) if k else 0) + (len(v) if v else 0))
        if not fresh:
            return
        now = time.monotonic()
        for part, (msgs, sizes) in fresh.items():
            self._bytes += part.buffer.add(msgs, sizes, now)
            if part.high_watermark is None or part.high_watermark < (part.next_offset or 0):
                part.high_watermark = part.next_offset
        self._wake.set()

    def _message_error(self, m: Message, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        self._warn(
            f"{code}",
            "kafka trigger %s: %s (%s)",
            self.ctx.name,
            err.str(),
            f"{m.topic()}/{m.partition()}" if m.topic() else "consumer",
        )

    # --- rebalance (callbacks on the worker thread; state changes on the loop) ---------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        committed: dict[Key, int] = {}
        known = True
        try:
            for tp in consumer.committed(partitions, timeout=CALL_TIMEOUT_S):
                if tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as e:
            known = False
            self.ctx.logger.warning(
                "kafka trigger %s: cannot read committed offsets (%s); librdkafka resumes "
                "from them itself",
                self.ctx.name,
                _describe(e),
                extra={"trigger": self.ctx.name},
            )
        since: set[Key] = set()
        if known and self.start_ms is not None:
            fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in committed]
            since = {(tp.topic, tp.partition) for tp in fresh}
            self._seek_to_time(consumer, fresh)
        added = [
            (tp.topic, tp.partition, committed.get((tp.topic, tp.partition)),
             self.start_ms if (tp.topic, tp.partition) in since else None)
            for tp in partitions
        ]  # fmt: skip
        resume_at = self._in_loop(self._assigned(added, known), CALL_TIMEOUT_S) or {}
        for tp in partitions:
            at = resume_at.get((tp.topic, tp.partition))
            if at is not None:
                tp.offset = at
        if self.incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:
            # librdkafka keeps a partition paused across a revoke and a re-assign
            self._quietly(consumer.resume, partitions)
            self.ctx.logger.info(
                "kafka trigger %s: assigned %s",
                self.ctx.name,
                ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions),
                extra={"trigger": self.ctx.name},
            )

    def _seek_to_time(self, consumer: Any, fresh: list[TopicPartition]) -> None:
        """Set the start offset of partitions without a committed one to ``start``'s time."""
        if not fresh:
            return
        assert self.start_ms is not None
        query = [TopicPartition(tp.topic, tp.partition, self.start_ms) for tp in fresh]
        try:
            found = {
                (tp.topic, tp.partition): tp.offset
                for tp in consumer.offsets_for_times(query, timeout=CALL_TIMEOUT_S)
            }
        except KafkaException as e:
            self.ctx.logger.warning(
                "kafka trigger %s: cannot look up offsets by time (%s); reading from the "
                "beginning and skipping older records",
                self.ctx.name,
                _describe(e),
                extra={"trigger": self.ctx.name},
            )
            found = {}
        for tp in fresh:
            offset = found.get((tp.topic, tp.partition), confluent_kafka.OFFSET_BEGINNING)
            tp.offset = offset if offset >= 0 else confluent_kafka.OFFSET_END

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        offsets = self._in_loop(
            self._revoked(keys, lost=False), self.config.drain_timeout + CALL_TIMEOUT_S
        )
        if offsets:
            self._commit_sync(consumer, offsets, "on revoke")

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._in_loop(self._revoked(keys, lost=True), CALL_TIMEOUT_S)

    def _in_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T | None:
        """From the worker thread: run ``coro`` on the event loop and wait for its result."""
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            return None
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is shutting down
            coro.close()
            return None
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            self.ctx.logger.error(
                "kafka trigger %s: the event loop did not answer a rebalance within %.0fs",
                self.ctx.name,
                timeout,
                extra={"trigger": self.ctx.name},
            )
            return None

    async def _assigned(
        self, added: list[tuple[str, int, int | None, int | None]], known: bool
    ) -> dict[Key, int]:
        """Create the partitions' state. A partition this process had before and settled
        further than the group's committed offset (the commit failed: the session was lost,
        the brokers were away) resumes after what it settled: those records were handled.
        Returns those start offsets."""
        resume_at: dict[Key, int] = {}
        for topic, partition, committed, since_ms in added:
            key = (topic, partition)
            if key in self._parts:
                continue
            settled = self._settled_before.get(key) if known else None
            stored = await self._stored_position(key, committed) if known else None
            if stored is not None and (settled is None or stored > settled):
                settled = stored
            if settled is not None and (committed is None or settled > committed):
                resume_at[key] = settled
                since_ms = None
            else:
                settled = None
            self._add_partition(topic, partition, committed, since_ms, settled)
        return resume_at

    # --- settled positions in the state store (survive kill -9) -------------------------------

    def _checkpoint_key(self, key: Key) -> str:
        return json.dumps([self.group_id, key[0], key[1]])

    async def _checkpoint(self, part: _Partition) -> None:
        """Write where ``part`` is settled to the state store before the ack returns (a
        write that survives ``kill -9``; no fsync per ack): commits are asynchronous (every 100 ms, and they can stall), so after a
        ``kill -9`` the broker's committed offset can be far behind what was handled. Only
        the batches in flight then are delivered again. The committed offset known at the
        time is stored with it: a group whose offsets were later moved back (a reset, a
        recreated topic) ignores the checkpoint. Never raises: the commit still follows."""
        pos = part.position
        if pos is None or pos <= self._stored.get(part.key, -1):
            return
        self._stored[part.key] = pos
        value = json.dumps({"settled": pos, "committed": part.committed})
        try:
            await self.ctx.store.put_position(CHECKPOINT_NS, self._checkpoint_key(part.key), value)
        except Exception as e:
            self._warn(
                "checkpoint",
                "kafka trigger %s: storing the settled offset of %s failed (%s); after a "
                "crash more records may be delivered again",
                self.ctx.name,
                part.name,
                e,
            )

    async def _stored_position(self, key: Key, committed: int | None) -> int | None:
        """The settled position stored for ``key``, unless the group's committed offset moved
        back below the one known when it was stored (offsets reset on purpose)."""
        try:
            raw = await self.ctx.store.get(CHECKPOINT_NS, self._checkpoint_key(key))
            if raw is None:
                return None
            doc = json.loads(raw)
            settled, then = int(doc["settled"]), doc.get("committed")
        except Exception as e:
            self._warn(
                "checkpoint-read",
                "kafka trigger %s: cannot read the stored offset of %s/%s (%s); starting "
                "from the committed offset",
                self.ctx.name,
                key[0],
                key[1],
                e,
            )
            return None
        if then is not None and (committed is None or committed < int(then)):
            return None  # moved back since: the operator (or a new topic) decides
        return settled

    def _add_partition(
        self,
        topic: str,
        partition: int,
        committed: int | None,
        since_ms: int | None,
        settled: int | None = None,
    ) -> _Partition:
        part = _Partition(topic, partition, committed, since_ms, settled)
        self._gone.discard(part.key)
        orphan = self._orphans.get(part.key)
        if orphan is not None and not orphan.done:
            part.prior = orphan  # its next batch waits for the one still running
        self._parts[part.key] = part
        self._order = list(self._parts.values())
        return part

    async def _revoked(self, keys: list[Key], *, lost: bool) -> list[TopicPartition]:
        parts = [self._parts[k] for k in keys if k in self._parts]
        for part in parts:
            self._forget(part, gone=lost)
        if not lost:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.drain_timeout
            while (
                not self._stopping
                and any(p.inflight is not None for p in parts)
                and loop.time() < deadline
            ):
                self._settled_evt.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - loop.time()):
                        await self._settled_evt.wait()
        offsets = []
        for part in parts:
            if not part.gone:
                self._forget(part, gone=True)
            if part.inflight is not None:
                self.ctx.logger.warning(
                    "kafka trigger %s: %s revoked while %r was in flight%s; the next owner "
                    "delivers it again",
                    self.ctx.name,
                    part.name,
                    part.inflight,
                    " (lost)" if lost else f" after {self.config.drain_timeout:g}s",
                    extra={"trigger": self.ctx.name},
                )
            pos = part.position
            if not lost and pos is not None and (part.committed is None or pos > part.committed):
                offsets.append(TopicPartition(part.topic, part.partition, pos))
        if parts:
            self.ctx.logger.info(
                "kafka trigger %s: %s %s",
                self.ctx.name,
                "lost" if lost else "revoked",
                ", ".join(p.name for p in parts),
                extra={"trigger": self.ctx.name},
            )
        return offsets

    def _forget(self, part: _Partition, *, gone: bool) -> None:
        """Stop handing out batches of ``part`` and drop its buffer. ``gone``: it is no longer
        ours, and its in-flight batch becomes an orphan (its ack commits nothing)."""
        if self._parts.get(part.key) is part:
            del self._parts[part.key]
            self._order = list(self._parts.values())
            self._gone.add(part.key)
        part.revoked = True
        self._bytes -= part.buffer.clear()
        if part.position is not None:
            self._settled_before[part.key] = part.position
        if gone:
            part.gone = True
            if part.inflight is not None:
                self._orphans[part.key] = part.inflight

    def _commit_sync(self, consumer: Any, offsets: list[TopicPartition], when: str) -> None:
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            self.ctx.logger.warning(
                "kafka trigger %s: commit %s failed (%s); those records will be delivered again",
                self.ctx.name,
                when,
                _describe(e),
                extra={"trigger": self.ctx.name},
            )
            return
        ok = [tp for tp in result or offsets if tp.error is None]
        self._from_thread(self._committed, [(tp.topic, tp.partition, tp.offset) for tp in ok])

    # --- callbacks from librdkafka (worker thread) ---------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._from_thread(self._fail, KafkaException(err))
            return
        code = err.code()
        if code in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._from_thread(self._set_connected, False)
        self._warn(str(code), "kafka trigger %s: %s", self.ctx.name, err.str())

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        done = [(tp.topic, tp.partition, tp.offset) for tp in partitions if tp.error is None]
        failed = None if err is None else err.str()
        if err is None and len(done) < len(partitions):
            failed = "; ".join(str(tp.error) for tp in partitions if tp.error is not None)
        self._from_thread(self._commit_result, done, failed)

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _fail(self, e: BaseException) -> None:
        self._failure = e
        self._wake.set()

    def _set_connected(self, up: bool) -> None:
        self._connected = up

    def _commit_result(self, done: list[tuple[str, int, int]], failed: str | None) -> None:
        self._commit_pending_since = None
        self._committed(done)
        if failed:
            self._commit_failed(failed)

    def _committed(self, done: list[tuple[str, int, int]]) -> None:
        self._connected = True
        for topic, partition, offset in done:
            part = self._parts.get((topic, partition))
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def _commit_failed(self, why: str) -> None:
        self._commit_pending_since = None
        for part in self._parts.values():
            part.commit_sent = part.committed  # sent again by the next cycle
        self._warn("commit", "kafka trigger %s: committing offsets failed: %s", self.ctx.name, why)

    def _warn(self, what: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(what, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[what] = now
            self.ctx.logger.warning(msg, *args, extra={"trigger": self.ctx.name})

    # --- reading ------------------------------------------------------------------------------

    async def read(self) -> Delivery:
        while True:
            if self._closed:
                raise EndOfInput
            if self._failure is not None:
                raise NotConnected(f"the Kafka consumer failed: {_describe(self._failure)}")
            if self._consumer is None:
                raise NotConnected("read() before connect()")
            self._wake.clear()
            now = time.monotonic()
            part, wait = self._ready(now)
            if part is not None:
                return self._take(part)
            if wait is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    def _ready(self, now: float) -> tuple[_Partition | None, float | None]:
        """The next partition with a batch to deliver (round robin), else how long until one
        may have (a batch window or a nack pause ending), None for "until woken"."""
        order, n = self._order, len(self._order)
        size, limit, window = (
            self.config.batch_size,
            self.config.max_batch_bytes,
            self.config.batch_window,
        )
        wait: float | None = None
        for i in range(n):
            part = order[(self._rr + i) % n]
            if part.busy or not part.buffer:
                continue
            if part.not_before > now:
                due = part.not_before - now
            elif len(part.buffer) >= size or part.buffer.bytes >= limit:
                due = 0.0
            else:
                due = part.buffer.head_arrived + window - now
            if due <= 0:
                self._rr = (self._rr + i + 1) % n
                return part, None
            wait = due if wait is None else min(wait, due)
        return None, wait

    def _take(self, part: _Partition) -> _Batch:
        """Hand out the next batch of ``part``: up to batch_size records and max_batch_bytes
        of JSON (exact: escapes and base64 counted), at least one record."""
        buf, size, limit = part.buffer, self.config.batch_size, self.config.max_batch_bytes
        topic, partition = part.topic, part.partition
        overhead = RECORD_OVERHEAD + len(topic)
        messages: list[Message] = []
        records: list[dict[str, Any]] = []
        nbytes = 0
        while buf and len(messages) < size:
            m = buf.messages[0]
            k, ksize = _text(m.key())
            v, vsize = _text(m.value())
            n = overhead + ksize + vsize
            if messages and nbytes + n > limit:
                break
            messages.append(m)
            self._bytes -= buf.pop()[1]
            records.append(
                ckafka_record(
                    topic=topic, partition=partition, offset=m.offset() or 0, key=k, value=v
                )
            )
            nbytes += n
        native = None
        if self._native:
            native = {"records": [_native(r, m) for r, m in zip(records, messages, strict=True)]}
        kind, ts = messages[0].timestamp()
        when = (
            datetime.fromtimestamp(ts / 1000, UTC) if kind != _TS_NOT_AVAILABLE and ts > 0 else None
        )
        event = Event.fresh(  # records built here, held by nobody else: not frozen
            kind=Kind.CKAFKA,
            trigger=self.ctx.name,
            time=when or datetime.now(UTC),
            records=tuple(records),
            native=native,
        )
        batch = _Batch(self, part, messages, event)
        part.tracker.track(batch.first, batch.end)
        part.inflight = batch
        self.stats["batches"] += 1
        self.stats["records"] += len(messages)
        return batch

    # --- settling (event loop) ----------------------------------------------------------------

    def _settle(self, batch: _Batch) -> None:
        if batch.done:
            return
        batch.done = True
        part = batch.part
        part.tracker.settle(batch.first)
        if part.inflight is batch:
            part.inflight = None
            part.nack_delay = 0.0
        self._settled_evt.set()
        self._wake.set()
        if part.gone:
            if self._hand_over(batch, settled=True):
                return  # the partition came back to us: its new state commits it
            if self._consumer is None or self._closed:
                raise NotConnected(
                    f"{batch!r} settled after the trigger closed: not committed; it will be "
                    "delivered again"
                )
            self.ctx.logger.warning(
                "kafka trigger %s: %r settled after its partition was revoked: not committed "
                "by this process",
                self.ctx.name,
                batch,
                extra={"trigger": self.ctx.name},
            )
        elif self._consumer is None:
            raise NotConnected(f"{batch!r} settled after the trigger closed: not committed")

    def _give_back(self, batch: _Batch, error: BaseException | None) -> None:
        if batch.done:
            return
        batch.done = True
        part = batch.part
        part.tracker.cancel(batch.first)
        if part.inflight is batch:
            part.inflight = None
        self._settled_evt.set()
        self._wake.set()
        if part.gone:
            self._hand_over(batch, settled=False)
        if part.revoked:  # the next owner (maybe this process again) reads it again
            return
        self._bytes += part.buffer.push_front(batch.messages)
        lo, hi = NACK_DELAY_S
        part.nack_delay = min(hi, max(lo, part.nack_delay * 2))
        part.not_before = time.monotonic() + part.nack_delay
        self.ctx.logger.warning(
            "kafka trigger %s: %r was not accepted (%s); delivering it again in %.1fs",
            self.ctx.name,
            batch,
            error,
            part.nack_delay,
            extra={"trigger": self.ctx.name},
        )

    def _hand_over(self, batch: _Batch, *, settled: bool) -> bool:
        """A batch of a revoked partition finished. If the partition came back to us and
        waits for it, let it go on, without delivering what the batch covered again (True)."""
        key = batch.part.key
        if self._orphans.get(key) is batch:
            del self._orphans[key]
        pos = batch.part.position
        if settled and pos is not None and pos > self._settled_before.get(key, -1):
            self._settled_before[key] = pos
        current = self._parts.get(key)
        if current is None or current.prior is not batch:
            return False
        current.prior = None
        if not settled:
            return True
        while current.buffer and (current.buffer.head_offset or 0) < batch.end:
            self._bytes -= current.buffer.pop()[1]
        with contextlib.suppress(ValueError):  # already below its committable offset
            current.tracker.track(batch.first, batch.end, settled=True)
        if current.next_offset is None or current.next_offset < batch.end:
            current.next_offset = batch.end
        return True

    # --- status -------------------------------------------------------------------------------

    def status(self) -> Mapping[str, Any]:
        parts: dict[str, Any] = {}
        lags: dict[str, int | None] = {}
        for part in sorted(self._parts.values(), key=lambda p: p.key):
            lags[part.name] = part.lag()
            parts[part.name] = {
                "committed": part.committed,
                "position": part.position,
                "high_watermark": part.high_watermark,
                "lag": lags[part.name],
                "in_flight": repr(part.inflight) if part.inflight is not None else None,
                "buffered": len(part.buffer),
                "paused": part.paused,
            }
        return {
            "group_id": self.group_id,
            "topics": self.topics,
            "connected": self._consumer is not None and self._failure is None and self._connected,
            "assigned": len(parts),
            "lag": lags,  # per partition (bridge_source_lag{partition=…}); None: not known yet
            "lag_total": sum(n for n in lags.values() if n is not None),
            "partitions": parts,
        }


def _describe(e: BaseException) -> str:
    if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
        err: KafkaError = e.args[0]
        return f"{err.name()}: {err.str()}"
    return str(e) or type(e).__name__


# --- the dead-letter sink ---------------------------------------------------------------------

SINK_TIMEOUT_S = 30.0  # a dead letter not acknowledged by the brokers within this raises
SINK_MAX_BYTES = 1_000_000  # Kafka's default message.max.bytes


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
    parts = urlsplit(spec.strip())
    if parts.scheme != "kafka" or not parts.netloc:
        raise ValueError(
            f'invalid Kafka dead-letter URL "{spec}": use kafka://TOPIC?bootstrap_servers=HOST:PORT'
        )
    options: dict[str, str] = {}
    files: dict[str, Path] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("bootstrap_servers", "bootstrap.servers"):
            options["bootstrap.servers"] = value
        elif name.endswith("_file"):
            files[name.removesuffix("_file")] = Path(value)
        else:
            options[name] = value
    if not options.get("bootstrap.servers"):
        raise ValueError(f'Kafka dead-letter URL "{spec}" needs ?bootstrap_servers=HOST:PORT')
    max_bytes = int(options.get("message.max.bytes", SINK_MAX_BYTES))
    return SinkTarget(parts.netloc, options, files, max_bytes)


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
            if _SECRET_OPTION.search(name):
                logsetup.register_secret(value)
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
            logsetup.register_secret(conf[name])
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
