"""An in-memory ZooKeeper for the scale simulator: one ensemble, many sessions, virtual time.

:class:`SimEnsemble` is the server side: one tree of nodes, one counter of
transaction ids (so every write has its place in one total order), sessions
that expire once the ensemble has heard nothing from them for their timeout
(ephemeral nodes deleted in the same transaction), and watches that fire once
per change. It counts what the capacity model needs: requests by kind, write
requests and committed transactions, watch notifications, watches held.

:class:`SimZooKeeper` is one instance's session behind the product's
:class:`linechatd.zk.ZooKeeperClient` protocol (mypy checks it), publishing
what ``zk.py`` publishes: CONNECTED once an answer is fresh, SUSPENDED at once
when the connection drops and, by the lease clock, once the newest answered
request is older than T/2; LOST when the ensemble says the session expired,
then a new session (generation + 1); CLOSED when ``run`` ends.

Everything runs in one trio loop, meant for ``trio.testing.MockClock``: no
threads, no sockets, no kazoo. Each connection is two FIFO queues (requests
up, answers and notifications down) with a per-message latency, so a client
sees its answers in order and a notification before any later answer, as
ZooKeeper guarantees. Writes are committed by one leader with a bounded rate:
a burst of writes queues there and every write behind it waits.
"""

from __future__ import annotations

import enum
import functools
import math
import random
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from trio_util import AsyncValue

from linechatd.zk import (
    ABANDON_AFTER,
    HEARTBEAT_EVERY,
    SUSPECT_AFTER,
    Create,
    Delete,
    NodeError,
    NodeExistsError,
    NodeStat,
    NoNodeError,
    Op,
    SessionInfo,
    SessionState,
    SetData,
    ZooKeeperClient,
    ZooKeeperError,
)

__all__ = ["Latency", "ServerStats", "SimEnsemble", "SimZooKeeper"]

_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 1.0
_READ_BATCH = 64  # zk.py's pipelined reads of a watched directory
_LIST_EVERY_S = 0.25  # and how often it lists the directory at most
# kazoo's reconnection backoff (zk.py: delay 0.1 s, doubling, at most 1 s).
_RECONNECT_MIN_S = 0.1
_RECONNECT_MAX_S = 1.0
# kazoo declares a connection dead once nothing came back for 2/3 of T.
_KAZOO_READ_TIMEOUT = 2 / 3


class _Refusal(NodeError):
    """An answer the real adapter reports as ZooKeeperError (kazoo's other errors)."""


class BadVersionError(_Refusal):
    """A conditional write found another version."""


class NotEmptyError(_Refusal):
    """A node with children cannot be deleted."""


class _Kind(enum.Enum):
    DATA = "data"  # getData and exists watches
    CHILD = "child"


class _Op(enum.Enum):
    GET = "get"
    EXISTS = "exists"
    CHILDREN = "children"
    CREATE = "create"
    SET = "set"
    DELETE = "delete"
    MULTI = "multi"
    PING = "ping"  # a heartbeat: answered by the server, counted as a read


_WRITES = frozenset({_Op.CREATE, _Op.SET, _Op.DELETE, _Op.MULTI})


def _as_op(op: _Op, path: str, args: dict[str, Any]) -> Op:
    if op is _Op.CREATE:
        return Create(path, args["data"], args["ephemeral"])
    if op is _Op.SET:
        return SetData(path, args["data"], args["version"])
    return Delete(path, args["version"])


@dataclass(frozen=True)
class Latency:
    """One-way network delay and the ensemble's write pipeline (seconds)."""

    one_way_s: float = 0.00025  # client <-> server, each way (a LAN: 0.5 ms round trip)
    jitter: float = 0.5  # each message: one_way_s * (1 + jitter * U(-1, 1))
    commit_s: float = 0.002  # a write's quorum round and log fsync, pipelined
    writes_per_s: float = 10_000.0  # the leader commits at most this many writes per second

    def __post_init__(self) -> None:
        if self.one_way_s < 0 or self.commit_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"bad latency model {self}")
        if self.writes_per_s <= 0:
            raise ValueError("writes_per_s must be > 0")


@dataclass
class _Node:
    data: bytes
    czxid: int
    mzxid: int
    ctime_ms: int
    mtime_ms: int
    version: int = 0
    ephemeral_owner: int = 0
    children: set[str] = field(default_factory=set)
    _listing: list[str] | None = None  # the children sorted, until they change

    def listing(self) -> list[str]:
        if self._listing is None:
            self._listing = sorted(self.children)
        return list(self._listing)

    def stat(self) -> NodeStat:
        return NodeStat(
            self.czxid, self.mzxid, self.ctime_ms, self.version, self.ephemeral_owner, self.mtime_ms
        )


@dataclass
class _Session:
    sid: int
    timeout_s: float
    bucket: int  # expiry bucket: the session expires at bucket * tick
    ephemerals: set[str] = field(default_factory=set)
    watches: set[tuple[_Kind, str]] = field(default_factory=set)
    client: SimZooKeeper | None = None  # the connected client, None while disconnected


@dataclass
class ServerStats:
    """Counters of the whole ensemble, plus per-second series for the peaks."""

    reads: int = 0
    read_bytes: int = 0  # payload of the answers to reads: node data and child names
    write_requests: int = 0  # writes asked for, failed ones included (they cost the leader too)
    failed_writes: int = 0
    transactions: int = 0  # committed: writes, session closes and expiries
    notifications: int = 0
    sessions_expired: int = 0
    watches_held: int = 0
    peak_watches_held: int = 0
    per_second: dict[str, dict[int, int]] = field(
        default_factory=lambda: {
            "reads": defaultdict(int),
            "read_bytes": defaultdict(int),
            "writes": defaultdict(int),
            "notifications": defaultdict(int),
        }
    )

    def count(self, series: str, now: float, n: int = 1) -> None:
        self.per_second[series][int(now)] += n

    def watches(self, delta: int) -> None:
        self.watches_held += delta
        self.peak_watches_held = max(self.peak_watches_held, self.watches_held)


class _Refused(Exception):
    """The ensemble cannot take the request (paused, or the session is gone)."""


class _Expired(Exception):
    """The session expired (or was closed): every ephemeral node of it is gone."""


class SimEnsemble:
    """The server side: nodes, sessions, watches, counters; ``run`` expires sessions."""

    def __init__(self, *, latency: Latency | None = None, seed: int = 0, tick_s: float = 0.05):
        self.latency = latency or Latency()
        self.stats = ServerStats()
        self._rng = random.Random(seed)
        self._tick_s = tick_s
        self._zxid = 0
        self._nodes: dict[str, _Node] = {"/": _Node(b"", 0, 0, 0, 0)}
        self._sessions: dict[int, _Session] = {}
        self._buckets: dict[int, set[int]] = defaultdict(set)
        self._watches: dict[tuple[_Kind, str], set[int]] = defaultdict(set)
        self._next_sid = 0x1000
        self._leader_free_at = -math.inf
        self._fire_after: list[tuple[_Kind, str]] = []  # watches a transaction triggers
        self.paused = AsyncValue(False)

    # -- time and latency ----------------------------------------------------------

    def one_way(self) -> float:
        lat = self.latency
        return lat.one_way_s * (1 + lat.jitter * self._rng.uniform(-1, 1))

    def commit_at(self, now: float) -> float:
        """When a write arriving now is committed: behind every earlier write."""
        lat = self.latency
        at = max(now + lat.commit_s, self._leader_free_at + 1 / lat.writes_per_s)
        self._leader_free_at = at
        return at

    def _bucket_of(self, deadline: float) -> int:
        return math.ceil(deadline / self._tick_s)

    # -- sessions ------------------------------------------------------------------

    def open_session(self, client: SimZooKeeper, timeout_s: float) -> int:
        if self.paused.value:
            raise _Refused("ensemble not serving")
        sid = self._next_sid
        self._next_sid += 1
        bucket = self._bucket_of(trio.current_time() + timeout_s)
        self._sessions[sid] = _Session(sid, timeout_s, bucket, client=client)
        self._buckets[bucket].add(sid)
        self._txn()
        return sid

    def reconnect(self, client: SimZooKeeper, sid: int) -> None:
        """A client's new connection for an existing session; raises _Expired if it is gone."""
        if self.paused.value:
            raise _Refused("ensemble not serving")
        session = self._sessions.get(sid)
        if session is None:
            raise _Expired(f"session {sid:#x}")
        session.client = client
        self.touch(sid)

    def disconnect(self, sid: int) -> None:
        """The connection is gone; the session lives on until it expires. Watches go with
        the connection (the client re-reads what it watched once it reconnects)."""
        session = self._sessions.get(sid)
        if session is None:
            return
        session.client = None
        self._drop_watches(session)

    def touch(self, sid: int) -> None:
        session = self._sessions.get(sid)
        if session is None:
            return
        bucket = self._bucket_of(trio.current_time() + session.timeout_s)
        if bucket != session.bucket:
            self._buckets[session.bucket].discard(sid)
            self._buckets[bucket].add(sid)
            session.bucket = bucket

    def close_session(self, sid: int) -> None:
        """One transaction: the session ends and its ephemeral nodes are deleted."""
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        self._buckets[session.bucket].discard(sid)
        self._drop_watches(session)
        zxid = self._txn()
        for path in sorted(session.ephemerals):
            if path in self._nodes:
                self._remove(path, zxid)
        for kind, watched in self._fire_after:
            self._fire(kind, watched)
        self._fire_after.clear()
        if session.client is not None:
            session.client._session_gone(sid)

    def alive(self, sid: int) -> bool:
        return sid in self._sessions

    def session_of(self, path: str) -> int | None:
        node = self._nodes.get(path)
        return None if node is None else node.ephemeral_owner

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire sessions, one tick at a time (as ZooKeeper's session tracker does)."""
        task_status.started()
        while True:
            await self.paused.wait_value(False)
            now = trio.current_time()
            due = self._bucket_of(now)
            for bucket in sorted(b for b in self._buckets if b <= due):
                for sid in sorted(self._buckets.pop(bucket)):
                    if sid in self._sessions:
                        self.stats.sessions_expired += 1
                        self.close_session(sid)
            await trio.sleep_until((due + 1) * self._tick_s)

    async def pause(self, duration_s: float) -> None:
        """No server answers for ``duration_s`` (a leader election): every connection
        drops at once and no session expires meanwhile; afterwards the new leader
        gives every session a fresh timeout, as ZooKeeper does."""
        self.paused.value = True
        for session in list(self._sessions.values()):
            client = session.client
            if client is not None:
                self.disconnect(session.sid)
                client._connection_dropped("ensemble lost its leader")
        await trio.sleep(duration_s)
        for sid in list(self._sessions):
            self.touch(sid)
        self.paused.value = False

    # -- the tree ------------------------------------------------------------------

    def _txn(self) -> int:
        self._zxid += 1
        self.stats.transactions += 1
        return self._zxid

    def _parent(self, path: str) -> str:
        parent = path.rsplit("/", 1)[0]
        return parent or "/"

    def _name(self, path: str) -> str:
        return path.rsplit("/", 1)[1]

    def _fire(self, kind: _Kind, path: str) -> None:
        sids = self._watches.pop((kind, path), None)
        if not sids:
            return
        now = trio.current_time()
        self.stats.watches(-len(sids))
        for sid in sids:
            session = self._sessions.get(sid)
            if session is None:
                continue
            session.watches.discard((kind, path))
            if session.client is not None:
                self.stats.notifications += 1
                self.stats.count("notifications", now)
                session.client._notify(kind, path)

    def _watch(self, session: _Session, kind: _Kind, path: str) -> None:
        sids = self._watches[(kind, path)]
        if session.sid not in sids:
            sids.add(session.sid)
            session.watches.add((kind, path))
            self.stats.watches(1)

    def _drop_watches(self, session: _Session) -> None:
        for key in session.watches:
            sids = self._watches.get(key)
            if sids is not None and session.sid in sids:
                sids.discard(session.sid)
                self.stats.watches(-1)
                if not sids:
                    del self._watches[key]
        session.watches.clear()

    def _remove(self, path: str, zxid: int) -> None:
        node = self._nodes.pop(path)
        if node.ephemeral_owner:
            owner = self._sessions.get(node.ephemeral_owner)
            if owner is not None:
                owner.ephemerals.discard(path)
        parent = self._nodes[self._parent(path)]
        parent.children.discard(self._name(path))
        parent._listing = None
        self._fire_after += [
            (_Kind.DATA, path),
            (_Kind.CHILD, path),
            (_Kind.CHILD, self._parent(path)),
        ]

    def _read_bytes(self, now: float, n: int) -> None:
        self.stats.read_bytes += n
        self.stats.count("read_bytes", now, n)

    def _node(self, path: str) -> _Node:
        node = self._nodes.get(path)
        if node is None:
            raise NoNodeError(path)
        return node

    def apply(self, sid: int, op: _Op, path: str, args: dict[str, Any]) -> Any:
        """One request of session ``sid``, applied atomically now; raises NodeError subclasses."""
        session = self._sessions.get(sid)
        if session is None:
            raise _Expired(f"session {sid:#x}")
        now = trio.current_time()
        self.touch(sid)
        if op in _WRITES:
            self.stats.write_requests += 1
            self.stats.count("writes", now)
            try:
                return self._write(session, op, path, args)
            except NodeError:
                self.stats.failed_writes += 1
                raise
        self.stats.reads += 1
        self.stats.count("reads", now)
        watch = args.get("watch", False)
        if op is _Op.PING:
            return None
        if op is _Op.EXISTS:
            node = self._nodes.get(path)
            if watch:
                self._watch(session, _Kind.DATA, path)
            return None if node is None else node.stat()
        node = self._node(path)  # no watch is left on a missing node by get/children
        if op is _Op.GET:
            if watch:
                self._watch(session, _Kind.DATA, path)
            self._read_bytes(now, len(node.data))
            return node.data, node.stat()
        if op is _Op.CHILDREN:
            if watch:
                self._watch(session, _Kind.CHILD, path)
            children = node.listing()
            self._read_bytes(now, sum(len(c) + 4 for c in children))
            return children
        raise AssertionError(op)

    def _write(self, session: _Session, op: _Op, path: str, args: dict[str, Any]) -> Any:
        ops = args["ops"] if op is _Op.MULTI else [_as_op(op, path, args)]
        self._check(ops)  # all or nothing: nothing is applied unless every op can be
        zxid = self._txn()
        results = [self._apply(session, o, zxid) for o in ops]
        for kind, watched in self._fire_after:
            self._fire(kind, watched)
        self._fire_after.clear()
        if op is _Op.MULTI:
            # As kazoo's transactions answer: a stat for SetData only.
            return [
                r if isinstance(o, SetData) else None for o, r in zip(ops, results, strict=True)
            ]
        return results[0]

    def _check(self, ops: Sequence[Op]) -> None:
        """Raise what the first failing operation would, given the ones before it."""
        exists: dict[str, bool] = {}
        versions: dict[str, int] = {}

        def present(path: str) -> bool:
            return exists[path] if path in exists else path in self._nodes

        for o in ops:
            if isinstance(o, Create):
                if present(o.path):
                    raise NodeExistsError(o.path)
                parent = self._parent(o.path)
                if not present(parent):
                    raise NoNodeError(parent)
                node = self._nodes.get(parent)
                if node is not None and node.ephemeral_owner:
                    raise _Refusal(f"{parent}: ephemeral nodes have no children")
                exists[o.path], versions[o.path] = True, 0
                continue
            if not present(o.path):
                raise NoNodeError(o.path)
            node = self._nodes.get(o.path)
            version = versions.get(o.path, node.version if node is not None else 0)
            if o.version not in (-1, version):
                raise BadVersionError(o.path)
            if isinstance(o, Delete):
                if node is not None and node.children:
                    raise NotEmptyError(o.path)
                exists[o.path] = False
            else:
                versions[o.path] = version + 1

    def _apply(self, session: _Session, o: Op, zxid: int) -> NodeStat | None:
        now_ms = int(trio.current_time() * 1000)
        if isinstance(o, Create):
            owner = session.sid if o.ephemeral else 0
            node = _Node(o.data, zxid, zxid, now_ms, now_ms, ephemeral_owner=owner)
            self._nodes[o.path] = node
            parent = self._nodes[self._parent(o.path)]
            parent.children.add(self._name(o.path))
            parent._listing = None
            if o.ephemeral:
                session.ephemerals.add(o.path)
            self._fire_after += [(_Kind.DATA, o.path), (_Kind.CHILD, self._parent(o.path))]
            return node.stat()
        if isinstance(o, Delete):
            self._remove(o.path, zxid)
            return None
        node = self._nodes[o.path]
        node.data, node.mzxid, node.mtime_ms = o.data, zxid, now_ms
        node.version += 1
        self._fire_after.append((_Kind.DATA, o.path))
        return node.stat()

    # -- for the simulator's own checks -----------------------------------------------

    def peek(self, path: str) -> tuple[bytes, NodeStat] | None:
        """A node as it is now, without a request (nothing counted)."""
        node = self._nodes.get(path)
        return None if node is None else (node.data, node.stat())

    def peek_children(self, path: str) -> list[str]:
        node = self._nodes.get(path)
        return [] if node is None else sorted(node.children)


@dataclass(eq=False)
class _Pending:
    op: _Op
    path: str
    args: dict[str, Any]
    sent_at: float
    conn: int
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _Link:
    """The connection as the client knows it (zk.py's ``_Link``)."""

    up: bool
    session_id: int | None
    connects: int  # bumps on every (re)connection
    lost: bool = False  # the ensemble said our session expired


class SimZooKeeper:
    """One instance's session with a :class:`SimEnsemble`; see the module docstring."""

    def __init__(self, ensemble: SimEnsemble, *, session_timeout_s: float, name: str = "") -> None:
        self._ensemble = ensemble
        self._timeout_s = session_timeout_s
        self.name = name
        self.session: AsyncValue[SessionInfo] = AsyncValue(
            SessionInfo(SessionState.CONNECTING, None, 0)
        )
        self._link: AsyncValue[_Link] = AsyncValue(_Link(False, None, 0))
        self._conn = 0  # bumps on every connection and drop; stale messages carry an old one
        self._contact = AsyncValue(-math.inf)  # send time of the newest answered request
        self._contact_connects = 0
        self._link_up_at = -math.inf
        self._generation_session: int | None = None
        self._degraded_seen = False
        self._last_received = -math.inf
        self._up: deque[tuple[float, _Pending]] = deque()
        self._up_due = -math.inf
        self._up_ready = trio.Event()
        self._down: deque[tuple[float, int, Callable[[], None]]] = deque()
        self._down_due = -math.inf
        self._down_ready = trio.Event()
        self._pending: set[_Pending] = set()
        self._watchers: dict[tuple[_Kind, str], list[Callable[[], None]]] = defaultdict(list)
        self._rearm: set[trio.Event] = set()  # woken on every reconnection
        self._running = False
        self._crashed = False
        self.blackholed = AsyncValue(False)
        self.requests = 0

    def __repr__(self) -> str:
        info = self.session.value
        return f"<SimZooKeeper {self.name} {info.state.value} gen={info.generation}>"

    # -- timing (zk.py's) -------------------------------------------------------------

    @property
    def session_timeout_s(self) -> float:
        return self._timeout_s

    @property
    def suspect_after_s(self) -> float:
        return self._timeout_s * SUSPECT_AFTER

    @property
    def heartbeat_interval_s(self) -> float:
        return self._timeout_s * HEARTBEAT_EVERY

    def _fresh(self) -> bool:
        return trio.current_time() < self._contact.value + self.suspect_after_s

    @property
    def connected(self) -> bool:
        return self.session.value.state is SessionState.CONNECTED

    @property
    def session_id(self) -> int | None:
        info = self.session.value
        return info.session_id if info.state is SessionState.CONNECTED else None

    # -- faults the simulator injects ---------------------------------------------

    def crash(self) -> None:
        """The process dies: nothing more reaches the ensemble, the session is left to expire."""
        self._crashed = True
        self._drop("process crashed", tell_server=True)

    def reset_connection(self) -> None:
        """The TCP connection is reset (both ends notice at once); kazoo reconnects."""
        if self._link.value.up:
            self._drop("connection reset", tell_server=True)

    def set_blackholed(self, on: bool) -> None:
        """Nothing gets through either way (a network partition), without any reset.

        As over TCP, what was sent meanwhile arrives once the partition heals,
        in order, unless the connection was given up first (kazoo's read
        timeout, see ``_kazoo_detector``): then it is lost with the connection.
        """
        self.blackholed.value = on

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._uplink)
                nursery.start_soon(self._downlink)
                nursery.start_soon(self._connector)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._lease_clock)
                nursery.start_soon(self._kazoo_detector)
                nursery.start_soon(self._abandon_untrusted)
                await self.session.wait_value(lambda s: s.state is SessionState.CONNECTED)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._running = False
            link = self._link.value
            if not self._crashed and link.up and link.session_id is not None:
                # A clean close deletes our ephemeral nodes at once (zk.py's client.stop()).
                if not self.blackholed.value and not self._ensemble.paused.value:
                    self._ensemble.close_session(link.session_id)
            self._drop("closed", tell_server=False)
            self._publish(SessionInfo(SessionState.CLOSED, None, self.session.value.generation))

    async def _connector(self) -> None:
        """kazoo's connection loop: (re)connect with backoff, a new session once ours expired."""
        delay = _RECONNECT_MIN_S
        while True:
            await self._link.wait_value(lambda lk: not lk.up)
            if self._crashed:
                await trio.sleep_forever()
            await trio.sleep(self._ensemble.one_way() * 2)  # the handshake's round trip
            if self.blackholed.value or self._ensemble.paused.value:
                await trio.sleep(delay)
                delay = min(_RECONNECT_MAX_S, delay * 2)
                continue
            delay = _RECONNECT_MIN_S
            old = self._link.value
            sid = old.session_id
            if sid is not None:
                try:
                    self._ensemble.reconnect(self, sid)
                except _Expired:
                    self._set_link(_Link(False, None, old.connects, lost=True), "session expired")
                    sid = None
                except _Refused:
                    continue
            if sid is None:
                try:
                    sid = self._ensemble.open_session(self, self._timeout_s)
                except _Refused:
                    continue
            self._conn += 1
            self._last_received = trio.current_time()
            self._link_up_at = trio.current_time()
            if sid != old.session_id:
                self._contact.value = -math.inf
            self._set_link(_Link(True, sid, self._link.value.connects + 1), "connected")
            for event in self._rearm:
                event.set()

    def _set_link(self, link: _Link, cause: str) -> None:
        self._link.value = link
        self._evaluate(cause)

    def _connection_dropped(self, cause: str) -> None:
        """The ensemble closed our connection (it lost its leader)."""
        self._drop(cause, tell_server=False)

    def _session_gone(self, sid: int) -> None:
        """The ensemble closed or expired our session while we were connected."""
        link = self._link.value
        if link.session_id == sid and link.up:
            self._drop("session expired", tell_server=False, lost=True)

    def _drop(self, cause: str, *, tell_server: bool, lost: bool = False) -> None:
        link = self._link.value
        self._conn += 1
        self._up.clear()
        self._down.clear()
        for pending in list(self._pending):
            pending.error = ZooKeeperError(f"{pending.op.value}: ConnectionLoss")
            pending.done.set()
        self._pending.clear()
        # kazoo fires every watcher when a connection drops (none survives it).
        watchers, self._watchers = self._watchers, defaultdict(list)
        for callbacks in watchers.values():
            for fire in callbacks:
                fire()
        if tell_server and link.session_id is not None:
            self._ensemble.disconnect(link.session_id)
        if lost:
            self._contact.value = -math.inf
        session_id = None if lost else link.session_id
        self._set_link(_Link(False, session_id, link.connects, lost=lost), cause)

    # -- zk.py's published state -----------------------------------------------------

    def _evaluate(self, cause: str) -> None:
        link = self._link.value
        current = self.session.value
        if current.state is SessionState.CLOSED:
            return
        if link.lost:
            new = SessionInfo(SessionState.LOST, None, current.generation)
        elif not link.up:
            if link.session_id is None and current.state is SessionState.CONNECTING:
                return
            new = SessionInfo(SessionState.SUSPENDED, current.session_id, current.generation)
        elif self._fresh():
            generation = current.generation
            if link.session_id != self._generation_session:
                self._generation_session = link.session_id
                generation += 1
            new = SessionInfo(SessionState.CONNECTED, link.session_id, generation)
        elif (
            self._contact_connects != link.connects
            and trio.current_time() < self._link_up_at + self.suspect_after_s
        ):
            if current.state is not SessionState.CONNECTED:
                return
            new = SessionInfo(SessionState.SUSPENDED, current.session_id, current.generation)
        else:
            new = SessionInfo(
                SessionState.SUSPENDED, link.session_id, current.generation, degraded=True
            )
        self._publish(new)

    def _publish(self, new: SessionInfo) -> None:
        if new == self.session.value:
            return
        if new.degraded:
            self._degraded_seen = True
        elif new.state is not SessionState.SUSPENDED:
            self._degraded_seen = False
        self.session.value = new

    def _note_contact(self, pending: _Pending) -> None:
        link = self._link.value
        if link.up and pending.conn == self._conn and pending.sent_at > self._contact.value:
            self._contact.value = pending.sent_at
            self._contact_connects = link.connects
            self._evaluate("answer")

    async def _heartbeat(self) -> None:
        while True:
            link = await self._link.wait_value(lambda lk: lk.up)
            try:
                await self._request(_Op.PING, "/")
            except (ZooKeeperError, NodeError):
                pass
            with trio.move_on_after(self.heartbeat_interval_s):
                await self._link.wait_value(lambda lk, n=link.connects: lk.connects != n)

    async def _lease_clock(self) -> None:
        while True:
            deadline = self._contact.value + self.suspect_after_s
            now = trio.current_time()
            if now >= deadline:
                self._evaluate("lease clock")
                deadline = now + self.heartbeat_interval_s
            with trio.move_on_at(deadline):
                await self._contact.wait_transition()

    async def _kazoo_detector(self) -> None:
        """kazoo's own loss detection: a connection that brought nothing back for 2T/3."""
        while True:
            await self._link.wait_value(lambda lk: lk.up)
            limit = self._timeout_s * _KAZOO_READ_TIMEOUT
            deadline = self._last_received + limit
            if trio.current_time() >= deadline:
                self._drop("connection timed out", tell_server=True)
                continue
            await trio.sleep_until(deadline)

    async def _abandon_untrusted(self) -> None:
        """zk.py: a session untrusted for T although the link is up (degraded) is replaced."""
        while True:
            await self.session.wait_value(lambda s: s.state is SessionState.SUSPENDED)
            with trio.move_on_after(self._timeout_s * ABANDON_AFTER):
                await self.session.wait_value(lambda s: s.state is not SessionState.SUSPENDED)
            while self.session.value.state is SessionState.SUSPENDED and not self._degraded_seen:
                await self.session.wait_transition()
            if self.session.value.state is not SessionState.SUSPENDED:
                continue
            link = self._link.value
            if link.session_id is not None and not self.blackholed.value:
                self._ensemble.close_session(link.session_id)
            self._drop("session abandoned", tell_server=False, lost=True)

    # -- the wire ------------------------------------------------------------------

    def _send(self, op: _Op, path: str, args: dict[str, Any]) -> _Pending:
        link = self._link.value
        if self._crashed or not self._running:
            raise ZooKeeperError("ZooKeeper session is not running")
        if not link.up:
            raise ZooKeeperError(f"{op.value}: ConnectionLoss")
        now = trio.current_time()
        pending = _Pending(op, path, args, now, self._conn)
        self.requests += 1
        due = max(now + self._ensemble.one_way(), self._up_due)
        self._up_due = due
        self._up.append((due, pending))
        self._pending.add(pending)
        self._up_ready.set()
        return pending

    async def _uplink(self) -> None:
        ensemble = self._ensemble
        while True:
            while not self._up:
                self._up_ready = trio.Event()
                await self._up_ready.wait()
            due, pending = self._up[0]
            await trio.sleep_until(due)
            if not self._up or self._up[0][1] is not pending:
                continue  # the connection dropped meanwhile
            if self.blackholed.value:
                await self.blackholed.wait_value(False)
                if not self._up or self._up[0][1] is not pending:
                    continue  # the connection was given up meanwhile
            if pending.op in _WRITES:
                await trio.sleep_until(ensemble.commit_at(trio.current_time()))
                if not self._up or self._up[0][1] is not pending:
                    continue
            self._up.popleft()
            if pending.conn != self._conn:
                continue
            sid = self._link.value.session_id
            assert sid is not None
            try:
                result: Any = ensemble.apply(sid, pending.op, pending.path, pending.args)
                error: BaseException | None = None
            except NodeError as exc:
                result, error = None, exc
            except _Expired:
                # Answered by dropping the connection: the client learns LOST.
                self._session_gone(sid)
                continue
            self._deliver(pending.conn, functools.partial(self._answer, pending, result, error))

    def _deliver(self, conn: int, message: Callable[[], None]) -> None:
        """Queue something from the server for this client, in order."""
        due = max(trio.current_time() + self._ensemble.one_way(), self._down_due)
        self._down_due = due
        self._down.append((due, conn, message))
        self._down_ready.set()

    async def _downlink(self) -> None:
        while True:
            while not self._down:
                self._down_ready = trio.Event()
                await self._down_ready.wait()
            due, conn, message = self._down[0]
            await trio.sleep_until(due)
            if not self._down or self._down[0][2] is not message:
                continue
            if self.blackholed.value:
                await self.blackholed.wait_value(False)
                if not self._down or self._down[0][2] is not message:
                    continue
            self._down.popleft()
            if conn != self._conn:
                continue
            self._last_received = trio.current_time()
            message()

    def _answer(self, pending: _Pending, result: Any, error: BaseException | None) -> None:
        self._pending.discard(pending)
        if isinstance(error, _Refusal):
            # zk.py turns every kazoo error but NoNode and NodeExists into ZooKeeperError.
            error = ZooKeeperError(f"{pending.op.value}: {type(error).__name__}")
        pending.result, pending.error = result, error
        self._note_contact(pending)
        pending.done.set()

    def _notify(self, kind: _Kind, path: str) -> None:
        conn = self._conn

        def fire() -> None:
            for callback in self._watchers.pop((kind, path), ()):
                callback()

        self._deliver(conn, fire)

    async def _request(
        self, op: _Op, path: str, *, watch: Callable[[], None] | None = None, **args: Any
    ) -> Any:
        if watch is not None:
            args["watch"] = True
        pending = self._send(op, path, args)
        if watch is not None:
            # After the send: a notification cannot overtake the answer (one FIFO down).
            kind = _Kind.CHILD if op is _Op.CHILDREN else _Kind.DATA
            self._watchers[(kind, path)].append(watch)
        with trio.move_on_after(self._timeout_s):
            await pending.done.wait()
        if not pending.done.is_set():
            self._pending.discard(pending)
            raise ZooKeeperError(f"{op.value}: no answer within {self._timeout_s:g} s")
        if pending.error is not None:
            raise pending.error
        return pending.result

    # -- the protocol's calls ---------------------------------------------------------

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, makepath: bool = False
    ) -> NodeStat:
        if makepath:
            parent = path.rsplit("/", 1)[0]
            if parent and await self.exists(parent) is None:
                await self.ensure_path(parent)
        stat: NodeStat = await self._request(_Op.CREATE, path, data=data, ephemeral=ephemeral)
        return stat

    async def ensure_path(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        current = ""
        for part in parts:
            current += "/" + part
            if await self.exists(current) is None:
                try:
                    await self._request(_Op.CREATE, current, data=b"", ephemeral=False)
                except NodeExistsError:
                    pass

    async def get(self, path: str) -> tuple[bytes, NodeStat]:
        result: tuple[bytes, NodeStat] = await self._request(_Op.GET, path)
        return result

    async def exists(self, path: str) -> NodeStat | None:
        stat: NodeStat | None = await self._request(_Op.EXISTS, path)
        return stat

    async def get_children(self, path: str) -> list[str]:
        children: list[str] = await self._request(_Op.CHILDREN, path)
        return children

    async def set(self, path: str, data: bytes, *, version: int = -1) -> NodeStat:
        stat: NodeStat = await self._request(_Op.SET, path, data=data, version=version)
        return stat

    async def delete(self, path: str, *, version: int = -1) -> None:
        await self._request(_Op.DELETE, path, version=version)

    async def multi(self, ops: Sequence[Op]) -> list[NodeStat | None]:
        results: list[NodeStat | None] = await self._request(_Op.MULTI, "", ops=list(ops))
        return results

    # -- watches ------------------------------------------------------------------

    async def _rearmed(self, fired: trio.Event, connects: int) -> None:
        """Until the watch fired or the client reconnected (zk.py's ``_wait_rearm``)."""
        if self._link.value.connects != connects:
            return
        self._rearm.add(fired)
        try:
            await fired.wait()
        finally:
            self._rearm.discard(fired)

    async def _backoff(self, delay: float) -> float:
        await self._link.wait_value(lambda lk: lk.up)
        await trio.sleep(delay)
        return min(_RETRY_MAX_S, delay * 2)

    async def watch_data(
        self,
        path: str,
        callback: Callable[[bytes | None, NodeStat | None], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        last: object = object()
        started = False
        delay = _RETRY_MIN_S
        while True:
            fired = trio.Event()
            connects = self._link.value.connects
            data: bytes | None
            stat: NodeStat | None
            try:
                try:
                    data, stat = await self._request(_Op.GET, path, watch=fired.set)
                except NoNodeError:
                    if await self._request(_Op.EXISTS, path, watch=fired.set) is not None:
                        continue
                    data, stat = None, None
            except ZooKeeperError:
                delay = await self._backoff(delay)
                continue
            delay = _RETRY_MIN_S
            view = None if stat is None else (data, stat.czxid, stat.mzxid, stat.ephemeral_owner)
            if view != last:
                last = view
                callback(data, stat)
            if not started:
                started = True
                task_status.started()
            await self._rearmed(fired, connects)

    async def watch_children(
        self,
        path: str,
        callback: Callable[[list[str]], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        last: object = object()
        started = False
        delay = _RETRY_MIN_S
        while True:
            fired = trio.Event()
            connects = self._link.value.connects
            try:
                try:
                    children: list[str] = await self._request(_Op.CHILDREN, path, watch=fired.set)
                except NoNodeError:
                    if await self._request(_Op.EXISTS, path, watch=fired.set) is not None:
                        continue
                    children = []
            except ZooKeeperError:
                delay = await self._backoff(delay)
                continue
            delay = _RETRY_MIN_S
            if children != last:
                last = children
                callback(list(children))
            if not started:
                started = True
                task_status.started()
            await self._rearmed(fired, connects)

    async def watch_children_data(
        self,
        path: str,
        callback: Callable[[str, bytes | None, NodeStat | None], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """zk.py's one-task watch of a directory: the children and each child's data."""
        known: dict[str, tuple[int, int]] = {}
        dirty: set[str] = set()
        state = {"listing": True}
        wake = trio.Event()

        def mark(child: str | None) -> None:
            if child is None:
                state["listing"] = True
            else:
                dirty.add(child)
            wake.set()

        def forget(child: str) -> None:
            if known.pop(child, None) is not None:
                callback(child, None, None)

        started = False
        listed_at = -math.inf
        delay = _RETRY_MIN_S
        while True:
            wake = trio.Event()
            connects = self._link.value.connects
            try:
                if state["listing"]:
                    if started:
                        await trio.sleep_until(listed_at + _LIST_EVERY_S)
                    state["listing"] = False
                    listed_at = trio.current_time()
                    relist = functools.partial(mark, None)
                    try:
                        children = set(await self._request(_Op.CHILDREN, path, watch=relist))
                    except NoNodeError:
                        if await self._request(_Op.EXISTS, path, watch=relist) is not None:
                            state["listing"] = True
                            continue
                        children = set()
                    for child in set(known) - children:
                        forget(child)
                    dirty |= children - set(known)
                    dirty &= children
                batch = sorted(dirty)[:_READ_BATCH]
                dirty.difference_update(batch)
                # Pipelined, as zk.py's concurrent reads: all sent, then all awaited.
                sent = []
                for child in batch:
                    child_path = f"{path}/{child}"
                    pending = self._send(_Op.GET, child_path, {"watch": True})
                    self._watchers[(_Kind.DATA, child_path)].append(functools.partial(mark, child))
                    sent.append((child, pending))
                unread = []
                for child, pending in sent:
                    with trio.move_on_after(self._timeout_s):
                        await pending.done.wait()
                    if not pending.done.is_set() or isinstance(pending.error, ZooKeeperError):
                        self._pending.discard(pending)
                        unread.append(child)
                    elif isinstance(pending.error, NoNodeError):
                        forget(child)
                        state["listing"] = True
                    else:
                        data, stat = pending.result
                        view = (stat.czxid, stat.mzxid)
                        if known.get(child) != view:
                            known[child] = view
                            callback(child, data, stat)
                if unread:
                    dirty.update(unread)
                    raise ZooKeeperError(f"{path}: {len(unread)} children not read")
            except ZooKeeperError:
                state["listing"] = True
                delay = await self._backoff(delay)
                continue
            delay = _RETRY_MIN_S
            if state["listing"] or dirty:
                continue
            if not started:
                started = True
                task_status.started()
            await self._rearmed(wake, connects)
            if self._link.value.connects != connects:
                state["listing"] = True
                dirty |= set(known)


if TYPE_CHECKING:
    # The simulation satisfies the product's protocol (mypy checks this line).
    _: type[ZooKeeperClient] = SimZooKeeper
