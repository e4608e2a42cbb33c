"""OwnershipCache.refresh: a view left stale (as by a notification lost with a
dropped connection) is read again from ZooKeeper, here the simulated one."""

from __future__ import annotations

import trio
import trio.testing

from benchmarks.scale.simzk import SimEnsemble, SimZooKeeper
from linechatd.membership import InstanceInfo, Lease, Registration
from linechatd.ownership import OwnershipCache, ZkPaths

T = 10.0


def registration(member: str, leases: dict[int, Lease]) -> bytes:
    info = InstanceInfo(member, f"ws://{member}/ws", f"http://{member}")
    return Registration(info, leases=leases).to_json()


async def test_refresh_replaces_stale_entries_and_reports_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = SimEnsemble(seed=1)
    paths = ZkPaths("c")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        writer = SimZooKeeper(server, session_timeout_s=T, name="w")
        reader = SimZooKeeper(server, session_timeout_s=T, name="r")
        await nursery.start(writer.run)
        await nursery.start(reader.run)
        two = {0: Lease(5, 1), 1: Lease(5, 1)}
        await writer.create(paths.instance("gw-1"), registration("gw-1", two), makepath=True)
        cache = OwnershipCache(reader, paths, 4)
        await nursery.start(cache.run)
        assert cache.free() == {2, 3}
        assert await cache.refresh() == [], "a current view has nothing stale"

        # As if the notification of gw-1 giving 2 and 3 back had been lost: the
        # view still lists them as gw-1's.
        four = two | {2: Lease(7, 2), 3: Lease(7, 2)}
        _data, stat = await reader.get(paths.instance("gw-1"))
        cache._on_registration("gw-1", registration("gw-1", four), stat)
        assert cache.free() == set() and cache.held_by("gw-1") == 4

        assert await cache.refresh(["gw-1"]) == ["gw-1"], "the member named is read"
        assert cache.free() == {2, 3} and cache.held_by("gw-1") == 2
        # An instance that is gone (its deletion unseen) goes from the view even
        # when not named: the listing shows it missing.
        cache._on_registration("gw-9", registration("gw-9", {3: Lease(8, 2)}), stat)
        assert cache.free() == {2}
        assert await cache.refresh([]) == ["gw-9"]
        assert cache.members() == ["gw-1"] and cache.free() == {2, 3}
        # With no names, every registration is read.
        cache._on_registration("gw-1", registration("gw-1", four), stat)
        assert await cache.refresh() == ["gw-1"] and cache.free() == {2, 3}
        nursery.cancel_scope.cancel()
