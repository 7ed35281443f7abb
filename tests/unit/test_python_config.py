"""``[functions.NAME]`` with ``runtime = "python"``: PythonConfig through bridge.config.parse."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from bridge import registry
from bridge.config import parse
from bridge.errors import ConfigError
from bridge.targets.python import PythonConfig, PythonTarget


@pytest.fixture
def code(tmp_path: Path) -> Path:
    d = tmp_path / "fn"
    d.mkdir()
    (d / "index.py").write_text("def main_handler(event, context):\n    return event\n")
    (d / "sub").mkdir()
    (d / "sub" / "mod.py").write_text("async def run(event, context):\n    return 1\n")
    return d


def problems(functions: dict[str, Any], base_dir: Path | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        parse({"functions": functions}, base_dir=base_dir, env={})
    return e.value.problems


def test_registered_as_the_python_runtime() -> None:
    assert registry.target("python") is PythonTarget
    assert PythonTarget.Config is PythonConfig


def test_defaults(code: Path) -> None:
    config = parse({"functions": {"f": {"code": str(code)}}}, env={})
    f = config.functions["f"]
    assert isinstance(f, PythonConfig)
    assert f.runtime == "python"
    assert f.code == code
    assert f.handler == "index.main_handler"
    assert f.python is None
    assert (f.timeout, f.memory, f.concurrency) == (3.0, 128 * 1024**2, 4)


def test_relative_code_is_resolved_against_the_config_folder(code: Path) -> None:
    config = parse(
        {"functions": {"f": {"code": "fn", "handler": "sub.mod.run"}}}, base_dir=code.parent, env={}
    )
    assert config.functions["f"].code == code  # type: ignore[attr-defined]


def test_code_is_required() -> None:
    assert problems({"f": {"runtime": "python"}}) == [
        ("functions.f.code", "required key is missing")
    ]


def test_missing_code_dir_is_reported_once_at_its_key(tmp_path: Path) -> None:
    got = problems({"f": {"code": str(tmp_path / "nowhere"), "handler": "index.main_handler"}})
    assert got == [("functions.f.code", f"code directory {tmp_path / 'nowhere'} does not exist")]


def test_missing_entry_file(code: Path) -> None:
    assert problems({"f": {"code": str(code), "handler": "nope.main"}}) == [
        ("functions.f.handler", f'entry file "nope.py" not found in {code} (handler "nope.main")')
    ]


def test_missing_handler_function(code: Path) -> None:
    assert problems({"f": {"code": str(code), "handler": "index.other"}}) == [
        (
            "functions.f.handler",
            'handler function "other" not found in index.py (handler "index.other")',
        )
    ]


def test_handler_without_function_part(code: Path) -> None:
    [(loc, msg)] = problems({"f": {"code": str(code), "handler": "index"}})
    assert loc == "functions.f.handler"
    assert "FILE.FUNCTION" in msg


def test_handler_in_a_subfolder(code: Path) -> None:
    config = parse({"functions": {"f": {"code": str(code), "handler": "sub.mod.run"}}}, env={})
    assert config.functions["f"].handler == "sub.mod.run"  # type: ignore[attr-defined]


def test_python_interpreter(code: Path, tmp_path: Path) -> None:
    ok = parse({"functions": {"f": {"code": str(code), "python": sys.executable}}}, env={})
    assert ok.functions["f"].python == sys.executable  # type: ignore[attr-defined]
    assert problems({"f": {"code": str(code), "python": str(tmp_path / "python9")}}) == [
        (
            "functions.f.python",
            f'python interpreter "{tmp_path / "python9"}" not found or not executable',
        )
    ]


def test_every_problem_at_once_with_key_paths(code: Path) -> None:
    got = problems(
        {
            "a": {"code": str(code), "handler": "nope.main", "bogus": 1},
            "b": {"code": str(code), "timeout": "forever", "memory": "1MiB"},
        }
    )
    locs = [loc for loc, _ in got]
    assert sorted(locs) == sorted(
        ["functions.a.handler", "functions.a.bogus", "functions.b.timeout", "functions.b.memory"]
    )
    assert ("functions.a.bogus", "unknown key") in got


def test_frozen(code: Path) -> None:
    f = PythonConfig.model_validate({"code": str(code)})
    with pytest.raises(ValueError, match="frozen"):
        f.handler = "x.y"  # type: ignore[misc]


def test_every_field_is_documented() -> None:
    undocumented = [n for n, f in PythonConfig.model_fields.items() if not f.description]
    assert undocumented == []
