"""The fault proxy's modes, against a tiny echo server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
from support.faultproxy import FaultProxy, Mode


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> AsyncIterator[FaultProxy]:
    listeners = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    fault_proxy = FaultProxy("127.0.0.1", port)
    yield await nursery.start(fault_proxy.run)


async def _connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def _round_trip(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    received = b""
    while len(received) < len(data):
        chunk = await stream.receive_some()
        if not chunk:
            break
        received += chunk
    return received


async def _is_closed(stream: trio.SocketStream) -> bool:
    """True once the peer has closed or reset the connection."""
    try:
        await stream.send_all(b"x")
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:
        return True


async def test_pass_through_forwards_both_ways(proxy: FaultProxy) -> None:
    with trio.fail_after(5):
        stream = await _connect(proxy)
        async with stream:
            assert await _round_trip(stream, b"hello") == b"hello"
            payload = bytes(range(256)) * 1024
            assert await _round_trip(stream, payload) == payload
        assert proxy.statistics().accepted_connections == 1


async def test_half_close_is_forwarded(proxy: FaultProxy) -> None:
    with trio.fail_after(5):
        stream = await _connect(proxy)
        async with stream:
            await stream.send_all(b"last words")
            await stream.send_eof()
            received = b""
            async for chunk in stream:
                received += chunk
            assert received == b"last words"


async def test_cut_resets_open_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    with trio.fail_after(5):
        before = await _connect(proxy)
        assert await _round_trip(before, b"ping") == b"ping"
        proxy.cut()
        assert proxy.mode is Mode.CUT
        assert await _is_closed(before)
        await before.aclose()

        during = await _connect(proxy)
        assert await _is_closed(during)
        await during.aclose()

        proxy.restore()
        after = await _connect(proxy)
        async with after:
            assert await _round_trip(after, b"back") == b"back"


async def test_blackhole_drops_bytes_but_keeps_connections(proxy: FaultProxy) -> None:
    with trio.fail_after(5):
        idle = await _connect(proxy)
        lossy = await _connect(proxy)
        assert await _round_trip(lossy, b"ping") == b"ping"
        proxy.blackhole()
        await lossy.send_all(b"into the void")
        with trio.move_on_after(0.3) as waited:
            await lossy.receive_some()
        assert waited.cancelled_caught, "a blackholed connection must stay silent, not close"
        new = await _connect(proxy)
        await new.send_all(b"nobody hears")
        with trio.move_on_after(0.2) as waited:
            await new.receive_some()
        assert waited.cancelled_caught
        assert proxy.statistics().open_connections == 3

        proxy.restore()
        # Streams that lost bytes cannot continue; the one that sent nothing can.
        assert await _is_closed(lossy)
        assert await _is_closed(new)
        assert await _round_trip(idle, b"still here") == b"still here"
        for stream in (idle, lossy, new):
            await stream.aclose()


async def test_delay_adds_latency_and_keeps_order(proxy: FaultProxy) -> None:
    with trio.fail_after(10):
        stream = await _connect(proxy)
        async with stream:
            proxy.delay(0.25)
            start = trio.current_time()
            assert await _round_trip(stream, b"slow") == b"slow"
            elapsed = trio.current_time() - start
            # Both directions are delayed.
            assert 0.5 <= elapsed < 3

            for i in range(20):
                await stream.send_all(b"%02d" % i)
            received = b""
            while len(received) < 40:
                received += await stream.receive_some()
            assert received == b"".join(b"%02d" % i for i in range(20))

            proxy.restore()
            start = trio.current_time()
            assert await _round_trip(stream, b"fast") == b"fast"
            assert trio.current_time() - start < 0.25


async def test_delay_rejects_nonsense(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.delay(-1)
    with pytest.raises(ValueError):
        proxy.delay(float("nan"))


async def test_to_parses_an_address() -> None:
    proxy = FaultProxy.to("127.0.0.1:2181")
    assert (proxy.target_host, proxy.target_port) == ("127.0.0.1", 2181)
