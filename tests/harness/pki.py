"""Self-signed certificates made with the openssl CLI (TLS registry, token signing key)."""

import subprocess
from pathlib import Path
from typing import Tuple


def self_signed(directory: Path, name: str, common_name: str) -> Tuple[Path, Path]:
    """Write NAME.crt/NAME.key: RSA 2048, valid 10 years, SAN IP:127.0.0.1 + DNS:localhost.

    Go rejects certificates that carry the host name only in the CN, hence the SAN.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-days", "3650", "-subj", f"/CN={common_name}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def der_certificate(cert: Path) -> bytes:
    """The certificate in DER form (what a JWT x5c header carries, base64-encoded)."""
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER"],
        check=True, capture_output=True,
    ).stdout


def rs256_sign(key: Path, data: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 over SHA-256, the signature JWT calls RS256."""
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(key)],
        input=data, check=True, capture_output=True,
    ).stdout
