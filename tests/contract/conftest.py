"""Helpers for tests that need a real upstream service.

A test that needs a service (Redis, RabbitMQ) and cannot reach it **fails**, with a
message that says how to start it — never skips, whatever ``CI`` says: a suite that goes
green by skipping the checks it exists to run proves nothing. ``make test`` starts the
services first (``make services``, tests/services.py).
"""

from __future__ import annotations

import socket

import pytest


def require_service(host: str, port: int, what: str, timeout: float = 2.0) -> None:
    """Fail the test unless ``host:port`` accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        pytest.fail(
            f"{what} is not reachable at {host}:{port}: {e} (start it: make services)",
            pytrace=False,
        )
