"""The ceiling of two designs for the Kafka trigger, against a plain consume loop.

Not a measurement of the bridge (``bench/kafka_throughput.py`` is that): a feasibility
bench for the next step named in issue 13's notes. There, the daemon's own Python work for
a batch of 1,000 records is 1.2 to 1.3 us per record on the event loop plus ~0.45 on the
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
  and the function invoked on the event loop (at most 16 batches not settled). The loop
  waits for each ``consume()`` before the next one starts, so consuming and writing do
  not overlap: the bound of this structure, not of every one-process design.

``--by-column``: both designs send each batch *by column* instead of its JSON, as the bridge
does for the ``python`` runtime since issue 13's fifth session (``scf_event``: the keys in
one join, the values in one join, the offsets as the first one; the worker builds the event
from them): in *split*, the child writes the columns and the parent hands them on untouched.
That is the ceiling of the step docs/kafka.md names next (a consumer process writing each
batch's columns for a daemon that never touches a record).

Neither tracks or commits an offset, retries, dead-letters or rebalances: whatever the
real design adds costs more, so each is an upper bound. One run alternates the plain loop
of ``kafka_throughput.py`` (a) with each design, and prints each pair's ratio and the CPU
per record of the processes, the function workers (all ``--partitions`` of them are
started before the clock starts) and the broker, all from the first batch handed out to
the last one settled; for (a), its own CPU and the broker's per record (from its first
batch).

    .venv/bin/python bench/kafka_ceiling.py [--records 1000000] [--partitions 4]
        [--runs 3] [--batch 1000] [--design both|split|alone] [--by-column]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable
from pathlib import Path

import confluent_kafka
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka_throughput import (
    NOOP,
    broker_with_topic,
    cpu_s,
    plain_consume,
    plain_consumer,
)

from bridge.abc import Invocation, TargetContext
from bridge.events import RawEvent
from bridge.targets.python import PythonConfig, PythonTarget
from sources.kafka.partition import _keys_values, scf_event, scf_json

HEADER = struct.Struct(">IIII")  # bytes (0: the end), partition, record count, JSON size
WINDOW = 16  # batches handed out and not settled, at most (a poll's batches may pass it)
Message = confluent_kafka.Message


BY_COLUMN = False  # --by-column: batches by column, not JSON (set before the child forks)


def batches(
    buffers: dict[int, list[Message]], polled: list[Message], topic: str, size: int, last: bool
) -> list[tuple[int, int, bytes, int]]:
    """Buffer a poll's records by partition; take each full batch, and once ``last`` (all
    records received) what is left: (partition, record count, SCF JSON or, ``BY_COLUMN``,
    its columns, the JSON's size)."""
    for m in polled:
        if m.error() is not None:
            raise SystemExit(f"consumer: {m.error()}")
        buffers[m.partition()].append(m)  # type: ignore[index]
    out = []
    for partition, buf in buffers.items():
        while len(buf) >= size or (buf and last):
            batch, buf[:] = buf[:size], buf[size:]
            if BY_COLUMN and len(batch) > 1:
                keys, values = _keys_values(batch)
                event = scf_event(topic, partition, batch, keys, values)
                assert event is not None and event.columns is not None  # ASCII, no escapes
                out.append((partition, len(batch), event.columns, event.size))
                continue
            data = scf_json(topic, partition, batch)
            assert data is not None  # the bench's keys and values are ASCII
            out.append((partition, len(batch), data, len(data)))
    return out


def _not_written() -> bytes:
    raise AssertionError("the ceiling never writes a batch's JSON")


class Invoker:
    """The no-op function invoked with each partition's batches in order, one in flight per
    partition; ``settled`` counts the records, ``all_settled`` is set at ``n``. An
    invocation that fails ends its task with the error (see :func:`measured`)."""

    def __init__(self, tmp: Path, parts: int, n: int) -> None:
        code = tmp / "noop"
        code.mkdir(exist_ok=True)
        (code / "index.py").write_text(NOOP)
        config = PythonConfig.model_validate(
            {"code": str(code), "concurrency": parts, "timeout": "30s"}
        )
        ctx = TargetContext(name="noop", state_dir=tmp / "state", logger=logging.getLogger("b"))
        self.target = PythonTarget(config, ctx)
        self.parts, self.n, self.settled = parts, n, 0
        self.all_settled = asyncio.Event()
        self.queues: dict[int, asyncio.Queue[tuple[RawEvent, int]]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.ids = iter(range(1, 1 << 62))
        self.on_settled = lambda: None

    async def start(self) -> None:
        """Start the target and all its workers (the target starts them on demand)."""
        await self.target.start()
        event = RawEvent(b'{"Records":[]}', plain=True)
        await asyncio.gather(*(self._invoke(event) for _ in range(self.parts)))

    def put(self, partition: int, count: int, data: bytes, size: int) -> None:
        if partition not in self.queues:
            self.queues[partition] = asyncio.Queue()
            self.tasks.append(asyncio.create_task(self._in_order(self.queues[partition])))
        if BY_COLUMN and count > 1:
            event = RawEvent.deferred(_not_written, size, data)
        else:
            event = RawEvent(data, plain=True)
        self.queues[partition].put_nowait((event, count))

    async def _invoke(self, event: RawEvent) -> None:
        inv = Invocation(request_id=f"r{next(self.ids)}", function="noop", timeout_s=30.0)
        await self.target.invoke(event, inv)

    async def _in_order(self, queue: asyncio.Queue[tuple[RawEvent, int]]) -> None:
        while True:
            event, count = await queue.get()
            await self._invoke(event)
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
    after that first batch, and the CPU seconds spent meanwhile by this process, the
    function workers (the children this process starts after the clock is made, but
    ``child``), the broker and ``child``."""

    def __init__(self, n: int, broker: psutil.Process, child: int | None = None) -> None:
        self.n, self.me, self.broker = n, psutil.Process(), broker
        self.child = psutil.Process(child) if child is not None else None
        # what earlier runs left (not reaped yet) and the consumer process: not workers
        self.others = {p.pid for p in self.me.children()} | ({child} if child else set())
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.counted = 0
        self.workers: dict[int, list[float]] = {}  # pid: [CPU at the start, CPU last read]

    def _now(self) -> dict[str, float]:
        now = {"time": time.perf_counter(), "process": time.process_time()}
        now["broker"] = cpu_s(self.broker)
        if self.child is not None:
            now["child"] = cpu_s(self.child)
        return now

    def first(self, count: int) -> None:
        if not self.start:
            self.start, self.counted = self._now(), self.n - count
            self.sample(baseline=True)

    def sample(self, baseline: bool = False) -> None:
        """Read the workers' CPU (while they live); one first seen now started at 0."""
        for p in self.me.children():
            if p.pid in self.others:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                spent = cpu_s(p)
                if p.pid not in self.workers:
                    self.workers[p.pid] = [spent if baseline else 0.0, spent]
                self.workers[p.pid][1] = spent

    def stop(self) -> None:
        """The last record settled, the workers still alive: the clocks stop."""
        self.sample()
        self.end = self._now()

    def results(self, own: str) -> tuple[float, dict[str, float]]:
        """(records/s, CPU us per record by part: ``own`` is this process's name)."""
        assert self.start and self.end, "the run did not finish"
        per = 1e6 / self.counted
        spent = {k: (self.end[k] - self.start[k]) * per for k in self.start if k != "time"}
        out = {"child": spent["child"]} if "child" in spent else {}
        out[own] = spent["process"]
        out["workers"] = sum(b - a for a, b in self.workers.values()) * per
        out["broker"] = spent["broker"]
        return self.counted / (self.end["time"] - self.start["time"]), out


async def measured(clock: Clock, invoker: Invoker, work: Awaitable[None]) -> None:
    """Run ``work`` (it returns when the last record is settled), sampling the workers' CPU;
    a failed invocation or ``work`` ending in an error ends the run with that error."""
    task = asyncio.ensure_future(work)
    while not task.done():
        clock.sample()
        await asyncio.wait([task, *invoker.tasks], timeout=0.05, return_when="FIRST_EXCEPTION")
        for t in invoker.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                task.cancel()
                raise t.exception()  # type: ignore[misc]
    task.result()
    clock.stop()


# --- split: a consumer process, the parent invokes ------------------------------------------


def child(sock: socket.socket, bootstrap: str, topic: str, group: str, n: int, size: int) -> None:
    """Consume ``n`` records; write each partition's batches of ``size`` to ``sock``; then
    wait for the parent's ``e`` (everything settled). The parent gone: stop."""
    c = plain_consumer(bootstrap, topic, group)
    buffers: dict[int, list[Message]] = collections.defaultdict(list)
    unsettled = received = 0

    def credits(block: bool) -> None:
        nonlocal unsettled
        try:
            got = sock.recv(64, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not got:
            raise SystemExit("the parent is gone")
        unsettled -= len(got)

    try:
        while received < n:
            credits(block=False)
            while unsettled >= WINDOW:
                credits(block=True)
            polled = c.consume(1000, 0.1)
            received += len(polled)
            for partition, count, data, json_size in batches(
                buffers, polled, topic, size, received >= n
            ):
                sock.sendall(HEADER.pack(len(data), partition, count, json_size) + data)
                unsettled += 1
        sock.sendall(HEADER.pack(0, 0, 0, 0))
        while (got := sock.recv(64)) and b"e" not in got:  # credits, then the end
            pass
    finally:
        c.close()


async def parent(
    sock: socket.socket, n: int, parts: int, tmp: Path, child_pid: int, broker: psutil.Process
) -> Clock:
    invoker, clock = Invoker(tmp, parts, n), Clock(n, broker, child_pid)
    try:
        await invoker.start()
        reader, writer = await asyncio.open_connection(sock=sock)
        invoker.on_settled = lambda: writer.write(b"s")  # a credit

        async def read() -> None:
            while True:
                length, partition, count, json_size = HEADER.unpack(
                    await reader.readexactly(HEADER.size)
                )
                if not length:
                    break
                data = await reader.readexactly(length)
                clock.first(count)
                invoker.put(partition, count, data, json_size)
            await invoker.all_settled.wait()

        await measured(clock, invoker, read())
        writer.write(b"e")
        await writer.drain()
        writer.close()
    finally:
        await invoker.aclose()
    return clock


def split(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int,
    broker: psutil.Process,
) -> tuple[float, dict[str, float]]:  # fmt: skip
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: no asyncio, no target, just the consumer
        ours.close()
        status = 0
        try:
            child(theirs, bootstrap, topic, group, n, size)
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    theirs.close()
    try:
        clock = asyncio.run(parent(ours, n, parts, tmp, pid, broker))
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        ours.close()
    if status:
        raise SystemExit(f"the consumer process failed (wait status {status})")
    return clock.results("parent")


# --- alone: one process does it all ---------------------------------------------------------


async def alone_run(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int,
    broker: psutil.Process,
) -> Clock:  # fmt: skip
    invoker, clock = Invoker(tmp, parts, n), Clock(n, broker)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # the consumer's thread
    loop = asyncio.get_running_loop()
    c: confluent_kafka.Consumer | None = None
    try:
        await invoker.start()
        c = plain_consumer(bootstrap, topic, group)
        window = asyncio.Semaphore(WINDOW)
        invoker.on_settled = window.release

        async def run(c: confluent_kafka.Consumer) -> None:
            buffers: dict[int, list[Message]] = collections.defaultdict(list)
            received = 0
            while received < n:
                polled = await loop.run_in_executor(pool, c.consume, 1000, 0.1)
                received += len(polled)
                for partition, count, data, json_size in batches(
                    buffers, polled, topic, size, received >= n
                ):
                    await window.acquire()
                    clock.first(count)
                    invoker.put(partition, count, data, json_size)
            await invoker.all_settled.wait()

        await measured(clock, invoker, run(c))
    finally:
        if c is not None:
            await loop.run_in_executor(pool, c.close)
        pool.shutdown()
        await invoker.aclose()
    return clock


def alone(
    tmp: Path, bootstrap: str, topic: str, group: str, n: int, parts: int, size: int,
    broker: psutil.Process,
) -> tuple[float, dict[str, float]]:  # fmt: skip
    clock = asyncio.run(alone_run(tmp, bootstrap, topic, group, n, parts, size, broker))
    return clock.results("process")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="Alternations of (a) and the designs.")
    ap.add_argument("--batch", type=int, default=1000, help="Records per batch.")
    ap.add_argument("--design", choices=["both", "split", "alone"], default="both")
    ap.add_argument(
        "--by-column", action="store_true", help="Batches by column (the bridge's python path)."
    )
    args = ap.parse_args()
    global BY_COLUMN
    BY_COLUMN = args.by_column
    n, parts = args.records, args.partitions
    if parts < 1 or args.batch < 1 or n <= 2 * parts * args.batch:
        ap.error(
            "--partitions and --batch must be at least 1, and --records more than two batches "
            f"per partition (here more than {2 * max(parts, 1) * max(args.batch, 1):,})"
        )
    designs = {"split": split, "alone": alone}
    if args.design != "both":
        designs = {args.design: designs[args.design]}
    logging.basicConfig(level=logging.WARNING)
    topic = "bench"
    with tempfile.TemporaryDirectory() as d, broker_with_topic(Path(d), topic, n, parts) as kafka:
        tmp, (broker, bootstrap) = Path(d), kafka
        ratios: dict[str, list[float]] = {name: [] for name in designs}
        for i in range(1, args.runs + 1):
            a, a_cpu, a_broker = plain_consume(bootstrap, topic, n, broker, group=f"plain-{i}")
            print(
                f"run {i} (load {os.getloadavg()[0]:.2f}): (a) plain loop {a:>10,.0f} "
                f"records/s; CPU us per record: the loop {a_cpu:.2f}, broker {a_broker:.2f}",
                flush=True,
            )
            for name, design in designs.items():
                group = f"{name}-{i}"
                rate, spent = design(tmp, bootstrap, topic, group, n, parts, args.batch, broker)
                ratios[name].append(rate / a)
                print(
                    f"    {name:<5} design {rate:>10,.0f} records/s = {rate / a:.0%} of (a); "
                    "CPU us per record: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in spent.items())
                    + f" (total {sum(spent.values()):.2f})",
                    flush=True,
                )
        for name, rs in ratios.items():
            print(
                f"{name}: median {statistics.median(rs):.0%} of (a) (runs: "
                + ", ".join(f"{r:.0%}" for r in rs)
                + ")"
            )


if __name__ == "__main__":
    main()
