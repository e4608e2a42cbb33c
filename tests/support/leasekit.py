"""Helpers for the partition-ownership tests: gateway log events, ZooKeeper, sockets.

The gateways under test log JSON (``[log] format = "json"``), one event per
line with a wall-clock ``ts``; these tests read each instance's own reports
from its log file rather than asking it over HTTP, so that a killed or
partitioned instance still tells what it did.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from confluent_kafka import Producer
from kazoo.client import KazooClient

from linechatd.hashing import partition_for
from linechatd.ownership import ZkPaths
from linechatd.protocol import ChatRecord, encode_record
from support.cluster import Cluster, GatewayProcess, http_get

Event = dict[str, Any]

# What every ownership test adds to the gateways' configuration.
FAST_SECTIONS: dict[str, dict[str, Any]] = {
    "log": {"format": "json"},
    "partitions": {"rebalance_pause_s": 0.05, "settle_s": 0.2},
    # A whole cluster stopping at once waits the grace period for a taker that
    # never comes; keep that short.
    "shutdown": {"grace_period_s": 1.0, "drain_stagger_s": 0.0},
}


# -- gateway log events -----------------------------------------------------------


def events(
    gateway: GatewayProcess, name: str | None = None, *, after: float = -math.inf, **match: Any
) -> list[Event]:
    """The JSON events in ``gateway``'s log (all incarnations) with ``ts > after``, filtered."""
    found = []
    for line in gateway.log_text().splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by SIGKILL
        if not isinstance(event, dict):
            continue
        if name is not None and event.get("event") != name:
            continue
        if not event.get("ts", math.inf) > after:
            continue
        if all(event.get(k) == v for k, v in match.items()):
            found.append(event)
    return found


async def wait_event(
    gateway: GatewayProcess,
    name: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - the failure message carries the log
    after: float = -math.inf,
    where: Callable[[Event], bool] | None = None,
    **match: Any,
) -> Event:
    """The first ``name`` event with ``ts > after`` matching ``match``/``where``; polls the log."""
    with trio.move_on_after(timeout):
        while True:
            for event in events(gateway, name, after=after, **match):
                if where is None or where(event):
                    return event
            await trio.sleep(0.02)
    raise AssertionError(
        f"{gateway.instance_id}: no {name} {match} within {timeout:g}s; log tail:\n"
        + gateway.log_tail(40)
    )


def running_partitions(gateway: GatewayProcess) -> dict[int, int]:
    """partition -> epoch of the subtrees the gateway's log says are running now."""
    running: dict[int, int] = {}
    for event in events(gateway):
        if event.get("event") == "partition_started":
            running[event["partition"]] = event["epoch"]
        elif event.get("event") == "partition_stopped":
            running.pop(event["partition"], None)
        elif event.get("event") == "gateway_stopped":
            running.clear()
    return running


# -- HTTP ----------------------------------------------------------------------


async def get_json(url: str) -> Any:
    status, _headers, doc = await http_get(url, timeout=5.0)
    assert status == 200, (url, status, doc)
    return doc


async def api_partitions(gateway: GatewayProcess) -> list[dict[str, Any]]:
    doc = await get_json(gateway.http_url + "/api/partitions")
    partitions: list[dict[str, Any]] = doc["partitions"]
    return partitions


async def held(gateway: GatewayProcess) -> dict[int, int]:
    """partition -> epoch of what the instance runs, from its /api/status."""
    doc = await get_json(gateway.http_url + "/api/status")
    return {p["partition"]: p["epoch"] for p in doc["partitions"]}


async def wait_held(
    cluster: Cluster,
    predicate: Callable[[dict[str, dict[int, int]]], bool],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109
) -> dict[str, dict[int, int]]:
    """Poll every running instance's /api/status until ``predicate(view)``; returns the view."""
    view: dict[str, dict[int, int]] = {}
    with trio.move_on_after(timeout):
        while True:
            view = {}
            for gateway in cluster.running():
                try:
                    view[gateway.instance_id] = await held(gateway)
                except (OSError, AssertionError):
                    view[gateway.instance_id] = {}
            if predicate(view):
                return view
            await trio.sleep(0.05)
    raise AssertionError(f"not reached within {timeout:g}s; last view {view}")


async def wait_shares(
    cluster: Cluster,
    shares: Mapping[str, int],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109
) -> dict[str, dict[int, int]]:
    """Wait until the instances hold exactly ``shares`` partitions, covering them all once.

    With shares at their targets nothing moves any more, so the view is stable.
    """
    return await wait_held(
        cluster,
        lambda v: (
            covers(sum(shares.values()))(v)
            and {name: len(h) for name, h in v.items()} == dict(shares)
        ),
        timeout=timeout,
    )


async def wait_balanced(
    cluster: Cluster,
    partitions: int,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> dict[str, dict[int, int]]:
    """Every partition owned once, each running instance within one of an even share.

    Equal weights and no caps assumed: the balancer then moves nothing more,
    so a test's sessions are not closed with 1012 under its feet.
    """
    running = len(cluster.running())
    low, high = partitions // running, math.ceil(partitions / running)

    def balanced(view: dict[str, dict[int, int]]) -> bool:
        return covers(partitions)(view) and all(low <= len(h) <= high for h in view.values())

    return await wait_held(cluster, balanced, timeout=timeout)


def covers(partitions: int) -> Callable[[dict[str, dict[int, int]]], bool]:
    """Every partition held by exactly one instance."""

    def check(view: dict[str, dict[int, int]]) -> bool:
        owned = [k for held_ in view.values() for k in held_]
        return sorted(owned) == list(range(partitions))

    return check


# -- ZooKeeper -------------------------------------------------------------------


class Kazoo:
    """A plain kazoo client for the test's own look at ZooKeeper (calls run in threads)."""

    def __init__(self, hosts: str, cluster: str) -> None:
        self.client = KazooClient(hosts=hosts, timeout=10.0)
        self.paths = ZkPaths(cluster)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def owner(self, k: int) -> tuple[dict[str, Any], Any] | None:
        """(lease data, stat) of partition k's lock node, None if free."""
        stat = await self.call(self.client.exists, self.paths.owner(k))
        if stat is None:
            return None
        try:
            data, stat = await self.call(self.client.get, self.paths.owner(k))
        except Exception:  # deleted in between
            return None
        return json.loads(data), stat

    async def owners(self, partitions: int) -> dict[int, tuple[dict[str, Any], Any] | None]:
        return {k: await self.owner(k) for k in range(partitions)}

    async def watch_deleted(self, partitions: list[int]) -> dict[int, float]:
        """A dict that gets, per partition, the wall-clock time its lock node is deleted.

        For a node of an expired session that is the moment of the expiry as
        this client hears it: the earliest anyone else could create the node.
        """
        deleted: dict[int, float] = {}

        def watcher(k: int, event: Any) -> None:  # a kazoo thread; a dict write is enough
            if event.type == "DELETED":
                deleted.setdefault(k, time.time())

        for k in partitions:
            await self.call(
                self.client.exists, self.paths.owner(k), watch=functools.partial(watcher, k)
            )
        return deleted


@asynccontextmanager
async def kazoo(hosts: str, cluster: str) -> AsyncIterator[Kazoo]:
    zk = Kazoo(hosts, cluster)
    await trio.to_thread.run_sync(zk.client.start, 30)
    try:
        yield zk
    finally:
        await trio.to_thread.run_sync(zk.client.stop)
        await trio.to_thread.run_sync(zk.client.close)


# -- users, sockets and messages -------------------------------------------------


def uid_in_partition(k: int, partitions: int, prefix: str = "user") -> str:
    """A uid that hashes to partition ``k``."""
    for i in range(100_000):
        uid = f"{prefix}-{k}-{i}"
        if partition_for(uid, partitions) == k:
            return uid
    raise AssertionError(f"no uid found for partition {k}")


@asynccontextmanager
async def chat_socket(
    ws_url: str, uid: str
) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, dict[str, Any]]]:
    """A raw WebSocket of ``uid`` to ``ws_url`` (no reconnects), with its welcome frame.

    Over a TCP stream of our own: after a close started by the server,
    trio-websocket's client waits for the server's TCP close and then never
    closes its socket (a ResourceWarning, an error under this suite's filter).
    """
    parts = urlsplit(ws_url)
    host = parts.hostname or "127.0.0.1"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, parts.port or 80)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    parts.netloc,
                    f"{parts.path}?uid={uid}&device=d-{uid}",
                    message_queue_size=256,
                )
                welcome = json.loads(await ws.get_message())
            assert welcome["type"] == "welcome", welcome
            try:
                yield ws, welcome
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def handshake_refusal(ws_url: str, uid: str) -> tuple[int, dict[str, Any]]:
    """Attempt a WebSocket handshake by hand: (HTTP status, JSON body) of a refusal.

    By hand because trio-websocket leaves the socket of a refused handshake
    open (a ResourceWarning, an error under this suite's warning filter).
    """
    parts = urlsplit(ws_url)
    request = (
        f"GET {parts.path}?uid={uid} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        async with stream:
            await stream.send_all(request.encode())
            response = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                response += chunk
                head, sep, body = response.partition(b"\r\n\r\n")
                if sep:
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(body) >= length:
                        break
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


async def next_message(ws: trio_websocket.WebSocketConnection, timeout: float = 10.0) -> Event:  # noqa: ASYNC109
    """The next ``message`` frame (pongs and acks are skipped)."""
    with trio.fail_after(timeout):
        while True:
            frame: Event = json.loads(await ws.get_message())
            if frame.get("type") == "message":
                return frame


async def close_code(ws: trio_websocket.WebSocketConnection, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109
    """Read until the server closes the socket; the close code it sent."""
    with trio.fail_after(timeout):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code if exc.reason is not None else None


class Sender:
    """Writes chat records straight into partition topics, as any instance's producer would."""

    def __init__(self, bootstrap: str, topic_prefix: str, partitions: int) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0})
        self._prefix = topic_prefix
        self._partitions = partitions
        self._count = 0

    def _send(self, to: str, body: Any) -> int:
        self._count += 1
        record = ChatRecord(
            from_uid="tester",
            from_device="tester-device",
            to=to,
            id=f"m{self._count}",
            body=body,
            ts=int(time.time() * 1000),
        )
        offsets: list[int] = []

        def on_delivery(err: object, msg: Any) -> None:
            assert err is None, err
            offsets.append(msg.offset())

        self._producer.produce(
            f"{self._prefix}{partition_for(to, self._partitions)}",
            key=to.encode(),
            value=encode_record(record),
            partition=0,
            on_delivery=on_delivery,
        )
        assert self._producer.flush(10) == 0
        return offsets[0]

    async def send(self, to: str, body: Any) -> int:
        """Produce one message for ``to``; its offset once the broker has it."""
        return await trio.to_thread.run_sync(self._send, to, body)


def names_of(view: Mapping[str, Mapping[int, int]]) -> dict[int, str]:
    """partition -> instance from a wait_held view."""
    return {k: name for name, held_ in view.items() for k in held_}
