"""Running a server: one process, or a supervisor and N workers sharing the port.

    async def app(request: Request) -> Response:
        return Response(200, [("Content-Type", "text/plain")], b"hello")

    run(lambda: app, "127.0.0.1", 8443, server_context(cert, key), workers=2)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import select
import signal
import ssl
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from dynupdate.core.errors import DynupdateError, InvalidInput
from dynupdate.server.listener import Server, listen_sockets
from dynupdate.server.messages import App

__all__ = ["TLSReload", "loop_factory", "run"]

logger = logging.getLogger("dynupdate.server")

# On SIGHUP: re-read the TLS files; the new context, or None when they are unusable
# (the callable has logged why; the old context stays). Its argument says whether to
# log a success: the supervisor does, once, not each of its workers.
TLSReload = Callable[[bool], "ssl.SSLContext | None"]


@dataclass
class _Serving:
    """What every server of a run serves, and where: the single one, or each worker's."""

    app_factory: Callable[[], Any]
    host: str | None
    port: int
    ssl_context: ssl.SSLContext | None  # replaced on SIGHUP by a usable renewed one
    server_opts: dict[str, Any]
    reload_tls: TLSReload | None


def run(
    app_factory: Callable[[], App | Awaitable[App]],
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    workers: int = 1,
    ready: Callable[[list[tuple[str, int]]], None] | None = None,
    loop: str = "auto",
    reload_tls: TLSReload | None = None,
    worker_exited: Callable[[int], None] | None = None,
    **server_opts: Any,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly. Blocks.

    ``app_factory()`` is called in each worker, inside its event loop (it may
    be async); an app with an async ``aclose()`` has it awaited once the
    server has drained. With ``workers > 1`` the process forks that many
    workers, each listening on the same port (SO_REUSEPORT, the kernel
    spreads connections); the parent restarts a worker that dies and passes
    SIGINT/SIGTERM on. ``ready(addresses)`` is called once every worker listens.
    ``loop``: "uvloop", "asyncio", or "auto" (uvloop when installed: it takes
    about a quarter off the CPU per request and per handshake).
    On SIGHUP, ``reload_tls`` makes the context new handshakes use (open
    connections keep theirs); the supervisor checks the files first and passes
    SIGHUP on to its workers only when they are usable. Without it SIGHUP is
    ignored (rather than ending the server, its default).
    ``worker_exited(pid)`` is called in the supervisor when a worker has exited
    (before another is started): what it kept for the others to read is stale.
    """
    factory = loop_factory(loop)
    # A write past a file-size limit (RLIMIT_FSIZE) must fail with EFBIG, as a full
    # disk does, not kill the server: Python ignores SIGXFSZ only when it owns the
    # signal handlers (not when embedded). Inherited by the forked workers.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    serving = _Serving(app_factory, host, port, ssl_context, server_opts, reload_tls)
    if workers <= 1:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(serving, reuse_port=False, ready=ready))
        return
    _supervise(serving, workers, ready, factory, worker_exited)


def loop_factory(name: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``name`` ("auto", "uvloop" or "asyncio"); None: asyncio's."""
    if name == "asyncio":
        return None
    if name not in ("auto", "uvloop"):
        raise InvalidInput(f"Unknown event loop {name!r}: use auto, uvloop or asyncio.")
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise InvalidInput("uvloop is not installed: pip install uvloop.") from None
        return None
    return uvloop.new_event_loop


async def _serve(
    serving: _Serving,
    *,
    reuse_port: bool,
    ready: Callable[[list[tuple[str, int]]], None] | None,
    parent: int | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM or, for a worker, until ``parent`` (a pipe) reads EOF."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server: Server | None = None

    def reload() -> None:
        if serving.reload_tls is None or serving.ssl_context is None:
            return
        # A worker's supervisor has announced the new certificate already.
        context = serving.reload_tls(parent is None)
        if context is None:
            return
        serving.ssl_context = context  # a server still starting is made with it
        if server is not None:
            server.use_tls(context)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if parent is not None:
        loop.add_reader(parent, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # a forked worker starts blocked
    try:
        app = serving.app_factory()
        if inspect.isawaitable(app):
            app = await app
        server = Server(app, ssl_context=serving.ssl_context, **serving.server_opts)
        addresses = await server.start(serving.host, serving.port, reuse_port=reuse_port)
        # What start-up made lives as long as the server: out of the collector's
        # sight, a full collection walks only what requests leave behind.
        gc.freeze()
        if ready is not None:
            ready(addresses)
        await stop.wait()
        await server.close()
        aclose = getattr(app, "aclose", None)
        if aclose is not None:
            await aclose()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if parent is not None:
            loop.remove_reader(parent)


def _supervise(
    serving: _Serving,
    workers: int,
    ready: Callable[[list[tuple[str, int]]], None] | None,
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
    worker_exited: Callable[[int], None] | None,
) -> None:
    host, port = serving.host, serving.port
    if port:
        # SO_REUSEPORT would let the kernel spread connections over this server and
        # any other one listening there (another home, another certificate). A probe
        # bound without it fails while anyone listens on the address (a wildcard one
        # included); with SO_REUSEADDR, connections in TIME_WAIT do not count.
        for probe in listen_sockets(host, port, listen=False):
            probe.close()
    # Bound but not listening: reserves the port (and resolves port 0) for the
    # workers' own SO_REUSEPORT sockets without taking any connection itself.
    reserved = listen_sockets(host, port, reuse_port=True, listen=False)
    addresses = [s.getsockname()[:2] for s in reserved]
    port = addresses[0][1]
    serving = replace(serving, port=port)  # port 0 resolved: every worker on the same one
    signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    ready_r, ready_w = os.pipe()
    # Only the supervisor keeps the write end: when it dies, even by SIGKILL, the
    # workers read EOF and stop, so none serves (and holds the home's lock) orphaned.
    alive_r, alive_w = os.pipe()
    children: dict[int, float] = {}
    stopping = False

    def started(_addresses: list[tuple[str, int]]) -> None:
        os.write(ready_w, b".")

    def spawn() -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                os.close(alive_w)
                for s in reserved:
                    s.close()
                for signum in signals:
                    signal.signal(signum, signal.SIG_DFL)
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(_serve(serving, reuse_port=True, ready=started, parent=alive_r))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop_all(signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reload(_signum: int = signal.SIGHUP, _frame: Any = None) -> None:
        if serving.reload_tls is None or serving.ssl_context is None or stopping:
            return
        # Checked here once: unusable files are one line in the log, not one per worker.
        try:
            context = serving.reload_tls(True)
        except RuntimeError:
            # Its line written while this process was writing one (a reentrant write to
            # stderr): raised from a signal handler, it would stop the supervisor. The
            # workers keep the old certificate until the next SIGHUP.
            return
        if context is None:
            return
        serving.ssl_context = context  # what a worker started from now on begins with
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    previous = {signum: signal.signal(signum, stop_all) for signum in signals - {signal.SIGHUP}}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    failure = None
    try:
        for _ in range(workers):
            spawn()
        waiting = workers
        while waiting and not stopping:
            readable, _, _ = select.select([ready_r], [], [], 0.5)
            if readable:
                waiting -= len(os.read(ready_r, waiting))
                continue
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                children.pop(pid, None)
                failure = f"a worker exited while starting (status {status})"
                stop_all()
        if not stopping and ready is not None:
            ready([(address[0], port) for address in addresses])
        restarts: deque[float] = deque()
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            children.pop(pid, None)
            if worker_exited is not None:
                worker_exited(pid)
            if stopping:
                continue
            now = time.monotonic()
            restarts.append(now)
            while restarts and restarts[0] < now - 60:
                restarts.popleft()
            logger.error("Worker %d exited (status %d); starting another.", pid, status)
            if len(restarts) > 3 * workers:
                failure = "workers keep exiting"
                stop_all()
            else:
                spawn()
    finally:
        stopping = True
        stop_all()
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for s in reserved:
            s.close()
        for fd in (ready_r, ready_w, alive_r, alive_w):
            os.close(fd)
    if failure:
        raise DynupdateError(f"The server stopped: {failure}; see the errors above.")
