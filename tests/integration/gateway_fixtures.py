"""A daemon in this process serving HTTP triggers on a free port, and a raw-socket client.

The daemon is the real one (real python workers, real scf_bootstrap servers, the real
listener); running it in-process lets tests reload it and read its metrics directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

from bridge import config as cfg
from bridge.daemon import Daemon
from bridge.testing import free_port, until


def write_config(root: Path, text: str, port: int) -> Path:
    p = root / "bridge.toml"
    body = textwrap.dedent(text).replace("@PORT@", str(port)).replace("@ROOT@", str(root))
    p.write_text(
        f'[daemon]\nstate_dir = "state"\nshutdown_grace = "5s"\n\n[gateway]\nlisten = "127.0.0.1:{port}"\n'
        + body
    )
    return p


@contextlib.asynccontextmanager
async def running(path: Path) -> AsyncIterator[Daemon]:
    """Run the daemon of ``path`` until the block ends."""
    config = cfg.load(path)
    async with Daemon(config) as d:
        task = asyncio.create_task(d.run_until_stopped())
        try:
            await until(lambda: d.gateway is not None and d.gateway.port is not None, timeout=30)
            yield d
        finally:
            d.request_stop()
            await task


async def exchange(port: int, raw: bytes, *, timeout: float = 30.0) -> bytes:
    """Send ``raw`` on a fresh connection and read the whole answer (the connection is
    closed by ``Connection: close`` in the request, or by the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


_RID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DATE = re.compile(rb"\r\nDate: [^\r]+")


def normalized(response: bytes) -> bytes:
    """The response with its variable parts replaced: request ids and the Date header."""
    return _RID.sub(b"<RID>", _DATE.sub(b"\r\nDate: <DATE>", response))


__all__ = ["exchange", "free_port", "normalized", "running", "until", "write_config"]
