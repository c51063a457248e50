"""What several test modules share beyond fixtures: the server as a real process."""

from __future__ import annotations

import http.client
import os
import re
import selectors
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["ServerProcess"]

_READY = re.compile(r"Serving https://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """``dynupdate serve`` as a real subprocess on 127.0.0.1, port chosen by the kernel."""

    def __init__(
        self, home: Path, *args: str, cafile: Path | None = None, timeout: float = 30
    ) -> None:
        """``cafile``: what clients trust (default: the self-signed certificate made in home).

        ``timeout``: seconds the server has to say it serves; past it, it is killed.
        """
        self.home = home
        self.log: list[str] = []
        self._partial = b""
        self.process = subprocess.Popen(self.command(home, args), stderr=subprocess.PIPE)
        try:
            self.port = self._wait_ready(deadline=time.monotonic() + timeout)
        except BaseException:
            self.process.kill()
            self.process.wait()
            self.process.stderr.close()
            raise
        self.cafile = cafile or home / "tls" / "server.crt"
        self.context = ssl.create_default_context(cafile=str(self.cafile))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def command(self, home: Path, args: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-m", "dynupdate", "--home", str(home), "serve",
                "--host", "127.0.0.1", "--port", "0", "--workers", "1", *args]

    def _wait_ready(self, deadline: float) -> int:
        # select, then os.read: a readline on the pipe would block past the deadline
        # on a server that prints nothing (or half a line) and never exits.
        fd = self.process.stderr.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._flush_partial()
                    raise RuntimeError(f"server exited: {''.join(self.log)}")
                for line in self._lines(chunk):
                    if match := _READY.search(line):
                        return int(match.group(1))
        raise RuntimeError(f"server did not start in time: {''.join(self.log)}")

    def _lines(self, chunk: bytes) -> list[str]:
        """Complete lines of the log so far (appended to ``log``); keeps a partial one."""
        *whole, self._partial = (self._partial + chunk).split(b"\n")
        lines = [line.decode(errors="replace") + "\n" for line in whole]
        self.log.extend(lines)
        return lines

    def _flush_partial(self) -> None:
        if self._partial:
            self.log.append(self._partial.decode(errors="replace"))
            self._partial = b""

    def _drain(self) -> None:
        fd = self.process.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._lines(chunk)
        self._flush_partial()

    def connection(self, timeout: float = 10) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context,
                                           timeout=timeout)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict | None = None):
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def assert_alive(self) -> None:
        assert self.process.poll() is None, "the server died:\n" + "".join(self.log[-30:])

    def assert_no_traceback(self) -> None:
        """Nothing the server wrote on stderr was a Python traceback."""
        assert not any("Traceback" in line for line in self.log), "".join(self.log)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self.process.stderr.close()
