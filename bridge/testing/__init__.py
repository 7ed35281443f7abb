"""Test doubles, the source contract suite and a pytest plugin, for tests of the core and of
plugins (laid out like ``trio.testing``: one public namespace over private modules).

- :mod:`bridge.testing._doubles`: the in-memory doubles below;
- :mod:`bridge.testing._contract`: :class:`SourceContract`;
- :mod:`bridge.testing.pytest_plugin`: deselects the contract checks a source has no
  capability for (``pytest_plugins = ["bridge.testing.pytest_plugin"]`` in a top-level
  conftest.py).

Import everything from ``bridge.testing``; the private modules may move.

Doubles (in memory, following the same contracts as the real parts, so a test
written against them can fail for the same reasons):

- :class:`MemoryStore`: a :class:`~bridge.store.StateStore` in a dict.
- :class:`RecordingTarget`: a function runtime (the recording function) that
  records every event and returns, raises or waits as a test tells it to.
- :class:`ListSource`: serves a fixed list of events once and records acks and
  nacks.
- :class:`MemoryBroker` and :class:`MemorySource`: an upstream queue and a
  source over it with real semantics — ack removes, nack redelivers, what was
  read but not acked comes back to the next ``connect()`` or a new instance,
  ``close()`` wakes a pending ``read()``.
- :class:`MemoryDeadLetterSink`: keeps dead-letter records in a list, or fails
  on demand.
- :func:`until`: wait for a condition with a deadline.

The contract suite, :class:`SourceContract`, is what every source runs —
built-in or third-party (like Benthos' stream tests, trio's
``check_one_way_stream``, fsspec's inheritable test classes). Subclass it in a
test module, say what your source is and how to put messages into its
upstream, and pytest collects the inherited checks::

    from bridge.testing import SourceContract

    class TestRedisStreamsContract(SourceContract):
        source_class = RedisStreamsSource
        entry_point = "redis_streams"

        async def setup_upstream(self) -> None:   # a fresh upstream for every check
            self.stream = f"contract-{self.tag}"
            self.redis = Redis.from_url(REDIS_URL)

        async def teardown_upstream(self) -> None:
            await self.redis.delete(self.stream)
            await self.redis.aclose()

        def config_data(self) -> dict[str, Any]:
            return {**super().config_data(), "stream": self.stream, "url": REDIS_URL}

        async def publish(self, payloads: Sequence[str]) -> None:
            for p in payloads:
                await self.redis.xadd(self.stream, {"body": p})

Each check is a plain (synchronous) pytest test that runs one
``asyncio.run()`` under a deadline, so the suite works with any
pytest-asyncio mode, or without pytest-asyncio. Capability flags switch off
what does not apply (a timer has no upstream to publish into); the checks that
remain still run. See :class:`SourceContract` for the list of checks and
hooks, and ``docs/writing-a-source.md``.
"""

from bridge.testing._contract import (
    CONTRACT_FUNCTION,
    CONTRACT_TRIGGER,
    Got,
    SourceContract,
    deselect_inapplicable,
)
from bridge.testing._doubles import (
    ListSource,
    MemoryBroker,
    MemoryDeadLetterSink,
    MemorySource,
    MemorySourceConfig,
    MemoryStore,
    RecordingTarget,
    free_port,
    until,
)

__all__ = [
    "CONTRACT_FUNCTION",
    "CONTRACT_TRIGGER",
    "Got",
    "ListSource",
    "MemoryBroker",
    "MemoryDeadLetterSink",
    "MemorySource",
    "MemorySourceConfig",
    "MemoryStore",
    "RecordingTarget",
    "SourceContract",
    "deselect_inapplicable",
    "free_port",
    "until",
]
