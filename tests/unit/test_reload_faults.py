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


def _source(config: Config, name: str, store: Any, batches: Any = None) -> ListSource:
    """What ``build_source`` builds, of a ListSource (``batches``: the dispatcher's)."""
    function = config.triggers[name].function
    ctx = SourceContext(
        name=name,
        function=function,
        store=store,
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger(name),
        **({} if batches is None else {"batches": lambda: batches(function)}),
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


async def test_a_source_asks_the_dispatcher_whether_its_function_batches_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as (daemon, _):
        # Given a trigger the reload builds again (with the daemon's dispatcher)
        monkeypatch.setattr("bridge.daemon.build_source", _source)
        new = dataclasses.replace(
            daemon.config,
            triggers={"t": TriggerConfig(type="list", function="f", format=Format.NATIVE)},
        )
        assert await daemon.reload(new)
        built = daemon.sources["t"]
        # Then its function does not take several in one round trip (no invoke_many)
        assert built.ctx.batches() is False
        # and when the function's target does, and it has run fast enough for two or more
        # to fit in a round trip, the source sees it at once: it asks
        target = daemon.dispatcher._functions["f"].target
        monkeypatch.setattr(target, "invoke_many", lambda *a, **k: None, raising=False)
        assert built.ctx.batches() is False  # not run yet
        daemon.dispatcher._per_event["f"] = 0.001
        assert built.ctx.batches() is True
        daemon.dispatcher._per_event["f"] = 0.030  # 30 ms each: one per round trip
        assert built.ctx.batches() is False
        # A context built without the dispatcher says no
        assert _source(new, "t", daemon.store).ctx.batches() is False


def test_build_source_gives_the_source_its_functions_answer(tmp_path: Path) -> None:
    # Given a config with a timer of function "f", and the dispatcher's answer per function
    from bridge.config import parse
    from bridge.wiring import build_source

    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "index.py").write_text("def main(event, context):\n    return 1\n")
    config = parse(
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "functions": {"f": {"runtime": "python", "code": "fn", "handler": "index.main"}},
            "triggers": {"t": {"type": "timer", "function": "f", "cron": "*/5 * * * * * *"}},
        },
        base_dir=tmp_path,
    )
    store = SqliteStore(tmp_path)
    asked: list[str] = []

    def batches(function: str) -> bool:
        asked.append(function)
        return function == "f"

    # Then the source's context asks about its own function, each time; without the
    # dispatcher it says no
    ctx = build_source(config, "t", store, batches).ctx
    assert ctx.batches() is True and ctx.batches() is True
    assert asked == ["f", "f"]
    assert build_source(config, "t", store).ctx.batches() is False


async def test_the_sources_a_daemon_starts_with_ask_its_dispatcher(tmp_path: Path) -> None:
    # Given a daemon that builds its own sources (a timer of function "f")
    from tests.unit.test_schedule import daemon_config

    target = RecordingTarget(FunctionConfig(concurrency=1))
    async with Daemon(daemon_config(tmp_path, ["t"]), targets={"f": target}) as daemon:
        ctx = daemon.sources["t"].ctx
        # Then whether "f" takes several deliveries in one round trip is the dispatcher's
        # answer, asked each time
        assert ctx.batches() is False
        target.invoke_many = lambda *a, **k: None  # type: ignore[attr-defined]
        daemon.dispatcher._per_event["f"] = 0.001  # as if it had run, 1 ms each
        assert ctx.batches() is True
