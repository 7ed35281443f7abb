"""The web console at ``/ui/`` on the ``[api]`` listener: see and steer the daemon.

Pages (server-rendered Jinja2; htmx, shipped in ``static/``, only refreshes parts of them):

=================================  ==========================================================
``GET /ui/``                       overview: state, version, triggers (connected, last event,
                                   lag, next fires), functions (concurrency in use, queued,
                                   dead letters, error rate, throttles, p50/p99 recently)
``GET /ui/deadletters``            dead letters, newest first, 50 a page; filters ``function``,
                                   ``trigger``, ``error_class``, ``since`` (``1h``), ``from``/``to``
``GET /ui/deadletters/{id}``       one record with its original event
``POST /ui/deadletters/replay``    ``ids`` (a selection) or ``scope=all`` + the filters
``POST /ui/deadletters/purge``     the same; shows a confirmation until ``confirm=yes``
``GET /ui/retries``                pending retries: due time, attempt, last error
``GET /ui/functions/{name}``       recent invocations (outcome, duration, memory)
``GET /ui/invocations/{id}``       the log lines of one invocation
``GET|POST /ui/login``, ``POST /ui/logout``
=================================  ==========================================================

Access (:mod:`bridge.console.session`): an API token with ``read`` or ``admin`` signs in
once; ``read`` sees everything in its function scope and no action buttons; ``admin`` may
replay and purge within its scope. Every POST needs the session's CSRF token. The API's
bearer-token middleware leaves ``/ui`` to this module (:data:`PREFIX`).

Nothing secret is shown: tokens appear by name only and every value registered as a secret
(:func:`bridge.log.register_secret`) is masked in what the pages render. Pages load nothing
from outside the daemon (a ``Content-Security-Policy`` of ``'self'`` enforces it).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from bridge import __version__, deadletter
from bridge.config import parse_duration
from bridge.console.session import Session, Sessions, csrf_ok, same_origin, set_cookie
from bridge.log import redact
from bridge.logstore import LogReader, db_path
from bridge.store import DeadLetterQuery, DeadLetterRow, QueueItem

if TYPE_CHECKING:
    from bridge.host import Host
    from bridge.tokens import Token

PREFIX = "/ui"
PAGE = 50
#: rows moved per store transaction in bulk replays
CHUNK = deadletter.REPLAY_CHUNK
HERE = Path(__file__).parent
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Origin "null"
    "Cache-Control": "no-store",
}
SINCE = {"": None, "15m": "15m", "1h": "1h", "6h": "6h", "24h": "24h", "7d": "7d"}

Page = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def mount(app: web.Application, daemon: Host, tokens: Sequence[Token]) -> Console:
    """Add the console's routes to the API's application ``app``; ``tokens`` may log in."""
    console = Console(daemon, tokens)
    console.add_routes(app.router)

    async def close(app: web.Application) -> None:
        console.close()

    app.on_cleanup.append(close)
    return console


def _time(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = int(time.time() - ts)
    if s < 0:
        return f"in {_span(-s)}"
    return f"{_span(s)} ago"


def _span(s: int) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f} ms"


class Console:
    def __init__(self, daemon: Host, tokens: Sequence[Token]) -> None:
        self.daemon = daemon
        self.sessions = Sessions(tokens)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters.update(redact=redact, time=_time, ago=_ago, ms=_ms)
        self._reader: LogReader | None = None

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get(PREFIX, self._to_home)
        r.add_get(PREFIX + "/login", self.login_form)
        r.add_post(PREFIX + "/login", self.login)
        r.add_post(PREFIX + "/logout", self._guard(self.logout, post=True))
        r.add_get(PREFIX + "/", self._guard(self.overview))
        r.add_get(PREFIX + "/deadletters", self._guard(self.deadletters))
        r.add_post(PREFIX + "/deadletters/replay", self._guard(self.replay, post=True, act=True))
        r.add_post(PREFIX + "/deadletters/purge", self._guard(self.purge, post=True, act=True))
        r.add_get(PREFIX + "/deadletters/{id}", self._guard(self.deadletter))
        r.add_get(PREFIX + "/retries", self._guard(self.retries))
        r.add_get(PREFIX + "/functions/{name}", self._guard(self.function))
        r.add_get(PREFIX + "/invocations/{id}", self._guard(self.invocation))
        r.add_static(PREFIX + "/static", HERE / "static", append_version=False)

    # --- plumbing ----------------------------------------------------------------------------

    def render(
        self, template: str, session: Session | None, status: int = 200, **ctx: Any
    ) -> web.Response:
        html = self.env.get_template(template).render(
            session=session,
            version=__version__,
            state=self.daemon.state.value,
            prefix=PREFIX,
            **ctx,
        )
        return web.Response(text=html, status=status, content_type="text/html", headers=_HEADERS)

    def _guard(self, page: Page, *, post: bool = False, act: bool = False) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            session = self.sessions.get(request)
            if session is None:
                if post:
                    return self._refuse("sign in first")
                raise web.HTTPSeeOther(f"{PREFIX}/login?{urlencode({'next': request.path_qs})}")
            if post:
                form = await request.post()
                csrf = form.get("csrf")
                if not same_origin(request) or not csrf_ok(
                    session, csrf if isinstance(csrf, str) else None
                ):
                    return self._refuse("the form is stale or came from another site")
                if act and not session.can_act:
                    return self._refuse(f"token {session.token.name} may only read")
            return await page(request, session)

        return handler

    def _refuse(self, why: str) -> web.Response:
        return web.Response(
            text=f"403 Forbidden: {why}\n", status=403, content_type="text/plain", headers=_HEADERS
        )

    def scope(self, token: Token, names: Iterable[str] = ()) -> list[str] | None:
        """The function names ``token`` may see among the configured ones and ``names``;
        None when it sees every function."""
        if "*" in token.functions:
            return None
        every = set(self.daemon.config.functions) | set(names)
        return sorted(f for f in every if token.allows("read", f))

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def reader(self) -> LogReader | None:
        if self._reader is None:
            path = db_path(self.daemon.config.state_dir)
            if path.exists():
                self._reader = LogReader(path)
        return self._reader

    # --- sign in -----------------------------------------------------------------------------

    async def _to_home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(PREFIX + "/")

    async def login_form(self, request: web.Request) -> web.Response:
        return self.render("login.html", None, error=None, next=request.query.get("next", ""))

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        given, nxt = form.get("token"), form.get("next")
        nxt = nxt if isinstance(nxt, str) and nxt.startswith(PREFIX + "/") else PREFIX + "/"
        if not same_origin(request):
            return self._refuse("the form came from another site")
        token = self.sessions.find_token(given) if isinstance(given, str) and given else None
        if token is None or not token.actions & {"read", "admin"}:
            why = "unknown token" if token is None else f"token {token.name} may not read"
            return self.render("login.html", None, status=401, error=why, next=nxt)
        resp = web.HTTPSeeOther(nxt)
        set_cookie(resp, self.sessions.create(token))
        raise resp

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        self.sessions.end(session)
        resp = web.HTTPSeeOther(PREFIX + "/login")
        set_cookie(resp, None)
        raise resp

    # --- overview ----------------------------------------------------------------------------

    async def overview(self, request: web.Request, session: Session) -> web.Response:
        d = self.daemon
        status = await d.status()
        scope = self.scope(session.token)
        recent = d.metrics.recent
        functions = []
        for name, st in status["functions"].items():
            if scope is not None and name not in scope:
                continue
            functions.append({"name": name, **st, **recent.summary(name)})
        triggers = []
        for name, st in status["triggers"].items():
            if scope is not None and st["function"] not in scope:
                continue
            src = d.sources.get(name)
            nxt: list[str] = []
            schedule = getattr(src, "schedule", None)
            if schedule is not None:
                with contextlib.suppress(Exception):
                    t = datetime.now(UTC)
                    for _ in range(3):
                        t = schedule.next_after(t)
                        if t is None:
                            break
                        nxt.append(t.strftime("%Y-%m-%d %H:%M:%S %Z"))
            lag = st.get("lag")
            if isinstance(lag, dict):
                lag = sum(v for v in lag.values() if isinstance(v, int | float))
            triggers.append(
                {
                    "name": name,
                    **st,
                    "lag": lag,
                    "last_event": d.last_event.get(name),
                    "next_fires": nxt,
                }
            )
        return self.render(
            "overview.html",
            session,
            status=200,
            daemon=status,
            functions=functions,
            triggers=triggers,
            window_min=int(recent.window_s // 60),
        )

    # --- dead letters ------------------------------------------------------------------------

    async def _query(
        self, session: Session, params: Any, facets: dict[str, list[str]] | None = None
    ) -> tuple[DeadLetterQuery, dict[str, str]]:
        if facets is None:
            facets = await self.daemon.store.dead_letter_facets()
        keys = ("function", "trigger", "error_class", "since", "from", "to")
        filters = {k: params.get(k, "") for k in keys}
        if filters["since"] not in SINCE:
            filters["since"] = ""
        since = SINCE[filters["since"]]
        start = time.time() - parse_duration(since) if since else None
        if (t := _utc(filters["from"])) is not None:
            start = t if start is None else max(start, t)
        else:
            filters["from"] = ""
        until = _utc(filters["to"])
        if until is None:
            filters["to"] = ""
        q = DeadLetterQuery(
            functions=self.scope(session.token, facets["function"]),
            function=filters["function"] or None,
            trigger=filters["trigger"] or None,
            error_class=filters["error_class"] or None,
            since=start,
            until=until,
        )
        return q, {k: v for k, v in filters.items() if isinstance(v, str)}

    async def deadletters(self, request: web.Request, session: Session) -> web.Response:
        store = self.daemon.store
        facets = await store.dead_letter_facets()
        q, filters = await self._query(session, request.query, facets)
        before = None
        cursor = request.query.get("before", "")
        if cursor:
            ts, _, rid = cursor.partition(":")
            with contextlib.suppress(ValueError):
                before = (float(ts), rid)
        rows = await store.find_dead_letters(q, before=before, limit=PAGE + 1)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        if q.functions is not None:
            facets["function"] = [f for f in facets["function"] if f in q.functions]
        active = {k: v for k, v in filters.items() if v}
        nxt = None
        if more:
            last = rows[-1]
            nxt = urlencode({**active, "before": f"{last.created_at!r}:{last.id}"})
        return self.render(
            "deadletters.html",
            session,
            rows=[_summary(r) for r in rows],
            total=await store.count_dead_letters(q),
            filters=filters,
            facets=facets,
            since_choices=list(SINCE),
            next_page=nxt,
            first_page=urlencode(active),
            paged=before is not None,
            done=request.query.get("done"),
        )

    async def deadletter(self, request: web.Request, session: Session) -> web.Response:
        row = await self.daemon.store.get_dead_letter(request.match_info["id"])
        if row is None or not session.token.allows("read", row.function):
            return self.render(
                "message.html", session, status=404, title="Not found", text="no such dead letter"
            )
        rec = json.loads(row.record)
        body = rec.get("Body", {})
        try:
            event = json.dumps(
                json.loads(body.get("ClientContext", "")), indent=2, ensure_ascii=False
            )
        except ValueError:
            event = body.get("ClientContext", "")
        detail = {k: v for k, v in rec.items() if k not in ("Body", "ErrorDetail")}
        detail.update({k: v for k, v in body.items() if k != "ClientContext"})
        return self.render(
            "deadletter.html",
            session,
            row=_summary(row),
            fields=detail,
            event=event,
            error_detail=rec.get("ErrorDetail", ""),
            replayable=row.function in self.daemon.config.functions,
        )

    async def _selected(self, session: Session, form: Any) -> tuple[list[DeadLetterRow], str]:
        """The rows a bulk form names (``ids``, or ``scope=all`` with filters) that this
        session may act on, and the query string of the list to go back to."""
        q, filters = await self._query(session, form)
        back = urlencode({k: v for k, v in filters.items() if v})
        if form.get("scope") == "all":
            return await self.daemon.store.find_dead_letters(q), back
        ids = [i for i in form.getall("ids", []) if isinstance(i, str)]
        rows = []
        for i in dict.fromkeys(ids):
            r = await self.daemon.store.get_dead_letter(i)
            if r is not None:
                rows.append(r)
        return rows, back

    async def replay(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        rows, back = await self._selected(session, form)
        rows = [r for r in rows if session.token.allows("admin", r.function)]
        replayed, skipped = await replay_rows(self.daemon, rows)
        done = f"replayed {len(replayed)}" + (
            f"; {skipped} skipped (their function is not configured)" if skipped else ""
        )
        raise web.HTTPSeeOther(_list_url(back, done))

    async def purge(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        rows, back = await self._selected(session, form)
        rows = [r for r in rows if session.token.allows("admin", r.function)]
        if form.get("confirm") != "yes":
            fields = [(k, v) for k, v in form.items() if k not in ("csrf", "confirm")]
            return self.render("confirm.html", session, count=len(rows), fields=fields, back=back)
        n = await self.daemon.store.delete_dead_letters([r.id for r in rows])
        raise web.HTTPSeeOther(f"{PREFIX}/deadletters?{back}&{urlencode({'done': f'purged {n}'})}")

    # --- retries, invocations ----------------------------------------------------------------

    async def retries(self, request: web.Request, session: Session) -> web.Response:
        items: list[QueueItem] = []
        unavailable = False
        try:
            items = await self.daemon.store.list_retries(500)
        except NotImplementedError:
            unavailable = True
        items = [i for i in items if session.token.allows("read", i.function)]
        return self.render("retries.html", session, items=items, unavailable=unavailable)

    async def function(self, request: web.Request, session: Session) -> web.Response:
        name = request.match_info["name"]
        if not session.token.allows("read", name):
            return self.render(
                "message.html", session, status=404, title="Not found", text="no such function"
            )
        reader = self.reader()
        rows = reader.invocations(name, limit=100) if reader is not None else []
        return self.render(
            "function.html",
            session,
            name=name,
            rows=rows,
            logs_enabled=reader is not None,
            summary=self.daemon.metrics.recent.summary(name),
        )

    async def invocation(self, request: web.Request, session: Session) -> web.Response:
        rid = request.match_info["id"]
        reader = self.reader()
        lines = reader.lines(request_id=rid, limit=5000) if reader is not None else []
        lines = [
            ln for ln in lines if ln.function is None or session.token.allows("read", ln.function)
        ]
        fragment = request.headers.get("HX-Request") == "true"
        return self.render(
            "loglines.html" if fragment else "invocation.html", session, request_id=rid, lines=lines
        )


def _utc(value: Any) -> float | None:
    """``2026-11-30T12:00`` (a datetime-local input, read as UTC) → unix time; else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _list_url(back: str, done: str) -> str:
    return f"{PREFIX}/deadletters?{back + '&' if back else ''}{urlencode({'done': done})}"


def _summary(r: DeadLetterRow) -> dict[str, Any]:
    rec = json.loads(r.record)
    return {
        "id": r.id,
        "function": r.function,
        "trigger": r.trigger or "",
        "error_class": r.error_class,
        "message": rec.get("ErrorMessage", ""),
        "attempts": rec.get("Attempts"),
        "created_at": r.created_at,
    }


async def replay_rows(daemon: Host, rows: list[DeadLetterRow]) -> tuple[list[str], int]:
    """Replay ``rows`` (:func:`bridge.deadletter.replay`); the ids replayed and how many
    were skipped (their function is not configured)."""
    queue = daemon.queue
    done = await deadletter.replay(
        daemon.store,
        rows,
        daemon.config.functions,
        queue.notify_requeued if queue is not None else None,
    )
    return done.replayed, len(done.skipped)
