"""A plugin that is installed but fails to import takes down only the triggers (and
functions) that use it: validate warns, the daemon logs it and runs everything else."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import DaemonProcess, Project, cli, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def broken_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution registering source ``mqtt`` whose module import raises, installed the
    way pip leaves it (module + dist-info) in a directory on PYTHONPATH."""
    site = tmp_path / "site"
    info = site / "eb_broken_mqtt-0.3.dist-info"
    info.mkdir(parents=True)
    (site / "eb_broken_mqtt.py").write_text("import paho_mqtt_that_is_missing\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: eb-broken-mqtt\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[bridge.sources]\nmqtt = eb_broken_mqtt:Source\n")
    (info / "RECORD").write_text("")
    path = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    return site


def test_a_broken_plugin_skips_its_trigger_and_the_rest_runs(
    broken_site: Path, project: Project, daemon: Callable[[Path], DaemonProcess]
) -> None:
    project.function("recorder")
    config = project.config(
        """
        [daemon]
        state_dir = "./state"
        queue_poll = "50ms"

        [functions.recorder]
        code = "functions/recorder"
        handler = "index.main_handler"
        environment = { OUT = "@OUT@" }

        [triggers.sensors]
        type = "mqtt"
        function = "recorder"
        topic = "sensors/#"

        [triggers.tick]
        type = "timer"
        function = "recorder"
        cron = "* * * * * * *"
        message = "alive"
        """
    )
    # validate: a warning naming the trigger, the plugin and the error; not a config error
    result = cli("validate", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "triggers.sensors is not run" in result.stderr
    assert 'plugin "mqtt" (eb_broken_mqtt:Source, from eb-broken-mqtt)' in result.stderr
    assert "No module named 'paho_mqtt_that_is_missing'" in result.stderr
    assert "1 functions, 1 triggers" in result.stdout
    # run: the error is logged once, and the timer still fires
    d = daemon(config)
    d.wait_log(r"triggers\.sensors is not run: .*paho_mqtt_that_is_missing")
    wait_for(lambda: any(r["event"]["Message"] == "alive" for r in project.records()))
    # status names it, with why it does not run (it is not left out)
    human = cli("status", "-c", str(config))
    assert human.returncode == 0, human.stderr
    line = next(ln for ln in human.stdout.splitlines() if "trigger  sensors" in ln)
    assert "mqtt" in line and "-> recorder" in line and "not run: trigger type plugin" in line
    assert d.stop() == 0
    # plugins: the broken one is listed with its error, the others load
    listing = cli("plugins")
    assert "! fails to load: ModuleNotFoundError" in listing.stdout
    assert "bridge.sources timer" in listing.stdout
