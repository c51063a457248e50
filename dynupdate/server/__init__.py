"""The HTTP/TLS machinery :mod:`dynupdate.serve` composes, one module per concern.

- :mod:`~dynupdate.server.messages`: ``Request``, ``Response``, XML error answers.
- :mod:`~dynupdate.server.files`: file answers with validators and ranges.
- :mod:`~dynupdate.server.reading`: the httptools parser under limits, one Cycle per request.
- :mod:`~dynupdate.server.connection`: answering the queued requests, flow control, closing.
- :mod:`~dynupdate.server.state`: what a server's connections share.
- :mod:`~dynupdate.server.listener`: accepting, connection caps, handshakes, deadlines.
- :mod:`~dynupdate.server.workers`: one process or a supervisor and N workers.
- :mod:`~dynupdate.server.tlsio`, :mod:`~dynupdate.server.tls`: TLS on the socket, the context.
- :mod:`~dynupdate.server.logs`: the log lines, as text or JSON.
- :mod:`~dynupdate.server.identity`: the serial a client certificate speaks for.
"""
