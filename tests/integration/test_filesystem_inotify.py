"""sources.filesystem.inotify against the real kernel: what each change of a watched tree
becomes (files written, moved in and out, new and moved directories, an overflowing
queue, a root that goes), and back-pressure."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.plugin import Closed
from bridge.testing import until
from sources.filesystem import FilesystemConfig
from sources.filesystem.config import Rules
from sources.filesystem.inotify import InotifyWatcher
from sources.filesystem.paths import Root, check_root
from sources.filesystem.watcher import Obs

Seen = list[tuple[str, str]]  # (kind, key)


class Watch:
    """An attached watcher on one root and everything it observed so far."""

    def __init__(self, root: Path, maxsize: int = 10_000, **fields: Any) -> None:
        cfg = FilesystemConfig.model_validate(
            {"type": "filesystem", "function": "f", "path": str(root), **fields}
        )
        r = Root(0, root, "sid")
        r.real = check_root(root)
        r.prefix = r.real + "/"
        self.warnings: list[str] = []
        self.watcher = InotifyWatcher(
            [r],
            Rules(cfg),
            warn=lambda path, why: self.warnings.append(why),
            maxsize=maxsize,
        )
        self.obs: list[Obs] = []

    def seen(self) -> Seen:
        return [(o[0], o[2]) for o in self.obs]

    async def until(self, pred: Callable[[Seen], bool], timeout: float = 5.0) -> Seen:
        async def loop() -> None:
            while not pred(self.seen()):
                self.obs.append(await self.watcher.get())

        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            pytest.fail(f"not observed; got {self.seen()}")
        return self.seen()


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Watch] = []

    async def make(root: Path, **kw: Any) -> Watch:
        w = Watch(root, **kw)
        await asyncio.get_running_loop().run_in_executor(None, w.watcher.start)
        w.watcher.attach()
        made.append(w)
        return w

    yield make
    for w in made:
        w.watcher.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


async def test_a_written_file_is_one_observation_with_its_version(watch: Any, root: Path) -> None:
    w = await watch(root)
    (root / "a.txt").write_text("abc")
    await w.until(lambda s: ("written", "a.txt") in s)
    st = (root / "a.txt").stat()
    written = [o for o in w.obs if o[0] == "written"]
    assert written == [
        ("written", 0, "a.txt", f"{w.watcher.roots[0].real}/a.txt", (st.st_mtime_ns, 3))
    ]
    # create and open, read in the same chunk as the close, are moot and dropped; one
    # read later is at most one create and one open ahead
    assert len(w.obs) <= 3


async def test_moves_in_and_out_and_deletes(watch: Any, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "in.txt").write_text("in")
    w = await watch(root)
    os.rename(outside / "in.txt", root / "in.txt")  # complete: written, probed
    await w.until(lambda s: ("written", "in.txt") in s)
    assert w.obs[-1][4] is not None
    os.rename(root / "in.txt", root / "renamed.txt")
    await w.until(lambda s: ("written", "renamed.txt") in s)
    assert ("deleted", "in.txt") in w.seen()
    os.rename(root / "renamed.txt", outside / "out.txt")
    await w.until(lambda s: ("deleted", "renamed.txt") in s)
    os.link(outside / "out.txt", root / "linked.txt")  # no open, no close: must settle
    await w.until(lambda s: ("created", "linked.txt") in s)
    os.unlink(root / "linked.txt")
    await w.until(lambda s: ("deleted", "linked.txt") in s)


async def test_a_new_subdirectory_is_watched_and_its_first_files_observed(
    watch: Any, root: Path
) -> None:
    w = await watch(root, patterns=["*.dat"])
    # Given a tree made and filled at once (files may land before its watch is in place)
    (root / "a" / "b").mkdir(parents=True)
    for name in ("a/1.dat", "a/b/2.dat", "a/b/skip.txt"):
        (root / name).write_text(name)

    # Then each wanted file is observed, as written or (found by the listing) created
    def both(s: Seen) -> bool:
        return all(any(k == key for _, k in s) for key in ("a/1.dat", "a/b/2.dat"))

    await w.until(both)
    assert {k for _, k in w.seen()} == {"a/1.dat", "a/b/2.dat"}
    assert {"a/", "a/b/"} <= {p for _, p in w.watcher.watched()}
    # And files written later have their own close-after-write
    (root / "a" / "b" / "3.dat").write_text("3")
    await w.until(lambda s: ("written", "a/b/3.dat") in s)


async def test_a_tree_moved_in_is_listed_and_watched(
    watch: Any, root: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "x").write_text("x")
    (tree / "sub" / "y").write_text("y")
    w = await watch(root)
    os.rename(tree, root / "tree")
    # files that were never seen being written settle: created
    await w.until(lambda s: {("created", "tree/x"), ("created", "tree/sub/y")} <= set(s))
    (root / "tree" / "sub" / "z").write_text("z")
    await w.until(lambda s: ("written", "tree/sub/z") in s)


async def test_a_tree_moved_out_is_gone_and_no_longer_watched(
    watch: Any, root: Path, tmp_path: Path
) -> None:
    (root / "d" / "e").mkdir(parents=True)
    w = await watch(root)
    assert {"d/", "d/e/"} <= {p for _, p in w.watcher.watched()}
    os.rename(root / "d", tmp_path / "d-out")
    await w.until(lambda s: ("dir_gone", "d/") in s)
    assert not {"d/", "d/e/"} & {p for _, p in w.watcher.watched()}
    # a write in the moved tree is not under the root any more: nothing
    (tmp_path / "d-out" / "e" / "late").write_text("late")
    (root / "marker").write_text("m")
    await w.until(lambda s: ("written", "marker") in s)
    assert not [k for _, k in w.seen() if "late" in k]


async def test_a_tree_moved_within_is_gone_under_its_old_name_and_listed_under_the_new(
    watch: Any, root: Path
) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("f")
    w = await watch(root)
    os.rename(root / "a", root / "moved")
    await w.until(lambda s: {("dir_gone", "a/"), ("created", "moved/b/f")} <= set(s))
    (root / "moved" / "b" / "g").write_text("g")
    await w.until(lambda s: ("written", "moved/b/g") in s)
    assert sorted(p for _, p in w.watcher.watched()) == ["", "moved/", "moved/b/"]
    shutil.rmtree(root / "moved")
    await w.until(lambda s: ("deleted", "moved/b/g") in s)
    await until(lambda: [p for _, p in w.watcher.watched()] == [""], what="watches dropped")


async def test_not_recursive_watches_only_the_root(watch: Any, root: Path) -> None:
    w = await watch(root, recursive=False)
    (root / "sub").mkdir()
    (root / "sub" / "deep").write_text("no")
    (root / "top").write_text("yes")
    await w.until(lambda s: ("written", "top") in s)
    assert [p for _, p in w.watcher.watched()] == [""]
    assert not [k for _, k in w.seen() if k.startswith("sub")]


async def test_an_overflow_is_reported_and_directories_made_meanwhile_are_watched(
    watch: Any, root: Path
) -> None:
    (root / "leaving").mkdir()
    w = await watch(root)
    # Given a kernel queue filled while the loop does not read it
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    for i in range(limit // 3 + 100):  # create, open, close: three events per file
        (root / f"f{i}").write_text("x")
    (root / "late").mkdir()  # its IN_CREATE is among the events lost
    os.rename(root / "leaving", root.parent / "left")  # and this IN_MOVED_FROM
    # Then the source is told, once
    await w.until(lambda s: ("overflow", "") in s, timeout=30)
    assert w.watcher.overflows == 1
    assert sorted(p for _, p in w.watcher.watched()) == ["", "late/"]
    # And the directory made during the overflow is watched all the same
    (root / "late" / "f").write_text("f")
    await w.until(lambda s: ("written", "late/f") in s, timeout=30)


async def test_a_root_deleted_or_moved_is_reported(watch: Any, root: Path, tmp_path: Path) -> None:
    w = await watch(root)
    os.rename(root, tmp_path / "elsewhere")
    await w.until(lambda s: ("root_gone", "") in s)
    other = tmp_path / "other"
    other.mkdir()
    w2 = await watch(other)
    other.rmdir()
    await w2.until(lambda s: ("root_gone", "") in s)


async def test_a_full_watcher_stops_reading_until_the_source_takes(watch: Any, root: Path) -> None:
    w = await watch(root, maxsize=10)
    for i in range(30):
        (root / f"f{i}").write_text("x")
    # Given a watcher holding as many observations as it may: it stops reading the fd
    await until(lambda: len(w.watcher) >= 10, what="a full watcher")
    assert not w.watcher.reading
    # When the source takes them, it reads again, and nothing was lost meanwhile
    got = w.watcher.take(len(w.watcher))
    assert w.watcher.reading
    while len([o for o in got if o[0] == "written"]) < 30:
        got.append(await asyncio.wait_for(w.watcher.get(), 5))
    assert sorted(o[2] for o in got if o[0] == "written") == sorted(f"f{i}" for i in range(30))


async def test_close_wakes_a_waiting_get(watch: Any, root: Path) -> None:
    w = await watch(root)
    task = asyncio.ensure_future(w.watcher.get())
    await asyncio.sleep(0)
    w.watcher.close()
    with pytest.raises(Closed):
        await asyncio.wait_for(task, 5)
    w.watcher.close()  # idempotent


async def test_an_overflow_read_as_the_watcher_filled_up_is_reported_after_the_burst(
    watch: Any, root: Path
) -> None:
    w = await watch(root, maxsize=10)
    for i in range(30):
        (root / f"f{i}").write_text("x")
    await until(lambda: len(w.watcher) >= 10, what="a full watcher")
    assert not w.watcher.reading
    # Given an IN_Q_OVERFLOW among the last events the full watcher read, and the burst over:
    # nothing is left in the kernel's queue (read out here) and nothing more comes
    while True:
        try:
            os.read(w.watcher._fd, 65536)
        except BlockingIOError:
            break
    w.watcher._lossy = True
    # When the source takes what it holds, the watcher reads again: the overflow is told
    # (the source rescans) without waiting for an event that will not come
    w.obs.extend(w.watcher.take(len(w.watcher)))
    await w.until(lambda s: ("overflow", "") in s, timeout=5)
