"""The gateway's golden table: raw HTTP requests and the exact bytes answered.

Each case is a request as a client sends it and the response byte for byte, after
replacing the two variable parts (request ids → ``<RID>``, the Date header → ``<DATE>``).
Real daemon, real python workers, real listener; one daemon for the whole table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from .gateway_fixtures import exchange, free_port, normalized, running, write_config

pytestmark = pytest.mark.integration

FUNCS = """
import base64, json, time

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)

def respond(status, body, headers=None, b64=False):
    out = {"statusCode": status, "body": body, "isBase64Encoded": b64}
    if headers is not None:
        out["headers"] = headers
    return out

def ok(event, context):
    return respond(200, "<h1>hi</h1>", {"Content-Type": "text/html; charset=utf-8"})

def str_status(event, context):
    return {"statusCode": "200", "headers": {}, "body": "x"}

def str_b64(event, context):
    return {"statusCode": 200, "headers": {}, "body": "x", "isBase64Encoded": "False"}

def no_headers(event, context):
    return {"statusCode": 201, "body": "created"}

def list_header(event, context):
    return respond(200, "two cookies", {"Set-Cookie": ["a=1; Path=/", "b=2; Path=/"],
                                        "Content-Type": "text/plain"})

def png(event, context):
    return respond(200, base64.b64encode(PNG).decode(), {"Content-Type": "image/png"}, True)

def text(event, context):
    return "just a string"

def a_list(event, context):
    return [1, 2]

def none(event, context):
    return None

def boom(event, context):
    raise RuntimeError("boom: the handler failed")

def slow(event, context):
    time.sleep(3)
    return respond(200, "late")

def redirect(event, context):
    return respond(302, "", {"Location": "/ok"})

def data(event, context):
    return {"answer": 42, "text": "中文"}

def echo(event, context):
    event = dict(event)
    event["headers"] = {k: v for k, v in event["headers"].items() if k != "host"}
    if "requestContext" in event:
        rc = dict(event["requestContext"])
        assert rc.pop("serviceId").startswith("service-")
        assert rc.pop("requestId") == context.request_id
        event["requestContext"] = rc
    return respond(200, json.dumps(event, sort_keys=True, ensure_ascii=False),
                   {"Content-Type": "application/json; charset=utf-8"})
"""

HANDLERS = [
    "ok", "str_status", "str_b64", "no_headers", "list_header", "png", "text", "a_list",
    "none", "boom", "slow", "redirect", "data", "echo",
]  # fmt: skip

TOKEN = "gateway-golden-token-0123456789"
OTHER = "another-token-0123456789abcdef"

CONFIG = (
    'trusted_proxies = ["127.0.0.1"]\n\n'
    + "\n".join(
        f'[functions.{h}]\ncode = "fn"\nhandler = "funcs.{h}"\nconcurrency = 8\n' for h in HANDLERS
    )
    + f"""
[functions.slow_fn]
code = "fn"
handler = "funcs.slow"
timeout = "1s"

[[api.tokens]]
name = "golden"
secret = "{TOKEN}"
functions = ["echo"]
[[api.tokens]]
name = "other"
secret = "{OTHER}"
functions = ["ok"]
"""
    + "\n".join(
        f'[triggers.{h}]\ntype = "apigw"\nfunction = "{h}"\npath = "/{h.replace("_", "-")}"\n'
        for h in HANDLERS
        if h not in ("ok", "echo", "slow", "data")
    )
    + """
[triggers.ok]
type = "apigw"
function = "ok"
path = "/ok"
method = ["GET", "POST"]

[triggers.gw_timeout]
type = "apigw"
function = "slow"
path = "/gw-timeout"
timeout = "500ms"

[triggers.fn_timeout]
type = "apigw"
function = "slow_fn"
path = "/fn-timeout"

[triggers.passthrough]
type = "apigw"
function = "data"
path = "/passthrough"
integrated_response = false

[triggers.echo]
type = "apigw"
function = "echo"
path = "/echo/{id}"
stage = "test"
base64_request = ["image/*"]

[triggers.rest]
type = "apigw"
function = "echo"
path = "/files/{path+}"
method = "GET"

[triggers.cors]
type = "apigw"
function = "ok"
path = "/cors"
method = "GET"
cors = ["https://app.example"]

[triggers.private]
type = "apigw"
function = "echo"
path = "/private"
auth = "token"

[triggers.url]
type = "function_url"
function = "echo"
path = "/url"
"""
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    response: bytes


def get(path: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw.test", *headers, "Connection: close"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def head(status: str, *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n").encode()


def answer(status: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        head(
            status,
            *headers,
            "X-Request-Id: <RID>",
            "Server: event-bridge",
            f"Content-Length: {n}",
            "Date: <DATE>",
            "Connection: close",
        )
        + b"\r\n"
        + body
    )


def error(status: str, message: str, *headers: str) -> bytes:
    code = status.split()[0]
    body = f'{{"errno":{code},"error":{message},"requestId":"<RID>"}}'.encode()
    # "<RID>" stands for a 36-character request id
    n = len(body) + 36 - len("<RID>")
    return answer(status, body, "Content-Type: application/json", *headers, length=n)


INVALID = (
    b'{"errno":403,"error":"Invalid scf response format. please check your scf response format."}'
)


def invalid() -> bytes:
    return answer("403 Forbidden", INVALID, "Content-Type: application/json")


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)
BIG = 6_000_001

CASES = [
    Case(
        "integrated response",
        get("/ok"),
        answer("200 OK", b"<h1>hi</h1>", "Content-Type: text/html; charset=utf-8"),
    ),
    Case("statusCode as a string", get("/str-status"), invalid()),
    Case('"isBase64Encoded": "False" as a string', get("/str-b64"), invalid()),
    Case(
        "missing headers",
        get("/no-headers"),
        answer("201 Created", b"created", "Content-Type: application/json"),
    ),
    Case(
        "a list header becomes repeated lines",
        get("/list-header"),
        answer(
            "200 OK",
            b"two cookies",
            "Set-Cookie: a=1; Path=/",
            "Set-Cookie: b=2; Path=/",
            "Content-Type: text/plain",
        ),
    ),
    Case("a base64 PNG", get("/png"), answer("200 OK", PNG, "Content-Type: image/png")),
    Case("a non-JSON return (a string)", get("/text"), invalid()),
    Case("a list", get("/a-list"), invalid()),
    Case("None", get("/none"), invalid()),
    Case(
        "an exception",
        get("/boom"),
        error(
            "502 Bad Gateway",
            '"RuntimeError: boom: the handler failed"',
            "X-Error-Class: function_error",
        ),
    ),
    Case(
        "the gateway's timeout first",
        get("/gw-timeout"),
        error("504 Gateway Timeout", '"the function did not answer within 0.5s"'),
    ),
    Case(
        "the function's own timeout first",
        get("/fn-timeout"),
        error(
            "502 Bad Gateway",
            '"Invoking task timed out after 1 seconds"',
            "X-Error-Class: function_error",
        ),
    ),
    Case(
        "passthrough",
        get("/passthrough"),
        answer("200 OK", '{"answer":42,"text":"中文"}'.encode(), "Content-Type: application/json"),
    ),
    Case(
        "Location is passed on",
        get("/redirect"),
        answer("302 Found", b"", "Location: /ok", "Content-Type: application/json"),
    ),
    Case(
        "HEAD",
        get("/ok", method="HEAD"),
        answer("200 OK", b"", "Content-Type: text/html; charset=utf-8", length=11),
    ),
    Case(
        "a repeated query key, a key without value, path parameters in percent-encoded UTF-8",
        get("/echo/%E4%B8%AD%E6%96%87%20x?a=1&a=2&flag&q=%E4%BD%A0+%E5%A5%BD"),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 454\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "", "headerParameters": {}, "headers": {}, "httpMethod": "GET", "isBase64Encoded": false, "path": "/echo/\xe4\xb8\xad\xe6\x96\x87 x", "pathParameters": {"id": "\xe4\xb8\xad\xe6\x96\x87 x"}, "queryString": {"a": ["1", "2"], "flag": "", "q": "\xe4\xbd\xa0 \xe5\xa5\xbd"}, "queryStringParameters": {"a": ["1", "2"], "flag": "", "q": "\xe4\xbd\xa0 \xe5\xa5\xbd"}, "requestContext": {"httpMethod": "GET", "identity": {}, "path": "/echo/{id}", "sourceIp": "127.0.0.1", "stage": "test"}, "stageVariables": {"stage": "test"}}',
    ),
    Case(
        "X-SCF-*, X_SCF_* and Connection dropped",
        get(
            "/echo/h",
            "X-SCF-Request-Id: forged",
            "X_SCF_Request_Id: forged",
            "x_scf_function_name: forged",
            "X-Trace: kept",
            "Keep-Alive: timeout=5",
        ),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 371\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "", "headerParameters": {}, "headers": {"x-trace": "kept"}, "httpMethod": "GET", "isBase64Encoded": false, "path": "/echo/h", "pathParameters": {"id": "h"}, "queryString": {}, "queryStringParameters": {}, "requestContext": {"httpMethod": "GET", "identity": {}, "path": "/echo/{id}", "sourceIp": "127.0.0.1", "stage": "test"}, "stageVariables": {"stage": "test"}}',
    ),
    Case(
        "a POST body, and a binary one as base64 (base64_request glob)",
        get("/echo/b", "Content-Type: image/png", method="POST", body=PNG),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 494\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAACAAFUok9dAAAAAElFTkSuQmCC", "headerParameters": {}, "headers": {"content-length": "66", "content-type": "image/png"}, "httpMethod": "POST", "isBase64Encoded": true, "path": "/echo/b", "pathParameters": {"id": "b"}, "queryString": {}, "queryStringParameters": {}, "requestContext": {"httpMethod": "POST", "identity": {}, "path": "/echo/{id}", "sourceIp": "127.0.0.1", "stage": "test"}, "stageVariables": {"stage": "test"}}',
    ),
    Case(
        "a catch-all path parameter",
        get("/files/a/b%2Fc/d.txt"),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 387\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "", "headerParameters": {}, "headers": {}, "httpMethod": "GET", "isBase64Encoded": false, "path": "/files/a/b/c/d.txt", "pathParameters": {"path": "a/b/c/d.txt"}, "queryString": {}, "queryStringParameters": {}, "requestContext": {"httpMethod": "GET", "identity": {}, "path": "/files/{path+}", "sourceIp": "127.0.0.1", "stage": "release"}, "stageVariables": {"stage": "release"}}',
    ),
    Case(
        "a body over max_body",
        get("/echo/big", method="POST", body=b"x" * BIG),
        error(
            "413 Request Entity Too Large",
            '"the request body is larger than 6000000 bytes (gateway.max_body)"',
        ),
    ),
    Case(
        "an OPTIONS preflight with cors",
        get(
            "/cors",
            "Origin: https://app.example",
            "Access-Control-Request-Method: GET",
            "Access-Control-Request-Headers: x-token",
            method="OPTIONS",
        ),
        b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: https://app.example\r\nVary: Origin\r\nAccess-Control-Expose-Headers: X-Request-Id\r\nAccess-Control-Allow-Methods: GET, HEAD\r\nAccess-Control-Allow-Headers: x-token\r\nAccess-Control-Max-Age: 600\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nDate: <DATE>\r\nConnection: close\r\n\r\n",
    ),
    Case(
        "a CORS request",
        get("/cors", "Origin: https://app.example"),
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nAccess-Control-Allow-Origin: https://app.example\r\nVary: Origin\r\nAccess-Control-Expose-Headers: X-Request-Id\r\nContent-Length: 11\r\nDate: <DATE>\r\nConnection: close\r\n\r\n<h1>hi</h1>",
    ),
    Case(
        "a CORS request from another origin",
        get("/cors", "Origin: https://evil.example"),
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 11\r\nDate: <DATE>\r\nConnection: close\r\n\r\n<h1>hi</h1>",
    ),
    Case("no route", get("/nowhere"), error("404 Not Found", '"no route for GET /nowhere"')),
    Case(
        "another method",
        get("/ok", method="DELETE"),
        error(
            "405 Method Not Allowed",
            '"method DELETE is not allowed here"',
            "Allow: GET, HEAD, POST",
        ),
    ),
    Case(
        "a path that is not UTF-8",
        get("/echo/%FF"),
        b'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 135\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"errno":400,"error":"the path segment \\"%FF\\" is not UTF-8 after percent-decoding","requestId":"<RID>"}',
    ),
    Case(
        "a query that is not UTF-8",
        get("/echo/x?a=%C3%28"),
        b'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 143\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"errno":400,"error":"the query string part \\"%C3%28\\" is not UTF-8 after percent-decoding","requestId":"<RID>"}',
    ),
    Case(
        "token auth: no token",
        get("/private"),
        b'HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nWWW-Authenticate: Bearer\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 107\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"errno":401,"error":"a valid bearer token is required","requestId":"<RID>"}',
    ),
    Case(
        "token auth: a token for another function",
        get("/private", f"Authorization: Bearer {OTHER}"),
        b'HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 115\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"errno":403,"error":"token other may not invoke function echo","requestId":"<RID>"}',
    ),
    Case(
        "token auth: the token stays with the gateway",
        get("/private", f"Authorization: Bearer {TOKEN}"),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 367\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "", "headerParameters": {}, "headers": {}, "httpMethod": "GET", "isBase64Encoded": false, "path": "/private", "pathParameters": {}, "queryString": {}, "queryStringParameters": {}, "requestContext": {"httpMethod": "GET", "identity": {"token": "golden"}, "path": "/private", "sourceIp": "127.0.0.1", "stage": "release"}, "stageVariables": {"stage": "release"}}',
    ),
    Case(
        "sourceIp from X-Forwarded-For behind a trusted proxy",
        get("/echo/ip", "X-Forwarded-For: 203.0.113.7, 127.0.0.1"),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 401\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "", "headerParameters": {}, "headers": {"x-forwarded-for": "203.0.113.7, 127.0.0.1"}, "httpMethod": "GET", "isBase64Encoded": false, "path": "/echo/ip", "pathParameters": {"id": "ip"}, "queryString": {}, "queryStringParameters": {}, "requestContext": {"httpMethod": "GET", "identity": {}, "path": "/echo/{id}", "sourceIp": "203.0.113.7", "stage": "test"}, "stageVariables": {"stage": "test"}}',
    ),
    Case(
        "Expect: 100-continue",
        get("/echo/c", "Expect: 100-continue", method="POST", body=b"{}"),
        b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 379\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "{}", "headerParameters": {}, "headers": {"content-length": "2"}, "httpMethod": "POST", "isBase64Encoded": false, "path": "/echo/c", "pathParameters": {"id": "c"}, "queryString": {}, "queryStringParameters": {}, "requestContext": {"httpMethod": "POST", "identity": {}, "path": "/echo/{id}", "sourceIp": "127.0.0.1", "stage": "test"}, "stageVariables": {"stage": "test"}}',
    ),
    Case(
        "the function-URL event",
        get("/url/page?x=1", "Cookie: a=b"),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nX-Request-Id: <RID>\r\nServer: event-bridge\r\nContent-Length: 111\r\nDate: <DATE>\r\nConnection: close\r\n\r\n{"body": "", "headers": {"cookie": "a=b"}, "httpMethod": "GET", "path": "/url/page", "queryString": {"x": "1"}}',
    ),
]


async def test_golden_table(tmp_path: Path) -> None:
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "funcs.py").write_text(FUNCS)
    port = free_port()
    path = write_config(tmp_path, CONFIG, port)
    failures = []
    async with running(path) as d:
        assert d.gateway is not None
        for case in CASES:
            got = normalized(await exchange(port, case.request))
            if got != case.response:
                failures.append(f"{case.name}:\n  expected {case.response!r}\n  got      {got!r}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases differ:\n" + "\n".join(failures)


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)
    assert all(c.response for c in CASES)
