"""The ``http`` runtime against a real aiohttp server and a real bootstrapped web server."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.abc import Invocation, TargetContext
from bridge.errors import (
    BadResult,
    Dropped,
    FunctionError,
    FunctionTimeout,
    InvalidRequest,
    RetryRequested,
    SystemFault,
    Throttled,
)
from bridge.targets.http import HttpConfig, HttpTarget
from bridge.testing import free_port, until

from .conftest import gone

pytestmark = pytest.mark.integration

WEB = Path(__file__).parent / "functions" / "web"
LOGGER = "bridge.functions.test-web"
#: scf_bootstrap is `#!/usr/bin/env python3`: make that the test interpreter
PATH = f"{Path(sys.executable).parent}:{os.defpath}"


def invocation(timeout_s: float = 10.0, **kw: Any) -> Invocation:
    return Invocation(request_id=str(uuid.uuid4()), function="web", timeout_s=timeout_s, **kw)


def make(tmp_path: Path, **fields: Any) -> HttpTarget:
    config = HttpConfig.model_validate(
        {"runtime": "http", **fields}, context={"base_dir": tmp_path, "name": "web"}
    )
    ctx = TargetContext(name="web", state_dir=tmp_path / "state", logger=logging.getLogger(LOGGER))
    return HttpTarget(config, ctx)


# --- against a server in the test process -----------------------------------------------------


class Upstream:
    def __init__(self, server: TestServer) -> None:
        self.server = server

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    release = asyncio.Event()

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"event": await request.json(), "headers": dict(request.headers)})

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="plain words")

    async def json_text(request: web.Request) -> web.Response:
        return web.Response(text='{"as": "text/plain"}')

    async def bad_json(request: web.Request) -> web.Response:
        return web.Response(text="{oops", content_type="application/json")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def status(request: web.Request) -> web.Response:
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        if "ask_retry" in request.query:
            headers["X-Bridge-Retry-After"] = request.query["ask_retry"]
        if "drop" in request.query:
            headers["X-Bridge-Drop"] = request.query["drop"]
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"\nboom {code}\nsecond line", headers=headers)

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/text", text)
    app.router.add_post("/json-text", json_text)
    app.router.add_post("/bad-json", bad_json)
    app.router.add_post("/empty", empty)
    app.router.add_post("/redirect", redirect)
    app.router.add_post("/status/{code}", status)
    app.router.add_post("/slow", slow)
    async with TestServer(app, host="127.0.0.1") as server:
        yield Upstream(server)
        release.set()  # let the slow handler finish, so the server can stop


@pytest.fixture
async def client(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Callable[..., HttpTarget]]:
    started: list[HttpTarget] = []

    def factory(path: str, **fields: Any) -> HttpTarget:
        t = make(tmp_path, url=upstream.url(path), **fields)
        started.append(t)
        return t

    yield factory
    for t in started:
        await t.close()


async def started(t: HttpTarget) -> HttpTarget:
    await t.start()
    return t


async def test_json_result(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/echo"))
    inv = invocation(invocation_type="RequestResponse")
    out = await t.invoke({"Type": "Timer", "Message": "héllo"}, inv)
    assert out["event"] == {"Type": "Timer", "Message": "héllo"}
    headers = out["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-SCF-Request-Id"] == inv.request_id
    assert headers["X-SCF-Function-Name"] == "web"
    assert headers["X-SCF-Invocation-Type"] == "RequestResponse"


async def test_text_results(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/text"))
    assert await t.invoke({}, invocation()) == "plain words"
    # a body that parses as JSON is JSON whatever its content type
    t = await started(client("/json-text"))
    assert await t.invoke({}, invocation()) == {"as": "text/plain"}
    t = await started(client("/empty"))
    assert await t.invoke({}, invocation()) is None


async def test_declared_json_that_is_not(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/bad-json"))
    with pytest.raises(BadResult, match="not valid JSON"):
        await t.invoke({}, invocation())


async def test_caller_headers(client: Callable[..., HttpTarget]) -> None:
    # Given caller headers that try to spoof the bridge's own, plus ordinary ones
    t = await started(client("/echo", headers={"X-Static": "from-config"}))
    inv = invocation(
        headers={
            "X-SCF-Request-Id": "spoofed",
            "x-scf-function-name": "evil",
            "X-Scf-Anything": "nope",
            "X-Custom": "yes",
            "Authorization": "Bearer bridge-token",
            "Connection": "close, X-Drop",
            "X-Drop": "hop-by-hop",
            "Content-Type": "text/plain",
        }
    )
    headers = (await t.invoke({}, inv))["headers"]
    # Then the reserved ones are the bridge's and the others pass through
    assert headers["X-SCF-Request-Id"] == inv.request_id
    assert headers["X-SCF-Function-Name"] == "web"
    assert "X-Scf-Anything" not in headers
    assert headers["X-Custom"] == "yes"
    assert headers["X-Static"] == "from-config"
    assert headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers
    assert "X-Drop" not in headers


async def test_underscore_spellings_of_reserved_headers(client: Callable[..., HttpTarget]) -> None:
    # Regression (issue 15, defect 15): WSGI servers and nginx can read X_SCF_Request_Id as
    # X-SCF-Request-Id, so a caller could forge the bridge's own headers with underscores.
    t = await started(client("/echo"))
    inv = invocation(
        headers={
            "X_SCF_Request_Id": "spoofed",
            "x_scf_function_name": "evil",
            "X-SCF_Invocation-Type": "Event",
            "X_Custom": "kept",
        }
    )
    headers = (await t.invoke({}, inv))["headers"]
    forged = [k for k in headers if k.lower().replace("_", "-").startswith("x-scf-")]
    assert sorted(forged) == ["X-SCF-Function-Name", "X-SCF-Invocation-Type", "X-SCF-Request-Id"]
    assert headers["X-SCF-Request-Id"] == inv.request_id
    assert headers["X-SCF-Invocation-Type"] == inv.invocation_type
    assert headers["X_Custom"] == "kept"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (400, InvalidRequest),
        (403, InvalidRequest),
        (404, InvalidRequest),
        (413, InvalidRequest),
        (429, Throttled),
        (500, FunctionError),
        (502, SystemFault),
        (503, SystemFault),
    ],
)
async def test_status_mapping(client: Callable[..., HttpTarget], code: int, kind: type) -> None:
    t = await started(client(f"/status/{code}"))
    with pytest.raises(kind) as e:
        await t.invoke({}, invocation())
    assert type(e.value) is kind
    assert e.value.message == f"HTTP {code} from {t.config.endpoint}: boom {code}"
    assert e.value.detail == f"\nboom {code}\nsecond line"
    assert e.value.retry_after_s is None


async def test_retry_after(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/status/429?retry_after=7"))
    with pytest.raises(Throttled) as e:
        await t.invoke({}, invocation())
    assert e.value.retry_after_s == 7.0
    # an HTTP-date on a 503
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    t = await started(client(f"/status/503?retry_after={when}"))
    with pytest.raises(SystemFault) as e2:
        await t.invoke({}, invocation())
    assert e2.value.retry_after_s is not None
    assert 100 < e2.value.retry_after_s <= 120


async def test_function_asks_for_retry_or_drop(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/status/500?ask_retry=30"))
    with pytest.raises(RetryRequested) as e:
        await t.invoke({}, invocation())
    assert e.value.retry_after_s == 30.0
    t = await started(client("/status/200?drop=spam"))
    with pytest.raises(Dropped, match="spam"):
        await t.invoke({}, invocation())


async def test_redirect_is_not_followed(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/redirect"))
    with pytest.raises(FunctionError, match="HTTP 302"):
        await t.invoke({}, invocation())


async def test_timeout(client: Callable[..., HttpTarget]) -> None:
    t = await started(client("/slow"))
    with pytest.raises(FunctionTimeout, match=r"^Invoking task timed out after 0.5 seconds$"):
        await t.invoke({}, invocation(timeout_s=0.5))


async def test_connection_refused(tmp_path: Path) -> None:
    t = make(tmp_path, url=f"http://user:pw@127.0.0.1:{free_port()}/fn?key=secret")
    await t.start()
    try:
        with pytest.raises(SystemFault, match=r"cannot connect to http://127\.0\.0\.1:") as e:
            await t.invoke({}, invocation())
        assert "pw" not in e.value.message and "secret" not in e.value.message
    finally:
        await t.close()
        await t.close()  # idempotent


# --- a bootstrapped web server ----------------------------------------------------------------


@pytest.fixture
async def web_fn(tmp_path: Path) -> AsyncIterator[Callable[..., HttpTarget]]:
    made: list[HttpTarget] = []

    def factory(code: Path = WEB, **env: str) -> HttpTarget:
        t = make(
            tmp_path,
            bootstrap=True,
            code=str(code),
            port=free_port(),
            environment={"PATH": PATH, **env},
            ready_timeout="20s",
        )
        made.append(t)
        return t

    yield factory
    for t in made:
        await t.close()


async def test_bootstrap_invoke(
    web_fn: Callable[..., HttpTarget],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setenv("EB_TEST_SECRET", "s3cr3t")
    t = web_fn(GREETING="hi")
    await t.start()
    inv = invocation()
    out = await t.invoke({"Message": "hello"}, inv)
    assert out["event"] == {"Message": "hello"}
    assert out["path"] == "/"
    assert out["headers"]["X-SCF-Request-Id"] == inv.request_id
    assert out["env"] == {
        "SCF_FUNCTIONNAME": "web",
        "PORT": str(t.config.port),
        "TZ": "UTC",
        "GREETING": "hi",
        "EB_TEST_SECRET": None,
    }
    assert out["cwd"] == str(WEB)
    # the server's output is logged, tagged with the function
    await until(
        lambda: any(r.getMessage().startswith("request:") for r in caplog.records),
        what="the request log line",
    )
    lines = [
        r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("listening")
    ]
    assert lines and getattr(lines[0], "function", None) == "web"


async def test_bootstrap_restarts_after_a_crash(web_fn: Callable[..., HttpTarget]) -> None:
    # Given a running web function
    t = web_fn()
    await t.start()
    first = (await t.invoke({}, invocation()))["pid"]
    # When its server is killed from outside
    os.kill(first, signal.SIGKILL)
    await until(lambda: not t.running, what="the target to notice the crash")
    # Then invocations fail as system errors while it is down
    with pytest.raises(
        SystemFault, match=r"web server of function web is not running \(restarting\)"
    ):
        await t.invoke({}, invocation())
    # and work again once it was restarted
    await until(lambda: t.running, what="the restart")
    second = (await t.invoke({}, invocation()))["pid"]
    assert second != first


async def test_close_stops_the_whole_group(web_fn: Callable[..., HttpTarget]) -> None:
    t = web_fn(SPAWN_HELPER="1")
    await t.start()
    out = await t.invoke({}, invocation())
    assert out["helper"]
    await t.close()
    assert not t.running
    await until(lambda: gone(out["pid"]) and gone(out["helper"]), what="the processes to end")
    with pytest.raises(SystemFault):
        await t.invoke({}, invocation())


def script(tmp_path: Path, body: str) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    boot = code / "scf_bootstrap"
    boot.write_text("#!/bin/sh\n" + body)
    boot.chmod(0o755)
    return code


async def test_bootstrap_that_exits(tmp_path: Path, web_fn: Callable[..., HttpTarget]) -> None:
    t = web_fn(script(tmp_path, "echo 'cannot bind' >&2\nexit 3\n"))
    with pytest.raises(SystemFault, match="web server of function web exited with status 3") as e:
        await t.start()
    assert e.value.detail == "cannot bind"


async def test_bootstrap_that_never_listens(tmp_path: Path) -> None:
    code = script(tmp_path, "exec sleep 600\n")
    t = make(tmp_path, bootstrap=True, code=str(code), port=free_port(), ready_timeout="300ms")
    try:
        with pytest.raises(SystemFault, match=r"did not listen on port \d+ within 0.3s"):
            await t.start()
    finally:
        await t.close()


async def test_port_already_in_use(web_fn: Callable[..., HttpTarget]) -> None:
    t = web_fn()
    with socket.socket() as s:
        s.bind(("127.0.0.1", t.config.port))
        s.listen()
        with pytest.raises(SystemFault, match="already in use"):
            await t.start()


async def test_bootstrap_removed_after_validation(
    tmp_path: Path, web_fn: Callable[..., HttpTarget]
) -> None:
    code = tmp_path / "copy"
    shutil.copytree(WEB, code)
    t = web_fn(code)
    (code / "scf_bootstrap").unlink()
    with pytest.raises(SystemFault, match="cannot run"):
        await t.start()
