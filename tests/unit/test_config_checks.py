"""validate names every problem at once: a trigger's unknown function together with its other
problems, and what each dead-letter sink needs (without printing the URL's secrets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config as cfg
from bridge.errors import ConfigError


def _problems(raw: dict[str, object], tmp_path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        cfg.parse(raw, base_dir=tmp_path)
    return dict(e.value.problems)


def _function(tmp_path: Path, **async_: str) -> dict[str, object]:
    code = tmp_path / "fn"
    code.mkdir(exist_ok=True)
    (code / "index.py").write_text("def main_handler(event, context):\n    return event\n")
    return {"code": str(code), "async": async_} if async_ else {"code": str(code)}


def test_an_unknown_function_is_reported_with_the_triggers_other_problems(
    tmp_path: Path,
) -> None:
    raw = {
        "functions": {"rec": _function(tmp_path)},
        "triggers": {
            "bad-cron": {"type": "timer", "function": "ghost", "cron": "99 * * * * * *"},
            "no-type": {"function": "phantom"},
            "bad-type": {"type": "nope", "function": "spectre"},
        },
    }
    problems = _problems(raw, tmp_path)
    assert "triggers.bad-cron.cron" in problems
    assert 'unknown function "ghost"' in problems["triggers.bad-cron.function"]
    assert "triggers.no-type.type" in problems
    assert 'unknown function "phantom"' in problems["triggers.no-type.function"]
    assert "triggers.bad-type.type" in problems
    assert 'unknown function "spectre"' in problems["triggers.bad-type.function"]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://dlq?sasl.username=u&sasl.password=hunter2-secret-pw", "bootstrap_servers"),
        ("kafka://", "no topic after kafka://"),
    ],
)
def test_a_dead_letter_url_is_checked_for_what_its_sink_needs(
    tmp_path: Path, url: str, says: str
) -> None:
    raw = {"functions": {"rec": _function(tmp_path, dead_letter=url)}}
    problems = _problems(raw, tmp_path)
    message = problems["functions.rec.async.dead_letter"]
    assert says in message
    assert "hunter2-secret-pw" not in message


def test_a_good_dead_letter_url_passes(tmp_path: Path) -> None:
    url = "kafka://dlq?bootstrap_servers=127.0.0.1:9092&sasl.password=hunter2-secret-pw"
    config = cfg.parse(
        {"functions": {"rec": _function(tmp_path, dead_letter=url)}}, base_dir=tmp_path
    )
    assert config.functions["rec"].async_.dead_letter == url


@pytest.mark.parametrize(
    ("raw", "key", "says"),
    [
        ({"api": {"listen": "nohostport"}}, "api.listen", 'invalid listen address "nohostport"'),
        ({"api": {"listen": "127.0.0.1:99999"}}, "api.listen", "use host:port"),
        ({"gateway": {"listen": "127.0.0.1:x"}}, "gateway.listen", "use host:port"),
        (
            {"daemon": {"database_url": "postgresql://u:hunter2-secret-pw@db:99999/bridge"}},
            "daemon",
            "database_url: a port must be a number from 0 to 65535",
        ),
        (
            {"daemon": {"database_url": "postgresql://u:hunter2-secret-pw@h1:5432,h2:x/bridge"}},
            "daemon",
            "database_url: a port must be a number from 0 to 65535",
        ),
    ],
)
def test_what_a_listener_or_the_database_cannot_use_is_a_config_error(
    tmp_path: Path, raw: dict[str, object], key: str, says: str
) -> None:
    # validate says it (exit 78: systemd does not restart a bad config in a loop)
    problems = _problems({**raw, "functions": {"rec": _function(tmp_path)}}, tmp_path)
    assert says in problems[key], problems
    assert "hunter2-secret-pw" not in str(problems)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write",  # libpq's HA form
        "postgresql://u:pa[ss]@db.example:5432/bridge",
        "postgres:///bridge",
    ],
)
def test_database_urls_libpq_reads_pass(tmp_path: Path, url: str) -> None:
    config = cfg.parse(
        {"daemon": {"database_url": url}, "functions": {"rec": _function(tmp_path)}},
        base_dir=tmp_path,
    )
    assert config.daemon.database == url
