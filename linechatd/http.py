"""The HTTP API every instance serves (hypercorn, trio worker, a bare ASGI app).

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
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .auth import AuthError, bearer_token
from .config import read_token_file
from .hashing import partition_for
from .metrics import CONTENT_TYPE_LATEST
from .ownership import partition_view
from .protocol import is_valid_uid
from .static import asset_for

if TYPE_CHECKING:
    from .context import Context
    from .gateway import Instance

log = logging.getLogger(__name__)

MAX_QUERY_BYTES = 4096
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
    return Response(status, json.dumps(doc, separators=(",", ":")).encode(), headers=headers)


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
        if role is Role.PUBLIC:
            self._routes = {r: h for r, h in self._routes.items() if r not in ADMIN_ROUTES}
        elif role is Role.ADMIN:
            self._routes = {r: h for r, h in self._routes.items() if r in ADMIN_LISTENER_ROUTES}

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
            response = await self._dispatch(scope)
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

    async def _dispatch(self, scope: Scope) -> Response:
        path, method = scope["path"], scope["method"]
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
            if any(p == path for _m, p in self._routes):
                return json_response(405, {"error": "method_not_allowed"})
            return json_response(404, {"error": "not_found"})
        raw_query = scope.get("query_string", b"")
        if len(raw_query) > MAX_QUERY_BYTES:
            return json_response(400, {"error": "bad_request", "message": "query string too long"})
        try:
            query = dict(parse_qsl(raw_query.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return json_response(400, {"error": "bad_request", "message": "query is not UTF-8"})
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        return await handler(scope, query, headers)

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


class _HypercornConfig(HypercornConfig):
    """Hypercorn's configuration with a TLS context made by the gateway, which
    reloads its certificate in place on SIGHUP."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__()
        self._ssl_context = ssl_context

    @property
    def ssl_enabled(self) -> bool:
        return self._ssl_context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context


async def serve_http(
    app: HttpApi,
    bind: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``bind`` (HTTPS when ``ssl_context`` is given) until cancelled."""
    config = _HypercornConfig(ssl_context)
    config.bind = [bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    config.h11_max_incomplete_size = 16 * 1024
    config.keep_alive_timeout = 30
    await hypercorn_serve(app, config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]
