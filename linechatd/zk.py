"""The one adapter between kazoo's threads and trio.

Everything else awaits plain trio objects: the session state is an
``AsyncValue``, calls are coroutines, watches are trio tasks. Kazoo invokes
our callbacks on its own threads; they only hand the event over with
``TrioToken.run_sync_soon`` (never blocking, never doing work there).

When may we trust our ephemeral nodes (the partition leases)?
---------------------------------------------------------------
The server expires a session once it has heard nothing from it for the
negotiated session timeout T; then it deletes the session's ephemeral nodes and
another instance may take the leases. Every request the server receives
restarts that clock. So if a request *sent* at time s got an answer, the
session lives at least until s + T, and not necessarily a moment longer.

Kazoo's own loss detection is not enough to stop in time: it declares the
connection dead when a ping goes unanswered for T/3, but it only pings after
T/3 *without sending*, and every request it sends counts as one. A request
sent into a dead connection (a balancer step, a watch re-read) pushes the next
ping out, so kazoo may say SUSPENDED at or after the moment the server expires
the session.

Hence our own lease clock: ``_call`` notes the send time of every answered
request of the current session, a heartbeat sends one every T/6, and the
session counts as SUSPENDED (``degraded``) once the newest answered request is
older than T/2, whatever kazoo says. The heartbeat runs on a thread of this
adapter's own and stamps its answers there: a trio loop busy for longer than
T/2 (thousands of sockets closing at once) must not read as a silent server
while ZooKeeper kept hearing from us all along. That leaves T/2 to cancel every partition
before the earliest moment another instance could hold one. The clock, not
the connection, decides: kazoo's SUSPENDED (a dropped connection: a server
restarting, a leader election) changes nothing while the newest answer is
younger than T/2, since the server cannot expire the session before then; if
kazoo reconnects the same session in time, no partition ever stops. T is the
smaller of the configured and the negotiated timeout: a server clamps a request
above its ``maxSessionTimeout`` and would expire us sooner than configured.

A session that stays untrusted for a whole T although ZooKeeper could be
reached meanwhile (``degraded``: connected, answers too late) is closed and
replaced by a new one: over a link that slow kazoo keeps the session alive,
and its lease nodes would keep the partitions from every healthy instance
while we cannot use them. A server that cannot be reached at all is left to
kazoo: once it is back, a surviving session keeps its leases.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import trio
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    OperationTimeoutError,
    RolledBackError,
    RuntimeInconsistency,
    SessionExpiredError,
)
from kazoo.exceptions import NodeExistsError as _KazooNodeExists
from kazoo.exceptions import NoNodeError as _KazooNoNode
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import ZnodeStat
from trio_util import AsyncValue, wait_any

__all__ = [
    "Create",
    "Delete",
    "NodeError",
    "NodeExistsError",
    "NodeStat",
    "NoNodeError",
    "Op",
    "SessionInfo",
    "SetData",
    "SessionState",
    "ZooKeeper",
    "ZooKeeperClient",
    "ZooKeeperError",
    "ZooKeeperUnavailable",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Fractions of the session timeout; see the module docstring.
SUSPECT_AFTER = 1 / 2  # no answered request for this long: stop trusting our leases
HEARTBEAT_EVERY = 1 / 6  # keeps the lease clock fresh on an idle connection
ABANDON_AFTER = 1.0  # untrusted (and degraded) this long: close the session, open a new one
# Answers that say nothing about the server having heard us.
_NO_CONTACT = (
    ConnectionLoss,
    SessionExpiredError,
    ConnectionClosedError,
    AuthFailedError,
    OperationTimeoutError,
)
# What a failed transaction says of its operations that did not fail themselves.
_ROLLED_BACK = (RolledBackError, RuntimeInconsistency)
_RETRY_MIN_S = 0.05
# Reads in flight at once when a watch of many nodes (re-)reads them.
_READ_BATCH = 64
# A watched directory is listed again at most this often (see watch_children_data).
_LIST_EVERY_S = 0.25
# kazoo's level below DEBUG, and the start of the record it logs at that level
# when a session is created (see _KazooLogger).
_KAZOO_BLATHER = 5
_SESSION_CREATED = "Session created"
_RETRY_MAX_S = 1.0


class _Beat(NamedTuple):
    """The newest answered heartbeat: its session and when it was sent (perf_counter)."""

    session_id: int
    sent: float


class ZooKeeperError(Exception):
    """A ZooKeeper operation failed in a way the caller should report."""


class NodeError(Exception):
    """ZooKeeper answered, and the answer is about the node: callers decide on it."""


class NoNodeError(NodeError):
    """The node does not exist."""


class NodeExistsError(NodeError):
    """The node already exists."""


@dataclass(frozen=True, slots=True)
class NodeStat:
    """What the code needs of a node's stat (kazoo's own type stays in this module)."""

    czxid: int  # the zxid of the create: nodes are born in one total order
    mzxid: int  # the zxid of the last change of the data
    ctime_ms: int  # creation time, ms since the epoch
    version: int  # data version, for conditional writes
    ephemeral_owner: int  # the session that owns an ephemeral node; 0 for a persistent one
    mtime_ms: int = 0  # time of the last change of the data, ms since the epoch

    @classmethod
    def of(cls, stat: ZnodeStat) -> NodeStat:
        return cls(
            stat.czxid, stat.mzxid, stat.ctime, stat.version, stat.ephemeralOwner, stat.mtime
        )


@dataclass(frozen=True, slots=True)
class Create:
    """A ``multi`` operation: create a node (no parents: they must exist)."""

    path: str
    data: bytes = b""
    ephemeral: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    """A ``multi`` operation: delete a node (at ``version``, or any with -1)."""

    path: str
    version: int = -1


@dataclass(frozen=True, slots=True)
class SetData:
    """A ``multi`` operation: replace a node's data (at ``version``, or any with -1)."""

    path: str
    data: bytes
    version: int = -1


Op = Create | Delete | SetData


class ZooKeeperUnavailable(ZooKeeperError):
    """ZooKeeper could not be reached in time."""


class SessionState(enum.Enum):
    CONNECTING = "connecting"  # before the first session exists
    CONNECTED = "connected"  # leases of this session can be trusted
    SUSPENDED = "suspended"  # they cannot: the session may or may not survive
    LOST = "lost"  # the session expired: every ephemeral node of ours is gone
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionInfo:
    state: SessionState
    session_id: int | None  # while SUSPENDED: the session that may still live
    generation: int  # grows by one for every new session
    # SUSPENDED although the connection is up: ZooKeeper answers, but too late
    # to trust our leases. Our nodes can (and should) still be deleted.
    degraded: bool = False


@dataclass(frozen=True)
class _Link:
    """Kazoo's own view of the connection, in the order kazoo reported it."""

    state: KazooState | None  # None before the first connection
    session_id: int | None
    connects: int  # bumps on every (re)connection


class ZooKeeperClient(Protocol):
    """What the rest of linechatd may use of a ZooKeeper session.

    :class:`ZooKeeper` (kazoo, real servers) is the product's one
    implementation; benchmarks/scale/simzk.py is an in-memory one for the
    scale simulator. mypy checks both against this protocol, so the two
    cannot drift apart. Semantics are those documented on :class:`ZooKeeper`.
    """

    session: AsyncValue[SessionInfo]

    @property
    def connected(self) -> bool: ...

    @property
    def session_id(self) -> int | None: ...

    @property
    def session_timeout_s(self) -> float: ...

    async def run(self, *, task_status: trio.TaskStatus[Any] = ...) -> None: ...

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, makepath: bool = False
    ) -> NodeStat: ...

    async def ensure_path(self, path: str) -> None: ...

    async def get(self, path: str) -> tuple[bytes, NodeStat]: ...

    async def exists(self, path: str) -> NodeStat | None: ...

    async def get_children(self, path: str) -> list[str]: ...

    async def set(self, path: str, data: bytes, *, version: int = -1) -> NodeStat: ...

    async def delete(self, path: str, *, version: int = -1) -> None: ...

    async def multi(self, ops: Sequence[Op]) -> list[NodeStat | None]: ...

    async def watch_data(
        self,
        path: str,
        callback: Callable[[bytes | None, NodeStat | None], None],
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None: ...

    async def watch_children(
        self,
        path: str,
        callback: Callable[[list[str]], None],
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None: ...

    async def watch_children_data(
        self,
        path: str,
        callback: Callable[[str, bytes | None, NodeStat | None], None],
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None: ...


def _session_hex(session_id: int | None) -> str | None:
    return None if session_id is None else f"{session_id:#x}"


class _KazooLogger(logging.Logger):
    """The logger one kazoo client writes to (``KazooClient(logger=...)``).

    kazoo learns the session timeout the server granted (servers clamp it to
    their min/maxSessionTimeout) but keeps it to itself, except in the record
    it logs when a session is created. This logger reads it from there, hands
    it to ``on_negotiated`` (seconds, on kazoo's thread), and passes records
    on to kazoo's usual logger at that logger's own level, as if kazoo wrote
    there. It is not registered with ``logging`` (no global state). The record
    it reads is part of kazoo's behaviour, not its API: the kazoo version is
    pinned in pyproject.toml and tests/integration/test_zk_adapter.py checks it.
    """

    def __init__(self, on_negotiated: Callable[[float], None]) -> None:
        super().__init__("kazoo.client", level=_KAZOO_BLATHER)
        self.parent = logging.getLogger("kazoo.client")
        self._on_negotiated = on_negotiated

    def handle(self, record: logging.LogRecord) -> None:
        if record.levelno == _KAZOO_BLATHER:
            args = record.args if isinstance(record.args, tuple) else ()
            if str(record.msg).startswith(_SESSION_CREATED) and len(args) >= 3:
                try:
                    negotiated_ms = float(str(args[2]))
                except (TypeError, ValueError):
                    return
                self._on_negotiated(negotiated_ms / 1000.0)
            return
        if self.parent is not None and self.parent.isEnabledFor(record.levelno):
            super().handle(record)


class ZooKeeper:
    """A kazoo session bridged into trio.

    ``session`` holds a :class:`SessionInfo` that other tasks wait on
    (``wait_value``/``wait_transition``); every ephemeral node we create lives
    at most as long as one ``generation``, and may be trusted only while the
    state is CONNECTED.
    """

    def __init__(self, hosts: str, *, session_timeout_s: float, connect_timeout_s: float) -> None:
        self._hosts = hosts
        self._session_timeout_s = session_timeout_s
        self._negotiated_timeout_s: float | None = None
        self._connect_timeout_s = connect_timeout_s
        self.session: AsyncValue[SessionInfo] = AsyncValue(
            SessionInfo(SessionState.CONNECTING, None, 0)
        )
        self._link: AsyncValue[_Link] = AsyncValue(_Link(None, None, 0))
        # trio clock: when the newest answered request of the current session was sent.
        self._contact: AsyncValue[float] = AsyncValue(-math.inf)
        self._contact_connects = 0  # the connection that answered last
        self._link_up_at = -math.inf  # trio clock: when the current connection came up
        self._generation_session: int | None = None
        self._client: KazooClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self._degraded_seen = False  # degraded at some point of the current suspension
        # Written by the heartbeat thread (one assignment), read by trio.
        self._beat: _Beat | None = None
        self._beat_stop = threading.Event()

    def __repr__(self) -> str:
        info = self.session.value
        return f"<ZooKeeper {self._hosts} {info.state.value} gen={info.generation}>"

    # -- timing ------------------------------------------------------------

    @property
    def session_timeout_s(self) -> float:
        """The timeout the server holds us to (as far as we know, the smaller one)."""
        negotiated = self._negotiated_timeout_s
        if negotiated is None:
            return self._session_timeout_s
        return min(self._session_timeout_s, negotiated)

    @property
    def suspect_after_s(self) -> float:
        return self.session_timeout_s * SUSPECT_AFTER

    @property
    def heartbeat_interval_s(self) -> float:
        return self.session_timeout_s * HEARTBEAT_EVERY

    def _newest_contact(self) -> float:
        """Trio clock: when the newest answered request of the current session was sent."""
        contact = self._contact.value
        beat, link = self._beat, self._link.value
        # A heartbeat answered before the connection dropped still counts: the
        # server heard the session then, whatever the connection does since.
        if (
            beat is not None
            and link.state in (KazooState.CONNECTED, KazooState.SUSPENDED)
            and beat.session_id == link.session_id
        ):
            # perf_counter is trio's system clock less a fixed offset.
            contact = max(contact, beat.sent + (trio.current_time() - time.perf_counter()))
        return contact

    def _fresh(self) -> bool:
        return trio.current_time() < self._newest_contact() + self.suspect_after_s

    # -- lifecycle ---------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[ZooKeeper] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the session, report ready once connected, close it on cancel."""
        self._token = trio.lowlevel.current_trio_token()
        client = KazooClient(
            hosts=self._hosts,
            timeout=self._session_timeout_s,
            # Reconnect forever: giving up is the operator's call (systemd), not ours.
            connection_retry={"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0},
            command_retry={"max_tries": 0},
            logger=_KazooLogger(self._on_session_created),
        )
        self._client = client
        client.add_listener(self._on_kazoo_state)
        beat: threading.Thread | None = None
        try:
            try:
                # Abandoned on cancel (a stop during startup): the finally below
                # stops the client, which ends the waiting thread too.
                await trio.to_thread.run_sync(
                    client.start, self._connect_timeout_s, abandon_on_cancel=True
                )
            except KazooTimeoutError as exc:
                raise ZooKeeperUnavailable(
                    f"could not connect to ZooKeeper at {self._hosts} "
                    f"within {self._connect_timeout_s:g} s"
                ) from exc
            beat = threading.Thread(
                target=self._beat_loop, args=(client,), name="zookeeper-heartbeat", daemon=True
            )
            beat.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._lease_clock)
                nursery.start_soon(self._abandon_untrusted, client)
                with trio.move_on_after(self._connect_timeout_s):
                    await self.session.wait_value(lambda s: s.state is SessionState.CONNECTED)
                if self.connected:
                    task_status.started(self)
                else:
                    nursery.cancel_scope.cancel()
            raise ZooKeeperUnavailable(
                f"ZooKeeper at {self._hosts} accepted a session but did not answer "
                f"within {self._connect_timeout_s:g} s"
            )
        finally:
            self._closing = True
            self._beat_stop.set()
            with trio.CancelScope(shield=True):
                if beat is not None:
                    await trio.to_thread.run_sync(beat.join)
                # A clean close deletes our ephemeral nodes at once, so other
                # instances take over without waiting for the session timeout.
                # Bounded: against an unreachable server kazoo would wait for
                # its own timeouts, and the process is leaving anyway.
                with trio.move_on_after(5) as scope:
                    await trio.to_thread.run_sync(client.stop, abandon_on_cancel=True)
                if not scope.cancelled_caught:
                    await trio.to_thread.run_sync(client.close)
            self._publish(
                SessionInfo(SessionState.CLOSED, None, self.session.value.generation), "closed"
            )

    def _on_session_created(self, negotiated_s: float) -> None:
        # A kazoo thread: hand over only.
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._on_negotiated, negotiated_s)
            except trio.RunFinishedError:
                pass

    def _on_negotiated(self, negotiated_s: float) -> None:
        if negotiated_s <= 0 or negotiated_s == self._negotiated_timeout_s:
            return
        self._negotiated_timeout_s = negotiated_s
        if abs(negotiated_s - self._session_timeout_s) > 0.001:
            log.warning(
                "zookeeper_session_timeout_negotiated",
                extra={
                    "configured_s": self._session_timeout_s,
                    "negotiated_s": negotiated_s,
                    "hint": "the server clamps session timeouts to its min/maxSessionTimeout",
                },
            )
        self._evaluate("timeout negotiated")

    def _on_kazoo_state(self, state: KazooState) -> None:
        # Runs on a kazoo thread: note what it says now, hand over, never block.
        token, client = self._token, self._client
        if token is None or client is None:
            return
        client_id = client.client_id
        session_id = client_id[0] if client_id else None
        try:
            token.run_sync_soon(self._on_link, state, session_id)
        except trio.RunFinishedError:
            pass

    def _on_link(self, state: KazooState, session_id: int | None) -> None:
        if self._closing:
            return  # our own close: CLOSED is published once it is done
        old = self._link.value
        if state == KazooState.CONNECTED:
            link = _Link(state, session_id, old.connects + 1)
            self._link_up_at = trio.current_time()
            if session_id != old.session_id:
                # Contact with an earlier session says nothing about this one.
                self._contact.value = -math.inf
        elif state == KazooState.SUSPENDED:
            link = _Link(state, old.session_id, old.connects)
        else:
            link = _Link(state, None, old.connects)
            self._contact.value = -math.inf
        self._link.value = link
        # Logged whether or not it changes what the leases may do (see _evaluate).
        log.info(
            "zookeeper_connection",
            extra={"state": state.lower(), "session": _session_hex(link.session_id)},
        )
        self._evaluate(f"connection {state.lower()}")

    def _note_contact(self, sent: _Link, sent_at: float) -> None:
        """An answer to a request sent at ``sent_at``: the server heard us then or later."""
        now = self._link.value
        if (
            sent.state == KazooState.CONNECTED
            and now.state == KazooState.CONNECTED
            and sent.session_id == now.session_id
            and sent_at > self._contact.value
        ):
            self._contact.value = sent_at
            self._contact_connects = now.connects
            self._evaluate("answer")

    def _evaluate(self, cause: str) -> None:
        """Derive the published state from kazoo's link and our lease clock.

        The lease clock decides, not the connection: while the newest answered
        request of the session was sent less than T/2 ago, the server cannot
        expire the session (nor delete our leases) for at least T/2 more,
        whether or not the connection is up right now. So a dropped connection
        (a ZooKeeper server restarting, a leader election) that kazoo restores
        within T/2 stops nothing; one that lasts longer stops every partition
        at T/2, as before.
        """
        link = self._link.value
        current = self.session.value
        if current.state is SessionState.CLOSED or link.state is None:
            return
        if link.state == KazooState.LOST:
            new = SessionInfo(SessionState.LOST, None, current.generation)
        elif self._fresh():
            generation = current.generation
            if link.session_id != self._generation_session:
                self._generation_session = link.session_id
                generation += 1
            new = SessionInfo(SessionState.CONNECTED, link.session_id, generation)
        elif link.state == KazooState.SUSPENDED:
            new = SessionInfo(SessionState.SUSPENDED, current.session_id, current.generation)
            if current.state is SessionState.CONNECTED:
                cause = f"connection lost and no answer within {self.suspect_after_s:.3g} s"
        elif (
            self._contact_connects != link.connects
            and trio.current_time() < self._link_up_at + self.suspect_after_s
        ):
            # Just (re)connected, first answer not in yet: not trusted, but
            # not degraded either (a surviving session's leases are kept).
            if current.state is SessionState.CONNECTING:
                return
            new = SessionInfo(SessionState.SUSPENDED, current.session_id, current.generation)
        else:
            new = SessionInfo(
                SessionState.SUSPENDED, link.session_id, current.generation, degraded=True
            )
            cause = f"no answer from ZooKeeper within {self.suspect_after_s:.3g} s"
        self._publish(new, cause)

    def _publish(self, new: SessionInfo, cause: str) -> None:
        current = self.session.value
        if new == current:
            return
        level = logging.INFO if new.state is SessionState.CONNECTED else logging.WARNING
        if new.state is SessionState.CLOSED:
            level = logging.INFO
        log.log(
            level,
            "zookeeper_session",
            extra={
                "state": new.state.value,
                "generation": new.generation,
                "session": _session_hex(new.session_id),
                "degraded": new.degraded,
                "cause": cause,
            },
        )
        if new.degraded:
            self._degraded_seen = True
        elif new.state is not SessionState.SUSPENDED:
            self._degraded_seen = False
        self.session.value = new

    def _beat_loop(self, client: KazooClient) -> None:
        """The heartbeat thread: one cheap request every T/6, whatever trio is doing.

        An answer is stamped with the time the request was queued (no later
        than it was sent), for the session that was connected then and still is.
        """
        while not self._beat_stop.wait(self.heartbeat_interval_s):
            client_id = client.client_id
            if client.state != KazooState.CONNECTED or not client_id:
                continue
            session_id, sent = client_id[0], time.perf_counter()
            try:
                result = client.exists_async("/")
            except Exception:  # kazoo closing under us: the next turn sees it
                continue

            def answered(result: Any, session_id: int = session_id, sent: float = sent) -> None:
                now_id = client.client_id
                if (
                    result.successful()
                    and client.state == KazooState.CONNECTED
                    and now_id
                    and now_id[0] == session_id
                ):
                    beat = self._beat
                    if beat is None or beat.session_id != session_id or beat.sent < sent:
                        self._beat = _Beat(session_id, sent)

            result.rawlink(answered)

    async def _heartbeat(self) -> None:
        """Answers on the trio side too, every T/6: they also mark a reconnection trusted."""
        while True:
            link = await self._link.wait_value(lambda lk: lk.state == KazooState.CONNECTED)
            try:
                await self._call("exists_async", "/")
            except (KazooException, ZooKeeperError):
                pass
            # Early on a reconnection, so that a surviving session is trusted
            # again after one round trip.
            with trio.move_on_after(self.heartbeat_interval_s):
                await self._link.wait_value(lambda lk, n=link.connects: lk.connects != n)

    async def _lease_clock(self) -> None:
        """Publish SUSPENDED once the newest answer is older than T/2."""
        while True:
            deadline = self._newest_contact() + self.suspect_after_s
            now = trio.current_time()
            if now >= deadline:
                self._evaluate("lease clock")
                deadline = now + self.heartbeat_interval_s
            with trio.move_on_at(deadline):
                await self._contact.wait_transition()

    async def _abandon_untrusted(self, client: KazooClient) -> None:
        """Replace a session that stayed SUSPENDED for T while ZooKeeper was reachable."""
        while True:
            await self.session.wait_value(lambda s: s.state is SessionState.SUSPENDED)
            with trio.move_on_after(self.session_timeout_s * ABANDON_AFTER):
                await self.session.wait_value(lambda s: s.state is not SessionState.SUSPENDED)
            while self.session.value.state is SessionState.SUSPENDED and not self._degraded_seen:
                await self.session.wait_transition()
            if self.session.value.state is not SessionState.SUSPENDED:
                continue
            info = self.session.value
            log.warning(
                "zookeeper_session_abandoned",
                extra={
                    "session": _session_hex(info.session_id),
                    "generation": info.generation,
                    "reason": f"not trusted for {self.session_timeout_s * ABANDON_AFTER:g} s "
                    "although ZooKeeper answers",
                },
            )
            # stop() asks the server to close the session (deleting our lease
            # nodes at once if the request gets through) and ends kazoo's
            # reconnection attempts; it reports LOST. start_async() then
            # connects a new session in the background, retrying forever.
            await trio.to_thread.run_sync(client.stop, abandon_on_cancel=True)
            await trio.to_thread.run_sync(client.start_async, abandon_on_cancel=True)

    @property
    def connected(self) -> bool:
        return self.session.value.state is SessionState.CONNECTED

    @property
    def session_id(self) -> int | None:
        """The current session while its ephemeral nodes can be trusted, else None."""
        info = self.session.value
        return info.session_id if info.state is SessionState.CONNECTED else None

    # -- calls -------------------------------------------------------------

    def _require(self) -> tuple[KazooClient, trio.lowlevel.TrioToken]:
        if self._client is None or self._token is None:
            raise ZooKeeperError("ZooKeeper session is not running")
        return self._client, self._token

    async def _call(self, method: str, *args: Any, shield: bool = False, **kwargs: Any) -> Any:
        """Run one of kazoo's ``*_async`` calls and await its result (see ``_submit``)."""
        return await self._submit(
            method, lambda client: getattr(client, method)(*args, **kwargs), shield=shield
        )

    async def _submit(
        self, method: str, send: Callable[[KazooClient], Any], *, shield: bool = False
    ) -> Any:
        """Send one request with ``send(client)`` (a kazoo AsyncResult) and await its result.

        Raises NoNodeError and NodeExistsError (callers decide on them) and
        ZooKeeperError for everything else, connection loss included.

        ``shield=True`` for writes that must not be abandoned halfway: the
        caller's cancellation then waits for the server's answer. Every call
        waits one session timeout at most; a write given up then may still be
        applied later, which callers allow for.
        """
        client, token = self._require()
        done = trio.Event()

        def on_done(_result: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        link, sent_at = self._link.value, trio.current_time()
        result = send(client)
        result.rawlink(on_done)
        # An answer later than a session timeout is of no use to anyone (and
        # a request queued while disconnected might wait for ever).
        with trio.CancelScope(shield=shield):
            with trio.move_on_after(self.session_timeout_s):
                await done.wait()
        if not done.is_set():
            raise ZooKeeperError(
                f"{method}: no answer from ZooKeeper within {self.session_timeout_s:g} s"
            )
        try:
            value = result.get_nowait()
        except _NO_CONTACT as exc:
            raise ZooKeeperError(f"{method}: {type(exc).__name__}") from exc
        except _KazooNoNode as exc:
            self._note_contact(link, sent_at)  # an error answer is an answer
            raise NoNodeError(method) from exc
        except _KazooNodeExists as exc:
            self._note_contact(link, sent_at)
            raise NodeExistsError(method) from exc
        except KazooException as exc:
            self._note_contact(link, sent_at)
            raise ZooKeeperError(f"{method}: {type(exc).__name__}") from exc
        except Exception as exc:  # kazoo surfaces some failures as plain exceptions
            raise ZooKeeperError(f"{method} failed: {exc!r}") from exc
        self._note_contact(link, sent_at)
        return value

    async def create(
        self,
        path: str,
        data: bytes = b"",
        *,
        ephemeral: bool = False,
        makepath: bool = False,
    ) -> NodeStat:
        """Create a node and return its stat (``czxid`` is its birth order)."""
        _path, stat = await self._call(
            "create_async",
            path,
            data,
            ephemeral=ephemeral,
            makepath=makepath,
            include_data=True,
            shield=True,
        )
        return NodeStat.of(stat)

    async def ensure_path(self, path: str) -> None:
        await self._call("ensure_path_async", path, shield=True)

    async def get(self, path: str) -> tuple[bytes, NodeStat]:
        data, stat = await self._call("get_async", path)
        return data, NodeStat.of(stat)

    async def exists(self, path: str) -> NodeStat | None:
        stat: ZnodeStat | None = await self._call("exists_async", path)
        return None if stat is None else NodeStat.of(stat)

    async def get_children(self, path: str) -> list[str]:
        children: list[str] = await self._call("get_children_async", path)
        return children

    async def set(self, path: str, data: bytes, *, version: int = -1) -> NodeStat:
        stat: ZnodeStat = await self._call("set_async", path, data, version=version, shield=True)
        return NodeStat.of(stat)

    async def delete(self, path: str, *, version: int = -1) -> None:
        await self._call("delete_async", path, version=version, shield=True)

    async def multi(self, ops: Sequence[Op]) -> list[NodeStat | None]:
        """Apply ``ops`` in one transaction: all of them, or none.

        Every node the transaction writes gets its one zxid (a created node's
        ``czxid`` is the ``mzxid`` a SetData of the same transaction returns).
        Returns per operation the node's new stat for SetData, None for the
        others. Raises NoNodeError or NodeExistsError when the first operation
        that failed failed so (nothing was applied), ZooKeeperError otherwise.
        """

        def send(client: KazooClient) -> Any:
            transaction = client.transaction()
            for op in ops:
                if isinstance(op, Create):
                    transaction.create(op.path, op.data, ephemeral=op.ephemeral)
                elif isinstance(op, Delete):
                    transaction.delete(op.path, version=op.version)
                else:
                    transaction.set_data(op.path, op.data, version=op.version)
            return transaction.commit_async()

        results = await self._submit("multi", send, shield=True)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            # The failed operation's own error; the others only say "rolled back".
            cause = next((f for f in failures if not isinstance(f, _ROLLED_BACK)), failures[0])
            if isinstance(cause, _KazooNoNode):
                raise NoNodeError(f"multi: {cause!r}")
            if isinstance(cause, _KazooNodeExists):
                raise NodeExistsError(f"multi: {cause!r}")
            raise ZooKeeperError(f"multi: {type(cause).__name__}")
        return [NodeStat.of(r) if isinstance(r, ZnodeStat) else None for r in results]

    # -- watches -----------------------------------------------------------

    def _watcher(self, fired: trio.Event) -> Callable[[object], None]:
        token = self._token
        assert token is not None

        def on_event(_event: object) -> None:
            # A kazoo thread: hand over only.
            try:
                token.run_sync_soon(fired.set)
            except trio.RunFinishedError:
                pass

        return on_event

    async def _wait_rearm(self, fired: trio.Event, link: _Link) -> None:
        """Until the watch fired or kazoo reconnected (watches do not survive that)."""
        await wait_any(
            fired.wait,
            lambda: self._link.wait_value(lambda lk: lk.connects != link.connects),
        )

    async def _reconnected(self, connects: int) -> None:
        await self._link.wait_value(lambda lk: lk.connects != connects)

    async def _backoff(self, delay: float) -> float:
        await self._link.wait_value(lambda lk: lk.state == KazooState.CONNECTED)
        await trio.sleep(delay)
        return min(_RETRY_MAX_S, delay * 2)

    async def watch_data(
        self,
        path: str,
        callback: Callable[[bytes | None, NodeStat | None], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``callback(data, stat)`` after the first read and on every change; run until cancelled.

        ``(None, None)`` means the node does not exist. A trio task rather than
        kazoo's DataWatch: that recipe re-reads on a kazoo thread, retrying
        with a backoff that can hold its lock for long after a reconnection,
        so its view could lag. Here a read issued while disconnected is simply
        answered right after the reconnection. ``started`` after the first read.
        """

        async def read(watcher: Callable[[object], None]) -> tuple[object, Any] | None:
            stat: NodeStat | None
            try:
                data, raw = await self._call("get_async", path, watch=watcher)
                stat = NodeStat.of(raw)
            except NoNodeError:
                if await self._call("exists_async", path, watch=watcher) is not None:
                    return None  # created between the two reads
                data, stat = None, None
            view = None if stat is None else (data, stat.czxid, stat.mzxid, stat.ephemeral_owner)
            return view, (data, stat)

        await self._watch(read, lambda node: callback(*node), task_status)

    async def watch_children(
        self,
        path: str,
        callback: Callable[[list[str]], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``callback(children)`` after the first read and whenever they change; run until cancelled."""

        async def read(watcher: Callable[[object], None]) -> tuple[object, Any] | None:
            try:
                children = sorted(await self._call("get_children_async", path, watch=watcher))
            except NoNodeError:
                if await self._call("exists_async", path, watch=watcher) is not None:
                    return None  # created between the two reads
                children = []
            return children, children

        await self._watch(read, lambda children: callback(list(children)), task_status)

    async def watch_children_data(
        self,
        path: str,
        callback: Callable[[str, bytes | None, NodeStat | None], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch ``path``'s children and each child's data, all with this one task.

        ``callback(child, data, stat)`` for each child once read and after every
        change of its data; ``(child, None, None)`` once it is gone. ``started``
        once every child of the first listing was delivered. Kazoo fires every
        watcher when a connection drops (none survives it), so everything is
        read again after a reconnection; reads of many children are pipelined,
        ``_READ_BATCH`` at a time, so a thousand children cost a few round trips.
        A new child is seen within ``_LIST_EVERY_S``: the listing, the whole
        directory each time, is read again at most that often; a child's data
        or its deletion is seen at once.
        """
        token = self._token
        assert token is not None
        known: dict[str, tuple[int, int]] = {}  # child -> (czxid, mzxid) delivered last
        dirty: set[str] = set()
        listing = True  # the list of children must be read again
        wake = trio.Event()
        watchers: dict[str | None, Callable[[object], None]] = {}

        def mark(child: str | None) -> None:
            nonlocal listing
            if child is None:
                listing = True
            else:
                dirty.add(child)
            wake.set()

        def watcher(child: str | None) -> Callable[[object], None]:
            # One callable per node, reused: kazoo keeps a set of them per path.
            found = watchers.get(child)
            if found is None:

                def found(_event: object, child: str | None = child) -> None:
                    try:  # a kazoo thread: hand over only
                        token.run_sync_soon(mark, child)
                    except trio.RunFinishedError:
                        pass

                watchers[child] = found
            return found

        async def read_child(child: str, results: dict[str, Any]) -> None:
            # Failures stay out of ``results`` (read again): a sibling's failure
            # must not cancel the reads in flight.
            try:
                data, raw = await self._call("get_async", f"{path}/{child}", watch=watcher(child))
                results[child] = (data, NodeStat.of(raw))
            except NoNodeError:
                results[child] = None
            except ZooKeeperError:
                pass

        def forget(child: str) -> None:
            if known.pop(child, None) is not None:
                callback(child, None, None)
            watchers.pop(child, None)

        started = False
        listed_at = -math.inf
        delay = _RETRY_MIN_S
        while True:
            wake = trio.Event()
            link = self._link.value
            try:
                if listing:
                    if started:
                        # Each listing is the whole directory: in a storm of joins,
                        # one every _LIST_EVERY_S covers them all.
                        await trio.sleep_until(listed_at + _LIST_EVERY_S)
                    listing = False
                    listed_at = trio.current_time()
                    try:
                        children = set(
                            await self._call("get_children_async", path, watch=watcher(None))
                        )
                    except NoNodeError:
                        if await self._call("exists_async", path, watch=watcher(None)):
                            listing = True
                            continue
                        children = set()
                    for child in set(known) - children:
                        forget(child)
                    dirty |= children - set(known)
                    dirty &= children
                batch = sorted(dirty)[:_READ_BATCH]
                dirty.difference_update(batch)
                results: dict[str, Any] = {}
                async with trio.open_nursery() as nursery:
                    for child in batch:
                        nursery.start_soon(read_child, child, results)
                for child, result in sorted(results.items()):
                    if result is None:
                        forget(child)
                        listing = True  # gone between the listing and the read
                        continue
                    data, stat = result
                    view = (stat.czxid, stat.mzxid)
                    if known.get(child) != view:
                        known[child] = view
                        callback(child, data, stat)
                unread = [c for c in batch if c not in results]
                if unread:
                    dirty.update(unread)
                    raise ZooKeeperError(f"{path}: {len(unread)} children not read")
            except (KazooException, ZooKeeperError):
                listing = True
                delay = await self._backoff(delay)
                continue
            delay = _RETRY_MIN_S
            if listing or dirty:
                continue
            if not started:
                started = True
                task_status.started()
            await wait_any(wake.wait, functools.partial(self._reconnected, link.connects))
            if self._link.value.connects != link.connects:
                # A new connection: no watch of the old one survives.
                listing = True
                dirty |= set(known)

    async def _watch(
        self,
        read: Callable[[Callable[[object], None]], Awaitable[tuple[object, Any] | None]],
        deliver: Callable[[Any], None],
        task_status: trio.TaskStatus[None],
    ) -> None:
        """What every watch does: read with a watcher, deliver on change, wait, read again.

        ``read`` returns (what identifies this state, what to deliver), or None
        to read again at once. Failed reads back off and retry.
        """
        last: object = object()
        started = False
        delay = _RETRY_MIN_S
        while True:
            fired = trio.Event()
            watcher = self._watcher(fired)
            link = self._link.value
            try:
                result = await read(watcher)
            except (KazooException, ZooKeeperError):
                delay = await self._backoff(delay)
                continue
            if result is None:
                continue
            delay = _RETRY_MIN_S
            view, value = result
            if view != last:
                last = view
                deliver(value)
            if not started:
                started = True
                task_status.started()
            await self._wait_rearm(fired, link)


if TYPE_CHECKING:
    # The product's adapter satisfies the protocol (mypy checks this line).
    _: type[ZooKeeperClient] = ZooKeeper
