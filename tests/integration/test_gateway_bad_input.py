"""Bad input at the gateway: never a crash, never a 500 from our side, a clear 4xx or a
closed connection, and the next good request is served."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from .gateway_fixtures import exchange, free_port, running, write_config

pytestmark = pytest.mark.integration

FUNCS = """
def echo(event, context):
    return {"statusCode": 200, "body": event["path"]}
"""

CONFIG = """header_timeout = "1s"
body_timeout = "1s"

[functions.echo]
code = "fn"
handler = "funcs.echo"

[triggers.echo]
type = "apigw"
function = "echo"
path = "/{any+}"
"""

GOOD = b"GET /fine HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"

BAD = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "no HTTP version": b"GET /x\r\n\r\n",
    "a header line without a colon": b"GET /x HTTP/1.1\r\nHost: gw\r\nNo colon here\r\n\r\n",
    "a bad Content-Length": b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: ten\r\n\r\n",
    "an oversized header": b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "too many headers": b"GET /x HTTP/1.1\r\n" + b"X-H: 1\r\n" * 200_000 + b"\r\n",
    "an oversized request line": b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
    "raw invalid UTF-8 in the path": b"GET /\xff\xfe HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    "percent-encoded invalid UTF-8 in the path": b"GET /a%C3%28 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    "invalid UTF-8 in the query": b"GET /a?x=%FF&y=\xff HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    "invalid UTF-8 in a header": b"GET /a HTTP/1.1\r\nHost: gw\r\nX-Name: \xff\xfe\r\nConnection: close\r\n\r\n",
    "a bad chunked body": b"POST /a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "both Content-Length and chunked": b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "a NUL in the path": b"GET /a\x00b HTTP/1.1\r\nHost: gw\r\n\r\n",
}


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, int]:
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "funcs.py").write_text(FUNCS)
    port = free_port()
    return write_config(tmp_path, CONFIG, port), port


def status(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/1."):
        return None
    return int(raw.split(b" ", 2)[1])


async def test_bad_requests(config: tuple[Path, int]) -> None:
    path, port = config
    async with running(path) as d:
        answers = {}
        for name, raw in BAD.items():
            with contextlib.suppress(ConnectionResetError):
                answers[name] = status(await exchange(port, raw, timeout=10))
        # no answer at all (a reset) is acceptable; a 5xx from the gateway is not
        server_errors = {k: v for k, v in answers.items() if v is not None and v >= 500}
        assert server_errors == {}
        refused = {k for k, v in answers.items() if v is not None and 400 <= v < 500}
        assert refused >= set(BAD) - {
            "no HTTP version",  # read as HTTP/0.9: the connection is closed
            "too many headers",  # may be reset while the client still sends
            "invalid UTF-8 in a header",
        }
        # a header value that is not UTF-8 is passed on with U+FFFD, not refused
        assert answers["invalid UTF-8 in a header"] == 200
        # the daemon is still serving
        assert status(await exchange(port, GOOD)) == 200
        assert d.state.value == "running"


async def test_slow_headers_are_cut(config: tuple[Path, int]) -> None:
    path, port = config
    async with running(path):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: gw\r\n")  # and never the blank line
        await writer.drain()
        async with asyncio.timeout(15):
            rest = await reader.read(-1)  # the server closes the connection
        assert rest == b""
        writer.close()
        assert status(await exchange(port, GOOD)) == 200


async def test_slow_body_gets_408(config: tuple[Path, int]) -> None:
    path, port = config
    async with running(path):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /slow HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()  # 90 bytes never come
        async with asyncio.timeout(15):
            raw = await reader.read(-1)
        writer.close()
        assert status(raw) == 408
        assert b"did not arrive within 1s" in raw
        assert status(await exchange(port, GOOD)) == 200


async def test_client_leaving_mid_invocation(config: tuple[Path, int], tmp_path: Path) -> None:
    (tmp_path / "fn" / "funcs.py").write_text(
        FUNCS
        + "\nimport time\ndef sleepy(event, context):\n    time.sleep(0.5)\n    return {'statusCode': 200}\n"
    )
    path, port = config
    path.write_text(
        path.read_text()
        + '\n[functions.sleepy]\ncode = "fn"\nhandler = "funcs.sleepy"\n'
        + '[triggers.sleepy]\ntype = "apigw"\nfunction = "sleepy"\npath = "/sleepy"\n'
    )
    async with running(path) as d:
        for _ in range(3):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /sleepy HTTP/1.1\r\nHost: gw\r\n\r\n")
            await writer.drain()
            writer.close()  # gone before the answer
        assert (
            status(
                await exchange(
                    port, b"GET /sleepy HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
                )
            )
            == 200
        )
        assert d.state.value == "running"
