"""The ceiling of one design for the Kafka trigger: its consumer in a process of its own.

Not a measurement of the bridge (``bench/kafka_throughput.py`` is that): a feasibility
bench for the next step named in issue 13's notes. There, the daemon's own Python work for
a batch of 1,000 records is ~1.3 us per record on the event loop plus ~0.45 on the
consumer's thread, all under one GIL, and the bridge reaches ~27 % of a plain consume loop
on a 2-core machine. The design moves every per-record step out of the daemon:

- a **child process** consumes (the bridge's librdkafka settings), buffers each partition's
  records, and writes each batch of ``--batch`` records as the SCF CKafka JSON the bridge
  sends today (``sources.kafka.partition.scf_json``), with a small header, to a socket;
- the **parent** (the daemon's part) reads the batches and invokes a no-op ``python``
  function (the bridge's ``PythonTarget``, concurrency = partitions) with each batch's
  bytes untouched, one batch in flight per partition, in order; each settled batch sends
  the child a credit, and the child stops reading at 16 batches not settled.

No offsets are tracked or committed, there is no retry, no dead letter and no rebalance:
whatever the real design adds costs more, so this is an upper bound. One run alternates
the plain loop of ``kafka_throughput.py`` (a) with this design (s), and prints each pair's
ratio and the CPU per record of the child, the parent (its loop), the function workers and
the broker.

    .venv/bin/python bench/kafka_split_ceiling.py [--records 1000000] [--partitions 4]
        [--runs 3] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import confluent_kafka
import psutil
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka_throughput import NOOP, SESSION, plain_consume, produce, start_broker

from bridge.abc import Invocation, TargetContext
from bridge.events import RawEvent
from bridge.targets.python import PythonConfig, PythonTarget
from sources.kafka.config import DEFAULT_OPTIONS
from sources.kafka.partition import scf_json

HEADER = struct.Struct(">III")  # JSON length (0: the end), partition, record count
WINDOW = 16  # batches the child hands out before one is settled


def child(sock: socket.socket, bootstrap: str, topic: str, group: str, n: int, size: int) -> None:
    """Consume ``n`` records; write each partition's batches of ``size`` to ``sock``."""
    consumer = confluent_kafka.Consumer(
        {
            **DEFAULT_OPTIONS,
            **SESSION,
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    buffers: dict[int, list[confluent_kafka.Message]] = collections.defaultdict(list)
    unsettled = sent = 0
    while sent < n:
        while unsettled >= WINDOW:
            unsettled -= len(sock.recv(64))
        try:
            unsettled -= len(sock.recv(64, socket.MSG_DONTWAIT))
        except BlockingIOError:
            pass
        polled = consumer.consume(1000, 0.1)
        for m in polled:
            if m.error() is None:
                buffers[m.partition()].append(m)  # type: ignore[index]
        for partition, buf in buffers.items():
            # full batches; what is left once the topic is read (a poll brought nothing)
            while len(buf) >= size or (buf and not polled):
                batch, buf[:] = buf[:size], buf[size:]
                data = scf_json(topic, partition, batch)
                assert data is not None  # the bench's keys and values are ASCII
                sock.sendall(HEADER.pack(len(data), partition, len(batch)) + data)
                unsettled += 1
                sent += len(batch)
    sock.sendall(HEADER.pack(0, 0, 0))
    sock.recv(1)  # the parent read everything
    consumer.close()


async def parent(sock: socket.socket, n: int, parts: int, tmp: Path) -> float:
    """Invoke the no-op function with each batch the child writes; records/s from the first
    batch read to the last settled (over the records after the first batch)."""
    code = tmp / "noop"
    code.mkdir(exist_ok=True)
    (code / "index.py").write_text(NOOP)
    config = PythonConfig.model_validate(
        {"code": str(code), "concurrency": parts, "timeout": "30s"}
    )
    target = PythonTarget(
        config,
        TargetContext(name="noop", state_dir=tmp / "state", logger=logging.getLogger("bench")),
    )
    await target.start()
    reader, writer = await asyncio.open_connection(sock=sock)
    settled = 0
    all_settled = asyncio.Event()
    ids = iter(range(1, 1 << 62))

    async def in_order(queue: asyncio.Queue[tuple[bytes, int]]) -> None:
        nonlocal settled
        while True:
            data, count = await queue.get()
            inv = Invocation(request_id=f"r{next(ids)}", function="noop", timeout_s=30.0)
            await target.invoke(RawEvent(data, plain=True), inv)
            settled += count
            writer.write(b"s")  # a credit
            if settled >= n:
                all_settled.set()

    queues: dict[int, asyncio.Queue[tuple[bytes, int]]] = {}
    tasks: list[asyncio.Task[None]] = []
    start: tuple[float, int] | None = None
    try:
        while True:
            length, partition, count = HEADER.unpack(await reader.readexactly(HEADER.size))
            if not length:
                break
            data = await reader.readexactly(length)
            if start is None:
                start = (time.perf_counter(), count)
            if partition not in queues:
                queues[partition] = asyncio.Queue()
                tasks.append(asyncio.create_task(in_order(queues[partition])))
            queues[partition].put_nowait((data, count))
        await all_settled.wait()
        end = time.perf_counter()
        writer.write(b"e")
        await writer.drain()
    finally:
        for task in tasks:
            task.cancel()
        await target.close()
        writer.close()
    assert start is not None
    return (n - start[1]) / (end - start[0])


def split_run(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int,
    broker: psutil.Process,
) -> tuple[float, dict[str, float]]:  # fmt: skip
    """One run of the design: (records/s, CPU us per record by part)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: no asyncio, no target, just the consumer
        ours.close()
        try:
            child(theirs, bootstrap, topic, group, n, size)
        finally:
            os._exit(0)
    theirs.close()
    me = psutil.Process()
    cpu0, broker0 = time.process_time(), sum(broker.cpu_times()[:2])
    before = {p.pid for p in me.children()}  # what earlier runs left unreaped
    workers: dict[int, float] = {}

    async def run() -> float:
        async def sample() -> None:  # the workers' CPU, read while they live
            while True:
                for p in me.children():
                    if p.pid != pid and p.pid not in before:
                        try:
                            workers[p.pid] = sum(p.cpu_times()[:2])
                        except psutil.NoSuchProcess:
                            pass
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            return await parent(ours, n, parts, tmp)
        finally:
            sampler.cancel()

    rate = asyncio.run(run())
    _, _, usage = os.wait4(pid, 0)
    per = 1e6 / n
    return rate, {
        "child": (usage.ru_utime + usage.ru_stime) * per,
        "parent": (time.process_time() - cpu0) * per,
        "workers": sum(workers.values()) * per,
        "broker": (sum(broker.cpu_times()[:2]) - broker0) * per,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()
    n, parts = args.records, args.partitions
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, bootstrap = start_broker(tmp / "tansu.log")
        try:
            topic = "bench"
            admin = AdminClient({"bootstrap.servers": bootstrap})
            admin.create_topics([NewTopic(topic, num_partitions=parts, replication_factor=1)])[
                topic
            ].result(10)
            produce(bootstrap, topic, 0, n, parts)
            ratios = []
            for i in range(1, args.runs + 1):
                a, _ = plain_consume(bootstrap, topic, n, group=f"plain-{i}")
                s, cpu = split_run(
                    tmp, bootstrap, topic, f"split-{i}", n, parts, args.batch,
                    psutil.Process(proc.pid),
                )  # fmt: skip
                ratios.append(s / a)
                print(
                    f"run {i}: (a) plain loop {a:>10,.0f} records/s   (s) split design "
                    f"{s:>9,.0f} records/s = {s / a:.0%} of (a); CPU us per record: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()),
                    flush=True,
                )
            print(
                f"(s)/(a) median {statistics.median(ratios):.0%} (runs: "
                + ", ".join(f"{r:.0%}" for r in ratios)
                + ")"
            )
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
