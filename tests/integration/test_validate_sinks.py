"""``validate`` and ``run`` with a dead-letter URL that lacks what its sink needs: exit 78
(no restart loop) and the URL's password nowhere in the output."""

from __future__ import annotations

import pytest

from .conftest import Project, cli

EX_CONFIG = 78
SECRET = "hunter2-secret-pw"

CONFIG = f"""
[functions.rec]
code = "functions/rec"
environment = {{ OUT = "@OUT@" }}
[functions.rec.async]
dead_letter = "kafka://dlq?sasl.username=u&sasl.password={SECRET}"
[triggers.other]
type = "timer"
function = "ghost"
cron = "@hourly"
"""


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_sink_url_missing_bootstrap_servers_exits_78_without_its_password(
    project: Project, command: str
) -> None:
    project.function("rec")
    r = cli(command, "-c", str(project.config(CONFIG)), timeout=60)
    assert r.returncode == EX_CONFIG, r.stdout + r.stderr
    assert "functions.rec.async.dead_letter" in r.stderr
    assert "bootstrap_servers" in r.stderr
    assert "triggers.other.function" in r.stderr  # reported at once with the rest
    assert SECRET not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
