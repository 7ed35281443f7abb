"""The pytest plugin of :mod:`bridge.testing`: load it from a top-level conftest.py with
``pytest_plugins = ["bridge.testing.pytest_plugin"]``.

It deselects the :class:`~bridge.testing.SourceContract` checks that need a capability the
source lacks (``can_publish = False`` for a timer...), so a run reports only checks that ran —
nothing is "skipped"."""

from __future__ import annotations

from typing import Any

from bridge.testing._contract import deselect_inapplicable


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    deselect_inapplicable(config, items)
