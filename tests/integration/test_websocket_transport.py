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


async def test_try_send_writes_at_once_and_keeps_the_rest_for_flush() -> None:
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
        assert conn.try_send("first")
        assert not conn.unflushed
        with trio.fail_after(WAIT_S):
            assert await client.read_messages(1) == ["first"]

        # Nobody reads: sooner or later the socket takes a frame in part.
        sent = 0
        while not conn.unflushed:
            assert conn.try_send(f"{sent:08d}{FRAME}")
            sent += 1
            assert sent < 10_000, "the socket never filled"
        # Until the rest is flushed, nothing may overtake it.
        assert not conn.try_send("overtaker")

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
        assert not conn.try_send("after the close")
        nursery.cancel_scope.cancel()
