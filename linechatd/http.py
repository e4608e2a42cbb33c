"""The HTTP API every instance serves (a bare ASGI app on :mod:`linechatd.httpserver`).

Errors are JSON with an ``error`` code; an unexpected exception answers 500
``{"error": "internal"}`` and is logged, never shown to the client.

Admin endpoints (``/admin/*``, docs/protocol.md §2) trust no address: they need
``Authorization: Bearer <admin token>`` (``[admin] token_file``) from
loopback as from anywhere, answer 404 while no token is configured and 403 to
a request that carries ``Origin`` (a browser page, never an operator's tool).
With ``[admin] listen`` set they are served only by that listener, which also
serves status, metrics and health, so a proxy in front of the HTTP listener
can hide everything else.
"""

from __future__ import annotations

import enum
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio

from .auth import AuthError, bearer_token
from .config import HostPort, read_token_file
from .hashing import partition_for
from .httpserver import serve_http_app
from .jsonfast import dumps_compact_fast
from .listeners import UnfinishedRequests
from .metrics import CONTENT_TYPE_LATEST
from .ownership import partition_view
from .protocol import is_valid_uid
from .serverapi import (
    INTERNAL_HEADER,
    PublishError,
    decode_publish,
    presence_uids,
    server_key_matches,
    verify_internal,
)
from .static import asset_for

if TYPE_CHECKING:
    from .context import Context
    from .gateway import Instance

log = logging.getLogger(__name__)

MAX_QUERY_BYTES = 4096
# 1,000 uids of up to 128 characters, each as "uid=...&".
MAX_PRESENCE_QUERY_BYTES = 1000 * 133
PUBLISH_ENVELOPE_BYTES = 256 * 1024
NO_OWNER_RETRY_AFTER_S = 1

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = dict(headers or {})


def json_response(
    status: int, doc: Mapping[str, object], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, dumps_compact_fast(doc), headers=headers)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it is longer than ``limit`` bytes (the rest unread)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class Role(enum.Enum):
    """Which endpoints a listener serves."""

    PUBLIC = "public"  # the HTTP listener, when the admin endpoints have their own
    ADMIN = "admin"  # the admin listener: admin endpoints, status, metrics, health
    BOTH = "both"  # the HTTP listener serving the admin endpoints too


# Endpoints that change an instance: the admin token guards them.
ADMIN_ROUTES = frozenset({("POST", "/admin/drain")})
# What the admin listener serves besides them.
ADMIN_LISTENER_ROUTES = ADMIN_ROUTES | {
    ("GET", "/api/status"),
    ("GET", "/api/partitions"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}


class HttpApi:
    """Routes requests to handlers; the instance serves status, readiness and drain."""

    def __init__(self, ctx: Context, instance: Instance, *, role: Role = Role.BOTH) -> None:
        self._ctx = ctx
        self._instance = instance
        self._role = role
        self._routes: dict[
            tuple[str, str], Callable[[Scope, dict[str, str], dict[str, str]], Awaitable[Response]]
        ] = {
            ("GET", "/api/connection-url"): self.connection_url,
            ("GET", "/api/partitions"): self.partitions,
            ("GET", "/api/status"): self.status,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/admin/drain"): self.admin_drain,
        }
        # The server API reads the raw query (repeated uids) or a body.
        self._server_routes: dict[
            tuple[str, str], Callable[[Scope, Receive, dict[str, str]], Awaitable[Response]]
        ] = {
            ("POST", "/api/publish"): self.publish,
            ("GET", "/api/presence"): self.presence,
            ("GET", "/internal/presence"): self.internal_presence,
        }
        if role is Role.PUBLIC:
            self._routes = {r: h for r, h in self._routes.items() if r not in ADMIN_ROUTES}
        elif role is Role.ADMIN:
            self._routes = {r: h for r, h in self._routes.items() if r in ADMIN_LISTENER_ROUTES}
        if role is Role.ADMIN:
            # The server API is for backends, on the HTTP listener only.
            self._server_routes = {}
        # Known paths asked with another method answer 405, not 404.
        self._server_paths = frozenset(path for _method, path in self._server_routes)
        self._paths = frozenset(path for _method, path in self._routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            response = await self._dispatch(scope, receive)
        except Exception:
            log.exception("http_internal_error", extra={"path": scope.get("path")})
            response = json_response(500, {"error": "internal"})
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in response.headers.items()]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _dispatch(self, scope: Scope, receive: Receive) -> Response:
        path, method = scope["path"], scope["method"]
        server_handler = self._server_routes.get((method, path))
        if server_handler is not None:
            return await server_handler(scope, receive, _headers(scope))
        if path in self._server_paths:
            return json_response(405, {"error": "method_not_allowed"})
        handler = self._routes.get((method, path))
        if (
            handler is None
            and method == "GET"
            and self._role is not Role.ADMIN
            and self._ctx.config.value.http.demo_page
        ):
            asset = asset_for(path)
            if asset is not None:
                return Response(200, asset.body, asset.content_type, asset.headers)
        if handler is None:
            if path in self._paths:
                return json_response(405, {"error": "method_not_allowed"})
            return json_response(404, {"error": "not_found"})
        raw_query = scope.get("query_string", b"")
        if len(raw_query) > MAX_QUERY_BYTES:
            return json_response(400, {"error": "bad_request", "message": "query string too long"})
        try:
            query = dict(parse_qsl(raw_query.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return json_response(400, {"error": "bad_request", "message": "query is not UTF-8"})
        return await handler(scope, query, _headers(scope))

    # -- public ---------------------------------------------------------------

    async def connection_url(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        ctx = self._ctx
        uid = query.get("uid")
        if not is_valid_uid(uid):
            return json_response(
                400,
                {"error": "bad_uid", "message": "uid must be 1-128 characters of [A-Za-z0-9_.:@-]"},
            )
        assert uid is not None
        try:
            ctx.auth.value.authenticate(bearer_token(headers.get("authorization")), uid)
        except AuthError as exc:
            return json_response(exc.status, {"error": exc.code})
        k = partition_for(uid, ctx.partitions)
        if not ctx.zk.connected:
            # Without a trusted ZooKeeper session the ownership view may be
            # stale: every owner may have lost its lease by now (CONTRACT §7).
            return json_response(
                503,
                {
                    "error": "no_owner",
                    "partition": k,
                    "message": "this instance cannot reach ZooKeeper; ask another or retry",
                },
                headers={"Retry-After": str(NO_OWNER_RETRY_AFTER_S)},
            )
        owner = ctx.cache.owner(k)
        if owner is None or not owner.info.ws_url:
            return json_response(
                503,
                {"error": "no_owner", "partition": k},
                headers={"Retry-After": str(NO_OWNER_RETRY_AFTER_S)},
            )
        return json_response(
            200, {"url": owner.info.ws_url, "partition": k, "instance": owner.instance}
        )

    async def healthz(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        checks = self._instance.readiness()
        ok = all(checks.values())
        return json_response(200 if ok else 503, {"ready": ok, **checks})

    async def metrics(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        return Response(200, self._ctx.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    async def partitions(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        owners = self._ctx.cache.snapshot()
        return json_response(
            200, {"partitions": [partition_view(k, o) for k, o in enumerate(owners)]}
        )

    async def status(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        return json_response(200, self._instance.status())

    # -- admin ----------------------------------------------------------------

    def _admin_refusal(self, headers: dict[str, str]) -> Response | None:
        """Why an admin request is refused (None: it carries the admin token)."""
        token_file = self._ctx.config.value.admin.token_file
        if token_file is None:
            # Not configured: the endpoint does not exist, on any address.
            return json_response(404, {"error": "not_found"})
        if "origin" in headers:
            # Browsers send Origin; operators' tools do not. A page must never
            # reach an admin endpoint, whatever it knows.
            return json_response(403, {"error": "forbidden_origin"})
        try:
            expected = read_token_file(token_file)
        except (OSError, ValueError) as exc:
            log.error("admin_token_unusable", extra={"file": str(token_file), "error": str(exc)})
            return json_response(503, {"error": "admin_token_unavailable"})
        given = bearer_token(headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return json_response(
                401, {"error": "unauthorized"}, headers={"WWW-Authenticate": "Bearer"}
            )
        return None

    async def admin_drain(
        self, scope: Scope, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        refusal = self._admin_refusal(headers)
        if refusal is not None:
            return refusal
        me = self._ctx.info.instance
        target = query.get("instance")
        if target is not None and target != me:
            # The caller reached another instance than it meant (a shared
            # admin url, a port reused): draining this one would be wrong.
            return json_response(409, {"error": "wrong_instance", "instance": me})
        self._instance.request_drain("admin")
        return json_response(202, {"draining": True, "instance": me})

    # -- the server API (CONTRACT.md §6) ---------------------------------------------

    def _server_key(self, headers: dict[str, str]) -> Response | bytes:
        """The key when the request carries it; else the answer (404 when the API is off)."""
        key = self._instance.server_key
        if key is None:
            return json_response(404, {"error": "disabled"})
        if not server_key_matches(key, headers.get("authorization")):
            return json_response(401, {"error": "unauthorized"})
        return key

    async def publish(self, scope: Scope, receive: Receive, headers: dict[str, str]) -> Response:
        key = self._server_key(headers)
        if isinstance(key, Response):
            return key
        limit = self._ctx.config.value.limits.max_frame_bytes
        # The body is at most max_frame_bytes once encoded; the request around
        # it (up to 1,000 uids, the id, the sender) fits in as much again and 256 KiB.
        data = await _read_body(receive, 2 * limit + PUBLISH_ENVELOPE_BYTES)
        if data is None:
            self._ctx.metrics.publishes.labels("too_large").inc()
            return json_response(413, {"error": "too_large"})
        try:
            request = decode_publish(data, max_body_bytes=limit)
        except PublishError as exc:
            self._ctx.metrics.publishes.labels(exc.error).inc()
            return json_response(exc.status, exc.doc())
        status, doc, extra = await self._instance.server_api.publish(request)
        return json_response(status, doc, headers=extra)

    async def presence(self, scope: Scope, receive: Receive, headers: dict[str, str]) -> Response:
        key = self._server_key(headers)
        if isinstance(key, Response):
            return key
        try:
            uids = presence_uids(_query_pairs(scope))
        except ValueError as exc:
            return json_response(400, {"error": "bad_request", "field": "uid", "message": str(exc)})
        return json_response(200, await self._instance.server_api.presence(uids, key))

    async def internal_presence(
        self, scope: Scope, receive: Receive, headers: dict[str, str]
    ) -> Response:
        key = self._instance.server_key
        if key is None:
            return json_response(404, {"error": "disabled"})
        target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        if query:
            target += "?" + query
        caller = verify_internal(key, headers.get(INTERNAL_HEADER), "GET", target)
        if caller is None:
            return json_response(401, {"error": "unauthorized"})
        try:
            uids = presence_uids(_query_pairs(scope))
        except ValueError as exc:
            return json_response(400, {"error": "bad_request", "field": "uid", "message": str(exc)})
        found, unknown = self._instance.server_api.local_presence(uids)
        return json_response(200, {"presence": found, "unknown": unknown})


def _query_pairs(scope: Scope) -> list[tuple[str, str]]:
    raw = scope.get("query_string", b"")
    if len(raw) > MAX_PRESENCE_QUERY_BYTES:
        raise ValueError("query string too long")
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise ValueError("query is not UTF-8") from None


async def serve_http(
    app: HttpApi,
    listen: HostPort,
    *,
    ssl_context: ssl.SSLContext | None = None,
    unfinished: UnfinishedRequests | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (HTTPS when ``ssl_context`` is given) until cancelled."""
    await serve_http_app(
        app,
        listen,
        # A request head: a presence query names up to 1,000 uids in its target.
        max_head_bytes=MAX_PRESENCE_QUERY_BYTES + 16 * 1024,
        ssl_context=ssl_context,
        unfinished=unfinished,
        task_status=task_status,
    )
