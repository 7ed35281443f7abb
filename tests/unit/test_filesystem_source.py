"""sources.filesystem: a real directory and inotify, an in-memory state store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

import sources.filesystem as fs
import sources.filesystem.inotify as fs_inotify
import sources.filesystem.paths as fs_paths
import sources.filesystem.source as fs_source
import sources.filesystem.watcher as fs_watcher
from bridge.abc import Delivery, EndOfInput, NotConnected, SourceContext
from bridge.events import render
from bridge.testing import MemoryStore, until
from sources.filesystem import FilesystemConfig, FilesystemSource, probe, safe_key

CREATED, REMOVED = fs.CREATED, fs.REMOVED


def config(**fields: Any) -> FilesystemConfig:
    return FilesystemConfig.model_validate({"type": "filesystem", "function": "f", **fields})


def make(root: Path, store: MemoryStore | None = None, **fields: Any) -> FilesystemSource:
    fields.setdefault("path", str(root))
    ctx = SourceContext(
        name="photos",
        function="f",
        store=store if store is not None else MemoryStore(),
        timezone=ZoneInfo("UTC"),
        logger=logging.getLogger("test.fs"),
    )
    return FilesystemSource(config(**fields), ctx)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def what(d: Delivery) -> tuple[str, str]:
    rec = d.event.records[0]
    return rec["event_name"], rec["key"]


async def take(src: FilesystemSource, n: int = 1, timeout: float = 10.0) -> list[Delivery]:
    """The next ``n`` deliveries, acked."""
    out = []
    for _ in range(n):
        d = await asyncio.wait_for(src.read(), timeout)
        await d.ack()
        out.append(d)
    return out


async def quiet(src: FilesystemSource, seconds: float) -> None:
    """Assert that read() returns nothing for ``seconds`` (read() is cancellation-safe)."""
    task = asyncio.ensure_future(src.read())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        pytest.fail(f"unexpected delivery: {what(task.result())}")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class Background:
    """Reads (and acks) in a task, so the source keeps watching while a test acts."""

    def __init__(self, src: FilesystemSource) -> None:
        self.src = src
        self.got: list[Delivery] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            d = await self.src.read()
            await d.ack()
            self.got.append(d)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


# --- config and helpers ---------------------------------------------------------------------


def test_config_defaults_and_docs() -> None:
    c = config(path="/data/in")
    assert c.path == [Path("/data/in")]
    assert (c.recursive, c.patterns, c.scan_on_start, c.settle) == (True, ["*"], True, 1.0)
    assert (c.rescan_interval, c.poll_interval, c.bucket) == (300.0, None, None)
    for name, field in FilesystemConfig.model_fields.items():
        assert field.description, name


def test_overlapping_or_bad_paths_are_rejected() -> None:
    assert config(path=["/a", "/b"]).path == [Path("/a"), Path("/b")]
    with pytest.raises(ValidationError, match="overlap"):
        config(path=["/data", "/data/in"])
    with pytest.raises(ValidationError, match="invalid pattern"):
        config(path="/a", patterns=["/etc/*"])
    with pytest.raises(ValidationError):
        config(path=[])


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("a.txt", True),
        ("dir/sub/a.txt", True),
        ("..a/b..", True),
        ("a/../../etc/x", False),
        ("../x", False),
        ("/etc/passwd", False),
        ("a//b", False),
        ("a/./b", False),
        ("a/", False),
        ("", False),
        ("a\0b", False),
    ],
)
def test_safe_key(key: str, ok: bool) -> None:
    assert safe_key(key) is ok


def test_probe_resolves_symlinks_and_checks_containment(root: Path, tmp_path: Path) -> None:
    (root / "a.txt").write_text("hello")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (root / "in-link").symlink_to(root / "a.txt")
    (root / "out-link").symlink_to(outside)
    (root / "dir").mkdir()
    real = os.path.realpath(root)
    sig = probe(real, str(root / "a.txt"))
    assert isinstance(sig, tuple) and sig[1] == 5
    assert probe(real, str(root / "in-link")) == sig
    assert probe(real, str(root / "out-link")) is fs_paths.OUTSIDE
    assert probe(real, str(root / "a" / ".." / ".." / "secret.txt")) is fs_paths.OUTSIDE
    assert probe(real, str(root / "dir")) is None
    assert probe(real, str(root / "missing")) is None


# --- events ---------------------------------------------------------------------------------


async def test_a_written_file_is_one_event_at_close(root: Path) -> None:
    # settle is a minute: only the close-after-write can make this quick
    src = make(root, settle="60s", bucket="photos-1250000000", appid="1250000000")
    await src.connect()
    try:
        (root / "a b.jpg").write_bytes(b"x" * 42)
        [d] = await take(src, timeout=5)
        assert what(d) == (CREATED, "a b.jpg")
        rec = render(d.event)["Records"][0]
        obj = rec["cos"]["cosObject"]
        st = (root / "a b.jpg").stat()
        assert obj["key"] == "/1250000000/photos-1250000000/a b.jpg"
        assert obj["size"] == 42
        assert obj["url"] == (root / "a b.jpg").as_uri()
        assert obj["meta"]["ETag"] == f"{st.st_mtime_ns:x}-{42:x}"
        assert rec["cos"]["cosBucket"] == {
            "region": "local",
            "name": "photos-1250000000",
            "appid": "1250000000",
        }
        assert rec["event"]["eventName"] == CREATED
        assert rec["event"]["eventTime"] == int(st.st_mtime)
        await quiet(src, 0.3)
    finally:
        await src.close()


async def test_a_slowly_written_file_is_one_event_after_its_last_chunk(root: Path) -> None:
    # settle is short: were it used while the writer has the file open, it would fire early
    src = make(root, settle="100ms")
    await src.connect()
    bg = Background(src)
    try:
        with open(root / "big.bin", "wb") as f:  # noqa: ASYNC230 - the test is the writer
            await until(lambda: (p := src._pending.get((0, "big.bin"))) is not None and p.opens)
            for _ in range(4):
                f.write(b"x" * 1000)
                f.flush()
                await asyncio.sleep(0.3)  # the writer pauses longer than settle
                assert bg.got == []
        await until(lambda: bg.got, timeout=5)
        await bg.stop()
        await quiet(src, 0.5)
        assert [what(d) for d in bg.got] == [(CREATED, "big.bin")]
        assert bg.got[0].event.records[0]["size"] == 4000
    finally:
        await src.close()


async def test_a_file_never_opened_for_writing_is_emitted_after_settle(root: Path) -> None:
    (root / "orig").write_text("data")
    src = make(root, settle="300ms", patterns=["*.txt"])
    await src.connect()
    try:
        await quiet(src, 0.1)  # the start-up scan is done
        os.link(root / "orig", root / "linked.txt")  # IN_CREATE, no open, no close
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        [d] = await take(src, timeout=5)
        assert what(d) == (CREATED, "linked.txt")
        assert loop.time() - t0 >= 0.25
    finally:
        await src.close()


async def test_moves_are_a_removal_and_a_creation_and_deletes_a_removal(
    root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "in.txt").write_text("moved in")
    (root / "sub").mkdir()  # (a directory made now may not be watched yet when used)
    src = make(root, settle="60s")
    await src.connect()
    try:
        (root / "a.txt").write_text("a")
        assert [what(d) for d in await take(src)] == [(CREATED, "a.txt")]
        os.rename(root / "a.txt", root / "sub" / "b.txt")
        assert sorted(what(d) for d in await take(src, 2)) == [
            (CREATED, "sub/b.txt"),
            (REMOVED, "a.txt"),
        ]
        # a rename into place is complete: no settle delay
        os.rename(outside / "in.txt", root / "in.txt")
        assert [what(d) for d in await take(src)] == [(CREATED, "in.txt")]
        os.rename(root / "in.txt", outside / "back.txt")
        assert [what(d) for d in await take(src)] == [(REMOVED, "in.txt")]
        os.unlink(root / "sub" / "b.txt")
        assert [what(d) for d in await take(src)] == [(REMOVED, "sub/b.txt")]
        # a file deleted before it was complete was never an object: no event at all
        with open(root / "tmp", "w") as f:  # noqa: ASYNC230
            f.write("partial")
            os.unlink(root / "tmp")
        await quiet(src, 0.3)
    finally:
        await src.close()


async def test_a_directory_moved_out_removes_its_files(root: Path, tmp_path: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "x").write_text("x")
    (root / "d" / "y").write_text("y")
    src = make(root, settle="50ms")  # (a scan waits for files to settle)
    await src.connect()
    try:
        got = await take(src, 2)
        assert sorted(what(d) for d in got) == [(CREATED, "d/x"), (CREATED, "d/y")]
        os.rename(root / "d", tmp_path / "d-out")
        got = await take(src, 2)
        assert sorted(what(d) for d in got) == [(REMOVED, "d/x"), (REMOVED, "d/y")]
    finally:
        await src.close()


async def test_a_tree_moved_within_or_removed_reports_each_file(root: Path) -> None:
    import shutil

    (root / "a" / "b").mkdir(parents=True)
    for name in ("a/x", "a/b/y"):
        (root / name).write_text(name)
    src = make(root, settle="50ms")
    await src.connect()
    try:
        assert sorted(what(d) for d in await take(src, 2)) == [(CREATED, "a/b/y"), (CREATED, "a/x")]
        os.rename(root / "a", root / "moved")
        got = sorted(what(d) for d in await take(src, 4))
        assert got == [
            (CREATED, "moved/b/y"),
            (CREATED, "moved/x"),
            (REMOVED, "a/b/y"),
            (REMOVED, "a/x"),
        ]
        shutil.rmtree(root / "moved")
        got = sorted(what(d) for d in await take(src, 2))
        assert got == [(REMOVED, "moved/b/y"), (REMOVED, "moved/x")]
        await quiet(src, 0.3)
    finally:
        await src.close()


async def test_patterns_ignore_patterns_and_recursion(root: Path) -> None:
    (root / "sub").mkdir()
    src = make(
        root,
        settle="60s",
        recursive=False,
        patterns=["*.jpg", "raw/*.png"],
        ignore_patterns=[".*"],
    )
    await src.connect()
    try:
        (root / "a.txt").write_text("no")
        (root / ".hidden.jpg").write_text("no")
        (root / "sub" / "deep.jpg").write_text("no: not recursive")
        (root / "yes.jpg").write_text("yes")
        assert [what(d) for d in await take(src)] == [(CREATED, "yes.jpg")]
        await quiet(src, 0.3)
    finally:
        await src.close()
    (root / "raw").mkdir()
    src = make(root, settle="60s", patterns=["raw/*.png"], scan_on_start=False)
    await src.connect()
    try:
        (root / "top.png").write_text("no")
        (root / "raw" / "p.png").write_text("yes")
        assert [what(d) for d in await take(src)] == [(CREATED, "raw/p.png")]
    finally:
        await src.close()


async def test_undecodable_file_names_are_skipped(root: Path, caplog: Any) -> None:
    src = make(root, settle="60s")
    await src.connect()
    try:
        with open(os.path.join(os.fsencode(root), b"bad-\xff.txt"), "wb") as f:  # noqa: ASYNC230
            f.write(b"x")
        (root / "good.txt").write_text("y")
        assert [what(d) for d in await take(src)] == [(CREATED, "good.txt")]
        assert "not valid UTF-8" in caplog.text
    finally:
        await src.close()


# --- checkpoints, restarts and scans --------------------------------------------------------


async def test_state_is_written_only_in_ack_and_a_restart_resumes(root: Path) -> None:
    store = MemoryStore()
    (root / "old.txt").write_text("old")
    (root / "same.txt").write_text("same")
    src = make(root, store, settle="100ms")
    await src.connect()
    try:
        # Given the start-up scan found both files
        first = [await asyncio.wait_for(src.read(), 5) for _ in range(2)]
        assert sorted(what(d) for d in first) == [(CREATED, "old.txt"), (CREATED, "same.txt")]
        # Then nothing is stored before the acks
        assert store.kv == {}
        for d in first:
            await d.ack()
        assert sum(len(json.loads(v)["files"]) for v in store.kv.values()) == 2
    finally:
        await src.close()
    # When, while the daemon is down, one file changes, one is deleted and one appears
    os.unlink(root / "old.txt")
    (root / "new.txt").write_text("new")
    st = (root / "same.txt").stat()
    os.utime(root / "same.txt", ns=(st.st_atime_ns, st.st_mtime_ns))  # unchanged
    src = make(root, store, settle="100ms")
    await src.connect()
    try:
        got = await take(src, 2)
        assert sorted(what(d) for d in got) == [(CREATED, "new.txt"), (REMOVED, "old.txt")]
        await quiet(src, 0.4)
    finally:
        await src.close()
    # And a third start has nothing to say
    src = make(root, store, settle="100ms")
    await src.connect()
    try:
        await quiet(src, 0.4)
        assert src.status()["tracked_files"] == 2
    finally:
        await src.close()


async def test_without_scan_on_start_existing_files_are_only_remembered(root: Path) -> None:
    (root / "there.txt").write_text("1")
    (root / "gone.txt").write_text("2")
    store = MemoryStore()
    src = make(root, store, settle="60s", scan_on_start=False)
    await src.connect()
    try:
        await quiet(src, 0.3)
        os.unlink(root / "gone.txt")  # it existed: its removal is an event
        (root / "there.txt").write_text("changed")
        got = await take(src, 2)
        assert sorted(what(d) for d in got) == [(CREATED, "there.txt"), (REMOVED, "gone.txt")]
    finally:
        await src.close()


async def test_keys_from_the_state_store_are_data_never_paths(
    root: Path, tmp_path: Path, monkeypatch: Any, caplog: Any
) -> None:
    # Given a state store holding keys that would lead out of the root
    victim = tmp_path / "etc" / "x"
    victim.parent.mkdir()
    victim.write_text("do not touch")
    (root / "a").mkdir()
    store = MemoryStore()
    src = make(root, store)
    bad = ["a/../../etc/x", "/etc/passwd", "../etc/x", "a//b", "."]
    doc = {"v": 1, "files": {k: [1, 1] for k in [*bad, "a/fine.txt"]}}
    for key in [*bad, "a/fine.txt"]:
        await store.put(src.namespace, src._state.shard_name((0, key)), json.dumps(doc))
    probed: list[str] = []
    real_probe = fs.probe

    def spy(root_real: str, path: str) -> Any:
        probed.append(path)
        return real_probe(root_real, path)

    monkeypatch.setattr(fs_source, "probe", spy)
    monkeypatch.setattr(fs_watcher, "probe", spy)
    monkeypatch.setattr(fs_inotify, "probe", spy)
    await src.connect()
    try:
        # Then only the plain key is kept, and its removal (the file is not there) reported
        assert [what(d) for d in await take(src)] == [(REMOVED, "a/fine.txt")]
        await quiet(src, 0.3)
        assert "not plain relative paths" in caplog.text
        real_root = os.path.realpath(root)
        assert probed and all(p.startswith(real_root + "/") for p in probed)
        assert all(".." not in p.split("/") for p in probed)
        assert victim.read_text() == "do not touch"
    finally:
        await src.close()


async def test_symlinks_out_of_the_root_are_never_emitted(
    root: Path, tmp_path: Path, caplog: Any
) -> None:
    (tmp_path / "secret").write_text("secret")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f").write_text("f")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "escape-dir").symlink_to(tmp_path / "elsewhere")
    (root / "inside").write_text("ok")
    (root / "alias").symlink_to(root / "inside")
    src = make(root, settle="100ms")
    await src.connect()
    try:
        got = await take(src, 2)
        assert sorted(what(d) for d in got) == [(CREATED, "alias"), (CREATED, "inside")]
        (root / "later-escape").symlink_to(tmp_path / "secret")
        await quiet(src, 0.5)
        assert "escape" in caplog.text and "later-escape" in caplog.text
    finally:
        await src.close()


async def test_an_inotify_overflow_triggers_a_rescan(root: Path) -> None:
    src = make(root, settle="50ms", rescan_interval="0s")
    await src.connect()
    try:
        await quiet(src, 0.1)  # the start-up scan is done
        # Given more events than the kernel queues (fs.inotify.max_queued_events) while the
        # loop cannot read them: the queue overflows and events are lost
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        n = limit // 3 + 1000  # create, open, close-after-write: three events per file
        for i in range(n):
            (root / f"f{i}").write_text(str(i))
        # Then a rescan finds every file, and each is emitted once
        got = await take(src, n, timeout=60)
        assert sorted(what(d)[1] for d in got) == sorted(f"f{i}" for i in range(n))
        assert src.status()["overflows"] == 1
        await quiet(src, 0.3)
    finally:
        await src.close()


def _lose_events(monkeypatch: Any) -> None:
    """inotify events of files never reach the source (as if the kernel dropped them)."""
    monkeypatch.setattr(fs_inotify.InotifyWatcher, "_file", lambda self, *a: None)


async def test_periodic_rescans_reconcile_too(root: Path, monkeypatch: Any) -> None:
    src = make(root, settle="50ms", rescan_interval="300ms")
    await src.connect()
    try:
        await quiet(src, 0.1)
        _lose_events(monkeypatch)
        (root / "missed").write_text("x")
        [d] = await take(src, timeout=5)
        assert what(d) == (CREATED, "missed")
    finally:
        await src.close()


# --- settling ----------------------------------------------------------------------------------


async def test_nack_checks_the_file_again(root: Path) -> None:
    src = make(root, settle="100ms")
    await src.connect()
    try:
        (root / "a").write_text("a")
        d = await asyncio.wait_for(src.read(), 5)
        await d.nack(RuntimeError("store down"))
        again = await asyncio.wait_for(src.read(), 5)
        assert what(again) == (CREATED, "a")
        await again.ack()
        await quiet(src, 0.3)
    finally:
        await src.close()


async def test_out_of_order_acks_keep_the_newest_state(root: Path) -> None:
    store = MemoryStore()
    src = make(root, store, settle="60s")
    await src.connect()
    try:
        (root / "a").write_text("a")
        created = await asyncio.wait_for(src.read(), 5)
        os.unlink(root / "a")
        removed = await asyncio.wait_for(src.read(), 5)
        assert (what(created), what(removed)) == ((CREATED, "a"), (REMOVED, "a"))
        # When the removal is acked before the creation
        await removed.ack()
        await created.ack()
        # Then the file is remembered as gone
        assert src._state.view((0, "a")) is None
        assert all("a" not in json.loads(v)["files"] for v in store.kv.values() if v)
    finally:
        await src.close()


class SlowStore(MemoryStore):
    """A store whose writes take a loop iteration, like a real one, and are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    async def put(self, namespace: str, key: str, value: str | None) -> None:
        await asyncio.sleep(0.001)
        self.puts += 1
        await super().put(namespace, key, value)


async def test_concurrent_acks_share_store_writes(root: Path) -> None:
    store = SlowStore()
    for i in range(300):
        (root / f"f{i}").write_text("x")
    src = make(root, store)
    await src.connect()
    try:
        got = [await asyncio.wait_for(src.read(), 5) for _ in range(300)]
        await asyncio.gather(*(d.ack() for d in got))
        assert store.puts < 300  # batched: one write per dirty shard per batch
        remembered = sum(len(json.loads(v)["files"]) for v in store.kv.values())
        assert remembered == 300
    finally:
        await src.close()


# --- lifecycle ---------------------------------------------------------------------------------


async def test_close_wakes_a_waiting_read_and_is_idempotent(root: Path) -> None:
    src = make(root)
    await src.close()  # without connect()
    src = make(root)
    await src.connect()
    task = asyncio.ensure_future(src.read())
    await asyncio.sleep(0.05)
    await src.close()
    with pytest.raises(EndOfInput):
        await asyncio.wait_for(task, 5)
    with pytest.raises(EndOfInput):
        await src.read()
    await src.close()


async def test_a_missing_root_fails_connect_clearly_and_a_lost_one_reconnects(
    tmp_path: Path,
) -> None:
    root = tmp_path / "later"
    src = make(root, settle="50ms")
    try:
        with pytest.raises(FileNotFoundError, match=f"directory {root} does not exist"):
            await src.connect()
        root.mkdir()
        await src.connect()
        (root / "a").write_text("a")
        assert [what(d) for d in await take(src)] == [(CREATED, "a")]
        os.unlink(root / "a")
        assert [what(d) for d in await take(src)] == [(REMOVED, "a")]
        root.rmdir()
        with pytest.raises(NotConnected, match="deleted or moved"):
            await asyncio.wait_for(src.read(), 5)
        with pytest.raises(FileNotFoundError):
            await src.connect()
        root.mkdir()
        (root / "b").write_text("b")  # arrived while it was gone: the reconnect rescans
        await src.connect()
        assert [what(d) for d in await take(src)] == [(CREATED, "b")]
    finally:
        await src.close()


def test_sample_event_and_status(root: Path) -> None:
    from datetime import UTC, datetime

    src = make(root)
    ev = render(src.sample_event(datetime(2026, 1, 2, tzinfo=UTC)))
    assert ev["Records"][0]["cos"]["cosObject"]["key"] == "/0/photos/example.txt"
    assert src.status()["directories"] == [str(root)]


async def test_close_during_a_scan_ends_read_cleanly(root: Path, monkeypatch: Any) -> None:
    import threading

    for i in range(20):
        (root / f"f{i}").write_text("x")
    store = MemoryStore()
    src = make(root, store, settle="0s")
    # a remembered file that is gone: after the scan, its removal is probed on the worker
    doc = json.dumps({"v": 1, "files": {"gone.txt": [1, 1]}})
    await store.put(src.namespace, src._state.shard_name((0, "gone.txt")), doc)
    await src.connect()
    entered, release = threading.Event(), threading.Event()
    real_scan = src._scan

    def slow_scan() -> Any:
        entered.set()
        release.wait(10)
        return real_scan()

    monkeypatch.setattr(src, "_scan", slow_scan)
    task = asyncio.ensure_future(src.read())
    await until(entered.is_set)
    closing = asyncio.ensure_future(src.close())
    await asyncio.sleep(0.05)
    release.set()
    await closing
    with pytest.raises(EndOfInput):
        await asyncio.wait_for(task, 5)


def test_a_close_after_write_makes_the_same_files_earlier_observations_moot() -> None:
    def o(kind: str, key: str) -> tuple[str, int, str, str, None]:
        return (kind, 0, key, "/r/" + key, None)

    obs = [
        o("created", "a"),
        o("opened", "a"),
        o("created", "b"),
        o("opened", "b"),
        o("written", "a"),
        o("deleted", "a"),
        o("created", "a"),  # made again after the close: still pending
        o("opened", "c"),
        o("closed", "c"),
    ]
    assert fs_inotify.coalesce(obs) == [
        o("created", "b"),
        o("opened", "b"),
        o("written", "a"),
        o("deleted", "a"),
        o("created", "a"),
        o("opened", "c"),
        o("closed", "c"),
    ]


async def test_poll_interval_uses_watchdogs_polling_observer(root: Path) -> None:
    src = make(root, settle="50ms", poll_interval="100ms")
    await src.connect()
    try:
        assert src.status()["watcher"] == "polling"
        await quiet(src, 0.2)  # the start-up scan is done
        (root / "a.txt").write_text("a")
        assert [what(d) for d in await take(src)] == [(CREATED, "a.txt")]
        os.rename(root / "a.txt", root / "b.txt")
        assert sorted(what(d) for d in await take(src, 2)) == [
            (CREATED, "b.txt"),
            (REMOVED, "a.txt"),
        ]
        os.unlink(root / "b.txt")
        assert [what(d) for d in await take(src)] == [(REMOVED, "b.txt")]
    finally:
        await src.close()
