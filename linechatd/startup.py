"""Checks an instance makes before it binds anything, shared with ``check-config``."""

from __future__ import annotations

import ipaddress
import logging

from .config import Config, HostPort
from .tls import tls_files

__all__ = [
    "StartupError",
    "auth_exposure_problems",
    "is_loopback",
    "log_auth_warnings",
    "startup_error",
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


def auth_exposure_problems(config: Config, listeners: Config) -> list[str]:
    """Why ``config``'s [auth] may not serve ``listeners``' addresses ([] when it may)."""
    if config.auth.mode != "none" or config.auth.allow_insecure_none:
        return []
    exposed = [
        f"{name}.listen = {section.listen}"
        for name, section in (("http", listeners.http), ("websocket", listeners.websocket))
        if not is_loopback(section.listen)
    ]
    if not exposed:
        return []
    return [
        f'auth.mode: "none" lets anyone connect as any uid, and {" and ".join(exposed)} '
        f"{'is' if len(exposed) == 1 else 'are'} reachable from other hosts; "
        'set auth.mode = "jwt" with auth.jwt_secret_file, or listen on 127.0.0.1, '
        "or set auth.allow_insecure_none = true to accept the risk"
    ]


def log_auth_warnings(config: Config) -> None:
    if config.auth.mode == "none":
        public = [
            str(s.listen) for s in (config.http, config.websocket) if not is_loopback(s.listen)
        ]
        log.warning(
            "auth_disabled",
            extra={
                "hint": 'auth.mode = "none" lets anyone connect as any uid: for development only',
                **({"public_listeners": public, "allow_insecure_none": True} if public else {}),
            },
        )
        return
    ws = config.websocket
    if (
        tls_files(config, "websocket") is None
        and ws.advertise.startswith("ws://")
        and not is_loopback(ws.listen)
    ):
        log.warning(
            "tokens_in_cleartext",
            extra={
                "hint": "websocket.advertise is ws:// on a non-loopback listener: tokens cross "
                "the network unencrypted; set websocket.tls_cert_file/tls_key_file or "
                "terminate TLS in a proxy and advertise wss://"
            },
        )
