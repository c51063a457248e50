"""TLS for the poll server: a self-signed certificate made once, the context.

Endpoints that cannot be given a CA pin the server certificate by its SHA-256
fingerprint (:mod:`dynupdate.fingerprints`), so the certificate is made once
and then never changes by itself:

    >>> cert, key = ensure_self_signed(Path(home))          # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dynupdate.core.errors import DynupdateError, InvalidInput
from dynupdate.fingerprints import fingerprint, load_certs

__all__ = [
    "CERT_NAME",
    "KEY_NAME",
    "ServerCertificate",
    "ensure_self_signed",
    "server_context",
]

CERT_NAME = "server.crt"
KEY_NAME = "server.key"
VALIDITY_DAYS = 3650

logger = logging.getLogger("dynupdate.server")

# Mozilla's "intermediate" TLS 1.2 suites with ECDHE (forward secrecy) and AEAD
# only; TLS 1.3 suites are OpenSSL's defaults, all of them good.
_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def ensure_self_signed(home: Path) -> tuple[Path, Path]:
    """Make ``home/tls/server.crt`` and ``server.key`` once; return their paths.

    ECDSA P-256, valid ten years, for this host's name, localhost, 127.0.0.1
    and ::1. Existing files are returned untouched. The key is written 0600
    under a 0700 directory, to a temporary name first, so a crash never leaves
    half a key behind.
    """
    tls_dir = Path(home) / "tls"
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    cert_path, key_path = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    # Two processes starting at once must not pair one's key with the other's cert.
    lock_fd = os.open(tls_dir / ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        for stale in tls_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_pem = _self_signed_cert(key).public_bytes(serialization.Encoding.PEM)
        # Key first: a crash between the two leaves no certificate, so the
        # next start makes a new pair instead of using a mismatched one.
        _write_atomic(key_path, key_pem, 0o600)
        _write_atomic(cert_path, cert_pem, 0o644)
        _fsync_dir(tls_dir)
    finally:
        os.close(lock_fd)
    return cert_path, key_path


def _self_signed_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    hostname = socket.gethostname() or "localhost"
    dns_names = []
    for name in (hostname, "localhost"):
        if name not in dns_names and name.isascii():
            dns_names.append(name)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    now = dt.datetime.now(dt.UTC)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))  # tolerate endpoints' clock skew
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2 minimum, forward-secret AEAD suites.

    With ``client_ca``, every client must present a certificate signed by it
    (mutual TLS). Unreadable or unsuitable files raise InvalidInput naming the file.
    """
    cert, key = Path(cert), Path(key)
    load_certs(cert)
    _check_key(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_ECDH_USE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])
    # One TLS 1.3 session ticket per handshake: an endpoint that resumes polls over
    # one connection at a time, and OpenSSL's default of two (for browsers opening
    # connections in parallel) costs a second ticket's key derivation, encoding
    # and encryption on every handshake (5% of its instructions, measured).
    ctx.num_tickets = 1
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"The TLS key {key} does not belong to the certificate {cert} ({_reason(exc)})."
        ) from None
    if client_ca is not None:
        client_ca = Path(client_ca)
        load_certs(client_ca, "client CA")
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(
                f"Cannot use the client CA file {client_ca}: {_reason(exc)}."
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ServerCertificate:
    """The server's certificate files and the context made of them, re-read by :meth:`reload`.

    For certificates an ACME client renews in place: ``serve`` calls
    :meth:`reload` on SIGHUP. The files are the same paths every time (for the
    self-signed certificate, ``HOME/tls/server.crt`` and ``server.key``); a
    reload never makes a certificate, since a new one would lock out every
    endpoint that pins the old fingerprint. ``note(message, level)`` gets the
    line saying what a reload did.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
        note: Callable[[str, str], None] | None = None,
    ) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca
        self.note = note or (lambda message, level: logger.warning("%s", message))
        self.context = server_context(self.cert, self.key, client_ca)
        self.fingerprint = fingerprint(self.cert)

    def reload(self, announce: bool = True) -> ssl.SSLContext | None:
        """A context of the files as they are now; None when unusable (the old one stays).

        A failure is one line naming the file and the fingerprint still served;
        a success one line with the new fingerprint, when ``announce``.
        """
        try:
            context = server_context(self.cert, self.key, self.client_ca)
            new = fingerprint(self.cert)
        except DynupdateError as exc:
            why = str(exc)
        except Exception as exc:  # a reload must never stop the server
            why = f"{type(exc).__name__}: {exc}"
        else:
            old, self.context, self.fingerprint = self.fingerprint, context, new
            if announce:
                same = " (the same certificate)" if new == old else ""
                self.note(
                    f"Reloaded the TLS certificate {self.cert}: SHA-256 fingerprint {new}{same}",
                    "info",
                )
            return context
        self.note(
            f"TLS certificate not reloaded: {why} Still serving the previous one "
            f"(SHA-256 fingerprint {self.fingerprint}).",
            "error",
        )
        return None


def _check_key(path: Path) -> None:
    data = _read(path, "key")
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidInput(
            f"The TLS key file {path} is encrypted: give an unencrypted key (mode 0600)."
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(
            f"The TLS key file {path} holds no usable PEM private key ({_reason(exc)})."
        ) from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(
            f"Cannot read the TLS {what} file {path}: {exc.strerror or exc}."
        ) from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return str(text).strip().rstrip(".")
