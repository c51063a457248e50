"""Certificate fingerprints: what a pinning endpoint compares, and the admin types.

Apart from the server's TLS module so that the endpoint client, which only
compares fingerprints, never loads the server's certificate factory:

    >>> fingerprint(Path(home) / "tls" / "server.crt")      # doctest: +SKIP
    '3f5c…64 hex digits'
"""

from __future__ import annotations

import string
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from dynupdate.core.errors import InvalidInput

__all__ = ["fingerprint", "load_certs", "normalize_fingerprint"]

_HEX = frozenset(string.hexdigits)


def fingerprint(cert_path: Path) -> str:
    """SHA-256 of the certificate's DER bytes: 64 lowercase hex digits, no colons.

    This is what a pinning endpoint compares with the certificate the server
    presents; for a chain file, the first certificate counts.
    """
    return load_certs(Path(cert_path))[0].fingerprint(hashes.SHA256()).hex()


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits.

    Accepts either case, with or without a colon between every two digits:

    >>> normalize_fingerprint("AB:" * 31 + "CD")[-4:]
    'abcd'
    """
    value = text.strip()
    digits = value.replace(":", "") if ":" in value else value
    if ":" in value and value.split(":") != [digits[i : i + 2] for i in range(0, len(digits), 2)]:
        digits = ""  # colons, when present, separate every pair of digits
    if len(digits) != 64 or not all(c in _HEX for c in digits):
        shown = value if len(value) <= 120 else value[:117] + "..."
        raise InvalidInput(
            f"Invalid certificate fingerprint {shown!r}: expected a SHA-256 fingerprint, "
            "64 hex digits, colons optional."
        )
    return digits.lower()


def load_certs(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """The PEM certificates in ``path``; InvalidInput naming the file when it holds none."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(
            f"Cannot read the TLS {what} file {path}: {exc.strerror or exc}."
        ) from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise InvalidInput(f"The TLS {what} file {path} holds no PEM certificate.")
    return certs
