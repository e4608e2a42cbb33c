"""Edge limits without a cluster: unfinished-handshake caps, TCP keepalive,
close-code labels and the kinds of undecodable records."""

from __future__ import annotations

import json
import socket

import pytest
import trio

from linechatd import websocket
from linechatd.admission import address_key
from linechatd.listeners import UnfinishedRequests
from linechatd.metrics import CLOSE_LABELS, Metrics, close_label
from linechatd.protocol import RECORD_ERROR_KINDS, CloseCode, RecordError, decode_record

# --- unfinished handshakes ---------------------------------------------------------------


def test_unfinished_handshakes_are_capped_per_address_and_in_total() -> None:
    refused: list[int] = []
    caps = UnfinishedRequests(4, 2, address_key=address_key, on_refused=lambda: refused.append(1))
    a1, a2 = caps.enter("10.0.0.1"), caps.enter("10.0.0.1")
    assert a1 is not None and a2 is not None
    assert caps.enter("10.0.0.1") is None  # the address is full
    # One IPv6 /64 is one address.
    v6 = caps.enter("2001:db8::1")
    assert v6 is not None
    assert caps.enter("2001:db8::2") is not None
    assert caps.enter("2001:db8::3") is None
    assert caps.total == 4
    assert caps.enter("10.0.0.9") is None  # the instance is full
    assert (caps.refused, len(refused)) == (3, 3)
    a1()
    a1()  # a second release counts nothing
    assert caps.total == 3 and caps.of("10.0.0.1") == 1
    assert caps.enter("10.0.0.9") is not None


async def idle_client(port: int, count: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]


async def test_the_listener_closes_sockets_past_the_caps_at_once() -> None:
    handled: list[str] = []

    async def handler(hs: websocket.Handshake) -> None:
        handled.append(hs.path)
        await hs.reject(404, {"error": "not_found"})

    caps = UnfinishedRequests(100, 3)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: websocket.serve(
                handler,
                "127.0.0.1",
                0,
                ssl_context=None,
                max_message_bytes=4096,
                handshake_timeout_s=60.0,
                unfinished=caps,
                task_status=task_status,
            )
        )
        streams = await idle_client(port, 8)
        closed = 0
        with trio.fail_after(10):  # far below the 60 s handshake timeout
            for stream in streams:
                with trio.move_on_after(0.5):
                    if await stream.receive_some(1) == b"":
                        closed += 1
        assert closed == 5 and caps.total == 3 and caps.refused == 5
        for stream in streams:
            await stream.aclose()
        # Once the held ones are gone, a complete request is served again.
        with trio.fail_after(10):
            while caps.total:  # noqa: ASYNC110 - the listener notices the closes
                await trio.sleep(0.01)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                assert (await stream.receive_some(64)).startswith(b"HTTP/1.1 404")
        assert handled == ["/x"]
        nursery.cancel_scope.cancel()


# --- keepalive ------------------------------------------------------------------------


async def test_keepalive_options_are_set_on_a_socket() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    with listener, client:
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
        with server:
            websocket.apply_tcp_keepalive(server, websocket.TcpKeepalive(45, 15, 3, 90.0))
            assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 45
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 90_000


async def test_keepalive_on_a_closed_socket_is_no_error() -> None:
    sock = trio.socket.socket()
    sock.close()
    websocket.apply_tcp_keepalive(sock, websocket.TcpKeepalive(1, 1, 1, 1.0))


# --- close labels -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "by_peer", "label"),
    [
        (CloseCode.POLICY, False, "1008"),
        (CloseCode.TOO_BIG, False, "1009"),
        (CloseCode.MOVED, False, "1012"),
        (CloseCode.TOKEN_EXPIRED, False, "4401"),
        (1002, False, "1002"),  # the transport failing a peer's bad framing
        (1008, True, "peer"),  # a client cannot fire the abuse alerts
        (1009, True, "peer"),
        (4999, True, "peer"),
        (1000, True, "peer"),
        (1006, True, "1006"),
        (None, True, "1006"),
        (3123, False, "other"),
    ],
)
def test_close_labels_are_a_fixed_set(code: int | None, by_peer: bool, label: str) -> None:
    assert close_label(code, by_peer=by_peer) == label
    assert label in CLOSE_LABELS


def test_every_peer_code_lands_in_the_fixed_set() -> None:
    metrics = Metrics()
    for code in range(1000, 5000):
        if code != CloseCode.ABNORMAL:  # never on the wire: wsproto refuses it as 1002
            metrics.closes.labels(close_label(code, by_peer=True)).inc()
    text = metrics.render().decode()
    series = [line for line in text.splitlines() if line.startswith("linechatd_closes_total{")]
    assert len(series) == 1 and 'code="peer"' in series[0]


# --- record error kinds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "no_value"),
        (b"x" * (2 << 20), "too_large"),
        (b"\xffsecret", "not_utf8"),
        (b'{"secret":1,"secret":2}', "bad_json"),
        (b'{"v":1,"body":31337e99999}', "bad_json"),
        (b"[1]", "not_object"),
        (b'{"v":3}', "bad_version"),
        (b'{"v":2}', "bad_field"),
        (json.dumps({"v": 1, "from": "secret"}).encode(), "bad_field"),
    ],
)
def test_record_errors_name_their_kind(value: bytes | None, kind: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(value)
    assert info.value.kind == kind and kind in RECORD_ERROR_KINDS
