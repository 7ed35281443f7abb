"""Web functions behind the gateway: a real scf_bootstrap server, the raw request proxied
(method, path, query, headers, body) and 20 MB streamed each way without buffering."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from .gateway_fixtures import exchange, free_port, running, until, write_config

pytestmark = pytest.mark.integration

WEB = Path(__file__).parent / "functions" / "stream"
SIZE = 20 * 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, int]:
    shutil.copytree(WEB, tmp_path / "web")
    port = free_port()
    path = write_config(
        tmp_path,
        f"""max_body = "64MB"

[functions.web]
runtime = "http"
bootstrap = true
code = "web"
port = {free_port()}
timeout = "60s"

[triggers.site]
type = "function_url"
function = "web"
path = "/"

[triggers.api]
type = "apigw"
function = "web"
path = "/api/{{rest+}}"
method = ["GET", "POST"]
""",
        port,
    )
    return path, port


async def test_raw_request_is_proxied(config: tuple[Path, int]) -> None:
    path, port = config
    async with (
        running(path),
        aiohttp.ClientSession() as s,
        s.put(
            f"http://127.0.0.1:{port}/headers/x%20y?a=1&a=2&flag",
            data=b"payload",
            headers={
                "X-Trace": "kept",
                "X-SCF-Request-Id": "forged",
                "X_SCF_Request_Id": "forged",
                "x_scf_function_name": "forged",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
            },
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["X-Web"] == "stream"
        rid = r.headers["X-Request-Id"]
        got = await r.json()
    assert got["method"] == "PUT"
    assert got["path"] == "/headers/x%20y?a=1&a=2&flag"
    headers = {k: v for k, v in got["headers"]}
    assert headers["X-Trace"] == "kept"
    assert headers["Content-Length"] == "7"
    scf = {k: v for k, v in headers.items() if k.lower().replace("_", "-").startswith("x-scf-")}
    assert scf == {
        "X-SCF-Request-Id": rid,
        "X-SCF-Function-Name": "web",
        "X-SCF-Invocation-Type": "RequestResponse",
    }
    assert "X-Hop" not in headers


async def test_head_and_method_rules(config: tuple[Path, int]) -> None:
    path, port = config
    async with running(path):
        raw = await exchange(port, b"HEAD /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        assert raw.endswith(b"\r\n\r\n")  # no body after the head
        raw = await exchange(
            port, b"DELETE /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
        )
        # /api/{rest+} allows GET and POST only: the "/" prefix (every method) serves DELETE
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        got = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert (got["method"], got["path"]) == ("DELETE", "/api/x")
        assert got["headers"][0] == ["Host", "gw"]


async def test_streamed_download(config: tuple[Path, int], tmp_path: Path) -> None:
    # Given a web function that sends 64 KiB and then waits for the client to say it got them
    path, port = config
    gate = tmp_path / "gate"
    url = f"http://127.0.0.1:{port}/download?size={SIZE}&gate={gate}"
    async with running(path), aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(SIZE)
        # When the first bytes arrive before the function has sent the rest
        async with asyncio.timeout(20):
            first = await r.content.readexactly(CHUNK)
        gate.touch()
        digest = hashlib.sha256(first)
        n = len(first)
        async for chunk in r.content.iter_any():
            digest.update(chunk)
            n += len(chunk)
    # Then the whole body came through, unchanged
    assert n == SIZE
    assert digest.hexdigest() == hashlib.sha256(b"\xab" * SIZE).hexdigest()


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
async def test_streamed_upload(config: tuple[Path, int], tmp_path: Path, with_length: bool) -> None:
    # Given a client that sends 64 KiB and waits until the function has received them
    path, port = config
    mark = tmp_path / "mark"
    block = bytes(range(256)) * (CHUNK // 256)

    async def body() -> AsyncIterator[bytes]:
        yield block
        await until(mark.exists, timeout=20, what="the function to receive the first bytes")
        for _ in range(SIZE // CHUNK - 1):
            yield block

    headers = {"Content-Length": str(SIZE)} if with_length else {}
    async with (
        running(path),
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/upload?mark={mark}", data=body(), headers=headers) as r,
    ):
        assert r.status == 200
        got = await r.json()
    # Then the function got all of it, streamed through the gateway
    assert got == {"size": SIZE, "sha256": hashlib.sha256(block * (SIZE // CHUNK)).hexdigest()}


async def test_web_function_body_limit(tmp_path: Path) -> None:
    shutil.copytree(WEB, tmp_path / "web")
    port = free_port()
    path = write_config(
        tmp_path,
        f"""max_body = "1MB"
[functions.web]
runtime = "http"
bootstrap = true
code = "web"
port = {free_port()}
[triggers.site]
type = "function_url"
function = "web"
""",
        port,
    )

    async def body() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * CHUNK

    async with running(path), aiohttp.ClientSession() as s:
        raw = await exchange(
            port,
            b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000001\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 413 ")
        # chunked, so the limit is found while streaming
        async with s.post(f"http://127.0.0.1:{port}/upload", data=body()) as r:
            assert r.status == 413
            assert "gateway.max_body" in (await r.json())["error"]
