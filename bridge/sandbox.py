"""Function isolation: ``isolation = "sandbox"`` runs a function's processes the way SCF runs an
instance — as an unprivileged user, in their own mount, pid and IPC namespaces (and network
namespace with ``network = false``), where a private size-capped ``/tmp`` is the only writable
place, with memory capped by a cgroup.

Lifecycle: :func:`probe` looks at the host once per process (bubblewrap, a memory cgroup we may
create children in, root or not) and logs one line saying what the sandbox will be; a runtime
then builds a :class:`Sandbox` per function (:func:`for_function`), and for each worker creates
a :class:`Cgroup` (:meth:`Sandbox.cgroup`) and wraps the worker's argv (:meth:`Sandbox.command`).
After the worker is reaped, the runtime asks :meth:`Cgroup.oom_killed` (was the worker killed
for going over its memory?) and removes the cgroup (:class:`Sweeper`, :func:`dispose`): its
sandbox's last processes may take a moment to go.

Rules:

- The argv is ``/bin/sh -c 'echo 0 >CGROUP/cgroup.procs && exec "$@"'`` (the process joins its
  cgroup before anything else runs, so every process it starts is capped and accounted), then
  ``bwrap`` (Debian's ``bubblewrap``) with ``/`` bound read-only, a new ``/dev`` and ``/proc``,
  ``/tmp`` a tmpfs of ``tmp_size`` bytes, the state directory and credentials hidden, the
  config and secret files reading as empty, then, when
  the daemon is root, ``setpriv`` to the function's uid (a stable uid derived from its name in
  systemd's DynamicUser range 61184-65519, groups cleared, no capabilities, no new
  privileges). A non-root daemon runs the function in a user namespace as its own uid.
- Memory: cgroup v2 ``memory.max`` (with ``memory.swap.max = 0`` and ``memory.oom.group``), or
  the v1 memory controller's ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``)
  where that is what the host has. Going over it gets the worker SIGKILLed by the kernel; the
  runtime reports "Memory limit exceeded" for that invocation only. Files in ``/tmp`` live in
  RAM and count toward the limit.
- Under cgroup v2 a non-root cgroup with processes cannot have children with controllers: the
  daemon moves itself (and its descendants) into a ``daemon`` leaf of its cgroup, which must
  hold no other processes (systemd: ``Delegate=yes``); failing that, a root daemon uses an
  ``event-bridge`` cgroup at the top of the hierarchy (:func:`prepare_cgroup_root`).

Not guaranteed: two functions may share a uid (1 chance in 4,336 per pair); each worker still has
its own ``/tmp`` and pid namespace, so neither sees the other. The rest of the file system is
readable as its permissions allow the function's uid (a non-root daemon's functions: as the
daemon's). Paths under a hidden folder stay hidden unless the runtime exposes them. Where the host cannot sandbox, the runtime decides what
happens (``sandbox_fallback``): this module only says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import pwd
import shutil
import signal
import sys
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from bridge.config import Model, Size
from bridge.errors import ConfigError

log = logging.getLogger("bridge.sandbox")

#: systemd's DynamicUser range (https://systemd.io/UIDS-GIDS/)
UID_FIRST, UID_LAST = 61184, 65519
#: SCF's /tmp
DEFAULT_TMP_SIZE = 500 * 1024**2
#: prefix of the cgroups this module creates: eb-PID-N-FUNCTION
CGROUP_PREFIX = "eb-"
PROBE_TIMEOUT_S = 10.0
_JOIN = 'echo 0 >"$0" && exec "$@"'

Isolation = Literal["process", "sandbox"]
Fallback = Literal["fail", "process"]


def interpreter_paths() -> list[Path]:
    """Where this Python and its packages live: a sandboxed child started from it (a worker,
    an ``scf_bootstrap`` calling ``python3``) must still see them should they lie under
    ``/tmp`` or a hidden folder (a checkout in /tmp, a venv there)."""
    exe = Path(os.path.dirname(os.path.abspath(sys.executable)))
    return list(dict.fromkeys([Path(sys.prefix), Path(sys.base_prefix), exe]))


class IsolationFields(Model):
    """The isolation keys of ``[functions.NAME]`` (a runtime's config inherits them).

    ``isolation`` and ``sandbox_fallback`` default to ``[daemon]``'s, passed in the validation
    context by :func:`bridge.config.parse`."""

    isolation: Isolation | None = Field(
        None,
        validate_default=True,
        description="process (warm worker processes) | sandbox (unprivileged uid, private /tmp, "
        "read-only elsewhere, cgroup memory cap); default: [daemon] isolation.",
    )
    sandbox_fallback: Fallback | None = Field(
        None,
        validate_default=True,
        description="When the host cannot sandbox: fail (the function does not start) | process "
        "(run it as a plain process, with a warning); default: [daemon] sandbox_fallback.",
    )
    network: bool = Field(
        True, description="With isolation = sandbox: false gives the function no network at all."
    )
    tmp_size: Size = Field(
        DEFAULT_TMP_SIZE,
        ge=1024**2,
        description="With isolation = sandbox: size of the private /tmp (in RAM: it counts "
        "toward memory).",
    )

    @field_validator("isolation")
    @classmethod
    def _isolation_default(cls, v: Isolation | None, info: ValidationInfo) -> Isolation:
        if v is not None:
            return v
        got = (info.context or {}).get("isolation")
        return "sandbox" if got == "sandbox" else "process"

    @field_validator("sandbox_fallback")
    @classmethod
    def _fallback_default(cls, v: Fallback | None, info: ValidationInfo) -> Fallback:
        if v is not None:
            return v
        got = (info.context or {}).get("sandbox_fallback")
        return "process" if got == "process" else "fail"


# --- the host ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Host:
    """What this host lets the sandbox do. ``problem`` is None when everything works."""

    problem: str | None
    bwrap: str | None = None
    setpriv: str | None = None
    root: bool = False
    cgroups: CgroupRoot | None = None
    version: str = ""

    def describe(self) -> str:
        if self.problem:
            hint = ""
            if os.environ.get("INVOCATION_ID"):  # a systemd service: the unit may be why
                hint = " (under systemd, install the drop-in systemd/sandbox.conf)"
            return f"the sandbox is not available on this host: {self.problem}{hint}"
        assert self.cgroups is not None
        who = (
            f"functions run as uids {UID_FIRST}-{UID_LAST}"
            if self.root
            else f"functions run as uid {os.getuid()} in a user namespace"
        )
        return (
            f"sandbox: {self.version}, memory cgroup v{self.cgroups.version} under "
            f"{self.cgroups.path}, {who}"
        )


@dataclasses.dataclass(frozen=True)
class CgroupRoot:
    """The folder the worker cgroups are created in."""

    version: int
    path: Path

    def create(self, name: str, memory: int) -> Cgroup:
        """A new cgroup capped at ``memory`` bytes (OSError when the kernel refuses)."""
        path = self.path / name
        path.mkdir()
        try:
            if self.version == 2:
                _write(path / "memory.max", str(memory))
                for f, v in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    with contextlib.suppress(OSError):
                        _write(path / f, v)
            else:
                _write(path / "memory.limit_in_bytes", str(memory))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                    _write(path / "memory.memsw.limit_in_bytes", str(memory))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise
        return Cgroup(self.version, path)

    def remove_stale(self) -> None:
        """Cgroups of a daemon that is gone (killed): empty by now, their workers died with it."""
        with contextlib.suppress(OSError):
            for d in self.path.iterdir():
                parts = d.name.split("-")
                ours = d.name.startswith(CGROUP_PREFIX) and len(parts) > 2 and parts[1].isdigit()
                if ours and not _alive(int(parts[1])):
                    Cgroup(self.version, d).remove()


@dataclasses.dataclass(frozen=True)
class Cgroup:
    """One worker's cgroup."""

    version: int
    path: Path

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_killed(self) -> bool:
        """A process of this cgroup was killed for going over the memory cap."""
        try:
            if self.version == 2:
                text = (self.path / "memory.events").read_text()
            else:
                text = (self.path / "memory.oom_control").read_text()
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            count = value.strip()
            if key in ("oom_kill", "oom_group_kill") and count.isdigit() and int(count) > 0:
                return True
        return False

    def kill(self) -> None:
        """SIGKILL whatever is left in the cgroup."""
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.path / "cgroup.kill", "1")
            return
        with contextlib.suppress(OSError):
            for pid in self.procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> bool:
        """Kill what is left and remove the cgroup; False when it is still busy (left for the
        next start's clean-up)."""
        self.kill()
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


_host: Host | None = None
_host_lock: asyncio.Lock | None = None


async def probe() -> Host:
    """What this host can do, found once per process and logged in one line."""
    global _host, _host_lock
    if _host is not None:
        return _host
    if _host_lock is None:
        _host_lock = asyncio.Lock()
    async with _host_lock:
        if _host is None:
            _host = await _probe()
            if _host.problem is None:
                log.info("%s", _host.describe())
        return _host


def reset() -> None:
    """Forget the probe (tests)."""
    global _host, _host_lock
    _host = None
    _host_lock = None


async def _probe() -> Host:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Host("bwrap not found (install the bubblewrap package)")
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv") if root else None
    if root and setpriv is None:
        return Host("setpriv not found (install util-linux)", bwrap=bwrap)
    try:
        cgroups = prepare_cgroup_root(find_cgroup_root())
    except OSError as e:
        return Host(f"no memory cgroup to use: {_strerror(e)}", bwrap=bwrap)
    cgroups.remove_stale()
    # The same flags a worker gets, on `true`: a kernel or a seccomp filter that refuses
    # namespaces or mounts says so here, once, rather than at every worker start.
    box = Sandbox(
        name="probe",
        uid=UID_FIRST,
        memory=64 * 1024**2,
        tmp_size=1024**2,
        network=False,
        host=Host(None, bwrap=bwrap, setpriv=setpriv, root=root, cgroups=cgroups),
    )
    try:
        cg = cgroups.create(f"{CGROUP_PREFIX}{os.getpid()}-probe", 64 * 1024**2)
    except OSError as e:
        return Host(
            f"cannot create a memory cgroup under {cgroups.path}: {_strerror(e)}", bwrap=bwrap
        )
    try:
        argv = box.command(["true"], cwd=Path("/"), cgroup=cg)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Host(f"bwrap did not finish within {PROBE_TIMEOUT_S:g} s", bwrap=bwrap)
    finally:
        await dispose(cg)
    if proc.returncode != 0:
        why = err.decode("utf-8", "replace").strip().splitlines()
        return Host(
            f"bwrap cannot create the sandbox: {why[-1] if why else f'status {proc.returncode}'}",
            bwrap=bwrap,
        )
    version = await _version(bwrap)
    return Host(None, bwrap=bwrap, setpriv=setpriv, root=root, cgroups=cgroups, version=version)


async def _version(bwrap: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        bwrap, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode("utf-8", "replace").strip() or "bubblewrap"


def find_cgroup_root(
    proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> CgroupRoot:
    """This process's own cgroup, in the hierarchy that has the memory controller: v2 when
    the unified hierarchy has it, else v1's memory hierarchy. Looks only; raises OSError."""
    with open(proc_cgroup) as f:
        lines = [ln.rstrip("\n").split(":", 2) for ln in f if ln.count(":") >= 2]
    mounts = _cgroup_mounts(mountinfo)
    v2 = next((p for h, c, p in lines if h == "0" and c == ""), None)
    if v2 is not None and "cgroup2" in mounts:
        base = Path(mounts["cgroup2"]) / v2.lstrip("/")
        if "memory" in _read(base / "cgroup.controllers").split():
            return CgroupRoot(2, base)
    v1 = next((p for h, c, p in lines if "memory" in c.split(",")), None)
    if v1 is not None and "memory" in mounts:
        return CgroupRoot(1, Path(mounts["memory"]) / v1.lstrip("/"))
    raise OSError(errno.ENOENT, "neither cgroup v2 with the memory controller nor cgroup v1 memory")


def prepare_cgroup_root(found: CgroupRoot, mount: Path | None = None) -> CgroupRoot:
    """Where worker cgroups go. v1: under our own cgroup. v2: a non-root cgroup with processes
    cannot have children with controllers, so either our cgroup holds only us (systemd's
    ``Delegate=yes``): we move into a ``daemon`` leaf and enable the memory controller for its
    children; or, as root, an ``event-bridge`` cgroup under the hierarchy's root. Raises
    OSError saying why neither works."""
    if found.version == 1:
        if (found.path.parent / "cgroup.procs").exists():
            return found
        # the hierarchy's root (not in a service's cgroup): keep ours in a folder of our own
        own = found.path / "event-bridge"
        own.mkdir(exist_ok=True)
        return CgroupRoot(1, own)
    base = found.path
    if "memory" in _read(base / "cgroup.subtree_control").split():
        return found
    me = os.getpid()
    procs = [int(p) for p in _read(base / "cgroup.procs").split()]
    strangers = [p for p in procs if p != me and not _descends_from(p, me)]
    if not strangers:
        try:
            leaf = base / "daemon"
            leaf.mkdir(exist_ok=True)
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    _write(leaf / "cgroup.procs", str(pid))
            _write(base / "cgroup.subtree_control", "+memory")
            return found
        except OSError as e:
            why = f"cannot use cgroup {base} ({_strerror(e)})"
    else:
        why = f"cgroup {base} also holds other processes (pid {strangers[0]})"
    if os.geteuid() != 0:
        raise OSError(
            errno.EPERM, f"{why}; run event-bridge in a cgroup of its own (systemd: Delegate=yes)"
        )
    top = mount or _top_of(base)
    own = top / "event-bridge"
    own.mkdir(exist_ok=True)
    if "memory" not in _read(top / "cgroup.subtree_control").split():
        _write(top / "cgroup.subtree_control", "+memory")
    if "memory" not in _read(own / "cgroup.subtree_control").split():
        _write(own / "cgroup.subtree_control", "+memory")
    return CgroupRoot(2, own)


def _top_of(path: Path) -> Path:
    """The mount point of the cgroup2 hierarchy ``path`` is in."""
    for p in (path, *path.parents):
        if (p / "cgroup.controllers").exists() and not (p.parent / "cgroup.controllers").exists():
            return p
    raise OSError(errno.ENOENT, f"no cgroup2 hierarchy above {path}")


def _cgroup_mounts(mountinfo: str) -> dict[str, str]:
    """``cgroup2`` → its mount point; each v1 controller → its hierarchy's mount point."""
    out: dict[str, str] = {}
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            point = fields[4].replace("\\040", " ")
            if rfields[0] == "cgroup2":
                out.setdefault("cgroup2", point)
            elif rfields[0] == "cgroup":
                for opt in rfields[2].split(","):
                    out.setdefault(opt, point)
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        try:
            stat = _read(Path(f"/proc/{pid}/stat"))
        except OSError:
            return False
        pid = int(stat.rpartition(")")[2].split()[1])
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


# --- a function's sandbox ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sandbox:
    """How one function's processes are sandboxed.

    ``hide``: folders replaced by an empty read-only one (the state directory, credentials);
    ``hide_files``: files that read as empty (the config files, which may hold secrets).
    ``binds``: extra read-only ``(host_path, sandbox_path)`` binds, e.g. layers at ``/opt/...``
    (``/opt`` is then an empty read-only folder holding only those, as in SCF). A sandbox path
    under ``/opt``, ``/tmp`` or a hidden folder is created; elsewhere it must exist on the host
    (``/`` is read-only)."""

    name: str
    uid: int
    memory: int
    tmp_size: int
    network: bool
    host: Host
    hide: tuple[Path, ...] = ()
    hide_files: tuple[Path, ...] = ()
    binds: tuple[tuple[Path, Path], ...] = ()

    def cgroup(self, wid: str) -> Cgroup:
        """A fresh cgroup for worker ``wid`` (OSError when it cannot be created)."""
        assert self.host.cgroups is not None
        return self.host.cgroups.create(f"{CGROUP_PREFIX}{wid}-{self.name}", self.memory)

    def command(
        self, argv: Sequence[str], *, cwd: Path, cgroup: Cgroup, expose: Iterable[Path] = ()
    ) -> list[str]:
        """``argv`` wrapped: it joins ``cgroup``, then runs in the sandbox with ``cwd`` as its
        working directory. ``expose``: host folders it needs (code, interpreter) bound
        read-only where they are, should they lie under /tmp or a hidden folder."""
        assert self.host.bwrap is not None
        masked = [Path("/tmp"), *self.hide]
        out = ["/bin/sh", "-c", _JOIN, str(cgroup.procs), self.host.bwrap]
        out += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        out += ["--perms", "1777", "--size", str(self.tmp_size), "--tmpfs", "/tmp"]
        for h in self.hide:
            out += ["--tmpfs", str(h)]
        opt = any(_under(dest, Path("/opt")) for _, dest in self.binds)
        if opt:
            out += ["--tmpfs", "/opt"]
            masked.append(Path("/opt"))
        seen: set[Path] = set(masked)
        bound: list[Path] = []

        def bind(src: Path, dest: Path) -> None:
            mask = next((m for m in masked if _under(dest, m)), None)
            if mask is not None:  # bwrap would make the folders leading to it mode 0700
                for parent in reversed(dest.parents):
                    if parent not in seen and _under(parent, mask):
                        seen.add(parent)
                        out.extend(["--perms", "0755", "--dir", str(parent)])
            seen.add(dest)
            bound.append(dest)
            out.extend(["--ro-bind", str(src), str(dest)])

        for p in (*expose, cwd):
            p = Path(os.path.abspath(p))
            # /tmp itself stays private; elsewhere, `/` is bound already
            if p not in seen and any(_under(p, m) for m in masked):
                bind(p, p)
        for src, dest in self.binds:
            bind(src, dest)
        for f in self.hide_files:  # after the binds: a config file may sit in the code folder
            if any(_under(f, b) for b in bound) or not any(_under(f, m) for m in masked):
                out += ["--dev-bind", "/dev/null", str(f)]  # a device needs a dev mount
        for h in [*self.hide, *([Path("/opt")] if opt else [])]:
            out += ["--remount-ro", str(h)]
        out += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
        if not self.network:
            out.append("--unshare-net")
        out += ["--chdir", str(cwd)]
        if self.host.root:
            assert self.host.setpriv is not None
            out += ["--", self.host.setpriv, f"--reuid={self.uid}", f"--regid={self.uid}"]
            out += ["--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        else:
            out += ["--unshare-user", "--disable-userns"]
        return [*out, "--", *argv]


def function_uid(name: str) -> int:
    """A stable uid for function ``name`` in systemd's DynamicUser range, skipping uids that
    belong to a user of this host."""
    span = UID_LAST - UID_FIRST + 1
    start = zlib.crc32(name.encode()) % span
    for i in range(span):
        uid = UID_FIRST + (start + i) % span
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    return UID_FIRST + start


def for_function(
    name: str,
    *,
    memory: int,
    tmp_size: int,
    network: bool,
    host: Host,
    state_dir: Path,
    private_files: Sequence[Path] = (),
    binds: Sequence[tuple[Path, Path]] = (),
) -> Sandbox:
    """The sandbox of function ``name``: its uid, caps and what it must not see."""
    hide = [Path(os.path.abspath(state_dir))]
    for var in ("CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY"):
        for p in os.environ.get(var, "").split(":"):
            if p:
                hide.append(Path(os.path.abspath(p)))
    # a folder inside another one is hidden with it; /tmp is replaced anyway
    hide = [h for h in hide if not any(h != o and _under(h, o) for o in hide)]
    hide = [h for h in dict.fromkeys(hide) if not _under(h, Path("/tmp")) and h.is_dir()]
    files = [Path(os.path.abspath(f)) for f in private_files]
    # one in a hidden folder is not there anyway
    files = [f for f in dict.fromkeys(files) if f.is_file() and not any(_under(f, m) for m in hide)]
    return Sandbox(
        name=name,
        uid=function_uid(name) if host.root else os.getuid(),
        memory=memory,
        tmp_size=tmp_size,
        network=network,
        host=host,
        hide=tuple(hide),
        hide_files=tuple(files),
        binds=tuple((Path(s), Path(d)) for s, d in binds),
    )


async def for_target(
    name: str,
    config: IsolationFields,
    *,
    memory: int,
    state_dir: Path,
    logger: logging.Logger,
    private_files: Sequence[Path] = (),
    binds: Sequence[tuple[Path, Path]] = (),
) -> Sandbox | None:
    """The sandbox of a runtime's function at its start: None for ``isolation = "process"``,
    and for a host that cannot sandbox when ``sandbox_fallback = "process"`` (logged as a
    warning naming why). Raises ConfigError (exit 78 at start) when the host cannot and the
    fallback is ``fail``."""
    if config.isolation != "sandbox":
        return None
    host = await probe()
    if host.problem is not None:
        if config.sandbox_fallback != "process":
            raise ConfigError(
                [
                    (
                        f"functions.{name}.isolation",
                        f'{host.describe()}; set sandbox_fallback = "process" to run the '
                        "function as a plain process instead",
                    )
                ]
            )
        logger.warning(
            'function %s: isolation = "sandbox" falls back to "process" '
            '(sandbox_fallback = "process"): %s',
            name,
            host.describe(),
        )
        return None
    return for_function(
        name,
        memory=memory,
        tmp_size=config.tmp_size,
        network=config.network,
        host=host,
        state_dir=state_dir,
        private_files=private_files,
        binds=binds,
    )


class Sweeper:
    """Removes the cgroups of reaped workers from the event loop: one whose sandbox is still
    going away is tried again every 50 ms until :meth:`aclose`, which waits for the rest."""

    def __init__(self) -> None:
        self._busy: list[Cgroup] = []
        self._timer: asyncio.TimerHandle | None = None

    def dispose(self, cgroup: Cgroup) -> None:
        if not cgroup.remove():
            self._busy.append(cgroup)
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(0.05, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        self._busy = [cg for cg in self._busy if not cg.remove()]
        if self._busy:
            self._schedule()

    async def aclose(self, logger: logging.Logger, timeout_s: float = 2.0) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for cg in self._busy:
            if not await dispose(cg, timeout_s):
                logger.warning("cannot remove cgroup %s: still busy", cg.path)
        self._busy = []


async def dispose(cgroup: Cgroup, timeout_s: float = 2.0) -> bool:
    """Remove a finished process's cgroup, waiting up to ``timeout_s`` for what is left of its
    sandbox to go; False when it is still busy (the next start removes it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cgroup.remove():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --- helpers ----------------------------------------------------------------------------------


def _under(p: Path, parent: Path) -> bool:
    return p == parent or parent in p.parents


def _read(p: Path) -> str:
    with open(p) as f:
        return f.read()


def _write(p: Path, value: str) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _strerror(e: OSError) -> str:
    return e.strerror if e.strerror and not e.filename and len(e.args) == 2 else str(e)
