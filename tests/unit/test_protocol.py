import dataclasses
import json
import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from linechatd.protocol import (
    GROUP_RECORD_KEY,
    MAX_JSON_DEPTH,
    MAX_JSON_MEMBERS,
    MAX_QUERY_CHARS,
    MAX_RECORD_BYTES,
    RECORD_VERSION,
    UID_PATTERN,
    ChatRecord,
    GroupAck,
    GroupRecord,
    GroupSend,
    HandshakeError,
    HandshakeParams,
    LocalProtocolError,
    Message,
    PartitionAck,
    Ping,
    ProtocolError,
    RecordError,
    RemoteProtocolError,
    Send,
    decode_client_frame,
    decode_record,
    decode_server_frame,
    encode_ack,
    encode_error,
    encode_group_ack,
    encode_message,
    encode_pong,
    encode_record,
    encode_send,
    encode_welcome,
    is_valid_uid,
    new_device_id,
    parse_handshake_query,
    record_key,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def remote_error(data: str | bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_client_frame(data)
    return info.value


def send_frame(**fields: Any) -> str:
    return json.dumps({"type": "send", **fields})


def nested(depth: int) -> str:
    """A JSON document ``depth`` containers deep, the outermost an object."""
    return (
        '{"type":"send","id":"x","to":"bob","body":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    )


# ------------------------------------------------------------------------- errors


def test_error_hierarchy() -> None:
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RecordError, ProtocolError)
    assert issubclass(HandshakeError, RemoteProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert issubclass(ProtocolError, Exception)


def test_remote_error_fields() -> None:
    err = RemoteProtocolError("bad_frame", "nope", id="m1")
    assert (err.code, err.message, err.id, str(err)) == ("bad_frame", "nope", "m1", "nope")
    assert "bad_frame" in repr(err)
    assert RemoteProtocolError("bad_frame", "nope").id is None
    hs = HandshakeError("bad_uid", "no uid")
    assert (hs.status, hs.code, hs.message, hs.id) == (400, "bad_uid", "no uid", None)


def test_protocol_module_does_not_import_trio() -> None:
    code = "import sys, linechatd.protocol, linechatd.hashing; print('trio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "uid", ["a", "alice", "A-Z_0.9:@", "user@example.com", "x" * 128, "-", "urn:x:1"]
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert UID_PATTERN.match(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "x" * 129,
        "a b",
        "a/b",
        "é",
        "alice\n",
        "\nalice",
        "a\x00",
        "a+b",
        "a%40b",
        None,
        1,
        b"a",
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_new_device_id() -> None:
    ids = {new_device_id() for _ in range(50)}
    assert len(ids) == 50
    for device in ids:
        assert is_valid_uid(device)
        assert len(device) == 16
        int(device, 16)


# ----------------------------------------------------------------- client frames


@pytest.mark.parametrize(
    "data",
    ['{"type":"ping"}', b'{"type":"ping"}', ' { "type" : "ping" , "extra": [1, {}] } '],
)
def test_decode_ping(data: str | bytes) -> None:
    assert decode_client_frame(data) == Ping()


@pytest.mark.parametrize(
    "body", [None, 0, -1.5, True, "hi", "h\u00e9\u2028\U0001f600", [], {}, [1, {"a": [None]}]]
)
def test_decode_send_bodies(body: Any) -> None:
    frame = send_frame(id="m1", to="bob", body=body)
    assert decode_client_frame(frame) == Send(id="m1", to="bob", body=body)
    assert decode_client_frame(frame.encode()) == Send(id="m1", to="bob", body=body)


def test_decode_send_accepts_bytes_like() -> None:
    raw = send_frame(id="m", to="bob", body=1).encode()
    assert decode_client_frame(bytearray(raw)) == Send("m", "bob", 1)  # type: ignore[arg-type]
    assert decode_client_frame(memoryview(raw)) == Send("m", "bob", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("msg_id", ["x", "x" * 64, "\u00e9" * 64, "id with spaces", "\U0001f600"])
def test_decode_send_id_bounds(msg_id: str) -> None:
    assert decode_client_frame(send_frame(id=msg_id, to="bob", body=1)).id == msg_id


def test_decode_send_ignores_unknown_keys() -> None:
    frame = send_frame(id="m", to="bob", body=1, extra={"x": 1}, v=2)
    assert decode_client_frame(frame) == Send("m", "bob", 1)


def test_send_is_frozen() -> None:
    send = Send("m", "bob", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        send.to = "eve"  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b'{"type":"ping","x":"\xc3"}',
        b'{"type":"ping","x":"\xed\xa0\x80"}',  # UTF-8-encoded surrogate: invalid UTF-8
        '{"type":"ping","x":"\ud800"}',  # str holding a lone surrogate
    ],
)
def test_reject_invalid_utf8(data: str | bytes) -> None:
    err = remote_error(data)
    assert (err.code, err.message, err.id) == ("bad_frame", "frame is not valid UTF-8", None)


@pytest.mark.parametrize("data", [None, 42, ["type"]])
def test_reject_non_text_input(data: Any) -> None:
    assert remote_error(data).code == "bad_frame"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("", "invalid JSON"),
        ("   ", "invalid JSON"),
        ("{", "invalid JSON"),
        ('{"type":"ping"} {}', "invalid JSON"),
        ("{'type':'ping'}", "invalid JSON"),
        ('{"type":"ping",}', "invalid JSON"),
        ('{"type":"ping","x":"a\tb"}', "invalid JSON"),  # raw control char in a string
        ("[]", "must be a JSON object"),
        ('[{"type":"ping"}]', "must be a JSON object"),
        ('"ping"', "must be a JSON object"),
        ("null", "must be a JSON object"),
        ("1", "must be a JSON object"),
        ('{"type":"ping","x":NaN}', "NaN is not allowed"),
        ('{"type":"ping","x":Infinity}', "Infinity is not allowed"),
        ('{"type":"ping","x":-Infinity}', "-Infinity is not allowed"),
        ('{"type":"ping","x":1e400}', "out of range"),
        ('{"type":"ping","x":-1e400}', "out of range"),
        ('{"type":"ping","type":"ping"}', "duplicate key 'type'"),
        ('{"type":"ping","x":{"a":1,"a":2}}', "duplicate key 'a'"),
        ('{"type":"ping","x":' + "9" * 5000 + "}", "number too large"),
        ('{"type":"ping","x":"\\ud800"}', "unpaired surrogate"),
        ('{"type":"ping","x":"\\udc00\\ud800"}', "unpaired surrogate"),
        ('{"type":"ping","\\ud800":1}', "unpaired surrogate"),
    ],
)
def test_reject_bad_json(data: str, fragment: str) -> None:
    err = remote_error(data)
    assert err.code == "bad_frame"
    assert fragment in err.message
    assert err.id is None


def test_duplicate_key_message_is_encodable() -> None:
    err = remote_error('{"\\ud800":1,"\\ud800":2}')
    assert err.code == "bad_frame"
    encode_error(err.id, err.code, err.message).encode("utf-8")


def test_paired_surrogate_escape_is_fine() -> None:
    frame = '{"type":"send","id":"m","to":"bob","body":"\\ud83d\\ude00"}'
    assert decode_client_frame(frame).body == "\U0001f600"  # type: ignore[union-attr]


def test_escaped_backslash_before_u_is_not_a_surrogate() -> None:
    frame = '{"type":"send","id":"m","to":"bob","body":"\\\\ud800"}'
    assert decode_client_frame(frame).body == "\\ud800"  # type: ignore[union-attr]


def test_depth_limit_is_exactly_64() -> None:
    assert MAX_JSON_DEPTH == 64
    assert isinstance(decode_client_frame(nested(64)), Send)
    err = remote_error(nested(65))
    assert err.code == "bad_frame"
    assert "nested deeper than 64" in err.message


@pytest.mark.parametrize("depth", [1_000, 100_000, 1_000_000])
def test_very_deep_nesting_is_rejected_without_recursion(depth: int) -> None:
    for text in ("[" * depth + "]" * depth, "[" * depth, '{"a":' * depth, "{" * depth):
        err = remote_error(text)
        assert err.code == "bad_frame"
        assert "nested deeper" in err.message


def test_brackets_inside_strings_do_not_count() -> None:
    body = "[{" * 200 + '\\"' + "]}" * 10
    frame = '{"type":"send","id":"m","to":"bob","body":"' + body + '"}'
    assert decode_client_frame(frame).body == body.replace('\\"', '"')  # type: ignore[union-attr]


def test_members_are_capped_before_parsing() -> None:
    ok = send_frame(id="m", to="bob", body=[1] * (MAX_JSON_MEMBERS - 10))
    assert isinstance(decode_client_frame(ok), Send)
    err = remote_error(send_frame(id="m", to="bob", body=[1] * (MAX_JSON_MEMBERS + 10)))
    assert err.code == "bad_frame" and f"more than {MAX_JSON_MEMBERS} members" in err.message
    err = remote_error(send_frame(id="m", to="bob", body={f"k{n}": n for n in range(5000)}))
    assert err.code == "bad_frame"


def test_commas_inside_strings_are_not_members() -> None:
    text = "," * 20_000
    frame = send_frame(id="m", to="bob", body=text)
    assert decode_client_frame(frame).body == text  # type: ignore[union-attr]


def test_many_flat_containers_are_fine() -> None:
    frame = send_frame(id="m", to="bob", body=[[] for _ in range(1000)])
    assert len(decode_client_frame(frame).body) == 1000  # type: ignore[union-attr]


def test_pathological_unterminated_strings_stay_linear() -> None:
    # Quadratic scanning would take minutes on these.
    for text in ("[]" * 100 + '"' + '\\"' * 100_000, "[]" * 100 + '"\\' * 100_000):
        assert remote_error(text).code == "bad_frame"


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({}, "field 'type' is required"),
        ({"type": None}, "field 'type' must be a string"),
        ({"type": 1}, "field 'type' must be a string"),
        ({"type": ["send"]}, "field 'type' must be a string"),
        ({"type": "pong"}, "unknown frame type 'pong'"),
        ({"type": "SEND"}, "unknown frame type 'SEND'"),
        ({"type": ""}, "unknown frame type ''"),
        ({"type": "send", "to": "bob", "body": 1}, "field 'id' is required"),
        ({"type": "send", "id": None, "to": "bob", "body": 1}, "field 'id' must be a string"),
        ({"type": "send", "id": 7, "to": "bob", "body": 1}, "field 'id' must be a string"),
        ({"type": "send", "id": "", "to": "bob", "body": 1}, "field 'id' must be 1-64 characters"),
        (
            {"type": "send", "id": "x" * 65, "to": "bob", "body": 1},
            "field 'id' must be 1-64 characters",
        ),
    ],
)
def test_reject_bad_frames_without_id(frame: dict[str, Any], message: str) -> None:
    err = remote_error(json.dumps(frame))
    assert (err.code, err.message, err.id) == ("bad_frame", message, None)


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        ({"type": "pong", "id": "m1"}, "bad_frame", "unknown frame type 'pong'"),
        ({"id": "m1"}, "bad_frame", "field 'type' is required"),
        ({"type": "send", "id": "m1", "body": 1}, "bad_frame", "field 'to' is required"),
        (
            {"type": "send", "id": "m1", "to": 5, "body": 1},
            "bad_frame",
            "field 'to' must be a uid or a list of uids",
        ),
        (
            {"type": "send", "id": "m1", "to": None, "body": 1},
            "bad_frame",
            "field 'to' must be a uid or a list of uids",
        ),
        ({"type": "send", "id": "m1", "to": "bob"}, "bad_frame", "field 'body' is required"),
        (
            {"type": "send", "id": "m1", "to": "", "body": 1},
            "bad_recipient",
            "field 'to' must be a uid",
        ),
        (
            {"type": "send", "id": "m1", "to": "a b", "body": 1},
            "bad_recipient",
            "field 'to' must be a uid",
        ),
        (
            {"type": "send", "id": "m1", "to": "x" * 129, "body": 1},
            "bad_recipient",
            "must be a uid",
        ),
        ({"type": "send", "id": "m1", "to": "bob\n", "body": 1}, "bad_recipient", "must be a uid"),
    ],
)
def test_reject_bad_frames_with_id(frame: dict[str, Any], code: str, message: str) -> None:
    err = remote_error(json.dumps(frame))
    assert err.code == code
    assert message in err.message
    assert err.id == "m1"


# ----------------------------------------------------------------- server frames


def test_encode_welcome() -> None:
    assert encode_welcome("alice", "d1", 3, "gw-1", 42, None) == (
        '{"type":"welcome","uid":"alice","device":"d1","partition":3,'
        '"instance":"gw-1","offset":42,"resumed":null}'
    )
    assert json.loads(encode_welcome("a", "d", 0, "i", 0, True))["resumed"] is True
    assert json.loads(encode_welcome("a", "d", 0, "i", 0, False))["resumed"] is False


def test_encode_ack() -> None:
    assert encode_ack("m1", 7, 1234) == '{"type":"ack","id":"m1","partition":7,"offset":1234}'


def test_encode_error() -> None:
    assert encode_error(None, "bad_frame", "frame must be a JSON object") == (
        '{"type":"error","id":null,"code":"bad_frame","message":"frame must be a JSON object"}'
    )
    assert json.loads(encode_error("m\u00e9", "rate_limited", "slow down"))["id"] == "m\u00e9"


def test_encode_pong() -> None:
    assert encode_pong() == '{"type":"pong"}'


RECORD = ChatRecord(
    from_uid="alice",
    from_device="d1",
    to="bob",
    id="m\u00e9",
    body={"t": "h\u00e9"},
    ts=1700000000000,
)


def test_encode_message() -> None:
    text = encode_message(RECORD, 5, 99)
    assert text == (
        '{"type":"message","from":"alice","from_device":"d1","to":"bob","id":"m\u00e9",'
        '"body":{"t":"h\u00e9"},"partition":5,"offset":99,"ts":1700000000000}'
    )


def test_encoders_reject_unencodable_values() -> None:
    bad = dataclasses.replace(RECORD, body=float("nan"))
    with pytest.raises(LocalProtocolError):
        encode_message(bad, 0, 0)
    with pytest.raises(LocalProtocolError):
        encode_message(dataclasses.replace(RECORD, body={1, 2}), 0, 0)


# ---------------------------------------------------------------- handshake query


def fixed_device() -> str:
    return "generated"


def parse(query: str) -> HandshakeParams:
    return parse_handshake_query(query, new_device_id=fixed_device)


def handshake_error(query: str) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        parse(query)
    assert info.value.status == 400
    assert info.value.id is None
    return info.value


def test_handshake_minimal() -> None:
    assert parse("uid=alice") == HandshakeParams("alice", "generated", None, None)


def test_handshake_all_params() -> None:
    params = parse("uid=alice&device=phone-1&token=abc.def.ghi&resume=17")
    assert params == HandshakeParams("alice", "phone-1", "abc.def.ghi", 17)


def test_handshake_default_device_uses_callable_only_when_needed() -> None:
    calls: list[int] = []

    def make() -> str:
        calls.append(1)
        return "fresh"

    assert parse_handshake_query("uid=a", new_device_id=make).device == "fresh"
    assert parse_handshake_query("uid=a&device=d", new_device_id=make).device == "d"
    assert calls == [1]


def test_handshake_percent_decoding() -> None:
    params = parse("uid=a%40b&token=x%2By%3D")
    assert (params.uid, params.token) == ("a@b", "x+y=")


def test_handshake_ignores_unknown_and_blank_pairs() -> None:
    assert parse("&&x=1&x=2&=z&uid=alice&&cache=") == HandshakeParams(
        "alice", "generated", None, None
    )


def test_handshake_blank_token_is_no_token() -> None:
    assert parse("uid=a&token=").token is None
    assert parse("uid=a&token").token is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", -1),
        ("0", 0),
        ("007", 7),
        ("9223372036854775807", 2**63 - 1),
        ("1" * 19, int("1" * 19)),
    ],
)
def test_handshake_resume_values(value: str, expected: int) -> None:
    assert parse(f"uid=a&resume={value}").resume == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "-2",
        "-0",
        "+1",
        "1.0",
        "1e3",
        " 1",
        "1 ",
        "%201",
        "abc",
        "0x10",
        "%D9%A1",
        "9223372036854775808",
        "9999999999999999999",
        "1" * 20,
        "--1",
    ],
)
def test_handshake_bad_resume(value: str) -> None:
    err = handshake_error(f"uid=a&resume={value}")
    assert err.code == "bad_resume"
    assert "resume" in err.message


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "parameter 'uid' is required"),
        ("device=d", "parameter 'uid' is required"),
        ("UID=alice", "parameter 'uid' is required"),
        ("uid=", "parameter 'uid' must be"),
        ("uid", "parameter 'uid' must be"),
        ("uid=a+b", "parameter 'uid' must be"),
        ("uid=a%2Fb", "parameter 'uid' must be"),
        ("uid=a%0A", "parameter 'uid' must be"),
        ("uid=" + "x" * 129, "parameter 'uid' must be"),
    ],
)
def test_handshake_bad_uid(query: str, message: str) -> None:
    err = handshake_error(query)
    assert err.code == "bad_uid"
    assert message in err.message


@pytest.mark.parametrize("value", ["", "a b", "a%20b", "x" * 129, "%C3%A9"])
def test_handshake_bad_device(value: str) -> None:
    assert handshake_error(f"uid=a&device={value}").code == "bad_device"


@pytest.mark.parametrize(
    "query",
    [
        "uid=a&uid=a",
        "uid=a&uid=b",
        "uid=a&device=d&device=d",
        "uid=a&token=t&token=t",
        "uid=a&resume=1&resume=1",
        "uid=a&token=&token=",
    ],
)
def test_handshake_repeated_params(query: str) -> None:
    err = handshake_error(query)
    assert err.code == "bad_request"
    assert "more than once" in err.message


def test_handshake_checks_repeats_before_values() -> None:
    assert handshake_error("uid=&uid=").code == "bad_request"


def test_handshake_query_length_bound() -> None:
    assert MAX_QUERY_CHARS == 8192
    ok = "uid=a&pad=" + "x" * (MAX_QUERY_CHARS - 10)
    assert len(ok) == MAX_QUERY_CHARS
    assert parse(ok).uid == "a"
    err = handshake_error(ok + "x")
    assert err.code == "bad_request"
    assert "longer than 8192" in err.message


@pytest.mark.parametrize("query", ["uid=\u00e9", "uid=a&x=\u00e9", "uid=a&token=\ud800"])
def test_handshake_rejects_non_ascii(query: str) -> None:
    assert handshake_error(query).code == "bad_request"


@pytest.mark.parametrize("query", ["uid=a&token=%FF", "uid=%C3", "uid=a&x=%ED%A0%80"])
def test_handshake_rejects_non_utf8_escapes(query: str) -> None:
    err = handshake_error(query)
    assert (err.code, err.message) == ("bad_request", "query string is not valid UTF-8")


def test_handshake_params_is_frozen() -> None:
    params = parse("uid=a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.uid = "b"  # type: ignore[misc]


# ------------------------------------------------------------------ Kafka records


def test_encode_record_exact_bytes() -> None:
    assert RECORD_VERSION == 1
    assert encode_record(RECORD) == (
        '{"v":1,"from":"alice","from_device":"d1","to":"bob","id":"m\u00e9",'
        '"body":{"t":"h\u00e9"},"ts":1700000000000}'
    ).encode("utf-8")


def test_record_round_trip() -> None:
    assert decode_record(encode_record(RECORD)) == RECORD
    for body in (None, 0, "", [], {}, [1.5, True, None, {"a": "b"}], 10**300):
        record = dataclasses.replace(RECORD, body=body)
        assert decode_record(encode_record(record)) == record


def test_decode_record_ignores_unknown_keys() -> None:
    value = json.loads(encode_record(RECORD))
    value["later"] = {"x": 1}
    assert decode_record(json.dumps(value).encode()) == RECORD


def test_decode_record_accepts_bytes_like() -> None:
    raw = encode_record(RECORD)
    assert decode_record(bytearray(raw)) == RECORD  # type: ignore[arg-type]
    assert decode_record(memoryview(raw)) == RECORD  # type: ignore[arg-type]


def record_json(**changes: Any) -> bytes:
    value: dict[str, Any] = json.loads(encode_record(RECORD))
    for key, new in changes.items():
        if new is ...:
            del value[key]
        else:
            value[key] = new
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (None, "no value"),
        ("{}", "must be bytes"),
        (b"", "invalid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"v":1,"x":"\xed\xa0\x80"}', "not valid UTF-8"),
        (b"not json", "invalid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'"v"', "must be a JSON object"),
        (b'{"v":1,"v":1}', "duplicate key"),
        (b'{"v":NaN}', "NaN"),
        (b"[" * 100 + b"]" * 100, "nested deeper"),
        (b'{"v":' + b"1" * 5000 + b"}", "number too large"),
        (record_json(v=...), "'v' must be an integer"),
        (record_json(v="1"), "'v' must be an integer"),
        (record_json(v=True), "'v' must be an integer"),
        (record_json(v=1.0), "'v' must be an integer"),
        (record_json(v=2), "'to' must be a list of uids"),
        (record_json(v=3), "unsupported record version 3"),
        (record_json(v=0), "unsupported record version 0"),
        (record_json(**{"from": ...}), "'from' is required"),
        (record_json(from_device=...), "'from_device' is required"),
        (record_json(to=...), "'to' is required"),
        (record_json(id=...), "'id' is required"),
        (record_json(body=...), "'body' is required"),
        (record_json(ts=...), "'ts' is required"),
        (record_json(**{"from": "a b"}), "'from' must be a uid"),
        (record_json(**{"from": 5}), "'from' must be a uid"),
        (record_json(from_device=""), "'from_device' must be a uid"),
        (record_json(to="x" * 129), "'to' must be a uid"),
        (record_json(to=None), "'to' must be a uid"),
        (record_json(id=""), "'id' must be a string"),
        (record_json(id="x" * 65), "'id' must be a string"),
        (record_json(id=1), "'id' must be a string"),
        (record_json(ts=-1), "'ts' must be"),
        (record_json(ts=2**63), "'ts' must be"),
        (record_json(ts=1.0), "'ts' must be"),
        (record_json(ts=True), "'ts' must be"),
        (record_json(ts="1"), "'ts' must be"),
        (record_json(body="\ud800"), "unpaired surrogate"),
    ],
)
def test_decode_record_rejects(data: Any, fragment: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(data)
    assert fragment in str(info.value)


def test_record_size_bound() -> None:
    assert MAX_RECORD_BYTES == 1 << 20
    big = dataclasses.replace(RECORD, body="x" * (MAX_RECORD_BYTES - 200))
    raw = encode_record(big)
    assert decode_record(raw) == big
    too_big = dataclasses.replace(RECORD, body="x" * MAX_RECORD_BYTES)
    with pytest.raises(RemoteProtocolError) as info:
        encode_record(too_big)
    assert (info.value.code, info.value.id) == ("bad_frame", RECORD.id)
    assert "too large" in info.value.message
    oversized = raw[:-1] + b" " * (MAX_RECORD_BYTES + 1 - len(raw)) + b"}"
    with pytest.raises(RecordError, match="limit"):
        decode_record(oversized)
    assert decode_record(oversized, max_bytes=len(oversized)) == big
    with pytest.raises(RemoteProtocolError):
        encode_record(RECORD, max_bytes=10)
    with pytest.raises(RecordError):
        decode_record(encode_record(RECORD), max_bytes=10)


@pytest.mark.parametrize(
    "changes",
    [
        {"from_uid": "a b"},
        {"from_device": ""},
        {"to": "x" * 129},
        {"id": ""},
        {"id": "x" * 65},
        {"ts": -1},
        {"ts": 1.5},
        {"ts": True},
        {"body": float("inf")},
        {"body": object()},
        {"body": "\ud800"},
    ],
)
def test_encode_record_rejects_invalid_records(changes: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_record(dataclasses.replace(RECORD, **changes))


# ---------------------------------------------------------------------- hypothesis

UID_CHARS = "ABCXYZabcxyz0189_.:@-"
uids = st.text(alphabet=UID_CHARS, min_size=1, max_size=128)
msg_ids = st.text(min_size=1, max_size=64)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**1000), max_value=10**1000)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def _obj(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


# JSON-ish *text*: may hold NaN/Infinity, out-of-range floats, numbers past the
# int digit limit, duplicate keys, surrogate escapes and deep nesting, none of
# which a Python value can be dumped into.
json_keys = st.sampled_from(['"type"', '"id"', '"to"', '"body"', '"a"', '"\\ud800"']) | st.text(
    max_size=5
).map(json.dumps)
json_leaf_text = st.one_of(
    st.sampled_from(
        [
            "null",
            "true",
            "false",
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e999",
            "-0",
            "1E5",
            '"\\ud800"',
            '"\\udfff"',
            '"\\ud83d\\ude00"',
            '"\\\\ud800"',
            '"send"',
            '"ping"',
            '"bob"',
        ]
    ),
    st.integers().map(str),
    st.floats().map(json.dumps),
    st.integers(min_value=4200, max_value=4400).map(lambda n: "7" * n),
    st.text(max_size=10).map(json.dumps),
    st.text(max_size=10).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.text(alphabet=UID_CHARS + " ", max_size=130).map(json.dumps),
)
json_text = st.recursive(
    json_leaf_text,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(json_keys, children), max_size=5).map(_obj),
        st.tuples(st.integers(min_value=55, max_value=80), children).map(
            lambda t: "[" * t[0] + t[1] + "]" * t[0]
        ),
        st.tuples(st.integers(min_value=1000, max_value=5000), children).map(
            lambda t: '{"a":' * t[0] + t[1] + "}" * t[0]
        ),
    ),
    max_leaves=12,
)
frame_types = st.sampled_from(['"send"'] * 6 + ['"ping"', '"pong"', '""', "1", "null", '["send"]'])


def field(key: str, good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> Any:
    """Mostly a well-formed value, sometimes a bad one, sometimes absent."""
    choice = st.integers(min_value=0, max_value=9).flatmap(
        lambda n: good if n < 7 else bad if n < 9 else st.none()
    )
    return choice.map(lambda v: None if v is None else (f'"{key}"', v))


# Frames that are usually almost right, so every validation branch gets reached.
frame_text = st.tuples(
    field("type", frame_types, json_leaf_text),
    field("id", msg_ids.map(json.dumps), st.text(max_size=70).map(json.dumps) | json_leaf_text),
    field("to", uids.map(json.dumps), json_leaf_text),
    field("body", json_values.map(json.dumps), json_text),
    st.integers(min_value=0, max_value=3).flatmap(
        lambda n: st.tuples(json_keys, json_text) if n == 3 else st.none()
    ),
).map(lambda parts: _obj([p for p in parts if p is not None]))


def check_decode_outcome(data: str | bytes) -> None:
    try:
        result = decode_client_frame(data)
    except RemoteProtocolError as exc:
        assert exc.code in {"bad_frame", "bad_recipient"}
        assert exc.id is None or 1 <= len(exc.id) <= 64
        assert isinstance(exc.message, str) and exc.message
        # The answer to any bad frame can itself be sent.
        encode_error(exc.id, exc.code, exc.message).encode("utf-8")
        return
    assert isinstance(result, Send | Ping)
    if isinstance(result, Send):
        assert is_valid_uid(result.to)
        assert 1 <= len(result.id) <= 64
        # Whatever was accepted can be stored and delivered again.
        record = ChatRecord("alice", "d1", result.to, result.id, result.body, 0)
        assert decode_record(encode_record(record, max_bytes=1 << 26), max_bytes=1 << 26) == record
        encode_message(record, 0, 0).encode("utf-8")


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_decode_bytes(data: bytes) -> None:
    check_decode_outcome(data)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_decode_text(data: str) -> None:
    check_decode_outcome(data)
    check_decode_outcome(data.encode("utf-8"))


@FUZZ
@given(
    st.text(alphabet=st.characters() | st.sampled_from("\ud800\udbff\udc00\udfff"), max_size=100)
)
def test_fuzz_decode_text_with_surrogates(data: str) -> None:
    check_decode_outcome(data)
    check_decode_outcome(data.encode("utf-8", "surrogatepass"))


@FUZZ
@given(json_text)
def test_fuzz_decode_json_text(text: str) -> None:
    check_decode_outcome(text)


@FUZZ
@given(frame_text)
def test_fuzz_decode_frames(text: str) -> None:
    check_decode_outcome(text)
    check_decode_outcome(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(json_values)
def test_fuzz_decode_json_values(value: Any) -> None:
    check_decode_outcome(json.dumps(value))
    check_decode_outcome(json.dumps({"type": "send", "id": "m", "to": "bob", "body": value}))


@FUZZ
@given(msg_ids, uids, json_values)
def test_fuzz_valid_sends_decode(msg_id: str, to: str, body: Any) -> None:
    assume(depth(body) < MAX_JSON_DEPTH)
    frame = json.dumps({"type": "send", "id": msg_id, "to": to, "body": body}, ensure_ascii=False)
    assert decode_client_frame(frame) == Send(msg_id, to, body)
    assert decode_client_frame(frame.encode("utf-8")) == Send(msg_id, to, body)


chat_records = st.builds(
    ChatRecord,
    from_uid=uids,
    from_device=uids,
    to=uids,
    id=msg_ids,
    body=json_values,
    ts=st.integers(min_value=0, max_value=2**63 - 1),
)


@FUZZ
@given(chat_records, st.integers(min_value=0, max_value=4095), st.integers(min_value=0))
def test_fuzz_record_round_trip(record: ChatRecord, partition: int, offset: int) -> None:
    assume(depth(record.body) < MAX_JSON_DEPTH)
    raw = encode_record(record)
    assert decode_record(raw) == record
    value = json.loads(raw)
    assert value["v"] == RECORD_VERSION
    message = json.loads(encode_message(record, partition, offset))
    assert message == {
        "type": "message",
        "from": record.from_uid,
        "from_device": record.from_device,
        "to": record.to,
        "id": record.id,
        "body": record.body,
        "partition": partition,
        "offset": offset,
        "ts": record.ts,
    }


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_decode_record_bytes(data: bytes) -> None:
    try:
        record = decode_record(data)
    except RecordError:
        return
    assert decode_record(encode_record(record)) == record


@FUZZ
@given(json_text)
def test_fuzz_decode_record_json_text(text: str) -> None:
    try:
        decode_record(text.encode("utf-8", "surrogatepass"))
    except RecordError:
        pass


def check_handshake_outcome(query: str) -> None:
    try:
        params = parse_handshake_query(query, new_device_id=new_device_id)
    except HandshakeError as exc:
        assert exc.status == 400
        assert exc.code in {"bad_uid", "bad_device", "bad_resume", "bad_request"}
        json.dumps({"error": exc.code, "message": exc.message}).encode("utf-8")
        return
    assert isinstance(params, HandshakeParams)
    assert is_valid_uid(params.uid)
    assert is_valid_uid(params.device)
    assert params.resume is None or -1 <= params.resume < 2**63
    assert params.token is None or (params.token and params.token.encode("utf-8"))


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_handshake_text(query: str) -> None:
    check_handshake_outcome(query)


query_keys = st.sampled_from(["uid", "device", "token", "resume", "x", "", "u%69d"])
query_values = st.one_of(
    uids,
    st.text(max_size=20),
    st.sampled_from(
        ["-1", "0", "-2", "9223372036854775807", "9223372036854775808", "%FF", "%C3%A9"]
    ),
    st.integers().map(str),
)
queries = st.lists(
    st.tuples(query_keys, st.none() | query_values).map(
        lambda kv: kv[0] if kv[1] is None else f"{kv[0]}={kv[1]}"
    ),
    max_size=6,
).map("&".join)


@FUZZ
@given(queries)
def test_fuzz_handshake_structured(query: str) -> None:
    check_handshake_outcome(query)


@FUZZ
@given(uids, st.none() | uids, st.none() | st.integers(min_value=-1, max_value=2**63 - 1))
def test_fuzz_handshake_valid(uid: str, device: str | None, resume: int | None) -> None:
    parts = [f"uid={uid}"]
    if device is not None:
        parts.append(f"device={device}")
    if resume is not None:
        parts.append(f"resume={resume}")
    params = parse_handshake_query("&".join(parts), new_device_id=fixed_device)
    assert params == HandshakeParams(uid, device or "generated", None, resume)


# -- group sends (CONTRACT v2 §5) and record version 2 ------------------------------------


def test_a_group_send_decodes_with_its_recipients_in_order() -> None:
    frame = decode_client_frame(send_frame(id="g1", to=["carol", "bob", "dave"], body={"t": 1}))
    assert frame == GroupSend(id="g1", to=("carol", "bob", "dave"), body={"t": 1})


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ([], "at least one recipient"),
        ([f"u{n}" for n in range(101)], "names 101 recipients; at most 100"),
        (["bob", "carol", "bob"], "'bob' is listed twice"),
        (["bob", "no spaces"], "to[1] must be a uid"),
        (["bob", 7], "to[1] must be a uid"),
        (["bob", None], "to[1] must be a uid"),
    ],
)
def test_a_bad_recipient_list_is_bad_recipient(to: list[Any], message: str) -> None:
    err = remote_error(send_frame(id="g1", to=to, body=1))
    assert (err.code, err.id) == ("bad_recipient", "g1")
    assert message in err.message


def test_the_recipient_limit_is_configurable() -> None:
    frame = send_frame(id="g1", to=["a", "b", "c"], body=1)
    assert isinstance(decode_client_frame(frame, max_recipients=3), GroupSend)
    with pytest.raises(RemoteProtocolError, match="at most 2"):
        decode_client_frame(frame, max_recipients=2)


GROUP = GroupRecord(
    from_uid="alice",
    from_device="d1",
    to=("carol", "bob"),
    id="g1",
    body={"text": "hi all"},
    ts=1_700_000_000_000,
    recipients=("bob", "carol", "dave"),
)


def test_group_records_round_trip_and_are_keyed_apart() -> None:
    data = encode_record(GROUP)
    assert json.loads(data)["v"] == 2
    assert decode_record(data) == GROUP
    assert record_key(GROUP) == GROUP_RECORD_KEY == b"*"
    assert record_key(RECORD) == RECORD.to.encode()
    published = dataclasses.replace(GROUP, from_device="server", recipients=None)
    assert decode_record(encode_record(published)) == published
    assert "recipients" not in json.loads(encode_record(published))
    # Version 1 records are still read as they always were.
    assert decode_record(encode_record(RECORD)) == RECORD


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"to": []}, "'to' must be a list of distinct uids"),
        ({"to": ["bob", "bob"]}, "'to' must be a list of distinct uids"),
        ({"to": "bob"}, "'to' must be a list of uids"),
        ({"recipients": ["bob"]}, "'recipients' must be a list of uids holding every one of 'to'"),
        ({"recipients": "bob"}, "'recipients' must be a list of uids"),
    ],
)
def test_bad_group_records_are_refused(changes: dict[str, Any], message: str) -> None:
    doc = json.loads(encode_record(GROUP))
    doc.update(changes)
    with pytest.raises(RecordError, match=re.escape(message)):
        decode_record(json.dumps(doc).encode())


def test_a_group_message_goes_to_each_recipient_with_the_whole_list() -> None:
    for uid in GROUP.to:
        frame = json.loads(encode_message(GROUP, 5, 42, uid))
        assert frame["to"] == uid
        assert frame["recipients"] == ["bob", "carol", "dave"]
        assert (frame["partition"], frame["offset"], frame["from"]) == (5, 42, "alice")
    with pytest.raises(LocalProtocolError):
        encode_message(GROUP, 5, 42, "dave")  # dave's partition has its own record
    published = json.loads(
        encode_message(dataclasses.replace(GROUP, recipients=None), 5, 42, "bob")
    )
    assert "recipients" not in published
    assert "recipients" not in json.loads(encode_message(RECORD, 5, 99))


def test_the_client_reads_group_acks_and_recipients() -> None:
    ack = decode_server_frame(
        encode_group_ack("g1", [(3, 10, ["bob"]), (5, 42, ["carol", "dave"])])
    )
    assert ack == GroupAck(
        "g1", (PartitionAck(3, 10, ("bob",)), PartitionAck(5, 42, ("carol", "dave")))
    )
    message = decode_server_frame(encode_message(GROUP, 5, 42, "bob"))
    assert isinstance(message, Message) and message.recipients == ("bob", "carol", "dave")
    assert encode_send("g1", ["a", "b"], 1) == '{"type":"send","id":"g1","to":["a","b"],"body":1}'
    with pytest.raises(LocalProtocolError):
        encode_send("g1", ["a", "a"], 1)
