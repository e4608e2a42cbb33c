"""The HTTP/1.1 server of the HTTP API, over in-memory streams (MockClock drives its timeouts)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from linechatd import httpserver
from linechatd.config import HostPort
from linechatd.httpserver import serve_connection, serve_http_app
from linechatd.listeners import UnfinishedRequests

MAX_HEAD = 4096


class App:
    """Echoes what it was asked, reads bodies up to ``limit`` bytes, raises on /boom."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(dict(scope))
        if scope["path"] == "/boom":
            raise RuntimeError("a handler bug")
        if scope["path"] == "/split":
            start = {"type": "http.response.start", "status": 200}
            await send({**start, "headers": [(b"x-evil", b"a\r\nset-cookie: b")]})
            await send({"type": "http.response.body", "body": b"{}"})
        body = b""
        status = 200
        if scope["method"] == "POST":
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message["body"]
                if len(body) > self.limit:
                    status = 413
                    break
                if not message["more_body"]:
                    break
        doc = {
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "body": len(body) if status == 200 else None,
        }
        payload = json.dumps(doc).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class Response:
    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.headers = headers


class Client:
    """Raw bytes in; responses parsed by status line, headers and Content-Length."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise AssertionError("the server closed before a whole response")
        self.buffer += data

    async def response(self, *, head_request: bool = False) -> tuple[Response, bytes]:
        """The next response; informational ones (100) are skipped."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                await self._fill()
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            status_line, *lines = head.split(b"\r\n")
            version, status, *_reason = status_line.split(b" ")
            assert version == b"HTTP/1.1"
            headers = [
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(b":") for line in lines)
            ]
            if int(status) >= 200:
                break
        length = 0 if head_request else int(dict(headers).get(b"content-length", b"0"))
        while len(self.buffer) < length:
            await self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status), headers), body

    async def at_eof(self) -> bool:
        """Whether the server closed its side with nothing more to say."""
        return self.buffer == b"" and await self.stream.receive_some(65536) == b""


@pytest.fixture(params=["socket", "memory"])
def transport(request: pytest.FixtureRequest) -> str:
    """Plain sockets take the server's direct system calls; other streams its stream path."""
    return str(request.param)


def stream_pair(transport: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    if transport == "memory":
        return trio.testing.memory_stream_pair()
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


@asynccontextmanager
async def connected(
    app: App,
    scheme: str = "http",
    transport: str = "memory",
    unfinished: UnfinishedRequests | None = None,
) -> AsyncIterator[Client]:
    client_stream, server_stream = stream_pair(transport)
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            try:
                await serve_connection(
                    app,
                    server_stream,
                    scheme=scheme,
                    client=("192.0.2.1", 5000),
                    server=("127.0.0.1", 8080),
                    max_head_bytes=MAX_HEAD,
                    unfinished=unfinished,
                )
            finally:
                await trio.aclose_forcefully(server_stream)

        nursery.start_soon(serve)
        try:
            yield Client(client_stream)
        finally:
            await trio.aclose_forcefully(client_stream)
            nursery.cancel_scope.cancel()


async def serve_plain(stream: trio.abc.Stream) -> None:
    """Serve ``App()`` on ``stream`` until the connection ends (no addresses, no caps)."""
    await serve_connection(
        App(), stream, scheme="http", client=None, server=None, max_head_bytes=MAX_HEAD
    )


def get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: gw", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def test_keep_alive_serves_requests_in_turn_and_builds_the_scope(transport: str) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, scheme="https", transport=transport) as client:
            for n in range(3):
                await client.send(get(f"/api/connection-url?uid=u{n}"))
                response, body = await client.response()
                assert response.status_code == 200
                assert json.loads(body) == {
                    "path": "/api/connection-url",
                    "query": f"uid=u{n}",
                    "body": 0,
                }
    scope = app.scopes[0]
    assert scope["type"] == "http" and scope["method"] == "GET"
    assert scope["scheme"] == "https" and scope["http_version"] == "1.1"
    assert scope["raw_path"] == b"/api/connection-url"
    assert scope["client"] == ("192.0.2.1", 5000) and scope["server"] == ("127.0.0.1", 8080)
    assert (b"host", b"gw") in scope["headers"]
    assert len(app.scopes) == 3


async def test_pipelined_requests_are_answered_in_order(transport: str) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(get("/a") + get("/b") + get("/c"))
            paths = [json.loads((await client.response())[1])["path"] for _ in range(3)]
    assert paths == ["/a", "/b", "/c"]


async def test_the_path_is_percent_decoded_and_the_raw_path_kept(transport: str) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(get("/a%20b?x=%41"))
            _response, body = await client.response()
    assert json.loads(body)["path"] == "/a b"
    assert app.scopes[0]["raw_path"] == b"/a%20b"
    assert app.scopes[0]["query_string"] == b"x=%41"


async def test_connection_close_and_http_1_0_end_the_connection_after_the_answer(
    transport: str,
) -> None:
    with trio.fail_after(5):
        async with connected(App(), transport=transport) as client:
            await client.send(get("/x", "Connection: close"))
            response, _ = await client.response()
            assert response.status_code == 200
            assert await client.at_eof()
        async with connected(App(), transport=transport) as client:
            await client.send(b"GET /x HTTP/1.0\r\n\r\n")
            response, _ = await client.response()
            assert response.status_code == 200
            assert await client.at_eof()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /" + b"a" * MAX_HEAD + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
    ],
)
async def test_a_malformed_request_gets_a_json_error_and_the_connection_closes(
    transport: str, request_bytes: bytes, status: int
) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(request_bytes)
            response, body = await client.response()
            assert response.status_code == status
            assert json.loads(body)["error"] == "bad_request"
            assert await client.at_eof()
    assert app.scopes == []


async def test_a_body_is_read_by_length_and_by_chunks(transport: str) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            response, body = await client.response()
            assert (response.status_code, json.loads(body)["body"]) == (200, 5)
            await client.send(
                b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
            )
            response, body = await client.response()
            assert (response.status_code, json.loads(body)["body"]) == (200, 7)
            # Still alive for the next request.
            await client.send(get("/after"))
            assert (await client.response())[0].status_code == 200


async def test_expect_100_continue_is_answered_when_the_body_is_read(transport: str) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(
                b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
            )
            while b"\r\n\r\n" not in client.buffer:
                await client._fill()
            assert client.buffer.startswith(b"HTTP/1.1 100 ")
            await client.send(b"abc")
            response, body = await client.response()
    assert (response.status_code, json.loads(body)["body"]) == (200, 3)


async def test_a_refused_body_is_drained_and_the_answer_arrives_before_the_close(
    transport: str,
) -> None:
    app = App(limit=10)
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            payload = b"x" * 100_000
            await client.send(
                b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(payload)
                + payload
            )
            response, _body = await client.response()
            assert response.status_code == 413
            assert (b"connection", b"close") in response.headers
            assert await client.at_eof()


@pytest.mark.parametrize("path", ["/boom", "/split"])
async def test_a_handler_bug_answers_500_without_a_trace_or_a_split_answer(
    transport: str, path: str
) -> None:
    """/boom raises; /split returns a header with a line break in it."""
    with trio.fail_after(5):
        async with connected(App(), transport=transport) as client:
            await client.send(get(path))
            response, body = await client.response()
            assert response.status_code == 500
            assert json.loads(body) == {"error": "internal"}
            assert b"a handler bug" not in body
            assert all(name != b"set-cookie" for name, _ in response.headers)
            assert await client.at_eof()


async def test_head_gets_the_headers_without_the_body(transport: str) -> None:
    with trio.fail_after(5):
        async with connected(App(), transport=transport) as client:
            await client.send(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
            response, body = await client.response(head_request=True)
            assert response.status_code == 200
            assert body == b""
            await client.send(get("/next"))
            assert json.loads((await client.response())[1])["path"] == "/next"


async def test_a_slow_head_is_refused_408_and_an_idle_connection_closed(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    async with connected(App()) as client:
        await client.send(b"GET /x HTTP/1.1\r\nHost:")  # and nothing more
        start = trio.current_time()
        response, body = await client.response()
        assert response.status_code == 408
        assert json.loads(body) == {"error": "timeout"}
        assert trio.current_time() - start == pytest.approx(httpserver.HEAD_TIMEOUT_S)
    async with connected(App()) as client:
        await client.send(get("/x"))
        assert (await client.response())[0].status_code == 200
        start = trio.current_time()
        assert await client.at_eof()  # kept alive, then closed for idleness, without a word
        assert trio.current_time() - start == pytest.approx(httpserver.KEEP_ALIVE_TIMEOUT_S)
    async with connected(App()) as client:
        start = trio.current_time()
        assert await client.at_eof()  # a new connection owes its first request at once
        assert trio.current_time() - start == pytest.approx(httpserver.HEAD_TIMEOUT_S)


async def test_connections_owing_a_head_are_capped_per_address_and_idle_ones_are_not() -> None:
    caps = UnfinishedRequests(10, 1)
    with trio.fail_after(5):
        async with connected(App(), unfinished=caps) as slow:
            await slow.send(b"GET /slow HTTP/1.1\r\nHost:")  # holds the address's one slot
            await trio.testing.wait_all_tasks_blocked()
            assert caps.of("192.0.2.1") == 1
            async with connected(App(), unfinished=caps) as refused:
                await refused.send(get("/second"))
                assert await refused.at_eof()  # closed unanswered
            assert caps.refused == 1
            await slow.send(b" gw\r\n\r\n")
            assert json.loads((await slow.response())[1])["path"] == "/slow"
            # Kept alive and idle now: it holds no slot, and others get theirs.
            await trio.testing.wait_all_tasks_blocked()
            assert caps.total == 0
            async with connected(App(), unfinished=caps) as third:
                await third.send(get("/third"))
                assert json.loads((await third.response())[1])["path"] == "/third"
            # Its next request, once begun, takes the slot again.
            await slow.send(get("/again"))
            assert json.loads((await slow.response())[1])["path"] == "/again"
    assert caps.total == 0 and caps.refused == 1


async def test_a_request_framed_two_ways_is_refused_and_the_connection_closed(
    transport: str,
) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(
                b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
            )
            response, body = await client.response()
            assert response.status_code == 400
            assert json.loads(body)["error"] == "bad_request"
            assert await client.at_eof()
    assert app.scopes == []  # neither the POST nor what rode behind it


async def test_an_empty_body_the_application_ignores_keeps_the_connection(transport: str) -> None:
    app = App()
    with trio.fail_after(5):
        async with connected(app, transport=transport) as client:
            await client.send(get("/first", "Content-Length: 0") + get("/second"))
            first, _ = await client.response()
            assert (b"connection", b"close") not in first.headers
            second, body = await client.response()
            assert json.loads(body)["path"] == "/second"


async def test_a_client_that_stops_reading_is_given_up_after_the_send_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    client_stream, server_stream = trio.testing.lockstep_stream_pair()  # writes wait for reads
    start = trio.current_time()
    with trio.fail_after(httpserver.SEND_TIMEOUT_S + 30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_stream.send_all, get("/never-read"))
            await serve_plain(server_stream)  # returns: the connection is given up
    assert trio.current_time() - start == pytest.approx(httpserver.SEND_TIMEOUT_S)


async def test_a_client_gone_mid_answer_ends_the_connection_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def ask_and_leave() -> None:
                await client_stream.send_all(get("/x"))
                await trio.testing.wait_all_tasks_blocked()  # the server is writing
                await client_stream.aclose()

            nursery.start_soon(ask_and_leave)
            await serve_plain(server_stream)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_serves_on_a_real_listener_and_names_its_address() -> None:
    app = App()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_http_app(
                    app, HostPort("127.0.0.1", 0), max_head_bytes=MAX_HEAD, task_status=task_status
                )
            )
            assert len(binds) == 1 and binds[0].startswith("http://127.0.0.1:")
            port = int(binds[0].rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            client = Client(stream)
            await client.send(get("/real?q=1"))
            response, body = await client.response()
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert json.loads(body)["query"] == "q=1"
    assert app.scopes[0]["client"][0] == "127.0.0.1"
