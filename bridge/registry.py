"""Plugin discovery through entry points, loaded lazily: only what the config names.

Built-in plugins register through the same groups as third-party ones
(``bridge.sources``, ``bridge.targets``, ``bridge.deadletters``), so a plugin
installed with pip is found exactly like ``timer`` or ``python``.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
from typing import TYPE_CHECKING, Any

from bridge.errors import PluginError

if TYPE_CHECKING:
    from bridge.abc import DeadLetterSink, Source, Target

SOURCES = "bridge.sources"
TARGETS = "bridge.targets"
DEADLETTERS = "bridge.deadletters"

_KIND = {SOURCES: "trigger type", TARGETS: "runtime", DEADLETTERS: "dead-letter sink"}


@functools.cache
def entry_points(group: str) -> dict[str, md.EntryPoint]:
    """Installed plugins of a group by name (the first registration of a name wins)."""
    out: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=group):
        out.setdefault(ep.name, ep)
    return out


def names(group: str) -> list[str]:
    return sorted(entry_points(group))


@functools.cache
def load(group: str, name: str) -> Any:
    """The plugin class registered as ``name``; PluginError names what is installed."""
    eps = entry_points(group)
    ep = eps.get(name)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        raise PluginError(f'unknown {_KIND[group]} "{name}" (installed: {installed})')
    try:
        return ep.load()
    except Exception as e:
        dist = ep.dist.name if ep.dist else "?"
        raise PluginError(
            f'{_KIND[group]} plugin "{name}" ({ep.value}, from {dist}) failed to load: '
            f"{type(e).__name__}: {e}"
        ) from e


def source(name: str) -> type[Source[Any]]:
    return load(SOURCES, name)  # type: ignore[no-any-return]


def target(name: str) -> type[Target[Any]]:
    return load(TARGETS, name)  # type: ignore[no-any-return]


def deadletter(name: str) -> type[DeadLetterSink]:
    return load(DEADLETTERS, name)  # type: ignore[no-any-return]


def version_of(ep: md.EntryPoint) -> str:
    return ep.dist.version if ep.dist else "?"
