"""The filesystem source itself: the pending set of files waiting to settle, rescans,
and the deliveries (see the package docstring for the design)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import heapq
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from bridge.plugin import (
    Closed,
    Delivery,
    EndOfInput,
    Event,
    Feed,
    NotConnected,
    SettleDelivery,
    Source,
    SourceContext,
    Worker,
)
from sources.filesystem.config import FilesystemConfig, Rules
from sources.filesystem.events import file_event, sample_event
from sources.filesystem.inotify import InotifyWatcher
from sources.filesystem.paths import OUTSIDE, FileId, Probe, Root, Sig, check_root, probe
from sources.filesystem.state import Emit, FileState, namespace
from sources.filesystem.watcher import OUTSIDE_WHY, Obs, scan, start_polling

_FEED_SIZE = 10_000  # raw observations waiting for the source (inotify's, or watchdog's)
_DRAIN = 2_000  # raw observations applied per round of read()
_CHECK_BATCH = 2_000  # files re-checked per trip to the worker thread
_BATCH = 1_000  # rescan findings turned into deliveries at a time
_OVERFLOW_RESCAN_DELAY_S = 0.2  # let a burst go on a little before rescanning
_WARN_LIMIT = 100  # distinct paths warned about (symlinks out of the root, bad names)


class _Pending:
    """A file that changed but is not known to be complete yet."""

    __slots__ = ("due", "opens", "path")

    def __init__(self, path: str, due: float | None, opens: int = 0) -> None:
        self.path = path
        self.due = due  # loop time to re-check it; None while a writer has it open
        self.opens = opens


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
        self.namespace = namespace(ctx.name, ctx.store)
        self._roots = [
            Root(i, Path(os.path.abspath(p)), hashlib.sha1(str(p).encode()).hexdigest()[:12])
            for i, p in enumerate(config.path)
        ]
        self._rules = Rules(config)
        self._settle = config.settle
        self._closed = False
        self._loaded = False  # state read from the store (first connect)
        self._connects = 0
        self._feed: Feed[Obs] | InotifyWatcher | None = None
        self._observer: Any = None  # watchdog's polling observer (poll_interval)
        self._worker: Worker | None = None
        self._lost: str | None = None  # why read() must raise NotConnected
        self._state = FileState(ctx.store, self.namespace, self._roots, self._rules.wanted)
        # what to look at next
        self._pending: dict[FileId, _Pending] = {}
        self._dues: list[tuple[float, int, FileId]] = []  # heap; stale entries are skipped
        self._tick = itertools.count()
        self._ready: collections.deque[Delivery] = collections.deque()
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
            root.real = await self._worker.run(check_root, root.path)
            root.prefix = root.real.rstrip("/") + "/"
        if not self._loaded:
            await self._load_state()
        self._lost = None
        self._overflowed = False
        interval = self.config.poll_interval
        if interval is not None:
            feed: Feed[Obs] = Feed(_FEED_SIZE)
            self._feed = feed
            self._observer = await self._worker.run(
                start_polling, interval, self.config.recursive, self._roots, self._rules, feed
            )
        else:
            watcher = InotifyWatcher(
                self._roots,
                self._rules,
                on_overflow=self._on_overflow,
                warn=self._warn,
                maxsize=_FEED_SIZE,
            )
            await self._worker.run(watcher.start)
            watcher.attach()
            self._feed = watcher
        self._connects += 1
        if self._connects == 1 and not self.config.scan_on_start:
            # remember what is there (not checkpointed: nothing was emitted)
            scanned = await self._worker.run(self._scan)
            if scanned is None:
                raise FileNotFoundError("a watched directory disappeared while scanning it")
            for root, files in zip(self._roots, scanned, strict=True):
                self._state.remember(root.index, files)
            if self.config.rescan_interval > 0:
                self._schedule_rescan(loop_now + self.config.rescan_interval)
        else:
            # a first start with scan_on_start, or a reconnect (events may have been lost)
            self._forget_opens(loop_now)
            self._rescan_at = loop_now

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
        feed, self._feed = self._feed, None
        observer, self._observer = self._observer, None
        if feed is not None:
            feed.close()  # unblocks watchdog's dispatch thread and a waiting read()
        if observer is not None:
            observer.stop()
            if self._worker is not None:
                await self._worker.run(observer.join, 10.0)

    def _on_overflow(self) -> None:
        # from the inotify watcher, on the loop; it queues an "overflow" wake-up for read()
        self._overflowed = True

    # --- reading -----------------------------------------------------------------------------

    async def read(self) -> Delivery:
        return (await self.read_many(1))[0]

    async def read_many(self, max_n: int) -> Sequence[Delivery]:
        """What is ready, up to ``max_n`` (a scan or a burst of closes gives many at once)."""
        try:
            await self._wait_ready()
        except Closed:  # close() shut the worker down under a scan or re-check
            if self._closed:
                raise EndOfInput from None
            raise
        ready = self._ready
        if len(ready) <= max_n:
            out = list(ready)
            ready.clear()
            return out
        return [ready.popleft() for _ in range(max_n)]

    async def _wait_ready(self) -> None:
        """Return once ``_ready`` holds deliveries."""
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
                return
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
                self._drain(feed)
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

    def _drain(self, feed: Feed[Obs] | InotifyWatcher) -> None:
        now = asyncio.get_running_loop().time()
        for obs in feed.take(_DRAIN):
            self._apply(obs, now)

    def _apply(self, obs: Obs, now: float) -> None:
        kind, ri, key, path, result = obs
        fid = (ri, key)
        if kind == "written":
            self._pending.pop(fid, None)
            if result is OUTSIDE:
                self._warn_outside(path)
            elif result is not None:
                self._emit_if_new(fid, path, result)
            elif self._state.view(fid) is not None:  # gone again already: look once more
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
        for key in sorted(self._state.present_keys(ri)):
            if key.startswith(prefix):
                self._emit_removed((ri, key), str(root.path / key))

    # --- emitting ----------------------------------------------------------------------------

    def _emit_if_new(self, fid: FileId, path: str, sig: Sig) -> None:
        if self._state.view(fid) != sig:
            self._ready.append(self._delivery(fid, path, sig))

    def _emit_removed(self, fid: FileId, path: str) -> None:
        if self._state.view(fid) is not None:
            self._ready.append(self._delivery(fid, path, None))

    def _delivery(self, fid: FileId, path: str, sig: Sig | None) -> Delivery:
        e = self._state.emit(fid, path, sig)
        self.emitted += 1
        event = file_event(
            self.config, self.ctx.name, self.bucket, self._roots[fid[0]], fid[1], sig
        )
        return SettleDelivery(event, partial(self._ack, e), partial(self._nack, e), key=e)

    def _from_backlog(self) -> None:
        """Turn rescan findings into deliveries, a batch at a time: one whose file was
        emitted meanwhile (by a close-after-write) is skipped."""
        while self._backlog and len(self._ready) < _BATCH:
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
                if self._state.view(fid) == sig:
                    continue
                age_ns = wall_ns - sig[0]
                if age_ns < settle_ns:
                    self._wait(fid, root.prefix + key, now + (settle_ns - age_ns) / 1e9)
                else:
                    self._pending.pop(fid, None)
                    self._backlog.append((fid, root.prefix + key, sig))
            for key in self._state.present_keys(ri):
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
        return scan(self._roots, self._rules, self._warn)

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

    async def _ack(self, e: Emit) -> None:
        """Checkpoint the file's state (its shard, group-committed with concurrent acks)."""
        staged = self._state.settle(e, acked=True)
        if staged is not None:
            await staged.flush()

    async def _nack(self, e: Emit, error: BaseException | None) -> None:
        """Re-check the file after ``settle``: emitted again if it still differs."""
        try:
            self._state.settle(e, acked=False)
            if not self._closed and e.fid not in self._pending:
                self._wait(e.fid, e.path, asyncio.get_running_loop().time() + self._settle)
        except Exception as exc:  # nack must not raise
            self.ctx.logger.debug("nack of %s failed: %s", e.path, exc)

    # --- state -------------------------------------------------------------------------------

    async def _load_state(self) -> None:
        dropped, unreadable = await self._state.load()
        for shard in unreadable:
            self.ctx.logger.warning("trigger %s: unreadable state %s ignored", self.ctx.name, shard)
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
        self._warn(path, OUTSIDE_WHY)

    # --- optional capabilities ---------------------------------------------------------------

    def sample_event(self, now: datetime) -> Event:
        return sample_event(self.config, self.ctx.name, self.bucket, self._roots[0], now)

    def status(self) -> Mapping[str, Any]:
        feed = self._feed
        waiting = len(self._pending) + len(self._backlog) + len(self._ready)
        return {
            "directories": [str(r.path) for r in self._roots],
            "watcher": "polling" if self.config.poll_interval else "inotify",
            "tracked_files": self._state.tracked,
            "pending": len(self._pending),
            "lag": waiting + (len(feed) if feed is not None else 0),
            "emitted": self.emitted,
            "rescans": self.rescans,
            "overflows": self.overflows,
        }
