"""The transport's direct write path, in process: a frame is written in the
call that offers it when nothing is queued, and what the socket does not take
at once is kept for ``flush()`` with every frame intact and in order."""

from __future__ import annotations

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from linechatd import websocket

WAIT_S = 20
FRAME = "x" * 65536


class RawClient:
    """A WebSocket client that reads only when told to (so the server's socket fills)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: list[str] = []
        self._parts: list[str] = []

    async def handshake(self, port: int) -> None:
        await self.sock.send(self.ws.send(Request(host=f"127.0.0.1:{port}", target="/ws?uid=a")))
        while True:
            self.ws.receive_data(await self.sock.recv(65536))
            if any(isinstance(e, AcceptConnection) for e in self.ws.events()):
                return

    async def read_messages(self, count: int) -> list[str]:
        while len(self.messages) < count:
            data = await self.sock.recv(1 << 20)
            assert data, "the server closed the connection"
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        self.messages.append("".join(self._parts))
                        self._parts.clear()
        return self.messages


async def test_write_now_writes_at_once_and_keeps_the_rest_for_flush() -> None:
    accepted: trio.MemorySendChannel[websocket.Connection]
    accepted, connections = trio.open_memory_channel[websocket.Connection](1)

    async def handler(hs: websocket.Handshake) -> None:
        conn = await hs.accept()
        await accepted.send(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: websocket.serve(
                handler,
                "127.0.0.1",
                0,
                ssl_context=None,
                max_message_bytes=1 << 20,
                handshake_timeout_s=5.0,
                task_status=task_status,
            )
        )
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        client = RawClient(sock)
        with trio.fail_after(WAIT_S):
            await client.handshake(port)
            conn = await connections.receive()

        # An idle connection takes a small frame whole, in the call.
        assert conn.can_write_now
        conn.write_now("first")
        assert not conn.unflushed
        with trio.fail_after(WAIT_S):
            assert await client.read_messages(1) == ["first"]

        # Nobody reads: sooner or later the socket takes a frame in part.
        sent = 0
        while not conn.unflushed:
            assert conn.can_write_now
            conn.write_now(f"{sent:08d}{FRAME}")
            sent += 1
            assert sent < 10_000, "the socket never filled"
        # Until the rest is flushed, nothing may overtake it.
        assert not conn.can_write_now

        async def flush_then_send() -> None:
            await conn.flush()
            await conn.send("last")

        nursery.start_soon(flush_then_send)
        with trio.fail_after(WAIT_S):
            messages = await client.read_messages(2 + sent)
        assert messages[0] == "first"
        assert messages[1:-1] == [f"{i:08d}{FRAME}" for i in range(sent)]
        assert messages[-1] == "last"

        # A stream that is gone is never written to.
        await sock.send(client.ws.send(CloseConnection(code=1000)))
        sock.close()
        with trio.fail_after(WAIT_S):
            while True:
                try:
                    await conn.receive()
                except websocket.ConnectionClosed:
                    break
        assert not conn.can_write_now
        nursery.cancel_scope.cancel()


async def _echo_server(nursery: trio.Nursery, received: trio.MemorySendChannel[str | bytes]) -> int:
    async def handler(hs: websocket.Handshake) -> None:
        conn = await hs.accept()
        try:
            while True:
                await received.send(await conn.receive())
        except websocket.ConnectionClosed:
            pass

    port: int = await nursery.start(
        lambda task_status: websocket.serve(
            handler,
            "127.0.0.1",
            0,
            ssl_context=None,
            max_message_bytes=1 << 16,
            handshake_timeout_s=5.0,
            task_status=task_status,
        )
    )
    return port


async def test_frames_in_the_same_segment_as_the_upgrade_request_are_kept() -> None:
    """A client may send its first frames before it sees the 101: none may be lost."""
    received, messages = trio.open_memory_channel[str | bytes](10)
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, received)
        client = WSConnection(ConnectionType.CLIENT)
        data = client.send(Request(host=f"127.0.0.1:{port}", target="/ws?uid=a"))
        # The client side's state machine only lets frames be encoded once
        # accepted; a second client connection that is open encodes them.
        encoder = WSConnection(ConnectionType.CLIENT)
        encoder_request = encoder.send(Request(host="x", target="/"))
        encoder.receive_data(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: "
            + websocket._accept_token(_key_of(encoder_request))
            + b"\r\n\r\n"
        )
        list(encoder.events())
        data += encoder.send(TextMessage(data="first")) + encoder.send(TextMessage(data="second"))
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        await sock.send(data)  # one write: the request and both frames
        with trio.fail_after(WAIT_S):
            assert await messages.receive() == "first"
            assert await messages.receive() == "second"
        sock.close()
        nursery.cancel_scope.cancel()


def _key_of(request: bytes) -> bytes:
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip()
    raise AssertionError("no Sec-WebSocket-Key in the request")


async def test_upgrade_requests_that_are_not_websocket_get_a_clear_answer() -> None:
    received, _messages = trio.open_memory_channel[str | bytes](10)
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery, received)

        async def answer(request: bytes) -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                data = b""
                with trio.fail_after(WAIT_S):
                    # Until the server closes, or an accepted upgrade's head is complete.
                    while not (data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data):
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        data += chunk
            return data

        base = (
            b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
        plain = await answer(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 426 ")
        old = await answer(b"GET /ws HTTP/1.1\r\n" + base + b"Sec-WebSocket-Version: 8\r\n\r\n")
        assert old.startswith(b"HTTP/1.1 426 ") and b"sec-websocket-version: 13" in old.lower()
        post = await answer(b"POST /ws HTTP/1.1\r\n" + base + b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")
        garbage = await answer(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        # A Host that is not valid IDNA is nothing the gateway reads: it is accepted.
        idna = await answer(
            b"GET /ws HTTP/1.1\r\nHost: xn--\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert idna.startswith(b"HTTP/1.1 101 ")
        nursery.cancel_scope.cancel()
