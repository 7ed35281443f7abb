"""``[triggers.NAME]`` of a filesystem trigger, and the file-name rules it implies."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from bridge.plugin import Duration, RelPath, TriggerConfig


class FilesystemConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "filesystem"``."""

    path: list[RelPath] = Field(
        description="Directory to watch, or a list of directories (relative paths are resolved "
        "against the config file's folder). Keys are relative to the directory they are in.",
        min_length=1,
    )
    recursive: bool = Field(True, description="Watch subdirectories too (keys contain '/').")
    patterns: list[str] = Field(
        ["*"],
        description="Glob patterns (fnmatch) of the files that produce events. A pattern with "
        "a '/' is matched against the whole key, one without against the file name.",
        min_length=1,
    )
    ignore_patterns: list[str] = Field(
        [],
        description="Glob patterns of files to leave out even if they match patterns "
        '(e.g. ".*" for hidden and temporary files).',
    )
    scan_on_start: bool = Field(
        True,
        description="Scan the directories at start and emit what changed while the daemon was "
        "down (on a first start: every file). false: only remember what is there.",
    )
    settle: Duration = Field(
        1.0,
        ge=0,
        description="How long a file must stay unchanged before it is emitted when no "
        "close-after-write tells that it is complete (hard links, scans, polling).",
    )
    rescan_interval: Duration = Field(
        300.0,
        ge=0,
        description='Rescan the directories this often to reconcile lost events; "0s" turns '
        "periodic rescans off (an inotify overflow still triggers one).",
    )
    poll_interval: Duration | None = Field(
        None,
        gt=0,
        description="Poll the directories this often instead of using inotify (for network "
        "filesystems, where inotify sees nothing); files are then emitted after settle.",
    )
    bucket: str | None = Field(
        None, min_length=1, description="Bucket name in the events; default the trigger name."
    )
    appid: str = Field("0", description="APPID in the events' object keys (/<appid>/<bucket>/…).")
    region: str = Field("local", description="Region in the events.")

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | Path) else v

    @field_validator("patterns", "ignore_patterns")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or p.startswith("/"):
                raise ValueError(f'invalid pattern "{p}": use a glob relative to the directory')
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> FilesystemConfig:
        paths = [str(p) for p in self.path]
        for i, a in enumerate(paths):
            for b in paths[i + 1 :]:
                if a == b or inside(a, b) or inside(b, a):
                    raise ValueError(f"directories {a} and {b} overlap: a file needs one key")
        return self


def inside(child: str, parent: str) -> bool:
    return child.startswith(parent.rstrip("/") + "/")


def _compile(patterns: Iterable[str]) -> Callable[[str], bool]:
    """One matcher for a list of globs: name globs test the file name, path globs the key."""
    names = [fnmatch.translate(p) for p in patterns if "/" not in p]
    keys = [fnmatch.translate(p) for p in patterns if "/" in p]
    name_rx = re.compile("|".join(names)).match if names else None
    key_rx = re.compile("|".join(keys)).match if keys else None

    def match(key: str) -> bool:
        if name_rx is not None and name_rx(key.rpartition("/")[2]):
            return True
        return key_rx is not None and key_rx(key) is not None

    return match


class Rules:
    """Which keys produce events; immutable and shared with watchdog's thread."""

    def __init__(self, config: FilesystemConfig) -> None:
        self.recursive = config.recursive
        self.match = _compile(config.patterns)
        self.ignore = _compile(config.ignore_patterns) if config.ignore_patterns else None

    def wanted(self, key: str) -> bool:
        if not self.recursive and "/" in key:
            return False
        if not self.match(key):
            return False
        return self.ignore is None or not self.ignore(key)
