"""Fixtures of the chaos suite (see harness.py for what the oracle checks)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import FULL, RESULTS, Bridge

# Kafka and SQS start their own brokers: the full run only (make chaos)
collect_ignore = [] if FULL else ["test_full_sources.py"]


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    b = Bridge(tmp_path)
    yield b
    b.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # `make chaos` keeps the figures for docs/reliability.md
    if RESULTS and os.environ.get("CHAOS_REPORT"):
        Path(os.environ["CHAOS_REPORT"]).write_text(json.dumps(RESULTS, indent=1) + "\n")
