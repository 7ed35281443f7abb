"""Plugin discovery through entry points, loaded lazily: only what the config names.

Built-in plugins register through the same groups as third-party ones
(``bridge.sources``, ``bridge.targets``, ``bridge.deadletters``), so a plugin
installed with pip is found exactly like ``timer`` or ``python``::

    # a plugin's pyproject.toml
    [project.entry-points."bridge.sources"]
    redis_streams = "event_bridge_redis_streams:RedisStreamsSource"

- :func:`names` lists what is installed without importing anything.
- :func:`load` (and :func:`source`, :func:`target`, :func:`deadletter`) imports
  one plugin, the first time it is asked for. An unknown name raises
  :class:`UnknownPlugin`, which lists what is installed; a plugin that is
  installed but fails to import raises :class:`BrokenPlugin`, naming the plugin,
  its distribution and the error. Both are :class:`~bridge.errors.PluginError`,
  so callers that do not care which can catch that. The difference matters to
  the core: an unknown type is a configuration error, a broken plugin is an
  installation problem that should take down only the triggers that use it.
- :func:`describe` and :func:`inventory` give what ``event-bridge plugins``
  shows: version, distribution, config fields with their docs, and the load
  error of a broken plugin (every plugin is imported for that, on purpose).

Discovery is cached for the life of the process; :func:`refresh` forgets it
(tests that install a plugin while running).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata as md
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from bridge.errors import PluginError

if TYPE_CHECKING:
    from bridge.abc import DeadLetterSink, Source, Target

SOURCES = "bridge.sources"
TARGETS = "bridge.targets"
DEADLETTERS = "bridge.deadletters"
GROUPS = (SOURCES, TARGETS, DEADLETTERS)
#: the distribution whose registrations win a name clash
BUILTIN_DISTRIBUTION = "event-bridge"

_KIND = {SOURCES: "trigger type", TARGETS: "runtime", DEADLETTERS: "dead-letter sink"}


class UnknownPlugin(PluginError):
    """No plugin of that name is installed."""

    def __init__(self, group: str, name: str, installed: Iterable[str]) -> None:
        self.group, self.name = group, name
        self.installed = sorted(installed)
        listed = ", ".join(self.installed) or "none"
        super().__init__(f'unknown {_KIND[group]} "{name}" (installed: {listed})')


class BrokenPlugin(PluginError):
    """The plugin is installed but fails to import (or is not a class of the right kind)."""

    def __init__(self, group: str, name: str, ep: md.EntryPoint, error: BaseException) -> None:
        self.group, self.name = group, name
        self.object = ep.value
        self.distribution = _dist_name(ep)
        self.error = f"{type(error).__name__}: {error}"
        super().__init__(
            f'{_KIND[group]} plugin "{name}" ({ep.value}, from {self.distribution}) failed to '
            f"load: {self.error}"
        )


def _dist_name(ep: md.EntryPoint) -> str:
    return ep.dist.name if ep.dist else "?"


def _builtin(ep: md.EntryPoint) -> bool:
    return _dist_name(ep).lower().replace("_", "-") == BUILTIN_DISTRIBUTION


@functools.cache
def _scan(group: str) -> tuple[dict[str, md.EntryPoint], dict[str, tuple[md.EntryPoint, ...]]]:
    first: dict[str, md.EntryPoint] = {}
    dupes: dict[str, list[md.EntryPoint]] = {}
    # Built-ins first: a third-party plugin cannot silently replace "timer" or "local".
    # Among the others, the first found on sys.path wins; `plugins` shows who was shadowed.
    for ep in sorted(md.entry_points(group=group), key=lambda ep: not _builtin(ep)):
        if ep.name in first:
            if ep.value != first[ep.name].value or _dist_name(ep) != _dist_name(first[ep.name]):
                dupes.setdefault(ep.name, []).append(ep)
            continue
        first[ep.name] = ep
    return first, {k: tuple(v) for k, v in dupes.items()}


def entry_points(group: str) -> dict[str, md.EntryPoint]:
    """Installed plugins of a group by name. When two distributions register one name,
    event-bridge's own wins, else the first on sys.path (see :func:`shadowed`)."""
    return _scan(group)[0]


def shadowed(group: str, name: str) -> tuple[md.EntryPoint, ...]:
    """Other registrations of ``name`` that lost to the one :func:`entry_points` returns."""
    return _scan(group)[1].get(name, ())


def names(group: str) -> list[str]:
    """Installed plugin names of a group, sorted. Imports nothing."""
    return sorted(entry_points(group))


@functools.cache
def load(group: str, name: str) -> Any:
    """The plugin class registered as ``name``, imported on first use.

    Raises :class:`UnknownPlugin` (lists what is installed) or :class:`BrokenPlugin`
    (names the plugin, its distribution and the import error). Failures are not
    cached: a later call tries again.
    """
    eps = entry_points(group)
    ep = eps.get(name)
    if ep is None:
        raise UnknownPlugin(group, name, eps)
    try:
        obj = ep.load()
    except Exception as e:  # anything a plugin's import does wrong is the plugin's problem
        raise BrokenPlugin(group, name, ep, e) from e
    expected = _base(group)
    if not (isinstance(obj, type) and issubclass(obj, expected)):
        raise BrokenPlugin(
            group, name, ep, TypeError(f"{ep.value} is not a subclass of {expected.__qualname__}")
        )
    return obj


def _base(group: str) -> type:
    from bridge.abc import DeadLetterSink, Source, Target

    return {SOURCES: Source, TARGETS: Target, DEADLETTERS: DeadLetterSink}[group]


def source(name: str) -> type[Source[Any]]:
    return load(SOURCES, name)  # type: ignore[no-any-return]


def target(name: str) -> type[Target[Any]]:
    return load(TARGETS, name)  # type: ignore[no-any-return]


def deadletter(name: str) -> type[DeadLetterSink]:
    return load(DEADLETTERS, name)  # type: ignore[no-any-return]


def version_of(ep: md.EntryPoint) -> str:
    return ep.dist.version if ep.dist else "?"


def refresh() -> None:
    """Forget what was discovered and loaded (a plugin was installed or removed)."""
    _scan.cache_clear()
    load.cache_clear()


# --- describing plugins (event-bridge plugins) ------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldInfo:
    """One config key of a plugin, from its pydantic model."""

    name: str  # the key as written in TOML (the alias, if any)
    type: str
    required: bool
    default: Any  # JSON-compatible; None when required
    doc: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class PluginInfo:
    """What ``event-bridge plugins`` shows about one plugin."""

    group: str
    name: str
    object: str  # "module:Class"
    distribution: str
    version: str
    doc: str = ""  # first line of the class docstring
    fields: tuple[FieldInfo, ...] = ()
    error: str | None = None  # why it fails to load; None when it loads
    shadows: tuple[str, ...] = ()  # "module:Class (dist)" of registrations it hides

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-compatible (``plugins --json``); ``error`` only when there is one."""
        out = dataclasses.asdict(self)
        if out["error"] is None:
            del out["error"]
        out["fields"] = [dataclasses.asdict(f) for f in self.fields]
        out["shadows"] = list(self.shadows)
        return out


def describe(group: str, name: str) -> PluginInfo:
    """Import one plugin and describe it; a plugin that fails to load is described with its
    error instead of raising (:class:`UnknownPlugin` still raises)."""
    eps = entry_points(group)
    ep = eps.get(name)
    if ep is None:
        raise UnknownPlugin(group, name, eps)
    info = PluginInfo(
        group=group,
        name=name,
        object=ep.value,
        distribution=_dist_name(ep),
        version=version_of(ep),
        shadows=tuple(f"{e.value} ({_dist_name(e)})" for e in shadowed(group, name)),
    )
    try:
        cls = load(group, name)
    except BrokenPlugin as e:
        return dataclasses.replace(info, error=e.error)
    model = getattr(cls, "Config", None)
    doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
    fields = config_fields(model) if model is not None else ()
    return dataclasses.replace(info, doc=doc, fields=fields)


def inventory(groups: Iterable[str] = GROUPS) -> list[PluginInfo]:
    """Every installed plugin of ``groups``, broken ones included, by group then name."""
    return [describe(g, n) for g in groups for n in names(g)]


def broken(groups: Iterable[str] = GROUPS) -> dict[tuple[str, str], str]:
    """``{(group, name): error}`` of the installed plugins that fail to load."""
    return {(p.group, p.name): p.error for p in inventory(groups) if p.error is not None}


def config_fields(model: Any) -> tuple[FieldInfo, ...]:
    """The keys of a pydantic config model, in declaration order; defaults as a config file
    writes them (``"60s"``, ``"128MiB"``)."""
    from bridge.models import toml_value

    out = []
    for fname, f in model.model_fields.items():
        required = f.is_required()
        default = (
            None if required else _jsonable(toml_value(f, f.get_default(call_default_factory=True)))
        )
        out.append(
            FieldInfo(
                name=f.alias or fname,
                type=_type_name(f.annotation),
                required=required,
                default=default,
                doc=f.description or "",
            )
        )
    return tuple(out)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        if hasattr(v, "model_dump"):
            return v.model_dump(mode="json", by_alias=True)
        return str(v)
