"""Config errors an operator reads: suggestions for unknown keys, drop-ins named, units."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config as cfg
from bridge import docgen
from bridge.errors import ConfigError


def test_unknown_keys_suggest_the_nearest_known_one(tmp_path: Path) -> None:
    (tmp_path / "bridge.toml").write_text(
        '[daemon]\nshutdown_grase = "1s"\n[api]\n[[api.tokens]]\nname = "a"\n'
        'secret = "0123456789abcdef"\nactoins = ["read"]\n[deamon]\n'
    )
    with pytest.raises(ConfigError) as e:
        cfg.load(tmp_path / "bridge.toml")
    got = dict(e.value.problems)
    assert got["daemon.shutdown_grase"] == 'unknown key (did you mean "shutdown_grace"?)'
    assert got["api.tokens[0].actoins"] == 'unknown key (did you mean "actions"?)'
    assert got["deamon"].startswith('unknown section (did you mean "daemon"?')


def test_a_key_far_from_every_known_one_gets_no_guess() -> None:
    assert cfg.unknown_key("colour", ["timeout", "memory"]) == "unknown key"


def test_problems_from_a_dropin_name_it(tmp_path: Path) -> None:
    (tmp_path / "bridge.toml").write_text('[daemon]\ntimezone = "UTC"\n')
    (tmp_path / "conf.d").mkdir()
    drop = tmp_path / "conf.d" / "10-tz.toml"
    drop.write_text('[daemon]\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError) as e:
        cfg.load(tmp_path / "bridge.toml")
    (loc, msg), *_ = e.value.problems
    assert loc == "daemon.timezone" and msg.endswith(f"(set in {drop})")
    # a problem from the main file is not annotated
    drop.unlink()
    (tmp_path / "bridge.toml").write_text('[daemon]\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError) as e:
        cfg.load(tmp_path / "bridge.toml")
    assert "(set in" not in e.value.problems[0][1]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (3, "3s"), (90, "90s"), (60, "1m"), (21600, "6h"), (172800, "2d")],
)
def test_durations_are_written_as_a_config_writes_them(seconds: float, text: str) -> None:
    assert docgen.format_duration(seconds) == text
    assert cfg.parse_duration(text) == seconds


def test_sizes_are_written_as_a_config_writes_them() -> None:
    assert docgen.format_size(128 * 1024**2) == "128MiB"
    assert docgen.format_size(1000) == "1000B"
