"""Seeing files change: watchdog's observer and handler (on watchdog's threads), inotify
overflow notices, and the directory scan (on the source's worker thread)."""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from bridge.plugin import Feed
from sources.filesystem.config import FilesystemConfig, Rules
from sources.filesystem.paths import OUTSIDE, Probe, Root, Sig, probe, text_key

# Raw observations from watchdog's thread: (kind, root index, key, path, probe).
Obs: TypeAlias = tuple[str, int, str, str, Probe]


class Handler:
    """watchdog event handler for one root; runs on watchdog's dispatch thread.

    It turns each watchdog event into observations on the feed, probing files that are
    complete (closed after writing, renamed into place) right here, off the event loop."""

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
        if etype == "closed":
            self._put("written", src, probed=True)
        elif etype == "moved":
            dest = os.fsdecode(event.dest_path)
            if src:
                self._put("deleted", src)
            if dest:
                self._put("written", dest, probed=True)
        elif etype == "created":
            self._put("created", src)
        elif etype == "opened":
            self._put("opened", src)
        elif etype == "closed_no_write":
            self._put("closed", src)
        elif etype == "modified":  # polling observer only: inotify's is not subscribed to
            self._put("changed", src)
        elif etype == "deleted":
            if src == self.root.real:
                self.feed.put(("root_gone", self.root.index, "", src, None))
            else:
                self._put("deleted", src)


def start_observer(
    config: FilesystemConfig, roots: Sequence[Root], rules: Rules, feed: Feed[Obs]
) -> Any:
    """A started watchdog observer on every root (on the worker thread: adding the watches
    walks the trees)."""
    try:
        import watchdog  # noqa: F401
    except ImportError:
        raise ImportError(
            "the filesystem trigger needs watchdog: pip install 'event-bridge[files]'"
        ) from None
    from watchdog.events import (
        DirDeletedEvent,
        DirMovedEvent,
        FileClosedEvent,
        FileClosedNoWriteEvent,
        FileCreatedEvent,
        FileDeletedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileOpenedEvent,
    )

    wanted: list[type[Any]] = [
        FileCreatedEvent,
        FileDeletedEvent,
        FileMovedEvent,
        DirDeletedEvent,
        DirMovedEvent,
    ]
    observer: Any
    if config.poll_interval is not None:
        from watchdog.observers.polling import PollingObserver

        observer = PollingObserver(timeout=config.poll_interval)
        wanted.append(FileModifiedEvent)
    else:
        from watchdog.observers.inotify import InotifyObserver

        # full events: a file moved in or out of a root is a FileMovedEvent with one
        # side empty, so a rename into place needs no settle delay
        observer = InotifyObserver(generate_full_events=True)
        wanted += [FileClosedEvent, FileOpenedEvent, FileClosedNoWriteEvent]
    try:
        for root in roots:
            observer.schedule(
                Handler(root, rules, feed),
                root.real,
                recursive=config.recursive,
                event_filter=wanted,
            )
        observer.start()
    except OSError as e:
        observer.stop()
        raise OSError(e.errno, _watch_error(e)) from None
    except BaseException:
        observer.stop()
        raise
    return observer


def _watch_error(e: OSError) -> str:
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


# --- overflow notices ---------------------------------------------------------------------------
# watchdog reads IN_Q_OVERFLOW but does not hand it to handlers: it only logs a warning on
# this logger. A filter on it is the one hook there is; the periodic rescan is the backstop.

_WATCHDOG_LOGGER = "watchdog.observers.inotify_c"


class _OverflowHook(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.listeners: set[Callable[[], None]] = set()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in str(record.msg).lower():
            with self.lock:
                listeners = list(self.listeners)
            for notify in listeners:
                notify()
        return True


overflow_hook = _OverflowHook()


def listen_overflow(notify: Callable[[], None]) -> None:
    logger = logging.getLogger(_WATCHDOG_LOGGER)
    if overflow_hook not in logger.filters:
        logger.addFilter(overflow_hook)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)  # the filter only sees records that are created
    with overflow_hook.lock:
        overflow_hook.listeners.add(notify)


def unlisten_overflow(notify: Callable[[], None]) -> None:
    with overflow_hook.lock:
        overflow_hook.listeners.discard(notify)
