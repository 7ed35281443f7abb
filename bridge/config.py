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

Durations are strings with a unit (``"500ms"``, ``"60s"``, ``"1h30m"``), sizes
too (``"128MiB"``, ``"6MB"``); relative paths are resolved against the folder
of the main config file. Models are frozen and reject unknown keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError, PluginError
from bridge.events import Format

DEFAULT_CONFIG = "/etc/event-bridge/bridge.toml"
ENV_CONFIG = "EVENT_BRIDGE_CONFIG"

# --- value types ------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|s|m|h|d)")
_DURATION_UNITS = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration(value: Any) -> float:
    """``"1h30m"`` → 5400.0 seconds. Bare numbers are refused: the unit must be explicit."""
    if isinstance(value, bool) or not isinstance(value, str):
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f'a duration needs a unit, e.g. "{value}s" or "{value}ms"')
        raise ValueError('a duration must be a string such as "500ms", "60s" or "6h"')
    text = value.strip().replace(" ", "")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(
            f'invalid duration "{value}": use a number and a unit (ms, s, m, h, d), e.g. "90s" or "1h30m"'
        )
    return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2,
    "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}  # fmt: skip


def parse_size(value: Any) -> int:
    """``"128MiB"`` → 134217728 bytes; ``"6MB"`` → 6000000 (SI units are decimal)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError('a size must be a string with a unit, such as "128MiB" or "6MB"')
    m = _SIZE.fullmatch(value.strip())
    if not m or not m.group(2):
        raise ValueError(
            f'invalid size "{value}": use a number and a unit (B, KB, KiB, MB, MiB, GB, GiB)'
        )
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _check_zone(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError('a time zone must be a string such as "UTC" or "Asia/Shanghai"')
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f'unknown time zone "{value}" (use an IANA name such as "Asia/Shanghai")'
        ) from None
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


def _from_file(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("base_dir") is not None)


def _duration(value: Any, info: ValidationInfo) -> Any:
    # In a config file a duration needs its unit; code may pass seconds as a number.
    if not _from_file(info) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return parse_duration(value)


def _size(value: Any, info: ValidationInfo) -> Any:
    if not _from_file(info) and isinstance(value, int) and not isinstance(value, bool):
        return value
    return parse_size(value)


#: seconds; a string with a unit in config files ("500ms", "1h30m")
Duration = Annotated[float, BeforeValidator(_duration)]
#: bytes; a string with a unit in config files ("128MiB")
Size = Annotated[int, BeforeValidator(_size)]
TimeZone = Annotated[str, BeforeValidator(_check_zone)]
RelPath = Annotated[Path, AfterValidator(_resolve_path)]


def _layer(value: Any, info: ValidationInfo) -> Any:
    layers = (info.context or {}).get("layers")
    if layers is None or not isinstance(value, str):  # built in code: a path
        return value
    if value not in layers:
        known = ", ".join(sorted(layers)) or "none defined"
        toml = (info.context or {}).get("toml", "bridge.toml")
        raise ValueError(
            f'unknown layer "{value}" (defined: {known}); add [layers.{value}] '
            f'path = "FOLDER or ZIP" to {toml}'
        )
    return layers[value].path


#: a ``[layers.NAME]`` name in a config file, resolved to the layer's folder or zip
LayerRef = Annotated[Path, BeforeValidator(_layer)]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,59}$")


class Model(BaseModel):
    """Frozen, keyword-only, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- core models ------------------------------------------------------------------------------


class DaemonConfig(Model):
    """``[daemon]``: process-wide settings."""

    state_dir: RelPath = Field(
        Path("state"),
        validate_default=True,
        description="Where the state store lives ($STATE_DIRECTORY wins when set).",
    )
    timezone: TimeZone = Field(
        "UTC", description="Default time zone of timers (SCF runtimes run in UTC)."
    )
    max_in_flight: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Events in flight across all triggers before sources are paused.",
    )
    max_queued: int = Field(
        100_000, ge=1, description="Async events queued on disk before sources are paused."
    )
    queue_poll: Duration = Field(
        0.5,
        gt=0,
        description="How often the queue looks for events queued by other processes (the CLI).",
    )
    shutdown_grace: Duration = Field(
        30.0, ge=0, description="How long SIGTERM waits for in-flight invocations."
    )
    start_timeout: Duration = Field(
        20.0,
        gt=0,
        description="The daemon reports ready (systemd READY=1) once every trigger had its first "
        "connect attempt, or after this long; triggers not connected yet keep retrying. Keep it "
        "below the unit's TimeoutStartSec.",
    )
    log_format: Literal["human", "json"] = Field("human", description="Log line format on stderr.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level logged."
    )
    isolation: Literal["process", "sandbox"] = Field(
        "process",
        description="Default isolation of functions that support it (docs/isolation.md).",
    )
    sandbox_fallback: Literal["fail", "process"] = Field(
        "fail",
        description="Where the host cannot sandbox: fail (the function does not start) | "
        "process (it runs as a plain process, with a warning).",
    )
    database_url: str | None = Field(
        None,
        description='Shared state on PostgreSQL ("postgresql://user@host:5432/bridge"): replicas '
        "on one database share the queue, dead letters and timer ticks (docs/scale-out.md). "
        "Unset: SQLite under state_dir. A password in it is masked everywhere.",
        repr=False,
    )
    database_url_file: RelPath | None = Field(
        None, description="File holding database_url (systemd LoadCredential)."
    )
    replica: str | None = Field(
        None,
        description="This replica's name in `status` (with database_url); default host:pid.",
    )
    takeover: Duration = Field(
        15.0,
        ge=1.0,
        le=3600.0,
        description="With database_url: a replica silent this long loses its leased events "
        "to the others.",
    )

    @model_validator(mode="after")
    def _database(self) -> DaemonConfig:
        if self.database_url is not None and self.database_url_file is not None:
            raise ValueError("set at most one of database_url and database_url_file")
        url = self.database_url
        if url is None and self.database_url_file is not None:
            url = read_secret_file(self.database_url_file)
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            # never echo the value: it may hold a password
            raise ValueError("database_url must be a postgresql:// URL")
        return self

    @property
    def database(self) -> str | None:
        """The database URL (from database_url or database_url_file), or None for SQLite."""
        if self.database_url_file is not None:
            return read_secret_file(self.database_url_file)
        return self.database_url


class ApiToken(Model):
    """``[[api.tokens]]``: a bearer token scoped to functions and actions."""

    name: str = Field(description="Shown in logs instead of the secret.")
    secret: str | None = Field(
        None, description="The token itself (prefer secret_file).", repr=False
    )
    secret_file: RelPath | None = Field(
        None, description="File holding the token (systemd LoadCredential)."
    )
    functions: list[str] = Field(["*"], description='Functions this token may use; "*" for all.')
    actions: list[Literal["invoke", "read", "admin"]] = Field(
        ["invoke"], description="Allowed actions."
    )

    @model_validator(mode="after")
    def _one_secret(self) -> ApiToken:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("set exactly one of secret and secret_file")
        if self.secret_file is not None:
            # readable now and long enough, or a clear error naming the file (never its content)
            n = len(read_secret_file(self.secret_file))
            if n < 16:
                what = "is empty" if n == 0 else f"holds {n} characters"
                raise ValueError(
                    f"secret file {self.secret_file} {what}; a token needs at least 16"
                )
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError("the secret is shorter than 16 characters")
        if not self.functions:
            raise ValueError('functions must name at least one function (or "*")')
        return self


class ApiConfig(Model):
    """``[api]``: the HTTP Invoke API."""

    enabled: bool = Field(False, description="Serve the HTTP API.")
    listen: str = Field("127.0.0.1:9780", description="host:port to listen on.")
    tokens: list[ApiToken] = Field(
        [], description="Bearer tokens; with none, only loopback callers are served."
    )


class LogsConfig(Model):
    """``[logs]``: the invocation log store (``event-bridge logs``, the console's invocations)."""

    enabled: bool = Field(
        True, description="Keep START/END/REPORT lines and handler output in STATE_DIR/logs.db."
    )
    retention: Duration = Field(7 * 86400.0, gt=0, description="Lines older than this are deleted.")
    max_size: Size = Field(
        256 * 1024**2, ge=1024**2, description="Above this size the oldest lines are deleted."
    )


class GatewayConfig(Model):
    """``[gateway]``: the public HTTP listener of ``apigw`` and ``function_url`` triggers.

    Separate from ``[api]`` (the admin API): it serves whoever can reach ``listen``.
    It starts once a config has an HTTP trigger (or ``enabled = true``).
    """

    enabled: bool | None = Field(
        None,
        description="Serve the gateway; default: when at least one apigw or function_url "
        "trigger is enabled.",
    )
    listen: str = Field(
        "127.0.0.1:8080", description='host:port; "0.0.0.0:8080" to serve the network.'
    )
    max_body: Size = Field(
        6 * 1000**2, ge=0, description="Largest request body; beyond it the answer is 413."
    )
    tls_cert: RelPath | None = Field(
        None, description="PEM certificate chain: serve HTTPS (with tls_key)."
    )
    tls_key: RelPath | None = Field(None, description="PEM private key of tls_cert.")
    trusted_proxies: list[str] = Field(
        [],
        description="Addresses or CIDR networks of reverse proxies whose X-Forwarded-For "
        "is believed for requestContext.sourceIp.",
    )
    header_timeout: Duration = Field(
        10.0, gt=0, description="How long a client may take to send the request line and headers."
    )
    body_timeout: Duration = Field(
        30.0, gt=0, description="How long a client may take to send the whole request body."
    )
    keepalive_timeout: Duration = Field(
        15.0, gt=0, description="How long an idle keep-alive connection is kept open."
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f'invalid listen address "{v}": use host:port, e.g. "127.0.0.1:8080"')
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f'invalid trusted proxy "{item}": use an address or a network such as '
                    '"10.0.0.0/8"'
                ) from None
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key (or neither)")
        for f in (self.tls_cert, self.tls_key):
            if f is not None and not f.is_file():
                raise ValueError(f"TLS file {f} does not exist")
        return self


class AsyncConfig(Model):
    """``[functions.NAME.async]``: retry policy of asynchronous invocations (SCF AsyncTriggerConfig)."""

    retry_attempts: int = Field(2, ge=0, le=10_000, description="Retries after a function error.")
    retry_interval: Duration = Field(60.0, ge=0, description="Wait between function-error retries.")
    max_event_age: Duration = Field(
        6 * 3600.0, gt=0, description="Give up (dead-letter) after this age (SCF MsgTTL)."
    )
    throttle_interval: Duration = Field(
        60.0,
        gt=0,
        description="Wait between retries of a throttled invocation (unless Retry-After says otherwise).",
    )
    backoff_initial: Duration = Field(
        1.0,
        gt=0,
        description="First retry delay after a system error; doubles each time, with jitter.",
    )
    backoff_max: Duration = Field(300.0, gt=0, description="Cap of the system-error retry delay.")

    dead_letter: str = Field(
        "local", description="local | sqs://… | kafka://… | amqp://… | plugin name."
    )

    @field_validator("dead_letter")
    @classmethod
    def _known_sink(cls, v: str) -> str:
        from bridge import deadletter, registry

        name = deadletter.sink_name(v)
        if name not in registry.names(registry.DEADLETTERS):
            installed = ", ".join(registry.names(registry.DEADLETTERS)) or "none"
            raise ValueError(f'unknown dead-letter sink "{name}" (installed: {installed})')
        return v


class FunctionConfig(Model):
    """``[functions.NAME]``: fields every runtime has. Runtime plugins subclass it."""

    runtime: str = Field("python", description="python | http | command, or a plugin's name.")
    timeout: Duration = Field(
        3.0, gt=0, le=900, description="Hard time limit of one invocation (SCF: up to 900 s)."
    )
    memory: Size = Field(
        128 * 1024**2, ge=16 * 1024**2, description="Memory limit of one instance."
    )
    concurrency: int = Field(
        4, ge=1, le=1000, description="Reserved concurrency; beyond it invocations are throttled."
    )
    environment: dict[str, str] = Field({}, description="Environment variables of the function.")
    async_: AsyncConfig = Field(AsyncConfig(), alias="async", description="Async retry policy.")

    @field_validator("environment")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f'invalid environment variable name "{k}"')
        return v


class TriggerConfig(Model):
    """``[triggers.NAME]``: fields every trigger has. Source plugins subclass it."""

    type: str = Field(description="timer, or a source plugin's name.")
    function: str = Field(description="The function this trigger invokes.")
    format: Format = Field(Format.SCF, description="scf | native | cloudevents.")
    enabled: bool = Field(True, description="A disabled trigger is validated but not run.")


class LayerConfig(Model):
    """``[layers.NAME]``: an SCF layer, a folder or a zip whose content SCF puts under /opt."""

    path: RelPath = Field(description="Folder or .zip file holding the layer's content.")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not (v.is_dir() or (v.is_file() and v.suffix == ".zip")):
            raise ValueError(f"layer path {v} is neither a folder nor a .zip file")
        return v


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The validated configuration. ``path`` is the main file (None when built in code)."""

    daemon: DaemonConfig = dataclasses.field(default_factory=DaemonConfig)
    api: ApiConfig = dataclasses.field(default_factory=ApiConfig)
    logs: LogsConfig = dataclasses.field(default_factory=LogsConfig)
    gateway: GatewayConfig = dataclasses.field(default_factory=GatewayConfig)
    functions: Mapping[str, FunctionConfig] = dataclasses.field(default_factory=dict)
    triggers: Mapping[str, TriggerConfig] = dataclasses.field(default_factory=dict)
    path: Path | None = None
    files: tuple[Path, ...] = ()
    #: ``functions.NAME`` / ``triggers.NAME`` → why it is not run: its plugin is installed but
    #: fails to load (or it depends on one that is skipped). Not a config error: the rest runs.
    skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: ``[layers.NAME]``: folders or zips a function's ``layers`` make importable
    layers: Mapping[str, LayerConfig] = dataclasses.field(default_factory=dict)
    #: things that run, but not exactly as in SCF (e.g. Python3.9 on the local 3.11)
    warnings: tuple[str, ...] = ()
    #: unbound cloud triggers were skipped on request (a reload keeps doing so)
    skip_unbound: bool = False

    @property
    def state_dir(self) -> Path:
        env = os.environ.get("STATE_DIRECTORY")
        return Path(env.split(":")[0]) if env else self.daemon.state_dir


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
    bound, bproblems, skipped, borigins = bindings.resolve(
        data.get("triggers", {}) if isinstance(data.get("triggers"), dict) else {},
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
        try:
            registry.deadletter(sink_name(fc.async_.dead_letter))
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
        layers=layers,
        warnings=tuple(exp.warnings),
        skip_unbound=skip_unbound,
    )


# --- helpers for plugin models ----------------------------------------------------------------


def read_secret_file(path: Path) -> str:
    """The stripped content of a ``*_file`` secret. The message never contains the secret."""
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read secret file {path}: {e.strerror}") from None


def handler_problems(code: Path, handler: str) -> str | None:
    """Why ``handler`` (``file.function``) cannot be found in ``code``, or None.

    Checks without importing (importing would run user code): the entry file
    must exist and, unless the module does something dynamic (``import *``,
    ``globals()``), bind the handler name at top level.
    """
    if "." not in handler or handler.startswith(".") or handler.endswith("."):
        return f'invalid handler "{handler}": use FILE.FUNCTION, e.g. "index.main_handler"'
    module, func = handler.rsplit(".", 1)
    if not code.is_dir():
        return f"code directory {code} does not exist"
    entry = code.joinpath(*module.split(".")).with_suffix(".py")
    if not entry.is_file():
        pkg = code.joinpath(*module.split("."), "__init__.py")
        if not pkg.is_file():
            return (
                f'entry file "{entry.relative_to(code)}" not found in {code} (handler "{handler}")'
            )
        entry = pkg
    try:
        tree = ast.parse(entry.read_bytes(), filename=str(entry))
    except SyntaxError as e:
        return f"syntax error in {entry.name} line {e.lineno}: {e.msg}"
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for a in node.names:
                if a.name == "*":
                    return None
                bound.add((a.asname or a.name).split(".")[0])
        else:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    bound.add(sub.id)
                elif isinstance(sub, ast.Name) and sub.id in ("globals", "setattr", "exec"):
                    return None
    if func not in bound:
        return f'handler function "{func}" not found in {entry.name} (handler "{handler}")'
    return None
