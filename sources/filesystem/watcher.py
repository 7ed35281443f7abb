"""Seeing files change with ``poll_interval``: watchdog's polling observer and its handler
(on watchdog's threads); and the directory scan (on the source's worker thread). The local
watcher (inotify on the event loop) is in ``sources.filesystem.inotify``."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from bridge.plugin import Feed
from sources.filesystem.config import Rules
from sources.filesystem.paths import OUTSIDE, Probe, Root, Sig, probe, text_key

# Raw observations from watchdog's thread: (kind, root index, key, path, probe).
Obs: TypeAlias = tuple[str, int, str, str, Probe]


class Handler:
    """watchdog event handler for one root; runs on watchdog's dispatch thread.

    It turns each polling observer event into observations on the feed, probing files
    renamed into place right here, off the event loop."""

    def __init__(self, root: Root, rules: Rules, feed: Feed[Obs]) -> None:
        self.root = root
        self.rules = rules
        self.feed = feed

    def _key(self, path: str) -> str | None:
        prefix = self.root.prefix
        if not path.startswith(prefix):
            return None
        return path[len(prefix) :]

    def _put(self, kind: str, path: str, *, probed: bool = False) -> None:
        key = self._key(path)
        if key is None or not self.rules.wanted(key):
            return
        if not text_key(key):
            self.feed.put(("undecodable", self.root.index, "", path, None))
            return
        result = probe(self.root.real, path) if probed else None
        self.feed.put((kind, self.root.index, key, path, result))

    def dispatch(self, event: Any) -> None:
        etype: str = event.event_type
        src: str = os.fsdecode(event.src_path)
        if event.is_directory:
            if etype in ("deleted", "moved") and src == self.root.real:
                self.feed.put(("root_gone", self.root.index, "", src, None))
            elif etype == "moved" and src and not event.dest_path:
                # moved out of the tree: its files get no events of their own. (A directory
                # deleted is empty by then, and one moved within the tree is followed by
                # an event for each file in it.)
                key = self._key(src)
                if key is not None:
                    self.feed.put(("dir_gone", self.root.index, key + "/", src, None))
            return
        if etype == "moved":
            dest = os.fsdecode(event.dest_path)
            if src:
                self._put("deleted", src)
            if dest:
                self._put("written", dest, probed=True)
        elif etype == "created":
            self._put("created", src)
        elif etype == "modified":
            self._put("changed", src)
        elif etype == "deleted":
            if src == self.root.real:
                self.feed.put(("root_gone", self.root.index, "", src, None))
            else:
                self._put("deleted", src)


def start_polling(
    interval: float, recursive: bool, roots: Sequence[Root], rules: Rules, feed: Feed[Obs]
) -> Any:
    """A started watchdog polling observer on every root (on the worker thread: its first
    snapshot walks the trees)."""
    try:
        from watchdog.events import (
            DirDeletedEvent,
            DirMovedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )
        from watchdog.observers.polling import PollingObserver
    except ImportError:
        raise ImportError(
            "poll_interval needs watchdog: pip install 'event-bridge[files]'"
        ) from None

    wanted: list[type[Any]] = [
        FileCreatedEvent,
        FileDeletedEvent,
        FileMovedEvent,
        FileModifiedEvent,
        DirDeletedEvent,
        DirMovedEvent,
    ]
    observer: Any = PollingObserver(timeout=interval)
    try:
        for root in roots:
            observer.schedule(
                Handler(root, rules, feed),
                root.real,
                recursive=recursive,
                event_filter=wanted,
            )
        observer.start()
    except OSError as e:
        observer.stop()
        raise OSError(e.errno, watch_error(e)) from None
    except BaseException:
        observer.stop()
        raise
    return observer


def watch_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "inotify watch limit reached: raise fs.inotify.max_user_watches (sysctl)"
    if e.errno == errno.EMFILE:
        return "too many inotify instances: raise fs.inotify.max_user_instances (sysctl)"
    return f"cannot watch: {e.strerror or e}"


def scan(
    roots: Sequence[Root], rules: Rules, warn: Callable[[str, str], None]
) -> list[dict[str, Sig]] | None:
    """On the worker thread: every wanted regular file of every root, or None if a root
    is gone. Symlinked directories are not entered; symlinked files count only if they
    resolve inside their root. ``warn(path, why)`` is told what is left out and why."""
    out: list[dict[str, Sig]] = []
    for root in roots:
        files: dict[str, Sig] = {}
        stack: list[tuple[str, str]] = [("", root.real)]
        while stack:
            rel, directory = stack.pop()
            try:
                it = os.scandir(directory)
            except (FileNotFoundError, NotADirectoryError):
                if not rel:
                    return None
                continue
            except OSError as e:
                warn(directory, f"cannot list directory: {e.strerror}")
                continue
            with it:
                for entry in it:
                    key = rel + entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if rules.recursive:
                                stack.append((key + "/", entry.path))
                            continue
                        if not rules.wanted(key):
                            continue
                        if not text_key(key):
                            warn(entry.path, "file name is not valid UTF-8; no event")
                            continue
                        if entry.is_symlink():
                            result = probe(root.real, entry.path)
                            if result is OUTSIDE:
                                warn(entry.path, OUTSIDE_WHY)
                                continue
                            if result is None:
                                continue
                            files[key] = result
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            files[key] = (st.st_mtime_ns, st.st_size)
                    except OSError:
                        continue  # vanished while listing
        out.append(files)
    return out


OUTSIDE_WHY = "resolves outside the watched directory (symlink?); no event"
