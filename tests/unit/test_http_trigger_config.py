"""``[gateway]``, the ``apigw`` and ``function_url`` trigger models, and the route table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge import registry
from bridge.apigw import ApigwConfig, ApigwTrigger, FunctionUrlConfig, FunctionUrlTrigger
from bridge.config import Config, GatewayConfig, parse
from bridge.errors import ConfigError
from bridge.routes import BadPath, Route, RouteTable, normalize_methods, parse_template

FN = {"f": {"runtime": "command", "command": ["true"]}}


def load(tmp_path: Path, triggers: dict[str, Any], **extra: Any) -> Config:
    return parse({"functions": FN, "triggers": triggers, **extra}, base_dir=tmp_path, env={})


def problems(tmp_path: Path, triggers: dict[str, Any], **extra: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, triggers, **extra)
    return dict(e.value.problems)


@pytest.mark.parametrize("model", [GatewayConfig, ApigwConfig, FunctionUrlConfig])
def test_every_field_is_documented(model: type[Any]) -> None:
    undocumented = [n for n, f in model.model_fields.items() if not f.description]
    assert undocumented == []


def test_registered_as_sources() -> None:
    assert registry.source("apigw") is ApigwTrigger
    assert registry.source("function_url") is FunctionUrlTrigger


def test_defaults(tmp_path: Path) -> None:
    c = load(
        tmp_path,
        {
            "a": {"type": "apigw", "function": "f", "path": "/article/{articleId}"},
            "s": {"type": "function_url", "function": "f"},
        },
    )
    assert c.gateway.listen == "127.0.0.1:8080"
    assert c.gateway.max_body == 6_000_000
    a = c.triggers["a"]
    assert isinstance(a, ApigwConfig)
    assert (a.method, a.integrated_response, a.stage, a.timeout) == ("ANY", True, "release", 15.0)
    assert (a.auth, a.cors, a.base64_request) == ("none", False, "never")
    s = c.triggers["s"]
    assert isinstance(s, FunctionUrlConfig) and s.path == "/"


def test_every_problem_at_once(tmp_path: Path) -> None:
    got = problems(
        tmp_path,
        {
            "a": {"type": "apigw", "function": "f", "path": "/a/{x+}/b", "method": "FETCH"},
            "b": {"type": "apigw", "function": "f", "path": "no-slash", "cors": ["example.com"]},
            "c": {"type": "apigw", "function": "f", "path": "/p", "base64_request": "sometimes"},
            "d": {"type": "function_url", "function": "f", "path": "/{x}"},
            "e": {"type": "apigw", "function": "f", "path": "/q", "format": "native"},
            "g": {"type": "apigw", "function": "nope", "path": "/r"},
        },
        gateway={"listen": "8080", "max_body": 10},
    )
    assert "{x+} must be the last segment" in got["triggers.a.path"]
    assert 'unknown method "FETCH"' in got["triggers.a.method"]
    assert 'must start with "/"' in got["triggers.b.path"]
    assert 'invalid origin "example.com"' in got["triggers.b.cors"]
    assert "triggers.c.base64_request" in " ".join(got)
    assert "plain prefix" in got["triggers.d"]
    assert 'format = "scf"' in got["triggers.e.format"]
    assert 'unknown function "nope"' in got["triggers.g.function"]
    assert "host:port" in got["gateway.listen"]
    assert "unit" in got["gateway.max_body"]
    got = problems(tmp_path, {}, gateway={"tls_cert": "cert.pem"})
    assert "tls_cert and tls_key" in got["gateway"]


def test_clashing_routes(tmp_path: Path) -> None:
    got = problems(
        tmp_path,
        {
            "a": {"type": "apigw", "function": "f", "path": "/item/{id}", "method": "GET"},
            "b": {
                "type": "apigw",
                "function": "f",
                "path": "/item/{key}",
                "method": ["get", "PUT"],
            },
            "c": {"type": "apigw", "function": "f", "path": "/item/{id}", "method": "POST"},
            "u": {"type": "function_url", "function": "f", "path": "/site/"},
            "v": {"type": "function_url", "function": "f", "path": "/site"},
        },
    )
    assert got == {
        "triggers.b.path": 'same path "/item/{key}" as triggers.a for GET',
        "triggers.v.path": 'same prefix "/site" as triggers.u for '
        "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS",
    }


def test_trusted_proxies_and_tls(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    c = load(
        tmp_path,
        {},
        gateway={"trusted_proxies": ["10.0.0.0/8", "::1"], "tls_cert": "c.pem", "tls_key": "k.pem"},
    )
    assert c.gateway.tls_cert == tmp_path / "c.pem"
    got = problems(tmp_path, {}, gateway={"trusted_proxies": ["10.0.0.300"]})
    assert "invalid trusted proxy" in got["gateway.trusted_proxies"]


# --- routes -----------------------------------------------------------------------------------


def route(name: str, path: str, method: str | list[str] = "ANY", kind: str = "apigw") -> Route:
    segs = parse_template(path) if kind == "apigw" else ()
    methods = normalize_methods(method) if kind == "apigw" else None
    return Route(name, "f", kind, path, segs, methods, None)


def test_most_specific_template_wins() -> None:
    table = RouteTable(
        [
            route("param", "/a/{id}"),
            route("literal", "/a/b"),
            route("greedy", "/a/{rest+}"),
            route("deep", "/a/{id}/c"),
            route("site", "/", kind="function_url"),
            route("docs", "/docs", kind="function_url"),
        ]
    )
    assert [m.route.trigger for m in table.find("/a/b")] == ["literal", "param", "greedy", "site"]
    assert table.find("/a/x/c")[0].route.trigger == "deep"
    best = table.find("/a/x/y/z")[0]
    assert (best.route.trigger, dict(best.params)) == ("greedy", {"rest": "x/y/z"})
    assert table.find("/docs/x")[0].route.trigger == "docs"
    assert table.find("/docsx")[0].route.trigger == "site"
    assert table.find("/a/%E4%B8%AD%2F")[0].params == {"id": "中/"}


def test_bad_paths() -> None:
    table = RouteTable([route("r", "/{x}")])
    with pytest.raises(BadPath, match="not UTF-8"):
        table.find("/%FF")
    assert table.find("/") == []


def test_methods() -> None:
    r = route("r", "/x", ["GET", "post"])
    assert r.allows("HEAD") and r.allows("POST") and not r.allows("PUT")
    assert r.allowed() == ["GET", "HEAD", "POST"]
    with pytest.raises(ValueError, match="cannot be combined"):
        normalize_methods(["ANY", "GET"])
