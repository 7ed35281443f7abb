"""sources.amqp against the source contract suite, on the local RabbitMQ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aio_pika

from bridge.testing import SourceContract
from sources.amqp import AmqpSource
from tests.contract.conftest import require_service

URL = "amqp://guest:guest@127.0.0.1:5672/"


class TestAmqpContract(SourceContract):
    source_class = AmqpSource
    entry_point = "amqp"
    sample_config = {"url": URL, "prefetch": 10}
    has_positions = False  # every message is acked on its own (basic.ack)

    async def setup_upstream(self) -> None:
        require_service("127.0.0.1", 5672, "RabbitMQ")
        self.queue = f"contract-{self.tag}"
        self.conn = await aio_pika.connect(URL)
        self.channel = await self.conn.channel()
        await self.channel.declare_queue(self.queue, durable=True)

    async def teardown_upstream(self) -> None:
        await self.channel.queue_delete(self.queue)
        await self.conn.close()

    def config_data(self) -> dict[str, Any]:
        return {**super().config_data(), "queue": self.queue}

    async def publish(self, payloads: Sequence[str]) -> None:
        for p in payloads:
            await self.channel.default_exchange.publish(
                aio_pika.Message(p.encode()), routing_key=self.queue
            )
