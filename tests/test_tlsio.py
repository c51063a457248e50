"""The TLS transport on its own: flow control and byte-exact retries over real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import threading

import pytest
import trustme

from dynupdate.server.tlsio import TLSTransport, wrap_server_socket
from dynupdate.server.workers import loop_factory

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
PAYLOAD = hashlib.shake_256(b"dynupdate").digest(8 * 1024 * 1024 + 17)  # no two chunks alike


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


class Sender:
    """Writes PAYLOAD as fast as the transport lets it, in uneven pieces, then closes."""

    def __init__(self) -> None:
        self.paused = 0
        self.lost = asyncio.get_running_loop().create_future()
        self._resumed: asyncio.Event = asyncio.Event()
        self._buffer = memoryview(bytearray(64 * 1024))

    def connection_made(self, transport: TLSTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        # All under the transport's chunk: the first full socket meets a direct write.
        sizes = [1, 100, 16_384, 200_000, 70_000, 5]
        at = 0
        i = 0
        while at < len(PAYLOAD):
            if self.paused and not self._resumed.is_set():
                await self._resumed.wait()
            size = sizes[i % len(sizes)]
            self.transport.write(PAYLOAD[at : at + size])
            at += size
            i += 1
            await asyncio.sleep(0)
        self.transport.close()

    def pause_writing(self) -> None:
        self.paused += 1
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._resumed.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def _slow_reader(port: int, client_ctx: ssl.SSLContext, got: list, started: threading.Event):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            started.wait(10)
            chunks = []
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                chunks.append(data)
    got.append(b"".join(chunks))


@LOOPS
def test_a_slow_reader_gets_every_byte_in_order_and_the_writer_is_paused(
    loop, server_ctx, client_ctx
):
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        got: list[bytes] = []
        reading = threading.Event()
        reader = threading.Thread(target=_slow_reader, args=(port, client_ctx, got, reading))
        reader.start()
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        conn.setblocking(False)
        sender = Sender()
        failures = []
        sock, tls = wrap_server_socket(server_ctx, conn)
        TLSTransport(
            asyncio.get_running_loop(),
            sock,
            tls,
            sender,
            handshake_timeout=10,
            opened=lambda t: None,
            failed=lambda t, exc: failures.append(exc),
        ).start()
        # The client reads nothing until the server has filled every buffer.
        while not sender.paused and not failures:
            await asyncio.sleep(0.01)
        reading.set()
        exc = await asyncio.wait_for(sender.lost, 30)
        await asyncio.get_running_loop().run_in_executor(None, reader.join, 30)
        listener.close()
        return failures, sender.paused, exc, got

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        failures, paused, exc, got = runner.run(main())
    assert not failures and exc is None
    assert paused >= 1, "the writer was never told to pause"
    assert len(got[0]) == len(PAYLOAD) and got[0] == PAYLOAD


@LOOPS
def test_a_failed_handshake_is_reported_and_the_protocol_never_hears_of_it(loop, server_ctx):
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]

        def plain_http():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(OSError):  # closed, or reset: either is right
                    s.recv(100)

        client = threading.Thread(target=plain_http)
        client.start()
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        conn.setblocking(False)
        failed = asyncio.get_running_loop().create_future()

        class Never:
            def connection_made(self, transport):  # pragma: no cover - the point
                raise AssertionError("a failed handshake reached the protocol")

        sock, tls = wrap_server_socket(server_ctx, conn)
        TLSTransport(
            asyncio.get_running_loop(),
            sock,
            tls,
            Never(),
            handshake_timeout=10,
            opened=lambda t: None,
            failed=lambda t, exc: failed.set_result(exc),
        ).start()
        exc = await asyncio.wait_for(failed, 10)
        await asyncio.get_running_loop().run_in_executor(None, client.join, 10)
        listener.close()
        return exc, sock.fileno()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        exc, fd = runner.run(main())
    assert isinstance(exc, ssl.SSLError)
    assert fd == -1, "the socket of a failed handshake is closed"
