"""Hostile clients at the edge of a real gateway: handshake floods, half-open
sockets, vanished peers, resume amplification, label and log leaks, and the
defaults of ``auth.mode = "none"``.

Each test starts its own single-instance cluster against the session's
ZooKeeper and broker (or an in-process listener where no cluster is needed).
Clients come from distinct loopback addresses (127.0.0.2, 127.0.0.3, ...)
so that per-address limits can be told apart.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import trio
import trio_websocket
from confluent_kafka import Producer
from support.cluster import GatewayProcess, http_get, new_cluster_names, start_cluster

from benchmarks.resume_storm import produce_offline
from linechatd.hashing import partition_for
from linechatd.protocol import ChatRecord, encode_record

PARTITIONS = 2
TEST_TIMEOUT_S = 90.0

# --- a gateway and raw clients -----------------------------------------------------------


@asynccontextmanager
async def one_gateway(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    partitions: int = PARTITIONS,
) -> AsyncIterator[GatewayProcess]:
    """One instance holding every partition, serving once each partition accepts sockets."""
    base: dict[str, dict[str, Any]] = {
        "shutdown": {"grace_period_s": 0.5, "drain_stagger_s": 0.0},
        "zookeeper": {"session_timeout": 4.0},
        "partitions": {"rebalance_pause_s": 0.0},
    }
    for table, values in (sections or {}).items():
        base.setdefault(table, {}).update(values)
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=new_cluster_names(),
        partitions=partitions,
        sections=base,
    ) as cluster:
        gateway = cluster[0]
        pattern = re.compile(r"event=partition_started .*?partition=(\d+)")
        with trio.fail_after(30):
            while {int(k) for k in pattern.findall(gateway.log_text())} != set(  # noqa: ASYNC110
                range(partitions)
            ):
                await trio.sleep(0.05)
        yield gateway


def ws_port(gateway: GatewayProcess) -> int:
    port = urlsplit(gateway.ws_url).port
    assert port is not None
    return port


def upgrade_request(port: int, target: str, headers: Mapping[str, str] | None = None) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def connect_from(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def handshake(
    port: int, target: str, *, source: str = "127.0.0.2", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A raw upgrade request from ``source``: status, headers and body (the socket is closed)."""
    with trio.fail_after(10):
        async with await connect_from(source, port) as stream:
            await stream.send_all(upgrade_request(port, target, headers))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), found, body


async def metrics_text(gateway: GatewayProcess) -> str:
    status, _headers, text = await http_get(gateway.http_url + "/metrics")
    assert status == 200
    return str(text)


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def welcome_of(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(10):
        frame: dict[str, Any] = json.loads(await ws.get_message())
    assert frame["type"] == "welcome", frame
    return frame


async def frames(ws: trio_websocket.WebSocketConnection, count: int) -> list[dict[str, Any]]:
    got = []
    with trio.fail_after(20):
        while len(got) < count:
            got.append(json.loads(await ws.get_message()))
    return got


def uid_in(partition: int, prefix: str, partitions: int = PARTITIONS) -> str:
    n = 0
    while partition_for(f"{prefix}{n}", partitions) != partition:
        n += 1
    return f"{prefix}{n}"


async def wait_log(gateway: GatewayProcess, pattern: str, timeout_s: float = 20) -> re.Match[str]:
    with trio.fail_after(timeout_s):
        while True:
            match = re.search(pattern, gateway.log_text())
            if match:
                return match
            await trio.sleep(0.05)


# --- item 4: handshakes per address ---------------------------------------------------------


async def test_a_handshake_flood_from_one_address_gets_429_and_others_get_in(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {
        "limits": {"handshakes_per_second_per_address": 0.5, "handshake_burst_per_address": 5}
    }
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = ws_port(gw)
        statuses = [(await handshake(port, f"/ws?uid=f{i}"))[0] for i in range(5)]
        assert statuses == [101] * 5
        # Whatever the request holds (a bad uid here), the rate answers first.
        status, headers, body = await handshake(port, "/ws?uid=bad%20uid")
        assert (status, json.loads(body)) == (429, {"error": "too_many_handshakes"})
        assert 1 <= int(headers["retry-after"]) <= 2
        # Another address is not affected.
        assert (await handshake(port, "/ws?uid=g", source="127.0.0.3"))[0] == 101
        text = await metrics_text(gw)
        assert metric(text, "linechatd_handshakes_total", 'result="too_many_handshakes"') == 1


# --- item 5: unfinished handshakes, keepalive ------------------------------------------------


async def held_and_dropped(
    port: int, source: str, count: int, dropped_at_least: int
) -> list[trio.SocketStream]:
    """Open ``count`` idle sockets from ``source``; wait until ``dropped_at_least`` of
    them were closed by the gateway; return the ones still open."""
    streams = [await connect_from(source, port) for _ in range(count)]
    dropped: list[trio.SocketStream] = []

    async def watch(stream: trio.SocketStream) -> None:
        try:
            if await stream.receive_some(1) == b"":
                dropped.append(stream)
        except trio.BrokenResourceError:
            dropped.append(stream)

    with trio.fail_after(10):  # the handshake timeout is 60 s: only the caps close this fast
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(watch, stream)
            while len(dropped) < dropped_at_least:  # noqa: ASYNC110
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    held = [s for s in streams if s not in dropped]
    for stream in dropped:
        await stream.aclose()
    return held


async def test_unfinished_handshakes_are_capped_per_address_and_in_total(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {
        "websocket": {
            "handshake_timeout_s": 60.0,
            "max_unfinished_handshakes": 6,
            "max_unfinished_handshakes_per_address": 3,
        }
    }
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = ws_port(gw)
        started = trio.current_time()
        first = await held_and_dropped(port, "127.0.0.2", 10, dropped_at_least=7)
        second = await held_and_dropped(port, "127.0.0.3", 10, dropped_at_least=7)
        try:
            print(f"\n14 sockets past the caps closed in {trio.current_time() - started:.2f}s")
            assert len(first) == 3 and len(second) == 3
            for stream in first + second:
                # Still open: nothing to read, no end of stream.
                assert not select.select([stream.socket.fileno()], [], [], 0)[0]
            # The instance is full of unfinished handshakes: a newcomer is closed at once...
            with trio.fail_after(10):
                async with await connect_from("127.0.0.4", port) as stream:
                    await stream.send_all(upgrade_request(port, "/ws?uid=late"))
                    try:
                        assert await stream.receive_some(1) == b""
                    except trio.BrokenResourceError:
                        pass  # closed with our request unread: a reset
            # ...until the idle ones go away.
            for stream in first:
                await stream.aclose()
            with trio.fail_after(10):
                while (await handshake(port, "/ws?uid=late", source="127.0.0.4"))[0] != 101:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        finally:
            for stream in first + second:
                await stream.aclose()
        text = await metrics_text(gw)
        assert metric(text, "linechatd_handshakes_total", 'result="too_many_unfinished"') >= 15


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
async def test_accepted_sockets_have_tcp_keepalive(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"websocket": {"tcp_keepalive_idle_s": 7, "tcp_keepalive_interval_s": 2}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = ws_port(gw)
        async with trio_websocket.open_websocket_url(f"{gw.ws_url}?uid=idle") as ws:
            await welcome_of(ws)
            # The gateway's end of the socket: an idle established socket with
            # keepalive on runs the keepalive timer (ss -o shows it).
            result = await trio.run_process(
                ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
                capture_stdout=True,
            )
            line = result.stdout.decode()
            print(f"\n{line.strip()}")
            assert "timer:(keepalive," in line, line


# --- item 6: resume -------------------------------------------------------------------


def produce_records(bootstrap: str, topic: str, records: list[tuple[str, int | None]]) -> list[int]:
    """(recipient uid, timestamp ms or None for now) records into ``topic``; their offsets."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2})
    offsets: dict[int, int] = {}
    for n, (to, ts) in enumerate(records):
        record = ChatRecord("sender", "dev", to, f"m{n}", {"n": n}, ts or int(time.time() * 1000))

        def on_delivery(err: Any, msg: Any, n: int = n) -> None:
            assert err is None, err
            offsets[n] = msg.offset()

        kwargs: dict[str, Any] = {"timestamp": ts} if ts is not None else {}
        producer.produce(
            topic,
            encode_record(record),
            to.encode(),
            partition=0,
            on_delivery=on_delivery,
            **kwargs,
        )
    assert producer.flush(30) == 0
    return [offsets[n] for n in range(len(records))]


def topic_of(gateway: GatewayProcess, k: int) -> str:
    match = re.search(r'topic_prefix = "([^"]+)"', gateway.config_path.read_text())
    assert match is not None
    return f"{match[1]}{k}"


async def wait_delivered_up_to(gateway: GatewayProcess, uid: str, offset: int) -> None:
    """Until the partition of ``uid`` has read past ``offset`` (its log end in a welcome)."""
    with trio.fail_after(20):
        while True:
            async with trio_websocket.open_websocket_url(f"{gateway.ws_url}?uid={uid}") as ws:
                if (await welcome_of(ws))["offset"] > offset:
                    return
            await trio.sleep(0.05)


async def test_resume_minus_one_replays_what_is_left_of_the_window(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"replay": {"max_records": 5}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        k = partition_for("bob", PARTITIONS)
        other = uid_in(k, "other")
        # Ten records, bob's and someone else's; the window (max_records = 5)
        # holds the last five. Today's log end is past max_records.
        plan: list[tuple[str, int | None]] = [
            ("bob" if n % 2 == 0 else other, None) for n in range(10)
        ]
        offsets = await trio.to_thread.run_sync(
            produce_records, kafka_bootstrap, topic_of(gw, k), plan
        )
        await wait_delivered_up_to(gw, uid_in(k, "probe"), offsets[-1])
        end = offsets[-1] + 1
        owed = [
            o for (to, _ts), o in zip(plan, offsets, strict=True) if to == "bob" and o >= end - 5
        ]
        async with trio_websocket.open_websocket_url(f"{gw.ws_url}?uid=bob&resume=-1") as ws:
            welcome = await welcome_of(ws)
            assert welcome["resumed"] is True, welcome
            replayed = await frames(ws, len(owed))
            assert [f["offset"] for f in replayed] == owed
            with trio.move_on_after(0.5):
                raise AssertionError(f"more than the window: {await ws.get_message()}")


async def test_resume_minus_one_skips_records_older_than_max_age(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"replay": {"max_records": 1000, "max_age_s": 3600.0}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        k = partition_for("carol", PARTITIONS)
        two_hours_ago = int((time.time() - 7200) * 1000)
        # Someone else's record first (so that a cursor before carol's can be >= 0),
        # then three of carol's older than max_age and three new ones.
        plan: list[tuple[str, int | None]] = [(uid_in(k, "other"), two_hours_ago)]
        plan += [("carol", two_hours_ago)] * 3 + [("carol", None)] * 3
        offsets = await trio.to_thread.run_sync(
            produce_records, kafka_bootstrap, topic_of(gw, k), plan
        )
        await wait_delivered_up_to(gw, uid_in(k, "probe"), offsets[-1])
        async with trio_websocket.open_websocket_url(f"{gw.ws_url}?uid=carol&resume=-1") as ws:
            welcome = await welcome_of(ws)
            assert welcome["resumed"] is True, welcome
            replayed = await frames(ws, 3)
            assert [f["offset"] for f in replayed] == offsets[4:]
            with trio.move_on_after(0.5):
                raise AssertionError(f"an old record: {await ws.get_message()}")
        # An explicit cursor before the old records still answers false, as before.
        resume = offsets[1] - 1
        assert resume >= 0
        async with trio_websocket.open_websocket_url(
            f"{gw.ws_url}?uid=carol&resume={resume}"
        ) as ws:
            assert (await welcome_of(ws))["resumed"] is False


async def test_a_client_that_resumes_and_drops_does_not_cost_a_whole_pass(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    total = 30_000
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, partitions=1) as gw:
        uids = [f"busy-{i}" for i in range(30)]
        owed = await trio.to_thread.run_sync(
            produce_offline, kafka_bootstrap, topic_of(gw, 0), uids, total // len(uids)
        )
        last = max(max(o) for o in owed.values())
        await wait_delivered_up_to(gw, "probe", last)
        start = last + 1 - total
        # Connect with a resume from the start of all that (nothing of it is
        # mallory's), read the welcome, and leave at once.
        query = urlencode({"uid": "mallory", "resume": str(start - 1)})
        with trio.fail_after(10):
            async with await connect_from("127.0.0.2", ws_port(gw)) as stream:
                await stream.send_all(upgrade_request(ws_port(gw), f"/ws?{query}"))
                data = b""
                while b'"welcome"' not in data:
                    data += await stream.receive_some(4096)
                assert b'"resumed":true' in data, data
        done = await wait_log(
            gw, rf"event=replay_scan_done .*?from={start} .*?scanned=(\d+) abandoned=(\d+)"
        )
        scanned, abandoned = int(done[1]), int(done[2])
        print(f"\nresume-and-drop over {total} records: the pass read {scanned} of them")
        assert abandoned == 1
        assert scanned < total // 2


async def test_resumes_per_uid_are_limited_with_429_and_retry_after(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"replay": {"resumes_per_minute_per_uid": 1.0, "resume_burst_per_uid": 2}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = ws_port(gw)
        for source in ("127.0.0.2", "127.0.0.3"):  # per uid, whatever the address
            assert (await handshake(port, "/ws?uid=dave&resume=-1", source=source))[0] == 101
        status, headers, body = await handshake(port, "/ws?uid=dave&resume=0", source="127.0.0.4")
        assert (status, json.loads(body)) == (429, {"error": "too_many_resumes"})
        assert 50 <= int(headers["retry-after"]) <= 60
        # Live only costs nothing; another uid has its own budget.
        assert (await handshake(port, "/ws?uid=dave"))[0] == 101
        assert (await handshake(port, "/ws?uid=erin&resume=-1"))[0] == 101


# --- item 8: labels and logs -------------------------------------------------------------


async def test_closes_total_counts_a_peers_close_code_as_peer(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap) as gw:
        for code in (4999, 3000, 1008, 1009, 1000):
            async with trio_websocket.open_websocket_url(f"{gw.ws_url}?uid=p{code}") as ws:
                await welcome_of(ws)
                await ws.aclose(code=code)
        with trio.fail_after(10):
            while metric(await metrics_text(gw), "linechatd_closes_total", 'code="peer"') < 5:  # noqa: ASYNC110
                await trio.sleep(0.05)
        text = await metrics_text(gw)
        labels = set(re.findall(r'^linechatd_closes_total\{code="([^"]+)"\}', text, re.M))
        assert labels == {"peer"}, labels


async def test_bad_records_are_logged_by_kind_and_size_never_by_content(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap) as gw:
        k = partition_for("victim", PARTITIONS)
        poison = [
            b'{"private-secret-1":1,"private-secret-1":2}',
            b'{"v":1,"body":31337e99999}',
            b"\xffprivate-secret-2",
            json.dumps({"v": 1, "from": "private secret 3"}).encode(),
        ]
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
        for value in poison:
            producer.produce(topic_of(gw, k), value, b"victim", partition=0)
        assert await trio.to_thread.run_sync(producer.flush, 30) == 0
        with trio.fail_after(20):
            while gw.log_text().count("event=bad_record_skipped") < len(poison):  # noqa: ASYNC110
                await trio.sleep(0.05)
        lines = [line for line in gw.log_text().splitlines() if "bad_record_skipped" in line]
        print("\n" + "\n".join(lines))
        for line in lines:
            assert "secret" not in line and "31337" not in line, line
            assert re.search(r"kind=\w+", line) and re.search(r"bytes=\d+", line), line


# --- item 9: auth "none" ----------------------------------------------------------------


async def test_auth_none_refuses_other_sites_pages_but_not_its_own(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap) as gw:
        port = ws_port(gw)
        http_port = urlsplit(gw.http_url).port
        evil = await handshake(port, "/ws?uid=a", headers={"Origin": "https://evil.example"})
        assert (evil[0], json.loads(evil[2])) == (403, {"error": "forbidden_origin"})
        for origin in (gw.http_url, f"http://localhost:{http_port}"):
            assert (await handshake(port, "/ws?uid=a", headers={"Origin": origin}))[0] == 101
        assert (await handshake(port, "/ws?uid=a"))[0] == 101  # no Origin: not a browser


# --- item 3: jwt claims at startup --------------------------------------------------------


def test_jwt_mode_without_audience_and_issuer_does_not_start(tmp_path: Path) -> None:
    (tmp_path / "jwt.key").write_bytes(b"k" * 40)
    config = tmp_path / "gw.toml"
    config.write_text(
        '[zookeeper]\nhosts = "127.0.0.1:1"\n[kafka]\nbootstrap_servers = "127.0.0.1:1"\n'
        '[auth]\nmode = "jwt"\njwt_secret_file = "jwt.key"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "linechatd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result  # the configuration is at fault: no restart
    keys = [line.split(":", 1)[0] for line in result.stderr.splitlines()]
    assert keys == ["auth.jwt_audience", "auth.jwt_issuer"], result.stderr
