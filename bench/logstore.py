"""The log store's writer beside a busy event loop: how fast it stores invocation lines.

``sqlite3`` lets other threads run while a statement steps and takes the GIL back after it,
so a writer that inserts one row per statement (as the log store did, with ``executemany``)
waits for the GIL once per row while another thread keeps it busy. This feeds the real
``LogStoreHandler`` the daemon installs ``--lines`` invocation lines, in the way the event
loop hands them over, and times until all are in ``logs.db``: with ``ROWS_PER_INSERT`` rows
per statement, and with one (the reference: the same work but for that). Each runs twice:
with nothing else running, and with a thread spinning in Python (an event loop that never
waits: the worst case).

    .venv/bin/python bench/logstore.py [--lines 60000]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from bridge import logstore
from bridge.logstore import LogReader, LogStoreHandler


def _record(i: int) -> logging.LogRecord:
    rid = f"req-{i:08d}"
    rec = logging.LogRecord(
        "bridge.dispatcher", logging.INFO, __file__, 1, "END RequestId: %s", (rid,), None
    )
    rec.request_id, rec.function, rec.trigger, rec.outcome = rid, "f", "t", "success"
    return rec


class Spinner:
    """A thread that holds the GIL whenever it can, as a saturated event loop does."""

    def __init__(self) -> None:
        self.stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self.stop:
            x += 1

    def __enter__(self) -> Spinner:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join()


def store(n: int, busy: bool) -> tuple[float, float]:
    """Lines per second into logs.db, and the writer's CPU per line (us)."""
    with tempfile.TemporaryDirectory() as d:
        h = LogStoreHandler(Path(d) / "logs.db", retention_s=3600, max_bytes=1 << 30)
        records = [_record(i) for i in range(n)]
        writer_cpu0 = _thread_cpu(h._thread)
        t0 = time.perf_counter()
        try:
            if busy:
                with Spinner():
                    _feed(h, records)
            else:
                _feed(h, records)
            elapsed = time.perf_counter() - t0
            writer_cpu = _thread_cpu(h._thread) - writer_cpu0
        finally:
            h.close()
        reader = LogReader(Path(d) / "logs.db")
        try:
            stored = reader.last_id()
        finally:
            reader.close()
        assert stored == n, f"stored {stored} of {n} lines"
        return n / elapsed, writer_cpu / n * 1e6


def _feed(h: LogStoreHandler, records: list[logging.LogRecord]) -> None:
    """Hand the lines over in steps of FLUSH_LINES, as the loop does, and wait for them."""
    step = logstore.FLUSH_LINES
    for i in range(0, len(records), step):
        for rec in records[i : i + step]:
            h.handle(rec)
    while h.written < len(records):
        time.sleep(0.001)


def _thread_cpu(thread: threading.Thread) -> float:
    """A thread's CPU seconds (Linux: /proc/self/task/TID/stat)."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=60_000)
    ap.add_argument(
        "--reference-lines",
        type=int,
        default=2_000,
        help="lines for one row per INSERT beside the spinning thread (a few hundred a second)",
    )
    a = ap.parse_args()
    print(f"log store writer, invocation lines handed over {logstore.FLUSH_LINES:,} at a time")
    rows = logstore.ROWS_PER_INSERT
    for busy in (False, True):
        print("  beside a thread spinning in Python:" if busy else "  with nothing beside it:")
        rates = {}
        for per in (rows, 1):
            n = a.reference_lines if busy and per == 1 else a.lines
            logstore.ROWS_PER_INSERT = per
            try:
                rate, cpu = store(n, busy)
            finally:
                logstore.ROWS_PER_INSERT = rows
            rates[per] = rate
            print(
                f"    {per:>3} rows per INSERT: {n:>7,} lines {rate:>10,.0f} lines/s, "
                f"writer CPU {cpu:5.2f} us per line"
            )
        print(f"    ratio {rates[rows] / rates[1]:.1f}x")


if __name__ == "__main__":
    main()
