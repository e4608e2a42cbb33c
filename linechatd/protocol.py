"""Sans-IO protocol core: client frames, server frames, handshake query, Kafka records.

Nothing here does I/O or imports trio, so every path can be unit-tested and
fuzzed by feeding it strings and bytes.

Errors share one root, split by side (as in h11):

- :class:`RemoteProtocolError` -- the peer sent something wrong. It carries the
  error ``code`` (and ``id`` of the offending frame when it could be read) to
  answer with; :class:`HandshakeError` adds the HTTP ``status``.
- :class:`LocalProtocolError` -- we were asked to encode something invalid: a bug
  on our side.
- :class:`RecordError` -- a Kafka record that cannot be decoded.

JSON accepted from the outside (client frames and Kafka records) is strict:
valid UTF-8, no duplicate keys, no ``NaN``/``Infinity`` (nor numbers that only
fit a float as infinity), nesting at most :data:`MAX_JSON_DEPTH` containers
deep, at most :data:`MAX_JSON_MEMBERS` members and elements in all (both
checked before parsing), integers within Python's digit limit, and no unpaired UTF-16 surrogate
escapes (``"\\ud800"``), since those could not be encoded again for delivery.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from . import jsonfast

__all__ = [
    "BAD_DEVICE",
    "BAD_FRAME",
    "BAD_RECIPIENT",
    "BAD_REQUEST",
    "BAD_RESUME",
    "BAD_UID",
    "DEFAULT_MAX_RECIPIENTS",
    "GROUP_RECORD_KEY",
    "MAX_ID_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_MEMBERS",
    "MAX_QUERY_CHARS",
    "MAX_RECORD_BYTES",
    "RECORD_VERSION",
    "UID_PATTERN",
    "Ack",
    "ChatRecord",
    "CloseCode",
    "GroupAck",
    "GroupRecord",
    "GroupSend",
    "PartitionAck",
    "Record",
    "HandshakeError",
    "HandshakeParams",
    "ErrorFrame",
    "LocalProtocolError",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "RECORD_ERROR_KINDS",
    "RecordError",
    "RemoteProtocolError",
    "Send",
    "ServerFrame",
    "Welcome",
    "decode_client_frame",
    "decode_json",
    "decode_record",
    "decode_server_frame",
    "ack_frame",
    "encode_ack",
    "encode_error",
    "encode_json",
    "encode_group_ack",
    "group_ack_frame",
    "encode_message",
    "message_frame",
    "encode_pong",
    "encode_record",
    "encode_ping",
    "encode_send",
    "encode_welcome",
    "is_valid_uid",
    "new_device_id",
    "parse_handshake_query",
    "record_key",
    "recipients_problem",
]

# Error codes answered in error frames / handshake rejections.
BAD_FRAME = "bad_frame"
BAD_RECIPIENT = "bad_recipient"
BAD_UID = "bad_uid"
BAD_DEVICE = "bad_device"
BAD_RESUME = "bad_resume"
BAD_REQUEST = "bad_request"

UID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
MAX_ID_CHARS = 64
MAX_JSON_DEPTH = jsonfast.MAX_JSON_DEPTH
MAX_JSON_MEMBERS = jsonfast.MAX_JSON_MEMBERS
MAX_QUERY_CHARS = 8192
# Recipients of one group send (``[limits] max_recipients``), by default.
DEFAULT_MAX_RECIPIENTS = 100
# Record versions: 1 names one recipient; 2 names this partition's recipients
# of a group send or a server publish. Both are read.
RECORD_VERSION = 1
GROUP_RECORD_VERSION = 2
# The Kafka key of a version 2 record (not a uid: those never contain "*").
GROUP_RECORD_KEY = b"*"
# Bigger than anything a default-sized frame (64 KiB) can become once re-encoded
# (number normalisation can grow "1e15" into "1000000000000000.0"), and in line
# with Kafka's default 1 MB message size. Callers that raise limits.max_frame_bytes
# pass a larger ``max_bytes``.
MAX_RECORD_BYTES = 1 << 20

_INT64_MAX = (1 << 63) - 1
_RESUME_PATTERN = re.compile(r"^(?:-1|[0-9]{1,19})$")
_UID_RULE = "1-128 characters of [A-Za-z0-9_.:@-]"


# ------------------------------------------------------------------- close codes


class CloseCode(enum.IntEnum):
    """WebSocket close codes (CONTRACT.md §5), for server, client and tests alike."""

    NORMAL = 1000
    #: No close frame arrived: the connection just ended (never sent on the wire).
    ABNORMAL = 1006
    #: Protocol violation (bad frames past the tolerated number) or abuse.
    POLICY = 1008
    #: A frame larger than ``limits.max_frame_bytes``.
    TOO_BIG = 1009
    #: The server failed (a bug, or the broker was unreachable for a session's start).
    INTERNAL = 1011
    #: Partition moved or instance draining: fetch connection-url again, reconnect with resume.
    MOVED = 1012
    #: The device fell too far behind (bounded backlog exceeded): reconnect with resume.
    BEHIND = 1013
    #: The token expired on an open socket.
    TOKEN_EXPIRED = 4401


# --------------------------------------------------------------------------- errors


class ProtocolError(Exception):
    """Root of every error raised by this module."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; answer with ``code`` (and ``id``)."""

    def __init__(self, code: str, message: str, *, id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, id={self.id!r})"
        )


class LocalProtocolError(ProtocolError):
    """We tried to encode something invalid: a bug in the caller."""


class RecordError(ProtocolError):
    """A Kafka record value that cannot be decoded into a :class:`ChatRecord`.

    ``kind`` names the problem in one word from a fixed set (``RECORD_ERROR_KINDS``),
    fit for logs: the message may quote parts of the record, which is
    someone's message.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


#: The kinds of :class:`RecordError`.
RECORD_ERROR_KINDS = frozenset(
    {"no_value", "too_large", "not_utf8", "bad_json", "not_object", "bad_version", "bad_field"}
)


class HandshakeError(RemoteProtocolError):
    """A WebSocket handshake to reject with HTTP ``status`` and ``{"error": code}``."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(code, message)
        self.status = status


# ----------------------------------------------------------------------- validation


def is_valid_uid(s: object) -> bool:
    """True if ``s`` is a str of 1-128 chars of ``[A-Za-z0-9_.:@-]`` (uids and devices)."""
    # fullmatch rather than match: "$" would also accept a trailing newline.
    return isinstance(s, str) and UID_PATTERN.fullmatch(s) is not None


def _is_valid_id(s: object) -> bool:
    return isinstance(s, str) and 1 <= len(s) <= MAX_ID_CHARS


def new_device_id() -> str:
    """A random device id (16 hex chars) for clients that do not name their device."""
    return secrets.token_hex(8)


# ------------------------------------------------------------------- strict JSON


# jsonfast: orjson where it reads and writes exactly what the standard
# library's strict decoder and compact encoder do, the standard library otherwise.
_loads_strict = jsonfast.loads_strict_fast


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, jsonfast.JSONRejected):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at position {exc.pos}"
    # int() refusing a number with more digits than sys.get_int_max_str_digits().
    return "invalid JSON: number too large"


def decode_json(data: str | bytes) -> Any:
    """Parse one JSON document with the rules client frames follow (see the module docstring).

    Raises :class:`RemoteProtocolError` with code ``bad_request``.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(BAD_REQUEST, "the body is not valid UTF-8") from None
    else:
        text = data
    try:
        return _loads_strict(text)
    except ValueError as exc:
        raise RemoteProtocolError(BAD_REQUEST, _json_reason(exc)) from None


def encode_json(value: Any) -> str:
    """Compact JSON as every frame and record is written; LocalProtocolError if it cannot be."""
    return _dumps(value)


def _dumps(value: Any) -> str:
    return _dumps_bytes(value).decode("utf-8")


def _dumps_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON; LocalProtocolError if it cannot be (a lone surrogate included)."""
    try:
        return jsonfast.dumps_compact_fast(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"cannot encode as JSON: {exc}") from exc


# ----------------------------------------------------------------- client frames


@dataclass(frozen=True, slots=True)
class Send:
    """``{"type": "send", "id", "to", "body"}``: deliver ``body`` to uid ``to``."""

    id: str
    to: str
    body: Any


@dataclass(frozen=True, slots=True)
class GroupSend:
    """``{"type": "send", "id", "to": [uids], "body"}``: deliver ``body`` to each uid in ``to``."""

    id: str
    to: tuple[str, ...]  # distinct uids, in the sender's order
    body: Any


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type": "ping"}``: answered with a pong."""


def decode_client_frame(
    data: str | bytes, *, max_recipients: int = DEFAULT_MAX_RECIPIENTS
) -> Send | GroupSend | Ping:
    """Decode one client frame.

    ``str`` is a text frame's payload; ``bytes`` are accepted as UTF-8 text (the
    caller decides whether binary WebSocket messages are acceptable at all).
    Raises :class:`RemoteProtocolError` (and nothing else) with code
    ``bad_frame`` or ``bad_recipient``. Unknown keys are ignored.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(BAD_FRAME, "frame is not valid UTF-8") from None
    elif isinstance(data, str):
        text = data
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RemoteProtocolError(BAD_FRAME, "frame is not valid UTF-8") from None
    else:
        raise RemoteProtocolError(BAD_FRAME, "frame must be text")

    try:
        obj = _loads_strict(text)
    except ValueError as exc:
        raise RemoteProtocolError(BAD_FRAME, _json_reason(exc)) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(BAD_FRAME, "frame must be a JSON object")

    raw_id = obj.get("id")
    frame_id = raw_id if _is_valid_id(raw_id) else None

    def bad(message: str, code: str = BAD_FRAME) -> RemoteProtocolError:
        return RemoteProtocolError(code, message, id=frame_id)

    if "type" not in obj:
        raise bad("field 'type' is required")
    kind = obj["type"]
    if not isinstance(kind, str):
        raise bad("field 'type' must be a string")
    if kind == "ping":
        return Ping()
    if kind != "send":
        raise bad(f"unknown frame type {kind[:32]!r}")

    if "id" not in obj:
        raise bad("field 'id' is required")
    if not isinstance(raw_id, str):
        raise bad("field 'id' must be a string")
    if frame_id is None:
        raise bad(f"field 'id' must be 1-{MAX_ID_CHARS} characters")
    if "to" not in obj:
        raise bad("field 'to' is required")
    to = obj["to"]
    if isinstance(to, list):
        problem = recipients_problem(to, max_recipients)
        if problem is not None:
            raise bad(problem, BAD_RECIPIENT)
        if "body" not in obj:
            raise bad("field 'body' is required")
        return GroupSend(id=frame_id, to=tuple(to), body=obj["body"])
    if not isinstance(to, str):
        raise bad("field 'to' must be a uid or a list of uids")
    if not is_valid_uid(to):
        raise bad(f"field 'to' must be a uid: {_UID_RULE}", BAD_RECIPIENT)
    if "body" not in obj:
        raise bad("field 'body' is required")
    return Send(id=frame_id, to=to, body=obj["body"])


def recipients_problem(to: object, max_recipients: int) -> str | None:
    """Why ``to`` is not a list of 1 to ``max_recipients`` distinct uids (None if it is)."""
    if not isinstance(to, list | tuple):
        return "field 'to' must be a list of uids"
    if not to:
        return "field 'to' must name at least one recipient"
    if len(to) > max_recipients:
        return f"field 'to' names {len(to)} recipients; at most {max_recipients}"
    seen: set[str] = set()
    for n, uid in enumerate(to):
        if not is_valid_uid(uid):
            return f"to[{n}] must be a uid: {_UID_RULE}"
        if uid in seen:
            return f"recipient {uid!r} is listed twice"
        seen.add(uid)
    return None


# ----------------------------------------------------------------- server frames


def encode_welcome(
    uid: str,
    device: str,
    partition: int,
    instance: str,
    offset: int,
    resumed: bool | None,
) -> str:
    """The first frame after accept; ``offset`` is the partition's log end."""
    return _dumps(
        {
            "type": "welcome",
            "uid": uid,
            "device": device,
            "partition": partition,
            "instance": instance,
            "offset": offset,
            "resumed": resumed,
        }
    )


def encode_ack(id: str, partition: int, offset: int) -> str:
    """Acknowledge a send once the broker has durably accepted it."""
    return ack_frame(id, partition, offset).decode("utf-8")


def ack_frame(id: str, partition: int, offset: int) -> bytes:
    """:func:`encode_ack` as UTF-8, as the transport writes it."""
    return _dumps_bytes({"type": "ack", "id": id, "partition": partition, "offset": offset})


def encode_group_ack(id: str, acks: Sequence[tuple[int, int, Sequence[str]]]) -> str:
    """Acknowledge a group send once every record is durable: (partition, offset, its uids)."""
    return group_ack_frame(id, acks).decode("utf-8")


def group_ack_frame(id: str, acks: Sequence[tuple[int, int, Sequence[str]]]) -> bytes:
    """:func:`encode_group_ack` as UTF-8, as the transport writes it."""
    return _dumps_bytes(
        {
            "type": "ack",
            "id": id,
            "acks": [{"partition": k, "offset": n, "to": list(to)} for k, n, to in acks],
        }
    )


def encode_error(id: str | None, code: str, message: str) -> str:
    """An error frame; ``id`` is the offending frame's id or None."""
    return _dumps({"type": "error", "id": id, "code": code, "message": message})


_PONG = '{"type":"pong"}'


def encode_pong() -> str:
    """The answer to a ping."""
    return _PONG


def encode_message(
    record: ChatRecord | GroupRecord, partition: int, offset: int, to: str | None = None
) -> str:
    """Deliver ``record``, read at ``offset`` of ``partition``, to a device of ``to``.

    ``to`` is one of the record's recipients (a one-to-one record's own when
    left out). A group send's message carries the whole list as ``recipients``.
    """
    return message_frame(record, partition, offset, to).decode("utf-8")


def message_frame(
    record: ChatRecord | GroupRecord, partition: int, offset: int, to: str | None = None
) -> bytes:
    """:func:`encode_message` as UTF-8, as the transport writes it (no decoded copy)."""
    frame: dict[str, Any] = {
        "type": "message",
        "from": record.from_uid,
        "from_device": record.from_device,
        "to": to if to is not None else record.to,
        "id": record.id,
        "body": record.body,
        "partition": partition,
        "offset": offset,
        "ts": record.ts,
    }
    if isinstance(record, GroupRecord):
        if to is None or to not in record.to:
            raise LocalProtocolError(f"{to!r} is not a recipient of this record")
        if record.recipients is not None:
            frame["recipients"] = list(record.recipients)
    return _dumps_bytes(frame)


# ------------------------------------------------------ the client's side of the frames
#
# What linechatd.client speaks: it encodes client frames and decodes server
# frames with the same rules as the server, so the two cannot drift apart.


def encode_send(id: str, to: str | Sequence[str], body: Any) -> str:
    """A client's ``send`` frame, to one uid or (a list) to several."""
    valid_to = (
        is_valid_uid(to) if isinstance(to, str) else recipients_problem(list(to), 1 << 30) is None
    )
    if not _is_valid_id(id) or not valid_to:
        raise LocalProtocolError("send needs an id of 1-64 characters and valid, distinct uids")
    return _dumps(
        {"type": "send", "id": id, "to": to if isinstance(to, str) else list(to), "body": body}
    )


_PING = '{"type":"ping"}'


def encode_ping() -> str:
    """A client's ``ping`` frame."""
    return _PING


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server's first frame: where this session lives and what it resumed."""

    uid: str
    device: str
    partition: int
    instance: str
    offset: int
    resumed: bool | None


@dataclass(frozen=True, slots=True)
class Ack:
    """A send durably accepted: the record's partition and offset."""

    id: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class PartitionAck:
    """One durable record of a group send: its partition, offset and recipients."""

    partition: int
    offset: int
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GroupAck:
    """A group send durably accepted: one entry per recipient partition."""

    id: str
    acks: tuple[PartitionAck, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered message, as a device receives it."""

    from_uid: str
    from_device: str
    to: str
    id: str
    body: Any
    partition: int
    offset: int
    ts: int
    # A group send's whole recipient list, in the sender's order; None otherwise.
    recipients: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """The server refused a frame (``id`` names it when it could be read)."""

    id: str | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a ping."""


ServerFrame = Welcome | Ack | GroupAck | Message | ErrorFrame | Pong


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    # bool is an int: never accept it where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise RemoteProtocolError(BAD_FRAME, f"server frame field {name!r} is missing or mistyped")
    return value


def decode_server_frame(data: str | bytes) -> ServerFrame | None:
    """Decode a frame the server sent; None for a type this client does not know.

    Unknown types are skipped rather than refused, so a newer server can add
    frames. Raises :class:`RemoteProtocolError` for a frame that is not a JSON
    object or lacks a field its type needs.
    """
    try:
        obj = json.loads(data)
    except ValueError:
        raise RemoteProtocolError(BAD_FRAME, "server frame is not JSON") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(BAD_FRAME, "server frame is not a JSON object")
    kind = obj.get("type")
    if kind == "message":
        recipients = obj.get("recipients")
        if recipients is not None and not (
            isinstance(recipients, list) and all(isinstance(u, str) for u in recipients)
        ):
            raise RemoteProtocolError(BAD_FRAME, "server frame field 'recipients' is mistyped")
        return Message(
            from_uid=_field(obj, "from", str),
            from_device=_field(obj, "from_device", str),
            to=_field(obj, "to", str),
            id=_field(obj, "id", str),
            body=obj.get("body"),
            partition=_field(obj, "partition", int),
            offset=_field(obj, "offset", int),
            ts=_field(obj, "ts", int),
            recipients=None if recipients is None else tuple(recipients),
        )
    if kind == "ack":
        if "acks" in obj:
            entries = _field(obj, "acks", list)
            if not all(isinstance(e, dict) for e in entries):
                raise RemoteProtocolError(BAD_FRAME, "server frame field 'acks' is mistyped")
            return GroupAck(
                _field(obj, "id", str),
                tuple(
                    PartitionAck(
                        _field(e, "partition", int),
                        _field(e, "offset", int),
                        tuple(str(u) for u in _field(e, "to", list)),
                    )
                    for e in entries
                ),
            )
        return Ack(
            _field(obj, "id", str), _field(obj, "partition", int), _field(obj, "offset", int)
        )
    if kind == "error":
        msg_id = obj.get("id")
        return ErrorFrame(
            msg_id if isinstance(msg_id, str) else None,
            _field(obj, "code", str),
            str(obj.get("message", "")),
        )
    if kind == "pong":
        return Pong()
    if kind == "welcome":
        resumed = obj.get("resumed")
        if resumed is not None and not isinstance(resumed, bool):
            raise RemoteProtocolError(BAD_FRAME, "server frame field 'resumed' is mistyped")
        return Welcome(
            uid=_field(obj, "uid", str),
            device=_field(obj, "device", str),
            partition=_field(obj, "partition", int),
            instance=_field(obj, "instance", str),
            offset=_field(obj, "offset", int),
            resumed=resumed,
        )
    return None


# ---------------------------------------------------------------- handshake query


@dataclass(frozen=True, slots=True)
class HandshakeParams:
    """The WebSocket URL's query parameters, validated."""

    uid: str
    device: str
    token: str | None
    resume: int | None


_HANDSHAKE_KEYS = frozenset({"uid", "device", "token", "resume"})


def parse_handshake_query(query: str, *, new_device_id: Callable[[], str]) -> HandshakeParams:
    """Validate the raw query string (without the leading ``?``) of a connect request.

    Raises :class:`HandshakeError` (status 400) with code ``bad_uid``,
    ``bad_device``, ``bad_resume``, or ``bad_request`` for a query that is too
    long, not ASCII, not UTF-8 once percent-decoded, or names one of the
    parameters above more than once. Unknown parameters are ignored. An empty
    ``token`` counts as no token; authentication is checked elsewhere.
    """
    if len(query) > MAX_QUERY_CHARS:
        raise HandshakeError(BAD_REQUEST, f"query string longer than {MAX_QUERY_CHARS} characters")
    if not query.isascii():
        # A request target is ASCII; anything else must be percent-encoded.
        raise HandshakeError(BAD_REQUEST, "query string must be ASCII (percent-encode the rest)")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except ValueError:  # UnicodeDecodeError from a percent-escape that is not UTF-8
        raise HandshakeError(BAD_REQUEST, "query string is not valid UTF-8") from None

    params: dict[str, str] = {}
    for key, value in pairs:
        if key not in _HANDSHAKE_KEYS:
            continue
        if key in params:
            raise HandshakeError(BAD_REQUEST, f"parameter {key!r} given more than once")
        params[key] = value

    uid = params.get("uid")
    if uid is None:
        raise HandshakeError(BAD_UID, "parameter 'uid' is required")
    if not is_valid_uid(uid):
        raise HandshakeError(BAD_UID, f"parameter 'uid' must be {_UID_RULE}")

    device = params.get("device")
    if device is None:
        device = new_device_id()
    elif not is_valid_uid(device):
        raise HandshakeError(BAD_DEVICE, f"parameter 'device' must be {_UID_RULE}")

    resume: int | None = None
    raw_resume = params.get("resume")
    if raw_resume is not None:
        if not _RESUME_PATTERN.fullmatch(raw_resume) or int(raw_resume) > _INT64_MAX:
            raise HandshakeError(
                BAD_RESUME, "parameter 'resume' must be an offset: -1 or a non-negative integer"
            )
        resume = int(raw_resume)

    token = params.get("token") or None
    return HandshakeParams(uid=uid, device=device, token=token, resume=resume)


# ------------------------------------------------------------------- Kafka records


@dataclass(frozen=True, slots=True)
class ChatRecord:
    """One message to one uid, as stored in its partition's topic (version 1; Kafka key: ``to``)."""

    from_uid: str
    from_device: str
    to: str
    id: str
    body: Any
    ts: int  # milliseconds since the Unix epoch, set by the gateway that produced it

    @property
    def addressees(self) -> tuple[str, ...]:
        """The uids of this record's partition it is for."""
        return (self.to,)


@dataclass(frozen=True, slots=True)
class GroupRecord:
    """One message to several uids of one partition (version 2; Kafka key: ``*``).

    A group send or a server publish writes one per recipient partition,
    naming that partition's recipients in ``to``. ``recipients`` is a group
    send's whole list in the sender's order (each delivered message carries
    it); None for a publish.
    """

    from_uid: str
    from_device: str
    to: tuple[str, ...]
    id: str
    body: Any
    ts: int
    recipients: tuple[str, ...] | None = None

    @property
    def addressees(self) -> tuple[str, ...]:
        return self.to


Record = ChatRecord | GroupRecord


def _record_problem(r: Record) -> str | None:
    for name, value in (("from", r.from_uid), ("from_device", r.from_device)):
        if not is_valid_uid(value):
            return f"field {name!r} must be a uid"
    if isinstance(r, GroupRecord):
        if not r.to or not all(is_valid_uid(uid) for uid in r.to) or len(set(r.to)) != len(r.to):
            return "field 'to' must be a list of distinct uids"
        if r.recipients is not None and (
            not all(is_valid_uid(uid) for uid in r.recipients) or not set(r.to) <= set(r.recipients)
        ):
            return "field 'recipients' must be a list of uids holding every one of 'to'"
    elif not is_valid_uid(r.to):
        return "field 'to' must be a uid"
    if not _is_valid_id(r.id):
        return f"field 'id' must be a string of 1-{MAX_ID_CHARS} characters"
    if type(r.ts) is not int or not 0 <= r.ts <= _INT64_MAX:
        return "field 'ts' must be a non-negative 64-bit integer"
    return None


def record_key(r: Record) -> bytes:
    """The Kafka key of ``r``: its recipient's uid (version 1), ``*`` (version 2)."""
    return r.to.encode() if isinstance(r, ChatRecord) else GROUP_RECORD_KEY


def encode_record(r: Record, *, max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """Encode ``r`` as the Kafka record value (compact UTF-8 JSON with ``"v"``).

    Raises :class:`LocalProtocolError` for an invalid record (the caller should
    have validated it), and :class:`RemoteProtocolError` (``bad_frame``, with the
    record's id) when the encoded record would exceed ``max_bytes``: the body
    came from the client, which sent too much.
    """
    problem = _record_problem(r)
    if problem is not None:
        raise LocalProtocolError(f"invalid record: {problem}")
    doc: dict[str, Any]
    if isinstance(r, ChatRecord):
        doc = {"v": RECORD_VERSION, "from": r.from_uid, "from_device": r.from_device, "to": r.to}
    else:
        doc = {
            "v": GROUP_RECORD_VERSION,
            "from": r.from_uid,
            "from_device": r.from_device,
            "to": list(r.to),
        }
        if r.recipients is not None:
            doc["recipients"] = list(r.recipients)
    doc.update({"id": r.id, "body": r.body, "ts": r.ts})
    try:
        data = jsonfast.dumps_compact_fast(doc)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError("invalid record: body contains an unpaired surrogate") from exc
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"cannot encode as JSON: {exc}") from exc
    if len(data) > max_bytes:
        raise RemoteProtocolError(
            BAD_FRAME,
            f"message too large: {len(data)} bytes once stored, limit {max_bytes}",
            id=r.id,
        )
    return data


def _uid_tuple(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(uid, str) for uid in value):
        raise RecordError(f"record field {name!r} must be a list of uids", kind="bad_field")
    return tuple(value)


def decode_record(data: bytes | None, *, max_bytes: int = MAX_RECORD_BYTES) -> Record:
    """Decode a Kafka record value written by :func:`encode_record` (version 1 or 2).

    Raises :class:`RecordError` for anything else: no value, more than
    ``max_bytes``, not UTF-8, not strict JSON, not an object, an unknown
    ``"v"``, a missing or mistyped field, or an invalid uid. Unknown keys are
    ignored so that compatible additions do not need a new version.
    """
    if data is None:
        raise RecordError("record has no value", kind="no_value")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError(f"record value must be bytes, got {type(data).__name__}", kind="no_value")
    if len(data) > max_bytes:
        raise RecordError(f"record is {len(data)} bytes, limit {max_bytes}", kind="too_large")
    try:
        # Bytes as they are: orjson reads UTF-8 without a decoded copy.
        obj = _loads_strict(data)
    except ValueError as exc:
        try:
            bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError("record is not valid UTF-8", kind="not_utf8") from None
        raise RecordError(f"record is not valid: {_json_reason(exc)}", kind="bad_json") from None
    if not isinstance(obj, dict):
        raise RecordError("record must be a JSON object", kind="not_object")

    version = obj.get("v")
    if type(version) is not int:
        raise RecordError("record field 'v' must be an integer", kind="bad_version")
    if version not in (RECORD_VERSION, GROUP_RECORD_VERSION):
        raise RecordError(f"unsupported record version {version}", kind="bad_version")
    for name in ("from", "from_device", "to", "id", "body", "ts"):
        if name not in obj:
            raise RecordError(f"record field {name!r} is required", kind="bad_field")
    record: Record
    if version == RECORD_VERSION:
        record = ChatRecord(
            from_uid=obj["from"],
            from_device=obj["from_device"],
            to=obj["to"],
            id=obj["id"],
            body=obj["body"],
            ts=obj["ts"],
        )
    else:
        recipients = obj.get("recipients")
        record = GroupRecord(
            from_uid=obj["from"],
            from_device=obj["from_device"],
            to=_uid_tuple(obj["to"], "to"),
            id=obj["id"],
            body=obj["body"],
            ts=obj["ts"],
            recipients=None if recipients is None else _uid_tuple(recipients, "recipients"),
        )
    problem = _record_problem(record)
    if problem is not None:
        raise RecordError(f"record {problem}", kind="bad_field")
    return record
