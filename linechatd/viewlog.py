"""The view log: one elected instance reads the registrations, every instance reads its log.

Every instance needs every registration (who owns which partition, each
instance's settings). Watching each one directly costs N watches per instance
and, for every change, a notification and a read per instance: N² in all,
which is what gives first at a thousand instances (docs/capacity.md). Instead
one instance, the *publisher*, watches the registrations and appends what
changed to a log, at most one entry per ``PUBLISH_INTERVAL_S``; the others
watch the log's listing and read only the entries they have not applied. A
change then costs N notifications per interval, however many registrations
changed in it, and the bytes read are those of the changes.

Nodes (under ``/linechat/<cluster>/view``)::

    publisher                 ephemeral; {"instance": ..., "session": ...}
    log/<gen>-<n>[-full]      ephemeral, the publisher's session

``gen`` is the publisher node's czxid in hex (a later publisher has a larger
one), ``n`` counts the entries of that publisher from 0 without gaps. An entry
is zlib-compressed JSON, ``{"members": {id: [data, czxid, mzxid, mtime_ms,
session] or [null, session]}}``: each changed registration as read (or gone).
A ``-full`` entry lists every registration; the first of each publisher is
one, and later ones (written when the deltas since the last full outweigh it,
in the transaction that deletes the older entries) carry nothing beyond the
entry before them that the next delta will not carry too (a change read
while earlier parts of a split delta were written), so a reader that has
applied that entry skips them.

Nothing here decides who owns a partition (the lease nodes do); a view that
lags, as while a publisher that died is replaced, costs only failed creates
and redirects, and the balancer reads registrations directly when its view
looks stuck (``OwnershipCache.refresh``).
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio
from trio_util import AsyncValue, wait_any

from .hashing import stable_hash
from .zk import (
    Create,
    Delete,
    NodeError,
    NodeExistsError,
    NodeStat,
    NoNodeError,
    Op,
    SessionInfo,
    SessionState,
    ZooKeeperClient,
    ZooKeeperError,
)

__all__ = [
    "PUBLISH_INTERVAL_S",
    "Backoff",
    "EntryName",
    "Gone",
    "Published",
    "ViewFollower",
    "ViewPublisher",
    "decode_entry",
    "encode_entry",
]

log = logging.getLogger(__name__)

# One log entry at most this often: the changes meanwhile go in the next one.
# A view lags the registrations by up to this plus a few round trips.
PUBLISH_INTERVAL_S = 0.1
# A full entry (and the older entries dropped) once this many deltas followed
# the last one, even if they weigh less than it.
MAX_DELTAS = 512
# Candidates run in their rank order (the view's), this far apart, so that one
# publisher's end does not make every instance try to create the node at once;
# those past the first CANDIDATES (or not in the view) spread over as long again.
CANDIDATE_STEP_S = 0.1
CANDIDATES = 20
# A delta larger than this (a cold start of thousands of instances within one
# interval) is written as several entries, one transaction each: ZooKeeper
# refuses requests above jute.maxbuffer (1 MiB by default).
DELTA_MAX_BYTES = 256 * 1024
# A full entry holds every registration (about 100 bytes each, compressed):
# past this, logged as an error (about 9,000 instances).
ENTRY_WARN_BYTES = 900 * 1024
_RETRY_MIN_S = 0.05
# Retries of one instance: kept short, so that the views catch up soon after
# ZooKeeper answers again.
_RETRY_MAX_S = 0.5


@dataclass(frozen=True, slots=True)
class Published:
    """A registration as the publisher read it."""

    data: bytes
    czxid: int
    mzxid: int
    mtime_ms: int
    session: int

    @classmethod
    def of(cls, data: bytes, stat: NodeStat) -> Published:
        return cls(data, stat.czxid, stat.mzxid, stat.mtime_ms, stat.ephemeral_owner)

    def stat(self) -> NodeStat:
        return NodeStat(self.czxid, self.mzxid, 0, 0, self.session, self.mtime_ms)


@dataclass(frozen=True, slots=True)
class Gone:
    """A registration deleted (its session ended or it left)."""

    session: int


Change = Published | Gone


@dataclass(frozen=True, order=True, slots=True)
class EntryName:
    gen: int
    n: int
    full: bool = False

    def __str__(self) -> str:
        return f"{self.gen:016x}-{self.n:010d}" + ("-full" if self.full else "")

    @classmethod
    def parse(cls, name: str) -> EntryName | None:
        parts = name.split("-")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "full"):
            return None
        try:
            return cls(int(parts[0], 16), int(parts[1]), len(parts) == 3)
        except ValueError:
            return None


def encode_entry(members: Mapping[str, Change]) -> bytes:
    doc: dict[str, list[object]] = {}
    for member, change in members.items():
        if isinstance(change, Gone):
            doc[member] = [None, change.session]
        else:
            doc[member] = [
                change.data.decode(),
                change.czxid,
                change.mzxid,
                change.mtime_ms,
                change.session,
            ]
    return zlib.compress(json.dumps({"members": doc}, separators=(",", ":")).encode(), 6)


def decode_entry(data: bytes) -> dict[str, Change]:
    """An entry's changes; ValueError if it is not one."""
    try:
        doc = json.loads(zlib.decompress(data))
        members = doc["members"]
        if not isinstance(members, dict):
            raise TypeError("members")
        out: dict[str, Change] = {}
        for member, value in members.items():
            if value[0] is None:
                out[member] = Gone(int(value[1]))
            else:
                text, czxid, mzxid, mtime_ms, session = value
                out[member] = Published(
                    str(text).encode(), int(czxid), int(mzxid), int(mtime_ms), int(session)
                )
        return out
    except (zlib.error, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"not a view log entry: {exc}") from None


def _split(changes: Mapping[str, Change]) -> list[bytes]:
    """``changes`` as entries of at most DELTA_MAX_BYTES each (one, nearly always)."""
    data = encode_entry(changes)
    if len(data) <= DELTA_MAX_BYTES or len(changes) <= 1:
        return [data]
    members = sorted(changes)
    half = len(members) // 2
    return _split({m: changes[m] for m in members[:half]}) + _split(
        {m: changes[m] for m in members[half:]}
    )


class Backoff:
    """Delays between retries of one failing call: doubling, from 50 ms to 0.5 s."""

    def __init__(self) -> None:
        self._delay = _RETRY_MIN_S

    def next(self) -> float:
        delay = self._delay
        self._delay = min(_RETRY_MAX_S, delay * 2)
        return delay

    def reset(self) -> None:
        self._delay = _RETRY_MIN_S


def _connected(info: SessionInfo) -> bool:
    return info.state is SessionState.CONNECTED


class ViewPublisher:
    """Runs for publisher while this instance's session lasts, and publishes once elected.

    A new session runs again: the old one's nodes go when it ends, and a
    publisher is always the one session holding the publisher node.
    """

    def __init__(
        self,
        zk: ZooKeeperClient,
        root: str,
        instances: str,
        *,
        instance: str,
        position: Callable[[], int | None],
    ) -> None:
        self._zk = zk
        self._node = f"{root}/publisher"
        self._log = f"{root}/log"
        self._instances = instances
        self._instance = instance
        # This instance's place among the candidates (None: not in the view yet).
        self._position = position
        self.elected = AsyncValue(False)

    async def run(self) -> None:
        zk = self._zk
        while True:
            info = await zk.session.wait_value(_connected)

            def session_ended(s: SessionInfo, generation: int = info.generation) -> bool:
                return s.generation != generation or s.state in (
                    SessionState.LOST,
                    SessionState.CLOSED,
                )

            await wait_any(
                functools.partial(self._serve_retrying, info),
                lambda: zk.session.wait_value(session_ended),
            )

    async def _serve_retrying(self, info: SessionInfo) -> None:
        """Campaign and publish in this session; after a failure of ZooKeeper, again."""
        backoff = Backoff()
        while True:
            failed: ExceptionGroup[ZooKeeperError | NodeError] | None = None
            try:
                await self._serve(info)
            except* (ZooKeeperError, NodeError) as group:
                failed = group
            finally:
                if self.elected.value:
                    self.elected.value = False
                    log.info("view_publisher_stopped")
            if failed is not None:
                first: BaseException = failed
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                log.warning("view_publisher_failed", extra={"error": str(first)})
                await trio.sleep(backoff.next())

    async def _serve(self, info: SessionInfo) -> None:
        gen = await self._campaign(info)
        self.elected.value = True
        log.info("view_publisher_elected", extra={"generation": f"{gen:x}"})
        await self._publish(gen)

    def _turn_s(self) -> float:
        position = self._position()
        if position is not None and position < CANDIDATES:
            return CANDIDATE_STEP_S * position
        # The rest, spread (by the id's hash) over as long again: a thousand
        # instances that all missed their turn must not all try at one moment.
        spread = stable_hash(self._instance) % 4096 / 4096
        return CANDIDATE_STEP_S * CANDIDATES * (1 + spread)

    async def _campaign(self, info: SessionInfo) -> int:
        """Until this session holds the publisher node; its czxid."""
        zk = self._zk
        present = AsyncValue(True)

        def seen(_data: bytes | None, stat: NodeStat | None) -> None:
            # A node of this very session is an earlier term's: replaced below.
            present.value = stat is not None and stat.ephemeral_owner != info.session_id

        data = json.dumps({"instance": self._instance, "session": f"{info.session_id:#x}"})
        async with trio.open_nursery() as nursery:
            await nursery.start(zk.watch_data, self._node, seen)
            while True:
                await present.wait_value(False)
                with trio.move_on_after(self._turn_s()):
                    await present.wait_value(True)
                    continue  # another candidate was first
                try:
                    stat = await zk.create(self._node, data.encode(), ephemeral=True, makepath=True)
                except NodeExistsError:
                    try:
                        _, stat = await zk.get(self._node)
                    except NoNodeError:
                        continue
                    if stat.ephemeral_owner == info.session_id:
                        # Ours: a create whose answer was lost, or an earlier term of
                        # this session that failed. A new node gives a new generation,
                        # so no follower mistakes the new log for the old one.
                        await zk.delete(self._node)
                        continue
                    present.value = True  # until the watch says it is gone
                    continue
                nursery.cancel_scope.cancel()
                return stat.czxid
        raise AssertionError("unreachable")  # pragma: no cover

    async def _publish(self, gen: int) -> None:
        zk = self._zk
        registrations: dict[str, Published] = {}
        changed: dict[str, Change] = {}
        wake = trio.Event()

        def on_registration(member: str, data: bytes | None, stat: NodeStat | None) -> None:
            if data is None or stat is None:
                gone = registrations.pop(member, None)
                if gone is None:
                    return
                changed[member] = Gone(gone.session)
            else:
                registrations[member] = changed[member] = Published.of(data, stat)
            wake.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(zk.watch_children_data, self._instances, on_registration)
            await zk.ensure_path(self._log)
            n = 0
            full = self._full(registrations)
            changed.clear()
            # Entries of an earlier term of this session, if any (a dead
            # publisher's went with its session).
            stale = [
                Delete(f"{self._log}/{name}")
                for name in await zk.get_children(self._log)
                if (parsed := EntryName.parse(name)) is None or parsed.gen != gen
            ]
            first: list[Op] = [
                Create(f"{self._log}/{EntryName(gen, n, full=True)}", full, ephemeral=True)
            ]
            await self._apply([*first, *stale])
            retained = [EntryName(gen, n, full=True)]
            full_size, since_full, deltas = len(full), 0, 0
            last_write = trio.current_time()
            while True:
                if not changed:
                    wake = trio.Event()
                    await wake.wait()
                await trio.sleep_until(last_write + PUBLISH_INTERVAL_S)
                batch, changed = changed, {}
                parts = _split(batch)
                for i, data in enumerate(parts):
                    n += 1
                    delta = EntryName(gen, n)
                    ops: list[Op] = [Create(f"{self._log}/{delta}", data, ephemeral=True)]
                    since_full += len(data)
                    deltas += 1
                    names = [delta]
                    last = i == len(parts) - 1
                    if last and (since_full > full_size or deltas >= MAX_DELTAS):
                        n += 1
                        compact = EntryName(gen, n, full=True)
                        full = self._full(registrations)
                        ops.append(Create(f"{self._log}/{compact}", full, ephemeral=True))
                        ops.extend(Delete(f"{self._log}/{old}") for old in retained)
                        retained, names = [], [delta, compact]
                        full_size, since_full, deltas = len(full), 0, 0
                    await self._apply(ops)
                    retained.extend(names)
                last_write = trio.current_time()

    def _full(self, registrations: Mapping[str, Change]) -> bytes:
        full = encode_entry(registrations)
        if len(full) > ENTRY_WARN_BYTES:
            # Past ZooKeeper's request limit (jute.maxbuffer) the write fails and
            # its connection is closed: say why, loudly; it is tried all the same.
            log.error(
                "view_full_entry_large",
                extra={
                    "bytes": len(full),
                    "registrations": len(registrations),
                    "hint": "raise jute.maxbuffer on the ZooKeeper servers above this size",
                },
            )
        return full

    async def _apply(self, ops: Sequence[Op]) -> None:
        """Apply ``ops`` (their first creates this publisher's next entry) until done.

        Only this publisher creates its entries: the first one existing means
        an earlier attempt whose answer was lost went through.
        """
        backoff = Backoff()
        while True:
            try:
                await self._zk.multi(ops)
                return
            except NodeExistsError:
                return
            except ZooKeeperError as exc:
                log.warning("view_publish_retry", extra={"error": str(exc)})
                await trio.sleep(backoff.next())


class ViewFollower:
    """Keeps a view up to date from the log, whoever publishes it.

    ``apply(member, change)`` for each change read; ``reset(changes)`` with a
    full entry when this follower starts, when a new publisher takes over or
    when the entries it missed are gone. ``following`` is True from the
    moment it first caught up with the log on.
    """

    def __init__(
        self,
        zk: ZooKeeperClient,
        root: str,
        *,
        apply: Callable[[str, Change], None],
        reset: Callable[[Mapping[str, Change]], None],
    ) -> None:
        self._zk = zk
        self._log = f"{root}/log"
        self._apply = apply
        self._reset = reset
        self.applied: EntryName | None = None  # the last entry applied
        self.following = AsyncValue(False)
        self.entries_read = 0

    async def run(self) -> None:
        listing: AsyncValue[tuple[str, ...]] = AsyncValue(())

        def listed(children: list[str]) -> None:
            listing.value = tuple(children)

        backoff = Backoff()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._zk.watch_children, self._log, listed)
            while True:
                names = listing.value
                try:
                    await self._catch_up(names)
                except NoNodeError:
                    # An entry went between the listing and the read (the log was
                    # compacted, or its publisher's session ended): list again.
                    try:
                        fresh = tuple(sorted(await self._zk.get_children(self._log)))
                    except NoNodeError:
                        fresh = ()
                    if fresh == names:
                        await trio.sleep(backoff.next())
                    listing.value = fresh
                    continue
                except ZooKeeperError as exc:
                    log.warning("view_log_read_failed", extra={"error": str(exc)})
                    await trio.sleep(backoff.next())
                    continue
                backoff.reset()
                await listing.wait_value(lambda v, names=names: v != names)

    async def _read(self, name: EntryName) -> dict[str, Change] | None:
        data, _stat = await self._zk.get(f"{self._log}/{name}")
        self.entries_read += 1
        try:
            return decode_entry(data)
        except ValueError as exc:
            log.warning("view_entry_unreadable", extra={"entry": str(name), "error": str(exc)})
            return None

    async def _catch_up(self, names: tuple[str, ...]) -> None:
        entries = sorted(e for e in map(EntryName.parse, names) if e is not None)
        if not entries:
            return  # no publisher (yet): keep the view as it is
        gen = max(e.gen for e in entries)
        mine = [e for e in entries if e.gen == gen]
        current = self.applied
        pending = [] if current is None else [e for e in mine if e.n > current.n]
        if current is None or current.gen != gen or (pending and pending[0].n != current.n + 1):
            fulls = [e for e in mine if e.full]
            if not fulls:
                return  # the new publisher's first entry is still to come
            start = fulls[-1]
            changes = await self._read(start)
            if changes is None:
                return
            self._reset(changes)
            self.applied = start
            pending = [e for e in mine if e.n > start.n]
        for entry in pending:
            assert self.applied is not None
            if entry.full and entry.n == self.applied.n + 1:
                # A compaction: the state after the entry before it, applied already.
                self.applied = entry
                continue
            changes = await self._read(entry)
            for member, change in (changes or {}).items():
                self._apply(member, change)
            self.applied = entry
        # Caught up with the log as listed.
        self.following.value = True
