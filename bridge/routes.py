"""The gateway's route table: SCF path templates, methods, and which trigger serves a request.

Pure values, no I/O (the gateway in :mod:`bridge.gateway` asks; tests drive it
directly). Two kinds of route:

- ``apigw``: a path template as in SCF's API gateway. A segment is a literal,
  ``{name}`` (exactly one segment, its percent-decoded value lands in
  ``pathParameters[name]``) or, as the last segment only, ``{name+}`` (the rest of
  the path, one segment or more, ``/`` included). Methods: one, a list, or ANY.
- ``function_url``: a path prefix (``/`` serves everything); every method.

Choosing: among the ``apigw`` templates that match, the most specific wins,
segment by segment (a literal beats ``{name}``, which beats ``{name+}``); when
none matches, the longest ``function_url`` prefix that does. A path that matches
a route but not its methods is a 405 with the methods allowed (``HEAD`` comes with
``GET``). Two triggers with the same template and a method in common, or the
same prefix, are a configuration error (:func:`route_problems`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}$")

LITERAL, PARAM, GREEDY = 0, 1, 2


class BadPath(ValueError):
    """The request path cannot be decoded (not UTF-8 after percent-decoding)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    kind: int
    text: str  # the literal, or the parameter name


def parse_template(path: str) -> tuple[Segment, ...]:
    """``/article/{id}`` → segments; ValueError naming what is wrong."""
    if not path.startswith("/"):
        raise ValueError(f'the path must start with "/": "{path}"')
    if "?" in path or "#" in path:
        raise ValueError(f'the path is a template without a query string: "{path}"')
    parts = path.split("/")[1:]
    if parts == [""]:
        return ()
    out: list[Segment] = []
    seen: set[str] = set()
    for i, part in enumerate(parts):
        m = _PARAM.match(part)
        if m is None:
            if "{" in part or "}" in part:
                raise ValueError(
                    f'invalid segment "{part}" in "{path}": a parameter is a whole segment '
                    "such as {id}, or {path+} for the rest of the path"
                )
            if part == "" and i != len(parts) - 1:
                raise ValueError(f'empty segment in "{path}"')
            out.append(Segment(LITERAL, part))
            continue
        name, greedy = m.group(1), bool(m.group(2))
        if name in seen:
            raise ValueError(f'parameter "{name}" appears twice in "{path}"')
        seen.add(name)
        if greedy and i != len(parts) - 1:
            raise ValueError(f'{{{name}+}} must be the last segment of "{path}"')
        out.append(Segment(GREEDY if greedy else PARAM, name))
    return tuple(out)


def normalize_methods(value: str | list[str]) -> frozenset[str] | None:
    """``"ANY"`` → None (every method); otherwise the upper-cased set. ValueError if unknown."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError('name at least one method, or "ANY"')
    out = set()
    for m in items:
        up = m.upper()
        if up == "ANY":
            if len(items) > 1:
                raise ValueError('"ANY" cannot be combined with other methods')
            return None
        if up not in METHODS:
            raise ValueError(f'unknown method "{m}" (use {", ".join(METHODS)} or ANY)')
        out.add(up)
    return frozenset(out)


def decode_segment(raw: str) -> str:
    """Percent-decode one path segment as UTF-8, strictly."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath(f'the path segment "{raw}" is not UTF-8 after percent-decoding') from None


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """One trigger's route. ``methods`` None means every method."""

    trigger: str
    function: str
    kind: str  # "apigw" | "function_url"
    template: str
    segments: tuple[Segment, ...]
    methods: frozenset[str] | None
    config: Any = dataclasses.field(compare=False)

    def allows(self, method: str) -> bool:
        if self.methods is None:
            return True
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)

    def allowed(self) -> list[str]:
        if self.methods is None:
            return list(METHODS)
        out = set(self.methods)
        if "GET" in out:
            out.add("HEAD")
        return [m for m in METHODS if m in out]

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """Path parameters if ``parts`` (decoded segments) match this apigw template."""
        params: dict[str, str] = {}
        segs = self.segments
        for i, seg in enumerate(segs):
            if seg.kind == GREEDY:
                rest = parts[i:]
                if not rest or rest == [""]:
                    return None
                params[seg.text] = "/".join(rest)
                return params
            if i >= len(parts):
                return None
            if seg.kind == LITERAL:
                if parts[i] != seg.text:
                    return None
            else:
                if parts[i] == "":
                    return None
                params[seg.text] = parts[i]
        return params if len(parts) == len(segs) else None

    def prefix_matches(self, path: str) -> bool:
        base = self.template.rstrip("/")
        return path == self.template or path == base or path.startswith(base + "/")


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: Mapping[str, str]


class RouteTable:
    """Immutable: a reload builds a new table and swaps it in one assignment, so requests
    in flight keep the route they matched."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._apigw = [r for r in self.routes if r.kind == "apigw"]
        self._prefixes = sorted(
            (r for r in self.routes if r.kind == "function_url"),
            key=lambda r: -len(r.template.rstrip("/")),
        )

    def __len__(self) -> int:
        return len(self.routes)

    def find(self, raw_path: str) -> list[Match]:
        """Every route whose path matches, best first. Raises :class:`BadPath`."""
        parts = [decode_segment(p) for p in raw_path.split("/")[1:]]
        if parts == [""]:
            parts = []
        found: list[tuple[tuple[int, ...], Match]] = []
        for r in self._apigw:
            params = r.match(parts)
            if params is not None:
                key = tuple(s.kind for s in r.segments)
                found.append((key, Match(r, params)))
        found.sort(key=lambda kv: kv[0])
        out = [m for _, m in found]
        decoded = "/" + "/".join(parts)
        out += [Match(r, {}) for r in self._prefixes if r.prefix_matches(decoded)]
        return out


def route_problems(triggers: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Clashes between HTTP triggers (same template with a method in common, same prefix),
    as ``(key path, message)`` pairs for :class:`~bridge.errors.ConfigError`."""
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], tuple[str, frozenset[str] | None]] = {}
    for name, tc in sorted(triggers.items()):
        kind = getattr(tc, "type", None)
        if kind not in ("apigw", "function_url") or not getattr(tc, "enabled", True):
            continue
        if kind == "apigw":
            shape = "/" + "/".join(
                s.text if s.kind == LITERAL else "{}" if s.kind == PARAM else "{+}"
                for s in parse_template(tc.path)
            )
            methods = normalize_methods(tc.method)
        else:
            shape, methods = tc.path.rstrip("/") or "/", None
        key = (kind, shape)
        if key in seen:
            other, other_methods = seen[key]
            common = (
                set(METHODS)
                if methods is None or other_methods is None
                else set(methods) & set(other_methods)
            )
            if common:
                what = "path" if kind == "apigw" else "prefix"
                problems.append(
                    (
                        f"triggers.{name}.path",
                        f'same {what} "{tc.path}" as triggers.{other} for '
                        f"{', '.join(m for m in METHODS if m in common)}",
                    )
                )
                continue
            merged = None if methods is None else methods | (other_methods or frozenset())
            seen[key] = (other, merged)
        else:
            seen[key] = (name, methods)
    return problems
