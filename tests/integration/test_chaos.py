"""Chaos under traffic: SIGKILL one instance, SIGTERM another, start a new one.

40 clients send continuously, each to the next one. At the end: no acked
message lost, no duplicate seen by the application after the client's
dedupe, per-sender order preserved; every partition of the killed and of the
drained instance started on another one, and every client of those
partitions reconnected. Takeover times are printed. The senders' pauses are
random (LINECHAT_TEST_SEED_CHAOS replays a run's seed, see support/seeds.py).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import trio
from support.cluster import ClusterNames, GatewayProcess, http_get, start_cluster
from support.leasekit import wait_balanced
from support.seeds import seeded_random

from linechatd.client import ChatClient, SendFailed
from linechatd.hashing import partition_for

CLIENTS = 40
PARTITIONS = 8
SESSION_TIMEOUT_S = 3.0


def _events(gateway: GatewayProcess, name: str) -> list[dict]:
    out = []
    for line in gateway.log_text().splitlines():
        if line.startswith("{") and f'"event":"{name}"' in line:
            out.append(json.loads(line))
    return out


def _takeovers(
    gateways: list[GatewayProcess], after: float, partitions: set[int]
) -> dict[int, float]:
    """Seconds from ``after`` until each partition started on a surviving owner."""
    result: dict[int, float] = {}
    for gateway in gateways:
        for event in _events(gateway, "partition_started"):
            k = event["partition"]
            if k in partitions and event["ts"] >= after:
                result[k] = min(result.get(k, float("inf")), event["ts"] - after)
    return result


def _loss_report(
    to: str,
    sender: str,
    seq: int,
    offset: int,
    arrivals: list[tuple[int, float]],
    gateways: list[GatewayProcess],
) -> str:
    """What the recipient saw around a lost offset, and what the gateways logged about it."""
    lines = [f"LOST {sender} -> {to} seq {seq} at offset {offset}"]
    near = [(o, round(t, 3)) for o, t in arrivals if abs(o - offset) <= 40]
    lines.append(f"  arrivals near it (offset, s): {near}")
    for gateway in gateways:
        for line in gateway.log_text().splitlines():
            if line.startswith("{") and (f'"uid":"{to}"' in line or '"partition_st' in line):
                lines.append(f"  {gateway.instance_id}: {line[:300]}")
    return "\n".join(lines)


async def test_chaos_no_acked_message_lost(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    rng = seeded_random("chaos", 20261129)
    sections = {
        "zookeeper": {"session_timeout": SESSION_TIMEOUT_S},
        "log": {"format": "json"},
        "shutdown": {"grace_period_s": 10.0, "drain_stagger_s": 0.1},
        "partitions": {"rebalance_pause_s": 0.05},
        "limits": {"sends_per_second": 1000.0, "send_burst": 1000},
    }
    async with start_cluster(
        3,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=PARTITIONS,
        sections=sections,
    ) as cluster:
        urls = [g.http_url for g in cluster.instances]
        clients = [
            ChatClient(
                rng.sample(urls, len(urls)), f"user-{i}", initial_backoff_s=0.05, max_backoff_s=1.0
            )
            for i in range(CLIENTS)
        ]
        # recipient -> (seq, id, acked offset)
        acked: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
        acks_by_sender = [0] * CLIENTS
        traffic = trio.Event()  # set (and replaced) on every ack
        # recipient -> (sender, seq)
        received: dict[str, list[tuple[str, int]]] = defaultdict(list)
        # recipient -> (offset, seconds since the start) of each message, in arrival order
        arrivals: dict[str, list[tuple[int, float]]] = defaultdict(list)
        started_at = time.time()
        stop_sending = trio.Event()
        senders_done = trio.Event()
        sending = CLIENTS
        sent_total = 0

        async def sender(i: int) -> None:
            nonlocal sent_total, sending
            try:
                await send_until_stopped(i)
            finally:
                sending -= 1
                if not sending:
                    senders_done.set()

        async def send_until_stopped(i: int) -> None:
            nonlocal sent_total
            client, to = clients[i], f"user-{(i + 1) % CLIENTS}"
            seq = 0
            while not stop_sending.is_set():
                msg_id = f"{client.device}-{seq}"
                while True:
                    try:
                        ack = await client.send(to, {"seq": seq}, id=msg_id, timeout_s=20)
                        break
                    except (SendFailed, trio.TooSlowError):
                        # Not acked: resend with the same id (the recipient dedupes).
                        await trio.sleep(0.05)
                acked[to].append((seq, msg_id, ack.offset))
                sent_total += 1
                acks_by_sender[i] += 1
                traffic.set()
                seq += 1
                await trio.sleep(rng.uniform(0.01, 0.05))

        async def receiver(i: int) -> None:
            client = clients[i]
            async for message in client.messages():
                received[client.uid].append((message.from_uid, message.body["seq"]))
                arrivals[client.uid].append((message.offset, time.time() - started_at))

        async def every_sender_acked(more: int) -> None:
            """Until every sender has ``more`` acks beyond its count now."""
            nonlocal traffic
            goal = [n + more for n in acks_by_sender]
            while any(n < g for n, g in zip(acks_by_sender, goal, strict=True)):
                traffic = trio.Event()
                await traffic.wait()

        with trio.fail_after(180):
            # Partitions settled first: the chaos below is then the only thing moving them.
            await wait_balanced(cluster, PARTITIONS)
            async with trio.open_nursery() as nursery:
                for client in clients:
                    await nursery.start(client.run)
                for i in range(CLIENTS):
                    nursery.start_soon(receiver, i)
                    nursery.start_soon(sender, i)

                await every_sender_acked(5)
                victim, drained = cluster[0], cluster[1]
                # What it serves at the moment of the kill (it may have started and
                # given back others while the cluster settled).
                _status, _headers, view = await http_get(victim.http_url + "/api/status")
                victim_partitions = {p["partition"] for p in view["partitions"]}
                assert victim_partitions, (
                    "the victim must hold partitions for its kill to test anything"
                )
                killed_at = time.time()
                victim.kill()
                await trio.sleep(2)
                drained_at = time.time()
                drained.terminate()
                await trio.sleep(1)
                newcomer = cluster.add_instance()
                await newcomer.wait_ready(30)
                assert await drained.wait_exit(30) == 0
                # The two left share every partition, and traffic flows to all of them.
                await wait_balanced(cluster, PARTITIONS)
                await every_sender_acked(5)
                stop_sending.set()
                # Every send still in flight gets its answer first: an ack
                # arriving after the check below would count as a loss.
                await senders_done.wait()
                # Let the last acked messages arrive.
                deadline = trio.current_time() + 30
                while trio.current_time() < deadline:
                    if all(len(received[to]) >= len(acked[to]) for to in acked):
                        break
                    await trio.sleep(0.2)
                nursery.cancel_scope.cancel()

        # The drained instance may have taken some before it was told to drain.
        crash = _takeovers([drained, cluster[2], newcomer], killed_at, victim_partitions)
        print(
            f"\nchaos: {sent_total} acked sends; crash takeover of {len(victim_partitions)} partitions: "
            f"max {max(crash.values(), default=float('nan')):.2f} s after SIGKILL "
            f"(session_timeout {SESSION_TIMEOUT_S} s)"
        )
        drained_partitions = {
            e["partition"]
            for e in _events(drained, "partition_stopped")
            if e.get("reason") == "drain"
        }
        drain = _takeovers([cluster[2], newcomer, victim], drained_at, drained_partitions)
        print(
            f"chaos: drain handover of {len(drained_partitions)} partitions: max {max(drain.values(), default=float('nan')):.2f} s"
        )
        resent = sum(c.duplicates_dropped for c in clients)
        # Never an offset a device already had, across every failover and drain.
        assert sum(c.offsets_repeated for c in clients) == 0
        print(
            f"chaos: duplicates dropped by the clients' dedupe: {resent}; reconnects: {sum(c.connections for c in clients) - CLIENTS}"
        )
        # Clients of a partition whose owner died or drained had to reconnect.
        moved = victim_partitions | drained_partitions
        stayed = [
            c.uid
            for c in clients
            if partition_for(c.uid, PARTITIONS) in moved and c.connections < 2
        ]

        lost = 0
        for to, sends in acked.items():
            got = {(sender, seq) for sender, seq in received[to]}
            sender = f"user-{(int(to.split('-')[1]) - 1) % CLIENTS}"
            missing = [(seq, offset) for seq, _, offset in sends if (sender, seq) not in got]
            lost += len(missing)
            if missing:
                c = next(c for c in clients if c.uid == to)
                print(
                    f"CLIENT {to}: state {c.state.value}, cursor {c.cursor}, "
                    f"welcome {c.welcome.value}, connections {c.connections}"
                )
            for seq, offset in missing[:3]:
                print(_loss_report(to, sender, seq, offset, arrivals[to], cluster.instances))
        assert lost == 0, f"{lost} acked messages never arrived"
        for to, messages in received.items():
            per_sender: dict[str, list[int]] = defaultdict(list)
            for sender, seq in messages:
                per_sender[sender].append(seq)
            for sender, seqs in per_sender.items():
                assert len(seqs) == len(set(seqs)), f"{to} saw a duplicate from {sender}"
                assert seqs == sorted(seqs), f"{to} got {sender}'s messages out of order"
        assert sent_total > CLIENTS * 10
        assert set(crash) == victim_partitions, (
            "every partition of the killed instance got a new owner"
        )
        assert drained_partitions, "the drained instance held partitions and handed them over"
        assert set(drain) == drained_partitions, "every drained partition got a new owner"
        assert not stayed, f"clients of moved partitions that never reconnected: {stayed}"
