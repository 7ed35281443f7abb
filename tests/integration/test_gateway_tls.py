"""The gateway over HTTPS with tls_cert and tls_key (a self-signed certificate made here)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .gateway_fixtures import exchange, free_port, running, write_config

pytestmark = pytest.mark.integration


def self_signed(root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (root / "gw.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "gw.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return root / "gw.pem", root / "gw.key"


async def test_https(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    (tmp_path / "fn").mkdir()
    (tmp_path / "fn" / "index.py").write_text(
        "def main_handler(event, context):\n"
        "    return {'statusCode': 200, 'body': 'secure ' + event['path']}\n"
    )
    port = free_port()
    path = write_config(
        tmp_path,
        """tls_cert = "gw.pem"
tls_key = "gw.key"

[functions.f]
code = "fn"

[triggers.f]
type = "function_url"
function = "f"
""",
        port,
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    async with running(path), aiohttp.ClientSession() as s:
        async with s.get(f"https://localhost:{port}/x", ssl=ctx) as r:
            assert r.status == 200
            assert await r.text() == "secure /x"
        # plain HTTP on the TLS port is refused, not served
        raw = await exchange(port, b"GET /x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        assert b"secure" not in raw
