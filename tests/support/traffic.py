"""Steady chat traffic through real gateways, and the books that prove nothing was lost.

``Traffic`` runs ``pairs`` sender/recipient pairs of ``ChatClient``s, each
sender sending one message at a time and resending it with the same id until
it is acked (as a real client does after ``unavailable``). It records every
ack and every delivery, so that a test can assert, whatever it did to the
cluster meanwhile: every acked message reached its recipient (``lost()``),
no device session got an offset it already had (``offsets_repeated``), and
per-sender order held.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from linechatd.client import ChatClient, SendFailed

__all__ = ["Traffic", "TrafficReport"]


@dataclass
class TrafficReport:
    sent: int  # sends answered with an ack
    refused: int  # answers other than an ack or unavailable, each resent
    unavailable: int  # "unavailable" answers (the client resends by itself)
    lost: list[str]  # "sender -> recipient #seq" acked but never delivered
    offsets_repeated: int  # offsets a device got again (must be 0)
    out_of_order: int  # messages of one sender delivered out of send order
    reconnects: int  # connections beyond the first, all clients together
    ack_gaps: list[float] = field(default_factory=list)  # longest wait for one ack, per sender

    def summary(self) -> str:
        return (
            f"acked {self.sent}, unavailable {self.unavailable}, refused {self.refused}, lost {len(self.lost)}, "
            f"offsets repeated {self.offsets_repeated}, out of order {self.out_of_order}, "
            f"reconnects {self.reconnects}, longest ack wait {max(self.ack_gaps, default=0):.2f} s"
        )


class Traffic:
    def __init__(
        self, http_urls: Sequence[str], pairs: int, prefix: str, *, pause_s: float = 0.02
    ) -> None:
        self._urls = list(http_urls)
        self.pause_s = pause_s
        self.senders = [
            ChatClient(self._urls, f"{prefix}-s{i}", initial_backoff_s=0.05, max_backoff_s=1.0)
            for i in range(pairs)
        ]
        self.recipients = [
            ChatClient(self._urls, f"{prefix}-r{i}", initial_backoff_s=0.05, max_backoff_s=1.0)
            for i in range(pairs)
        ]
        # recipient uid -> seqs acked to it, in order; and delivered to it, in arrival order
        self.acked: dict[str, list[int]] = defaultdict(list)
        self.delivered: dict[str, list[int]] = defaultdict(list)
        self.refused = 0
        self.ack_gaps = [0.0] * pairs
        self.progress = trio.Event()  # set (and replaced) on every ack
        self._arrival = trio.Event()  # set (and replaced) on every delivery
        self._stop = trio.Event()
        self._sending = 0
        self._senders_done = trio.Event()

    @property
    def unavailable(self) -> int:
        return sum(c.unavailable_answers for c in self.senders)

    @property
    def sent(self) -> int:
        return sum(len(v) for v in self.acked.values())

    async def run(
        self, *, task_status: trio.TaskStatus[Traffic] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect everyone, then send until ``stop()``; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            for client in (*self.senders, *self.recipients):
                await nursery.start(client.run)
            for recipient in self.recipients:
                nursery.start_soon(self._receive, recipient)
            self._sending = len(self.senders)
            for i in range(len(self.senders)):
                nursery.start_soon(self._send, i)
            task_status.started(self)

    async def _send(self, i: int) -> None:
        client, to = self.senders[i], self.recipients[i].uid
        seq = 0
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                while True:
                    try:
                        await client.send(to, {"seq": seq}, id=f"{client.uid}-{seq}", timeout_s=120)
                        break
                    except SendFailed:
                        self.refused += 1
                        await trio.sleep(0.05)
                self.ack_gaps[i] = max(self.ack_gaps[i], time.monotonic() - started)
                self.acked[to].append(seq)
                self.progress.set()
                self.progress = trio.Event()
                seq += 1
                await trio.sleep(self.pause_s)
        finally:
            self._sending -= 1
            if not self._sending:
                self._senders_done.set()

    async def _receive(self, client: ChatClient) -> None:
        async for message in client.messages():
            self.delivered[client.uid].append(int(message.body["seq"]))
            self._arrival.set()
            self._arrival = trio.Event()

    async def acks(self, count: int) -> None:
        """Until ``count`` more sends were acked (all senders together)."""
        goal = self.sent + count
        while self.sent < goal:
            await self.progress.wait()

    async def every_pair_delivers(self) -> None:
        """Until every recipient got at least one more message than it had when called."""
        had = {r.uid: len(self.delivered[r.uid]) for r in self.recipients}
        while any(len(self.delivered[uid]) <= n for uid, n in had.items()):
            await self._arrival.wait()

    async def stop(self, settle_s: float = 60.0) -> TrafficReport:
        """Stop sending, wait for every acked message to arrive (bounded), and report."""
        self._stop.set()
        await self._senders_done.wait()
        with trio.move_on_after(settle_s):
            while any(len(set(self.delivered[to])) < len(seqs) for to, seqs in self.acked.items()):
                await self._arrival.wait()
        lost = []
        out_of_order = 0
        for i, recipient in enumerate(self.recipients):
            got = self.delivered[recipient.uid]
            missing = sorted(set(self.acked[recipient.uid]) - set(got))
            lost += [f"{self.senders[i].uid} -> {recipient.uid} #{seq}" for seq in missing]
            out_of_order += sum(1 for a, b in zip(got, got[1:], strict=False) if b < a)
        clients = [*self.senders, *self.recipients]
        return TrafficReport(
            sent=self.sent,
            refused=self.refused,
            unavailable=self.unavailable,
            lost=lost,
            offsets_repeated=sum(c.offsets_repeated for c in clients),
            out_of_order=out_of_order,
            reconnects=sum(max(0, c.connections - 1) for c in clients),
            ack_gaps=list(self.ack_gaps),
        )
