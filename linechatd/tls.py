"""TLS for the two listeners: contexts made at start, certificates reloaded in place."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from .config import Config

__all__ = [
    "HTTP_ALPN",
    "WEBSOCKET_ALPN",
    "ListenerTLS",
    "TLSFilesError",
    "server_tls_context",
    "tls_files",
]

# ALPN offered by each listener: the WebSocket upgrade is HTTP/1.1 only.
WEBSOCKET_ALPN = ("http/1.1",)
HTTP_ALPN = ("http/1.1",)
_ALPN = {"websocket": WEBSOCKET_ALPN, "http": HTTP_ALPN}


class TLSFilesError(ValueError):
    """A listener's TLS files are unusable; the message names the keys."""


def tls_files(config: Config, section: str) -> tuple[Path, Path] | None:
    """The (certificate, key) files of listener ``section``, or None for plain TCP."""
    table = getattr(config, section)
    cert = getattr(table, "tls_cert_file", None)
    key = getattr(table, "tls_key_file", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise TLSFilesError(
            f"{section}.tls_cert_file and {section}.tls_key_file: set both or neither"
        )
    return Path(cert), Path(key)


def server_tls_context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, the library's default ciphers, no client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No compression (CRIME) and no client-initiated renegotiation (a CPU sink).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.load_cert_chain(cert, key)
    return context


class ListenerTLS:
    """The running listeners' TLS contexts; a reload loads renewed certificates into them."""

    def __init__(self, config: Config) -> None:
        """Load every configured listener's certificate; raises TLSFilesError naming the keys."""
        # Listener section -> (cert file, key file, its live context).
        self._contexts: dict[str, tuple[Path, Path, ssl.SSLContext]] = {}
        for section, alpn in _ALPN.items():
            files = tls_files(config, section)
            if files is None:
                continue
            cert, key = files
            try:
                self._contexts[section] = (cert, key, server_tls_context(cert, key, alpn))
            except (OSError, ssl.SSLError) as exc:
                raise TLSFilesError(
                    f"{section}.tls_cert_file: cannot load the certificate with "
                    f"{section}.tls_key_file: {exc}"
                ) from None

    def context(self, section: str) -> ssl.SSLContext | None:
        entry = self._contexts.get(section)
        return None if entry is None else entry[2]

    @property
    def sections(self) -> list[str]:
        return sorted(self._contexts)

    def reload(self, config: Config) -> list[str]:
        """Load the (renewed) certificates ``config`` names into the running listeners.

        Returns the problems; a listener whose files cannot be loaded keeps its
        current certificate. Switching a listener between TCP and TLS needs a
        restart.
        """
        problems = []
        for section in _ALPN:
            try:
                files = tls_files(config, section)
            except TLSFilesError as exc:
                problems.append(str(exc))
                continue
            running = self._contexts.get(section)
            if (files is None) != (running is None):
                problems.append(f"{section}.tls_cert_file: turning TLS on or off needs a restart")
                continue
            if files is None or running is None:
                continue
            cert, key = files
            try:
                # Checked on a scratch context first: a failed load can leave
                # a context with a certificate that does not match its key.
                server_tls_context(cert, key, ())
                running[2].load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"{section}.tls_cert_file: cannot load the certificate: {exc}")
                continue
            self._contexts[section] = (cert, key, running[2])
        return problems
