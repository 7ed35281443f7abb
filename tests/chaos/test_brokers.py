"""Faults with the real RabbitMQ on this machine: kill -9 under AMQP load, the broker cut
(TCP proxy) for a while, the dead-letter sink (AMQP) down while functions fail."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.contract.conftest import require_service

from .harness import FULL, RESULTS, ApiLoad, Bridge, check, kill_loop, seeds, term, until
from .proxy import Proxy

# a loaded 2-core machine: a kill loop and its drain can take minutes
pytestmark = pytest.mark.timeout(600)

BROKER = ("127.0.0.1", 5672)
URL = "amqp://guest:guest@127.0.0.1:{port}/"


async def _channel(port: int = 5672) -> Any:
    import aio_pika

    conn = await aio_pika.connect(URL.format(port=port), timeout=10)
    return conn, await conn.channel()  # publisher confirms are on by default


class AmqpLoad:
    """Persistent messages published to ``queue`` from a thread; ``accepted`` holds each one
    the broker confirmed (from then on it is the bridge's to deliver)."""

    def __init__(self, queue: str, prefix: str, rate: float = 100.0) -> None:
        self.queue, self.prefix, self.rate = queue, prefix, rate
        self.accepted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> AmqpLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        import aio_pika

        conn, ch = await _channel()
        try:
            await ch.declare_queue(self.queue, durable=True)
            n = 0
            while not self._stop.is_set():
                key = f"{self.prefix}-{n}"
                n += 1
                msg = aio_pika.Message(key.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await ch.default_exchange.publish(msg, routing_key=self.queue)
                self.accepted.append(key)
                await asyncio.sleep(1 / self.rate)
        finally:
            await conn.close()


def _delete(queue: str) -> None:
    async def go() -> None:
        conn, ch = await _channel()
        try:
            await ch.queue_delete(queue)
        finally:
            await conn.close()

    asyncio.run(go())


def _take(queue: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        conn, ch = await _channel()
        try:
            q = await ch.declare_queue(queue, durable=True)
            out = []
            while (m := await q.get(fail=False)) is not None:
                await m.ack()
                out.append(json.loads(m.body))
            return out
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture
def queue() -> Iterator[str]:
    require_service(*BROKER, "RabbitMQ")
    name = f"eb-chaos-{uuid.uuid4().hex[:8]}"
    yield name
    _delete(name)


def amqp_trigger(queue: str, port: int = 5672, prefetch: int = 10) -> str:
    return f"""
    [triggers.orders]
    type = "amqp"
    function = "rec"
    url = "{URL.format(port=port)}"
    queue = "{queue}"
    prefetch = {prefetch}
    """


@pytest.mark.parametrize("seed", seeds([4]))
def test_kill_9_under_amqp_load(bridge: Bridge, queue: str, seed: int) -> None:
    rng = random.Random(seed)
    kills = 5 if FULL else 2
    bridge.write(amqp_trigger(queue))
    # Given messages published (and confirmed) all along, when the daemon is killed -9
    with AmqpLoad(queue, f"s{seed}") as load:
        d = kill_loop(bridge, rng, kills)
        time.sleep(rng.uniform(0.3, 1.0))
    # Then every confirmed message is invoked; duplicates within the unacked prefetch
    check(
        bridge,
        load.accepted,
        dup_bound=kills * 10,
        scenario="kill -9, AMQP load",
        seed=seed,
        kills=kills,
    )
    assert term(d) == 0


def test_broker_cut(bridge: Bridge, queue: str) -> None:
    cut_for = 30.0 if FULL else 5.0
    with Proxy(BROKER) as proxy:
        bridge.write(amqp_trigger(queue, proxy.port))
        d = bridge.start()
        bridge.ready(d)
        with AmqpLoad(queue, "cut") as load:
            until(lambda: len(bridge.delivered()) > 20, 60, "events flowing")
            # Given events flowing, when the connection to the broker is cut for a while
            proxy.cut()
            time.sleep(cut_for)  # the fault window
            proxy.restore()
            # Then the source reconnects by itself and every message arrives
            at_restore = len(load.accepted)
            until(
                lambda: set(load.accepted[:at_restore]) <= set(bridge.delivered()),
                120,
                "the messages published during the cut",
            )
        check(
            bridge,
            load.accepted,
            dup_bound=10,
            timeout=120,
            scenario=f"broker cut {cut_for:g} s",
        )
        assert term(d) == 0


def test_dead_letter_sink_down(bridge: Bridge, queue: str) -> None:
    down_for = 30.0 if FULL else 4.0
    with Proxy(BROKER) as proxy:
        bridge.write(
            rec=f"""
            [functions.rec]
            runtime = "command"
            command = ["false"]
            concurrency = {bridge.concurrency}
            [functions.rec.async]
            retry_attempts = 0
            dead_letter = "{URL.format(port=proxy.port)}?queue={queue}"
            """
        )
        d = bridge.start()
        bridge.ready(d)
        # Given a function that always fails, whose dead letters go to RabbitMQ
        with ApiLoad(bridge.port, "dlq", rate=50) as load:
            until(lambda: len(load.accepted) > 20, 30, "events accepted")
            # When the dead-letter sink is unreachable for a while
            proxy.cut()
            time.sleep(down_for)  # the fault window
            proxy.restore()
            time.sleep(1)
        # Then every accepted event ends up as a dead letter once it is back: none dropped
        want = set(load.accepted)
        got: list[str] = []

        def all_dead() -> bool:
            got.extend(json.loads(r["Body"]["ClientContext"])["id"] for r in _take(queue))
            return want <= set(got)

        until(all_dead, 120, f"{len(want)} dead letters")
        dups = len(got) - len(set(got))
        result = {
            "scenario": f"dead-letter sink down {down_for:g} s",
            "accepted": len(want),
            "dead_lettered": len(set(got)),
            "lost": len(want - set(got)),
            "duplicates": dups,
            "dup_bound": bridge.concurrency,
            "rss_max_mb": round(bridge.rss_max / 2**20, 1),
        }
        RESULTS.append(result)
        print("CHAOS", json.dumps(result))
        # the fault did happen: puts failed and were retried
        assert "dead-letter sink amqp://***:***@" in d.log()
        assert dups <= bridge.concurrency
        assert set(got) <= load.attempted
        assert term(d) == 0
