"""Handshakes (connection-url + WebSocket upgrade) per second, and RSS per idle connection.

``python -m benchmarks.handshakes`` (``make bench-handshakes``) starts
ZooKeeper, the broker and one linechatd instance (it holds every partition),
then client processes open ``--connections`` sessions as a client library
does: ``GET /api/connection-url?uid=...`` on a fresh HTTP connection, then
the upgrade to the URL it names, until the welcome frame arrives; the
sessions stay open and idle. Reported: handshakes per second, the gateway's
CPU-µs per handshake and cores during the storm, its RSS per idle connection,
and (``--profile``) py-spy's view of where the handshake CPU goes. With
``--tracemalloc`` the gateway runs under ``PYTHONTRACEMALLOC`` and writes the
allocation sites of the idle connections (``benchmarks/gateway_main.py``).

The client processes are plain asyncio (uvloop when installed) over raw
sockets: a few tens of µs per handshake, printed with the result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import procstat, stack
from .profile import analyze, start_recording
from .run import linechatd_overrides, parse_args
from .systems import Linechatd, SocketioPeer, System


class Refused(Exception):
    """A handshake the server answered with something else than success (the first line)."""


def _refused(data: bytes) -> Refused:
    return Refused(data.split(b"\r\n", 1)[0][:80].decode("latin-1"))


async def _open_one(
    http: tuple[str, int], uid: str, source: str, keep: list[asyncio.StreamWriter]
) -> None:
    reader, writer = await asyncio.open_connection(*http, local_addr=(source, 0))
    writer.write(
        f"GET /api/connection-url?uid={uid} HTTP/1.1\r\nHost: {http[0]}:{http[1]}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    # As a client library does: the body by its Content-Length, not by waiting for the close.
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    writer.close()
    if not head.startswith(b"HTTP/1.1 200"):
        raise _refused(head)
    url = urlsplit(json.loads(body)["url"])
    address = (url.hostname or "127.0.0.1", url.port or 80)
    reader, writer = await _upgrade(address, f"{url.path}?uid={uid}", source)
    await _expect(reader, writer, lambda frame: b'"welcome"' in frame)
    keep.append(writer)


async def _upgrade(
    address: tuple[str, int], target: str, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection to ``address``, upgraded to a WebSocket at ``target`` (101 checked)."""
    reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = await reader.readuntil(b"\r\n\r\n")
    if not data.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise _refused(data)
    return reader, writer


async def _expect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ok: Callable[[bytes], bool]
) -> None:
    """The server's next text frame, which must satisfy ``ok`` (else Refused)."""
    frame = await _read_text(reader)
    if not ok(frame):
        writer.close()
        raise _refused(frame)


def _masked_text(payload: bytes) -> bytes:
    """A client's text frame (RFC 6455: masked), payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def _read_text(reader: asyncio.StreamReader) -> bytes:
    """One unmasked text frame from a server."""
    header = await reader.readexactly(2)
    size = header[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(size)


async def _open_one_socketio(
    ws: tuple[str, int], uid: str, source: str, keep: list[asyncio.StreamWriter]
) -> None:
    """As python-socketio's client does with ``transports=["websocket"]``: the upgrade,
    the Engine.IO open packet, then the namespace CONNECT and its answer."""
    reader, writer = await _upgrade(ws, "/socket.io/?EIO=4&transport=websocket", source)
    await _expect(reader, writer, lambda frame: frame.startswith(b"0"))
    writer.write(_masked_text(b'40{"uid":"%s"}' % uid.encode()))
    await _expect(reader, writer, lambda frame: frame.startswith(b"40"))
    keep.append(writer)


async def _client(
    dialect: str,
    address: tuple[str, int],
    uids: list[str],
    sources: list[str],
    concurrency: int,
) -> dict[str, Any]:
    keep: list[asyncio.StreamWriter] = []
    opener = _open_one if dialect == "linechatd" else _open_one_socketio
    gate = asyncio.Semaphore(concurrency)
    failures: collections.Counter[str] = collections.Counter()

    async def one(i: int, uid: str) -> None:
        async with gate:
            try:
                await opener(address, uid, sources[i % len(sources)], keep)
            except Refused as exc:
                failures[str(exc)] += 1
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                failures[type(exc).__name__] += 1

    cpu0 = time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(one(i, uid) for i, uid in enumerate(uids)))
    return {
        "opened": len(keep),
        "failures": sum(failures.values()),
        "failure_kinds": dict(failures),
        "seconds": time.monotonic() - started,
        "cpu_s": time.process_time() - cpu0,
        "_keep": keep,
    }


def _client_main(
    pipe: Any,
    dialect: str,
    address: tuple[str, int],
    uids: list[str],
    sources: list[str],
    concurrency: int,
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        result = await _client(dialect, address, uids, sources, concurrency)
        keep = result.pop("_keep")
        pipe.send(result)
        pipe.recv()  # hold the connections until told to close them
        for writer in keep:
            writer.close()

    asyncio.run(main())


def _storm(
    args: argparse.Namespace,
    dialect: str,
    address: tuple[str, int],
    pids: list[int],
    prefix: str,
) -> dict[str, Any]:
    """Open ``args.connections`` sessions against the server processes ``pids``; hold, measure, close."""
    time.sleep(2.0)
    rss0 = sum(procstat.rss_bytes(pid) for pid in pids)
    uids = [f"{prefix}-{i}" for i in range(args.connections)]
    sources = [f"127.0.0.{2 + i}" for i in range(8)]
    procs = []
    pipes = []
    for w in range(args.workers):
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.Process(
            target=_client_main,
            args=(child, dialect, address, uids[w :: args.workers], sources, args.concurrency),
        )
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    recorder = None
    profile_path = args.out.with_suffix(f".{dialect}.profile.txt")
    if args.profile and dialect == "linechatd":
        recorder = start_recording(
            pids[0], profile_path, duration_s=args.profile_s, rate_hz=args.profile_hz
        )
    cpu0 = procstat.sample(pids)
    busy0 = procstat.system_busy()
    replies = [pipe.recv() for pipe in pipes]
    cpu1 = procstat.sample(pids)
    busy1 = procstat.system_busy()
    time.sleep(2.0)
    rss1 = sum(procstat.rss_bytes(pid) for pid in pids)
    if args.tracemalloc and dialect == "linechatd":
        os.kill(pids[0], signal.SIGUSR2)
        time.sleep(3.0)
    opened = sum(r["opened"] for r in replies)
    seconds = max(r["seconds"] for r in replies)
    server_cpu_s = cpu1.cpu_s - cpu0.cpu_s
    client_cpu_s = sum(r["cpu_s"] for r in replies)
    elapsed = cpu1.at - cpu0.at
    busy_cores = (
        (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]) * (os.cpu_count() or 1)
        if busy1[1] > busy0[1]
        else 0.0
    )
    result: dict[str, Any] = {
        "system": dialect,
        "connections": opened,
        "failures": sum(r["failures"] for r in replies),
        "failure_kinds": dict(
            sum((collections.Counter(r["failure_kinds"]) for r in replies), collections.Counter())
        ),
        "handshakes_per_s": round(opened / seconds, 1) if seconds else None,
        "server_cpu_us_per_handshake": round(server_cpu_s / opened * 1e6, 1) if opened else None,
        "server_cores": round(cpu1.rate_since(cpu0), 3),
        "client_cpu_us_per_handshake": round(client_cpu_s / opened * 1e6, 1) if opened else None,
        # Everything else on the machine meanwhile: the load that competes for the cores.
        "others_cores": round(busy_cores - (server_cpu_s + client_cpu_s) / elapsed, 2)
        if elapsed > 0
        else None,
        "rss_per_conn_kib": round((rss1 - rss0) / opened / 1024, 2) if opened else None,
        "rss_mib": round(rss1 / 2**20, 1),
    }
    for pipe in pipes:
        pipe.send("close")
    for proc in procs:
        proc.join(30)
    if recorder is not None:
        recorder.wait(args.profile_s + 60)
        if profile_path.exists():
            result["profile"] = analyze([profile_path])
    return result


def _start_linechatd(
    args: argparse.Namespace, workdir: Path, services: stack.Services
) -> Linechatd:
    # The per-address policies are lifted there (the peer has none).
    overrides = linechatd_overrides(parse_args([]))
    env_before = os.environ.get("PYTHONTRACEMALLOC")
    if args.tracemalloc:
        # Inherited by the gateway process only for as long as it starts.
        os.environ["PYTHONTRACEMALLOC"] = "1"
        os.environ["BENCH_TRACEMALLOC_OUT"] = str(args.out.with_suffix(".tracemalloc.txt"))
    try:
        system = Linechatd(
            workdir, services, count=1, partitions=args.partitions, overrides=overrides
        )
        system.start(timeout=120)
    finally:
        if args.tracemalloc:
            if env_before is None:
                os.environ.pop("PYTHONTRACEMALLOC", None)
            else:
                os.environ["PYTHONTRACEMALLOC"] = env_before
    return system


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return (parts.hostname or "127.0.0.1", parts.port or 80)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.rounds`` rounds; each storms every system of ``args.systems`` in turn, on a fresh start."""
    stack.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="bench-handshakes-"))
    results = []
    services = stack.Services.start(workdir / "services") if "linechatd" in args.systems else None
    try:
        for round_no in range(args.rounds):
            for name in args.systems:
                where = workdir / f"{name}-{round_no}"
                if name == "linechatd":
                    assert services is not None
                    system: System = _start_linechatd(args, where, services)
                else:
                    system = SocketioPeer(where, count=1)
                    system.start(timeout=60)
                try:
                    server = system.servers[0]
                    address = _address(
                        server.http_url
                        if name == "linechatd" and server.http_url
                        else server.ws_url
                    )
                    result = _storm(args, name, address, [server.pid], f"hs{round_no}")
                finally:
                    system.stop()
                result["round"] = round_no + 1
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    finally:
        if services is not None:
            services.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handshakes", description=__doc__)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=128, help="in flight per client process")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument(
        "--systems",
        type=lambda text: [name for name in text.split(",") if name],
        default=["linechatd", "socketio"],
        help="comma-separated: linechatd, socketio (the peer: upgrade, open, namespace connect)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="each system this many times, alternated"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway meanwhile")
    parser.add_argument(
        "--profile-s", type=float, default=4.0, help="as long as the storm, not its aftermath"
    )
    parser.add_argument("--profile-hz", type=int, default=100)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="allocation sites per connection"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/handshakes.json"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(args.systems) - {"linechatd", "socketio"}
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    results = run(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)
    for result in results:
        profile = result.get("profile")
        if not profile:
            continue
        print(f"linechatd, round {result['round']}: where the handshake CPU went")
        for key in ("trio_thread_by_component", "trio_thread_by_leaf", "trio_thread_top_functions"):
            print(key)
            for row in profile[key]:
                print(f"  {row['percent']:5.1f}%  {row['name']}")
    return 0


def _print_table(results: list[dict[str, Any]]) -> None:
    columns = (
        ("round", "round"),
        ("system", "system"),
        ("handshakes_per_s", "handshakes/s"),
        ("server_cpu_us_per_handshake", "server CPU-µs each"),
        ("server_cores", "server cores"),
        ("others_cores", "others (cores)"),
        ("rss_per_conn_kib", "KiB per idle connection"),
        ("failures", "failures"),
    )
    print("| " + " | ".join(title for _key, title in columns) + " |")
    print("|" + " --- |" * len(columns))
    for result in results:
        print("| " + " | ".join(str(result.get(key)) for key, _title in columns) + " |")
    for round_no in sorted({r["round"] for r in results}):
        rates = {r["system"]: r["handshakes_per_s"] for r in results if r["round"] == round_no}
        if rates.get("linechatd") and rates.get("socketio"):
            print(
                f"round {round_no}: linechatd / socket.io = {rates['linechatd'] / rates['socketio']:.2f}x"
            )


if __name__ == "__main__":
    raise SystemExit(main())
