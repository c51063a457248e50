"""The HTTP/TLS machinery :mod:`dynupdate.serve` composes."""
