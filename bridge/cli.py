"""The ``event-bridge`` command line.

Exit codes (documented in the README): 0 success, 1 failure (an invocation
failed, a trigger cannot be fired), 2 usage error (bad option, event that is
not JSON), 78 bad configuration (EX_CONFIG; systemd does not restart on it).
Results go to stdout as JSON; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from bridge import __version__, registry
from bridge import config as cfg
from bridge import log as logsetup
from bridge.errors import EX_CONFIG, EX_FAILURE, BridgeError, ConfigError, InvocationError
from bridge.events import render

F = TypeVar("F", bound=Callable[..., Any])


_CONFIG_HELP = f"Config file (default: ${cfg.ENV_CONFIG} or {cfg.DEFAULT_CONFIG})."


def config_option(f: F) -> F:
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=_CONFIG_HELP,
    )(f)


def _remember_config(ctx: click.Context, _: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.meta["event_bridge.config"] = value


#: ``-c`` on a group (``event-bridge -c FILE dlq list``, ``dlq -c FILE list``): kept for the
#: subcommand, whose own ``-c`` wins.
group_config_option = click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_remember_config,
    help=_CONFIG_HELP,
)


def skip_unbound_option(f: F) -> F:
    return click.option(
        "--skip-unbound",
        is_flag=True,
        envvar="EVENT_BRIDGE_SKIP_UNBOUND",
        help="Skip (with a warning) cloud triggers with no [bindings] instead of failing.",
    )(f)


def load_config(path: Path | None, skip_unbound: bool = False) -> cfg.Config:
    if path is None:
        ctx = click.get_current_context(silent=True)
        path = ctx.meta.get("event_bridge.config") if ctx is not None else None
    try:
        config = cfg.load(path, skip_unbound=skip_unbound)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(EX_CONFIG)
    for tok in config.api.tokens:
        logsetup.register_secret(tok.secret)
    if config.daemon.database is not None:
        from urllib.parse import urlsplit

        with contextlib.suppress(ValueError):
            logsetup.register_secret(urlsplit(config.daemon.database).password)
    return config


def _setup_logging(config: cfg.Config | None, level: str | None = None) -> None:
    fmt = config.daemon.log_format if config else "human"
    lvl = level or (config.daemon.log_level if config else "info")
    logsetup.setup(fmt, lvl)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="event-bridge")
@group_config_option
def main() -> None:
    """event-bridge: SCF-style triggers, retries and dead letters for any Linux box."""


@main.command()
@config_option
@click.option(
    "--log-format",
    type=click.Choice(["human", "json", "text"]),
    default=None,
    help="Log line format: human or json (default: daemon.log_format; text = human).",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Reload when the config or a function's code changes (development).",
)
@click.option("--debug", is_flag=True, help="Debug logs, and a traceback on start-up failures.")
@skip_unbound_option
def run(
    config_path: Path | None, log_format: str | None, watch: bool, debug: bool, skip_unbound: bool
) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config).

    -c takes a bridge.toml, or an SCF project's serverless.yml / template.yaml."""
    from bridge.daemon import Daemon

    config = load_config(config_path, skip_unbound)
    fmt = {"text": "human"}.get(log_format or "", log_format) or config.daemon.log_format
    logsetup.setup(fmt, "debug" if debug else config.daemon.log_level)
    for w in config.warnings:
        logging.getLogger("bridge.project").warning("%s", w)

    daemon: list[Daemon] = []

    async def _main() -> None:
        async with Daemon(config) as d:
            daemon.append(d)
            d.install_signal_handlers()
            if watch:
                d.watch()
            await d.run_until_stopped()

    try:
        asyncio.run(_main())
    except ConfigError as e:  # found at start: e.g. isolation = "sandbox" on a host without one
        click.echo(str(e), err=True)
        sys.exit(EX_CONFIG)
    except (Exception, ExceptionGroup) as e:
        # A failure after the start is a bug: its traceback is what a report needs.
        if debug or (daemon and daemon[0].ready.is_set()):
            raise
        # One line an operator (and journald) can read; the traceback only with --debug.
        leaf: BaseException = e
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        hint = "" if isinstance(leaf, BridgeError) else " (run with --debug for the traceback)"
        click.echo(f"error: {one_line(e)}{hint}", err=True)
        sys.exit(EX_FAILURE)


def one_line(e: BaseException) -> str:
    """The message of the first real failure inside (possibly nested) exception groups."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    if isinstance(e, BridgeError):
        return e.message.splitlines()[0] if e.message else type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@main.command()
@config_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing when the config is valid.")
@skip_unbound_option
def validate(config_path: Path | None, quiet: bool, skip_unbound: bool) -> None:
    """Check the config (or serverless.yml / template.yaml) and name every problem (exit 78)."""
    config = load_config(config_path, skip_unbound)
    for where, why in config.skipped.items():
        click.echo(f"warning: {where} is not run: {why}", err=True)
    for w in config.warnings:
        click.echo(f"warning: {w}", err=True)
    for name, tc in sorted(config.triggers.items()):
        if not tc.enabled:
            click.echo(f"disabled: triggers.{name} ({tc.type} -> {tc.function}) is not run")
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
    from bridge.dispatcher import SYNC, Dispatcher
    from bridge.wiring import build_targets

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
@click.option(
    "--async",
    "is_async",
    is_flag=True,
    help="Accept into the durable queue (InvocationType Event); the daemon invokes it.",
)
@click.option("--remote", is_flag=True, help="Invoke through the running daemon's HTTP API.")
@click.option("--url", default=None, help="API base URL (default: from api.listen).")
@click.option(
    "--token",
    default=None,
    envvar="EVENT_BRIDGE_TOKEN",
    help="Bearer token (default: $EVENT_BRIDGE_TOKEN, else a configured token allowed to invoke).",
)
def invoke(
    config_path: Path | None,
    function: str | None,
    event_arg: str,
    is_async: bool,
    remote: bool,
    url: str | None,
    token: str | None,
) -> None:
    """Invoke FUNCTION once, locally, and print its result (like `scf local invoke`).

    With --async the event is accepted into the durable queue instead and the
    request id is printed; the running daemon (or the next one started) invokes
    it with the function's retry policy and dead-letter sink."""
    config = load_config(config_path, skip_unbound=True)  # triggers play no part here
    name = _pick_function(config, function)
    event = parse_event(event_arg)
    if remote:
        kind = "Event" if is_async else "RequestResponse"
        status, body = _api(
            config,
            "POST",
            f"/functions/{name}/invocations",
            url,
            token,
            "invoke",
            name,
            data=json.dumps(event).encode(),
            headers={"X-Invocation-Type": kind, "Content-Type": "application/json"},
        )
        click.echo(json.dumps(body, ensure_ascii=False, indent=2))
        sys.exit(0 if status < 300 else EX_FAILURE)
    _setup_logging(config)
    if is_async:
        sys.exit(asyncio.run(_enqueue(config, name, event, None, "API")))
    sys.exit(asyncio.run(_invoke_once(config, name, event)))


def _control(config: cfg.Config, op: str, create: bool = False, **args: Any) -> Any:
    """Run an operator command where the state is (see bridge.control); one-line errors."""
    from bridge import control

    try:
        return asyncio.run(control.call(config, op, args, create=create))
    except (control.NoState, control.ControlError) as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(EX_FAILURE)
    except (BridgeError, OSError, sqlite3.Error) as e:  # the state store cannot be used
        click.echo(f"error: {one_line(e)}", err=True)
        sys.exit(EX_FAILURE)


async def _enqueue(
    config: cfg.Config, function: str, event: Any, trigger: str | None, source: str
) -> int:
    from bridge import control

    try:
        rid = await control.call(
            config,
            "enqueue",
            {"function": function, "event": event, "trigger": trigger, "source": source},
            create=True,
        )
    except InvocationError as e:
        click.echo(json.dumps(e.to_dict(), ensure_ascii=False, indent=2))
        return EX_FAILURE
    except control.RemoteInvocationError as e:
        click.echo(json.dumps(e.error, ensure_ascii=False, indent=2))
        return EX_FAILURE
    except (control.NoState, control.ControlError) as e:
        click.echo(f"error: {e.message}", err=True)
        return EX_FAILURE
    except (BridgeError, OSError, sqlite3.Error) as e:  # the state store cannot be used
        click.echo(f"error: {one_line(e)}", err=True)
        return EX_FAILURE
    click.echo(json.dumps({"RequestId": rid, "accepted": True, "function": function}))
    return 0


def _trigger(config: cfg.Config, name: str) -> cfg.TriggerConfig:
    if name not in config.triggers:
        why = config.skipped.get(f"triggers.{name}")
        if why is not None:  # defined, and left out (its plugin, its function, its binding)
            raise click.UsageError(f'trigger "{name}" is not run: {why}')
        raise click.UsageError(
            f'unknown trigger "{name}"; choices: {", ".join(sorted(config.triggers)) or "none defined"}'
        )
    return config.triggers[name]


def _source(config: cfg.Config, name: str) -> Any:
    from bridge.store import SqliteStore
    from bridge.wiring import build_source

    return build_source(config, name, SqliteStore(config.state_dir))


@main.command()
@config_option
@click.argument("trigger")
@click.option(
    "--local",
    is_flag=True,
    help="Invoke the function here and print its result instead of queueing.",
)
def fire(config_path: Path | None, trigger: str, local: bool) -> None:
    """Fire TRIGGER now: accept the event it would send into the durable queue.

    The running daemon invokes it like any tick (retries, dead letters); with
    --local the function is invoked here, once, and its result printed."""
    config = load_config(config_path, skip_unbound=True)
    tc = _trigger(config, trigger)
    src = _source(config, trigger)
    try:
        event = src.sample_event(datetime.now(UTC))
    except NotImplementedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EX_FAILURE)
    _setup_logging(config)
    payload = render(event, tc.format)
    if local:
        sys.exit(asyncio.run(_invoke_once(config, tc.function, payload, trigger)))
    sys.exit(asyncio.run(_enqueue(config, tc.function, payload, trigger, event.request_source)))


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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per line: {"time": UTC with Z, "local": in the trigger\'s zone}.',
)
def next_(
    config_path: Path | None, trigger: str, count: int, after: datetime | None, as_json: bool
) -> None:
    """Print the next N fire times of TRIGGER, one ISO-8601 time per line, in the trigger's
    time zone (the wall clock its cron is read in)."""
    config = load_config(config_path, skip_unbound=True)
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
        if as_json:
            utc = t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            click.echo(json.dumps({"time": utc, "local": t.isoformat()}))
        else:
            click.echo(t.isoformat())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per plugin, one per line.")
def plugins(as_json: bool) -> None:
    """List installed plugins with their versions and config fields."""
    for p in registry.inventory():
        if as_json:
            click.echo(json.dumps(p.as_dict(), ensure_ascii=False))
            continue
        click.echo(f"{p.group} {p.name} {p.version} ({p.object}, from {p.distribution})")
        if p.error is not None:
            click.echo(f"    ! fails to load: {p.error}")
        for shadowed in p.shadows:
            click.echo(f"    ! also registered by {shadowed} (not used)")
        for f in p.fields:
            req = "required" if f.required else f"default {json.dumps(f.default)}"
            click.echo(f"    {f.name:<16} {req:<24} {f.doc}")


# --- the running daemon, through its API -------------------------------------------------------


def _api(
    config: cfg.Config,
    method: str,
    path: str,
    url: str | None,
    token: str | None,
    action: str,
    function: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Call the daemon's API; exits with a clear message when it cannot be reached."""
    import fnmatch
    import urllib.error
    import urllib.request

    base = (url or f"http://{config.api.listen}").rstrip("/")
    if token is None:
        for t in config.api.tokens:
            allowed = action in t.actions or "admin" in t.actions
            scoped = function is None or any(fnmatch.fnmatchcase(function, p) for p in t.functions)
            if allowed and scoped:
                token = t.secret if t.secret is not None else cfg.read_secret_file(t.secret_file)  # type: ignore[arg-type]
                break
    req = urllib.request.Request(base + path, data=data, method=method, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=960) as resp:
            return resp.status, _body(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, _body(e.read())
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        click.echo(f"error: cannot reach the event-bridge API at {base}: {reason}", err=True)
        sys.exit(EX_FAILURE)


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


@main.command()
@config_option
@click.option(
    "--url",
    default=None,
    help="Ask a daemon's HTTP API instead (e.g. another host's); default: the local daemon's "
    "control socket.",
)
@click.option(
    "--token", default=None, envvar="EVENT_BRIDGE_TOKEN", help="Bearer token with the read action."
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(config_path: Path | None, url: str | None, token: str | None, as_json: bool) -> None:
    """Show the running daemon's triggers, next fire times, in-flight work, queue and DLQ.

    With no daemon on this state directory and a shared database (daemon.database_url): the
    replicas, the shared queue and the dead letters, read from the database."""
    config = load_config(config_path, skip_unbound=True)
    if url is not None:
        code, body = _api(config, "GET", "/status", url, token, "read")
        if code != 200:
            click.echo(f"error: HTTP {code}: {json.dumps(body)}", err=True)
            sys.exit(EX_FAILURE)
    else:
        body = _local_status(config)
    if as_json:
        click.echo(json.dumps(body, ensure_ascii=False, indent=2))
        return
    if "database" in body:  # no daemon here: what the shared database says
        click.echo(
            f"event-bridge: {body['state']}; the shared database {body['database']}: "
            f"{body['queue']['depth']} queued, {_plural(body['dead_letters'], 'dead letter')}"
        )
    else:
        _print_daemon_status(body)
    for r in body.get("replicas", []):
        me = " (this one)" if r.get("self") else ""
        alive = "" if r["alive"] else "  NOT ANSWERING"
        click.echo(
            f"  replica  {r['name']:<20} {r['host']:<16} heartbeat {r['last_heartbeat']}  "
            f"leases {r['leases']}{alive}{me}"
        )


def _local_status(config: cfg.Config) -> Any:
    """The local daemon's status; with no daemon on this state directory and a shared
    database, the replicas and queue read from the database (any host with the config)."""
    from bridge import control
    from bridge.errors import BridgeError

    try:
        return asyncio.run(control.call(config, "status", {}))
    except control.ControlError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(EX_FAILURE)
    except control.NoState as e:
        if config.daemon.database is None:
            click.echo(f"error: {e.message}", err=True)
            sys.exit(EX_FAILURE)

    async def shared() -> dict[str, Any]:
        from bridge.pgstore import PgStore

        store = PgStore(
            config.daemon.database or "", takeover_s=config.daemon.takeover, migrate=False
        )
        await store.open()
        try:
            return await store.shared_status()
        finally:
            await store.close()

    try:
        return asyncio.run(shared())
    except BridgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EX_FAILURE)


def _print_daemon_status(body: dict[str, Any]) -> None:
    click.echo(
        f"event-bridge {body['version']}: {body['state']}, up {body.get('uptime_s', 0):.0f}s, "
        f"{body['in_flight']} in flight, {body['queue']['depth']} queued, "
        f"{_plural(body['dead_letters'], 'dead letter')}"
    )
    for name, f in sorted(body["functions"].items()):
        click.echo(
            f"  function {name:<20} {f['runtime']:<8} in flight {f['in_flight']}/{f['concurrency']}"
            f"  queued {f['queued']}  dead letters {f['dead_letters']}"
        )
    for name, t in sorted(body["triggers"].items()):
        if "not_run" in t and t.get("enabled"):  # left out of the running config (says why)
            click.echo(
                f"  trigger  {name:<20} {t['type']:<8} -> {t['function']:<16} "
                f"not run: {t['not_run']}"
            )
            continue
        state = (
            "connected"
            if t.get("connected")
            else ("disabled" if not t.get("enabled") else "not connected")
        )
        extra = f"  next {t['next_fire']}" if t.get("next_fire") else ""
        if t.get("route"):
            extra += f"  serving {t['route']}"
        if t.get("lag") is not None:
            extra += f"  lag {t['lag']}"
        if t.get("last_error") and not t.get("connected"):
            extra += f"  last error: {t['last_error']}"
        click.echo(f"  trigger  {name:<20} {t['type']:<8} -> {t['function']:<16} {state}{extra}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- the shared database ---------------------------------------------------------------------------


@main.group()
@group_config_option
def db() -> None:
    """The PostgreSQL state database (daemon.database_url; docs/scale-out.md)."""


@db.command("migrate")
@config_option
def db_migrate(config_path: Path | None) -> None:
    """Apply pending schema migrations ahead of starting replicas (they also apply them)."""
    config = load_config(config_path, skip_unbound=True)
    if config.daemon.database is None:
        click.echo("error: daemon.database_url is not set: SQLite needs no migration", err=True)
        sys.exit(EX_FAILURE)

    async def run() -> tuple[int, int]:
        from bridge.pgstore import PgStore

        store = PgStore(config.daemon.database or "", migrate=None)
        await store.open()
        try:
            return await store.migrate_now()
        finally:
            await store.close()

    from bridge.errors import BridgeError

    try:
        before, after = asyncio.run(run())
    except BridgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EX_FAILURE)
    if before == after:
        click.echo(f"schema is current (version {after})")
    else:
        click.echo(f"schema migrated from version {before} to {after}")


# --- dead letters ---------------------------------------------------------------------------------


@main.group()
@group_config_option
def dlq() -> None:
    """List, show, replay and purge local dead letters."""


def _age(created: float) -> str:
    s = max(0, int(time.time() - created))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


@dlq.command("list")
@config_option
@click.option("-f", "--function", default=None, help="Only this function's dead letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
def dlq_list(config_path: Path | None, function: str | None, as_json: bool) -> None:
    """List dead letters, oldest first."""
    config = load_config(config_path, skip_unbound=True)
    rows = _control(config, "dlq_list", function=function)
    for r in rows:
        rec = r["record"]
        if as_json:
            click.echo(json.dumps(rec, ensure_ascii=False))
        else:
            msg = (
                rec.get("ErrorMessage", "").splitlines()[0][:80] if rec.get("ErrorMessage") else ""
            )
            click.echo(
                f"{r['id']}  {_age(r['created_at']):>4} ago  {r['function']:<16} "
                f"{r['error_class']:<16} RetryNum={rec['Body']['RetryNum']}  {msg}"
            )
    if not as_json:
        click.echo(_plural(len(rows), "dead letter"), err=True)


@dlq.command("show")
@config_option
@click.argument("id")
def dlq_show(config_path: Path | None, id: str) -> None:
    """Print one dead letter (the SCF DLQ record) as JSON."""
    config = load_config(config_path, skip_unbound=True)
    r = _control(config, "dlq_show", id=id)
    if r is None:
        click.echo(f'error: no dead letter with id "{id}"', err=True)
        sys.exit(EX_FAILURE)
    click.echo(json.dumps(r, ensure_ascii=False, indent=2))


@dlq.command("replay")
@config_option
@click.option("-f", "--function", default=None, help="Only this function's dead letters.")
@click.option("--id", "ids", multiple=True, help="Only this dead letter (repeatable).")
def dlq_replay(config_path: Path | None, function: str | None, ids: tuple[str, ...]) -> None:
    """Put dead letters back into the durable queue (each leaves the DLQ only once re-accepted)."""
    config = load_config(config_path, skip_unbound=True)
    out = _control(config, "dlq_replay", function=function, ids=list(ids) or None)
    for id_, why in out["skipped"]:
        click.echo(f"skipping {id_}: {why}", err=True)
    for i in out["missing"]:
        click.echo(f'error: no dead letter with id "{i}"', err=True)
    click.echo(
        f"requeued {_plural(len(out['replayed']), 'dead letter')}; the daemon delivers them "
        "(now if it runs, else when it starts)"
    )
    if out["missing"]:
        sys.exit(EX_FAILURE)


@dlq.command("purge")
@config_option
@click.option("-f", "--function", default=None, help="Only this function's dead letters.")
@click.option(
    "--older-than", default=None, metavar="DURATION", help='Only those older than this, e.g. "7d".'
)
@click.option(
    "--all", "purge_all", is_flag=True, help="Purge every dead letter (needed without filters)."
)
def dlq_purge(
    config_path: Path | None, function: str | None, older_than: str | None, purge_all: bool
) -> None:
    """Delete dead letters for good."""
    config = load_config(config_path, skip_unbound=True)
    if function is None and older_than is None and not purge_all:
        raise click.UsageError(
            "name --function and/or --older-than, or --all to purge every dead letter"
        )
    age = None
    if older_than is not None:
        try:
            age = cfg.parse_duration(older_than)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--older-than") from None
    n = _control(config, "dlq_purge", function=function, older_than_s=age)
    click.echo(f"purged {_plural(n, 'dead letter')}")


@main.command()
@config_option
@click.argument("function", required=False)
@click.option("--request-id", default=None, help="Only the lines of this invocation.")
@click.option("--trigger", default=None, help="Only invocations from this trigger.")
@click.option("--since", default=None, help='Only lines newer than this, e.g. "10m", "2h".')
@click.option("-n", "--lines", "limit", type=int, default=None, help="At most the newest N lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def logs(
    config_path: Path | None,
    function: str | None,
    request_id: str | None,
    trigger: str | None,
    since: str | None,
    limit: int | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Invocation logs (START/END/REPORT and the handler's output) from the log store."""
    from bridge.logstore import LogReader, db_path, format_line

    config = load_config(config_path, skip_unbound=True)
    path = db_path(config.state_dir)
    if not path.exists():
        raise click.ClickException(f"no log store at {path} (has the daemon run with [logs]?)")
    cutoff = None
    if since is not None:
        try:
            cutoff = time.time() - cfg.parse_duration(since)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--since") from None
    filters: dict[str, Any] = {"function": function, "request_id": request_id, "trigger": trigger}
    try:
        reader = LogReader(path)
    except (OSError, sqlite3.Error) as e:  # not readable by this user, say
        raise click.ClickException(f"cannot read the log store {path}: {one_line(e)}") from None

    def show(ln: Any) -> None:
        click.echo(json.dumps(ln.as_dict(), ensure_ascii=False) if as_json else format_line(ln))

    try:
        last = reader.last_id()
        for ln in reader.lines(since=cutoff, limit=limit, **filters):
            show(ln)
            last = max(last, ln.id)
        if follow:
            for ln in reader.follow(after_id=last, **filters):
                show(ln)
    except KeyboardInterrupt:
        pass
    except (OSError, sqlite3.Error) as e:
        raise click.ClickException(f"cannot read the log store {path}: {one_line(e)}") from None
    finally:
        reader.close()


# --- SCF projects ----------------------------------------------------------------------------------


@main.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the TOML here (default: stdout). Paths are made relative to its folder.",
)
def import_(file: Path, output: Path | None) -> None:
    """Write the bridge.toml equivalent of an SCF project (serverless.yml or template.yaml).

    Every key that has no equivalent gets a comment; what cannot be imported is listed with
    the reason at the end (exit 1 if the file is not an SCF project at all)."""
    from bridge import project, scaffold

    proj = project.load(file, project.DeferredEnv(os.environ))  # variables' ${env.X} → ${X}
    text = scaffold.to_toml(proj, (output or Path("x")).resolve().parent)
    if output is None:
        click.echo(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        n, t = len(proj.functions), len(proj.triggers)
        click.echo(f"wrote {output}: {n} functions, {t} triggers", err=True)
    for loc, msg in proj.problems:
        click.echo(f"not imported: {proj.where(loc)}: {msg}", err=True)
    if not proj.dialect:  # not an SCF project at all (or unreadable)
        sys.exit(EX_FAILURE)


@main.command()
@click.option(
    "-t",
    "--template",
    type=click.Choice(["timer", "apigw", "cos", "cmq", "ckafka", "web"]),
    default="timer",
    show_default=True,
    help="What triggers the function.",
)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(template: str, directory: Path) -> None:
    """Write a runnable SCF project in DIRECTORY: serverless.yml, code, and a bridge.toml."""
    from bridge import scaffold

    try:
        files = scaffold.init(template, directory)
    except FileExistsError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EX_FAILURE)
    for f in files:
        click.echo(f"wrote {f}")
    click.echo(f"run it: event-bridge run -c {directory / 'bridge.toml'}")


def _progress(name: str) -> Callable[[str], None]:
    return lambda line: click.echo(f"{name}: {line}", err=True)


@main.command()
@config_option
@click.argument("function", required=False)
@click.option("--force", is_flag=True, help="Rebuild even if an environment exists.")
def install(config_path: Path | None, function: str | None, force: bool) -> None:
    """Install the requirements of FUNCTION (default: every Python function) ahead of `run`."""
    from bridge import deps
    from bridge.errors import DependencyError

    config = load_config(config_path, skip_unbound=True)
    names = [function] if function else sorted(config.functions)
    if function is not None:
        _pick_function(config, function)

    async def build_all() -> int:
        failed = built = 0
        for name in names:
            fc = config.functions[name]
            req = deps.requirements_file(
                getattr(fc, "code", Path("/nonexistent")), getattr(fc, "dependencies", None)
            )
            if fc.runtime != "python" or req is None:
                continue
            python = getattr(fc, "python", None) or sys.executable
            try:
                env = await deps.build(req, config.state_dir, python, _progress(name), force=force)
            except DependencyError as e:
                click.echo(f"error: function {name}: {e.message}", err=True)
                failed += 1
                continue
            click.echo(f"{name}: {env}")
            built += 1
        if not built and not failed:
            what = f"function {function} has" if function else "no Python function has"
            click.echo(f"nothing to install: {what} no requirements", err=True)
        return failed

    sys.exit(EX_FAILURE if asyncio.run(build_all()) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
