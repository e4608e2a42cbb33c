"""What one message costs in each WebSocket codec and JSON path, in-process (no network).

    python -m benchmarks.codec [--quick] [--out FILE]

CPU time (``time.process_time_ns``) per message, the best of ``--repeats``
runs over a few thousand distinct messages (the median is in the JSON output):

* unmask: websockets' C helper, wsframe's big-integer XOR fallback and
  wsproto's translate tables, on 100 B, 1 KiB and 16 KiB payloads;
* decode: masked client text frames of 100 B and 1 KiB, one frame per
  ``feed`` and 50 frames per ``feed`` (a burst read in one ``receive_some``),
  into ``str`` messages (UTF-8 checked) with the message size limit applied;
* encode: server text frames from a ``str`` (and from UTF-8 ``bytes``, what
  orjson produces);

for (a) wsproto's ``Connection`` driven as linechatd.websocket drives it
(events assembled into messages with its size accounting), (b) the sans-IO
``ServerProtocol`` of websockets (``receive_data`` / ``events_received`` /
``data_to_send``, ``send_text``), (c) ``linechatd.wsframe`` with the C mask
of websockets and (c') with its pure-Python fallback mask.

JSON: the strict decoder of linechatd.protocol against ``jsonfast`` (orjson
plus the checks it lacks), and the compact encoder against orjson, on the
frames the gateway handles most: a client ``send``, a Kafka record, a
``message`` and an ``ack``. The unchecked ``json.loads`` / ``orjson.loads``
are printed as floors.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

MAX_MESSAGE_BYTES = 65536

# --- inputs --------------------------------------------------------------------------------


def text_of_size(size: int, seed: int) -> str:
    """A client ``send`` frame padded to exactly ``size`` bytes (ASCII, like most chat)."""
    head = f'{{"type":"send","id":"m{seed}","to":"bob","body":{{"text":"'
    tail = '"}}'
    filler = "hello world " * (size // 12 + 1)
    return head + filler[: size - len(head) - len(tail)] + tail


def client_frames(texts: Sequence[str]) -> list[bytes]:
    """Masked client frames, as a browser sends them (wsproto's client encoder)."""
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    from wsproto.events import TextMessage

    client = Connection(ConnectionType.CLIENT)
    return [client.send(TextMessage(data=text)) for text in texts]


# --- decoders: each returns feed(bytes) -> number of messages --------------------------------


def wsproto_decoder() -> Callable[[bytes], int]:
    """wsproto as linechatd.websocket.Connection.receive()/_message() drive it."""
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    from wsproto.events import BytesMessage, TextMessage

    ws = Connection(ConnectionType.SERVER)
    parts: list[Any] = []
    part_bytes = 0

    def message(event: Any) -> Any:
        nonlocal parts, part_bytes
        data = event.data
        if isinstance(data, str):
            size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        else:
            data = bytes(data)
            size = len(data)
        if event.message_finished and not parts:
            return data if size <= MAX_MESSAGE_BYTES else None
        part_bytes += size
        parts.append(data)
        if not event.message_finished:
            return None
        whole, parts, part_bytes = parts, [], 0
        return "".join(whole) if type(data) is str else b"".join(whole)

    def feed(data: bytes) -> int:
        ws.receive_data(data)
        count = 0
        for event in ws.events():
            if type(event) is TextMessage or type(event) is BytesMessage:
                if message(event) is not None:
                    count += 1
        return count

    return feed


def websockets_decoder() -> Callable[[bytes], int]:
    """websockets' sans-IO server protocol; text frames decoded to str as its assembler does."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    protocol = ServerProtocol(state=State.OPEN, max_size=MAX_MESSAGE_BYTES)
    text = Opcode.TEXT

    def feed(data: bytes) -> int:
        protocol.receive_data(data)
        count = 0
        for frame in protocol.events_received():
            if isinstance(frame, Frame) and frame.opcode is text and frame.fin:
                bytes(frame.data).decode()
                count += 1
        protocol.data_to_send()  # pongs and closes would be written here
        return count

    return feed


def wsframe_decoder(mask: str) -> Callable[[], Callable[[bytes], int]]:
    def make() -> Callable[[bytes], int]:
        from linechatd import wsframe

        wsframe.apply_mask = wsframe._apply_mask_c if mask == "c" else wsframe._apply_mask_int
        decoder = wsframe.FrameDecoder(MAX_MESSAGE_BYTES)

        def feed(data: bytes) -> int:
            return len(decoder.feed(data))

        return feed

    return make


# --- encoders: each returns encode(str, bytes) -> frame ---------------------------------------


def wsproto_encoder() -> Callable[[str, bytes], bytes]:
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    from wsproto.events import TextMessage

    ws = Connection(ConnectionType.SERVER)
    return lambda text, _data: ws.send(TextMessage(data=text))


def websockets_encoder() -> Callable[[str, bytes], bytes]:
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    protocol = ServerProtocol(state=State.OPEN)

    def encode(text: str, _data: bytes) -> bytes:
        protocol.send_text(text.encode())
        return protocol.data_to_send()[0]

    return encode


def wsframe_encoder(from_bytes: bool) -> Callable[[], Callable[[str, bytes], bytes]]:
    def make() -> Callable[[str, bytes], bytes]:
        from linechatd.wsframe import encode_text

        if from_bytes:
            return lambda _text, data: encode_text(data)
        return lambda text, _data: encode_text(text)

    return make


# --- timing ----------------------------------------------------------------------------------


def cpu_us_per_item(run: Callable[[], int], repeats: int) -> tuple[float, float]:
    """(best, median) CPU-µs per item of ``run`` (which returns how many items it did)."""
    run()  # warm-up: imports, caches, the allocator
    samples = []
    for _ in range(repeats):
        start = time.process_time_ns()
        items = run()
        samples.append((time.process_time_ns() - start) / 1000 / items)
    return min(samples), statistics.median(samples)


def bench_decode(count: int, repeats: int, say: Any) -> list[dict[str, Any]]:
    decoders: dict[str, Callable[[], Callable[[bytes], int]]] = {
        "wsproto": wsproto_decoder,
        "websockets": websockets_decoder,
        "wsframe": wsframe_decoder("c"),
        "wsframe-pymask": wsframe_decoder("int"),
    }
    rows = []
    for size in (100, 1024):
        texts = [text_of_size(size, i) for i in range(count)]
        frames = client_frames(texts)
        for batch in (1, 50):
            feeds = [b"".join(frames[i : i + batch]) for i in range(0, len(frames), batch)]
            row: dict[str, Any] = {"op": "decode", "size": size, "frames_per_feed": batch}
            for name, make in decoders.items():
                row[name] = cpu_us_per_item(partial(_decode_all, name, make, feeds, count), repeats)
            rows.append(row)
            say(_row_line(row))
    for size in (100, 1024):
        pairs = [(t, t.encode()) for t in (text_of_size(size, i) for i in range(count))]
        row = {"op": "encode", "size": size, "frames_per_feed": 1}
        encoders: dict[str, Callable[[], Callable[[str, bytes], bytes]]] = {
            "wsproto": wsproto_encoder,
            "websockets": websockets_encoder,
            "wsframe": wsframe_encoder(False),
            "wsframe-from-bytes": wsframe_encoder(True),
        }
        for name, make_encoder in encoders.items():
            row[name] = cpu_us_per_item(partial(_encode_all, make_encoder, pairs), repeats)
        rows.append(row)
        say(_row_line(row))
    from linechatd import wsframe

    wsframe.apply_mask = wsframe._apply_mask_c  # as it was
    return rows


def _decode_all(
    name: str, make: Callable[[], Callable[[bytes], int]], feeds: list[bytes], expected: int
) -> int:
    feed = make()
    done = sum(map(feed, feeds))
    if done != expected:
        raise AssertionError(f"{name}: {done} of {expected} messages")
    return done


def _encode_all(make: Callable[[], Callable[[str, bytes], bytes]], pairs: list[Any]) -> int:
    encode = make()
    for text, data in pairs:
        encode(text, data)
    return len(pairs)


def _row_line(row: dict[str, Any]) -> str:
    cells = [f"{k} {v[0]:.2f}" for k, v in row.items() if isinstance(v, tuple)]
    return f"  {row['op']} {row['size']} B x{row['frames_per_feed']}: " + ", ".join(cells)


# --- unmasking ------------------------------------------------------------------------------


def bench_masks(count: int, repeats: int, say: Any) -> list[dict[str, Any]]:
    """The ways to XOR a client payload with its 4-byte key, per payload."""
    import os

    from websockets.speedups import apply_mask as websockets_c
    from wsproto.frame_protocol import XorMaskerSimple

    from linechatd import wsframe

    def wsproto_translate(data: bytes, key: bytes) -> bytes:
        return bytes(XorMaskerSimple(key).process(bytearray(data)))

    maskers: dict[str, Callable[[bytes, bytes], bytes]] = {
        "websockets.speedups (C)": websockets_c,
        "wsframe int XOR (fallback)": wsframe._apply_mask_int,
        "wsproto translate tables": wsproto_translate,
    }
    rows = []
    for size in (100, 1024, 16384):
        payloads = [(os.urandom(size), os.urandom(4)) for _ in range(64)]
        row: dict[str, Any] = {"op": "unmask", "size": size}
        for name, masker in maskers.items():
            row[name] = cpu_us_per_item(partial(_mask_all, masker, payloads, count), repeats)
        rows.append(row)
        say(
            f"  unmask {size} B: "
            + ", ".join(f"{k} {v[0]:.2f}" for k, v in row.items() if k not in ("op", "size"))
        )
    return rows


def _mask_all(
    masker: Callable[[bytes, bytes], bytes], payloads: list[tuple[bytes, bytes]], count: int
) -> int:
    rounds = max(1, count // len(payloads))
    for _ in range(rounds):
        for data, key in payloads:
            masker(data, key)
    return rounds * len(payloads)


# --- JSON ------------------------------------------------------------------------------------


def json_cases() -> dict[str, Any]:
    from linechatd import protocol

    record = protocol.ChatRecord(
        from_uid="alice",
        from_device="phone-1",
        to="bob",
        id="m1",
        body={"text": "x" * 100},
        ts=1767225600000,
    )
    message = {
        "type": "message",
        "from": record.from_uid,
        "from_device": record.from_device,
        "to": record.to,
        "id": record.id,
        "body": record.body,
        "partition": 17,
        "offset": 123456,
        "ts": record.ts,
    }
    return {
        "send frame": '{"type":"send","id":"m1","to":"bob","body":{"text":"hello"}}',
        "send frame, 100 B body": json.dumps(
            {"type": "send", "id": "m1", "to": "bob", "body": {"text": "x" * 100}},
            separators=(",", ":"),
        ),
        "kafka record": protocol.encode_record(record).decode(),
        "message frame": message,
        "ack frame": {"type": "ack", "id": "m1", "partition": 17, "offset": 123456},
        "_record": record,
    }


def bench_json(count: int, repeats: int, say: Any) -> list[dict[str, Any]]:
    import orjson

    from linechatd import jsonfast, protocol

    cases = json_cases()
    rows = []
    for name in ("send frame", "send frame, 100 B body", "kafka record"):
        text = cases[name]
        data = text.encode()
        decoders: dict[str, Callable[[], Any]] = {
            "protocol._loads_strict(str)": partial(protocol._loads_strict, text),
            "jsonfast(str)": partial(jsonfast.loads_strict_fast, text),
            "jsonfast(bytes)": partial(jsonfast.loads_strict_fast, data),
            "json.loads (unchecked)": partial(json.loads, text),
            "orjson.loads (unchecked)": partial(orjson.loads, data),
        }
        row: dict[str, Any] = {"op": "decode", "case": name, "bytes": len(data)}
        for label, call in decoders.items():
            row[label] = cpu_us_per_item(_loop(call, count), repeats)
        rows.append(row)
        say(_json_line(row))
    for name in ("message frame", "ack frame"):
        value = cases[name]
        json_encoders: dict[str, Callable[[], Any]] = {
            "protocol._dumps + encode": partial(_stdlib_frame, protocol._dumps, value),
            "jsonfast.dumps_compact_fast": partial(jsonfast.dumps_compact_fast, value),
            "orjson.dumps (unchecked)": partial(orjson.dumps, value),
        }
        row = {"op": "encode", "case": name, "bytes": len(orjson.dumps(value))}
        for label, call in json_encoders.items():
            row[label] = cpu_us_per_item(_loop(call, count), repeats)
        rows.append(row)
        say(_json_line(row))
    record = cases["_record"]
    row = {"op": "encode", "case": "protocol.encode_message (whole function)", "bytes": 0}
    row["protocol.encode_message + encode"] = cpu_us_per_item(
        _loop(lambda: protocol.encode_message(record, 17, 123456).encode(), count), repeats
    )
    rows.append(row)
    say(_json_line(row))
    return rows


def _stdlib_frame(dumps: Callable[[Any], str], value: Any) -> bytes:
    return dumps(value).encode()


def _loop(call: Callable[[], Any], count: int) -> Callable[[], int]:
    def run() -> int:
        for _ in range(count):
            call()
        return count

    return run


def _json_line(row: dict[str, Any]) -> str:
    cells = [f"{k} {v[0]:.2f}" for k, v in row.items() if isinstance(v, tuple)]
    return f"  {row['op']} {row['case']}: " + ", ".join(cells)


# --- the codec layer end to end: bytes in -> dict, dict -> bytes out ---------------------------


def bench_pipeline(count: int, repeats: int, say: Any) -> list[dict[str, Any]]:
    """Inbound: a masked client frame to the frame's dict; outbound: a message dict to a frame."""
    from linechatd import jsonfast, protocol, wsframe

    texts = [text_of_size(100, i) for i in range(count)]
    frames = client_frames(texts)
    value = json_cases()["message frame"]
    rows = []

    def inbound_today() -> int:
        from wsproto import ConnectionType
        from wsproto.connection import Connection
        from wsproto.events import TextMessage

        ws = Connection(ConnectionType.SERVER)
        for frame in frames:
            ws.receive_data(frame)
            for event in ws.events():
                if type(event) is TextMessage:
                    protocol._loads_strict(event.data)
        return len(frames)

    def inbound_new() -> int:
        decoder = wsframe.FrameDecoder(MAX_MESSAGE_BYTES)
        loads = jsonfast.loads_strict_fast
        for frame in frames:
            for message in decoder.feed(frame):
                if type(message) is str:
                    loads(message)
        return len(frames)

    def outbound_today() -> int:
        from wsproto import ConnectionType
        from wsproto.connection import Connection
        from wsproto.events import TextMessage

        ws = Connection(ConnectionType.SERVER)
        for _ in range(count):
            ws.send(TextMessage(data=protocol._dumps(value)))
        return count

    def outbound_new() -> int:
        for _ in range(count):
            wsframe.encode_text(jsonfast.dumps_compact_fast(value))
        return count

    for label, today, new in (
        ("inbound: 100 B send frame -> dict", inbound_today, inbound_new),
        ("outbound: message dict -> frame", outbound_today, outbound_new),
    ):
        row = {
            "op": label,
            "wsproto + json": cpu_us_per_item(today, repeats),
            "wsframe + jsonfast": cpu_us_per_item(new, repeats),
        }
        rows.append(row)
        say(f"  {label}: " + ", ".join(f"{k} {v[0]:.2f}" for k, v in row.items() if k != "op"))
    return rows


# --- report ----------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    print()
    print("WebSocket codecs: CPU-µs per message (best of runs); ratio = wsproto / this")
    names = ["wsproto", "websockets", "wsframe", "wsframe-pymask"]
    header = f"{'operation':<28}" + "".join(f"{n:>20}" for n in names)
    print(header)
    for row in results["codec"]:
        label = f"{row['op']} {row['size']} B" + (
            f", {row['frames_per_feed']}/feed" if row["op"] == "decode" else ""
        )
        base = row["wsproto"][0]
        cells = []
        for name in names:
            if row["op"] == "encode" and name == "wsframe-pymask":
                name = "wsframe-from-bytes"
            best = row[name][0]
            cells.append(f"{best:8.2f} ({base / best:4.1f}x)")
        print(f"{label:<28}" + "".join(f"{c:>20}" for c in cells))
    print("(encode rows: the last column is wsframe.encode_text from UTF-8 bytes)")
    print()
    print("Unmasking one payload, CPU-µs (best of runs)")
    for row in results["masks"]:
        line = ", ".join(f"{k} {v[0]:.2f}" for k, v in row.items() if isinstance(v, tuple))
        print(f"  {row['size']:>6} B: {line}")
    print()
    print("JSON: CPU-µs per operation (best of runs)")
    for row in results["json"]:
        print(f"  {row['op']} {row['case']} ({row['bytes']} B)")
        for label, value in row.items():
            if isinstance(value, tuple):
                print(f"    {label:<40} {value[0]:8.2f}")
    print()
    print("Codec layer per message (frame + JSON), CPU-µs")
    for row in results["pipeline"]:
        today, new = row["wsproto + json"][0], row["wsframe + jsonfast"][0]
        print(
            f"  {row['op']:<40} wsproto + json {today:7.2f}   "
            f"wsframe + jsonfast {new:7.2f}   ({today / new:.1f}x)"
        )


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("wsproto", "websockets", "orjson"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="messages per run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="few messages, 3 runs: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    count, repeats = (500, 3) if args.quick else (args.count, args.repeats)

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"versions: {versions()}")
    results = {
        "versions": versions(),
        "count": count,
        "repeats": repeats,
        "codec": bench_decode(count, repeats, say),
        "masks": bench_masks(count, repeats, say),
        "json": bench_json(count, repeats, say),
        "pipeline": bench_pipeline(count, repeats, say),
    }
    print_tables(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
