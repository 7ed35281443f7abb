"""The public HTTP gateway: ``apigw`` and ``function_url`` triggers behind one listener.

Lifecycle: the daemon creates one :class:`Gateway` when its config has an enabled
HTTP trigger (or ``[gateway] enabled = true``), calls :meth:`Gateway.start` (bind
``[gateway] listen``), :meth:`Gateway.update` on every applied reload (a new route
table is swapped in at once: requests in flight keep the route they matched and
finish; a changed ``listen`` or TLS files need a restart, which the log says), and
:meth:`Gateway.close` at shutdown (stop accepting, give requests in flight the
daemon's ``shutdown_grace``).

Rules, per request (``docs/http-triggers.md`` is the user's view):

1. Route (:mod:`bridge.routes`): a path that is not UTF-8 → 400; no route → 404;
   a route but not this method → 405 with ``Allow``; a CORS preflight on a route
   with ``cors`` → 204. ``auth = "token"``: no valid bearer token → 401, a token not
   allowed to invoke the function → 403.
2. Body: larger than ``max_body`` → 413; not received within ``body_timeout`` → 408.
   The request line and headers must arrive within ``header_timeout`` (the
   connection is closed otherwise); malformed HTTP and oversized headers are
   answered 400 by the HTTP parser.
3. Invoke, synchronously, through the dispatcher: an event function gets the SCF
   event (:mod:`bridge.apigw`); a web function (``http`` runtime with
   ``bootstrap``) gets the raw request, streamed both ways. Headers the gateway
   owns (``Connection`` and the other hop-by-hop headers, ``X-SCF-*`` and
   ``X_SCF_*``) never reach a function.
4. Answer: the integrated response (or SCF's exact 403 body when the result is not
   one), the result as JSON (passthrough), or an error: the function failed,
   including its own timeout → 502; a system fault → 503; the gateway's
   ``timeout`` reached first → 504 (the invocation runs on to its own deadline,
   as in SCF); throttled → 429 with ``Retry-After``. Error bodies are
   ``{"errno": N, "error": message, "requestId": id}``, never a traceback.
   Every response carries ``X-Request-Id``.

Not guaranteed: that a function runs only once per client request (clients retry),
or that a web function's response is complete when its own deadline passes
mid-stream (the connection is then cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter, Histogram

from bridge import registry
from bridge.abc import HttpTrigger, SourceContext
from bridge.apigw import (
    INVALID_RESPONSE,
    HttpRequest,
    InvalidResponse,
    Response,
    cors_headers,
    function_url_response,
    header_text,
    integrated_response,
    owned_header,
    parse_query,
    passthrough_response,
    trusted,
)
from bridge.config import Config, GatewayConfig
from bridge.dispatcher import SYNC
from bridge.errors import (
    BadEvent,
    EventTooLarge,
    FunctionTimeout,
    InvalidRequest,
    InvocationError,
    Throttled,
    cannot_listen,
)
from bridge.routes import (
    BadPath,
    Match,
    Route,
    RouteTable,
    decode_segment,
    normalize_methods,
    parse_template,
)
from bridge.targets.http import HttpTarget

if TYPE_CHECKING:
    from bridge.host import Host
    from bridge.tokens import Token

log = logging.getLogger("bridge.gateway")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60)
#: response headers of a web function that describe its connection, not the response
_HOP_RESPONSE = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection", "trailer"}
)


def wanted(config: Config) -> bool:
    """Whether ``config`` asks for the gateway: ``enabled``, else any enabled HTTP trigger."""
    if config.gateway.enabled is not None:
        return config.gateway.enabled
    return any(tc.enabled and _is_http(tc.type) for tc in config.triggers.values())


def _is_http(kind: str) -> bool:
    try:
        return issubclass(registry.source(kind), HttpTrigger)
    except Exception:
        return False


class _Reply(Exception):
    """Answer with an error status and ``{"errno", "error", "requestId"}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close
        self.headers = headers or {}


class _BodyAborted(Exception):
    """The streamed upload to a web function stopped (too large, too slow)."""


class _RequestRefused(InvalidRequest):
    """The client's request was refused while it streamed to a web function."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.message)
        self.reply = reply


class _GatewayTimedOut(FunctionTimeout):
    """The gateway's timeout passed before a web function answered; the exchange is cut."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.message)
        self.reply = reply


class Gateway:
    """The public listener. See the module docstring for the contract."""

    def __init__(self, daemon: Host) -> None:
        self.daemon = daemon
        self.config: GatewayConfig = daemon.config.gateway
        self.table = RouteTable(())
        self.triggers: dict[str, HttpTrigger[Any]] = {}
        self.tokens: list[Token] = []
        self.port: int | None = None
        self._runner: web.ServerRunner | None = None
        self._orphans: set[asyncio.Task[Any]] = set()
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in self.config.trusted_proxies]
        host = socket.gethostname()
        self.service_id = (
            "service-" + hashlib.sha256(f"{host} {self.config.listen}".encode()).hexdigest()[:8]
        )
        r = daemon.metrics.registry
        self.requests = Counter(
            "bridge_gateway_requests",
            "Gateway requests by trigger (empty: no route) and status code.",
            ["trigger", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "bridge_gateway_request_duration_seconds",
            "Gateway request duration, from the request head to the last byte sent.",
            ["trigger"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.update(daemon.config)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        host, _, port = cfg.listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        server = web.Server(
            self.handle,
            # An idle connection, and one whose request head has not fully arrived, is closed
            # this long after it opened or after its previous response (slow-header clients).
            keepalive_timeout=cfg.header_timeout,
            # after an early answer (413, 408), unread body is drained this long before the
            # connection is closed (closing at once could reset it before the client reads)
            lingering_time=1.0,
            access_log=None,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=self.daemon.config.daemon.shutdown_grace
        )
        await self._runner.setup()
        tls = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        site = web.TCPSite(self._runner, host, int(port), ssl_context=tls, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise cannot_listen("gateway.listen", host, port, e) from None
        sockets = getattr(getattr(site, "_server", None), "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        scheme = "https" if tls else "http"
        log.info(
            "gateway listening on %s://%s:%s (%d routes)", scheme, host, self.port, len(self.table)
        )

    async def close(self) -> None:
        """Stop accepting; requests in flight get ``shutdown_grace``; then invocations that
        outlived their gateway timeout are waited for, as long again, and cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._orphans:
            _, pending = await asyncio.wait(
                set(self._orphans), timeout=self.daemon.config.daemon.shutdown_grace
            )
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def update(self, config: Config) -> None:
        """Swap in the routes, triggers and tokens of ``config`` (at start and on reload)."""
        old = self.config
        if self._runner is not None and (
            (old.listen, old.tls_cert, old.tls_key)
            != (config.gateway.listen, config.gateway.tls_cert, config.gateway.tls_key)
        ):
            log.warning("reload: [gateway] listen or TLS changed; it takes effect after a restart")
        routes: list[Route] = []
        triggers: dict[str, HttpTrigger[Any]] = {}
        for name, tc in config.triggers.items():
            if not tc.enabled or not _is_http(tc.type):
                continue
            cls = registry.source(tc.type)
            trig = cls(tc, self._context(config, name, tc.function))
            assert isinstance(trig, HttpTrigger)
            triggers[name] = trig
            path: str = getattr(tc, "path", "/")
            if trig.route_kind == "apigw":
                segs, methods = (
                    parse_template(path),
                    normalize_methods(getattr(tc, "method", "ANY")),
                )
            else:
                segs, methods = (), None
            routes.append(Route(name, tc.function, trig.route_kind, path, segs, methods, tc))
        if any(getattr(t.config, "auth", "none") == "token" for t in triggers.values()):
            from bridge.tokens import Token

            try:
                self.tokens = [Token(t) for t in config.api.tokens]
            except ValueError as e:
                log.error("gateway: the API tokens cannot be read (%s); keeping the previous", e)
        before = {r.trigger: r for r in self.table.routes}
        after = {r.trigger: r for r in routes}
        changes = [f"+{n}" for n in sorted(after.keys() - before.keys())]
        changes += [f"-{n}" for n in sorted(before.keys() - after.keys())]
        changes += [
            f"~{n}"
            for n in sorted(before.keys() & after.keys())
            if before[n].config != after[n].config
        ]
        if changes:
            log.info("gateway routes: %d (%s)", len(routes), " ".join(changes))
        # one assignment each: a request sees either the old or the new table
        self.triggers = triggers
        self.table = RouteTable(routes)
        self.config = config.gateway.model_copy(
            update={"listen": old.listen, "tls_cert": old.tls_cert, "tls_key": old.tls_key}
        )
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in self.config.trusted_proxies]

    def _context(self, config: Config, name: str, function: str) -> SourceContext:
        from zoneinfo import ZoneInfo

        return SourceContext(
            name=name,
            function=function,
            store=self.daemon.store,
            timezone=ZoneInfo(config.daemon.timezone),
            logger=logging.getLogger(f"trigger.{name}"),
        )

    # --- one request -------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = str(uuid.uuid4())
        trigger = ""
        origin_cors: list[tuple[str, str]] = []
        resp: web.StreamResponse
        try:
            match, allowed = self._route(request)
            route = match.route
            trigger = route.trigger
            origin_cors = cors_headers(route.config, request.headers.get("Origin"))
            if _is_preflight(request) and getattr(route.config, "cors", False):
                resp = self._preflight(request, route, origin_cors)
            else:
                if not route.allows(request.method):
                    raise _Reply(
                        405, f"method {request.method} is not allowed here", headers=allowed
                    )
                identity = self._authorize(request, route)
                resp = await self._serve(request, rid, match, identity)
        except _Reply as r:
            resp = _error(r.status, r.message, rid, r.headers)
            if r.close:
                resp.force_close()
        except InvocationError as e:
            resp = self._invocation_error(e, rid)
        except Exception as e:  # a bug of ours must not become a crash or a traceback
            log.error("gateway: request %s failed: %s", rid, e, exc_info=True)
            resp = _error(502, f"the gateway failed: {type(e).__name__}", rid, {})
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
            resp.headers.setdefault("Server", "event-bridge")
            for k, v in origin_cors:
                resp.headers.setdefault(k, v)
        elapsed = time.perf_counter() - t0
        self.requests.labels(trigger, str(resp.status)).inc()
        self.latency.labels(trigger).observe(elapsed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s → %d (%.1f ms)",
                request.method,
                _shown(request.raw_path),
                resp.status,
                elapsed * 1000,
                extra={"request_id": rid, "trigger": trigger or None},
            )
        return resp

    def _route(self, request: web.BaseRequest) -> tuple[Match, dict[str, str]]:
        raw = request.raw_path.partition("?")[0].partition("#")[0]
        if not raw.startswith("/"):  # absolute-form request targets
            raw = "/" + raw.split("://", 1)[-1].partition("/")[2]
        try:
            matches = self.table.find(raw)
        except BadPath as e:
            raise _Reply(400, str(e)) from None
        if not matches:
            raise _Reply(404, f"no route for {request.method} {_shown(raw)}")
        method = request.method
        if _is_preflight(request):
            method = request.headers.get("Access-Control-Request-Method", "").upper()
        allowed: list[str] = []
        for m in matches:
            if m.route.allows(method) or (
                _is_preflight(request) and getattr(m.route.config, "cors", False)
            ):
                return m, {"Allow": ", ".join(m.route.allowed())}
            allowed += m.route.allowed()
        allow = {"Allow": ", ".join(dict.fromkeys(allowed))}
        return matches[0], allow

    def _preflight(
        self,
        request: web.BaseRequest,
        route: Route,
        origin: list[tuple[str, str]],
    ) -> web.Response:
        resp = web.Response(status=204)
        for k, v in origin:
            resp.headers[k] = v
        if origin:
            resp.headers["Access-Control-Allow-Methods"] = ", ".join(route.allowed())
            wanted_headers = request.headers.get("Access-Control-Request-Headers")
            if wanted_headers:
                resp.headers["Access-Control-Allow-Headers"] = wanted_headers
            resp.headers["Access-Control-Max-Age"] = "600"
        return resp

    def _authorize(self, request: web.BaseRequest, route: Route) -> dict[str, str]:
        if getattr(route.config, "auth", "none") != "token":
            return {}
        import hmac

        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        found = None
        if scheme.lower() == "bearer" and given.strip():
            raw = given.strip().encode()
            for t in self.tokens:
                if hmac.compare_digest(raw, t.secret):
                    found = t
        if found is None:
            raise _Reply(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        if not found.allows("invoke", route.function):
            raise _Reply(403, f"token {found.name} may not invoke function {route.function}")
        return {"token": found.name}

    async def _serve(
        self, request: web.BaseRequest, rid: str, match: Match, identity: dict[str, str]
    ) -> web.StreamResponse:
        route = match.route
        target = self.daemon.dispatcher.target(route.function)
        if isinstance(target, HttpTarget) and target.web:
            return await self._proxy(request, rid, route)
        body = await self._read_body(request)
        ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        raw_path, _, raw_query = request.raw_path.partition("?")
        try:
            query = parse_query(raw_query.partition("#")[0])
            path = "/".join(decode_segment(p) for p in raw_path.split("/"))
        except BadPath as e:
            raise _Reply(400, str(e)) from None
        req = HttpRequest(
            method=request.method,
            path=path,
            template=route.template,
            path_params=match.params,
            query=query,
            headers=self._event_headers(request, route),
            body=body,
            content_type=ctype,
            source_ip=self._source_ip(request),
            request_id=rid,
            service_id=self.service_id,
            identity=identity,
        )
        trig: Any = self.triggers.get(route.trigger)
        if trig is None:  # removed by a reload since routing: its table entry is still valid
            trig = registry.source(route.config.type)(
                route.config, self._context(self.daemon.config, route.trigger, route.function)
            )
        assert isinstance(trig, HttpTrigger)
        event = trig.event(req)
        value = await self._invoke(route, event, rid)
        try:
            if route.kind == "function_url":
                out = function_url_response(value)
            elif getattr(route.config, "integrated_response", True):
                out = integrated_response(value)
            else:
                out = passthrough_response(value)
        except InvalidResponse as e:
            log.warning(
                "%s: invalid integrated response: %s",
                route.function,
                e,
                extra={"request_id": rid, "trigger": route.trigger, "function": route.function},
            )
            return web.Response(
                status=403, body=INVALID_RESPONSE, headers={"Content-Type": "application/json"}
            )
        return _response(out)

    async def _invoke(self, route: Route, event: dict[str, Any], rid: str) -> Any:
        timeout: float = getattr(route.config, "timeout", 15.0)
        fn_timeout = self.daemon.config.functions.get(route.function)
        if fn_timeout is not None and fn_timeout.timeout + 1.0 < timeout:
            # The function's own deadline (which targets must keep) comes well before the
            # gateway's: await it in place, no task to hand over. The timeout is a safety net.
            try:
                async with asyncio.timeout(timeout):
                    result = await self.daemon.dispatcher.invoke(
                        route.function,
                        event,
                        invocation_type=SYNC,
                        trigger=route.trigger,
                        request_id=rid,
                    )
            except TimeoutError:
                raise _Reply(504, f"the function did not answer within {timeout:g}s") from None
            return result.value
        task = asyncio.ensure_future(
            self.daemon.dispatcher.invoke(
                route.function, event, invocation_type=SYNC, trigger=route.trigger, request_id=rid
            )
        )
        try:
            # not wait_for: on timeout the invocation goes on (see _adopt), as in SCF
            await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:
            self._adopt(task)
            raise
        if not task.done():
            self._adopt(task)
            log.warning(
                "%s: no answer within the gateway timeout of %gs (504); the invocation runs on "
                "until the function's own timeout",
                route.function,
                timeout,
                extra={"request_id": rid, "trigger": route.trigger, "function": route.function},
            )
            raise _Reply(504, f"the function did not answer within {timeout:g}s")
        return task.result().value

    def _adopt(self, task: asyncio.Task[Any]) -> None:
        """Keep a shielded invocation whose request is gone until it ends (close() waits)."""
        if task.done():
            if not task.cancelled():
                task.exception()
            return
        self._orphans.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._orphans.discard(t)
            if not t.cancelled():
                t.exception()  # already logged by the dispatcher

        task.add_done_callback(done)

    def _invocation_error(self, e: InvocationError, rid: str) -> web.Response:
        headers = {"X-Error-Class": e.error_class.value}
        if isinstance(e, Throttled):
            status = 429
            headers["Retry-After"] = str(max(1, int((e.retry_after_s or 1) + 0.999)))
        elif isinstance(e, EventTooLarge):
            status = 413
        elif isinstance(e, BadEvent):
            status = 400
        elif e.error_class.value == "function_error":
            status = 502
        else:
            status = 503
        return _error(status, e.message, e.request_id or rid, headers)

    # --- request pieces ----------------------------------------------------------------------

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.config.max_body
        size = request.content_length
        if size is not None and size > limit:
            raise _Reply(413, _too_large(limit), close=True)
        if not request.can_read_body:
            return b""
        await _continue(request)
        buf = bytearray()
        try:
            async with asyncio.timeout(self.config.body_timeout):
                while chunk := await request.content.readany():
                    buf += chunk
                    if len(buf) > limit:
                        raise _Reply(413, _too_large(limit), close=True)
        except TimeoutError:
            raise _Reply(
                408,
                f"the request body did not arrive within {self.config.body_timeout:g}s",
                close=True,
            ) from None
        return bytes(buf)

    def _event_headers(self, request: web.BaseRequest, route: Route) -> dict[str, str]:
        out: dict[str, str] = {}
        listed = _connection_tokens(request)
        drop_auth = getattr(route.config, "auth", "none") == "token"
        for name, value in request.headers.items():
            low = name.lower()
            if owned_header(low) or low in listed or (drop_auth and low == "authorization"):
                continue
            value = header_text(value)
            out[low] = f"{out[low]},{value}" if low in out else value
        return out

    def _source_ip(self, request: web.BaseRequest) -> str:
        peer = request.remote or ""
        if not self._proxies or not trusted(peer, self._proxies):
            return peer
        hops = [
            h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
        ]
        for hop in reversed([h for h in hops if h]):
            if not trusted(hop, self._proxies):
                return hop
        return peer

    # --- web functions -----------------------------------------------------------------------

    async def _proxy(self, request: web.BaseRequest, rid: str, route: Route) -> web.StreamResponse:
        limit, cfg = self.config.max_body, self.config
        if request.content_length is not None and request.content_length > limit:
            raise _Reply(413, _too_large(limit), close=True)
        listed = _connection_tokens(request)
        drop_auth = getattr(route.config, "auth", "none") == "token"
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            low = name.lower()
            if owned_header(low) or low in listed or (drop_auth and low == "authorization"):
                continue
            if low == "expect":  # the gateway answers 100-continue itself
                continue
            headers.add(name, header_text(value))
        aborted: list[_Reply] = []
        loop = asyncio.get_running_loop()

        async def upload() -> AsyncIterator[bytes]:
            sent, deadline = 0, loop.time() + cfg.body_timeout
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await request.content.readany()
                except TimeoutError:
                    aborted.append(
                        _Reply(
                            408,
                            f"the request body did not arrive within {cfg.body_timeout:g}s",
                            close=True,
                        )
                    )
                    raise _BodyAborted from None
                if not chunk:
                    return
                sent += len(chunk)
                if sent > limit:
                    aborted.append(_Reply(413, _too_large(limit), close=True))
                    raise _BodyAborted
                yield chunk

        if request.can_read_body:
            await _continue(request)
        gw_timeout: float = getattr(route.config, "timeout", 15.0)
        resp: web.StreamResponse | None = None
        try:
            async with self.daemon.dispatcher.session(
                route.function, trigger=route.trigger, request_id=rid
            ) as (target, inv):
                assert isinstance(target, HttpTarget)
                first = min(gw_timeout, inv.remaining_s())
                data = upload() if request.can_read_body else None
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        async with asyncio.timeout(first):
                            up = await stack.enter_async_context(
                                target.forward(inv, request.method, request.raw_path, headers, data)
                            )
                    except TimeoutError:
                        if aborted:
                            raise _RequestRefused(aborted[0]) from None
                        if gw_timeout < inv.timeout_s:
                            raise _GatewayTimedOut(
                                _Reply(504, f"the function did not answer within {gw_timeout:g}s")
                            ) from None
                        raise FunctionTimeout(
                            f"Invoking task timed out after {inv.timeout_s:g} seconds"
                        ) from None
                    except InvocationError:
                        if aborted:
                            raise _RequestRefused(aborted[0]) from None
                        raise
                    resp = web.StreamResponse(status=up.status, reason=up.reason)
                    for k, v in up.headers.items():
                        if k.lower() not in _HOP_RESPONSE and k.lower() != "content-length":
                            resp.headers.add(k, v)
                    if up.content_length is not None and request.method != "HEAD":
                        resp.content_length = up.content_length
                    elif "Content-Length" in up.headers:  # HEAD: the length a GET would have
                        resp.headers["Content-Length"] = up.headers["Content-Length"]
                    resp.headers["X-Request-Id"] = rid
                    resp.headers.setdefault("Server", "event-bridge")
                    for k, v in cors_headers(route.config, request.headers.get("Origin")):
                        resp.headers.setdefault(k, v)
                    await resp.prepare(request)
                    try:
                        async with asyncio.timeout(max(inv.remaining_s(), 0.001)):
                            async for chunk in up.content.iter_any():
                                await resp.write(chunk)
                    except TimeoutError:
                        raise FunctionTimeout(
                            f"Invoking task timed out after {inv.timeout_s:g} seconds "
                            "while streaming its response"
                        ) from None
                    await resp.write_eof()
        except (InvocationError, ConnectionError, OSError) as e:
            if resp is None:
                if isinstance(e, _RequestRefused | _GatewayTimedOut):
                    raise e.reply from None
                if isinstance(e, InvocationError):
                    raise
                raise _Reply(502, f"the web function failed: {e}") from None
            # the status line is sent: the only way left to say "incomplete" is to cut it
            if request.transport is not None:
                request.transport.close()
        return resp


# --- helpers ------------------------------------------------------------------------------------


async def _continue(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` once the request is accepted (curl waits a second for
    it before sending a body)."""
    if (
        request.version >= (1, 1)
        and request.headers.get("Expect", "").lower() == "100-continue"
        and request.writer is not None
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _connection_tokens(request: web.BaseRequest) -> set[str]:
    return {t.strip().lower() for t in request.headers.get("Connection", "").split(",")} - {""}


def _is_preflight(request: web.BaseRequest) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def _response(out: Response) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in out.headers:
        headers.add(k, v)
    return web.Response(status=out.status, body=out.body, headers=headers)


def _error(status: int, message: str, rid: str, headers: dict[str, str]) -> web.Response:
    body = json.dumps(
        {"errno": status, "error": message, "requestId": rid},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return web.Response(
        status=status,
        body=body.encode(),
        headers={"Content-Type": "application/json", **headers},
    )


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (gateway.max_body)"


def _shown(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "…"
