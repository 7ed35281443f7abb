"""The example third-party plugin (examples/plugins/redis-streams), installed with pip and
run end to end: found by ``event-bridge plugins``, driven by the real daemon against the
local Redis, and through the contract suite in its own test folder.

``make test`` installs it (``pip install -e examples/plugins/redis-streams``); when it is
missing the fixture installs it the same way. Without Redis these tests fail (``make
services`` starts it); they never skip.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DaemonProcess, Project, cli, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "plugins" / "redis-streams"
DIST = "event-bridge-redis-streams"
REDIS = ("127.0.0.1", 6379)


def _unavailable(message: str) -> None:
    pytest.fail(f"{message} (start it: make services)", pytrace=False)


@pytest.fixture(scope="module")
def plugin_installed() -> None:
    try:
        md.distribution(DIST)
        return
    except md.PackageNotFoundError:
        pass
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "-e", str(PLUGIN)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, f"pip install -e {PLUGIN} failed:\n{pip.stdout}\n{pip.stderr}"
    importlib.invalidate_caches()  # the plugin and its dependencies are new on sys.path
    from bridge import registry

    registry.refresh()


@pytest.fixture
def redis(plugin_installed: None) -> Iterator[Any]:
    import redis as redis_py  # a dependency of the plugin, so installed with it

    client = redis_py.Redis(host=REDIS[0], port=REDIS[1], decode_responses=True)
    try:
        client.ping()
    except redis_py.ConnectionError as e:
        client.close()
        _unavailable(f"Redis is not reachable at {REDIS[0]}:{REDIS[1]}: {e}")
    yield client
    client.close()


@pytest.fixture
def stream(redis: Any) -> Iterator[str]:
    name = f"e2e:{uuid.uuid4().hex[:12]}"
    yield name
    redis.delete(name)


def test_the_plugins_command_lists_the_installed_plugin(plugin_installed: None) -> None:
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    (row,) = [r for r in rows if r["group"] == "bridge.sources" and r["name"] == "redis_streams"]
    assert row["version"] == "0.1.0" and "error" not in row
    assert row["object"] == "event_bridge_redis_streams:RedisStreamsSource"
    fields = {f["name"]: f for f in row["fields"]}
    assert fields["stream"]["required"] and fields["stream"]["doc"]
    assert fields["claim_idle"]["doc"].startswith("Entries pending this long")


def test_the_daemon_runs_the_plugin_end_to_end(
    plugin_installed: None,
    redis: Any,
    stream: str,
    project: Project,
    daemon: Callable[[Path], DaemonProcess],
) -> None:
    project.function("recorder")
    config = project.config(
        f"""
        [daemon]
        state_dir = "./state"
        queue_poll = "50ms"

        [functions.recorder]
        code = "functions/recorder"
        handler = "index.main_handler"
        environment = {{ OUT = "@OUT@" }}

        [triggers.orders]
        type = "redis_streams"
        function = "recorder"
        stream = "{stream}"
        start = "all"
        block = "500ms"
        """
    )
    assert cli("validate", "-c", str(config)).returncode == 0

    def bodies() -> list[str]:
        return [r["event"]["Records"][0]["CMQ"]["msgBody"] for r in project.records()]

    def pending() -> int:
        return int(redis.xpending(stream, "event-bridge")["pending"])

    # Given two entries already in the stream, when the daemon starts (start = "all")
    redis.xadd(stream, {"body": "one"})
    redis.xadd(stream, {"body": "two"})
    d = daemon(config)
    d.wait_log(r"ready: ")
    redis.xadd(stream, {"body": "three"})
    # Then every entry reaches the function as an SCF CMQ event, and is XACKed once accepted
    wait_for(lambda: sorted(bodies()) == ["one", "three", "two"], what="3 invocations")
    record = project.records()[0]["event"]["Records"][0]["CMQ"]
    assert record["topicName"] == stream and record["subscriptionName"] == "event-bridge"
    wait_for(lambda: pending() == 0, what="no pending entries")
    assert d.stop() == 0

    # Given an entry added while the daemon is down, when it starts again
    redis.xadd(stream, {"body": "four"})
    d = daemon(config)
    # Then the group resumes where it was: only the new entry is delivered
    wait_for(lambda: len(bodies()) >= 4, what="the 4th invocation")
    wait_for(lambda: pending() == 0, what="no pending entries")
    assert d.stop() == 0
    assert sorted(bodies()) == ["four", "one", "three", "two"]


def test_the_plugin_passes_the_contract_suite(plugin_installed: None, redis: Any) -> None:
    # The plugin's own tests: tests/test_contract.py subclasses bridge.testing.SourceContract.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=PLUGIN,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
