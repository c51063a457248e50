"""The self-signed certificate, fingerprints and the server's TLS context."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
import warnings
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dynupdate.core.errors import InvalidInput
from dynupdate.fingerprints import fingerprint, normalize_fingerprint
from dynupdate.server.tls import ensure_self_signed, server_context


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext):
    """A one-connection TLS server with ``ctx`` on 127.0.0.1; yields (port, outcome)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    outcome: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                outcome["peer"] = tls.getpeercert()
                tls.sendall(b"hello")
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], outcome
    finally:
        thread.join(10)
        listener.close()


def talk(port: int, ctx: ssl.SSLContext, hostname: str = "localhost") -> tuple[bytes, bytes]:
    """Handshake, then read the greeting: (the server's DER certificate, the greeting)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        return tls.getpeercert(binary_form=True), tls.recv(5)


def unverified_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------------------
# ensure_self_signed


def test_ensure_self_signed_is_made_once(tmp_path: Path):
    cert, key = ensure_self_signed(tmp_path)
    assert (cert, key) == (tmp_path / "tls" / "server.crt", tmp_path / "tls" / "server.key")
    before = cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns, key.stat().st_mtime_ns
    assert ensure_self_signed(tmp_path) == (cert, key)
    assert (
        cert.read_bytes(),
        key.read_bytes(),
        cert.stat().st_mtime_ns,
        key.stat().st_mtime_ns,
    ) == (before)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    assert not list((tmp_path / "tls").glob(".*.tmp"))


def test_the_self_signed_certificate(tmp_path: Path):
    cert_path, key_path = ensure_self_signed(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(sans.get_values_for_type(x509.DNSName))
    assert {"localhost", socket.gethostname()} <= names
    addresses = set(sans.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= addresses
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc - now > dt.timedelta(days=9 * 365)


def test_a_key_without_its_certificate_is_replaced(tmp_path: Path):
    """A crash between writing the key and the certificate leaves no mismatched pair."""
    cert, key = ensure_self_signed(tmp_path)
    old_key = key.read_bytes()
    cert.unlink()
    (tmp_path / "tls" / ".server.key.999.tmp").write_bytes(b"half a key")
    assert ensure_self_signed(tmp_path) == (cert, key)
    assert key.read_bytes() != old_key
    server_context(cert, key)  # the new pair matches
    assert not list((tmp_path / "tls").glob(".*.tmp"))


def test_a_loose_tls_directory_is_made_private(tmp_path: Path):
    (tmp_path / "tls").mkdir(mode=0o755)
    os.chmod(tmp_path / "tls", 0o755)
    ensure_self_signed(tmp_path)
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700


# ---------------------------------------------------------------------------
# Fingerprints and pinning


def test_fingerprint_is_the_sha256_of_what_the_server_presents(tmp_path: Path):
    cert, key = ensure_self_signed(tmp_path)
    expected = fingerprint(cert)
    assert len(expected) == 64 and expected == expected.lower()
    assert expected == hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    with tls_server(server_context(cert, key)) as (port, outcome):
        der, greeting = talk(port, unverified_client())
    assert "error" not in outcome
    assert greeting == b"hello"
    assert hashlib.sha256(der).hexdigest() == expected


def test_a_client_pinning_the_fingerprint_connects(tmp_path: Path):
    cert, key = ensure_self_signed(tmp_path)
    # How an admin would copy it: upper case, with colons.
    pin = normalize_fingerprint(":".join(f"{b:02X}" for b in bytes.fromhex(fingerprint(cert))))
    with tls_server(server_context(cert, key)) as (port, _):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with unverified_client().wrap_socket(raw, server_hostname="localhost") as tls:
            assert hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest() == pin
            assert tls.recv(5) == b"hello"


def test_a_client_trusting_the_certificate_file_connects(tmp_path: Path):
    cert, key = ensure_self_signed(tmp_path)
    client = ssl.create_default_context(cafile=str(cert))
    with tls_server(server_context(cert, key)) as (port, outcome):
        _, greeting = talk(port, client, hostname="localhost")
    assert greeting == b"hello" and "error" not in outcome


HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEX, HEX),
        (HEX.upper(), HEX),
        (":".join(HEX[i : i + 2] for i in range(0, 64, 2)), HEX),
        (":".join(HEX[i : i + 2] for i in range(0, 64, 2)).upper(), HEX),
        (f"  {HEX}\n", HEX),
    ],
)
def test_normalize_fingerprint(text, expected):
    assert normalize_fingerprint(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        HEX[:-2],
        HEX + "00",
        HEX[:-1] + "g",
        "0x" + HEX[2:],
        HEX[:-1] + "\u0661",  # an Arabic-Indic digit
        ":".join(HEX[i : i + 4] for i in range(0, 64, 4)),  # colons in odd places
        ":" + HEX,
        HEX[:32] + " " + HEX[32:],
        "sha256:" + HEX,
    ],
)
def test_normalize_fingerprint_refuses(text):
    with pytest.raises(InvalidInput) as caught:
        normalize_fingerprint(text)
    message = str(caught.value)
    assert repr(text.strip()) in message
    assert "64 hex digits" in message


def test_normalize_fingerprint_shortens_huge_values_in_its_message():
    with pytest.raises(InvalidInput) as caught:
        normalize_fingerprint("z" * 10_000)
    assert len(str(caught.value)) < 300


# ---------------------------------------------------------------------------
# server_context


def test_server_context_is_tls_1_2_at_least(tmp_path: Path):
    cert, key = ensure_self_signed(tmp_path)
    ctx = server_context(cert, key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    old = unverified_client()
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
    with tls_server(ctx) as (port, outcome), pytest.raises((ssl.SSLError, OSError)):
        talk(port, old)
    assert "PROTOCOL" in str(outcome["error"]).upper()


def test_server_context_tls_1_2_ciphers_are_forward_secret_aead(tmp_path: Path):
    cert, key = ensure_self_signed(tmp_path)
    client = unverified_client()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_server(server_context(cert, key)) as (port, _):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client.wrap_socket(raw, server_hostname="localhost") as tls:
            name, version, _ = tls.cipher()
            tls.recv(5)
    assert version == "TLSv1.2"
    assert name.startswith("ECDHE-ECDSA-") and ("GCM" in name or "CHACHA20" in name)


def test_server_context_sends_one_session_ticket(tmp_path: Path):
    # Endpoints poll over one connection at a time: a second ticket is work for nothing.
    cert, key = ensure_self_signed(tmp_path)
    assert server_context(cert, key).num_tickets == 1


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path / "home")


def _other_key(folder: Path) -> Path:
    path = folder / "other.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _encrypted_key(folder: Path) -> Path:
    path = folder / "encrypted.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


@pytest.mark.parametrize(
    ("case", "named", "says"),
    [
        ("missing-cert", "cert", "Cannot read"),
        ("garbage-cert", "cert", "no PEM certificate"),
        ("key-as-cert", "cert", "no PEM certificate"),
        ("missing-key", "key", "Cannot read"),
        ("garbage-key", "key", "no usable PEM private key"),
        ("cert-as-key", "key", "no usable PEM private key"),
        ("encrypted-key", "key", "encrypted"),
        ("other-key", "key", "does not belong"),
        ("garbage-ca", "ca", "no PEM certificate"),
        ("missing-ca", "ca", "Cannot read"),
    ],
)
def test_server_context_names_the_bad_file(tmp_path, pair, case, named, says):
    cert, key = pair
    ca = None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    missing = tmp_path / "missing.pem"
    if case == "missing-cert":
        cert = missing
    elif case == "garbage-cert":
        cert = garbage
    elif case == "key-as-cert":
        cert = key
    elif case == "missing-key":
        key = missing
    elif case == "garbage-key":
        key = garbage
    elif case == "cert-as-key":
        key = cert
    elif case == "encrypted-key":
        key = _encrypted_key(tmp_path)
    elif case == "other-key":
        key = _other_key(tmp_path)
    elif case == "garbage-ca":
        ca = garbage
    elif case == "missing-ca":
        ca = missing
    with pytest.raises(InvalidInput) as caught:
        server_context(cert, key, client_ca=ca)
    message = str(caught.value)
    bad = {"cert": cert, "key": key, "ca": ca}[named]
    assert str(bad) in message
    assert says in message
    assert "\n" not in message


def test_server_context_with_a_client_ca_requires_client_certificates(tmp_path, pair):
    ca = trustme.CA()
    ca_file = tmp_path / "clients-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = server_context(*pair, client_ca=ca_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED

    anonymous = unverified_client()
    with tls_server(ctx) as (port, outcome), pytest.raises((ssl.SSLError, OSError)):
        talk(port, anonymous)
    assert "error" in outcome

    device = unverified_client()
    ca.issue_cert("8211abc.devices.example", common_name="8211ABC").configure_cert(device)
    with tls_server(ctx) as (port, outcome):
        _, greeting = talk(port, device)
    assert greeting == b"hello"
    assert dict(rdn[0] for rdn in outcome["peer"]["subject"])["commonName"] == "8211ABC"
