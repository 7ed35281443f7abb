"""The ``event-bridge`` command line.

Exit codes (documented in the README): 0 success, 1 failure (an invocation
failed, a trigger cannot be fired), 2 usage error (bad option, event that is
not JSON), 78 bad configuration (EX_CONFIG; systemd does not restart on it).
Results go to stdout as JSON; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
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
from bridge.errors import EX_CONFIG, EX_FAILURE, ConfigError, InvocationError
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


def skip_unbound_option(f: F) -> F:
    return click.option(
        "--skip-unbound",
        is_flag=True,
        envvar="EVENT_BRIDGE_SKIP_UNBOUND",
        help="Skip (with a warning) cloud triggers with no [bindings] instead of failing.",
    )(f)


def load_config(path: Path | None, skip_unbound: bool = False) -> cfg.Config:
    try:
        config = cfg.load(path, skip_unbound=skip_unbound)
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
@click.option(
    "--log-format",
    type=click.Choice(["json", "text", "human"]),
    default=None,
    help="Log line format (default: daemon.log_format).",
)
@skip_unbound_option
def run(config_path: Path | None, log_format: str | None, skip_unbound: bool) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT (SIGHUP reloads the config).

    -c takes a bridge.toml, or an SCF project's serverless.yml / template.yaml."""
    from bridge.daemon import Daemon

    config = load_config(config_path, skip_unbound)
    fmt = {"text": "human"}.get(log_format or "", log_format) or config.daemon.log_format
    logsetup.setup(fmt, config.daemon.log_level)
    for w in config.warnings:
        logging.getLogger("bridge.project").warning("%s", w)

    async def _main() -> None:
        async with Daemon(config) as d:
            d.install_signal_handlers()
            await d.run_until_stopped()

    asyncio.run(_main())


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


async def _enqueue(
    config: cfg.Config, function: str, event: Any, trigger: str | None, source: str
) -> int:
    from bridge.queue import check_submission, new_item
    from bridge.store import SqliteStore

    item = new_item(function, event, trigger=trigger, request_source=source)
    try:
        check_submission(config, function, item.payload)
    except InvocationError as e:
        click.echo(json.dumps(e.to_dict(), ensure_ascii=False, indent=2))
        return EX_FAILURE
    store = SqliteStore(config.state_dir)
    await store.open()
    try:
        await store.enqueue([item])
    finally:
        await store.close()
    click.echo(json.dumps({"RequestId": item.id, "accepted": True, "function": function}))
    return 0


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
@click.option(
    "--local",
    is_flag=True,
    help="Invoke the function here and print its result instead of queueing.",
)
def fire(config_path: Path | None, trigger: str, local: bool) -> None:
    """Fire TRIGGER now: accept the event it would send into the durable queue.

    The running daemon invokes it like any tick (retries, dead letters); with
    --local the function is invoked here, once, and its result printed."""
    config = load_config(config_path)
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
@click.option("--url", default=None, help="API base URL (default: from api.listen).")
@click.option(
    "--token", default=None, envvar="EVENT_BRIDGE_TOKEN", help="Bearer token with the read action."
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(config_path: Path | None, url: str | None, token: str | None, as_json: bool) -> None:
    """Show the running daemon's triggers, next fire times, in-flight work, queue and DLQ."""
    config = load_config(config_path)
    code, body = _api(config, "GET", "/status", url, token, "read")
    if code != 200:
        click.echo(f"error: HTTP {code}: {json.dumps(body)}", err=True)
        sys.exit(EX_FAILURE)
    if as_json:
        click.echo(json.dumps(body, ensure_ascii=False, indent=2))
        return
    click.echo(
        f"event-bridge {body['version']}: {body['state']}, up {body.get('uptime_s', 0):.0f}s, "
        f"{body['in_flight']} in flight, {body['queue']['depth']} queued, {body['dead_letters']} dead letters"
    )
    for name, f in sorted(body["functions"].items()):
        click.echo(
            f"  function {name:<20} {f['runtime']:<8} in flight {f['in_flight']}/{f['concurrency']}"
            f"  queued {f['queued']}  dead letters {f['dead_letters']}"
        )
    for name, t in sorted(body["triggers"].items()):
        state = (
            "connected"
            if t.get("connected")
            else ("disabled" if not t.get("enabled") else "connecting")
        )
        extra = f"  next {t['next_fire']}" if t.get("next_fire") else ""
        if t.get("lag") is not None:
            extra += f"  lag {t['lag']}"
        click.echo(f"  trigger  {name:<20} {t['type']:<8} -> {t['function']:<16} {state}{extra}")


# --- dead letters ---------------------------------------------------------------------------------


@main.group()
def dlq() -> None:
    """List, show, replay and purge local dead letters."""


async def _with_store(config: cfg.Config, fn: Callable[[Any], Any]) -> Any:
    from bridge.store import SqliteStore

    store = SqliteStore(config.state_dir)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


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
    config = load_config(config_path)
    rows = asyncio.run(_with_store(config, lambda st: st.list_dead_letters(function)))
    for r in rows:
        rec = json.loads(r.record)
        if as_json:
            click.echo(json.dumps(rec, ensure_ascii=False))
        else:
            msg = (
                rec.get("ErrorMessage", "").splitlines()[0][:80] if rec.get("ErrorMessage") else ""
            )
            click.echo(
                f"{r.id}  {_age(r.created_at):>4} ago  {r.function:<16} {r.error_class:<16} RetryNum={rec['Body']['RetryNum']}  {msg}"
            )
    if not as_json:
        click.echo(f"{len(rows)} dead letter{'s' if len(rows) != 1 else ''}", err=True)


@dlq.command("show")
@config_option
@click.argument("id")
def dlq_show(config_path: Path | None, id: str) -> None:
    """Print one dead letter (the SCF DLQ record) as JSON."""
    config = load_config(config_path)
    r = asyncio.run(_with_store(config, lambda st: st.get_dead_letter(id)))
    if r is None:
        click.echo(f'error: no dead letter with id "{id}"', err=True)
        sys.exit(EX_FAILURE)
    click.echo(json.dumps(json.loads(r.record), ensure_ascii=False, indent=2))


@dlq.command("replay")
@config_option
@click.option("-f", "--function", default=None, help="Only this function's dead letters.")
@click.option("--id", "ids", multiple=True, help="Only this dead letter (repeatable).")
def dlq_replay(config_path: Path | None, function: str | None, ids: tuple[str, ...]) -> None:
    """Put dead letters back into the durable queue (each leaves the DLQ only once re-accepted)."""
    from bridge.queue import new_item

    config = load_config(config_path)

    async def run(st: Any) -> tuple[int, list[str]]:
        rows = [r for r in await st.list_dead_letters(function) if not ids or r.id in ids]
        missing = [i for i in ids if i not in {r.id for r in rows}]
        n = 0
        for r in rows:
            body = json.loads(r.record)["Body"]
            if r.function not in config.functions:
                click.echo(f"skipping {r.id}: function {r.function} is not configured", err=True)
                continue
            item = new_item(
                r.function, body["ClientContext"], trigger=r.trigger,
                request_source=body.get("RequestSource", "API"), request_id=r.id,
            )  # fmt: skip
            if await st.requeue_dead_letter(r.id, item):
                n += 1
        return n, missing

    n, missing = asyncio.run(_with_store(config, run))
    for i in missing:
        click.echo(f'error: no dead letter with id "{i}"', err=True)
    click.echo(f"requeued {n} dead letter{'s' if n != 1 else ''}; the running daemon delivers them")
    if missing:
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
    config = load_config(config_path)
    if function is None and older_than is None and not purge_all:
        raise click.UsageError(
            "name --function and/or --older-than, or --all to purge every dead letter"
        )
    cutoff = None
    if older_than is not None:
        try:
            cutoff = time.time() - cfg.parse_duration(older_than)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--older-than") from None

    async def run(st: Any) -> int:
        rows = await st.list_dead_letters(function, cutoff)
        return await st.delete_dead_letters([r.id for r in rows])  # type: ignore[no-any-return]

    n = asyncio.run(_with_store(config, run))
    click.echo(f"purged {n} dead letter{'s' if n != 1 else ''}")


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
