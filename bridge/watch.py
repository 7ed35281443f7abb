"""What changed on disk: digests of function code folders and of the config files.

A reload (SIGHUP, ``systemctl reload``) swaps a function whose config *or* code
changed: its code folder's digest is compared with the one taken when the
running version was started. ``run --watch`` polls the same digests (and the
config files) once a second and reloads on a change, for development.

The digest covers every file under the folder (path, size, and the content of
files up to 1 MiB; the modification time of larger ones), skipping
``__pycache__``, ``.git`` and the daemon's own state folder (a project's code
folder often holds it: ``state_dir = "state"`` beside ``serverless.yml``, where
every invocation writes its logs and the queue), and at most 20,000 files
(beyond that, their names and stat only). Not guaranteed: a change made while the digest is taken
may be seen on the next reload only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.config import Config

_SKIP = {"__pycache__", ".git"}
_HASH_UP_TO = 1024 * 1024
_MAX_FILES = 20_000


def code_dir(function_config: object) -> Path | None:
    """The function's code folder, for runtimes that have one (``code = "…"``)."""
    code = getattr(function_config, "code", None)
    return code if isinstance(code, Path) else None


def folder_digest(root: Path, skip: Iterable[Path] = ()) -> str:
    """A digest of what is under ``root`` (see the module docstring), without the folders
    ``skip`` names (absolute paths); "missing" if unreadable."""
    h = hashlib.sha256()
    n = 0
    try:
        walk = sorted(_walk(root, {os.path.realpath(p) for p in skip}))
    except OSError:
        return "missing"
    for rel, path in walk:
        n += 1
        try:
            st = path.stat()
        except OSError:
            continue
        h.update(f"{rel}\0{st.st_size}\0".encode())
        if st.st_size <= _HASH_UP_TO and n <= _MAX_FILES:
            try:
                h.update(path.read_bytes())
            except OSError:
                h.update(b"unreadable")
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


def _walk(root: Path, skip: set[str]) -> Iterable[tuple[str, Path]]:
    if not root.is_dir():
        raise FileNotFoundError(root)
    # walked from its real path, whose folders are real paths too (os.walk does not follow
    # links to folders): ``skip``, real paths, is compared with them as they are
    real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(real):
        dirnames[:] = [
            d for d in dirnames if d not in _SKIP and os.path.join(dirpath, d) not in skip
        ]
        for f in filenames:
            p = Path(dirpath, f)
            yield os.path.relpath(p, real), p


def digests(config: Config) -> dict[str, str]:
    """``{function: digest of its code folder}`` for functions that have one (the state
    folder left out, where it is inside one)."""
    out = {}
    skip = (config.state_dir.absolute(),)
    for name, fc in config.functions.items():
        d = code_dir(fc)
        if d is not None:
            out[name] = folder_digest(d, skip)
    return out


def changed(old: Mapping[str, str], new: Mapping[str, str]) -> set[str]:
    """Functions present in both whose code digest differs."""
    return {n for n in old.keys() & new.keys() if old[n] != new[n]}


def files_signature(config: Config) -> tuple[tuple[str, int, int], ...]:
    """Config files (the main one, its drop-ins, and any drop-in added since) by stat."""
    paths = set(config.files)
    if config.path is not None:
        paths.add(config.path)
        dropins = config.path.parent / "conf.d"
        if dropins.is_dir():
            paths.update(dropins.glob("*.toml"))
    out = []
    for p in sorted(paths):
        try:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, 0))
    return tuple(out)
