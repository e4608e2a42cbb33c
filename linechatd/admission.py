"""Which WebSocket handshakes an instance accepts: every check, in the contract's order, without I/O.

:func:`admit` looks at an upgrade request (path, query, Origin, peer
address) and the instance's state as it is at that moment, and answers
either :class:`Admitted` or the :class:`Refusal` to send. The gateway does the
I/O around it (the HTTP answer, the accept, the hand-off to the partition);
nothing here awaits, so no check can be outdated by the time the next runs.

Order (CONTRACT.md §5; the first that applies answers): the endpoint's path,
the parameters (400), the Origin allow-list (403), the token (401/403),
draining (503), ownership of the user's partition (421), then the limits,
which only count sockets that would otherwise be accepted: connections of the
instance (503), of the address (429), devices of the uid (429).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from .auth import Authenticator, AuthError, Identity
from .config import Config
from .hashing import partition_for
from .protocol import HandshakeError, HandshakeParams, parse_handshake_query

__all__ = [
    "TOO_MANY_CONNECTIONS_RETRY_AFTER_S",
    "Admitted",
    "ConnectionCounter",
    "Refusal",
    "UpgradeRequest",
    "address_key",
    "admit",
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
) -> Admitted[R] | Refusal:
    """Decide on one upgrade request.

    ``serving(k)`` is this instance's serving partition ``k`` (None if it does
    not serve it); ``owner_url(k)`` is the WebSocket url of k's owner if it is
    another instance, for the 421 answer.
    """
    expected_path = websocket_path(config.websocket.advertise)
    if request.path != expected_path:
        return Refusal(404, "not_found", {"message": f"the WebSocket endpoint is {expected_path}"})
    try:
        params = parse_handshake_query(request.query, new_device_id=new_device_id)
    except HandshakeError as exc:
        return Refusal(exc.status, exc.code, {"message": exc.message})
    origins = config.websocket.allowed_origins
    if origins and request.origin is not None and request.origin.lower() not in origins:
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
    address = address_key(request.remote)
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
    return Admitted(params, identity, k, runtime, address)


# -- connection accounting -----------------------------------------------------------


def address_key(remote: str) -> str:
    """What the per-address limit counts by: the IPv4 address, or the IPv6 /64.

    One IPv6 subscriber usually holds a whole /64, so counting single IPv6
    addresses would not limit anyone.
    """
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionCounter:
    """This instance's accepted WebSocket connections, in total and per address key."""

    def __init__(self) -> None:
        self.total = 0
        self._by_address: dict[str, int] = {}

    def of(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def add(self, address: str) -> Callable[[], None]:
        """Count one connection from ``address``; returns its release (idempotent)."""
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return _Release(self, address)

    def _remove(self, address: str) -> None:
        self.total -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]


class _Release:
    """One counted connection's release: an object with slots, not a closure
    (held by every open session, it is a third of the size)."""

    __slots__ = ("_counter", "_address")

    def __init__(self, counter: ConnectionCounter, address: str) -> None:
        self._counter: ConnectionCounter | None = counter
        self._address = address

    def __call__(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter._remove(self._address)
