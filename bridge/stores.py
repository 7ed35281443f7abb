"""Which state store a configuration names: SQLite in the state directory, or PostgreSQL
with ``daemon.database_url`` (:mod:`bridge.pgstore`, the ``postgres`` extra)."""

from __future__ import annotations

import os
import socket

from bridge.models import Config
from bridge.store import SqliteStore, StateStore


def store_for(config: Config, *, replica: bool = True, migrate: bool = True) -> StateStore:
    """The configured store: PostgreSQL with ``daemon.database_url``, else SQLite in the state
    directory. ``replica``: a daemon (heartbeat, LISTEN), not a CLI client."""
    url = config.daemon.database
    if url is None:
        return SqliteStore(config.state_dir)
    try:
        from bridge.pgstore import PgStore
    except ImportError as e:
        raise RuntimeError(
            f"daemon.database_url needs the postgres extra: pip install 'event-bridge[postgres]' ({e})"
        ) from None

    name = config.daemon.replica or f"{socket.gethostname()}:{os.getpid()}"
    return PgStore(
        url,
        replica=name if replica else None,
        takeover_s=config.daemon.takeover,
        migrate=migrate,
    )
