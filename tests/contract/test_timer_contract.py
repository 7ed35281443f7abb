"""sources.timer against the source contract suite.

A timer has no upstream a test can publish into, so ``can_publish`` is off and the
queue-style checks are skipped; the lifecycle and schema checks run as for any source.
What the queue-style checks prove for a broker — ack checkpoints, unacked events come
back, nack commits nothing, no over-commit — is checked here on the timer's own
checkpoint, the last-fire time, through ``catchup = "all"``: missed ticks are what a
restarted timer redelivers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, ClassVar

from bridge.abc import Delivery, Source
from bridge.testing import CONTRACT_TRIGGER, SourceContract
from sources.timer import TimerSource


def years_ago(n: int) -> datetime:
    return datetime(datetime.now(UTC).year - n, 1, 1, tzinfo=UTC)


class TestTimerContract(SourceContract):
    source_class = TimerSource
    entry_point = "timer"
    # @yearly: nothing is due while a check runs, so read() blocks, as on an idle queue
    sample_config: ClassVar[dict[str, Any]] = {"cron": "@yearly", "catchup": "all"}
    can_publish = False
    supports_nack_redelivery = False  # a tick cannot be handed back
    has_positions = True  # the last-fire time
    redelivery_timeout_s = 2.0  # missed ticks are due at connect(); nothing comes later

    async def restarted_after(self, years: int) -> Source[Any]:
        """A timer whose last acked tick was Jan 1 ``years`` years ago: the ``years`` ticks
        missed since (Jan 1 of each later year, this one included) are due at connect()."""
        await self.store.set_last_fire(CONTRACT_TRIGGER, years_ago(years))
        return await self.new_source()

    async def ticks(self, src: Source[Any], n: int) -> list[Delivery]:
        return [await self.next_delivery(src) for _ in range(n)]

    def test_ack_checkpoints_the_last_fire_and_nack_does_not(self) -> None:
        async def check() -> None:
            src = await self.restarted_after(3)
            a, b, _ = await self.ticks(src, 3)
            assert [a.event.time, b.event.time] == [years_ago(2), years_ago(1)]
            await b.nack(RuntimeError("not accepted"))
            assert self.store.last_fire[CONTRACT_TRIGGER] == years_ago(3)
            await a.ack()
            assert self.store.last_fire[CONTRACT_TRIGGER] == years_ago(2)

        self.run(check)

    def test_acked_ticks_do_not_fire_again_after_a_restart(self) -> None:
        async def check() -> None:
            src = await self.restarted_after(2)
            for d in await self.ticks(src, 2):
                await d.ack()
            await asyncio.wait_for(src.close(), self.close_timeout_s)
            again = await self.new_source()
            await self.expect_quiet(again)

        self.run(check)

    def test_unacked_ticks_fire_again_after_a_restart(self) -> None:
        async def check() -> None:
            # Given three missed ticks read, only the first acked, then a restart
            src = await self.restarted_after(3)
            a, _, _ = await self.ticks(src, 3)
            await a.ack()
            await asyncio.wait_for(src.close(), self.close_timeout_s)
            # Then the two unacked ones fire again, oldest first, and nothing else
            again = await self.new_source()
            times = [d.event.time for d in await self.ticks(again, 2)]
            assert times == [years_ago(1), years_ago(0)]
            await self.expect_quiet(again)

        self.run(check)

    def test_out_of_order_acks_of_missed_ticks_do_not_over_commit(self) -> None:
        async def check() -> None:
            # Given three missed ticks, the last one acked first (acks are concurrent)
            src = await self.restarted_after(3)
            a, b, c = await self.ticks(src, 3)
            await c.ack()
            await asyncio.wait_for(src.close(), self.close_timeout_s)
            # Then a restart fires the two unacked ticks again
            again = await self.new_source()
            times = [d.event.time for d in await self.ticks(again, 2)]
            assert times == [a.event.time, b.event.time]

        self.run(check)
