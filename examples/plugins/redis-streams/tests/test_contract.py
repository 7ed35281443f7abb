"""The Redis Streams source against event-bridge's source contract suite.

This is all a plugin needs to run the suite: say which class, how to make a fresh
upstream for each check, and how to publish into it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from event_bridge_redis_streams import RedisStreamsSource
from redis.asyncio import Redis

from bridge.testing import SourceContract

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class TestRedisStreamsContract(SourceContract):
    source_class = RedisStreamsSource
    entry_point = "redis_streams"
    sample_config = {
        "url": REDIS_URL,
        "group": "contract",
        "consumer": "contract-1",  # a restarted instance is the same consumer
        "block": "1s",
        "nack_delay": "10ms",
    }
    supports_nack_redelivery = True  # nack_delay, then served again
    has_positions = False  # every entry is acked on its own (XACK)

    async def setup_upstream(self) -> None:
        self.stream = f"contract:{self.tag}"
        self.redis = Redis.from_url(REDIS_URL)

    async def teardown_upstream(self) -> None:
        await self.redis.delete(self.stream)
        await self.redis.aclose()

    def config_data(self) -> dict[str, Any]:
        return {**super().config_data(), "stream": self.stream}

    async def publish(self, payloads: Sequence[str]) -> None:
        for payload in payloads:
            await self.redis.xadd(self.stream, {"body": payload})
