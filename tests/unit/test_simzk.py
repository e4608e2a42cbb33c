"""The scale simulator's in-memory ZooKeeper: the semantics the product relies on.

One total order of writes, ephemeral nodes gone with their session, watches
that fire once per change, and the session states zk.py publishes (the lease
clock's SUSPENDED at T/2, LOST and a new generation after expiry), all in
virtual time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_util import AsyncValue

from benchmarks.scale.simzk import Latency, SimEnsemble, SimZooKeeper
from linechatd.zk import (
    Create,
    Delete,
    NodeExistsError,
    NodeStat,
    NoNodeError,
    SessionState,
    SetData,
    ZooKeeperError,
)

T = 10.0


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def ensemble(**kw: object) -> AsyncIterator[tuple[SimEnsemble, trio.Nursery]]:
    server = SimEnsemble(seed=1, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server, nursery
        nursery.cancel_scope.cancel()


async def start(server: SimEnsemble, nursery: trio.Nursery, name: str = "a") -> SimZooKeeper:
    zk = SimZooKeeper(server, session_timeout_s=T, name=name)
    await nursery.start(zk.run)
    return zk


async def test_nodes_writes_in_one_order_and_errors(autojump_clock: trio.testing.MockClock) -> None:
    async with ensemble() as (server, nursery):
        zk = await start(server, nursery)
        assert zk.connected and zk.session.value.generation == 1
        first = await zk.create("/a/b/one", b"1", makepath=True)
        second = await zk.create("/a/b/two", b"2")
        assert first.czxid < second.czxid
        assert await zk.get_children("/a/b") == ["one", "two"]
        assert (await zk.get("/a/b/one"))[0] == b"1"
        with pytest.raises(NodeExistsError):
            await zk.create("/a/b/one")
        with pytest.raises(NoNodeError):
            await zk.get("/nope")
        with pytest.raises(NoNodeError):
            await zk.create("/x/y")
        stat = await zk.set("/a/b/one", b"11")
        assert stat.version == 1 and stat.mzxid > second.czxid
        with pytest.raises(ZooKeeperError):  # a stale version: zk.py says ZooKeeperError
            await zk.delete("/a/b/one", version=0)
        await zk.delete("/a/b/one", version=1)
        assert await zk.exists("/a/b/one") is None


async def test_ephemerals_go_with_a_closed_session_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        watcher = await start(server, nursery, "w")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                owner = await start(server, inner, "o")
                await owner.create("/lease", b"o", ephemeral=True)
                assert owner.session_id is not None
                seen: list[NodeStat | None] = []
                count = AsyncValue(0)

                def on_node(_data: bytes | None, stat: NodeStat | None) -> None:
                    seen.append(stat)
                    count.value += 1

                await nursery.start(watcher.watch_data, "/lease", on_node)
                closed_at = trio.current_time()
                scope.cancel()
        assert owner.session.value.state is SessionState.CLOSED
        with trio.fail_after(1):
            await count.wait_value(2)
        assert seen[0] is not None and seen[1] is None
        assert trio.current_time() - closed_at < 0.01


async def test_a_crashed_session_expires_after_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        watcher = await start(server, nursery, "w")
        owner = await start(server, nursery, "o")
        await owner.create("/lease", b"o", ephemeral=True)
        gone = trio.Event()
        times: list[float] = []

        def on_node(_data: bytes | None, stat: NodeStat | None) -> None:
            if stat is None:
                times.append(trio.current_time())
                gone.set()

        await nursery.start(watcher.watch_data, "/lease", on_node)
        owner.crash()
        crashed_at = trio.current_time()
        with trio.fail_after(2 * T):
            await gone.wait()
        waited = times[0] - crashed_at
        assert T <= waited <= T + 0.2, waited
        assert server.stats.sessions_expired == 1


async def test_watches_fire_once_per_change_and_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        zk = await start(server, nursery)
        others = [await start(server, nursery, f"o{i}") for i in range(3)]
        await zk.ensure_path("/dir")
        lists: list[list[str]] = []
        count = AsyncValue(0)

        def on_children(children: list[str]) -> None:
            lists.append(children)
            count.value += 1

        for other in others:
            await nursery.start(other.watch_children, "/dir", on_children)
        assert server.stats.watches_held == 3
        before = server.stats.notifications
        await zk.create("/dir/x", b"")
        with trio.fail_after(1):
            await count.wait_value(6)
        assert server.stats.notifications - before == 3
        assert lists[-1] == ["x"]
        # Re-armed by the re-read: still one watch per watcher.
        assert server.stats.watches_held == 3


async def test_a_blackholed_session_is_suspended_at_half_t_and_expires_at_t(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble(latency=Latency(jitter=0)) as (server, nursery):
        zk = await start(server, nursery)
        watcher = await start(server, nursery, "w")
        await zk.create("/lease", b"", ephemeral=True)
        gone = trio.Event()
        await nursery.start(watcher.watch_data, "/lease", lambda _d, s: s or gone.set())
        gen = zk.session.value.generation
        await trio.sleep(1.0)
        zk.set_blackholed(True)
        cut = trio.current_time()
        info = await zk.session.wait_value(lambda s: s.state is not SessionState.CONNECTED)
        suspended_after = trio.current_time() - cut
        # The newest answer was sent at most one heartbeat before the cut.
        assert T / 2 - T / 6 - 0.01 <= suspended_after <= T / 2 + 0.01, suspended_after
        assert info.state is SessionState.SUSPENDED and info.degraded
        with trio.fail_after(2 * T):
            await gone.wait()
        expired_after = trio.current_time() - cut
        # Expiry comes after the suspension, with at least T/2 - T/6 to spare.
        assert expired_after - suspended_after >= T / 2 - T / 6 - 0.01
        zk.set_blackholed(False)
        with trio.fail_after(5 * T):
            info = await zk.session.wait_value(lambda s: s.state is SessionState.CONNECTED)
        assert info.generation == gen + 1


async def test_a_pause_below_t_keeps_sessions_and_their_nodes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        zk = await start(server, nursery)
        await zk.create("/lease", b"", ephemeral=True)
        gen = zk.session.value.generation
        async with trio.open_nursery() as pause:
            pause.start_soon(server.pause, 0.8 * T)
            info = await zk.session.wait_value(lambda s: s.state is not SessionState.CONNECTED)
            assert info.state is SessionState.SUSPENDED and not info.degraded
        info = await zk.session.wait_value(lambda s: s.state is SessionState.CONNECTED)
        assert info.generation == gen
        assert server.peek("/lease") is not None
        assert server.stats.sessions_expired == 0


async def test_multi_is_all_or_nothing_with_one_zxid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        zk = await start(server, nursery)
        await zk.ensure_path("/p/1")
        await zk.ensure_path("/p/2")
        await zk.create("/reg", b"r0", ephemeral=True)
        results = await zk.multi(
            [Create("/p/1/owner", b"a", ephemeral=True), SetData("/reg", b"r1")]
        )
        assert results[0] is None
        reg = results[1]
        assert reg is not None
        lease = await zk.exists("/p/1/owner")
        assert lease is not None and lease.czxid == reg.mzxid, "one transaction, one zxid"
        before = server.stats.transactions
        with pytest.raises(NodeExistsError):
            await zk.multi(
                [
                    Create("/p/2/owner", b"a", ephemeral=True),
                    Create("/p/1/owner", b"a", ephemeral=True),
                    SetData("/reg", b"r2"),
                ]
            )
        assert server.stats.transactions == before
        assert await zk.exists("/p/2/owner") is None
        assert (await zk.get("/reg"))[0] == b"r1"
        with pytest.raises(NoNodeError):
            await zk.multi([Create("/p/3/owner", b"a"), SetData("/reg", b"r3")])
        await zk.multi([Delete("/p/1/owner", version=0), SetData("/reg", b"r4")])
        assert await zk.exists("/p/1/owner") is None


async def test_a_directory_watch_reports_children_and_their_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with ensemble() as (server, nursery):
        writer = await start(server, nursery, "w")
        reader = await start(server, nursery, "r")
        await writer.ensure_path("/dir")
        for i in range(100):  # more than one pipelined batch
            await writer.create(f"/dir/c{i:03d}", f"v{i}".encode())
        seen: dict[str, bytes | None] = {}
        changes = AsyncValue(0)

        def on_child(child: str, data: bytes | None, _stat: NodeStat | None) -> None:
            seen[child] = data
            changes.value += 1

        await nursery.start(reader.watch_children_data, "/dir", on_child)
        assert len(seen) == 100 and seen["c007"] == b"v7"
        assert server.stats.watches_held == 101  # the listing and each child
        reads_before = server.stats.reads

        async def until(predicate: Callable[[], bool]) -> None:
            with trio.fail_after(1):
                await changes.wait_value(lambda _n: predicate())

        await writer.set("/dir/c007", b"new")
        await until(lambda: seen["c007"] == b"new")
        assert server.stats.reads - reads_before == 1, "only the changed child is read"
        await writer.delete("/dir/c008")
        await until(lambda: "c008" in seen and seen["c008"] is None)
        await writer.create("/dir/zz", b"late")
        await until(lambda: seen.get("zz") == b"late")
        # After a lost connection every watch is gone: all is read again, changes included.
        async with trio.open_nursery() as pause:
            pause.start_soon(server.pause, 1.0)
            await reader.session.wait_value(lambda s: s.state is SessionState.SUSPENDED)
        await writer.session.wait_value(lambda s: s.state is SessionState.CONNECTED)
        await writer.set("/dir/c009", b"after")
        await until(lambda: seen["c009"] == b"after")
        # Re-armed, none twice (the last read of the pass re-arms the last watch).
        with trio.fail_after(1):
            while server.stats.watches_held != 101:  # noqa: ASYNC110 - virtual time
                await trio.sleep(0.01)
