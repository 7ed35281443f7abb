"""Keys, paths and file versions: what a file is, and how a key never becomes a path
outside its root."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Literal, TypeAlias

from sources.filesystem.config import inside

#: ``(st_mtime_ns, st_size)`` of a regular file: what is emitted, checkpointed and compared
Sig: TypeAlias = tuple[int, int]
#: ``(root index, key)``
FileId: TypeAlias = tuple[int, str]
#: a probe result: a Sig, None (no regular file there) or OUTSIDE (resolves out of the root)
OUTSIDE: Literal[False] = False
Probe: TypeAlias = Sig | Literal[False] | None


def safe_key(key: str) -> bool:
    """Whether ``key`` is a plain relative path: non-empty parts, no ``.``/``..``, no NUL.

    Keys come from paths found under a root, but those read back from the state store are
    data: ``a/../../etc/x`` must never become a path."""
    if not key or key.startswith("/") or "\0" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


def probe(root_real: str, path: str) -> Probe:
    """``(mtime_ns, size)`` of the regular file at ``path`` if its real path is inside
    ``root_real``; None if there is no regular file; OUTSIDE if it resolves out of the root.

    The real path is checked first and then lstat'ed (not stat'ed), so a symlink swapped in
    between is not followed out of the root."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return None
    if not inside(real, root_real):
        return OUTSIDE
    try:
        st = os.lstat(real)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_mtime_ns, st.st_size)


def etag(sig: Sig) -> str:
    """The ETag of a file version: ``"<mtime_ns hex>-<size hex>"`` (like nginx's)."""
    return f"{sig[0]:x}-{sig[1]:x}"


def text_key(key: str) -> bool:
    """Whether a key decoded from the filesystem is real text (keys travel as UTF-8 JSON)."""
    if key.isascii():
        return True
    try:
        key.encode()
    except UnicodeEncodeError:  # undecodable bytes survive as lone surrogates
        return False
    return True


@dataclasses.dataclass(slots=True)
class Root:
    index: int
    path: Path  # as configured (keys and URLs are built on it)
    sid: str  # its id in the state store
    real: str = ""  # realpath at connect(): what is watched and what containment means
    prefix: str = ""  # real + "/"
    url: str = ""  # file:// URL of path, with a trailing slash

    def __post_init__(self) -> None:
        self.url = self.path.as_uri().rstrip("/") + "/"


def check_root(path: Path) -> str:
    """The real path of a root directory, or an error an operator understands."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"directory {path} does not exist") from None
    except PermissionError:
        raise PermissionError(f"directory {path}: permission denied") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"directory {path} cannot be listed (permission denied)")
    return os.path.realpath(path)
