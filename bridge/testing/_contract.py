"""The source contract suite, :class:`SourceContract` (see :mod:`bridge.testing`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, NoReturn
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from bridge.abc import (
    BackOff,
    Delivery,
    EndOfInput,
    NotConnected,
    Source,
    SourceContext,
    SourceSignal,
)
from bridge.config import TriggerConfig
from bridge.events import Event, Format, dumps, loads, render
from bridge.testing._doubles import MemoryStore

# --- the source contract suite ------------------------------------------------------------------

#: the trigger name the suite gives every source it builds
CONTRACT_TRIGGER = "contract"
CONTRACT_FUNCTION = "contract-fn"


def _skip(reason: str) -> NoReturn:
    import pytest  # only the suite needs pytest; the doubles above do not

    pytest.skip(reason)


def deselect_inapplicable(config: Any, items: list[Any]) -> None:
    """``pytest_collection_modifyitems`` for suites that subclass :class:`SourceContract`:
    checks that do not apply to a source (a capability it lacks) are deselected, so a
    run reports only checks that ran — nothing is "skipped". Load it with the pytest plugin
    (``pytest_plugins = ["bridge.testing.pytest_plugin"]`` in a top-level conftest.py).
    """
    keep, drop = [], []
    for item in items:
        cls = getattr(item, "cls", None)
        if (
            cls is not None
            and issubclass(cls, SourceContract)
            and cls().inapplicable(item.originalname)
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@dataclasses.dataclass
class Got:
    """A delivery the suite read, with the payloads :meth:`SourceContract.payloads_of` found."""

    delivery: Delivery
    payloads: list[str]


class SourceContract:
    """The checks every source plugin passes. Subclass it as ``Test<Name>Contract``.

    **Say what the source is** (class attributes):

    - ``source_class``: the :class:`~bridge.abc.Source` subclass.
    - ``sample_config``: the plugin's keys of a valid ``[triggers.NAME]`` table;
      :meth:`config_data` adds ``type`` and ``function``. Override
      :meth:`config_data` when the table depends on the check (a fresh stream name).
    - ``entry_point``: the name it registers under ``bridge.sources``; when set, a
      check loads it through :mod:`bridge.registry` and expects ``source_class``.

    **Say what it can do** (capability flags; checks that need a capability the
    source lacks are skipped with the reason):

    - ``can_publish`` (True): the test can put messages into the upstream with
      :meth:`publish`. False for a timer: then only the lifecycle and schema checks
      run, and the plugin adds checks of its own (tests/contract/test_timer_contract.py).
    - ``supports_reconnect`` (True): a new instance with the same config and state
      store resumes the same upstream state (a consumer group, a queue, a checkpoint).
    - ``supports_nack_redelivery`` (True): ``nack()`` makes the upstream deliver the
      message again (within ``redelivery_timeout_s``), to this instance.
    - ``has_positions`` (False): the source checkpoints a position (an offset), so
      after a reconnect it may deliver again messages that were acked *after* an
      unacked one; without positions, acked messages never come back.
    - ``max_unsettled`` (None): how many deliveries the source hands out before one
      is acked (1 for an ordered single-partition source); checks needing more run
      a sequential variant or are skipped.

    **Timing** (seconds): ``quiet_s`` (how long "nothing arrives" is watched),
    ``redelivery_timeout_s`` (how long a delivery may take to come, or come back:
    raise it for an upstream with a visibility timeout), ``close_timeout_s`` (how
    long ``close()`` and an interrupted ``read()`` may take), ``check_timeout_s``
    (the deadline of a whole check), ``backoff_cap_s`` (the longest the suite
    honours a :class:`~bridge.abc.BackOff` before reading again).

    **Hooks** (override what applies): :meth:`setup_upstream` /
    :meth:`teardown_upstream` (async, around every check: give each check a fresh
    upstream, e.g. a new stream or topic named after :attr:`tag`), :meth:`publish`
    (async: put messages with these payloads into the upstream), :meth:`payloads_of`
    (which published payloads an event carries), :meth:`make_source` (build an
    instance; the default validates :meth:`config_data` with ``source_class.Config``).
    To use pytest fixtures in hooks, give the subclass an autouse fixture method that
    keeps them on ``self`` (pytest calls it on the instance that runs the check).

    **Helpers** for a plugin's own checks, usable inside :meth:`run`: :attr:`store`
    (the check's :class:`MemoryStore`), :attr:`tag` (unique per check),
    :meth:`new_source`, :meth:`next_delivery`, :meth:`expect_payloads`,
    :meth:`expect_quiet`, :meth:`publish_and_read`.

    **The checks**: the config model documents every field and round-trips; the
    entry point loads; connect/close; ``close()`` idempotent, without ``connect()``,
    and unblocking a pending ``read()`` (EndOfInput); a cancelled ``read()``
    leaves the source usable; published messages arrive as well-formed events that
    render in every format; ack removes; nack redelivers (or at least does not
    raise); at least once through a reconnect; nothing committed before ``ack()``;
    no over-commit on out-of-order acks; settling after ``close()`` does not hang.
    """

    source_class: ClassVar[type[Source[Any]]]
    sample_config: ClassVar[Mapping[str, Any]] = {}
    entry_point: ClassVar[str | None] = None

    can_publish: ClassVar[bool] = True
    supports_reconnect: ClassVar[bool] = True
    supports_nack_redelivery: ClassVar[bool] = True
    has_positions: ClassVar[bool] = False
    max_unsettled: ClassVar[int | None] = None

    quiet_s: ClassVar[float] = 0.3
    redelivery_timeout_s: ClassVar[float] = 10.0
    close_timeout_s: ClassVar[float] = 5.0
    check_timeout_s: ClassVar[float] = 60.0
    backoff_cap_s: ClassVar[float] = 0.05

    #: set by :meth:`run` for the duration of one check
    store: MemoryStore
    tag: str

    # --- hooks ----------------------------------------------------------------------------

    def config_data(self) -> dict[str, Any]:
        """The ``[triggers.NAME]`` table the sources of a check are built from."""
        return {
            "type": self.entry_point or "contract",
            "function": CONTRACT_FUNCTION,
            **self.sample_config,
        }

    def make_config(self, data: Mapping[str, Any] | None = None) -> TriggerConfig:
        """``data`` (default: :meth:`config_data`) validated as the core does."""
        model = self.source_class.Config
        context = {"timezone": "UTC", "name": CONTRACT_TRIGGER}
        return model.model_validate(dict(data or self.config_data()), context=context)

    def make_source(self, ctx: SourceContext, data: Mapping[str, Any] | None = None) -> Source[Any]:
        """A new, unconnected instance. Override to pass what the constructor needs."""
        return self.source_class(self.make_config(data), ctx)

    async def setup_upstream(self) -> None:
        """Before each check (inside its event loop): make a fresh upstream."""

    async def teardown_upstream(self) -> None:
        """After each check, even a failed one: delete what setup_upstream made."""

    async def publish(self, payloads: Sequence[str]) -> None:
        """Put one upstream message per payload, in order."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement publish() (or set can_publish = False)"
        )

    def payloads_of(self, event: Event) -> list[str]:
        """The published payloads ``event`` carries, one per record. The default reads the
        record's ``body`` (CMQ), ``value`` (Kafka), ``message`` (timer) or ``key`` (COS)."""
        out = []
        for record in event.records:
            for key in ("body", "value", "message", "key"):
                if key in record:
                    out.append(str(record[key]))
                    break
            else:
                raise AssertionError(
                    f"cannot find a payload in record {dict(record)}: override payloads_of()"
                )
        return out

    # --- running a check ------------------------------------------------------------------

    def run(self, check: Callable[[], Awaitable[None]]) -> None:
        """Run ``check`` in a fresh event loop: set up the upstream, run it under
        ``check_timeout_s``, close every source it made, tear the upstream down."""

        async def main() -> None:
            self.store = MemoryStore()
            self.tag = uuid.uuid4().hex[:12]
            self._sources: list[Source[Any]] = []
            await self.setup_upstream()
            try:
                try:
                    async with asyncio.timeout(self.check_timeout_s):
                        await check()
                except TimeoutError:
                    raise AssertionError(
                        f"the check did not finish within check_timeout_s={self.check_timeout_s}"
                    ) from None
                finally:
                    for src in self._sources:
                        with contextlib.suppress(Exception):
                            await self.close_source(src)
            finally:
                await self.teardown_upstream()

        asyncio.run(main())

    def context(self, name: str = CONTRACT_TRIGGER) -> SourceContext:
        return SourceContext(
            name=name,
            function=CONTRACT_FUNCTION,
            store=self.store,
            timezone=ZoneInfo("UTC"),
            logger=logging.getLogger(f"contract.{name}"),
        )

    async def new_source(
        self, *, connect: bool = True, data: Mapping[str, Any] | None = None
    ) -> Source[Any]:
        """A new instance over the same upstream and state store (a restart), connected
        unless ``connect=False``; closed at the end of the check."""
        src = self.make_source(self.context(), data)
        self._sources.append(src)
        if connect:
            await asyncio.wait_for(src.connect(), self.redelivery_timeout_s)
        return src

    def payload(self, i: int) -> str:
        """The ``i``-th payload of this check (unique across checks)."""
        return f"contract-{self.tag}-{i}"

    async def next_delivery(self, src: Source[Any], timeout: float | None = None) -> Delivery:
        """The next delivery, read the way the core reads: NotConnected → ``connect()``,
        BackOff → wait (at most ``backoff_cap_s``) and read again."""
        limit = self.redelivery_timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while True:
                    try:
                        return await src.read()
                    except BackOff as b:
                        await asyncio.sleep(min(b.delay_s, self.backoff_cap_s))
                    except NotConnected:
                        await src.connect()
        except TimeoutError:
            raise AssertionError(f"read() returned no delivery within {limit}s") from None
        except EndOfInput:
            raise AssertionError(
                "read() raised EndOfInput while deliveries were expected"
            ) from None

    async def next_got(self, src: Source[Any], timeout: float | None = None) -> Got:
        d = await self.next_delivery(src, timeout)
        return Got(d, self.payloads_of(d.event))

    async def publish_and_read(
        self, src: Source[Any], n: int, start: int = 0, *, ack: bool = False
    ) -> list[Got]:
        """Publish payloads ``start .. start+n-1`` one at a time, reading each before the
        next is published, so each delivery carries exactly one (no batching); with
        ``ack=True`` each is acked before the next is published."""
        out = []
        for i in range(start, start + n):
            await self.publish([self.payload(i)])
            got = await self.next_got(src)
            assert got.payloads == [self.payload(i)], (
                f"published {self.payload(i)!r} alone, but the delivery carries {got.payloads}"
            )
            out.append(got)
            if ack:
                await got.delivery.ack()
        return out

    async def expect_payloads(
        self,
        src: Source[Any],
        expected: Collection[str],
        *,
        allowed: Collection[str] = (),
        forbidden_why: str = "it was acked",
        ack: bool = True,
    ) -> list[Got]:
        """Read until every payload of ``expected`` arrived, acking each delivery as it
        arrives (unless ``ack=False``: an ordered source waits for the ack before it
        delivers more). Payloads in ``allowed`` may arrive too; anything else fails."""
        missing = set(expected)
        out: list[Got] = []
        while missing:
            try:
                got = await self.next_got(src)
            except AssertionError as e:
                raise AssertionError(
                    f"{sorted(missing)} did not come (back) within {self.redelivery_timeout_s}s "
                    f"({e})"
                ) from None
            out.append(got)
            for p in got.payloads:
                if p in missing:
                    missing.discard(p)
                elif p in allowed or p in expected:
                    continue
                elif p.startswith(f"contract-{self.tag}-"):
                    raise AssertionError(f"{p!r} was delivered again, though {forbidden_why}")
                else:
                    raise AssertionError(
                        f"got {p!r}, which this check never published: give every check a "
                        "fresh upstream in setup_upstream()"
                    )
            if ack:
                await got.delivery.ack()
        return out

    async def expect_quiet(self, src: Source[Any], within: float | None = None) -> None:
        """Nothing is delivered for ``within`` seconds (default ``quiet_s``). The pending
        read is cancelled afterwards."""
        window = self.quiet_s if within is None else within
        task = asyncio.ensure_future(self.next_delivery(src, timeout=window + 3600))
        done, _ = await asyncio.wait({task}, timeout=window)
        if done:
            d = task.result()
            raise AssertionError(
                f"expected nothing, but read() returned {self.payloads_of(d.event)}"
            )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SourceSignal):
            await task

    async def _read_until_closed(self, src: Source[Any]) -> Delivery:
        while True:
            try:
                return await src.read()
            except BackOff as b:
                await asyncio.sleep(min(b.delay_s, self.backoff_cap_s))

    async def close_source(self, src: Source[Any], when: str = "") -> None:
        """``close()`` within ``close_timeout_s``; any exception fails the check."""
        try:
            await asyncio.wait_for(src.close(), self.close_timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"close(){when} did not return within {self.close_timeout_s}s"
            ) from None
        except Exception as e:
            raise AssertionError(f"close(){when} raised {e!r}") from e

    #: the capabilities each check needs (see inapplicable())
    _NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "test_published_messages_arrive_as_well_formed_events": ("can_publish",),
        "test_ack_removes": ("can_publish", "supports_reconnect"),
        "test_nack_redelivers": ("can_publish", "supports_nack_redelivery"),
        "test_nack_does_not_raise": ("can_publish",),
        "test_unacked_deliveries_come_back_after_a_reconnect": (
            "can_publish",
            "supports_reconnect",
        ),
        "test_nothing_is_committed_before_ack": ("can_publish", "supports_reconnect"),
        "test_out_of_order_acks_do_not_over_commit": ("can_publish", "supports_reconnect"),
        "test_settling_after_close_does_not_hang": ("can_publish",),
        "test_read_many_returns_one_to_max_n": ("can_publish",),
    }

    def inapplicable(self, check: str) -> str | None:
        """Why ``check`` does not apply to this source (a capability it lacks), or None.

        :func:`deselect_inapplicable` uses it so such checks are not collected at all
        (rather than reported as skipped); called directly, a check still skips."""
        for cap in self._NEEDS.get(check, ()):
            if not getattr(self, cap):
                return f"{type(self).__name__}.{cap} is False"
        if check == "test_entry_point_loads_the_class" and self.entry_point is None:
            return f"{type(self).__name__}.entry_point is not set"
        if check == "test_out_of_order_acks_do_not_over_commit" and not self._unsettled_at_least(3):
            return f"max_unsettled={self.max_unsettled}: acks never come out of order"
        return None

    def _need(self, *capabilities: str) -> None:
        for cap in capabilities:
            if not getattr(self, cap):
                _skip(f"{type(self).__name__}.{cap} is False")

    def _unsettled_at_least(self, n: int) -> bool:
        return self.max_unsettled is None or self.max_unsettled >= n

    # --- schema ---------------------------------------------------------------------------

    def test_config_model_documents_every_field(self) -> None:
        model = getattr(self.source_class, "Config", None)
        assert isinstance(model, type) and issubclass(model, TriggerConfig), (
            f"{self.source_class.__name__}.Config must be a TriggerConfig subclass"
        )
        assert model.model_config.get("extra") == "forbid", "unknown keys must be rejected"
        undocumented = [n for n, f in model.model_fields.items() if not f.description]
        assert not undocumented, f"config fields without Field(description=...): {undocumented}"

    def test_config_round_trips(self) -> None:
        async def check() -> None:  # in run(): config_data() may use what setup_upstream set
            config = self.make_config()
            dumped = config.model_dump(mode="json", by_alias=True)
            again = self.make_config(dumped)
            assert again == config, f"model_dump() does not validate back the same: {dumped}"
            assert again.model_dump(mode="json", by_alias=True) == dumped
            try:
                self.make_config({**dumped, "no_such_key": 1})
            except ValidationError:
                return
            raise AssertionError("an unknown config key was accepted")

        self.run(check)

    def test_entry_point_loads_the_class(self) -> None:
        if self.entry_point is None:
            _skip(f"{type(self).__name__}.entry_point is not set")
        from bridge import registry

        assert registry.source(self.entry_point) is self.source_class

    # --- lifecycle ------------------------------------------------------------------------

    def test_connect_and_close(self) -> None:
        async def check() -> None:
            src = await self.new_source()
            await self.close_source(src)
            await self._expect_end_of_input(src, "after close()")

        self.run(check)

    def test_close_is_idempotent(self) -> None:
        async def check() -> None:
            src = await self.new_source()
            await self.close_source(src)
            await self.close_source(src, " called a second time")

        self.run(check)

    def test_close_without_connect(self) -> None:
        async def check() -> None:
            src = await self.new_source(connect=False)
            await self.close_source(src, " without connect()")
            await self.close_source(src, " called a second time without connect()")
            await self._expect_end_of_input(src, "after close() without connect()")

        self.run(check)

    async def _expect_end_of_input(self, src: Source[Any], when: str) -> None:
        try:
            d = await asyncio.wait_for(self._read_until_closed(src), self.close_timeout_s)
        except EndOfInput:
            return
        except TimeoutError:
            raise AssertionError(
                f"read() {when} did not return within {self.close_timeout_s}s"
            ) from None
        except SourceSignal as e:
            raise AssertionError(f"read() {when} must raise EndOfInput, not {e!r}") from None
        raise AssertionError(f"read() {when} returned a delivery: {self.payloads_of(d.event)}")

    def test_close_unblocks_a_pending_read(self) -> None:
        async def check() -> None:
            src = await self.new_source()
            reading = asyncio.ensure_future(self._read_until_closed(src))
            done, _ = await asyncio.wait({reading}, timeout=self.quiet_s)
            if done and reading.exception() is None:
                raise AssertionError(
                    f"read() on an idle upstream returned {self.payloads_of(reading.result().event)}"
                )
            assert not done, f"read() on an idle upstream raised {reading.exception()!r}"
            await self.close_source(src)
            done, _ = await asyncio.wait({reading}, timeout=self.close_timeout_s)
            if not done:
                reading.cancel()
                raise AssertionError(
                    f"a read() pending when close() was called still waits {self.close_timeout_s}s later"
                )
            exc = reading.exception()
            assert isinstance(exc, EndOfInput), (
                f"a read() pending at close() must raise EndOfInput, not {exc!r}"
            )

        self.run(check)

    def test_a_cancelled_read_leaves_the_source_usable(self) -> None:
        async def check() -> None:
            src = await self.new_source()
            reading = asyncio.ensure_future(self._read_until_closed(src))
            done, _ = await asyncio.wait({reading}, timeout=self.quiet_s)
            assert not done, "read() on an idle upstream did not wait"
            reading.cancel()
            done, _ = await asyncio.wait({reading}, timeout=self.close_timeout_s)
            assert done, f"a cancelled read() still runs {self.close_timeout_s}s later"
            if not reading.cancelled():
                outcome = reading.exception() or f"a delivery {reading.result().event!r}"
                raise AssertionError(f"a cancelled read() must raise CancelledError: {outcome!r}")
            if self.can_publish:
                # nothing was lost and the source still delivers (after a reconnect if it asks)
                await self.publish([self.payload(0)])
                got = await self.next_got(src)
                assert got.payloads == [self.payload(0)]
                await got.delivery.ack()
            await self.close_source(src)

        self.run(check)

    # --- deliveries -------------------------------------------------------------------------

    def test_published_messages_arrive_as_well_formed_events(self) -> None:
        self._need("can_publish")

        async def check() -> None:
            src = await self.new_source()
            expected = [self.payload(i) for i in range(3)]
            await self.publish(expected)
            gots = await self.expect_payloads(src, expected, forbidden_why="it was read already")
            for got in gots:
                ev = got.delivery.event
                assert isinstance(ev, Event), f"Delivery.event must be an Event, not {type(ev)}"
                assert ev.trigger == CONTRACT_TRIGGER, "Event.trigger must be ctx.name"
                assert ev.time.tzinfo is not None
                for fmt in Format:
                    rendered = render(ev, fmt)
                    dumps(rendered)  # every format renders to JSON
                    # what the source hands over encoded is what rendering gives
                    assert loads(got.delivery.encoded(fmt).raw) == loads(dumps(rendered)), (
                        f"Delivery.encoded({fmt.value!r}) must decode to render(event, "
                        f"{fmt.value!r})"
                    )

        self.run(check)

    def test_ack_removes(self) -> None:
        self._need("can_publish", "supports_reconnect")

        async def check() -> None:
            # Given two deliveries acked, when a new instance starts
            first = await self.new_source()
            await self.publish_and_read(first, 2, ack=True)
            await self.close_source(first)
            second = await self.new_source()
            # Then only what is published next arrives
            await self.publish([self.payload(9)])
            await self.expect_payloads(second, [self.payload(9)])
            await self.expect_quiet(second)

        self.run(check)

    def test_nack_redelivers(self) -> None:
        self._need("can_publish", "supports_nack_redelivery")

        async def check() -> None:
            src = await self.new_source()
            (got,) = await self.publish_and_read(src, 1)
            await got.delivery.nack(RuntimeError("contract: not accepted"))
            await self.expect_payloads(src, [self.payload(0)])
            if self.supports_reconnect:
                await self.close_source(src)
                src = await self.new_source()
                await self.publish([self.payload(9)])
                await self.expect_payloads(src, [self.payload(9)])

        self.run(check)

    def test_read_many_returns_one_to_max_n(self) -> None:
        self._need("can_publish")

        async def check() -> None:
            # Given three payloads published, when the core reads with room for two at a time
            src = await self.new_source()
            expected = [self.payload(i) for i in range(3)]
            await self.publish(expected)
            seen: list[str] = []
            try:
                async with asyncio.timeout(self.redelivery_timeout_s):
                    while not set(expected) <= set(seen):
                        try:
                            batch = await src.read_many(2)
                        except BackOff as b:
                            await asyncio.sleep(min(b.delay_s, self.backoff_cap_s))
                            continue
                        except NotConnected:
                            await src.connect()
                            continue
                        # Then every call returns at least one delivery and never more than asked
                        assert 1 <= len(batch) <= 2, f"read_many(2) returned {len(batch)}"
                        for d in batch:
                            seen.extend(self.payloads_of(d.event))
                            await d.ack()
            except TimeoutError:
                raise AssertionError(
                    f"read_many() delivered {seen}, not all of {expected}, within "
                    f"{self.redelivery_timeout_s}s"
                ) from None

        self.run(check)

    def test_nack_does_not_raise(self) -> None:
        self._need("can_publish")

        async def check() -> None:
            src = await self.new_source()
            (got,) = await self.publish_and_read(src, 1)
            await asyncio.wait_for(got.delivery.nack(None), self.close_timeout_s)

        self.run(check)

    def test_unacked_deliveries_come_back_after_a_reconnect(self) -> None:
        self._need("can_publish", "supports_reconnect")
        n = 3 if self._unsettled_at_least(3) else (self.max_unsettled or 1)

        async def check() -> None:
            # Given n deliveries read and never settled (the process stopped)
            first = await self.new_source()
            gots = await self.publish_and_read(first, n)
            await self.close_source(first)
            # Then a new instance delivers them again
            second = await self.new_source()
            await self.expect_payloads(second, [p for g in gots for p in g.payloads])

        self.run(check)

    def test_nothing_is_committed_before_ack(self) -> None:
        self._need("can_publish", "supports_reconnect")

        async def check() -> None:
            first = await self.new_source()
            if self._unsettled_at_least(2):
                # Given two deliveries read, and only the first acked (in order)
                a, b = await self.publish_and_read(first, 2)
                await a.delivery.ack()
            else:
                (a,) = await self.publish_and_read(first, 1)
                await a.delivery.ack()
                (b,) = await self.publish_and_read(first, 1, start=1)
            await self.close_source(first)
            # Then the unacked one comes back to a new instance, the acked one does not
            second = await self.new_source()
            await self.expect_payloads(second, b.payloads)
            await self.expect_quiet(second)

        self.run(check)

    def test_out_of_order_acks_do_not_over_commit(self) -> None:
        self._need("can_publish", "supports_reconnect")
        if not self._unsettled_at_least(3):
            _skip(f"max_unsettled={self.max_unsettled}: acks never come out of order")

        async def check() -> None:
            # Given three deliveries, the third and then the second acked, the first not
            first = await self.new_source()
            a, b, c = await self.publish_and_read(first, 3)
            await c.delivery.ack()
            await b.delivery.ack()
            await self.close_source(first)
            # Then the first comes back; the acked ones may only for a positional source
            second = await self.new_source()
            acked = [*b.payloads, *c.payloads]
            await self.expect_payloads(
                second,
                a.payloads,
                allowed=acked if self.has_positions else (),
                forbidden_why="it was acked and the source has no positions (has_positions)",
            )
            if not self.has_positions:
                await self.expect_quiet(second)

        self.run(check)

    def test_settling_after_close_does_not_hang(self) -> None:
        self._need("can_publish")

        async def check() -> None:
            # Given a delivery still being accepted when its trigger stopped
            src = await self.new_source()
            (got,) = await self.publish_and_read(src, 1)
            await self.close_source(src)
            # Then acking it returns (or raises: the upstream then redelivers) promptly
            try:
                await asyncio.wait_for(got.delivery.ack(), self.close_timeout_s)
            except TimeoutError:
                raise AssertionError(
                    f"ack() after close() still waits {self.close_timeout_s}s later"
                ) from None
            except Exception:
                pass

        self.run(check)
