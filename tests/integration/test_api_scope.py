"""The HTTP API served by an in-process daemon over real sockets: bodies that arrive in pieces,
the auth matrix generated from the router (every route, every 401 and 403), and token scopes
on dead letters, replays and "not found" answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bridge.config import ApiConfig, ApiToken, Config, DaemonConfig, FunctionConfig
from bridge.daemon import Daemon
from bridge.deadletter import record, row
from bridge.errors import HandlerFailed
from bridge.store import QueueItem, SqliteStore
from bridge.testing import RecordingTarget, until

ADMIN = "admin-0123456789abcdef"
READER = "reader-0123456789abcdef"
INVOKER = "invoker-0123456789abcdef"
A_ADMIN = "a-admin-0123456789abcdef"
A_READER = "a-reader-0123456789abcdef"
A_INVOKER = "a-invoker-0123456789abcdef"
WRONG = "wrong-0123456789abcdef00"

TOKENS = {
    ADMIN: (["*"], ["admin"]),
    READER: (["*"], ["read"]),
    INVOKER: (["*"], ["invoke"]),
    A_ADMIN: (["a*"], ["admin"]),
    A_READER: (["a*"], ["read"]),
    A_INVOKER: (["a*"], ["invoke"]),
}
#: the routes served without a token; every other route must answer 401 without one
OPEN = {"/healthz", "/openapi.json"}
#: the action each route needs (a new route must be added here, or the matrix test fails)
ACTIONS = {
    ("GET", "/readyz"): "read",
    ("GET", "/metrics"): "read",
    ("GET", "/status"): "read",
    ("GET", "/deadletters"): "read",
    ("GET", "/deadletters/{id}"): "read",
    ("POST", "/deadletters/replay"): "admin",
    ("POST", "/functions/{name}/invocations"): "invoke",
}


@contextlib.asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[Daemon, str]]:
    tokens = [
        ApiToken(name=f"tok{i}", secret=s, functions=fns, actions=acts)
        for i, (s, (fns, acts)) in enumerate(TOKENS.items())
    ]
    targets = {n: RecordingTarget(FunctionConfig()) for n in ("a", "b")}
    config = Config(
        daemon=DaemonConfig(state_dir=tmp_path, queue_poll=0.05),
        api=ApiConfig(enabled=True, listen="127.0.0.1:0", tokens=tokens),
        functions={n: t.config for n, t in targets.items()},
    )
    daemon = Daemon(config, store=SqliteStore(tmp_path), targets=targets, sources={})
    async with daemon:
        run = asyncio.create_task(daemon.run_until_stopped())
        await until(lambda: daemon.api is not None and daemon.api.port and daemon.ready.is_set())
        assert daemon.api is not None
        try:
            yield daemon, f"http://127.0.0.1:{daemon.api.port}"
        finally:
            daemon.request_stop()
            await run


async def _dead_letter(daemon: Daemon, function: str, rid: str, at: float) -> None:
    item = QueueItem(
        id=rid,
        function=function,
        payload=json.dumps({"rid": rid}),
        request_source="API",
        accepted_at=at,
        due_at=at,
        attempts=1,
    )
    await daemon.store.dead_letter(
        None, row(record(item, HandlerFailed("no"), reason="test", now=at), at)
    )


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- bodies in pieces ------------------------------------------------------------------------


async def _raw(port: int, head: bytes, *parts: bytes) -> tuple[int, bytes, bool]:
    """Send ``head`` and ``parts`` as separate writes; before each later part, check that the
    server did not answer yet. Returns (status, body, answered_early)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + parts[0])
        await writer.drain()
        early = False
        for part in parts[1:]:
            # an answer now would be to a body the server has not seen whole
            try:
                first = await asyncio.wait_for(reader.readexactly(1), 0.5)
            except TimeoutError:
                first = b""
            if first:
                early = True
                rest = await reader.read()
                return _status(first + rest), rest, early
            writer.write(part)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        return _status(answer), answer, early
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("kind", ["RequestResponse", "Event"])
async def test_a_body_in_two_tcp_segments_is_read_whole(tmp_path: Path, kind: str) -> None:
    async with serving(tmp_path) as (daemon, _):
        assert daemon.api is not None and daemon.api.port is not None
        body = json.dumps({"greeting": "hello " * 100}).encode()
        head = (
            f"POST /functions/a/invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {ADMIN}\r\nX-Invocation-Type: {kind}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        status, answer, early = await _raw(daemon.api.port, head, body[:40], body[40:])
        assert not early, answer
        assert status == (200 if kind == "RequestResponse" else 202), answer


async def test_a_chunked_event_body_over_128k_is_413(tmp_path: Path) -> None:
    async with serving(tmp_path) as (daemon, _):
        assert daemon.api is not None and daemon.api.port is not None
        body = json.dumps({"x": "y" * 150_000}).encode()
        head = (
            f"POST /functions/a/invocations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {ADMIN}\r\nX-Invocation-Type: Event\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        first, rest = body[:60_000], body[60_000:]
        status, answer, early = await _raw(
            daemon.api.port, head, _chunk(first), _chunk(rest) + _chunk(b"")
        )
        assert not early, answer
        assert status == 413, answer
        assert b"event_too_large" in answer


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_a_chunked_event_body_under_the_limit_is_accepted(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_, base):

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"x": "'
            yield b"y" * 60_000
            yield b'"}'

        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{base}/functions/a/invocations",
                data=chunks(),
                headers={**_auth(ADMIN), "X-Invocation-Type": "Event"},
            ) as r,
        ):
            assert r.status == 202, await r.text()


# --- the auth matrix, from the router --------------------------------------------------------


def _allowed(token: str, action: str, function: str | None) -> bool:
    fns, acts = TOKENS[token]
    if action not in acts and "admin" not in acts:
        return False
    return function is None or any(f == "*" or function.startswith(f.rstrip("*")) for f in fns)


async def test_auth_matrix_covers_every_route(tmp_path: Path) -> None:
    async with serving(tmp_path) as (daemon, base):
        assert daemon.api is not None
        await _dead_letter(daemon, "a", "dl-a", time.time())
        routes = {
            (r.method, r.resource.canonical)
            for r in daemon.api.app.router.routes()
            if r.resource is not None
            and r.method != "HEAD"
            # the console signs in once and then uses its session cookie; its access rules
            # are tested in test_console.py
            and not r.resource.canonical.startswith("/ui")
        }
        # every route is either open or has a known action: a new one cannot be left out
        assert routes == {(m, p) for m, p in routes if p in OPEN} | set(ACTIONS), routes
        rows = 0
        async with aiohttp.ClientSession() as s:
            for method, path in sorted(routes):
                for function in ("a", "b") if "{name}" in path else (None,):
                    url = base + path.replace("{name}", function or "").replace("{id}", "dl-a")
                    body = {} if method == "POST" else None
                    for token in (None, WRONG, *TOKENS):
                        async with s.request(method, url, json=body, headers=_auth(token)) as r:
                            status = r.status
                        rows += 1
                        where = f"{method} {url} with {token}: {status}"
                        if path in OPEN:
                            assert status == 200, where
                        elif token is None or token == WRONG:
                            assert status == 401, where
                            assert r.headers.get("WWW-Authenticate") == "Bearer", where
                        elif _allowed(token, ACTIONS[(method, path)], function):
                            assert status not in (401, 403), where
                        else:
                            assert status == 403, where
        assert rows == sum(16 if "{name}" in p else 8 for _, p in routes)


# --- scopes on dead letters, replays and "not found" -----------------------------------------


async def test_a_read_token_lists_and_shows_only_its_functions_dead_letters(tmp_path: Path) -> None:
    async with serving(tmp_path) as (daemon, base):
        now = time.time()
        await _dead_letter(daemon, "a", "dl-a", now)
        await _dead_letter(daemon, "b", "dl-b", now)
        async with aiohttp.ClientSession(headers=_auth(A_READER)) as s:
            async with s.get(f"{base}/deadletters") as r:
                items = (await r.json())["items"]
            assert [i["RequestId"] for i in items] == ["dl-a"]
            async with s.get(f"{base}/deadletters/dl-b") as r:
                assert r.status == 404
            async with s.get(f"{base}/deadletters?function=b") as r:
                assert r.status == 403


async def test_the_scope_applies_before_the_limit(tmp_path: Path) -> None:
    async with serving(tmp_path) as (daemon, base):
        now = time.time()
        for i in range(3):  # older dead letters of a function outside the token's scope
            await _dead_letter(daemon, "b", f"dl-b{i}", now - 100 + i)
        await _dead_letter(daemon, "a", "dl-a", now)
        async with (
            aiohttp.ClientSession(headers=_auth(A_READER)) as s,
            s.get(f"{base}/deadletters?limit=1") as r,
        ):
            body = await r.json()
        assert [i["RequestId"] for i in body["items"]] == ["dl-a"]


async def test_replay_touches_only_the_admin_tokens_functions(tmp_path: Path) -> None:
    async with serving(tmp_path) as (daemon, base):
        now = time.time()
        await _dead_letter(daemon, "a", "dl-a", now)
        await _dead_letter(daemon, "b", "dl-b", now)
        async with aiohttp.ClientSession(headers=_auth(A_ADMIN)) as s:
            async with s.post(f"{base}/deadletters/replay", json={"function": "b"}) as r:
                assert r.status == 403
            async with s.post(f"{base}/deadletters/replay", json={"ids": ["dl-a", "dl-b"]}) as r:
                assert (await r.json())["replayed"] == ["dl-a"]
            async with s.post(f"{base}/deadletters/replay", json={}) as r:
                assert (await r.json())["replayed"] == []
        assert [r.id for r in await daemon.store.list_dead_letters()] == ["dl-b"]


@pytest.mark.parametrize("kind", ["RequestResponse", "Event"])
async def test_not_found_names_only_the_functions_in_the_tokens_scope(
    tmp_path: Path, kind: str
) -> None:
    async with serving(tmp_path) as (daemon, base):
        async with (
            aiohttp.ClientSession(headers=_auth(A_INVOKER)) as s,
            s.post(
                f"{base}/functions/a-missing/invocations",
                json={},
                headers={"X-Invocation-Type": kind},
            ) as r,
        ):
            assert r.status == 404
            message = (await r.json())["errorMessage"]
        assert "a-missing not found" in message and "a" in message
        assert "b" not in message.replace("a-missing", "")
        text = daemon.metrics.render().decode()
        assert "a-missing" not in text
