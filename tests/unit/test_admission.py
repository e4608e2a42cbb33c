"""The WebSocket handshake's checks (linechatd.admission), in the contract's order, without I/O."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from linechatd.admission import (
    Admitted,
    ConnectionCounter,
    Refusal,
    UpgradeRequest,
    admit,
    origin_allowed,
    page_origins,
    websocket_path,
)
from linechatd.auth import Authenticator
from linechatd.config import Config, parse_config
from linechatd.hashing import partition_for
from linechatd.keyedrate import KeyedRateLimiter

PARTITIONS = 8
SECRET = "s" * 40


class FakeRuntime:
    def __init__(self, devices: int = 0) -> None:
        self.devices = devices

    def devices_of(self, uid: str) -> int:
        return self.devices


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    key = tmp_path / "jwt.key"
    key.write_text(SECRET)
    raw: dict[str, Any] = {
        "zookeeper": {"hosts": "127.0.0.1:2181"},
        "kafka": {"bootstrap_servers": "127.0.0.1:9092"},
        "cluster": {"partitions": PARTITIONS},
        "auth": {
            "mode": "jwt",
            "jwt_secret_file": str(key),
            "allow_any_audience": True,
            "allow_any_issuer": True,
        },
        "limits": {
            "max_connections": 3,
            "max_connections_per_address": 2,
            "max_devices_per_uid": 2,
        },
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw, base_dir=tmp_path)


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def decide(
    config: Config,
    query: str,
    *,
    path: str = "/ws",
    origin: str | None = None,
    remote: str = "10.0.0.1",
    draining: bool = False,
    serving: dict[int, FakeRuntime] | None = None,
    owner_url: str | None = "ws://other:8765/ws",
    connections: ConnectionCounter | None = None,
    handshakes: KeyedRateLimiter | None = None,
    resumes: KeyedRateLimiter | None = None,
    now: float = 0.0,
    page_urls: tuple[str, ...] = (),
) -> Admitted[FakeRuntime] | Refusal:
    served = serving if serving is not None else {k: FakeRuntime() for k in range(PARTITIONS)}
    handshake_rate = handshakes or KeyedRateLimiter(1000.0, 1000, max_keys=100)
    resume_rate = resumes or KeyedRateLimiter(1000.0, 1000, max_keys=100)
    return admit(
        UpgradeRequest(path, query, origin, remote),
        config=config,
        auth=Authenticator(config.auth),
        draining=draining,
        serving=served.get,
        owner_url=lambda k: owner_url,
        connections=connections or ConnectionCounter(),
        new_device_id=lambda: "random-device",
        handshake_wait=lambda address: handshake_rate.acquire(address, now),
        resume_wait=lambda uid: resume_rate.acquire(uid, now),
        page_urls=lambda: page_urls,
    )


def test_a_good_request_is_admitted_with_its_partition(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    decision = decide(config, f"uid=alice&device=d1&resume=4&token={token('alice')}")
    assert isinstance(decision, Admitted)
    assert decision.params.uid == "alice" and decision.params.resume == 4
    assert decision.partition == partition_for("alice", PARTITIONS)
    assert decision.address == "10.0.0.1"
    assert decision.identity.uid == "alice"


def test_the_checks_answer_in_the_contracts_order(tmp_path: Path) -> None:
    config = make_config(tmp_path, websocket={"allowed_origins": ["https://chat.example"]})
    nobody = {}  # this instance serves no partition: every check before 421 must answer first

    def refusal(query: str, **kwargs: Any) -> tuple[int, str]:
        decision = decide(config, query, serving=kwargs.pop("serving", nobody), **kwargs)
        assert isinstance(decision, Refusal)
        return decision.status, decision.error

    assert refusal("uid=alice", path="/other") == (404, "not_found")
    # Bad parameters first, even with a bad token, a foreign origin, while draining.
    assert refusal("uid=a%20b&token=x", origin="https://evil.example", draining=True) == (
        400,
        "bad_uid",
    )
    assert refusal("uid=alice&resume=-2") == (400, "bad_resume")
    # Then the origin (a browser on another site), then the token.
    assert refusal("uid=alice&token=x", origin="https://evil.example") == (403, "forbidden_origin")
    assert refusal("uid=alice") == (401, "unauthorized")
    assert refusal(f"uid=alice&token={token('bob')}") == (403, "forbidden")
    good = f"uid=alice&token={token('alice')}"
    assert refusal(good, draining=True) == (503, "draining")
    assert refusal(good, origin="https://chat.example") == (421, "wrong_instance")


def test_wrong_instance_names_the_owner_and_the_partition(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    decision = decide(config, f"uid=alice&token={token('alice')}", serving={})
    assert isinstance(decision, Refusal)
    k = partition_for("alice", PARTITIONS)
    assert decision.extra == {"url": "ws://other:8765/ws", "partition": k}


def test_limits_count_only_sockets_that_would_be_accepted(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    good = f"uid=alice&token={token('alice')}"
    connections = ConnectionCounter()
    releases = [connections.add("10.0.0.1"), connections.add("10.0.0.1")]
    decision = decide(config, good, connections=connections)
    assert isinstance(decision, Refusal)
    assert (decision.status, decision.error, decision.retry_after_s) == (
        429,
        "too_many_connections_from_address",
        5,
    )
    # Another address still gets in, until the instance is full.
    assert isinstance(decide(config, good, remote="10.0.0.2", connections=connections), Admitted)
    connections.add("10.0.0.3")
    decision = decide(config, good, remote="10.0.0.4", connections=connections)
    assert isinstance(decision, Refusal) and decision.error == "too_many_connections"
    for release in releases:
        release()
        release()  # idempotent
    assert connections.total == 1
    # A parameter error is answered as such even on a full instance.
    full = ConnectionCounter()
    for n in range(3):
        full.add(f"10.0.1.{n}")
    decision = decide(config, "uid=", connections=full)
    assert isinstance(decision, Refusal) and decision.error == "bad_uid"


def test_devices_per_uid_are_capped(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    k = partition_for("alice", PARTITIONS)
    decision = decide(
        config, f"uid=alice&token={token('alice')}", serving={k: FakeRuntime(devices=2)}
    )
    assert isinstance(decision, Refusal) and (decision.status, decision.error) == (
        429,
        "too_many_devices",
    )


@pytest.mark.parametrize(
    ("advertise", "path"),
    [("ws://h:1/ws", "/ws"), ("wss://h/chat/socket", "/chat/socket"), ("ws://h:1", "/")],
)
def test_the_endpoint_path_comes_from_the_advertised_url(advertise: str, path: str) -> None:
    assert websocket_path(advertise) == path


# --- rates per address and per uid ----------------------------------------------------


def test_handshakes_per_address_are_rate_limited_before_anything_costly(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    handshakes = KeyedRateLimiter(2.0, 3, max_keys=100)
    good = f"uid=alice&token={token('alice')}"

    def at(now: float, query: str = good, remote: str = "10.0.0.1") -> Admitted[Any] | Refusal:
        return decide(config, query, remote=remote, handshakes=handshakes, now=now)

    # Every handshake counts, whatever its outcome: refused ones cost work too.
    assert isinstance(at(0.0), Admitted)
    assert isinstance(at(0.0, "uid=alice&token=bad"), Refusal)
    assert isinstance(at(0.0, "uid=a%20b"), Refusal)
    flood = at(0.0)
    assert isinstance(flood, Refusal)
    assert (flood.status, flood.error, flood.retry_after_s) == (429, "too_many_handshakes", 1)
    # Answered before the parameters or the token are even looked at.
    early = at(0.1, "uid=a%20b&token=x")
    assert isinstance(early, Refusal) and early.error == "too_many_handshakes"
    # Another address is not affected; an IPv6 /64 is one address.
    assert isinstance(at(0.1, remote="10.0.0.2"), Admitted)
    for host in range(1, 4):
        at(0.2, remote=f"2001:db8::{host}")
    v6 = at(0.2, remote="2001:db8::ffff")
    assert isinstance(v6, Refusal) and v6.error == "too_many_handshakes"
    # Tokens come back at the rate.
    assert isinstance(at(0.6), Admitted)
    # A request for another path is not a handshake: it costs no token.
    for _ in range(10):
        other = decide(config, good, path="/other", handshakes=handshakes, now=10.0)
        assert isinstance(other, Refusal) and other.error == "not_found"
    assert [isinstance(at(10.0), Admitted) for _ in range(4)] == [True, True, True, False]


def test_resumes_per_uid_are_rate_limited_last(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    resumes = KeyedRateLimiter(1 / 60, 2, max_keys=100)
    alice = f"uid=alice&token={token('alice')}"

    def resume(query: str, now: float = 0.0, **kwargs: Any) -> Admitted[Any] | Refusal:
        return decide(config, query, resumes=resumes, now=now, **kwargs)

    assert isinstance(resume(alice + "&resume=5"), Admitted)
    # No resume: live only, costs nothing.
    for _ in range(5):
        assert isinstance(resume(alice), Admitted)
    # Sockets that would be refused anyway spend nothing.
    assert isinstance(resume(alice + "&resume=5", serving={}), Refusal)
    k = partition_for("alice", PARTITIONS)
    full = resume(alice + "&resume=5", serving={k: FakeRuntime(devices=2)})
    assert isinstance(full, Refusal) and full.error == "too_many_devices"
    assert isinstance(resume(alice + "&resume=-1"), Admitted)
    over = resume(alice + "&resume=7")
    assert isinstance(over, Refusal)
    assert (over.status, over.error, over.retry_after_s) == (429, "too_many_resumes", 60)
    # Per uid: bob's resumes are his own.
    assert isinstance(resume(f"uid=bob&token={token('bob')}&resume=0"), Admitted)
    assert isinstance(resume(alice + "&resume=7", now=60.0), Admitted)


# --- Origin ------------------------------------------------------------------------------


def none_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    return make_config(tmp_path, auth={"mode": "none"}, **sections)


@pytest.mark.parametrize(
    ("url", "origins"),
    [
        ("https://chat.example.com", {"https://chat.example.com"}),
        ("https://Chat.Example.com:443/app/", {"https://chat.example.com"}),
        ("http://chat.example.com:8080", {"http://chat.example.com:8080"}),
        (
            "http://127.0.0.1:7100",
            {"http://127.0.0.1:7100", "http://localhost:7100", "http://[::1]:7100"},
        ),
        (
            "http://[::1]:80",
            {"http://[::1]", "http://localhost", "http://127.0.0.1"},
        ),
        ("ftp://x", set()),
        ("http://[bad", set()),
    ],
)
def test_page_origins(url: str, origins: set[str]) -> None:
    assert page_origins(url) == origins


def test_auth_none_allows_only_the_clusters_own_pages_by_default(tmp_path: Path) -> None:
    config = none_config(tmp_path, http={"advertise": "http://127.0.0.1:7100"})
    query = "uid=alice"
    cluster = ("http://127.0.0.1:7101", "http://127.0.0.1:7102")

    def origin(value: str | None) -> tuple[int, str] | str:
        decision = decide(config, query, origin=value, page_urls=cluster)
        if isinstance(decision, Admitted):
            return "admitted"
        return decision.status, decision.error

    # Cross-site WebSocket hijacking of `linechatd dev` from any web page:
    assert origin("https://evil.example") == (403, "forbidden_origin")
    assert origin("null") == (403, "forbidden_origin")
    assert origin("http://127.0.0.1:9999") == (403, "forbidden_origin")
    # The demo page of this instance, of another instance of the cluster, and
    # this one under another loopback name; clients that are not browsers.
    for allowed in (
        "http://127.0.0.1:7100",
        "http://localhost:7100",
        "http://127.0.0.1:7102",
        "HTTP://LOCALHOST:7101",
        None,
    ):
        assert origin(allowed) == "admitted", allowed


def test_configured_origins_replace_the_default_and_jwt_mode_has_none(tmp_path: Path) -> None:
    configured = none_config(tmp_path, websocket={"allowed_origins": ["https://chat.example"]})
    assert origin_allowed("https://chat.example", configured, lambda: ())
    assert not origin_allowed("http://127.0.0.1:8080", configured, lambda: ())
    jwt_mode = make_config(tmp_path)
    assert origin_allowed("https://anything.example", jwt_mode, lambda: ())
