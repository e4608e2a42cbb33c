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
import json
import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import procstat, stack
from .profile import analyze, start_recording
from .run import linechatd_overrides, parse_args
from .systems import Linechatd


async def _open_one(
    http: tuple[str, int], uid: str, source: str, keep: list[asyncio.StreamWriter]
) -> bool:
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
        return False
    url = urlsplit(json.loads(body)["url"])
    reader, writer = await asyncio.open_connection(url.hostname, url.port, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {url.path}?uid={uid} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = await reader.readuntil(b"\r\n\r\n")
    if not data.startswith(b"HTTP/1.1 101"):
        writer.close()
        return False
    # The welcome: one unmasked text frame.
    header = await reader.readexactly(2)
    size = header[1] & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    welcome = await reader.readexactly(size)
    if b'"welcome"' not in welcome:
        writer.close()
        return False
    keep.append(writer)
    return True


async def _client(
    http: tuple[str, int], uids: list[str], sources: list[str], concurrency: int
) -> dict[str, Any]:
    keep: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(i: int, uid: str) -> None:
        nonlocal failures
        async with gate:
            try:
                if not await _open_one(http, uid, sources[i % len(sources)], keep):
                    failures += 1
            except (OSError, asyncio.IncompleteReadError, ValueError):
                failures += 1

    cpu0 = time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(one(i, uid) for i, uid in enumerate(uids)))
    return {
        "opened": len(keep),
        "failures": failures,
        "seconds": time.monotonic() - started,
        "cpu_s": time.process_time() - cpu0,
        "_keep": keep,
    }


def _client_main(
    pipe: Any, http: tuple[str, int], uids: list[str], sources: list[str], concurrency: int
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        result = await _client(http, uids, sources, concurrency)
        keep = result.pop("_keep")
        pipe.send(result)
        pipe.recv()  # hold the connections until told to close them
        for writer in keep:
            writer.close()

    asyncio.run(main())


def run(args: argparse.Namespace) -> dict[str, Any]:
    stack.raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="bench-handshakes-"))
    services = stack.Services.start(workdir / "services")
    overrides = linechatd_overrides(parse_args([]))
    env_before = os.environ.get("PYTHONTRACEMALLOC")
    if args.tracemalloc:
        # Inherited by the gateway process only for as long as it starts.
        os.environ["PYTHONTRACEMALLOC"] = "1"
        os.environ["BENCH_TRACEMALLOC_OUT"] = str(args.out.with_suffix(".tracemalloc.txt"))
    try:
        system = Linechatd(
            workdir / "linechatd", services, count=1, partitions=args.partitions,
            overrides=overrides,
        )  # fmt: skip
        system.start(timeout=120)
    finally:
        if args.tracemalloc:
            if env_before is None:
                os.environ.pop("PYTHONTRACEMALLOC", None)
            else:
                os.environ["PYTHONTRACEMALLOC"] = env_before
    server = system.servers[0]
    assert server.http_url is not None
    http_parts = urlsplit(server.http_url)
    http = (http_parts.hostname or "127.0.0.1", http_parts.port or 80)
    try:
        time.sleep(2.0)
        rss0 = procstat.rss_bytes(server.pid)
        uids = [f"hs-{i}" for i in range(args.connections)]
        sources = [f"127.0.0.{2 + i}" for i in range(8)]
        procs = []
        pipes = []
        for w in range(args.workers):
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(
                target=_client_main,
                args=(child, http, uids[w :: args.workers], sources, args.concurrency),
            )
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        recorder = None
        profile_path = args.out.with_suffix(".profile.txt")
        if args.profile:
            recorder = start_recording(server.pid, profile_path, duration_s=args.profile_s)
        gw0 = procstat.sample([server.pid])
        replies = [pipe.recv() for pipe in pipes]
        gw1 = procstat.sample([server.pid])
        time.sleep(2.0)
        rss1 = procstat.rss_bytes(server.pid)
        if args.tracemalloc:
            server.signal(signal.SIGUSR2)
            time.sleep(3.0)
        opened = sum(r["opened"] for r in replies)
        seconds = max(r["seconds"] for r in replies)
        gateway_cpu_s = gw1.cpu_s - gw0.cpu_s
        result: dict[str, Any] = {
            "connections": opened,
            "failures": sum(r["failures"] for r in replies),
            "handshakes_per_s": round(opened / seconds, 1) if seconds else None,
            "gateway_cpu_us_per_handshake": round(gateway_cpu_s / opened * 1e6, 1)
            if opened
            else None,
            "gateway_cores": round(gw1.rate_since(gw0), 3),
            "client_cpu_us_per_handshake": round(sum(r["cpu_s"] for r in replies) / opened * 1e6, 1)
            if opened
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
    finally:
        system.stop()
        services.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handshakes", description=__doc__)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=128, help="in flight per client process")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway meanwhile")
    parser.add_argument("--profile-s", type=float, default=8.0)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="allocation sites per connection"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/handshakes.json"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=2))
    profile = result.get("profile")
    if profile:
        for key in ("trio_thread_by_component", "trio_thread_by_leaf", "trio_thread_top_functions"):
            print(key)
            for row in profile[key]:
                print(f"  {row['percent']:5.1f}%  {row['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
