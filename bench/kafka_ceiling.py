"""The ceiling of two designs for the Kafka trigger, against a plain consume loop.

Not a measurement of the bridge (``bench/kafka_throughput.py`` is that): a feasibility
bench for the next step named in issue 13's notes. There, the daemon's own Python work for
a batch of 1,000 records is ~1.3 us per record on the event loop plus ~0.45 on the
consumer's thread, all under one GIL, and the bridge reaches ~27 % of a plain consume loop
on a 2-core machine. Both designs below keep only what no design avoids: ``consume()``
with the bridge's librdkafka settings, each partition's records buffered and written as
the SCF CKafka JSON the bridge sends today (``sources.kafka.partition.scf_json``), and a
no-op ``python`` function (the bridge's ``PythonTarget``, concurrency = partitions)
invoked with those bytes untouched, one batch in flight per partition, in order:

- ``split``: a **child process** consumes and writes each batch of ``--batch`` records,
  with a small header, to a socket; the **parent** (the daemon's part) reads the batches
  and invokes the function; each settled batch sends the child a credit, and the child
  stops reading at 16 batches not settled;
- ``alone``: **one process** does it all: ``consume()`` on a thread, the batches written
  and the function invoked on the event loop (at most 16 batches not settled).

Neither tracks or commits an offset, retries, dead-letters or rebalances: whatever the
real design adds costs more, so each is an upper bound. One run alternates the plain loop
of ``kafka_throughput.py`` (a) with each design, and prints each pair's ratio and the CPU
per record of the processes, the function workers and the broker.

    .venv/bin/python bench/kafka_ceiling.py [--records 1000000] [--partitions 4]
        [--runs 3] [--batch 1000] [--design both|split|alone]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka_throughput import (
    NOOP,
    create_topic,
    plain_consume,
    plain_consumer,
    produce,
    start_broker,
)

from bridge.abc import Invocation, TargetContext
from bridge.events import RawEvent
from bridge.targets.python import PythonConfig, PythonTarget
from sources.kafka.partition import scf_json

HEADER = struct.Struct(">III")  # JSON length (0: the end), partition, record count
WINDOW = 16  # batches handed out and not settled, at most
Message = confluent_kafka.Message


def batches(
    buffers: dict[int, list[Message]], polled: list[Message], topic: str, size: int
) -> list[tuple[int, int, bytes]]:
    """Buffer a poll's records by partition; take each full batch, and what is left once a
    poll brought nothing (the topic is read): (partition, record count, SCF JSON)."""
    for m in polled:
        if m.error() is None:
            buffers[m.partition()].append(m)  # type: ignore[index]
    out = []
    for partition, buf in buffers.items():
        while len(buf) >= size or (buf and not polled):
            batch, buf[:] = buf[:size], buf[size:]
            data = scf_json(topic, partition, batch)
            assert data is not None  # the bench's keys and values are ASCII
            out.append((partition, len(batch), data))
    return out


class Invoker:
    """The no-op function invoked with each partition's batches in order, one in flight per
    partition; ``settled`` counts the records, ``all_settled`` is set at ``n``."""

    def __init__(self, tmp: Path, parts: int, n: int) -> None:
        code = tmp / "noop"
        code.mkdir(exist_ok=True)
        (code / "index.py").write_text(NOOP)
        config = PythonConfig.model_validate(
            {"code": str(code), "concurrency": parts, "timeout": "30s"}
        )
        ctx = TargetContext(name="noop", state_dir=tmp / "state", logger=logging.getLogger("b"))
        self.target = PythonTarget(config, ctx)
        self.n, self.settled = n, 0
        self.all_settled = asyncio.Event()
        self.queues: dict[int, asyncio.Queue[tuple[bytes, int]]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.ids = iter(range(1, 1 << 62))
        self.on_settled = lambda: None

    def put(self, partition: int, count: int, data: bytes) -> None:
        if partition not in self.queues:
            self.queues[partition] = asyncio.Queue()
            self.tasks.append(asyncio.create_task(self._in_order(self.queues[partition])))
        self.queues[partition].put_nowait((data, count))

    async def _in_order(self, queue: asyncio.Queue[tuple[bytes, int]]) -> None:
        while True:
            data, count = await queue.get()
            inv = Invocation(request_id=f"r{next(self.ids)}", function="noop", timeout_s=30.0)
            await self.target.invoke(RawEvent(data, plain=True), inv)
            self.settled += count
            self.on_settled()
            if self.settled >= self.n:
                self.all_settled.set()

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.target.close()


class Clock:
    """Records/s from the first batch handed out to the last settled, over the records
    after that first batch; the CPU of this process and of its function workers then."""

    def __init__(self, n: int) -> None:
        self.n, self.me = n, psutil.Process()
        self.start: tuple[float, int, float] | None = None
        self.workers: dict[int, float] = {}  # pid: CPU seconds at the first batch
        self.spent: dict[int, float] = {}  # pid: CPU seconds last read
        self.end = (0.0, 0.0)

    def first(self, count: int, skip: set[int]) -> None:
        if self.start is None:
            self.start = (time.perf_counter(), count, time.process_time())
            for p in self.me.children():
                if p.pid not in skip:
                    self.workers[p.pid] = self.spent[p.pid] = sum(p.cpu_times()[:2])

    def sample(self) -> None:  # the workers' CPU, read while they live
        for pid in self.workers:
            try:
                self.spent[pid] = sum(psutil.Process(pid).cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        """The last record settled (the workers still run): the clocks stop."""
        self.sample()
        self.end = (time.perf_counter(), time.process_time())

    def done(self) -> tuple[float, float, float]:
        """(records/s, this process's CPU us per record, the workers' CPU us per record)."""
        assert self.start is not None
        t0, count, cpu0 = self.start
        t1, cpu1 = self.end
        per = 1e6 / (self.n - count)
        workers = sum(self.spent[p] - self.workers[p] for p in self.workers)
        return (self.n - count) / (t1 - t0), (cpu1 - cpu0) * per, workers * per


async def sampled(clock: Clock, work: asyncio.Future[None]) -> None:
    """Run ``work`` (it ends when the last record is settled), sampling the workers' CPU."""
    while not work.done():
        clock.sample()
        await asyncio.wait([work], timeout=0.05)
    work.result()
    clock.stop()


# --- split: a consumer process, the parent invokes ------------------------------------------


def child(sock: socket.socket, bootstrap: str, topic: str, group: str, n: int, size: int) -> None:
    """Consume ``n`` records; write each partition's batches of ``size`` to ``sock``."""
    c = plain_consumer(bootstrap, topic, group)
    buffers: dict[int, list[Message]] = collections.defaultdict(list)
    unsettled = sent = 0
    while sent < n:
        while unsettled >= WINDOW:
            unsettled -= len(sock.recv(64))
        try:
            unsettled -= len(sock.recv(64, socket.MSG_DONTWAIT))
        except BlockingIOError:
            pass
        for partition, count, data in batches(buffers, c.consume(1000, 0.1), topic, size):
            sock.sendall(HEADER.pack(len(data), partition, count) + data)
            unsettled += 1
            sent += count
    sock.sendall(HEADER.pack(0, 0, 0))
    sock.recv(1)  # the parent read everything
    c.close()


async def parent(sock: socket.socket, n: int, parts: int, tmp: Path, child_pid: int) -> Clock:
    invoker, clock = Invoker(tmp, parts, n), Clock(n)
    await invoker.target.start()
    reader, writer = await asyncio.open_connection(sock=sock)
    invoker.on_settled = lambda: writer.write(b"s")  # a credit

    async def read() -> None:
        while True:
            length, partition, count = HEADER.unpack(await reader.readexactly(HEADER.size))
            if not length:
                break
            data = await reader.readexactly(length)
            clock.first(count, {child_pid})
            invoker.put(partition, count, data)
        await invoker.all_settled.wait()

    try:
        await sampled(clock, asyncio.ensure_future(read()))
        writer.write(b"e")
        await writer.drain()
    finally:
        await invoker.aclose()
        writer.close()
    return clock


def split(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int
) -> tuple[float, dict[str, float]]:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: no asyncio, no target, just the consumer
        ours.close()
        try:
            child(theirs, bootstrap, topic, group, n, size)
        finally:
            os._exit(0)
    theirs.close()
    clock = asyncio.run(parent(ours, n, parts, tmp, pid))
    _, _, usage = os.wait4(pid, 0)
    rate, cpu, workers = clock.done()
    child_cpu = (usage.ru_utime + usage.ru_stime) * 1e6 / n
    return rate, {"child": child_cpu, "parent": cpu, "workers": workers}


# --- alone: one process does it all ---------------------------------------------------------


async def alone_run(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int
) -> Clock:
    invoker, clock = Invoker(tmp, parts, n), Clock(n)
    await invoker.target.start()
    c = plain_consumer(bootstrap, topic, group)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # the consumer's thread
    window = asyncio.Semaphore(WINDOW)
    invoker.on_settled = window.release
    loop = asyncio.get_running_loop()

    async def run() -> None:
        buffers: dict[int, list[Message]] = collections.defaultdict(list)
        sent = 0
        while sent < n:
            polled = await loop.run_in_executor(pool, c.consume, 1000, 0.1)
            for partition, count, data in batches(buffers, polled, topic, size):
                await window.acquire()
                clock.first(count, set())
                invoker.put(partition, count, data)
                sent += count
        await invoker.all_settled.wait()

    try:
        await sampled(clock, asyncio.ensure_future(run()))
    finally:
        await loop.run_in_executor(pool, c.close)
        pool.shutdown()
        await invoker.aclose()
    return clock


def alone(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int
) -> tuple[float, dict[str, float]]:
    rate, cpu, workers = asyncio.run(alone_run(tmp, bootstrap, topic, group, n, parts, size)).done()
    return rate, {"process": cpu, "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--design", choices=["both", "split", "alone"], default="both")
    args = ap.parse_args()
    n, parts = args.records, args.partitions
    designs = {"split": split, "alone": alone}
    if args.design != "both":
        designs = {args.design: designs[args.design]}
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, bootstrap = start_broker(tmp / "tansu.log")
        broker = psutil.Process(proc.pid)
        try:
            topic = "bench"
            create_topic(bootstrap, topic, parts)
            produce(bootstrap, topic, 0, n, parts)
            ratios: dict[str, list[float]] = {name: [] for name in designs}
            for i in range(1, args.runs + 1):
                a, _ = plain_consume(bootstrap, topic, n, group=f"plain-{i}")
                print(f"run {i}: (a) plain loop {a:>10,.0f} records/s", flush=True)
                for name, design in designs.items():
                    before = sum(broker.cpu_times()[:2])
                    rate, cpu = design(tmp, bootstrap, topic, f"{name}-{i}", n, parts, args.batch)
                    cpu["broker"] = (sum(broker.cpu_times()[:2]) - before) * 1e6 / n
                    ratios[name].append(rate / a)
                    print(
                        f"       {name:<5} design {rate:>10,.0f} records/s = {rate / a:.0%} of (a); "
                        "CPU us per record: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                        + f" (total {sum(cpu.values()):.2f})",
                        flush=True,
                    )
            for name, rs in ratios.items():
                print(
                    f"{name}: median {statistics.median(rs):.0%} of (a) (runs: "
                    + ", ".join(f"{r:.0%}" for r in rs)
                    + ")"
                )
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
