"""The Kafka trigger: a consumer group's records as ordered SCF CKafka batches, and a Kafka
dead-letter sink.

**Source** (``type = "kafka"``, ``ordered = True``). It consumes ``topic`` (names, or
a regex starting with ``^``) in the consumer group ``group_id`` and hands the core
batches of up to ``batch_size`` records and ``max_batch_bytes`` bytes, or fewer once
the oldest has waited ``batch_window``: in one ``read_many`` call, the consecutive
batches each partition has ready (up to ``PIPELINE_RECORDS``, 1,024 records' worth,
``PIPELINE_BATCHES``, 256, and ``PIPELINE_BYTES``, 8 MiB; at least
``PIPELINE_MIN_BATCHES``, 4, the bytes permitting, for a function that runs them in one
round trip, ``SourceContext.batches``), with the
partition as their ``order_key``. The core invokes the function synchronously with
each batch in order (``Records[].Ckafka``; with the python runtime several in one
round trip that stops at the first failure), retries a failed one *in place* under
``[triggers.NAME.retry]`` and dead-letters it when the policy gives up
(:mod:`bridge.ordered`); only then is the batch acked and the next one runs. A
partition hands out more only after all it handed out were settled; partitions
progress independently. On a stop, what was handed out and not started is handed
back unrun.

- **Threads** (:mod:`.client`). The consumer lives on one :class:`~bridge.blocking.Worker` thread and
  every call to it is made there, between polls (confluent-kafka's consumer must
  not be called from two threads at once: a call from a second thread can wait for
  seconds). A task of this source runs *poll cycles* on that thread: apply the
  pause/resume/commit the event loop asked for, poll (at most 100 ms, 10 ms while a
  partition is paused), return up to 1,000 records. The loop never waits for the
  function to poll, so a slow function never pushes the consumer past
  ``max.poll.interval.ms``. Rebalance callbacks run on the worker thread inside a
  poll and hand their work to the event loop, which owns all the partition state.
  A connect attempt (its metadata call waits up to ``CALL_TIMEOUT_S`` with the brokers
  down) cancelled by a stop or reload is abandoned, not waited for; the consumer it made
  is closed when the call ends, failed or not.
- **Back-pressure** is pause/resume per partition, never a blocked poll: a partition
  whose buffer holds its share of ``BUFFER_RECORDS`` (100,000) or ``BUFFER_BYTES``
  (32 MiB) — at least ``max(2 * batch_size, 5000)`` records and ``max_batch_bytes`` —
  or any partition while all buffers together hold 32 MiB, is paused, and resumed once
  its buffer is half drained. (A broker hands out one partition's records in long runs:
  with two batches per buffer, the other partitions waited while one was paused and
  fetched again from scratch.) librdkafka's own prefetch is capped at 16 MiB
  (``queued.max.messages.kbytes``); ``fetch.wait.max.ms`` is 100 and
  ``fetch.queue.backoff.ms`` 10 (librdkafka's 1 s stalled every resumed partition);
  all three may be overridden in ``options``.
- **Offsets** (:mod:`.partition`). ``enable.auto.commit`` and ``enable.auto.offset.store`` are off; the
  bridge commits. Each partition has an :class:`OffsetTracker` (Benthos'
  checkpointer): the offset committed is the end of the longest prefix of handed-out
  batches that are all settled, so an ack that comes out of order never commits
  past an unsettled record. Commits are asynchronous, one at a time, at most every
  100 ms, plus synchronous ones on revoke and at close. After a crash (``kill -9``),
  what was in flight and what settled in the last ~10 ms is delivered again: acks
  mark their partition's settled position, and the marks are written to the state
  store together every 10 ms, on a revoke and at close (:class:`~.partition.Positions`;
  it survives kill -9, and a power loss at worst delivers more again); an assigned
  partition starts from the later of that and the committed offset. At least once,
  never lost. (A stored position is ignored once the group's committed offset was
  moved back below the one known when it was stored: a reset wins.)
- **Rebalance.** On revoke, the partitions' buffers are dropped at once, the batches
  handed out behind each one's oldest in flight report ``abandoned`` (the ordered path
  hands them back unrun) and the callback waits up to ``drain_timeout`` for the
  in-flight batches, then commits what is settled. A batch still running after that is abandoned: its ack commits
  nothing (the next owner delivers it again). If the same partition comes back to
  this process while such a batch still runs, its next batch waits for it, and the
  records it covered are not delivered twice. Such a batch reports ``abandoned``, so
  :mod:`bridge.ordered` stops retrying it (and does not dead-letter it). Lost partitions (the session timed
  out) commit nothing; when one comes back to this process and it had settled
  further than the group's committed offset (its commits failed meanwhile), it
  resumes after what it settled. The eager protocol (librdkafka's default) and
  ``cooperative-sticky`` both work.
- **Shutdown.** The daemon stops reading and gives in-flight batches
  ``shutdown_grace`` to settle; then ``close()`` stops polling, commits what is
  settled (synchronously) and leaves the group. Records read but not settled are
  not committed: the next owner delivers them.
- **start.** A partition without a committed offset starts at the ``latest`` or
  ``earliest`` record, or at the first record at or after a timestamp (looked up
  with ``offsets_for_times``; records older than the timestamp are skipped too, for
  brokers that cannot look it up). A committed offset always wins.
- **Records.** ``msgKey``/``msgBody`` are the key and value as UTF-8 text; those that
  are not UTF-8 are base64-encoded and flagged (``msgKeyBase64``/``msgBodyBase64``).
  A null key or value is ``""``. ``format = "native"`` gives ``{"records": [...]}``
  with offset, timestamp, key, value (``null`` kept) and headers per record (see
  ``docs/kafka.md``). A record larger than ``max_batch_bytes`` travels alone; one
  larger than the 6 MB sync limit is dead-lettered by the core (invalid request).
- **Secrets.** ``options_file`` maps librdkafka properties to files holding their
  values (``"sasl.password" = "/run/credentials/…"``), read at ``connect()``; those
  values and inline ``*password*``/``*secret*`` options are masked in logs.
- **Lag.** ``status()["lag"]`` maps each assigned partition (``topic/N``) to its
  lag, the high watermark (from fetch responses) minus the first unsettled offset:
  the ``bridge_source_lag{trigger, partition}`` metric and ``event-bridge status``.
  ``status()["partitions"]`` adds the committed offset, the settled position, the
  buffered count and whether it is paused.

**Dead-letter sink** (``dead_letter = "kafka://TOPIC?bootstrap_servers=HOST:PORT"``):
see :class:`KafkaDeadLetterSink`.

Layout (one module per concern, as Redpanda Connect splits its Kafka connector):
:mod:`.config` (the trigger's table), :mod:`.client` (the consumer on its thread),
:mod:`.partition` (per-partition buffers, offsets and batches), :mod:`.source` (the
source: polling, rebalances, handing out and settling), :mod:`.sink` (the dead-letter
sink).
"""

from __future__ import annotations

from .config import KafkaConfig, parse_start
from .partition import OffsetTracker
from .sink import KafkaDeadLetterSink, SinkTarget, parse_sink_url, source_range
from .source import KafkaSource

__all__ = [
    "KafkaConfig",
    "KafkaDeadLetterSink",
    "KafkaSource",
    "OffsetTracker",
    "SinkTarget",
    "parse_sink_url",
    "parse_start",
    "source_range",
]
