"""The server API (CONTRACT.md §6): publish to users, and ask who is online.

For the application's own backends, with ``Authorization: Bearer <server key>``
(``[server_api] key_file``). End-user JWTs are never accepted here.

- **Publish** writes one version 2 record per recipient partition (the same
  records a group send writes, ``from_device`` = ``"server"``), all produced
  at once, and answers once every one is durable. A retry with the same id
  writes the records again; recipients drop the copies by (from,
  from_device, id).
- **Presence** is answered by each partition's owner, never from a cache: the
  instance that got the request groups the uids by the owner its ownership
  view names, answers its own partitions itself and asks every other owner
  once, in parallel, within :data:`PRESENCE_TIMEOUT_S`. An owner that no longer
  serves a partition, or does not answer in time, leaves its uids under
  ``unknown``; so does a partition with no owner. A device is listed exactly
  while its socket is open and accepted on the owner.
- **Calls between instances** (``GET /internal/presence``) carry an HMAC of
  the request under the server key with a timestamp
  (:func:`sign_internal` / :func:`verify_internal`): an outsider without the
  key cannot forge one, the key itself never crosses the network, and a
  captured call is good for :data:`INTERNAL_SKEW_S` at most and answers only
  what it asked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import h11
import trio

from .client import http_get_json
from .delivery import records_for
from .hashing import partition_for
from .kafka import DeliveryReceipt, KafkaUnavailable
from .protocol import (
    BAD_REQUEST,
    MAX_ID_CHARS,
    MAX_RECORD_BYTES,
    LocalProtocolError,
    RemoteProtocolError,
    decode_json,
    encode_json,
    is_valid_uid,
    recipients_problem,
)

if TYPE_CHECKING:
    from .context import Context
    from .partitions import PartitionRuntime

__all__ = [
    "INTERNAL_HEADER",
    "MAX_PRESENCE_UIDS",
    "MAX_PUBLISH_RECIPIENTS",
    "PRESENCE_TIMEOUT_S",
    "Publish",
    "PublishError",
    "ServerApi",
    "ServerKeyError",
    "decode_publish",
    "load_server_key",
    "presence_uids",
    "server_key_matches",
    "sign_internal",
    "verify_internal",
]

log = logging.getLogger(__name__)

MAX_PUBLISH_RECIPIENTS = 1000
MAX_PRESENCE_UIDS = 1000
# Each owner asked for presence must answer within this.
PRESENCE_TIMEOUT_S = 2.0
# How far a signed internal call's timestamp may be from the receiver's clock.
INTERNAL_SKEW_S = 30.0
INTERNAL_HEADER = "x-linechat-internal"
MIN_KEY_CHARS = 32
DEFAULT_FROM = "server"


class ServerKeyError(ValueError):
    """The server key file is unusable; the message says why (never its content)."""


def load_server_key(path: Path) -> bytes:
    """The key: the file's one line, surrounding whitespace stripped, >= 32 printable ASCII."""
    try:
        text = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise ServerKeyError(f"{path}: the key must be printable ASCII") from None
    if "\n" in text:
        raise ServerKeyError(f"{path}: the key must be one line")
    if len(text) < MIN_KEY_CHARS or not text.isprintable():
        raise ServerKeyError(
            f"{path}: the key must be at least {MIN_KEY_CHARS} printable ASCII characters"
        )
    return text.encode()


def server_key_matches(key: bytes, authorization: str | None) -> bool:
    """Whether ``Authorization: Bearer <key>`` carries exactly ``key`` (constant time)."""
    if authorization is None:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key)


# -- publish -------------------------------------------------------------------------


class PublishError(Exception):
    """A publish request to refuse: HTTP ``status`` and ``{"error", "field"?, "message"}``."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.field = field
        self.message = message

    def doc(self) -> dict[str, object]:
        doc: dict[str, object] = {"error": self.error, "message": self.message}
        if self.field is not None:
            doc["field"] = self.field
        return doc


@dataclass(frozen=True, slots=True)
class Publish:
    to: tuple[str, ...]
    id: str
    from_name: str
    body: Any


def decode_publish(data: bytes, *, max_body_bytes: int) -> Publish:
    """Validate a publish request's JSON body (strict JSON, as client frames)."""

    def bad(field: str, message: str) -> PublishError:
        return PublishError(400, BAD_REQUEST, message, field)

    try:
        obj = decode_json(data)
    except RemoteProtocolError as exc:
        raise PublishError(400, BAD_REQUEST, exc.message) from None
    if not isinstance(obj, dict):
        raise PublishError(400, BAD_REQUEST, "the body must be a JSON object")
    to = obj.get("to")
    problem = (
        "field 'to' is required" if to is None else recipients_problem(to, MAX_PUBLISH_RECIPIENTS)
    )
    if problem is not None:
        raise bad("to", problem)
    msg_id = obj.get("id")
    if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= MAX_ID_CHARS:
        raise bad("id", f"field 'id' must be a string of 1-{MAX_ID_CHARS} characters")
    from_name = obj.get("from", DEFAULT_FROM)
    if not is_valid_uid(from_name):
        raise bad("from", "field 'from' must be 1-128 characters of [A-Za-z0-9_.:@-]")
    if "body" not in obj:
        raise bad("body", "field 'body' is required")
    body = obj["body"]
    try:
        size = len(_encoded(body))
    except LocalProtocolError:
        raise bad("body", "field 'body' cannot be stored (an unpaired surrogate?)") from None
    if size > max_body_bytes:
        raise PublishError(
            413, "too_large", f"the body is {size} bytes once encoded; at most {max_body_bytes}"
        )
    assert isinstance(to, list)
    return Publish(tuple(to), msg_id, from_name, body)


def _encoded(body: Any) -> bytes:
    # The encoding records use, so the size is what would be stored.
    try:
        return encode_json(body).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError("unpaired surrogate") from exc


# -- presence ------------------------------------------------------------------------


def presence_uids(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The ``uid`` parameters of a presence query, in order, each once; ValueError says why not."""
    uids = list(dict.fromkeys(value for key, value in pairs if key == "uid"))
    if not uids:
        raise ValueError("parameter 'uid' is required (repeat it for several uids)")
    if len(uids) > MAX_PRESENCE_UIDS:
        raise ValueError(f"at most {MAX_PRESENCE_UIDS} uids per request")
    for uid in uids:
        if not is_valid_uid(uid):
            raise ValueError("every uid must be 1-128 characters of [A-Za-z0-9_.:@-]")
    return uids


def _mac(key: bytes, timestamp: int, instance: str, method: str, target: str) -> str:
    message = f"{timestamp}\n{instance}\n{method}\n{target}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_internal(
    key: bytes, instance: str, method: str, target: str, now: float | None = None
) -> str:
    """The ``X-Linechat-Internal`` header value for a call from ``instance`` to ``target``."""
    timestamp = int(time.time() if now is None else now)
    return f"t={timestamp},i={instance},mac={_mac(key, timestamp, instance, method, target)}"


def verify_internal(
    key: bytes, header: str | None, method: str, target: str, now: float | None = None
) -> str | None:
    """The calling instance's id if ``header`` signs this call with ``key`` recently; else None."""
    if not header:
        return None
    fields: Mapping[str, str] = dict(
        part.partition("=")[::2] for part in header.split(",") if "=" in part
    )
    try:
        timestamp = int(fields.get("t", ""))
    except ValueError:
        return None
    instance, mac = fields.get("i", ""), fields.get("mac", "")
    current = time.time() if now is None else now
    if abs(current - timestamp) > INTERNAL_SKEW_S or not instance:
        return None
    expected = _mac(key, timestamp, instance, method, target)
    return instance if hmac.compare_digest(mac.encode(), expected.encode()) else None


# -- the I/O side ------------------------------------------------------------------------


class _Durable:
    """Waits for a set of delivery reports (no task or thread per record)."""

    def __init__(self, receipts: Sequence[DeliveryReceipt]) -> None:
        self._left = len(receipts)
        self._all_in = trio.Event()
        for receipt in receipts:
            receipt.on_resolved = self._one_in
        if self._left == 0:
            self._all_in.set()

    def _one_in(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._all_in.set()

    async def wait(self) -> None:
        await self._all_in.wait()


class ServerApi:
    """Publish and presence for one instance; the HTTP layer only parses and answers."""

    def __init__(self, ctx: Context, serving: Callable[[int], PartitionRuntime | None]) -> None:
        self._ctx = ctx
        self._serving = serving

    async def publish(self, request: Publish) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON, headers): 200 once every record is durable, 503 otherwise."""
        ctx = self._ctx
        metrics = ctx.metrics
        config = ctx.config.value
        try:
            records = records_for(
                from_uid=request.from_name,
                from_device="server",
                msg_id=request.id,
                to=request.to,
                body=request.body,
                ts=int(time.time() * 1000),
                partitions=ctx.partitions,
                recipients=None,
                max_bytes=MAX_RECORD_BYTES,
            )
        except RemoteProtocolError as exc:
            metrics.publishes.labels("too_large").inc()
            return 413, {"error": "too_large", "message": exc.message}, {}
        metrics.publish_recipients.observe(len(request.to))
        started = trio.current_time()
        receipts = []
        try:
            for record in records:
                receipts.append(
                    ctx.producer.send(ctx.topic(record.partition), record.key, record.value)
                )
        except KafkaUnavailable as exc:
            log.warning("publish_failed", extra={"id": request.id, "error": str(exc)})
            return self._unavailable()
        # librdkafka reports every record within produce_timeout_s; this is a backstop.
        with trio.move_on_after(config.kafka.produce_timeout_s + 1.0):
            await _Durable(receipts).wait()
        failed = [r.error for r in receipts if not r.resolved or r.error is not None]
        if failed:
            log.warning(
                "publish_failed",
                extra={"id": request.id, "records": len(receipts), "failed": len(failed)},
            )
            return self._unavailable()
        metrics.publishes.labels("ok").inc()
        metrics.publish_seconds.observe(trio.current_time() - started)
        acks = [
            {"partition": record.partition, "offset": receipt.offset, "to": list(record.to)}
            for record, receipt in zip(records, receipts, strict=True)
        ]
        return 200, {"id": request.id, "acks": acks}, {}

    def _unavailable(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        self._ctx.metrics.publishes.labels("unavailable").inc()
        return (
            503,
            {
                "error": "unavailable",
                "message": "not every record was stored in time: "
                "send again with the same id (recipients drop copies)",
            },
            {"Retry-After": "1"},
        )

    def local_presence(self, uids: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
        """The presence of ``uids`` whose partitions this instance serves; the rest unknown."""
        partitions = self._ctx.partitions
        presence: dict[str, Any] = {}
        unknown: list[str] = []
        for uid in uids:
            runtime = self._serving(partition_for(uid, partitions))
            if runtime is None:
                unknown.append(uid)
                continue
            devices = sorted(session.device for session in runtime.sessions.get(uid, ()))
            presence[uid] = {"online": bool(devices), "devices": devices}
        return presence, unknown

    async def presence(self, uids: Sequence[str], key: bytes) -> dict[str, Any]:
        """Ask each owner (this instance included) about its uids, in parallel."""
        ctx = self._ctx
        started = trio.current_time()
        me = ctx.info.instance
        by_owner: dict[str, tuple[str, list[str]]] = {}
        unknown: list[str] = []
        for uid in uids:
            owner = ctx.cache.owner(partition_for(uid, ctx.partitions))
            if owner is None:
                unknown.append(uid)
                continue
            by_owner.setdefault(owner.instance, (owner.info.http_url, []))[1].append(uid)
        presence: dict[str, Any] = {}

        async def ask(instance: str, http_url: str, asked: list[str]) -> None:
            if instance == me:
                found, missing = self.local_presence(asked)
            else:
                found, missing = await self._ask_owner(instance, http_url, asked, key)
            presence.update(found)
            unknown.extend(missing)

        async with trio.open_nursery() as nursery:
            for instance, (http_url, asked) in by_owner.items():
                nursery.start_soon(ask, instance, http_url, asked)
        ctx.metrics.presence_queries.inc()
        ctx.metrics.presence_seconds.observe(trio.current_time() - started)
        order = {uid: n for n, uid in enumerate(uids)}
        return {
            "presence": {uid: presence[uid] for uid in uids if uid in presence},
            "unknown": sorted(set(unknown), key=order.__getitem__),
        }

    async def _ask_owner(
        self, instance: str, http_url: str, uids: list[str], key: bytes
    ) -> tuple[dict[str, Any], list[str]]:
        target = "/internal/presence?" + urlencode([("uid", uid) for uid in uids])
        headers = {INTERNAL_HEADER: sign_internal(key, self._ctx.info.instance, "GET", target)}
        with trio.move_on_after(PRESENCE_TIMEOUT_S):
            try:
                status, _headers, doc = await http_get_json(
                    http_url.rstrip("/") + target, headers, timeout_s=PRESENCE_TIMEOUT_S
                )
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
                log.warning("presence_owner_failed", extra={"owner": instance, "error": repr(exc)})
                return {}, uids
            if status == 200 and isinstance(doc, dict):
                found = doc.get("presence")
                missing = doc.get("unknown")
                if isinstance(found, dict) and isinstance(missing, list):
                    # Only what was asked: an answer never adds uids of its own.
                    asked = set(uids)
                    kept = {uid: v for uid, v in found.items() if uid in asked}
                    return kept, [uid for uid in uids if uid not in kept]
            log.warning("presence_owner_refused", extra={"owner": instance, "status": status})
            return {}, uids
        log.warning("presence_owner_timeout", extra={"owner": instance})
        return {}, uids
