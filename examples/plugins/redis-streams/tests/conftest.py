"""Fixtures: the Redis the tests run against (``REDIS_URL``, default the local one).

A test that needs Redis and cannot reach it fails (never skips): a suite must never go
green by skipping the checks it exists to run.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from redis.asyncio import Redis

# bridge.testing's pytest plugin: contract checks a source has no capability for are
# deselected, not skipped
pytest_plugins = ["bridge.testing.pytest_plugin"]

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    async def ping() -> None:
        client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except Exception as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {e!r}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _redis_is_up() -> None:
    require_redis()
