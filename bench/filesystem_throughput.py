"""Filesystem trigger throughput: files dropped into a watched directory, through the real
daemon, to a no-op SCF-style ``python`` function.

The daemon runs as a subprocess (``event-bridge run``: inotify, the durable
queue on SQLite with fsync, warm python workers). A separate writer process drops N
small files into the watched directory as fast as it can. Progress is read from the
daemon's state database (read-only, WAL), so the function stays a true no-op:

- accepted: files whose event was durably queued and checkpointed (the source's state,
  written only in ack);
- invoked: accepted and the queue drained (each row is removed after the function
  succeeded).

CPU time is reported per file too (the daemon process: event loop, SQLite store thread
and any other threads under one GIL; the function's worker processes), which says more
than wall-clock files/s on a shared or loaded machine.

Two modes: ``live`` (the daemon is running when the files land: inotify close-after-
write events) and ``scan`` (the files are there before the daemon starts: the start-up
scan finds them).

    .venv/bin/python bench/filesystem_throughput.py [--files 10000] [--concurrency 4]
        [--mode live|scan|both] [--log-level info|warning] [--profile DIR]

``--profile DIR`` samples the daemon with py-spy (``pip install py-spy``; ``--gil``: the
thread holding the GIL, i.e. where the daemon's Python CPU goes) while it works, writes
DIR/<mode>.txt (collapsed stacks) and prints the top frames.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

EXE = str(Path(sys.executable).with_name("event-bridge"))
NOOP = "def main_handler(event, context):\n    return None\n"
WRITER = """
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
data = b"x" * 1024
for i in range(n):
    with open(os.path.join(root, "f%06d.dat" % i), "wb") as f:
        f.write(data)
"""


def config(tmp: Path, concurrency: int, log_level: str) -> Path:
    (tmp / "noop").mkdir()
    (tmp / "noop" / "index.py").write_text(NOOP)
    (tmp / "inbox").mkdir()
    cfg = tmp / "bridge.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [daemon]
            state_dir = "state"
            queue_poll = "100ms"
            log_level = "{log_level}"

            [functions.noop]
            code = "noop"
            concurrency = {concurrency}

            [triggers.inbox]
            type = "filesystem"
            function = "noop"
            path = "inbox"
            settle = "200ms"
            """
        )
    )
    return cfg


def progress(db: Path) -> tuple[int, int]:
    """(files checkpointed by the source, rows still in the async queue)."""
    if not db.exists():
        return 0, 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0, 0
    try:
        rows = conn.execute("SELECT value FROM kv WHERE namespace = 'filesystem:inbox'").fetchall()
        tracked = sum(len(json.loads(v)["files"]) for (v,) in rows)
        queued = conn.execute("SELECT COUNT(*) FROM async_queue").fetchone()[0]
        return tracked, int(queued)
    except sqlite3.Error:
        return 0, 0
    finally:
        conn.close()


def run(
    mode: str, n: int, concurrency: int, log_level: str, profile: Path | None = None
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = config(tmp, concurrency, log_level)
        db = tmp / "state" / "bridge.db"
        log = tmp / "daemon.log"
        writer = [sys.executable, "-c", WRITER, str(tmp / "inbox"), str(n)]
        out: dict[str, float] = {}
        if mode == "scan":
            t = time.monotonic()
            subprocess.run(writer, check=True)
            out["write_s"] = time.monotonic() - t
        # readiness through sd_notify (READY=1 once the watches are in place), whatever
        # the log level
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ready.bind(str(tmp / "notify.sock"))
        ready.settimeout(0.05)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock")}
        with log.open("w") as fh, ready:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [EXE, "run", "-c", str(cfg)], stdout=fh, stderr=subprocess.STDOUT, env=env
            )
            try:
                while True:
                    try:
                        if b"READY=1" in ready.recv(4096):
                            break
                    except TimeoutError:
                        pass
                    if proc.poll() is not None:
                        raise SystemExit(f"daemon exited:\n{log.read_text()}")
                import psutil  # type: ignore[import-untyped]

                daemon_ps = psutil.Process(proc.pid)
                cpu0 = _cpu(daemon_ps)
                spy = None
                if profile is not None:
                    py_spy = str(Path(EXE).with_name("py-spy"))
                    out_txt = str(profile / f"{mode}.txt")
                    spy = subprocess.Popen(
                        [
                            py_spy,
                            "record",
                            "--gil",
                            "--pid",
                            str(proc.pid),
                            "-f",
                            "raw",
                            "-o",
                            out_txt,
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                kids0 = sum(_cpu(k) for k in daemon_ps.children(recursive=True))
                if mode == "live":
                    t0 = time.monotonic()
                    w = subprocess.Popen(writer)
                accepted_at = invoked_at = None
                deadline = time.monotonic() + 600
                while invoked_at is None and time.monotonic() < deadline:
                    tracked, queued = progress(db)
                    now = time.monotonic()
                    if accepted_at is None and tracked >= n:
                        accepted_at = now
                    if accepted_at is not None and queued == 0:
                        invoked_at = now
                    time.sleep(0.02)
                out["daemon_cpu_s"] = _cpu(daemon_ps) - cpu0
                out["workers_cpu_s"] = (
                    sum(_cpu(k) for k in daemon_ps.children(recursive=True)) - kids0
                )
                if mode == "live":
                    w.wait()
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
            finally:
                proc.terminate()
                proc.wait(30)
        text = log.read_text()
        if accepted_at is None or invoked_at is None:
            raise SystemExit(f"timed out: {progress(db)}\n{text[-3000:]}")
        out["accepted_s"] = accepted_at - t0
        out["invoked_s"] = invoked_at - t0
        out["overflows"] = text.count("inotify overflow")
        return out


def top_frames(path: Path, k: int = 12) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """From a py-spy raw profile taken with ``--gil`` (only the thread holding the GIL is
    sampled: where the daemon's Python CPU goes), the ``k`` frames with the most own
    samples and the ``k`` functions of the bridge (``bridge/``, ``sources/``) with the most
    inclusive samples, as (share, frame)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        ours = {f.split(" (")[0] for f in frames if "bridge/" in f or "sources/" in f}
        for fn in ours - {"run"}:  # bridge/cli.py's run: every loop sample
            inclusive[fn] = inclusive.get(fn, 0) + n
    if not total:
        return [], []
    top_own = sorted(own.items(), key=lambda kv: -kv[1])[:k]
    top_inc = sorted(inclusive.items(), key=lambda kv: -kv[1])[:k]
    return [(c / total, f) for f, c in top_own], [(c / total, f) for f, c in top_inc]


def _cpu(p: object) -> float:
    t = p.cpu_times()  # type: ignore[attr-defined]
    return float(t.user + t.system)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--mode", choices=["live", "scan", "both"], default="both")
    ap.add_argument("--log-level", choices=["info", "warning"], default="info")
    ap.add_argument("--profile", type=Path, help="sample the daemon with py-spy into this folder")
    a = ap.parse_args()
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    n = a.files
    print(
        f"filesystem trigger: {n:,} files of 1 KiB -> daemon (inotify, SQLite fsync) -> no-op "
        f"python function (concurrency {a.concurrency}, log_level {a.log_level}); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    for mode in ["live", "scan"] if a.mode == "both" else [a.mode]:
        r = run(mode, n, a.concurrency, a.log_level, a.profile)
        what = "dropped while running" if mode == "live" else "there before start (start-up scan)"
        print(f"  {mode}: files {what}")
        if mode == "scan":
            print(f"    writer alone: {r['write_s']:.2f}s ({n / r['write_s']:,.0f} files/s)")
        print(
            f"    accepted (durably queued + checkpointed): {r['accepted_s']:.2f}s "
            f"-> {n / r['accepted_s']:,.0f} files/s"
        )
        print(
            f"    invoked (function ran for every file):    {r['invoked_s']:.2f}s "
            f"-> {n / r['invoked_s']:,.0f} files/s"
        )
        print(
            f"    CPU per file: daemon {r['daemon_cpu_s'] / n * 1e6:,.0f} us, "
            f"function workers {r['workers_cpu_s'] / n * 1e6:,.0f} us"
        )
        if r["overflows"]:
            print(f"    inotify overflows detected and rescanned: {int(r['overflows'])}")
        if a.profile is not None:
            own, inclusive = top_frames(a.profile / f"{mode}.txt")
            print("    py-spy --gil (the thread holding the GIL), top frames by own samples:")
            for share, frame in own:
                print(f"      {share:6.1%}  {frame}")
            print("    ... and the bridge's functions by inclusive samples:")
            for share, frame in inclusive:
                print(f"      {share:6.1%}  {frame}")


if __name__ == "__main__":
    main()
