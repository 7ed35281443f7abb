"""``event-bridge import`` (an SCF project written as bridge.toml) and ``event-bridge init``.

:func:`to_toml` writes what :func:`bridge.project.load` read: every function and trigger table,
a comment above each table for every YAML key that was not mapped (and why), commented-out
``[bindings]`` and ``[layers]`` templates for the cloud resources and layers the project uses,
and at the end every function or trigger that could not be imported, with the reason. Paths are
written relative to the output file's folder.

:func:`init` writes a small project (``serverless.yml``, ``src/index.py``, a ``bridge.toml``
that includes it and binds its cloud resource to a local directory or broker) that
``event-bridge run -c DIR/bridge.toml`` runs as it is.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.bindings import CLOUD_TYPES, binding_hint
from bridge.scfmap import Project

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_str(v: str) -> str:
    """A string value: ``$`` escaped for interpolation, deferred variables as ``${X}``."""
    v = v.replace("$", "$$")
    return re.sub("\x00env:([^\x00]*)\x00", lambda m: "${" + m.group(1) + "}", v)


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(_toml_str(k), ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
        )
    return json.dumps(_toml_str(str(v)), ensure_ascii=False)


def _table(header: str, body: Mapping[str, Any], notes: list[str]) -> list[str]:
    lines = [f"[{header}]"]
    lines += [f"# {n}" for n in notes]
    subtables = {k: v for k, v in body.items() if isinstance(v, dict) and k in ("async", "retry")}
    for k, v in body.items():
        if k not in subtables:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in subtables.items():
        lines += ["", f"[{header}.{k}]", *(f"{_key(sk)} = {_value(sv)}" for sk, sv in v.items())]
    return [*lines, ""]


def _rel(path: str, out_dir: Path) -> str:
    rel = os.path.relpath(path, out_dir)
    return path if rel.startswith("../../..") else rel


def to_toml(proj: Project, out_dir: Path) -> str:
    """``proj`` as bridge.toml text (see the module docstring)."""
    lines = [
        f"# Imported from {proj.path} ({proj.dialect or 'unknown dialect'}) by event-bridge import.",
        '# "cloud-only": meaningful only in Tencent Cloud; "not mapped": no equivalent here.',
        "",
    ]
    layers: set[str] = set()
    for name, body in proj.functions.items():
        body = dict(body)
        for key in ("code", "credentials_file"):
            if key in body:
                body[key] = _rel(body[key], out_dir)
        layers.update(body.get("layers", []))
        lines += _table(f"functions.{name}", body, proj.notes.get(f"functions.{name}", []))
    resources: dict[tuple[str, str], str] = {}
    for name, body in proj.triggers.items():
        notes = list(proj.notes.get(f"triggers.{name}", []))
        notes += (
            proj.notes.get(f"triggers.({body['function']} apigw)", [])
            if body.get("type") == "apigw"
            else []
        )
        if body.get("type") in CLOUD_TYPES:
            key = CLOUD_TYPES[body["type"]][0]
            resources[(body["type"], body[key])] = name
            notes.append(f'bound to a local source by [bindings.{body["type"]}."{body[key]}"]')
        if body.get("enabled") is False:
            notes.append("disabled in the project (enable: false): validated, never run")
        lines += _table(f"triggers.{name}", body, notes)
    if resources:
        lines += ["# Cloud resources: bind each to a local source (edit, then uncomment).", ""]
        for (kind, res), trig in resources.items():
            lines.append(f"# used by triggers.{trig}")
            lines += [f"# {ln}" for ln in binding_hint(kind, res).splitlines()]
            lines.append("")
    if layers:
        lines += ["# Layers: point each at its folder or zip (edit, then uncomment).", ""]
        for layer in sorted(layers):
            lines += [f"# [layers.{_key(layer)}]", f'# path = "layers/{layer}"', ""]
    if proj.problems:
        lines += ["# NOT IMPORTED (fix the project, or define these by hand):"]
        lines += [f"#   {proj.where(k)}: {m}".replace("\n", "\n#     ") for k, m in proj.problems]
        lines.append("")
    if proj.warnings:
        lines += ["# Warnings:", *(f"#   {w}" for w in proj.warnings), ""]
    return "\n".join(lines)


# --- init -------------------------------------------------------------------------------------------

TEMPLATES = ("timer", "apigw", "cos", "cmq", "ckafka", "web")

_INDEX = """\
import json


def main_handler(event, context):
    print("%s got %s" % (context.function_name, json.dumps(event)[:2000]))
    {body}
"""
_BODIES = {
    "timer": 'return {"message": event.get("Message"), "time": event.get("Time")}',
    "apigw": 'return {"isBase64Encoded": False, "statusCode": 200,\n'
    '            "headers": {"Content-Type": "text/html"}, "body": "<h1>Hello from SCF</h1>"}',
    "cos": 'return [r["cos"]["cosObject"]["key"] for r in event["Records"]]',
    "cmq": 'return [r["CMQ"]["msgBody"] for r in event["Records"]]',
    "ckafka": 'return [r["Ckafka"]["msgBody"] for r in event["Records"]]',
}
_EVENTS = {
    "timer": """\
    - timer:
        parameters:
          name: every-10s
          cronExpression: '*/10 * * * * * *'
          enable: true
          argument: hello""",
    "apigw": """\
    - apigw:
        parameters:
          protocols: [http]
          environment: release
          endpoints:
            - path: /
              method: GET
              function:
                isIntegratedResponse: true""",
    "cos": """\
    - cos:
        parameters:
          bucket: uploads-1250000000.cos.ap-guangzhou.myqcloud.com
          events: 'cos:ObjectCreated:*'
          enable: true""",
    "cmq": """\
    - cmq:
        parameters:
          name: {name}-topic
          enable: true""",
    "ckafka": """\
    - ckafka:
        parameters:
          name: ckafka-local
          topic: {name}
          maxMsgNum: 100
          offset: latest
          retry: 3
          timeout: 1
          enable: true""",
}
_BINDINGS = {
    "cos": '[bindings.cos."uploads-1250000000"]\ntype = "filesystem"\npath = "bucket"\n',
    "cmq": '[bindings.cmq."{name}-topic"]\ntype = "amqp"\nurl = "amqp://guest:guest@127.0.0.1:5672/"\n',
    "ckafka": '[bindings.ckafka."ckafka-local"]\ntype = "kafka"\nbootstrap_servers = "127.0.0.1:9092"\n',
}
_WEB = """\
import http.server, json, os


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "function": os.environ.get("SCF_FUNCTIONNAME")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "9000"))), Handler).serve_forever()
"""


def init(template: str, directory: Path, gateway_listen: str = "127.0.0.1:8080") -> list[Path]:
    """Write the project; refuses to overwrite existing files. Returns the files written."""
    name = re.sub(r"[^a-z0-9-]+", "-", directory.resolve().name.lower()).strip("-") or "app"
    if not name[0].isalpha():
        name = f"app-{name}"
    files: dict[str, str] = {}
    src = "src"
    if template == "web":
        inputs = f"  name: {name}\n  src: ./{src}\n  type: web\n  entryFile: app.py\n  runtime: Python3.9\n"
        events = _EVENTS["apigw"].replace(
            "isIntegratedResponse: true", "isIntegratedResponse: false"
        )
        files[f"{src}/app.py"] = _WEB
        files[f"{src}/scf_bootstrap"] = "#!/bin/bash\nexec python3 app.py\n"
    else:
        inputs = (
            f"  name: {name}\n  src: ./{src}\n  handler: index.main_handler\n  runtime: Python3.9\n"
            "  timeout: 3\n  memorySize: 128\n"
        )
        events = _EVENTS[template].replace("{name}", name)
        files[f"{src}/index.py"] = _INDEX.format(body=_BODIES[template])
    files["serverless.yml"] = (
        f"component: scf\nname: {name}\nstage: dev\n\ninputs:\n{inputs}"
        f"  environment:\n    variables:\n      STAGE: dev\n  events:\n{events}\n"
    )
    toml = textwrap.dedent(
        """\
        # Runs the SCF project in serverless.yml here: event-bridge run -c bridge.toml
        include = ["serverless.yml"]

        [daemon]
        state_dir = "state"
        """
    )
    if template in ("apigw", "web"):
        toml += f'\n[gateway]\nlisten = "{gateway_listen}"\n'
    if template in _BINDINGS:
        toml += "\n" + _BINDINGS[template].replace("{name}", name)
    files["bridge.toml"] = toml
    written = []
    for rel in files:
        p = directory / rel
        if p.exists():
            raise FileExistsError(f"{p} exists; init writes only new files")
    for rel, text in files.items():
        p = directory / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        if p.name == "scf_bootstrap":
            p.chmod(0o755)
        written.append(p)
    if template == "cos":
        (directory / "bucket").mkdir(exist_ok=True)
    return written
