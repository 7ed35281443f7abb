"""The secrets the process knows (tokens, passwords, SASL credentials), masked wherever they
would appear in a log line or an operator-facing message. Below :mod:`bridge.log` and
:mod:`bridge.journal`, which both mask with it."""

from __future__ import annotations

_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line (short values are ignored)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret masked. Where secrets overlap or one contains
    another, the union of their spans is masked: no part of any of them is left."""
    spans: list[tuple[int, int]] = []
    for secret in _secrets:
        i = text.find(secret)
        while i >= 0:
            spans.append((i, i + len(secret)))
            i = text.find(secret, i + 1)
    if not spans:
        return text
    spans.sort()
    out, pos = [], 0
    start, end = spans[0]
    for a, b in spans[1:]:
        if a <= end:  # overlapping or touching: one masked span
            end = max(end, b)
            continue
        out += [text[pos:start], "***"]
        pos, (start, end) = end, (a, b)
    out += [text[pos:start], "***", text[end:]]
    return "".join(out)
