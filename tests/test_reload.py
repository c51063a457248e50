"""SIGHUP re-reads the server's certificate: new handshakes use it, open connections go on."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import ssl
import time
from pathlib import Path

import pytest
from test_workers import _workers

from dynupdate.fingerprints import fingerprint
from dynupdate.server.tls import ensure_self_signed


def _pair(folder: Path) -> tuple[Path, Path]:
    """A certificate and key of their own (a self-signed pair made in ``folder``)."""
    return ensure_self_signed(folder)


def _install(source: tuple[Path, Path], cert: Path, key: Path) -> None:
    """Put a pair in place as an ACME client would: each file replaced whole, key first."""
    for src, dst in ((source[1], key), (source[0], cert)):
        tmp = dst.with_name(dst.name + ".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _unverified() -> ssl.SSLContext:
    # The test compares fingerprints itself: any certificate is accepted by the handshake.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _connect(port: int) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=_unverified(), timeout=10)
    conn.connect()
    return conn


def _presented(conn: http.client.HTTPSConnection) -> str:
    """The fingerprint of the certificate the server presented on this connection."""
    der = conn.sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def _get(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", "/nothing-here")
    response = conn.getresponse()
    response.read()
    return response.status


def _new_connection_sees(port: int) -> str:
    conn = _connect(port)
    try:
        return _presented(conn)
    finally:
        conn.close()


def _wait_for_line(server, text: str, count: int = 1) -> None:
    end = time.monotonic() + 20
    while sum(text in line for line in server.log) < count:
        assert time.monotonic() < end, f"no {text!r} in the log:\n" + "".join(server.log)
        time.sleep(0.05)


def _all_new_connections_see(port: int, wanted: str, in_a_row: int) -> None:
    """Wait until ``in_a_row`` new connections one after the other present ``wanted``.

    With several workers the kernel spreads connections over them: a worker that
    kept the old certificate shows up within a few connections.
    """
    seen: list[str] = []
    end = time.monotonic() + 20
    while seen[-in_a_row:] != [wanted] * in_a_row:
        assert time.monotonic() < end, f"new connections still see {set(seen[-in_a_row:])}"
        seen.append(_new_connection_sees(port))


@pytest.fixture
def pairs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: _pair(tmp_path / name) for name in ("old", "new")}


@pytest.fixture
def live(tmp_path: Path, pairs) -> tuple[Path, Path]:
    """The paths serve is given (--cert/--key), holding the old pair."""
    folder = tmp_path / "live"
    folder.mkdir()
    cert, key = folder / "fullchain.pem", folder / "privkey.pem"
    _install(pairs["old"], cert, key)
    return cert, key


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_serves_the_renewed_certificate_without_dropping_connections(
    start_server, home_dir, pairs, live, workers
):
    old, new = fingerprint(pairs["old"][0]), fingerprint(pairs["new"][0])
    cert, key = live
    server = start_server(home_dir, "--cert", str(cert), "--key", str(key),
                          "--workers", workers, cafile=cert)  # fmt: skip
    kept = _connect(server.port)
    assert _presented(kept) == old and _get(kept) == 404
    sock = kept.sock

    _install(pairs["new"], cert, key)
    server.process.send_signal(signal.SIGHUP)
    _wait_for_line(server, f"Reloaded the TLS certificate {cert}: SHA-256 fingerprint {new}")
    _all_new_connections_see(server.port, new, in_a_row=12)

    # The connection opened before the reload goes on, on the same socket and certificate.
    assert _get(kept) == 404 and _get(kept) == 404
    assert kept.sock is sock and _presented(kept) == old
    kept.close()
    server.assert_alive()
    server.assert_no_traceback()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unusable_new_certificate_keeps_the_old_one(
    start_server, home_dir, tmp_path, pairs, live, workers
):
    old, new = fingerprint(pairs["old"][0]), fingerprint(pairs["new"][0])
    cert, key = live
    server = start_server(home_dir, "--cert", str(cert), "--key", str(key),
                          "--workers", workers, cafile=cert)  # fmt: skip
    # Half a renewal: the new certificate in place, its key not yet.
    shutil.copyfile(pairs["new"][0], cert)
    server.process.send_signal(signal.SIGHUP)
    _wait_for_line(server, "TLS certificate not reloaded")
    failed = [line for line in server.log if "not reloaded" in line]
    assert failed[0].endswith(
        f"TLS certificate not reloaded: The TLS key {key} does not belong to the certificate "
        f"{cert} (KEY_VALUES_MISMATCH). Still serving the previous one "
        f"(SHA-256 fingerprint {old}).\n"
    ), failed
    _all_new_connections_see(server.port, old, in_a_row=12)

    # The key follows: the next SIGHUP takes the pair.
    _install(pairs["new"], cert, key)
    server.process.send_signal(signal.SIGHUP)
    _wait_for_line(server, f"fingerprint {new}")
    _all_new_connections_see(server.port, new, in_a_row=12)
    # One line for the failed reload, whatever the number of workers.
    assert sum("not reloaded" in line for line in server.log) == 1, "".join(server.log)
    server.assert_alive()
    server.assert_no_traceback()


def test_the_self_signed_certificate_is_reread_never_remade(start_server, home_dir, pairs):
    server = start_server(home_dir)
    made = home_dir / "tls" / "server.crt", home_dir / "tls" / "server.key"
    old = fingerprint(made[0])
    assert _new_connection_sees(server.port) == old

    # Gone: a reload must not make a new one (pinning endpoints would be locked out).
    for path in made:
        path.unlink()
    server.process.send_signal(signal.SIGHUP)
    _wait_for_line(server, "TLS certificate not reloaded: Cannot read the TLS certificate file")
    assert not made[0].exists() and not made[1].exists()
    assert _new_connection_sees(server.port) == old

    # Another pair put in the home (a restored backup, an admin's own): served after SIGHUP.
    _install(pairs["new"], *made)
    server.process.send_signal(signal.SIGHUP)
    new = fingerprint(pairs["new"][0])
    _wait_for_line(server, f"Reloaded the TLS certificate {made[0]}: SHA-256 fingerprint {new}")
    _all_new_connections_see(server.port, new, in_a_row=3)
    server.assert_no_traceback()


def test_a_worker_started_after_a_reload_serves_the_new_certificate(
    start_server, home_dir, pairs, live
):
    cert, key = live
    server = start_server(home_dir, "--cert", str(cert), "--key", str(key),
                          "--workers", "2", cafile=cert)  # fmt: skip
    new = fingerprint(pairs["new"][0])
    _install(pairs["new"], cert, key)
    server.process.send_signal(signal.SIGHUP)
    _wait_for_line(server, f"fingerprint {new}")
    _all_new_connections_see(server.port, new, in_a_row=12)
    # Both workers die; the ones the supervisor starts instead begin with the new context.
    before = _workers(server.process.pid)
    for worker in before:
        os.kill(worker, signal.SIGKILL)
    _wait_for_line(server, "starting another", count=2)
    end = time.monotonic() + 20
    while len(_workers(server.process.pid) - before) < 2:
        assert time.monotonic() < end, "".join(server.log)
        time.sleep(0.05)
    _all_new_connections_see(server.port, new, in_a_row=12)
