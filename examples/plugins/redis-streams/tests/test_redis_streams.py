"""What the contract suite cannot know about Redis Streams: the event shape, reclaiming a
dead consumer's entries, lost replies and dropped connections, deleted entries."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from event_bridge_redis_streams import RedisStreamsConfig, RedisStreamsSource
from pydantic import ValidationError
from redis.asyncio import Redis

from bridge.plugin import Delivery, Format, NotConnected, SourceContext, render
from bridge.testing import MemoryStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def stream(redis: Redis) -> AsyncIterator[str]:
    name = f"test:{uuid.uuid4().hex[:12]}"
    yield name
    await redis.delete(name)


def config(stream: str, **fields: Any) -> RedisStreamsConfig:
    body = {"type": "redis_streams", "function": "f", "url": REDIS_URL, "stream": stream}
    return RedisStreamsConfig.model_validate({**body, **fields})


def source(stream: str, name: str = "t", **fields: Any) -> RedisStreamsSource:
    ctx = SourceContext(
        name=name,
        function="f",
        store=MemoryStore(),
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger(f"test.{name}"),
    )
    return RedisStreamsSource(config(stream, **fields), ctx)


async def read(src: RedisStreamsSource, timeout: float = 10.0) -> Delivery:
    """The next delivery, reconnecting the way the core does; fails after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await src.read()
            except NotConnected:
                await src.connect()


def body(d: Delivery) -> str:
    return str(d.event.records[0]["body"])


async def test_entries_arrive_as_scf_cmq_events(redis: Redis, stream: str) -> None:
    src = source(stream, group="g", start="all")
    entry_id = (await redis.xadd(stream, {"body": "hello", "tag": "x"})).decode()
    await redis.xadd(stream, {"user": "ana", "bin": b"\xff\x00"})
    await src.connect()
    first, second = await read(src), await read(src)
    scf = render(first.event)
    assert scf == {
        "Records": [
            {
                "CMQ": {
                    "type": "queue",
                    "topicOwner": "",
                    "topicName": stream,
                    "subscriptionName": "g",
                    "publishTime": scf["Records"][0]["CMQ"]["publishTime"],
                    "msgId": entry_id,
                    "requestId": "",
                    "msgBody": "hello",
                    "msgTag": [],
                }
            }
        ]
    }
    assert scf["Records"][0]["CMQ"]["publishTime"].endswith("Z")
    assert render(first.event, Format.NATIVE) == {
        "stream": stream,
        "id": entry_id,
        "fields": {"body": "hello", "tag": "x"},
    }
    # an entry without the body field is passed whole, binary values base64-encoded
    assert json.loads(body(second)) == {"user": "ana", "bin": "base64:/wA="}
    await first.ack()
    await second.ack()
    assert (await redis.xpending(stream, "g"))["pending"] == 0
    await src.close()


async def test_a_new_group_starts_at_new_entries_by_default(redis: Redis, stream: str) -> None:
    await redis.xadd(stream, {"body": "before"})
    src = source(stream)
    await src.connect()
    await redis.xadd(stream, {"body": "after"})
    assert body(await read(src)) == "after"
    await src.close()


async def test_entries_of_a_dead_consumer_are_claimed(redis: Redis, stream: str) -> None:
    # Given consumer "a" read two entries and died without acking them
    dead = source(stream, consumer="a", start="all", claim_idle="300ms")
    await redis.xadd(stream, {"body": "1"})
    await redis.xadd(stream, {"body": "2"})
    await dead.connect()
    await read(dead)
    await read(dead)
    await dead.close()
    # When consumer "b" runs, then once the entries are idle for claim_idle it takes them
    alive = source(stream, consumer="b", claim_idle="300ms", block="100ms")
    await alive.connect()
    got = [await read(alive), await read(alive)]
    assert sorted(body(d) for d in got) == ["1", "2"]
    for d in got:
        await d.ack()
    pending = await redis.xpending(stream, "event-bridge")
    assert pending["pending"] == 0
    await alive.close()


async def test_a_reply_lost_in_transit_is_delivered_after_a_reconnect(
    redis: Redis, stream: str
) -> None:
    src = source(stream, consumer="c", start="all")
    await src.connect()
    # Given an entry the server handed to consumer "c" whose reply never reached it
    await redis.xadd(stream, {"body": "lost"})
    await redis.xreadgroup("event-bridge", "c", {stream: ">"}, count=1)
    # When the source reconnects (as after NotConnected), then it reads its own pending entry
    await src.connect()
    d = await read(src)
    assert body(d) == "lost"
    await d.ack()
    await src.close()


async def test_a_dropped_connection_means_not_connected_and_loses_nothing(
    redis: Redis, stream: str
) -> None:
    src = source(stream, name=f"kill-{uuid.uuid4().hex[:8]}", start="all", block="10s")
    await src.connect()
    reading = asyncio.create_task(src.read())
    client_name = f"event-bridge:{src.ctx.name}"

    async def blocked_in_xreadgroup() -> bool:
        clients = await redis.client_list()
        return any(c["name"] == client_name and c["cmd"] == "xreadgroup" for c in clients)

    async with asyncio.timeout(10):
        while not await blocked_in_xreadgroup():  # noqa: ASYNC110 (a condition in Redis)
            await asyncio.sleep(0.01)
    # When Redis drops the connection of a read blocked in XREADGROUP
    killed = await redis.execute_command("CLIENT", "KILL", "USER", "default", "SKIPME", "yes")
    assert killed >= 1
    with pytest.raises(NotConnected):
        await asyncio.wait_for(reading, 10)
    # Then, reconnected, it delivers what arrived meanwhile
    await redis.xadd(stream, {"body": "after the drop"})
    d = await read(src)
    assert body(d) == "after the drop"
    await d.ack()
    await src.close()


async def test_a_pending_entry_deleted_from_the_stream_is_dropped_with_a_warning(
    redis: Redis, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    await redis.xgroup_create(stream, "event-bridge", id="0", mkstream=True)
    gone = await redis.xadd(stream, {"body": "gone"})
    await redis.xadd(stream, {"body": "kept"})
    await redis.xreadgroup("event-bridge", "c", {stream: ">"}, count=10)
    await redis.xdel(stream, gone)
    src = source(stream, consumer="c")
    with caplog.at_level(logging.WARNING):
        await src.connect()
        d = await read(src)
    assert body(d) == "kept"
    assert "was deleted before it was handled" in caplog.text
    await d.ack()
    assert (await redis.xpending(stream, "event-bridge"))["pending"] == 0
    await src.close()


def test_config_rejects_unknown_keys_and_unreadable_password_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        config("s", streem="x")
    with pytest.raises(ValidationError, match="cannot read secret file"):
        config("s", password_file=str(tmp_path / "missing"))
    assert config("s").consumer is None and config("s").block == 5.0
    assert "redis://" not in repr(config("s"))  # the URL may carry a password
