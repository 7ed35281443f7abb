"""Reloads that fail half-way change nothing (build everything first, then swap), and what a
reload changes reaches the queue and the ordered invoker (dead-letter sinks)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bridge.abc import SourceContext
from bridge.config import Config, DaemonConfig, FunctionConfig, TriggerConfig
from bridge.daemon import Daemon
from bridge.events import Format
from bridge.store import SqliteStore
from bridge.testing import ListSource, RecordingTarget, until


def _source(config: Config, name: str, store: Any) -> ListSource:
    ctx = SourceContext(
        name=name,
        function=config.triggers[name].function,
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger(name),
    )
    return ListSource(config.triggers[name], ctx)


@contextlib.asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[Daemon, ListSource]]:
    target = RecordingTarget()
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05),
        functions={"f": target.config},
        triggers={"t": TriggerConfig(type="list", function="f")},
    )
    store = SqliteStore(tmp_path)
    src = _source(config, "t", store)
    daemon = Daemon(config, store=store, targets={"f": target}, sources={"t": src})
    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        await until(lambda: daemon.ready.is_set())
        try:
            yield daemon, src
        finally:
            daemon.request_stop()
            await run


async def test_a_reload_failing_half_way_changes_nothing_and_a_later_one_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as (daemon, src):
        old = daemon.config
        new = dataclasses.replace(
            old, triggers={"t": TriggerConfig(type="list", function="f", format=Format.NATIVE)}
        )

        def broken(*args: Any) -> Any:
            raise RuntimeError("the new source cannot be built")

        # Given building the changed trigger fails,
        monkeypatch.setattr("bridge.daemon.build_source", broken)
        assert not await daemon.reload(new)
        # then the old config runs whole: the trigger was not stopped
        assert daemon.config is old
        assert daemon.sources["t"] is src and not src.closed
        # and a later good reload of the same config restarts it
        monkeypatch.setattr("bridge.daemon.build_source", _source)
        assert await daemon.reload(new)
        assert daemon.config is new
        assert daemon.sources["t"] is not src and src.closed


async def test_a_reload_reaches_the_queues_and_ordered_invokers_sinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as (daemon, _):
        g = RecordingTarget(FunctionConfig(timeout=1.0))
        monkeypatch.setattr("bridge.daemon.build_targets", lambda config, names: {"g": g})
        new = dataclasses.replace(
            daemon.config, functions={**daemon.config.functions, "g": g.config}
        )
        assert await daemon.reload(new)
        assert daemon.queue is not None and daemon.ordered is not None
        # Given a reload added g, its dead letters have a sink in the queue and the invoker
        assert "g" in daemon.queue.dead_letters.sinks and "g" in daemon.ordered.dead_letters.sinks
        assert await daemon.queue.submit("g", {}) is not None
        await until(lambda: len(g.calls) == 1)
