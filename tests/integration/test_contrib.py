"""contrib/: the Prometheus alert rules pass `promtool check rules` and their unit tests, and
every metric the rules and the Grafana dashboard name exists in a real daemon's /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.testing import free_port

from .conftest import DaemonProcess, Project, wait_for

pytestmark = pytest.mark.integration

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
RULES = CONTRIB / "prometheus" / "event-bridge.rules.yml"
RULE_TESTS = CONTRIB / "prometheus" / "event-bridge.rules.test.yml"
DASHBOARD = CONTRIB / "grafana" / "event-bridge.json"
TOKEN = "read-token-0123456789abcdef"
METRIC = re.compile(r"\bbridge_[a-z_]+\b")


def promtool() -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: `make services` installs Debian's prometheus package"
    return exe


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    check = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    test = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def named_metrics() -> set[str]:
    names = set(METRIC.findall(RULES.read_text()))
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][1]["definition"])
    for e in exprs:
        names |= set(METRIC.findall(e))
    return names


def exposed(text: str) -> set[str]:
    """Every series name a scrape can hold: the samples, and each family's names."""
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            out |= (
                {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
            )
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return out


def test_every_metric_of_the_rules_and_dashboard_is_exposed(
    project: Project, daemon: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    project.function("f")
    cfg = project.config(
        f"""
        [daemon]
        state_dir = "state"
        [api]
        enabled = true
        listen = "127.0.0.1:{port}"
        [[api.tokens]]
        name = "prometheus"
        secret = "{TOKEN}"
        actions = ["read"]
        [functions.f]
        code = "functions/f"
        environment = {{ OUT = "@OUT@" }}
        [triggers.tick]
        type = "timer"
        function = "f"
        cron = "* * * * * * *"
        """
    )
    daemon(cfg).wait_log("ready")
    wait_for(project.records, what="a timer invocation")

    def scrape() -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    text = scrape()
    names = named_metrics()
    assert {"bridge_source_connected", "bridge_queue_oldest_age_seconds"} <= names
    missing = names - exposed(text)
    assert not missing, f"named by contrib/ but not in /metrics: {sorted(missing)}"
    assert 'bridge_source_connected{trigger="tick"} 1.0' in text
