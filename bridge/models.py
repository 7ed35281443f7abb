"""The configuration models and value types: what a validated config is made of.

The low half of the configuration, imported by the plugin contracts (:mod:`bridge.abc`)
and the state store; :mod:`bridge.config` (reading, interpolating and validating files,
which needs the plugin registry) sits above it and re-exports every name here. What needs
an installed plugin (a trigger's type, a runtime, a dead-letter sink's name) is checked
there, by :func:`bridge.config.parse`, not by these models.

Durations are strings with a unit (``"500ms"``, ``"60s"``, ``"1h30m"``), sizes
too (``"128MiB"``, ``"6MB"``); relative paths are resolved against the folder
of the main config file. Models are frozen and reject unknown keys.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import os
import re
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
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.events import Format

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


# --- values as a config file writes them (also used by `event-bridge plugins`) ------------


def format_duration(seconds: float) -> str:
    """60.0 → ``"60s"``, 21600.0 → ``"6h"``, 0.5 → ``"500ms"``: as a config file writes it."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def format_size(n: int) -> str:
    """134217728 → ``"128MiB"``: as a config file writes it."""
    for unit, k in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return f"{n}B"


def field_kind(field: Any) -> str | None:
    """``"duration"``, ``"size"`` or None: how a model field's value is written in TOML."""
    metas = list(getattr(field, "metadata", []))
    stack = [getattr(field, "annotation", None)]
    while stack:
        ann = stack.pop()
        metas.extend(getattr(ann, "__metadata__", ()))
        stack.extend(getattr(ann, "__args__", ()))
    funcs = {getattr(m, "func", None) for m in metas}
    if _duration in funcs:
        return "duration"
    if _size in funcs:
        return "size"
    return None


def toml_value(field: Any, value: Any) -> Any:
    """A field's value (e.g. its default) as the config file would write it, JSON-compatible:
    durations and sizes with their unit, paths as strings, nested models as tables."""
    if value is None:
        return None
    kind = field_kind(field)
    if kind == "duration" and isinstance(value, int | float):
        return format_duration(float(value))
    if kind == "size" and isinstance(value, int):
        return format_size(value)
    if isinstance(value, BaseModel):
        return {
            (f.alias or n): toml_value(f, getattr(value, n))
            for n, f in type(value).model_fields.items()
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [toml_value(None, v) for v in value]
    return value


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
        "info",
        description=(
            "Lowest level logged. At `info` every invocation logs START, END and REPORT lines"
            " (and the log store keeps them): at thousands of invocations a second they are"
            " most of the daemon's work (Kafka `batch_size = 1` on a 2-core VM: 7,818-10,758"
            " records/s at `info`, 25,458 at `warning`)."
        ),
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
        if url is not None:
            _check_ports(url)
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


def _check_ports(url: str) -> None:
    """A PostgreSQL URL's ports (one per host: ``h1:5432,h2:5433``) as libpq reads them, each
    a number up to 65535; checked where psycopg is installed (the ``postgres`` extra, which
    using the URL needs). Nothing of the URL is said: it may hold a password."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return
    try:
        ports = str(conninfo_to_dict(url).get("port") or "")
    except Exception:  # (its message may quote the URL)
        raise ValueError("database_url cannot be read as a PostgreSQL URL") from None
    for port in ports.split(","):
        if port and not (port.isdigit() and int(port) <= 65535):
            raise ValueError("database_url: a port must be a number from 0 to 65535")


def check_listen(v: str) -> str:
    """A ``host:port`` to listen on (``[api]``, ``[gateway]``), or a clear error."""
    _host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'invalid listen address "{v}": use host:port, e.g. "127.0.0.1:8080"')
    return v


class ApiConfig(Model):
    """``[api]``: the HTTP Invoke API."""

    enabled: bool = Field(False, description="Serve the HTTP API.")
    listen: str = Field("127.0.0.1:9780", description="host:port to listen on.")
    tokens: list[ApiToken] = Field(
        [],
        description="Bearer tokens, each scoped to functions and actions; every call but "
        "/healthz and /openapi.json needs one (401 without), from loopback too.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str) -> str:
        return check_listen(v)


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
        return check_listen(v)

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
    #: the skipped triggers' type, function and whether they are enabled, as their tables say
    #: (``status`` names them)
    skipped_triggers: Mapping[str, tuple[str, str, bool]] = dataclasses.field(default_factory=dict)
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
