"""The Kafka source: a consumer group's records as ordered CKafka batches, one run of
consecutive batches in flight per partition (the design note is the package docstring,
:mod:`sources.kafka`).

This module ties the parts together on the event loop: it runs the poll cycles of the
:class:`~.client.Client`, answers its rebalance callbacks (which run on the consumer's
thread and hand their work to the loop), hands out batches from the
:class:`~.partition.Partitions` table and settles them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from bridge.plugin import (
    EndOfInput,
    Format,
    NotConnected,
    SettleDelivery,
    Source,
    SourceContext,
    read_secret_file,
    register_secret,
)

from .client import (
    CALL_TIMEOUT_S,
    POLL_PAUSED_S,
    Client,
    Consumer,
    Key,
    Message,
    Ops,
    Polled,
    RdkafkaLog,
    describe,
    quietly,
    real_consumer,
)
from .config import DEFAULT_OPTIONS, SECRET_OPTION, KafkaConfig, parse_start
from .partition import Batch, Partition, Partitions, Positions, describe_batches

T = TypeVar("T")

COMMIT_INTERVAL_S = 0.1  # settled offsets are committed at most this often
POSITION_INTERVAL_S = 0.01  # settled positions are written to the state store at most this often
COMMIT_STALL_S = 10.0  # a commit without a result after this long no longer blocks the next
WATERMARK_INTERVAL_S = 1.0
WARN_EVERY_S = 60.0  # the same consumer error is logged at most this often


class KafkaSource(Source[KafkaConfig]):
    """Consumes ``config.topic`` in a consumer group; one ordered batch per partition at a
    time (see the package docstring). One ``read()``/``read_many()`` at a time, as the core
    calls them."""

    Config = KafkaConfig
    ordered: ClassVar[bool] = True
    #: builds the consumer from the librdkafka configuration (tests pass a fake)
    consumer_factory: Callable[[dict[str, Any]], Consumer] = staticmethod(real_consumer)

    def __init__(self, config: KafkaConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.group_id = config.group_id or f"event-bridge-{ctx.name}"
        self.topics = config.topics
        self.start_ms = parse_start(config.start, ctx.timezone)
        opts = {**config.options, **{k: "" for k in config.options_file}}
        strategy = opts.get("partition.assignment.strategy", "")
        # cooperative rebalancing (and KIP-848's protocol) assign and revoke incrementally
        self.incremental = "cooperative" in strategy or opts.get("group.protocol") == "consumer"
        self._format = Format(config.format)
        self._closed = False
        self._stopping = False  # closing or dropping a failed consumer: revokes do not wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._poller: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None  # writes the settled positions
        self._failure: BaseException | None = None
        topics = self.topics
        one = topics[0] if len(topics) == 1 and not topics[0].startswith("^") else None
        self.partitions = Partitions(
            config.batch_size, config.max_batch_bytes, config.batch_window, one, ctx.batches
        )
        self.stats = self.partitions.stats
        self._positions = Positions(ctx.store, self.group_id, self._warn)
        self._wake = asyncio.Event()
        self._settled_evt = asyncio.Event()
        self._commit_pending_since: float | None = None
        self._last_commit = 0.0
        self._last_marks = 0.0
        self._warned: dict[str, float] = {}
        self._rdkafka_log = RdkafkaLog(self.ctx.logger, self.ctx.name, WARN_EVERY_S)
        self._connected = False

    # --- lifecycle ----------------------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        """The librdkafka configuration, with secrets read from ``options_file`` now."""
        conf: dict[str, Any] = {**DEFAULT_OPTIONS, **self.config.options}
        for name, path in self.config.options_file.items():
            conf[name] = read_secret_file(path)
            register_secret(conf[name])
        for name, value in conf.items():
            if SECRET_OPTION.search(name):
                register_secret(value)
        conf.update(
            {
                "bootstrap.servers": self.config.bootstrap_servers,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "latest" if self.config.start == "latest" else "earliest",
                "error_cb": self._on_error,
                "on_commit": self._on_commit,
                "logger": self._rdkafka_log,
            }
        )
        return conf

    async def connect(self) -> None:
        if self._closed:
            return
        await self._teardown()
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        client = await Client.open(
            self.ctx.name,
            self.client_config(),
            self.consumer_factory,
            self.topics,
            (self._on_assign, self._on_revoke, self._on_lost),
            self.ctx.logger,
        )
        self._client, self._failure, self._connected = client, None, True
        self._poller = asyncio.create_task(
            self._poll_forever(client), name=f"kafka-poll:{self.ctx.name}"
        )
        if self._keeper is None:
            self._keeper = asyncio.create_task(
                self._keep_positions(), name=f"kafka-positions:{self.ctx.name}"
            )
        self.ctx.logger.info(
            "kafka trigger %s: consuming %s in group %s from %s",
            self.ctx.name,
            ", ".join(self.topics),
            self.group_id,
            self.config.bootstrap_servers,
            extra={"trigger": self.ctx.name},
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = self._stopping = True
        self._wake.set()
        self._settled_evt.set()  # a revoke waiting for in-flight batches stops waiting
        try:
            await self._stop_polling()
            keeper, self._keeper = self._keeper, None
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            await self._positions.flush(self.ctx.name)
            if self._client is not None:
                await self._client.shutdown(self.partitions.commits(force=True))
        finally:
            self._release()

    async def _teardown(self) -> None:
        """Drop a consumer that failed (before a reconnect): nothing in flight is committed."""
        if self._client is None:
            return
        self._stopping = True
        self._settled_evt.set()
        await self._stop_polling()
        try:
            await self._client.shutdown([])
        finally:
            self._release()

    def _release(self) -> None:
        self._client, self._connected = None, False
        for part in list(self.partitions.parts.values()):
            self.partitions.forget(part, gone=True)

    async def _stop_polling(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _keep_positions(self) -> None:
        """Write the settled positions acks marked, at most every ``POSITION_INTERVAL_S``."""
        positions = self._positions
        while True:
            await positions.dirty.wait()
            await asyncio.sleep(POSITION_INTERVAL_S)
            await positions.flush(self.ctx.name)

    # --- polling ------------------------------------------------------------------------------

    async def _poll_forever(self, client: Client) -> None:
        try:
            while True:
                self._ingest(await client.cycle(self._ops()))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.ctx.logger.error(
                "kafka trigger %s: polling failed: %s; reconnecting",
                self.ctx.name,
                describe(e),
                extra={"trigger": self.ctx.name},
            )
            self._failure = e
            self._wake.set()

    def _ops(self) -> Ops:
        """Pause/resume decisions, due commits and watermark reads for the next cycle."""
        ops = Ops()
        self.partitions.flow(ops, POLL_PAUSED_S)
        now = time.monotonic()
        pending = self._commit_pending_since
        if (pending is None or now - pending > COMMIT_STALL_S) and (
            now - self._last_commit >= COMMIT_INTERVAL_S
        ):
            ops.commit = self.partitions.commits()
            if ops.commit:
                self._last_commit = self._commit_pending_since = now
        if now - self._last_marks >= WATERMARK_INTERVAL_S:
            self._last_marks = now
            ops.watermarks = [p.tp for p in self.partitions.order]
        return ops

    def _ingest(self, polled: Polled) -> None:
        if polled.commit_error is not None:
            self._commit_failed(polled.commit_error)
        for key, hw in polled.watermarks.items():
            part = self.partitions.parts.get(key)
            if part is not None:
                part.high_watermark = hw
        if polled.messages and self.partitions.ingest(polled.messages, self._message_error):
            self._wake.set()

    def _message_error(self, m: Message) -> None:
        err: KafkaError = m.error()  # type: ignore[assignment]
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        self._warn(
            f"{code}",
            "kafka trigger %s: %s (%s)",
            self.ctx.name,
            err.str(),
            f"{m.topic()}/{m.partition()}" if m.topic() else "consumer",
        )

    # --- rebalance (callbacks on the consumer's thread; state changes on the loop) ------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        committed: dict[Key, int] = {}
        known = True
        try:
            for tp in consumer.committed(partitions, timeout=CALL_TIMEOUT_S):
                if tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as e:
            known = False
            self.ctx.logger.warning(
                "kafka trigger %s: cannot read committed offsets (%s); librdkafka resumes "
                "from them itself",
                self.ctx.name,
                describe(e),
                extra={"trigger": self.ctx.name},
            )
        since: set[Key] = set()
        if known and self.start_ms is not None:
            fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in committed]
            since = {(tp.topic, tp.partition) for tp in fresh}
            self._seek_to_time(consumer, fresh)
        added = [
            (tp.topic, tp.partition, committed.get((tp.topic, tp.partition)),
             self.start_ms if (tp.topic, tp.partition) in since else None)
            for tp in partitions
        ]  # fmt: skip
        resume_at = self._in_loop(self._assigned(added, known), CALL_TIMEOUT_S) or {}
        for tp in partitions:
            at = resume_at.get((tp.topic, tp.partition))
            if at is not None:
                tp.offset = at
        if self.incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions:
            # librdkafka keeps a partition paused across a revoke and a re-assign
            quietly(consumer.resume, partitions, self.ctx.name, self.ctx.logger)
            self.ctx.logger.info(
                "kafka trigger %s: assigned %s",
                self.ctx.name,
                ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions),
                extra={"trigger": self.ctx.name},
            )

    def _seek_to_time(self, consumer: Any, fresh: list[TopicPartition]) -> None:
        """Set the start offset of partitions without a committed one to ``start``'s time."""
        if not fresh:
            return
        assert self.start_ms is not None
        query = [TopicPartition(tp.topic, tp.partition, self.start_ms) for tp in fresh]
        try:
            found = {
                (tp.topic, tp.partition): tp.offset
                for tp in consumer.offsets_for_times(query, timeout=CALL_TIMEOUT_S)
            }
        except KafkaException as e:
            self.ctx.logger.warning(
                "kafka trigger %s: cannot look up offsets by time (%s); reading from the "
                "beginning and skipping older records",
                self.ctx.name,
                describe(e),
                extra={"trigger": self.ctx.name},
            )
            found = {}
        for tp in fresh:
            offset = found.get((tp.topic, tp.partition), confluent_kafka.OFFSET_BEGINNING)
            tp.offset = offset if offset >= 0 else confluent_kafka.OFFSET_END

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        offsets = self._in_loop(
            self._revoked(keys, lost=False), self.config.drain_timeout + CALL_TIMEOUT_S
        )
        if offsets:
            self._commit_sync(consumer, offsets, "on revoke")

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._in_loop(self._revoked(keys, lost=True), CALL_TIMEOUT_S)

    def _commit_sync(self, consumer: Any, offsets: list[TopicPartition], when: str) -> None:
        client = self._client
        if client is not None:
            self._from_thread(self._committed, client.commit_sync(consumer, offsets, when))

    def _in_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T | None:
        """From the consumer's thread: run ``coro`` on the event loop and wait for its result."""
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            return None
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is shutting down
            coro.close()
            return None
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            self.ctx.logger.error(
                "kafka trigger %s: the event loop did not answer a rebalance within %.0fs",
                self.ctx.name,
                timeout,
                extra={"trigger": self.ctx.name},
            )
            return None

    async def _assigned(
        self, added: list[tuple[str, int, int | None, int | None]], known: bool
    ) -> dict[Key, int]:
        """Create the partitions' state. A partition this process had before and settled
        further than the group's committed offset (the commit failed: the session was lost,
        the brokers were away) resumes after what it settled: those records were handled.
        Returns those start offsets."""
        table = self.partitions
        resume_at: dict[Key, int] = {}
        for topic, partition, committed, since_ms in added:
            key = (topic, partition)
            if key in table.parts:
                continue
            settled = table.settled_before.get(key) if known else None
            stored = await self._positions.read(key, committed, self.ctx.name) if known else None
            if stored is not None and (settled is None or stored > settled):
                settled = stored
            if settled is not None and (committed is None or settled > committed):
                resume_at[key] = settled
                since_ms = None
            else:
                settled = None
            table.add(topic, partition, committed, since_ms, settled)
        return resume_at

    async def _revoked(self, keys: list[Key], *, lost: bool) -> list[TopicPartition]:
        table = self.partitions
        parts = [table.parts[k] for k in keys if k in table.parts]
        for part in parts:
            table.forget(part, gone=lost)
        if not lost:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.drain_timeout
            while not self._stopping and any(p.inflight for p in parts) and loop.time() < deadline:
                self._settled_evt.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - loop.time()):
                        await self._settled_evt.wait()
        await self._positions.flush(self.ctx.name)  # for the next owner, if it shares the store
        offsets = []
        for part in parts:
            if not part.gone:
                table.forget(part, gone=True)
            if part.inflight:
                self.ctx.logger.warning(
                    "kafka trigger %s: %s revoked while %s was in flight%s; the next owner "
                    "delivers it again",
                    self.ctx.name,
                    part.name,
                    describe_batches(part.inflight),
                    " (lost)" if lost else f" after {self.config.drain_timeout:g}s",
                    extra={"trigger": self.ctx.name},
                )
            pos = part.position
            if not lost and pos is not None and (part.committed is None or pos > part.committed):
                offsets.append(TopicPartition(part.topic, part.partition, pos))
        if parts:
            self.ctx.logger.info(
                "kafka trigger %s: %s %s",
                self.ctx.name,
                "lost" if lost else "revoked",
                ", ".join(p.name for p in parts),
                extra={"trigger": self.ctx.name},
            )
        return offsets

    # --- callbacks from librdkafka (consumer's thread) -----------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._from_thread(self._fail, KafkaException(err))
            return
        code = err.code()
        if code in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._from_thread(setattr, self, "_connected", False)
        self._warn(str(code), "kafka trigger %s: %s", self.ctx.name, err.str())

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        done = [(tp.topic, tp.partition, tp.offset) for tp in partitions if tp.error is None]
        failed = None if err is None else err.str()
        if err is None and len(done) < len(partitions):
            failed = "; ".join(str(tp.error) for tp in partitions if tp.error is not None)
        self._from_thread(self._commit_result, done, failed)

    def _from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _fail(self, e: BaseException) -> None:
        self._failure = e
        self._wake.set()

    def _commit_result(self, done: list[tuple[str, int, int]], failed: str | None) -> None:
        self._commit_pending_since = None
        self._committed(done)
        if failed:
            self._commit_failed(failed)

    def _committed(self, done: list[tuple[str, int, int]]) -> None:
        self._connected = True
        for topic, partition, offset in done:
            part = self.partitions.parts.get((topic, partition))
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def _commit_failed(self, why: str) -> None:
        self._commit_pending_since = None
        for part in self.partitions.parts.values():
            part.commit_sent = part.committed  # sent again by the next cycle
        self._warn("commit", "kafka trigger %s: committing offsets failed: %s", self.ctx.name, why)

    def _warn(self, what: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(what, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[what] = now
            self.ctx.logger.warning(msg, *args, extra={"trigger": self.ctx.name})

    # --- reading ------------------------------------------------------------------------------

    async def read(self) -> SettleDelivery:
        return (await self.read_many(1))[0]

    async def read_many(self, max_n: int) -> Sequence[SettleDelivery]:
        """The next batches of each partition that has one ready (round robin; consecutive
        ones of a partition together, up to :func:`~.partition.pipeline` of them and
        ``PIPELINE_BYTES``), up to ``max_n``; waits for the first."""
        table = self.partitions
        while True:
            if self._closed:
                raise EndOfInput
            if self._failure is not None:
                raise NotConnected(f"the Kafka consumer failed: {describe(self._failure)}")
            if self._client is None:
                raise NotConnected("read() before connect()")
            self._wake.clear()
            now = time.monotonic()
            out: list[SettleDelivery] = []
            while len(out) < max_n:
                part, wait = table.ready(now)
                if part is None:
                    break
                out.append(self._deliver(part))
                while len(out) < max_n and table.more(part, now):
                    out.append(self._deliver(part))
            if out:
                return out
            if wait is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    def _deliver(self, part: Partition) -> SettleDelivery:
        batch, event, raw = self.partitions.take(part, self.ctx.name, self._format)
        return SettleDelivery(
            event,
            functools.partial(self._ack, batch),
            functools.partial(self._nack, batch),
            key=batch,
            abandoned=batch.abandoned,
            order_key=batch.part.key,
            encoded=None if raw is None else (self._format, raw),
        )

    # --- settling (event loop) ----------------------------------------------------------------

    async def _ack(self, batch: Batch) -> None:
        """The batch succeeded or was dead-lettered: its offsets count as settled (their
        position is written with the next flush, or now once the trigger is closed)."""
        try:
            self._settle(batch)
        finally:
            self._positions.mark(batch.part)
            if self._closed:
                await self._positions.flush(self.ctx.name)

    def _settle(self, batch: Batch) -> None:
        if batch.done:
            return
        batch.done = True
        self.partitions.settle(batch)
        self._settled_evt.set()
        self._wake.set()
        if batch.part.gone:
            if self.partitions.hand_over(batch, settled=True):
                return  # the partition came back to us: its new state commits it
            if self._client is None or self._closed:
                raise NotConnected(
                    f"{batch!r} settled after the trigger closed: not committed; it will be "
                    "delivered again"
                )
            self.ctx.logger.warning(
                "kafka trigger %s: %r settled after its partition was revoked: not committed "
                "by this process",
                self.ctx.name,
                batch,
                extra={"trigger": self.ctx.name},
            )
        elif self._client is None:
            raise NotConnected(f"{batch!r} settled after the trigger closed: not committed")

    async def _nack(self, batch: Batch, error: BaseException | None) -> None:
        """Not accepted: the records go back to their partition's buffer (delivered again
        first, after a pause), unless the partition is being given up."""
        if batch.done:
            return
        batch.done = True
        self._settled_evt.set()
        self._wake.set()
        delay = self.partitions.give_back(batch)  # and those handed out after it
        if delay is not None:
            # no error: handed back unrun (a stop, or one before it was handed back)
            self.ctx.logger.log(
                logging.INFO if error is None else logging.WARNING,
                "kafka trigger %s: %r was not accepted (%s); delivering it again in %.1fs",
                self.ctx.name,
                batch,
                "handed back unrun" if error is None else error,
                delay,
                extra={"trigger": self.ctx.name},
            )

    # --- status -------------------------------------------------------------------------------

    def status(self) -> Mapping[str, Any]:
        parts: dict[str, Any] = {}
        lags: dict[str, int | None] = {}
        for part in sorted(self.partitions.parts.values(), key=lambda p: p.key):
            parts[part.name] = part.status()
            lags[part.name] = parts[part.name]["lag"]
        return {
            "group_id": self.group_id,
            "topics": self.topics,
            "connected": self._client is not None and self._failure is None and self._connected,
            "assigned": len(parts),
            "lag": lags,  # per partition (bridge_source_lag{partition=…}); None: not known yet
            "lag_total": sum(n for n in lags.values() if n is not None),
            "partitions": parts,
        }
