"""The one parser of dead-letter sink URLs (``dead_letter = "kafka://…"``, ``"sqs://…"``).

:func:`parse` splits a sink URL and checks what every sink needs: its scheme, a host (a
topic, a queue name, a server), a valid port, each query parameter at most once and, if
the sink lists them, only known parameters. A sink then reads its own meaning from the
:class:`SinkUrl` (``params``, ``netloc``, ``path``) and raises :func:`error` for what is
wrong with it, so every message has one form::

    dead_letter = "kafka://?bootstrap_servers=k:9092": no topic after kafka://;
    use kafka://TOPIC?bootstrap_servers=HOST:PORT

Messages name the config key and the bad part and never hold a secret: the URL's
password and secret-looking query values (``sasl.password=…``, ``token=…``) are shown as
``***`` (:func:`shown`).
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Collection, Mapping

#: query parameters whose values are secrets (``*_file`` ones hold paths, not secrets)
SECRET_PARAM = re.compile(r"pass|secret|token|credential|jaas|key\.pem|(^|[._])key$", re.I)

KEY = "dead_letter"  # the config key sink URLs are given in (functions.NAME.async.dead_letter)


class SinkUrlError(ValueError):
    """A dead-letter sink URL that cannot be used (the message says which part and why)."""


@dataclasses.dataclass(frozen=True)
class SinkUrl:
    """A parsed sink URL."""

    text: str = dataclasses.field(repr=False)  # as given: holds secrets, never log it
    scheme: str
    netloc: str  # host[:port] as written (case kept: a topic or queue name), no user info
    port: int | None
    path: str
    username: str | None
    password: str | None = dataclasses.field(repr=False)
    params: Mapping[str, str]  # the query; each name at most once


def shown(url: str) -> str:
    """``url`` as it may appear in a message: the password in its user info and the values
    of secret-looking query parameters replaced by ``***`` (by position in the URL, so a
    short password does not mask other text), then any other copy of them masked."""
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return redact(text, url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = "&".join(
        f"{name}=***" if sep and SECRET_PARAM.search(name) and not name.endswith("_file") else pair
        for pair in parts.query.split("&")
        for name, sep, _ in [pair.partition("=")]
    )
    netloc = f"{userinfo}@{hostport}" if at else parts.netloc
    masked = (
        text  # unchanged: keep it as written (urlunsplit drops an empty "//")
        if (netloc, query) == (parts.netloc, parts.query)
        else urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    )
    secrets = [s for s in url_secrets(url) if len(s) >= 4]  # longer copies elsewhere
    return redact_all(masked, secrets)


def redact(text: str, url: str) -> str:
    """``text`` (a message that may quote ``url``) with the URL's secrets masked."""
    return redact_all(text, url_secrets(url))


def redact_all(text: str, secrets: list[str]) -> str:
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
        text = text.replace(urllib.parse.quote(secret, safe=""), "***")
    return text


def url_secrets(url: str) -> list[str]:
    """The secrets written in a sink URL: its password and secret-looking query values."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        out = [parts.password] if parts.password else []
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=False)
    except ValueError:
        return []
    out += [v for k, v in query if SECRET_PARAM.search(k) and not k.endswith("_file")]
    return [s for s in out if s]


def error(url: str, problem: str, usage: str | None = None, *, key: str = KEY) -> SinkUrlError:
    """The error for ``url``: the config key, the URL without secrets, the problem, the usage."""
    hint = f"; use {usage}" if usage else ""
    return SinkUrlError(f'{key} = "{shown(url)}": {problem}{hint}')


def parse(
    url: str,
    scheme: str,
    *,
    usage: str,
    host: str = "host",
    params: Collection[str] | None = None,
    key: str = KEY,
) -> SinkUrl:
    """Split ``url`` for a ``scheme://`` sink. ``usage`` shows the right form; ``host`` names
    what the host part is (``"topic"``, ``"queue"``); ``params`` (if given) are the only
    query parameters allowed. Raises :class:`SinkUrlError`."""
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:  # a port that is not a number, a broken IPv6 address
        raise error(text, f"not a valid URL ({e})", usage, key=key) from None
    if parts.scheme != scheme:
        got = f'the scheme is "{parts.scheme}"' if parts.scheme else "no scheme"
        raise error(text, f"{got}, not {scheme}://", usage, key=key)
    if not parts.hostname:
        raise error(text, f"no {host} after {scheme}://", usage, key=key)
    found: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name in found:
            raise error(text, f'parameter "{name}" is given twice', usage, key=key)
        found[name] = value
    if params is not None:
        unknown = sorted(set(found) - set(params))
        if unknown:
            known = ", ".join(sorted(params))
            raise error(
                text,
                f"unknown parameter(s) {', '.join(unknown)} (known: {known})",
                usage,
                key=key,
            )
    return SinkUrl(
        text=text,
        scheme=parts.scheme,
        netloc=parts.netloc.rpartition("@")[2],
        port=port,
        path=parts.path,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password else None,
        params=found,
    )
