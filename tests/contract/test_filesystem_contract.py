"""sources.filesystem against the source contract suite: a temporary directory is the
upstream, and publishing a payload writes a file of that name."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.testing import SourceContract
from sources.filesystem import FilesystemSource


class TestFilesystemContract(SourceContract):
    source_class = FilesystemSource
    entry_point = "filesystem"
    sample_config = {"settle": "50ms"}
    has_positions = False  # a checkpoint per file, written in ack()

    async def setup_upstream(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="contract-fs-"))

    async def teardown_upstream(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def config_data(self) -> dict[str, Any]:
        return {**super().config_data(), "path": str(self.root)}

    async def publish(self, payloads: Sequence[str]) -> None:
        for p in payloads:
            (self.root / p).write_text(p)  # one write and close: IN_CLOSE_WRITE
