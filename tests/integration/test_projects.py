"""SCF projects end to end: ``run -c serverless.yml``, ``include`` with bindings to a real
RabbitMQ queue and a directory, the gateway in front of apigw endpoints, per-function
requirements (a wheel built here: no network), layers, ``import``, ``init`` and bad input."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import free_port

from .conftest import cli, wait_for

pytestmark = pytest.mark.integration

PROJECTS = Path(__file__).resolve().parent.parent / "projects"
BROKER = "amqp://guest:guest@127.0.0.1:5672/"
NO_INDEX = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def copy(name: str, dest: Path) -> Path:
    shutil.copytree(PROJECTS / name, dest / name)
    return dest / name


def records(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def test_run_serverless_yml_directly_timers_and_context(tmp_path: Path, daemon: Any) -> None:
    # Given the component-scf timer project, run as it is (state beside the file)
    proj = copy("scf-timer", tmp_path)
    out = tmp_path / "out.jsonl"
    d = daemon(proj / "serverless.yml", STAGE="dev", OUT=str(out))
    d.wait_log(r"ready:", timeout=30)
    # When the every-second timer fired twice
    recs = wait_for(lambda: len(records(out)) >= 2 and records(out), 30, "two timer invocations")
    # Then the argument arrived as Message, the disabled timer never ran
    assert all(r["event"]["Message"] == '{"job": "report"}' for r in recs)
    assert {r["event"]["TriggerName"] for r in recs} == {"every-second"}
    r = recs[0]
    assert r["function"] == "report-dev" and r["namespace"] == "default"
    assert r["memory"] == 256 and r["time_limit"] == 20000 and 0 < r["remaining"] <= 20000
    assert r["version"] == "$LATEST" and r["request_id"]
    assert r["cwd"] == str(proj / "src")  # working directory = code folder
    assert (proj / "state").is_dir()
    assert "Python3.6 (report-dev) run on the local Python" in d.log()
    assert d.stop() == 0
    v = cli("validate", "-c", str(proj / "serverless.yml"), env={"STAGE": "dev", "OUT": "x"})
    assert v.returncode == 0, v.stderr
    assert "disabled: triggers.paused (timer -> report-dev) is not run" in v.stdout


def publish(queue: str, body: bytes) -> None:
    import aio_pika

    async def go() -> None:
        conn = await aio_pika.connect(BROKER, timeout=10)
        try:
            ch = await conn.channel()
            await ch.declare_queue(queue, durable=True)
            await ch.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
        finally:
            await conn.close()

    asyncio.run(go())


def delete_queue(queue: str) -> None:
    import aio_pika

    async def go() -> None:
        conn = await aio_pika.connect(BROKER, timeout=10)
        try:
            ch = await conn.channel()
            await ch.queue_delete(queue)
        finally:
            await conn.close()

    asyncio.run(go())


def test_cmq_through_a_bound_amqp_queue_and_cos_through_a_directory(
    tmp_path: Path, daemon: Any
) -> None:
    copy("scf-cmq", tmp_path)
    copy("scf-cos", tmp_path)
    topic = f"eb-test-cmq-{uuid.uuid4().hex[:8]}"
    (tmp_path / "photos").mkdir()
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        'include = ["scf-cmq/serverless.yml", "scf-cos/serverless.yml"]\n'
        '[daemon]\nstate_dir = "state"\nshutdown_grace = "5s"\n'
        f'[bindings.cmq."{topic}"]\ntype = "amqp"\nurl = "{BROKER}"\n'
        '[bindings.cos."photos-1250000000"]\ntype = "filesystem"\npath = "photos"\n'
        'settle = "100ms"\n'
    )
    out = tmp_path / "out.jsonl"
    d = daemon(cfg, OUT=str(out), TOPIC=topic)
    try:
        d.wait_log(r"ready:", timeout=30)
        publish(topic, "订单 42".encode())
        (tmp_path / "photos" / "uploads").mkdir()
        (tmp_path / "photos" / "uploads" / "skip.png").write_text("no")
        (tmp_path / "photos" / "uploads" / "cat.jpg").write_text("meow")

        def got() -> list[dict[str, Any]]:
            recs = records(out)
            cmq = [r for r in recs if "msgBody" in r]
            cos = [r for r in recs if "event" in r]
            return recs if cmq and cos else []

        recs = wait_for(got, 30, "the CMQ and COS invocations")
        assert [r["msgBody"] for r in recs if "msgBody" in r] == ["订单 42"]
        cos = [r["event"]["Records"][0]["cos"] for r in recs if "event" in r]
        assert [c["cosObject"]["key"] for c in cos] == ["/1250000000/photos/uploads/cat.jpg"]
        assert cos[0]["cosBucket"]["name"] == "photos"
        assert d.stop() == 0
    finally:
        delete_queue(topic)


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_apigw_html_page_and_json_api_with_path_parameters(tmp_path: Path, daemon: Any) -> None:
    copy("scf-apigw-html", tmp_path)
    copy("scf-apigw-json", tmp_path)
    port = free_port()
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        'include = ["scf-apigw-html/serverless.yml", "scf-apigw-json/serverless.yml"]\n'
        f'[daemon]\nstate_dir = "state"\n[gateway]\nlisten = "127.0.0.1:{port}"\n'
    )
    d = daemon(cfg)
    d.wait_log(r"ready:", timeout=30)
    # An integrated response: the HTML page the function reads from ./demo.html
    status, headers, body = http_get(f"http://127.0.0.1:{port}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<h1>Hello from SCF</h1>" in body
    # Passthrough: the handler's dict comes back as JSON, path parameters filled in
    status, headers, body = http_get(f"http://127.0.0.1:{port}/users/42")
    assert status == 200
    assert json.loads(body) == {"id": "42", "method": "GET", "path": "/users/42"}
    # status shows the routes the gateway serves, not an outage
    st = json.loads(cli("status", "--json", "-c", str(cfg)).stdout)
    served = {n: t for n, t in st["triggers"].items() if t["type"] == "apigw"}
    assert len(served) == 3 and all(t["connected"] for t in served.values()), served
    assert "GET /users/{id}" in {t["route"] for t in served.values()}
    human = cli("status", "-c", str(cfg)).stdout
    assert "not connected" not in human and "serving GET /users/{id}" in human, human
    assert d.stop() == 0


def build_wheel(where: Path) -> Path:
    """A pure-python wheel written by hand: pip installs it without any index."""
    files = {
        "tinypkg/__init__.py": 'VERSION = "0.1.0"\n',
        "tinypkg-0.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1.0\n",
        "tinypkg-0.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append("tinypkg-0.1.0.dist-info/RECORD,,")
    where.mkdir(parents=True, exist_ok=True)
    whl = where / "tinypkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("tinypkg-0.1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return whl


def test_requirements_are_installed_for_the_function_and_cached(tmp_path: Path) -> None:
    proj = copy("scf-deps", tmp_path)
    build_wheel(proj / "src" / "wheels")
    (proj / "src" / "requirements.txt").write_text("./wheels/tinypkg-0.1.0-py3-none-any.whl\n")
    yml = str(proj / "serverless.yml")
    # install builds ahead of time, with progress
    r = cli("install", "-c", yml, env=NO_INDEX, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "deps: installing" in r.stderr and "Successfully installed tinypkg" in r.stderr
    env_dir = Path(r.stdout.strip().split(": ", 1)[1])
    assert env_dir.parent == proj / "state" / "deps"
    # a second install reuses the environment
    r = cli("install", "-c", yml, env=NO_INDEX)
    assert r.returncode == 0 and "installing" not in r.stderr
    # the function imports it; the daemon's venv does not have it
    r = cli("invoke", "-c", yml, "deps", env=NO_INDEX)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tiny"] == "0.1.0" and result["file"].startswith(str(env_dir))
    import importlib.util

    assert importlib.util.find_spec("tinypkg") is None
    # a package bundled in the code folder wins, as in SCF
    (proj / "src" / "tinypkg").mkdir()
    (proj / "src" / "tinypkg" / "__init__.py").write_text('VERSION = "bundled"\n')
    r = cli("invoke", "-c", yml, "deps", env=NO_INDEX)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tiny"] == "bundled"


def test_failed_install_names_the_package_and_only_stops_that_function(
    tmp_path: Path, daemon: Any
) -> None:
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    for d, req in ((good, None), (bad, "surely-not-a-package-eb==9.9\n")):
        d.mkdir()
        (d / "index.py").write_text(
            "import json, os\n\ndef main_handler(event, context):\n"
            "    with open(os.environ['OUT'], 'a') as f:\n"
            "        f.write(json.dumps({'fn': context.function_name}) + '\\n')\n"
        )
        if req:
            (d / "requirements.txt").write_text(req)
    out = tmp_path / "out.jsonl"
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        '[daemon]\nstate_dir = "state"\n'
        f'[functions.good]\ncode = "good"\nenvironment = {{ OUT = "{out}" }}\n'
        f'[functions.bad]\ncode = "bad"\nenvironment = {{ OUT = "{out}" }}\n'
        '[triggers.tick]\ntype = "timer"\nfunction = "good"\ncron = "@every 1s"\n'
    )
    r = cli("install", "-c", str(cfg), "bad", env=NO_INDEX, timeout=120)
    assert r.returncode == 1
    assert "no matching distribution for surely-not-a-package-eb==9.9" in r.stderr
    d = daemon(cfg, **NO_INDEX)
    d.wait_log(r"ready:", timeout=60)
    wait_for(lambda: records(out), 30, "the good function to run")
    assert "function bad: installing" in d.log()
    assert "surely-not-a-package-eb==9.9" in d.log() and "does not start" in d.log()
    assert {r["fn"] for r in records(out)} == {"good"}
    assert d.stop() == 0


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_layer_is_importable(tmp_path: Path, kind: str) -> None:
    proj = copy("scf-layers", tmp_path)
    layer = proj / "layer"
    if kind == "zip":
        z = tmp_path / "common.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for f in layer.rglob("*"):
                zf.write(f, f.relative_to(layer))
        shutil.rmtree(layer)
        layer = z
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        'include = ["scf-layers/serverless.yml"]\n'
        f'[layers.common]\npath = "{layer}"\n'
        f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    r = cli("invoke", "-c", str(cfg), "layered")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"greeting": "hello scf from a layer"}


def test_credentials_file_reaches_the_function_and_not_the_log(tmp_path: Path) -> None:
    proj = copy("scf-cos", tmp_path)
    cred = tmp_path / "credentials"
    cred.write_text('{"secretId": "AKIDtest-id-123", "secretKey": "very-secret-key-456"}\n')
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        'include = ["scf-cos/serverless.yml"]\n'
        f'[overrides.functions.thumbs]\ncredentials_file = "{cred}"\n'
    )
    out = tmp_path / "out.jsonl"
    r = cli("invoke", "-c", str(cfg), "thumbs", env={"OUT": str(out)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["secret_id"] == "AKIDtest-id-123"
    assert "very-secret-key-456" not in r.stderr
    assert proj.is_dir()


def test_import_every_fixture_through_the_cli(tmp_path: Path) -> None:
    env = {"STAGE": "dev", "OUT": "/tmp/x", "TOPIC": "t"}
    files = sorted(p for p in PROJECTS.rglob("*.y*ml") if "bad" not in p.parts)
    for f in files:
        out = tmp_path / f.parent.name / "bridge.toml"
        r = cli("import", str(f), "-o", str(out), env=env)
        assert r.returncode == 0, (f, r.stderr)
        assert "Traceback" not in r.stderr
        assert out.read_text().startswith("# Imported from")


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("malformed.yml", "malformed YAML at line 4"),
        ("unknown-event.yml", 'inputs.events[0].mqtt.parameters: unknown event type "mqtt"'),
        ("missing-src.yml", "inputs.src: src: code directory"),
        ("missing-handler.yml", 'inputs.handler: entry file "main.py" not found'),
        ("unresolved-var.yml", "inputs.environment.variables.DB: unsupported variable"),
    ],
)
def test_bad_project_exits_78_naming_file_and_key(name: str, where: str) -> None:
    r = cli("validate", "-c", str(PROJECTS / "bad" / name))
    assert r.returncode == 78
    assert f"{name}: {where}" in r.stderr
    assert "Traceback" not in r.stderr


def test_unbound_trigger_exits_78_unless_skipped() -> None:
    yml = str(PROJECTS / "scf-cos" / "serverless.yml")
    r = cli("validate", "-c", yml, env={"OUT": "x"})
    assert r.returncode == 78
    assert 'trigger cos: a COS bucket "photos-1250000000" is not bound' in r.stderr
    assert '[bindings.cos."photos-1250000000"]' in r.stderr
    r = cli("validate", "--skip-unbound", "-c", yml, env={"OUT": "x"})
    assert r.returncode == 0, r.stderr
    assert "triggers.cos is not run" in r.stderr


def test_operator_commands_ignore_an_unbound_trigger(tmp_path: Path) -> None:
    # a project run with --skip-unbound: the commands that read its state work on it too
    yml = str(copy("scf-cos", tmp_path) / "serverless.yml")
    r = cli("dlq", "list", "-c", yml, env={"OUT": "x"})
    assert r.returncode == 0, r.stderr
    assert "not bound" not in r.stderr
    # and one about that trigger says why it does not run
    for command in ("fire", "next"):
        r = cli(command, "cos", "-c", yml, env={"OUT": "x"})
        assert r.returncode == 2
        assert 'trigger "cos" is not run: a COS bucket "photos-1250000000" is not bound' in (
            r.stderr
        )


@pytest.mark.parametrize("template", ["timer", "cos", "cmq", "apigw", "web"])
def test_init_runs_first_try(tmp_path: Path, daemon: Any, template: str) -> None:
    target = tmp_path / f"app{uuid.uuid4().hex[:8]}"  # the CMQ topic (queue) is named after it
    r = cli("init", "--template", template, str(target))
    assert r.returncode == 0, r.stderr
    cfg = target / "bridge.toml"
    port = free_port()
    if template in ("apigw", "web"):  # the default listen may be taken on a shared machine
        cfg.write_text(cfg.read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
    d = daemon(cfg)
    d.wait_log(r"ready:", timeout=60)
    if template == "timer":
        d.wait_log(r"got \{", timeout=30)
    elif template == "cos":
        (target / "bucket" / "hello.txt").write_text("hi")
        d.wait_log(r"hello\.txt", timeout=30)
    elif template == "cmq":
        try:
            publish(f"{target.name}-topic", b"from rabbit")
            d.wait_log(r"from rabbit", timeout=30)
        finally:
            delete_queue(f"{target.name}-topic")
    else:
        status, _, body = http_get(f"http://127.0.0.1:{port}/")
        assert status == 200 and body
    assert d.stop() == 0
    assert not os.path.exists(target / "state" / "deps")  # nothing to install


def test_init_ckafka_and_every_template_validate(tmp_path: Path) -> None:
    for template in ("timer", "apigw", "cos", "cmq", "ckafka", "web"):
        target = tmp_path / template
        assert cli("init", "--template", template, str(target)).returncode == 0
        r = cli("validate", "-c", str(target / "bridge.toml"))
        assert r.returncode == 0, (template, r.stderr)
    again = cli("init", "--template", "timer", str(tmp_path / "timer"))
    assert again.returncode == 1 and "exists" in again.stderr


def test_status_lists_the_disabled_project_timer(tmp_path: Path, daemon: Any) -> None:
    copy("scf-timer", tmp_path)
    port = free_port()
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        'include = ["scf-timer/serverless.yml"]\n[daemon]\nstate_dir = "state"\n'
        f'[api]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
        '[[api.tokens]]\nname = "ops"\nsecret = "status-token-0123456789"\nactions = ["read"]\n'
    )
    env = {"STAGE": "dev", "OUT": str(tmp_path / "out.jsonl")}
    d = daemon(cfg, **env)
    d.wait_log(r"ready:", timeout=30)
    r = cli("status", "-c", str(cfg), env=env)
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.strip().startswith("trigger")}
    assert lines["paused"].rstrip().endswith("disabled")
    assert "disabled" not in lines["every-second"]
    assert d.stop() == 0
