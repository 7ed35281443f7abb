"""Config loading: drop-ins, interpolation, value types, every error at once with its key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bridge import config as cfg
from bridge.errors import ConfigError


@pytest.fixture
def code(tmp_path: Path) -> Path:
    d = tmp_path / "fn"
    d.mkdir()
    (d / "index.py").write_text("def main_handler(event, context):\n    return event\n")
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


# --- value types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("60s", 60),
        ("6h", 21600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1.5s", 1.5),
        ("250us", 0.00025),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert cfg.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "5x", "s", "1h 30", "-1s", "1s2"])
def test_bad_durations_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        cfg.parse_duration(bad)


def test_bare_number_duration_asks_for_a_unit() -> None:
    with pytest.raises(ValueError, match=r'needs a unit, e\.g\. "3s"'):
        cfg.parse_duration(3)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("128MiB", 128 * 1024**2),
        ("6MB", 6_000_000),
        ("1GiB", 1024**3),
        ("512KiB", 512 * 1024),
        ("100B", 100),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert cfg.parse_size(text) == size


@pytest.mark.parametrize("bad", ["128", "MiB", "12 parsecs", ""])
def test_bad_sizes(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        cfg.parse_size(bad)


# --- interpolation ----------------------------------------------------------------------------


def test_interpolation_forms() -> None:
    env = {"A": "alpha", "EMPTY": ""}
    problems: list[tuple[str, str]] = []
    doc = {
        "x": "${A}-${B:-beta}-${EMPTY:-gamma}-$${A}",
        "l": ["${A}", {"deep": "${A:?needed}"}],
    }
    out = cfg.interpolate(doc, env, "", problems)
    assert problems == []
    assert out == {"x": "alpha-beta-gamma-${A}", "l": ["alpha", {"deep": "alpha"}]}


def test_interpolation_errors_name_the_key_and_message() -> None:
    problems: list[tuple[str, str]] = []
    cfg.interpolate(
        {"t": {"u": "${NOPE}", "v": ["${REQ:?set REQ to the bucket}"]}}, {}, "", problems
    )
    assert problems == [
        ("t.u", "environment variable NOPE is not set"),
        ("t.v[0]", "environment variable REQ is not set: set REQ to the bucket"),
    ]


# --- whole documents --------------------------------------------------------------------------


def test_minimal_config_and_defaults(tmp_path: Path, code: Path) -> None:
    path = write(
        tmp_path / "bridge.toml",
        """
        [functions.f]
        code = "fn"
        """,
    )
    c = cfg.load(path, env={})
    f = c.functions["f"]
    assert f.runtime == "python"
    assert f.timeout == 3.0
    assert f.memory == 128 * 1024**2
    assert (
        f.async_.retry_attempts == 2
        and f.async_.retry_interval == 60
        and f.async_.max_event_age == 21600
    )
    assert c.daemon.timezone == "UTC"
    # relative paths resolve against the config file's folder, not the cwd
    assert f.code == code  # type: ignore[attr-defined]
    assert c.daemon.state_dir == tmp_path / "state"


def test_dropins_merge_in_name_order(tmp_path: Path, code: Path) -> None:
    path = write(
        tmp_path / "bridge.toml",
        """
        [daemon]
        timezone = "UTC"
        [functions.f]
        code = "fn"
        timeout = "3s"
        """,
    )
    write(tmp_path / "conf.d" / "20-later.toml", '[functions.f]\ntimeout = "9s"\n')
    write(
        tmp_path / "conf.d" / "10-first.toml",
        '[functions.f]\ntimeout = "5s"\nconcurrency = 7\n[daemon]\ntimezone = "Asia/Shanghai"\n',
    )
    write(tmp_path / "conf.d" / "ignored.txt", "not toml")
    c = cfg.load(path, env={})
    assert c.functions["f"].timeout == 9.0
    assert c.functions["f"].concurrency == 7
    assert c.daemon.timezone == "Asia/Shanghai"
    assert [p.name for p in c.files] == ["bridge.toml", "10-first.toml", "20-later.toml"]


def test_every_problem_is_reported_at_once(tmp_path: Path, code: Path) -> None:
    path = write(
        tmp_path / "bridge.toml",
        """
        [daemon]
        timezone = "Mars/Olympus"
        colour = "blue"

        [functions.f]
        code = "fn"
        timeout = "3 fortnights"
        concurrency = "many"
        memory = "lots"

        [functions.g]
        runtime = "cobol"

        [triggers.t]
        type = "timer"
        function = "nope"
        cron = "* * * * * * *"

        [triggers.u]
        type = "carrier-pigeon"
        function = "f"

        [extras]
        x = 1
        """,
    )
    with pytest.raises(ConfigError) as exc:
        cfg.load(path, env={})
    p = problems(exc)
    assert "Mars/Olympus" in p["daemon.timezone"]
    assert p["daemon.colour"] == "unknown key"
    assert "invalid duration" in p["functions.f.timeout"]
    assert "functions.f.concurrency" in p
    assert "invalid size" in p["functions.f.memory"]
    assert p["functions.g.runtime"].startswith('unknown runtime "cobol" (installed: ')
    assert "python" in p["functions.g.runtime"]
    assert p["triggers.t.function"].startswith('unknown function "nope"')
    assert p["triggers.u.type"].startswith('unknown trigger type "carrier-pigeon" (installed: ')
    assert "extras" in p
    # the message lists every problem with its path
    text = str(exc.value)
    assert "daemon.timezone" in text and "triggers.u.type" in text and str(path) in text


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bridge.toml", "[functions.f]\ncode = \n")
    write(tmp_path / "conf.d" / "x.toml", "[a\n")
    with pytest.raises(ConfigError) as exc:
        cfg.load(path, env={})
    p = problems(exc)
    assert "line 2" in p[str(path)]
    assert "malformed TOML" in p[str(tmp_path / "conf.d" / "x.toml")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.load(tmp_path / "absent.toml", env={})
    assert problems(exc) == {str(tmp_path / "absent.toml"): "config file not found"}


def test_unset_variable_is_an_error_with_its_path(tmp_path: Path, code: Path) -> None:
    path = write(
        tmp_path / "bridge.toml",
        """
        [functions.f]
        code = "fn"
        environment = { BUCKET = "${BUCKET:?the bucket to write to}", REGION = "${REGION:-ap-guangzhou}" }
        """,
    )
    with pytest.raises(ConfigError) as exc:
        cfg.load(path, env={})
    assert problems(exc) == {
        "functions.f.environment.BUCKET": "environment variable BUCKET is not set: the bucket to write to"
    }
    c = cfg.load(path, env={"BUCKET": "photos"})
    assert c.functions["f"].environment == {"BUCKET": "photos", "REGION": "ap-guangzhou"}


def test_invalid_names(code: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.parse({"functions": {"1bad": {"code": str(code)}, "ok": "not a table"}}, env={})
    p = problems(exc)
    assert "invalid name" in p["functions.1bad"]
    assert p["functions.ok"] == "must be a table"


def test_config_path_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cfg.ENV_CONFIG, raising=False)
    assert cfg.config_path(None) == Path("/etc/event-bridge/bridge.toml")
    monkeypatch.setenv(cfg.ENV_CONFIG, "/x/y.toml")
    assert cfg.config_path(None) == Path("/x/y.toml")
    assert cfg.config_path("z.toml") == Path("z.toml")


def test_state_directory_env_wins(monkeypatch: pytest.MonkeyPatch, code: Path) -> None:
    c = cfg.parse({"functions": {"f": {"code": str(code)}}}, env={})
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/event-bridge")
    assert c.state_dir == Path("/var/lib/event-bridge")


def test_models_are_frozen(code: Path) -> None:
    c = cfg.parse({"functions": {"f": {"code": str(code)}}}, env={})
    with pytest.raises(Exception, match="frozen"):
        c.functions["f"].timeout = 5  # type: ignore[misc]


def test_every_core_field_is_documented() -> None:
    for model in (
        cfg.DaemonConfig,
        cfg.ApiConfig,
        cfg.ApiToken,
        cfg.AsyncConfig,
        cfg.FunctionConfig,
        cfg.TriggerConfig,
    ):
        undocumented = [n for n, f in model.model_fields.items() if not f.description]
        assert undocumented == [], f"{model.__name__}: {undocumented}"


def test_handler_problems(tmp_path: Path) -> None:
    (tmp_path / "index.py").write_text(
        "import os\nfrom x import y as main_alias\nhandler = lambda e, c: e\ndef main_handler(e, c): pass\n"
    )
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("async def run(e, c): pass\n")
    (tmp_path / "star.py").write_text("from helpers import *\n")
    (tmp_path / "broken.py").write_text("def oops(:\n")
    assert cfg.handler_problems(tmp_path, "index.main_handler") is None
    assert cfg.handler_problems(tmp_path, "index.handler") is None
    assert cfg.handler_problems(tmp_path, "index.main_alias") is None
    assert cfg.handler_problems(tmp_path, "pkg.mod.run") is None
    assert cfg.handler_problems(tmp_path, "star.anything") is None
    assert (
        cfg.handler_problems(tmp_path, "index")
        == 'invalid handler "index": use FILE.FUNCTION, e.g. "index.main_handler"'
    )
    assert (
        cfg.handler_problems(tmp_path, "nope.main")
        == f'entry file "nope.py" not found in {tmp_path} (handler "nope.main")'
    )
    assert (
        cfg.handler_problems(tmp_path, "index.missing")
        == 'handler function "missing" not found in index.py (handler "index.missing")'
    )
    assert "syntax error in broken.py line 1" in (
        cfg.handler_problems(tmp_path, "broken.oops") or ""
    )
    assert "does not exist" in (cfg.handler_problems(tmp_path / "absent", "index.main") or "")
