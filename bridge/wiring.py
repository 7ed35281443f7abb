"""Building what a configuration names: the function targets and the trigger sources (the
daemon at start and on reload, the CLI's ``fire``, ``next`` and ``install``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from bridge import registry
from bridge.abc import HttpTrigger, Source, SourceContext, Target, TargetContext
from bridge.models import Config, TriggerConfig
from bridge.store import StateStore

log = logging.getLogger("bridge.daemon")


def build_targets(config: Config, names: list[str] | None = None) -> dict[str, Target[Any]]:
    """Instantiate the function targets (not started)."""
    out: dict[str, Target[Any]] = {}
    private = (*config.files, *secret_files([*config.api.tokens, *config.triggers.values()]))
    for name, fc in config.functions.items():
        if names is not None and name not in names:
            continue
        cls = registry.target(fc.runtime)
        ctx = TargetContext(
            name=name,
            state_dir=config.state_dir,
            logger=logging.getLogger(f"fn.{name}"),
            private_files=private,
        )
        out[name] = cls(fc, ctx)
    return out


def secret_files(models: Iterable[BaseModel]) -> list[Path]:
    """The files named by ``*_file`` keys (secrets: ``secret_file``, ``password_file``,
    ``options_file = {NAME = PATH}``...), which a sandboxed function must not read."""
    out: list[Path] = []
    for m in models:
        for key in type(m).model_fields:
            value = getattr(m, key)
            if not key.endswith("_file"):
                continue
            values = value.values() if isinstance(value, dict) else [value]
            out.extend(v for v in values if isinstance(v, Path))
    return out


def log_skipped(config: Config) -> None:
    """What the config leaves out because a plugin fails to load: one error line each."""
    for where, why in config.skipped.items():
        kind, _, name = where.partition(".")
        extra = {"trigger": name} if kind == "triggers" else {"function": name}
        log.error("%s is not run: %s", where, why, extra=extra)


def is_http_trigger(tc: TriggerConfig) -> bool:
    """Served by the gateway (``apigw``, ``function_url``, plugins' HttpTrigger): no pump.
    A type no plugin registers is not (building its source says what is wrong)."""
    try:
        return issubclass(registry.source(tc.type), HttpTrigger)
    except registry.UnknownPlugin:
        return False


def build_source(
    config: Config, name: str, store: StateStore, batches: Callable[[str], bool] | None = None
) -> Source[Any]:
    """The source of trigger ``name``; ``batches(function)``: whether a function takes several
    deliveries in one round trip now (the dispatcher's; without it, none does)."""
    tc = config.triggers[name]
    cls = registry.source(tc.type)
    ctx = SourceContext(
        name=name,
        function=tc.function,
        store=store,
        timezone=ZoneInfo(config.daemon.timezone),
        logger=logging.getLogger(f"trigger.{name}"),
        **({} if batches is None else {"batches": functools.partial(batches, tc.function)}),
    )
    return cls(tc, ctx)
