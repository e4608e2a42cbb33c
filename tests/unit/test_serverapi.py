"""The server API's pure parts: the key, publish validation, presence queries, signed internal calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linechatd.serverapi import (
    INTERNAL_SKEW_S,
    Publish,
    PublishError,
    ServerKeyError,
    decode_publish,
    load_server_key,
    presence_uids,
    server_key_matches,
    sign_internal,
    verify_internal,
)

KEY = b"k" * 40


def test_the_key_is_one_line_of_at_least_32_printable_ascii_characters(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("  " + "a" * 32 + "\n")
    assert load_server_key(path) == b"a" * 32
    for bad in ("a" * 31, "a" * 20 + "\n" + "b" * 20, "ä" * 40, "a" * 31 + "\x01"):
        path.write_text(bad)
        with pytest.raises(ServerKeyError) as exc:
            load_server_key(path)
        assert bad not in str(exc.value), "the key never appears in a message"


def test_only_the_exact_bearer_key_matches() -> None:
    assert server_key_matches(KEY, f"Bearer {KEY.decode()}")
    assert server_key_matches(KEY, f"bearer {KEY.decode()}")
    for header in (None, "", KEY.decode(), f"Basic {KEY.decode()}", f"Bearer {KEY.decode()}x"):
        assert not server_key_matches(KEY, header)


def publish_body(**changes: object) -> bytes:
    doc: dict[str, object] = {"to": ["a", "b"], "id": "n1", "body": {"t": 1}}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_a_good_publish_decodes_with_the_default_sender() -> None:
    assert decode_publish(publish_body(), max_body_bytes=100) == Publish(
        ("a", "b"), "n1", "server", {"t": 1}
    )
    assert decode_publish(publish_body(**{"from": "billing"}), max_body_bytes=100).from_name == (
        "billing"
    )


@pytest.mark.parametrize(
    ("changes", "status", "field"),
    [
        ({"to": ...}, 400, "to"),
        ({"to": []}, 400, "to"),
        ({"to": "a"}, 400, "to"),
        ({"to": [f"u{n}" for n in range(1001)]}, 400, "to"),
        ({"to": ["a", "a"]}, 400, "to"),
        ({"to": ["a b"]}, 400, "to"),
        ({"id": ...}, 400, "id"),
        ({"id": "x" * 65}, 400, "id"),
        ({"id": 5}, 400, "id"),
        ({"from": ""}, 400, "from"),
        ({"from": "a/b"}, 400, "from"),
        ({"body": ...}, 400, "body"),
        ({"body": "x" * 200}, 413, None),
    ],
)
def test_bad_publishes_name_the_field(changes: dict[str, object], status: int, field: str) -> None:
    with pytest.raises(PublishError) as exc:
        decode_publish(publish_body(**changes), max_body_bytes=100)
    assert (exc.value.status, exc.value.field) == (status, field)


@pytest.mark.parametrize(
    "data", [b"{", b"[1]", b'{"to": ["a"], "to": ["b"]}', b"\xff", b'{"id": NaN}']
)
def test_a_body_that_is_not_a_strict_json_object_is_a_bad_request(data: bytes) -> None:
    with pytest.raises(PublishError) as exc:
        decode_publish(data, max_body_bytes=100)
    assert (exc.value.status, exc.value.error, exc.value.field) == (400, "bad_request", None)


def test_presence_queries_keep_order_drop_repeats_and_refuse_bad_uids() -> None:
    assert presence_uids([("uid", "b"), ("x", "y"), ("uid", "a"), ("uid", "b")]) == ["b", "a"]
    for pairs in ([], [("uid", "a b")], [("uid", f"u{n}") for n in range(1001)]):
        with pytest.raises(ValueError):
            presence_uids(pairs)


def test_internal_calls_are_signed_for_one_target_and_a_short_time() -> None:
    target = "/internal/presence?uid=a&uid=b"
    header = sign_internal(KEY, "gw-1", "GET", target, now=1000.0)
    assert verify_internal(KEY, header, "GET", target, now=1000.0) == "gw-1"
    assert verify_internal(KEY, header, "GET", target, now=1000.0 + INTERNAL_SKEW_S) == "gw-1"
    # Another key, target, method, a stale or future time, or tampering: refused.
    assert verify_internal(b"x" * 40, header, "GET", target, now=1000.0) is None
    assert verify_internal(KEY, header, "GET", target + "&uid=c", now=1000.0) is None
    assert verify_internal(KEY, header, "POST", target, now=1000.0) is None
    assert verify_internal(KEY, header, "GET", target, now=1000.0 + INTERNAL_SKEW_S + 1) is None
    assert verify_internal(KEY, header, "GET", target, now=1000.0 - INTERNAL_SKEW_S - 1) is None
    assert verify_internal(KEY, header.replace("gw-1", "gw-2"), "GET", target, now=1000.0) is None
    for junk in (None, "", "t=x,i=gw-1,mac=00", "mac=00"):
        assert verify_internal(KEY, junk, "GET", target, now=1000.0) is None
