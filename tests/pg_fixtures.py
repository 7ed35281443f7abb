"""PostgreSQL for the tests: each test gets its own database on 127.0.0.1:5432 (user
postgres, trust), dropped afterwards. ``make test`` (tests/services.py) installs and starts
PostgreSQL where it is missing; a test that cannot reach it fails, never skips."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_database() -> str:
    name = f"eb_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN, autocommit=True, connect_timeout=10) as c:
        c.execute(f"CREATE DATABASE {name}")
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True, connect_timeout=10) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def url(name: str, port: int = 5432) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"


@pytest.fixture
def pg_db() -> Iterator[str]:
    """The name of a fresh, empty database."""
    name = create_database()
    try:
        yield name
    finally:
        drop_database(name)


@pytest.fixture
def pg_url(pg_db: str) -> str:
    return url(pg_db)


def query(db: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url(db), autocommit=True, connect_timeout=10) as c:
        cur = c.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []
