"""The pure parts of HTTP triggers: integrated-response rules, events, query parsing,
owned headers, source IPs behind trusted proxies, CORS."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest

from bridge.apigw import (
    ApigwConfig,
    ApigwTrigger,
    FunctionUrlConfig,
    FunctionUrlTrigger,
    HttpRequest,
    InvalidResponse,
    cors_headers,
    function_url_response,
    integrated_response,
    owned_header,
    parse_query,
    passthrough_response,
    reserved_header,
    trusted,
)
from bridge.routes import BadPath
from bridge.targets.http import reserved_header as http_reserved


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({"statusCode": "200"}, "statusCode is a string"),
        ({"statusCode": True}, "statusCode is a boolean"),
        ({"statusCode": 200.0}, "statusCode is a number (200.0)"),
        ({"statusCode": 99}, "not an HTTP status"),
        ({"statusCode": 200, "isBase64Encoded": "False"}, 'isBase64Encoded is a string ("False")'),
        ({"statusCode": 200, "body": {"a": 1}}, "body is an object"),
        ({"statusCode": 200, "headers": []}, "headers is a list"),
        ({"statusCode": 200, "headers": {"X-N": 1}}, 'header "X-N" has a number'),
        ({"statusCode": 200, "headers": {"X-A": "a\r\nSet-Cookie: x=1"}}, "line break"),
        ({"statusCode": 200, "headers": {"Bad Name": "x"}}, "not a valid header name"),
        # found by fuzzing: a lone surrogate cannot be sent in a header
        ({"statusCode": 200, "headers": {"X-S": "a\ud800"}}, "lone surrogate"),
        ({"statusCode": 200, "body": "%%%", "isBase64Encoded": True}, "not valid base64"),
        ([1, 2], "the result is a list"),
        ("text", "the result is a string"),
        (None, "the result is null"),
    ],
)
def test_invalid_integrated_responses(value: Any, why: str) -> None:
    with pytest.raises(InvalidResponse, match=why.replace("(", r"\(").replace(")", r"\)")):
        integrated_response(value)


def test_valid_integrated_response() -> None:
    r = integrated_response(
        {
            "statusCode": 200,
            "headers": {"Set-Cookie": ["a=1", "b=2"], "Content-Length": "999", "X-A": "1"},
            "body": base64.b64encode(b"\x00\xff").decode(),
            "isBase64Encoded": True,
        }
    )
    assert r.status == 200
    assert r.body == b"\x00\xff"
    # Content-Length is the gateway's; the default Content-Type is JSON
    assert r.headers == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-A", "1"),
        ("Content-Type", "application/json"),
    ]
    assert integrated_response({"statusCode": 204, "body": None, "headers": None}).body == b""


def test_passthrough_and_function_url_results() -> None:
    assert passthrough_response({"a": "中"}).body == '{"a":"中"}'.encode()
    assert passthrough_response(None).body == b"null"
    # found by fuzzing: a lone surrogate in a result was a UnicodeEncodeError (a 500)
    assert passthrough_response({"a": "\ud800"}).body == b'{"a":"\\ud800"}'
    assert function_url_response({"x": 1}).status == 200
    assert function_url_response({"statusCode": 201, "body": "y"}).status == 201
    with pytest.raises(InvalidResponse):
        function_url_response({"statusCode": "201"})


def request(**kw: Any) -> HttpRequest:
    base: dict[str, Any] = {
        "method": "POST",
        "path": "/a/1",
        "template": "/a/{id}",
        "path_params": {"id": "1"},
        "query": {"q": ["1", "2"]},
        "headers": {"content-type": "image/png"},
        "body": b"\x89PNG",
        "content_type": "image/png",
        "source_ip": "10.1.2.3",
        "request_id": "rid",
        "service_id": "service-abc",
        "identity": {},
    }
    return HttpRequest(**{**base, **kw})


def trigger(**cfg: Any) -> ApigwTrigger:
    config = ApigwConfig(type="apigw", function="f", path="/a/{id}", **cfg)
    return ApigwTrigger(config, None)  # type: ignore[arg-type]


def test_apigw_event_base64_rules() -> None:
    text = request(body="héllo".encode(), content_type="text/plain")
    assert trigger().event(text)["body"] == "héllo"
    assert trigger().event(text)["isBase64Encoded"] is False
    assert trigger(base64_request="always").event(text)["isBase64Encoded"] is True
    png = trigger(base64_request=["image/*"]).event(request())
    assert (png["body"], png["isBase64Encoded"]) == ("iVBORw==", True)
    # a body that is not UTF-8 is never lost, whatever the rule
    assert trigger().event(request(content_type="text/plain"))["isBase64Encoded"] is True
    e = trigger(stage="test").event(request())
    assert e["requestContext"]["stage"] == e["stageVariables"]["stage"] == "test"
    assert e["requestContext"]["path"] == "/a/{id}" and e["path"] == "/a/1"


def test_function_url_event() -> None:
    t = FunctionUrlTrigger(FunctionUrlConfig(type="function_url", function="f"), None)  # type: ignore[arg-type]
    e = t.event(request(body=b"{}"))
    assert e == {
        "body": "{}",
        "headers": {"content-type": "image/png"},
        "httpMethod": "POST",
        "path": "/a/1",
        "queryString": {"q": ["1", "2"]},
    }
    assert t.event(request())["isBase64Encoded"] is True


def test_parse_query() -> None:
    assert parse_query("a=1&a=2&a=3&flag&b=x+y&c=%E4%B8%AD&&=v&d=") == {
        "a": ["1", "2", "3"],
        "flag": "",
        "b": "x y",
        "c": "中",
        "": "v",
        "d": "",
    }
    with pytest.raises(BadPath, match="not UTF-8"):
        parse_query("a=%FF")


@pytest.mark.parametrize(
    ("name", "owned"),
    [
        ("X-SCF-Request-Id", True),
        ("x_scf_request_id", True),
        ("X-Scf_Anything", True),
        ("Connection", True),
        ("Keep-Alive", True),
        ("keep_alive", True),
        ("Transfer-Encoding", True),
        ("Expect", True),
        ("X-SCFX", False),
        ("X-Trace", False),
        ("Authorization", False),
    ],
)
def test_owned_headers(name: str, owned: bool) -> None:
    assert owned_header(name) is owned
    if "scf" in name.lower():
        assert reserved_header(name) is http_reserved(name) is owned


def test_trusted_proxies() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")]
    assert trusted("10.2.3.4", nets) and trusted("::1", nets)
    assert not trusted("192.168.1.1", nets) and not trusted("garbage", nets)


def test_cors_headers() -> None:
    anyone = ApigwConfig(type="apigw", function="f", path="/", cors=True)
    listed = ApigwConfig(type="apigw", function="f", path="/", cors=["https://a.example"])
    assert ("Access-Control-Allow-Origin", "*") in cors_headers(anyone, "https://x.example")
    assert ("Access-Control-Allow-Origin", "https://a.example") in cors_headers(
        listed, "https://a.example"
    )
    assert ("Vary", "Origin") in cors_headers(listed, "https://a.example")
    assert cors_headers(listed, "https://x.example") == []
    assert cors_headers(anyone, None) == []
