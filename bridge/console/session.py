"""Console sign-in: API tokens traded for a session cookie, and CSRF tokens for every POST.

Lifecycle: ``POST /ui/login`` with a form field ``token`` (an ``[[api.tokens]]`` secret with the
``read`` or ``admin`` action) creates a :class:`Session` and sets the cookie
:data:`COOKIE` (``HttpOnly``, ``SameSite=Strict``, ``Path=/ui``); the session ends on
``POST /ui/logout``, after :data:`IDLE_S` without a request, or when the daemon stops (sessions
live in memory only).

Rules: the cookie holds a random session id, never the token; a session remembers the token's
*name* and acts with that token's scope. Every form that POSTs carries the session's CSRF
token (a hidden ``csrf`` field), compared in constant time; a POST without it, or with an
``Origin`` that is not this server, is refused (403) before anything is done.

Not guaranteed: sessions do not survive a restart (sign in again); they are per process, so
behind a load balancer each replica has its own.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from bridge.tokens import Token

COOKIE = "bridge_console"
IDLE_S = 8 * 3600.0
MAX_SESSIONS = 10_000


@dataclasses.dataclass(slots=True)
class Session:
    id: str
    token: Token
    csrf: str
    seen: float

    @property
    def can_act(self) -> bool:
        """Admin tokens act (replay, purge); read tokens only look."""
        return "admin" in self.token.actions


class Sessions:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = list(tokens)
        self._by_id: dict[str, Session] = {}

    def find_token(self, given: str) -> Token | None:
        raw = given.strip().encode()
        found = None
        for t in self.tokens:  # compare with every token, in constant time each
            if hmac.compare_digest(raw, t.secret):
                found = t
        return found

    def create(self, token: Token) -> Session:
        now = time.monotonic()
        if len(self._by_id) >= MAX_SESSIONS:
            self._expire(now)
            while len(self._by_id) >= MAX_SESSIONS:  # still full: drop the least recent
                oldest = min(self._by_id.values(), key=lambda s: s.seen)
                del self._by_id[oldest.id]
        s = Session(secrets.token_urlsafe(32), token, secrets.token_urlsafe(32), now)
        self._by_id[s.id] = s
        return s

    def get(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        s = self._by_id.get(sid)
        now = time.monotonic()
        if s is None or now - s.seen > IDLE_S:
            self._by_id.pop(sid, None)
            return None
        s.seen = now
        return s

    def end(self, session: Session) -> None:
        self._by_id.pop(session.id, None)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self._by_id.items() if now - s.seen > IDLE_S]:
            del self._by_id[sid]


def set_cookie(response: web.StreamResponse, session: Session | None) -> None:
    if session is None:
        response.del_cookie(COOKIE, path="/ui")
        return
    response.set_cookie(
        COOKIE, session.id, path="/ui", httponly=True, samesite="Strict", max_age=int(IDLE_S)
    )


def same_origin(request: web.Request) -> bool:
    """False when the browser says the request comes from another site (``Origin``)."""
    origin = request.headers.get("Origin")
    if origin is None:  # not sent by every client; the CSRF token still has to match
        return True
    return origin == f"{request.scheme}://{request.host}"


def csrf_ok(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())
