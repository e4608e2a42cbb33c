"""linechatd.client against a scripted fake gateway on loopback.

The fake serves ``GET /api/connection-url`` (h11) and a WebSocket endpoint
whose behaviour each test scripts connection by connection, so reconnects,
resume parameters, duplicates and refusals are exercised without a cluster.
"""

from __future__ import annotations

import gc
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio
import trio_websocket

from linechatd.client import (
    ChatClient,
    ClientError,
    State,
    connect,
    open_websocket,
)
from linechatd.protocol import CloseCode

Script = Callable[[trio_websocket.WebSocketRequest, dict[str, str]], Awaitable[None]]


class FakeGateway:
    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.queries: list[dict[str, str]] = []
        self.ws_url = ""
        self.http_url = ""
        self.url_status = 200
        self.peers: list[str] = []  # what GET /api/partitions lists
        self.http_requests: list[str] = []
        self.http_scope = trio.CancelScope()
        self.resets = 0  # connection-url requests answered with a TCP reset (a crashing instance)

    async def _http(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return  # the client went away before asking anything
            if isinstance(event, h11.Request):
                self.http_requests.append(event.target.decode())
                if self.resets and event.target.startswith(b"/api/connection-url"):
                    self.resets -= 1
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    stream.socket.close()
                    return
                if event.target.startswith(b"/api/partitions"):
                    status, doc = 200, {"partitions": [{"http_url": u} for u in self.peers]}
                elif self.url_status == 200:
                    status, doc = 200, {"url": self.ws_url, "partition": 0, "instance": "fake"}
                else:
                    status, doc = self.url_status, {"error": "refused"}
                body = json.dumps(doc).encode()
                headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                await stream.aclose()
                return

    async def _ws(self, request: trio_websocket.WebSocketRequest) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(request.path).query).items()}
        self.queries.append(query)
        script = self.scripts.pop(0) if self.scripts else hang_up
        await script(request, query)


async def hang_up(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
    ws = await request.accept()
    await ws.aclose(CloseCode.MOVED, "no more scripts")


@asynccontextmanager
async def fake_gateway() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, fake._ws, "127.0.0.1", 0, None)
        fake.ws_url = f"ws://127.0.0.1:{server.port}/ws"
        listeners = await nursery.start(serve_http_until_cancelled, fake)
        fake.http_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


async def serve_http_until_cancelled(
    fake: FakeGateway, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
) -> None:
    """The fake's HTTP side, which a test can take down (fake.http_scope.cancel())."""
    with fake.http_scope:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            task_status.started(listeners)
            await trio.serve_listeners(fake._http, listeners)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)


def welcome(offset: int, resumed: bool | None = None) -> str:
    return json.dumps(
        {
            "type": "welcome",
            "uid": "u",
            "device": "d",
            "partition": 0,
            "instance": "fake",
            "offset": offset,
            "resumed": resumed,
        }
    )


def message(offset: int, msg_id: str, sender: str = "bob", body: Any = "hi") -> str:
    return json.dumps(
        {
            "type": "message",
            "from": sender,
            "from_device": "bd",
            "to": "alice",
            "id": msg_id,
            "body": body,
            "partition": 0,
            "offset": offset,
            "ts": 1,
        }
    )


def fast(**kwargs: Any) -> dict[str, Any]:
    return {"initial_backoff_s": 0.01, "max_backoff_s": 0.05, **kwargs}


async def test_reconnects_after_1012_and_resumes_from_its_cursor() -> None:
    async def first(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(10))
        await ws.send_message(message(12, "m12"))
        await ws.aclose(CloseCode.MOVED, "partition moved")

    second_done = trio.Event()

    async def second(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(20, resumed=True))
        await ws.send_message(message(15, "m15"))
        await second_done.wait()

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [first, second]
            async with connect(fake.http_url, "alice", device="dev1", **fast()) as client:
                assert (await client.receive()).id == "m12"
                assert (await client.receive()).id == "m15"
                assert client.connections == 2
                assert client.last_close == (CloseCode.MOVED, "partition moved")
                second_done.set()
    assert "resume" not in fake.queries[0]
    assert fake.queries[1] == {"uid": "alice", "device": "dev1", "resume": "12"}


async def test_drops_duplicates_by_offset_and_by_sender_id() -> None:
    async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        for frame in (
            message(1, "a"),
            message(1, "a"),  # the same offset again
            message(2, "b"),
            message(3, "b"),  # a resent send: same sender, device and id, new offset
            message(4, "b", sender="carol"),  # another sender's "b"
        ):
            await ws.send_message(frame)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [script]
            async with connect(fake.http_url, "alice", **fast()) as client:
                got = [await client.receive() for _ in range(3)]
                assert [(m.from_uid, m.id, m.offset) for m in got] == [
                    ("bob", "a", 1),
                    ("bob", "b", 2),
                    ("carol", "b", 4),
                ]
                assert client.duplicates_dropped == 1  # the resent "b"
                assert client.offsets_repeated == 1  # offset 1 again
                assert client.cursor == 4


async def test_a_reader_that_falls_behind_loses_nothing() -> None:
    async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        for n in range(1, 21):
            await ws.send_message(message(n, f"m{n}"))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [script]
            async with connect(fake.http_url, "alice", message_buffer=2, **fast()) as client:
                await trio.sleep(0.2)  # not reading: the client stops reading the socket
                got = [(await client.receive()).offset for _ in range(20)]
                assert got == list(range(1, 21))
                assert client.connections == 1 and client.duplicates_dropped == 0


async def test_unavailable_is_retried_with_the_same_id() -> None:
    seen: list[str] = []

    async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        for attempt in range(3):
            frame = json.loads(await ws.get_message())
            seen.append(frame["id"])
            if attempt < 2:
                error = {"type": "error", "id": frame["id"], "code": "unavailable", "message": "x"}
                await ws.send_message(json.dumps(error))
            else:
                ack = {"type": "ack", "id": frame["id"], "partition": 3, "offset": 77}
                await ws.send_message(json.dumps(ack))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [script]
            async with connect(fake.http_url, "alice", **fast()) as client:
                ack = await client.send("bob", "hello", id="same")
                assert (ack.id, ack.partition, ack.offset) == ("same", 3, 77)
    assert seen == ["same", "same", "same"]


async def test_a_send_without_ack_is_resent_once_after_a_reconnect() -> None:
    frames: list[tuple[int, str]] = []

    def script_for(connection: int, answer: bool) -> Script:
        async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
            ws = await request.accept()
            await ws.send_message(welcome(0))
            frame = json.loads(await ws.get_message())
            frames.append((connection, frame["id"]))
            if not answer:
                await ws.aclose(CloseCode.MOVED, "moved")
                return
            await ws.send_message(
                json.dumps({"type": "ack", "id": frame["id"], "partition": 0, "offset": 5})
            )
            await trio.sleep_forever()

        return script

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [script_for(1, answer=False), script_for(2, answer=True)]
            async with connect(fake.http_url, "alice", **fast()) as client:
                ack = await client.send("bob", "hello", id="m1")
                assert ack.offset == 5
    assert frames == [(1, "m1"), (2, "m1")]


async def test_refused_at_the_first_connect_raises_client_error() -> None:
    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.url_status = 400
            with pytest.raises(ClientError, match="400"):
                async with connect(fake.http_url, "bad uid", **fast()):
                    pass


async def test_a_1008_close_stops_the_client_and_fails_pending_sends() -> None:
    async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        await ws.get_message()  # the send; never acked
        await ws.aclose(CloseCode.POLICY, "too many bad frames")

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [script]
            async with connect(fake.http_url, "alice", **fast()) as client:
                with pytest.raises(ClientError, match="1008"):
                    await client.send("bob", "hello")
                await client.state.wait_value(State.CLOSED)
                assert isinstance(client.fatal, ClientError)
                with pytest.raises(trio.EndOfChannel):
                    await client.receive()
                with pytest.raises(ClientError):
                    await client.send("bob", "again")


async def test_run_reports_started_only_once_across_reconnects() -> None:
    async def brief(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        await ws.aclose(CloseCode.BEHIND, "behind")

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [brief, brief, brief]
            client = ChatClient(fake.http_url, "alice", **fast())
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                while client.connections < 3:  # noqa: ASYNC110 - a plain counter
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert client.state.value is State.CLOSED


async def test_open_websocket_closes_the_socket_of_a_rejected_handshake() -> None:
    async def reject(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(421, body=b'{"error": "wrong_instance", "url": null}')

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, reject, "127.0.0.1", 0, None
            )
            for _ in range(3):
                with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                    async with open_websocket(f"ws://127.0.0.1:{server.port}/ws?uid=a"):
                        pass
                assert rejected.value.status_code == 421
            # A leaked socket would surface here as a ResourceWarning (an error in this suite).
            gc.collect()
            nursery.cancel_scope.cancel()


async def test_open_websocket_lets_the_callers_error_through_unwrapped() -> None:
    async def echo(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("hello")
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, None)
            with pytest.raises(KeyError):
                async with open_websocket(f"ws://127.0.0.1:{server.port}/ws") as ws:
                    assert await ws.get_message() == "hello"
                    raise KeyError("mine")
            nursery.cancel_scope.cancel()


async def test_an_instance_that_stopped_answering_is_skipped() -> None:
    async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.scripts = [script]
            dead = "http://127.0.0.1:9"  # the discard port: nothing listens
            async with connect([dead, fake.http_url], "alice", **fast()) as client:
                assert client.connections == 1
                assert client.http_url == fake.http_url


async def test_instances_learnt_from_one_take_over_when_it_goes_away() -> None:
    async def short(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        await ws.get_message()  # until told to move
        await ws.aclose(CloseCode.MOVED, "partition moved")

    async def long(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_gateway() as first, fake_gateway() as second:
            first.peers = [first.http_url, second.http_url + "/"]
            first.scripts = [short]
            second.scripts = [long]
            second.ws_url = first.ws_url  # the owner is still the first's WebSocket
            first.scripts.append(long)
            async with connect(first.http_url, "alice", **fast()) as client:
                assert client.http_urls == [first.http_url, second.http_url]
                first.http_scope.cancel()  # its HTTP side goes away ...
                await client._ws.send_message("move")  # type: ignore[union-attr]
                await client.state.wait_value(State.RECONNECTING)
                await client.state.wait_value(State.CONNECTED)
                assert client.connections == 2  # ... and the second one answered
                assert client.http_url == second.http_url
                assert any(t.startswith("/api/connection-url") for t in second.http_requests)


async def test_discovery_can_be_turned_off() -> None:
    async def script(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_gateway() as fake:
            fake.peers = ["http://10.0.0.1:8080"]
            fake.scripts = [script]
            async with connect(fake.http_url, "alice", discover=False, **fast()) as client:
                assert client.http_urls == [fake.http_url]
            assert not any(t.startswith("/api/partitions") for t in fake.http_requests)


async def test_a_reset_connection_url_request_is_retried_not_fatal() -> None:
    """An instance that crashes mid-request resets the connection: the client tries again."""
    async with fake_gateway() as fake:
        fake.resets = 2

        async def greet(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
            ws = await request.accept()
            await ws.send_message(welcome(0))
            await trio.sleep_forever()

        fake.scripts.append(greet)
        with trio.fail_after(10):
            async with connect(fake.http_url, "alice", **fast()) as client:
                assert client.state.value is State.CONNECTED
        assert fake.resets == 0


async def test_the_client_pings_so_the_gateway_does_not_close_it_as_idle() -> None:
    pings = trio.Event()

    async def count_pings(request: trio_websocket.WebSocketRequest, query: dict[str, str]) -> None:
        ws = await request.accept()
        await ws.send_message(welcome(0))
        seen = 0
        while seen < 2:
            if json.loads(await ws.get_message()) == {"type": "ping"}:
                seen += 1
        pings.set()
        await trio.sleep_forever()

    async with fake_gateway() as fake:
        fake.scripts.append(count_pings)
        async with connect(fake.http_url, "alice", **fast(ping_interval_s=0.05)):
            with trio.fail_after(10):
                await pings.wait()
