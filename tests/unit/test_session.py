"""The session shell's timing, on trio's virtual clock: send deadlines, token expiry, the hand-off.

A fake connection stands in for the socket, so each test runs in
milliseconds of real time whatever the deadlines are.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from linechatd.auth import Identity
from linechatd.config import parse_config
from linechatd.kafka import DeliveryReceipt, _resolve_all
from linechatd.metrics import Metrics
from linechatd.protocol import CloseCode, HandshakeParams
from linechatd.ratelimit import TokenBucket
from linechatd.session import Session
from linechatd.websocket import ConnectionClosed

SEND_TIMEOUT_S = 10.0


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class FakeConnection:
    """The parts of websocket.Connection a session uses; ``stalled`` makes sends block."""

    def __init__(self) -> None:
        self.frame_hook: Any = None
        self.read_at = time.perf_counter()
        self.sent: list[dict[str, Any]] = []
        # write_many_now() calls: system calls, on a real socket.
        self.writes = 0
        self.stalled = False
        self.closed: tuple[int, str] | None = None
        self.closed_at: float | None = None
        self.closed_code: int | None = None
        self._incoming_send, self._incoming = trio.open_memory_channel[str](100)

    @property
    def can_write_now(self) -> bool:
        return not self.stalled

    @property
    def unflushed(self) -> bool:
        return False

    def write_many_now(self, texts: list[str | bytes]) -> None:
        self.writes += 1
        self.sent.extend(json.loads(text) for text in texts)

    async def flush(self) -> None:
        pass

    async def send(self, text: str | bytes) -> None:
        if self.stalled:
            await trio.sleep_forever()
        self.sent.append(json.loads(text))

    async def receive(self) -> str:
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            self.closed_code = 1000
            raise ConnectionClosed(1000, "bye") from None

    def client_sends(self, frame: dict[str, Any]) -> None:
        self._incoming_send.send_nowait(json.dumps(frame))

    def client_closes(self) -> None:
        self._incoming_send.close()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (int(code), reason)
        self.closed_at = trio.current_time()

    @property
    def closed_locally(self) -> bool:
        return self.closed is not None

    async def wait_peer_gone(self) -> None:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        pass


class FakeProducer:
    def __init__(self) -> None:
        self.receipts: list[DeliveryReceipt] = []

    def send(self, topic: str, key: bytes, value: bytes) -> DeliveryReceipt:
        receipt = DeliveryReceipt()
        self.receipts.append(receipt)
        return receipt

    def serve_due(self) -> None:
        pass


class FakeSeat:
    replay_hub: Any = None

    def __init__(self) -> None:
        self.left: list[Session] = []

    def leave(self, session: Session) -> None:
        self.left.append(session)


def make_session(
    conn: FakeConnection, *, expires_at: float | None = None
) -> tuple[Session, FakeProducer]:
    config = parse_config(
        {
            "zookeeper": {"hosts": "127.0.0.1:2181"},
            "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
            "cluster": {"partitions": 8},
            "limits": {"send_timeout_s": SEND_TIMEOUT_S, "outbound_queue_messages": 5},
        }
    )
    producer = FakeProducer()
    ctx = SimpleNamespace(
        config=SimpleNamespace(value=config),
        metrics=Metrics(),
        producer=producer,
        info=SimpleNamespace(instance="gw-test"),
        partitions=8,
        topic=lambda k: f"topic-{k}",
    )
    session = Session(
        conn=conn,  # type: ignore[arg-type]
        params=HandshakeParams(uid="alice", device="d1", token=None, resume=None),
        identity=Identity("alice", expires_at),
        partition=3,
        ctx=ctx,  # type: ignore[arg-type]
        send_bucket=TokenBucket(100, 200, trio.current_time()),
    )
    session.join(0)
    return session, producer


async def run_until_closed(session: Session, seat: FakeSeat) -> None:
    with trio.fail_after(3600):  # virtual seconds
        await session.run(seat)  # type: ignore[arg-type]


async def test_a_socket_that_never_takes_the_welcome_closes_with_1013_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    conn.stalled = True
    session, _producer = make_session(conn)
    seat = FakeSeat()
    started = trio.current_time()
    await run_until_closed(session, seat)
    assert conn.closed is not None and conn.closed[0] == CloseCode.BEHIND
    assert conn.closed_at == pytest.approx(started + SEND_TIMEOUT_S)
    assert seat.left == [session]


async def test_a_backlog_the_socket_does_not_take_closes_with_1013_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    session, _producer = make_session(conn)
    seat = FakeSeat()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_closed, session, seat)
        await trio.testing.wait_all_tasks_blocked()
        assert [f["type"] for f in conn.sent] == ["welcome"]
        conn.stalled = True
        stalled_at = trio.current_time()
        session.offer(0, json.dumps({"type": "message", "offset": 0}))
        # The writer holds that frame until the deadline; nothing else is written.
    assert conn.closed is not None and conn.closed[0] == CloseCode.BEHIND
    assert conn.closed_at == pytest.approx(stalled_at + SEND_TIMEOUT_S)


async def test_a_full_outbox_closes_with_1013_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    session, _producer = make_session(conn)
    seat = FakeSeat()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_closed, session, seat)
        await trio.testing.wait_all_tasks_blocked()
        conn.stalled = True
        full_at = trio.current_time()
        for offset in range(7):  # the outbox holds 5 (and the writer one)
            session.offer(offset, json.dumps({"type": "message", "offset": offset}))
    assert conn.closed is not None and conn.closed[0] == CloseCode.BEHIND
    assert conn.closed_at == full_at


async def test_an_expiring_token_closes_with_4401_when_it_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    session, _producer = make_session(conn, expires_at=time.time() + 300)
    seat = FakeSeat()
    started = trio.current_time()
    await run_until_closed(session, seat)
    assert conn.closed is not None and conn.closed[0] == CloseCode.TOKEN_EXPIRED
    assert conn.closed_at is not None
    assert 299 <= conn.closed_at - started <= 301


async def test_acks_follow_the_delivery_reports_in_send_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    session, producer = make_session(conn)
    seat = FakeSeat()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_closed, session, seat)
        for n in range(2):
            conn.client_sends({"type": "send", "id": f"m{n}", "to": "bob", "body": n})
        await trio.testing.wait_all_tasks_blocked()
        assert len(producer.receipts) == 2
        hand_over(producer.receipts[1], 41)
        assert [f["type"] for f in conn.sent] == ["welcome"]
        hand_over(producer.receipts[0], 40)
        assert [(f["type"], f.get("id"), f.get("offset")) for f in conn.sent[1:]] == [
            ("ack", "m0", 40),
            ("ack", "m1", 41),
        ]
        conn.client_closes()
    assert conn.closed is None, "a peer that closed is not closed again"
    assert seat.left == [session]


async def test_the_acks_of_one_hand_over_leave_in_one_write_and_are_timed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    session, producer = make_session(conn)
    seat = FakeSeat()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_closed, session, seat)
        for n in range(3):
            conn.client_sends({"type": "send", "id": f"m{n}", "to": "bob", "body": n})
        await trio.testing.wait_all_tasks_blocked()
        writes = conn.writes
        _resolve_all([(receipt, None, 40 + n) for n, receipt in enumerate(producer.receipts)], 0.0)
        assert conn.writes == writes + 1
        assert [f.get("id") for f in conn.sent[-3:]] == ["m0", "m1", "m2"]
        conn.client_closes()
    samples = {
        s.labels["stage"]: s.value
        for family in session._ctx.metrics.residence.collect()
        for s in family.samples
        if s.name.endswith("_count")
    }
    assert samples == {"read_to_produce": 3, "report_to_ack": 3, "fetch_to_write": 0}


def hand_over(receipt: DeliveryReceipt, offset: int) -> None:
    """One delivery report, resolved as the producer's poll does."""
    _resolve_all([(receipt, None, offset)], time.perf_counter())


async def test_a_partition_that_stops_closes_its_sessions_with_1012(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    session, _producer = make_session(conn)
    seat = FakeSeat()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until_closed, session, seat)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # what losing the lease does to the partition's nursery
    assert conn.closed is not None and conn.closed[0] == CloseCode.MOVED


async def test_a_frame_offered_while_the_session_is_ending_is_not_an_error() -> None:
    """Its nursery closed, its task not yet resumed to finish: a frame the
    socket cannot take at once starts no writer (and does not fail the
    partition's delivery)."""
    conn = FakeConnection()
    session, _producer = make_session(conn)
    async with trio.open_nursery() as ended:
        pass
    session._nursery = ended
    conn.stalled = True
    session.offer(0, json.dumps({"type": "message", "offset": 0}))
    assert not session._writer_active
