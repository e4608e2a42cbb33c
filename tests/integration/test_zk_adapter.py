"""The ZooKeeper adapter's lease clock against the session's real ZooKeeper, in process.

A trio loop that stalls (a burst of teardown work, a slow GC) must not make
the instance give up its leases while ZooKeeper keeps hearing from it; a
ZooKeeper that stops answering still must.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import trio
from support.cluster import ClusterNames
from trio_util import AsyncValue

from linechatd.zk import (
    Create,
    Delete,
    NodeExistsError,
    NodeStat,
    NoNodeError,
    SessionState,
    SetData,
    ZooKeeper,
    ZooKeeperError,
)

# Long enough that a loaded machine's own stalls (a second or so of no CPU for
# the heartbeat thread) stay far from T/2 = 3 s; the stall under test is 1.6 x T/2.
SESSION_TIMEOUT_S = 6.0
WAIT_S = 60


class _Changes(logging.Handler):
    """Every published session state change (the adapter logs each one)."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "zookeeper_session":
            self.states.append(getattr(record, "state", "?"))


async def test_a_stalled_trio_loop_keeps_the_session_trusted(zookeeper_hosts: str) -> None:
    zk = ZooKeeper(zookeeper_hosts, session_timeout_s=SESSION_TIMEOUT_S, connect_timeout_s=10)
    changes = _Changes()
    adapter_log = logging.getLogger("linechatd.zk")
    adapter_log.addHandler(changes)
    adapter_log.setLevel(logging.INFO)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            await nursery.start(zk.run)
        before = zk.session.value
        assert before.state is SessionState.CONNECTED
        changes.states.clear()
        # Let a few heartbeats pass, then block the loop for well over T/2
        # (but under T): ZooKeeper still hears from the session meanwhile.
        await trio.sleep(SESSION_TIMEOUT_S / 2)
        stalled = zk.suspect_after_s * 1.6
        assert stalled < zk.session_timeout_s
        time.sleep(stalled)  # noqa: ASYNC251 - the stall under test
        await trio.sleep(SESSION_TIMEOUT_S / 2)
        after = zk.session.value
        during = list(changes.states)
        nursery.cancel_scope.cancel()
    adapter_log.removeHandler(changes)
    assert after == before, (before, after)
    assert during == [], during


async def test_the_session_timeout_the_server_granted_is_the_one_used(
    zookeeper_hosts: str,
) -> None:
    # The test server's maxSessionTimeout is 60 s: asking for more gets 60 s,
    # and the lease clock must count with what the server will hold us to.
    zk = ZooKeeper(zookeeper_hosts, session_timeout_s=100.0, connect_timeout_s=10)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            # Known before the session is reported connected: kazoo logs the
            # grant before it reports the state, and both reach trio in order.
            await nursery.start(zk.run)
        granted = zk.session_timeout_s
        nursery.cancel_scope.cancel()
    assert granted == 60.0
    assert zk.suspect_after_s == 30.0


async def test_a_transaction_is_all_or_nothing_and_has_one_zxid(
    zookeeper_hosts: str, cluster_names: ClusterNames
) -> None:
    root = f"/linechat/{cluster_names.cluster}"
    zk = ZooKeeper(zookeeper_hosts, session_timeout_s=SESSION_TIMEOUT_S, connect_timeout_s=10)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            await nursery.start(zk.run)
            await zk.ensure_path(f"{root}/p/1")
            await zk.ensure_path(f"{root}/p/2")
            await zk.create(f"{root}/reg", b"r0", ephemeral=True)
            results = await zk.multi(
                [Create(f"{root}/p/1/owner", b"a", ephemeral=True), SetData(f"{root}/reg", b"r1")]
            )
            assert results[0] is None
            reg = results[1]
            assert reg is not None
            lease = await zk.exists(f"{root}/p/1/owner")
            assert lease is not None
            # The lease's epoch and since are what the registration's stat says.
            assert lease.czxid == reg.mzxid
            assert lease.ctime_ms == reg.mtime_ms
            assert lease.ephemeral_owner == zk.session_id
            with pytest.raises(NodeExistsError):
                await zk.multi(
                    [
                        Create(f"{root}/p/2/owner", b"a", ephemeral=True),
                        Create(f"{root}/p/1/owner", b"a", ephemeral=True),
                        SetData(f"{root}/reg", b"r2"),
                    ]
                )
            assert await zk.exists(f"{root}/p/2/owner") is None
            assert (await zk.get(f"{root}/reg"))[0] == b"r1"
            with pytest.raises(NoNodeError):
                await zk.multi([Create(f"{root}/p/3/owner", b"a"), SetData(f"{root}/reg", b"x")])
            with pytest.raises(ZooKeeperError):  # a stale version
                await zk.multi([Delete(f"{root}/p/1/owner", version=5)])
            await zk.multi([Delete(f"{root}/p/1/owner", version=0), SetData(f"{root}/reg", b"r3")])
            assert await zk.exists(f"{root}/p/1/owner") is None
        nursery.cancel_scope.cancel()


async def test_a_directory_watch_follows_children_and_their_data(
    zookeeper_hosts: str, cluster_names: ClusterNames
) -> None:
    root = f"/linechat/{cluster_names.cluster}/dir"
    writer = ZooKeeper(zookeeper_hosts, session_timeout_s=SESSION_TIMEOUT_S, connect_timeout_s=10)
    reader = ZooKeeper(zookeeper_hosts, session_timeout_s=SESSION_TIMEOUT_S, connect_timeout_s=10)
    seen: dict[str, bytes | None] = {}
    calls = AsyncValue(0)

    def on_child(child: str, data: bytes | None, _stat: NodeStat | None) -> None:
        seen[child] = data
        calls.value += 1

    async def until(predicate: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            await calls.wait_value(lambda _n: predicate())

    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            await nursery.start(writer.run)
            await nursery.start(reader.run)
            await writer.ensure_path(root)
            for i in range(150):  # more than one batch of pipelined reads
                await writer.create(f"{root}/c{i:03d}", f"v{i}".encode())
            await nursery.start(reader.watch_children_data, root, on_child)
        assert len(seen) == 150 and seen["c007"] == b"v7" and calls.value == 150
        await writer.set(f"{root}/c007", b"new")
        await until(lambda: seen["c007"] == b"new")
        await writer.delete(f"{root}/c008")
        await until(lambda: "c008" in seen and seen["c008"] is None)
        await writer.create(f"{root}/zz", b"late", ephemeral=True)
        await until(lambda: seen.get("zz") == b"late")
        # Only what changed was delivered.
        assert calls.value == 153
        nursery.cancel_scope.cancel()
