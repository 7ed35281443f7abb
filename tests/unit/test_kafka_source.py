"""sources.kafka.KafkaSource against an in-memory consumer (the narrow Consumer protocol):
ordered batches per partition, commits of the settled prefix only, revoke and re-assign
with batches in flight, back-pressure by pause/resume, start positions, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import confluent_kafka
import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition

from bridge.abc import EndOfInput, NotConnected, SettleDelivery, SourceContext
from bridge.events import Event, Format, render
from bridge.testing import MemoryStore, until
from sources.kafka import KafkaConfig, KafkaSource
from sources.kafka import partition as kafka_partition
from sources.kafka import source as kafka_source

TOPIC = "orders"


class FakeCluster:
    """Topics as lists of messages per partition, and committed offsets per group."""

    def __init__(self, partitions: int = 2) -> None:
        self.lock = threading.Lock()
        self.log: dict[int, list[confluent_kafka.Message]] = {p: [] for p in range(partitions)}
        self.committed: dict[tuple[str, int], int] = {}
        self.consumers: list[FakeConsumer] = []

    def produce(
        self,
        partition: int,
        *values: bytes | None,
        key: bytes | None = None,
        timestamp: int | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> None:
        with self.lock:
            for v in values:
                offset = len(self.log[partition])
                ts = timestamp if timestamp is not None else int(time.time() * 1000)
                self.log[partition].append(
                    confluent_kafka.Message(
                        topic=TOPIC,
                        partition=partition,
                        offset=offset,
                        key=key,
                        value=v,
                        headers=headers,
                        timestamp=(confluent_kafka.TIMESTAMP_CREATE_TIME, ts),
                    )
                )

    def commit_of(self, partition: int, group: str = "g") -> int | None:
        with self.lock:
            return self.committed.get((group, partition))


class FakeConsumer:
    """One group member that owns what the test says. Rebalance callbacks run inside
    poll(), on the calling (worker) thread, as librdkafka runs them."""

    def __init__(self, cluster: FakeCluster, conf: dict[str, Any]) -> None:
        self.cluster = cluster
        self.conf = conf
        self.group = conf["group.id"]
        self.reset = conf["auto.offset.reset"]
        self.positions: dict[int, int] = {}
        self.paused: set[int] = set()
        self.pause_calls = 0
        self.pending: list[tuple[str, list[int]]] = []
        self.commit_results: list[list[TopicPartition]] = []
        self.callbacks: dict[str, Callable[..., None]] = {}
        self.closed = False
        self.threads: set[str] = set()
        self.lookup_by_time = True
        self.fail_next_poll: KafkaError | None = None
        self.drop_commits = False  # a process killed before its commits reached the broker
        self.polls = 0  # poll cycles served: tests wait for cycles, not for time
        cluster.consumers.append(self)

    def _seen(self) -> None:
        self.threads.add(threading.current_thread().name)

    # -- what the test controls --

    def rebalance(self, kind: str, partitions: list[int]) -> None:
        """Queue an assign / revoke / lost, served by the next poll."""
        with self.cluster.lock:
            self.pending.append((kind, partitions))

    # -- the Consumer protocol --

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        self._seen()

        class Meta:
            topics = {TOPIC: object()}

        return Meta()

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        self._seen()
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.rebalance("assign", sorted(self.cluster.log))

    def _serve_rebalances(self) -> None:
        while True:
            with self.cluster.lock:
                if not self.pending:
                    return
                kind, parts = self.pending.pop(0)
            tps = [TopicPartition(TOPIC, p) for p in parts]
            self.callbacks[kind](self, tps)
            if kind in ("revoke", "lost"):
                for p in parts:
                    self.positions.pop(p, None)
                    self.paused.discard(p)

    def poll(self, timeout: float) -> Any:
        self._seen()
        self.polls += 1
        if self.fail_next_poll is not None:
            err, self.fail_next_poll = self.fail_next_poll, None
            raise confluent_kafka.KafkaException(err)
        self._serve_rebalances()
        self._serve_commit_results()
        got = self.consume(1, 0)
        if not got:
            time.sleep(min(timeout, 0.005))
        return got[0] if got else None

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        num_messages = min(num_messages, 100)  # what one fetch response would carry
        out: list[Any] = []
        with self.cluster.lock:
            progress = True
            while len(out) < num_messages and progress:
                progress = False
                for p in sorted(self.positions):
                    if p in self.paused or len(out) >= num_messages:
                        continue
                    pos = self.positions[p]
                    if pos < len(self.cluster.log[p]):
                        out.append(self.cluster.log[p][pos])
                        self.positions[p] = pos + 1
                        progress = True
        return out

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._seen()
        self.pause_calls += 1
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._seen()
        self.paused -= {tp.partition for tp in partitions}

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> Any:
        self._seen()
        if self.drop_commits:
            return None if asynchronous else []
        with self.cluster.lock:
            for tp in offsets:
                self.cluster.committed[(self.group, tp.partition)] = tp.offset
        if asynchronous:
            self.commit_results.append(offsets)
            return None
        return offsets

    def _serve_commit_results(self) -> None:
        while self.commit_results:
            self.conf["on_commit"](None, self.commit_results.pop(0))

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self._seen()
        with self.cluster.lock:
            return [
                TopicPartition(TOPIC, tp.partition, self.cluster.committed.get((self.group, tp.partition), -1001))
                for tp in partitions
            ]  # fmt: skip

    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        self._seen()
        out = []
        with self.cluster.lock:
            for tp in partitions:
                if not self.lookup_by_time:  # like tansu: always the first offset
                    out.append(TopicPartition(TOPIC, tp.partition, 0))
                    continue
                log = self.cluster.log[tp.partition]
                found = next((m.offset() for m in log if m.timestamp()[1] >= tp.offset), -1)
                out.append(TopicPartition(TOPIC, tp.partition, found))
        return out

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        with self.cluster.lock:
            return 0, len(self.cluster.log[partition.partition])

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._seen()
        with self.cluster.lock:
            for tp in partitions:
                start = tp.offset
                if start == confluent_kafka.OFFSET_END:
                    start = len(self.cluster.log[tp.partition])
                elif start == confluent_kafka.OFFSET_BEGINNING:
                    start = 0
                elif start < 0:
                    start = self.cluster.committed.get((self.group, tp.partition), -1)
                    if start < 0:
                        start = (
                            0 if self.reset == "earliest" else len(self.cluster.log[tp.partition])
                        )
                self.positions[tp.partition] = start

    incremental_assign = assign

    def close(self) -> None:
        self._seen()
        if self.positions and "revoke" in self.callbacks:
            self.callbacks["revoke"](
                self, [TopicPartition(TOPIC, p) for p in sorted(self.positions)]
            )
        self.positions.clear()
        self.closed = True


def make_source(
    cluster: FakeCluster,
    name: str = "k",
    store: MemoryStore | None = None,
    batches: bool | Callable[[], bool] = True,
    **fields: Any,
) -> tuple[KafkaSource, list[FakeConsumer]]:
    data = {
        "type": "kafka",
        "function": "f",
        "bootstrap_servers": "broker:9092",
        "topic": TOPIC,
        "group_id": "g",
        "start": "earliest",
        "batch_size": 10,
        "batch_window": "0s",
        "drain_timeout": "200ms",
        **fields,
    }
    config = KafkaConfig.model_validate(data, context={"name": name, "timezone": "UTC"})
    ctx = SourceContext(
        name=name,
        function="f",
        store=store if store is not None else MemoryStore(),
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger(f"test.kafka.{name}"),
        # the function takes several in one round trip (python) now
        batches=batches if callable(batches) else lambda: batches,
    )
    src = KafkaSource(config, ctx)
    made: list[FakeConsumer] = []

    def factory(conf: dict[str, Any]) -> FakeConsumer:
        made.append(FakeConsumer(cluster, conf))
        return made[-1]

    src.consumer_factory = factory  # type: ignore[method-assign,assignment]
    return src, made


@pytest.fixture
async def cluster() -> FakeCluster:
    return FakeCluster(partitions=2)


@pytest.fixture
async def source(cluster: FakeCluster) -> AsyncIterator[tuple[KafkaSource, FakeConsumer]]:
    src, made = make_source(cluster)
    await src.connect()
    yield src, made[0]
    await src.close()


async def read(src: KafkaSource, timeout: float = 2.0) -> SettleDelivery:
    async with asyncio.timeout(timeout):
        return await src.read()  # type: ignore[return-value]


async def polls_passed(consumer: FakeConsumer, n: int) -> None:
    """Wait until the source ran ``n`` more poll cycles."""
    start = consumer.polls
    await until(lambda: consumer.polls >= start + n)


async def buffered_once_paused(src: KafkaSource, consumer: FakeConsumer) -> int:
    """Wait until partition 0 is paused and 20 more poll cycles passed (bringing nothing
    more to it): how many records it buffers (at most its bound + one poll cycle's)."""
    await until(lambda: 0 in consumer.paused)
    await polls_passed(consumer, 20)
    return int(src.status()["partitions"][f"{TOPIC}/0"]["buffered"])


async def commit_cycle_passed(src: KafkaSource, cluster: FakeCluster) -> None:
    """Wait until a commit went out after now: a batch of partition 1 acked now is
    committed by a cycle that also carries anything due for the other partitions."""
    cluster.produce(1, b"probe")
    probe = await read(src)
    assert probe.key.part.partition == 1, probe
    await probe.ack()
    await until(lambda: cluster.commit_of(1) == probe.key.end)


async def nothing(src: KafkaSource, within: float = 0.2) -> None:
    try:
        async with asyncio.timeout(within):
            d = await src.read()
    except TimeoutError:
        return
    raise AssertionError(f"expected no delivery, got {d!r}")


def offsets(batch: Any) -> list[int]:
    return [r["offset"] for r in batch.event.records]


# --- batches ------------------------------------------------------------------------------------


async def test_one_batch_per_partition_at_a_time_in_order(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *(f"a{i}".encode() for i in range(25)))
    cluster.produce(1, *(f"b{i}".encode() for i in range(5)))
    first = await read(src)
    second = await read(src)
    # Then each partition has one batch in flight, the first full (batch_size 10)
    got = {b.key.part.partition: b for b in (first, second)}
    assert offsets(got[0]) == list(range(10)) and offsets(got[1]) == list(range(5))
    assert [r["value"] for r in got[0].event.records][:2] == ["a0", "a1"]
    # And nothing more comes until one is acked
    await nothing(src)
    await got[0].ack()
    assert offsets(await read(src)) == list(range(10, 20))
    # And the consumer is only ever called from the worker thread
    assert consumer.threads == {"bridge-kafka-k"}


async def test_read_many_hands_out_the_ready_batches_of_each_partition_up_to_max_n() -> None:
    cluster = FakeCluster(partitions=3)
    src, _ = make_source(cluster)
    await src.connect()
    try:
        for p in range(3):
            cluster.produce(p, *(f"{p}-{i}".encode() for i in range(25)))
        await until(lambda: sum(len(p.buffer) for p in src.partitions.order) == 75)
        # Then one call gives at most max_n batches; a partition's ready batches come
        # together, oldest first, its key as their order_key (the core runs them in order)
        two = await src.read_many(2)
        rest = await src.read_many(10)
        assert len(two) == 2 and len(rest) == 6
        first = two[0].key.part.partition
        assert [(d.key.part.partition, offsets(d)) for d in two] == [
            (first, list(range(10))),
            (first, list(range(10, 20))),
        ]
        by_part: dict[int, list[Any]] = {}
        for d in [*two, *rest]:
            assert d.order_key == (TOPIC, d.key.part.partition)
            by_part.setdefault(d.key.part.partition, []).append(d)
        assert sorted(by_part) == [0, 1, 2]
        for p, ds in by_part.items():
            want = [list(range(10)), list(range(10, 20))] + (
                [] if p == first else [[*range(20, 25)]]
            )
            assert [offsets(d) for d in ds] == want
        # And a partition's next batches come only once all its batches in flight are acked
        await nothing(src)
        await two[0].ack()
        await nothing(src)
        await two[1].ack()
        (nxt,) = await src.read_many(10)
        assert nxt.key.part.partition == first and offsets(nxt) == list(range(20, 25))
    finally:
        await src.close()


@pytest.mark.parametrize(
    ("batch_size", "batches", "pipeline", "together"),
    [
        (1, True, 256, 256),
        (3, True, 256, 256),
        (100, True, 10, 10),
        (300, True, 4, 4),
        (600, True, 4, 4),
        (2000, True, 4, 2),
        # a function that runs them one at a time (http, command): no minimum of four
        (1, False, 256, 256),
        (100, False, 10, 10),
        (300, False, 3, 3),
        (600, False, 1, 1),
        (2000, False, 1, 1),
    ],
)
async def test_a_partition_hands_out_up_to_1024_records_and_256_batches_together(
    batch_size: int, batches: bool, pipeline: int, together: int
) -> None:
    # Given one partition with 3,000 records buffered, in batches of batch_size, for a
    # function that takes several in one round trip (batches) or not
    assert kafka_partition.pipeline(batch_size, batches) == pipeline
    cluster = FakeCluster(partitions=1)
    src, _ = make_source(cluster, batch_size=batch_size, batches=batches)
    await src.connect()
    try:
        cluster.produce(0, *[b"v"] * 3000)
        await until(lambda: sum(len(p.buffer) for p in src.partitions.order) == 3000)
        # When the core asks for as many batches as it can take
        out = await src.read_many(1000)
        # Then the partition hands out that many consecutive batches: up to 1,024 records'
        # worth and 256 batches, at least four where they share a round trip, or as many
        # as it holds (batch_window 0s: a partial one is due at once)
        assert len(out) == together
        assert offsets(out[0])[0] == 0
        assert offsets(out[-1])[-1] == min(3000, together * batch_size) - 1
    finally:
        await src.close()


async def test_a_partition_asks_at_each_hand_out_whether_its_function_runs_them_together(
    cluster: FakeCluster,
) -> None:
    # Given batches of 600 and a function that runs several in one round trip
    together = [True]
    src, _ = make_source(cluster, batch_size=600, batches=lambda: together[0])
    await src.connect()
    try:
        cluster.produce(0, *[b"v"] * 6000)
        await until(lambda: sum(len(p.buffer) for p in src.partitions.order) >= 6000)
        # When it hands out, then four
        first = await src.read_many(1000)
        assert len(first) == 4 and len({d.order_key for d in first}) == 1
        # and once they are settled and the function no longer does (it got slower, or a
        # reload changed it), the next hand-out of that partition is one
        together[0] = False
        for d in first:
            await d.ack()
        more = [d for d in await src.read_many(1000) if d.order_key == first[0].order_key]
        assert len(more) == 1
    finally:
        await src.close()


async def test_a_partition_hands_out_up_to_8_mib_together() -> None:
    # Given one partition with 800 records of 20,000 bytes buffered: batches of 100 are
    # 2 MB each as counted
    cluster = FakeCluster(partitions=1)
    src, _ = make_source(cluster, batch_size=100)
    await src.connect()
    try:
        cluster.produce(0, *[b"v" * 20_000] * 800)
        await until(lambda: sum(len(p.buffer) for p in src.partitions.order) == 800)
        # When the core asks for as many batches as it can take, then it gets four, not
        # the ten of 100 records that 1,024 records' worth would allow
        assert kafka_partition.pipeline(100, True) == 10
        assert len(await src.read_many(1000)) == 4
    finally:
        await src.close()


async def test_a_partial_batch_waits_for_the_window(cluster: FakeCluster) -> None:
    src, _ = make_source(cluster, batch_window="300ms")
    await src.connect()
    try:
        cluster.produce(0, b"x", b"y")
        t0 = time.monotonic()
        batch = await read(src)
        assert time.monotonic() - t0 >= 0.25
        assert offsets(batch) == [0, 1]
    finally:
        await src.close()


async def test_a_full_batch_does_not_wait_for_the_window(cluster: FakeCluster) -> None:
    src, _ = make_source(cluster, batch_window="900s")
    await src.connect()
    try:
        cluster.produce(1, *[b"z"] * 10)
        assert offsets(await read(src, timeout=30)) == list(range(10))
    finally:
        await src.close()


async def test_max_batch_bytes_splits_and_a_big_record_travels_alone(cluster: FakeCluster) -> None:
    src, _ = make_source(cluster, max_batch_bytes="1KB", batch_size=100)
    await src.connect()
    try:
        cluster.produce(0, *[b"s" * 100] * 3, b"B" * 5000, b"s" * 100)
        b1 = await read(src)
        assert offsets(b1) == [0, 1, 2]  # 3 x ~210 bytes fit in 1 KB; the big one does not
        await b1.ack()
        b2 = await read(src)
        assert offsets(b2) == [3]  # larger than max_batch_bytes on its own: alone
        await b2.ack()
        assert offsets(await read(src)) == [4]
    finally:
        await src.close()


async def test_a_batch_is_handed_over_encoded_and_its_event_built_only_when_asked(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    # Given text records, read from the source (format scf, the default)
    src, _ = source
    for i in range(3):
        cluster.produce(0, b'{"n": %d}' % i, key=b"k")
    batch = await read(src)
    # When the core takes the event encoded for the trigger's format
    raw = batch.encoded(Format.SCF)
    # Then it is the JSON the source wrote, without building the event
    assert raw.plain and batch.encoded(Format.SCF) is raw
    assert not isinstance(batch._event, Event)
    # and the event, built when asked for, renders to the same JSON
    assert orjson.loads(raw.raw) == render(batch.event, "scf")
    assert isinstance(batch._event, Event)


async def test_records_render_as_scf_ckafka_with_binary_flagged(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, _ = source
    cluster.produce(0, b"\xff\x00", key=b"\x80")
    cluster.produce(0, None, key=None)
    cluster.produce(0, '{"a": "ü"}'.encode(), key=b"k")
    batch = await read(src)
    recs = [r["Ckafka"] for r in render(batch.event, "scf")["Records"]]
    assert recs[0] == {
        "topic": TOPIC,
        "partition": 0,
        "offset": 0,
        "msgKey": "gA==",
        "msgBody": "/wA=",
        "msgKeyBase64": True,
        "msgBodyBase64": True,
    }
    assert (recs[1]["msgKey"], recs[1]["msgBody"]) == ("", "")
    assert recs[2]["msgBody"] == '{"a": "ü"}'
    assert batch.event.request_source == "TRIGGER_CKAFKA"


async def test_native_format_keeps_nulls_timestamps_and_headers(cluster: FakeCluster) -> None:
    src, _ = make_source(cluster, format="native")
    await src.connect()
    try:
        cluster.produce(0, None, key=None, timestamp=1_700_000_000_000, headers=[("h", b"\xff")])
        cluster.produce(0, b"v", key=b"k", headers=[("t", b"x"), ("n", None)])
        out = render((await read(src)).event, "native")
        first, second = out["records"]
        assert first == {
            "topic": TOPIC,
            "partition": 0,
            "offset": 0,
            "timestamp": 1_700_000_000_000,
            "timestamp_type": "create_time",
            "key": None,
            "value": None,
            "headers": [{"key": "h", "value": "/w==", "value_base64": True}],
        }
        assert second["headers"] == [{"key": "t", "value": "x"}, {"key": "n", "value": None}]
        assert (second["key"], second["value"]) == ("k", "v")
    finally:
        await src.close()


CREATE, APPEND = confluent_kafka.TIMESTAMP_CREATE_TIME, confluent_kafka.TIMESTAMP_LOG_APPEND_TIME


@pytest.mark.parametrize(
    ("records", "written"),
    [
        ([(b"k1", b"plain"), (b"k2", b"text")], True),
        ([(None, b"keyless"), (None, b"")], True),
        ([(b"", None), (b"k", b"v")], True),  # an empty key and a null value
        ([(b"q", b'{"a": "\\ \x01"}'), (b"u", "ünïcödé".encode())], True),  # escapes
        ([(b"k", b"v")] * 3, True),
        ([(b"k", b"\xff\x00")], False),  # not UTF-8: base64 and its flag
        ([(b"\xc3", b"\xa9")], False),  # a character across key and value is not one
    ],
)
def test_a_native_batch_written_from_its_fields_is_what_the_long_way_encodes(
    records: list[tuple[bytes | None, bytes | None]], written: bool
) -> None:
    for kinds in ([CREATE] * len(records), [APPEND] * len(records)):
        raw, built = native_batch(records, kinds)
        assert (raw is not None) is written
        if raw is not None:
            assert raw == orjson.dumps(built)  # byte for byte: same fields, same order
        assert [r["offset"] for r in built["records"]] == list(range(7, 7 + len(records)))


def test_a_native_batch_with_headers_or_mixed_timestamps_is_built_the_long_way() -> None:
    plain = [(b"k", b"v"), (b"k", b"w")]
    assert native_batch(plain, [CREATE, APPEND])[0] is None
    assert native_batch(plain, [confluent_kafka.TIMESTAMP_NOT_AVAILABLE] * 2)[0] is None
    raw, built = native_batch(plain, [CREATE, CREATE], headers=[("h", b"x")])
    assert raw is None and built["records"][1]["headers"] == [{"key": "h", "value": "x"}]


@pytest.mark.parametrize("header_bytes", [0, 500, 5000])
def test_a_native_batch_with_headers_stays_within_max_batch_bytes(header_bytes: int) -> None:
    # Given records of 10-byte values with headers of header_bytes, batches of up to 10
    # and 2,000 bytes
    table = kafka_partition.Partitions(10, 2000, 0.0)
    part = table.add(TOPIC, 0, None, None)
    headers = [("trace", b"h" * header_bytes)] if header_bytes else None
    table.ingest(
        [
            confluent_kafka.Message(
                topic=TOPIC,
                partition=0,
                offset=i,
                key=b"k",
                value=b"v" * 10,
                timestamp=(CREATE, 1_700_000_000_000),
                headers=headers,
            )
            for i in range(40)
        ],
        lambda m: None,
    )
    # When the batches are taken, then each one's native JSON is within 2,000 bytes
    # (unless it is one record alone), as many records as fit
    sizes = []
    while part.buffer:
        batch, event, _ = table.take(part, "k", Format.NATIVE)
        built = orjson.dumps(render(event if isinstance(event, Event) else event(), "native"))
        assert len(built) <= 2000 or len(batch.messages) == 1
        sizes.append(len(batch.messages))
        part.inflight.clear()
    assert sizes[0] == {0: 10, 500: 2, 5000: 1}[header_bytes]  # (~700 bytes a record)


def native_batch(
    records: list[tuple[bytes | None, bytes | None]],
    kinds: list[int],
    headers: list[tuple[str, bytes]] | None = None,
) -> tuple[bytes | None, dict[str, Any]]:
    """A batch of ``format = "native"`` taken from these records (offsets from 7, the
    second with ``headers``): its JSON when written from the fields, and its event."""
    table = kafka_partition.Partitions(len(records), 6_000_000, 0.0)
    part = table.add(TOPIC, 3, None, None)
    messages = [
        confluent_kafka.Message(
            topic=TOPIC, partition=3, offset=7 + i, key=k, value=v,
            timestamp=(kind, 1_700_000_000_000 + i), headers=headers if i == 1 else None,
        )
        for i, ((k, v), kind) in enumerate(zip(records, kinds, strict=True))
    ]  # fmt: skip
    table.ingest(messages, lambda m: None)
    _, event, raw = table.take(part, "k", Format.NATIVE)
    built = render(event if isinstance(event, Event) else event(), "native")
    return None if raw is None else raw.raw, built


async def test_json_escapes_count_towards_the_batch_size(cluster: FakeCluster) -> None:
    # a value full of quotes grows when it becomes a JSON string: the estimate follows
    src, _ = make_source(cluster, max_batch_bytes="1KB", batch_size=100)
    await src.connect()
    try:
        cluster.produce(0, *[b'"' * 300] * 3)
        batch = await read(src)
        assert offsets(batch) == [0]  # 300 quotes are 600 JSON bytes: two would not fit
        assert len(render(batch.event, "scf")["Records"][0]["Ckafka"]["msgBody"]) == 300
    finally:
        await src.close()


# --- commits ------------------------------------------------------------------------------------


async def test_only_settled_batches_are_committed(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, _ = source
    cluster.produce(0, *[b"a"] * 20)
    cluster.produce(1, *[b"b"] * 20)
    p0 = await read(src)
    p1 = await read(src)
    if p0.key.part.partition == 1:
        p0, p1 = p1, p0
    # When partition 1's batch is acked first
    await p1.ack()
    await until(lambda: cluster.commit_of(1) == 10)
    # Then partition 0 has nothing committed until its own batch is acked
    assert cluster.commit_of(0) is None
    await p0.ack()
    await until(lambda: cluster.commit_of(0) == 10)


async def test_status_reports_lag_per_partition(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, _ = source
    cluster.produce(0, *[b"a"] * 25)
    batch = await read(src)
    await batch.ack()
    await until(lambda: src.status()["partitions"].get(f"{TOPIC}/0", {}).get("committed") == 10)
    await until(lambda: src.status()["partitions"][f"{TOPIC}/0"]["high_watermark"] == 25)
    await until(lambda: src.status()["partitions"][f"{TOPIC}/1"]["high_watermark"] == 0, 3)
    st = src.status()
    p0 = st["partitions"][f"{TOPIC}/0"]
    assert (p0["position"], p0["lag"]) == (10, 15)
    assert p0["in_flight"] is None and p0["buffered"] == 15
    assert st["group_id"] == "g" and st["assigned"] == 2 and st["connected"]
    assert st["partitions"][f"{TOPIC}/1"]["lag"] == 0  # empty: nothing to do
    assert st["lag"] == {f"{TOPIC}/0": 15, f"{TOPIC}/1": 0} and st["lag_total"] == 15


# --- rebalance ----------------------------------------------------------------------------------


async def test_revoke_commits_settled_and_abandons_what_is_still_in_flight(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *[b"a"] * 30)
    first = await read(src)
    await first.ack()
    second = await read(src)  # offsets 10..19, still in flight
    await until(lambda: cluster.commit_of(0) == 10)
    # When partition 0 is revoked and the batch does not settle within drain_timeout
    consumer.rebalance("revoke", [0])
    await until(lambda: 0 not in consumer.positions)  # the revoke callback returned
    # Then the commit stopped before it, and a late ack commits nothing
    assert cluster.commit_of(0) == 10
    await second.ack()  # logged: the partition is someone else's now
    await commit_cycle_passed(src, cluster)
    assert cluster.commit_of(0) == 10
    await nothing(src)  # and nothing more of partition 0 is delivered


async def test_a_batch_still_running_after_its_partition_was_given_up_is_abandoned(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *[b"a"] * 30)
    batch = await read(src)
    assert not batch.abandoned
    # When partition 0 is revoked and the batch does not settle within drain_timeout
    consumer.rebalance("revoke", [0])
    await until(lambda: 0 not in consumer.positions)
    # Then the batch says so: an ordered acceptor stops retrying it (bridge.ordered)
    assert batch.abandoned


async def test_revoke_waits_for_in_flight_batches_up_to_drain_timeout(
    cluster: FakeCluster,
) -> None:
    src, made = make_source(cluster, drain_timeout="5s")
    await src.connect()
    try:
        cluster.produce(0, *[b"a"] * 15)
        batch = await read(src)
        made[0].rebalance("revoke", [0])
        # the revoke is waiting for the batch now (it dropped the partition first)
        await until(lambda: f"{TOPIC}/0" not in src.status()["partitions"])
        assert cluster.commit_of(0) is None
        # When the batch settles during the revoke, its offsets go out with the revoke
        await batch.ack()
        await until(lambda: cluster.commit_of(0) == 10)
    finally:
        await src.close()


async def test_a_revoke_drains_the_oldest_batch_in_flight_not_those_behind_it(
    cluster: FakeCluster,
) -> None:
    src, made = make_source(cluster, drain_timeout="5s")
    await src.connect()
    try:
        # Given three consecutive batches of partition 0 handed out together
        cluster.produce(0, *[b"a"] * 30)
        await until(lambda: sum(len(p.buffer) for p in src.partitions.order) == 30)
        first, second, third = await src.read_many(10)
        # When the partition is revoked
        made[0].rebalance("revoke", [0])
        await until(lambda: f"{TOPIC}/0" not in src.status()["partitions"])
        # Then the oldest may still run and settle (the revoke waits for it), the ones
        # behind it must not start: the ordered path hands them back unrun
        assert not first.abandoned and second.abandoned and third.abandoned
        await first.ack()
        await second.nack(None)
        await third.nack(None)
        await until(lambda: cluster.commit_of(0) == 10)
        await nothing(src)
    finally:
        await src.close()


async def test_a_partition_back_while_its_old_batch_runs_waits_for_it_without_duplicates(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *[b"a"] * 30)
    old = await read(src)  # 0..9
    # Given partition 0 revoked while the batch runs, then assigned back to us
    consumer.rebalance("revoke", [0])
    consumer.rebalance("assign", [0])
    await until(lambda: f"{TOPIC}/0" in src.status()["partitions"])
    # Then its next batch waits: the old one still runs (and 0..9 were fetched again)
    await nothing(src, 0.3)
    # When the old batch settles, the partition goes on after it, without repeating it
    await old.ack()
    nxt = await read(src)
    assert offsets(nxt) == list(range(10, 20))
    await nxt.ack()
    await until(lambda: cluster.commit_of(0) == 20)


async def test_a_nacked_old_batch_lets_the_partition_deliver_it_again(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *[b"a"] * 12)
    old = await read(src)
    consumer.rebalance("revoke", [0])
    consumer.rebalance("assign", [0])
    await until(lambda: f"{TOPIC}/0" in src.status()["partitions"])
    await old.nack(RuntimeError("not handled"))
    assert offsets(await read(src)) == list(range(10))


async def test_lost_partitions_commit_nothing(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *[b"a"] * 30)
    batch = await read(src)
    consumer.rebalance("lost", [0])
    await until(lambda: f"{TOPIC}/0" not in src.status()["partitions"])
    await batch.ack()
    await commit_cycle_passed(src, cluster)
    assert cluster.commit_of(0) is None


async def test_a_lost_partition_back_resumes_after_what_it_settled(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    cluster.produce(0, *[b"a"] * 30)
    first = await read(src)  # 0..9
    # Given the session is lost while the batch runs, and the batch settles meanwhile
    consumer.rebalance("lost", [0])
    await until(lambda: 0 not in consumer.positions)
    await first.ack()
    assert cluster.commit_of(0) is None  # not ours to commit while lost
    # When the partition comes back to this process
    consumer.rebalance("assign", [0])
    # Then it resumes after what it settled, and commits it
    nxt = await read(src)
    assert offsets(nxt) == list(range(10, 20))
    await until(lambda: cluster.commit_of(0) == 10)


# --- nack, back-pressure ------------------------------------------------------------------------


async def test_nack_delivers_the_same_batch_again_after_a_pause(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, _ = source
    cluster.produce(0, *[b"a"] * 15)
    batch = await read(src)
    t0 = time.monotonic()
    await batch.nack(RuntimeError("boom"))
    again = await read(src)
    assert offsets(again) == list(range(10))
    assert time.monotonic() - t0 >= kafka_partition.NACK_DELAY_S[0] * 0.9
    await again.ack()
    assert offsets(await read(src)) == list(range(10, 15))


async def test_a_batch_handed_back_unrun_is_logged_at_info_a_failed_one_at_warning(
    cluster: FakeCluster,
    source: tuple[KafkaSource, FakeConsumer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    src, _ = source
    cluster.produce(0, *[b"a"] * 15)
    batch = await read(src)
    with caplog.at_level(logging.INFO):
        await batch.nack(None)  # (a stop, or one before it was handed back)
        again = await read(src)
        await again.nack(RuntimeError("boom"))
    said = [
        (r.levelno, r.getMessage().split("(")[1].split(")")[0])
        for r in caplog.records
        if "was not accepted" in r.getMessage()
    ]
    assert said == [(logging.INFO, "handed back unrun"), (logging.WARNING, "boom")]


def test_each_partition_may_buffer_its_share_of_the_budget() -> None:
    parts = kafka_partition.Partitions(batch_size=1000, max_batch_bytes=6_000_000, window_s=0.5)
    budget = kafka_partition.BUFFER_RECORDS, kafka_partition.BUFFER_BYTES
    assert parts.high_water() == budget  # none assigned yet: as if one
    for p in range(4):
        parts.add(TOPIC, p, None, None)
    assert parts.high_water() == (budget[0] // 4, budget[1] // 4)
    for p in range(4, 100):
        parts.add(TOPIC, p, None, None)
    # many partitions: two batches and PREFETCH_MIN_RECORDS at least, one batch of bytes
    assert parts.high_water() == (kafka_partition.PREFETCH_MIN_RECORDS, 6_000_000)
    big = kafka_partition.Partitions(batch_size=10_000, max_batch_bytes=1000, window_s=0.5)
    for p in range(100):
        big.add(TOPIC, p, None, None)
    assert big.high_water() == (20_000, budget[1] // 100)


async def test_a_partition_buffers_its_share_before_it_is_paused(
    cluster: FakeCluster,
    source: tuple[KafkaSource, FakeConsumer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, consumer = source
    monkeypatch.setattr(kafka_partition, "BUFFER_RECORDS", 24_000)  # 2 partitions: 12,000 each
    share = 12_000
    cluster.produce(0, *[b"a"] * (share + 3000))
    batch = await read(src)
    assert src.partitions.high_water()[0] == share > kafka_partition.PREFETCH_MIN_RECORDS
    # Given a batch in flight and a backlog: fetched past two batches and 5,000 records,
    # up to the partition's share, then paused
    buffered = await buffered_once_paused(src, consumer)
    assert share <= buffered <= share + 1000  # + what one poll cycle brought
    await batch.ack()


async def test_a_slow_partition_is_paused_and_resumed(
    cluster: FakeCluster,
    source: tuple[KafkaSource, FakeConsumer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, consumer = source
    monkeypatch.setattr(kafka_partition, "BUFFER_RECORDS", 0)  # the floor: a small backlog
    high = src.partitions.high_water()[0]  # two batches, at least PREFETCH_MIN_RECORDS
    cluster.produce(0, *[b"a"] * (high * 3))
    batch = await read(src)
    # Given a batch in flight and a backlog: the partition is paused with a bounded buffer
    assert high <= await buffered_once_paused(src, consumer) <= high + 100
    # When batches are handled, the buffer drains below half and fetching resumes...
    for _ in range(high):
        await batch.ack()
        batch = await read(src)
        if 0 not in consumer.paused:
            break
    assert 0 not in consumer.paused
    assert src.status()["partitions"][f"{TOPIC}/0"]["buffered"] < high // 2
    # ...and with the next batch held, the partition is paused again at the same bound
    await until(lambda: consumer.pause_calls >= 2)
    await polls_passed(consumer, 20)
    assert src.status()["partitions"][f"{TOPIC}/0"]["buffered"] <= high + 100
    await batch.ack()


# --- start positions ----------------------------------------------------------------------------


@pytest.mark.parametrize("broker_looks_up_times", [True, False])
async def test_start_at_a_time_skips_older_records(
    cluster: FakeCluster, broker_looks_up_times: bool
) -> None:
    old = int((time.time() - 3600) * 1000)
    cluster.produce(0, b"old1", b"old2", timestamp=old)
    cluster.produce(0, b"new1", b"new2")
    since = datetime.fromtimestamp((old + 1) / 1000, UTC).isoformat()  # just after the old ones
    src, made = make_source(cluster, start=since)
    await src.connect()
    made[0].lookup_by_time = broker_looks_up_times  # before the first poll assigns
    try:
        batch = await read(src)
        assert [r["value"] for r in batch.event.records] == ["new1", "new2"]
        await batch.ack()
        await until(lambda: cluster.commit_of(0) == 4)  # the skipped ones are committed too
    finally:
        await src.close()


async def test_start_latest_skips_what_was_there(cluster: FakeCluster) -> None:
    cluster.produce(0, b"before")
    src, made = make_source(cluster, start="latest")
    await src.connect()
    try:
        await until(lambda: bool(made) and 0 in made[0].positions)  # assigned at the end
        cluster.produce(0, b"after")
        batch = await read(src)
        assert [r["value"] for r in batch.event.records] == ["after"]
    finally:
        await src.close()


async def test_a_committed_offset_wins_over_start(cluster: FakeCluster) -> None:
    cluster.produce(0, *[b"a"] * 5)
    cluster.committed[("g", 0)] = 3
    src, _ = make_source(cluster, start="earliest")
    await src.connect()
    try:
        batch = await read(src)
        assert batch.key.part.partition == 1 or offsets(batch) == [3, 4]
    finally:
        await src.close()


# --- lifecycle ----------------------------------------------------------------------------------


async def test_close_commits_what_is_settled_and_leaves(cluster: FakeCluster) -> None:
    # the daemon lets in-flight batches settle (shutdown_grace) before it closes sources
    src, made = make_source(cluster)
    await src.connect()
    cluster.produce(0, *[b"a"] * 15)
    cluster.produce(1, *[b"b"] * 15)
    a, b = await read(src), await read(src)
    if a.key.part.partition == 1:
        a, b = b, a
    await a.ack()
    await asyncio.wait_for(src.close(), 5)
    # Then partition 0's batch is committed, partition 1's (never settled) is not
    assert cluster.commit_of(0) == 10 and cluster.commit_of(1) is None
    assert made[0].closed
    with pytest.raises(NotConnected):  # settled after close: not committed, and it says so
        await b.ack()
    with pytest.raises(EndOfInput):
        await src.read()
    await src.close()  # idempotent


async def test_close_wakes_a_pending_read_and_works_without_connect(cluster: FakeCluster) -> None:
    src, _ = make_source(cluster)
    await src.close()
    with pytest.raises(EndOfInput):
        await src.read()
    src2, _ = make_source(cluster)
    await src2.connect()
    pending = asyncio.create_task(src2.read())
    await until(lambda: bool(src2._wake._waiters))  # read() waits for records now
    await src2.close()
    with pytest.raises(EndOfInput):
        await asyncio.wait_for(pending, 2)


async def test_a_failed_consumer_is_replaced_on_reconnect(
    cluster: FakeCluster, source: tuple[KafkaSource, FakeConsumer]
) -> None:
    src, consumer = source
    made = src.consumer_factory
    cluster.produce(0, *[b"a"] * 5)
    await (await read(src)).ack()
    await until(lambda: cluster.commit_of(0) == 5)
    consumer.fail_next_poll = KafkaError(KafkaError._FATAL, "fenced", fatal=True)
    with pytest.raises(NotConnected, match="fenced"):
        await read(src, 5)
    # When the core reconnects, a new consumer resumes from the committed offsets
    await src.connect()
    assert consumer.closed and src.consumer_factory is made
    cluster.produce(0, b"b")
    assert offsets(await read(src)) == [5]


async def test_read_before_connect_asks_for_it(cluster: FakeCluster) -> None:
    src, _ = make_source(cluster)
    with pytest.raises(NotConnected):
        await src.read()
    await src.close()


# --- settled offsets kept in the state store (kill -9) ------------------------------------------


async def test_after_a_crash_a_partition_resumes_after_what_was_settled_not_committed(
    cluster: FakeCluster,
) -> None:
    store = MemoryStore()
    cluster.produce(0, *[b"a"] * 30)
    # Given a process that settled 0..19 but whose commits never reached the broker
    a, made = make_source(cluster, store=store)
    await a.connect()
    await until(lambda: bool(made) and bool(made[0].positions))
    made[0].drop_commits = True
    for _ in range(2):
        await (await read(a)).ack()
    await until(lambda: stored(store, 0) == 20)  # written within POSITION_INTERVAL_S
    assert cluster.commit_of(0) is None
    # When it is killed (no close: nothing more is committed) and a new one starts
    await a._stop_polling()
    b, _ = make_source(cluster, store=store)
    await b.connect()
    try:
        # Then the new one starts after what was settled: 0..19 are not delivered again
        assert offsets(await read(b)) == list(range(20, 30))
    finally:
        await b.close()
        await a.close()


def stored(store: MemoryStore, partition: int) -> int | None:
    """The settled position stored for ``partition`` of group ``g``."""
    raw = store.kv.get(("kafka", json.dumps(["g", TOPIC, partition])))
    return None if raw is None else int(json.loads(raw)["settled"])


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.position_writes = 0

    async def put_position(self, namespace: str, key: str, value: str) -> None:
        self.position_writes += 1
        await super().put_position(namespace, key, value)


async def test_acks_mark_positions_and_they_are_written_together(cluster: FakeCluster) -> None:
    store = CountingStore()
    cluster.produce(0, *[b"a"] * 100)
    cluster.produce(1, *[b"b"] * 100)
    src, _ = make_source(cluster, store=store, batch_size=1)
    await src.connect()
    try:
        await until(lambda: sum(len(p.buffer) for p in src.partitions.order) == 200)
        # When 200 batches of one record are acked one after the other
        acked = 0
        while acked < 200:
            for delivery in await src.read_many(2):
                await delivery.ack()
                acked += 1
        # Then both positions are stored, in far fewer writes than one per ack
        await until(lambda: (stored(store, 0), stored(store, 1)) == (100, 100))
        assert store.position_writes < 20, store.position_writes
    finally:
        await src.close()


async def test_a_revoke_and_close_write_the_settled_positions_at_once(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given positions written only every minute
    monkeypatch.setattr(kafka_source, "POSITION_INTERVAL_S", 60.0)
    store = MemoryStore()
    cluster.produce(0, *[b"a"] * 30)
    cluster.produce(1, *[b"b"] * 30)
    src, made = make_source(cluster, store=store)
    await src.connect()
    try:
        got = {b.key.part.partition: b for b in (await read(src), await read(src))}
        await got[0].ack()
        later = await read(src)  # partition 0's second batch, acked after the close
        await got[1].ack()
        assert stored(store, 0) is None and stored(store, 1) is None
        # When partition 1 is revoked, its position is stored when the revoke returns
        made[0].rebalance("revoke", [1])
        await until(lambda: 1 not in made[0].positions)
        assert stored(store, 1) == 10
    finally:
        await src.close()
    # And the close stores the rest, as does an ack after it (not committed, yet handled)
    assert stored(store, 0) == 10
    with pytest.raises(NotConnected):
        await later.ack()
    assert stored(store, 0) == 20


@pytest.mark.parametrize(
    ("stored", "committed", "first"),
    [
        ({"settled": 20, "committed": 10}, 10, 20),  # settled beyond the commit: resume there
        ({"settled": 20, "committed": 10}, 25, 25),  # the group went further: it wins
        ({"settled": 20, "committed": 20}, 5, 5),  # offsets moved back on purpose: obeyed
    ],
)
async def test_the_later_of_the_settled_checkpoint_and_the_committed_offset_wins(
    cluster: FakeCluster, stored: dict[str, int], committed: int, first: int
) -> None:
    store = MemoryStore()
    await store.put("kafka", json.dumps(["g", TOPIC, 0]), json.dumps(stored))
    cluster.produce(0, *[b"a"] * 30)
    cluster.committed[("g", 0)] = committed
    src, _ = make_source(cluster, store=store)
    await src.connect()
    try:
        assert offsets(await read(src))[0] == first
    finally:
        await src.close()


# --- no over-commit at the source level (not only in OffsetTracker's own tests) -----------------


class CommitsOnHandOut(kafka_partition.OffsetTracker):
    """A mutant: a range counts as settled as soon as it is handed out."""

    def track(self, first: int, end: int, *, settled: bool = False) -> int:
        return super().track(first, end, settled=True)

    def settle(self, token: int) -> bool:
        return False

    def cancel(self, token: int) -> None:
        pass


class NackCommits(kafka_partition.OffsetTracker):
    """A mutant: a nacked (cancelled) range counts as settled."""

    def cancel(self, token: int) -> None:
        self.settle(token)


async def over_commit_scenario(cluster: FakeCluster) -> None:
    """Acks, a nack and a batch held open on partition 0 while partition 1 goes on (and
    commits): partition 0's committed offset must never pass what was acked there."""
    src, _ = make_source(cluster)
    await src.connect()
    try:
        cluster.produce(0, *[b"a"] * 20)
        cluster.produce(1, *[b"b"] * 30)
        got = {b.key.part.partition: b for b in (await read(src), await read(src))}
        # a nack of partition 0's first batch commits nothing there
        await got[0].nack(RuntimeError("not accepted"))
        await got[1].ack()
        await until(lambda: cluster.commit_of(1) == 10)
        assert cluster.commit_of(0) is None, "a nacked batch was committed"
        # nor does its redelivery while it runs, however far partition 1 gets
        acked = 1  # batches of partition 1 acked so far (3 in all)
        held = await read(src)
        while held.key.part.partition != 0:
            await held.ack()
            acked += 1
            held = await read(src)
        assert offsets(held) == list(range(10))
        for _ in range(acked, 3):
            b = await read(src)
            assert b.key.part.partition == 1
            await b.ack()
        await until(lambda: cluster.commit_of(1) == 30)
        assert cluster.commit_of(0) is None, "a batch still running was committed"
        # and once acked, exactly its end is
        await held.ack()
        await until(lambda: cluster.commit_of(0) == 10)
    finally:
        await src.close()


async def test_the_source_never_commits_past_what_was_acked(cluster: FakeCluster) -> None:
    await over_commit_scenario(cluster)


@pytest.mark.parametrize("mutant", [CommitsOnHandOut, NackCommits])
async def test_an_over_committing_tracker_is_caught_at_the_source_level(
    cluster: FakeCluster,
    monkeypatch: pytest.MonkeyPatch,
    mutant: type[kafka_partition.OffsetTracker],
) -> None:
    # A tracker that over-commits must fail the scenario above, not only the tracker's
    # own unit tests. (A tracker that commits past a gap between two tracked ranges
    # cannot over-commit here: a partition has one batch in flight at a time.)
    monkeypatch.setattr(kafka_partition, "OffsetTracker", mutant)
    with pytest.raises(AssertionError, match="was committed"):
        await over_commit_scenario(cluster)


# --- building batches: the unmeasured path equals the measured one --------------------------------


def test_a_batch_that_fits_however_it_encodes_builds_the_same_records() -> None:
    # Given records of every kind (text, escapes, non-UTF-8, empty and null keys/values)
    values: list[tuple[bytes | None, bytes | None]] = [
        (b"k", b"plain"),
        (None, None),
        (b"", b""),
        (b"\x80", b"\xff\x00"),
        (b"q", b'"quoted" \\ and \x01 control'),
        (b"u", "ünïcödé".encode()),
    ]
    messages = [
        confluent_kafka.Message(
            topic=TOPIC, partition=0, offset=i, key=k, value=v,
            timestamp=(confluent_kafka.TIMESTAMP_CREATE_TIME, 1_700_000_000_000),
        )
        for i, (k, v) in enumerate(values)
    ]  # fmt: skip

    def build(max_batch_bytes: int) -> list[dict[str, Any]]:
        table = kafka_partition.Partitions(len(values), max_batch_bytes, 0.0)
        part = table.add(TOPIC, 0, None, None)
        table.ingest(list(messages), lambda m: None)
        batch, event, raw = table.take(part, "k", Format.SCF)
        assert len(batch.messages) == len(values)
        assert table.bytes == 0 and not part.buffer
        built = event if isinstance(event, Event) else event()
        if raw is not None:  # written straight from the bytes: the same JSON
            assert orjson.loads(raw.raw) == render(built, "scf")
        return render(built, "scf")["Records"]

    # When one batch is built with room to spare (no record measured) and one with just
    # enough room that each record's JSON size is counted
    roomy = build(6_000_000)
    exact = build(len(values) * 150)
    # Then both hold the same records
    assert roomy == exact
    assert roomy[3]["Ckafka"]["msgBodyBase64"] is True


@pytest.mark.parametrize("value_size", [1200, 7000, 7_000_000])
def test_records_that_go_into_json_as_they_are_are_not_measured_one_by_one(
    value_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 1,000 plain ASCII records too big to fit 6 MB should each become six times its
    # size in JSON (1,200 bytes: they all fit; 7,000: a batch is cut at 6 MB; 7 MB: one
    # record alone, bigger than the limit), and a batch that keys one by ``_measured``
    n = 1000 if value_size < 1_000_000 else 2
    values, keys = [b"v" * value_size] * n, [b"k%d" % i for i in range(n)]
    measured = kafka_partition._measured(buffered(values, keys)[1], 1000, 6_000_000)[0]
    # When the first batch is taken with measuring turned off
    table, part = buffered(values, keys)

    def measure(*args: Any) -> Any:
        raise AssertionError("measured one by one")

    monkeypatch.setattr(kafka_partition, "_measured", measure)
    batch, event, raw = table.take(part, "k", Format.SCF)
    # Then it holds the records measuring would have taken, written straight from their
    # bytes, within 6 MB unless it is one record on its own
    assert offsets_of(batch.messages) == offsets_of(measured)
    assert raw is not None
    assert orjson.loads(raw.raw) == render(event(), "scf")  # type: ignore[operator]
    assert len(batch.messages) == 1 or len(raw.raw) <= 6_000_000
    n = len(batch.messages)
    assert {1200: n == 1000, 7000: 800 < n < 1000, 7_000_000: n == 1}[value_size]


@pytest.mark.parametrize(
    ("odd", "measured"),
    [
        (b'"' * 7000, False),  # 14,000 bytes in JSON
        (b"\x01" * 7000, False),  # 42,000
        ("é".encode() * 3500, False),  # 7,000: as it is
        (b"\xff" * 7000, True),  # not UTF-8: base64
    ],
)
def test_a_batch_that_may_not_fit_counts_its_escapes_and_only_one_not_utf8_is_measured(
    odd: bytes, measured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given records of 7,000 bytes that may not fit 6 MB at six times their size, one of
    # them escaped in JSON, or not ASCII, or not UTF-8
    values = [b"v" * 7000] * 1000
    values[500] = odd
    exact = kafka_partition._measured(buffered(values)[1], 1000, 6_000_000)[0]
    # When a batch is taken, counting calls of the record by record path
    calls: list[int] = []
    real = kafka_partition._measured

    def spy(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kafka_partition, "_measured", spy)
    table, part = buffered(values)
    batch, event, raw = table.take(part, "k", Format.SCF)
    built = event if isinstance(event, Event) else event()
    # Then only the batch with a record not UTF-8 was measured record by record; each
    # holds the records measuring takes (the odd one counted at its JSON size) and its
    # JSON is within 6 MB
    assert bool(calls) is measured
    assert (raw is None) is measured
    assert offsets_of(batch.messages) == offsets_of(exact)
    assert 500 < len(batch.messages) < 1000
    assert len(orjson.dumps(render(built, "scf"))) <= 6_000_000
    if raw is not None:
        assert orjson.loads(raw.raw) == render(built, "scf")


def test_a_batch_is_cut_where_measuring_cuts_it_when_escapes_lie_past_the_cut() -> None:
    # Given 2,000 records of 5,000 bytes, and after the 970th one of 1 MB of control bytes
    # (6 MB in JSON): the first 970 fit 6 MB, with it they do not
    values = [b"v" * 5000] * 2000
    values[970] = b"\x01" * 1_000_000
    exact = kafka_partition._measured(buffered(values)[1], 2000, 6_000_000)[0]
    # When batches are taken, then the first is the 970 records measuring takes
    table, part = buffered(values)
    batch, _, raw = table.take(part, "k", Format.SCF)
    assert len(exact) == 970 and offsets_of(batch.messages) == offsets_of(exact)
    assert raw is not None and len(raw.raw) <= 6_000_000


def buffered(
    values: list[bytes], keys: list[bytes] | None = None
) -> tuple[kafka_partition.Partitions, kafka_partition.Partition]:
    """A table of one partition (batches of all the records, up to 6,000,000 bytes) with
    records of these values and keys (none: null) buffered, offsets from 0."""
    table = kafka_partition.Partitions(len(values), 6_000_000, 0.0)
    part = table.add(TOPIC, 0, None, None)
    table.ingest(
        [
            confluent_kafka.Message(
                topic=TOPIC, partition=0, offset=i, key=None if keys is None else keys[i], value=v
            )
            for i, v in enumerate(values)
        ],
        lambda m: None,
    )
    return table, part


def offsets_of(messages: Iterable[Any]) -> list[int]:
    return [m.offset() for m in messages]


def test_ingest_sorts_a_mixed_poll_cycle_by_partition_and_drops_what_is_not_ours() -> None:
    # Given partitions 0 and 1 assigned, 2 given up, and a poll cycle whose records come in
    # runs of one partition, interleaved, with a record handed out before and one of another
    # topic's partition nobody told us about (its assignment callback timed out)
    table = kafka_partition.Partitions(100, 6_000_000, 0.0)
    p0 = table.add(TOPIC, 0, None, None)
    p1 = table.add(TOPIC, 1, 5, None)
    table.forget(table.add(TOPIC, 2, None, None), gone=True)
    layout = [(0, 0), (0, 1), (1, 5), (2, 9), (0, 2), (1, 4), (1, 6), (2, 10), (0, 3)]
    messages = [
        confluent_kafka.Message(topic=TOPIC, partition=p, offset=o, key=b"k", value=b"v")
        for p, o in layout
    ] + [confluent_kafka.Message(topic="other", partition=0, offset=0, key=None, value=b"x")]
    # When it is ingested
    assert table.ingest(messages, lambda m: None)
    # Then each partition buffers its own records in order, what was revoked and what is
    # below the next offset are dropped and counted, the unknown partition is owned now
    assert [m.offset() for m in p0.buffer] == [0, 1, 2, 3]
    assert [m.offset() for m in p1.buffer] == [5, 6]
    assert table.stats["revoked_dropped"] == 2
    assert table.stats["duplicates_dropped"] == 1
    other = table.parts[("other", 0)]
    assert [m.offset() for m in other.buffer] == [0]
    assert table.bytes == sum(p.buffer.bytes for p in table.parts.values())
    assert p0.high_watermark == 4 and p1.high_watermark == 7
    # and a cycle of nothing new buffers nothing
    again = [confluent_kafka.Message(topic=TOPIC, partition=1, offset=6, key=b"k", value=b"v")]
    assert not table.ingest(again, lambda m: None)
    assert table.stats["duplicates_dropped"] == 2


def test_a_trigger_of_one_topic_by_name_does_not_read_each_record_s_topic() -> None:
    # Given a table for one topic subscribed to by name, and a mixed poll cycle of it
    table = kafka_partition.Partitions(100, 6_000_000, 0.0, TOPIC)
    p0, p1 = table.add(TOPIC, 0, None, None), table.add(TOPIC, 1, None, None)
    layout = [(0, 0), (1, 0), (1, 1), (0, 1)]
    messages = [
        confluent_kafka.Message(topic=TOPIC, partition=p, offset=o, key=b"k", value=b"v")
        for p, o in layout
    ]
    # When it is ingested, each partition buffers its own records in order
    assert table.ingest(messages, lambda m: None)
    assert [m.offset() for m in p0.buffer] == [0, 1] == [m.offset() for m in p1.buffer]
    assert set(table.parts) == {(TOPIC, 0), (TOPIC, 1)}
    # And the source sets it for one topic by name only, not a list or a regex
    cluster = FakeCluster()
    assert make_source(cluster)[0].partitions.topic == TOPIC
    assert make_source(cluster, topic=[TOPIC, "b"])[0].partitions.topic is None
    assert make_source(cluster, topic="^ord.*")[0].partitions.topic is None


def raw_size(m: confluent_kafka.Message) -> int:
    """What a buffered record is counted for: the overhead, its key's and value's bytes."""
    return kafka_partition.RECORD_OVERHEAD + len(m.key() or b"") + len(m.value() or b"")


def test_a_buffer_hands_out_its_records_in_order_across_takes_and_put_backs() -> None:
    # Given a buffer fed three poll cycles of 1,500 records of differing sizes
    buf = kafka_partition.Buffer()
    msgs = [
        confluent_kafka.Message(topic=TOPIC, partition=0, offset=o, key=None, value=b"x" * (o % 7))
        for o in range(4500)
    ]
    size = raw_size
    for i, at in enumerate((1.0, 2.0, 3.0)):
        cycle = msgs[1500 * i : 1500 * (i + 1)]
        buf.add(cycle, at)

    def offsets(ms: Iterable[confluent_kafka.Message]) -> list[int]:
        return [m.offset() for m in ms]  # type: ignore[misc]

    def consistent() -> None:
        assert buf.bytes == sum(buf.held_sizes()) == sum(size(m) for m in buf)
        assert len(buf.held_sizes()) == len(buf) == len(list(buf))
        # the keys and values read when the records came stay beside them
        assert buf.keys[buf.head :] == [m.key() for m in buf]
        assert buf.values[buf.head :] == [m.value() for m in buf]

    # When batches are taken, a taken one is put back, and batches are taken again
    a, a_bytes = buf.take(1000)
    # Then each is the oldest records, counted for their own bytes, the rest in order
    assert offsets(a) == list(range(1000)) and a_bytes == sum(size(m) for m in a)
    assert buf.head_offset == 1000 and buf.head_arrived == 1.0 and len(buf) == 3500
    consistent()
    buf.push_front(a)  # a nack before the taken front was dropped
    assert offsets(buf) == list(range(4500)) and buf.head_arrived == 0.0
    consistent()
    a, _ = buf.take(1000)
    b, _ = buf.take(1000)
    c, _ = buf.take(1000)  # the taken front is dropped here
    assert offsets(a + b + c) == list(range(3000)) and buf.head_arrived == 3.0
    consistent()
    buf.push_front(c)  # a nack after it
    assert offsets(buf) == list(range(2000, 4500)) and buf.head_arrived == 0.0
    consistent()
    rest, rest_bytes = buf.take(2500)
    assert offsets(rest) == list(range(2000, 4500)) and rest_bytes == sum(map(size, rest))
    assert not buf and buf.first is None and buf.head_offset is None and buf.bytes == 0
    assert not buf.arrivals
    # and a buffer that never empties (the function slower than the fetch) keeps no record
    # it handed out: none outside its count of bytes
    for o in range(3000):
        buf.add([msgs[o % 4500]], 5.0)
        if o > 10:
            buf.take(1)
            assert all(m is None for m in buf.messages[: buf.head])
            assert all(v is None for v in buf.values[: buf.head])
    consistent()
    buf.take(len(buf))
    # and an empty buffer takes new records from the start
    buf.add(msgs[:2], 4.0)
    assert offsets(buf) == [0, 1] and buf.head_arrived == 4.0
    consistent()


def test_batches_handed_back_return_to_the_front_of_the_buffer_in_order() -> None:
    # Given a partition that handed out three consecutive batches of 100 and buffers more
    table = kafka_partition.Partitions(100, 6_000_000, 0.0)
    part = table.add(TOPIC, 0, None, None)
    m = confluent_kafka.Message
    table.ingest(
        [m(topic=TOPIC, partition=0, offset=o, key=None, value=b"v") for o in range(450)],
        lambda _: None,
    )
    batches = [table.take(part, "t", kafka_partition.Format.SCF)[0] for _ in range(3)]
    assert [(b.first, b.end) for b in batches] == [(0, 100), (100, 200), (200, 300)]
    # When the oldest is handed back (a nack)
    table.give_back(batches[0])
    # Then it and the two after it are back at the front, in order, before the rest, and
    # counted again; the partition commits nothing of them
    assert [x.offset() for x in part.buffer] == list(range(450))
    assert table.bytes == part.buffer.bytes == sum(part.buffer.held_sizes())
    assert not part.inflight and all(b.done for b in batches)
    assert part.position in (None, 0)
    # and the next batch handed out starts where the first one did
    assert table.take(part, "t", kafka_partition.Format.SCF)[0].first == 0


def test_ingest_takes_runs_whole_and_drops_what_was_handed_out_at_a_run_start() -> None:
    # Given one partition whose first poll cycle has offsets with gaps (a compacted topic)
    table = kafka_partition.Partitions(100, 6_000_000, 0.0)
    p0 = table.add(TOPIC, 0, None, None)
    p1 = table.add(TOPIC, 1, None, None)
    m = confluent_kafka.Message

    def cycle(*layout: tuple[int, int]) -> list[confluent_kafka.Message]:
        return [
            m(topic=TOPIC, partition=p, offset=o, key=b"k%d" % o, value=b"v%d" % o)
            for p, o in layout
        ]

    # When it is ingested, then one whose run starts with records handed out before, then
    # one with runs of both partitions
    assert table.ingest(cycle((0, 0), (0, 1), (0, 2), (0, 5), (0, 9)), lambda _: None)
    assert p0.next_offset == 10
    assert table.ingest(cycle((0, 8), (0, 9), (0, 10), (0, 11)), lambda _: None)
    assert table.ingest(cycle((0, 12), (0, 13), (1, 0), (1, 1), (0, 14)), lambda _: None)
    # Then each partition holds its records once, in order, with their own keys and values
    assert [x.offset() for x in p0.buffer] == [0, 1, 2, 5, 9, 10, 11, 12, 13, 14]
    assert [x.offset() for x in p1.buffer] == [0, 1]
    assert table.stats["duplicates_dropped"] == 2
    assert p0.next_offset == 15 and p1.next_offset == 2 and p0.high_watermark == 15
    assert p0.buffer.keys == [b"k%d" % o for o in (0, 1, 2, 5, 9, 10, 11, 12, 13, 14)]
    assert p1.buffer.values == [b"v0", b"v1"]
    # and a batch of them is the event of those records
    _, event, raw = table.take(p0, "k", Format.SCF)
    assert raw is not None and not isinstance(event, Event)
    records = orjson.loads(raw.raw)["Records"]
    assert [(r["Ckafka"]["offset"], r["Ckafka"]["msgKey"]) for r in records] == [
        (o, f"k{o}") for o in (0, 1, 2, 5, 9, 10, 11, 12, 13, 14)
    ]
    assert orjson.loads(raw.raw) == render(event(), "scf")


def test_ingest_drops_a_record_that_goes_back_and_reports_errors() -> None:
    # Given a poll cycle with an error in it, a run of partition 0 whose offsets go back
    # within it (a duplicate inside the run), and a run of partition 1 with null keys and
    # values
    table = kafka_partition.Partitions(100, 6_000_000, 0.0)
    p0 = table.add(TOPIC, 0, None, None)
    p1 = table.add(TOPIC, 1, None, None)
    error = confluent_kafka.Message(
        topic=TOPIC, partition=0, error=KafkaError(KafkaError._PARTITION_EOF)
    )
    m = confluent_kafka.Message
    messages = [
        m(topic=TOPIC, partition=0, offset=1, key=b"k", value=b"a"),
        m(topic=TOPIC, partition=0, offset=3, key=b"k", value=b"b"),
        error,
        m(topic=TOPIC, partition=0, offset=2, key=b"k", value=b"c"),
        m(topic=TOPIC, partition=0, offset=4, key=b"k", value=b"d"),
        m(topic=TOPIC, partition=1, offset=0, key=None, value=b"xyz"),
        m(topic=TOPIC, partition=1, offset=1, key=b"key", value=None),
    ]
    errors: list[Any] = []
    # When it is ingested
    assert table.ingest(messages, errors.append)
    # Then the error was reported, not buffered; what went back was dropped as a duplicate
    assert errors == [error]
    assert [x.offset() for x in p0.buffer] == [1, 3, 4]
    assert table.stats["duplicates_dropped"] == 1
    assert p0.next_offset == 5 and p1.next_offset == 2
    # and each record is counted for its own bytes, nulls as empty
    assert [x.offset() for x in p1.buffer] == [0, 1]
    assert p1.buffer.held_sizes() == [raw_size(x) for x in p1.buffer]
    assert p1.buffer.held_sizes() == [kafka_partition.RECORD_OVERHEAD + 3] * 2


@pytest.mark.parametrize(
    "pairs",
    [
        [(b"1", b"v" * 200), (b"2", b"plain ascii, DEL \x7f")],
        [(None, b'{"json": "body", "n": 1}'), (b"k", None), (None, None)],  # escapes, nulls
        [(b"tab\tkey", b"line\nbreak\\back\x00slash\x1f")],  # control bytes
        [(b"k", b'one " quote'), (b"k2", b"v")],  # a single escape in the whole batch
        [("é".encode(), "日本語 😀".encode()), (b"a", b"b")],  # UTF-8 beyond ASCII
        [(b"\xc3", b"\xa9 split")],  # invalid alone, valid only if the two were joined
        [(None, b"v" * 200), (b"", b"w"), (None, None)],  # no keys (null or empty)
        [(None, b'a "quoted" value'), (None, "é".encode())],  # no keys, escapes and UTF-8
        [(None, b"a"), (b"k", b"b")],  # a key after a record without one
        [(b"k", b"a"), (None, b"b"), (b"", b"c")],  # records without a key after one with
    ],
    ids=[
        "ascii",
        "escapes-and-nulls",
        "control-bytes",
        "one-escape",
        "utf8",
        "split-character",
        "keyless",
        "keyless-escapes",
        "key-after-none",
        "none-after-key",
    ],
)
@pytest.mark.parametrize("step", [1, 3], ids=["consecutive-offsets", "offsets-with-gaps"])
def test_scf_json_is_what_rendering_the_event_gives(
    pairs: list[tuple[bytes | None, bytes | None]], step: int
) -> None:
    # Given records of one partition, among them keys and values JSON must escape, at
    # consecutive offsets or with gaps (a compacted topic, transaction markers)
    messages = [
        confluent_kafka.Message(
            topic="t\u00e9", partition=3, offset=2**62 + i * step, key=k, value=v
        )
        for i, (k, v) in enumerate(pairs)
    ]
    records = kafka_partition._records("t\u00e9", 3, messages)
    event = Event(kind=kafka_partition.Kind.CKAFKA, trigger="k", time=datetime.now(UTC),
                  records=tuple(records))  # fmt: skip
    # When the SCF JSON is written straight from their bytes
    raw = kafka_partition.scf_json("t\u00e9", 3, messages)
    if any(r.get("key_base64") or r.get("value_base64") for r in records):
        # Then a key or value that is not UTF-8 leaves it to the event (base64 and its flag)
        assert raw is None
        return
    # Then it reads as the rendered event, with orjson and the standard library alike
    assert raw is not None
    assert orjson.loads(raw) == render(event, "scf") == json.loads(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (None, b"v" * 200),
        (b"k", b"plain"),
        (b"", None),
        (None, b'{"json": "body"}'),  # escapes
        (b"tab\t", b"nul\x00"),  # control bytes
        ("é".encode(), "日本語".encode()),  # UTF-8 beyond ASCII
        (b"k", b"\xff not UTF-8"),
        (b"\xfe", b"v"),
    ],
)
def test_scf_json_of_a_single_record_is_what_rendering_the_event_gives(
    key: bytes | None, value: bytes | None
) -> None:
    # Given one record (batch_size = 1 hands out one a time)
    m = confluent_kafka.Message(topic="t\u00e9", partition=3, offset=2**40, key=key, value=value)
    records = kafka_partition._records("t\u00e9", 3, [m])
    event = Event(kind=kafka_partition.Kind.CKAFKA, trigger="k", time=datetime.now(UTC),
                  records=tuple(records))  # fmt: skip
    # When its SCF JSON is written
    raw = kafka_partition.scf_json("t\u00e9", 3, [m])
    # Then it reads as the rendered event, or is left to the event when not UTF-8
    if records[0].get("key_base64") or records[0].get("value_base64"):
        assert raw is None
    else:
        assert raw is not None and orjson.loads(raw) == render(event, "scf") == json.loads(raw)


def test_scf_json_of_ascii_records_needing_no_escape_takes_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given 100 records whose keys and values are ASCII and need no escape in JSON
    value = b"v" * 200
    messages = [
        confluent_kafka.Message(topic=TOPIC, partition=0, offset=i, key=b"%d" % i, value=value)
        for i in range(100)
    ]
    calls = 0
    dumps = orjson.dumps

    def counting(obj: Any) -> bytes:
        nonlocal calls
        calls += 1
        return dumps(obj)

    monkeypatch.setattr(kafka_partition.orjson, "dumps", counting)
    # When their SCF JSON is written
    raw = kafka_partition.scf_json(TOPIC, 0, messages)
    # Then the keys and values went in as they are, checked once for the whole batch (not
    # encoded one by one), and the JSON is the records'
    assert calls <= 4
    assert raw is not None
    records = orjson.loads(raw)["Records"]
    assert [r["Ckafka"]["msgBody"] for r in records] == [value.decode()] * 100
    assert [r["Ckafka"]["msgKey"] for r in records] == [str(i) for i in range(100)]


@pytest.mark.parametrize(
    "pairs",
    [
        [(b"%d" % i, b"v" * 200) for i in range(5)],  # the common case
        [(None, b"a"), (None, b"b"), (None, b"")],  # keyless, an empty value
        [(b"k", None), (None, b"b"), (b"", b"c")],  # keys after none and before
        [("é".encode(), "日本語".encode()), (b"k", b"v")],  # UTF-8 beyond ASCII
        [(b"k", b'{"json": "needs escapes"}'), (b"k", b"v")],  # written now, not by column
        [(b"k", b"\xff"), (b"k", b"v")],  # not UTF-8: left to the event
        [(b"k", b"only one")],  # batch_size = 1: written now
    ],
    ids=["ascii", "keyless", "some-keys", "utf8", "escapes", "not-utf8", "single"],
)
@pytest.mark.parametrize("first", [0, 7, 95, 2**62], ids=["0", "7", "95", "2^62"])
@pytest.mark.parametrize("step", [1, 3], ids=["consecutive-offsets", "offsets-with-gaps"])
@pytest.mark.parametrize("verbatim", [False, True], ids=["checked-here", "checked-by-fit"])
def test_an_scf_event_by_column_builds_what_its_json_reads(
    pairs: list[tuple[bytes | None, bytes | None]], first: int, step: int, verbatim: bool
) -> None:
    from bridge.targets._worker import columns_event

    # Given a batch of one partition, its offsets crossing a power of ten or not
    messages = [
        confluent_kafka.Message(
            topic="t\u00e9", partition=3, offset=first + i * step, key=k, value=v
        )
        for i, (k, v) in enumerate(pairs)
    ]
    keys, values = kafka_partition._keys_values(messages)
    needs_escape = any(b'"' in x or b"\\" in x for x in filter(None, values))
    utf8 = all(x.decode("utf-8", "replace").encode() == x for x in filter(None, values))
    # what Buffer.fit says: UTF-8 needs no escape, and one that is not is never verbatim
    verbatim = verbatim and not needs_escape and utf8
    # When the core gets its SCF event
    ev = kafka_partition.scf_event("t\u00e9", 3, messages, keys, values, verbatim)
    expected = kafka_partition.scf_json("t\u00e9", 3, messages)
    if expected is None:  # not UTF-8: built the long way
        assert ev is None
        return
    assert ev is not None and ev.plain
    if len(pairs) == 1 or needs_escape:
        # Then one record, or records needing escapes, are written now and sent as JSON
        assert ev.columns is None and ev.raw == expected
        return
    # Then it is sent by column, its JSON not written; the worker builds from the columns
    # the event the JSON reads, key order included, with orjson and the standard library
    assert ev.columns is not None and ev._raw is None
    assert ev.size == len(expected)
    built = columns_event(orjson.loads(ev.columns))
    assert orjson.dumps(built) == orjson.dumps(orjson.loads(expected))
    assert columns_event(json.loads(ev.columns)) == json.loads(expected)
    # And written when something reads it (a dead letter), it is the JSON, at its size
    assert ev.raw == expected


def test_a_batch_needing_escapes_is_checked_for_them_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given JSON documents (their quotes need escapes), and the checks counted
    messages = [
        confluent_kafka.Message(topic=TOPIC, partition=0, offset=i, key=None, value=b'{"n": 1}')
        for i in range(3)
    ]
    keys, values = kafka_partition._keys_values(messages)
    calls: list[str] = []
    for name in ("_escapes", "_verbatim"):
        real = getattr(kafka_partition, name)
        monkeypatch.setattr(
            kafka_partition, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    # When the core gets their event, it is the JSON, checked for escapes once
    ev = kafka_partition.scf_event(TOPIC, 0, messages, keys, values)
    assert ev is not None and ev.columns is None
    assert orjson.loads(ev.raw)["Records"][2]["Ckafka"]["msgBody"] == '{"n": 1}'
    assert calls == ["_escapes"]


def test_the_digits_of_a_run_of_offsets_are_counted_as_written() -> None:
    for first, last in [
        (0, 0),
        (0, 9),
        (0, 10),
        (5, 123),
        (99, 100),
        (999, 1001),
        (10**17, 10**17 + 5),
    ]:
        assert kafka_partition._digits(first, last) == sum(
            len(str(i)) for i in range(first, last + 1)
        ), (first, last)
    assert kafka_partition._digits(2**62, 2**62 + 999) == 19 * 1000


def test_a_column_spec_that_is_not_one_is_refused() -> None:
    from bridge.targets._worker import columns_event

    names = ["a", "b"]
    assert columns_event(
        {"records": 2, "wrap": "W", "names": names, "columns": [{"same": "x"}, {"from": 4}]}
    ) == {"Records": [{"W": {"a": "x", "b": 4}}, {"W": {"a": "x", "b": 5}}]}
    assert columns_event({"records": 2, "wrap": "W", "names": [], "columns": []}) == {
        "Records": [{"W": {}}, {"W": {}}]
    }
    bad = [
        ([{"same": 1}], "1 columns for 2 names"),
        ([{"same": 1}, {"each": [1]}], "'b': 1 values for 2 records"),
        ([{"same": [1]}, {"from": 0}], "'a': a same value must not be an object or array"),
    ]
    for columns, message in bad:
        with pytest.raises(ValueError, match=message):
            columns_event({"records": 2, "wrap": "W", "names": names, "columns": columns})
    with pytest.raises(KeyError):
        columns_event({"records": 2, "wrap": "W", "names": names, "columns": [{}, {}]})


async def test_a_kafka_delivery_carries_its_scf_json_and_builds_the_event_on_demand() -> None:
    # Given a batch taken for the scf format
    table = kafka_partition.Partitions(10, 1_000_000, 0.0)
    part = table.add(TOPIC, 0, None, None)
    messages = [
        confluent_kafka.Message(topic=TOPIC, partition=0, offset=i, key=b"k", value=b"v%d" % i)
        for i in range(3)
    ]
    table.ingest(messages, lambda m: None)
    batch, event, raw = table.take(part, "k", Format.SCF)
    assert raw is not None and raw.plain
    # When the source makes a delivery of it
    built: list[Event] = []

    def build() -> Event:
        assert callable(event)
        built.append(event())
        return built[-1]

    async def ack() -> None:
        pass

    d = SettleDelivery(build, ack, encoded=(Format.SCF, raw))
    # Then the scf JSON is the one handed over, and the event is not built for it
    assert d.encoded(Format.SCF) is raw and not built
    # Then another format builds the event, once, and renders it
    ce = orjson.loads(d.encoded(Format.CLOUDEVENTS).raw)
    assert ce["data"] == orjson.loads(raw.raw) and len(built) == 1
    assert d.event is built[0] and [r["offset"] for r in d.event.records] == [0, 1, 2]
    assert (batch.first, batch.end) == (0, 3)


def test_librdkafka_lines_repeated_while_a_broker_is_down_are_logged_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the trigger's log for librdkafka, and a clock we move
    from sources.kafka import client as kafka_client

    clock = [1000.0]
    monkeypatch.setattr(kafka_client.time, "monotonic", lambda: clock[0])
    logger = logging.getLogger("trigger.rdlog-test")
    rdlog = kafka_client.RdkafkaLog(logger, "rdlog-test", every_s=60.0)
    fail = "[thrd:h:9092/bootstrap]: h:9092/bootstrap: Connect to ipv4#h:9092 failed: Connection refused (after %dms in state CONNECT)"
    caplog.set_level(logging.DEBUG, logger="trigger.rdlog-test")
    # When a broker's connect failure is logged 50 times in 49 s (its elapsed time varying),
    # with another facility's line and three debug lines among them
    for i in range(50):
        rdlog.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail % i)
        clock[0] += 1.0 if i < 49 else 0.0
    rdlog.log(logging.WARNING, "%s [%s] %s", "REQTMOUT", "rdkafka#consumer-1", "timed out")
    for _ in range(3):
        rdlog.log(logging.DEBUG, "%s [%s] %s", "FETCH", "rdkafka#consumer-1", "fetching")
    # Then the failure is logged once, the others each time, all with the trigger's name
    texts = [r.getMessage() for r in caplog.records]
    assert len([t for t in texts if t.startswith("FAIL")]) == 1
    assert len([t for t in texts if t.startswith("REQTMOUT")]) == 1
    assert len([t for t in texts if t.startswith("FETCH")]) == 3
    assert {getattr(r, "trigger", None) for r in caplog.records} == {"rdlog-test"}
    assert caplog.records[0].levelno == logging.ERROR
    # and a minute after it was logged, the next one is, saying how many were left out
    caplog.clear()
    clock[0] += 11.0
    rdlog.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail % 7)
    (record,) = caplog.records
    assert record.getMessage().endswith("(49 more like it in the last 60 s not logged)")


def test_a_real_consumer_with_no_broker_logs_its_connect_failure_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a confluent-kafka consumer whose logger is the trigger's, aimed at a port nobody
    # listens on, retrying every 100 ms
    from bridge.testing import free_port
    from sources.kafka import client as kafka_client

    caplog.set_level(logging.DEBUG, logger="trigger.rdlog-real")
    rdlog = kafka_client.RdkafkaLog(logging.getLogger("trigger.rdlog-real"), "rdlog-real")
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": f"127.0.0.1:{free_port()}",
            "group.id": "rdlog",
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 100,
            "logger": rdlog,
        }
    )
    try:
        consumer.subscribe(["t"])
        # When it polls until librdkafka has reported ten more failed attempts
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            consumer.poll(0.2)
            if sum(left_out for _, left_out in rdlog._seen.values()) >= 10:
                break
    finally:
        consumer.close()
    # Then its connect failure was logged once, the ten and more after it counted
    fails = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FAIL")]
    assert len(fails) == 1, fails
    assert sum(left_out for _, left_out in rdlog._seen.values()) >= 10


async def test_a_connect_attempt_with_no_broker_is_not_waited_for_when_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a connect attempt to a port nobody listens on, whose metadata call waits for the
    # brokers' answer (up to CALL_TIMEOUT_S: 10 s, 2 s here)
    from bridge.testing import free_port
    from sources.kafka import client as kafka_client

    monkeypatch.setattr(kafka_client, "CALL_TIMEOUT_S", 2.0)
    entered, answered, closed = threading.Event(), threading.Event(), threading.Event()

    class Probe(confluent_kafka.Consumer):  # type: ignore[misc]
        def list_topics(self, *args: Any, **kw: Any) -> Any:
            entered.set()
            try:
                return super().list_topics(*args, **kw)
            finally:
                answered.set()

        def close(self) -> None:
            super().close()
            closed.set()

    conf = {"bootstrap.servers": f"127.0.0.1:{free_port()}", "group.id": "giveup"}
    attempt = asyncio.ensure_future(
        kafka_client.Client.open(
            "giveup", conf, Probe, ["t"], (None, None, None), logging.getLogger("giveup")
        )
    )
    await until(entered.is_set, what="the metadata call")
    # When it is given up (a stop, a reload)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    # Then that returns while the metadata call still waits (a stop is not held up), and
    # the attempt closes its consumer when the call fails
    assert not answered.is_set()
    await until(closed.is_set, timeout=kafka_client.CALL_TIMEOUT_S + 10, what="the close")


async def test_a_connect_attempt_that_gets_through_after_it_was_given_up_closes_its_consumer() -> (
    None
):
    # Given a connect attempt whose brokers answer only after it was given up
    from sources.kafka import client as kafka_client

    answer, closed = threading.Event(), threading.Event()
    entered = threading.Event()

    class Late:
        def __init__(self, conf: dict[str, Any]) -> None:
            self.subscribed: list[str] = []

        def list_topics(self, timeout: float = -1) -> Any:
            entered.set()
            answer.wait()
            return type("Meta", (), {"topics": {"t": None}})()

        def subscribe(self, topics: list[str], **callbacks: Any) -> None:
            self.subscribed = topics

        def close(self) -> None:
            closed.set()

    attempt = asyncio.ensure_future(
        kafka_client.Client.open(
            "late", {}, Late, ["t"], (None, None, None), logging.getLogger("late")
        )
    )
    await until(entered.is_set, what="the metadata call")
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    assert not closed.is_set()
    # When the brokers answer: the attempt subscribes and hands its consumer to nobody
    answer.set()
    # Then that consumer is closed (it would otherwise stay a member of the group)
    await until(closed.is_set, what="the unclaimed consumer closed")
