"""A ZooKeeper ensemble for the tests that need one (leader elections, the whole ensemble down).

The session fixture ``zookeeper_ensemble`` (tests/conftest.py) gives a
:class:`ZooKeeperEnsemble`: a connect string, and the local servers behind it
when the suite started them itself. With LINECHAT_TEST_ZOOKEEPER_ENSEMBLE set
the suite uses that ensemble instead and cannot stop its servers, so tests that
kill or restart servers take the ``zookeeper_ensemble_control`` fixture, which
skips then and otherwise brings every server back up after the test.

:class:`EnsembleControl` wraps the synchronous LocalZooKeeperEnsemble for trio
tests: processes are spawned on the trio (main) thread, as ``spawn`` requires,
and the waits for readiness run in worker threads so that the test's own
servers (fault proxies, clients) keep running meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import trio

from linechatd.localservices import LocalZooKeeperEnsemble

__all__ = ["ENSEMBLE_ENV", "EnsembleControl", "ZooKeeperEnsemble"]

ENSEMBLE_ENV = "LINECHAT_TEST_ZOOKEEPER_ENSEMBLE"

# A JVM starting on a loaded 2-core machine, then a leader election.
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class ZooKeeperEnsemble:
    """The session's ensemble: ``hosts`` to connect to; ``local`` when this suite runs it."""

    hosts: str
    local: LocalZooKeeperEnsemble | None

    def control(self) -> EnsembleControl:
        """Control over the servers, or a skip when they are not ours to stop."""
        if self.local is None:
            pytest.skip(
                f"{ENSEMBLE_ENV} names an existing ensemble; this test stops or kills "
                "its servers, which only an ensemble the suite started itself allows"
            )
        return EnsembleControl(self.local)


class EnsembleControl:
    """Stop, kill and start the servers of a local ensemble from a trio test.

    Servers are numbered by their index in ``local.servers`` (0 .. size-1).
    """

    def __init__(self, local: LocalZooKeeperEnsemble) -> None:
        self.local = local

    def __repr__(self) -> str:
        return f"<EnsembleControl {self.local!r}>"

    @property
    def hosts(self) -> str:
        return self.local.hosts

    def __len__(self) -> int:
        return len(self.local)

    def address(self, index: int) -> str:
        """``host:port`` of one server (a client pinned to it, or a proxy in front of it)."""
        return self.local[index].address

    def running(self) -> list[int]:
        return self.local.running()

    async def modes(self) -> dict[int, str | None]:
        """Each running server's mode as ``srvr`` reports it (None: not serving)."""
        return await trio.to_thread.run_sync(self.local.modes)

    async def leader(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109 - a blocking poll's bound
        """The index of the current leader, once exactly one server leads."""
        return await trio.to_thread.run_sync(self.local.leader, timeout)

    def kill(self, index: int) -> None:
        """SIGKILL one server (a crash: no goodbye to peers or clients)."""
        self.local.kill_server(index)

    async def stop(self, index: int) -> None:
        """SIGTERM one server and wait for it to exit."""
        await trio.to_thread.run_sync(self.local.stop_server, index)

    async def start(self, index: int, timeout: float = START_TIMEOUT_S) -> None:  # noqa: ASYNC109
        """Start one stopped server; return once it serves in a quorum."""
        self.local.launch_server(index)
        await self.wait_serving([index], timeout)

    async def restart(self, index: int, timeout: float = START_TIMEOUT_S) -> None:  # noqa: ASYNC109
        await self.stop(index)
        await self.start(index, timeout)

    async def stop_all(self) -> None:
        """The whole ensemble down (data dirs kept for ``start_all``)."""
        await trio.to_thread.run_sync(self.local.stop)

    def kill_all(self) -> None:
        self.local.kill()

    async def start_all(self, timeout: float = START_TIMEOUT_S) -> None:  # noqa: ASYNC109
        """Start every server that is not running; return once all of them serve."""
        for index in range(len(self.local)):
            if not self.local[index].is_running():
                self.local.launch_server(index)
        await self.wait_serving(None, timeout)

    async def wait_serving(
        self,
        indexes: Sequence[int] | None = None,
        timeout: float = START_TIMEOUT_S,  # noqa: ASYNC109
    ) -> None:
        """Wait until the given servers (default: every running one) serve in a quorum."""
        await trio.to_thread.run_sync(self.local.wait_serving, timeout, indexes)
