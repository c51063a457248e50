"""``serve --metrics``: Prometheus' text format at ``/metrics``, every worker counted.

:func:`exporting` is what ``serve`` runs its workers in: with ``--metrics`` it
holds the metrics port, makes the private folder where each process keeps its counters
(prometheus_client's multiprocess mode) and only then imports the instruments,
since prometheus_client chooses its mode when it is imported.

- :mod:`~dynupdate.metrics.exporter`: the instruments a worker counts with (polls,
  reports, answers, connections, handshakes, the writer's queue) and its
  listener on the metrics port.
- :mod:`~dynupdate.metrics.fleet`: endpoints and rollouts, read from the
  database when scraped (cached).

Without ``--metrics`` none of this is imported and the server does no metering
work at all.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from dynupdate.core.errors import InvalidInput
from dynupdate.server.listener import listen_sockets
from dynupdate.server.messages import App
from dynupdate.server.metered import is_loopback, multiprocess_dir

__all__ = ["FOLDER", "announce", "exporting", "reserve", "shown_address"]

# In the home: the running server's counters, one set of files per process.
FOLDER = "prometheus"


@contextlib.contextmanager
def exporting(
    home_path: Path,
    address: tuple[str, int] | None,
    make_app: Callable[[Any], App],
    say: Callable[[str], None],
    quiet: bool,
) -> Iterator[tuple[Callable[[], App | Awaitable[App]], dict[str, Any]]]:
    """The app factory and :func:`~dynupdate.server.workers.run` options, exporting metrics.

    ``make_app(meter)`` makes the poll app, counting with ``meter`` (None: no
    metrics). With an ``address`` (``--metrics``), its port is held and the
    processes' folder made until the ``with`` block ends; without one,
    ``make_app(None)`` is the factory and nothing else happens.
    """
    if address is None:
        yield (lambda: make_app(None)), {}
        return
    host, port = address
    sockets = reserve(host, port)
    try:
        port = sockets[0].getsockname()[1]
        with multiprocess_dir(home_path / FOLDER) as folder:
            # Only now: prometheus_client reads the folder's variable when it is imported.
            from dynupdate.metrics.exporter import Exporter

            exporter = Exporter(home_path, folder, host, port)
            announce(host, port, say, quiet)

            async def factory() -> App:
                exporter.start()
                app = make_app(exporter)
                await exporter.listen()
                return app

            yield factory, {"meter": exporter, "worker_exited": exporter.worker_exited}
    finally:
        for s in sockets:
            s.close()


def announce(host: str, port: int, say: Callable[[str], None], quiet: bool) -> None:
    """Say where the metrics are; on a non-loopback address, always, with what to do."""
    url = f"http://{shown_address(host, port)}/metrics"
    if not is_loopback(host):
        # Always said, --quiet or not: whoever reaches the address can read them.
        say(
            f"Metrics at {url}: plain HTTP without authentication on a non-loopback "
            "address; put a reverse proxy with TLS and authentication in front (see README)."
        )
    elif not quiet:
        say(f"Metrics at {url}")


def reserve(host: str, port: int) -> list[socket.socket]:
    """Bound, not listening, SO_REUSEPORT sockets on the metrics address, held while serving.

    Each worker then listens there with SO_REUSEPORT, the kernel handing each
    scrape to one of them (any can answer: they all read every worker's files),
    and no other process can take the port meanwhile. Refused, naming
    ``--metrics``, when another process listens there; port 0 picks a free one.
    """
    try:
        if port:
            # Without SO_REUSEPORT: fails while anyone else listens there.
            for probe in listen_sockets(host, port, listen=False, option="--metrics"):
                probe.close()
        return listen_sockets(host, port, reuse_port=True, listen=False, option="--metrics")
    except InvalidInput as exc:
        raise InvalidInput(f"Cannot serve --metrics {shown_address(host, port)}: {exc}") from None


def shown_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets.

    >>> shown_address("::1", 9464), shown_address("127.0.0.1", 9464)
    ('[::1]:9464', '127.0.0.1:9464')
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
