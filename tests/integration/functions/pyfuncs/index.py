"""Handlers used by tests/integration/test_python_runtime.py (one worker imports this once)."""

import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

CALLS = 0  # module state: survives between invocations of a warm worker


def echo(event, context):
    return {"event": event, "type": type(event).__name__}


def reprs(event, context):
    return repr(event)


def describe(event, context):
    return {
        "keys": sorted(context),
        "request_id": context.request_id,
        "by_key": context["request_id"],
        "function_name": context.function_name,
        "function_version": context.function_version,
        "namespace": context.namespace,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "time_limit_in_ms": context.time_limit_in_ms,
        "environ": context.environ,
        "wait": context.callbackWaitsForEmptyEventLoop,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }


def counter(event, context):
    global CALLS
    CALLS += 1
    return {"calls": CALLS, "pid": os.getpid()}


def instance(event, context):
    """Where this worker lives; waits at a barrier of ``event["n"]`` workers when given one."""
    tmp = tempfile.gettempdir()
    probe = Path(tmp, f"probe-{context.request_id}")
    probe.write_text("writable")
    barrier = event.get("barrier")
    if barrier:
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + 20
        while len(os.listdir(barrier)) < event["n"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the other workers never arrived")
            time.sleep(0.01)
    return {
        "pid": os.getpid(),
        "tmp": tmp,
        "probe": probe.read_text(),
        "cwd": os.getcwd(),
        "sys_path0": sys.path[0],
        "env_tmp": [os.environ.get(k) for k in ("TMPDIR", "TMP", "TEMP")],
    }


def environment(event, context):
    return dict(os.environ)


def sleepy(event, context):
    """Writes its pid to ``event["pidfile"]`` (if given), then sleeps ``event["sleep"]`` s."""
    if event.get("pidfile"):
        Path(event["pidfile"]).write_text(str(os.getpid()))
    time.sleep(event.get("sleep", 60))
    return {"pid": os.getpid()}


def hog(event, context):
    chunks = []
    for _ in range(event.get("mib", 1024)):
        chunks.append(bytearray(1024 * 1024))
    return len(chunks)


def boom(event, context):
    raise ValueError("boom")


def bad_result(event, context):
    return {"ok": {1, 2, 3}}


def chatty(event, context):
    print("first line")
    print("two\nlines")
    print("to stderr", file=sys.stderr)
    logging.warning("a warning from %s", "logging")
    logging.getLogger("child").info("child logger")
    sys.stdout.write("no newline at the end")
    os.write(1, b"straight to fd 1\n")
    return "done"


async def coroutine(event, context):
    await asyncio.sleep(0.01)
    return {"async": True, "request_id": context.request_id}


def suicide(event, context):
    os.kill(os.getpid(), signal.SIGKILL)


def exits(event, context):
    os._exit(3)


def signals(event, context):
    from bridge.handler import Drop, Retry

    if event.get("drop"):
        raise Drop("spam")
    raise Retry(30)


def ledger(event, context):
    """Appends ``event["n"]`` to the file ``event["path"]`` and prints it; then fails if
    ``event["fail"]``."""
    with open(event["path"], "a") as f:
        f.write(f"{event['n']}\n")
    print(f"ledger {event['n']}")
    if event.get("fail"):
        raise ValueError(f"{event['n']} fails")
    return event["n"]


def reach_frames(event, context):
    """Try to shrink or seal the region the parent writes large frames into, reached through
    /proc/self/map_files (root can; the worker closed its own fd): what each attempt raised."""
    import fcntl
    import json

    with open("/proc/self/maps") as maps:
        spans = [line.split()[0] for line in maps if "event-bridge-frames" in line]
    if not spans:
        return {"mapped": False}
    out = {"mapped": True, "size": len(json.dumps(event))}
    try:
        fd = os.open(f"/proc/self/map_files/{spans[0]}", os.O_RDWR)
    except OSError as e:
        out["open"] = type(e).__name__
        return out
    attempts = {
        "shrink": lambda: os.ftruncate(fd, 0),
        "grow": lambda: os.ftruncate(fd, 1 << 30),
        "seal": lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
    }
    try:
        for name, attempt in attempts.items():
            try:
                attempt()
                out[name] = "done"
            except OSError as e:
                out[name] = type(e).__name__
    finally:
        os.close(fd)
    return out
