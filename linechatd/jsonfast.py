"""Strict JSON decoding and compact encoding, with orjson when it is installed.

:func:`loads_strict_fast` accepts and rejects exactly what the strict decoder
of :mod:`linechatd.protocol` does, and returns equal values; the standard
library decoder below (:func:`loads_strict`) is that decoder. Every rejection
is decided by it, so the error messages are the same too. orjson only takes
the documents it is known to read the same way, checked cheaply on the text
and on its result:

============================  =======================  ==============================
rule                          orjson 3.x by itself      here
============================  =======================  ==============================
NaN / Infinity                rejected                  -
number that overflows to inf  rejected                  -
unpaired surrogate escape     rejected                  -
invalid UTF-8, BOM            rejected                  -
duplicate keys                last one wins             colons in the text vs in
                                                        ``orjson.dumps`` of the value
nesting deeper than 64        allowed up to 1024        bracket count, then a scan
more than 4096 members        allowed                   comma count, then a scan
integer outside int64/uint64  becomes a float           any run of 19+ digits: stdlib
============================  =======================  ==============================

The duplicate check counts ``:`` in the text (one per object member plus those
inside strings) and in the re-encoded value (the same, minus every member a
duplicate key dropped); orjson never escapes ``:``, so the two are equal
exactly when no key was repeated -- unless an escape (``\\u003a``) spelled a
colon, so such texts go to the standard library too.

:func:`dumps_compact_fast` encodes like ``json.dumps(value, separators=(",",
":"), ensure_ascii=False, allow_nan=False)``, as UTF-8 bytes. Its output is
byte-identical except for the spelling of some floats (orjson writes
``0.00001`` and ``1e-7`` where Python writes ``1e-05`` and ``1e-07``; both read
back as the same float); what orjson refuses (integers outside int64/uint64,
non-str keys, unpaired surrogates, NaN, subclasses of str/int/dict/list,
dataclasses, datetimes) is encoded by the standard library, with its errors.
Only ``enum.Enum`` and ``uuid.UUID`` values, which linechatd never encodes,
are accepted by orjson where the standard library raises TypeError.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any, NoReturn

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_MEMBERS",
    "ORJSON_VERSION",
    "JSONRejected",
    "dumps_compact",
    "dumps_compact_fast",
    "loads_strict",
    "loads_strict_fast",
]

MAX_JSON_DEPTH = 64
# Members of objects and elements of arrays in one document, all levels
# together: what a chat frame needs is far below; what a 64 KiB frame of
# "[1,1,1,..." costs to parse is not.
MAX_JSON_MEMBERS = 4096

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on what is installed
    _orjson = None  # type: ignore[assignment]

ORJSON_VERSION: str | None = _orjson.__version__ if _orjson is not None else None


class JSONRejected(ValueError):
    """The document breaks a strictness rule; the message is meant for the peer."""


# ------------------------------------------------------------- the standard library


def _reject_constant(name: str) -> NoReturn:
    raise JSONRejected(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # "1e400" parses to inf, which could never be encoded back as JSON.
        raise JSONRejected(f"number {text[:32]} is out of range")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # ascii(): the key may hold an unpaired surrogate (not checked yet).
                raise JSONRejected(f"duplicate key {key[:64]!a}")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_object,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
)

# A string token (an unterminated one runs to the end, so a failed match never
# restarts scanning inside it), a bracket or a comma.
_STRUCTURE_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{},]', re.DOTALL)
_STRUCTURE_TOKEN_BYTES = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[\[\]{},]', re.DOTALL)
# Only escapes in D800-DFFF can decode to an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _structure_problem(text: str | bytes) -> str | None:
    """Nesting deeper than MAX_JSON_DEPTH, or more than MAX_JSON_MEMBERS members
    and elements, found without the recursive parser (whichever comes first)."""
    firsts: Iterator[str]
    if isinstance(text, str):
        # Three passes in C: too few brackets to be too deep and too few commas
        # (even counting those inside strings) to be too many members.
        shallow = text.count("[") + text.count("{") <= MAX_JSON_DEPTH
        if shallow and text.count(",") <= MAX_JSON_MEMBERS:
            return None
        firsts = (match.group()[0] for match in _STRUCTURE_TOKEN.finditer(text))
    else:
        shallow = text.count(b"[") + text.count(b"{") <= MAX_JSON_DEPTH
        if shallow and text.count(b",") <= MAX_JSON_MEMBERS:
            return None
        firsts = (chr(match.group()[0]) for match in _STRUCTURE_TOKEN_BYTES.finditer(text))
    depth = 0
    members = 0
    for char in firsts:
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        elif char in "]}":
            depth -= 1
        elif char == ",":
            members += 1
            if members > MAX_JSON_MEMBERS:
                return f"JSON with more than {MAX_JSON_MEMBERS} members or elements"
    return None


def loads_strict(data: str | bytes) -> Any:
    """Parse one JSON document strictly with the standard library; every failure is a ValueError.

    A ``str`` must not contain surrogate code points (callers check); ``bytes``
    must be UTF-8.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JSONRejected("JSON is not valid UTF-8") from None
    else:
        text = data
    problem = _structure_problem(text)
    if problem is not None:
        raise JSONRejected(problem)
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        # The depth scan should prevent this; stay safe if it ever does not.
        raise JSONRejected(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JSONRejected("JSON string contains an unpaired surrogate escape") from None
    return value


def dumps_compact(value: Any) -> bytes:
    """Compact UTF-8 JSON from the standard library; TypeError/ValueError/RecursionError
    for what cannot be encoded (UnicodeEncodeError, a ValueError, for a lone surrogate)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


# ------------------------------------------------------------------------- orjson


def _shape_table() -> bytes:
    table = bytearray(range(256))
    for digit in b"0123456789":
        table[digit] = ord("0")
    table[ord("{")] = ord("[")
    return bytes(table)


# The text with every digit made "0" and every "{" made "[": one translate()
# pass, then C searches answer what the checks ask (a run of digits, how many
# containers, how many colons).
_SHAPE = _shape_table()
# orjson reads integers outside int64/uint64 as floats; 18 digits always fit.
_LONG_DIGIT_RUN = b"0" * 19


def _loads_orjson(data: str | bytes) -> Any:
    """Like :func:`loads_strict` (same values, same errors), with orjson where it reads the same."""
    assert _orjson is not None
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            return loads_strict(data)  # surrogates in the text itself (callers check)
    else:
        raw = data if type(data) is bytes else bytes(data)
    shape = raw.translate(_SHAPE)
    if _LONG_DIGIT_RUN in shape or b"\\u003" in raw:
        return loads_strict(data)
    if (
        shape.count(b"[") > MAX_JSON_DEPTH or shape.count(b",") > MAX_JSON_MEMBERS
    ) and _structure_problem(raw) is not None:
        return loads_strict(data)
    try:
        value = _orjson.loads(raw)
    except _orjson.JSONDecodeError:
        # The standard library decides (and words the error): orjson may only
        # be stricter, never looser, than the rules.
        return loads_strict(data)
    colons = shape.count(b":")
    if colons and colons != _orjson.dumps(value).count(b":"):
        return loads_strict(data)  # a duplicate key: rejected there
    return value


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(map(_non_finite, value.values()))
    if isinstance(value, list | tuple):
        return any(map(_non_finite, value))
    return False


# What the standard library would encode differently (or refuse) goes to it.
_DUMPS_OPTIONS = (
    _orjson.OPT_PASSTHROUGH_DATACLASS
    | _orjson.OPT_PASSTHROUGH_DATETIME
    | _orjson.OPT_PASSTHROUGH_SUBCLASS
    if _orjson is not None
    else 0
)


def _dumps_orjson(value: Any) -> bytes:
    """Like :func:`dumps_compact`, with orjson for what it encodes the same way."""
    assert _orjson is not None
    try:
        data = _orjson.dumps(value, option=_DUMPS_OPTIONS)
    except _orjson.JSONEncodeError:
        return dumps_compact(value)
    # orjson writes NaN and infinities as null: where a null appears, make sure
    # it stands for None, as the standard library would refuse the rest.
    if b"null" in data and _non_finite(value):
        return dumps_compact(value)
    return data


loads_strict_fast = _loads_orjson if _orjson is not None else loads_strict
dumps_compact_fast = _dumps_orjson if _orjson is not None else dumps_compact
