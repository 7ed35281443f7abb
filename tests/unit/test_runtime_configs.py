"""Config models of the ``http`` and ``command`` runtimes, and their small helpers."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Config, FunctionConfig, parse
from bridge.errors import ConfigError
from bridge.targets import _proc
from bridge.targets.command import CommandConfig, CommandTarget
from bridge.targets.http import HttpConfig, HttpTarget, parse_retry_after


def problems(tmp_path: Path, fn: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        parse({"functions": {"w": fn}}, base_dir=tmp_path, env={})
    return e.value.problems


def ok(tmp_path: Path, fn: dict[str, Any]) -> Any:
    cfg: Config = parse({"functions": {"w": fn}}, base_dir=tmp_path, env={})
    return cfg.functions["w"]


def boot_dir(tmp_path: Path, mode: int | None = 0o755) -> Path:
    d = tmp_path / "web"
    d.mkdir()
    if mode is not None:
        (d / "scf_bootstrap").write_text("#!/bin/sh\n")
        (d / "scf_bootstrap").chmod(mode)
    return d


@pytest.mark.parametrize("model", [HttpConfig, CommandConfig])
def test_every_field_is_documented(model: type[FunctionConfig]) -> None:
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"


def test_targets_use_their_models() -> None:
    assert HttpTarget.Config is HttpConfig
    assert CommandTarget.Config is CommandConfig


# --- http ------------------------------------------------------------------------------------


def test_http_url(tmp_path: Path) -> None:
    fn = ok(tmp_path, {"runtime": "http", "url": "https://fn.example/run", "headers": {"X-A": "1"}})
    assert isinstance(fn, HttpConfig)
    assert fn.endpoint == "https://fn.example/run"
    assert fn.bootstrap is False


def test_http_bootstrap(tmp_path: Path) -> None:
    boot_dir(tmp_path)
    fn = ok(
        tmp_path,
        {
            "runtime": "http",
            "bootstrap": True,
            "code": "web",
            "port": 9100,
            "path": "/invoke",
            "ready_timeout": "2s",
        },
    )
    assert fn.code == tmp_path / "web"
    assert fn.endpoint == "http://127.0.0.1:9100/invoke"
    assert fn.ready_timeout == 2.0


@pytest.mark.parametrize(
    ("fn", "loc", "message"),
    [
        ({}, "functions.w.url", "required"),
        ({"url": "ftp://x/y"}, "functions.w.url", "http:// or https://"),
        ({"url": "http://"}, "functions.w.url", "http:// or https://"),
        ({"bootstrap": True}, "functions.w.code", "required with bootstrap = true"),
        ({"url": "http://x/", "code": "."}, "functions.w.code", "only used with bootstrap"),
        ({"url": "http://x/", "port": 0}, "functions.w.port", "greater than or equal to 1"),
        ({"url": "http://x/", "path": "run"}, "functions.w.path", 'must start with "/"'),
        (
            {"url": "http://x/", "headers": {"X-SCF-Request-Id": "x"}},
            "functions.w.headers",
            "reserved",
        ),
        (
            {"url": "http://x/", "headers": {"Content-Length": "1"}},
            "functions.w.headers",
            "cannot be configured",
        ),
        (
            {"url": "http://x/", "headers": {"bad name": "1"}},
            "functions.w.headers",
            "invalid header name",
        ),
        ({"url": "http://x/", "ready_timeout": 5}, "functions.w.ready_timeout", "needs a unit"),
        ({"url": "http://x/", "listen": 1}, "functions.w.listen", "unknown key"),
    ],
)
def test_http_problems(tmp_path: Path, fn: dict[str, Any], loc: str, message: str) -> None:
    found = problems(tmp_path, {"runtime": "http", **fn})
    assert any(where == loc and message in m for where, m in found), found


def test_http_url_and_bootstrap_are_exclusive(tmp_path: Path) -> None:
    boot_dir(tmp_path)
    found = problems(
        tmp_path, {"runtime": "http", "bootstrap": True, "code": "web", "url": "http://x/"}
    )
    assert found == [("functions.w.url", found[0][1])]
    assert "exclusive" in found[0][1]


def test_http_code_dir_missing(tmp_path: Path) -> None:
    found = problems(tmp_path, {"runtime": "http", "bootstrap": True, "code": "nope"})
    assert found == [("functions.w.code", f"code directory {tmp_path / 'nope'} does not exist")]


def test_http_scf_bootstrap_missing(tmp_path: Path) -> None:
    d = boot_dir(tmp_path, mode=None)
    found = problems(tmp_path, {"runtime": "http", "bootstrap": True, "code": str(d)})
    assert found == [("functions.w.code", f"scf_bootstrap not found in {d}")]


def test_http_scf_bootstrap_not_executable(tmp_path: Path) -> None:
    d = boot_dir(tmp_path, mode=0o644)
    found = problems(tmp_path, {"runtime": "http", "bootstrap": True, "code": str(d)})
    assert found == [("functions.w.code", f"{d / 'scf_bootstrap'} is not executable (chmod +x)")]


def test_retry_after() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("Wed, 01 May 2024 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("-3", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# --- command ---------------------------------------------------------------------------------


def script(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_command_bare_name_is_kept(tmp_path: Path) -> None:
    fn = ok(tmp_path, {"runtime": "command", "command": ["jq", "."]})
    assert isinstance(fn, CommandConfig)
    assert fn.command == ["jq", "."]
    assert fn.result == "auto"
    assert fn.code is None


def test_command_relative_to_code(tmp_path: Path) -> None:
    run = script(tmp_path / "fn" / "bin" / "run")
    fn = ok(tmp_path, {"runtime": "command", "code": "fn", "command": ["bin/run", "--flag"]})
    assert fn.command == [str(run), "--flag"]
    assert fn.code == tmp_path / "fn"


def test_command_relative_to_config_folder(tmp_path: Path) -> None:
    run = script(tmp_path / "run.sh")
    fn = ok(tmp_path, {"runtime": "command", "command": ["./run.sh"]})
    assert fn.command == [str(run)]


@pytest.mark.parametrize(
    ("fn", "loc", "message"),
    [
        ({}, "functions.w.command", "required key is missing"),
        ({"command": []}, "functions.w.command", "at least 1 item"),
        ({"command": [""]}, "functions.w.command", "must not be empty"),
        ({"command": ["./missing.sh"]}, "functions.w.command", "missing.sh does not exist"),
        ({"command": ["true"], "code": "nope"}, "functions.w.code", "does not exist"),
        ({"command": ["true"], "result": "xml"}, "functions.w.result", "'json', 'text' or 'auto'"),
        ({"command": ["true"], "memory": "1MiB"}, "functions.w.memory", "greater than or equal"),
    ],
)
def test_command_problems(tmp_path: Path, fn: dict[str, Any], loc: str, message: str) -> None:
    found = problems(tmp_path, {"runtime": "command", **fn})
    assert any(where == loc and message in m for where, m in found), found


def test_command_not_executable(tmp_path: Path) -> None:
    run = script(tmp_path / "run.sh", mode=0o644)
    found = problems(tmp_path, {"runtime": "command", "command": ["./run.sh"]})
    assert found == [
        ("functions.w.command", f'program "./run.sh": {run} is not executable (chmod +x)')
    ]


# --- helpers ---------------------------------------------------------------------------------


def test_function_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EB_TEST_SECRET", "s3cr3t")
    monkeypatch.setenv("PATH", "/opt/x:/usr/bin")
    env = _proc.function_env("fn", "command", {"TZ": "Asia/Shanghai", "PORT": "1"}, PORT="9000")
    assert "EB_TEST_SECRET" not in env
    assert env["PATH"] == "/opt/x:/usr/bin"
    assert env["SCF_FUNCTIONNAME"] == "fn"
    assert env["SCF_RUNTIME"] == "command"
    assert env["TZ"] == "Asia/Shanghai"  # configured wins over the SCF default
    assert env["PORT"] == "9000"  # the runtime's own wins over configured
    assert set(env) <= {*_proc.BASE_ENV, "SCF_FUNCTIONNAME", "SCF_FUNCTIONVERSION", "SCF_NAMESPACE",
                        "SCF_RUNTIME", "TZ", "PORT"}  # fmt: skip
    monkeypatch.delenv("PATH")
    assert _proc.function_env("fn", "command", {})["PATH"] == os.defpath


def test_lines() -> None:
    got: list[str] = []
    lines = _proc.Lines(got.append)
    lines.feed(b"one\r\ntw")
    lines.feed(b"o\n\nthr\xffee")
    assert got == ["one", "two", ""]
    lines.flush()
    assert got[-1] == "thr\ufffdee"
    got.clear()
    lines.feed(b"x" * (_proc.MAX_LINE * 2 + 5))
    lines.flush()
    assert [len(s) for s in got] == [_proc.MAX_LINE, _proc.MAX_LINE, 5]


def test_describe_exit() -> None:
    assert _proc.describe_exit(3) == "status 3"
    assert _proc.describe_exit(-9) == "signal SIGKILL"
    assert _proc.describe_exit(None) == "unknown status"
