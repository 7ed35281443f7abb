"""Secret masking in both log formats, with secrets that are actually logged: in the message,
in extra fields, in tracebacks; secrets holding JSON's escaped characters; overlapping and
nested secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bridge import log as logsetup
from bridge import redact


@pytest.fixture
def secrets() -> Iterator[None]:
    saved = set(redact._secrets)
    yield
    redact._secrets.clear()
    redact._secrets.update(saved)


def _logged(fmt: str, emit: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logsetup.JsonFormatter() if fmt == "json" else logsetup.HumanFormatter(timestamps=False)
    )
    logger = logging.getLogger(f"test.log.{fmt}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        emit(logger)  # type: ignore[operator]
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_a_logged_secret_is_masked_in_message_fields_and_traceback(fmt: str, secrets: None) -> None:
    secret = "tok-0123456789abcdef"
    logsetup.register_secret(secret)

    def emit(logger: logging.Logger) -> None:
        logger.warning("token %s denied", secret, extra={"trigger": f"t-{secret}"})
        try:
            raise ValueError(f"bad credentials {secret}")
        except ValueError:
            logger.exception("connect failed")

    out = _logged(fmt, emit)
    assert secret not in out
    assert out.count("***") >= 3  # the message, the extra field, the exception line
    if fmt == "json":
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0]["message"] == "token *** denied" and lines[0]["trigger"] == "t-***"
        assert "bad credentials ***" in lines[1]["traceback"]


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_secrets_with_json_escapes_are_masked(fmt: str, secrets: None) -> None:
    secret = 'pa"ss\\word\u00e9'
    logsetup.register_secret(secret)
    out = _logged(fmt, lambda logger: logger.error("password is %s", secret))
    assert secret not in out
    assert json.dumps(secret)[1:-1] not in out  # nor its JSON-escaped spelling
    assert "pa" not in out.replace("password is", "")


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_overlapping_and_nested_secrets_leave_nothing(fmt: str, secrets: None) -> None:
    # registered in an order where masking one first would leave a tail of the other
    for s in ("AAAAsecretBBBB", "BBBBtailCCCC", "XYZ123", "XYZ1234567"):
        logsetup.register_secret(s)
    out = _logged(
        fmt, lambda logger: logger.error("a=%s b=%s", "AAAAsecretBBBBtailCCCC", "XYZ1234567")
    )
    for piece in ("secret", "tail", "CCCC", "BBBB", "AAAA", "4567", "XYZ"):
        assert piece not in out, out
    assert "a=*** b=***" in out


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_setup_writes_the_chosen_format(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # found by the mutation run (scripts/mutation.py): flipping the format choice in setup(),
    # or dropping its setFormatter call, passed every unit test
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    try:
        logsetup.setup(fmt, "info", out, journal_native=False)
        logging.getLogger("bridge.test").info("hello %s", "there")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    line = out.getvalue().strip().splitlines()[-1]
    if fmt == "json":
        doc = json.loads(line)
        assert doc["message"] == "hello there" and doc["level"].lower() == "info"
    else:
        assert line.endswith("bridge.test: hello there") and "INFO" in line
        with pytest.raises(ValueError):
            json.loads(line)


def test_timestamps_are_utc_to_the_millisecond_across_second_boundaries() -> None:
    # lines of one second share the second's text: the next second must not reuse it
    t = 1796076241.0  # 2026-11-30T22:04:01Z
    xs = (t + 0.9994, t + 1.0, t + 1.0019, t - 86400.5, t + 0.25, -0.5, -1.0, 0.0)
    assert [logsetup._stamp(x) for x in xs] == [
        "2026-11-30T22:04:01.999Z",
        "2026-11-30T22:04:02.000Z",
        "2026-11-30T22:04:02.001Z",
        "2026-11-29T22:04:00.500Z",
        "2026-11-30T22:04:01.250Z",
        "1969-12-31T23:59:59.500Z",
        "1969-12-31T23:59:59.000Z",
        "1970-01-01T00:00:00.000Z",
    ]
