"""A Redis Streams consumer-group source: at least once, acknowledged only on acceptance.

How the source contract maps onto Redis Streams:

- ``connect()`` creates the consumer group if it is missing (``XGROUP CREATE ...
  MKSTREAM``; ``start = "new"`` begins at ``$``, ``"all"`` at ``0``) and arranges
  for this consumer's own pending entries to be read first.
- ``read()`` serves, in order: nacked entries whose ``nack_delay`` has passed;
  entries already fetched; **this consumer's pending entries** (``XREADGROUP ...
  0``: entries read by a previous run — or by a reply lost with its connection —
  and never acked); entries of **dead consumers**, idle for ``claim_idle``
  (``XAUTOCLAIM``, re-run every half ``claim_idle``); and finally new entries
  (``XREADGROUP ... > BLOCK``). At most ``batch`` entries are fetched ahead.
- ``Delivery.ack()`` is the only place that settles an entry: ``XACK``. Until then
  the entry stays in the group's pending-entries list, so a crash, a dropped
  connection or a restart delivers it again (at least once).
- ``nack()`` serves the entry again after ``nack_delay`` (it stays pending meanwhile).
- ``close()`` interrupts a pending ``XREADGROUP`` (that ``read()`` raises
  ``EndOfInput``) and closes the connection pool; unsettled entries stay pending.

A dropped connection makes ``read()`` raise ``NotConnected``; the core then calls
``connect()``, which re-reads this consumer's pending entries. The client is built
without redis-py's transparent retries so that this path is the only one.

Events are SCF CMQ (message queue) events: ``msgId`` is the entry id, ``msgBody``
the ``field`` of the entry (default ``body``) or, for entries without it, all its
fields as a JSON object; ``topicName`` is the stream and ``subscriptionName`` the
group. ``format = "native"`` passes ``{"stream", "id", "fields"}``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import heapq
import json
import socket
import time
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationInfo, field_validator
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.plugin import (
    Delivery,
    Duration,
    EndOfInput,
    Event,
    Kind,
    NotConnected,
    RelPath,
    SettleDelivery,
    Source,
    SourceContext,
    TriggerConfig,
    cmq_record,
    read_secret_file,
)

T = TypeVar("T")

#: errors that mean "the connection is gone": read() raises NotConnected on them
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisStreamsConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "redis_streams"``."""

    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL (redis://, rediss:// or unix://). Put the password in "
        "password_file rather than here.",
        repr=False,
    )
    password_file: RelPath | None = Field(
        None, description="File holding the Redis password (systemd LoadCredential)."
    )
    stream: str = Field(min_length=1, description="The stream key to consume.")
    group: str = Field("event-bridge", min_length=1, description="The consumer group.")
    consumer: str | None = Field(
        None,
        description="This consumer's name in the group; default HOSTNAME:TRIGGER. Keep it "
        "stable across restarts: a restarted consumer redelivers its own pending entries.",
    )
    start: Literal["new", "all"] = Field(
        "new",
        description="Where a group created by this trigger starts: new entries only ($), "
        "or all entries already in the stream (0).",
    )
    field: str = Field(
        "body",
        description="The entry field passed as msgBody; entries without it are passed as "
        "a JSON object of all their fields.",
    )
    batch: int = Field(10, ge=1, le=1000, description="Entries fetched per XREADGROUP.")
    block: Duration = Field(
        5.0, gt=0, le=300, description="How long one XREADGROUP waits for new entries."
    )
    claim_idle: Duration = Field(
        300.0,
        gt=0,
        description="Entries pending this long on another consumer are claimed (XAUTOCLAIM): "
        "that consumer is taken for dead. Keep it well above the time an event takes to "
        "be accepted, or live consumers' entries are delivered twice.",
    )
    nack_delay: Duration = Field(
        1.0, ge=0, description="A nacked entry is delivered again after this long."
    )

    @field_validator("password_file")
    @classmethod
    def _readable(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            read_secret_file(v)  # a clear error now, naming the file, never the secret
        return v


class RedisStreamsSource(Source[RedisStreamsConfig]):
    """Consumes a Redis stream through a consumer group (XREADGROUP, XACK, XAUTOCLAIM)."""

    Config = RedisStreamsConfig

    def __init__(self, config: RedisStreamsConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.consumer = config.consumer or f"{socket.gethostname()}:{ctx.name}"
        self._client: Redis | None = None
        self._closed = False
        self._pending_call: asyncio.Future[Any] | None = None
        self._buffer: collections.deque[tuple[str, dict[str, bytes]]] = collections.deque()
        self._outstanding: set[str] = set()  # handed out, not yet acked or nacked
        self._nacked: list[tuple[float, str, dict[str, bytes]]] = []  # heap by due time
        self._own_cursor: str | None = None  # next id of our own pending entries to reread
        self._claim_cursor = "0-0"
        self._claim_due = 0.0
        self.acked = 0  # for status()

    # --- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._closed:
            return
        if self._client is None:
            self._client = self._new_client()
        start = "$" if self.config.start == "new" else "0"
        try:
            await self._client.xgroup_create(
                self.config.stream, self.config.group, id=start, mkstream=True
            )
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        # Our own pending entries first: a previous run's, or a reply lost in transit.
        self._own_cursor = "0-0"
        self._claim_due = 0.0

    def _new_client(self) -> Redis:
        c = self.config
        extra: dict[str, Any] = {}
        if c.password_file is not None:
            extra["password"] = read_secret_file(c.password_file)
        return Redis.from_url(
            c.url,
            **extra,
            client_name=f"event-bridge:{self.ctx.name}",
            socket_timeout=c.block + 30.0,  # longer than a blocking XREADGROUP
            socket_connect_timeout=10.0,
            retry=Retry(NoBackoff(), 0),  # a dropped connection surfaces as NotConnected
            retry_on_error=[],
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending_call is not None and not self._pending_call.done():
            self._pending_call.cancel()
        self._buffer.clear()
        self._nacked.clear()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # --- reading --------------------------------------------------------------------------

    async def read(self) -> Delivery:
        while True:
            if self._closed:
                raise EndOfInput
            if self._client is None:
                raise NotConnected("read() before connect()")
            now = time.monotonic()
            if self._nacked and self._nacked[0][0] <= now:
                _, entry_id, fields = heapq.heappop(self._nacked)
                return self._deliver(entry_id, fields)
            if self._buffer:
                return self._deliver(*self._buffer.popleft())
            if self._own_cursor is not None:
                await self._reread_own()
            elif now >= self._claim_due:
                await self._claim()
            else:
                await self._read_new(now)

    async def _reread_own(self) -> None:
        assert self._own_cursor is not None
        got = await self._call(
            self._redis.xreadgroup(
                self.config.group,
                self.consumer,
                {self.config.stream: self._own_cursor},
                count=self.config.batch,
            )
        )
        entries = _entries(got)
        if not entries:
            self._own_cursor = None
            return
        self._own_cursor = entries[-1][0]
        for entry_id, fields in entries:
            if not fields:
                # The entry was deleted (XDEL, MAXLEN trimming) while pending: nothing to
                # deliver. Settle it so it does not come back forever.
                self.ctx.logger.warning(
                    "stream %s: pending entry %s was deleted before it was handled; dropping it",
                    self.config.stream,
                    entry_id,
                )
                await self._call(self._redis.xack(self.config.stream, self.config.group, entry_id))
            elif self._is_new(entry_id):
                self._buffer.append((entry_id, fields))

    async def _claim(self) -> None:
        c = self.config
        got = await self._call(
            self._redis.xautoclaim(
                c.stream,
                c.group,
                self.consumer,
                min_idle_time=int(c.claim_idle * 1000),
                start_id=self._claim_cursor,
                count=c.batch,
            )
        )
        cursor, claimed = _text(got[0]), got[1]
        deleted = got[2] if len(got) > 2 else []
        if deleted:
            self.ctx.logger.warning(
                "stream %s: %d pending entries were deleted before they were handled",
                c.stream,
                len(deleted),
            )
        for raw_id, fields in claimed:
            entry_id = _text(raw_id)
            if fields and self._is_new(entry_id):
                self._buffer.append((entry_id, dict(fields)))
        if claimed:
            self.ctx.logger.info(
                "stream %s: claimed %d entries idle for %.0fs on other consumers",
                c.stream,
                len(claimed),
                c.claim_idle,
            )
        self._claim_cursor = cursor
        if cursor == "0-0":  # a full pass: next one in half claim_idle
            self._claim_due = time.monotonic() + c.claim_idle / 2

    async def _read_new(self, now: float) -> None:
        c = self.config
        wait_s = min(c.block, self._claim_due - now)
        if self._nacked:
            wait_s = min(wait_s, self._nacked[0][0] - now)
        got = await self._call(
            self._redis.xreadgroup(
                c.group,
                self.consumer,
                {c.stream: ">"},
                count=c.batch,
                block=max(1, int(wait_s * 1000)),
            )
        )
        for entry_id, fields in _entries(got):
            self._buffer.append((entry_id, fields))

    def _is_new(self, entry_id: str) -> bool:
        """Not already handed out, buffered or waiting to be redelivered by this instance."""
        return (
            entry_id not in self._outstanding
            and all(e != entry_id for e, _ in self._buffer)
            and all(e != entry_id for _, e, _ in self._nacked)
        )

    @property
    def _redis(self) -> Redis:
        if self._client is None:
            raise NotConnected("not connected")
        return self._client

    async def _call(self, aw: Awaitable[T]) -> T:
        """Await one Redis command so that close() can interrupt it (read() then raises
        EndOfInput) and a lost connection becomes NotConnected."""
        self._pending_call = call = asyncio.ensure_future(aw)
        try:
            return await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                raise EndOfInput from None
            # Cancelled by the core: a reply may have been lost with the command, and its
            # entries are pending on us. Reread our pending entries next time.
            self._own_cursor = "0-0"
            raise
        except _CONNECTION_ERRORS as e:
            if self._closed:
                raise EndOfInput from None
            self._own_cursor = "0-0"
            raise NotConnected(f"redis: {e}") from e
        finally:
            self._pending_call = None

    # --- deliveries -----------------------------------------------------------------------

    def _deliver(self, entry_id: str, fields: dict[str, bytes]) -> Delivery:
        self._outstanding.add(entry_id)
        return SettleDelivery(
            self.event(entry_id, fields),
            partial(self._ack, entry_id),
            partial(self._nack, entry_id, fields),
            key=entry_id,
        )

    async def _ack(self, entry_id: str) -> None:
        """XACK: the only place an entry is settled for good."""
        client = self._client
        if client is None:
            raise NotConnected(f"entry {entry_id} cannot be acked: the trigger was closed")
        await client.xack(self.config.stream, self.config.group, entry_id)
        self._outstanding.discard(entry_id)
        self.acked += 1

    async def _nack(
        self, entry_id: str, fields: dict[str, bytes], error: BaseException | None
    ) -> None:
        """Serve the entry again after ``nack_delay``."""
        self._outstanding.discard(entry_id)
        if not self._closed:
            due = time.monotonic() + self.config.nack_delay
            heapq.heappush(self._nacked, (due, entry_id, fields))

    def event(self, entry_id: str, fields: Mapping[str, bytes]) -> Event:
        """The CMQ event of one stream entry."""
        text = {_text(k): _decode(v) for k, v in fields.items()}
        body = text.get(self.config.field)
        if body is None:
            body = json.dumps(text, ensure_ascii=False, separators=(",", ":"))
        ms = int(entry_id.split("-", 1)[0])
        published = datetime.fromtimestamp(ms / 1000, UTC)
        record = cmq_record(
            msg_id=entry_id,
            body=body,
            publish_time=published,
            topic=self.config.stream,
            subscription=self.config.group,
            type="queue",
        )
        native = {"stream": self.config.stream, "id": entry_id, "fields": text}
        return Event(
            kind=Kind.CMQ, trigger=self.ctx.name, time=published, records=(record,), native=native
        )

    def status(self) -> Mapping[str, Any]:
        return {
            "stream": self.config.stream,
            "group": self.config.group,
            "consumer": self.consumer,
            "in_flight": len(self._outstanding),
            "buffered": len(self._buffer) + len(self._nacked),
            "acked": self.acked,
        }


def _entries(reply: Any) -> list[tuple[str, dict[str, bytes]]]:
    """The entries of an XREADGROUP reply for one stream (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [s[1] for s in reply]
    out = []
    for entries in streams:
        for entry_id, fields in entries:
            out.append((_text(entry_id), dict(fields or {})))
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(value: bytes | str) -> str:
    """UTF-8 text, or ``base64:...`` for binary values (events are JSON)."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")
