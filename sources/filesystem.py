"""The filesystem trigger: a local directory as an object-storage bucket (SCF's COS trigger).

A file that is fully written under a watched directory becomes one COS
``cos:ObjectCreated:Put`` event; a file that goes away becomes one
``cos:ObjectRemove:Delete`` event. The object key is the path relative to the
watched root (``/``-separated), the bucket is ``bucket`` (default: the trigger
name), and ``cosObject.url`` is the file's ``file://`` URL.

How the pieces fit (the core's contract is in bridge/abc.py):

- **Watching.** watchdog's inotify observer (or its polling observer with
  ``poll_interval``, for network filesystems) runs on watchdog's own threads;
  its handler only looks at the file (stat, containment check) and hands a
  small tuple to the event loop through :class:`bridge.blocking.Feed`, which
  blocks watchdog's dispatch thread while the loop is behind. Directory scans
  and re-checks run on one :class:`bridge.blocking.Worker` thread. The source
  creates no threads of its own.
- **Fully written, never half-written.** inotify reports ``IN_CLOSE_WRITE``
  when a writer closes the file: that is the event. A rename into place (the
  ``write tmp; mv tmp name`` idiom) is complete too. A file that appears without
  being opened for writing (a hard link) or is only seen by a scan or by the
  polling observer is emitted once it has not changed for ``settle``; one that
  was seen opened waits for its close, however long the writer pauses.
- **Moves** are a removal of the old key and a creation of the new one (COS has
  no rename). A removal is emitted only for a key that was emitted as created.
- **Checkpoints.** What was emitted is remembered per file as ``(mtime_ns,
  size)``, which is also the ETag (``"<mtime_ns hex>-<size hex>"``, nginx-style:
  cheap, no file content is read). It is written to the state store **only in
  ack()**, sharded (1024 JSON documents per root under the namespace
  ``filesystem:<trigger>``) and group-committed: concurrent acks share one store
  transaction. A file is emitted again only when its ``(mtime_ns, size)``
  differs from the last one emitted.
- **Start-up and lost events.** With ``scan_on_start`` (the default) the roots
  are scanned once the watches are in place, so files created, changed or
  deleted while the daemon was down produce their events, and nothing already
  emitted is emitted again. (On the very first start every existing file is
  new.) Without it, the files present at start are only remembered. The kernel's
  inotify queue can overflow in a burst; watchdog only logs it, so the source
  listens for that log record and rescans at once, and rescans every
  ``rescan_interval`` anyway (in case an overflow went unnoticed).
- **Keys are data, never paths.** A key is only ever derived from a path found
  under the root; a path is emitted only if its real path (symlinks resolved)
  is inside the root's real path; keys read back from the state store must be
  plain relative paths (no ``..``, ``.``, empty or absolute parts) or are
  dropped. Nothing outside a root is ever stat'ed, read or written.
- **nack()** (the event could not be accepted) re-checks the file after
  ``settle``: it is emitted again if it still differs from what was acked.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fnmatch
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
import stat
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias

from pydantic import Field, field_validator, model_validator

from bridge.abc import Delivery, EndOfInput, NotConnected, Source, SourceContext
from bridge.blocking import Closed, Feed, Worker
from bridge.config import Duration, RelPath, TriggerConfig
from bridge.events import Event, Kind, cos_record

CREATED = "cos:ObjectCreated:Put"
REMOVED = "cos:ObjectRemove:Delete"
SHARDS = 1024  # state documents per root (a power of two)
_FEED_SIZE = 10_000  # raw observations between watchdog's thread and the loop
_DRAIN = 2_000  # raw observations applied per round of read()
_CHECK_BATCH = 2_000  # files re-checked per trip to the worker thread
_OVERFLOW_RESCAN_DELAY_S = 0.2  # let a burst go on a little before rescanning
_WARN_LIMIT = 100  # distinct paths warned about (symlinks out of the root, bad names)

#: ``(st_mtime_ns, st_size)`` of a regular file: what is emitted, checkpointed and compared
Sig: TypeAlias = tuple[int, int]
#: ``(root index, key)``
FileId: TypeAlias = tuple[int, str]
#: a probe result: a Sig, None (no regular file there) or OUTSIDE (resolves out of the root)
OUTSIDE: Literal[False] = False
Probe: TypeAlias = Sig | Literal[False] | None


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
                if a == b or _inside(a, b) or _inside(b, a):
                    raise ValueError(f"directories {a} and {b} overlap: a file needs one key")
        return self


def _inside(child: str, parent: str) -> bool:
    return child.startswith(parent.rstrip("/") + "/")


# --- keys and paths ---------------------------------------------------------------------------


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
    if not _inside(real, root_real):
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


def _text_key(key: str) -> bool:
    """Whether a key decoded from the filesystem is real text (keys travel as UTF-8 JSON)."""
    if key.isascii():
        return True
    try:
        key.encode()
    except UnicodeEncodeError:  # undecodable bytes survive as lone surrogates
        return False
    return True


@dataclasses.dataclass(slots=True)
class _Root:
    index: int
    path: Path  # as configured (keys and URLs are built on it)
    sid: str  # its id in the state store
    real: str = ""  # realpath at connect(): what is watched and what containment means
    prefix: str = ""  # real + "/"
    url: str = ""  # file:// URL of path, with a trailing slash

    def __post_init__(self) -> None:
        self.url = self.path.as_uri().rstrip("/") + "/"


class _Pending:
    """A file that changed but is not known to be complete yet."""

    __slots__ = ("due", "opens", "path")

    def __init__(self, path: str, due: float | None, opens: int = 0) -> None:
        self.path = path
        self.due = due  # loop time to re-check it; None while a writer has it open
        self.opens = opens


# Raw observations from watchdog's thread: (kind, root index, key, path, probe).
_Obs: TypeAlias = tuple[str, int, str, str, Probe]


class _Rules:
    """What the watchdog handler needs, immutable and shared with its thread."""

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


class _Handler:
    """watchdog event handler for one root; runs on watchdog's dispatch thread.

    It turns each watchdog event into observations on the feed, probing files that are
    complete (closed after writing, renamed into place) right here, off the event loop."""

    def __init__(self, root: _Root, rules: _Rules, feed: Feed[_Obs]) -> None:
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
        if not _text_key(key):
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


_overflow_hook = _OverflowHook()


def _listen_overflow(notify: Callable[[], None]) -> None:
    logger = logging.getLogger(_WATCHDOG_LOGGER)
    if _overflow_hook not in logger.filters:
        logger.addFilter(_overflow_hook)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)  # the filter only sees records that are created
    with _overflow_hook.lock:
        _overflow_hook.listeners.add(notify)


def _unlisten_overflow(notify: Callable[[], None]) -> None:
    with _overflow_hook.lock:
        _overflow_hook.listeners.discard(notify)


# --- the source ---------------------------------------------------------------------------------


class FilesystemSource(Source[FilesystemConfig]):
    """COS events for files written, renamed or deleted under the configured directories.

    One ``read()`` at a time; ``close()`` makes a waiting ``read()`` raise ``EndOfInput``.
    ``read()`` raises ``NotConnected`` when a root directory disappears (``connect()``
    then fails with a clear message until it is back, and rescans when it is).
    """

    Config = FilesystemConfig

    def __init__(self, config: FilesystemConfig, ctx: SourceContext) -> None:
        super().__init__(config, ctx)
        self.bucket = config.bucket or ctx.name
        self.namespace = f"filesystem:{ctx.name}"
        self._roots = [
            _Root(i, Path(os.path.abspath(p)), hashlib.sha1(str(p).encode()).hexdigest()[:12])
            for i, p in enumerate(config.path)
        ]
        self._rules = _Rules(config)
        self._settle = config.settle
        self._closed = False
        self._loaded = False  # state read from the store (first connect)
        self._connects = 0
        self._feed: Feed[_Obs] | None = None
        self._observer: Any = None
        self._worker: Worker | None = None
        self._lost: str | None = None  # why read() must raise NotConnected
        # what was emitted: acked (by shard) and in flight (newest last) — see _view()
        self._known: dict[str, dict[str, Sig]] = {}
        self._baseline: list[dict[str, Sig]] = [{} for _ in self._roots]
        self._inflight: dict[FileId, list[_FileDelivery]] = {}
        self._acked_seq: dict[FileId, int] = {}
        self._seq = 0
        self._checkpoint = _Checkpoint(ctx.store, self.namespace, self._shard_doc)
        # what to look at next
        self._pending: dict[FileId, _Pending] = {}
        self._dues: list[tuple[float, int, FileId]] = []  # heap; stale entries are skipped
        self._tick = itertools.count()
        self._ready: collections.deque[_FileDelivery] = collections.deque()
        self._backlog: collections.deque[tuple[FileId, str, Sig | None]] = collections.deque()
        self._rescan_at: float | None = None
        self._overflowed = False
        self._warned: set[str] = set()
        # counters (status)
        self.emitted = 0
        self.rescans = 0
        self.overflows = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._closed:
            return
        await self._stop_watching()
        if self._worker is None:
            self._worker = Worker(f"fs-{self.ctx.name}")
        loop_now = asyncio.get_running_loop().time()
        for root in self._roots:
            root.real = await self._worker.run(_check_root, root.path)
            root.prefix = root.real.rstrip("/") + "/"
        if not self._loaded:
            await self._load_state()
        self._feed = Feed(_FEED_SIZE)
        self._lost = None
        self._overflowed = False
        self._observer = await self._worker.run(self._start_observer, self._feed)
        _listen_overflow(self._on_overflow)
        self._connects += 1
        if self._connects == 1 and not self.config.scan_on_start:
            # remember what is there (not checkpointed: nothing was emitted)
            scanned = await self._worker.run(self._scan)
            if scanned is None:
                raise FileNotFoundError("a watched directory disappeared while scanning it")
            for root, files in zip(self._roots, scanned, strict=True):
                self._baseline[root.index] = files
            if self.config.rescan_interval > 0:
                self._schedule_rescan(loop_now + self.config.rescan_interval)
        else:
            # a first start with scan_on_start, or a reconnect (events may have been lost)
            self._forget_opens(loop_now)
            self._rescan_at = loop_now

    def _start_observer(self, feed: Feed[_Obs]) -> Any:
        # on the worker thread: adding the watches walks the trees
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
        if self.config.poll_interval is not None:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=self.config.poll_interval)
            wanted.append(FileModifiedEvent)
        else:
            from watchdog.observers.inotify import InotifyObserver

            # full events: a file moved in or out of a root is a FileMovedEvent with one
            # side empty, so a rename into place needs no settle delay
            observer = InotifyObserver(generate_full_events=True)
            wanted += [FileClosedEvent, FileOpenedEvent, FileClosedNoWriteEvent]
        try:
            for root in self._roots:
                observer.schedule(
                    _Handler(root, self._rules, feed),
                    root.real,
                    recursive=self.config.recursive,
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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stop_watching()
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                await worker.aclose()

    async def _stop_watching(self) -> None:
        _unlisten_overflow(self._on_overflow)
        feed, self._feed = self._feed, None
        observer, self._observer = self._observer, None
        if feed is not None:
            feed.close()  # unblocks watchdog's dispatch thread and a waiting read()
        if observer is not None:
            observer.stop()
            if self._worker is not None:
                await self._worker.run(observer.join, 10.0)

    def _on_overflow(self) -> None:
        # on watchdog's inotify thread
        self._overflowed = True
        feed = self._feed
        if feed is not None:
            feed.put(("overflow", -1, "", "", None), timeout=0)  # a wake-up; the flag is the news

    # --- reading -----------------------------------------------------------------------------

    async def read(self) -> Delivery:
        try:
            return await self._read()
        except Closed:  # close() shut the worker down under a scan or re-check
            if self._closed:
                raise EndOfInput from None
            raise

    async def _read(self) -> Delivery:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise EndOfInput
            feed = self._feed
            if feed is None:
                raise NotConnected("read() before connect()")
            if self._lost is not None:
                raise NotConnected(self._lost)
            if self._ready:
                return self._ready.popleft()
            if self._backlog:
                self._from_backlog()
                continue
            now = loop.time()
            if self._overflowed:
                self._overflowed = False
                self.overflows += 1
                self.ctx.logger.warning(
                    "trigger %s: the kernel dropped file events (inotify overflow); rescanning",
                    self.ctx.name,
                )
                self._forget_opens(now)
                self._schedule_rescan(now + _OVERFLOW_RESCAN_DELAY_S)
            if len(feed):
                await self._drain(feed)
                continue
            if self._rescan_at is not None and now >= self._rescan_at:
                await self._rescan()
                continue
            due = self._due_now(now)
            if due:
                await self._recheck(due)
                continue
            deadline = self._next_deadline()
            try:
                obs = await asyncio.wait_for(
                    feed.get(), None if deadline is None else max(0.0, deadline - now)
                )
            except TimeoutError:
                continue
            except Closed:
                continue  # closed, or replaced by a reconnect: the loop head decides
            self._apply(obs, loop.time())

    # --- the pending set: files waiting to settle --------------------------------------------

    def _wait(self, fid: FileId, path: str, due: float) -> None:
        """(Re)start waiting for ``fid`` to settle until ``due`` (loop time)."""
        self._pending[fid] = p = _Pending(path, None)
        self._set_due(fid, p, due)

    def _set_due(self, fid: FileId, p: _Pending, due: float | None) -> None:
        p.due = due
        if due is not None:
            heapq.heappush(self._dues, (due, next(self._tick), fid))

    def _live(self, entry: tuple[float, int, FileId]) -> bool:
        p = self._pending.get(entry[2])
        return p is not None and p.due == entry[0]

    def _due_now(self, now: float) -> list[FileId]:
        out: dict[FileId, None] = {}  # ordered, without duplicates
        dues = self._dues
        while dues and dues[0][0] <= now and len(out) < _CHECK_BATCH:
            entry = heapq.heappop(dues)
            if self._live(entry):
                out[entry[2]] = None
        return list(out)

    def _next_deadline(self) -> float | None:
        dues = self._dues
        while dues and not self._live(dues[0]):
            heapq.heappop(dues)
        times = [dues[0][0]] if dues else []
        if self._rescan_at is not None:
            times.append(self._rescan_at)
        return min(times) if times else None

    def _forget_opens(self, now: float) -> None:
        """Events were lost: who has a file open is unknown, so every pending file settles."""
        for fid, p in self._pending.items():
            p.opens = 0
            self._set_due(fid, p, now + self._settle)

    async def _drain(self, feed: Feed[_Obs]) -> None:
        now = asyncio.get_running_loop().time()
        for _ in range(_DRAIN):
            if not len(feed):
                break
            self._apply(await feed.get(), now)  # does not suspend while items are there

    def _apply(self, obs: _Obs, now: float) -> None:
        kind, ri, key, path, result = obs
        fid = (ri, key)
        if kind == "written":
            self._pending.pop(fid, None)
            if result is OUTSIDE:
                self._warn_outside(path)
            elif result is not None:
                self._emit_if_new(fid, path, result)
            elif self._view(fid) is not None:  # gone again already: look once more
                self._wait(fid, path, now + self._settle)
        elif kind == "created" or kind == "changed":
            p = self._pending.get(fid)
            if p is None:
                self._wait(fid, path, now + self._settle)
            elif p.opens == 0:
                self._set_due(fid, p, now + self._settle)
        elif kind == "opened":
            p = self._pending.get(fid)
            if p is not None:
                p.opens += 1
                p.due = None  # until it is closed
        elif kind == "closed":
            p = self._pending.get(fid)
            if p is not None and p.opens > 0:
                p.opens -= 1
                if p.opens == 0:
                    self._set_due(fid, p, now + self._settle)
        elif kind == "deleted":
            self._pending.pop(fid, None)
            self._emit_removed(fid, path)
        elif kind == "dir_gone":
            self._dir_gone(ri, key)
        elif kind == "root_gone":
            self._lost = f"directory {self._roots[ri].path} was deleted or moved"
        elif kind == "undecodable":
            self._warn(path, "file name is not valid UTF-8; no event")
        # "overflow" is only a wake-up: the flag set with it is handled by read()

    def _dir_gone(self, ri: int, prefix: str) -> None:
        for fid in [f for f in self._pending if f[0] == ri and f[1].startswith(prefix)]:
            del self._pending[fid]
        root = self._roots[ri]
        for key in sorted(self._present_keys(ri)):
            if key.startswith(prefix):
                self._emit_removed((ri, key), str(root.path / key))

    def _present_keys(self, ri: int) -> set[str]:
        """Keys of root ``ri`` whose last emitted (or remembered) state is 'present'."""
        sid = self._roots[ri].sid + "/"
        keys = set(self._baseline[ri])
        for shard_id, shard in self._known.items():
            if shard_id.startswith(sid):
                keys.update(shard)
        for (r, key), ds in self._inflight.items():
            if r == ri and ds:
                if ds[-1].sig is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return keys

    # --- emitting ----------------------------------------------------------------------------

    def _view(self, fid: FileId) -> Sig | None:
        """The last state emitted for a file: in flight, else acked, else remembered."""
        ds = self._inflight.get(fid)
        if ds:
            return ds[-1].sig
        shard = self._known.get(self._shard_id(fid))
        if shard is not None and fid[1] in shard:
            return shard[fid[1]]
        return self._baseline[fid[0]].get(fid[1])

    def _emit_if_new(self, fid: FileId, path: str, sig: Sig) -> None:
        if self._view(fid) != sig:
            self._ready.append(self._delivery(fid, path, sig))

    def _emit_removed(self, fid: FileId, path: str) -> None:
        if self._view(fid) is not None:
            self._ready.append(self._delivery(fid, path, None))

    def _delivery(self, fid: FileId, path: str, sig: Sig | None) -> _FileDelivery:
        self._seq += 1
        d = _FileDelivery(self, fid, path, sig, self._seq, self._event(fid, sig))
        self._inflight.setdefault(fid, []).append(d)
        self.emitted += 1
        return d

    def _event(self, fid: FileId, sig: Sig | None) -> Event:
        root = self._roots[fid[0]]
        key = fid[1]
        if sig is None:
            when, name, size, tag = datetime.now(UTC), REMOVED, 0, ""
        else:
            when, name, size, tag = (
                datetime.fromtimestamp(sig[0] / 1e9, UTC),
                CREATED,
                sig[1],
                etag(sig),
            )
        url = root.url + urllib.parse.quote(key)  # what Path.as_uri() gives, 5x cheaper
        rec = cos_record(
            bucket=self.bucket,
            key=key,
            event_name=name,
            time=when,
            size=size,
            etag=tag,
            region=self.config.region,
            appid=self.config.appid,
            url=url,
            # the SCF rendering has no ETag field of its own: it travels in the object meta
            meta={"ETag": tag} if tag else None,
        )
        # no native payload: there is no upstream message (format = "native" renders as scf)
        return Event.fresh(kind=Kind.COS, trigger=self.ctx.name, time=when, records=(rec,))

    def _from_backlog(self) -> None:
        """Turn rescan findings into deliveries, skipping what was emitted meanwhile."""
        while self._backlog and not self._ready:
            fid, path, sig = self._backlog.popleft()
            if sig is None:
                self._emit_removed(fid, path)
            else:
                self._emit_if_new(fid, path, sig)

    # --- scanning and re-checking --------------------------------------------------------------

    def _schedule_rescan(self, at: float) -> None:
        if self._rescan_at is None or at < self._rescan_at:
            self._rescan_at = at

    async def _rescan(self) -> None:
        """Reconcile with the directories: emit what changed or vanished since it was emitted.

        Files changed within ``settle`` go to the pending set rather than out as events,
        and so do files a writer was seen opening; vanished files are confirmed gone
        before their removal is emitted (a scan is not an instant)."""
        worker = self._worker
        assert worker is not None
        loop = asyncio.get_running_loop()
        overflows = self.overflows
        scanned = await worker.run(self._scan)  # cancellation-safe: nothing changed yet
        if scanned is None:
            self._lost = "a watched directory is gone"
            return
        now, wall = loop.time(), time.time()
        settle_ns = int(self._settle * 1e9)
        wall_ns = int(wall * 1e9)
        gone: list[tuple[FileId, str]] = []
        for root, files in zip(self._roots, scanned, strict=True):
            ri = root.index
            for key, sig in files.items():
                fid = (ri, key)
                pending = self._pending.get(fid)
                if pending is not None and pending.opens > 0:
                    continue  # a writer has it open: its close emits it
                if self._view(fid) == sig:
                    continue
                age_ns = wall_ns - sig[0]
                if age_ns < settle_ns:
                    self._wait(fid, root.prefix + key, now + (settle_ns - age_ns) / 1e9)
                else:
                    self._pending.pop(fid, None)
                    self._backlog.append((fid, root.prefix + key, sig))
            for key in self._present_keys(ri):
                if key not in files and (ri, key) not in self._pending:
                    gone.append(((ri, key), root.prefix + key))
        if gone:
            results = await worker.run(self._probe_all, gone)
            for (fid, path), result in zip(gone, results, strict=True):
                if result is None or result is OUTSIDE:
                    self._backlog.append((fid, path, None))
        self.rescans += 1
        self._rescan_at = None
        if self.overflows != overflows:  # another overflow during the scan: look again
            self._schedule_rescan(loop.time() + _OVERFLOW_RESCAN_DELAY_S)
        if self.config.rescan_interval > 0:
            self._schedule_rescan(loop.time() + self.config.rescan_interval)

    def _scan(self) -> list[dict[str, Sig]] | None:
        """On the worker thread: every wanted regular file of every root, or None if a root
        is gone. Symlinked directories are not entered; symlinked files count only if they
        resolve inside their root."""
        out: list[dict[str, Sig]] = []
        for root in self._roots:
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
                    self._warn(directory, f"cannot list directory: {e.strerror}")
                    continue
                with it:
                    for entry in it:
                        key = rel + entry.name
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                if self.config.recursive:
                                    stack.append((key + "/", entry.path))
                                continue
                            if not self._rules.wanted(key):
                                continue
                            if not _text_key(key):
                                self._warn(entry.path, "file name is not valid UTF-8; no event")
                                continue
                            if entry.is_symlink():
                                result = probe(root.real, entry.path)
                                if result is OUTSIDE:
                                    self._warn_outside(entry.path)
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

    def _probe_all(self, items: list[tuple[FileId, str]]) -> list[Probe]:
        return [probe(self._roots[fid[0]].real, path) for fid, path in items]

    async def _recheck(self, fids: list[FileId]) -> None:
        """Files whose settle time is up: emit those complete, wait more for the others."""
        worker = self._worker
        assert worker is not None
        items = [(fid, self._pending[fid].path) for fid in fids]
        try:
            results = await worker.run(self._probe_all, items)
        except BaseException:  # cancelled: they are still due
            for fid in fids:
                p = self._pending.get(fid)
                if p is not None and p.due is not None:
                    self._set_due(fid, p, p.due)
            raise
        wall_ns = time.time_ns()
        settle_ns = int(self._settle * 1e9)
        now = asyncio.get_running_loop().time()
        for (fid, path), result in zip(items, results, strict=True):
            p = self._pending.get(fid)
            if p is None or p.due is None or p.path != path:
                continue  # something newer happened to it meanwhile
            if result is OUTSIDE:
                del self._pending[fid]
                self._warn_outside(path)
            elif result is None:
                del self._pending[fid]
                self._emit_removed(fid, path)
            elif wall_ns - result[0] < settle_ns:  # changed meanwhile: wait again
                self._set_due(fid, p, now + (settle_ns - (wall_ns - result[0])) / 1e9)
            else:
                del self._pending[fid]
                self._emit_if_new(fid, path, result)

    # --- settling ----------------------------------------------------------------------------

    def _settled(self, d: _FileDelivery, acked: bool) -> str | None:
        """Forget an in-flight delivery; on ack record its state. Returns the shard to write."""
        fid = d.fid
        ds = self._inflight.get(fid)
        if ds is None or d not in ds:
            return None
        ds.remove(d)
        shard_id: str | None = None
        if acked and d.seq > self._acked_seq.get(fid, 0):
            shard_id = self._shard_id(fid)
            shard = self._known.setdefault(shard_id, {})
            if d.sig is None:
                shard.pop(fid[1], None)
            else:
                shard[fid[1]] = d.sig
            self._baseline[fid[0]].pop(fid[1], None)
            self._acked_seq[fid] = d.seq
        if not ds:  # nothing older can still be acked: the sequence guard is not needed
            del self._inflight[fid]
            self._acked_seq.pop(fid, None)
        return shard_id

    def _retry_later(self, d: _FileDelivery) -> None:
        if self._closed:
            return
        if d.fid not in self._pending:
            self._wait(d.fid, d.path, asyncio.get_running_loop().time() + self._settle)

    # --- state -------------------------------------------------------------------------------

    def _shard_id(self, fid: FileId) -> str:
        n = zlib.crc32(fid[1].encode()) & (SHARDS - 1)
        return f"{self._roots[fid[0]].sid}/{n:03x}"

    def _shard_doc(self, shard_id: str) -> str | None:
        shard = self._known.get(shard_id)
        if not shard:
            return None
        return json.dumps({"v": 1, "files": shard}, separators=(",", ":"))

    async def _load_state(self) -> None:
        ids = [f"{root.sid}/{n:03x}" for root in self._roots for n in range(SHARDS)]
        docs = await asyncio.gather(*(self.ctx.store.get(self.namespace, i) for i in ids))
        dropped = 0
        for shard_id, doc in zip(ids, docs, strict=True):
            if doc is None:
                continue
            try:
                files = json.loads(doc)["files"]
            except (ValueError, KeyError, TypeError):
                self.ctx.logger.warning(
                    "trigger %s: unreadable state %s ignored", self.ctx.name, shard_id
                )
                continue
            shard: dict[str, Sig] = {}
            for key, sig in files.items():
                if not (
                    safe_key(key)
                    and self._rules.wanted(key)
                    and isinstance(sig, list)
                    and len(sig) == 2
                    and all(isinstance(x, int) for x in sig)
                ):
                    dropped += 1
                    continue
                shard[key] = (sig[0], sig[1])
            if shard:
                self._known[shard_id] = shard
        if dropped:
            self.ctx.logger.warning(
                "trigger %s: %d remembered keys are not plain relative paths of wanted files; "
                "forgotten",
                self.ctx.name,
                dropped,
            )
        self._loaded = True

    # --- warnings ----------------------------------------------------------------------------

    def _warn(self, path: str, why: str) -> None:
        if path in self._warned or len(self._warned) >= _WARN_LIMIT:
            return
        self._warned.add(path)
        self.ctx.logger.warning(
            "trigger %s: %s: %s", self.ctx.name, why, path.encode(errors="replace").decode()
        )

    def _warn_outside(self, path: str) -> None:
        self._warn(path, "resolves outside the watched directory (symlink?); no event")

    # --- optional capabilities ---------------------------------------------------------------

    def sample_event(self, now: datetime) -> Event:
        root = self._roots[0]
        sig = (int(now.timestamp() * 1e9), 0)
        key = "example.txt"
        rec = cos_record(
            bucket=self.bucket,
            key=key,
            event_name=CREATED,
            time=now,
            size=0,
            etag=etag(sig),
            region=self.config.region,
            appid=self.config.appid,
            url=(root.path / key).as_uri(),
            meta={"ETag": etag(sig)},
        )
        return Event.fresh(kind=Kind.COS, trigger=self.ctx.name, time=now, records=(rec,))

    def status(self) -> Mapping[str, Any]:
        feed = self._feed
        waiting = len(self._pending) + len(self._backlog) + len(self._ready)
        return {
            "directories": [str(r.path) for r in self._roots],
            "watcher": "polling" if self.config.poll_interval else "inotify",
            "tracked_files": sum(len(s) for s in self._known.values()),
            "pending": len(self._pending),
            "lag": waiting + (len(feed) if feed is not None else 0),
            "emitted": self.emitted,
            "rescans": self.rescans,
            "overflows": self.overflows,
        }


def _check_root(path: Path) -> str:
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


def _watch_error(e: OSError) -> str:
    import errno

    if e.errno == errno.ENOSPC:
        return "inotify watch limit reached: raise fs.inotify.max_user_watches (sysctl)"
    if e.errno == errno.EMFILE:
        return "too many inotify instances: raise fs.inotify.max_user_instances (sysctl)"
    return f"cannot watch: {e.strerror or e}"


class _FileDelivery(Delivery):
    """One file event. ``ack()`` checkpoints the file's state; ``nack()`` re-checks it later."""

    __slots__ = ("fid", "path", "seq", "sig", "source")

    def __init__(
        self,
        source: FilesystemSource,
        fid: FileId,
        path: str,
        sig: Sig | None,
        seq: int,
        event: Event,
    ) -> None:
        super().__init__(event)
        self.source = source
        self.fid = fid
        self.path = path
        self.sig = sig
        self.seq = seq

    async def ack(self) -> None:
        shard_id = self.source._settled(self, acked=True)
        if shard_id is not None:
            await self.source._checkpoint.commit(shard_id)

    async def nack(self, error: BaseException | None = None) -> None:
        try:
            self.source._settled(self, acked=False)
            self.source._retry_later(self)
        except Exception as e:  # nack must not raise
            self.source.ctx.logger.debug("nack of %s failed: %s", self.path, e)


class _Checkpoint:
    """Group-committed writes of state shards: each ``commit(shard)`` returns once a store
    write that includes the caller's change is committed. Writes of concurrent callers are
    batched; one of the callers runs each batch (no task of its own)."""

    def __init__(self, store: Any, namespace: str, doc: Callable[[str], str | None]) -> None:
        self.store = store
        self.namespace = namespace
        self.doc = doc
        self._dirty: set[str] = set()
        self._next: asyncio.Future[None] | None = None  # the batch being collected
        self._current: asyncio.Future[None] | None = None  # the batch being written
        self.writes = 0

    async def commit(self, shard_id: str) -> None:
        self._dirty.add(shard_id)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            # mark the outcome retrieved even if every waiter was cancelled
            self._next.add_done_callback(_retrieve)
        mine = self._next
        while not mine.done():
            current = self._current
            if current is not None:
                await asyncio.wait([current])
                continue
            # nobody is writing and mine is not done: mine is the batch being collected
            batch, self._dirty = self._dirty, set()
            this, self._next = mine, None
            self._current = this
            try:
                await asyncio.gather(
                    *(self.store.put(self.namespace, s, self.doc(s)) for s in sorted(batch))
                )
                self.writes += len(batch)
            except Exception as e:
                this.set_exception(e)
            except BaseException:
                this.set_exception(RuntimeError("checkpoint interrupted"))
                raise
            else:
                this.set_result(None)
            finally:
                self._current = None
        mine.result()


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
