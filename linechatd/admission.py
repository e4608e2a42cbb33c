"""Which WebSocket handshakes an instance accepts: every check, in the contract's order, without I/O.

:func:`admit` looks at an upgrade request (path, query, Origin, peer
address) and the instance's state as it is at that moment, and answers
either :class:`Admitted` or the :class:`Refusal` to send. The gateway does the
I/O around it (the HTTP answer, the accept, the hand-off to the partition);
nothing here awaits, so no check can be outdated by the time the next runs.

Order (CONTRACT.md §5; the first that applies answers): the endpoint's path,
the address's handshake rate (429: it bounds the work, token checks included,
that one address can cause, so it comes before anything costly), the
parameters (400), the Origin allow-list (403), the token (401/403), draining
(503), ownership of the user's partition (421), then the limits, which only
count sockets that would otherwise be accepted: connections of the instance
(503), of the address (429), devices of the uid (429), and last the uid's
resume rate (429).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from .auth import Authenticator, AuthError, Identity
from .config import Config
from .hashing import partition_for
from .keyedcount import KeyedCounter
from .keyedrate import retry_after_s
from .protocol import HandshakeError, HandshakeParams, parse_handshake_query

__all__ = [
    "TOO_MANY_CONNECTIONS_RETRY_AFTER_S",
    "Admitted",
    "ConnectionCounter",
    "Refusal",
    "UpgradeRequest",
    "address_key",
    "admit",
    "origin_allowed",
    "page_origins",
    "websocket_path",
]

# Told to clients refused because an instance or an address has too many sockets.
TOO_MANY_CONNECTIONS_RETRY_AFTER_S = 5
DRAINING_RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What admission reads of a WebSocket upgrade request."""

    path: str
    query: str
    origin: str | None
    remote: str  # the peer's IP address ("" if unknown)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The HTTP answer to a refused handshake: ``{"error": error, **extra}``."""

    status: int
    error: str
    extra: Mapping[str, object] = field(default_factory=dict)
    retry_after_s: int = 0


class Seats(Protocol):
    """A serving partition, as far as admission needs it."""

    def devices_of(self, uid: str) -> int: ...


R = TypeVar("R", bound=Seats)


@dataclass(frozen=True, slots=True)
class Admitted(Generic[R]):
    params: HandshakeParams
    identity: Identity
    partition: int
    runtime: R
    address: str  # what the per-address limit counts by (see address_key)


def websocket_path(advertise: str) -> str:
    """The path of the WebSocket endpoint, from its advertised url."""
    return urlsplit(advertise).path or "/"


def admit(
    request: UpgradeRequest,
    *,
    config: Config,
    auth: Authenticator,
    draining: bool,
    serving: Callable[[int], R | None],
    owner_url: Callable[[int], str | None],
    connections: ConnectionCounter,
    new_device_id: Callable[[], str],
    handshake_wait: Callable[[str], float],
    resume_wait: Callable[[str], float],
    page_urls: Callable[[], Iterable[str]],
) -> Admitted[R] | Refusal:
    """Decide on one upgrade request.

    ``serving(k)`` is this instance's serving partition ``k`` (None if it does
    not serve it); ``owner_url(k)`` is the WebSocket url of k's owner if it is
    another instance, for the 421 answer. ``handshake_wait(address)`` takes
    one handshake from the address's rate budget: 0 when allowed, else the
    seconds until the next is; ``resume_wait(uid)`` the same for resumes,
    asked last, of handshakes that would otherwise be accepted. ``page_urls()`` are the HTTP urls of the
    cluster's other instances (the pages of ``auth.mode = "none"``'s default
    Origin check).
    """
    expected_path = websocket_path(config.websocket.advertise)
    if request.path != expected_path:
        return Refusal(404, "not_found", {"message": f"the WebSocket endpoint is {expected_path}"})
    address = address_key(request.remote)
    wait_s = handshake_wait(address)
    if wait_s > 0:
        return Refusal(429, "too_many_handshakes", retry_after_s=retry_after_s(wait_s))
    try:
        params = parse_handshake_query(request.query, new_device_id=new_device_id)
    except HandshakeError as exc:
        return Refusal(exc.status, exc.code, {"message": exc.message})
    if request.origin is not None and not origin_allowed(request.origin, config, page_urls):
        # Browsers always send Origin: this stops other sites' pages from
        # opening sockets with a user's token; other clients are unaffected.
        return Refusal(403, "forbidden_origin")
    try:
        identity = auth.authenticate(params.token, params.uid)
    except AuthError as exc:
        return Refusal(exc.status, exc.code)
    if draining:
        return Refusal(503, "draining", retry_after_s=DRAINING_RETRY_AFTER_S)
    k = partition_for(params.uid, config.cluster.partitions)
    runtime = serving(k)
    if runtime is None:
        return Refusal(421, "wrong_instance", {"url": owner_url(k), "partition": k})
    limits = config.limits
    if connections.total >= limits.max_connections:
        return Refusal(
            503, "too_many_connections", retry_after_s=TOO_MANY_CONNECTIONS_RETRY_AFTER_S
        )
    if connections.of(address) >= limits.max_connections_per_address:
        return Refusal(
            429,
            "too_many_connections_from_address",
            retry_after_s=TOO_MANY_CONNECTIONS_RETRY_AFTER_S,
        )
    if runtime.devices_of(params.uid) >= limits.max_devices_per_uid:
        return Refusal(429, "too_many_devices")
    if params.resume is not None:
        # Refused, not answered "resumed": false: the client asks again
        # later with the same cursor and loses nothing.
        wait_s = resume_wait(params.uid)
        if wait_s > 0:
            return Refusal(429, "too_many_resumes", retry_after_s=retry_after_s(wait_s))
    return Admitted(params, identity, k, runtime, address)


# -- Origin ----------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def origin_allowed(origin: str, config: Config, page_urls: Callable[[], Iterable[str]]) -> bool:
    """May a browser page of ``origin`` open a socket?

    With ``websocket.allowed_origins`` set, exactly those. Without it, any in
    jwt mode (a page needs the user's token, which other sites do not have);
    in none mode only the cluster's own pages: a socket there is anyone's
    account, and any web page a developer visits could otherwise open one to
    ``linechatd dev`` on their machine.
    """
    configured = config.websocket.allowed_origins
    if configured:
        return origin.lower() in configured
    if config.auth.mode != "none":
        return True
    own = page_origins(config.http.advertise)
    if origin.lower() in own:
        return True
    return any(origin.lower() in page_origins(url) for url in page_urls())


def page_origins(http_url: str) -> frozenset[str]:
    """The Origin values a browser sends from pages of ``http_url``.

    The scheme's default port is left out, as browsers do; a loopback host
    is also reached as localhost, 127.0.0.1 or [::1].
    """
    try:
        parts = urlsplit(http_url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return frozenset()
    scheme = parts.scheme.lower()
    if host is None or scheme not in _DEFAULT_PORTS:
        return frozenset()
    host = f"[{host}]" if ":" in host else host
    suffix = "" if port is None or port == _DEFAULT_PORTS[scheme] else f":{port}"
    hosts: tuple[str, ...] = (host,)
    if host in _LOOPBACK_NAMES or host.startswith("127."):
        hosts = (host, *_LOOPBACK_NAMES)
    return frozenset(f"{scheme}://{name}{suffix}" for name in hosts)


# -- connection accounting -----------------------------------------------------------


def address_key(remote: str) -> str:
    """What the per-address limit counts by: the IPv4 address, or the IPv6 /64.

    One IPv6 subscriber usually holds a whole /64, so counting single IPv6
    addresses would not limit anyone.
    """
    if ":" not in remote:
        return remote  # IPv4 as the socket names it (or not an address at all)
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionCounter(KeyedCounter[str]):
    """This instance's accepted WebSocket connections, in total and per address key."""
