"""The ``event-bridge`` command line.

Exit codes (documented in the README): 0 success, 1 failure (an invocation
failed, a trigger cannot be fired), 2 usage error (bad option, event that is
not JSON), 78 bad configuration (EX_CONFIG; systemd does not restart on it).
Results go to stdout as JSON; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from bridge import __version__, registry
from bridge import config as cfg
from bridge import log as logsetup
from bridge.errors import EX_CONFIG, EX_FAILURE, ConfigError, InvocationError, PluginError
from bridge.events import render

F = TypeVar("F", bound=Callable[..., Any])


def config_option(f: F) -> F:
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"Config file (default: ${cfg.ENV_CONFIG} or {cfg.DEFAULT_CONFIG}).",
    )(f)


def load_config(path: Path | None) -> cfg.Config:
    try:
        config = cfg.load(path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(EX_CONFIG)
    for tok in config.api.tokens:
        logsetup.register_secret(tok.secret)
    return config


def _setup_logging(config: cfg.Config | None, level: str | None = None) -> None:
    fmt = config.daemon.log_format if config else "human"
    lvl = level or (config.daemon.log_level if config else "info")
    logsetup.setup(fmt, lvl)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="event-bridge")
def main() -> None:
    """event-bridge: SCF-style triggers, retries and dead letters for any Linux box."""


@main.command()
@config_option
def run(config_path: Path | None) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from bridge.daemon import Daemon

    config = load_config(config_path)
    _setup_logging(config)

    async def _main() -> None:
        async with Daemon(config) as d:
            d.install_signal_handlers()
            await d.run_until_stopped()

    asyncio.run(_main())


@main.command()
@config_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing when the config is valid.")
def validate(config_path: Path | None, quiet: bool) -> None:
    """Check the config and name every problem (exit 78 if any)."""
    config = load_config(config_path)
    if not quiet:
        files = ", ".join(str(f) for f in config.files)
        click.echo(
            f"config OK: {len(config.functions)} functions, {len(config.triggers)} triggers ({files})"
        )


def parse_event(value: str) -> Any:
    """``--event``: inline JSON, ``@path`` for a file, ``-`` for stdin."""
    where = "--event"
    if value == "-":
        text, where = sys.stdin.read(), "stdin"
    elif value.startswith("@"):
        p = Path(value[1:])
        try:
            text = p.read_text()
        except OSError as e:
            raise click.BadParameter(
                f"cannot read {p}: {e.strerror}", param_hint="--event"
            ) from None
        where = str(p)
    else:
        text = value
    try:
        event = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            param_hint="--event",
        ) from None
    if not isinstance(event, dict):
        raise click.BadParameter(
            f"{where}: the event must be a JSON object, not {type(event).__name__}",
            param_hint="--event",
        )
    return event


async def _invoke_once(
    config: cfg.Config, function: str, event: Any, trigger: str | None = None
) -> int:
    from bridge.daemon import build_targets
    from bridge.dispatcher import SYNC, Dispatcher

    d = Dispatcher(build_targets(config, [function]))
    try:
        await d.start()
        try:
            result = await d.invoke(function, event, invocation_type=SYNC, trigger=trigger)
        except InvocationError as e:
            click.echo(json.dumps(e.to_dict(), ensure_ascii=False, indent=2))
            return EX_FAILURE
        click.echo(json.dumps(result.value, ensure_ascii=False, indent=2))
        return 0
    finally:
        await d.close()


def _pick_function(config: cfg.Config, function: str | None) -> str:
    names = sorted(config.functions)
    if function is None:
        if len(names) == 1:
            return names[0]
        choices = ", ".join(names) or "none defined"
        raise click.UsageError(f"name the function to invoke; choices: {choices}")
    if function not in config.functions:
        raise click.UsageError(
            f'unknown function "{function}"; choices: {", ".join(names) or "none defined"}'
        )
    return function


@main.command()
@config_option
@click.argument("function", required=False)
@click.option(
    "-e",
    "--event",
    "event_arg",
    default="{}",
    metavar="JSON|@FILE|-",
    help="The event (default {}).",
)
def invoke(config_path: Path | None, function: str | None, event_arg: str) -> None:
    """Invoke FUNCTION once, locally, and print its result (like `scf local invoke`)."""
    config = load_config(config_path)
    name = _pick_function(config, function)
    event = parse_event(event_arg)
    _setup_logging(config)
    sys.exit(asyncio.run(_invoke_once(config, name, event)))


def _trigger(config: cfg.Config, name: str) -> cfg.TriggerConfig:
    if name not in config.triggers:
        raise click.UsageError(
            f'unknown trigger "{name}"; choices: {", ".join(sorted(config.triggers)) or "none defined"}'
        )
    return config.triggers[name]


def _source(config: cfg.Config, name: str) -> Any:
    from bridge.daemon import build_source
    from bridge.store import SqliteStore

    return build_source(config, name, SqliteStore(config.state_dir))


@main.command()
@config_option
@click.argument("trigger")
def fire(config_path: Path | None, trigger: str) -> None:
    """Fire TRIGGER now: build the event it would send and invoke its function once."""
    config = load_config(config_path)
    tc = _trigger(config, trigger)
    src = _source(config, trigger)
    try:
        event = src.sample_event(datetime.now(UTC))
    except NotImplementedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EX_FAILURE)
    _setup_logging(config)
    sys.exit(asyncio.run(_invoke_once(config, tc.function, render(event, tc.format), trigger)))


@main.command("next")
@config_option
@click.argument("trigger")
@click.option(
    "-n",
    "count",
    type=click.IntRange(1, 100_000),
    default=5,
    show_default=True,
    help="How many times.",
)
@click.option(
    "--after",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    default=None,
    help="Start from this time instead of now (UTC unless an offset is given).",
)
def next_(config_path: Path | None, trigger: str, count: int, after: datetime | None) -> None:
    """Print the next N fire times of TRIGGER, one ISO-8601 time per line."""
    config = load_config(config_path)
    _trigger(config, trigger)
    src = _source(config, trigger)
    start = after or datetime.now(UTC)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    try:
        times = src.next_fire_times(start, count)
    except NotImplementedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EX_FAILURE)
    for t in times:
        click.echo(t.isoformat())


def _plugin_info(group: str, name: str) -> dict[str, Any]:
    ep = registry.entry_points(group)[name]
    info: dict[str, Any] = {
        "group": group,
        "name": name,
        "object": ep.value,
        "distribution": ep.dist.name if ep.dist else None,
        "version": registry.version_of(ep),
    }
    try:
        cls = registry.load(group, name)
    except PluginError as e:
        info["error"] = e.message
        return info
    model = getattr(cls, "Config", None)
    if model is not None:
        fields = []
        for fname, f in model.model_fields.items():
            fields.append(
                {
                    "name": f.alias or fname,
                    "required": f.is_required(),
                    "default": None
                    if f.is_required()
                    else _jsonable(f.get_default(call_default_factory=True)),
                    "doc": f.description or "",
                }
            )
        info["fields"] = fields
    info["doc"] = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
    return info


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        if hasattr(v, "model_dump"):
            return v.model_dump(mode="json")
        return str(v)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per plugin, one per line.")
def plugins(as_json: bool) -> None:
    """List installed plugins with their versions and config fields."""
    for group in (registry.SOURCES, registry.TARGETS, registry.DEADLETTERS):
        for name in registry.names(group):
            info = _plugin_info(group, name)
            if as_json:
                click.echo(json.dumps(info, ensure_ascii=False))
                continue
            click.echo(f"{group} {name} {info['version']} ({info['object']})")
            if "error" in info:
                click.echo(f"    ! {info['error']}")
            for f in info.get("fields", []):
                req = "required" if f["required"] else f"default {json.dumps(f['default'])}"
                click.echo(f"    {f['name']:<16} {req:<24} {f['doc']}")


if __name__ == "__main__":  # pragma: no cover
    main()
