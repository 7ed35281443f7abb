"""Mapping one SCF function and its triggers onto config tables (used by :mod:`bridge.project`).

:func:`map_function` turns a function's normalized keys (each a value and the YAML key it came
from) into a ``[functions.NAME]`` table, or a problem naming the YAML key when it cannot run here
(Python 2.7, other languages' event functions, a missing ``src`` or entry file);
:func:`map_event` turns one trigger into ``[triggers.NAME]`` tables (an API-gateway trigger with
several endpoints becomes one table per endpoint). Unmapped keys become notes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: trigger types a project may use (lower-cased)
EVENT_TYPES = ("timer", "apigw", "http", "cos", "cmq", "ckafka")
#: keys with no local meaning: noted as "cloud-only" rather than "not supported"
_CLOUD_ONLY = {
    "region", "role", "enableRoleAuth", "vpcConfig", "vpc", "cls", "cfs", "tags", "description",
    "publicAccess", "eip", "l5Enable", "installDependency", "ignoreTriggers", "image", "publish",
    "traffic", "aliasName", "aliasDescription", "aliasAddionalVersionWeights", "exclude",
    "include", "namespace", "version", "protocols", "netConfig", "serviceId", "serviceName",
    "environment_name", "usagePlan", "auth", "apiId", "responseType", "param",
    "serviceDesc", "customDomains", "isDisabled", "qualifier", "cosBucket", "codeUri",
}  # fmt: skip
_COS_HOST = re.compile(r"^(?P<bucket>[^.]+)\.cos(?:website)?\.[a-z0-9-]+\.myqcloud\.com/?$")
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]+")


@dataclasses.dataclass
class Project:
    """One project file read into config tables (see bridge/project.py)."""

    path: Path
    dialect: str = ""
    functions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    triggers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: ``functions.NAME`` / ``triggers.NAME[.key]`` → ``YAML key path``
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    #: ``functions.NAME`` / ``triggers.NAME`` → YAML keys that were not mapped, and why
    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: (YAML key path, message): the project cannot be run as it is
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    #: Serverless Components default a trigger's ``enable`` to false; the others to true
    enable_by_default: bool = True
    #: triggers left disabled because ``enable`` was not set (one warning per file)
    enable_unset: list[str] = dataclasses.field(default_factory=list)
    #: declared runtime → functions, when it is not the local Python version
    mismatched: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def where(self, key: str) -> str:
        """``serverless.yml: inputs.events[0].timer`` for a YAML key path."""
        return f"{self.path}: {key}" if key else str(self.path)

    def note(self, table: str, key: str, why: str) -> None:
        self.notes.setdefault(table, []).append(f"{key}: {why}")


def join_key(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def dropped(proj: Project, events: Any, where: str) -> None:
    """Name each trigger of a function that cannot run, so none disappears silently."""
    items = events.items() if isinstance(events, dict) else enumerate(events or [])
    for key, ev in items:
        kind = next(iter(ev), "?") if isinstance(ev, dict) else "?"
        kind = ev.get("Type", kind) if isinstance(ev, dict) else kind
        k = f"{where}.{key}" if isinstance(events, dict) else f"{where}[{key}]"
        proj.problems.append((k, f"{kind} trigger not run: its function cannot run (see above)"))


# --- values ---------------------------------------------------------------------------------------


def as_bool(value: Any) -> bool | None:
    """YAML 1.1 booleans, including Tencent's strings "TRUE"/"FALSE"; None if not a boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    if isinstance(value, int):
        return bool(value)
    return None


def _num(proj: Project, value: Any, key: str) -> float | None:
    if isinstance(value, bool) or value is None:
        proj.problems.append((key, f"expected a number, got {value!r}"))
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        proj.problems.append((key, f"expected a number, got {value!r}"))
        return None


def _secs(x: float) -> str:
    return f"{x:g}s"


def _name(raw: str) -> str:
    """A config name (letters, digits, -, _; a letter first) for a cloud name."""
    out = _NAME_OK.sub("-", raw).strip("-_") or "x"
    return out if out[0].isalpha() else f"f-{out}"


def _env_vars(proj: Project, value: Any, key: str) -> dict[str, str]:
    """``environment.variables`` (a map) or multi-scf's ``environments`` list of key/value."""
    out: dict[str, str] = {}
    if isinstance(value, dict) and isinstance(value.get("variables"), dict | type(None)):
        value = value.get("variables") or {}
        key = join_key(key, "variables")
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict) and "key" in item:
                out[str(item["key"])] = _str(item.get("value"))
            else:
                proj.problems.append((f"{key}[{i}]", "expected {key: NAME, value: VALUE}"))
        return out
    if not isinstance(value, dict):
        proj.problems.append((key, "expected a map of variable names to values"))
        return out
    return {str(k): _str(v) for k, v in value.items()}


def merge_env(
    proj: Project, outer: tuple[Any, str] | None, own: tuple[Any, str] | None
) -> tuple[Any, str] | None:
    """A function's ``environment`` over the provider's or ``Globals``' (``outer``): each
    variable it does not set itself comes from ``outer``, as the SCF tools merge them (the
    Framework's ``getEnvironment``, the SCF CLI's globals). Named by the function's key."""
    outer = None if outer is None or outer[0] is None else outer  # (``environment:`` empty)
    own = None if own is None or own[0] is None else own
    if outer is None or own is None:
        return own if outer is None else outer
    merged = {**_env_vars(proj, outer[0], outer[1]), **_env_vars(proj, own[0], own[1])}
    return {"variables": merged}, own[1]


def _str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):  # an argument "object": the function gets its JSON
        return json.dumps(v, ensure_ascii=False)
    return "" if v is None else str(v)


# --- functions ------------------------------------------------------------------------------------

#: normalized function keys → the config key they become (the rest is handled in _function)
_FN_KEYS = {
    "name", "src", "handler", "runtime", "timeout", "memorySize", "initTimeout", "environment",
    "layers", "deadLetter", "retryNum", "msgTTL", "asyncRunEnable", "type", "entryFile",
    "events", "namespace", "credentials",
}  # fmt: skip


def map_function(
    proj: Project, name: str, fields: Mapping[str, tuple[Any, str]], base: Path, where: str
) -> str | None:
    """Add ``[functions.NAME]`` from normalized ``fields`` (value, YAML key). None if unusable."""
    fname = _name(name)
    table = f"functions.{fname}"
    if table in proj.origins:
        proj.problems.append((where, f'function "{fname}" is defined twice in this file'))
        return None
    proj.origins[table] = where
    out: dict[str, Any] = {}
    src_v, src_k = fields.get("src", (None, ""))
    if isinstance(src_v, dict):  # src: {src: ./code, exclude: [...]} or {bucket, key}
        if "src" not in src_v:
            proj.problems.append(
                (src_k, "src names a COS bucket/object: download the code and point src at it")
            )
            return None
        src_k, src_v = join_key(src_k, "src"), src_v["src"]
    code = base if src_v in (None, "") else (base / str(src_v))
    code = Path(os.path.normpath(code))
    if not code.is_dir():
        what = "src" if src_v not in (None, "") else "the project folder"
        proj.problems.append((src_k or where, f"{what}: code directory {code} does not exist"))
        return None
    kind, kind_k = fields.get("type", ("event", ""))
    runtime, runtime_k = fields.get("runtime", (None, ""))
    rt = str(runtime or "")
    if str(kind).lower() in ("web", "http"):
        boot = code / "scf_bootstrap"
        out.update(runtime="http", bootstrap=True, code=str(code))
        proj.origins[f"{table}.code"] = src_k or where
        if not boot.is_file():
            entry = fields.get("entryFile", (None, ""))[0]
            hint = (
                f' (entryFile "{entry}": e.g. "#!/bin/bash\\nexec python3 {entry}")'
                if entry
                else ""
            )
            proj.problems.append(
                (kind_k, f"web function {fname}: {boot} not found; SCF web functions start "
                         f"from an executable scf_bootstrap listening on port 9000{hint}")
            )  # fmt: skip
            return None
    elif rt == "" or rt.lower().startswith("python3"):
        out.update(runtime="python", code=str(code))
        proj.origins[f"{table}.code"] = src_k or where
        if rt == "":
            proj.note(table, "runtime", "not set: assumed Python 3")
        else:
            _python_version(proj, rt, runtime_k, fname)
        handler, handler_k = fields.get("handler", ("index.main_handler", where))
        out["handler"] = str(handler)
        proj.origins[f"{table}.handler"] = handler_k
        from bridge.models import handler_problems

        problem = handler_problems(code, str(handler))
        if problem:
            proj.problems.append((handler_k, problem))
    else:
        suggestion = (
            "turn it into a web function (type: web; scf_bootstrap starts any language on port "
            '9000) or define it in bridge.toml with runtime = "command"'
        )
        if rt.lower().startswith("python2"):
            msg = f"runtime {rt} cannot run here (local Python is {local_python()}): port it to Python 3, or {suggestion}"
        else:
            msg = f"runtime {rt}: only Python 3 event functions run here; {suggestion}"
        proj.problems.append((runtime_k, msg))
        return None
    for key, conf in (("timeout", "timeout"), ("memorySize", "memory"), ("msgTTL", None)):
        if key in fields and conf is not None:
            v, k = fields[key]
            n = _num(proj, v, k)
            if n is not None:
                out[conf] = _secs(n) if conf == "timeout" else f"{int(n)}MiB"
                proj.origins[f"{table}.{conf}"] = k
    env_v, env_k = fields.get("environment", (None, ""))
    if env_v is not None:
        out["environment"] = _env_vars(proj, env_v, env_k)
        proj.origins[f"{table}.environment"] = env_k
    _async_policy(proj, table, fields, out)
    layers_v, layers_k = fields.get("layers", (None, ""))
    if layers_v and out["runtime"] == "python":
        names = []
        for i, layer in enumerate(layers_v if isinstance(layers_v, list) else [layers_v]):
            lname = layer.get("name") if isinstance(layer, dict) else layer
            if not lname:
                proj.problems.append((f"{layers_k}[{i}]", "a layer needs a name"))
                continue
            names.append(str(lname))
        out["layers"] = names
        proj.origins[f"{table}.layers"] = layers_k
    elif layers_v:
        proj.note(table, layers_k, "layers are only attached to Python event functions")
    ns = fields.get("namespace", (None, ""))[0]
    if ns and out["runtime"] == "python":
        out["namespace"] = str(ns)
    cred, cred_k = fields.get("credentials", (None, ""))
    if cred and out["runtime"] == "python":
        if Path(os.path.expanduser(str(cred))).is_file():
            out["credentials_file"] = os.path.expanduser(str(cred))
            proj.origins[f"{table}.credentials_file"] = cred_k
        else:  # deploy credentials of another machine: not this function's business here
            proj.note(table, cred_k, f"{cred} not found (set credentials_file to pass keys)")
    for key in ("initTimeout", "asyncRunEnable", "entryFile"):
        if key in fields and not (key == "entryFile" and out["runtime"] == "http"):
            proj.note(table, fields[key][1], "not mapped (no local equivalent)")
    proj.functions[fname] = out
    return fname


def _python_version(proj: Project, rt: str, key: str, fname: str) -> None:
    m = re.match(r"python(\d+)\.?(\d+)?", rt.lower())
    want = f"{m.group(1)}.{m.group(2)}" if m and m.group(2) else None
    if want and want != local_python():
        proj.mismatched.setdefault(rt, []).append(fname)


def local_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _async_policy(
    proj: Project, table: str, fields: Mapping[str, tuple[Any, str]], out: dict[str, Any]
) -> None:
    """retryNum → retry_attempts, msgTTL → max_event_age, deadLetter → a note (local sink)."""
    policy: dict[str, Any] = {}
    if "retryNum" in fields:
        v, k = fields["retryNum"]
        n = _num(proj, v, k)
        if n is not None:
            policy["retry_attempts"] = int(n)
            proj.origins[f"{table}.async.retry_attempts"] = k
    if "msgTTL" in fields:
        v, k = fields["msgTTL"]
        n = _num(proj, v, k)
        if n is not None:
            policy["max_event_age"] = _secs(n)
            proj.origins[f"{table}.async.max_event_age"] = k
    if "deadLetter" in fields:
        v, k = fields["deadLetter"]
        if isinstance(v, dict) and v.get("name"):
            policy["dead_letter"] = "local"
            proj.note(
                table,
                k,
                f"{v.get('type', 'CMQ')} dead-letter queue {v['name']!r} → local dead letters "
                '(set dead_letter = "amqp://…" or "sqs://…" for a queue)',
            )
    if policy:
        out["async"] = policy


def check_web_ports(proj: Project) -> None:
    """SCF web functions all listen on 9000; locally each needs its own port."""
    port = 9000
    for fc in proj.functions.values():
        if fc.get("bootstrap"):
            fc["port"] = port
            port += 1


# --- triggers -------------------------------------------------------------------------------------


def _add_trigger(
    proj: Project, fname: str, tname: str | None, default: str, body: dict[str, Any], where: str
) -> str:
    name = _name(str(tname or default))
    if f"triggers.{name}" in proj.origins:
        name = _name(f"{fname}-{name}")
    n, i = name, 2
    while f"triggers.{n}" in proj.origins:
        n, i = f"{name}-{i}", i + 1
    proj.triggers[n] = {"type": body.get("type"), "function": fname, **body}
    proj.origins[f"triggers.{n}"] = where
    return n


def map_event(
    proj: Project, fname: str, etype: str, tname: str | None, params: Any, where: str
) -> None:
    """One trigger of function ``fname`` (``params`` normalized to camelCase keys)."""
    etype = etype.lower()
    pk = where
    if params is None:
        params = {}
    if not isinstance(params, dict):
        proj.problems.append((where, "trigger parameters must be a mapping"))
        return
    p = {k[0].lower() + k[1:]: v for k, v in params.items() if isinstance(k, str) and k}
    tname = tname or p.pop("name", None) if etype not in ("cmq", "ckafka") else tname
    raw_enable = p.pop("enable", None)
    if raw_enable is None and etype not in ("apigw", "http") and not proj.enable_by_default:
        raw_enable = False  # the components document enable: false as the default
        proj.enable_unset.append(f"{where} ({etype})")
    enabled = as_bool(True if raw_enable is None else raw_enable)
    if enabled is None:
        proj.problems.append((join_key(pk, "enable"), "expected true or false"))
        enabled = True
    body: dict[str, Any] = {} if enabled else {"enabled": False}
    used: set[str] = set()

    def take(key: str) -> Any:
        used.add(key)
        return p.get(key)

    if etype == "timer":
        cron = take("cronExpression") or take("cron")
        if not cron:
            proj.problems.append((join_key(pk, "cronExpression"), "required key is missing"))
            return
        body.update(type="timer", cron=str(cron))
        arg = take("argument") if p.get("argument") is not None else take("message")
        if arg is not None:
            body["message"] = _str(arg)
        t = _add_trigger(proj, fname, tname, "timer", body, where)
        proj.origins[f"triggers.{t}.cron"] = join_key(pk, "cronExpression")
    elif etype == "apigw":
        _apigw(proj, fname, tname, p, used, body, where)
        t = None
    elif etype == "http":
        body.update(type="function_url", path=f"/{fname}")
        used.update(("authType", "netConfig", "qualifier"))
        t = _add_trigger(proj, fname, tname, "http", body, where)
    elif etype == "cos":
        bucket = take("bucket") or tname
        if not bucket:
            proj.problems.append((join_key(pk, "bucket"), "required key is missing"))
            return
        m = _COS_HOST.match(str(bucket))
        flt = take("filter") or {}
        events = take("events") or "cos:ObjectCreated:*"
        body.update(type="cos", bucket=m.group("bucket") if m else str(bucket))
        if isinstance(flt, dict):
            flt = {k.lower(): v for k, v in flt.items()}
            if flt.get("prefix"):
                body["prefix"] = str(flt["prefix"])
            if flt.get("suffix"):
                body["suffix"] = str(flt["suffix"])
        body["events"] = [str(e) for e in (events if isinstance(events, list) else [events])]
        t = _add_trigger(proj, fname, tname, "cos", body, where)
    elif etype == "cmq":
        topic = take("name") or take("topic") or tname
        if not topic:
            proj.problems.append((join_key(pk, "name"), "required key is missing (the CMQ topic)"))
            return
        body.update(type="cmq", topic=str(topic))
        t = _add_trigger(proj, fname, tname, f"cmq-{topic}", body, where)
    elif etype == "ckafka":
        inst, topic = take("name") or take("instanceId"), take("topic")
        if not inst or not topic:
            key = "name" if not inst else "topic"
            proj.problems.append((join_key(pk, key), "required key is missing"))
            return
        body.update(type="ckafka", instance=str(inst), topic=str(topic))
        for key, conf in (("maxMsgNum", "batch_size"), ("retry", "retry_attempts")):
            if take(key) is not None:
                n = _num(proj, p[key], join_key(pk, key))
                if n is not None:
                    body[conf] = int(n)
        if take("offset") is not None:
            body["start"] = str(p["offset"])
        if take("timeout") is not None:
            n = _num(proj, p["timeout"], join_key(pk, "timeout"))
            if n is not None:
                body["batch_window"] = _secs(n)
        t = _add_trigger(proj, fname, tname, f"ckafka-{topic}", body, where)
    else:
        proj.problems.append(
            (where, f'unknown event type "{etype}" (supported: {", ".join(EVENT_TYPES)})')
        )
        return
    table = f"triggers.{t}" if t else f"triggers.({fname} apigw)"
    for key in p:
        if key not in used and key not in ("name", "qualifier", "description"):
            why = "cloud-only" if key in _CLOUD_ONLY else "not mapped"
            proj.note(table, join_key(pk, key), why)


def _apigw(
    proj: Project,
    fname: str,
    tname: str | None,
    p: dict[str, Any],
    used: set[str],
    body: dict[str, Any],
    where: str,
) -> None:
    used.update(("endpoints", "environment", "stageName", "serviceTimeout", "httpMethod"))
    used.update(("integratedResponse", "enableCORS", "path", "serviceId", "serviceName"))
    used.update(("protocols", "description", "netTypes"))
    endpoints = p.get("endpoints")
    if endpoints is None:  # template.yaml / Framework: one endpoint in the parameters
        endpoints = [
            {
                "path": p.get("path") or f"/{fname}",
                "method": p.get("httpMethod") or "ANY",
                "function": {"isIntegratedResponse": p.get("integratedResponse", False)},
                "serviceTimeout": p.get("serviceTimeout"),
                "enableCORS": p.get("enableCORS"),
            }
        ]
    if not isinstance(endpoints, list) or not endpoints:
        proj.problems.append((join_key(where, "endpoints"), "expected a list of endpoints"))
        return
    stage = p.get("environment") or p.get("stageName") or "release"
    for i, ep in enumerate(endpoints):
        ek = join_key(where, f"endpoints[{i}]") if "endpoints" in p else where
        if not isinstance(ep, dict) or not ep.get("path"):
            proj.problems.append((join_key(ek, "path"), "required key is missing"))
            continue
        fn: dict[str, Any] = ep["function"] if isinstance(ep.get("function"), dict) else {}
        integrated = as_bool(fn.get("isIntegratedResponse", False))
        method = ep.get("method") or "ANY"
        b = dict(body)
        b.update(
            type="apigw",
            path=str(ep["path"]),
            method=[str(m).upper() for m in method]
            if isinstance(method, list)
            else str(method).upper(),
            integrated_response=bool(integrated),
            stage=str(stage),
        )
        if ep.get("serviceTimeout") is not None:
            n = _num(proj, ep["serviceTimeout"], join_key(ek, "serviceTimeout"))
            if n is not None:
                b["timeout"] = _secs(n)
        if ep.get("enableCORS") is not None:
            b["cors"] = bool(as_bool(ep["enableCORS"]))
        if ep.get("isBase64Encoded") is not None:
            b["base64_request"] = "always" if as_bool(ep["isBase64Encoded"]) else "never"
        if str(ep.get("authType", "NONE")).upper() not in ("NONE", ""):
            proj.note(
                f"triggers.({fname} apigw)",
                join_key(ek, "authType"),
                'cloud-only (auth = "none" here)',
            )
        default = f"apigw-{i}" if len(endpoints) > 1 else "apigw"
        t = _add_trigger(
            proj, fname, tname and f"{tname}-{i}" if len(endpoints) > 1 else tname, default, b, ek
        )
        proj.origins[f"triggers.{t}.path"] = join_key(ek, "path")
        for key in ep:
            if key not in (
                "path",
                "method",
                "function",
                "serviceTimeout",
                "enableCORS",
                "isBase64Encoded",
                "authType",
            ):
                proj.note(
                    f"triggers.{t}",
                    join_key(ek, key),
                    "cloud-only" if key in _CLOUD_ONLY else "not mapped",
                )


def events_list(proj: Project, fname: str, events: Any, where: str) -> None:
    """``events: [{timer: {name, parameters}}, ...]`` (Components and Framework)."""
    if events is None:
        return
    if not isinstance(events, list):
        proj.problems.append((where, "events must be a list"))
        return
    for i, ev in enumerate(events):
        k = f"{where}[{i}]"
        if not isinstance(ev, dict) or len(ev) != 1:
            proj.problems.append((k, "each event is a mapping with one key, its type (e.g. timer)"))
            continue
        ((etype, spec),) = ev.items()
        spec = spec if isinstance(spec, dict) else {}
        params = spec.get("parameters", {k2: v for k2, v in spec.items() if k2 != "name"})
        pk = join_key(f"{k}.{etype}", "parameters") if "parameters" in spec else f"{k}.{etype}"
        map_event(proj, fname, str(etype), spec.get("name"), params, pk)


def note_rest(proj: Project, fname: str | None, fields: Mapping[str, tuple[Any, str]]) -> None:
    if fname is None:
        return
    for key, (_, k) in fields.items():
        if key not in _FN_KEYS:
            proj.note(f"functions.{fname}", k, "cloud-only" if key in _CLOUD_ONLY else "not mapped")
