"""Checks an instance makes before it binds anything, shared with ``check-config``."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from .config import Config, HostPort
from .tls import tls_files

__all__ = [
    "StartupError",
    "auth_exposure_problems",
    "cleartext_token_listeners",
    "is_loopback",
    "log_auth_warnings",
    "startup_error",
    "url_is_loopback",
]

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The instance cannot start; the message tells the operator why and what to do."""


def startup_error(exc: BaseException) -> StartupError | None:
    """The StartupError that ``exc`` is or only carries (None if it holds anything else)."""
    while isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(StartupError)
        if match is None or rest is not None:
            return None
        exc = match.exceptions[0]
    return exc if isinstance(exc, StartupError) else None


def is_loopback(listen: HostPort) -> bool:
    """True when only this host can reach ``listen`` (a name other than localhost may not)."""
    if listen.host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen.host).is_loopback
    except ValueError:
        return False


def url_is_loopback(url: str) -> bool:
    """True when ``url`` names this host only (an advertised URL that other hosts cannot use)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback(HostPort(host, 0))


def auth_exposure_problems(config: Config, listeners: Config) -> list[str]:
    """Why ``config``'s [auth] may not serve ``listeners``' addresses ([] when it may).

    An advertised URL that is not loopback counts as exposure too: behind a
    reverse proxy the listeners are on 127.0.0.1, and the advertised public
    URL is what says that the internet reaches them.
    """
    if config.auth.mode != "none" or config.auth.allow_insecure_none:
        return []
    exposed = []
    for name, section in (("http", listeners.http), ("websocket", listeners.websocket)):
        if not is_loopback(section.listen):
            exposed.append(f"{name}.listen = {section.listen}")
        elif not url_is_loopback(section.advertise):
            exposed.append(f"{name}.advertise = {section.advertise}")
    if not exposed:
        return []
    return [
        f'auth.mode: "none" lets anyone connect as any uid, and {" and ".join(exposed)} '
        f"{'is' if len(exposed) == 1 else 'are'} reachable from other hosts; "
        'set auth.mode = "jwt" with auth.jwt_secret_file, or listen on and advertise '
        "127.0.0.1, or set auth.allow_insecure_none = true to accept the risk"
    ]


def log_auth_warnings(config: Config) -> None:
    auth = config.auth
    if auth.mode == "none":
        public = [
            str(s.listen) if not is_loopback(s.listen) else s.advertise
            for s in (config.http, config.websocket)
            if not (is_loopback(s.listen) and url_is_loopback(s.advertise))
        ]
        log.warning(
            "auth_disabled",
            extra={
                "hint": 'auth.mode = "none" lets anyone connect as any uid: for development only',
                **({"public_listeners": public, "allow_insecure_none": True} if public else {}),
            },
        )
        return
    # Opt-outs of the audience and issuer checks are allowed, never quiet.
    if auth.jwt_audience is None and auth.allow_any_audience:
        log.warning(
            "jwt_audience_not_checked",
            extra={
                "hint": "auth.allow_any_audience = true: a token the identity provider issued "
                "for any other application is accepted here; set auth.jwt_audience"
            },
        )
    if auth.jwt_issuer is None and auth.allow_any_issuer:
        log.warning(
            "jwt_issuer_not_checked",
            extra={
                "hint": "auth.allow_any_issuer = true: tokens of any issuer holding the key are "
                "accepted; set auth.jwt_issuer"
            },
        )
    cleartext = cleartext_token_listeners(config)
    if cleartext:
        log.warning(
            "tokens_in_cleartext",
            extra={
                "listeners": cleartext,
                "hint": "tokens cross the network unencrypted (the WebSocket URL's token, and the "
                "Authorization header of connection-url); set the listener's tls_cert_file/"
                "tls_key_file or terminate TLS in a proxy and advertise wss:// and https://",
            },
        )


def cleartext_token_listeners(config: Config) -> list[str]:
    """The listeners that carry tokens in clear text over the network.

    A listener is one when it has no TLS, advertises a plain scheme, and
    either listens beyond loopback or advertises a URL other hosts use (a
    proxy forwarding without TLS).
    """
    found = []
    for name, section, plain in (
        ("http", config.http, "http://"),
        ("websocket", config.websocket, "ws://"),
    ):
        if tls_files(config, name) is not None or not section.advertise.startswith(plain):
            continue
        if not is_loopback(section.listen) or not url_is_loopback(section.advertise):
            found.append(f"{name}.advertise = {section.advertise}")
    return found
