"""One hostile client, run as its own process by the abuse benchmark.

    python -m benchmarks.attacker SCENARIO --port P --source 127.0.0.9 \\
        --duration 12 --out stats.json [--uid mallory] [--resume-from N]

Raw sockets on trio, no WebSocket library: an attacker does not follow the
rules a library enforces. Each scenario attacks from one source address
until ``--duration`` has passed, reconnecting whenever the gateway closes it
(one socket at a time, except where the scenario is about many sockets),
then writes what it saw as JSON to ``--out``: how far it got before being
closed or throttled, and when that first happened. It prints ``ready`` once
the attack is under way (after its sockets are open, for half-open).

Scenarios:

``ping_flood``       WebSocket ping frames, 64 KiB of them per write; server pongs counted
``tiny_frames``      64 KiB writes packed with ``{"type":"ping"}`` text frames; JSON pongs counted
``handshake_flood``  upgrade requests as fast as 16 concurrent sockets allow; answers by status
``half_open``        1,000 sockets that connect and never send a request (held: not
                     closed within a second; the handshake timeout closes them later)
``reconnect_burst``  connect, 300 sends at once, read the answers, close, again
``resume_and_drop``  connect with a resume from far back, read the welcome, drop, again
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import trio

SCENARIOS = (
    "ping_flood",
    "tiny_frames",
    "handshake_flood",
    "half_open",
    "reconnect_burst",
    "resume_and_drop",
)
WRITE_BYTES = 64 * 1024
HALF_OPEN_SOCKETS = 1000
HANDSHAKE_CONCURRENCY = 16
BURST_SENDS = 300
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class Stats:
    scenario: str
    started_at: float = 0.0  # time.monotonic() when the attack began
    first_stopped_s: float | None = None  # first close / refusal / throttle, after the start
    connections: int = 0
    closed_by_server: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)
    frames_written: int = 0
    frames_answered: int = 0  # frames the gateway processed (a pong, an ack, an error)
    # Per connection: frames the gateway answered before it closed the socket.
    answered_before_close: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    held: int = 0  # half_open: sockets still open one second after they were all open
    closed_later: int = 0  # half_open: closed after that (the handshake timeout)
    errors: Counter[str] = field(default_factory=Counter)

    def stopped(self) -> None:
        if self.first_stopped_s is None:
            self.first_stopped_s = round(time.monotonic() - self.started_at, 4)


# --- WebSocket bytes, by hand ------------------------------------------------------------


def masked_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One client frame (clients must mask, RFC 6455 §5.3)."""
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    elif length < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", length)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def frame_blob(opcode: int, payload: bytes) -> tuple[bytes, int]:
    """As many copies of one frame as fit in one 64 KiB write; (bytes, frame count)."""
    frame = masked_frame(opcode, payload, secrets.token_bytes(4))
    count = WRITE_BYTES // len(frame)
    return frame * count, count


class FrameReader:
    """Server frames (unmasked) out of a byte stream: (opcode, payload)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        buf = self._buffer
        while len(buf) >= 2:
            opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, offset = struct.unpack("!H", buf[2:4])[0], 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, offset = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < offset + length:
                break
            frames.append((opcode, bytes(buf[offset : offset + length])))
            del buf[: offset + length]
        return frames


def upgrade_request(port: int, target: str) -> bytes:
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def connect_from(source: str, host: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def open_session(
    source: str, host: str, port: int, target: str
) -> tuple[trio.SocketStream | None, int, bytes]:
    """(stream after the 101 or None, HTTP status, bytes read past the response head)."""
    stream = await connect_from(source, host, port)
    try:
        await stream.send_all(upgrade_request(port, target))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                await stream.aclose()
                return None, 0, b""
            data += chunk
    except _STREAM_ERRORS:
        await trio.aclose_forcefully(stream)
        return None, 0, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        await trio.aclose_forcefully(stream)
        return None, status, b""
    return stream, status, rest


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Target:
    host: str
    port: int
    source: str
    uid: str
    stop_at: float
    resume_from: int | None = None


async def frame_flood(
    target: Target,
    stats: Stats,
    blob: bytes,
    per_blob: int,
    pong: Callable[[int, bytes], bool],
) -> None:
    """Write ``blob`` over and over on one socket; reconnect when the gateway closes it."""
    n = 0
    while time.monotonic() < target.stop_at:
        n += 1
        stream, status, rest = await open_session(
            target.source, target.host, target.port, f"/ws?uid={target.uid}&device=f{n}"
        )
        stats.statuses[str(status)] += 1
        if stream is None:
            if status == 429:
                stats.stopped()
            await trio.sleep(0.05)
            continue
        stats.connections += 1
        async with stream:
            answered, closed = await _flood_one(stream, rest, blob, per_blob, pong, stats, target)
        stats.frames_answered += answered
        if closed:
            stats.closed_by_server += 1
            stats.answered_before_close.append(answered)
            stats.stopped()


async def _flood_one(
    stream: trio.SocketStream,
    rest: bytes,
    blob: bytes,
    per_blob: int,
    pong: Callable[[int, bytes], bool],
    stats: Stats,
    target: Target,
) -> tuple[int, bool]:
    """One connection's flood: (frames the gateway answered, whether it closed the socket)."""
    answered = 0
    closed = False
    reader = FrameReader()

    async def read(cancel: trio.CancelScope) -> None:
        nonlocal answered, closed
        pending = rest
        try:
            while not closed:
                for opcode, payload in reader.feed(pending):
                    if opcode == 0x8:
                        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                        stats.close_codes[str(code)] += 1
                        closed = True
                    elif pong(opcode, payload):
                        answered += 1
                if not closed:
                    pending = await stream.receive_some(65536)
                    closed = not pending
        except _STREAM_ERRORS:
            closed = True
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, nursery.cancel_scope)
        with trio.move_on_at(trio.current_time() + (target.stop_at - time.monotonic())):
            try:
                while True:
                    await stream.send_all(blob)
                    stats.frames_written += per_blob
            except _STREAM_ERRORS:
                closed = True
        nursery.cancel_scope.cancel()
    return answered, closed


async def handshake_flood(target: Target, stats: Stats) -> None:
    counter = iter(range(10**9))

    async def one_worker() -> None:
        while time.monotonic() < target.stop_at:
            try:
                stream, status, _rest = await open_session(
                    target.source, target.host, target.port, f"/ws?uid={target.uid}{next(counter)}"
                )
            except OSError as exc:
                stats.errors[type(exc).__name__] += 1
                await trio.sleep(0.01)
                continue
            stats.statuses[str(status)] += 1
            if status == 429:
                stats.stopped()
            if stream is not None:
                stats.connections += 1
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(HANDSHAKE_CONCURRENCY):
            nursery.start_soon(one_worker)


async def half_open(target: Target, stats: Stats, ready: Callable[[], None]) -> None:
    streams: list[trio.SocketStream] = []
    for _ in range(HALF_OPEN_SOCKETS):
        try:
            streams.append(await connect_from(target.source, target.host, target.port))
        except OSError as exc:
            stats.errors[type(exc).__name__] += 1
    stats.connections = len(streams)
    ready()

    opened_at = trio.current_time()

    async def watch(stream: trio.SocketStream) -> None:
        try:
            data = await stream.receive_some(1)
        except _STREAM_ERRORS:
            data = b""
        if not data:
            if trio.current_time() - opened_at <= 1.0:
                stats.closed_by_server += 1
                stats.stopped()
            else:
                stats.closed_later += 1

    with trio.move_on_at(trio.current_time() + (target.stop_at - time.monotonic())):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(watch, stream)
    stats.held = stats.connections - stats.closed_by_server
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def reconnect_burst(target: Target, stats: Stats) -> None:
    n = 0
    while time.monotonic() < target.stop_at:
        n += 1
        stream, status, rest = await open_session(
            target.source, target.host, target.port, f"/ws?uid={target.uid}&device=b{n}"
        )
        stats.statuses[str(status)] += 1
        if stream is None:
            if status == 429:
                stats.stopped()
            await trio.sleep(0.05)
            continue
        stats.connections += 1
        mask = secrets.token_bytes(4)
        burst = b"".join(
            masked_frame(
                0x1,
                json.dumps(
                    {"type": "send", "id": f"{n}-{i}", "to": "sink", "body": "x" * 50}
                ).encode(),
                mask,
            )
            for i in range(BURST_SENDS)
        )
        reader = FrameReader()
        answers = 0
        async with stream:
            try:
                await stream.send_all(burst)
                stats.frames_written += BURST_SENDS
                pending = rest
                with trio.move_on_after(1.0):
                    while answers < BURST_SENDS:
                        for opcode, payload in reader.feed(pending):
                            if opcode != 0x1:
                                continue
                            frame = json.loads(payload)
                            kind = frame.get("code") or frame.get("type")
                            if kind in ("welcome",):
                                continue
                            stats.answers[str(kind)] += 1
                            answers += 1
                            if kind == "rate_limited":
                                stats.stopped()
                        pending = await stream.receive_some(65536)
                        if not pending:
                            stats.closed_by_server += 1
                            break
            except _STREAM_ERRORS:
                stats.closed_by_server += 1
        stats.frames_answered += answers


async def resume_and_drop(target: Target, stats: Stats) -> None:
    resume = target.resume_from if target.resume_from is not None else -1
    n = 0
    while time.monotonic() < target.stop_at:
        n += 1
        stream, status, rest = await open_session(
            target.source,
            target.host,
            target.port,
            f"/ws?uid={target.uid}&device=r{n}&resume={resume}",
        )
        stats.statuses[str(status)] += 1
        if stream is None:
            if status == 429:
                stats.stopped()
            await trio.sleep(0.05)
            continue
        stats.connections += 1
        reader = FrameReader()
        pending = rest
        try:
            with trio.move_on_after(10):
                while True:
                    frames = [json.loads(p) for op, p in reader.feed(pending) if op == 0x1]
                    welcome = next((f for f in frames if f.get("type") == "welcome"), None)
                    if welcome is not None:
                        stats.answers[f"resumed_{welcome.get('resumed')}"] += 1
                        break
                    pending = await stream.receive_some(65536)
                    if not pending:
                        break
        except _STREAM_ERRORS:
            pass
        await trio.aclose_forcefully(stream)  # and away: never read the replay


# --- main -----------------------------------------------------------------------------------


async def attack(args: argparse.Namespace) -> Stats:
    stats = Stats(args.scenario)
    delay = max(0.0, args.start_at - time.monotonic()) if args.start_at else 0.0
    await trio.sleep(delay)
    stats.started_at = time.monotonic()
    target = Target(
        args.host,
        args.port,
        args.source,
        args.uid,
        stats.started_at + args.duration,
        args.resume_from,
    )

    def ready() -> None:
        print("ready", flush=True)

    runners: dict[str, Callable[[], Awaitable[None]]] = {
        "ping_flood": lambda: frame_flood(
            target, stats, *frame_blob(0x9, b""), lambda op, _p: op == 0xA
        ),
        "tiny_frames": lambda: frame_flood(
            target,
            stats,
            *frame_blob(0x1, b'{"type":"ping"}'),
            lambda op, p: op == 0x1 and b"pong" in p,
        ),
        "handshake_flood": lambda: handshake_flood(target, stats),
        "half_open": lambda: half_open(target, stats, ready),
        "reconnect_burst": lambda: reconnect_burst(target, stats),
        "resume_and_drop": lambda: resume_and_drop(target, stats),
    }
    if args.scenario != "half_open":
        ready()
    await runners[args.scenario]()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacker", description=__doc__)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.9", help="local address to attack from")
    parser.add_argument("--uid", default="mallory")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.monotonic() to start at")
    parser.add_argument("--resume-from", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    stats = trio.run(attack, args)
    # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs.
    doc: dict[str, Any] = {
        f.name: dict(value) if isinstance(value := getattr(stats, f.name), Counter) else value
        for f in fields(stats)
    }
    args.out.write_text(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
