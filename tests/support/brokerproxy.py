"""A broker of a test's own whose every connection goes through a FaultProxy.

A Kafka client bootstraps on one address, then connects to the address each
broker advertises. A proxy in front of the bootstrap port alone would carry the
metadata request and nothing else; so the broker is started with the proxy's
address as its advertised listener, and clients get the proxy's address as
``bootstrap.servers`` too: every byte between a client and the broker then
passes the proxy, and its faults (cut, blackhole, delay) reach produce and
fetch requests alike, for everyone or for one process (``pid=``, e.g. one
gateway's ``GatewayProcess.pid``: librdkafka runs inside the gateway process).

The test process's own Kafka clients go through the proxy as well; apply a
fault ``pid=``-wise to keep them out of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from linechatd.localservices import LOOPBACK, LocalBroker, free_port
from support.faultproxy import FaultProxy

__all__ = ["FaultyBroker", "start_faulty_broker"]


@dataclass(frozen=True)
class FaultyBroker:
    broker: LocalBroker
    proxy: FaultProxy

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` for every client (the proxy, not the broker's own port)."""
        return self.proxy.address

    def __repr__(self) -> str:
        return f"<FaultyBroker {self.broker!r} behind {self.proxy!r}>"


async def _serve_in(
    scope: trio.CancelScope,
    run: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run(task_status=task_status)


@asynccontextmanager
async def start_faulty_broker(
    nursery: trio.Nursery,
    workdir: Path,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - bounds a blocking readiness poll in a thread
) -> AsyncIterator[FaultyBroker]:
    """Start a proxy (served in ``nursery``) and a fresh broker advertising it; stop both on exit."""
    proxy = FaultProxy(LOOPBACK, free_port())
    proxy_scope = trio.CancelScope()
    await nursery.start(partial(_serve_in, proxy_scope, proxy.run))
    broker = LocalBroker(workdir, proxy.target_port, advertised_address=proxy.address)
    try:
        # Spawned on this (the trio) thread, see localservices.spawn; the readiness
        # poll blocks, and its metadata request may pass the proxy served here.
        broker.launch()
        await trio.to_thread.run_sync(broker.wait_ready, timeout)
        yield FaultyBroker(broker, proxy)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(broker.stop)
        proxy_scope.cancel()
