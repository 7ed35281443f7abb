"""bridge.log.HotLog: an invocation's START / END / REPORT lines are the records
``logger.info`` would make (the first line of a call site is made by the logger, the later
ones from its template), and the logger's level, filters and ``disabled`` flag apply."""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bridge.log import HotLog, HumanFormatter


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, Keep]]:
    lg = logging.getLogger(f"test.hotlog.{time.monotonic_ns()}")
    lg.setLevel(logging.INFO)
    lg.propagate = False
    keep = Keep()
    lg.addHandler(keep)
    yield lg, keep
    lg.removeHandler(keep)


def _both(lg: logging.Logger, hot: HotLog, rid: str, outcome: str) -> None:
    """One line each way, from this function (so both have the same funcName)."""
    extra = {"request_id": rid, "function": "f", "trigger": "t", "outcome": outcome}
    lg.info("END RequestId: %s", rid, extra=extra)
    hot.info("END RequestId: %s", rid, extra=extra)


HOT_LINE = (
    inspect.getsource(_both)
    .splitlines()
    .index('    hot.info("END RequestId: %s", rid, extra=extra)')
    + _both.__code__.co_firstlineno
)


def test_lines_from_the_template_are_the_records_the_logger_makes(
    logger: tuple[logging.Logger, Keep], monkeypatch: pytest.MonkeyPatch
) -> None:
    lg, keep = logger
    hot = HotLog(lg)
    # every line a time of its own, 1.25 s apart (the logger reads time.time before Python
    # 3.13 and time.time_ns after, as HotLog does)
    start = time.time()
    now = iter([start + 1.25 * k for k in range(100)])
    monkeypatch.setattr(time, "time", lambda: next(now))
    monkeypatch.setattr(time, "time_ns", lambda: int(next(now) * 1e9))
    before = time.time()
    _both(lg, hot, "a", "success")  # the site's first line: the logger makes it
    _both(lg, hot, "b", "timeout")  # from the template
    _both(lg, hot, "c", "success")
    after = time.time()
    assert len(keep.records) == 6
    for plain, fast in zip(keep.records[::2], keep.records[1::2], strict=True):
        assert type(fast) is type(plain)
        p, f = vars(plain), vars(fast)
        assert p.keys() == f.keys()
        assert {
            k: v for k, v in p.items() if k not in {"created", "msecs", "relativeCreated", "lineno"}
        } == {
            k: v for k, v in f.items() if k not in {"created", "msecs", "relativeCreated", "lineno"}
        }
        assert fast.lineno == HOT_LINE and fast.funcName == "_both"
        assert fast.pathname == __file__ and fast.filename == "test_hotlog.py"
        assert before < fast.created < after and fast.created != plain.created
        # the time's attributes as the logger's record has them for its own time
        assert abs(fast.msecs - (fast.created % 1) * 1000) < 1
        assert fast.relativeCreated - plain.relativeCreated == pytest.approx(
            (fast.created - plain.created) * 1000
        )
    assert [r.getMessage() for r in keep.records[1::2]] == [
        "END RequestId: a",
        "END RequestId: b",
        "END RequestId: c",
    ]
    assert [r.outcome for r in keep.records[1::2]] == ["success", "timeout", "success"]  # type: ignore[attr-defined]
    # the template is not changed by the lines made from it
    assert keep.records[1].getMessage() == "END RequestId: a"
    formatted = HumanFormatter(timestamps=False).format(keep.records[3])
    assert formatted == (
        f"INFO    {lg.name}: END RequestId: b [request_id=b function=f trigger=t outcome=timeout]"
    )


def test_level_disabled_and_filters_apply_as_to_any_line(
    logger: tuple[logging.Logger, Keep],
) -> None:
    lg, keep = logger
    hot = HotLog(lg)

    def line(rid: str) -> None:
        hot.info("START RequestId: %s", rid, extra={"request_id": rid})

    line("1")
    lg.setLevel(logging.WARNING)
    line("2")
    lg.setLevel(logging.INFO)
    lg.disabled = True
    line("3")
    lg.disabled = False
    refuse = logging.Filter("someone.else")
    lg.addFilter(refuse)
    line("4")
    lg.removeFilter(refuse)
    line("5")
    assert [r.request_id for r in keep.records] == ["1", "5"]  # type: ignore[attr-defined]


def test_each_thread_has_its_own_template(logger: tuple[logging.Logger, Keep]) -> None:
    lg, keep = logger
    hot = HotLog(lg)

    def line() -> None:
        for _ in range(2):  # the second from the template
            hot.info("START RequestId: %s", "x", extra={"request_id": "x"})

    line()
    other = threading.Thread(target=line, name="other-thread")
    other.start()
    other.join()
    assert [(r.threadName, r.thread) for r in keep.records] == [
        (threading.current_thread().name, threading.get_ident())
    ] * 2 + [("other-thread", other.ident)] * 2


def test_extra_keys_are_checked_as_the_logger_checks_them(
    logger: tuple[logging.Logger, Keep],
) -> None:
    lg, keep = logger
    hot = HotLog(lg)

    def line(extra: dict[str, Any]) -> None:
        hot.info("START RequestId: %s", "x", extra=extra)

    line({"request_id": "x"})
    line({"request_id": "y"})
    # other keys at the same site: the logger makes the line, and refuses an overwrite
    line({"request_id": "z", "trigger": "t"})
    with pytest.raises(KeyError, match="overwrite"):
        line({"request_id": "w", "msg": "other"})
    assert [(r.request_id, getattr(r, "trigger", None)) for r in keep.records] == [  # type: ignore[attr-defined]
        ("x", None),
        ("y", None),
        ("z", "t"),
    ]
    assert all(r.getMessage() == "START RequestId: x" for r in keep.records)


def test_a_single_mapping_argument_is_kept_as_the_logger_keeps_it(
    logger: tuple[logging.Logger, Keep],
) -> None:
    lg, keep = logger
    hot = HotLog(lg)

    def line(*args: Any) -> None:
        hot.info("REPORT %(ms)s ms", *args, extra={"request_id": "x"})

    line({"ms": 1})
    line({"ms": 2})
    assert [r.getMessage() for r in keep.records] == ["REPORT 1 ms", "REPORT 2 ms"]


def test_with_a_record_factory_of_someone_s_every_line_is_made_by_it(
    logger: tuple[logging.Logger, Keep],
) -> None:
    """A factory may set something of its own on each line (a trace id, say)."""
    lg, keep = logger
    hot = HotLog(lg)
    made = iter(range(100))

    class Mine(logging.LogRecord):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.serial = next(made)

    def line() -> None:
        hot.info("START RequestId: %s", "x", extra={"request_id": "x"})

    line()  # the site's template, before the factory
    old = logging.getLogRecordFactory()
    logging.setLogRecordFactory(Mine)
    try:
        for _ in range(3):
            line()
    finally:
        logging.setLogRecordFactory(old)
    line()
    assert [type(r) for r in keep.records] == [
        logging.LogRecord,
        Mine,
        Mine,
        Mine,
        logging.LogRecord,
    ]
    assert [getattr(r, "serial", None) for r in keep.records] == [None, 0, 1, 2, None]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_makes_its_own_templates(logger: tuple[logging.Logger, Keep]) -> None:
    """The templates hold the process id (and the thread's): a child starts without them."""
    lg, keep = logger
    hot = HotLog(lg)
    for _ in range(2):
        hot.info("START RequestId: %s", "x", extra={"request_id": "x"})
    assert len(hot._sites) == 1
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 if it has no templates and its line has its pid
        ok = False
        try:
            hot.info("START RequestId: %s", "y", extra={"request_id": "y"})
            last = keep.records[-1]
            ok = last.process == os.getpid() and last.request_id == "y"  # type: ignore[attr-defined]
            ok = ok and len(hot._sites) == 1
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.process for r in keep.records] == [os.getpid()] * 2
