"""The PostgreSQL store's schema: versioned migrations (bridge/pgstore.py applies them on
start under an advisory lock; ``event-bridge db migrate`` ahead of time)."""

from __future__ import annotations

import urllib.parse

from bridge.errors import BridgeError

#: (version, SQL). Append only: a released migration is never edited.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE timer_state (trigger_name TEXT PRIMARY KEY, last_fire TIMESTAMPTZ NOT NULL);
CREATE TABLE kv (namespace TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                 PRIMARY KEY (namespace, key));
CREATE TABLE async_queue (
    id TEXT PRIMARY KEY, function TEXT NOT NULL, trigger_name TEXT,
    request_source TEXT NOT NULL, payload TEXT NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL, due_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, function_errors INTEGER NOT NULL DEFAULT 0,
    last_error_class TEXT, last_error TEXT, last_detail TEXT, dead_letter_reason TEXT,
    lease_owner TEXT, lease_until DOUBLE PRECISION
);
CREATE INDEX async_queue_due ON async_queue (function, due_at);
CREATE INDEX async_queue_owner ON async_queue (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE dead_letters (
    id TEXT PRIMARY KEY, function TEXT NOT NULL, trigger_name TEXT,
    error_class TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, record TEXT NOT NULL
);
CREATE INDEX dead_letters_fn ON dead_letters (function, created_at);
CREATE INDEX dead_letters_created ON dead_letters (created_at, id);
CREATE INDEX dead_letters_class ON dead_letters (error_class, created_at);
CREATE INDEX dead_letters_trigger ON dead_letters (trigger_name, created_at);
CREATE TABLE fired (key TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE INDEX fired_at ON fired (at);
""",
    ),
    (
        2,
        """
CREATE TABLE replicas (
    owner TEXT PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL
);
""",
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaTooNew(BridgeError):
    """The database's schema is newer than this event-bridge knows."""


def describe(url: str) -> str:
    """host:port/database of a URL: what errors name (never the user or password)."""
    p = urllib.parse.urlsplit(url)
    try:
        return f"{p.hostname or 'localhost'}:{p.port or 5432}{p.path or '/'}"
    except ValueError:  # several hosts (h1:5432,h2:5433), or a bad port: as written
        return f"{p.netloc.rpartition('@')[2]}{p.path or '/'}"
