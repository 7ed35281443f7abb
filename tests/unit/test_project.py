"""SCF project files (tests/projects): the four dialects, their mapping onto config tables,
bindings, include, overrides, import's TOML, bad input, credentials and layers."""

from __future__ import annotations

import json
import tomllib
import zipfile
from pathlib import Path

import pytest

from bridge import bindings, config, deps, project, scaffold
from bridge.errors import ConfigError, DependencyError

PROJECTS = Path(__file__).resolve().parent.parent / "projects"
ENV = {"STAGE": "dev", "OUT": "/tmp/out.jsonl", "TOPIC": "orders"}

#: fixture → (dialect, functions, triggers, problems): every trigger of the file is either
#: a table or a problem naming it with the reason
EXPECTED = {
    "scf-timer/serverless.yml": ("component: scf", 1, 2, 0),
    "scf-apigw-html/serverless.yml": ("component: scf", 1, 1, 0),
    "scf-apigw-json/serverless.yml": ("component: scf", 1, 2, 0),
    "scf-cos/serverless.yml": ("component: scf", 1, 1, 0),
    "scf-cmq/serverless.yml": ("component: scf", 1, 1, 0),
    "scf-ckafka/serverless.yml": ("component: scf", 1, 1, 0),
    "scf-web/serverless.yml": ("component: scf", 1, 1, 0),
    "scf-nodejs/serverless.yml": ("component: scf", 0, 0, 2),
    "scf-layers/serverless.yml": ("component: scf", 1, 1, 0),
    "scf-deps/serverless.yml": ("component: scf", 1, 0, 0),
    "scf-v1/serverless.yml": ("component: @serverless/tencent-scf (v1)", 1, 2, 0),
    "multi-scf/serverless.yml": ("component: multi-scf", 2, 3, 0),
    "multi-scf-list/serverless.yml": ("component: multi-scf", 2, 2, 1),
    "fw-python/serverless.yml": ("provider: tencent", 1, 3, 0),
    "fw-mixed/serverless.yml": ("provider: tencent", 1, 2, 2),
    "tpl-basic/template.yaml": ("template.yaml", 1, 3, 0),
    "tpl-globals/template.yaml": ("template.yaml", 1, 3, 0),
    "tpl-http/template.yaml": ("template.yaml", 1, 1, 0),
}


def load(rel: str) -> project.Project:
    return project.load(PROJECTS / rel, ENV)


def test_at_least_fifteen_fixtures_in_four_dialects() -> None:
    files = sorted(p for p in PROJECTS.rglob("*.y*ml") if "bad" not in p.parts)
    assert len(files) >= 15
    assert {str(p.relative_to(PROJECTS)) for p in files} == set(EXPECTED)
    assert {d.split(" (")[0].split(":")[0] for d, *_ in EXPECTED.values()} == {
        "component",
        "provider",
        "template.yaml",
    }


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_import_every_fixture(rel: str, tmp_path: Path) -> None:
    dialect, n_fn, n_trig, n_problems = EXPECTED[rel]
    proj = load(rel)
    assert proj.dialect == dialect
    assert (len(proj.functions), len(proj.triggers), len(proj.problems)) == (
        n_fn,
        n_trig,
        n_problems,
    ), proj.problems
    for _key, msg in proj.problems:  # a reason, not a bare failure
        assert "trigger" in msg or "runtime" in msg or "unknown event type" in msg
    text = scaffold.to_toml(proj, tmp_path)
    doc = tomllib.loads(text)  # the output is TOML
    assert set(doc.get("functions", {})) == set(proj.functions)
    assert set(doc.get("triggers", {})) == set(proj.triggers)
    for _key, msg in proj.problems:
        assert msg.splitlines()[0] in text  # named with the reason in the file itself


def test_component_timer_mapping() -> None:
    proj = load("scf-timer/serverless.yml")
    fn = proj.functions["report-dev"]  # ${name}-${stage}, stage from ${env.STAGE}
    assert fn["timeout"] == "20s" and fn["memory"] == "256MiB"
    assert fn["environment"] == {"OUT": "/tmp/out.jsonl", "MODE": "true"}
    assert proj.triggers["every-second"]["message"] == '{"job": "report"}'
    assert proj.triggers["paused"]["enabled"] is False  # enable: FALSE
    assert "enabled" not in proj.triggers["every-second"]  # enable: TRUE
    assert any("initTimeout" in n for n in proj.notes["functions.report-dev"])
    assert len(proj.warnings) == 1 and "Python3.6" in proj.warnings[0]


def test_apigw_endpoints_map_to_gateway_keys() -> None:
    html = load("scf-apigw-html/serverless.yml").triggers["apigw"]
    assert html == {
        "type": "apigw", "function": "site", "path": "/", "method": "GET",
        "integrated_response": True, "stage": "release", "timeout": "10s", "cors": True,
    }  # fmt: skip
    api = load("scf-apigw-json/serverless.yml").triggers
    assert api["apigw-0"]["path"] == "/users/{id}"
    assert api["apigw-0"]["integrated_response"] is False
    assert api["apigw-1"]["method"] == ["POST", "PUT"]
    assert load("scf-layers/serverless.yml").triggers["http"] == {
        "type": "function_url",
        "function": "layered",
        "path": "/layered",
    }


def test_cloud_triggers_and_async_policy() -> None:
    cos = load("scf-cos/serverless.yml").triggers["cos"]
    assert cos == {
        "type": "cos", "function": "thumbs", "bucket": "photos-1250000000",
        "prefix": "uploads/", "suffix": ".jpg", "events": ["cos:ObjectCreated:*"],
    }  # fmt: skip
    cmq = load("scf-cmq/serverless.yml")
    assert cmq.triggers["cmq-orders"]["topic"] == "orders"
    assert cmq.functions["orders"]["async"] == {
        "retry_attempts": 1,
        "max_event_age": "3600s",
        "dead_letter": "local",
    }
    kafka = load("scf-ckafka/serverless.yml").triggers["ckafka-clicks"]
    assert kafka == {
        "type": "ckafka", "function": "stream", "instance": "ckafka-2o10hua5", "topic": "clicks",
        "batch_size": 999, "retry_attempts": 10, "start": "latest", "batch_window": "60s",
    }  # fmt: skip


def test_template_yaml_globals_cron_and_string_booleans() -> None:
    proj = load("tpl-globals/template.yaml")
    fn = proj.functions["nightly"]
    assert fn["timeout"] == "30s" and fn["environment"] == {"GLOBAL": "true"}
    assert fn["namespace"] == "jobs"
    assert proj.triggers["nightly"]["cron"] == "0 0 3 * * * *"  # Cron spelling
    assert "enabled" not in proj.triggers["nightly"]  # Enable: 'TRUE'
    assert proj.triggers["queue"]["enabled"] is False  # Enable: 'FALSE'


def test_web_functions_get_their_own_ports() -> None:
    fn = load("scf-web/serverless.yml").functions["webapp"]
    assert fn["runtime"] == "http" and fn["bootstrap"] is True and fn["port"] == 9000


@pytest.mark.parametrize(
    ("rel", "where", "words"),
    [
        ("bad/malformed.yml", "bad/malformed.yml", ["malformed YAML", "line 4"]),
        ("bad/unknown-event.yml", "inputs.events[0].mqtt", ['unknown event type "mqtt"']),
        ("bad/missing-src.yml", "inputs.src", ["does-not-exist", "does not exist"]),
        ("bad/missing-handler.yml", "inputs.handler", ['entry file "main.py" not found']),
        ("bad/unresolved-var.yml", "inputs.environment.variables.DB", ["${output:"]),
        ("bad/unresolved-var.yml", "inputs.environment.variables.KEY", ["EVENT_BRIDGE_SURELY"]),
    ],
)
def test_bad_input_names_file_and_key(rel: str, where: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(PROJECTS / rel, env={})
    line = next((ln for ln in str(exc.value).splitlines()[1:] if where in ln), None)
    assert line is not None, str(exc.value)
    assert rel in line
    for w in words:
        assert w in line


def test_validation_errors_point_into_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "index.py").write_text("def main_handler(e, c):\n    return e\n")
    (tmp_path / "serverless.yml").write_text(
        "component: scf\ninputs:\n  name: x\n  src: ./\n  runtime: Python3.11\n  events:\n"
        "    - timer:\n        parameters:\n          cronExpression: '0 61 * * * * *'\n"
    )
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path / "serverless.yml", env={})
    assert "serverless.yml: inputs.events[0].timer.parameters.cronExpression" in str(exc.value)


def toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bridge.toml"
    p.write_text(text)
    return p


def test_include_with_bindings_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    p = toml(
        tmp_path,
        f"""
include = ["{PROJECTS}/scf-cos/serverless.yml", "{PROJECTS}/scf-cmq/serverless.yml"]
[bindings.cos."photos-1250000000"]
type = "filesystem"
path = "photos"
[bindings.cmq.orders]
type = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/"
[overrides.functions.thumbs]
concurrency = 2
""",
    )
    c = config.load(p, env=ENV)
    fs = c.triggers["cos"]
    assert fs.type == "filesystem" and fs.path == [tmp_path / "photos"]  # type: ignore[attr-defined]
    assert fs.patterns == ["uploads/*.jpg"] and fs.bucket == "photos"  # type: ignore[attr-defined]
    assert fs.appid == "1250000000"  # type: ignore[attr-defined]
    assert c.triggers["cmq-orders"].queue == "orders"  # type: ignore[attr-defined]
    assert c.functions["thumbs"].concurrency == 2
    assert c.functions["orders"].async_.retry_attempts == 1


def test_unbound_trigger_is_a_config_error_naming_what_to_add(tmp_path: Path) -> None:
    p = toml(tmp_path, f'include = ["{PROJECTS}/scf-cos/serverless.yml"]\n')
    with pytest.raises(ConfigError) as exc:
        config.load(p, env=ENV)
    msg = str(exc.value)
    assert "scf-cos/serverless.yml: inputs.events[0].cos.parameters" in msg
    assert "trigger cos" in msg and '"photos-1250000000"' in msg
    assert '[bindings.cos."photos-1250000000"]' in msg and "bridge.toml" in msg
    c = config.load(p, env=ENV, skip_unbound=True)
    assert "cos" not in c.triggers and "triggers.cos" in c.skipped


def test_name_clash_names_both_files(tmp_path: Path) -> None:
    p = toml(
        tmp_path,
        f'include = ["{PROJECTS}/scf-cos/serverless.yml"]\n'
        '[functions.thumbs]\nruntime = "command"\ncommand = ["true"]\n',
    )
    with pytest.raises(ConfigError) as exc:
        config.load(p, env=ENV, skip_unbound=True)
    assert "functions.thumbs is defined in both" in str(exc.value)
    assert "bridge.toml" in str(exc.value) and "scf-cos/serverless.yml" in str(exc.value)


def test_wrong_binding_type_and_unknown_kind() -> None:
    trig = {"t": {"type": "cmq", "function": "f", "topic": "q"}}
    _, problems, _, _ = bindings.resolve(
        trig, {"cmq": {"q": {"type": "kafka"}}, "mqtt": {}}, toml="bridge.toml"
    )
    text = "\n".join(f"{k}: {m}" for k, m in problems)
    assert 'bindings.cmq."q".type: a CMQ topic binds to amqp or aws_sqs' in text
    assert "bindings.mqtt" in text


def test_ckafka_binding_maps_batch_start_retry_and_window() -> None:
    proj = load("scf-ckafka/serverless.yml")
    out, problems, _, _ = bindings.resolve(
        proj.triggers,
        {"ckafka": {"ckafka-2o10hua5": {"type": "kafka", "bootstrap_servers": "127.0.0.1:9"}}},
        toml="bridge.toml",
    )
    assert not problems
    t = out["ckafka-clicks"]
    assert t["type"] == "kafka" and t["topic"] == "clicks" and t["batch_size"] == 999
    assert t["start"] == "latest" and t["batch_window"] == "60s"
    assert t["retry"] == {"retry_attempts": 10}


def test_layers_section_and_unknown_layer(tmp_path: Path) -> None:
    p = toml(
        tmp_path,
        f'include = ["{PROJECTS}/scf-layers/serverless.yml"]\n'
        f'[layers.common]\npath = "{PROJECTS}/scf-layers/layer"\n',
    )
    c = config.load(p, env=ENV)
    assert c.functions["layered"].layers == [PROJECTS / "scf-layers" / "layer"]  # type: ignore[attr-defined]
    p.write_text(f'include = ["{PROJECTS}/scf-layers/serverless.yml"]\n')
    with pytest.raises(ConfigError) as exc:
        config.load(p, env=ENV)
    assert 'unknown layer "common"' in str(exc.value)
    assert "scf-layers/serverless.yml: inputs.layers" in str(exc.value)


def test_zip_layer_is_extracted_once_with_exec_bits(tmp_path: Path) -> None:
    z = tmp_path / "layer.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("python/lib_in_zip.py", "X = 1\n")
        info = zipfile.ZipInfo("bin/tool")
        info.external_attr = 0o755 << 16
        zf.writestr(info, "#!/bin/sh\n")
    root = deps.layer_root(z, tmp_path / "state")
    assert (root / "python" / "lib_in_zip.py").is_file()
    assert (root / "bin" / "tool").stat().st_mode & 0o111
    assert deps.layer_root(z, tmp_path / "state") == root


@pytest.mark.parametrize(
    "text",
    [
        '{"secretId": "AKIDabcdef123", "secretKey": "sekret-value-1", "token": "tok-123456"}',
        "[default]\ntencent_appid = 1\ntencent_secret_id = AKIDabcdef123\n"
        "tencent_secret_key = sekret-value-1\ntencent_token = tok-123456\n",
        "TENCENTCLOUD_SECRETID=AKIDabcdef123\nTENCENTCLOUD_SECRETKEY='sekret-value-1'\n"
        "TENCENTCLOUD_SESSIONTOKEN=tok-123456\n",
    ],
    ids=["tccli-json", "serverless-ini", "env"],
)
def test_credentials_files(text: str, tmp_path: Path) -> None:
    f = tmp_path / "cred"
    f.write_text(text)
    assert deps.read_credentials(f) == {
        "TENCENTCLOUD_SECRETID": "AKIDabcdef123",
        "TENCENTCLOUD_SECRETKEY": "sekret-value-1",
        "TENCENTCLOUD_SESSIONTOKEN": "tok-123456",
    }
    from bridge import log

    assert "sekret-value-1" not in log.redact("key sekret-value-1 here")


def test_credentials_errors_never_show_the_secret(tmp_path: Path) -> None:
    f = tmp_path / "cred"
    f.write_text("secret_key = only-a-key-no-id\n")
    with pytest.raises(DependencyError) as exc:
        deps.read_credentials(f)
    assert "only-a-key" not in str(exc.value) and str(f) in str(exc.value)


def test_failed_package_is_named() -> None:
    lines = [
        "Collecting surely-missing==1.0",
        "ERROR: Could not find a version that satisfies the requirement surely-missing==1.0",
        "ERROR: No matching distribution found for surely-missing==1.0",
    ]
    assert deps._failed_package(lines) == "no matching distribution for surely-missing==1.0"


def test_import_output_keeps_relative_paths() -> None:
    proj = load("tpl-basic/template.yaml")
    out = PROJECTS / "conf"  # not written: paths are made relative to it
    text = scaffold.to_toml(proj, out)
    doc = tomllib.loads(text)
    code = doc["functions"]["hello"]["code"]
    assert not code.startswith("/") and (out / code).resolve() == PROJECTS / "tpl-basic/hello"
    assert '# [bindings.cos."xxx-1250000000"]' in text
    assert json.dumps("cos:ObjectCreated:*") in text


def test_components_default_enable_to_false_with_one_warning() -> None:
    proj = load("multi-scf/serverless.yml")
    assert proj.triggers["cmq-demo-topic"]["enabled"] is False  # no enable: key
    assert "enabled" not in proj.triggers["timer1"]  # enable: true
    assert "enabled" not in proj.triggers["users"]  # apigw has no enable
    (warning,) = [w for w in proj.warnings if "enable is not set" in w]
    assert "inputs.triggers[2].parameters (cmq)" in warning
    # the Framework and template.yaml enable triggers unless told otherwise
    assert "enabled" not in load("fw-mixed/serverless.yml").triggers["cmq_trigger"]


@pytest.mark.parametrize("rel", sorted(r for r, e in EXPECTED.items() if e[3] == 0))
def test_imported_toml_is_a_valid_config(rel: str) -> None:
    # Given the TOML import writes (environment variables deferred to load time)
    proj = project.load(PROJECTS / rel, project.DeferredEnv(ENV))
    doc = tomllib.loads(scaffold.to_toml(proj, PROJECTS))
    if any(fc.get("layers") for fc in doc.get("functions", {}).values()):
        doc["layers"] = {"common": {"path": str(PROJECTS / "scf-layers" / "layer")}}
    # Then it loads, with cloud triggers skipped until bound
    c = config.parse(doc, base_dir=PROJECTS, env=ENV, skip_unbound=True)
    assert set(c.functions) == set(proj.functions)
    cloud = {n for n, t in proj.triggers.items() if t["type"] in bindings.CLOUD_TYPES}
    assert set(c.triggers) | cloud == set(proj.triggers)


def test_import_defers_environment_values_but_not_names() -> None:
    proj = project.load(PROJECTS / "scf-timer/serverless.yml", project.DeferredEnv(ENV))
    text = scaffold.to_toml(proj, PROJECTS)
    assert 'OUT = "${OUT}"' in text  # read when the TOML is loaded
    assert "[functions.report-dev]" in text  # a name is resolved at import time


def test_web_functions_of_two_projects_get_distinct_ports(tmp_path: Path) -> None:
    p = toml(
        tmp_path,
        f'include = ["{PROJECTS}/scf-web/serverless.yml", "{PROJECTS}/tpl-http/template.yaml"]\n',
    )
    c = config.load(p, env=ENV)
    assert {c.functions["webapp"].port, c.functions["web"].port} == {9000, 9001}  # type: ignore[attr-defined]
    assert load("tpl-globals/template.yaml").triggers["nightly"]["message"] == "nightly run"


# --- environments merged, Globals, malformed template.yaml ----------------------------------


def _write_project(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "index.py").write_text("def main_handler(e, c):\n    return e\n")
    (tmp_path / "index.py").write_text("def main_handler(e, c):\n    return e\n")
    p = tmp_path / name
    p.write_text(text)
    return p


def test_framework_function_environment_is_merged_over_the_providers(tmp_path: Path) -> None:
    p = _write_project(
        tmp_path,
        "serverless.yml",
        "service: s\nprovider:\n  name: tencent\n  runtime: Python3.9\n  region: ap-shanghai\n"
        "  role: SCF_QcsRole\n  environment:\n    variables:\n      APP_ENV: dev\n"
        "      SECRET_KEY: ${env.REPORT_SECRET}\nfunctions:\n  api:\n"
        "    handler: index.main_handler\n    environment:\n      variables:\n"
        "        APP_ENV: prod\n  other:\n    handler: index.main_handler\n",
    )
    proj = project.load(p, {"REPORT_SECRET": "s3cr3t"})
    assert not proj.problems
    # the function's own value wins; the provider's others are kept (the SCF tools' merge)
    assert proj.functions["api"]["environment"] == {"APP_ENV": "prod", "SECRET_KEY": "s3cr3t"}
    assert proj.functions["other"]["environment"] == {"APP_ENV": "dev", "SECRET_KEY": "s3cr3t"}
    notes = proj.notes["functions.api"]
    assert "provider.region: cloud-only" in notes and "provider.role: cloud-only" in notes


def test_template_globals_environment_is_merged_and_globals_events_are_said(
    tmp_path: Path,
) -> None:
    p = _write_project(
        tmp_path,
        "template.yaml",
        "Globals:\n  Function:\n    Timeout: 7\n    Role: SCF_QcsRole\n"
        "    Environment:\n      Variables:\n        SHARED_DB: postgres://db/shop\n"
        "        LEVEL: info\n"
        "    Events:\n      heartbeat:\n        Type: Timer\n"
        "        Properties:\n          CronExpression: '0 */10 * * * * *'\n"
        "Resources:\n  default:\n    Type: TencentCloud::Serverless::Namespace\n"
        "    fn:\n      Type: TencentCloud::Serverless::Function\n      Properties:\n"
        "        CodeUri: ./src\n        Handler: index.main_handler\n"
        "        Description: the shop\n"
        "        Environment:\n          Variables:\n            OWN: '1'\n            LEVEL: debug\n",
    )
    proj = project.load(p, {})
    assert not proj.problems
    fn = proj.functions["fn"]
    assert fn["environment"] == {"SHARED_DB": "postgres://db/shop", "LEVEL": "debug", "OWN": "1"}
    assert fn["timeout"] == "7s"
    assert [w for w in proj.warnings if "Globals.Function.Events is not applied" in w]
    notes = proj.notes["functions.fn"]
    assert "Globals.Function.Role: cloud-only" in notes
    assert "Resources.default.fn.Properties.Description: cloud-only" in notes


@pytest.mark.parametrize(
    ("props", "where", "words"),
    [
        (
            "      Properties:\n        - CodeUri: ./src\n        - Handler: index.main_handler\n",
            "Resources.default.fn.Properties",
            "must be a mapping",
        ),
        (
            "      Properties:\n        CodeUri: ./src\n        Events:\n          api:\n"
            "            Type: APIGW\n            Properties:\n              - StageName: release\n",
            "Resources.default.fn.Properties.Events.api.Properties",
            "trigger parameters must be a mapping",
        ),
        (
            "      Properties:\n        CodeUri: ./src\n        Events:\n          tm:\n"
            "            Type: Timer\n            Properties: '0 */5 * * * * *'\n",
            "Resources.default.fn.Properties.Events.tm.Properties",
            "trigger parameters must be a mapping",
        ),
        (
            "      Properties:\n        CodeUri: ./src\n        Events:\n          - timer:\n"
            "              Type: Timer\n",
            "Resources.default.fn.Properties.Events",
            "must be a mapping of trigger names",
        ),
    ],
)
def test_malformed_template_yaml_is_a_problem_naming_the_key(
    tmp_path: Path, props: str, where: str, words: str
) -> None:
    p = _write_project(
        tmp_path,
        "template.yaml",
        "Resources:\n  default:\n    Type: TencentCloud::Serverless::Namespace\n"
        "    fn:\n      Type: TencentCloud::Serverless::Function\n" + props,
    )
    with pytest.raises(ConfigError) as exc:
        config.load(p, env={})
    line = next(
        (ln for ln in str(exc.value).splitlines() if f"template.yaml: {where}:" in ln), None
    )
    assert line is not None, str(exc.value)
    assert words in line


def test_skipped_triggers_keep_their_kind_function_and_enabled_for_status() -> None:
    c = config.load(PROJECTS / "tpl-globals/template.yaml", env=ENV, skip_unbound=True)
    # a disabled unbound CMQ trigger, and an enabled unbound CKafka one skipped on request
    assert c.skipped_triggers["queue"] == ("cmq", "nightly", False)
    assert c.skipped_triggers["stream"] == ("ckafka", "nightly", True)
    assert "nightly" not in c.skipped_triggers  # the timer runs


def test_an_empty_environment_beside_the_providers_is_no_environment(tmp_path: Path) -> None:
    p = _write_project(
        tmp_path,
        "serverless.yml",
        "service: s\nprovider:\n  name: tencent\n  runtime: Python3.9\n  environment:\n"
        "    variables:\n      APP_ENV: dev\nfunctions:\n  api:\n"
        "    handler: index.main_handler\n    environment:\n",
    )
    proj = project.load(p, {})
    assert not proj.problems
    assert proj.functions["api"]["environment"] == {"APP_ENV": "dev"}
