"""Helpers for contract tests of sources that need a real upstream service.

A contract test that needs a service (Redis, RabbitMQ, PostgreSQL) and cannot reach it
fails when ``CI`` is set and is skipped otherwise (dramatiq's rule): CI must never pass by
skipping the very checks it exists to run.
"""

from __future__ import annotations

import os
import socket

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(host: str, port: int, what: str, timeout: float = 2.0) -> None:
    """Fail (under CI) or skip (elsewhere) unless ``host:port`` accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        message = f"{what} is not reachable at {host}:{port}: {e}"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
