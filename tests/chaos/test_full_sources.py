"""kill -9 at seeded random points under Kafka (tansu) and SQS (moto) load. These start
their own brokers, so they run in the full suite only (``make chaos``); the subset in
``make test`` covers the API, directory, timer and AMQP sources, and the Kafka and SQS
integration tests have a kill -9 case each."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from sources.kafka.partition import pipeline
from tests.integration.aws_fixtures import REGION, Moto, aws_env_fixture, moto_fixture  # noqa: F401
from tests.integration.kafka_fixtures import (  # noqa: F401
    SESSION_TIMEOUT_MS,
    Broker,
    broker_fixture,
)

from .harness import Bridge, check, kill_loop, seeds, term

# a loaded 2-core machine: a kill loop and its drain can take minutes
pytestmark = pytest.mark.timeout(600)

KILLS = 5


class Load:
    """Send keys from a thread with ``send(key) -> bool`` (True: the broker has it)."""

    def __init__(self, send: Any, prefix: str, rate: float = 100.0) -> None:
        self.send, self.prefix, self.rate = send, prefix, rate
        self.accepted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            key = f"{self.prefix}-{n}"
            n += 1
            if self.send(key):
                self.accepted.append(key)
            self._stop.wait(1 / self.rate)


@pytest.mark.parametrize("seed", seeds([], full=10))
def test_kill_9_under_kafka_load(bridge: Bridge, broker: Broker, seed: int) -> None:
    import confluent_kafka

    rng = random.Random(seed)
    parts, batch = 3, 20
    topic = broker.create_topic(f"chaos-{seed}-{time.monotonic_ns()}", parts)
    bridge.write(
        f"""
        [triggers.orders]
        type = "kafka"
        function = "rec"
        bootstrap_servers = "{broker.bootstrap}"
        topic = "{topic}"
        start = "earliest"
        batch_size = {batch}
        batch_window = "50ms"
        [triggers.orders.options]
        "session.timeout.ms" = "{SESSION_TIMEOUT_MS}"
        """
    )
    producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 1})

    def send(key: str) -> bool:
        errors: list[Any] = []
        producer.produce(topic, value=key, on_delivery=lambda e, m: errors.append(e))
        producer.flush(10)
        return errors == [None]

    # Given records produced all along, when the daemon is killed -9 at random points
    with Load(send, f"s{seed}") as load:
        d = kill_loop(bridge, rng, KILLS, low=3.0, high=8.0)
        time.sleep(rng.uniform(0.3, 1.0))
    # Then every acknowledged record is invoked; duplicates within what a partition has in
    # flight (consecutive batches, up to ``pipeline(batch, True)`` of them, share a round
    # trip)
    check(
        bridge,
        load.accepted,
        dup_bound=KILLS * parts * pipeline(batch, True) * batch,
        timeout=180,
        scenario="kill -9, Kafka load",
        seed=seed,
        kills=KILLS,
    )
    assert term(d) == 0


@pytest.fixture
def sqs_queue(moto: Moto) -> Iterator[str]:
    url = moto.queue()
    yield url


@pytest.mark.parametrize("seed", seeds([], full=10))
def test_kill_9_under_sqs_load(bridge: Bridge, moto: Moto, sqs_queue: str, seed: int) -> None:
    rng = random.Random(seed)
    bridge.write(
        f"""
        [triggers.jobs]
        type = "aws_sqs"
        function = "rec"
        queue_url = "{sqs_queue}"
        endpoint_url = "{moto.endpoint}"
        region = "{REGION}"
        wait_time = "1s"
        visibility_timeout = "5s"
        """
    )
    client = boto3.client("sqs", endpoint_url=moto.endpoint, region_name=REGION)

    def send(key: str) -> bool:
        try:
            client.send_message(QueueUrl=sqs_queue, MessageBody=key)
        except Exception:
            return False
        return True

    # Given messages sent all along, when the daemon is killed -9 at random points
    with Load(send, f"s{seed}", rate=50) as load:
        d = kill_loop(bridge, rng, KILLS)
        time.sleep(rng.uniform(0.3, 1.0))
    # Then every sent message is invoked; duplicates within what was received, not deleted
    check(
        bridge,
        load.accepted,
        dup_bound=KILLS * 20,
        timeout=180,
        scenario="kill -9, SQS load",
        seed=seed,
        kills=KILLS,
    )
    assert term(d) == 0
