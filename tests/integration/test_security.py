"""Hostile clients against real gateways: authentication, authorization, limits,
TLS, and poisoned queue records.

Each test starts its own single-instance cluster (4 partitions) against the
session's ZooKeeper and broker. Numbers (latencies, drop times) are printed,
not asserted, except where the behaviour itself is a bound (a handshake
timeout must drop a socket, an expired token must close its session).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
import trio
import trio.testing
import trio_websocket
from confluent_kafka import Producer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.cluster import GatewayProcess, http_get, new_cluster_names, start_cluster

from linechatd import websocket
from linechatd.admission import ConnectionCounter, address_key
from linechatd.config import parse_config
from linechatd.hashing import partition_for
from linechatd.protocol import CloseCode
from linechatd.startup import StartupError, startup_error
from linechatd.tls import ListenerTLS

PARTITIONS = 4
SECRET = b"integration-secret-integration-secret-0123456789"

# --- gateways ----------------------------------------------------------------------


async def wait_all_running(gateway: GatewayProcess, partitions: int) -> None:
    """Until ``gateway`` runs every partition (its lease alone is not enough:
    sockets are accepted once the partition's consumer has started)."""
    pattern = re.compile(r"event=partition_started .*?partition=(\d+)")
    with trio.fail_after(30):
        # The log is the one place that says so; polling it is cheap.
        while {int(k) for k in pattern.findall(gateway.log_text())} != set(range(partitions)):  # noqa: ASYNC110
            await trio.sleep(0.05)


@asynccontextmanager
async def one_gateway(
    tmp_path: Path,
    zookeeper_hosts: str,
    kafka_bootstrap: str,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """One instance that holds every partition (and stops quickly: nobody takes over)."""
    base: dict[str, dict[str, Any]] = {
        "shutdown": {"grace_period_s": 0.5, "drain_stagger_s": 0.0},
        # Nothing here kills an instance: a session timeout a loaded machine keeps.
        "zookeeper": {"session_timeout": 10.0},
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
        partitions=PARTITIONS,
        sections=base,
    ) as cluster:
        await wait_all_running(cluster[0], PARTITIONS)
        yield cluster[0]


def jwt_sections(secret_file: Path, **auth: Any) -> dict[str, dict[str, Any]]:
    # These tests' tokens carry neither "aud" nor "iss": opted out explicitly.
    return {
        "auth": {
            "mode": "jwt",
            "jwt_secret_file": str(secret_file),
            "jwt_leeway_s": 1.0,
            "allow_any_audience": True,
            "allow_any_issuer": True,
            **auth,
        }
    }


def token_for(sub: str, *, exp_in_s: float = 600, secret: bytes = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in_s)}, secret, algorithm="HS256")


def uids_in_one_partition(count: int, prefix: str = "u") -> list[str]:
    """``count`` uids that all hash to the same partition (the first one's)."""
    found: list[str] = []
    target = None
    i = 0
    while len(found) < count:
        uid = f"{prefix}{i}"
        k = partition_for(uid, PARTITIONS)
        if target is None:
            target = k
        if k == target:
            found.append(uid)
        i += 1
    return found


def gateway_metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?")
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def metric_reaches(
    gw: GatewayProcess, name: str, labels: str, value: float, timeout_s: float = 10.0
) -> None:
    """Wait until the gateway's metric reads exactly ``value``; fail with the last reading."""
    seen = None
    with trio.move_on_after(timeout_s):
        while True:
            seen = gateway_metric((await http_get(gw.http_url + "/metrics"))[2], name, labels)
            if seen == value:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"{name}{{{labels}}} is {seen} after {timeout_s} s, expected {value}")


# --- WebSocket clients ---------------------------------------------------------------


def ws_url(gateway: GatewayProcess, uid: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"uid": uid, **params}.items())
    return f"{gateway.ws_url}?{query}"


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


@asynccontextmanager
async def unwrapped() -> AsyncIterator[None]:
    """Raise a nursery's lone exception as itself (a rejection, a failed assert)."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(found) == 1:
            raise found[0] from None
        raise


@asynccontextmanager
async def ws_open(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    source: str | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """An accepted socket (from ``source``) whose welcome frame has been read."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    # Our own stream, so that it is closed however the socket ends (the
    # library leaves it open when the server closes first).
    with trio.fail_after(10):
        sock = trio.socket.socket()
        try:
            if source is not None:
                await sock.bind((source, 0))
            await sock.connect((parts.hostname, parts.port))
        except BaseException:
            sock.close()
            raise
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if parts.scheme == "wss":
        stream = trio.SSLStream(
            stream, ssl_context or ssl.create_default_context(), server_hostname=parts.hostname
        )
    try:
        async with unwrapped(), trio.open_nursery() as nursery:
            with trio.fail_after(10):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,  # type: ignore[arg-type]
                    parts.hostname,
                    f"{parts.path}?{parts.query}",
                    extra_headers=extra,
                    max_message_size=1 << 22,
                )
                welcome = json.loads(await ws.get_message())
            assert welcome["type"] == "welcome", welcome
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def rejection(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a refused handshake; fails if it was accepted."""
    parts = urlsplit(url)
    assert parts.port is not None
    status, _, body = await raw_handshake(parts.port, f"{parts.path}?{parts.query}", headers)
    assert status != 101, f"{url} was accepted"
    return status, json.loads(body or b"null")


async def next_frame(
    ws: trio_websocket.WebSocketConnection, kind: str, timeout_s: float = 10.0
) -> dict[str, Any]:
    """The next frame of type ``kind`` (pongs and other kinds in between are skipped)."""
    with trio.fail_after(timeout_s):
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] == kind:
                return frame


async def close_code(ws: trio_websocket.WebSocketConnection, timeout_s: float = 10.0) -> int:
    """Read until the server closes the socket; its close code."""
    with trio.fail_after(timeout_s):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code


def send_frame(msg_id: str, to: str, body: Any = "hi", **extra: Any) -> str:
    return json.dumps(
        {"type": "send", "id": msg_id, "to": to, "body": body, **extra}, ensure_ascii=False
    )


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


async def raw_handshake(
    port: int,
    target: str,
    headers: Mapping[str, str] | None = None,
    *,
    source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send an upgrade request by hand (from ``source``); the status, headers and body."""
    with trio.fail_after(10):
        sock = trio.socket.socket()
        try:
            if source is not None:
                await sock.bind((source, 0))
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(upgrade_request(port, target, headers))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            raw_head, _, body = data.partition(b"\r\n\r\n")
            head = raw_head.decode("latin-1").split("\r\n")
            status = int(head[0].split()[1])
            response_headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                response_headers[name.strip().lower()] = value.strip()
            length = int(response_headers.get("content-length", "0"))
            while status != 101 and len(body) < length:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                body += chunk
    return status, response_headers, body


# --- 1. authentication -----------------------------------------------------------------


async def test_jwt_handshake_connection_url_origin_devices_and_no_token_in_logs(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    secret_file = tmp_path / "jwt.key"
    secret_file.write_bytes(SECRET + b"\n")
    sections = {
        **jwt_sections(secret_file),
        "websocket": {"allowed_origins": ["https://chat.example.com"]},
        "limits": {"max_devices_per_uid": 2},
        "log": {"level": "debug"},
    }
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        good = token_for("alice")
        bobs = token_for("bob")
        expired = token_for("alice", exp_in_s=-120)
        forged = token_for("alice", secret=b"not-the-secret-not-the-secret-not-the")
        tokens = [good, bobs, expired, forged]

        # connection-url: Authorization: Bearer.
        url = gw.http_url + "/api/connection-url?uid=alice"
        assert (await http_get(url))[0] == 401
        for header, status in [
            (f"Bearer {forged}", 401),
            (f"Bearer {expired}", 401),
            (f"Basic {good}", 401),
            (f"Bearer {bobs}", 403),
            (f"Bearer {good}", 200),
        ]:
            code, _, doc = await http_get(url, {"Authorization": header})
            assert code == status, (header, doc)
            assert code == 200 or doc == {"error": "unauthorized" if status == 401 else "forbidden"}

        # The handshake: token parameter, sub == uid.
        assert await rejection(ws_url(gw, "alice")) == (401, {"error": "unauthorized"})
        for bad in (forged, expired, "x.y.z", "not-a-token"):
            assert await rejection(ws_url(gw, "alice", token=bad)) == (
                401,
                {"error": "unauthorized"},
            )
        assert await rejection(ws_url(gw, "alice", token=bobs)) == (403, {"error": "forbidden"})
        # Parameters are checked before the token (contract order).
        assert (await rejection(ws_url(gw, "al%20ice", token=good)))[0] == 400

        # Origin allow-list: browsers from other sites are refused; no Origin is fine.
        for evil in ("https://evil.example", "null", "https://chat.example.com.evil.example"):
            assert await rejection(ws_url(gw, "alice", token=good), {"Origin": evil}) == (
                403,
                {"error": "forbidden_origin"},
            )
        async with (
            ws_open(
                ws_url(gw, "alice", token=good, device="d1"),
                headers={"Origin": "https://CHAT.example.com"},
            ),
            ws_open(ws_url(gw, "alice", token=good, device="d2")),
        ):
            # Two devices is the configured maximum.
            assert await rejection(ws_url(gw, "alice", token=good, device="d3")) == (
                429,
                {"error": "too_many_devices"},
            )
        # A device slot frees once its socket has closed (the server notices
        # the close asynchronously, so allow it a moment).
        with trio.fail_after(10):
            while True:
                try:
                    async with ws_open(ws_url(gw, "alice", token=good, device="d3")):
                        break
                except trio_websocket.ConnectionRejected as exc:
                    assert exc.status_code == 429
                await trio.sleep(0.05)

        # A token under a percent-encoded name is still a token, and still unlogged.
        encoded = await rejection(f"{gw.ws_url}?uid=alice&t%6Fken={forged}")
        assert encoded == (401, {"error": "unauthorized"})
        # A hostile request target next to a token: logged nowhere either.
        await raw_handshake(int(gw.ws_url.rsplit(":", 1)[1].split("/")[0]), f"//[x/ws?token={good}")

    log_text = gw.log_text()
    assert "handshake_rejected" in log_text  # debug logging was on
    for secret in [*tokens, SECRET.decode()]:
        assert secret not in log_text
        # Nor any signature part on its own.
        assert secret.rsplit(".", 1)[-1] not in log_text
    # Rejected handshakes are logged with the query, its token redacted.
    assert "token=REDACTED" in log_text
    assert not re.search(r"(?i)(token|t%6fken)=(?!REDACTED)", log_text)


async def test_expired_token_closes_the_session_with_4401(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    secret_file = tmp_path / "jwt.key"
    secret_file.write_bytes(SECRET)
    async with one_gateway(
        tmp_path, zookeeper_hosts, kafka_bootstrap, jwt_sections(secret_file)
    ) as gw:
        exp = int(time.time()) + 3
        token = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
        async with ws_open(ws_url(gw, "alice", token=token)) as ws:
            # Still usable before expiry.
            await ws.send_message(json.dumps({"type": "ping"}))
            await next_frame(ws, "pong")
            code = await close_code(ws, timeout_s=15)
            closed_at = time.time()
        assert code == CloseCode.TOKEN_EXPIRED
        # The session lives exactly as long as the token is accepted: exp + leeway (1 s).
        print(f"closed {closed_at - exp:.2f}s after exp (leeway 1s)")
        assert closed_at >= exp + 1.0 - 0.2
        # And the same token no longer opens a socket.
        assert (await rejection(ws_url(gw, "alice", token=token)))[0] == 401


async def test_sighup_rotates_the_jwt_key(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    secret_file = tmp_path / "jwt.key"
    secret_file.write_bytes(SECRET)
    new_secret = b"rotated-secret-rotated-secret-rotated-secret-9876"
    alice, bob = uids_in_one_partition(2, "rot")
    async with one_gateway(
        tmp_path, zookeeper_hosts, kafka_bootstrap, jwt_sections(secret_file)
    ) as gw:
        old_alice = token_for(alice)
        conn_url = gw.http_url + f"/api/connection-url?uid={alice}"
        assert (await http_get(conn_url, {"Authorization": f"Bearer {old_alice}"}))[0] == 200
        async with ws_open(ws_url(gw, alice, token=old_alice)) as alice_ws:
            secret_file.write_bytes(new_secret)
            await reload_and_wait(gw, "reload_applied")

            assert (await http_get(conn_url, {"Authorization": f"Bearer {old_alice}"}))[0] == 401
            new_alice = token_for(alice, secret=new_secret)
            assert (await http_get(conn_url, {"Authorization": f"Bearer {new_alice}"}))[0] == 200
            assert (await rejection(ws_url(gw, alice, token=old_alice)))[0] == 401
            async with ws_open(ws_url(gw, bob, token=token_for(bob, secret=new_secret))) as bob_ws:
                # A socket opened before the rotation lives on until its token expires.
                await alice_ws.send_message(send_frame("m1", bob))
                await next_frame(alice_ws, "ack")
                assert (await next_frame(bob_ws, "message"))["from"] == alice

            # A bad key file is refused and the running key stays.
            secret_file.write_bytes(b"too-short")
            await reload_and_wait(gw, "reload_rejected")
            assert (await http_get(conn_url, {"Authorization": f"Bearer {new_alice}"}))[0] == 200
        assert "at least 32 bytes" in gw.log_text()


async def reload_and_wait(gw: GatewayProcess, event: str, timeout_s: float = 10.0) -> None:
    before = gw.log_text().count(f"event={event}")
    gw.send_signal(signal.SIGHUP)
    with trio.fail_after(timeout_s):
        # A log file offers no event to await; polling it is cheap.
        while gw.log_text().count(f"event={event}") <= before:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_auth_none_is_refused_on_a_public_listener(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    # Refused before anything is bound or connected, so 0.0.0.0 is never opened.
    names = new_cluster_names()
    config = tmp_path / "public.toml"
    config.write_text(
        "\n".join(
            [
                "[websocket]",
                'listen = "0.0.0.0:0"',
                "[zookeeper]",
                f'hosts = "{zookeeper_hosts}"',
                "[kafka]",
                f'bootstrap_servers = "{kafka_bootstrap}"',
                "[cluster]",
                f'name = "{names.cluster}"',
            ]
        )
        + "\n"
    )
    gw = GatewayProcess(config, http_url="http://127.0.0.1:1", instance_id="public")
    gw.start()
    try:
        assert await gw.wait_exit(30) == 78  # a configuration fault: startup.EXIT_CONFIG
    finally:
        await gw.stop()
    log_text = gw.log_text()
    print(log_text.strip().splitlines()[-1])
    for key in ("auth.mode", "websocket.listen = 0.0.0.0:0", "auth.allow_insecure_none"):
        assert key in log_text


# --- 2. authorization -----------------------------------------------------------------


async def test_messages_reach_only_their_recipient_from_the_authenticated_sender(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    secret_file = tmp_path / "jwt.key"
    secret_file.write_bytes(SECRET)
    alice, bob, carol = uids_in_one_partition(3, "authz")
    async with one_gateway(
        tmp_path, zookeeper_hosts, kafka_bootstrap, jwt_sections(secret_file)
    ) as gw:
        async with (
            ws_open(ws_url(gw, alice, token=token_for(alice), device="a1")) as alice_ws,
            ws_open(ws_url(gw, bob, token=token_for(bob), device="b1")) as bob_ws,
            ws_open(ws_url(gw, bob, token=token_for(bob), device="b2")) as bob_ws2,
            ws_open(ws_url(gw, carol, token=token_for(carol))) as carol_ws,
        ):
            # A forged sender is ignored: "from" is who authenticated.
            await alice_ws.send_message(
                send_frame("m1", bob, {"t": 1}, **{"from": carol, "from_device": "x"})
            )
            ack = await next_frame(alice_ws, "ack")
            for ws in (bob_ws, bob_ws2):
                message = await next_frame(ws, "message")
                assert (message["from"], message["from_device"], message["to"]) == (
                    alice,
                    "a1",
                    bob,
                )
                assert message["offset"] == ack["offset"]
            # Carol shares the partition and its delivery task, yet the first
            # message she sees is the one sent to her, which came after bob's.
            await alice_ws.send_message(send_frame("m2", carol, {"t": 2}))
            ack2 = await next_frame(alice_ws, "ack")
            first = await next_frame(carol_ws, "message")
            assert (first["id"], first["to"], first["offset"]) == ("m2", carol, ack2["offset"])
            assert ack2["offset"] > ack["offset"]


# --- 3. origin (above), TLS ---------------------------------------------------------------


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def echo_handshake(hs: websocket.Handshake) -> None:
    conn = await hs.accept()
    await conn.send(json.dumps({"type": "welcome"}))
    try:
        while True:
            await conn.send(str(await conn.receive()))
    except websocket.ConnectionClosed:
        pass


async def test_tls_websocket_listener_rotation_and_handshake_timeout(tmp_path: Path) -> None:
    """The transport with the gateway's TLS context, in process (no cluster needed)."""
    cert, key = self_signed(tmp_path, "one")
    config = minimal_config()
    tls_config = with_websocket_tls(config, cert, key)
    listeners = ListenerTLS(tls_config)
    context = listeners.context("websocket")
    assert context is not None
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: websocket.serve(
                echo_handshake,
                "127.0.0.1",
                0,
                ssl_context=context,
                max_message_bytes=4096,
                handshake_timeout_s=1.0,
                task_status=task_status,
            )
        )
        url = f"wss://127.0.0.1:{port}/ws?uid=alice"
        async with ws_open(url, ssl_context=trusting(cert)) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
        # Plain WebSocket to a TLS port gets nowhere.
        assert not (await plaintext_answer(port)).startswith(b"HTTP/")
        # Nothing older than TLS 1.2, no compression, no renegotiation.
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION

        # A TCP connection that never starts TLS is dropped by the handshake timeout.
        started = trio.current_time()
        with trio.fail_after(6):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                try:
                    assert await stream.receive_some(1) == b""
                except trio.BrokenResourceError:
                    pass
        print(f"idle TLS socket dropped after {trio.current_time() - started:.2f}s (timeout 1s)")

        # SIGHUP's certificate reload: new certificate in the same files, same listener.
        new_cert, new_key = self_signed(tmp_path, "two")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        assert listeners.reload(tls_config) == []
        async with ws_open(url, ssl_context=trusting(new_cert)):
            pass
        # A broken pair is reported and the running certificate stays.
        key.write_bytes(self_signed(tmp_path, "three")[1].read_bytes())
        [problem] = listeners.reload(tls_config)
        assert problem.startswith("websocket.tls_cert_file: cannot load the certificate")
        # Turning TLS off (or on) is for a restart, not a reload.
        [problem] = listeners.reload(config)
        assert problem == "websocket.tls_cert_file: turning TLS on or off needs a restart"
        async with ws_open(url, ssl_context=trusting(new_cert)):
            pass
        nursery.cancel_scope.cancel()


async def plaintext_answer(port: int) -> bytes:
    """What a TLS port answers to a plain-text upgrade request (never an HTTP response)."""
    data = b""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"GET /ws?uid=alice HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk
            except trio.BrokenResourceError:
                pass
    return data


async def test_hostile_connections_never_stop_the_listener() -> None:
    """Per-connection failures stay with their connection (in process, no cluster)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: websocket.serve(
                echo_handshake,
                "127.0.0.1",
                0,
                ssl_context=None,
                max_message_bytes=4096,
                handshake_timeout_s=1.0,
                task_status=task_status,
            )
        )
        # A target that makes urlsplit() raise.
        assert (await raw_handshake(port, "//[x/ws?uid=a"))[0] == 101
        # Peers that reset the connection right after their request (the
        # handler may then find no peer address).
        request = upgrade_request(port, "/ws?uid=a")
        for _ in range(100):
            sock = trio.socket.socket()
            with sock:
                await sock.connect(("127.0.0.1", port))
                await sock.send(request)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The listener has dealt with all of them: every task here waits on I/O or a timer.
        await trio.testing.wait_all_tasks_blocked()
        async with ws_open(f"ws://127.0.0.1:{port}/ws?uid=alice") as ws:
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
        nursery.cancel_scope.cancel()


def with_websocket_tls(config: Any, cert: Path, key: Path) -> Any:
    """``config`` with TLS files for the WebSocket listener, whether or not
    config.py declares the keys yet (the gateway reads them with getattr)."""
    websocket_table = copy.copy(config.websocket)
    object.__setattr__(websocket_table, "tls_cert_file", cert)
    object.__setattr__(websocket_table, "tls_key_file", key)
    return dataclasses.replace(config, websocket=websocket_table)


def minimal_config() -> Any:
    return parse_config(
        {
            "zookeeper": {"hosts": "127.0.0.1:2181"},
            "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
        }
    )


async def test_gateway_serves_wss_from_config(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    cert, key = self_signed(tmp_path, "gw")
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=new_cluster_names(),
        partitions=PARTITIONS,
        sections={
            "shutdown": {"grace_period_s": 0.5},
            "websocket": {
                "tls_cert_file": str(cert),
                "tls_key_file": str(key),
                # A plain-text request to the TLS port waits this long to be dropped.
                "handshake_timeout_s": 2.0,
            },
        },
    ) as cluster:
        gw = cluster[0]
        await wait_all_running(gw, PARTITIONS)
        _, _, doc = await http_get(gw.http_url + "/api/connection-url?uid=alice")
        assert doc["url"].startswith("wss://")
        async with ws_open(f"{doc['url']}?uid=alice", ssl_context=trusting(cert)) as ws:
            await ws.send_message(json.dumps({"type": "ping"}))
            await next_frame(ws, "pong")
        # No plain-text WebSocket on that port any more.
        assert not (await plaintext_answer(int(urlsplit(doc["url"]).port or 0))).startswith(
            b"HTTP/"
        )


async def test_gateway_serves_https_from_config(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    cert, key = self_signed(tmp_path, "http")
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=new_cluster_names(),
        partitions=PARTITIONS,
        sections={
            "shutdown": {"grace_period_s": 0.5},
            "http": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
        },
        wait_ready=False,
    ) as cluster:
        gw = cluster[0]
        https_url = gw.http_url.replace("http://", "https://")
        context = trusting(cert)
        with trio.fail_after(30):
            while True:
                try:
                    status = await trio.to_thread.run_sync(
                        https_status, https_url + "/readyz", context
                    )
                except OSError:
                    status = 0
                if status == 200:
                    break
                await trio.sleep(0.2)
        # Plain HTTP on the TLS port gets no answer.
        with pytest.raises(OSError):
            await http_get(gw.http_url + "/healthz", timeout=3)


def https_status(url: str, context: ssl.SSLContext) -> int:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --- 4. limits --------------------------------------------------------------------------


async def test_frame_size_deflate_and_hostile_request_target(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"limits": {"max_frame_bytes": 1024}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = int(gw.ws_url.rsplit(":", 1)[1].split("/")[0])
        # A request target urlsplit() cannot parse once killed the listener.
        status, _, _ = await raw_handshake(port, "//[x/ws?uid=alice")
        assert status == 404
        # permessage-deflate is offered and not taken (compression oracles, zip bombs).
        status, headers, _ = await raw_handshake(
            port,
            "/ws?uid=alice",
            {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"},
        )
        assert status == 101
        assert "sec-websocket-extensions" not in headers

        async with ws_open(ws_url(gw, "alice")) as ws:
            fits = send_frame("m1", "bob", "x" * 900)
            assert len(fits.encode()) <= 1024
            await ws.send_message(fits)
            await next_frame(ws, "ack")
            await ws.send_message(send_frame("m2", "bob", "x" * 1100))
            assert await close_code(ws) == CloseCode.TOO_BIG
        async with ws_open(ws_url(gw, "alice")) as ws:
            # 400 characters, 1200 bytes: the limit is in bytes.
            wide = send_frame("m3", "bob", "\u20ac" * 400)
            assert len(wide) < 1024 < len(wide.encode())
            await ws.send_message(wide)
            assert await close_code(ws) == CloseCode.TOO_BIG
        # The session counts its close once it has ended, which may be just
        # after the client saw the close frame.
        await metric_reaches(gw, "linechatd_closes_total", f'code="{CloseCode.TOO_BIG}"', 2)


async def test_a_frame_too_large_to_store_is_refused_not_a_crash(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    # Frames may be configured larger than a stored record may be (1 MiB).
    sections = {"limits": {"max_frame_bytes": 4 << 20}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        async with ws_open(ws_url(gw, "alice")) as ws:
            await ws.send_message(send_frame("big", "bob", "x" * 1_100_000))
            error = await next_frame(ws, "error")
            assert (error["id"], error["code"]) == ("big", "bad_frame")
            await ws.send_message(json.dumps({"type": "ping"}))
            await next_frame(ws, "pong")
    assert "session_failed" not in gw.log_text()


async def test_rate_limit_then_close_without_slowing_other_users(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"limits": {"sends_per_second": 5.0, "send_burst": 5}}
    alice, bob, mallory, nobody = uids_in_one_partition(4, "rate")
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        # A burst past the allowance: the excess is refused, the socket stays
        # (up to send_burst refusals a minute are tolerated).
        async with ws_open(ws_url(gw, mallory)) as mallory_ws:
            for i in range(9):
                await mallory_ws.send_message(send_frame(f"b{i}", nobody))
            answers = [await next_frame_of(mallory_ws, {"ack", "error"}) for _ in range(9)]
            acked = [a["id"] for a in answers if a["type"] == "ack"]
            limited = [a["id"] for a in answers if a.get("code") == "rate_limited"]
            assert len(acked) + len(limited) == 9
            assert len(acked) >= 5 and limited  # the burst, plus any refill meanwhile
            await mallory_ws.send_message(json.dumps({"type": "ping"}))
            await next_frame(mallory_ws, "pong")

        async with ws_open(ws_url(gw, alice)) as alice_ws, ws_open(ws_url(gw, bob)) as bob_ws:

            async def polite_round(label: str, count: int) -> list[float]:
                latencies = []
                for i in range(count):
                    started = trio.current_time()
                    await alice_ws.send_message(send_frame(f"{label}{i}", bob))
                    message = await next_frame(bob_ws, "message")
                    assert (message["from"], message["id"]) == (alice, f"{label}{i}")
                    latencies.append(trio.current_time() - started)
                    ack = await next_frame(alice_ws, "ack")  # never rate_limited
                    assert ack["id"] == f"{label}{i}"
                    await trio.sleep(0.25)  # 4/s, under the 5/s allowance
                return latencies

            baseline = await polite_round("base", 8)
            # Sustained abuse from the same partition: raw clients in another
            # process (so that the latencies are the gateway's, not this
            # process's) flood sends and reconnect as soon as they are dropped.
            port = int(urlsplit(gw.ws_url).port or 0)
            async with trio.open_nursery() as nursery:
                flood = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [sys.executable, __file__, str(port), mallory, nobody, "4"],
                        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                        check=False,
                    )
                )
                with trio.fail_after(30):
                    # The flood is on once a few flooders have been thrown out.
                    while True:
                        if await policy_closes(gw) >= 4:
                            break
                        await trio.sleep(0.05)
                closes_before = await policy_closes(gw)
                cpu_before = process_cpu_s(gw.pid)
                started = trio.current_time()
                during = await polite_round("during", 8)
                elapsed = trio.current_time() - started
                gateway_cpu = (process_cpu_s(gw.pid) - cpu_before) / elapsed
                dropped = await policy_closes(gw) - closes_before
                flood.terminate()

        def median(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        def ms(values: list[float]) -> str:
            return f"median {median(values) * 1000:.1f} max {max(values) * 1000:.1f}"

        print(
            f"burst: {len(acked)} acked, {len(limited)} rate_limited; flood: {dropped:.0f} "
            f"connections closed with 1008 in {elapsed:.1f}s; gateway CPU {gateway_cpu:.0%} "
            "of a core meanwhile"
        )
        print(f"alice->bob latency ms: baseline {ms(baseline)} | during flood {ms(during)}")
        # The flood went on throughout the polite round ...
        assert dropped >= 1
        # ... which got every message through, in order and never refused
        # (polite_round checks), and not slowed: relative to its own baseline
        # on this machine, with room for the flood's share of the CPU and for
        # a loaded machine's scheduling (a stalled gateway takes seconds).
        slowest_fair = max(10 * median(baseline), median(baseline) + 0.5)
        assert median(during) <= slowest_fair, (ms(baseline), ms(during))


async def policy_closes(gw: GatewayProcess) -> float:
    metrics = (await http_get(gw.http_url + "/metrics"))[2]
    return gateway_metric(metrics, "linechatd_closes_total", f'code="{CloseCode.POLICY}"')


def masked_text_frame(text: str) -> bytes:
    """One client-to-server text frame (clients must mask, RFC 6455 §5.3)."""
    payload = text.encode()
    mask = secrets.token_bytes(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x81, 0x80 | length])
    else:
        header = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def flood_once(port: int, target: str, blob: bytes) -> None:
    """Open a socket and send ``blob`` over and over until the gateway drops it."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(upgrade_request(port, target))
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
            assert data.startswith(b"HTTP/1.1 101"), data[:100]
            try:
                while True:
                    await stream.send_all(blob)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def flood_main(port: int, uid: str, to: str, flooders: int) -> None:
    """Flood from ``flooders`` sockets, each reconnecting when dropped, until killed."""
    blob = b"".join(masked_text_frame(send_frame(f"f{i}", to, "x" * 200)) for i in range(500))

    async def flooder(n: int) -> None:
        while True:
            await flood_once(port, f"/ws?uid={uid}&device=m{n}", blob)

    async with trio.open_nursery() as nursery:
        for n in range(flooders):
            nursery.start_soon(flooder, n)


def process_cpu_s(pid: int | None) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux)."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


async def next_frame_of(
    ws: trio_websocket.WebSocketConnection, kinds: set[str], timeout_s: float = 10.0
) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] in kinds:
                return frame


async def test_connection_limits_per_instance_and_per_address(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"limits": {"max_connections": 5, "max_connections_per_address": 2}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = int(gw.ws_url.rsplit(":", 1)[1].split("/")[0])

        async def refused_from(source: str, uid: str) -> tuple[int, Any]:
            status, _, body = await raw_handshake(port, f"/ws?uid={uid}", source=source)
            assert status != 101, "accepted"
            return status, json.loads(body)

        async with (
            ws_open(ws_url(gw, "a2"), source="127.0.0.1"),
            ws_open(ws_url(gw, "b1"), source="127.0.0.2"),
            ws_open(ws_url(gw, "b2"), source="127.0.0.2"),
        ):
            async with ws_open(ws_url(gw, "a1"), source="127.0.0.1"):
                # 127.0.0.1 has two sockets (of four): the address is full.
                assert await refused_from("127.0.0.1", "a3") == (
                    429,
                    {"error": "too_many_connections_from_address"},
                )
                async with ws_open(ws_url(gw, "c1"), source="127.0.0.3"):
                    # Five: the instance is full, whatever the address.
                    assert await refused_from("127.0.0.4", "d1") == (
                        503,
                        {"error": "too_many_connections"},
                    )
            # Closing one frees its slot, for its address and for the instance.
            with trio.fail_after(10):
                while True:
                    status, _, _ = await raw_handshake(port, "/ws?uid=a4", source="127.0.0.1")
                    if status == 101:
                        break
                    await trio.sleep(0.05)
        metrics = (await http_get(gw.http_url + "/metrics"))[2]
        for result in ("too_many_connections", "too_many_connections_from_address"):
            assert gateway_metric(metrics, "linechatd_handshakes_total", f'result="{result}"') >= 1


def test_connection_accounting_helpers() -> None:
    assert address_key("10.1.2.3") == "10.1.2.3"
    assert address_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:ffff::1") == address_key("2001:db8:1:2::7")
    assert address_key("") == ""
    counter = ConnectionCounter()
    releases = [counter.add("a"), counter.add("a"), counter.add("b")]
    assert (counter.total, counter.of("a"), counter.of("b")) == (3, 2, 1)
    releases[0]()
    releases[0]()  # a second release of the same connection counts nothing
    assert (counter.total, counter.of("a"), counter.of("b")) == (2, 1, 1)
    for release in releases:
        release()
    assert (counter.total, counter.of("a"), counter.of("b")) == (0, 0, 0)


def test_startup_errors_are_found_inside_exception_groups() -> None:
    error = StartupError("cluster.partitions: fixed")
    assert startup_error(error) is error
    assert startup_error(ExceptionGroup("", [ExceptionGroup("", [error])])) is error
    assert startup_error(ExceptionGroup("", [error, ValueError()])) is None
    assert startup_error(ExceptionGroup("", [ValueError()])) is None


def test_redact_query() -> None:
    redact = websocket.redact_query
    assert redact("uid=a&token=abc.def&device=d") == "uid=a&token=REDACTED&device=d"
    assert redact("TOKEN=x&token&token=y") == "TOKEN=REDACTED&token&token=REDACTED"
    # Names are read percent-decoded, as the handshake parser reads them.
    assert redact("t%6Fken=secret&uid=a") == "t%6Fken=REDACTED&uid=a"
    assert redact("tok%65n=secret") == "tok%65n=REDACTED"
    assert redact("uid=" + "a" * 1000, limit=20) == "uid=" + "a" * 16 + "..."


async def test_handshake_timeout_drops_idle_sockets_while_users_connect(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    timeout_s = 2.0
    # Room for all 500 (the caps on unfinished handshakes are tested on their own).
    sections = {
        "websocket": {
            "handshake_timeout_s": timeout_s,
            "max_unfinished_handshakes_per_address": 1000,
        }
    }
    alice, bob = uids_in_one_partition(2, "slow")
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = int(gw.ws_url.rsplit(":", 1)[1].split("/")[0])
        drop_times: list[float] = []
        opened = trio.Event()

        async def idle_socket(i: int, ready: list[int]) -> None:
            with trio.fail_after(timeout_s + 10):
                # Before the connect: the server's clock starts later, never earlier.
                start = trio.current_time()
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    if i % 2:
                        # Slowloris: half a request, then nothing.
                        await stream.send_all(b"GET /ws?uid=x HTTP/1.1\r\nHost: a\r\n")
                    ready.append(i)
                    if len(ready) == 500:
                        opened.set()
                    try:
                        while await stream.receive_some(4096):
                            pass
                    except trio.BrokenResourceError:
                        pass
                    drop_times.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            ready: list[int] = []
            for i in range(500):
                nursery.start_soon(idle_socket, i, ready)
            with trio.fail_after(10):
                await opened.wait()
            # Legitimate users connect and talk while 500 sockets hang.
            connect_started = trio.current_time()
            async with ws_open(ws_url(gw, alice)) as alice_ws, ws_open(ws_url(gw, bob)) as bob_ws:
                connected_in = trio.current_time() - connect_started
                await alice_ws.send_message(send_frame("m1", bob))
                assert (await next_frame(bob_ws, "message"))["id"] == "m1"
        assert len(drop_times) == 500
        print(
            f"500 idle sockets dropped after {min(drop_times):.2f}..{max(drop_times):.2f}s "
            f"(timeout {timeout_s}s); two users connected in {connected_in * 1000:.0f} ms meanwhile"
        )
        assert min(drop_times) >= timeout_s - 0.1


# --- 6. poisoned queue --------------------------------------------------------------------


async def test_poisoned_records_are_counted_skipped_and_never_stop_the_partition(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    alice, bob = uids_in_one_partition(2, "poison")
    k = partition_for(bob, PARTITIONS)
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap) as gw:
        config_text = gw.config_path.read_text()
        topic = re.search(r'topic_prefix = "([^"]+)"', config_text).group(1) + str(k)  # type: ignore[union-attr]
        good = {"v": 1, "from": alice, "from_device": "d", "to": bob, "id": "x", "body": 1, "ts": 1}
        poison: list[bytes | None] = [
            None,
            b"",
            b"\xff\xfe garbage",
            b"not json",
            b"[1,2,3]",
            b'{"v":1,"v":1,"from":"a"}',
            json.dumps({**good, "v": 2}).encode(),
            json.dumps({**good, "to": "bad uid"}).encode(),
            json.dumps({**good, "ts": "yesterday"}).encode(),
            b'{"v":1,"body":NaN}',
            b'{"v":1,"body":' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"v":1,"ts":' + b"9" * 5000 + b"}",
            json.dumps({**good, "body": "x" * (1 << 20)}).encode(),  # over 1 MiB
        ]
        async with ws_open(ws_url(gw, bob)) as bob_ws, ws_open(ws_url(gw, alice)) as alice_ws:
            # Produced by someone else, straight into bob's partition.
            delivered = await trio.to_thread.run_sync(
                produce_raw, kafka_bootstrap, topic, bob, poison
            )
            assert delivered == len(poison)
            await alice_ws.send_message(send_frame("after", bob, {"ok": True}))
            message = await next_frame(bob_ws, "message", timeout_s=20)
            assert (message["id"], message["from"], message["body"]) == (
                "after",
                alice,
                {"ok": True},
            )
        with trio.fail_after(10):
            while True:
                metrics = (await http_get(gw.http_url + "/metrics"))[2]
                bad = gateway_metric(metrics, "linechatd_bad_records_total", f'partition="{k}"')
                if bad >= len(poison):
                    break
                await trio.sleep(0.1)
        assert bad == len(poison)
        log_text = gw.log_text()
        assert log_text.count("event=bad_record_skipped") == len(poison)
        assert "partition_failed" not in log_text


def produce_raw(bootstrap: str, topic: str, key: str, values: list[bytes | None]) -> int:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "message.max.bytes": 4_000_000}
    )
    results: list[object] = []
    for value in values:
        producer.produce(
            topic,
            key=key.encode(),
            value=value,
            partition=0,
            on_delivery=lambda e, m: results.append(e),
        )
    producer.flush(30)
    errors = [e for e in results if e is not None]
    assert not errors, errors
    return len(results)


if __name__ == "__main__":
    # The flooding client of the rate-limit test, run as its own process.
    _, port_arg, uid_arg, to_arg, flooders_arg = sys.argv
    trio.run(flood_main, int(port_arg), uid_arg, to_arg, int(flooders_arg))


# --- frame budget, per-uid limits, silence (CONTRACT.md §5) ------------------------------


def masked_control_frame(opcode: int, payload: bytes = b"") -> bytes:
    mask = secrets.token_bytes(4)
    return (
        bytes([0x80 | opcode, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def flood_and_count_pongs(port: int, uid: str, blob: bytes) -> tuple[int, int | None]:
    """Send ``blob`` on a fresh socket; (JSON pongs and WebSocket pongs received, close code)."""
    answers = 0
    code: int | None = None
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(upgrade_request(port, f"/ws?uid={uid}"))
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(4096)
            assert data.startswith(b"HTTP/1.1 101"), data[:100]
            data = data.partition(b"\r\n\r\n")[2]
            try:
                await stream.send_all(blob)
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    # Unmasked server frames: count text pongs and control pongs, find the close.
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        payload, data = data[start : start + length], data[start + length :]
        if opcode == 0x1 and b'"pong"' in payload:
            answers += 1
        elif opcode == 0xA:
            answers += 1
        elif opcode == 0x8 and len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
    return answers, code


async def test_a_frame_flood_is_closed_with_1008_within_its_budget(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    # 20 frames/s, bursts of 40: JSON pings and WebSocket pings count alike.
    sections = {"limits": {"max_frames_per_s": 20.0}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = int(gw.ws_url.rsplit(":", 1)[1].split("/")[0])
        json_pings = b"".join(masked_text_frame('{"type":"ping"}') for _ in range(1000))
        answered, code = await flood_and_count_pongs(port, "flood1", json_pings)
        assert code == CloseCode.POLICY
        # The burst (40), plus whatever refilled while the frames were read.
        assert 40 <= answered <= 60, answered
        control_pings = b"".join(masked_control_frame(0x9, b"p") for _ in range(1000))
        answered, code = await flood_and_count_pongs(port, "flood2", control_pings)
        assert code == CloseCode.POLICY
        assert 40 <= answered <= 60, answered
        # A client at its send rate never meets the budget.
        async with ws_open(ws_url(gw, "calm")) as ws:
            for i in range(30):
                await ws.send_message(json.dumps({"type": "ping"}))
                await next_frame(ws, "pong")
                if i % 10 == 9:
                    await trio.sleep(1.0)  # noqa: ASYNC251 - pacing the client, not synchronising


async def test_the_send_rate_is_per_uid_across_devices_and_reconnects(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"limits": {"sends_per_second": 0.5, "send_burst": 4}}
    sender, recipient = uids_in_one_partition(2, "perid")
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        answers: list[str] = []
        for round_ in range(3):  # a fresh socket each time: reconnecting buys nothing
            device = f"d{round_ % 2}"
            async with ws_open(ws_url(gw, sender, device=device)) as ws:
                for i in range(2):
                    await ws.send_message(send_frame(f"r{round_}-{i}", recipient))
                    answers.append((await next_frame_of(ws, {"ack", "error"}))["type"])
        # 4 in the burst, then refused (at most one token refilled meanwhile).
        assert answers[:4] == ["ack"] * 4, answers
        assert answers[4:].count("error") >= 1, answers


async def test_parallel_handshakes_of_one_uid_cannot_exceed_its_devices(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"limits": {"max_devices_per_uid": 2}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        port = int(gw.ws_url.rsplit(":", 1)[1].split("/")[0])
        statuses: list[int] = []
        streams: list[trio.SocketStream] = []

        async def handshake(n: int) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            await stream.send_all(upgrade_request(port, f"/ws?uid=many&device=d{n}"))
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            statuses.append(int(data.split(b" ", 2)[1]))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for n in range(12):
                    nursery.start_soon(handshake, n)
        for stream in streams:
            await stream.aclose()
        assert sorted(statuses).count(101) == 2, statuses
        assert statuses.count(429) == 10, statuses


async def test_a_silent_connection_is_closed_and_a_half_sent_message_times_out(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str
) -> None:
    sections = {"limits": {"idle_timeout_s": 2.0, "partial_message_timeout_s": 1.0}}
    async with one_gateway(tmp_path, zookeeper_hosts, kafka_bootstrap, sections) as gw:
        async with ws_open(ws_url(gw, "quiet")) as ws:
            assert await close_code(ws, timeout_s=20) == CloseCode.NORMAL
        port = int(gw.ws_url.rsplit(":", 1)[1].split("/")[0])
        # The first fragment of a text message (FIN clear), and never the rest.
        payload = b'{"type":"ping"'
        mask = secrets.token_bytes(4)
        fragment = (
            bytes([0x01, 0x80 | len(payload)])
            + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
        answered, code = await flood_and_count_pongs(port, "halfway", fragment)
        assert (answered, code) == (0, CloseCode.POLICY)
