"""The view log: one publisher reads the registrations, every view follows its log.

Against the simulated ZooKeeper, in virtual time: views agree with the
registrations, a burst of changes costs the followers a few entries, a late
follower starts from a full entry, a follower that missed compacted entries
starts again from the newest full, and a new publisher takes over when the
old one's session ends.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_util import wait_any

from benchmarks.scale.simzk import SimEnsemble, SimZooKeeper
from linechatd import viewlog
from linechatd.membership import InstanceInfo, Lease, Registration
from linechatd.ownership import FOLLOW_WAIT_S, OwnershipCache, ZkPaths
from linechatd.viewlog import (
    EntryName,
    Gone,
    Published,
    ViewFollower,
    decode_entry,
    encode_entry,
)
from linechatd.zk import NodeStat, NoNodeError, Op, ZooKeeperError

T = 10.0
PATHS = ZkPaths("c")
PARTITIONS = 64


def registration(member: str, leases: dict[int, Lease]) -> bytes:
    info = InstanceInfo(member, f"ws://{member}/ws", f"http://{member}")
    return Registration(info, leases=leases).to_json()


@asynccontextmanager
async def ensemble() -> AsyncIterator[tuple[SimEnsemble, trio.Nursery]]:
    server = SimEnsemble(seed=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server, nursery
        nursery.cancel_scope.cancel()


async def session(server: SimEnsemble, nursery: trio.Nursery, name: str) -> SimZooKeeper:
    zk = SimZooKeeper(server, session_timeout_s=T, name=name)
    await nursery.start(zk.run)
    return zk


async def view(server: SimEnsemble, nursery: trio.Nursery, name: str) -> OwnershipCache:
    zk = await session(server, nursery, name)
    cache = OwnershipCache(zk, PATHS, PARTITIONS, instance=name)
    await nursery.start(cache.run)
    return cache


async def register(zk: SimZooKeeper, member: str, leases: dict[int, Lease]) -> None:
    """Create ``member``'s registration, listing ``leases``, or replace it."""
    data = registration(member, leases)
    if await zk.exists(PATHS.instance(member)) is None:
        await zk.create(PATHS.instance(member), data, makepath=True)
    else:
        await zk.set(PATHS.instance(member), data)


def owned(by: dict[int, str]) -> list[str | None]:
    """The owners a view should show: ``by``'s partitions, the rest free."""
    return [by.get(k) for k in range(PARTITIONS)]


def owners(cache: OwnershipCache) -> list[str | None]:
    return [None if o is None else o.instance for o in cache.snapshot()]


async def agree(caches: list[OwnershipCache], expected: list[str | None]) -> None:
    """Until every view says ``expected`` (bounded)."""
    with trio.fail_after(30):
        while any(owners(c) != expected for c in caches):
            await wait_any(*(c.changed.wait_transition for c in caches))


def test_entries_round_trip_and_garbage_is_refused() -> None:
    changes = {
        "gw-1": Published(registration("gw-1", {3: Lease(7, 9)}), 5, 7, 9, 0x11),
        "gw-2": Gone(0x12),
    }
    assert decode_entry(encode_entry(changes)) == changes
    for garbage in (b"", b"{}", encode_entry({})[:-3], b"x\x9c" + b"\0" * 8):
        with pytest.raises(ValueError, match="not a view log entry"):
            decode_entry(garbage)
    name = EntryName(0x1A2B, 42, full=True)
    assert EntryName.parse(str(name)) == name
    assert EntryName.parse(str(EntryName(5, 0))) == EntryName(5, 0)
    for foreign in ("", "x", "00ff-12-part", "zz-1", "1-2-3-full"):
        assert EntryName.parse(foreign) is None
    assert EntryName(1, 9) < EntryName(2, 0) < EntryName(2, 1)


async def test_every_view_follows_the_registrations_through_one_publisher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        writer = await session(server, nursery, "writer")
        caches = [await view(server, nursery, f"gw-{i}") for i in range(3)]
        elected = [c for c in caches if c.publisher.elected.value]
        assert len(elected) == 1, "exactly one publisher"
        # Only the publisher watches the registrations.
        assert server.stats.watches_held <= 2 * len(caches) + 1

        await register(writer, "gw-a", {0: Lease(5, 1)})
        await agree(caches, owned({0: "gw-a"}))

        # A burst: 40 changes of one registration within one interval reach the
        # followers as a handful of entries, not forty.
        before = [c.follower.entries_read for c in caches]
        leases: dict[int, Lease] = {0: Lease(5, 1)}
        for k in range(1, 41):
            leases[k] = Lease(100 + k, 1)
            await register(writer, "gw-a", leases)
        await agree(caches, owned(dict.fromkeys(range(41), "gw-a")))
        for cache, was in zip(caches, before, strict=True):
            read = cache.follower.entries_read - was
            assert 1 <= read <= 6, f"{cache.publisher}: {read} entries for a burst of 40"

        await writer.delete(PATHS.instance("gw-a"))
        await agree(caches, [None] * PARTITIONS)
        nursery.cancel_scope.cancel()


async def test_compaction_and_a_late_follower_start_from_a_full_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        writer = await session(server, nursery, "writer")
        first = await view(server, nursery, "gw-0")
        expected: list[str | None] = []
        for round_ in range(30):
            leases = {k: Lease(1000 + round_, 1) for k in range(round_ % 8, 8)}
            await register(writer, "gw-a", leases)
            expected = owned(dict.fromkeys(leases, "gw-a"))
            await agree([first], expected)  # one entry per change
        log = await writer.get_children(f"{PATHS.view}/log")
        names = sorted(EntryName.parse(n) for n in log)
        assert all(n is not None for n in names)
        # Compacted: far fewer than 31 entries kept, a full one among the first two
        # (the delta written with it may come first).
        assert len(names) < 20 and any(n is not None and n.full for n in names[:2]), log

        late = await view(server, nursery, "gw-9")
        assert owners(late) == expected
        assert late.follower.entries_read <= len(names)
        nursery.cancel_scope.cancel()


async def test_a_follower_that_missed_compacted_entries_starts_again_from_the_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The follower's rules alone, against a log written by hand."""
    async with ensemble() as (server, nursery):
        zk = await session(server, nursery, "hand")
        log_path = f"{PATHS.view}/log"
        await zk.ensure_path(log_path)
        applied: list[tuple[str, object]] = []
        resets: list[set[str]] = []
        follower = ViewFollower(
            zk,
            PATHS.view,
            apply=lambda m, c: applied.append((m, c)),
            reset=lambda changes: resets.append(set(changes)),
        )

        def reg(member: str, zxid: int) -> Published:
            return Published(registration(member, {}), zxid, zxid, 0, 1)

        async def write(name: EntryName, changes: dict[str, Published | Gone]) -> None:
            await zk.create(f"{log_path}/{name}", encode_entry(changes))

        async def catch_up() -> None:
            await follower._catch_up(tuple(sorted(await zk.get_children(log_path))))

        await write(EntryName(7, 0, full=True), {"a": reg("a", 1)})
        await write(EntryName(7, 1), {"b": reg("b", 2)})
        await catch_up()
        assert resets == [{"a"}] and [m for m, _ in applied] == ["b"]
        assert follower.applied == EntryName(7, 1) and follower.following.value

        # Compaction: delta 2, full 3 (the state after 2), the older entries gone.
        await write(EntryName(7, 2), {"c": reg("c", 3)})
        await write(EntryName(7, 3, full=True), {m: reg(m, 1) for m in "abc"})
        await write(EntryName(7, 4), {"d": reg("d", 4)})
        for old in (EntryName(7, 0, full=True), EntryName(7, 1)):
            await zk.delete(f"{log_path}/{old}")
        await catch_up()
        assert resets == [{"a"}], "the compaction's full entry is not read"
        assert [m for m, _ in applied] == ["b", "c", "d"]

        # Entries 5 and 6 missed (compacted away before this follower looked).
        await write(EntryName(7, 7, full=True), {m: reg(m, 1) for m in "abcdef"})
        await write(EntryName(7, 8), {"g": reg("g", 9)})
        for old in (EntryName(7, 2), EntryName(7, 3, full=True), EntryName(7, 4)):
            await zk.delete(f"{log_path}/{old}")
        await catch_up()
        assert resets[-1] == set("abcdef") and applied[-1][0] == "g"
        assert follower.applied == EntryName(7, 8)

        # A new publisher (a larger generation): its first, full entry.
        await write(EntryName(9, 0, full=True), {"z": reg("z", 20)})
        await catch_up()
        assert resets[-1] == {"z"} and follower.applied == EntryName(9, 0, full=True)
        # An unreadable entry is logged and passed over, not fatal.
        await zk.create(f"{log_path}/{EntryName(9, 1)}", b"not zlib")
        await write(EntryName(9, 2), {"y": reg("y", 21)})
        await catch_up()
        assert follower.applied == EntryName(9, 2) and applied[-1][0] == "y"
        nursery.cancel_scope.cancel()


async def test_a_new_publisher_takes_over_when_the_old_session_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        writer = await session(server, nursery, "writer")
        caches = [await view(server, nursery, f"gw-{i}") for i in range(3)]
        (old,) = [c for c in caches if c.publisher.elected.value]
        rest = [c for c in caches if c is not old]
        old._zk.crash()  # type: ignore[attr-defined]
        # Until its session expires the old publisher's node and log stay.
        with trio.fail_after(T + 5):
            await wait_any(*(functools.partial(c.publisher.elected.wait_value, True) for c in rest))
        assert trio.current_time() >= T * 0.9
        await register(writer, "gw-a", {5: Lease(5, 1)})
        await agree(rest, owned({5: "gw-a"}))
        nursery.cancel_scope.cancel()


async def test_with_no_publisher_a_starting_view_reads_the_registrations(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        writer = await session(server, nursery, "writer")
        await register(writer, "gw-a", {2: Lease(5, 1)})
        # A publisher node whose holder died: it stays until that session expires.
        dead = await session(server, nursery, "dead")
        await dead.create(f"{PATHS.view}/publisher", b"{}", ephemeral=True, makepath=True)
        dead.crash()
        started = trio.current_time()
        cache = await view(server, nursery, "gw-0")
        assert FOLLOW_WAIT_S <= trio.current_time() - started < FOLLOW_WAIT_S + 1
        assert not cache.follower.following.value
        assert owners(cache)[2] == "gw-a", "read directly"
        # Once the dead session expires, this instance publishes and follows.
        with trio.fail_after(2 * T):
            await cache.follower.following.wait_value(True)
        assert cache.publisher.elected.value
        await register(writer, "gw-a", {3: Lease(6, 1)})
        await agree([cache], owned({3: "gw-a"}))
        nursery.cancel_scope.cancel()


async def test_a_late_change_never_replaces_a_newer_one() -> None:
    cache = OwnershipCache(None, PATHS, PARTITIONS)  # type: ignore[arg-type]
    new = NodeStat(10, 20, 0, 0, 0x5, 0)
    cache._on_registration("gw-a", registration("gw-a", {1: Lease(20, 1)}), new)
    stale = Published(registration("gw-a", {2: Lease(15, 1)}), 10, 15, 0, 0x5)
    cache.apply_change("gw-a", stale)
    assert owners(cache)[1] == "gw-a" and owners(cache)[2] is None
    cache.apply_change("gw-a", Gone(0x4))  # an earlier incarnation's end
    assert cache.members() == ["gw-a"]
    cache.apply_change("gw-a", Gone(0x5))
    assert cache.members() == []
    # A full entry without a member removes it.
    cache.apply_change("gw-b", Published(registration("gw-b", {}), 30, 30, 0, 0x6))
    cache.apply_full({"gw-c": Published(registration("gw-c", {}), 31, 31, 0, 0x7)})
    assert cache.members() == ["gw-c"]


async def test_the_log_is_kept_as_ephemeral_nodes_of_the_publisher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        cache = await view(server, nursery, "gw-0")
        assert cache.publisher.elected.value
        log = await cache._zk.get_children(f"{PATHS.view}/log")
        assert len(log) == 1
        _data, stat = await cache._zk.get(f"{PATHS.view}/log/{log[0]}")
        assert stat.ephemeral_owner == cache._zk.session_id
        nursery.cancel_scope.cancel()


class FailingOnce(SimZooKeeper):
    """Its first create of each of ``paths`` gets no answer (as kazoo's timeout says)."""

    def __init__(self, *args: Any, paths: set[str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.failing = set(paths)
        self.refuse_multi = 0  # this many transactions fail as if a node were missing

    async def multi(self, ops: Sequence[Op]) -> list[NodeStat | None]:
        if self.refuse_multi:
            self.refuse_multi -= 1
            raise NoNodeError("refused by the test")
        return await super().multi(ops)

    async def create(
        self, path: str, data: bytes = b"", *, ephemeral: bool = False, makepath: bool = False
    ) -> NodeStat:
        if path in self.failing:
            self.failing.discard(path)
            raise ZooKeeperError(f"create_async: no answer from ZooKeeper within 2 s ({path})")
        return await super().create(path, data, ephemeral=ephemeral, makepath=makepath)


async def test_a_failed_campaign_is_tried_again_not_fatal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        zk = FailingOnce(
            server, session_timeout_s=T, name="gw-0", paths={f"{PATHS.view}/publisher"}
        )
        await nursery.start(zk.run)
        cache = OwnershipCache(zk, PATHS, PARTITIONS, instance="gw-0")
        with trio.fail_after(FOLLOW_WAIT_S + 5):
            await nursery.start(cache.run)
            await cache.publisher.elected.wait_value(True)
        assert not zk.failing, "the first attempt failed"
        assert cache.follower.following.value
        nursery.cancel_scope.cancel()


async def test_a_publisher_that_fails_starts_a_new_generation_in_the_same_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        writer = await session(server, nursery, "writer")
        zk = FailingOnce(server, session_timeout_s=T, name="gw-0", paths=set())
        await nursery.start(zk.run)
        cache = OwnershipCache(zk, PATHS, PARTITIONS, instance="gw-0")
        await nursery.start(cache.run)
        first = cache.follower.applied
        assert first is not None and cache.publisher.elected.value
        zk.refuse_multi = 1  # the next entry's transaction fails
        await register(writer, "gw-a", {1: Lease(5, 1)})
        await agree([cache], owned({1: "gw-a"}))
        assert cache.publisher.elected.value
        assert cache.follower.applied is not None and cache.follower.applied.gen > first.gen
        log = [EntryName.parse(n) for n in await zk.get_children(f"{PATHS.view}/log")]
        assert {e.gen for e in log if e is not None} == {cache.follower.applied.gen}, log
        nursery.cancel_scope.cancel()


async def test_a_large_delta_is_split_and_a_large_full_entry_logged(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(viewlog, "DELTA_MAX_BYTES", 300)
    monkeypatch.setattr(viewlog, "ENTRY_WARN_BYTES", 300)
    many = {
        f"gw-{i}": Published(registration(f"gw-{i}", {i: Lease(9, 9)}), i, i, 0, i)
        for i in range(40)
    }
    parts = viewlog._split(many)
    assert len(parts) > 2 and all(len(p) <= 300 for p in parts)
    merged: dict[str, object] = {}
    for part in parts:
        merged |= decode_entry(part)
    assert merged == many
    async with ensemble() as (server, nursery):
        writer = await session(server, nursery, "writer")
        caches = [await view(server, nursery, f"gw-{i}") for i in range(2)]
        expected = owned({i: f"gw-a{i:02d}" for i in range(40)})
        # Forty registrations within one interval: too many for one entry.
        async with trio.open_nursery() as burst:
            for i in range(40):
                burst.start_soon(register, writer, f"gw-a{i:02d}", {i: Lease(100 + i, 1)})
        await agree(caches, expected)
        for cache in caches:
            assert cache.follower.entries_read >= 3, "the burst came as several entries"
        late = await view(server, nursery, "gw-9")
        assert owners(late) == expected
        assert "view_full_entry_large" in caplog.messages
        nursery.cancel_scope.cancel()
