"""bridge.sinks: the one parser of dead-letter sink URLs, its errors (config key, the bad part,
the usage) and that no secret of the URL ever reaches a message."""

from __future__ import annotations

import re

import pytest

from bridge import sinks
from bridge.deadletter import check_sink

USAGE = "demo://NAME?server=HOST:PORT"


def test_a_good_url_is_split() -> None:
    u = sinks.parse("  demo://user:s%40cret@Queue-A:5672/v/h?server=h:1&x=  ", "demo", usage=USAGE)
    assert (u.scheme, u.netloc, u.port, u.path) == ("demo", "Queue-A:5672", 5672, "/v/h")
    assert (u.username, u.password) == ("user", "s@cret")
    assert dict(u.params) == {"server": "h:1", "x": ""}
    assert "s%40cret" not in repr(u) and "s@cret" not in repr(u)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://q?server=h:1", 'the scheme is "kafka", not demo://'),
        ("q?server=h:1", "no scheme, not demo://"),
        ("demo://?server=h:1", "no queue after demo://"),
        ("demo:///path", "no queue after demo://"),
        ("demo://q:port", "not a valid URL"),
        ("demo://[::1?server=h:1", "not a valid URL"),
        ("demo://q?server=a&server=b", 'parameter "server" is given twice'),
        ("demo://q?colour=red&server=h", r"unknown parameter\(s\) colour \(known: server\)"),
    ],
)
def test_bad_urls_say_which_part_is_wrong(url: str, says: str) -> None:
    with pytest.raises(sinks.SinkUrlError, match=says) as e:
        sinks.parse(url, "demo", usage=USAGE, host="queue", params={"server"})
    message = str(e.value)
    assert message.startswith(f'dead_letter = "{url}"'), message
    assert message.endswith(f"; use {USAGE}"), message
    assert isinstance(e.value, ValueError)


def test_the_config_key_can_be_named() -> None:
    with pytest.raises(sinks.SinkUrlError, match=r'^functions\.f\.async\.dead_letter = "'):
        sinks.parse("demo://", "demo", usage=USAGE, key="functions.f.async.dead_letter")


@pytest.mark.parametrize(
    "url",
    [
        "demo://user:hunter2@q?colour=red",
        "demo://user:hunter%232@q?colour=red",
        "demo://q?sasl.password=hunter2&colour=red",
        "demo://q?token=hunter2&token=again",
    ],
)
def test_no_secret_in_a_message(url: str) -> None:
    with pytest.raises(sinks.SinkUrlError) as e:
        sinks.parse(url, "demo", usage=USAGE, params={"server", "sasl.password", "token"})
    assert "hunter" not in str(e.value), str(e.value)
    assert "***" in str(e.value)


def test_secret_files_are_paths_not_secrets() -> None:
    url = "demo://q?password_file=/run/credentials/pw&secret=s3"
    assert sinks.url_secrets(url) == ["s3"]
    assert sinks.shown(url) == "demo://q?password_file=/run/credentials/pw&secret=***"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("kafka://dlq?sasl.password=hunter2", "no brokers"),
        ("kafka://?bootstrap_servers=k:1&sasl.password=hunter2", "no topic after kafka://"),
        ("sqs://dlq?colour=red&secret_access_key=hunter2", r"unknown parameter\(s\)"),
        ("sqs://?region=x", "no queue after sqs://"),
    ],
)
def test_the_built_in_sinks_report_through_the_parser(spec: str, says: str) -> None:
    # check_sink is what config validation calls for functions.NAME.async.dead_letter
    why = check_sink(spec)
    assert why is not None and why.startswith('dead_letter = "'), why
    assert "hunter2" not in why
    assert re.search(says, why), why
