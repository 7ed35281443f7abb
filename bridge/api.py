"""The HTTP API (aiohttp): SCF's Invoke API, health, readiness, metrics, status, dead letters.

Routes (``GET /openapi.json`` describes them in full):

=========================================  ======  ==========================================
``POST /functions/{name}/invocations``      invoke  ``X-Invocation-Type: RequestResponse``
                                                    (default: run it, return the result or the
                                                    SCF-style error) or ``Event`` (accepted into
                                                    the durable queue: 202 and the request id)
``GET /healthz``                            open    the process is alive
``GET /readyz``                             read    started (503 until then); names triggers
                                                    not connected, with their last error
``GET /metrics``                            read    Prometheus text format
``GET /status``                             read    triggers, next fires, in flight, queue, DLQ
``GET /deadletters[?function=F&limit=N]``   read    dead letters, oldest first
``GET /deadletters/{id}``                   read    one dead letter
``POST /deadletters/replay``                admin   ``{"function": F, "ids": [...]}`` → requeued
``GET /openapi.json``                       open    this API's OpenAPI description
=========================================  ======  ==========================================

Auth: ``Authorization: Bearer <token>`` against ``[[api.tokens]]`` (compared in
constant time; secrets never logged). A token is scoped to functions (names or
globs) and actions (``invoke``, ``read``, ``admin``; admin allows all three).
No or an unknown token → 401; outside the token's scope → 403. Only
``/healthz`` and ``/openapi.json`` are open.

Invocation errors keep their class in the status code, so one bridge can call
another and get the same class back: invalid_request → 400 (404 unknown
function, 413 too large), throttled → 429, function_error → 500,
system_error → 503. Bodies are limited as in SCF: 6 MB for RequestResponse,
128 KB for Event (413 with a clear message).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge import deadletter
from bridge.dispatcher import ASYNC, MAX_ASYNC_EVENT, MAX_SYNC_EVENT, SYNC
from bridge.errors import (
    EventTooLarge,
    FunctionNotFound,
    InvalidRequest,
    InvocationError,
    Throttled,
    cannot_listen,
)
from bridge.metrics import CONTENT_TYPE
from bridge.openapi import spec
from bridge.store import DeadLetterRow
from bridge.tokens import Token

if TYPE_CHECKING:
    from bridge.host import Host

log = logging.getLogger("bridge.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS = {"invalid_request": 400, "throttled": 429, "function_error": 500, "system_error": 503}
#: request headers that are about the bridge, not for the function
_NOT_FOR_FUNCTION = {"authorization", "host", "content-length", "content-type", "x-invocation-type"}


def error_status(e: InvocationError) -> int:
    if isinstance(e, FunctionNotFound):
        return 404
    if isinstance(e, EventTooLarge):
        return 413
    return _STATUS[e.error_class.value]


def _problem(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


#: where the auth middleware leaves the caller's token (aiohttp warns on plain string keys)
TOKEN_KEY: Any = web.RequestKey("token", Token) if hasattr(web, "RequestKey") else "token"


class Api:
    def __init__(self, daemon: Host) -> None:
        self.daemon = daemon
        self.config = daemon.config.api
        self.tokens = [Token(t) for t in self.config.tokens]
        self.app = web.Application(
            client_max_size=MAX_SYNC_EVENT + 1, middlewares=[_json_errors, self._auth]
        )
        r = self.app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/status", self.status)
        r.add_post("/functions/{name}/invocations", self.invoke)
        r.add_get("/deadletters", self.deadletters)
        r.add_get("/deadletters/{id}", self.deadletter)
        r.add_post("/deadletters/replay", self.replay)
        from bridge.console import mount

        mount(self.app, self.daemon, self.tokens)  # /ui: the web console (own session auth; _auth)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        host, _, port = self.config.listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise cannot_listen("api.listen", host, port, e) from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        log.info("API listening on http://%s:%s (%d tokens)", host, self.port, len(self.tokens))

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- auth --------------------------------------------------------------------------------

    _OPEN = {"/healthz", "/openapi.json"}
    _ACTION = {
        "/readyz": "read",
        "/metrics": "read",
        "/status": "read",
        "/deadletters": "read",
        "/deadletters/{id}": "read",
        "/deadletters/replay": "admin",
        "/functions/{name}/invocations": "invoke",
    }

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else request.path
        if path in self._OPEN:
            return await handler(request)
        if path == "/ui" or path.startswith("/ui/"):
            # the console signs in with a token once and then uses a session cookie and CSRF
            # tokens (bridge.console.session); its pages check the token's scope themselves
            return await handler(request)
        action = self._ACTION.get(path)
        if action is None:  # unknown path: 404 without revealing anything
            return await handler(request)
        token = self._token(request)
        if token is None:
            return _problem(
                401,
                "unauthorized",
                "a valid bearer token is required",
                **{"WWW-Authenticate": "Bearer"},
            )
        function = request.match_info.get("name")
        if not token.allows(action, function):
            what = f"{action} on function {function}" if function else action
            log.warning("token %s denied %s", token.name, what)
            return _problem(403, "forbidden", f"token {token.name} may not {what}")
        request[TOKEN_KEY] = token
        return await handler(request)

    def _token(self, request: web.Request) -> Token | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        raw = given.strip().encode()
        found = None
        for t in self.tokens:  # compare with every token, in constant time each
            if hmac.compare_digest(raw, t.secret):
                found = t
        return found

    # --- routes ------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(spec())

    async def readyz(self, request: web.Request) -> web.Response:
        # Ready once started (a trigger whose broker is down does not stop the others); what is
        # not connected is named with its last error.
        ready = self.daemon.ready.is_set() and self.daemon.state.value == "running"
        return web.json_response(
            {
                "ready": ready,
                "state": self.daemon.state.value,
                "not_connected": self.daemon.not_connected(),
            },
            status=200 if ready else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        await self.daemon.refresh_stats()
        return web.Response(
            body=self.daemon.metrics.render(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.daemon.status())

    async def invoke(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = request.headers.get("X-Invocation-Type", SYNC)
        if kind not in (SYNC, ASYNC):
            return _problem(
                400,
                "bad_invocation_type",
                f'X-Invocation-Type must be "{SYNC}" or "{ASYNC}", not "{kind}"',
            )
        limit = MAX_ASYNC_EVENT if kind == ASYNC else MAX_SYNC_EVENT
        if request.content_length is not None and request.content_length > limit:
            return _too_large(request.content_length, kind, limit)
        body = await _read_body(request, limit)
        if body is None:
            return _too_large(None, kind, limit)
        try:
            event = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as e:
            where = (
                f" at line {e.lineno} column {e.colno}"
                if isinstance(e, json.JSONDecodeError)
                else ""
            )
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            return _problem(400, "bad_event", f"the request body is not valid JSON: {msg}{where}")
        if not isinstance(event, dict):
            return _problem(
                400, "bad_event", f"the event must be a JSON object, not {type(event).__name__}"
            )
        if b"\\u" in body and not _encodable(event):
            return _problem(
                400,
                "bad_event",
                "the request body is not valid JSON: a lone surrogate escape (\\ud800-\\udfff "
                "without its pair) is not text",
            )
        if kind == ASYNC:
            return await self._accept(request, name, event)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FOR_FUNCTION}
        try:
            result = await self.daemon.dispatcher.invoke(
                name, event, invocation_type=SYNC, headers=headers
            )
        except InvocationError as e:
            e = self._scoped(request, e)
            extra = {"X-Request-Id": e.request_id or "", "X-Error-Class": e.error_class.value}
            if isinstance(e, Throttled) and e.retry_after_s:
                extra["Retry-After"] = str(int(e.retry_after_s + 0.999))
            return web.json_response(e.to_dict(), status=error_status(e), headers=extra)
        return web.json_response(
            result.value,
            headers={
                "X-Request-Id": result.request_id,
                "X-Duration-Ms": f"{result.duration_ms:.3f}",
            },
            dumps=_dumps,
        )

    def _scoped(self, request: web.Request, e: InvocationError) -> InvocationError:
        """``e`` as the caller may see it: "not found" lists only the functions its token may
        invoke (a scoped token must not learn the others' names)."""
        if not isinstance(e, FunctionNotFound):
            return e
        token: Token = request[TOKEN_KEY]
        names = sorted(n for n in self.daemon.config.functions if token.allows("invoke", n))
        out = FunctionNotFound(
            f"function {e.function or request.match_info['name']} not found "
            f"(yours: {', '.join(names) or 'none'})"
        )
        out.request_id, out.function = e.request_id, e.function
        return out

    async def _accept(self, request: web.Request, name: str, event: dict[str, Any]) -> web.Response:
        queue = self.daemon.queue
        if queue is None:
            return _problem(503, "unavailable", "the async queue is not running")
        try:
            rid = await queue.submit(name, event, request_source="API")
        except InvalidRequest as e:
            err = self._scoped(request, e)
            return web.json_response(
                err.to_dict(),
                status=error_status(err),
                headers={"X-Error-Class": err.error_class.value},
            )
        except Exception as e:
            # the state store failed (disk full, locked beyond busy_timeout, I/O error): the
            # event was not written, so it is not accepted; the caller may send it again
            log.error(
                "an Event invocation of %s was not accepted: the state store failed (%s)", name, e
            )
            return _problem(
                503,
                "unavailable",
                f"the event was not accepted: the state store failed ({e}); try again",
                **{"Retry-After": "1"},
            )
        return web.json_response(
            {"RequestId": rid, "accepted": True}, status=202, headers={"X-Request-Id": rid}
        )

    async def deadletters(self, request: web.Request) -> web.Response:
        token: Token = request[TOKEN_KEY]
        function = request.query.get("function")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _problem(400, "bad_limit", "limit must be an integer")
        if not 1 <= limit <= 10_000:
            return _problem(400, "bad_limit", "limit must be between 1 and 10000")
        if function is not None and not token.allows("read", function):
            return _problem(
                403, "forbidden", f"token {token.name} may not read function {function}"
            )
        items = [
            json.loads(r.record) for r in await self._dead_letters(token, "read", function, limit)
        ]
        return web.json_response({"items": items, "count": len(items)})

    async def _dead_letters(
        self, token: Token, action: str, function: str | None, limit: int | None = None
    ) -> list[DeadLetterRow]:
        """The dead letters ``token`` may see for ``action``, oldest first: the scope is applied
        before ``limit`` (one query per function in scope)."""
        store = self.daemon.store
        if function is not None:
            if not token.allows(action, function):
                return []
            return await store.list_dead_letters(function, limit=limit)
        have = (await store.queue_stats())["dead_letters"]
        rows = []
        for fn in sorted(have):
            if token.allows(action, fn):
                rows.extend(await store.list_dead_letters(fn, limit=limit))
        rows.sort(key=lambda r: (r.created_at, r.id))
        return rows[:limit] if limit is not None else rows

    async def deadletter(self, request: web.Request) -> web.Response:
        token: Token = request[TOKEN_KEY]
        row = await self.daemon.store.get_dead_letter(request.match_info["id"])
        if row is None or not token.allows("read", row.function):
            return _problem(404, "not_found", f"no dead letter with id {request.match_info['id']}")
        return web.json_response(json.loads(row.record))

    async def replay(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as e:
            return _problem(400, "bad_request", f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return _problem(400, "bad_request", "the request body must be a JSON object")
        function, ids = body.get("function"), body.get("ids")
        if function is not None and not isinstance(function, str):
            return _problem(400, "bad_request", '"function" must be a string')
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
        ):
            return _problem(400, "bad_request", '"ids" must be a list of strings')
        token: Token = request[TOKEN_KEY]
        if function is not None and not token.allows("admin", function):
            return _problem(
                403, "forbidden", f"token {token.name} may not replay function {function}"
            )
        # only dead letters of functions in the token's scope: the others are not touched
        rows = [
            r
            for r in await self._dead_letters(token, "admin", function)
            if ids is None or r.id in ids
        ]
        queue = self.daemon.queue
        replayed = (
            await deadletter.replay(
                self.daemon.store,
                rows,
                self.daemon.config.functions,
                queue.notify_requeued if queue is not None else None,
            )
        ).replayed
        return web.json_response({"replayed": replayed, "count": len(replayed)})


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body (however many TCP segments or chunks it came in), or None when it is
    larger than ``limit``: read until the end, never trusting one ``read`` to return it all."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404 unknown path, 405 wrong method, 413 …) in the API's one
    error shape, ``{"error": {"code", "message"}}``."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "event_too_large"}.get(
            e.status, e.reason.lower().replace(" ", "_")
        )
        message = {
            404: f"no such endpoint: {request.path} (GET /openapi.json lists them)",
            405: f"{request.method} is not allowed on {request.path}",
        }.get(e.status, e.text or e.reason)
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
        return _problem(e.status, code, message, **headers)


def _too_large(size: int | None, kind: str, limit: int) -> web.Response:
    got = f"{size} bytes" if size is not None else "larger"
    return _problem(
        413,
        "event_too_large",
        f"the event is {got}; {kind} invocations allow at most {limit} bytes",
    )


def _encodable(event: Any) -> bool:
    """False when ``event`` holds a string that is not valid Unicode (a lone surrogate)."""
    try:
        json.dumps(event, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
