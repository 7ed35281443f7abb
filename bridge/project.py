"""SCF projects as they are: ``serverless.yml`` and ``template.yaml`` read into config tables.

Four dialects are read, detected from their content:

- Serverless Components v2 ``component: scf`` (one function in ``inputs``, its triggers in
  ``inputs.events``), and the v1 form where a top-level key holds ``component:
  "@serverless/tencent-scf"``;
- ``component: multi-scf`` (``inputs.functions`` as a map or a list, ``inputs.triggers`` pointing
  at them);
- Serverless Framework with ``provider: tencent`` (``functions: NAME: {handler, runtime, events}``);
- the SCF CLI's ``template.yaml`` (``Resources`` holding ``TencentCloud::Serverless::Namespace``
  entries of ``TencentCloud::Serverless::Function`` resources; ``Globals.Function`` defaults).

:func:`load` turns one file into a :class:`Project`: raw ``[functions.NAME]`` and
``[triggers.NAME]`` tables in the shape ``bridge.toml`` uses, so the normal validation runs on
them. Object-storage, CMQ and CKafka triggers become the *cloud* trigger types ``cos``, ``cmq``
and ``ckafka``, which :mod:`bridge.bindings` maps to local sources. Every table remembers the
YAML key path it came from (``origins``) so that errors name the YAML file and key; every YAML
key that has no equivalent is noted (``notes``), and ``event-bridge import`` writes those notes
as comments.

Rules: YAML 1.1 booleans (``TRUE``, ``yes``) and the strings ``"TRUE"``/``"FALSE"`` are booleans;
``${env.X}`` is read from the environment; ``${name}``, ``${app}``, ``${stage}`` and ``${org}``
are the file's own top-level values (``stage`` defaults to ``dev``); any other variable is an
error naming it. Problems never stop the reading: every one is collected.

Not guaranteed: keys about the cloud itself (region, VPC, role, CLS logs, tags, provisioned
concurrency, ...) have no local meaning; they are noted, not applied.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: trigger types a project may use, by dialect spelling (lower-cased)
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
_VAR = re.compile(r"\$\{([^{}]*)\}")  # innermost first: ${output:${stage}:x} resolves in passes
_COS_HOST = re.compile(r"^(?P<bucket>[^.]+)\.cos(?:website)?\.[a-z0-9-]+\.myqcloud\.com/?$")
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]+")


@dataclasses.dataclass
class Project:
    """One project file read into config tables (see the module docstring)."""

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
    #: declared runtime → functions, when it is not the local Python version
    mismatched: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def where(self, key: str) -> str:
        """``serverless.yml: inputs.events[0].timer`` for a YAML key path."""
        return f"{self.path}: {key}" if key else str(self.path)

    def note(self, table: str, key: str, why: str) -> None:
        self.notes.setdefault(table, []).append(f"{key}: {why}")


# --- reading ------------------------------------------------------------------------------------


def read_yaml(path: Path) -> tuple[Any, str | None]:
    """The parsed document, or None and the reason (with line and column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "project file not found"
    except IsADirectoryError:
        return None, "is a directory, not a project file"
    except OSError as e:
        return None, f"cannot read: {e.strerror}"
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text: {e}"
    try:
        return yaml.safe_load(text), None  # YAML 1.1: TRUE, yes, on are booleans
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        return None, f"malformed YAML{at}: {e.problem or e.context}"
    except yaml.YAMLError as e:
        return None, f"malformed YAML: {e}"


def _resolve_vars(
    value: Any, key: str, env: Mapping[str, str], own: Mapping[str, str], proj: Project
) -> Any:
    """``${env.X}`` and the file's own ``${name}``/``${app}``/``${stage}``/``${org}``."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            expr = m.group(1).strip()
            if expr.startswith("env."):
                name = expr[4:]
                if name not in env:
                    proj.problems.append(
                        (key, f"environment variable {name} is not set (${{{expr}}})")
                    )
                    return ""
                return env[name]
            if expr in own:
                return own[expr]
            proj.problems.append(
                (key, f"unsupported variable ${{{expr}}}: only ${{env.NAME}} and the file's own "
                      "${name}, ${app}, ${stage}, ${org} are resolved here")
            )  # fmt: skip
            return ""

        for _ in range(5):
            before, value = value, _VAR.sub(sub, value)
            if value == before:
                break
        return value
    if isinstance(value, dict):
        return {k: _resolve_vars(v, _join(key, str(k)), env, own, proj) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_vars(v, f"{key}[{i}]", env, own, proj) for i, v in enumerate(value)]
    return value


def _join(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def load(path: Path, env: Mapping[str, str] | None = None) -> Project:
    """Read one project file; every problem is collected in ``Project.problems``."""
    proj = Project(path=path)
    doc, why = read_yaml(path)
    if why is not None:
        proj.problems.append(("", why))
        return proj
    if not isinstance(doc, dict):
        proj.problems.append(("", "not an SCF project: the file must hold a mapping"))
        return proj
    own = {k: str(doc[k]) for k in ("name", "app", "org", "stage") if isinstance(doc.get(k), str)}
    own.setdefault("stage", "dev")
    own.setdefault("app", own.get("name", ""))
    doc = _resolve_vars(doc, "", os.environ if env is None else env, own, proj)
    base = path.resolve().parent
    comp = str(doc.get("component", ""))
    provider = doc.get("provider")
    pname = provider.get("name") if isinstance(provider, dict) else provider
    if comp in ("scf", "@serverless/tencent-scf") or comp.startswith("scf@"):
        proj.dialect = "component: scf"
        _component_scf(proj, doc.get("inputs"), "inputs", base, doc)
    elif comp == "multi-scf" or comp.startswith("multi-scf@"):
        proj.dialect = "component: multi-scf"
        _multi_scf(proj, doc.get("inputs"), base)
    elif pname in ("tencent", "qcloud"):
        proj.dialect = "provider: tencent"
        _framework(proj, doc, base)
    elif isinstance(doc.get("Resources"), dict):
        proj.dialect = "template.yaml"
        _template(proj, doc, base)
    elif v1 := [
        k
        for k, v in doc.items()
        if isinstance(v, dict) and "tencent-scf" in str(v.get("component"))
    ]:
        proj.dialect = "component: @serverless/tencent-scf (v1)"
        for k in v1:
            _component_scf(proj, doc[k].get("inputs"), f"{k}.inputs", base, doc)
    elif comp:
        proj.problems.append(
            ("component", f'unsupported component "{comp}" (expected scf or multi-scf)')
        )
    else:
        proj.problems.append(
            ("", "not an SCF project: expected component: scf | multi-scf, provider: tencent, "
                 "or Resources with TencentCloud::Serverless::Namespace")
        )  # fmt: skip
    _check_web_ports(proj)
    if proj.mismatched:  # one warning for the whole file
        what = "; ".join(f"{rt} ({', '.join(fs)})" for rt, fs in proj.mismatched.items())
        proj.warnings.append(f"{what} run on the local Python {_local()}")
    return proj


def _dropped(proj: Project, events: Any, where: str) -> None:
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
        key = _join(key, "variables")
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


def _str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


# --- functions ------------------------------------------------------------------------------------

#: normalized function keys → the config key they become (the rest is handled in _function)
_FN_KEYS = {
    "name", "src", "handler", "runtime", "timeout", "memorySize", "initTimeout", "environment",
    "layers", "deadLetter", "retryNum", "msgTTL", "asyncRunEnable", "type", "entryFile",
    "events", "namespace", "credentials",
}  # fmt: skip


def _function(
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
        src_k, src_v = _join(src_k, "src"), src_v["src"]
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
        from bridge.config import handler_problems

        problem = handler_problems(code, str(handler))
        if problem:
            proj.problems.append((handler_k, problem))
    else:
        suggestion = (
            "turn it into a web function (type: web; scf_bootstrap starts any language on port "
            '9000) or define it in bridge.toml with runtime = "command"'
        )
        if rt.lower().startswith("python2"):
            msg = f"runtime {rt} cannot run here (local Python is {_local()}): port it to Python 3, or {suggestion}"
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
        out["credentials_file"] = os.path.expanduser(str(cred))
        proj.origins[f"{table}.credentials_file"] = cred_k
    for key in ("initTimeout", "asyncRunEnable", "entryFile"):
        if key in fields and not (key == "entryFile" and out["runtime"] == "http"):
            proj.note(table, fields[key][1], "not mapped (no local equivalent)")
    proj.functions[fname] = out
    return fname


def _python_version(proj: Project, rt: str, key: str, fname: str) -> None:
    m = re.match(r"python(\d+)\.?(\d+)?", rt.lower())
    want = f"{m.group(1)}.{m.group(2)}" if m and m.group(2) else None
    if want and want != _local():
        proj.mismatched.setdefault(rt, []).append(fname)


def _local() -> str:
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


def _check_web_ports(proj: Project) -> None:
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


def _event(
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
    enabled = as_bool(p.pop("enable", True))
    if enabled is None:
        proj.problems.append((_join(pk, "enable"), "expected true or false"))
        enabled = True
    body: dict[str, Any] = {} if enabled else {"enabled": False}
    used: set[str] = set()

    def take(key: str) -> Any:
        used.add(key)
        return p.get(key)

    if etype == "timer":
        cron = take("cronExpression") or take("cron")
        if not cron:
            proj.problems.append((_join(pk, "cronExpression"), "required key is missing"))
            return
        body.update(type="timer", cron=str(cron))
        if take("argument") is not None:
            body["message"] = _str(p["argument"])
        t = _add_trigger(proj, fname, tname, "timer", body, where)
        proj.origins[f"triggers.{t}.cron"] = _join(pk, "cronExpression")
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
            proj.problems.append((_join(pk, "bucket"), "required key is missing"))
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
            proj.problems.append((_join(pk, "name"), "required key is missing (the CMQ topic)"))
            return
        body.update(type="cmq", topic=str(topic))
        t = _add_trigger(proj, fname, tname, f"cmq-{topic}", body, where)
    elif etype == "ckafka":
        inst, topic = take("name") or take("instanceId"), take("topic")
        if not inst or not topic:
            key = "name" if not inst else "topic"
            proj.problems.append((_join(pk, key), "required key is missing"))
            return
        body.update(type="ckafka", instance=str(inst), topic=str(topic))
        for key, conf in (("maxMsgNum", "batch_size"), ("retry", "retry_attempts")):
            if take(key) is not None:
                n = _num(proj, p[key], _join(pk, key))
                if n is not None:
                    body[conf] = int(n)
        if take("offset") is not None:
            body["start"] = str(p["offset"])
        if take("timeout") is not None:
            n = _num(proj, p["timeout"], _join(pk, "timeout"))
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
            proj.note(table, _join(pk, key), why)


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
        proj.problems.append((_join(where, "endpoints"), "expected a list of endpoints"))
        return
    stage = p.get("environment") or p.get("stageName") or "release"
    for i, ep in enumerate(endpoints):
        ek = _join(where, f"endpoints[{i}]") if "endpoints" in p else where
        if not isinstance(ep, dict) or not ep.get("path"):
            proj.problems.append((_join(ek, "path"), "required key is missing"))
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
            n = _num(proj, ep["serviceTimeout"], _join(ek, "serviceTimeout"))
            if n is not None:
                b["timeout"] = _secs(n)
        if ep.get("enableCORS") is not None:
            b["cors"] = bool(as_bool(ep["enableCORS"]))
        if ep.get("isBase64Encoded") is not None:
            b["base64_request"] = "always" if as_bool(ep["isBase64Encoded"]) else "never"
        if str(ep.get("authType", "NONE")).upper() not in ("NONE", ""):
            proj.note(
                f"triggers.({fname} apigw)",
                _join(ek, "authType"),
                'cloud-only (auth = "none" here)',
            )
        default = f"apigw-{i}" if len(endpoints) > 1 else "apigw"
        t = _add_trigger(
            proj, fname, tname and f"{tname}-{i}" if len(endpoints) > 1 else tname, default, b, ek
        )
        proj.origins[f"triggers.{t}.path"] = _join(ek, "path")
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
                    _join(ek, key),
                    "cloud-only" if key in _CLOUD_ONLY else "not mapped",
                )


def _events_list(proj: Project, fname: str, events: Any, where: str) -> None:
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
        pk = _join(f"{k}.{etype}", "parameters") if "parameters" in spec else f"{k}.{etype}"
        _event(proj, fname, str(etype), spec.get("name"), params, pk)


# --- dialects -------------------------------------------------------------------------------------


def _fields(
    mapping: Mapping[str, Any], where: str, rename: Mapping[str, str] | None = None
) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for k, v in mapping.items():
        key = (rename or {}).get(k, k)
        out[key] = (v, _join(where, k))
    return out


def _note_rest(proj: Project, fname: str | None, fields: Mapping[str, tuple[Any, str]]) -> None:
    if fname is None:
        return
    for key, (_, k) in fields.items():
        if key not in _FN_KEYS:
            proj.note(f"functions.{fname}", k, "cloud-only" if key in _CLOUD_ONLY else "not mapped")


def _component_scf(
    proj: Project, inputs: Any, where: str, base: Path, doc: Mapping[str, Any]
) -> None:
    if not isinstance(inputs, dict):
        proj.problems.append((where, "required key is missing (the function's inputs)"))
        return
    fields = _fields(inputs, where, {"codeUri": "src", "namesapce": "namespace"})
    name = inputs.get("name") or doc.get("name") or "function"
    fname = _function(proj, str(name), fields, base, where)
    _note_rest(proj, fname, fields)
    if fname is not None:
        _events_list(proj, fname, inputs.get("events"), _join(where, "events"))
    else:
        _dropped(proj, inputs.get("events"), _join(where, "events"))


def _multi_scf(proj: Project, inputs: Any, base: Path) -> None:
    if not isinstance(inputs, dict):
        proj.problems.append(("inputs", "required key is missing"))
        return
    common = {k: v for k, v in inputs.items() if k not in ("functions", "triggers")}
    cfields = _fields(common, "inputs", {"environments": "environment"})
    functions = inputs.get("functions")
    if isinstance(functions, list):
        items = [
            (str(f.get("name", i)) if isinstance(f, dict) else str(i), f, f"inputs.functions[{i}]")
            for i, f in enumerate(functions)
        ]
    elif isinstance(functions, dict):
        items = [(str(k), v, f"inputs.functions.{k}") for k, v in functions.items()]
    else:
        proj.problems.append(("inputs.functions", "required key is missing (a map of functions)"))
        return
    names: dict[str, str] = {}
    broken: set[str] = set()
    for key, body, where in items:
        if not isinstance(body, dict):
            proj.problems.append((where, "a function must be a mapping"))
            continue
        fields = {**cfields, **_fields(body, where, {"environments": "environment"})}
        fname = _function(proj, str(body.get("name", key)), fields, base, where)
        _note_rest(proj, fname, _fields(body, where))
        if fname is not None:
            names[key] = names[str(body.get("name", key))] = fname
            _events_list(proj, fname, body.get("events"), _join(where, "events"))
        else:
            broken.add(key)
            broken.add(str(body.get("name", key)))
    triggers = inputs.get("triggers") or []
    for i, trig in enumerate(triggers if isinstance(triggers, list) else []):
        k = f"inputs.triggers[{i}]"
        if not isinstance(trig, dict) or "type" not in trig:
            proj.problems.append((_join(k, "type"), "required key is missing"))
            continue
        ref = trig.get("function")
        ref = ref.get("name") if isinstance(ref, dict) else ref
        if ref is None and len(names) == 1:
            ref = next(iter(names))
        if str(ref) in broken:
            _dropped(proj, [{trig["type"]: None}], f"inputs.triggers[{i}]")
            continue
        if str(ref) not in names:
            proj.problems.append(
                (
                    _join(k, "function"),
                    f'unknown function "{ref}" (defined: {", ".join(sorted(names)) or "none"})',
                )
            )
            continue
        params = trig.get("parameters", {})
        _event(proj, names[str(ref)], str(trig["type"]), None, params, _join(k, "parameters"))


def _framework(proj: Project, doc: Mapping[str, Any], base: Path) -> None:
    provider = doc.get("provider") if isinstance(doc.get("provider"), dict) else {}
    assert isinstance(provider, dict)
    pfields = _fields(
        {
            k: v
            for k, v in provider.items()
            if k in ("runtime", "timeout", "memorySize", "environment", "credentials")
        },
        "provider",
    )
    functions = doc.get("functions")
    if not isinstance(functions, dict) or not functions:
        proj.problems.append(("functions", "required key is missing (a map of functions)"))
        return
    for key, body in functions.items():
        where = f"functions.{key}"
        if not isinstance(body, dict):
            proj.problems.append((where, "a function must be a mapping"))
            continue
        own = _fields(body, where)
        fname = _function(proj, str(key), {**pfields, **own}, base, where)
        _note_rest(proj, fname, own)
        if fname is not None:
            _events_list(proj, fname, body.get("events"), _join(where, "events"))
        else:
            _dropped(proj, body.get("events"), _join(where, "events"))


_TEMPLATE_KEYS = {
    "CodeUri": "src", "Handler": "handler", "Runtime": "runtime", "Timeout": "timeout",
    "MemorySize": "memorySize", "Environment": "environment", "Type": "type", "Layers": "layers",
    "InitTimeout": "initTimeout", "DeadLetterConfig": "deadLetter", "AsyncRunEnable": "asyncRunEnable",
}  # fmt: skip


def _template(proj: Project, doc: Mapping[str, Any], base: Path) -> None:
    glob = doc.get("Globals", {}) or {}
    gfn = glob.get("Function", {}) if isinstance(glob, dict) else {}
    gfields = _fields(gfn if isinstance(gfn, dict) else {}, "Globals.Function", _TEMPLATE_KEYS)
    found = False
    resources = doc["Resources"]
    for ns, nbody in resources.items():
        if (
            not isinstance(nbody, dict)
            or nbody.get("Type") != "TencentCloud::Serverless::Namespace"
        ):
            proj.problems.append(
                (f"Resources.{ns}", "expected Type: TencentCloud::Serverless::Namespace")
            )
            continue
        for fkey, fbody in nbody.items():
            if fkey == "Type":
                continue
            where = f"Resources.{ns}.{fkey}"
            if (
                not isinstance(fbody, dict)
                or fbody.get("Type") != "TencentCloud::Serverless::Function"
            ):
                proj.problems.append(
                    (_join(where, "Type"), "expected TencentCloud::Serverless::Function")
                )
                continue
            found = True
            props = fbody.get("Properties") or {}
            pwhere = _join(where, "Properties")
            own = _fields({k: v for k, v in props.items() if k != "Events"}, pwhere, _TEMPLATE_KEYS)
            fields = {**gfields, **own, "namespace": (ns, f"Resources.{ns}")}
            if "environment" in fields and isinstance(fields["environment"][0], dict):
                v, k = fields["environment"]
                fields["environment"] = ({"variables": v.get("Variables", {})}, k)
            if str(fields.get("type", ("Event", ""))[0]).upper() == "HTTP":
                fields["type"] = ("web", fields["type"][1])
            fname = _function(proj, str(fkey), fields, base, where)
            _note_rest(proj, fname, own)
            events = props.get("Events") or {}
            if fname is None:
                _dropped(proj, events, _join(pwhere, "Events"))
            if fname is None or not isinstance(events, dict):
                continue
            for tname, ev in events.items():
                k = _join(pwhere, f"Events.{tname}")
                if not isinstance(ev, dict) or "Type" not in ev:
                    proj.problems.append((_join(k, "Type"), "required key is missing"))
                    continue
                params = dict(ev.get("Properties") or {})
                if "Cron" in params and "CronExpression" not in params:
                    params["CronExpression"] = params.pop("Cron")
                _event(proj, fname, str(ev["Type"]), str(tname), params, _join(k, "Properties"))
    if not found and not proj.problems:
        proj.problems.append(("Resources", "no TencentCloud::Serverless::Function found"))


# --- include = [...] ------------------------------------------------------------------------------


@dataclasses.dataclass
class Expanded:
    """A config document with its included projects merged in (see :func:`expand`)."""

    data: dict[str, Any]
    problems: list[tuple[str, str]]
    #: config key path → "file: YAML key path", for error messages
    origins: dict[str, str]
    warnings: list[str]
    files: list[Path]


def display(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def expand(
    data: Mapping[str, Any], base_dir: Path, env: Mapping[str, str] | None, toml: str
) -> Expanded:
    """Merge the projects named by ``include`` into ``data``'s functions and triggers.

    A name defined twice (in the TOML and a project, or in two projects) is a problem naming
    both files; ``[overrides.functions.NAME]`` / ``[overrides.triggers.NAME]`` tables are merged
    key by key over what a project defined.
    """
    out = dict(data)
    exp = Expanded(out, [], {}, [], [])
    inc = out.pop("include", [])
    overrides = out.pop("overrides", {})
    if isinstance(inc, str):
        inc = [inc]
    if not isinstance(inc, list) or not all(isinstance(i, str) for i in inc):
        exp.problems.append(
            ("include", "must be a list of project files (serverless.yml, template.yaml)")
        )
        return exp
    owner: dict[str, str] = {}
    for kind in ("functions", "triggers"):
        tables = out.get(kind)
        out[kind] = (
            dict(tables) if isinstance(tables, dict) else tables if tables is not None else {}
        )
        if isinstance(tables, dict):
            owner.update({f"{kind}.{n}": toml for n in tables})
    for i, rel in enumerate(inc):
        full = Path(os.path.normpath(base_dir / os.path.expanduser(rel)))
        exp.files.append(full)
        proj = load(full, env)
        proj.path = Path(display(full))
        exp.problems += [(proj.where(k), m) for k, m in proj.problems]
        exp.warnings += [f"{proj.path}: {w}" for w in proj.warnings]
        if proj.problems and not proj.functions:
            continue
        for kind, tables in (("functions", proj.functions), ("triggers", proj.triggers)):
            if not isinstance(out[kind], dict):
                continue
            for name, body in tables.items():
                key = f"{kind}.{name}"
                if key in owner:
                    exp.problems.append(
                        (f"include[{i}]", f"{key} is defined in both {owner[key]} and {proj.path}")
                    )
                    continue
                owner[key] = str(proj.path)
                out[kind][name] = body
        for key, where in proj.origins.items():
            exp.origins[key] = proj.where(where)
    if not isinstance(overrides, dict):
        exp.problems.append(
            ("overrides", "must hold [overrides.functions.NAME] / [overrides.triggers.NAME] tables")
        )
        return exp
    for kind, tables in overrides.items():
        if kind not in ("functions", "triggers") or not isinstance(tables, dict):
            exp.problems.append(
                (f"overrides.{kind}", "expected overrides.functions or overrides.triggers tables")
            )
            continue
        for name, body in tables.items():
            target = out[kind].get(name) if isinstance(out[kind], dict) else None
            if not isinstance(target, dict) or not isinstance(body, dict):
                exp.problems.append(
                    (f"overrides.{kind}.{name}", f"no included {kind[:-1]} of that name")
                )
                continue
            merged = dict(target)
            for k, v in body.items():
                merged[k] = (
                    {**merged[k], **v}
                    if isinstance(v, dict) and isinstance(merged.get(k), dict)
                    else v
                )
                exp.origins[f"{kind}.{name}.{k}"] = f"{toml}: overrides.{kind}.{name}.{k}"
            out[kind][name] = merged
    return exp


_LAST_PART = re.compile(r"(\[\d+\]|\.[^.\[]*)$")


def locate(loc: str, origins: Mapping[str, str]) -> str:
    """A config key path named by where it came from: ``file: YAML.key [config.key]``."""
    if not origins:
        return loc
    probe = loc
    while probe:
        if probe in origins:
            return origins[probe] if probe == loc else f"{origins[probe]} [{loc}]"
        shorter = _LAST_PART.sub("", probe)
        probe = shorter if shorter != probe else ""
    return loc
