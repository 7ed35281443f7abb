"""Per-partition state of the Kafka trigger, touched by the event loop only: each assigned
partition's buffer of fetched records, its offsets (a
:class:`~bridge.checkpoint.SettledPrefix`: only the end of the contiguous settled prefix is
ever committed), its batches in flight (consecutive ones, handed out together: the ordered
path runs them in order), and :class:`Partitions`, the table of them with what was given up
in a rebalance. Also how a batch of records becomes a CKafka event.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import functools
import itertools
import json
import operator
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

import confluent_kafka
import orjson
from confluent_kafka import TopicPartition

from bridge.plugin import Event, Format, Kind, RawEvent, SettledPrefix, StateStore, ckafka_record

from .client import Key, Message, Ops

PREFETCH_MIN_RECORDS = 5000  # a partition buffers up to this many records ahead, at least
#: all partitions' buffers together: estimated JSON bytes, and records (each partition may
#: fill its share of both, and at least two batches)
BUFFER_BYTES = 32 * 1024 * 1024
BUFFER_RECORDS = 100_000
RECORD_OVERHEAD = 100  # JSON bytes of one Ckafka record besides its key, value and topic
#: a record's JSON is at most this many times its bytes (a control byte is "\u00XX")
WORST_EXPANSION = 6
HEADER_OVERHEAD = 30  # JSON bytes of one header in a native record besides its name, value
NACK_DELAY_S = (0.5, 30.0)  # a nacked batch comes back after this, doubling
#: a partition hands out consecutive batches up to this many records' worth at once (at
#: least one batch): with small batches, the ordered path runs many in one worker round
#: trip. 1,024: batches of 100 (the default) ran at 180,000 records/s with 256 (two in a
#: round trip), 266,000 with 512, 297,000 with 1,024, 308,000 with 2,048 (bench/
#: kafka_throughput.py --batch-size 100)
PIPELINE_RECORDS = 1024
#: and at most this many batches: one record a batch ran at 31,000-32,000 records/s with
#: 256, 24,000 with 1,024 (bench/kafka_throughput.py --skip-b)
PIPELINE_BATCHES = 256
#: and at least this many batches (the bytes below permitting): a partition's batches of
#: 1,000 run back to back in a ``python`` worker, not one round trip each (on a 2-core
#: machine, ten alternations of single runs with one batch at a time: medians 29 % → 35 %
#: of a plain loop, CPU per record lower in nine; bench/kafka_throughput.py --runs 1).
#: Only for a function that runs them in one round trip now (``SourceContext.batches``):
#: for one that runs them one at a time they would gain nothing, and they are what a
#: partition has in flight (what a ``kill -9`` may deliver twice)
PIPELINE_MIN_BATCHES = 4
#: and at most this many bytes (as counted in buffers: ``RECORD_OVERHEAD`` and the key's
#: and the value's lengths each): eight batches of 100 records of 10 KB
PIPELINE_BYTES = 8 * 1024 * 1024
TS_NOT_AVAILABLE = confluent_kafka.TIMESTAMP_NOT_AVAILABLE
_TS_TYPES = {
    confluent_kafka.TIMESTAMP_CREATE_TIME: "create_time",
    confluent_kafka.TIMESTAMP_LOG_APPEND_TIME: "log_append_time",
}

#: the contiguous settled-prefix tracker of bridge.checkpoint, one per partition
OffsetTracker = SettledPrefix


#: a record's fields read by ``map`` (C calls, no Python step per record)
_key: Callable[[Message], bytes | None] = confluent_kafka.Message.key  # type: ignore[assignment]
_value: Callable[[Message], bytes | None] = confluent_kafka.Message.value  # type: ignore[assignment]
_error: Callable[[Message], Any] = confluent_kafka.Message.error  # type: ignore[assignment]
_partition: Callable[[Message], int] = confluent_kafka.Message.partition  # type: ignore[assignment]
_topic: Callable[[Message], str] = confluent_kafka.Message.topic  # type: ignore[assignment]
_offsets: Callable[[Message], int] = confluent_kafka.Message.offset  # type: ignore[assignment]
_timestamp: Callable[[Message], tuple[int, int]] = confluent_kafka.Message.timestamp  # type: ignore[assignment]
_headers_of: Callable[[Message], Any] = confluent_kafka.Message.headers  # type: ignore[assignment]
_is_none = functools.partial(operator.is_, None)


def pipeline(batch_size: int, together: bool) -> int:
    """How many consecutive batches of ``batch_size`` records a partition hands out at once,
    at most: ``PIPELINE_RECORDS``' worth and ``PIPELINE_BATCHES``, at least
    ``PIPELINE_MIN_BATCHES`` when the function runs them ``together`` (in one round trip),
    else one (``PIPELINE_BYTES`` bounds them too)."""
    least = PIPELINE_MIN_BATCHES if together else 1
    return max(least, min(PIPELINE_BATCHES, PIPELINE_RECORDS // batch_size))


def _keys_values(messages: list[Message]) -> tuple[list[bytes | None], list[bytes | None]]:
    """The records' keys and values, each read once by ``map``."""
    return list(map(_key, messages)), list(map(_value, messages))


def _lengths(keys: list[bytes | None], values: list[bytes | None]) -> list[int]:
    """Each record's key and value lengths together: what a buffered record is counted for
    besides ``RECORD_OVERHEAD`` (added where they are summed; their exact JSON size is known
    when batched). Without a Python step per record when no value is null (or empty) and
    every record has a key, or none has."""
    if all(values):
        if all(keys):
            return list(map(operator.add, map(len, keys), map(len, values)))  # type: ignore[arg-type]
        if not any(keys):
            return list(map(len, values))  # type: ignore[arg-type]
    return [(len(k) if k else 0) + (len(v) if v else 0) for k, v in zip(keys, values, strict=True)]


class Buffer:
    """Records fetched and not yet handed out, oldest first, with when they arrived (kept
    per poll cycle, not per record) and how many bytes they are counted for.

    The records, their keys, values and lengths are lists read from ``head`` on: a batch is
    taken as a slice (no Python step per record) and its slots are emptied, so that no
    record handed out stays referenced here, outside the bytes counted; the taken front is
    dropped once it is half the list (each slot is moved at most once on average). The keys
    and values are read once, when the records arrive (each read is a method call)."""

    __slots__ = ("arrivals", "bytes", "head", "keys", "lengths", "messages", "values")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.keys: list[bytes | None] = []
        self.values: list[bytes | None] = []
        self.lengths: list[int] = []  # each record's key and value lengths (``_lengths``)
        self.head = 0  # the first record not taken yet
        self.arrivals: collections.deque[list[Any]] = collections.deque()  # [count, monotonic]
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.messages) - self.head

    def __bool__(self) -> bool:
        return len(self.messages) > self.head

    def __iter__(self) -> Iterator[Message]:
        return itertools.islice(self.messages, self.head, None)

    def held_sizes(self) -> list[int]:
        """The bytes each record held is counted for, oldest first."""
        return [RECORD_OVERHEAD + x for x in self.lengths[self.head :]]

    @property
    def head_arrived(self) -> float:
        return float(self.arrivals[0][1])

    @property
    def first(self) -> Message | None:
        """The oldest record held."""
        return self.messages[self.head] if self else None

    @property
    def head_offset(self) -> int | None:
        m = self.first
        return None if m is None else m.offset()

    def head_bytes(self, n: int) -> int:
        """The bytes the oldest ``n`` records are counted for."""
        held = self.lengths[self.head : self.head + n]
        return sum(held) + RECORD_OVERHEAD * len(held)

    def headers_bytes(self, n: int) -> int:
        """The bytes the headers of the oldest ``n`` records are counted for in their
        ``format = "native"`` JSON, as the buffer counts keys and values (six times it bounds
        their JSON): their names and values and ``HEADER_OVERHEAD`` each. Mostly none of
        them has headers: 0."""
        i = self.head
        found = list(filter(None, map(_headers_of, self.messages[i : i + n])))
        return sum(
            HEADER_OVERHEAD + len(name) + (len(value) if value else 0)
            for headers in found
            for name, value in headers
        )

    def fit(self, n: int, limit: int, extra: int) -> tuple[int, bool]:
        """How many of the oldest ``n`` records fit in ``limit`` bytes of JSON (at least one),
        without measuring each: a record's JSON is at most its size, ``extra`` and what the
        escapes of its key and value add, and those of a run of records add what they add
        to the JSON of all their keys and values written as one string (:func:`_escapes`,
        one pass by orjson). If its escapes make the run that fits without them too long, it
        is cut to the longest that fits with its own (found by halving). Also whether no
        escape is needed at all. (0, False) when a key or value in the run is not UTF-8
        (its record is base64 in the event)."""
        i = self.head
        sizes = map(
            functools.partial(operator.add, extra + RECORD_OVERHEAD), self.lengths[i : i + n]
        )
        ends = list(itertools.accumulate(sizes, initial=0))
        k = max(1, bisect.bisect_right(ends, limit) - 1)
        grown = _escapes(self.keys[i : i + k], self.values[i : i + k])
        if grown is None:
            return 0, False
        if k > 1 and ends[k] + grown > limit:
            # the longest run that fits with its own escapes: at least the one that fits
            # with all of the first k's, less than k; found by halving (an orjson pass each)
            lo, hi = max(1, bisect.bisect_right(ends, limit - grown) - 1), k
            while hi - lo > 1:
                mid = (lo + hi) // 2
                more = _escapes(self.keys[i : i + mid], self.values[i : i + mid])
                lo, hi = (mid, hi) if more is not None and ends[mid] + more <= limit else (lo, mid)
            k = lo
        return k, not grown

    def add(self, messages: list[Message], now: float) -> int:
        """Append one poll cycle's records of this partition; returns their bytes."""
        keys, values = _keys_values(messages)
        lengths = _lengths(keys, values)
        nbytes = sum(lengths) + RECORD_OVERHEAD * len(lengths)
        self.messages.extend(messages)
        self.keys.extend(keys)
        self.values.extend(values)
        self.lengths.extend(lengths)
        self.arrivals.append([len(messages), now])
        self.bytes += nbytes
        return nbytes

    def take(self, n: int) -> tuple[list[Message], int]:
        """The oldest ``n`` records and the bytes they were counted for."""
        messages, _, _, nbytes = self.take_fields(n)
        return messages, nbytes

    def take_fields(
        self, n: int
    ) -> tuple[list[Message], list[bytes | None], list[bytes | None], int]:
        """The oldest ``n`` records, their keys and values, and the bytes they were counted
        for."""
        i = self.head
        j = min(i + n, len(self.messages))
        taken, keys, values = self.messages[i:j], self.keys[i:j], self.values[i:j]
        nbytes = sum(self.lengths[i:j]) + RECORD_OVERHEAD * (j - i)
        lists = (self.messages, self.keys, self.values, self.lengths)
        if j == len(self.messages):
            for x in lists:
                x.clear()
            j = 0
        elif j > 1024 and 2 * j > len(self.messages):
            for x in lists:
                del x[:j]
            j = 0
        else:  # the batch's records are its own now: the buffer keeps no reference to them
            for x in lists[:3]:
                x[i:j] = itertools.repeat(None, j - i)  # type: ignore[arg-type]
        self.head = j
        left = len(taken)
        while left:
            run = self.arrivals[0]
            if run[0] > left:
                run[0] -= left
                break
            left -= run[0]
            self.arrivals.popleft()
        self.bytes -= nbytes
        return taken, keys, values, nbytes

    def push_front(self, messages: list[Message]) -> int:
        """Put records back at the front (a nacked batch), due at once; returns their bytes."""
        keys, values = _keys_values(messages)
        lengths = _lengths(keys, values)
        i = self.head
        self.messages[:i] = messages
        self.keys[:i] = keys
        self.values[:i] = values
        self.lengths[:i] = lengths
        self.head = 0
        self.arrivals.appendleft([len(messages), 0.0])
        nbytes = sum(lengths) + RECORD_OVERHEAD * len(lengths)
        self.bytes += nbytes
        return nbytes

    def clear(self) -> int:
        """Drop everything; returns the bytes freed."""
        freed, self.bytes = self.bytes, 0
        for x in (self.messages, self.keys, self.values, self.lengths):
            x.clear()
        self.head = 0
        self.arrivals.clear()
        return freed


class Batch:
    """The records of one handed-out batch of a partition (its delivery's ``key``)."""

    __slots__ = ("cut", "done", "end", "first", "messages", "part")

    def __init__(self, part: Partition, messages: list[Message], first: int, end: int) -> None:
        self.part = part
        self.messages = messages
        self.first = first
        self.end = end
        self.done = False
        self.cut = False  # behind the oldest batch in flight when its partition was revoked

    def __repr__(self) -> str:
        return f"<batch {self.part.name} offsets {self.first}..{self.end - 1}>"

    def abandoned(self) -> bool:
        """Its partition was given up (revoked past ``drain_timeout``, or lost) while it ran:
        the next owner delivers it again, so retrying it here is pointless. Or its partition
        is being revoked and it was not the oldest batch in flight then: a revoke drains
        the batch running, not those handed out behind it."""
        return not self.done and (self.part.gone or self.cut)


class Partition:
    """One assigned partition."""

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
        self.buffer = Buffer()
        self.next_offset: int | None = start  # records below were handed out already
        self.since_ms = since_ms  # start = <time>: skip records older than this
        #: handed out and not settled, oldest first
        self.inflight: collections.deque[Batch] = collections.deque()
        #: still running from before a revoke, oldest first
        self.prior: collections.deque[Batch] = collections.deque()
        self.revoked = False  # being given up: no new batches, buffer dropped
        self.gone = False  # given up: what settles now is not ours to commit
        self.paused = False
        self.not_before = 0.0  # after a nack
        self.nack_delay = 0.0
        self.high_watermark: int | None = None
        self.skipped = 0
        #: the bytes the batches handed out with the oldest in flight were counted for
        self.burst_bytes = 0

    @property
    def name(self) -> str:
        return f"{self.topic}/{self.partition}"

    @property
    def busy(self) -> bool:
        return bool(self.inflight) or bool(self.prior)

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
            pos = first[0].first if first else self.buffer.head_offset
        if hw is None:
            return None
        return 0 if pos is None and hw == 0 else None if pos is None else max(0, hw - pos)

    def status(self) -> dict[str, Any]:
        return {
            "committed": self.committed,
            "position": self.position,
            "high_watermark": self.high_watermark,
            "lag": self.lag(),
            "in_flight": describe_batches(self.inflight),
            "buffered": len(self.buffer),
            "paused": self.paused,
        }


class Partitions:
    """The assigned partitions, round robin, and what is known of those given up."""

    def __init__(
        self,
        batch_size: int,
        max_batch_bytes: int,
        window_s: float,
        topic: str | None = None,
        together: Callable[[], bool] = lambda: False,
    ) -> None:
        self.size, self.limit, self.window = batch_size, max_batch_bytes, window_s
        #: whether the function runs consecutive batches in one round trip (``pipeline``)
        self.together = together
        #: the one topic subscribed to by name, if so: every record fetched is of it
        self.topic = topic
        self.parts: dict[Key, Partition] = {}
        self.order: list[Partition] = []
        self.rr = 0
        #: in flight when their partition was revoked, oldest first
        self.orphans: dict[Key, list[Batch]] = {}
        self.gone: set[Key] = set()  # revoked and not assigned again
        self.settled_before: dict[Key, int] = {}  # where partitions we gave up were settled
        self.bytes = 0  # all buffers together
        self.stats = collections.Counter[str]()

    def add(
        self,
        topic: str,
        partition: int,
        committed: int | None,
        since_ms: int | None,
        settled: int | None = None,
    ) -> Partition:
        part = Partition(topic, partition, committed, since_ms, settled)
        self.gone.discard(part.key)
        # its next batch waits for the ones still running
        part.prior.extend(b for b in self.orphans.get(part.key, ()) if not b.done)
        self.parts[part.key] = part
        self.order = list(self.parts.values())
        return part

    def forget(self, part: Partition, *, gone: bool) -> None:
        """Stop handing out batches of ``part`` and drop its buffer. ``gone``: it is no longer
        ours, and its in-flight batch becomes an orphan (its ack commits nothing)."""
        if self.parts.get(part.key) is part:
            del self.parts[part.key]
            self.order = list(self.parts.values())
            self.gone.add(part.key)
        part.revoked = True
        for batch in itertools.islice(part.inflight, 1, None):
            batch.cut = True
        self.bytes -= part.buffer.clear()
        if part.position is not None:
            self.settled_before[part.key] = part.position
        if gone:
            part.gone = True
            if part.inflight:
                self.orphans[part.key] = list(part.inflight)

    # --- fetching -----------------------------------------------------------------------------

    def ingest(self, messages: list[Message], on_error: Callable[[Message], None]) -> bool:
        """Buffer one poll cycle's records per partition (dropping what was handed out before
        and, for ``start = <time>``, what is older); True if any were buffered.

        A poll cycle brings runs of one partition's records (often one run): the fields are
        read by ``map`` and a run whose offsets increase past what was handed out is
        buffered as a slice, without a Python step per record."""
        errors = list(map(_error, messages))
        if any(errors):  # (a KafkaError cannot be compared with None)
            for m, e in zip(messages, errors, strict=True):
                if e is not None:
                    on_error(m)
            messages = list(itertools.compress(messages, map(_is_none, errors)))
        n = len(messages)
        if not n:
            return False
        partitions = list(map(_partition, messages))
        # one topic subscribed to by name: its records are all of it (not read for each)
        topics = [self.topic] * n if self.topic is not None else list(map(_topic, messages))
        if partitions.count(partitions[0]) == n and topics.count(topics[0]) == n:
            bounds = [0, n]
        else:  # where the partition or the topic changes from one record to the next
            ahead = range(1, n)
            cuts = {
                *itertools.compress(ahead, map(operator.ne, partitions, partitions[1:])),
                *itertools.compress(ahead, map(operator.ne, topics, topics[1:])),
            }
            bounds = [0, *sorted(cuts), n]
        offsets = list(map(_offsets, messages))
        now = time.monotonic()
        buffered = False
        for i, j in itertools.pairwise(bounds):
            part = self._owner(topics[i], partitions[i])
            if part is None:  # revoked: the next owner reads it
                self.stats["revoked_dropped"] += j - i
                continue
            run, offs = messages[i:j], offsets[i:j]
            nxt = part.next_offset
            if (
                part.since_ms is None
                and (nxt is None or offs[0] >= nxt)
                and all(map(operator.lt, offs, offs[1:]))
            ):
                part.next_offset = offs[-1] + 1
            else:
                run = self._fresh(part, run)
                if not run:
                    continue
            buffered = True
            self.bytes += part.buffer.add(run, now)
            if part.high_watermark is None or part.high_watermark < (part.next_offset or 0):
                part.high_watermark = part.next_offset
        return buffered

    def _fresh(self, part: Partition, run: list[Message]) -> list[Message]:
        """The records of ``run`` (one partition's) past what was handed out, record by
        record: those below the next offset are dropped as duplicates, and for ``start =
        <time>`` those older than it are settled unseen."""
        out = []
        for m in run:
            offset: int = m.offset()  # type: ignore[assignment]
            if part.next_offset is not None and offset < part.next_offset:
                self.stats["duplicates_dropped"] += 1
                continue
            part.next_offset = offset + 1
            if part.since_ms is not None:
                kind, ts = m.timestamp()
                if kind != TS_NOT_AVAILABLE and ts < part.since_ms:
                    part.tracker.track(offset, offset + 1, settled=True)
                    part.skipped += 1
                    continue
                part.since_ms = None
            out.append(m)
        return out

    def _owner(self, topic: str, partition: int) -> Partition | None:
        """The partition a fetched record is of; None if it was revoked. One assigned without
        our callback seeing it (it timed out) is owned now."""
        where = (topic, partition)
        part = self.parts.get(where)
        if part is None:
            if where in self.gone:
                return None
            part = self.add(topic, partition, None, None)
        return part

    def high_water(self) -> tuple[int, int]:
        """(records, bytes) a partition may buffer ahead: its share of ``BUFFER_RECORDS`` and
        ``BUFFER_BYTES``, at least two batches and ``PREFETCH_MIN_RECORDS``.

        A broker hands out one partition's records in long runs (tansu: tens of thousands),
        so a buffer of two batches leaves the other partitions, and the function's other
        slots, waiting; while a paused partition is re-fetched from scratch when resumed."""
        n = max(1, len(self.order))
        return (
            max(2 * self.size, PREFETCH_MIN_RECORDS, BUFFER_RECORDS // n),
            max(self.limit, BUFFER_BYTES // n),
        )

    def flow(self, ops: Ops, paused_timeout_s: float) -> None:
        """Back-pressure: pause a partition whose buffer is full (or any while all buffers
        together are), resume it once half drained."""
        over = self.bytes >= BUFFER_BYTES
        under = self.bytes < BUFFER_BYTES // 2
        high, limit = self.high_water()
        for part in self.order:
            n, nbytes = len(part.buffer), part.buffer.bytes
            if not part.paused and n and (n >= high or nbytes >= limit or over):
                part.paused = True
                ops.pause.append(part.tp)
            elif part.paused and n < high // 2 and nbytes < limit // 2 and under:
                part.paused = False
                ops.resume.append(part.tp)
            if part.paused:
                ops.timeout = paused_timeout_s

    def commits(self, *, force: bool = False) -> list[TopicPartition]:
        """Offsets settled and not yet sent (``force``: not yet known to be committed)."""
        out = []
        for part in self.parts.values():
            pos = part.position
            ref = part.committed if force else part.commit_sent
            if pos is not None and (ref is None or pos > ref):
                part.commit_sent = pos
                out.append(TopicPartition(part.topic, part.partition, pos))
        return out

    # --- handing out --------------------------------------------------------------------------

    def ready(self, now: float) -> tuple[Partition | None, float | None]:
        """The next partition with a batch to deliver (round robin), else how long until one
        may have (a batch window or a nack pause ending), None for "until woken"."""
        order, n = self.order, len(self.order)
        size, limit, window = self.size, self.limit, self.window
        wait: float | None = None
        for i in range(n):
            part = order[(self.rr + i) % n]
            if part.busy or not part.buffer:
                continue
            if part.not_before > now:
                due = part.not_before - now
            elif len(part.buffer) >= size or part.buffer.bytes >= limit:
                due = 0.0
            else:
                due = part.buffer.head_arrived + window - now
            if due <= 0:
                self.rr = (self.rr + i + 1) % n
                return part, None
            wait = due if wait is None else min(wait, due)
        return None, wait

    def more(self, part: Partition, now: float) -> bool:
        """Whether ``part``, which just handed out a batch, has the next one ready too (one
        that :meth:`ready` would hand out now, nack pause aside) and room under
        :func:`pipeline` and ``PIPELINE_BYTES``."""
        buf = part.buffer
        if not buf or len(part.inflight) >= pipeline(self.size, self.together()):
            return False
        if part.burst_bytes + buf.head_bytes(self.size) > PIPELINE_BYTES:
            return False
        return (
            len(buf) >= self.size
            or buf.bytes >= self.limit
            or buf.head_arrived + self.window <= now
        )

    def take(
        self, part: Partition, trigger: str, fmt: Format
    ) -> tuple[Batch, Event | Callable[[], Event], RawEvent | None]:
        """Hand out the next batch of ``part``: up to batch_size records and max_batch_bytes
        of JSON (escapes and base64 counted), at least one record. Returns the batch, its
        event, and the event encoded when it could be written straight from the records'
        bytes (:func:`scf_event`, :func:`native_json`; for ``scf``, maybe by column, its JSON
        deferred): then the event is a function that builds it, called only if the core
        needs it."""
        native = fmt == Format.NATIVE
        buf, limit = part.buffer, self.limit
        n = min(self.size, len(buf))
        raw: bytes | None = None
        encoded: RawEvent | None = None
        records: list[dict[str, Any]] | None
        headers = buf.headers_bytes(n) if native else 0
        fits = (buf.head_bytes(n) + headers) * WORST_EXPANSION <= limit  # however they encode
        verbatim = False
        if not fits and fmt == Format.SCF:  # or with what their escapes add
            fit, verbatim = buf.fit(n, limit, len(part.topic))
            n, fits = (fit, True) if fit else (n, False)
        if fits:
            messages, keys, values, nbytes = buf.take_fields(n)
            if fmt == Format.SCF:
                encoded = scf_event(part.topic, part.partition, messages, keys, values, verbatim)
            elif native and not headers:  # (one with headers is built the long way)
                raw = native_json(part.topic, part.partition, messages, keys, values)
                encoded = None if raw is None else RawEvent(raw, plain=True)
            records = (
                None if encoded is not None else _records(part.topic, part.partition, messages)
            )
        else:
            messages, records, nbytes = _measured(part, self.size, limit, native)
        self.bytes -= nbytes
        kind, ts = messages[0].timestamp()
        when = (
            datetime.fromtimestamp(ts / 1000, UTC) if kind != TS_NOT_AVAILABLE and ts > 0 else None
        ) or datetime.now(UTC)
        topic, partition = part.topic, part.partition

        def event() -> Event:
            recs = records if records is not None else _records(topic, partition, messages)
            return Event.fresh(  # records built here, held by nobody else: not frozen
                kind=Kind.CKAFKA,
                trigger=trigger,
                time=when,
                records=tuple(recs),
                native={"records": [_native(r, m) for r, m in zip(recs, messages, strict=True)]}
                if native
                else None,
            )

        batch = Batch(part, messages, _offset(messages[0]), _offset(messages[-1]) + 1)
        part.tracker.track(batch.first, batch.end)
        part.burst_bytes = (part.burst_bytes if part.inflight else 0) + nbytes
        part.inflight.append(batch)
        self.stats["batches"] += 1
        self.stats["records"] += len(messages)
        if encoded is None:
            return batch, event(), None
        return batch, event, encoded

    # --- settling -----------------------------------------------------------------------------

    def settle(self, batch: Batch) -> None:
        part = batch.part
        part.tracker.settle(batch.first)
        if batch in part.inflight:
            part.inflight.remove(batch)  # the oldest: settled in order
            part.nack_delay = 0.0

    def give_back(self, batch: Batch) -> float | None:
        """A batch was not accepted: its records, and those of the batches handed out after
        it (settled by this: their own ack or nack does nothing), go back to the front of
        the buffer and the partition pauses (returns how long), unless the partition is
        being given up."""
        part = batch.part
        back = [batch]
        if batch in part.inflight:
            i = part.inflight.index(batch)
            back = list(itertools.islice(part.inflight, i, None))
            for _ in back:
                part.inflight.pop()
        for b in reversed(back):
            b.done = True
            part.tracker.cancel(b.first)
            if not part.revoked:
                self.bytes += part.buffer.push_front(b.messages)
        if part.gone:
            for b in back:
                self.hand_over(b, settled=False)
        if part.revoked:  # the next owner (maybe this process again) reads it again
            return None
        lo, hi = NACK_DELAY_S
        part.nack_delay = min(hi, max(lo, part.nack_delay * 2))
        part.not_before = time.monotonic() + part.nack_delay
        return part.nack_delay

    def hand_over(self, batch: Batch, *, settled: bool) -> bool:
        """A batch of a revoked partition finished. If the partition came back to us and
        waits for it, let it go on, without delivering what the batch covered again (True)."""
        key = batch.part.key
        orphans = self.orphans.get(key, [])
        if batch in orphans:
            orphans.remove(batch)
            if not orphans:
                del self.orphans[key]
        pos = batch.part.position
        if settled and pos is not None and pos > self.settled_before.get(key, -1):
            self.settled_before[key] = pos
        current = self.parts.get(key)
        if current is None or batch not in current.prior:
            return False
        current.prior.remove(batch)
        if not settled:
            return True
        while current.buffer and (current.buffer.head_offset or 0) < batch.end:
            self.bytes -= current.buffer.take(1)[1]
        with contextlib.suppress(ValueError):  # already below its committable offset
            current.tracker.track(batch.first, batch.end, settled=True)
        if current.next_offset is None or current.next_offset < batch.end:
            current.next_offset = batch.end
        return True


class Positions:
    """Settled positions in the state store (they survive ``kill -9``).

    Commits are asynchronous (every 100 ms, and they can stall), so after a ``kill -9``
    the broker's committed offset can be far behind what was handled; with these, only
    the batches in flight then and what settled since the last write are delivered
    again. An ack only marks where its partition is settled (:meth:`mark`); the marks
    are written together (:meth:`flush`: a store call per partition, one group commit
    in the SQLite store, no fsync) at most every ``POSITION_INTERVAL_S`` by the source,
    and at once on a revoke and at close. The committed offset known at the time is
    stored with each: a group whose offsets were later moved back (a reset, a recreated
    topic) ignores the position."""

    NAMESPACE = "kafka"  # keys: [group, topic, partition]

    def __init__(self, store: StateStore, group_id: str, warn: Callable[..., None]) -> None:
        self.store = store
        self.group_id = group_id
        self.warn = warn  # (what, msg, *args): a rate-limited warning
        self.written: dict[Key, int] = {}
        #: marked and not written yet: (settled, committed) per partition
        self.pending: dict[Key, tuple[int, int | None]] = {}
        self.dirty = asyncio.Event()  # set by a mark, cleared by a flush
        self._lock = asyncio.Lock()  # one flush at a time: stored positions never go back
        self._keys: dict[Key, str] = {}

    def _key(self, key: Key) -> str:
        text = self._keys.get(key)
        if text is None:
            text = self._keys[key] = json.dumps([self.group_id, key[0], key[1]])
        return text

    def mark(self, part: Partition) -> None:
        """Note where ``part`` is settled now, if further than written or marked."""
        pos = part.position
        if pos is None or pos <= self.written.get(part.key, -1):
            return
        had = self.pending.get(part.key)
        if had is None or pos > had[0]:
            self.pending[part.key] = (pos, part.committed)
            self.dirty.set()

    async def flush(self, trigger: str) -> None:
        """Write the marked positions. Never raises: one that fails stays marked (written
        by the next flush), and the commits still follow."""
        async with self._lock:
            self.dirty.clear()
            todo = list(self.pending.items())
            if not todo:
                return
            results = await asyncio.gather(
                *(
                    self.store.put_position(
                        self.NAMESPACE,
                        self._key(key),
                        json.dumps({"settled": pos, "committed": committed}),
                    )
                    for key, (pos, committed) in todo
                ),
                return_exceptions=True,
            )
            for (key, done), result in zip(todo, results, strict=True):
                if isinstance(result, BaseException):
                    self.warn(
                        "checkpoint",
                        "kafka trigger %s: storing the settled offset of %s/%s failed (%s); "
                        "after a crash more records may be delivered again",
                        trigger,
                        key[0],
                        key[1],
                        result,
                    )
                    continue
                self.written[key] = max(done[0], self.written.get(key, -1))
                if self.pending.get(key) == done:
                    del self.pending[key]

    async def read(self, key: Key, committed: int | None, trigger: str) -> int | None:
        """The settled position stored for ``key``, unless the group's committed offset moved
        back below the one known when it was stored (offsets reset on purpose)."""
        try:
            raw = await self.store.get(self.NAMESPACE, self._key(key))
            if raw is None:
                return None
            doc = json.loads(raw)
            settled, then = int(doc["settled"]), doc.get("committed")
        except Exception as e:
            self.warn(
                "checkpoint-read",
                "kafka trigger %s: cannot read the stored offset of %s/%s (%s); starting "
                "from the committed offset",
                trigger,
                key[0],
                key[1],
                e,
            )
            return None
        if then is not None and (committed is None or committed < int(then)):
            return None  # moved back since: the operator (or a new topic) decides
        return settled


# --- records ----------------------------------------------------------------------------------


def describe_batches(batches: collections.deque[Batch]) -> str | None:
    """The oldest of ``batches`` and how many more (for logs and status)."""
    if not batches:
        return None
    more = f" and {len(batches) - 1} more" if len(batches) > 1 else ""
    return f"{batches[0]!r}{more}"


def _offset(m: Message) -> int:
    return m.offset() or 0


@functools.lru_cache(maxsize=4096)
def _head(topic: str, partition: int) -> bytes:
    """A CKafka record's JSON up to its offset (one per partition, kept)."""
    return b'{"Ckafka":{"topic":%b,"partition":%d,"offset":' % (orjson.dumps(topic), partition)


def _escapes(keys: list[bytes | None], values: list[bytes | None]) -> int | None:
    """The bytes the escapes of these keys and values add to their JSON strings: what they
    add to their concatenation's JSON, by orjson (an escape is of one character). None if
    one is not UTF-8 (each is decoded on its own: a character may not span two)."""
    blob = b"".join(itertools.chain(filter(None, keys), filter(None, values)))
    if blob.isascii():
        text = blob.decode("ascii")
    else:
        try:
            for part in keys, values:
                collections.deque(map(bytes.decode, filter(None, part)), maxlen=0)
        except UnicodeDecodeError:
            return None
        text = blob.decode()
    return len(orjson.dumps(text)) - 2 - len(blob)


def _verbatim(data: bytes) -> bool:
    """Whether ``data`` goes into a JSON string as it is: ASCII that needs no escape (checked
    by orjson, in one pass however long it is)."""
    return data.isascii() and len(orjson.dumps(data.decode("ascii"))) == len(data) + 2


def scf_json(
    topic: str,
    partition: int,
    messages: list[Message],
    keys: list[bytes | None] | None = None,
    values: list[bytes | None] | None = None,
    verbatim: bool | None = False,
) -> bytes | None:
    """The SCF event of these records (``{"Records": [{"Ckafka": {...}}, ...]}``) as JSON,
    written straight from their bytes: what ``dumps(render(event))`` gives for the event
    :func:`_records` makes of them, without a Python object per record. None if a key or
    value is not UTF-8 (the event then flags it base64-encoded: built the long way).

    When no key or value needs an escape in JSON (checked on all of them at once, by
    orjson), the bytes go in as they are, in one join of the records' pieces laid out by
    slice (no Python step per record), or for a single record in one format string; else
    each is encoded by orjson. The records are buffered ones, whose offsets are set and
    increase (:meth:`Partitions.ingest` counted on them), and ``confluent_kafka.Message``
    objects (their methods are mapped over them). ``keys`` and ``values``: theirs, when
    already read (:class:`Buffer` reads them once); ``verbatim``: none of them needs an
    escape, as checked already (:meth:`Buffer.fit`); None: some do (not checked again)."""
    n = len(messages)
    head = _head(topic, partition)
    if keys is None or values is None:
        keys, values = _keys_values(messages)
    if n == 1:  # batch_size = 1: one record a time, without the general path's set-up
        k, v = keys[0] or b"", values[0] or b""
        if _verbatim(k + v):
            return b'{"Records":[%b%d,"msgKey":"%b","msgBody":"%b"}}]}' % (
                head,
                _offset(messages[0]),
                k,
                v,
            )
    ks, vs = _texts(keys), _texts(values)
    first, last = _offset(messages[0]), _offset(messages[-1])
    # n offsets from first to last are each one more than the one before
    offsets = range(first, last + 1) if last - first == n - 1 else map(_offset, messages)
    keyless = not ks[0] and ks.count(b"") == n  # (``_texts`` gives no key as b"")
    if verbatim is False:
        verbatim = _verbatim(b"".join(vs) if keyless else b"".join(ks) + b"".join(vs))
    if verbatim:
        # Each record's text up to its key (keyless: up to its value) written for all at
        # once: the offsets by orjson, each comma between two replaced by what closes a
        # record and opens the next one up to the offset, with a NUL (which no piece holds:
        # JSON escapes it) to split at. Then the keys and values go in between, by slice.
        mid = b',"msgKey":"","msgBody":"' if keyless else b',"msgKey":"'
        digits = orjson.dumps(list(offsets))[1:-1]
        fronts = b"".join(
            (b'{"Records":[', head, digits.replace(b",", mid + b'\x00"}},' + head), mid)
        ).split(b"\x00")
        if keyless:
            pieces: list[bytes] = [b""] * (2 * n)
            pieces[0::2] = fronts
            pieces[1::2] = vs
        else:
            pieces = [b""] * (4 * n)
            pieces[0::4] = fronts
            pieces[1::4] = ks
            pieces[2::4] = [b'","msgBody":"'] * n
            pieces[3::4] = vs
        pieces.append(b'"}}]}')
        return b"".join(pieces)
    # each string on its own: a multi-byte character may not span two of them
    dumps = orjson.dumps
    try:
        parts = [
            b'%b%d,"msgKey":%b,"msgBody":%b}}' % (head, off, dumps(k.decode()), dumps(v.decode()))
            for off, k, v in zip(offsets, ks, vs, strict=True)
        ]
    except UnicodeDecodeError:
        return None
    return b'{"Records":[' + b",".join(parts) + b"]}"


def scf_event(
    topic: str,
    partition: int,
    messages: list[Message],
    keys: list[bytes | None],
    values: list[bytes | None],
    verbatim: bool = False,
) -> RawEvent | None:
    """The SCF event of these records for the core, as :func:`scf_json` writes it; None if a
    key or value is not UTF-8. When none needs an escape in JSON (UTF-8 beyond ASCII
    needs none; a JSON document's quotes do) and there are several,
    the JSON is written only if something reads it (a dead letter, an ``http`` or
    ``command`` function: :meth:`RawEvent.deferred`), and the ``python`` runtime sends
    the records by column instead: the keys and the values each in one join, the offsets
    as the first one when they follow each other. Its worker builds the event from them
    faster than it reads the JSON, and writing them costs the event loop a tenth of
    writing the JSON (0.02 against 0.2 us per record)."""
    n = len(messages)
    if n == 1:  # (scf_json writes one record in one format string)
        raw = scf_json(topic, partition, messages, keys, values, verbatim)
        return None if raw is None else RawEvent(raw, plain=True)
    grown = 0 if verbatim else _escapes(keys, values)  # one orjson pass
    if grown is None:  # not UTF-8: base64 in the event, built the long way
        return None
    if grown:  # escapes: each string by orjson, the check not made again
        raw = scf_json(topic, partition, messages, keys, values, None)
        return None if raw is None else RawEvent(raw, plain=True)
    ks, vs = _texts(keys), _texts(values)
    keyless = not ks[0] and ks.count(b"") == n
    first, last = _offset(messages[0]), _offset(messages[-1])
    if last - first == n - 1:  # consecutive (mostly)
        offsets, digits = b'{"from":%d}' % first, _digits(first, last)
    else:
        each = orjson.dumps(list(map(_offset, messages)))
        offsets, digits = b'{"each":%b}' % each, len(each) - 2 - (n - 1)
    joined_vs = b'","'.join(vs)
    if keyless:
        key_column, key_text = b'{"same":""}', 0
    else:
        joined_ks = b'","'.join(ks)
        key_column, key_text = b'{"each":["%b"]}' % joined_ks, len(joined_ks) - 3 * (n - 1)
    columns = (
        b'{"records":%d,"wrap":"Ckafka","names":["topic","partition","offset","msgKey",'
        b'"msgBody"],"columns":[{"same":%b},{"same":%d},%b,%b,{"each":["%b"]}]}'
        % (n, orjson.dumps(topic), partition, offsets, key_column, joined_vs)
    )
    text = key_text + len(joined_vs) - 3 * (n - 1)  # the keys' and values' bytes
    size = _SCF_FIXED + n * (len(_head(topic, partition)) + _SCF_PER_RECORD) + digits + text
    write = functools.partial(scf_json, topic, partition, messages, keys, values, True)
    return RawEvent.deferred(write, size, columns)  # type: ignore[arg-type]


#: the bytes of an SCF batch's JSON around its records, and around each record's head,
#: offset, key and value (:func:`scf_json`): ``{"Records":[`` ... ``]}``, the commas
#: between records, ``,"msgKey":"`` ... ``","msgBody":"`` ... ``"}}``
_SCF_FIXED = len(b'{"Records":[]}') - 1
_SCF_PER_RECORD = len(b',"msgKey":"') + len(b'","msgBody":"') + len(b'"}}') + 1


def _digits(first: int, last: int) -> int:
    """The digits of the integers from ``first`` to ``last`` (both at least 0) written out."""
    total, width, low = 0, 1, 0
    while low <= last:
        high = 10**width - 1
        if high >= first:
            total += (min(high, last) - max(low, first) + 1) * width
        low, width = high + 1, width + 1
    return total


def native_json(
    topic: str,
    partition: int,
    messages: list[Message],
    keys: list[bytes | None],
    values: list[bytes | None],
) -> bytes | None:
    """The ``format = "native"`` event of these records as JSON, written from their fields:
    what ``dumps(render(event, "native"))`` gives for the event :meth:`Partitions.take`
    builds, without a Python object per record for records as they mostly come: without
    headers (the caller looked: :meth:`Buffer.headers_bytes`), the same kind of timestamp,
    keys and values UTF-8 (each string by orjson when one needs an escape; a null key or
    value stays ``null``). None for the others (mixed or missing timestamps, a key or
    value not UTF-8): built the long way.

    The records' pieces are laid out by slice and joined once: the offsets and timestamps
    by one orjson call, the keys and values as they are between quotes the layout writes,
    or each as its own JSON when one is null or needs an escape."""
    n = len(messages)
    stamps = list(map(_timestamp, messages))
    kinds = set(map(operator.itemgetter(0), stamps))
    kind = kinds.pop() if len(kinds) == 1 else TS_NOT_AVAILABLE
    if kind == TS_NOT_AVAILABLE:
        return None
    present = itertools.chain(filter(None, keys), filter(None, values))
    quoted = _verbatim(b"".join(present)) and None not in keys and None not in values
    if quoted:  # the common case: the quotes go in the layout
        ks: list[bytes] = keys  # type: ignore[assignment]
        vs: list[bytes] = values  # type: ignore[assignment]
    else:
        try:
            ks, vs = _json_values(keys), _json_values(values)
        except UnicodeDecodeError:
            return None
    q = b'"' if quoted else b""
    numbers: list[int] = [0] * (2 * n)
    numbers[0::2] = map(_offsets, messages)
    numbers[1::2] = map(operator.itemgetter(1), stamps)
    digits = orjson.dumps(numbers)[1:-1].split(b",")
    head = b'{"topic":%b,"partition":%d,"offset":' % (orjson.dumps(topic), partition)
    tail = q + b',"headers":[]}'
    pieces: list[bytes] = [b""] * (8 * n)
    pieces[0::8] = [tail + b"," + head] * n
    pieces[0] = b'{"records":[' + head
    pieces[1::8] = digits[0::2]
    pieces[2::8] = [b',"timestamp":'] * n
    pieces[3::8] = digits[1::2]
    pieces[4::8] = [b',"timestamp_type":%b,"key":%b' % (orjson.dumps(_TS_TYPES.get(kind)), q)] * n
    pieces[5::8] = ks
    pieces[6::8] = [q + b',"value":' + q] * n
    pieces[7::8] = vs
    pieces.append(tail + b"]}")
    return b"".join(pieces)


def _json_values(texts: list[bytes | None]) -> list[bytes]:
    """Each key or value as its JSON: a string by orjson, ``null`` for a null one."""
    dumps = orjson.dumps
    return [b"null" if x is None else dumps(x.decode()) for x in texts]


def _texts(out: list[bytes | None]) -> list[bytes]:
    """Keys or values, a null (or empty) one as ``b""``: keyless records cost no step each."""
    if all(out):  # (``None in out`` would compare each bytes object with None)
        return out  # type: ignore[return-value]
    if not any(out):
        return [b""] * len(out)
    return [x or b"" for x in out]


def _records(topic: str, partition: int, messages: list[Message]) -> list[dict[str, Any]]:
    """CKafka records of ``messages`` (what :func:`~bridge.events.ckafka_record` builds; the
    UTF-8 common case inline, the rest through it)."""
    out: list[dict[str, Any]] = []
    append = out.append
    for m in messages:
        k, v = m.key(), m.value()
        try:
            append(
                {
                    "topic": topic,
                    "partition": partition,
                    "offset": m.offset(),
                    "key": "" if k is None else k.decode(),
                    "value": "" if v is None else v.decode(),
                }
            )
        except UnicodeDecodeError:
            off = m.offset() or 0
            append(ckafka_record(topic=topic, partition=partition, offset=off, key=k, value=v))
    return out


def _measured(
    part: Partition, size: int, limit: int, native: bool = False
) -> tuple[list[Message], list[dict[str, Any]], int]:
    """Records up to ``size`` and ``limit`` bytes of JSON, each record's size exact (for
    ``native``, of its ``format = "native"`` record: timestamps, headers and all)."""
    buf, topic, partition = part.buffer, part.topic, part.partition
    overhead = RECORD_OVERHEAD + len(topic)
    messages: list[Message] = []
    records: list[dict[str, Any]] = []
    nbytes = total = 0
    while buf and len(messages) < size:
        m = buf.first
        assert m is not None
        k, ksize = _text(m.key())
        v, vsize = _text(m.value())
        off = m.offset() or 0
        rec = ckafka_record(topic=topic, partition=partition, offset=off, key=k, value=v)
        n = len(orjson.dumps(_native(rec, m))) + 1 if native else overhead + ksize + vsize
        if messages and total + n > limit:
            break
        messages.append(m)
        nbytes += buf.take(1)[1]
        records.append(rec)
        total += n
    return messages, records, nbytes


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
        "timestamp": ts if kind != TS_NOT_AVAILABLE else None,
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
