"""A plain asyncio gateway: the reference for what the trio stack costs.

Minimal but honest: the same frames as linechatd (welcome, send -> ack after
the broker's acks=all, message with partition and offset, error, ping/pong),
records produced with the same key and value format, consumed and fanned out
to every device of the recipient. What it leaves out: ZooKeeper leases
(ownership is static: instance i of N owns the partitions k with k % N == i),
resume/replay, rate limits, auth and graceful handover.

    python -m benchmarks.peer_asyncio --port 9000 --kafka 127.0.0.1:9092 \
        --partitions 64 --index 0 --count 2 --topic-prefix topic-
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import threading
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from linechatd.hashing import partition_for
from linechatd.protocol import is_valid_uid

OUTBOX = 1024  # per session, as linechatd's default outbound_queue_messages


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


class Gateway:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.owned = [k for k in range(args.partitions) if k % args.count == args.index]
        self.sessions: dict[str, set[Session]] = {}
        self.loop = asyncio.get_running_loop()
        self.producer = Producer(
            {
                "bootstrap.servers": args.kafka,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 1,
                "socket.nagle.disable": True,
            }
        )
        self.stop = threading.Event()

    def topic(self, k: int) -> str:
        return f"{self.args.topic_prefix}{k}"

    def ensure_topics(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.args.kafka})
        existing = set(admin.list_topics(timeout=30).topics)
        missing = [
            NewTopic(self.topic(k), num_partitions=1, replication_factor=1)
            for k in range(self.args.partitions)
            if self.topic(k) not in existing
        ]
        for future in admin.create_topics(missing).values() if missing else ():
            with contextlib.suppress(Exception):  # created by the other instance meanwhile
                future.result(30)

    # -- librdkafka threads hand results to the loop, nothing more ------------------

    def poll_producer(self) -> None:
        while not self.stop.is_set():
            self.producer.poll(0.05)

    def poll_consumer(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.args.kafka,
                "group.id": f"{self.args.topic_prefix}peer-{self.args.index}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "socket.nagle.disable": True,
            }
        )
        consumer.assign([TopicPartition(self.topic(k), 0, OFFSET_END) for k in self.owned])
        try:
            while not self.stop.is_set():
                # Block for the first record only, then take what is already there
                # (consume(n, timeout) alone would wait for n records or the timeout).
                first = consumer.poll(0.1)
                if first is None:
                    continue
                batch = [first, *consumer.consume(499, 0)]
                self.loop.call_soon_threadsafe(self.deliver, batch)
        finally:
            consumer.close()

    # -- fan-out -------------------------------------------------------------------

    def deliver(self, batch: list[Any]) -> None:
        prefix_len = len(self.args.topic_prefix)
        for msg in batch:
            if msg.error() is not None:
                continue
            try:
                record = json.loads(msg.value())
            except ValueError:
                continue
            devices = self.sessions.get(record.get("to"))
            if not devices:
                continue
            frame = dumps(
                {
                    "type": "message",
                    "from": record["from"],
                    "from_device": record["from_device"],
                    "to": record["to"],
                    "id": record["id"],
                    "body": record["body"],
                    "partition": int(msg.topic()[prefix_len:]),
                    "offset": msg.offset(),
                    "ts": record["ts"],
                }
            )
            for session in list(devices):
                session.offer(frame)

    # -- the WebSocket side ------------------------------------------------------------

    def check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        target = urlsplit(request.path)
        uid = (parse_qs(target.query).get("uid") or [""])[0]
        if target.path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if not is_valid_uid(uid):
            return connection.respond(HTTPStatus.BAD_REQUEST, '{"error":"bad_uid"}\n')
        if partition_for(uid, self.args.partitions) % self.args.count != self.args.index:
            return connection.respond(
                HTTPStatus.MISDIRECTED_REQUEST, '{"error":"wrong_instance"}\n'
            )
        return None

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        uid = parse_qs(urlsplit(ws.request.path).query)["uid"][0]
        session = Session(self, ws, uid, secrets.token_hex(8))
        await session.run()


class Session:
    def __init__(self, gateway: Gateway, ws: ServerConnection, uid: str, device: str) -> None:
        self.gateway = gateway
        self.ws = ws
        self.uid = uid
        self.device = device
        self.outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)

    def offer(self, frame: str) -> None:
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self.gateway.loop.create_task(self.ws.close(1013, "too far behind"))

    async def run(self) -> None:
        gateway = self.gateway
        k = partition_for(self.uid, gateway.args.partitions)
        gateway.sessions.setdefault(self.uid, set()).add(self)
        writer = asyncio.create_task(self.writer())
        try:
            await self.ws.send(
                dumps(
                    {
                        "type": "welcome",
                        "uid": self.uid,
                        "device": self.device,
                        "partition": k,
                        "instance": f"asyncio-{gateway.args.index}",
                        "offset": None,
                        "resumed": None,
                    }
                )
            )
            async for data in self.ws:
                self.on_frame(data)
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            devices = gateway.sessions.get(self.uid)
            if devices is not None:
                devices.discard(self)
                if not devices:
                    del gateway.sessions[self.uid]

    async def writer(self) -> None:
        while True:
            await self.ws.send(await self.outbox.get())

    def on_frame(self, data: str | bytes) -> None:
        try:
            frame = json.loads(data)
            kind = frame["type"]
        except (ValueError, KeyError, TypeError):
            self.offer(dumps({"type": "error", "id": None, "code": "bad_frame", "message": "?"}))
            return
        if kind == "ping":
            self.offer('{"type":"pong"}')
            return
        msg_id, to = frame.get("id"), frame.get("to")
        if kind != "send" or not isinstance(msg_id, str) or "body" not in frame:
            self.offer(dumps({"type": "error", "id": None, "code": "bad_frame", "message": "?"}))
            return
        if not is_valid_uid(to):
            self.offer(
                dumps({"type": "error", "id": msg_id, "code": "bad_recipient", "message": "?"})
            )
            return
        gateway = self.gateway
        k = partition_for(to, gateway.args.partitions)
        record = dumps(
            {
                "v": 1,
                "from": self.uid,
                "from_device": self.device,
                "to": to,
                "id": msg_id,
                "body": frame["body"],
                "ts": int(time.time() * 1000),
            }
        ).encode()
        loop = gateway.loop

        def on_delivery(err: Any, msg: Any) -> None:
            # librdkafka's poll thread: hand over only.
            if err is None:
                ack = dumps({"type": "ack", "id": msg_id, "partition": k, "offset": msg.offset()})
            else:
                ack = dumps(
                    {"type": "error", "id": msg_id, "code": "unavailable", "message": str(err)}
                )
            loop.call_soon_threadsafe(self.offer, ack)

        try:
            gateway.producer.produce(
                gateway.topic(k),
                value=record,
                key=to.encode(),
                partition=0,
                on_delivery=on_delivery,
            )
        except BufferError:
            self.offer(
                dumps(
                    {"type": "error", "id": msg_id, "code": "unavailable", "message": "queue full"}
                )
            )


async def main(args: argparse.Namespace) -> None:
    gateway = Gateway(args)
    await asyncio.to_thread(gateway.ensure_topics)
    threads = [
        threading.Thread(target=gateway.poll_producer, daemon=True),
        threading.Thread(target=gateway.poll_consumer, daemon=True),
    ]
    for thread in threads:
        thread.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gateway.loop.add_signal_handler(sig, stop.set)
    async with serve(
        gateway.handle,
        "127.0.0.1",
        args.port,
        process_request=gateway.check_request,
        ping_interval=None,
        max_size=65536,
        compression=None,
    ):
        await stop.wait()
    gateway.stop.set()
    await asyncio.to_thread(gateway.producer.flush, 5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--topic-prefix", default="asyncio-peer-topic-")
    # The standard library's loop by default: this is the *plain* asyncio reference.
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
