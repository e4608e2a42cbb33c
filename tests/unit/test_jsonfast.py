"""jsonfast's orjson path against its standard-library path (protocol's rules).

Differential: every text is decoded by ``jsonfast.loads_strict`` (the
standard library's strict decoder, which linechatd.protocol used before it
delegated to jsonfast: the reference) and by ``jsonfast.loads_strict_fast``; both must accept it with
equal values (types and the sign of zero included) or both reject it with the
same message. Hypothesis prints the failing example; rerun one with
``pytest --hypothesis-seed=N``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from linechatd import jsonfast, protocol

pytestmark = pytest.mark.skipif(jsonfast.ORJSON_VERSION is None, reason="orjson not installed")


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, -0.0 apart from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def outcome(decode: Any, data: str | bytes) -> tuple[str, Any]:
    try:
        return ("ok", decode(data))
    except ValueError as exc:
        # The reason linechatd would send back (protocol._json_reason).
        if isinstance(exc, json.JSONDecodeError):
            return ("error", f"invalid JSON: {exc.msg} at position {exc.pos}")
        if isinstance(exc, jsonfast.JSONRejected | jsonfast.JSONRejected):
            return ("error", str(exc))
        return ("error", f"{type(exc).__name__}: {exc}")


def assert_same_decoding(text: str) -> None:
    want = outcome(jsonfast.loads_strict, text)
    got = outcome(jsonfast.loads_strict_fast, text)
    assert got[0] == want[0], (got, want)
    if want[0] == "ok":
        assert same(got[1], want[1]), (got, want)
    else:
        assert got[1] == want[1]
    # The standard-library path of jsonfast is the same decoder.
    assert outcome(jsonfast.loads_strict, text)[0] == want[0]
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return  # a lone surrogate in the text: only the str path can see it
    got_bytes = outcome(jsonfast.loads_strict_fast, data)
    assert got_bytes[0] == want[0], (got_bytes, want)
    if want[0] == "ok":
        assert same(got_bytes[1], want[1])


# ------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"send","id":"m1","to":"bob","body":{"text":"hello"}}',
        "NaN",
        "[Infinity]",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
        "-0",
        "-0.0",
        "0e0",
        "1E+2",
        '{"a":1,"a":2}',
        '{"a":{"b":1,"b":1}}',
        '{"a":1,"b":"x:y","a":"z"}',
        '{"a":1,"\\u0061":2}',
        '{"\\u003a":1,"\\u003A":2}',
        '{"a":"\\u003a","a":1}',
        '{"a":1,"a":"\\u003a"}',
        '"\\ud800"',
        '"\\udc00"',
        '"\\ud83d\\ude00"',
        '"\\ud83d\\u0041"',
        '"\\\\ud800"',
        "[" * 64 + "]" * 64,
        "[" * 65 + "]" * 65,
        '["' + "[" * 100 + '"]',
        "{" * 65 + "}" * 65,
        '{"a":' * 65 + "1" + "}" * 65,
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890",
        "7" * 4301,
        "0.1000000000000000055511151231257827",
        "1.2345678901234567e-300",
        "2.2250738585072011e-308",
        "4.9e-324",
        "1.7976931348623157e308",
        "1.7976931348623159e308",
        " \t\n\r{} \t\n\r",
        "\x0c1",
        "\ufeff{}",
        "\u00a01",
        '"\x00"',
        '"\\u0000"',
        '"\x7f\u2028"',
        "[1,]",
        '{"a":1,}',
        "01",
        "1.",
        ".5",
        "",
        "[",
        '"abc',
        '{"a" 1}',
        "true false",
        '"\\x"',
    ],
)
def test_examples_decode_like_protocol(text: str) -> None:
    assert_same_decoding(text)


def test_typical_frame_takes_orjson_and_a_duplicate_is_still_refused() -> None:
    frame = '{"type":"send","id":"m1","to":"bob","body":{"text":"hello: world"}}'
    assert jsonfast.loads_strict_fast(frame) == json.loads(frame)
    assert jsonfast.loads_strict_fast(frame.encode()) == json.loads(frame)
    with pytest.raises(jsonfast.JSONRejected, match="duplicate key 'to'"):
        jsonfast.loads_strict_fast('{"to":"a","body":{"text":"x:y"},"to":"b"}')


def test_invalid_utf8_bytes_are_refused() -> None:
    for data in (b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\x80"', b'{"a":"\xe2\x82"}'):
        with pytest.raises(ValueError):
            jsonfast.loads_strict_fast(data)
        with pytest.raises(ValueError):
            jsonfast.loads_strict(data)


# ----------------------------------------------------------------------- properties

# JSON-ish text: valid documents and near misses, aimed at where orjson and the
# standard library differ (duplicates, escaped colons, long numbers, depth).
keys = st.sampled_from(['"a"', '"b"', '"\\u0061"', '"\\u003a"', '"a:b"', '"\\ud800"', '""']) | (
    st.text(max_size=5).map(lambda s: json.dumps(s, ensure_ascii=False))
)
leaves = st.one_of(
    st.sampled_from(
        [
            "null",
            "true",
            "false",
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-0",
            "-0.0",
            '"\\ud800"',
            '"\\udfff"',
            '"\\ud83d\\ude00"',
            '"\\\\u003a"',
            '":"',
            '"\\u003a"',
            '"x"',
        ]
    ),
    st.integers().map(str),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.tuples(
        st.text("0123456789", min_size=1, max_size=25),
        st.text("0123456789", max_size=25),
        st.integers(-400, 400),
    ).map(lambda t: f"{t[0]}.{t[1] or '0'}e{t[2]}"),
    st.text(max_size=10).map(json.dumps),
    st.text(max_size=10).map(lambda s: json.dumps(s, ensure_ascii=False)),
)


def _obj(pairs: list[tuple[str, str]], sep: str) -> str:
    return "{" + sep.join(f"{k}:{v}" for k, v in pairs) + "}"


json_text = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(keys, children), max_size=5).map(lambda ps: _obj(ps, ",")),
        st.lists(st.tuples(keys, children), max_size=3).map(lambda ps: _obj(ps, " ,\n")),
        st.tuples(st.integers(min_value=60, max_value=70), children).map(
            lambda t: "[" * t[0] + t[1] + "]" * t[0]
        ),
        st.tuples(st.integers(min_value=60, max_value=70), children).map(
            lambda t: '{"k":' * t[0] + t[1] + "}" * t[0]
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_text)
@example('{"a":1,"a":"\\u003a"}')
def test_decodes_like_protocol(text: str) -> None:
    assert_same_decoding(text)


@settings(max_examples=500, deadline=None)
@given(json_text, st.integers(0, 200), st.sampled_from(["", " ", "x", ",", "}", "\x0c", "\ufeff"]))
def test_damaged_text_decodes_like_protocol(text: str, at: int, insert: str) -> None:
    at = min(at, len(text))
    assert_same_decoding(text[:at] + insert + text[at:])
    assert_same_decoding(text[:at] + text[at + 1 :])


@settings(max_examples=300, deadline=None)
@given(json_text.map(str.encode), st.integers(0, 200), st.binary(min_size=1, max_size=3))
def test_bytes_with_invalid_utf8_are_refused_like_a_decode_would(
    data: bytes, at: int, junk: bytes
) -> None:
    data = data[:at] + junk + data[at:]
    got = outcome(jsonfast.loads_strict_fast, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        assert got == ("error", "JSON is not valid UTF-8")
        return
    want = outcome(jsonfast.loads_strict, text)
    assert got[0] == want[0]
    if want[0] == "ok":
        assert same(got[1], want[1])


# ------------------------------------------------------------------------ encoding


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Colour(enum.IntEnum):
    RED = 1


class Word(str):
    def __str__(self) -> str:
        return "not the content"


class Masked(dict[str, str]):
    """json encodes a dict subclass through items(); orjson reads its storage."""

    def items(self) -> Any:
        return [("secret", "masked")]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(map(has_float, value.values()))
    if isinstance(value, list):
        return any(map(has_float, value))
    return False


@settings(max_examples=800, deadline=None)
@given(json_values)
def test_encodes_like_the_standard_library(value: Any) -> None:
    fast = jsonfast.dumps_compact_fast(value)
    slow = jsonfast.dumps_compact(value)
    assert slow == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    if not has_float(value):
        assert fast == slow
    # Floats may be spelled differently, never read back differently.
    assert same(json.loads(fast), json.loads(slow))


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        [1, float("inf")],
        {"a": None, "b": -float("inf")},
        {1: "x"},
        {"s": "\ud800"},
        {"big": 2**64},
        [-(2**63) - 1],
        object(),
        [[[[]]]],
        True,
        datetime.datetime(2026, 1, 1),
        Point(1, 2),
        Colour.RED,
        Word("x"),
        Masked(secret="kept out"),
    ],
)
def test_what_orjson_refuses_is_encoded_or_refused_as_json_does(value: Any) -> None:
    try:
        want: Any = jsonfast.dumps_compact(value)
    except (TypeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            jsonfast.dumps_compact_fast(value)
    else:
        assert jsonfast.dumps_compact_fast(value) == want


def test_message_frame_bytes() -> None:
    record = protocol.ChatRecord("alice", "d1", "bob", "m1", {"text": "héllo"}, 1700000000000)
    fields = {
        "type": "message",
        "from": record.from_uid,
        "from_device": record.from_device,
        "to": record.to,
        "id": record.id,
        "body": record.body,
        "partition": 3,
        "offset": 42,
        "ts": record.ts,
    }
    assert jsonfast.dumps_compact_fast(fields) == protocol.encode_message(record, 3, 42).encode()


@pytest.mark.parametrize("kind", [str, bytes])
def test_member_limit_is_exact_on_both_paths(kind: type) -> None:
    limit = jsonfast.MAX_JSON_MEMBERS
    # n commas: n + 1 elements, n members counted (as protocol always counted).
    at_limit = "[" + ",".join(["1"] * (limit + 1)) + "]"
    over = "[" + ",".join(["1"] * (limit + 2)) + "]"
    # Commas inside strings are not members.
    in_strings = '["' + "," * (limit * 2) + '"]'
    nested_over = '{"a":' + over + "}"
    decode = jsonfast.loads_strict_fast
    for text in (at_limit, over, in_strings, nested_over):
        data = text if kind is str else text.encode()
        want = outcome(jsonfast.loads_strict, data)
        got = outcome(decode, data)
        assert got[0] == want[0]
        assert same(got[1], want[1]) if want[0] == "ok" else got == want
    too_many = ("error", f"JSON with more than {limit} members or elements")
    assert outcome(decode, kind(at_limit, "utf-8") if kind is bytes else at_limit)[0] == "ok"
    assert outcome(decode, kind(over, "utf-8") if kind is bytes else over) == too_many
    assert outcome(decode, kind(nested_over, "utf-8") if kind is bytes else nested_over) == too_many
    assert outcome(decode, kind(in_strings, "utf-8") if kind is bytes else in_strings)[0] == "ok"
