"""Per-function environments: requirements, layers and Tencent Cloud credentials.

Lifecycle: :func:`prepare` runs when a Python function starts (before the daemon reports READY)
and by ``event-bridge install``; it returns the environment variables the function's workers
get on top of their own (``PYTHONPATH``, ``EVENT_BRIDGE_LAYERS``, the TENCENTCLOUD_* secrets).

Rules:

- **Requirements.** ``dependencies = "FILE"`` on the function, else ``requirements.txt`` in its
  code folder, is installed with ``pip install --target`` into
  ``STATE_DIR/deps/<hash>/``, where the hash covers the requirements text and the interpreter's
  version and platform: the daemon's venv is never touched, two functions with the same
  requirements share one folder, and a changed file gets a new one. A build goes to a temporary
  folder renamed into place when pip succeeded (a crash leaves no half environment) and is
  serialized by a lock file (``run`` and ``install`` may race). pip's own output is logged line
  by line as progress. A failure raises :class:`~bridge.errors.DependencyError` naming the
  package pip could not install.
- **Layers.** SCF extracts layers under ``/opt`` and puts ``/opt`` and ``/opt/python`` on the
  import path. Writing ``/opt`` needs root, so here a folder layer is used where it is and a
  zip is extracted once into ``STATE_DIR/layers/<hash>/``; each layer root and its ``python/``
  subfolder go on ``PYTHONPATH`` in binding order (after the code folder and the requirements,
  so bundled packages still win, as in SCF), and ``EVENT_BRIDGE_LAYERS`` lists the roots
  (colon-separated) for code that opens files under ``/opt``.
- **Credentials.** ``credentials_file`` (tccli's JSON, the Serverless Framework's INI, or
  ``KEY=VALUE`` lines) gives ``TENCENTCLOUD_SECRETID``, ``TENCENTCLOUD_SECRETKEY`` and
  ``TENCENTCLOUD_SESSIONTOKEN``; the values are registered with the log redactor and never
  appear in messages.

Not guaranteed: requirements naming local files are hashed by their text, not the files' content
(touch the requirements file to force a rebuild, or ``install --force``).
"""

from __future__ import annotations

import asyncio
import configparser
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from bridge import log as logsetup
from bridge.errors import DependencyError

Progress = Callable[[str], None]


def requirements_file(code: Path, dependencies: Path | None) -> Path | None:
    """The function's requirements: ``dependencies``, else ``code/requirements.txt`` if any."""
    if dependencies is not None:
        return dependencies
    req = code / "requirements.txt"
    return req if req.is_file() else None


def interpreter_tag(python: str) -> str:
    """``cpython-3.11-x86_64``: what makes an installed environment reusable."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        impl, ver = sys.implementation.name, f"{sys.version_info[0]}.{sys.version_info[1]}"
    else:
        out = subprocess.run(
            [
                python,
                "-c",
                "import sys;print(sys.implementation.name, '%d.%d' % sys.version_info[:2])",
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        impl, ver = [*out, "?", "?"][:2]
    return f"{impl}-{ver}-{platform.machine()}"


def env_dir(state_dir: Path, requirements: Path, python: str) -> Path:
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(b"\0" + interpreter_tag(python).encode())
    return Path(state_dir) / "deps" / digest.hexdigest()[:24]


_NO_MATCH = re.compile(
    r"(?:No matching distribution found for|Could not find a version that satisfies the requirement)\s+(\S+)"
)


def _failed_package(lines: Sequence[str]) -> str:
    for line in lines:
        m = _NO_MATCH.search(line)
        if m:
            return f"no matching distribution for {m.group(1)}"
    for line in lines:
        m = re.search(r"Failed to build (\S+)|Failed building wheel for (\S+)", line)
        if m:
            return f"cannot build {m.group(1) or m.group(2)}"
    errors = [ln.strip() for ln in lines if ln.strip().startswith("ERROR:")]
    return (
        errors[-1].removeprefix("ERROR:").strip()
        if errors
        else (lines[-1] if lines else "pip failed")
    )


async def build(
    requirements: Path,
    state_dir: Path,
    python: str,
    progress: Progress,
    *,
    force: bool = False,
) -> Path:
    """The installed environment of ``requirements`` (built now if missing)."""
    target = env_dir(state_dir, requirements, python)
    if (target / ".complete").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(target.parent / f"{target.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        if (target / ".complete").is_file() and not force:
            return target  # built by someone else meanwhile
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        progress(f"installing {requirements} into {target} ...")
        argv = [
            python, "-m", "pip", "install", "--target", str(tmp), "-r", str(requirements),
            "--disable-pip-version-check", "--no-input", "--no-warn-script-location",
            "--progress-bar", "off",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=requirements.parent,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            lines.append(line)
            if line.startswith(("Collecting", "Installing", "Successfully", "Processing", "ERROR")):
                progress(line)
        rc = await proc.wait()
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DependencyError(f"installing {requirements} failed: {_failed_package(lines)}")
        (tmp / ".complete").write_text(json.dumps({"requirements": str(requirements)}))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        progress(f"installed {requirements}")
        return target
    finally:
        os.close(lock)


def layer_root(path: Path, state_dir: Path) -> Path:
    """A folder layer as it is; a zip extracted once under ``STATE_DIR/layers/<hash>``."""
    if path.is_dir():
        return path
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    root = Path(state_dir) / "layers" / key[:24]
    if (root / ".complete").is_file():
        return root
    tmp = root.with_name(f".tmp-{root.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            dest = Path(os.path.normpath(tmp / info.filename))
            if not str(dest).startswith(str(tmp)):
                raise DependencyError(f"layer {path}: entry {info.filename!r} escapes the layer")
            zf.extract(info, tmp)
            mode = info.external_attr >> 16
            if mode & 0o111 and dest.is_file():  # zipfile drops the executable bits
                dest.chmod(mode & 0o777)
    (tmp / ".complete").write_text(str(path))
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    return root


_CRED_KEYS = {
    "TENCENTCLOUD_SECRETID": ("secretid", "tencentsecretid", "tencentcloudsecretid"),
    "TENCENTCLOUD_SECRETKEY": ("secretkey", "tencentsecretkey", "tencentcloudsecretkey"),
    "TENCENTCLOUD_SESSIONTOKEN": (
        "token", "sessiontoken", "tencenttoken", "tencentcloudsessiontoken", "tencentsessiontoken",
    ),
}  # fmt: skip


def read_credentials(path: Path) -> dict[str, str]:
    """TENCENTCLOUD_* variables from a credentials file; messages never contain the values."""
    try:
        text = path.read_text()
    except OSError as e:
        raise DependencyError(f"cannot read credentials file {path}: {e.strerror}") from None
    pairs: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            raise DependencyError(f"credentials file {path} is not valid JSON") from None
        pairs = {str(k): str(v) for k, v in doc.items() if isinstance(v, str | int)}
    else:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text if text.lstrip().startswith("[") else "[default]\n" + text)
        except configparser.Error:
            raise DependencyError(
                f"credentials file {path}: cannot parse (JSON, INI or KEY=VALUE)"
            ) from None
        section = (
            parser["default"] if parser.has_section("default") else next(iter(parser.values()))
        )
        pairs = {k: v.strip().strip("'\"") for k, v in section.items()}
    norm = {re.sub(r"[^a-z]", "", k.lower()): v for k, v in pairs.items()}
    out = {}
    for var, names in _CRED_KEYS.items():
        for n in names:
            if norm.get(n):
                out[var] = norm[n]
                break
    if "TENCENTCLOUD_SECRETID" not in out or "TENCENTCLOUD_SECRETKEY" not in out:
        raise DependencyError(f"credentials file {path} has no secret id and key")
    for v in out.values():
        logsetup.register_secret(v)
    return out


class FunctionSpec(Protocol):
    """What :func:`prepare` reads of a function's config (PythonConfig has it all)."""

    @property
    def code(self) -> Path: ...
    @property
    def dependencies(self) -> Path | None: ...
    @property
    def layers(self) -> list[Path]: ...
    @property
    def credentials_file(self) -> Path | None: ...
    @property
    def python(self) -> str | None: ...


async def prepare(
    name: str, fc: FunctionSpec, state_dir: Path, logger: logging.Logger
) -> dict[str, str]:
    """Environment additions of one function (see the module docstring); DependencyError if not."""

    def progress(line: str) -> None:
        logger.info("function %s: %s", name, line, extra={"function": name})

    env: dict[str, str] = {}
    path: list[str] = []
    req = requirements_file(Path(fc.code), fc.dependencies)
    if req is not None:
        try:
            path.append(str(await build(req, state_dir, fc.python or sys.executable, progress)))
        except DependencyError as e:
            raise DependencyError(f"function {name}: {e.message}") from None
    roots = []
    for layer in fc.layers:
        try:
            root = await asyncio.to_thread(layer_root, layer, state_dir)
        except (OSError, zipfile.BadZipFile) as e:
            raise DependencyError(f"function {name}: layer {layer}: {e}") from None
        roots.append(str(root))
        path += [str(root), str(root / "python")]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    if roots:
        env["EVENT_BRIDGE_LAYERS"] = os.pathsep.join(roots)
    if fc.credentials_file is not None:
        env.update(read_credentials(fc.credentials_file))
    return env
