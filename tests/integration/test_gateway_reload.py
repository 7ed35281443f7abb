"""Reloads that start the gateway (the first HTTP trigger) and empty it (the last one goes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge import config as cfg
from bridge.daemon import Daemon

from .gateway_fixtures import exchange, free_port, until, write_config

pytestmark = pytest.mark.integration

FUNCTION = """
[functions.f]
code = "fn"
"""
TRIGGER = """
[triggers.t]
type = "apigw"
function = "f"
path = "/t"
"""
GET = b"GET /t HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"


async def test_first_and_last_http_trigger(tmp_path: Path) -> None:
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "index.py").write_text(
        "def main_handler(event, context):\n    return {'statusCode': 200, 'body': 'hi'}\n"
    )
    port = free_port()
    path = write_config(tmp_path, FUNCTION, port)
    async with Daemon(cfg.load(path)) as d:
        task = asyncio.create_task(d.run_until_stopped())
        try:
            await until(d.ready.is_set, timeout=30, what="the daemon to be ready")
            # Given no HTTP trigger: no listener
            assert d.gateway is None
            with pytest.raises(OSError):
                await exchange(port, GET)
            # When a reload adds one, the gateway starts and serves it
            write_config(tmp_path, FUNCTION + TRIGGER, port)
            assert await d.reload()
            assert d.gateway is not None
            assert (await exchange(port, GET)).endswith(b"\r\n\r\nhi")
            # When the last one goes, the listener stays and answers 404
            write_config(tmp_path, FUNCTION, port)
            assert await d.reload()
            assert (await exchange(port, GET)).startswith(b"HTTP/1.1 404 Not Found\r\n")
        finally:
            d.request_stop()
            await task
