"""Configuration: TOML plus ``conf.d/*.toml`` drop-ins, interpolated and validated as a whole.

Loading goes in four steps, and every problem of every step is collected so
that one run of ``event-bridge validate`` names them all (with key paths such as
``triggers.nightly.cron``):

1. parse the main file and its drop-ins (``conf.d/*.toml`` beside it, merged in
   name order: tables merge key by key, any other value is replaced);
2. interpolate ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` in string
   values (``$$`` is a literal ``$``); an unset variable without default is an error;
3. validate ``[daemon]``, ``[api]`` and ``[gateway]`` with the core models, each
   ``[functions.NAME]`` with its runtime plugin's model and each
   ``[triggers.NAME]`` with its source plugin's model (plugins are loaded lazily,
   only those named);
4. cross-check references (a trigger's ``function`` must exist) and HTTP routes
   (two triggers may not serve the same path and method).

The models and value types are in :mod:`bridge.models` (below the plugin contracts, so that
they import nothing that loads plugins) and are re-exported here.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from bridge.errors import ConfigError, PluginError
from bridge.models import (
    _NAME,
    ApiConfig,
    ApiToken,
    AsyncConfig,
    Config,
    DaemonConfig,
    Duration,
    FunctionConfig,
    GatewayConfig,
    LayerConfig,
    LayerRef,
    LogsConfig,
    Model,
    RelPath,
    Size,
    TimeZone,
    TriggerConfig,
    handler_problems,
    parse_duration,
    parse_size,
    read_secret_file,
)

#: the models of :mod:`bridge.models` are re-exported: ``from bridge.config import X`` stays
__all__ = [
    "DEFAULT_CONFIG",
    "ENV_CONFIG",
    "ApiConfig",
    "ApiToken",
    "AsyncConfig",
    "Config",
    "DaemonConfig",
    "Duration",
    "FunctionConfig",
    "GatewayConfig",
    "LayerConfig",
    "LayerRef",
    "LogsConfig",
    "Model",
    "RelPath",
    "Size",
    "TimeZone",
    "TriggerConfig",
    "config_path",
    "handler_problems",
    "interpolate",
    "load",
    "parse",
    "parse_duration",
    "parse_size",
    "read_files",
    "read_secret_file",
    "unknown_key",
]

DEFAULT_CONFIG = "/etc/event-bridge/bridge.toml"
ENV_CONFIG = "EVENT_BRIDGE_CONFIG"

# --- loading ----------------------------------------------------------------------------------


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``-c`` wins, then ``$EVENT_BRIDGE_CONFIG``, then /etc/event-bridge/bridge.toml."""
    return Path(explicit or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def interpolate(
    value: Any, env: Mapping[str, str], loc: str, problems: list[tuple[str, str]]
) -> Any:
    """Expand ``${…}`` in every string of ``value``; problems are appended, never raised."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, op, arg = m.group(1), m.group(2), m.group(3)
            got = env.get(name)
            if op == ":-":
                return got if got else arg
            if got is None or (op == ":?" and got == ""):
                hint = f": {arg}" if op == ":?" and arg else ""
                problems.append((loc, f"environment variable {name} is not set{hint}"))
                return ""
            return got

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, f"{loc}.{k}" if loc else k, problems) for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, env, f"{loc}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_keys(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model accepts at ``loc`` (a path to an unknown key), for suggestions."""
    for part in loc[:-1]:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = next(
            (f for n, f in model.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return []
        model = _submodel(field.annotation)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def unknown_key(key: str, known: list[str]) -> str:
    """``unknown key (did you mean "concurrency"?)`` when a known key is close."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f'unknown key (did you mean "{close[0]}"?)' if close else "unknown key"


def _errors(
    prefix: str, exc: ValidationError, model: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    out = []
    for e in exc.errors(include_url=False):
        msg = e["msg"]
        msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            loc = tuple(e["loc"])
            msg = unknown_key(str(loc[-1]), _known_keys(model, loc)) if loc else "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        out.append((_loc(prefix, tuple(e["loc"])), msg))
    return out


def _record_origins(doc: Any, f: Path, loc: str, origins: dict[str, Path]) -> None:
    """Which file set each key path: tables keep the first file that has them, values the last."""
    if isinstance(doc, dict):
        if loc:
            origins.setdefault(loc, f)
        for k, v in doc.items():
            _record_origins(v, f, f"{loc}.{k}" if loc else str(k), origins)
    else:
        origins[loc] = f


def _name_dropins(e: ConfigError, main: Path, origins: Mapping[str, Path]) -> ConfigError:
    """Problems at keys a ``conf.d`` drop-in set name that file."""
    out = []
    for loc, msg in e.problems:
        where = next(
            (origins[p] for p in _prefixes(loc) if p in origins),
            None,
        )
        if where is not None and where != main:
            msg = f"{msg} (set in {where})"
        out.append((loc, msg))
    return ConfigError(out, source=e.source)


def _prefixes(loc: str) -> list[str]:
    """``a.b[0].c`` → ``a.b[0].c``, ``a.b[0]``, ``a.b``, ``a`` (longest first)."""
    cuts = [i for i, ch in enumerate(loc) if ch in ".["]
    return [loc] + [loc[:i] for i in reversed(cuts) if i]


def read_files(
    path: Path, origins: dict[str, Path] | None = None
) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """Parse the main file and its drop-ins, merged. Raises ConfigError with every parse problem.
    ``origins`` (if given) is filled with the file that set each key path."""
    origins = {} if origins is None else origins
    problems: list[tuple[str, str]] = []
    files: list[Path] = [path]
    dropins = path.parent / "conf.d"
    if dropins.is_dir():
        files += sorted(dropins.glob("*.toml"))
    merged: dict[str, Any] = {}
    for f in files:
        try:
            with f.open("rb") as fh:
                doc = tomllib.load(fh)
            _record_origins(doc, f, "", origins)
            merged = _merge(merged, doc)
        except FileNotFoundError:
            problems.append((str(f), "config file not found"))
        except IsADirectoryError:
            problems.append((str(f), "is a directory, not a config file"))
        except PermissionError:
            problems.append((str(f), "permission denied"))
        except tomllib.TOMLDecodeError as e:
            problems.append((str(f), f"malformed TOML: {e}"))
        except UnicodeDecodeError as e:
            problems.append((str(f), f"not UTF-8 text: {e}"))
    if problems:
        raise ConfigError(problems)
    return merged, tuple(files)


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    skip_unbound: bool = False,
) -> Config:
    """Read, merge, interpolate and validate; raise ConfigError naming every problem.

    A ``.yml``/``.yaml`` path is an SCF project, run as if a ``bridge.toml`` beside it said
    ``include = ["serverless.yml"]`` (state beside it, every default)."""
    p = config_path(path)
    origins: dict[str, Path] = {}
    if p.suffix in (".yml", ".yaml"):
        raw: dict[str, Any] = {"include": [p.name]}
        files: tuple[Path, ...] = ()
    else:
        raw, files = read_files(p, origins)
    try:
        return parse(
            raw,
            base_dir=p.resolve().parent,
            env=env,
            path=p,
            files=files,
            skip_unbound=skip_unbound,
        )
    except ConfigError as e:
        raise _name_dropins(e, p, origins) from None


def parse(
    raw: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
    files: tuple[Path, ...] = (),
    skip_unbound: bool = False,
) -> Config:
    """Validate an already-parsed config document (used by :func:`load` and by tests).

    ``include``d SCF projects are merged in and cloud triggers bound first
    (:mod:`bridge.project`, :mod:`bridge.bindings`); ``skip_unbound`` turns an unbound
    cloud trigger from a problem into a skipped trigger."""
    from bridge import bindings, project, registry

    problems: list[tuple[str, str]] = []
    data = interpolate(dict(raw), os.environ if env is None else env, "", problems)
    ctx: dict[str, Any] = {"base_dir": base_dir or Path.cwd()}
    toml = project.display(path) if path is not None and path.suffix == ".toml" else "bridge.toml"
    if path is not None and path.suffix in (".yml", ".yaml"):
        toml = f'a bridge.toml beside it that says include = ["{path.name}"]'

    exp = project.expand(data, ctx["base_dir"], env, toml)
    data, problems, origins = exp.data, problems + exp.problems, exp.origins
    files = tuple(dict.fromkeys([*files, *exp.files]))
    raw_triggers = data.get("triggers", {}) if isinstance(data.get("triggers"), dict) else {}
    bound, bproblems, skipped, borigins = bindings.resolve(
        raw_triggers,
        data.pop("bindings", None),
        toml=toml,
        skip_unbound=skip_unbound,
    )
    if isinstance(data.get("triggers"), dict):
        data["triggers"] = bound
    problems += bproblems
    origins.update(borigins)

    sections = ("daemon", "api", "logs", "gateway", "functions", "triggers", "layers")
    for key in data:
        if key not in sections:
            close = difflib.get_close_matches(key, sections, n=1, cutoff=0.75)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            problems.append((key, f"unknown section ({hint}expected {', '.join(sections)})"))
    layers: dict[str, LayerConfig] = {}
    for lname, lbody in (data.get("layers") or {}).items():
        try:
            layers[lname] = LayerConfig.model_validate(lbody, context=ctx)
        except ValidationError as e:
            problems.extend(_errors(f"layers.{lname}", e))
    ctx["layers"] = layers
    ctx["toml"] = toml

    def section(name: str, model: type[Model]) -> Any:
        try:
            return model.model_validate(data.get(name, {}), context=ctx)
        except ValidationError as e:
            problems.extend(_errors(name, e, model))
            return None

    daemon = section("daemon", DaemonConfig)
    api = section("api", ApiConfig)
    logs = section("logs", LogsConfig)
    gateway = section("gateway", GatewayConfig)
    ctx["timezone"] = daemon.timezone if daemon else "UTC"
    if daemon is not None:  # defaults of the functions' isolation keys (bridge/sandbox.py)
        ctx["isolation"] = daemon.isolation
        ctx["sandbox_fallback"] = daemon.sandbox_fallback

    def tables(kind: str) -> dict[str, Any]:
        value = data.get(kind, {})
        if not isinstance(value, dict):
            problems.append((kind, f"must be a table of [{kind}.NAME] sections"))
            return {}
        out = {}
        for name, body in value.items():
            if not _NAME.match(name):
                problems.append(
                    (
                        f"{kind}.{name}",
                        "invalid name: use 1-60 letters, digits, '-' or '_', starting with a letter",
                    )
                )
            if not isinstance(body, dict):
                problems.append((f"{kind}.{name}", "must be a table"))
                continue
            out[name] = body
        return out

    from bridge.deadletter import check_sink, sink_name

    checked_sinks: dict[str, str | None] = {}

    # A plugin that is installed but fails to import takes down only what uses it.
    functions: dict[str, FunctionConfig] = {}
    function_tables = tables("functions")
    for name, body in function_tables.items():
        runtime = body.get("runtime", "python")
        try:
            model = registry.target(str(runtime)).Config
        except registry.BrokenPlugin as e:
            skipped[f"functions.{name}"] = e.message
            continue
        except PluginError as e:
            problems.append((f"functions.{name}.runtime", e.message))
            continue
        try:
            fc = model.model_validate(body, context={**ctx, "name": name})
        except ValidationError as e:
            problems.extend(_errors(f"functions.{name}", e, model))
            continue
        sink = sink_name(fc.async_.dead_letter)
        if sink not in registry.names(registry.DEADLETTERS):
            installed = ", ".join(registry.names(registry.DEADLETTERS)) or "none"
            problems.append(
                (
                    f"functions.{name}.async.dead_letter",
                    f'unknown dead-letter sink "{sink}" (installed: {installed})',
                )
            )
            continue
        try:
            registry.deadletter(sink)
        except registry.BrokenPlugin as e:
            skipped[f"functions.{name}"] = f"its dead-letter sink cannot be used: {e.message}"
            continue
        if fc.async_.dead_letter not in checked_sinks:
            checked_sinks[fc.async_.dead_letter] = check_sink(fc.async_.dead_letter)
        if (why := checked_sinks[fc.async_.dead_letter]) is not None:
            problems.append((f"functions.{name}.async.dead_letter", why))
            continue
        functions[name] = fc

    triggers: dict[str, TriggerConfig] = {}
    for name, body in tables("triggers").items():
        # checked first, so it is reported with the trigger's other problems, not after them
        function = body.get("function")
        if isinstance(function, str) and function not in function_tables:
            known = ", ".join(sorted(function_tables)) or "none defined"
            problems.append(
                (f"triggers.{name}.function", f'unknown function "{function}" (defined: {known})')
            )
        if "type" not in body:
            problems.append((f"triggers.{name}.type", "required key is missing"))
            continue
        try:
            tmodel = registry.source(str(body["type"])).Config
        except registry.BrokenPlugin as e:
            skipped[f"triggers.{name}"] = e.message
            continue
        except PluginError as e:
            problems.append((f"triggers.{name}.type", e.message))
            continue
        try:
            trig = tmodel.model_validate(body, context={**ctx, "name": name})
        except ValidationError as e:
            problems.extend(_errors(f"triggers.{name}", e, tmodel))
            continue
        if f"functions.{trig.function}" in skipped:
            skipped[f"triggers.{name}"] = f'its function "{trig.function}" is not run'
            continue
        triggers[name] = trig

    from bridge.routes import route_problems

    problems.extend(route_problems(triggers))
    if problems:
        problems = list(dict.fromkeys((project.locate(loc, origins), m) for loc, m in problems))
        raise ConfigError(problems, source=str(path) if path else None)
    assert daemon is not None and api is not None and logs is not None and gateway is not None
    return Config(
        daemon=daemon,
        api=api,
        logs=logs,
        gateway=gateway,
        functions=functions,
        triggers=triggers,
        path=path,
        files=files,
        skipped=skipped,
        skipped_triggers={
            name: (
                str(body.get("type", "?")),
                str(body.get("function", "?")),
                body.get("enabled") is not False,
            )
            for name, body in raw_triggers.items()
            if f"triggers.{name}" in skipped and isinstance(body, dict)
        },
        layers=layers,
        warnings=tuple(exp.warnings),
        skip_unbound=skip_unbound,
    )
