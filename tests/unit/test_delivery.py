"""The session core's rules (linechatd.delivery), without sockets, tasks or real time."""

from __future__ import annotations

import json
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from linechatd.delivery import CoreLimits, ProduceRequest, SessionCore, SessionPhase
from linechatd.hashing import partition_for
from linechatd.protocol import ChatRecord, CloseCode, decode_record, encode_message
from linechatd.ratelimit import TokenBucket

PARTITIONS = 8
WALL_MS = 1_700_000_000_000


@dataclass
class FakeReport:
    resolved: bool = False
    offset: int = -1
    error: str | None = None


def record_frame(offset: int) -> str:
    chat = ChatRecord("bob", "d1", "alice", f"m{offset}", {"n": offset}, WALL_MS)
    return encode_message(chat, 3, offset)


def new_core(
    *,
    resume: int | None = None,
    live_from: int = 0,
    outbox_frames: int = 1024,
    rate: float = 100.0,
    burst: int = 200,
    bad_frames: int = 10,
) -> SessionCore:
    core = SessionCore(
        uid="alice",
        device="d1",
        resume=resume,
        partitions=PARTITIONS,
        limits=CoreLimits(outbox_frames=outbox_frames, bad_frames_per_minute=bad_frames),
        send_bucket=TokenBucket(rate, burst, 0.0),
        now=0.0,
    )
    core.start(live_from)
    return core


def drain(core: SessionCore) -> list[dict[str, object]]:
    frames = []
    while (frame := core.next_frame()) is not None:
        frames.append(json.loads(frame))
    return frames


def send(msg_id: str, to: str = "bob") -> str:
    return json.dumps({"type": "send", "id": msg_id, "to": to, "body": {"text": msg_id}})


# -- the rules one by one ---------------------------------------------------------------


def test_live_frames_wait_for_the_greeting_then_go_in_order() -> None:
    core = new_core(live_from=10)
    core.offer(10, record_frame(10))
    core.offer(11, record_frame(11))
    assert core.next_frame() is None, "nothing goes out before the welcome and replay"
    core.go_live()
    assert [f["offset"] for f in drain(core)] == [10, 11]


def test_a_resumed_device_never_gets_an_offset_at_or_below_its_cursor() -> None:
    # A new owner started live delivery at 41 (the committed hint) while the
    # device already has 42: 41 and 42 must not reach it again.
    core = new_core(resume=42, live_from=41)
    core.go_live()
    for offset in (41, 42, 43):
        core.offer(offset, record_frame(offset))
    assert [f["offset"] for f in drain(core)] == [43]
    # And the replay has nothing to send in (42, 41).
    assert not core.replayed(41)
    assert not core.replayed(42)


def test_replay_covers_resume_to_live_split_each_once() -> None:
    core = new_core(resume=4, live_from=8)
    assert [o for o in (3, 4, 5, 5, 6, 7, 8, 9) if core.replayed(o)] == [5, 6, 7]


def test_live_records_below_the_split_or_repeated_are_dropped() -> None:
    core = new_core(live_from=5)
    core.go_live()
    for offset in (3, 5, 5, 4, 6, 6, 7):
        core.offer(offset, record_frame(offset))
    assert [f["offset"] for f in drain(core)] == [5, 6, 7]


def test_a_full_outbox_closes_with_1013_and_queues_nothing_more() -> None:
    core = new_core(outbox_frames=3)
    core.go_live()
    for offset in range(3):
        core.offer(offset, record_frame(offset))
    assert core.closing is None
    core.offer(3, record_frame(3))
    assert core.closing is not None and core.closing.code == CloseCode.BEHIND
    assert core.phase is SessionPhase.CLOSING
    assert core.next_frame() is None
    assert core.on_frame(send("late"), 0.0, WALL_MS) is None


def test_the_outbox_is_bounded_in_characters_too() -> None:
    core = SessionCore(
        uid="alice",
        device="d1",
        resume=None,
        partitions=PARTITIONS,
        limits=CoreLimits(outbox_frames=1000, bad_frames_per_minute=10, outbox_bytes=100),
        send_bucket=TokenBucket(100, 200, 0.0),
        now=0.0,
    )
    core.start(0)
    core.offer(None, "x" * 200)  # one big frame alone always fits
    assert core.closing is None
    core.offer(None, "y")
    assert core.closing is not None and core.closing.code == CloseCode.BEHIND


def test_a_send_becomes_a_record_for_the_recipients_partition() -> None:
    core = new_core()
    request = core.on_frame(send("m1", "carol"), 0.0, WALL_MS)
    assert isinstance(request, ProduceRequest) and not request.group
    [out] = request.records
    assert out.partition == partition_for("carol", PARTITIONS)
    assert out.key == b"carol" and out.to == ("carol",)
    record = decode_record(out.value)
    # The sender is who authenticated, whatever the frame says.
    assert (record.from_uid, record.from_device, record.to, record.id) == (
        "alice",
        "d1",
        "carol",
        "m1",
    )
    assert record.ts == WALL_MS


def test_sends_to_many_recipients_name_each_recipients_partition() -> None:
    # More distinct recipients than the core remembers partitions for, twice over.
    core = new_core(rate=1000.0, burst=1000)
    uids = [f"u{n}" for n in range(150)] * 2
    for n, uid in enumerate(uids):
        request = core.on_frame(send(f"m{n}", to=uid), 0.0, WALL_MS)
        assert request is not None
        [record] = request.records
        assert record.partition == partition_for(uid, PARTITIONS), uid


def test_acks_go_out_in_send_order_whatever_order_reports_arrive_in() -> None:
    core = new_core()
    core.go_live()
    reports = []
    for n in range(3):
        request = core.on_frame(send(f"m{n}"), 0.0, WALL_MS)
        assert request is not None
        report = FakeReport()
        core.produced(request, [report])
        reports.append(report)
    reports[2].resolved, reports[2].offset = True, 12
    core.on_report()
    assert drain(core) == [], "m2 waits for m0 and m1"
    reports[0].resolved, reports[0].offset = True, 10
    core.on_report()
    assert [f["id"] for f in drain(core)] == ["m0"]
    reports[1].resolved, reports[1].error = True, "Local: Message timed out"
    core.on_report()
    frames = drain(core)
    assert [(f["type"], f["id"]) for f in frames] == [("error", "m1"), ("ack", "m2")]
    assert frames[0]["code"] == "unavailable"
    assert "timed out" not in str(frames[0]["message"]), "broker internals stay in the logs"
    assert core.in_flight == 0


def test_reading_stops_at_the_in_flight_bound() -> None:
    core = SessionCore(
        uid="alice",
        device="d1",
        resume=None,
        partitions=PARTITIONS,
        limits=CoreLimits(outbox_frames=100, bad_frames_per_minute=10, max_in_flight=2),
        send_bucket=TokenBucket(100, 200, 0.0),
        now=0.0,
    )
    core.start(0)
    reports = []
    for n in range(2):
        request = core.on_frame(send(f"m{n}"), 0.0, WALL_MS)
        assert request is not None
        reports.append(FakeReport())
        core.produced(request, [reports[-1]])
    assert not core.reading_allowed
    reports[0].resolved = True
    core.on_report()
    assert core.reading_allowed


def test_sends_over_the_rate_are_refused_and_sustained_flooding_closes() -> None:
    core = new_core(rate=1.0, burst=2)
    core.go_live()
    assert core.on_frame(send("a"), 0.0, WALL_MS) is not None
    assert core.on_frame(send("b"), 0.0, WALL_MS) is not None
    assert core.on_frame(send("c"), 0.0, WALL_MS) is None
    assert drain(core)[-1]["code"] == "rate_limited"
    # One token a second: a second later one send passes again.
    assert core.on_frame(send("d"), 1.0, WALL_MS) is not None
    # More refused sends in a minute than a whole burst (2): 1008.
    for n in range(3):
        core.on_frame(send(f"x{n}"), 1.0, WALL_MS)
    assert core.closing is not None and core.closing.code == CloseCode.POLICY


def test_bad_frames_are_answered_and_too_many_close_with_1008() -> None:
    core = new_core(bad_frames=2)
    core.go_live()
    core.on_frame("not json", 0.0, WALL_MS)
    core.on_frame(b"\x00binary", 0.0, WALL_MS)
    assert [f["code"] for f in drain(core)] == ["bad_frame", "bad_frame"]
    assert core.closing is None
    core.on_frame('{"type": "nope"}', 0.0, WALL_MS)
    assert core.closing is not None and core.closing.code == CloseCode.POLICY
    # A minute later the count starts over (a fresh core: the first close won).
    core = new_core(bad_frames=2)
    for t in (0.0, 1.0, 61.5, 62.0):
        core.on_frame("{", t, WALL_MS)
    assert core.closing is None


def test_the_frame_budget_allows_bursts_of_twice_the_rate_then_closes_with_1008() -> None:
    core = SessionCore(
        uid="alice",
        device="d1",
        resume=None,
        partitions=PARTITIONS,
        limits=CoreLimits(outbox_frames=100, bad_frames_per_minute=10, max_frames_per_s=10),
        send_bucket=TokenBucket(100, 200, 0.0),
        now=0.0,
    )
    core.start(0)
    assert all(core.frame_arrived(0.0) for _ in range(20)), "a burst of twice the rate"
    assert core.frame_arrived(0.1), "one more after a tenth of a second at 10/s"
    assert not core.frame_arrived(0.1)
    assert core.closing is not None and core.closing.code == CloseCode.POLICY
    assert not core.frame_arrived(5.0), "a closing session reads nothing more"


def test_a_client_at_its_send_rate_never_meets_the_frame_budget() -> None:
    # Defaults: 100 sends/s (burst 200) against 200 frames/s (burst 400).
    core = SessionCore(
        uid="alice",
        device="d1",
        resume=None,
        partitions=PARTITIONS,
        limits=CoreLimits(outbox_frames=10_000, bad_frames_per_minute=10),
        send_bucket=TokenBucket(100, 200, 0.0),
        now=0.0,
    )
    core.start(0)
    t = 0.0
    for n in range(2000):  # 20 s at 100/s, plus a ping every 10 frames
        t += 0.01
        assert core.frame_arrived(t)
        assert core.on_frame(send(f"m{n}"), t, WALL_MS) is not None
        if n % 10 == 0:
            assert core.frame_arrived(t)
    assert core.closing is None


def test_silence_closes_with_1000_at_the_idle_timeout() -> None:
    core = SessionCore(
        uid="alice",
        device="d1",
        resume=None,
        partitions=PARTITIONS,
        limits=CoreLimits(outbox_frames=100, bad_frames_per_minute=10, idle_timeout_s=60),
        send_bucket=TokenBucket(100, 200, 0.0),
        now=0.0,
    )
    core.start(0)
    assert core.idle_deadline == 60.0
    core.frame_arrived(30.0)
    core.check_idle(89.0)
    assert core.closing is None
    core.check_idle(90.0)
    assert core.closing is not None and core.closing.code == CloseCode.NORMAL


def test_pings_are_answered_with_pongs() -> None:
    core = new_core()
    core.go_live()
    assert core.on_frame('{"type":"ping"}', 0.0, WALL_MS) is None
    assert drain(core) == [{"type": "pong"}]


def test_the_first_close_wins() -> None:
    core = new_core()
    assert core.close(CloseCode.TOKEN_EXPIRED, "token expired")
    assert not core.close(CloseCode.MOVED, "partition moved")
    assert core.closing is not None and core.closing.code == CloseCode.TOKEN_EXPIRED


def test_the_live_split_is_fixed_once() -> None:
    core = new_core(live_from=3)
    with pytest.raises(RuntimeError):
        core.start(4)


# -- the rules together, under random event sequences ------------------------------------


class SessionCoreMachine(RuleBasedStateMachine):
    """Random interleavings of live offers, replay, sends, reports and reads."""

    def __init__(self) -> None:
        super().__init__()
        self.core: SessionCore | None = None
        self.written: list[dict[str, object]] = []
        self.reports: list[tuple[str, FakeReport]] = []
        self.sent_ids: list[str] = []
        self.next_offset = 0
        self.resume: int | None = None
        self.live_from = 0
        self.outbox_frames = 0

    @rule(
        resume=st.one_of(st.none(), st.integers(-1, 30)),
        live_from=st.integers(0, 30),
        outbox=st.integers(1, 40),
    )
    @precondition(lambda self: self.core is None)
    def begin(self, resume: int | None, live_from: int, outbox: int) -> None:
        self.resume, self.live_from, self.outbox_frames = resume, live_from, outbox
        self.core = new_core(resume=resume, live_from=live_from, outbox_frames=outbox)
        self.next_offset = live_from

    @rule(offset=st.integers(0, 30))
    @precondition(lambda self: self.core is not None and self.core.phase is SessionPhase.GREETING)
    def replay_one(self, offset: int) -> None:
        assert self.core is not None
        if self.core.replayed(offset):
            self.written.append(json.loads(record_frame(offset)))

    @rule()
    @precondition(lambda self: self.core is not None)
    def go_live(self) -> None:
        assert self.core is not None
        self.core.go_live()

    @rule(step=st.integers(-3, 3))
    @precondition(lambda self: self.core is not None)
    def offer_live(self, step: int) -> None:
        # Mostly the next offset; sometimes one again or an older one (a refetch).
        assert self.core is not None
        offset = max(0, self.next_offset + min(step, 1))
        self.next_offset = max(self.next_offset, offset + 1)
        backlog = self.core.backlog
        closed_before = self.core.closing is not None
        self.core.offer(offset, record_frame(offset))
        if not closed_before and self.core.backlog == backlog and self.core.closing is not None:
            assert backlog >= self.outbox_frames
            assert self.core.closing.code == CloseCode.BEHIND

    @rule(n=st.integers(0, 1000))
    @precondition(lambda self: self.core is not None)
    def client_sends(self, n: int) -> None:
        assert self.core is not None
        msg_id = f"s{len(self.sent_ids)}"
        request = self.core.on_frame(send(msg_id), 0.0, WALL_MS)
        if request is not None:
            self.sent_ids.append(msg_id)
            report = FakeReport()
            self.core.produced(request, [report])
            self.reports.append((msg_id, report))

    @rule(data=st.data())
    @precondition(lambda self: self.core is not None and self.reports)
    def a_report_arrives(self, data: st.DataObject) -> None:
        assert self.core is not None
        pending = [r for _id, r in self.reports if not r.resolved]
        if not pending:
            return
        report = data.draw(st.sampled_from(pending))
        report.resolved = True
        if data.draw(st.booleans()):
            report.offset = 100
        else:
            report.error = "timed out"
        self.core.on_report()

    @rule(count=st.integers(1, 10))
    @precondition(lambda self: self.core is not None)
    def socket_takes(self, count: int) -> None:
        assert self.core is not None
        for _ in range(count):
            frame = self.core.next_frame()
            if frame is None:
                break
            self.written.append(json.loads(frame))

    @invariant()
    def record_offsets_strictly_grow_and_respect_the_cursor(self) -> None:
        offsets = [int(str(f["offset"])) for f in self.written if f.get("type") == "message"]
        assert offsets == sorted(set(offsets)), offsets
        if self.resume is not None:
            assert all(o > self.resume for o in offsets)
        # Replayed ones are below the split, live ones at or above it.
        assert all(o >= 0 for o in offsets)

    @invariant()
    def answers_come_in_send_order(self) -> None:
        answered = [
            str(f["id"])
            for f in self.written
            if f.get("type") in ("ack", "error") and str(f.get("id", "")).startswith("s")
        ]
        assert answered == self.sent_ids[: len(answered)]

    @invariant()
    def the_outbox_never_exceeds_its_bound(self) -> None:
        if self.core is not None:
            assert self.core.backlog <= self.outbox_frames


TestSessionCoreMachine = SessionCoreMachine.TestCase
TestSessionCoreMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def test_a_group_send_writes_one_record_per_partition_and_one_ack_naming_each() -> None:
    core = new_core()
    core.go_live()
    to = [f"user{n}" for n in range(10)]
    frame = json.dumps({"type": "send", "id": "g1", "to": to, "body": {"t": 1}})
    request = core.on_frame(frame, 0.0, WALL_MS)
    assert isinstance(request, ProduceRequest) and request.group
    partitions = {partition_for(uid, PARTITIONS) for uid in to}
    assert len(request.records) == len(partitions), "one record per partition touched"
    assert sorted(uid for r in request.records for uid in r.to) == sorted(to)
    for record in request.records:
        assert {partition_for(uid, PARTITIONS) for uid in record.to} == {record.partition}
        stored = decode_record(record.value)
        assert stored.to == record.to and stored.recipients == tuple(to)
        assert stored.from_uid == "alice" and record.key == b"*"
    reports = [FakeReport() for _ in request.records]
    core.produced(request, reports)
    for n, report in enumerate(reports):
        report.resolved, report.offset = True, 100 + n
        core.on_report()
        if n < len(reports) - 1:
            assert drain(core) == [], "acked only once every record is durable"
    [ack] = drain(core)
    assert ack["type"] == "ack" and ack["id"] == "g1"
    assert [(a["partition"], a["offset"], a["to"]) for a in ack["acks"]] == [
        (r.partition, 100 + n, list(r.to)) for n, r in enumerate(request.records)
    ]


def test_a_group_send_with_one_record_refused_is_unavailable_as_a_whole() -> None:
    core = new_core()
    core.go_live()
    frame = json.dumps({"type": "send", "id": "g1", "to": ["a1", "b2", "c3"], "body": 1})
    request = core.on_frame(frame, 0.0, WALL_MS)
    assert request is not None
    reports = [FakeReport(resolved=True, offset=5) for _ in request.records]
    reports[-1].error = "Local: Message timed out"
    core.produced(request, reports)
    core.on_report()
    [answer] = drain(core)
    assert (answer["type"], answer["id"], answer["code"]) == ("error", "g1", "unavailable")


def test_a_bad_recipient_list_writes_nothing() -> None:
    core = new_core()
    core.go_live()
    frame = json.dumps({"type": "send", "id": "g1", "to": ["a", "a"], "body": 1})
    assert core.on_frame(frame, 0.0, WALL_MS) is None
    [answer] = drain(core)
    assert (answer["code"], answer["id"]) == ("bad_recipient", "g1")
