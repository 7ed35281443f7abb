"""Fuzzing the HTTP ways in through a real daemon: the API's invoke endpoint (any body, any
content type, any invocation type) and the gateway's request path (any method, path, query,
headers and body on a raw socket). The promise: a clear 4xx in the API's error shape, or
the function's answer; never a 500 from the bridge, and the daemon keeps serving."""

from __future__ import annotations

import json
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.chaos.harness import Bridge, free_port, request

pytestmark = pytest.mark.integration

ECHO = """
def main_handler(event, context):
    return {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": "ok"}
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Bridge, int]]:
    # one daemon per test (not per module): the workers it starts or replaces during a test
    # must end with the test, or the suite's leak check counts them
    root = tmp_path
    b = Bridge(root)
    gw = free_port()
    (root / "fn").mkdir()
    (root / "fn" / "index.py").write_text(ECHO)
    b.write(
        f"""
        [gateway]
        listen = "127.0.0.1:{gw}"
        header_timeout = "1s"
        body_timeout = "1s"

        [triggers.any]
        type = "apigw"
        function = "rec"
        path = "/{{any+}}"
        """,
        rec='[functions.rec]\ncode = "fn"\nconcurrency = 2\n',
    )
    d = b.start()
    try:
        b.ready(d)
        yield b, gw
    finally:
        b.close()


def _alive(b: Bridge) -> None:
    assert request(b.port, "GET", "/readyz")[0] == 200


@given(
    body=st.binary(max_size=300)
    | st.text(st.characters(codec=None), max_size=80).map(
        lambda t: t.encode("utf-8", "surrogatepass")
    )
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=5), i, max_size=3),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
    kind=st.sampled_from(["Event", "RequestResponse", "event", "", "Bogus", None]),
    ctype=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"]),
    name=st.sampled_from(["rec", "nope", "%2e%2e", "r" * 200]),
)
def test_api_invoke_bodies(
    served: tuple[Bridge, int], body: bytes, kind: str | None, ctype: str, name: str
) -> None:
    b, _ = served
    headers = {"Content-Type": ctype} if ctype else {}
    if kind is not None:
        headers["X-Invocation-Type"] = kind
    status, raw = request(b.port, "POST", f"/functions/{name}/invocations", body, headers)
    # Then a success, or a clear client error in one of the API's error shapes; never a 5xx
    assert status in (200, 202, 400, 404, 413, 415), (status, raw)
    if status >= 400:
        doc = json.loads(raw)
        message = doc["error"]["message"] if "error" in doc else doc["errorMessage"]
        assert isinstance(message, str) and message


path_bytes = st.lists(
    st.sampled_from([b"/", b"a", b"%2F", b"%00", b"%FF", b"%", b"..", b"\xc3\xa9", b"\xff", b"?",
                     b"&", b"=", b"#", b"{", b"}", b"%C3%28", b";", b"+", b"~", b"%20"]),
    max_size=12,
).map(b"".join)  # fmt: skip
header_names = st.sampled_from(
    ["X-A", "Content-Type", "X-Scf-Request-Id", "X_SCF_NAME", "Host", "Cookie", "X-Forwarded-For"]
)
header_values = st.binary(max_size=30).filter(lambda v: b"\r" not in v and b"\n" not in v)


@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"HEAD", b"BREW"]),
    path=path_bytes,
    headers=st.lists(st.tuples(header_names, header_values), max_size=4),
    body=st.binary(max_size=200),
)
def test_gateway_request_path(
    served: tuple[Bridge, int],
    method: bytes,
    path: bytes,
    headers: list[tuple[str, bytes]],
    body: bytes,
) -> None:
    _, gw = served
    raw = method + b" /" + path + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    for k, v in headers:
        if k.lower() != "host":
            raw += k.encode() + b": " + v + b"\r\n"
    raw += b"Content-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(("127.0.0.1", gw), timeout=30) as s:
        s.sendall(raw)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    # Then the function's answer, or a clear 4xx, or a closed connection; never a 5xx
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status < 500, answer[:500]


def test_the_daemon_still_serves_after_the_fuzzing(served: tuple[Bridge, int]) -> None:
    b, gw = served
    _alive(b)
    url = urllib.parse.quote("/still/here")
    with socket.create_connection(("127.0.0.1", gw), timeout=30) as s:
        s.sendall(b"GET " + url.encode() + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b.started[0].proc.poll() is None
