"""What one WebSocket message costs in each transport: an echo benchmark.

    python -m benchmarks.transport [--impls linechatd,wsproto,websockets,picows]

Each server echoes every text frame back on the same connection, shaped like
a linechatd session (a reader task hands frames to a writer task through a
per-connection outbox). Measured from outside like the main harness: server
CPU-µs per echoed message (one frame in, one frame out) at fixed open-loop
rates, and the highest rate echoed without loss with p99 under 200 ms.

* ``linechatd``: linechatd.websocket (wsproto driven on trio streams), as
  the gateway uses it, with a trio memory channel as the outbox;
* ``wsproto``: a prototype of a leaner trio transport: wsproto driven
  directly on a trio SocketStream, no per-connection reader task inside the
  library, a plain list as outbox and one ``send_all`` for everything pending
  (write coalescing);
* ``wsframe``: the same server as ``wsproto`` with linechatd.wsframe as the
  frame codec (the upgrade request read with h11): the difference between
  the two is what the codec costs in a real server;
* ``websockets-trio``: the websockets library's own trio server
  (``websockets.trio.server.serve``), same reader/outbox/writer shape;
* ``websockets``: the websockets library's asyncio server (standard loop);
* ``picows``: picows on uvloop: the floor for a Python process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

IMPLS = ("linechatd", "wsproto", "wsframe", "websockets-trio", "websockets", "picows")


# --- servers (run in their own process: python -m benchmarks.transport serve ...) ----


def serve_linechatd(port: int) -> None:
    import trio

    from linechatd import websocket

    async def handler(hs: websocket.Handshake) -> None:
        conn = await hs.accept()
        send, receive = trio.open_memory_channel[str](1024)

        async def writer() -> None:
            async for frame in receive:
                await conn.send(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                while True:
                    data = await conn.receive()
                    send.send_nowait(data if isinstance(data, str) else data.decode())
            except (websocket.ConnectionClosed, trio.WouldBlock):
                pass
            nursery.cancel_scope.cancel()

    async def main() -> None:
        await websocket.serve(
            handler,
            "127.0.0.1",
            port,
            ssl_context=None,
            max_message_bytes=65536,
            handshake_timeout_s=10.0,
        )

    trio.run(main)


def serve_wsproto(port: int) -> None:
    import trio
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Request

    async def handler(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        pending: list[bytes] = []
        wake = trio.Event()
        closed = False

        flushed = trio.Event()

        async def writer() -> None:
            nonlocal wake
            while not closed or pending:
                if not pending:
                    await wake.wait()
                    wake = trio.Event()
                    continue
                # Everything queued meanwhile goes out in one system call.
                data = b"".join(pending)
                pending.clear()
                await stream.send_all(data)
            flushed.set()

        def queue(data: bytes) -> None:
            pending.append(data)
            wake.set()

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                while not closed:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Request):
                            queue(ws.send(AcceptConnection()))
                        elif isinstance(event, Message):
                            queue(ws.send(Message(data=event.data)))
                        elif isinstance(event, Ping):
                            queue(ws.send(event.response()))
                        elif isinstance(event, CloseConnection):
                            queue(ws.send(event.response()))
                            closed = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            closed = True
            wake.set()
            with trio.move_on_after(1):
                await flushed.wait()
            nursery.cancel_scope.cancel()

    trio.run(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))


async def _h11_upgrade(stream: Any) -> bytes | None:
    """Answer a WebSocket upgrade request with h11's public API; the bytes read past it."""
    import base64
    import hashlib

    import h11

    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return None
            conn.receive_data(data)
            continue
        if not isinstance(event, h11.Request):
            return None
        key = dict(event.headers).get(b"sec-websocket-key", b"")
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        response = h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", accept),
            ],
        )
        await stream.send_all(conn.send(response))
        return bytes(conn.trailing_data[0])


def serve_wsframe(port: int) -> None:
    import trio

    from linechatd import wsframe

    async def handler(stream: trio.SocketStream) -> None:
        decoder = wsframe.FrameDecoder(65536)
        pending: list[bytes] = []
        wake = trio.Event()
        closed = False
        flushed = trio.Event()

        async def writer() -> None:
            nonlocal wake
            while not closed or pending:
                if not pending:
                    await wake.wait()
                    wake = trio.Event()
                    continue
                # Everything queued meanwhile goes out in one system call.
                data = b"".join(pending)
                pending.clear()
                await stream.send_all(data)
            flushed.set()

        def queue(data: bytes) -> None:
            pending.append(data)
            wake.set()

        async with stream:
            try:
                data = await _h11_upgrade(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if data is None:
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                try:
                    while not closed:
                        for event in decoder.feed(data):
                            if type(event) is str:
                                queue(wsframe.encode_text(event))
                            elif isinstance(event, wsframe.Ping):
                                queue(wsframe.encode_pong(event.payload))
                            elif isinstance(event, wsframe.Close):
                                queue(wsframe.encode_close(event.code))
                                closed = True
                            elif isinstance(event, wsframe.Violation):
                                queue(wsframe.encode_close(event.code, event.reason))
                                closed = True
                        if closed:
                            break
                        data = await stream.receive_some(65536)
                        if not data:
                            break
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                closed = True
                wake.set()
                with trio.move_on_after(1):
                    await flushed.wait()
                nursery.cancel_scope.cancel()

    trio.run(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))


def serve_websockets_trio(port: int) -> None:
    import trio
    from websockets.exceptions import ConnectionClosed
    from websockets.trio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        send, receive = trio.open_memory_channel[str | bytes](1024)

        async def writer() -> None:
            async for data in receive:
                await ws.send(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                async for data in ws:
                    send.send_nowait(data)
            except (ConnectionClosed, trio.WouldBlock):
                pass
            nursery.cancel_scope.cancel()

    async def main() -> None:
        await serve(
            handler, port, host="127.0.0.1", ping_interval=None, compression=None, max_size=65536
        )

    trio.run(main)


def serve_websockets(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: ServerConnection) -> None:
        outbox: asyncio.Queue[str | bytes] = asyncio.Queue(1024)

        async def writer() -> None:
            while True:
                await ws.send(await outbox.get())

        task = asyncio.create_task(writer())
        try:
            async for data in ws:
                outbox.put_nowait(data)
        except ConnectionClosed:
            pass
        finally:
            task.cancel()

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port, ping_interval=None, compression=None):
            await asyncio.Future()

    asyncio.run(main())


def serve_picows(port: int) -> None:
    import uvloop
    from picows import WSListener, WSMsgType, ws_create_server

    class Echo(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                transport.send(WSMsgType.TEXT, frame.get_payload_as_bytes())
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    async def main() -> None:
        server = await ws_create_server(lambda _request: Echo(), "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


SERVERS = {
    "linechatd": serve_linechatd,
    "wsproto": serve_wsproto,
    "wsframe": serve_wsframe,
    "websockets-trio": serve_websockets_trio,
    "websockets": serve_websockets,
    "picows": serve_picows,
}


# --- the driver ---------------------------------------------------------------------------


def measure(
    impls: list[str],
    *,
    connections: int,
    step_s: float,
    workers: int,
    max_rate: float,
    idle: int,
    say: Any,
) -> dict[str, Any]:
    from linechatd.localservices import free_port

    from . import procstat
    from .loadgen import LoadGen
    from .phases import percentiles
    from .stack import Server, _accepts, raise_nofile

    raise_nofile()
    results: dict[str, Any] = {}
    loadgen = LoadGen(workers)
    try:
        for impl in impls:
            port = free_port()
            server = Server(
                name=impl,
                argv=[sys.executable, "-m", "benchmarks.transport", "serve", impl, str(port)],
                log_path=Path(tempfile.gettempdir()) / f"transport-{impl}-{port}.log",
                ws_url=f"ws://127.0.0.1:{port}/ws",
                ready=_accepts,
                cwd=Path.cwd(),
            )
            server.start()
            try:
                server.wait_ready(30)
                results[impl] = _run_impl(
                    server, loadgen, connections, step_s, max_rate, say, procstat, percentiles
                )
                if idle:
                    results[impl]["idle"] = _idle_rss(server, loadgen, idle, say, procstat)
            finally:
                loadgen.broadcast({"op": "close", "uids": None}, timeout=60)
                server.stop()
    finally:
        loadgen.close()
    return results


def _run_impl(
    server: Any,
    loadgen: Any,
    connections: int,
    step_s: float,
    max_rate: float,
    say: Any,
    procstat: Any,
    percentiles: Any,
) -> dict[str, Any]:
    from array import array

    workers = len(loadgen)
    uids = [f"e{i}" for i in range(connections)]
    chunks = [uids[w::workers] for w in range(workers)]
    loadgen.call(
        [
            {"op": "open", "dialect": "echo", "items": [(u, server.ws_url, None) for u in chunk]}
            for chunk in chunks
        ],
        timeout=120,
    )
    steps = []
    rate = 1000.0
    best = None
    while rate <= max_rate:
        start_at = time.monotonic() + 0.3
        before = procstat.sample([server.pid])
        load_before = procstat.sample(loadgen.pids)
        replies = loadgen.call(
            [
                {
                    "op": "load",
                    "pairs": [(u, "x") for u in chunk],
                    "rate": rate / workers,
                    "duration_s": step_s,
                    "start_at": start_at,
                    "drain_s": 2.0,
                }
                for chunk in chunks
            ],
            timeout=step_s + 60,
        )
        after = procstat.sample([server.pid])
        load_after = procstat.sample(loadgen.pids)
        sent = sum(r["sent"] for r in replies)
        received = sum(r["received"] for r in replies)
        lat = array("q")
        for r in replies:
            lat.frombytes(r["latency_us"])
        stats = percentiles(lat)
        cpu = after.cpu_s - before.cpu_s
        ok = received == sent and stats["p99_ms"] is not None and stats["p99_ms"] <= 200
        step = {
            "rate_per_s": rate,
            "sent": sent,
            "received": received,
            "server_cores": round(after.rate_since(before), 3),
            "loadgen_cores": round(load_after.rate_since(load_before), 3),
            "cpu_us_per_msg": round(cpu / received * 1e6, 1) if received else None,
            "latency": stats,
            "passed": ok,
        }
        steps.append(step)
        say(
            f"  {server.name}: {rate:>7.0f} echo/s: server {step['server_cores']:.2f} cores, "
            f"{step['cpu_us_per_msg']} us/msg, p50 {stats['p50_ms']} p99 {stats['p99_ms']} ms, "
            f"loss {sent - received}, loadgen {step['loadgen_cores']:.2f} "
            f"-> {'pass' if ok else 'FAIL'}"
        )
        if not ok:
            break
        best = step
        rate *= 2
    return {
        "steps": steps,
        "max_rate_per_s": best["rate_per_s"] if best else None,
        "cpu_us_per_msg": min(
            (s["cpu_us_per_msg"] for s in steps if s["passed"] and s["cpu_us_per_msg"]),
            default=None,
        ),
    }


def _idle_rss(server: Any, loadgen: Any, count: int, say: Any, procstat: Any) -> dict[str, Any]:
    """RSS growth per idle connection (after the echo steps' connections are closed)."""
    loadgen.broadcast({"op": "close", "uids": None}, timeout=60)
    time.sleep(1.0)
    before = procstat.rss_bytes(server.pid)
    workers = len(loadgen)
    uids = [f"i{i}" for i in range(count)]
    replies = loadgen.call(
        [
            {
                "op": "open",
                "dialect": "echo",
                "items": [(u, server.ws_url, None) for u in uids[w::workers]],
                "concurrency": 128,
                "read_buffer": 1024,
            }
            for w in range(workers)
        ],
        timeout=300,
    )
    opened = sum(r["opened"] for r in replies)
    time.sleep(2.0)
    after = procstat.rss_bytes(server.pid)
    per = (after - before) / opened / 1024 if opened else None
    say(f"  {server.name}: {opened} idle connections: {per and round(per, 1)} KiB RSS each")
    return {"connections": opened, "rss_per_conn_kib": per and round(per, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        SERVERS[argv[1]](int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--step-s", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-rate", type=float, default=64000)
    parser.add_argument("--idle", type=int, default=5000, help="idle connections for RSS (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = measure(
        [i for i in args.impls.split(",") if i],
        connections=args.connections,
        step_s=args.step_s,
        workers=args.workers,
        max_rate=args.max_rate,
        idle=args.idle,
        say=lambda line: print(line, flush=True),
    )
    print()
    print(f"{'transport':<12} {'max echo/s':>10} {'CPU-us/msg (lowest)':>20} {'KiB/idle conn':>14}")
    for impl, doc in results.items():
        kib = (doc.get("idle") or {}).get("rss_per_conn_kib") or "-"
        print(
            f"{impl:<12} {doc['max_rate_per_s'] or '-':>10} "
            f"{doc['cpu_us_per_msg'] or '-':>20} {kib:>14}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
