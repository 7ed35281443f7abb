"""Cloud triggers (``cos``, ``cmq``, ``ckafka``) bound to local sources by ``[bindings]``.

A COS bucket, a CMQ topic and a CKafka instance are names in Tencent Cloud; what stands for them
on this machine is said once per resource in ``bridge.toml``::

    [bindings.cos."photos-1250000000"]     # a bucket → a local directory (or aws_s3)
    type = "filesystem"
    path = "/srv/photos"

    [bindings.cmq.orders]                  # a CMQ topic → a RabbitMQ queue (or aws_sqs)
    type = "amqp"
    url = "amqp://guest:guest@127.0.0.1:5672/"
    queue = "orders"                       # default: the topic name

    [bindings.ckafka."ckafka-2o10hua5"]    # a CKafka instance → Kafka brokers
    type = "kafka"
    bootstrap_servers = "127.0.0.1:9092"

:func:`resolve` rewrites every trigger of type ``cos``/``cmq``/``ckafka`` (from a project or
written by hand) into a trigger of the bound source type: the binding's keys, plus what the
trigger says (prefix/suffix/events of a bucket, the Kafka topic, batch size, start offset, retry
and batch window). A trigger without a binding is a configuration problem that names the
trigger, the resource and the TOML to add — or, when asked, a skipped trigger.

Rules: a binding's keys are those of its source type (validated with that type's model, so a
wrong key is reported at ``triggers.NAME.key``, with the binding named in the origin); the
trigger's own keys win over the binding's. Not guaranteed: COS event-name filters are applied by
``aws_s3`` only; a directory emits creations and removals (filter them in the function).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CLOUD_TYPES = {
    "cos": ("bucket", "a COS bucket", ("filesystem", "aws_s3")),
    "cmq": ("topic", "a CMQ topic", ("amqp", "aws_sqs")),
    "ckafka": ("instance", "a CKafka instance", ("kafka",)),
}
_EXAMPLE = {
    "filesystem": 'type = "filesystem"\npath = "/srv/{name}"',
    "amqp": 'type = "amqp"\nurl = "amqp://guest:guest@127.0.0.1:5672/"\nqueue = "{name}"',
    "kafka": 'type = "kafka"\nbootstrap_servers = "127.0.0.1:9092"',
}
_FIELDS = {
    "cos": {"bucket", "prefix", "suffix", "events"},
    "cmq": {"topic"},
    "ckafka": {"instance", "topic", "batch_size", "start", "retry_attempts", "batch_window"},
}
_COMMON = {"type", "function", "format", "enabled"}


def binding_hint(kind: str, resource: str) -> str:
    """The TOML a user adds to bind ``resource``."""
    example = _EXAMPLE[CLOUD_TYPES[kind][2][0]].format(name=resource)
    return f'[bindings.{kind}."{resource}"]\n{example}'


def resolve(
    triggers: Mapping[str, Any],
    bindings: Any,
    *,
    toml: str,
    skip_unbound: bool = False,
) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """Bind cloud triggers. Returns (triggers, problems, skipped, origins of binding keys)."""
    problems: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    origins: dict[str, str] = {}
    table = bindings if isinstance(bindings, dict) else {}
    if bindings is not None and not isinstance(bindings, dict):
        problems.append(("bindings", "must be a table of [bindings.cos|cmq|ckafka.NAME] sections"))
    for kind, body in table.items():
        if kind not in CLOUD_TYPES:
            problems.append(
                (f"bindings.{kind}", "unknown resource kind (expected cos, cmq, ckafka)")
            )
        elif not isinstance(body, dict) or not all(isinstance(v, dict) for v in body.values()):
            problems.append((f"bindings.{kind}", f'must hold [bindings.{kind}."NAME"] tables'))
    out: dict[str, Any] = {}
    for name, body in triggers.items():
        kind = body.get("type") if isinstance(body, dict) else None
        if kind not in CLOUD_TYPES:
            out[name] = body
            continue
        key, what, allowed = CLOUD_TYPES[kind]
        for k in body:
            if k not in _FIELDS[kind] | _COMMON:
                problems.append((f"triggers.{name}.{k}", f"unknown key for a {kind} trigger"))
        resource = body.get(key)
        if not isinstance(resource, str) or not resource:
            problems.append((f"triggers.{name}.{key}", "required key is missing"))
            continue
        bound = (table.get(kind) or {}).get(resource) if isinstance(table.get(kind), dict) else None
        if not isinstance(bound, dict):
            why = (
                f'trigger {name}: {what} "{resource}" is not bound to a local source; add to '
                f"{toml}:\n" + _indent(binding_hint(kind, resource))
            )
            if body.get("enabled") is False:
                skipped[f"triggers.{name}"] = f'disabled; {what} "{resource}" is not bound either'
            elif skip_unbound:
                skipped[f"triggers.{name}"] = f'{what} "{resource}" is not bound (--skip-unbound)'
            else:
                problems.append((f"triggers.{name}", why))
            continue
        btype = bound.get("type")
        where = f'bindings.{kind}."{resource}"'
        if btype not in allowed:
            problems.append(
                (f"{where}.type", f"{what} binds to {' or '.join(allowed)}, not {btype!r}")
            )
            continue
        local = {k: v for k, v in bound.items()}
        for k in local:
            origins[f"triggers.{name}.{k}"] = f"{toml}: {where}.{k}"
        local.update({k: v for k, v in body.items() if k in _COMMON and k != "type"})
        local["type"] = btype
        local.update(_mapped(kind, btype, body, resource, bound))
        out[name] = local
    return out, problems, skipped, origins


def _mapped(
    kind: str, btype: str, body: Mapping[str, Any], resource: str, bound: Mapping[str, Any]
) -> dict[str, Any]:
    """What the cloud trigger says, in the bound source's keys."""
    if kind == "cos":
        name, _, appid = resource.rpartition("-")
        if not (appid.isdigit() and name):
            name, appid = resource, "0"
        prefix, suffix = str(body.get("prefix", "")), str(body.get("suffix", ""))
        events = body.get("events") or ["cos:ObjectCreated:*"]
        if btype == "filesystem":
            pattern = f"{prefix}*{suffix}" if prefix or suffix else "*"
            return {"bucket": name, "appid": appid, "patterns": [pattern]}
        s3 = {"appid": appid, "prefix": prefix, "suffix": suffix, "events": list(events)}
        return s3 if "bucket" in bound else {**s3, "bucket": resource}
    if kind == "cmq":
        key = "queue" if btype == "amqp" else "queue_url"
        return {} if key in bound else {key: resource}
    out: dict[str, Any] = {"topic": body["topic"]} if "topic" in body else {}
    for k in ("batch_size", "start", "batch_window"):
        if k in body:
            out[k] = body[k]
    if "retry_attempts" in body:
        out["retry"] = {"retry_attempts": body["retry_attempts"]}
    return out


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
