"""The ZooKeeper ensemble fixtures: three servers, a leader election, the whole ensemble down."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from kazoo.client import KazooClient, KazooState
from support.ensemble import EnsembleControl, ZooKeeperEnsemble

WAIT_S = 120
# Long enough that a leader election (a few ticks) never expires the session.
SESSION_TIMEOUT_S = 20.0


@dataclass
class Client:
    """A kazoo client and the connection states it went through, in order."""

    kazoo: KazooClient
    states: list[KazooState] = field(default_factory=list)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    @property
    def session_id(self) -> int:
        return int(self.kazoo.client_id[0])

    async def wait_connected_after(self, state: KazooState) -> None:
        """Until the client went through ``state`` and is connected again."""
        while not (state in self.states and self.kazoo.state == KazooState.CONNECTED):  # noqa: ASYNC110 - kazoo's own thread
            await trio.sleep(0.05)


@asynccontextmanager
async def client(hosts: str, *, randomize_hosts: bool = True) -> AsyncIterator[Client]:
    kazoo = KazooClient(hosts=hosts, timeout=SESSION_TIMEOUT_S, randomize_hosts=randomize_hosts)
    found = Client(kazoo)
    kazoo.add_listener(found.states.append)  # called on kazoo's thread; an append is enough
    await trio.to_thread.run_sync(kazoo.start, 30)
    try:
        yield found
    finally:
        await trio.to_thread.run_sync(kazoo.stop)
        kazoo.close()


def _path(name: str) -> str:
    return f"/linechat-test/ensemble-{secrets.token_hex(4)}/{name}"


async def test_a_client_connects_through_the_three_host_string(
    zookeeper_ensemble: ZooKeeperEnsemble,
) -> None:
    assert len(zookeeper_ensemble.hosts.split(",")) == 3
    with trio.fail_after(WAIT_S):
        async with client(zookeeper_ensemble.hosts) as zk:
            path = _path("probe")
            await zk.call(zk.kazoo.create, path, b"hello", makepath=True)
            data, _stat = await zk.call(zk.kazoo.get, path)
            assert data == b"hello"


async def test_the_ensemble_has_one_leader_and_serves_on_every_server(
    zookeeper_ensemble_control: EnsembleControl,
) -> None:
    ensemble = zookeeper_ensemble_control
    with trio.fail_after(WAIT_S):
        modes = await ensemble.modes()
        assert sorted(modes) == [0, 1, 2]
        assert sorted(m or "none" for m in modes.values()) == ["follower", "follower", "leader"]
        assert modes[await ensemble.leader()] == "leader"
        path = _path("written-on-one")
        async with client(ensemble.address(0)) as first:
            await first.call(first.kazoo.create, path, b"x", makepath=True)
        for index in (1, 2):
            async with client(ensemble.address(index)) as other:
                await other.call(other.kazoo.sync, path)
                assert await other.call(other.kazoo.exists, path) is not None


async def test_killing_the_leader_elects_another_and_the_session_survives(
    zookeeper_ensemble_control: EnsembleControl,
) -> None:
    ensemble = zookeeper_ensemble_control
    with trio.fail_after(WAIT_S):
        old_leader = await ensemble.leader()
        # Connected to the leader first, so that its death is this client's loss too.
        order = [old_leader, *(i for i in range(len(ensemble)) if i != old_leader)]
        hosts = ",".join(ensemble.address(i) for i in order)
        async with client(hosts, randomize_hosts=False) as zk:
            path = _path("before-the-election")
            await zk.call(zk.kazoo.create, path, b"kept", makepath=True)
            ephemeral = await zk.call(zk.kazoo.create, path + "-mine", ephemeral=True)
            session = zk.session_id

            killed_at = trio.current_time()
            ensemble.kill(old_leader)
            new_leader = await ensemble.leader()
            elected_s = trio.current_time() - killed_at
            assert new_leader != old_leader
            await zk.wait_connected_after(KazooState.SUSPENDED)
            reconnected_s = trio.current_time() - killed_at

            assert zk.session_id == session, "the session outlived the election"
            assert await zk.call(zk.kazoo.exists, ephemeral) is not None
            data, _stat = await zk.call(zk.kazoo.get, path)
            assert data == b"kept"
            assert KazooState.LOST not in zk.states

            await ensemble.start(old_leader)
            assert (await ensemble.modes())[old_leader] == "follower"
            assert await ensemble.leader() == new_leader
        print(
            f"\nleader {old_leader} killed: server {new_leader} led after {elected_s:.2f} s, "
            f"the client was connected again after {reconnected_s:.2f} s"
        )


async def test_the_whole_ensemble_down_and_up_keeps_persistent_nodes(
    zookeeper_ensemble_control: EnsembleControl,
) -> None:
    ensemble = zookeeper_ensemble_control
    with trio.fail_after(WAIT_S):
        path = _path("persistent")
        async with client(ensemble.hosts) as zk:
            await zk.call(zk.kazoo.create, path, b"survives", makepath=True)

        await ensemble.stop_all()
        assert ensemble.running() == []
        assert await ensemble.modes() == {}
        await ensemble.start_all()
        assert ensemble.running() == [0, 1, 2]
        await ensemble.leader()

        async with client(ensemble.hosts) as zk:
            data, _stat = await zk.call(zk.kazoo.get, path)
            assert data == b"survives"


async def test_a_killed_follower_is_restored_after_the_test(
    zookeeper_ensemble_control: EnsembleControl,
) -> None:
    """Left down on purpose: the fixture brings it back (the next test sees three servers)."""
    ensemble = zookeeper_ensemble_control
    with trio.fail_after(WAIT_S):
        leader = await ensemble.leader()
        follower = next(i for i in range(len(ensemble)) if i != leader)
        ensemble.kill(follower)
        assert follower not in ensemble.running()
        # Two of three still form a quorum.
        async with client(ensemble.hosts) as zk:
            await zk.call(zk.kazoo.create, _path("with-two"), makepath=True)


@pytest.fixture
def ensemble_as_left(zookeeper_ensemble: ZooKeeperEnsemble) -> EnsembleControl:
    """The servers as the previous test's teardown left them (nothing restored at set-up)."""
    return zookeeper_ensemble.control()


async def test_after_a_restore_every_server_serves_again(
    ensemble_as_left: EnsembleControl,
) -> None:
    """Right after the test above: its fixture's teardown brought the server back."""
    ensemble = ensemble_as_left
    with trio.fail_after(WAIT_S):
        assert ensemble.running() == [0, 1, 2]
        modes = await ensemble.modes()
        assert sorted(m or "none" for m in modes.values()) == ["follower", "follower", "leader"]
