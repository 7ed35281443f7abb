"""The Kafka consumer on its own thread: the narrow protocol this trigger uses (fakes in tests
implement it), and :class:`Client`, which makes every call to the consumer from one
:class:`~bridge.blocking.Worker` thread, between polls.

confluent-kafka's consumer must not be called from two threads at once (a call from a
second thread can wait for seconds), so the event loop never calls it: it hands each
*poll cycle* what to do (:class:`Ops`: pause, resume, commit, read watermarks) and gets
back what was fetched (:class:`Polled`). Rebalance callbacks run on the same thread,
inside a poll.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from bridge.plugin import Worker

POLL_TIMEOUT_S = 0.1  # longest one poll cycle blocks: how late a pause or commit can be
POLL_PAUSED_S = 0.01  # ... while a partition is paused (so that it resumes promptly)
CONSUME_CHUNK = 1000  # records taken from librdkafka per cycle, at most (~3 ms of the loop)
CALL_TIMEOUT_S = 10.0  # broker calls made while (re)joining: metadata, committed offsets

Key = tuple[str, int]  # (topic, partition)


#: what varies between repeats of one librdkafka line (its retries while a broker is down)
_VARYING = re.compile(r"\(after \d+ms in state \w+\)|\d+ identical error\(s\) suppressed")


class RdkafkaLog:
    """librdkafka's log lines (the consumer's ``logger``) for ``logger``, a repeated one at
    most every ``every_s``: with a broker down, librdkafka logs each reconnect attempt, about
    20 ``ERROR`` lines a second, which the trigger's own warning (throttled) already says.
    A line at ``warning`` or above whose facility and text (but for the elapsed time in it)
    were logged less than ``every_s`` ago is counted, not logged; the next one logged says
    how many were left out. Lines below ``warning`` (the ``debug`` option's) all pass.
    Called on the consumer's thread."""

    MAX_KEYS = 1000

    def __init__(self, logger: logging.Logger, trigger: str, every_s: float = 60.0) -> None:
        self.logger, self.trigger, self.every_s = logger, trigger, every_s
        self._seen: dict[tuple[int, str, str], list[float]] = {}  # key → [logged at, left out]
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING and len(args) == 3:
            fac, _, text = args
            key = (level, str(fac), _VARYING.sub("", str(text)))
            now = time.monotonic()
            with self._lock:
                seen = self._seen.get(key)
                if seen is not None and now - seen[0] < self.every_s:
                    seen[1] += 1
                    return
                if len(self._seen) >= self.MAX_KEYS:
                    self._seen.clear()
                since, left_out = (now, 0) if seen is None else (seen[0], int(seen[1]))
                self._seen[key] = [now, 0]
            if left_out:
                msg += " (%d more like it in the last %.0f s not logged)"
                args = (*args, left_out, now - since)
        self.logger.log(level, msg, *args, extra={"trigger": self.trigger})


class Message(Protocol):
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...
    def error(self) -> KafkaError | None: ...


Rebalance = Callable[[Any, list[TopicPartition]], None]


class Consumer(Protocol):
    """The part of ``confluent_kafka.Consumer`` this trigger calls (all from one thread)."""

    def subscribe(
        self, topics: list[str], on_assign: Rebalance, on_revoke: Rebalance, on_lost: Rebalance
    ) -> None: ...
    def poll(self, timeout: float) -> Message | None: ...
    def consume(self, num_messages: int, timeout: float) -> Sequence[Message]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> Any: ...
    def committed(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]: ...
    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]: ...
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int] | None: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...
    def close(self) -> None: ...


def real_consumer(conf: dict[str, Any]) -> Consumer:
    return cast(Consumer, confluent_kafka.Consumer(conf))


def describe(e: BaseException) -> str:
    """An error for a log line: a KafkaError's name and text."""
    if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
        err: KafkaError = e.args[0]
        return f"{err.name()}: {err.str()}"
    return str(e) or type(e).__name__


@dataclasses.dataclass(slots=True)
class Ops:
    """What the event loop asks the polling thread to do before its next poll."""

    pause: list[TopicPartition] = dataclasses.field(default_factory=list)
    resume: list[TopicPartition] = dataclasses.field(default_factory=list)
    commit: list[TopicPartition] = dataclasses.field(default_factory=list)
    watermarks: list[TopicPartition] = dataclasses.field(default_factory=list)
    timeout: float = POLL_TIMEOUT_S


@dataclasses.dataclass(slots=True)
class Polled:
    """What one poll cycle brought back."""

    messages: list[Message]
    watermarks: dict[Key, int]
    commit_error: str | None = None


Committed = list[tuple[str, int, int]]  # (topic, partition, offset) the brokers took


class Client:
    """One consumer and the thread all calls to it are made on."""

    def __init__(self, worker: Worker, consumer: Consumer, name: str, log: logging.Logger) -> None:
        self.worker = worker
        self.consumer = consumer
        self.name = name  # the trigger's, for log lines
        self.log = log

    @classmethod
    async def open(
        cls,
        name: str,
        conf: dict[str, Any],
        factory: Callable[[dict[str, Any]], Consumer],
        topics: list[str],
        rebalance: tuple[Rebalance, Rebalance, Rebalance],
        log: logging.Logger,
    ) -> Client:
        """Create the consumer on a new thread, check the brokers answer, subscribe with the
        ``(on_assign, on_revoke, on_lost)`` callbacks."""
        worker = Worker(f"kafka-{name}")
        attempt = worker.submit(_open, conf, factory, topics, rebalance, name, log)
        try:
            consumer = await asyncio.wrap_future(attempt)
        except asyncio.CancelledError:
            # a stop or reload: not waiting for the brokers' answer (up to CALL_TIMEOUT_S
            # with them down). An attempt that fails closes its consumer (_open); one that
            # got through has the consumer it made closed
            attempt.add_done_callback(_close_unclaimed)
            worker.abandon()
            raise
        except BaseException:
            await worker.aclose()
            raise
        return cls(worker, consumer, name, log)

    async def cycle(self, ops: Ops) -> Polled:
        """Apply ``ops``, then poll once (at most ``ops.timeout``), on the consumer's thread."""
        return await self.worker.run(self._cycle, ops)

    def _cycle(self, ops: Ops) -> Polled:
        consumer = self.consumer
        polled = Polled([], {})
        if ops.pause:
            quietly(consumer.pause, ops.pause, self.name, self.log)
        if ops.resume:
            quietly(consumer.resume, ops.resume, self.name, self.log)
        if ops.commit:
            try:
                consumer.commit(offsets=ops.commit, asynchronous=True)
            except KafkaException as e:
                polled.commit_error = describe(e)
        for tp in ops.watermarks:
            try:
                marks = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if marks is not None and marks[1] >= 0:
                polled.watermarks[(tp.topic, tp.partition)] = marks[1]
        first = consumer.poll(ops.timeout)
        if first is not None:
            polled.messages.append(first)
            polled.messages.extend(consumer.consume(CONSUME_CHUNK, 0))
        return polled

    def commit_sync(self, consumer: Any, offsets: list[TopicPartition], when: str) -> Committed:
        """On the consumer's thread (a rebalance callback, shutdown): commit and wait; returns
        what was committed (nothing if the commit failed, which is logged)."""
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            self.log.warning(
                "kafka trigger %s: commit %s failed (%s); those records will be delivered again",
                self.name,
                when,
                describe(e),
                extra={"trigger": self.name},
            )
            return []
        return [(tp.topic, tp.partition, tp.offset) for tp in result or offsets if tp.error is None]

    async def shutdown(self, offsets: list[TopicPartition]) -> Committed:
        """Commit ``offsets`` (synchronously), leave the group and stop the thread."""
        try:
            return await self.worker.run(self._shutdown, offsets)
        finally:
            await self.worker.aclose()

    def _shutdown(self, offsets: list[TopicPartition]) -> Committed:
        done = self.commit_sync(self.consumer, offsets, "at shutdown") if offsets else []
        try:
            self.consumer.close()
        except Exception as e:
            self.log.warning(
                "kafka trigger %s: closing the consumer failed: %s",
                self.name,
                describe(e),
                extra={"trigger": self.name},
            )
        return done


def _close_unclaimed(attempt: concurrent.futures.Future[Consumer]) -> None:
    """A connect attempt given up on got through after all: close the consumer it made
    (subscribed, never polled), on a thread of its own, off the event loop."""
    if attempt.cancelled() or attempt.exception() is not None:
        return
    consumer = attempt.result()

    def close() -> None:
        with contextlib.suppress(Exception):
            consumer.close()

    threading.Thread(target=close, name="bridge-kafka-close", daemon=True).start()


def quietly(
    call: Callable[[list[TopicPartition]], None],
    tps: list[TopicPartition],
    name: str,
    log: logging.Logger,
) -> None:
    """Pause or resume, on the consumer's thread; a partition revoked meanwhile is fine."""
    try:
        call(tps)
    except KafkaException as e:
        log.debug("kafka trigger %s: %s", name, describe(e))


def _open(
    conf: dict[str, Any],
    factory: Callable[[dict[str, Any]], Consumer],
    topics: list[str],
    rebalance: tuple[Rebalance, Rebalance, Rebalance],
    name: str,
    log: logging.Logger,
) -> Consumer:
    """On the worker thread: create, check the brokers answer, subscribe."""
    consumer = factory(conf)
    try:
        try:
            meta = consumer.list_topics(timeout=CALL_TIMEOUT_S)
        except KafkaException as e:
            raise ConnectionError(
                f"no Kafka broker answered at {conf['bootstrap.servers']} within "
                f"{CALL_TIMEOUT_S:.0f}s ({describe(e)})"
            ) from None
        known = getattr(meta, "topics", {}) or {}
        missing = [t for t in topics if not t.startswith("^") and t not in known]
        if missing:
            log.warning(
                "kafka trigger %s: topic(s) %s do not exist (yet); waiting for them",
                name,
                ", ".join(missing),
                extra={"trigger": name},
            )
        on_assign, on_revoke, on_lost = rebalance
        consumer.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    except BaseException:
        with contextlib.suppress(Exception):
            consumer.close()
        raise
    return consumer
