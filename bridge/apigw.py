"""HTTP triggers: ``apigw`` (SCF's API-gateway event) and ``function_url`` (SCF's function URL).

Both are :class:`~bridge.abc.HttpTrigger` plugins registered in ``bridge.sources``;
the public gateway (:mod:`bridge.gateway`) serves them. This module is pure: the
config models, the request as the gateway hands it over (:class:`HttpRequest`),
the events built from it, and the rules that turn a function's result into an HTTP
response (:func:`integrated_response`). ``docs/http-triggers.md`` is the user's view.

The ``apigw`` event is SCF's, field for field::

    {"requestContext": {"serviceId", "path" (the template), "httpMethod", "requestId",
                        "identity", "sourceIp", "stage"},
     "headers": {lower-case name: value}, "body": str, "pathParameters",
     "queryStringParameters", "headerParameters", "stageVariables": {"stage"},
     "path" (the real path), "queryString", "httpMethod", "isBase64Encoded"}

The ``function_url`` event is the same without ``requestContext``, the
``*Parameters``, ``stageVariables`` and ``isBase64Encoded`` (SCF's function-URL
doc), except that a body which is not UTF-8 text arrives base64-encoded with
``"isBase64Encoded": true`` rather than being lost.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from pydantic import Field, field_validator, model_validator

from bridge.abc import HttpTrigger
from bridge.config import Duration, TriggerConfig
from bridge.events import Format
from bridge.routes import BadPath, normalize_methods, parse_template

#: SCF's answer to a result that is not a valid integrated response, byte for byte.
INVALID_RESPONSE = (
    b'{"errno":403,"error":"Invalid scf response format. please check your scf response format."}'
)

#: Request headers the gateway owns: never passed to a function (compared after lower-casing
#: and turning ``_`` into ``-``, since WSGI and nginx can treat ``X_SCF_X`` as ``X-SCF-X``).
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)  # fmt: skip


def reserved_header(name: str) -> bool:
    """``X-SCF-*`` in any spelling (``x_scf_request_id`` too): set only by the bridge."""
    return name.lower().replace("_", "-").startswith("x-scf-")


def owned_header(name: str) -> bool:
    """A request header that never reaches a function: hop-by-hop (``Connection`` and
    the rest, in any spelling), ``Expect`` (the gateway answers it) or reserved."""
    low = name.lower().replace("_", "-")
    return low in HOP_BY_HOP or low == "expect" or reserved_header(low)


# --- config -----------------------------------------------------------------------------------


class _HttpTriggerConfig(TriggerConfig):
    auth: Literal["none", "token"] = Field(
        "none",
        description='"token": callers need a bearer token from [[api.tokens]] with the invoke '
        "action on this function (401 without, 403 outside its scope).",
    )
    cors: bool | list[str] = Field(
        False,
        description="Answer CORS preflights and add Access-Control-* headers: true for any "
        "origin, or a list of allowed origins.",
    )
    timeout: Duration = Field(
        15.0,
        gt=0,
        le=900,
        description="The gateway's own timeout (SCF's default: 15 s); reached first, it "
        "answers 504.",
    )

    @field_validator("format")
    @classmethod
    def _scf_only(cls, v: Format) -> Format:
        if v is not Format.SCF:
            raise ValueError('HTTP triggers send SCF\'s event only: use format = "scf"')
        return v

    @field_validator("cors")
    @classmethod
    def _check_cors(cls, v: bool | list[str]) -> bool | list[str]:
        if isinstance(v, list):
            for origin in v:
                if origin != "*" and ("://" not in origin or origin.endswith("/")):
                    raise ValueError(
                        f'invalid origin "{origin}": use scheme://host[:port] such as '
                        '"https://example.com", or "*"'
                    )
        return v


class ApigwConfig(_HttpTriggerConfig):
    """``[triggers.NAME]`` with ``type = "apigw"``: SCF's API-gateway trigger."""

    path: str = Field(
        description="Path template: literal segments, {name} for one segment (pathParameters), "
        "{name+} as the last segment for the rest of the path."
    )
    method: str | list[str] = Field(
        "ANY", description='One method, a list, or "ANY". HEAD is served with GET.'
    )
    integrated_response: bool = Field(
        True,
        description="The result is SCF's {statusCode, headers, body, isBase64Encoded}; false "
        "(passthrough): 200 with the result as JSON.",
    )
    stage: str = Field(
        "release", description="requestContext.stage and stageVariables.stage (SCF: release)."
    )
    base64_request: Literal["never", "always"] | list[str] = Field(
        "never",
        description='When the event\'s body is base64 (isBase64Encoded true): "never", '
        '"always", or Content-Type globs such as ["image/*", "application/octet-stream"]. '
        "A body that is not UTF-8 text is always base64.",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        parse_template(v)
        return v

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str | list[str]) -> str | list[str]:
        normalize_methods(v)
        return v

    @field_validator("stage")
    @classmethod
    def _check_stage(cls, v: str) -> str:
        if not v or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f'invalid stage "{v}": use letters, digits, "-" or "_"')
        return v


class FunctionUrlConfig(_HttpTriggerConfig):
    """``[triggers.NAME]`` with ``type = "function_url"``: SCF's function URL."""

    path: str = Field("/", description='Path prefix served ("/" serves every path).')

    @model_validator(mode="after")
    def _check_prefix(self) -> FunctionUrlConfig:
        p = self.path
        if not p.startswith("/") or "{" in p or "}" in p or "?" in p or "//" in p:
            raise ValueError(f'path must be a plain prefix such as "/" or "/site", not "{p}"')
        return self


# --- the request and its events ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    """A request as the gateway hands it to a trigger: decoded, owned headers removed."""

    method: str
    path: str  # percent-decoded
    template: str  # the route's path template (or prefix)
    path_params: Mapping[str, str]
    query: Mapping[str, str | list[str]]
    headers: Mapping[str, str]  # lower-case names, repeated ones joined with ","
    body: bytes
    content_type: str  # without parameters, lower-case
    source_ip: str
    request_id: str
    service_id: str
    identity: Mapping[str, str]


def _body(body: bytes, base64_always: bool) -> tuple[str, bool]:
    if not base64_always:
        try:
            return body.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), True


class ApigwTrigger(HttpTrigger[ApigwConfig]):
    """SCF's API-gateway trigger; served by the gateway (see :class:`~bridge.abc.HttpTrigger`)."""

    Config = ApigwConfig
    route_kind = "apigw"

    def wants_base64(self, content_type: str) -> bool:
        rule = self.config.base64_request
        if rule == "always":
            return True
        if rule == "never":
            return False
        return any(fnmatch.fnmatchcase(content_type, g.lower()) for g in rule)

    def event(self, request: HttpRequest) -> dict[str, Any]:
        body, b64 = _body(request.body, self.wants_base64(request.content_type))
        stage = self.config.stage
        query = dict(request.query)
        return {
            "requestContext": {
                "serviceId": request.service_id,
                "path": request.template,
                "httpMethod": request.method,
                "requestId": request.request_id,
                "identity": dict(request.identity),
                "sourceIp": request.source_ip,
                "stage": stage,
            },
            "headers": dict(request.headers),
            "body": body,
            "pathParameters": dict(request.path_params),
            "queryStringParameters": query,
            "headerParameters": {},
            "stageVariables": {"stage": stage},
            "path": request.path,
            "queryString": dict(query),
            "httpMethod": request.method,
            "isBase64Encoded": b64,
        }


class FunctionUrlTrigger(HttpTrigger[FunctionUrlConfig]):
    """SCF's function URL; served by the gateway (see :class:`~bridge.abc.HttpTrigger`)."""

    Config = FunctionUrlConfig
    route_kind = "function_url"

    def event(self, request: HttpRequest) -> dict[str, Any]:
        body, b64 = _body(request.body, False)
        out: dict[str, Any] = {
            "body": body,
            "headers": dict(request.headers),
            "httpMethod": request.method,
            "path": request.path,
            "queryString": dict(request.query),
        }
        if b64:
            out["isBase64Encoded"] = True
        return out


# --- results ----------------------------------------------------------------------------------


class InvalidResponse(ValueError):
    """The result is not a valid integrated response; the message says why (for the log)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


#: response headers the gateway sets itself; a function's values are ignored
_RESPONSE_OWNED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def integrated_response(value: Any) -> Response:
    """SCF's integrated response: ``{"statusCode": int, "headers": {name: str | [str]},
    "body": str, "isBase64Encoded": bool}``. Raises :class:`InvalidResponse` (→ SCF's 403)."""
    if not isinstance(value, dict):
        raise InvalidResponse(f"the result is {_kind(value)}, not an object")
    status = value.get("statusCode")
    if isinstance(status, bool) or not isinstance(status, int):
        raise InvalidResponse(f"statusCode is {_kind(status)}, not an integer")
    if not 100 <= status <= 599:
        raise InvalidResponse(f"statusCode {status} is not an HTTP status (100-599)")
    b64 = value.get("isBase64Encoded", False)
    if not isinstance(b64, bool):
        raise InvalidResponse(f"isBase64Encoded is {_kind(b64)}, not true or false")
    body = value.get("body", "")
    if body is None:
        body = ""
    if not isinstance(body, str):
        raise InvalidResponse(f"body is {_kind(body)}, not a string")
    raw_headers = value.get("headers", {})
    if raw_headers is None:
        raw_headers = {}
    if not isinstance(raw_headers, dict):
        raise InvalidResponse(f"headers is {_kind(raw_headers)}, not an object")
    headers: list[tuple[str, str]] = []
    for name, v in raw_headers.items():
        values = v if isinstance(v, list) else [v]
        if not _is_token(name):
            raise InvalidResponse(f'"{name}" is not a valid header name')
        for item in values:
            if not isinstance(item, str):
                raise InvalidResponse(f'header "{name}" has {_kind(item)}, not a string')
            if "\r" in item or "\n" in item or "\0" in item:
                raise InvalidResponse(f'header "{name}" contains a line break')
            if not item.isascii() and not _encodes(item):
                raise InvalidResponse(f'header "{name}" is not valid Unicode (a lone surrogate)')
            if name.lower() not in _RESPONSE_OWNED:
                headers.append((name, item))
    if b64:
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidResponse("isBase64Encoded is true but body is not valid base64") from None
    else:
        data = body.encode("utf-8", "surrogatepass")
    if not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", "application/json"))
    return Response(status, headers, data)


def passthrough_response(value: Any) -> Response:
    """``integrated_response = false``: 200 and the result as JSON."""
    try:
        data = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON's \ud800 escape still says it
        data = json.dumps(value, separators=(",", ":")).encode()
    return Response(200, [("Content-Type", "application/json")], data)


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def function_url_response(value: Any) -> Response:
    """A function URL's result: an object with ``statusCode`` follows the integrated rules;
    anything else is inferred as SCF does: 200 with the result as JSON."""
    if isinstance(value, dict) and "statusCode" in value:
        return integrated_response(value)
    return passthrough_response(value)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_token(name: Any) -> bool:
    return isinstance(name, str) and _TOKEN.fullmatch(name) is not None


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({json.dumps(v)})"
    if isinstance(v, str):
        return f"a string ({json.dumps(v[:40], ensure_ascii=False)})"
    if isinstance(v, int | float):
        return f"a number ({v!r})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


# --- request helpers ----------------------------------------------------------------------------


def parse_query(raw: str) -> dict[str, str | list[str]]:
    """``a=1&a=2&flag&b=x+y`` → ``{"a": ["1", "2"], "flag": "", "b": "x y"}``; BadPath if a
    name or value is not UTF-8 after percent-decoding."""
    out: dict[str, str | list[str]] = {}
    for piece in raw.split("&"):
        if not piece:
            continue
        k, _, v = piece.partition("=")
        key, value = _unquote(k), _unquote(v)
        have = out.get(key)
        if have is None:
            out[key] = value
        elif isinstance(have, list):
            have.append(value)
        else:
            out[key] = [have, value]
    return out


def _unquote(s: str) -> str:
    try:
        return unquote_to_bytes(s.replace("+", " ")).decode("utf-8")
    except UnicodeError:
        raise BadPath(
            f'the query string part "{s[:80]}" is not UTF-8 after percent-decoding'
        ) from None


def header_text(value: str) -> str:
    """A header value as JSON-safe text (bytes that are not UTF-8 become U+FFFD)."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def trusted(addr: str, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def cors_headers(config: Any, origin: str | None) -> list[tuple[str, str]]:
    cors = getattr(config, "cors", False)
    if not cors or origin is None:
        return []
    if cors is True or "*" in cors:
        return [
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Expose-Headers", "X-Request-Id"),
        ]
    if origin in cors:
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", "X-Request-Id"),
        ]
    return []
