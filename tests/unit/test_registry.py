"""bridge.registry: entry-point discovery of installed plugins, lazy loading, broken plugins.

The plugins here are installed for real, the way pip leaves them: a package next to a
``*.dist-info`` folder holding METADATA and entry_points.txt, on a sys.path entry. Only the
folder is temporary.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from bridge import registry
from bridge.errors import PluginError
from sources.timer import TimerSource

GOOD = '''
"""A good plugin."""
from pydantic import Field

from bridge.abc import EndOfInput, Source
from bridge.config import TriggerConfig


class FakeConfig(TriggerConfig):
    """[triggers.NAME] with type = "fake_stream"."""

    stream: str = Field(description="The stream to read.")
    batch: int = Field(10, description="Entries per read.")


class FakeSource(Source[FakeConfig]):
    """Reads a fake stream."""

    Config = FakeConfig

    async def connect(self) -> None:
        pass

    async def read(self):
        raise EndOfInput

    async def close(self) -> None:
        pass


def not_a_class():
    pass
'''

BROKEN = """
import libfoo_that_is_not_installed  # noqa: F401
"""

Install = Callable[..., Path]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(dist, version, module, code, {group: {name: "module:attr"}})`` installs a
    distribution into a temporary site directory on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules_before = set(sys.modules)

    def install(
        dist: str, version: str, module: str, code: str, entry_points: dict[str, dict[str, str]]
    ) -> Path:
        (site / f"{module}.py").write_text(textwrap.dedent(code))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "".join(
            f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in names.items()) + "\n"
            for group, names in entry_points.items()
        )
        (info / "entry_points.txt").write_text(eps)
        (info / "RECORD").write_text("")
        registry.refresh()
        return site

    registry.refresh()
    yield install
    registry.refresh()
    for name in set(sys.modules) - modules_before:
        if name.startswith("eb_test_"):
            del sys.modules[name]


@pytest.fixture
def good(install: Install) -> None:
    install(
        "eb-test-good",
        "1.2.3",
        "eb_test_good",
        GOOD,
        {
            registry.SOURCES: {
                "fake_stream": "eb_test_good:FakeSource",
                "not_a_class": "eb_test_good:not_a_class",
            }
        },
    )


@pytest.fixture
def broken(install: Install) -> None:
    install(
        "eb-test-broken",
        "0.1",
        "eb_test_broken",
        BROKEN,
        {registry.SOURCES: {"broken_one": "eb_test_broken:Source"}},
    )


def test_an_installed_plugin_is_discovered_next_to_the_built_ins(good: None) -> None:
    assert {"fake_stream", "timer"} <= set(registry.names(registry.SOURCES))
    cls = registry.source("fake_stream")
    assert cls.__name__ == "FakeSource" and cls.__module__ == "eb_test_good"
    assert registry.source("timer") is TimerSource


def test_discovery_imports_nothing_until_a_plugin_is_asked_for(good: None) -> None:
    registry.names(registry.SOURCES)
    registry.entry_points(registry.SOURCES)
    assert "eb_test_good" not in sys.modules
    registry.source("fake_stream")
    assert "eb_test_good" in sys.modules


def test_describe_gives_version_distribution_and_documented_fields(good: None) -> None:
    info = registry.describe(registry.SOURCES, "fake_stream")
    assert (info.name, info.distribution, info.version, info.object) == (
        "fake_stream",
        "eb-test-good",
        "1.2.3",
        "eb_test_good:FakeSource",
    )
    assert info.ok and info.doc == "Reads a fake stream."
    fields = {f.name: f for f in info.fields}
    assert fields["stream"].required and fields["stream"].doc == "The stream to read."
    assert (fields["batch"].default, fields["batch"].type) == (10, "int")
    assert "function" in fields  # the core's TriggerConfig keys are listed too
    json.dumps(info.as_dict())


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_still_load(
    good: None, broken: None
) -> None:
    # Given one plugin whose import raises, when it is loaded
    with pytest.raises(registry.BrokenPlugin) as e:
        registry.source("broken_one")
    # Then the error names the plugin, its object and distribution, and the cause
    assert isinstance(e.value, PluginError)
    assert e.value.name == "broken_one" and e.value.distribution == "eb-test-broken"
    assert e.value.message == (
        'trigger type plugin "broken_one" (eb_test_broken:Source, from eb-test-broken) failed '
        "to load: ModuleNotFoundError: No module named 'libfoo_that_is_not_installed'"
    )
    # and the other plugins, built-in or not, still load
    assert registry.source("timer") is TimerSource
    assert registry.source("fake_stream").__name__ == "FakeSource"
    # and the inventory shows it with its error instead of failing
    info = {p.name: p for p in registry.inventory([registry.SOURCES])}
    assert not info["broken_one"].ok and info["broken_one"].version == "0.1"
    assert "libfoo_that_is_not_installed" in (info["broken_one"].error or "")
    assert info["timer"].ok and info["fake_stream"].ok
    assert (registry.SOURCES, "broken_one") in registry.broken([registry.SOURCES])
    assert info["broken_one"].as_dict()["error"].startswith("ModuleNotFoundError")


def test_a_failed_load_is_tried_again_later(broken: None, install: Install) -> None:
    with pytest.raises(registry.BrokenPlugin):
        registry.source("broken_one")
    # the missing dependency gets installed: the next load succeeds without a restart
    site = install(
        "libfoo", "1.0", "libfoo_that_is_not_installed", "X = 1\n", {registry.TARGETS: {}}
    )
    (site / "eb_test_broken.py").write_text(
        "import libfoo_that_is_not_installed\nfrom bridge.abc import Source\n"
    )
    sys.modules.pop("eb_test_broken", None)
    assert registry.source("broken_one").__name__ == "Source"
    sys.modules.pop("libfoo_that_is_not_installed", None)


def test_an_entry_point_that_is_not_a_plugin_class_is_broken(good: None) -> None:
    with pytest.raises(registry.BrokenPlugin, match="is not a subclass of Source"):
        registry.source("not_a_class")


def test_an_unknown_name_lists_what_is_installed(good: None) -> None:
    with pytest.raises(registry.UnknownPlugin) as e:
        registry.source("nats")
    assert isinstance(e.value, LookupError)
    assert e.value.message.startswith('unknown trigger type "nats" (installed: ')
    assert "fake_stream" in e.value.installed and "timer" in e.value.installed
    with pytest.raises(registry.UnknownPlugin, match='unknown runtime "cobol"'):
        registry.target("cobol")


def test_a_third_party_plugin_cannot_replace_a_built_in(install: Install) -> None:
    install(
        "eb-test-rogue",
        "6.6.6",
        "eb_test_rogue",
        GOOD,
        {registry.SOURCES: {"timer": "eb_test_rogue:FakeSource"}},
    )
    # the rogue distribution is first on sys.path, but the built-in keeps the name
    assert registry.source("timer") is TimerSource
    info = registry.describe(registry.SOURCES, "timer")
    assert info.distribution == "event-bridge"
    assert info.shadows == ("eb_test_rogue:FakeSource (eb-test-rogue)",)


def test_refresh_finds_a_plugin_installed_while_running(install: Install) -> None:
    assert "late_one" not in registry.names(registry.SOURCES)
    install(
        "eb-test-late",
        "1.0",
        "eb_test_late",
        GOOD,
        {registry.SOURCES: {"late_one": "eb_test_late:FakeSource"}},
    )  # install() refreshes, as a test that pip-installs must
    assert "late_one" in registry.names(registry.SOURCES)


def test_plugins_command_reports_a_broken_plugin_and_lists_the_others(
    good: None, broken: None
) -> None:
    from bridge.cli import main

    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["group"], r["name"]): r for r in map(json.loads, result.output.splitlines())}
    bad = rows[(registry.SOURCES, "broken_one")]
    assert "libfoo_that_is_not_installed" in bad["error"]
    assert bad["version"] == "0.1"
    fake = rows[(registry.SOURCES, "fake_stream")]
    assert "error" not in fake and fake["version"] == "1.2.3"
    assert {f["name"] for f in fake["fields"]} >= {"stream", "batch"}
