"""What counts as a function's code for a reload and ``run --watch`` (bridge.watch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import config as cfg
from bridge import watch


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose state folder is inside its function's code folder, as an imported
    ``serverless.yml`` project has it (the code is the project folder)."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    (tmp_path / "index.py").write_text("def main_handler(event, context):\n    return 1\n")
    (tmp_path / "bridge.toml").write_text(
        '[daemon]\nstate_dir = "state"\n\n[functions.fn]\ncode = "."\nhandler = "index.main_handler"\n'
    )
    return tmp_path


def test_writes_to_the_state_folder_inside_a_code_folder_are_not_a_code_change(
    project: Path,
) -> None:
    config = cfg.load(project / "bridge.toml", env={})
    before = watch.digests(config)
    # What a running daemon writes there: the queue, the logs, a function's dependencies
    state = project / "state"
    (state / "deps" / "fn").mkdir(parents=True)
    (state / "bridge.db-wal").write_bytes(b"\0" * 64)
    (state / "logs.db").write_bytes(b"log")
    (state / "deps" / "fn" / "module.py").write_text("x = 1\n")
    assert watch.changed(before, watch.digests(config)) == set()
    # while the code beside it still counts, in any folder but the state one
    (project / "lib").mkdir()
    (project / "lib" / "helper.py").write_text("y = 2\n")
    assert watch.changed(before, watch.digests(config)) == {"fn"}


def test_a_folder_named_like_the_state_folder_elsewhere_is_code(project: Path) -> None:
    config = cfg.load(project / "bridge.toml", env={})
    before = watch.digests(config)
    (project / "lib" / "state").mkdir(parents=True)
    (project / "lib" / "state" / "machine.py").write_text("z = 3\n")
    assert watch.changed(before, watch.digests(config)) == {"fn"}


def test_a_code_folder_reached_through_a_link_still_leaves_the_state_folder_out(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    link = tmp_path_factory.mktemp("elsewhere") / "app"
    link.symlink_to(project, target_is_directory=True)
    config = cfg.load(link / "bridge.toml", env={})
    before = watch.digests(config)
    (project / "state").mkdir()
    (project / "state" / "bridge.db-wal").write_bytes(b"\0" * 64)
    assert watch.changed(before, watch.digests(config)) == set()
    (project / "index.py").write_text("def main_handler(event, context):\n    return 2\n")
    assert watch.changed(before, watch.digests(config)) == {"fn"}
