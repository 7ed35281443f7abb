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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from bridge.scfmap import (
    Project,
    check_web_ports,
    dropped,
    events_list,
    join_key,
    local_python,
    map_event,
    map_function,
    merge_env,
    note_rest,
)

_VAR = re.compile(r"\$\{([^{}]*)\}")  # innermost first: ${output:${stage}:x} resolves in passes


class DeferredEnv(Mapping[str, str]):
    """The environment for ``import``: ``${env.X}`` in an environment variable's value becomes
    a marker that :func:`bridge.scaffold.to_toml` writes as TOML's own ``${X}`` (read when the
    TOML is loaded, so a secret stays out of the file); anywhere else (names, buckets) it is
    read now."""

    MARK = "\x00env:"

    def __init__(self, real: Mapping[str, str]) -> None:
        self.real = real

    def __getitem__(self, name: str) -> str:
        return self.real[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.real)

    def __len__(self) -> int:
        return len(self.real)


_ENV_VALUE = re.compile(
    r"(^|\.)(environment|Environment)(\.(variables|Variables))?\.[^.]+$|environments\[\d+\]\.value$"
)


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
                if isinstance(env, DeferredEnv) and _ENV_VALUE.search(key):
                    return f"{DeferredEnv.MARK}{name}\x00"
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
        return {
            k: _resolve_vars(v, join_key(key, str(k)), env, own, proj) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_vars(v, f"{key}[{i}]", env, own, proj) for i, v in enumerate(value)]
    return value


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
        proj.enable_by_default = False
        _component_scf(proj, doc.get("inputs"), "inputs", base, doc)
    elif comp == "multi-scf" or comp.startswith("multi-scf@"):
        proj.dialect = "component: multi-scf"
        proj.enable_by_default = False
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
        proj.enable_by_default = False
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
    check_web_ports(proj)
    if proj.enable_unset:
        proj.warnings.append(
            "enable is not set, and the scf component's default is false: not run (add "
            "enable: true): " + ", ".join(proj.enable_unset)
        )
    if proj.mismatched:  # one warning for the whole file
        what = "; ".join(f"{rt} ({', '.join(fs)})" for rt, fs in proj.mismatched.items())
        proj.warnings.append(f"{what} run on the local Python {local_python()}")
    return proj


# --- dialects -------------------------------------------------------------------------------------


def _fields(
    mapping: Mapping[str, Any], where: str, rename: Mapping[str, str] | None = None
) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for k, v in mapping.items():
        key = (rename or {}).get(k, k)
        out[key] = (v, join_key(where, k))
    return out


def _component_scf(
    proj: Project, inputs: Any, where: str, base: Path, doc: Mapping[str, Any]
) -> None:
    if not isinstance(inputs, dict):
        proj.problems.append((where, "required key is missing (the function's inputs)"))
        return
    fields = _fields(inputs, where, {"codeUri": "src", "namesapce": "namespace"})
    name = inputs.get("name") or doc.get("name") or "function"
    fname = map_function(proj, str(name), fields, base, where)
    note_rest(proj, fname, fields)
    if fname is not None:
        events_list(proj, fname, inputs.get("events"), join_key(where, "events"))
    else:
        dropped(proj, inputs.get("events"), join_key(where, "events"))


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
        own = _fields(body, where, {"environments": "environment"})
        fields = {**cfields, **own}
        env = merge_env(proj, cfields.get("environment"), own.get("environment"))
        if env is not None:
            fields["environment"] = env
        fname = map_function(proj, str(body.get("name", key)), fields, base, where)
        note_rest(proj, fname, own)
        if fname is not None:
            names[key] = names[str(body.get("name", key))] = fname
            events_list(proj, fname, body.get("events"), join_key(where, "events"))
        else:
            broken.add(key)
            broken.add(str(body.get("name", key)))
    triggers = inputs.get("triggers") or []
    for i, trig in enumerate(triggers if isinstance(triggers, list) else []):
        k = f"inputs.triggers[{i}]"
        if not isinstance(trig, dict) or "type" not in trig:
            proj.problems.append((join_key(k, "type"), "required key is missing"))
            continue
        ref = trig.get("function")
        ref = ref.get("name") if isinstance(ref, dict) else ref
        if ref is None and len(names) == 1:
            ref = next(iter(names))
        if str(ref) in broken:
            dropped(proj, [{trig["type"]: None}], f"inputs.triggers[{i}]")
            continue
        if str(ref) not in names:
            proj.problems.append(
                (
                    join_key(k, "function"),
                    f'unknown function "{ref}" (defined: {", ".join(sorted(names)) or "none"})',
                )
            )
            continue
        params = trig.get("parameters", {})
        map_event(proj, names[str(ref)], str(trig["type"]), None, params, join_key(k, "parameters"))


def _framework(proj: Project, doc: Mapping[str, Any], base: Path) -> None:
    provider = doc.get("provider") if isinstance(doc.get("provider"), dict) else {}
    assert isinstance(provider, dict)
    kept = ("runtime", "timeout", "memorySize", "environment", "credentials")
    pfields = _fields({k: v for k, v in provider.items() if k in kept}, "provider")
    # noted on each function as its own keys are (region, role, ...); name and stage are used
    prest = _fields(
        {k: v for k, v in provider.items() if k not in kept and k not in ("name", "stage")},
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
        fields = {**pfields, **own}
        env = merge_env(proj, pfields.get("environment"), own.get("environment"))
        if env is not None:
            fields["environment"] = env
        fname = map_function(proj, str(key), fields, base, where)
        note_rest(proj, fname, prest)
        note_rest(proj, fname, own)
        if fname is not None:
            events_list(proj, fname, body.get("events"), join_key(where, "events"))
        else:
            dropped(proj, body.get("events"), join_key(where, "events"))


_TEMPLATE_KEYS = {
    "CodeUri": "src", "Handler": "handler", "Runtime": "runtime", "Timeout": "timeout",
    "MemorySize": "memorySize", "Environment": "environment", "Type": "type", "Layers": "layers",
    "InitTimeout": "initTimeout", "DeadLetterConfig": "deadLetter", "AsyncRunEnable": "asyncRunEnable",
    "Description": "description", "VpcConfig": "vpcConfig", "Role": "role",
}  # fmt: skip


def _variables(field: tuple[Any, str] | None) -> tuple[Any, str] | None:
    """template.yaml's ``Environment: {Variables: {...}}`` as the other dialects write it."""
    if field is not None and isinstance(field[0], dict) and "Variables" in field[0]:
        return {"variables": field[0]["Variables"]}, field[1]
    return field


def _template(proj: Project, doc: Mapping[str, Any], base: Path) -> None:
    glob = doc.get("Globals") or {}
    gfn = glob.get("Function") or {} if isinstance(glob, dict) else {}
    if not isinstance(glob, dict) or not isinstance(gfn, dict):
        where = "Globals" if not isinstance(glob, dict) else "Globals.Function"
        proj.problems.append((where, "must be a mapping"))
        gfn = {}
    gfields = _fields(
        {k: v for k, v in gfn.items() if k != "Events"}, "Globals.Function", _TEMPLATE_KEYS
    )
    if gfn.get("Events"):
        proj.warnings.append(
            "Globals.Function.Events is not applied: define these triggers under each "
            "function's Events"
        )
    found = False
    resources = doc["Resources"]
    if not isinstance(resources, dict):
        proj.problems.append(("Resources", "must be a mapping of namespaces"))
        return
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
                    (join_key(where, "Type"), "expected TencentCloud::Serverless::Function")
                )
                continue
            found = True
            props = fbody.get("Properties") or {}
            pwhere = join_key(where, "Properties")
            if not isinstance(props, dict):
                proj.problems.append((pwhere, "must be a mapping (CodeUri, Handler, ...)"))
                continue
            own = _fields({k: v for k, v in props.items() if k != "Events"}, pwhere, _TEMPLATE_KEYS)
            fields = {**gfields, **own, "namespace": (ns, f"Resources.{ns}")}
            env = merge_env(
                proj, _variables(gfields.get("environment")), _variables(own.get("environment"))
            )
            if env is not None:
                fields["environment"] = env
            if str(fields.get("type", ("Event", ""))[0]).upper() == "HTTP":
                fields["type"] = ("web", fields["type"][1])
            fname = map_function(proj, str(fkey), fields, base, where)
            # what Globals gave it that has no local meaning is noted as its own keys are
            note_rest(proj, fname, {k: v for k, v in gfields.items() if k not in own})
            note_rest(proj, fname, own)
            events = props.get("Events") or {}
            ewhere = join_key(pwhere, "Events")
            if not isinstance(events, dict):
                proj.problems.append((ewhere, "must be a mapping of trigger names to triggers"))
                continue
            if fname is None:
                dropped(proj, events, ewhere)
                continue
            for tname, ev in events.items():
                k = join_key(ewhere, str(tname))
                if not isinstance(ev, dict) or "Type" not in ev:
                    proj.problems.append((join_key(k, "Type"), "required key is missing"))
                    continue
                params = ev.get("Properties")
                if isinstance(params, dict):
                    params = dict(params)
                    if "Cron" in params and "CronExpression" not in params:
                        params["CronExpression"] = params.pop("Cron")
                map_event(
                    proj, fname, str(ev["Type"]), str(tname), params, join_key(k, "Properties")
                )
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
                if kind == "functions" and body.get("bootstrap"):
                    body["port"] = _free_port(out["functions"], name)
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


def _free_port(functions: Mapping[str, Any], name: str) -> int:
    """SCF web functions all listen on 9000; here each gets the next port nobody uses."""
    used = {
        int(fc.get("port", 9000))
        for n, fc in functions.items()
        if n != name and isinstance(fc, dict) and fc.get("bootstrap")
    }
    port = 9000
    while port in used:
        port += 1
    return port


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
