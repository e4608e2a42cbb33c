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
    websocket_path,
)
from linechatd.auth import Authenticator
from linechatd.config import Config, parse_config
from linechatd.hashing import partition_for

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
) -> Admitted[FakeRuntime] | Refusal:
    served = serving if serving is not None else {k: FakeRuntime() for k in range(PARTITIONS)}
    return admit(
        UpgradeRequest(path, query, origin, remote),
        config=config,
        auth=Authenticator(config.auth),
        draining=draining,
        serving=served.get,
        owner_url=lambda k: owner_url,
        connections=connections or ConnectionCounter(),
        new_device_id=lambda: "random-device",
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
