"""The fault proxy's modes, against a tiny echo server on loopback."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing
from support.faultproxy import Fault, FaultProxy, Mode
from support.procnet import socket_owner, tcp_socket


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
            # Both directions are delayed (a lower bound: a busy machine only adds).
            assert trio.current_time() - start >= 0.5

            for i in range(20):
                await stream.send_all(b"%02d" % i)
            received = b""
            while len(received) < 40:
                received += await stream.receive_some()
            assert received == b"".join(b"%02d" % i for i in range(20))


async def test_restore_ends_the_delay(proxy: FaultProxy) -> None:
    proxy.delay(60)
    with trio.fail_after(10):
        slow = await _connect(proxy)
        async with slow:
            await slow.send_all(b"due in a minute")
            proxy.restore()
            # A round trip well inside the minute each way the delay would take.
            fast = await _connect(proxy)
            async with fast:
                assert await _round_trip(fast, b"fast") == b"fast"


async def test_delay_rejects_nonsense(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.delay(-1)
    with pytest.raises(ValueError):
        proxy.delay(float("nan"))


async def test_to_parses_an_address() -> None:
    proxy = FaultProxy.to("127.0.0.1:2181")
    assert (proxy.target_host, proxy.target_port) == ("127.0.0.1", 2181)


# --- faults per process ------------------------------------------------------------------

OTHER_PID = 2**22 + 1  # above the default pid_max: no process has it


def test_a_fault_of_its_own_overrides_the_fault_for_everyone() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    proxy.blackhole()
    proxy.cut(pid=1)
    proxy.delay(0.5, pid=2)
    assert proxy.fault_for(None) == Fault(Mode.BLACKHOLE)
    assert proxy.fault_for(3) == Fault(Mode.BLACKHOLE)
    assert proxy.fault_for(1) == Fault(Mode.CUT)
    assert proxy.fault_for(2) == Fault(Mode.PASS, 0.5)
    assert proxy.mode is Mode.BLACKHOLE

    proxy.pass_through()  # for everyone: overrides stay
    assert proxy.fault_for(3) == Fault()
    assert proxy.fault_for(1) == Fault(Mode.CUT)

    proxy.restore(pid=1)  # back to the fault for everyone
    assert proxy.fault_for(1) == Fault()
    assert dict(proxy.statistics().overrides) == {2: Fault(Mode.PASS, 0.5)}

    proxy.cut()
    proxy.restore()  # everyone, overrides included
    assert proxy.fault_for(2) == Fault() and proxy.fault_for(None) == Fault()
    assert dict(proxy.statistics().overrides) == {}


def test_faults_reject_nonsense_delays() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    with pytest.raises(ValueError):
        proxy.delay(float("inf"), pid=1)
    assert proxy.fault_for(1) == Fault()


async def test_the_owner_of_a_connected_socket_is_found() -> None:
    with trio.fail_after(10):
        listener = trio.socket.socket()
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen()
            here = listener.getsockname()
            client = trio.socket.socket()
            with client:
                await client.connect(here)
                local = client.getsockname()
                found = await trio.to_thread.run_sync(tcp_socket, local, here)
                assert found is not None and found.state == 1  # ESTABLISHED
                inode = found.inode
                owner = await trio.to_thread.run_sync(socket_owner, inode)
                assert owner == os.getpid()
                # Candidates are tried first; a wrong one does not mislead.
                owner = await trio.to_thread.run_sync(socket_owner, inode, [OTHER_PID])
                assert owner == os.getpid()
                # Bytes sent and not read yet wait in the receiver's queue.
                accepted, _ = await listener.accept()
                with accepted:
                    await client.send(b"12345")

                    def unread() -> int:
                        found = tcp_socket(accepted.getsockname(), local)
                        return found.rx_queue if found is not None else -1

                    with trio.fail_after(5):
                        while unread() < 5:  # noqa: ASYNC110 - the kernel's queue: no event
                            await trio.sleep(0.01)
                    assert unread() == 5
        assert tcp_socket(("127.0.0.1", 1), ("127.0.0.1", 2)) is None


async def test_a_fault_for_one_process_spares_the_others(proxy: FaultProxy) -> None:
    mine = os.getpid()
    with trio.fail_after(10):
        stream = await _connect(proxy)
        assert await _round_trip(stream, b"ping") == b"ping"
        assert proxy.connections_of(mine) == 1
        assert dict(proxy.statistics().open_by_pid) == {mine: 1}

        # Another process's fault leaves this one's connection alone.
        proxy.cut(pid=OTHER_PID)
        proxy.blackhole(pid=OTHER_PID)
        assert await _round_trip(stream, b"still") == b"still"

        proxy.cut(pid=mine)
        assert proxy.connections_of(mine) == 0
        assert await _is_closed(stream)
        await stream.aclose()
        refused = await _connect(proxy)
        assert await _is_closed(refused)
        await refused.aclose()
        assert proxy.statistics().refused_connections == 1

        # Everyone's fault does not undo an override ...
        proxy.pass_through()
        refused = await _connect(proxy)
        assert await _is_closed(refused)
        await refused.aclose()
        # ... dropping it does.
        proxy.restore(pid=mine)
        again = await _connect(proxy)
        async with again:
            assert await _round_trip(again, b"back") == b"back"


async def test_a_process_of_its_own_is_told_apart(proxy: FaultProxy) -> None:
    """A child process connects through the proxy too; cutting it spares this process."""
    child_code = (
        "import socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "s.sendall(b'child'); assert s.recv(5) == b'child'\n"
        "print('connected', flush=True)\n"
        "while True:\n"
        "    data = s.recv(100)\n"
        "    if not data: break\n"
    )
    with trio.fail_after(20):
        mine = await _connect(proxy)
        async with trio.open_nursery() as nursery:
            child = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-c", child_code, str(proxy.port)],
                    stdout=subprocess.PIPE,
                    check=False,
                )
            )
            assert child.stdout is not None
            assert (await child.stdout.receive_some()).startswith(b"connected")
            assert proxy.connections_of(child.pid) == 1
            assert proxy.connections_of(os.getpid()) == 1

            proxy.cut(pid=child.pid)
            # The child sees its connection reset and exits; ours carries on.
            assert await child.wait() in (0, 1)
            assert await _round_trip(mine, b"unharmed") == b"unharmed"
        await mine.aclose()


async def test_wait_answer_returns_when_the_target_answers(proxy: FaultProxy) -> None:
    with trio.fail_after(10):
        stream = await _connect(proxy)
        async with stream, trio.open_nursery() as nursery:
            answered: list[float] = []

            async def wait() -> None:
                answered.append(await proxy.wait_answer(pid=os.getpid()))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert answered == []
            before = time.time()
            assert await _round_trip(stream, b"ping") == b"ping"
        assert len(answered) == 1 and answered[0] >= before
