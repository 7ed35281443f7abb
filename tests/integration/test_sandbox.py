"""``isolation = "sandbox"`` with real workers in bubblewrap and a real memory cgroup: who the
function runs as, what it may write, its private /tmp, the memory cap, the network switch, layers
at /opt and the explicit fallback where the host cannot sandbox."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import errors, sandbox
from bridge.abc import Invocation, TargetContext
from bridge.errors import ConfigError
from bridge.targets.command import CommandConfig, CommandTarget
from bridge.targets.http import HttpConfig, HttpTarget
from bridge.targets.python import PythonConfig, PythonTarget
from bridge.testing import free_port, until

from .conftest import Project, cli

pytestmark = pytest.mark.integration

HANDLERS = '''
import json, os, socket, threading, uuid

WORKER = uuid.uuid4().hex  # one per worker process


def whoami(event, context):
    status = dict(
        line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line
    )
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "tmpdir": os.environ.get("TMPDIR"), "cwd": os.getcwd(), "worker": WORKER,
    }


def write(event, context):
    """Try to create a file in each folder; the error of each that fails."""
    out = {}
    for folder in event["folders"]:
        path = os.path.join(folder, "probe-" + uuid.uuid4().hex)
        try:
            with open(path, "w") as f:
                f.write("x")
            out[folder] = "written"
        except OSError as e:
            out[folder] = f"{type(e).__name__}: {e.strerror}"
    return out


def write_code(event, context):
    with open(os.path.join(os.getcwd(), "index.py"), "a") as f:
        f.write("# changed")


def listdir(event, context):
    return sorted(os.listdir(event["path"])) if os.path.isdir(event["path"]) else None


def tmp(event, context):
    """Keep a note in /tmp, list /tmp, then fill it with event["mib"] MiB."""
    if event.get("note"):
        with open("/tmp/note", "w") as f:
            f.write(event["note"])
    seen = sorted(os.listdir("/tmp"))
    written = 0
    try:
        with open("/tmp/fill", "wb") as f:
            for _ in range(event.get("mib", 0)):
                f.write(b"x" * (1024 * 1024))
                f.flush()
                written += 1
    except OSError as e:
        return {"seen": seen, "written": written, "error": e.strerror}
    finally:
        if os.path.exists("/tmp/fill"):
            os.unlink("/tmp/fill")
    return {"seen": seen, "written": written, "worker": WORKER}


def hog(event, context):
    chunks = [bytearray(1024 * 1024) for _ in range(event["mib"])]
    return {"mib": len(chunks), "worker": WORKER}


def threads(event, context):
    done = threading.Event()
    started = []
    for _ in range(event["n"]):
        t = threading.Thread(target=done.wait)
        t.start()
        started.append(t)
    done.set()
    for t in started:
        t.join()
    return len(started)


def connect(event, context):
    try:
        with socket.create_connection(("127.0.0.1", event["port"]), timeout=5) as s:
            return {"connected": s.recv(16).decode()}
    except OSError as e:
        return {"error": type(e).__name__}


def sleepy(event, context):
    import time
    time.sleep(event["sleep"])
    return WORKER


def read(event, context):
    with open(event["path"]) as f:
        return f.read()


def frames(event, context):
    """The event's size, and whether the region of large frames is mapped here and can be
    opened (through /proc: an unprivileged uid cannot)."""
    spans = [line.split()[0] for line in open("/proc/self/maps") if "event-bridge-frames" in line]
    try:
        os.close(os.open("/proc/self/map_files/" + spans[0], os.O_RDWR))
        opened = "yes"
    except (IndexError, OSError) as e:
        opened = type(e).__name__
    return {"size": len(json.dumps(event)), "mapped": len(spans), "opened": opened}
'''

Factory = Callable[..., Awaitable[PythonTarget]]


def inv(timeout_s: float = 20.0) -> Invocation:
    return Invocation(request_id=uuid.uuid4().hex, function="fn", timeout_s=timeout_s)


@pytest.fixture(scope="module", autouse=True)
def fresh_probe() -> Iterator[None]:
    sandbox.reset()
    yield
    sandbox.reset()


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside /tmp (which the sandbox replaces), as a real install would have."""
    d = Path(tempfile.mkdtemp(prefix="eb-sandbox-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def code(outside: Path) -> Path:
    d = outside / "code"
    d.mkdir(mode=0o755)  # the function's uid reads it: readable by others
    (d / "index.py").write_text(HANDLERS)
    (d / "index.py").chmod(0o644)
    return d


@pytest.fixture
def state_dir(outside: Path) -> Path:
    d = outside / "state"
    d.mkdir(mode=0o755)
    (d / "bridge.sqlite3").write_text("other functions' events")
    return d


@pytest.fixture
async def make(code: Path, state_dir: Path) -> AsyncIterator[Factory]:
    started: list[PythonTarget] = []

    async def factory(
        handler: str,
        name: str = "fn",
        cls: type[PythonTarget] = PythonTarget,
        private: tuple[Path, ...] = (),
        **fields: Any,
    ) -> PythonTarget:
        fields.setdefault("isolation", "sandbox")
        config = PythonConfig.model_validate(
            {"code": str(code), "handler": handler, "timeout": "20s", **fields}
        )
        ctx = TargetContext(
            name=name,
            state_dir=state_dir,
            logger=logging.getLogger(f"fn.{name}"),
            private_files=private,
        )
        target = cls(config, ctx)
        started.append(target)
        await target.start()
        return target

    yield factory
    for target in started:
        await target.close()


@pytest.fixture
async def cgroup_dir() -> Path:
    """Where this host's worker cgroups go."""
    host = await sandbox.probe()
    assert host.cgroups is not None, host.describe()
    return host.cgroups.path


def cgroups_of(where: Path, pid: int) -> list[Path]:
    return list(where.glob(f"{sandbox.CGROUP_PREFIX}{pid}-*"))


# --- who it runs as -----------------------------------------------------------------------------


async def test_runs_as_an_unprivileged_uid_of_its_own_without_capabilities(
    make: Factory,
) -> None:
    a = await make("index.whoami", name="alpha")
    b = await make("index.whoami", name="beta")

    got_a = await a.invoke({}, inv())
    got_b = await b.invoke({}, inv())

    assert got_a["uid"] == got_a["euid"] == got_a["gid"] == sandbox.function_uid("alpha")
    assert got_b["uid"] == sandbox.function_uid("beta") != got_a["uid"]
    for got in (got_a, got_b):
        assert sandbox.UID_FIRST <= got["uid"] <= sandbox.UID_LAST
        assert got["groups"] in ([], [got["gid"]])
        assert int(got["cap_eff"], 16) == 0
        assert got["no_new_privs"] == "1"
        # its own pid namespace: the daemon and other functions are not there to see
        assert os.getpid() not in got["pids"]
        assert max(got["pids"]) < 100
        assert got["tmpdir"] == "/tmp"


# --- what it may write --------------------------------------------------------------------------


async def test_only_tmp_is_writable(make: Factory, code: Path, state_dir: Path) -> None:
    target = await make("index.write")
    folders = ["/tmp", str(code), str(state_dir), "/var/tmp", "/etc", "/root", "/dev/shm", "/"]

    got = await target.invoke({"folders": folders}, inv())

    assert got.pop("/tmp") == "written"
    assert set(got) == set(folders) - {"/tmp"}
    for folder, outcome in got.items():
        assert outcome.split(":")[0] in ("OSError", "PermissionError"), (folder, outcome)
    assert got[str(code)] == "OSError: Read-only file system"
    assert not [p for p in code.iterdir() if p.name.startswith("probe-")]
    assert not [p for p in state_dir.iterdir() if p.name.startswith("probe-")]


async def test_writing_to_the_code_folder_is_a_clear_function_error(
    make: Factory, code: Path
) -> None:
    # even a file everyone may write: the mount is read-only
    (code / "index.py").chmod(0o666)
    target = await make("index.write_code")

    with pytest.raises(errors.HandlerFailed) as e:
        await target.invoke({}, inv())

    assert e.value.message == "OSError: [Errno 30] Read-only file system: " + repr(
        str(code / "index.py")
    )
    assert e.value.error_class is errors.ErrorClass.FUNCTION_ERROR
    assert (code / "index.py").read_text() == HANDLERS


async def test_state_dir_is_hidden(make: Factory, state_dir: Path) -> None:
    target = await make("index.listdir")
    assert (state_dir / "bridge.sqlite3").exists()

    assert await target.invoke({"path": str(state_dir)}, inv()) == []


async def test_config_and_secret_files_read_as_empty(
    make: Factory, code: Path, outside: Path
) -> None:
    # Given a config file in the code folder and a token file elsewhere, both readable by all
    config = code / "bridge.toml"
    config.write_text('[api]\ntokens = [{ name = "ci", secret = "hunter2-hunter2-hunter2" }]\n')
    token = outside / "token"
    token.write_text("hunter2-hunter2-hunter2")
    target = await make("index.read", private=(config, token))

    # Then the function reads nothing from them, while the code itself is there
    assert await target.invoke({"path": str(config)}, inv()) == ""
    assert await target.invoke({"path": str(token)}, inv()) == ""
    assert "def whoami" in await target.invoke({"path": str(code / "index.py")}, inv())


# --- /tmp ---------------------------------------------------------------------------------------


async def test_tmp_is_private_per_function_kept_by_a_warm_worker_and_size_capped(
    make: Factory, tmp_path: Path
) -> None:
    a = await make("index.tmp", name="alpha", tmp_size="8MiB", memory="128MiB")
    b = await make("index.tmp", name="beta", tmp_size="8MiB", memory="128MiB")
    host_files = await make("index.listdir", name="gamma")

    first = await a.invoke({"note": "alpha's"}, inv())
    again = await a.invoke({}, inv())
    other = await b.invoke({}, inv())
    full = await a.invoke({"mib": 20}, inv())

    # a checkout or venv under /tmp is bound read-only where it is (the worker needs it):
    # its first folder under /tmp is the one entry allowed besides the function's own files
    ours = {
        p.relative_to("/tmp").parts[0]
        for p in (Path(sys.prefix), Path(__file__).resolve())
        if p.is_relative_to("/tmp")
    }

    def seen(result: dict[str, Any]) -> list[str]:
        return [e for e in result["seen"] if e not in ours]

    assert seen(first) == ["note"]
    assert seen(again) == ["note"] and again["worker"] == first["worker"]
    assert seen(other) == []
    assert full["error"] == "No space left on device"
    assert 5 <= full["written"] < 8
    # the host's /tmp is not there either
    (tmp_path / "host-file").write_text("x")
    assert await host_files.invoke({"path": str(tmp_path)}, inv()) is None


# --- memory -------------------------------------------------------------------------------------


async def test_memory_limit_exceeded_fails_that_invocation_and_the_next_runs_on_a_fresh_worker(
    make: Factory, cgroup_dir: Path
) -> None:
    target = await make("index.hog", memory="64MiB")
    before = await target.invoke({"mib": 8}, inv())

    # When an invocation allocates well past the cgroup's cap
    with pytest.raises(errors.OutOfMemory) as e:
        await target.invoke({"mib": 256}, inv())

    # Then it is a function error saying so, and only that invocation failed
    assert e.value.message == "Memory limit exceeded: the function used more than 64 MB"
    assert e.value.error_class is errors.ErrorClass.FUNCTION_ERROR
    after = await target.invoke({"mib": 8}, inv())
    assert after == {"mib": 8, "worker": after["worker"]}
    assert after["worker"] != before["worker"]
    # the killed worker's cgroup is gone; the live ones' remain
    live = {w.cgroup.path for w in target._alive if w.cgroup is not None}
    assert live
    await until(
        lambda: set(cgroups_of(cgroup_dir, os.getpid())) == live,
        what="the killed worker's cgroup to go",
    )
    await target.close()
    assert cgroups_of(cgroup_dir, os.getpid()) == []


async def test_threaded_handler_that_trips_rlimit_as_works_under_the_cgroup_cap(
    make: Factory,
) -> None:
    # Given 40 threads (8 MiB of stack address space each, barely touched) under 64 MiB
    plain = await make("index.threads", name="plain", isolation="process", memory="64MiB")
    boxed = await make("index.threads", name="boxed", memory="64MiB")

    # Then RLIMIT_AS refuses the threads, while the cgroup, which counts memory used, does not
    with pytest.raises(errors.InvocationError, match="thread"):
        await plain.invoke({"n": 40}, inv())
    assert await boxed.invoke({"n": 40}, inv()) == 40


async def test_timeout_ends_the_whole_sandbox_and_the_next_invocation_works(
    make: Factory, cgroup_dir: Path
) -> None:
    target = await make("index.sleepy", timeout="1s")
    first = await target.invoke({"sleep": 0}, inv(1.0))

    with pytest.raises(errors.FunctionTimeout):
        await target.invoke({"sleep": 60}, inv(1.0))

    assert await target.invoke({"sleep": 0}, inv(1.0)) != first
    await target.close()
    assert cgroups_of(cgroup_dir, os.getpid()) == []


async def test_large_frames_reach_a_sandboxed_worker_through_the_region_it_cannot_open(
    make: Factory, frame_kinds: list[bytes]
) -> None:
    # Given a sandboxed function and events larger than what goes on the socket
    target = await make("index.frames")
    events = [{"pad": "s" * 300_000}, {"pad": "t" * 2_000_000}]
    # When they are invoked, alone and in a batch
    one = await target.invoke(events[0], inv())
    many = await target.invoke_many(events, [inv(), inv()])
    # Then each arrived whole through the region the worker mapped, which its unprivileged
    # uid cannot reach otherwise
    sizes = [len(json.dumps(e)) for e in events]
    assert [one["size"], *(m["size"] for m in many)] == [sizes[0], *sizes]
    assert {m["mapped"] for m in (one, *many)} == {1}
    assert {m["opened"] for m in (one, *many)} == {"PermissionError"}
    assert [w.shared is not None for w in target._alive] == [True]
    assert frame_kinds == [b"M", b"M"]


# --- network ------------------------------------------------------------------------------------


async def test_network_false_cannot_reach_a_local_port_the_default_can(make: Factory) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        online = await make("index.connect", name="online")
        offline = await make("index.connect", name="offline", network=False)

        assert await online.invoke({"port": port}, inv()) == {"connected": "hello"}
        assert await offline.invoke({"port": port}, inv()) == {"error": "ConnectionRefusedError"}
    finally:
        server.close()
        await server.wait_closed()


# --- layers -------------------------------------------------------------------------------------


async def test_binds_hook_shows_a_layer_read_only_at_opt(make: Factory, tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "python").mkdir(parents=True)
    (layer / "python" / "shared.txt").write_text("from a layer")
    for p in (layer, layer / "python"):
        p.chmod(0o755)

    class Layered(PythonTarget):
        def sandbox_binds(self) -> list[tuple[Path, Path]]:
            return [(layer, Path("/opt/layer1"))]

    target = await make("index.read", cls=Layered)
    writer = await make("index.write", name="writer", cls=Layered)
    lister = await make("index.listdir", name="lister", cls=Layered)

    assert await target.invoke({"path": "/opt/layer1/python/shared.txt"}, inv()) == "from a layer"
    assert await lister.invoke({"path": "/opt"}, inv()) == ["layer1"]
    got = await writer.invoke({"folders": ["/opt", "/opt/layer1"]}, inv())
    assert got == {
        "/opt": "OSError: Read-only file system",
        "/opt/layer1": "OSError: Read-only file system",
    }


# --- where the host cannot ----------------------------------------------------------------------


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A host without bubblewrap: a PATH where it is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("INVOCATION_ID", raising=False)  # no systemd hint in the messages
    sandbox.reset()
    yield
    sandbox.reset()


async def test_without_bwrap_the_function_does_not_start_unless_fallback_allows(
    make: Factory, no_bwrap: None, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError) as e:
        await make("index.whoami", name="strict")
    assert e.value.problems == [
        (
            "functions.strict.isolation",
            "the sandbox is not available on this host: bwrap not found (install the "
            'bubblewrap package); set sandbox_fallback = "process" to run the function as a '
            "plain process instead",
        )
    ]

    with caplog.at_level(logging.WARNING):
        lenient = await make("index.whoami", name="lenient", sandbox_fallback="process")
    warnings = [r.getMessage() for r in caplog.records if r.name == "fn.lenient"]
    assert warnings == [
        'function lenient: isolation = "sandbox" falls back to "process" (sandbox_fallback = '
        '"process"): the sandbox is not available on this host: bwrap not found (install the '
        "bubblewrap package)"
    ]
    assert (await lenient.invoke({}, inv()))["uid"] == os.getuid()


def test_run_exits_78_naming_the_function_when_the_host_cannot_sandbox(
    project: Project, tmp_path: Path
) -> None:
    project.function("fn", "def main_handler(event, context):\n    return 1\n")
    cfg = project.config(
        textwrap.dedent(
            """
            [daemon]
            state_dir = "state"
            isolation = "sandbox"

            [functions.fn]
            code = "functions/fn"
            """
        )
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    got = cli("run", "-c", str(cfg), env={**os.environ, "PATH": str(bin_dir)}, timeout=30)

    assert got.returncode == 78, got.stderr
    assert "functions.fn.isolation: the sandbox is not available on this host: bwrap not found" in (
        got.stderr
    )
    assert "Traceback" not in got.stderr


DAEMON_FN = """
import os

def main_handler(event, context):
    chunks = [bytearray(1024 * 1024) for _ in range(event.get("mib", 0))]
    return {"uid": os.getuid(), "mib": len(chunks)}
"""


TOKEN = "sandbox-test-token-0123456789"


def post(port: int, function: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/functions/{function}/invocations",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_daemon_logs_the_sandbox_once_and_survives_a_function_over_its_memory(
    project: Project, daemon: Any, cgroup_dir: Path
) -> None:
    project.function("fn", DAEMON_FN)
    for p in (project.root / "functions", project.root / "functions" / "fn"):
        p.chmod(0o755)
    port = free_port()
    cfg = project.config(
        f"""
        [daemon]
        state_dir = "state"
        isolation = "sandbox"

        [api]
        enabled = true
        listen = "127.0.0.1:{port}"
        [[api.tokens]]
        name = "test"
        secret = "{TOKEN}"

        [functions.fn]
        code = "functions/fn"
        memory = "64MiB"

        [functions.other]
        code = "functions/fn"
        """
    )
    d = daemon(cfg)
    d.wait_log("ready:")
    lines = [ln for ln in d.log().splitlines() if "sandbox: bubblewrap" in ln]
    assert len(lines) == 1, d.log()
    assert "memory cgroup v" in lines[0] and "functions run as uids 61184-65519" in lines[0]

    # When one invocation goes over the function's memory
    code, out = post(port, "fn", {"mib": 256})

    # Then that invocation fails with SCF's error, and the daemon serves the next one
    assert code == 500, out
    assert out["errorClass"] == "function_error"
    assert out["errorMessage"] == "Memory limit exceeded: the function used more than 64 MB"
    assert post(port, "fn", {"mib": 8}) == (200, {"uid": sandbox.function_uid("fn"), "mib": 8})
    assert d.proc.poll() is None
    # stopped, it leaves no cgroup behind
    assert cgroups_of(cgroup_dir, d.proc.pid)
    assert d.stop() == 0
    assert cgroups_of(cgroup_dir, d.proc.pid) == []


# --- the command runtime ------------------------------------------------------------------------

CMD_PROBE = """
import json, os, sys
out = {"uid": os.getuid(), "cwd": os.getcwd(), "tmpdir": os.environ["TMPDIR"]}
for folder in ("/tmp", sys.argv[1], "/etc"):
    try:
        open(os.path.join(folder, "probe"), "w").close()
        out[folder] = "written"
    except OSError as e:
        out[folder] = e.strerror
mib = int(json.load(sys.stdin).get("mib", 0))
chunks = [bytearray(1024 * 1024) for _ in range(mib)]
print(json.dumps(out))
"""


async def command_target(state_dir: Path, **fields: Any) -> CommandTarget:
    fields.setdefault("isolation", "sandbox")
    config = CommandConfig.model_validate({"runtime": "command", "timeout": "20s", **fields})
    target = CommandTarget(
        config, TargetContext(name="cmd", state_dir=state_dir, logger=logging.getLogger("fn.cmd"))
    )
    await target.start()
    return target


async def test_command_runs_sandboxed_and_over_memory_is_memory_limit_exceeded(
    state_dir: Path, cgroup_dir: Path
) -> None:
    target = await command_target(
        state_dir, command=[sys.executable, "-c", CMD_PROBE, str(state_dir)], memory="64MiB"
    )

    got = await target.invoke({}, inv())

    assert got == {
        "uid": sandbox.function_uid("cmd"),
        "cwd": "/tmp",
        "tmpdir": "/tmp",
        "/tmp": "written",
        str(state_dir): "Read-only file system",
        "/etc": "Read-only file system",
    }
    with pytest.raises(errors.OutOfMemory) as e:
        await target.invoke({"mib": 256}, inv())
    assert e.value.message == "Memory limit exceeded: the function used more than 64 MB"
    assert (await target.invoke({"mib": 8}, inv()))["uid"] == got["uid"]
    await target.close()
    assert cgroups_of(cgroup_dir, os.getpid()) == []


# --- the http runtime's scf_bootstrap -----------------------------------------------------------

BOOTSTRAP = """#!{python}
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chunks = [bytearray(1024 * 1024) for _ in range(event.get("mib", 0))]
        try:
            open("probe", "w").close()
            code = "written"
        except OSError as e:
            code = e.strerror
        data = json.dumps({{"uid": os.getuid(), "cwd": os.getcwd(), "code": code,
                           "mib": len(chunks), "pid": os.getpid()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


async def test_web_server_runs_sandboxed_and_over_memory_is_memory_limit_exceeded(
    outside: Path, state_dir: Path, cgroup_dir: Path
) -> None:
    code = outside / "web"
    code.mkdir(mode=0o755)
    (code / "scf_bootstrap").write_text(BOOTSTRAP.format(python=sys.executable))
    (code / "scf_bootstrap").chmod(0o755)
    config = HttpConfig.model_validate(
        {
            "runtime": "http",
            "bootstrap": True,
            "code": str(code),
            "port": free_port(),
            "isolation": "sandbox",
            "memory": "64MiB",
            "ready_timeout": "20s",
        }
    )
    ctx = TargetContext(name="web", state_dir=state_dir, logger=logging.getLogger("fn.web"))
    target = HttpTarget(config, ctx)
    await target.start()
    try:
        got = await target.invoke({}, inv())
        assert (got["uid"], got["cwd"], got["code"]) == (
            sandbox.function_uid("web"),
            str(code),
            "Read-only file system",
        )

        with pytest.raises(errors.OutOfMemory) as e:
            await target.invoke({"mib": 256}, inv())

        assert e.value.message == "Memory limit exceeded: the function used more than 64 MB"
        # the server is restarted (after a 1 s back-off)
        await until(lambda: not target.running, what="the server's end to be noticed")
        await until(lambda: target.running, timeout=30, what="the server's restart")
        again = await target.invoke({"mib": 8}, inv())
        assert again["mib"] == 8 and again["uid"] == got["uid"]
    finally:
        await target.close()
    assert cgroups_of(cgroup_dir, os.getpid()) == []
