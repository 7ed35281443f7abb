"""Throttling with the real python runtime: beyond reserved concurrency an invocation fails at
once with SCF's "Resource limit exceed for function", and succeeds again once there is room."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge import config as cfg
from bridge.dispatcher import Dispatcher
from bridge.errors import ErrorClass, Throttled
from bridge.testing import until
from bridge.wiring import build_targets

SLOW = """
import time

def main_handler(event, context):
    time.sleep(event.get("sleep", 0))
    return context.request_id
"""


async def test_throttled_beyond_concurrency_with_real_workers(tmp_path: Path) -> None:
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "index.py").write_text(SLOW)
    config = cfg.parse(
        {"functions": {"slow": {"code": "fn", "concurrency": 2}}}, base_dir=tmp_path, env={}
    )
    d = Dispatcher(build_targets(config))
    await d.start()
    try:
        # Given two invocations holding the function's whole reservation
        busy = [asyncio.create_task(d.invoke("slow", {"sleep": 1.0})) for _ in range(2)]
        await until(lambda: d.in_flight("slow") == 2)
        # When a third arrives, then it is throttled at once, with SCF's message
        with pytest.raises(Throttled) as exc:
            await d.invoke("slow", {})
        assert exc.value.error_class is ErrorClass.THROTTLED
        assert "Resource limit exceed for function slow" in exc.value.message
        results = await asyncio.gather(*busy)
        assert len({r.value for r in results}) == 2
        # and once there is room again, it runs
        assert (await d.invoke("slow", {})).value
    finally:
        await d.close()
