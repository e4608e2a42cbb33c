"""The ZooKeeper adapter's lease clock against the session's real ZooKeeper, in process.

A trio loop that stalls (a burst of teardown work, a slow GC) must not make
the instance give up its leases while ZooKeeper keeps hearing from it; a
ZooKeeper that stops answering still must.
"""

from __future__ import annotations

import logging
import time

import trio

from linechatd.zk import SessionState, ZooKeeper

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
