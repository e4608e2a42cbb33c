"""Sans-IO WebSocket framing for the server side (RFC 6455, no extensions).

:class:`FrameDecoder` is fed the bytes a client sent and returns what they
complete: whole messages (fragments are joined here) and control frames.
The ``encode_*`` functions build the server's unmasked frames. Nothing here
does I/O or imports trio, so every path can be fed bytes and fuzzed.

A text message is returned as its ``str`` and a binary one as its ``bytes``,
not wrapped in an event object: a frozen dataclass would cost about as much
as the rest of decoding a small frame. Control frames are events
(:class:`Ping`, :class:`Pong`, :class:`Close`), and a client that breaks the
protocol gets a :class:`Violation` carrying the close code to answer with
(1002 protocol error, 1007 invalid UTF-8, 1009 message too big), after which
the decoder reads nothing more.

The size limit counts payload bytes (a text message's UTF-8 bytes) of a whole
message, fragmented or not, and is checked on each frame's header, before any
of its payload is buffered: a client announcing one byte too many is refused
at once, and the decoder never holds more than one message of at most the
limit plus one frame header.

The common frame (final, masked, text, 7- or 16-bit length) is parsed in a
few lines; everything else takes the general path. Unmasking uses the C
helper shipped with the ``websockets`` package when it is installed (about
0.1 µs for 1 KiB), else a big-integer XOR (about 2.4 µs for 1 KiB).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_NO_STATUS",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "Close",
    "Event",
    "FrameDecoder",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "Violation",
    "apply_mask",
    "encode_binary",
    "encode_close",
    "encode_ping",
    "encode_pong",
    "encode_text",
    "is_valid_close_code",
]

CLOSE_PROTOCOL_ERROR = 1002
# "No status code was present": never sent on the wire (an empty close payload means it).
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

# Opcodes (RFC 6455 §5.2).
_CONTINUATION = 0x0
_TEXT = 0x1
_BINARY = 0x2
_CLOSE = 0x8
_PING = 0x9
_PONG = 0xA
_DATA_OPCODES = frozenset({_CONTINUATION, _TEXT, _BINARY})
_CONTROL_OPCODES = frozenset({_CLOSE, _PING, _PONG})

_MAX_CONTROL_PAYLOAD = 125
# A close payload is a 2-byte code and at most this many bytes of UTF-8 reason.
_MAX_CLOSE_REASON_BYTES = _MAX_CONTROL_PAYLOAD - 2
# Codes a peer may put in a close frame: RFC 6455 §7.4.1 and the IANA registry
# (1012-1014), less the ones that only describe a local condition (1005, 1006, 1015).
_WIRE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def is_valid_close_code(code: int) -> bool:
    """True if ``code`` may travel in a close frame (RFC 6455 §7.4)."""
    return code in _WIRE_CLOSE_CODES or 3000 <= code <= 4999


# ------------------------------------------------------------------------- masking


def _apply_mask_int(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated, as one big-integer operation."""
    size = len(data)
    whole, rest = divmod(size, 4)
    key = int.from_bytes(mask * whole + mask[:rest], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(size, "little")


apply_mask: Callable[[bytes, bytes], bytes]
try:
    # A C function (websockets >= 10); websockets is otherwise not used here.
    from websockets.speedups import apply_mask as _apply_mask_c
except ImportError:  # pragma: no cover - depends on what is installed
    apply_mask = _apply_mask_int
else:
    apply_mask = _apply_mask_c


# -------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping: answer it with ``encode_pong(payload)``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong (solicited or not: RFC 6455 allows unsolicited ones)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client closes; ``code`` is 1005 (CLOSE_NO_STATUS) when its frame carried none.

    The decoder reads nothing after it. Answer with ``encode_close(code)``.
    """

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke the protocol: fail the connection with close ``code``.

    The decoder reads nothing after it.
    """

    code: int
    reason: str


Event: TypeAlias = str | bytes | Ping | Pong | Close | Violation


_NO_EVENTS: Iterator[Event] = iter(())


class LocalProtocolError(ValueError):
    """We were asked to encode a frame that may not be sent: a bug in the caller."""


# ------------------------------------------------------------------------- decoder


class FrameDecoder:
    """Client frames in, messages and control events out.

    ``feed(data)`` returns, in order, everything ``data`` completes, and
    ``events(data)`` the same lazily; an incomplete frame waits for the next
    call. Never raises on any input.
    """

    __slots__ = (
        "_max_bytes",
        "_pending",
        "_pending_bytes",
        "_need",
        "_opcode",
        "_parts",
        "_size",
        "_utf8",
        "_done",
        "_refused",
        "_begun",
        "frame_hook",
    )

    def __init__(
        self, max_message_bytes: int, frame_hook: Callable[[], bool] | None = None
    ) -> None:
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        self._max_bytes = max_message_bytes
        # Called for every complete frame, before its payload is unmasked or
        # decoded; False refuses it: nothing more is read (``refused``).
        self.frame_hook = frame_hook
        # The start of an incomplete frame, in the chunks it arrived in, and
        # how many bytes it needs before it is worth parsing again.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._need = 0
        # A fragmented message in progress: its opcode (None: none is), its
        # parts so far and their size in payload bytes.
        self._opcode: int | None = None
        self._parts: list[str | bytes] = []
        self._size = 0
        # Made for the first fragmented text message: most connections never send one.
        self._utf8: codecs.IncrementalDecoder | None = None
        # A close frame or a violation was seen: nothing more is read.
        self._done = False
        self._refused = False
        self._begun = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: an incomplete frame and the parts of a fragmented message."""
        return self._pending_bytes + self._size

    @property
    def in_message(self) -> bool:
        """A fragmented message has begun and not yet ended."""
        return self._opcode is not None

    @property
    def messages_begun(self) -> int:
        """How many fragmented messages have begun: a new value means a new message."""
        return self._begun

    @property
    def refused(self) -> bool:
        """``frame_hook`` refused a frame; nothing more is read."""
        return self._refused

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Every event ``data`` completes, at once."""
        return list(self.events(data))

    def events(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        """The events ``data`` completes, parsed one frame at a time as they are taken.

        A frame is parsed only when the event before it has been taken, so
        ``frame_hook`` sees each frame after the caller has acted on the
        previous one. Take every event before the next call.
        """
        if self._done or not data:
            return _NO_EVENTS
        if type(data) is not bytes:
            data = bytes(data)
        if self._pending:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes < self._need:
                return _NO_EVENTS
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
        return self._parse(data)

    def _parse(self, data: bytes) -> Iterator[Event]:
        """Decode the complete frames of ``data``; keep the start of an incomplete one."""
        end = len(data)
        pos = 0
        max_bytes = self._max_bytes
        mask = apply_mask
        out: list[Event] = []
        while end - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            # The common frame: FIN + text, masked, 7- or 16-bit length, outside a
            # fragmented message, within the size limit.
            if b0 == 0x81 and b1 >= 0x80 and self._opcode is None:
                length = b1 & 0x7F
                start = pos + 6
                if length == 126 and end - pos >= 4:
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    start = pos + 8
                    common = length > 125  # else not minimally encoded
                else:
                    common = length < 126
                if common and length <= max_bytes:
                    stop = start + length
                    if stop > end:
                        self._need = stop - pos
                        break
                    hook = self.frame_hook
                    if hook is not None and not hook():
                        self._refuse()
                        return
                    payload = mask(data[start:stop], data[start - 4 : start])
                    try:
                        text = payload.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        self._fail(out, CLOSE_INVALID_DATA, _utf8_problem(exc))
                        yield from out
                        return
                    pos = stop
                    yield text
                    continue
            consumed = self._frame(data, pos, out)
            if out:
                yield from out
                out.clear()
            if self._done:
                return
            if consumed == 0:
                break
            pos += consumed
        else:
            self._need = 2
        if pos < end:
            rest = data[pos:]
            self._pending.append(rest)
            self._pending_bytes = len(rest)

    def _frame(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Decode the frame at ``pos``: its size, or 0 when more bytes are needed.

        The checks run in the order wsproto runs them, so that both refuse the
        same inputs with the same codes.
        """
        available = len(data) - pos
        b0 = data[pos]
        b1 = data[pos + 1]
        fin = b0 & 0x80
        opcode = b0 & 0x0F
        length = b1 & 0x7F
        control = opcode in _CONTROL_OPCODES
        if not control and opcode not in _DATA_OPCODES:
            return self._fail(events, CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if control and not fin:
            return self._fail(events, CLOSE_PROTOCOL_ERROR, "fragmented control frame")
        if control and length > _MAX_CONTROL_PAYLOAD:
            return self._fail(events, CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes")
        if length == 126:
            if available < 4:
                self._need = 4
                return 0
            length = (data[pos + 2] << 8) | data[pos + 3]
            if length < 126:
                return self._fail(events, CLOSE_PROTOCOL_ERROR, "length not minimally encoded")
            header = 8
        elif length == 127:
            if available < 10:
                self._need = 10
                return 0
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            if length < 0x10000:
                return self._fail(events, CLOSE_PROTOCOL_ERROR, "length not minimally encoded")
            if length >> 63:
                return self._fail(
                    events, CLOSE_PROTOCOL_ERROR, "64-bit length with its top bit set"
                )
            header = 14
        else:
            header = 6
        if b0 & 0x70:
            return self._fail(events, CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if not b1 & 0x80:
            return self._fail(events, CLOSE_PROTOCOL_ERROR, "client frame not masked")
        if not control:
            if opcode == _CONTINUATION:
                if self._opcode is None:
                    return self._fail(events, CLOSE_PROTOCOL_ERROR, "continuation of no message")
            elif self._opcode is not None:
                return self._fail(
                    events, CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one"
                )
            # Before a byte of the payload is kept: the limit is on the whole message.
            if self._size + length > self._max_bytes:
                return self._fail(
                    events, CLOSE_TOO_BIG, f"message larger than {self._max_bytes} bytes"
                )
        size = header + length
        if available < size:
            self._need = size
            return 0
        hook = self.frame_hook
        if hook is not None and not hook():
            self._refuse()
            return 0
        start = pos + header
        payload = data[start : start + length]
        if length:
            payload = apply_mask(payload, data[start - 4 : start])
        if control:
            event = _control_event(opcode, payload)
            events.append(event)
            if type(event) is Close or type(event) is Violation:
                self._done = True
        else:
            self._data_frame(opcode, bool(fin), payload, events)
        return size

    def _data_frame(self, opcode: int, fin: bool, payload: bytes, events: list[Event]) -> None:
        if opcode != _CONTINUATION:
            # The first frame of a message (the fast path takes most unfragmented text).
            if fin:
                if opcode == _BINARY:
                    events.append(payload)
                    return
                try:
                    events.append(payload.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    self._fail(events, CLOSE_INVALID_DATA, _utf8_problem(exc))
                return
            self._opcode = opcode
            self._begun += 1
            if self._utf8 is None:
                self._utf8 = codecs.getincrementaldecoder("utf-8")()
            else:
                self._utf8.reset()
        self._size += len(payload)
        if self._opcode == _BINARY:
            self._parts.append(payload)
            if not fin:
                return
            message: str | bytes = b"".join(self._parts)  # type: ignore[arg-type]
        else:
            assert self._utf8 is not None  # made with the message's first fragment
            try:
                # Checked fragment by fragment, so bad UTF-8 fails as soon as it arrives.
                self._parts.append(self._utf8.decode(payload, fin))
            except UnicodeDecodeError as exc:
                self._fail(events, CLOSE_INVALID_DATA, _utf8_problem(exc))
                return
            if not fin:
                return
            message = "".join(self._parts)  # type: ignore[arg-type]
        self._opcode = None
        self._parts = []
        self._size = 0
        events.append(message)

    def _refuse(self) -> None:
        self._refused = True
        self._done = True
        self._pending.clear()
        self._pending_bytes = 0
        self._parts = []
        self._size = 0

    def _fail(self, events: list[Event], code: int, reason: str) -> int:
        events.append(Violation(code, reason))
        self._done = True
        self._pending.clear()
        self._pending_bytes = 0
        self._parts = []
        self._size = 0
        return 0


def _control_event(opcode: int, payload: bytes) -> Ping | Pong | Close | Violation:
    if opcode == _PING:
        return Ping(payload)
    if opcode == _PONG:
        return Pong(payload)
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        return Violation(CLOSE_PROTOCOL_ERROR, "close payload of 1 byte")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        return Violation(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        return Violation(CLOSE_INVALID_DATA, "close reason: " + _utf8_problem(exc))
    return Close(code, reason)


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    return f"invalid UTF-8: {exc.reason}"


# ------------------------------------------------------------------------- encoder

# The 2-byte headers of final unmasked text frames up to 125 bytes, built once.
_SHORT_TEXT_HEADERS = tuple(bytes((0x80 | _TEXT, n)) for n in range(126))


def _header(first: int, size: int) -> bytes:
    if size < 126:
        return bytes((first, size))
    if size < 0x10000:
        return bytes((first, 126)) + size.to_bytes(2, "big")
    return bytes((first, 127)) + size.to_bytes(8, "big")


def encode_text(payload: str | bytes) -> bytes:
    """A final text frame; ``bytes`` must already be valid UTF-8 (e.g. a JSON encoder's)."""
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    size = len(data)
    if size < 126:
        return _SHORT_TEXT_HEADERS[size] + data
    return _header(0x80 | _TEXT, size) + data


def encode_binary(payload: bytes) -> bytes:
    """A final binary frame."""
    return _header(0x80 | _BINARY, len(payload)) + payload


def _control_frame(opcode: int, payload: bytes) -> bytes:
    if len(payload) > _MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError(f"control frame payload of {len(payload)} bytes (limit 125)")
    return bytes((0x80 | opcode, len(payload))) + payload


def encode_ping(payload: bytes = b"") -> bytes:
    return _control_frame(_PING, payload)


def encode_pong(payload: bytes = b"") -> bytes:
    """The answer to a :class:`Ping`: echo its payload."""
    return _control_frame(_PONG, payload)


def encode_close(code: int = CLOSE_NO_STATUS, reason: str = "") -> bytes:
    """A close frame; 1005 (the default) sends none, as a reply to a close that had none.

    ``reason`` is cut to 123 bytes of UTF-8 on a character boundary.
    """
    if code == CLOSE_NO_STATUS:
        if reason:
            raise LocalProtocolError("a close reason needs a close code")
        return _control_frame(_CLOSE, b"")
    if not is_valid_close_code(code):
        raise LocalProtocolError(f"close code {code} may not be sent")
    text = reason.encode("utf-8")
    if len(text) > _MAX_CLOSE_REASON_BYTES:
        text = text[:_MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return _control_frame(_CLOSE, code.to_bytes(2, "big") + text)
