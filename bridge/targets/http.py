"""The ``http`` runtime: a "web function" that receives the event as an HTTP POST.

The function is either a URL the operator runs elsewhere (``url``) or, like
SCF web functions, a web server the bridge starts and supervises itself
(``bootstrap = true``: an executable ``scf_bootstrap`` in ``code`` that listens
on ``port``; it is restarted with backoff when it dies).

Each invocation POSTs the event JSON with ``X-SCF-Request-Id``,
``X-SCF-Function-Name`` and ``X-SCF-Invocation-Type`` headers; the response
status maps to the error classes of DESIGN.md (:func:`bridge.errors.http_status_error`):
400/401/403/404/413 invalid_request, 429 throttled, 500 function_error,
502/503/504 system_error, with ``Retry-After`` honoured on 429 and 503.
Connection failures are system errors; running out of time is a function timeout.

A web function can settle an async event on purpose: the response header
``X-Bridge-Drop: <reason>`` drops it (no retry, no dead letter), and a non-2xx
response with ``X-Bridge-Retry-After: <seconds>`` asks for a retry after that
delay (bounded by ``max_event_age`` only).

With ``bootstrap = true`` and ``isolation = "sandbox"`` (``bridge/sandbox.py``) the web server
runs in bubblewrap as the function's uid, with a private ``/tmp`` and a cgroup capping its
memory: a server the kernel kills for going over it fails the request it was serving with
OutOfMemory ("Memory limit exceeded") and is restarted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from pydantic import Field, ValidationInfo, field_validator, model_validator
from yarl import URL

from bridge import sandbox
from bridge.abc import Invocation, Target, TargetContext
from bridge.config import Duration, FunctionConfig, RelPath
from bridge.errors import (
    BadEvent,
    BadResult,
    Dropped,
    FunctionError,
    FunctionTimeout,
    InvocationError,
    OutOfMemory,
    RetryRequested,
    SystemFault,
    Throttled,
    http_status_error,
)
from bridge.events import RawEvent, dumps, thaw
from bridge.targets import _proc

BOOTSTRAP = "scf_bootstrap"
#: Largest response body read (SCF's synchronous result limit).
MAX_BODY = 6 * 1000**2
#: How much of an error response is kept in ``InvocationError.detail``.
MAX_DETAIL = 4096
#: How long connecting may take before it counts as a transport fault, not a slow function.
CONNECT_TIMEOUT_S = 10.0

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Hop-by-hop headers (RFC 9110 §7.6.1) and those the bridge sets or that describe the
#: caller's own request to the bridge (its bearer token above all).
_NOT_FORWARDED = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade",
        "host", "content-length", "content-type", "content-encoding", "expect",
        "accept-encoding", "authorization",
    }
)  # fmt: skip
_NOT_CONFIGURABLE = _NOT_FORWARDED - {"host", "authorization"}


#: response headers a web function sets to settle an async event on purpose
DROP_HEADER = "X-Bridge-Drop"  # any status: drop the event (value: the reason)
RETRY_HEADER = "X-Bridge-Retry-After"  # non-2xx: retry after N seconds (or an HTTP date)


def reserved_header(name: str) -> bool:
    """``X-SCF-*`` in any spelling: ``X_SCF_*`` too, which WSGI servers and nginx can treat as
    the same header (a caller must not be able to forge the bridge's request id that way)."""
    return name.lower().replace("_", "-").startswith("x-scf-")


def hop_by_hop(name: str) -> bool:
    """Hop-by-hop (and client-set) headers, in either spelling (``Transfer_Encoding``)."""
    return name.lower().replace("_", "-") in _NOT_FORWARDED


_servers = itertools.count(1)  # names the cgroups of sandboxed web servers


class HttpConfig(FunctionConfig, sandbox.IsolationFields):
    """``[functions.NAME]`` with ``runtime = "http"``: POST each event to a web function."""

    bootstrap: bool = Field(
        False,
        description="Start and supervise the function's own web server: the executable "
        "scf_bootstrap in `code`, which must listen on `port` (SCF web functions).",
    )
    code: RelPath | None = Field(
        None,
        validate_default=True,
        description="Folder holding scf_bootstrap; its working directory. Required with bootstrap.",
    )
    port: int = Field(
        9000, ge=1, le=65535, description="Port scf_bootstrap listens on (passed as $PORT)."
    )
    path: str = Field("/", description="Request path on the bootstrapped server.")
    url: str | None = Field(
        None,
        validate_default=True,
        description="http(s) URL to POST events to; exclusive with bootstrap, which implies "
        "http://127.0.0.1:{port}{path}.",
    )
    headers: dict[str, str] = Field({}, description="Static headers added to every request.")
    ready_timeout: Duration = Field(
        10.0, gt=0, le=900, description="How long scf_bootstrap may take to accept connections."
    )

    @field_validator("code")
    @classmethod
    def _check_code(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if "bootstrap" not in info.data:
            return v  # bootstrap itself is invalid and reported there
        if not info.data["bootstrap"]:
            if v is not None:
                raise ValueError("only used with bootstrap = true")
            return v
        if v is None:
            raise ValueError(f"required with bootstrap = true: the folder holding {BOOTSTRAP}")
        if not v.is_dir():
            raise ValueError(f"code directory {v} does not exist")
        boot = v / BOOTSTRAP
        if not boot.exists():
            raise ValueError(f"{BOOTSTRAP} not found in {v}")
        problem = _proc.executable_problem(boot)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f'must start with "/", e.g. "/{v}"')
        return v

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        if "bootstrap" not in info.data:
            return v
        if info.data["bootstrap"]:
            if v is not None:
                raise ValueError(
                    "url and bootstrap = true are exclusive: a bootstrapped function is "
                    "reached at http://127.0.0.1:{port}{path}"
                )
            return v
        if v is None:
            raise ValueError("required: the URL to POST events to (or bootstrap = true with code)")
        try:
            u = URL(v)
        except ValueError:
            raise ValueError("not a valid URL") from None
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _TOKEN.match(name):
                raise ValueError(f'invalid header name "{name}"')
            if reserved_header(name):
                raise ValueError(
                    f'header "{name}" is reserved: X-SCF-* headers are set by the bridge'
                )
            if name.lower() in _NOT_CONFIGURABLE:
                raise ValueError(
                    f'header "{name}" is set by the HTTP client and cannot be configured'
                )
            if "\r" in value or "\n" in value:
                raise ValueError(f'header "{name}" contains a line break')
        return v

    @model_validator(mode="after")
    def _check_isolation(self) -> HttpConfig:
        keys = sorted(self.model_fields_set & set(sandbox.IsolationFields.model_fields))
        if not self.bootstrap:
            # a URL runs elsewhere: nothing here to isolate ([daemon] isolation does not apply)
            if keys:
                raise ValueError(f"{', '.join(keys)}: only used with bootstrap = true")
        elif self.isolation == "sandbox" and not self.network:
            raise ValueError(
                "network = false cannot be used with bootstrap = true: the bridge reaches the "
                "web server on 127.0.0.1"
            )
        return self

    @property
    def endpoint(self) -> str:
        """The URL events are POSTed to."""
        if self.url is not None:
            return self.url
        return f"http://127.0.0.1:{self.port}{self.path}"


class HttpTarget(Target[HttpConfig]):
    """POSTs events to a web function, optionally running that function's server itself."""

    Config = HttpConfig
    takes_raw = True  # the queue's bytes are sent as they are

    #: How long the web server gets to exit after SIGTERM before its group is killed.
    STOP_GRACE_S = 5.0
    #: Restart backoff after the web server died: 1 s, doubling, capped (also the stable
    #: uptime after which the backoff starts over from 1 s).
    MAX_BACKOFF_S = 30.0

    def __init__(self, config: HttpConfig, ctx: TargetContext) -> None:
        super().__init__(config, ctx)
        self._session: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._up = False
        self._closed = False
        self._tmp: Path | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=20)
        self._sandbox: sandbox.Sandbox | None = None
        self._cgroup: sandbox.Cgroup | None = None  # the sandboxed server's
        self._ooms = 0  # sandboxed servers killed for going over their memory
        url = URL(config.endpoint)
        # for messages: without credentials or query string, which may hold secrets
        self._shown_url = str(url.with_user(None).with_query(None))

    @property
    def running(self) -> bool:
        """Whether invocations can be sent (always, unless the bootstrapped server is down)."""
        return self._session is not None and (not self.config.bootstrap or self._up)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None),
            # the dispatcher bounds concurrency; the pool must not queue behind it
            connector=aiohttp.TCPConnector(limit=0),
        )
        if not self.config.bootstrap:
            return
        self._sandbox = await sandbox.for_target(
            self.ctx.name,
            self.config,
            memory=self.config.memory,
            state_dir=self.ctx.state_dir,
            logger=self.ctx.logger,
            private_files=self.ctx.private_files,
        )
        base = self.ctx.state_dir / "tmp" / self.ctx.name
        base.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="web-", dir=base))
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sup = asyncio.create_task(self._supervise(ready), name=f"web server of {self.ctx.name}")
        self._supervisor = sup
        await asyncio.wait({ready, sup}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            # the first start failed: the supervisor ended with the reason
            self._supervisor = None
            await self.close()
            sup.result()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sup, self._supervisor = self._supervisor, None
        try:
            if sup is not None:
                sup.cancel()
                try:
                    await sup
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
        finally:
            if self._session is not None:
                await self._session.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    # --- invoking -----------------------------------------------------------------------------

    async def invoke(self, event: Mapping[str, Any], invocation: Invocation) -> Any:
        session, name = self._session, self.ctx.name
        if self._closed:
            raise SystemFault(f"function {name} is closed")
        if session is None:
            raise SystemFault(f"function {name} is not started")
        if self.config.bootstrap and not self._up:
            if self._supervisor is None or self._supervisor.done():
                raise SystemFault(f"web server of function {name} is not supervised (see the log)")
            raise SystemFault(f"web server of function {name} is not running (restarting)")
        try:
            body = event.raw if type(event) is RawEvent else dumps(thaw(event))
        except (TypeError, ValueError) as e:
            raise BadEvent(f"the event is not JSON-serializable: {e}") from None

        remaining = invocation.remaining_s()
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(max(remaining, 0.001), CONNECT_TIMEOUT_S)
        )
        ooms = self._ooms
        try:
            async with (
                asyncio.timeout(remaining),
                session.post(
                    self.config.endpoint,
                    data=body,
                    headers=self._headers(invocation),
                    allow_redirects=False,
                    timeout=timeout,
                ) as resp,
            ):
                data = await _read_capped(resp.content, MAX_BODY)
                status, reason, ctype = resp.status, resp.reason or "", resp.content_type
                retry_after = resp.headers.get("Retry-After")
                drop = resp.headers.get(DROP_HEADER)
                asked_retry = resp.headers.get(RETRY_HEADER)
        except aiohttp.ConnectionTimeoutError:
            raise SystemFault(
                f"could not connect to {self._shown_url} within {timeout.sock_connect:g}s"
            ) from None
        except TimeoutError:
            raise FunctionTimeout(
                f"Invoking task timed out after {invocation.timeout_s:g} seconds"
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise SystemFault(
                f"cannot connect to {self._shown_url}: {e.os_error.strerror or e.os_error}"
            ) from None
        except aiohttp.ClientError as e:
            # the kernel counts the kill before the server's sockets close
            cg = self._cgroup
            if self._ooms > ooms or (cg is not None and cg.oom_killed()):
                raise OutOfMemory(
                    "Memory limit exceeded: the function used more than "
                    f"{self.config.memory / 1024**2:g} MB"
                ) from None
            raise SystemFault(
                f"request to {self._shown_url} failed: {type(e).__name__}: {e}"
            ) from None

        if data is None:
            raise BadResult(
                f"HTTP {status} from {self._shown_url}: response body larger than {MAX_BODY} bytes"
            )
        if drop is not None:
            raise Dropped(drop or f"HTTP {status}: dropped by the function")
        if 200 <= status < 300:
            return self._result(status, ctype, data)
        if asked_retry is not None and (delay := parse_retry_after(asked_retry)) is not None:
            raise RetryRequested(
                f"HTTP {status} from {self._shown_url}: retry requested in {delay:g}s",
                retry_after_s=delay,
            )
        raise self._error(status, reason, data, retry_after)

    @property
    def web(self) -> bool:
        """A web function (its own ``scf_bootstrap`` server): the gateway proxies raw HTTP
        requests to it instead of posting an event."""
        return self.config.bootstrap

    @contextlib.asynccontextmanager
    async def forward(
        self,
        invocation: Invocation,
        method: str,
        raw_path: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | bytes | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one raw request (path and query as the client sent them, ``headers`` already
        cleaned of what the gateway owns, a streamed body) to the web function and yield its
        response, unread and not decompressed. Failing to reach the server is a
        :class:`SystemFault`; the caller bounds the time."""
        session, name = self._session, self.ctx.name
        if session is None or self._closed:
            raise SystemFault(f"function {name} is not running")
        if self.config.bootstrap and not self._up:
            raise SystemFault(f"web server of function {name} is not running (restarting)")
        out = CIMultiDict(headers)
        out["X-SCF-Request-Id"] = invocation.request_id
        out["X-SCF-Function-Name"] = name
        out["X-SCF-Invocation-Type"] = invocation.invocation_type
        base = URL(self.config.endpoint)
        url = URL(f"{base.scheme}://{base.raw_authority}{raw_path}", encoded=True)
        try:
            ctx = session.request(
                method,
                url,
                headers=out,
                data=body,
                allow_redirects=False,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
            )
            resp = await ctx.__aenter__()
        except aiohttp.ClientConnectorError as e:
            raise SystemFault(
                f"cannot connect to {self._shown_url}: {e.os_error.strerror or e.os_error}"
            ) from None
        except aiohttp.ClientError as e:
            raise SystemFault(
                f"request to {self._shown_url} failed: {type(e).__name__}: {e}"
            ) from None
        try:
            yield resp
        finally:
            if resp.content.at_eof():
                resp.release()  # the connection goes back to the pool
            else:
                resp.close()  # half-read: it cannot be reused

    def _headers(self, invocation: Invocation) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        caller = CIMultiDict(invocation.headers)
        dropped = {t.strip().lower() for t in caller.get("Connection", "").split(",")}
        for name, value in caller.items():
            low = name.lower()
            if reserved_header(low) or hop_by_hop(low) or low in dropped:
                continue
            out.add(name, value)
        for name, value in self.config.headers.items():
            out[name] = value
        out["Content-Type"] = "application/json"
        out["X-SCF-Request-Id"] = invocation.request_id
        out["X-SCF-Function-Name"] = self.ctx.name
        out["X-SCF-Invocation-Type"] = invocation.invocation_type
        return out

    def _result(self, status: int, ctype: str, data: bytes) -> Any:
        if not data:
            return None
        if ctype == "application/json" or ctype.endswith("+json"):
            try:
                return json.loads(data)
            except ValueError as e:
                raise BadResult(
                    f"HTTP {status} from {self._shown_url}: body is not valid JSON although "
                    f"Content-Type is {ctype}: {e}",
                    detail=data[:MAX_DETAIL].decode("utf-8", "replace"),
                ) from None
        text = data.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _error(
        self, status: int, reason: str, data: bytes, retry_after: str | None
    ) -> InvocationError:
        kind = http_status_error(status) or FunctionError  # 1xx/3xx: redirects are not followed
        text = data[:MAX_DETAIL].decode("utf-8", "replace")
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), reason)
        delay = None
        if kind is Throttled or status == 503:
            delay = parse_retry_after(retry_after)
        return kind(
            f"HTTP {status} from {self._shown_url}: {first[:200]}",
            detail=text or None,
            retry_after_s=delay,
        )

    # --- supervising scf_bootstrap ------------------------------------------------------------

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        """Run scf_bootstrap until cancelled, restarting it with backoff when it dies.

        Until the server listened once, a failure ends this task with the reason
        (``start()`` raises it); afterwards failures are logged and retried.
        """
        try:
            await self._run_server(ready)
        except Exception:
            if ready.done():  # otherwise start() raises it
                self.ctx.logger.exception(
                    "supervising the web server of function %s failed",
                    self.ctx.name,
                    extra={"function": self.ctx.name},
                )
            raise

    async def _run_server(self, ready: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        name, log, extra = self.ctx.name, self.ctx.logger, {"function": self.ctx.name}
        delay = 1.0
        while True:
            try:
                child = await self._launch()
            except SystemFault as e:
                if not ready.done():
                    raise
                log.error("%s; retrying in %gs", e.message, delay, extra=extra)
            else:
                since = loop.time()
                self._up = True
                if not ready.done():
                    ready.set_result(None)
                log.info(
                    "web server of function %s is listening on port %d (pid %d)",
                    name,
                    self.config.port,
                    child.pid,
                    extra=extra,
                )
                try:
                    await asyncio.shield(child.exited)
                finally:
                    self._up = False
                    try:
                        # on close: the whole server; after a crash: what it left in its group
                        await child.terminate(self.STOP_GRACE_S)
                    finally:
                        await child.close()
                        # killed by the kernel for going over its cgroup's memory?
                        oom = self._cgroup is not None and self._cgroup.oom_killed()
                        self._ooms += oom
                        await self._dispose_cgroup()
                if loop.time() - since >= self.MAX_BACKOFF_S:
                    delay = 1.0
                status = _proc.describe_exit(child.returncode)
                if oom:
                    status += f" (Memory limit exceeded: more than {self.config.memory >> 20} MiB)"
                log.warning(
                    "web server of function %s exited with %s; restarting in %gs",
                    name,
                    status,
                    delay,
                    extra=extra,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.MAX_BACKOFF_S)

    async def _launch(self) -> _proc.Child:
        """Start scf_bootstrap and wait until it accepts connections; SystemFault if it does not."""
        cfg, name = self.config, self.ctx.name
        assert cfg.code is not None and self._tmp is not None
        if await _accepts(cfg.port):
            raise SystemFault(
                f"web server of function {name} cannot start: port {cfg.port} is already in use"
            )
        self._output.clear()
        child = _proc.Child(_proc.Lines(self._log_output), None)
        tmp = "/tmp" if self._sandbox else str(self._tmp)
        env = _proc.function_env(name, cfg.runtime, cfg.environment, PORT=str(cfg.port), TMPDIR=tmp)
        argv = [str(cfg.code / BOOTSTRAP)]
        if self._sandbox is not None:
            env["HOME"] = "/tmp"
            try:
                self._cgroup = self._sandbox.cgroup(f"{os.getpid()}-w{next(_servers)}")
            except OSError as e:
                raise SystemFault(f"web server of function {name}: no cgroup: {e}") from None
            argv = self._sandbox.command(
                argv,
                cwd=cfg.code,
                cgroup=self._cgroup,
                expose=[cfg.code, *sandbox.interpreter_paths()],
            )
        try:
            await child.spawn(argv, cwd=cfg.code, env=env)
        except OSError as e:
            await self._dispose_cgroup()
            raise SystemFault(
                f"web server of function {name}: cannot run {cfg.code / BOOTSTRAP}: {e.strerror or e}"
            ) from None
        try:
            await self._wait_listening(child)
        except BaseException:
            await child.close()
            await self._dispose_cgroup()
            raise
        return child

    async def _dispose_cgroup(self) -> None:
        cg, self._cgroup = self._cgroup, None
        if cg is not None and not await sandbox.dispose(cg):
            self.ctx.logger.warning("cannot remove cgroup %s: still busy", cg.path)

    async def _wait_listening(self, child: _proc.Child) -> None:
        loop = asyncio.get_running_loop()
        cfg, name = self.config, self.ctx.name
        deadline = loop.time() + cfg.ready_timeout
        while True:
            if child.exited.done():
                raise SystemFault(
                    f"web server of function {name} exited with {_proc.describe_exit(child.returncode)} "
                    f"before listening on port {cfg.port}",
                    detail="\n".join(self._output) or None,
                )
            if await _accepts(cfg.port):
                return
            if loop.time() >= deadline:
                raise SystemFault(
                    f"web server of function {name} did not listen on port {cfg.port} "
                    f"within {cfg.ready_timeout:g}s",
                    detail="\n".join(self._output) or None,
                )
            # poll again shortly, or at once when the server exits
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.shield(child.exited)
            except TimeoutError:
                pass

    def _log_output(self, line: str) -> None:
        self._output.append(line)
        self.ctx.logger.info(line, extra={"function": self.ctx.name})


async def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        async with asyncio.timeout(1.0):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None when it is larger than ``limit``."""
    buf = bytearray()
    async for chunk in stream.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
