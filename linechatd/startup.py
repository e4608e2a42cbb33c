"""Checks an instance makes before it binds anything, shared with ``check-config``.

:func:`config_findings` is every check of a configuration that needs no
network: ``linechatd run`` refuses to start on any of its errors and logs its
warnings; ``linechatd check-config`` prints both and fails on errors. A check
that ``run`` makes belongs here, so that the two cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .config import Config, HostPort
from .tls import ListenerTLS, TLSFilesError, tls_files

__all__ = [
    "EXIT_CONFIG",
    "ConfigurationError",
    "Findings",
    "StartupError",
    "auth_exposure_problems",
    "cleartext_token_listeners",
    "config_findings",
    "is_loopback",
    "log_auth_warnings",
    "startup_error",
    "url_is_loopback",
]

log = logging.getLogger(__name__)

# `linechatd run`'s exit status when the configuration is at fault (sysexits'
# EX_CONFIG): the unit's RestartPreventExitStatus, so that a bad file does not
# restart-loop. Other startup failures exit 1 and are restarted.
EXIT_CONFIG = 78


class StartupError(Exception):
    """The instance cannot start; the message tells the operator why and what to do."""


class ConfigurationError(StartupError):
    """The instance cannot start until its configuration is changed (exit EXIT_CONFIG)."""


@dataclass
class Findings:
    """What the checks found: errors stop an instance, warnings are logged."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def config_findings(config: Config) -> Findings:
    """Every check ``run`` makes of ``config`` before it connects anywhere."""
    # Imported here: auth imports config, and startup is imported by cli early.
    from .auth import Authenticator, KeyFileError

    found = Findings(warnings=list(config.deprecations))
    found.errors += auth_exposure_problems(config, config)
    try:
        Authenticator(config.auth)
    except (OSError, KeyFileError) as exc:
        found.errors.append(f"auth.jwt_secret_file: cannot use the key: {exc}")
    try:
        ListenerTLS(config)
    except TLSFilesError as exc:
        found.errors.append(str(exc))
    found.errors += _advertise_problems(config)
    found.errors += _listener_clashes(config)
    found.warnings += _durability_warnings(config)
    found.warnings += _operations_warnings(config)
    return found


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _advertise_problems(config: Config) -> list[str]:
    """An advertised url must be one that others can connect to."""
    problems = []
    for name, section in (("http", config.http), ("websocket", config.websocket)):
        host = urlsplit(section.advertise).hostname or ""
        if _is_unspecified(host):
            problems.append(
                f"{name}.advertise: required when {name}.listen = {section.listen} "
                f"(clients and other instances cannot connect to {host}); set the url "
                "they reach this listener at"
            )
    admin_host = urlsplit(config.admin.advertise).hostname or ""
    if config.admin.advertise and _is_unspecified(admin_host):
        problems.append(f"admin.advertise: {admin_host} cannot be connected to")
    return problems


def _listener_clashes(config: Config) -> list[str]:
    listeners = [("http.listen", config.http.listen), ("websocket.listen", config.websocket.listen)]
    if config.admin.listen is not None:
        listeners.append(("admin.listen", config.admin.listen))
    problems = []
    for i, (name, address) in enumerate(listeners):
        for other, other_address in listeners[:i]:
            if address.port != 0 and address == other_address:
                problems.append(f"{name}: the same address as {other} ({address})")
    return problems


def _durability_warnings(config: Config) -> list[str]:
    """acks=all is only as durable as the replicas that must have a record."""
    kafka = config.kafka
    warnings = []
    production = config.cluster.environment == "production"
    if production and kafka.replication_factor < 3:
        warnings.append(
            f"kafka.replication_factor: {kafka.replication_factor} in a production cluster: "
            "an acked message is on fewer than 3 brokers; losing one can lose it (set 3)"
        )
    if production and (kafka.min_insync_replicas or 1) < 2:
        current = (
            "unset (the broker's default, 1 unless changed)"
            if kafka.min_insync_replicas is None
            else "1"
        )
        warnings.append(
            f"kafka.min_insync_replicas: {current} in a production cluster: acks=all is then "
            "satisfied by a single replica; set 2 (with replication_factor = 3)"
        )
    if (
        kafka.min_insync_replicas is not None
        and kafka.min_insync_replicas > kafka.replication_factor
    ):
        warnings.append(
            f"kafka.min_insync_replicas: {kafka.min_insync_replicas} is above "
            f"kafka.replication_factor ({kafka.replication_factor}): no send could be acked"
        )
    retention = kafka.topic_retention_s
    if retention is not None and retention < config.replay.max_age_s:
        warnings.append(
            f"kafka.topic_retention_s: {retention:g} s is shorter than replay.max_age_s "
            f"({config.replay.max_age_s:g} s): resumes cannot reach that far back"
        )
    return warnings


def _operations_warnings(config: Config) -> list[str]:
    warnings = []
    if config.cluster.environment == "production" and config.admin.token_file is None:
        warnings.append(
            "admin.token_file: unset in a production cluster: the admin endpoints answer 404, "
            "so `linechatd drain` cannot drain this instance (systemctl stop still can)"
        )
    return warnings


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
