"""The local watcher: inotify(7) read on the event loop (``loop.add_reader``), no threads.

Events reach the source without crossing a thread: a readable inotify fd is read in
64 KiB chunks, each kernel event becomes an observation (the same ``Obs`` tuples the
polling observer's handler makes) and the lot is queued in one go. Observations that a
later close-after-write of the same file in the same read makes moot (its create, open
and close-without-write) are dropped there, so a burst of files costs one observation
each. While the source is behind (``maxsize`` observations waiting) the fd is not read:
the kernel queues events, and if its queue overflows the source rescans.

Directories: every directory under a root has a watch (``recursive``). One that appears
(created or moved in) is watched, with its subdirectories, and listed at once: its files
may have been written before the watch was in place, so they are observed as created and
settle. One moved away has its watches removed and its files reported gone
(``dir_gone``). On ``IN_Q_OVERFLOW`` every directory is watched again (events for new
directories may be among those lost) and the source is told (it rescans).

Where the source is told matters: the kernel queues one ``IN_Q_OVERFLOW`` at a time, so
until it has been read, events queued behind it may lose their successors silently (a
file's create and open queued, its close dropped). The "overflow" observation therefore
comes once the queue has been read empty after it, or at the next ``IN_Q_OVERFLOW``:
every observation before it may be missing its sequel (the source stops waiting for
closes), none after it is.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from bridge.plugin import Closed
from sources.filesystem.config import Rules
from sources.filesystem.paths import Root, probe, text_key
from sources.filesystem.watcher import Obs, watch_error

IN_OPEN = 0x20
IN_CLOSE_WRITE = 0x08
IN_CLOSE_NOWRITE = 0x10
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

MASK = (
    IN_CREATE
    | IN_OPEN
    | IN_CLOSE_WRITE
    | IN_CLOSE_NOWRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR  # a directory replaced by a file in between is not watched
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_READ = 64 * 1024
#: observations a later close-after-write of the same file makes moot
_MOOT = frozenset({"created", "opened", "closed"})


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        raise OSError(
            errno.ENOSYS, 'inotify is not available here: set poll_interval (e.g. "2s")'
        ) from None
    return libc


def _check(result: int, path: str) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return result


def coalesce(obs: list[Obs]) -> list[Obs]:
    """``obs`` without the creates, opens and closes-without-write that a later
    close-after-write (or rename into place) of the same file follows: "written" ends
    whatever was pending for the file, so they would change nothing."""
    written: set[tuple[int, str]] = set()
    out: list[Obs] = []
    for o in reversed(obs):
        kind = o[0]
        if kind == "written":
            written.add((o[1], o[2]))
        elif kind in _MOOT and (o[1], o[2]) in written:
            continue
        out.append(o)
    out.reverse()
    return out


class InotifyWatcher:
    """One inotify instance over the roots; the consumer side is :class:`bridge.plugin.Feed`'s
    (``get``, ``take``, ``len``, ``close``), on the event loop."""

    def __init__(
        self,
        roots: Sequence[Root],
        rules: Rules,
        *,
        warn: Callable[[str, str], None],
        maxsize: int = 10_000,
    ) -> None:
        self.roots = roots
        self.rules = rules
        self.recursive = rules.recursive
        self.maxsize = maxsize
        self._warn = warn
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._closed = False
        self._items: collections.deque[Obs] = collections.deque()
        self._ready = asyncio.Event()
        # every watched directory: wd -> (root index, key prefix ("" or "a/b/"), path)
        self._dirs: dict[int, tuple[int, str, str]] = {}
        self._wds: dict[tuple[int, str], int] = {}  # (root index, key prefix) -> wd
        self._root_wds: dict[int, int] = {}  # wd -> root index
        self.overflows = 0
        self._lossy = False  # IN_Q_OVERFLOW read, the queue not read empty since

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """On the worker thread (it walks the trees): the instance and every watch. Raises
        OSError with an operator's message (watch limits) if a root cannot be watched."""
        libc = _libc()
        self._fd = _check(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        try:
            for root in self.roots:
                wd = self._watch(root.index, "", root.real, strict=True)
                self._root_wds[wd] = root.index
                if self.recursive:
                    self._walk(root.index, "", root.real, None, strict=True)
        except OSError as e:
            self.close()
            raise OSError(e.errno, watch_error(e)) from None
        except BaseException:
            self.close()
            raise

    def attach(self) -> None:
        """On the event loop: read the fd whenever it is readable."""
        self._loop = asyncio.get_running_loop()
        self._resume()

    def close(self) -> None:
        """Stop reading, drop every watch; a waiting ``get()`` raises Closed."""
        self._closed = True
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._ready.set()

    # --- the consumer side (as bridge.plugin.Feed's) -----------------------------------------

    async def get(self) -> Obs:
        while True:
            if self._items:
                item = self._items.popleft()
                self._room()
                return item
            if self._closed:
                raise Closed("watcher closed")
            self._ready.clear()
            await self._ready.wait()

    def take(self, n: int) -> list[Obs]:
        items = self._items
        out = [items.popleft() for _ in range(min(n, len(items)))]
        self._room()
        return out

    def __len__(self) -> int:
        return len(self._items)

    def _room(self) -> None:
        if not self._reading and not self._closed and len(self._items) <= self.maxsize // 2:
            self._resume()

    def _resume(self) -> None:
        assert self._loop is not None
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True
        if self._lossy:
            # an IN_Q_OVERFLOW was read just before the watcher filled up: the source is told
            # once the queue reads empty, and if the burst is over no event will say when
            self._loop.call_soon(self._read_again)

    def _read_again(self) -> None:
        if self._reading and not self._closed:
            self._readable()

    # --- reading -----------------------------------------------------------------------------

    def _readable(self) -> None:
        obs: list[Obs] = []
        while len(self._items) + len(obs) < self.maxsize:
            try:
                buf = os.read(self._fd, _READ)
            except BlockingIOError:  # read empty: what comes next lost nothing unsaid
                if self._lossy:
                    self._lossy = False
                    obs.append(("overflow", -1, "", "", None))
                break
            except OSError as e:  # not expected from an inotify fd
                self._warn("inotify", f"cannot read events: {e.strerror}")
                break
            self._parse(buf, obs)
        else:  # behind: let the kernel queue events until the source catches up
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            self._reading = False
        if obs:
            self._items.extend(coalesce(obs))
            self._ready.set()

    def _parse(self, buf: bytes, out: list[Obs]) -> None:
        unpack = _HEADER.unpack_from
        size = _HEADER.size
        dirs = self._dirs
        offset, end = 0, len(buf)
        while offset < end:
            wd, mask, _cookie, length = unpack(buf, offset)
            offset += size
            name = os.fsdecode(buf[offset : offset + length].rstrip(b"\0")) if length else ""
            offset += length
            if mask & IN_Q_OVERFLOW:
                self._overflowed(out)
                continue
            where = dirs.get(wd)
            if where is None:
                continue  # a watch removed meanwhile
            if mask & IN_IGNORED:
                self._forget(wd)
                continue
            ri, prefix, directory = where
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if wd in self._root_wds:
                    out.append(("root_gone", ri, "", directory, None))
                continue  # a subdirectory: its parent's event says it went
            if not name:
                continue
            key = prefix + name
            path = directory + "/" + name
            if mask & IN_ISDIR:
                self._directory(mask, ri, key, path, out)
            elif mask & IN_CLOSE_WRITE or mask & IN_MOVED_TO:
                self._file(out, "written", ri, key, path)
            elif mask & IN_OPEN:
                self._file(out, "opened", ri, key, path)
            elif mask & IN_CLOSE_NOWRITE:
                self._file(out, "closed", ri, key, path)
            elif mask & IN_CREATE:
                self._file(out, "created", ri, key, path)
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self._file(out, "deleted", ri, key, path)

    def _file(self, out: list[Obs], kind: str, ri: int, key: str, path: str) -> None:
        if not self.rules.wanted(key):
            return
        if not text_key(key):
            out.append(("undecodable", ri, "", path, None))
            return
        result = probe(self.roots[ri].real, path) if kind == "written" else None
        out.append((kind, ri, key, path, result))

    def _directory(self, mask: int, ri: int, key: str, path: str, out: list[Obs]) -> None:
        if mask & (IN_CREATE | IN_MOVED_TO):
            if self.recursive:
                self._walk(ri, key + "/", path, out, strict=False, watch_top=True)
        elif mask & IN_MOVED_FROM:
            self._unwatch(ri, key + "/")
            out.append(("dir_gone", ri, key + "/", path, None))
        # IN_DELETE: it was empty (its files were reported one by one) and its watch goes
        # with it (IN_IGNORED)

    def _overflowed(self, out: list[Obs]) -> None:
        """Events were lost, among them maybe those of new directories: watch everything
        again (a directory already watched keeps its watch) and have the source rescan."""
        self.overflows += 1
        if self._lossy:
            # the kernel queues another IN_Q_OVERFLOW only once the last one was read:
            # every event queued before that is before this one (under a sustained
            # overload the queue may never be read empty)
            out.append(("overflow", -1, "", "", None))
        self._lossy = True  # the source is told once the queue is read empty (_readable)
        if self.recursive:
            stale = set(self._dirs) - set(self._root_wds)
            for root in self.roots:
                stale -= self._walk(root.index, "", root.real, None, strict=False)
            rm = _libc().inotify_rm_watch
            for wd in stale:  # directories that left the tree meanwhile
                self._forget(wd)
                rm(self._fd, wd)

    # --- watches -----------------------------------------------------------------------------

    def _walk(
        self,
        ri: int,
        prefix: str,
        directory: str,
        out: list[Obs] | None,
        *,
        strict: bool,
        watch_top: bool = False,
    ) -> set[int]:
        """Watch every directory below ``directory`` (and it, with ``watch_top``); with
        ``out``, observe each file found as created (after its directory's watch is in
        place: a file written later has its own events). The wds watched."""
        watched: set[int] = set()
        stack = [(prefix, directory, watch_top)]
        while stack:
            kp, d, watch = stack.pop()
            if watch:
                wd = self._watch(ri, kp, d, strict=strict)
                if wd < 0:
                    continue
                watched.add(wd)
            try:
                it = os.scandir(d)
            except OSError:
                if strict and d == directory:
                    raise
                continue  # gone or unreadable meanwhile
            with it:
                for entry in it:
                    key = kp + entry.name
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_dir:
                        stack.append((key + "/", entry.path, True))
                    elif out is not None:
                        self._file(out, "created", ri, key, entry.path)
        return watched

    def _watch(self, ri: int, prefix: str, directory: str, *, strict: bool) -> int:
        """Add (or refresh) the watch of one directory: its wd, or -1 if it is gone."""
        wd: int = _libc().inotify_add_watch(self._fd, os.fsencode(directory), MASK)
        if wd < 0:
            e = ctypes.get_errno()
            if strict and (prefix == "" or e not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES)):
                raise OSError(e, os.strerror(e), directory)
            if e in (errno.ENOSPC, errno.ENOMEM):
                self._warn(directory, watch_error(OSError(e, os.strerror(e))))
            return -1
        old = self._dirs.get(wd)
        if old is not None and self._wds.get(old[:2]) == wd:
            del self._wds[old[:2]]
        self._dirs[wd] = (ri, prefix, directory)
        self._wds[(ri, prefix)] = wd
        return wd

    def _unwatch(self, ri: int, prefix: str) -> None:
        """Drop the watches of a directory gone from the tree and of everything below it."""
        gone = [k for k in self._wds if k[0] == ri and k[1].startswith(prefix)]
        rm = _libc().inotify_rm_watch
        for k in gone:
            wd = self._wds.pop(k)
            del self._dirs[wd]
            rm(self._fd, wd)  # EINVAL if the kernel dropped it already: fine

    def _forget(self, wd: int) -> None:
        where = self._dirs.pop(wd, None)
        if where is not None and self._wds.get(where[:2]) == wd:
            del self._wds[where[:2]]

    @property
    def reading(self) -> bool:
        """Whether the fd is read (False while the source is behind)."""
        return self._reading

    def watched(self) -> list[tuple[int, str]]:
        """(root index, key prefix) of every watched directory."""
        return list(self._wds)
