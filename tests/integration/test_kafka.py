"""The Kafka trigger through the real daemon, a real broker (tansu) and a Python SCF function:
every record once and in order per partition, a poison record dead-lettered to a Kafka
topic while its partition goes on, kill -9 and restart, two bridges splitting a group and
handing over, a function slower than max.poll.interval.ms, a cut connection, odd records,
start positions — and the source contract suite against the same broker.

Long variants (more records, longer runs) run with ``EVENT_BRIDGE_SOAK=1``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bridge.dispatcher import BATCH_BUDGET_S
from bridge.events import Event
from bridge.testing import SourceContract
from sources.kafka import KafkaSource
from sources.kafka.partition import pipeline

from .conftest import Project, cli, wait_for
from .kafka_fixtures import SESSION_TIMEOUT_MS, Broker, TcpProxy, broker_fixture  # noqa: F401

SOAK = os.environ.get("EVENT_BRIDGE_SOAK", "") not in ("", "0")

#: appends one line per record; fails a batch holding a record whose value is "poison"
SINK = """
import json, os, time

def records(event):
    if "records" in event:                      # native
        return [dict(r, msgBody=r["value"], msgKey=r["key"]) for r in event["records"]]
    return [r["Ckafka"] for r in event["Records"]]

def main_handler(event, context):
    recs = records(event)
    for r in recs:
        if r["msgBody"] == "poison":
            raise ValueError(f"poison record at {r['topic']}/{r['partition']}@{r['offset']}")
    time.sleep(float(os.environ.get("DELAY", "0")))
    lines = "".join(
        json.dumps({"tag": os.environ.get("TAG", ""), "n": len(recs), "rid": context.request_id,
                    "record": r}) + "\\n"
        for r in recs
    )
    fd = os.open(os.environ["OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, lines.encode())  # one append: lines of concurrent workers never interleave
    finally:
        os.close(fd)
    return {"records": len(recs)}
"""


def config(
    project: Project,
    broker: Broker,
    topic: str,
    *,
    name: str = "bridge.toml",
    tag: str = "a",
    delay: float = 0.0,
    dead_letter: str = "local",
    concurrency: int = 8,
    shutdown_grace: str = "10s",
    state: str = "state",
    **trigger: Any,
) -> Path:
    project.function("sink", SINK)
    table = {
        "type": "kafka",
        "function": "sink",
        "bootstrap_servers": broker.bootstrap,
        "topic": topic,
        "start": "earliest",
        "batch_size": 50,
        "batch_window": "50ms",
        **trigger,
    }
    retry = table.pop(
        "retry", {"retry_attempts": 2, "backoff_initial": "50ms", "backoff_max": "100ms"}
    )
    options = {"session.timeout.ms": SESSION_TIMEOUT_MS, **table.pop("options", {})}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    return project.config(
        f"""
        [daemon]
        state_dir = "{state}"
        shutdown_grace = "{shutdown_grace}"

        [functions.sink]
        code = "functions/sink"
        concurrency = {concurrency}
        timeout = "30s"
        environment = {{ OUT = "@OUT@", TAG = "{tag}", DELAY = "{delay}" }}
        [functions.sink.async]
        dead_letter = "{dead_letter}"

        [triggers.orders]
"""
        + lines
        + "\n[triggers.orders.options]\n"
        + "\n".join(f'"{k}" = "{v}"' for k, v in options.items())
        + "\n[triggers.orders.retry]\n"
        + "\n".join(f"{k} = {json.dumps(v)}" for k, v in retry.items())
        + "\n",
        name=name,
    )


def seen(project: Project) -> list[dict[str, Any]]:
    """Every record line the function wrote, in the order written. A line still being
    written, or torn by a worker killed with its daemon (kill -9), is skipped: its batch
    was never acked, so it comes again."""
    if not project.out.exists():
        return []
    out = []
    for line in project.out.read_text().split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def by_partition(lines: list[dict[str, Any]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for line in lines:
        out[line["record"]["partition"]].append(line["record"]["offset"])
    return out


def distinct(lines: list[dict[str, Any]]) -> set[tuple[int, int]]:
    return {(ln["record"]["partition"], ln["record"]["offset"]) for ln in lines}


def wait_records(project: Project, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: len(distinct(lines := seen(project))) >= n and lines,
        timeout,
        f"{n} distinct records handled",
    )


def assert_in_order_per_run(offsets: list[int]) -> None:
    """Offsets of one partition as handled: increasing, except where a redelivery after a
    crash or a rebalance starts again from an earlier committed offset (then increasing
    again, without a gap)."""
    for prev, cur in itertools.pairwise(offsets):
        assert cur == prev + 1 or cur <= prev, f"gap: offset {cur} after {prev} in {offsets}"


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def produce_spread(broker: Broker, topic: str, n: int, partitions: int, start: int = 0) -> None:
    broker.produce(
        topic,
        (
            {"value": f"r{i}".encode(), "key": f"k{i}".encode(), "partition": i % partitions}
            for i in range(start, start + n)
        ),
    )


# --- clean run ----------------------------------------------------------------------------------


def test_clean_run_delivers_every_record_once_in_order(
    project: Project, broker: Broker, daemon: Any
) -> None:
    n, parts = (20_000 if SOAK else 2000), 4
    topic = broker.create_topic(unique_topic("clean"), parts)
    produce_spread(broker, topic, n, parts)
    cfg = config(project, broker, topic, batch_size=50)
    # When the bridge drains the topic
    d = daemon(cfg)
    lines = wait_records(project, n)
    # Then every record came exactly once, in offset order within its partition
    assert len(lines) == n, f"{len(lines) - n} duplicates in a clean run"
    for p, offsets in by_partition(lines).items():
        assert offsets == sorted(offsets) == list(range(len(offsets))), f"partition {p}"
    assert {ln["record"]["msgBody"] for ln in lines} == {f"r{i}" for i in range(n)}
    assert max(ln["n"] for ln in lines) == 50  # batches fill up to batch_size
    # And a SIGTERM drains and commits everything that was handled
    assert d.stop() == 0, d.log()
    committed = broker.committed("event-bridge-orders", topic, parts)
    assert committed == {p: len(o) for p, o in by_partition(lines).items()}


# --- poison records -----------------------------------------------------------------------------


def test_a_poison_record_is_dead_lettered_to_kafka_and_its_partition_goes_on(
    project: Project, broker: Broker, daemon: Any
) -> None:
    topic = broker.create_topic(unique_topic("poison"), 2)
    dlq = broker.create_topic(unique_topic("dlq"), 1)
    # Given partition 0 holds a poison record in the middle, partition 1 none
    records = [{"value": f"p0-{i}".encode(), "partition": 0} for i in range(100)]
    records[40] = {"value": b"poison", "partition": 0}
    records += [{"value": f"p1-{i}".encode(), "partition": 1} for i in range(100)]
    broker.produce(topic, records)
    cfg = config(
        project,
        broker,
        topic,
        batch_size=10,
        dead_letter=f"kafka://{dlq}?bootstrap_servers={broker.bootstrap}",
    )
    d = daemon(cfg)
    # Then the poison batch is dead-lettered after its retries, with its source in headers
    (msg,) = broker.read_all(dlq, 1, timeout=60)
    headers = {k: v.decode() for k, v in msg.headers()}
    assert headers["ErrorClass"] == "function_error"
    assert headers["SourceTopic"] == topic and headers["SourcePartition"] == "0"
    first, last = int(headers["SourceOffset"]), int(headers["SourceLastOffset"])
    assert first <= 40 <= last
    rec = json.loads(msg.value())
    assert rec["Body"]["RequestSource"] == "TRIGGER_CKAFKA"
    assert rec["Body"]["InvocationType"] == "RequestResponse"
    assert rec["Attempts"] == 3 and "poison record" in rec["ErrorMessage"]
    ctx = json.loads(rec["Body"]["ClientContext"])
    assert [r["Ckafka"]["offset"] for r in ctx["Records"]] == list(range(first, last + 1))
    # And everything else was handled: partition 0 went on after the poison batch
    expected = {(0, o) for o in range(100) if not first <= o <= last} | {(1, o) for o in range(100)}
    lines = wait_records(project, len(expected))
    assert distinct(lines) == expected
    assert len(lines) == len(expected)
    assert d.stop() == 0
    assert broker.committed("event-bridge-orders", topic, 2) == {0: 100, 1: 100}


# --- crashes ------------------------------------------------------------------------------------


def test_kill_9_mid_stream_then_restart_loses_nothing(
    project: Project, broker: Broker, daemon: Any
) -> None:
    n, parts, batch = (20_000 if SOAK else 3000), 4, 20
    topic = broker.create_topic(unique_topic("kill"), parts)
    produce_spread(broker, topic, n, parts)
    cfg = config(project, broker, topic, batch_size=batch, delay=0.02)
    # Given a bridge a third of the way through
    d = daemon(cfg)
    wait_records(project, n // 3)
    # When it is killed -9 and started again
    d.kill()
    before = len(seen(project))
    d2 = daemon(cfg)
    lines = wait_records(project, n)
    assert d2.stop() == 0
    # Then nothing is lost, order holds per partition (a redelivery restarts from the
    # last commit), and the duplicates are what was in flight or settled in the last
    # commit interval
    assert distinct(lines) == {(i % parts, i // parts) for i in range(n)}
    for offsets in by_partition(lines).values():
        assert_in_order_per_run(offsets)
    dupes = len(lines) - n
    # what was in flight (one batch per partition), and what settled since the last write
    # of the settled positions to the state store (every 10 ms; a batch takes >= 20 ms)
    bound = 2 * parts * batch
    print(f"kill -9: {dupes} duplicates, bound {bound}")
    assert dupes <= bound, f"{dupes} duplicates (bound {bound}); {before} lines before the kill"


@pytest.mark.parametrize(
    ("batch", "records", "delay"),
    [(100, 9000, 0.01), (400, 24_000, 0.2)],  # each run ~3 s, killed a third of the way
    ids=["batches-of-100", "batches-of-400-slow"],
)
def test_kill_9_redelivers_about_what_was_in_flight(
    project: Project, broker: Broker, daemon: Any, batch: int, records: int, delay: float
) -> None:
    # Given the setup a new user tried: 3 partitions, batches of 100, concurrency 3 (ten of
    # which a partition hands out together: they share a round trip); and batches of 400
    # of a function too slow for two to share one (0.2 s each), which a partition hands out
    # one at a time (without PIPELINE_MIN_BATCHES: SourceContext.batches() says no)
    together = BATCH_BUDGET_S / delay >= 2
    n, parts = (max(25_000, records) if SOAK else records), 3
    topic = broker.create_topic(unique_topic("inflight"), parts)
    produce_spread(broker, topic, n, parts)
    cfg = config(project, broker, topic, batch_size=batch, concurrency=3, delay=delay)
    d = daemon(cfg)
    wait_records(project, n // 3)
    # When the daemon is killed -9 mid-stream and started again
    d.kill()
    d2 = daemon(cfg)
    lines = wait_records(project, n, timeout=120)
    assert d2.stop() == 0
    # Then nothing is lost, and at most the batches in flight ran twice (consecutive ones of
    # a partition, up to ``pipeline(batch, together)`` of them: ten of 100, one of 400), and
    # one more per partition settled since the last write of the positions (every 10 ms; a
    # batch takes >= 10 ms)
    assert distinct(lines) == {(i % parts, i // parts) for i in range(n)}
    dupes = len(lines) - n
    bound = parts * (pipeline(batch, together) + 1) * batch
    print(f"kill -9 with {parts} partitions, batches of {batch}: {dupes} duplicates")
    assert dupes <= bound, f"{dupes} duplicates (bound {bound}: {parts * batch} in flight)"


# --- two bridges in one group ------------------------------------------------------------------


def test_two_bridges_split_partitions_and_hand_over_without_loss(
    project: Project, broker: Broker, daemon: Any
) -> None:
    n, parts, batch = (8000 if SOAK else 3000), 4, 5
    topic = broker.create_topic(unique_topic("pair"), parts)
    produce_spread(broker, topic, n, parts)
    # two replicas: each its own state directory (one daemon per state), one consumer group
    cfg_a = config(
        project, broker, topic, name="a.toml", tag="a", batch_size=batch, delay=0.05, state="a"
    )
    cfg_b = config(
        project, broker, topic, name="b.toml", tag="b", batch_size=batch, delay=0.05, state="b"
    )
    # Given bridge A consuming alone, then bridge B joining the same group
    a = daemon(cfg_a)
    wait_for(lambda: any(ln["tag"] == "a" for ln in seen(project)), 30, "A handling records")
    b = daemon(cfg_b)

    # Then they split the partitions: after B's first record, each handles its own
    def split() -> tuple[set[int], set[int]] | None:
        lines = seen(project)
        first_b = next((i for i, ln in enumerate(lines) if ln["tag"] == "b"), None)
        if first_b is None or len(lines) - first_b < 60:
            return None
        after = lines[first_b:]
        a = {ln["record"]["partition"] for ln in after if ln["tag"] == "a"}
        b = {ln["record"]["partition"] for ln in after if ln["tag"] == "b"}
        # until every partition was handled since (one handed over may wait for the
        # batch its old owner was running, longer on a loaded machine)
        return (a, b) if a and a | b == set(range(parts)) else None

    a_parts, b_parts = wait_for(split, 40, "A and B both handling records")
    assert not a_parts & b_parts and a_parts | b_parts == set(range(parts)), (a_parts, b_parts)
    # When A stops, B takes its partitions over and finishes the topic
    assert a.stop() == 0, a.log()
    stopped_at = len(seen(project))
    lines = wait_records(project, n, timeout=90)
    assert b.stop() == 0
    assert distinct(lines) == {(i % parts, i // parts) for i in range(n)}
    for offsets in by_partition(lines).values():
        assert_in_order_per_run(offsets)
    after = [ln for ln in lines[stopped_at:] if ln["tag"] == "b"]
    assert {ln["record"]["partition"] for ln in after} >= a_parts
    # A drained and committed on revoke and at shutdown: at most what was in flight twice
    dupes = len(lines) - n
    print(f"two bridges: {dupes} duplicates across two handovers")
    assert dupes <= 2 * parts * batch, f"{dupes} duplicates across two handovers"


# --- a slow function -----------------------------------------------------------------------------


def test_a_function_slower_than_max_poll_interval_keeps_the_group(
    project: Project, broker: Broker, daemon: Any
) -> None:
    topic = broker.create_topic(unique_topic("slow"), 1)
    broker.produce(topic, ({"value": f"s{i}".encode()} for i in range(2)))
    # Given invocations that take longer than max.poll.interval.ms
    cfg = config(
        project,
        broker,
        topic,
        batch_size=1,
        delay=4.0,
        options={
            "session.timeout.ms": "3000",
            "heartbeat.interval.ms": "500",
            "max.poll.interval.ms": "3000",
        },
    )
    d = daemon(cfg)
    lines = wait_records(project, 2, timeout=40)
    # Then the consumer kept polling: it never left the group, nothing came twice
    log = d.log()
    assert d.stop() == 0
    assert "maximum poll interval" not in log
    assert "revoked" not in log and "lost" not in log.split("assigned", 1)[1]
    assert [ln["record"]["msgBody"] for ln in lines] == ["s0", "s1"]


# --- a cut connection ---------------------------------------------------------------------------


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Broker, TcpProxy]]:
    """A broker that advertises a proxy's port, so every client connection goes through it."""
    from .kafka_fixtures import free_port

    port = free_port()
    b = Broker(tmp_path / "tansu-proxied.log", advertised_port=port)
    proxy = TcpProxy(b.port, port=port)
    try:
        b.wait_ready()
        yield b, proxy
    finally:
        proxy.close()
        b.stop()


def test_a_cut_connection_is_survived_without_loss(
    project: Project, proxied: tuple[Broker, TcpProxy], daemon: Any
) -> None:
    broker, proxy = proxied
    parts, first, second = 2, 600, 400
    topic = broker.create_topic(unique_topic("cut"), parts)
    produce_spread(broker, topic, first, parts)
    cfg = config(project, broker, topic, batch_size=10, delay=0.05)
    cfg.write_text(cfg.read_text().replace(broker.bootstrap, f"127.0.0.1:{proxy.port}"))
    d = daemon(cfg)
    wait_records(project, 100)
    # When every connection is cut for longer than the session timeout, then restored
    proxy.cut()
    time.sleep(8)  # the outage itself: longer than session.timeout.ms (6 s)
    proxy.restore()
    produce_spread(broker, topic, second, parts, start=first)
    # Then every record is handled, in order per partition, none lost
    lines = wait_records(project, first + second, timeout=90)
    assert d.stop() == 0, d.log()
    assert distinct(lines) == {(i % parts, i // parts) for i in range(first + second)}
    for offsets in by_partition(lines).values():
        assert_in_order_per_run(offsets)
    # What was settled while the session was lost is not delivered again when the
    # partitions come back: at most what was in flight
    dupes = len(lines) - (first + second)
    print(f"cut connection: {dupes} duplicates")
    assert dupes <= 2 * parts * 10


# --- odd records --------------------------------------------------------------------------------


def test_binary_null_huge_and_headers_records(
    project: Project, broker: Broker, daemon: Any
) -> None:
    topic = broker.create_topic(unique_topic("odd"), 1)
    records = [
        {"key": b"\x00\x01\xff", "value": b"\xff\xfe binary"},  # 0: not UTF-8
        {"key": None, "value": None},  # 1: a tombstone
        {"value": b"", "headers": [("bin", b"\xff\x00"), ("txt", b"hi"), ("none", None)]},
        {"value": '{"json": "with \\"quotes\\" and ünïcode"}'.encode()},  # 3
        {"value": b"x" * 100_000},  # 4: bigger than max_batch_bytes: alone
        {"value": b"y" * 7_000_000},  # 5: bigger than the 6 MB sync limit: dead-lettered
        {"value": b"after"},  # 6: the partition goes on
    ]
    broker.produce(topic, records, one_by_one=True, **{"message.max.bytes": 20_000_000})
    cfg = config(project, broker, topic, batch_size=10, max_batch_bytes="64KB")
    text = cfg.read_text()
    native = (
        text.split("[triggers.orders]")[1]
        .replace('"event-bridge-orders"', '"native-group"')
        .replace("[triggers.orders.", "[triggers.raw.")
    )
    cfg.write_text(text + '\n[triggers.raw]\nformat = "native"\ngroup_id = "native-group"' + native)
    d = daemon(cfg)
    lines = wait_for(
        lambda: len(x := seen(project)) >= 12 and x, 60, "6 records through each trigger"
    )
    scf = {
        ln["record"]["offset"]: ln
        for ln in lines
        if "msgKey" in ln["record"] and "headers" not in ln["record"]
    }
    raw = {ln["record"]["offset"]: ln for ln in lines if "headers" in ln["record"]}
    assert sorted(scf) == sorted(raw) == [0, 1, 2, 3, 4, 6]
    # SCF format: binary as base64 with a flag, nulls as "", big records alone
    r0 = scf[0]["record"]
    assert base64.b64decode(r0["msgBody"]) == b"\xff\xfe binary" and r0["msgBodyBase64"]
    assert base64.b64decode(r0["msgKey"]) == b"\x00\x01\xff" and r0["msgKeyBase64"]
    assert (scf[1]["record"]["msgKey"], scf[1]["record"]["msgBody"]) == ("", "")
    assert scf[3]["record"]["msgBody"] == '{"json": "with \\"quotes\\" and ünïcode"}'
    assert scf[4]["n"] == 1 and len(scf[4]["record"]["msgBody"]) == 100_000
    # native format: nulls kept, timestamps and headers
    assert raw[1]["record"]["key"] is None and raw[1]["record"]["value"] is None
    assert raw[2]["record"]["headers"] == [
        {"key": "bin", "value": base64.b64encode(b"\xff\x00").decode(), "value_base64": True},
        {"key": "txt", "value": "hi"},
        {"key": "none", "value": None},
    ]
    assert raw[0]["record"]["timestamp_type"] == "create_time"
    assert abs(raw[0]["record"]["timestamp"] / 1000 - time.time()) < 120
    # The 7 MB record is dead-lettered at once (invalid request) by both triggers
    r = cli("dlq", "list", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    dls = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(dl["Body"]["TriggerName"] for dl in dls) == ["orders", "raw"]
    assert {dl["ErrorClass"] for dl in dls} == {"invalid_request"}
    for dl in dls:
        (rec,) = json.loads(dl["Body"]["ClientContext"]).get("records") or [
            r["Ckafka"] for r in json.loads(dl["Body"]["ClientContext"])["Records"]
        ]
        assert rec["offset"] == 5
    assert d.stop() == 0


# --- where a new group starts ---------------------------------------------------------------------


def test_start_latest_and_start_at_a_time(project: Project, broker: Broker, daemon: Any) -> None:
    old, new = (
        broker.create_topic(unique_topic("latest"), 1),
        broker.create_topic(unique_topic("since"), 1),
    )
    hour_ago = int((time.time() - 3600) * 1000)
    # Given records from before the bridge starts: some an hour old, some recent
    broker.produce(old, ({"value": f"before-{i}".encode()} for i in range(5)), one_by_one=True)
    broker.produce(
        new,
        [{"value": f"old-{i}".encode(), "timestamp": hour_ago + i} for i in range(5)]
        + [{"value": f"recent-{i}".encode()} for i in range(5)],
    )
    since = (datetime.now(UTC) - timedelta(minutes=30)).isoformat()
    cfg = config(project, broker, old, start="latest")
    text = cfg.read_text()
    second = (
        text.split("[triggers.orders]")[1]
        .replace(old, new)
        .replace('start = "latest"', f'start = "{since}"')
        .replace("[triggers.orders.", "[triggers.since.")
    )
    cfg.write_text(text + "\n[triggers.since]" + second)
    d = daemon(cfg)
    d.wait_log(rf"assigned {old}/0", timeout=30)
    # "latest" is resolved a moment after the assignment: probe until a record gets through
    # (one record per produce: tansu answers "latest" with the last batch's first offset + 1)
    probes = 0

    def probed() -> bool:
        nonlocal probes
        if any(ln["record"]["msgBody"].startswith("probe") for ln in seen(project)):
            return True
        broker.produce(old, [{"value": f"probe-{probes}".encode()}], one_by_one=True)
        probes += 1
        time.sleep(0.2)  # pace the probes; the condition is what ends the wait
        return False

    wait_for(probed, 30, "a probe record through the latest-start trigger")
    broker.produce(old, ({"value": f"after-{i}".encode()} for i in range(3)))
    # Then "latest" sees only what came after it joined; a time skips what is older
    want = {f"after-{i}" for i in range(3)} | {f"recent-{i}" for i in range(5)}

    def got() -> list[dict[str, Any]]:
        lines = [ln for ln in seen(project) if not ln["record"]["msgBody"].startswith("probe")]
        return lines if {ln["record"]["msgBody"] for ln in lines} >= want else []

    lines = wait_for(got, 30, "records after the start positions")
    assert {ln["record"]["msgBody"] for ln in lines} == want
    assert d.stop() == 0


# --- the source contract suite, against the real broker -----------------------------------------


class TestKafkaContract(SourceContract):
    """bridge.testing's checks, on a fresh 3-partition topic per check. Payloads go to the
    partitions round robin, so up to three deliveries can be unsettled at once."""

    source_class = KafkaSource
    entry_point = "kafka"
    has_positions = True
    check_timeout_s = 60.0
    redelivery_timeout_s = 15.0
    close_timeout_s = 10.0
    partitions = 3

    @pytest.fixture(autouse=True)
    def _broker(self, broker: Broker) -> None:
        self.broker = broker

    async def setup_upstream(self) -> None:
        self.topic = self.broker.create_topic(f"contract-{self.tag}", self.partitions)
        self.sent = 0

    def config_data(self) -> dict[str, Any]:
        return {
            **super().config_data(),
            "bootstrap_servers": self.broker.bootstrap,
            "topic": self.topic,
            "group_id": f"contract-{self.tag}",
            "start": "earliest",
            "batch_window": "10ms",
            "drain_timeout": "0s",
            "options": {"session.timeout.ms": SESSION_TIMEOUT_MS},
        }

    async def publish(self, payloads: Sequence[str]) -> None:
        records = []
        for p in payloads:
            records.append({"value": p.encode(), "partition": self.sent % self.partitions})
            self.sent += 1
        self.broker.produce(self.topic, records)

    def payloads_of(self, event: Event) -> list[str]:
        return [str(r["value"]) for r in event.records]


# --- no over-commit against the real broker -----------------------------------------------------

HOLD = SINK.replace(
    '    time.sleep(float(os.environ.get("DELAY", "0")))',
    '    while any(r["msgBody"] == "hold" for r in recs) and not os.path.exists(\n'
    '        os.environ["OUT"] + ".release"\n'
    "    ):\n"
    "        time.sleep(0.05)",
)


def test_a_batch_still_running_is_never_committed_while_other_partitions_go_on(
    project: Project, broker: Broker, daemon: Any
) -> None:
    # Given partition 0's first batch held open by the function (record 5 is "hold"),
    # while partitions 1 and 2 are handled and committed to the end
    assert HOLD != SINK
    n, parts = 300, 3
    topic = broker.create_topic(unique_topic("held"), parts)
    broker.produce(
        topic,
        (
            {"value": b"hold" if i == 15 else f"r{i}".encode(), "partition": i % parts}
            for i in range(n)
        ),
    )
    retry = {"retry_attempts": 1000, "backoff_initial": "50ms", "backoff_max": "100ms"}
    cfg = config(project, broker, topic, batch_size=10, concurrency=parts, retry=retry)
    project.function("sink", HOLD)
    d = daemon(cfg)
    group = "event-bridge-orders"

    def others_committed() -> bool:
        c = broker.committed(group, topic, parts)
        return c.get(1) == c.get(2) == n // parts

    wait_for(others_committed, 60, "partitions 1 and 2 committed to the end")
    # Then partition 0 is committed at most up to the held record (offset 5): a tracker
    # that over-commits a batch in flight fails here
    held = broker.committed(group, topic, parts)[0]
    assert held <= 5, f"partition 0 committed up to {held} while offsets 0..9 ran"
    # And after a kill -9 and a restart the held records are all handled: none was lost
    d.kill()
    (project.out.parent / (project.out.name + ".release")).touch()
    d2 = daemon(cfg)
    lines = wait_records(project, n)
    assert d2.stop() == 0
    assert distinct(lines) == {(i % parts, i // parts) for i in range(n)}


#: fails the first attempt at a record whose value is "flaky" (after writing its line)
FLAKY = SINK.replace(
    '    time.sleep(float(os.environ.get("DELAY", "0")))',
    '    once = os.environ["OUT"] + ".failed"\n'
    '    if any(r["msgBody"] == "flaky" for r in recs) and not os.path.exists(once):\n'
    '        open(once, "w").close()\n'
    '        lines = "".join(json.dumps({"record": r, "failed": True}) + "\\n" for r in recs)\n'
    '        with open(os.environ["OUT"], "a") as f:\n'
    "            f.write(lines)\n"
    '        raise ValueError("flaky fails once")',
)


def test_batches_of_one_go_in_order_and_a_failure_is_retried_before_the_next(
    project: Project, broker: Broker, daemon: Any
) -> None:
    # Given a backlog in two partitions, batch_size = 1 (consecutive records of a partition
    # go to the worker several in one round trip), and record 150 of partition 0 failing once
    assert FLAKY != SINK
    n, parts = 200, 2
    topic = broker.create_topic(unique_topic("pipelined"), parts)
    broker.produce(
        topic,
        (
            {"value": b"flaky" if (p, i) == (0, 150) else f"r{i}".encode(), "partition": p}
            for i in range(n)
            for p in range(parts)
        ),
    )
    cfg = config(project, broker, topic, batch_size=1, batch_window="0s", concurrency=parts)
    project.function("sink", FLAKY)
    d = daemon(cfg)
    lines = wait_records(project, n * parts)
    assert d.stop() == 0, d.log()
    # Then each partition's records ran in offset order; the failed one was retried right
    # after its failure, before any record after it ran
    offsets = by_partition(lines)
    assert offsets[0] == [*range(151), *range(150, n)]
    assert offsets[1] == list(range(n))
    assert [ln["record"]["offset"] for ln in lines if ln.get("failed")] == [150]
    # And everything was committed
    assert broker.committed("event-bridge-orders", topic, parts) == {0: n, 1: n}
