"""One gateway instance: the root of the nursery tree.

gateway (Gateway.run)
├── infrastructure nursery (outlives everything that uses it)
│   ├── zookeeper session          zk.ZooKeeper.run
│   ├── kafka producer             kafka.KafkaProducer.run
│   ├── kafka fetcher              kafka.KafkaFetcher.run (every held partition's topic)
│   └── ownership cache            ownership.OwnershipCache.run
└── serving nursery (cancelled first on shutdown)
    ├── partitions                 partitions.PartitionSupervisor.run
    ├── http server                http.serve_http
    ├── websocket listener         websocket.serve -> handshake -> partition hand-off
    ├── balancer                   balancer.Balancer.run
    ├── readiness, watchdog
    └── signals                    SIGTERM/SIGINT: drain; again: exit now; SIGHUP: reload
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_util import AsyncValue

from . import logs, websocket
from .auth import Authenticator, AuthError, KeyFileError
from .balancer import Balancer, drain_stagger
from .config import Config, ConfigError, HostPort, load_config
from .context import Context
from .hashing import partition_for
from .http import HttpApi, serve_http
from .kafka import KafkaAdmin, KafkaFetcher, KafkaProducer, KafkaUnavailable
from .metrics import Metrics
from .ownership import InstanceInfo, OwnershipCache, ZkPaths
from .partitions import PartitionSupervisor
from .protocol import HandshakeError, new_device_id, parse_handshake_query
from .sdnotify import Notifier
from .session import Session
from .zk import NodeExistsError, ZooKeeper, ZooKeeperError, ZooKeeperUnavailable

log = logging.getLogger(__name__)

KAFKA_CHECK_INTERVAL_S = 5.0
# Sections a reload applies to the running instance; the rest need a restart.
LIVE_SECTIONS = ("partitions", "limits", "log", "auth", "replay", "shutdown")
# Told to clients refused because an instance or an address has too many sockets.
TOO_MANY_CONNECTIONS_RETRY_AFTER_S = 5
# ALPN offered by each listener: the WebSocket upgrade is HTTP/1.1 only.
WEBSOCKET_ALPN = ("http/1.1",)
HTTP_ALPN = ("h2", "http/1.1")


class StartupError(Exception):
    """The instance cannot start; the message tells the operator why and what to do."""


class Gateway:
    def __init__(
        self, config: Config, *, config_path: Path | None = None, notifier: Notifier | None = None
    ) -> None:
        self.config_path = config_path
        self._initial = config
        self.notifier = notifier or Notifier()
        self.kafka_ok = AsyncValue(False)
        self.ctx: Context | None = None
        self.supervisor: PartitionSupervisor | None = None
        self.balancer: Balancer | None = None
        self._drain_requested = trio.Event()
        self._ready = trio.Event()
        self._drain_reason = ""
        self._started_at = time.time()
        self.connections = ConnectionCounter()
        # Listener section -> (cert file, key file, its live context); SIGHUP
        # loads renewed certificates into the same context.
        self._tls: dict[str, tuple[Path, Path, ssl.SSLContext]] = {}

    # -- lifecycle ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self._initial
        auth = self._check_startup(config)
        zk = ZooKeeper(
            config.zookeeper.hosts,
            session_timeout_s=config.zookeeper.session_timeout_s,
            connect_timeout_s=config.zookeeper.connect_timeout_s,
        )
        paths = ZkPaths(config.cluster.name)
        metrics = Metrics()
        # Signals are ours from the first moment: a stop during startup is a
        # clean exit, not the default action's death.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as infra:
                infra.start_soon(self._listen_signals, signals, infra.cancel_scope)
                await self._run_instance(infra, config, auth, zk, paths, metrics, task_status)
                infra.cancel_scope.cancel()
        log.info("gateway_stopped")

    async def _run_instance(
        self,
        infra: trio.Nursery,
        config: Config,
        auth: Authenticator,
        zk: ZooKeeper,
        paths: ZkPaths,
        metrics: Metrics,
        task_status: trio.TaskStatus[Gateway],
    ) -> None:
        try:
            await infra.start(zk.run)
        except ZooKeeperUnavailable as exc:
            raise StartupError(f"zookeeper.hosts: {exc}") from None
        metrics.zk_connected.set(1)
        try:
            await self._ensure_cluster(zk, paths, config)
        except ZooKeeperError as exc:
            raise StartupError(f"zookeeper.hosts: {exc}") from None
        admin = KafkaAdmin(config.kafka.bootstrap_servers)
        await self._ensure_topics(admin, config)
        self.kafka_ok.value = True
        producer = KafkaProducer(
            config.kafka.bootstrap_servers,
            linger_ms=config.kafka.linger_ms,
            timeout_s=config.kafka.produce_timeout_s,
        )
        await infra.start(producer.run)
        fetcher = KafkaFetcher(
            config.kafka.bootstrap_servers,
            f"{config.kafka.group_prefix}fetcher",
            fetch_wait_max_ms=config.kafka.fetch_wait_max_ms,
        )
        await infra.start(fetcher.run)
        cache = OwnershipCache(zk, paths, config.cluster.partitions)
        await infra.start(cache.run)
        info = InstanceInfo(config.instance.id, config.websocket.advertise, config.http.advertise)
        ctx = self.ctx = Context(
            config=AsyncValue(config),
            auth=AsyncValue(auth),
            info=info,
            paths=paths,
            zk=zk,
            cache=cache,
            producer=producer,
            fetcher=fetcher,
            admin=admin,
            metrics=metrics,
            # Threads blocked in the replay consumers' calls (a probe and a
            # scan per partition may poll at once, as after a failover).
            consumer_limiter=trio.CapacityLimiter(config.cluster.partitions + 16),
            draining=trio.Event(),
        )
        async with trio.open_nursery() as serving:
            self.supervisor = await serving.start(PartitionSupervisor(ctx).run)
            http_tls = self._tls.get("http")
            # Passed only when configured, so that serve_http needs the
            # parameter only once TLS can be configured.
            http_options: dict[str, Any] = {}
            if http_tls is not None:
                http_options["ssl_context"] = http_tls[2]
            http_binds = await serving.start(
                functools.partial(
                    serve_http, HttpApi(ctx, self), str(config.http.listen), **http_options
                )
            )
            ws_port = await serving.start(self._serve_websocket, config)
            self.balancer = await serving.start(Balancer(ctx, self.supervisor).run)
            serving.start_soon(self._monitor, admin, zk, metrics)
            serving.start_soon(self._watchdog)
            log.info(
                "gateway_ready",
                extra={
                    "http": http_binds,
                    "ws_port": ws_port,
                    "tls": sorted(self._tls),
                    "cluster": config.cluster.name,
                    "partitions": config.cluster.partitions,
                },
            )
            self.notifier.ready(f"serving cluster {config.cluster.name}")
            self._ready.set()
            task_status.started(self)
            await self._drain_requested.wait()
            await self._drain(serving)

    def _check_startup(self, config: Config) -> Authenticator:
        """Refuse to start insecurely; load keys and certificates before binding anything."""
        problems = auth_exposure_problems(config, config)
        if problems:
            raise StartupError("; ".join(problems))
        log_auth_warnings(config)
        try:
            auth = Authenticator(config.auth)
        except (OSError, KeyFileError) as exc:
            raise StartupError(f"auth.jwt_secret_file: cannot use the key: {exc}") from None
        for section, alpn in (("websocket", WEBSOCKET_ALPN), ("http", HTTP_ALPN)):
            files = tls_files(config, section)
            if files is None:
                continue
            cert, key = files
            try:
                self._tls[section] = (cert, key, server_tls_context(cert, key, alpn))
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(
                    f"{section}.tls_cert_file/{section}.tls_key_file: "
                    f"cannot load the certificate and key: {exc}"
                ) from None
        return auth

    def _reload_tls(self, config: Config) -> list[str]:
        """Load the (renewed) certificates ``config`` names into the running listeners.

        Returns the problems; a listener whose files cannot be loaded keeps its
        current certificate. Switching a listener between TCP and TLS needs a
        restart.
        """
        problems = []
        for section in ("websocket", "http"):
            try:
                files = tls_files(config, section)
            except StartupError as exc:
                problems.append(str(exc))
                continue
            running = self._tls.get(section)
            if (files is None) != (running is None):
                problems.append(f"{section}.tls_cert_file: turning TLS on or off needs a restart")
                continue
            if files is None or running is None:
                continue
            cert, key = files
            try:
                # Checked on a scratch context first: a failed load can leave
                # a context with a certificate that does not match its key.
                server_tls_context(cert, key, ())
                running[2].load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"{section}.tls_cert_file: cannot load the certificate: {exc}")
                continue
            self._tls[section] = (cert, key, running[2])
        return problems

    async def _serve_websocket(self, config: Config, *, task_status: trio.TaskStatus[int]) -> None:
        await websocket.serve(
            self._on_handshake,
            config.websocket.listen.host,
            config.websocket.listen.port,
            ssl_context=self._tls["websocket"][2] if "websocket" in self._tls else None,
            max_message_bytes=config.limits.max_frame_bytes,
            handshake_timeout_s=config.websocket.handshake_timeout_s,
            task_status=task_status,
        )

    async def _ensure_cluster(self, zk: ZooKeeper, paths: ZkPaths, config: Config) -> None:
        """Record the partition count on first start; refuse a different one later."""
        partitions = config.cluster.partitions
        doc = {
            "partitions": partitions,
            "created_by": config.instance.id,
            "created_at_ms": int(time.time() * 1000),
        }
        try:
            await zk.create(paths.meta, json.dumps(doc).encode(), makepath=True)
            log.info(
                "cluster_created", extra={"cluster": config.cluster.name, "partitions": partitions}
            )
        except NodeExistsError:
            data, _stat = await zk.get(paths.meta)
            try:
                recorded = int(json.loads(data)["partitions"])
            except (ValueError, KeyError, TypeError):
                raise StartupError(
                    f"{paths.meta} in ZooKeeper holds no partition count: {data[:100]!r}"
                ) from None
            if recorded != partitions:
                raise StartupError(
                    f"cluster.partitions: this instance is configured with {partitions} partitions, "
                    f"but cluster {config.cluster.name!r} was created with {recorded}; "
                    f"set cluster.partitions = {recorded} (the count is fixed for a cluster's lifetime)"
                ) from None
        await zk.ensure_path(paths.partitions)

    async def _ensure_topics(self, admin: KafkaAdmin, config: Config) -> None:
        topics = [f"{config.kafka.topic_prefix}{k}" for k in range(config.cluster.partitions)]
        try:
            if config.kafka.create_topics:
                created = await admin.ensure_topics(
                    topics, replication_factor=config.kafka.replication_factor
                )
                if created:
                    log.info("topics_created", extra={"count": len(created)})
            else:
                await admin.check()
        except KafkaUnavailable as exc:
            raise StartupError(
                f"kafka.bootstrap_servers: {config.kafka.bootstrap_servers}: {exc}"
            ) from None

    # -- readiness and status -------------------------------------------------

    async def _monitor(self, admin: KafkaAdmin, zk: ZooKeeper, metrics: Metrics) -> None:
        while True:
            metrics.zk_connected.set(1 if zk.connected else 0)
            try:
                await admin.check(timeout_s=KAFKA_CHECK_INTERVAL_S)
                ok = True
            except KafkaUnavailable:
                ok = False
            if ok != self.kafka_ok.value:
                log.warning("kafka_reachability", extra={"reachable": ok})
            self.kafka_ok.value = ok
            metrics.kafka_ready.set(1 if ok else 0)
            await trio.sleep(KAFKA_CHECK_INTERVAL_S)

    async def _watchdog(self) -> None:
        # Sent from inside the trio loop: a wedged loop stops the pings and
        # systemd restarts the process.
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval / 3)

    def readiness(self) -> dict[str, bool]:
        """Ready = connected to ZooKeeper and Kafka, and not draining."""
        ctx = self.ctx
        return {
            "zookeeper": ctx is not None and ctx.zk.connected,
            "kafka": self.kafka_ok.value,
            "accepting": ctx is not None and not ctx.draining.is_set(),
        }

    def status(self) -> dict[str, Any]:
        ctx, sup = self.ctx, self.supervisor
        assert ctx is not None and sup is not None
        partitions = []
        # Only partitions that serve: a lease still starting would answer 421.
        for runtime in (r for r in sup.runtimes() if r.running):
            try:
                _low, high = runtime.cached_watermarks()
                lag: int | None = max(0, high - runtime.next_offset)
            except KafkaUnavailable:
                lag = None
            partitions.append(
                {
                    "partition": runtime.partition,
                    "epoch": runtime.epoch,
                    "since": runtime.since,
                    "connections": runtime.session_count,
                    "next_offset": runtime.next_offset,
                    "lag": lag,
                }
            )
        return {
            "instance": ctx.info.instance,
            "ws_url": ctx.info.ws_url,
            "http_url": ctx.info.http_url,
            "started_at": self._started_at,
            "draining": ctx.draining.is_set(),
            "zookeeper": ctx.zk.session.value.state.value,
            "kafka": self.kafka_ok.value,
            "target": self.balancer.target() if self.balancer else None,
            "connections": sum(p["connections"] for p in partitions),
            "partitions": partitions,
        }

    # -- the WebSocket handshake ----------------------------------------------

    async def _on_handshake(self, hs: websocket.Handshake) -> None:
        try:
            await self._handshake(hs)
        except Exception:
            # The listener must outlive any one connection's failure.
            log.exception("handshake_failed", extra={"remote": hs.remote})
            with contextlib.suppress(Exception):
                await hs.reject(500, {"error": "internal"})

    async def _handshake(self, hs: websocket.Handshake) -> None:
        ctx, sup = self.ctx, self.supervisor
        if ctx is None or sup is None:
            await hs.reject(503, {"error": "starting"}, {"Retry-After": "1"})
            return
        config = ctx.config.value
        metrics = ctx.metrics

        async def refuse(
            status: int, error: str, extra: dict[str, Any] | None = None, retry_after: int = 0
        ) -> None:
            metrics.handshakes.labels(error).inc()
            # The query string only with its token redacted; no headers.
            log.debug(
                "handshake_rejected",
                extra={
                    "remote": hs.remote,
                    "status": status,
                    "error": error,
                    "query": websocket.redact_query(hs.query),
                },
            )
            headers = {"Retry-After": str(retry_after)} if retry_after else None
            await hs.reject(status, {"error": error, **(extra or {})}, headers)

        expected_path = websocket_path(config.websocket.advertise)
        if hs.path != expected_path:
            await refuse(
                404, "not_found", {"message": f"the WebSocket endpoint is {expected_path}"}
            )
            return
        # Checked in the contract's order: parameters, token, ownership; then
        # the limits, which only count sockets that would otherwise be accepted.
        try:
            params = parse_handshake_query(hs.query, new_device_id=new_device_id)
        except HandshakeError as exc:
            await refuse(exc.status, exc.code, {"message": exc.message})
            return
        origins = config.websocket.allowed_origins
        origin = hs.headers.get("origin")
        if origins and origin is not None and origin.lower() not in origins:
            # Browsers always send Origin: this stops other sites' pages from
            # opening sockets with a user's token; other clients are unaffected.
            await refuse(403, "forbidden_origin")
            return
        try:
            identity = ctx.auth.value.authenticate(params.token, params.uid)
        except AuthError as exc:
            await refuse(exc.status, exc.code)
            return
        if ctx.draining.is_set():
            await refuse(503, "draining", retry_after=1)
            return
        k = partition_for(params.uid, ctx.partitions)
        runtime = sup.runtime(k)
        if runtime is None:
            owner = ctx.cache.owner(k)
            url = (
                owner.info.ws_url
                if owner is not None and owner.instance != ctx.info.instance
                else None
            )
            await refuse(421, "wrong_instance", {"url": url, "partition": k})
            return
        limits = config.limits
        address = address_key(hs.remote)
        if self.connections.total >= limits.max_connections:
            await refuse(
                503, "too_many_connections", retry_after=TOO_MANY_CONNECTIONS_RETRY_AFTER_S
            )
            return
        if self.connections.of(address) >= limits.max_connections_per_address:
            await refuse(
                429,
                "too_many_connections_from_address",
                retry_after=TOO_MANY_CONNECTIONS_RETRY_AFTER_S,
            )
            return
        if runtime.devices_of(params.uid) >= limits.max_devices_per_uid:
            await refuse(429, "too_many_devices")
            return
        # Counted from before the first await: concurrent handshakes cannot all
        # pass the checks above and then all be accepted. The session releases
        # it when it ends.
        release = self.connections.add(address)
        try:
            conn = await hs.accept()
            metrics.handshakes.labels("accepted").inc()
            session = Session(
                conn=conn,
                params=params,
                identity=identity,
                runtime=runtime,
                ctx=ctx,
                on_end=release,
            )
            if not await runtime.serve(session):
                await conn.close(1012, "partition moved")
                release()
                return
        except BaseException:
            release()
            raise
        # The session's task, in the partition's nursery, owns the socket now.
        hs.detach()

    # -- signals, drain, reload -------------------------------------------------

    def request_drain(self, reason: str) -> None:
        if not self._drain_requested.is_set():
            self._drain_reason = reason
            self._drain_requested.set()

    async def _listen_signals(
        self, signals: AsyncIterator[int], startup_scope: trio.CancelScope
    ) -> None:
        """SIGTERM/SIGINT: drain (during startup: stop); again: exit at once. SIGHUP: reload."""
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._ready.is_set():
                if signum == signal.SIGHUP:
                    log.info("reload_ignored_while_starting")
                    continue
                log.info("stopped_while_starting", extra={"signal": name})
                startup_scope.cancel()
                return
            if signum == signal.SIGHUP:
                await self.reload()
            elif self._drain_requested.is_set():
                log.warning("second_stop_signal", extra={"signal": name})
                os._exit(1)
            else:
                self.request_drain(name)

    async def _drain(self, serving: trio.Nursery) -> None:
        """Staged shutdown: refuse new sockets, hand partitions over, then stop."""
        ctx, balancer = self.ctx, self.balancer
        assert ctx is not None and balancer is not None
        grace = ctx.config.value.shutdown.grace_period_s
        self.notifier.stopping()
        log.info("drain_started", extra={"reason": self._drain_reason, "grace_period_s": grace})
        started = trio.current_time()
        configured = ctx.config.value.shutdown.drain_stagger_s
        held = len(self.supervisor.held()) if self.supervisor else 0
        stagger = drain_stagger(configured, grace, held)
        if stagger < configured:
            log.info(
                "drain_stagger_shortened",
                extra={"partitions": held, "configured_s": configured, "stagger_s": stagger},
            )
        with trio.move_on_after(grace) as scope:
            await balancer.drain(stagger_s=stagger)
        if scope.cancelled_caught:
            log.warning(
                "drain_grace_expired",
                extra={"left": len(self.supervisor.held()) if self.supervisor else 0},
            )
        log.info("drain_finished", extra={"seconds": round(trio.current_time() - started, 3)})
        serving.cancel_scope.cancel()

    async def reload(self) -> bool:
        """Apply a re-read configuration; keep the running one if the file is invalid."""
        ctx = self.ctx
        if ctx is None or self.config_path is None:
            return False
        self.notifier.reloading()
        try:
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload_rejected", extra={"problem": problem})
                return False
            old = ctx.config.value
            for key in old.restart_required_changes(new):
                log.warning("reload_needs_restart", extra={"key": key})
            applied = dataclasses.replace(old, **{s: getattr(new, s) for s in LIVE_SECTIONS})
            # Independent of the rest: a renewed certificate applies even if
            # another part of the reload is refused.
            for problem in self._reload_tls(new):
                log.error("reload_tls_failed", extra={"problem": problem})
            # The listeners keep their running addresses until a restart.
            exposure = auth_exposure_problems(applied, old)
            for problem in exposure:
                log.error("reload_rejected", extra={"problem": problem})
            if exposure:
                return False
            try:
                auth = Authenticator(applied.auth)
            except (OSError, ValueError) as exc:
                log.error(
                    "reload_rejected",
                    extra={"problem": f"auth.jwt_secret_file: cannot use the key: {exc}"},
                )
                return False
            if applied.auth != old.auth:
                log_auth_warnings(applied)
            ctx.auth.value = auth
            ctx.config.value = applied
            logs.set_level(applied.log.level)
            if self.balancer is not None:
                self.balancer.reconfigure()
            log.info(
                "reload_applied",
                extra={"changed": [s for s in LIVE_SECTIONS if getattr(old, s) != getattr(new, s)]},
            )
            return True
        finally:
            self.notifier.ready()


def websocket_path(advertise: str) -> str:
    return urlsplit(advertise).path or "/"


# -- startup checks ---------------------------------------------------------------


def is_loopback(listen: HostPort) -> bool:
    """True when only this host can reach ``listen`` (a name other than localhost may not)."""
    if listen.host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen.host).is_loopback
    except ValueError:
        return False


def auth_exposure_problems(config: Config, listeners: Config) -> list[str]:
    """Why ``config``'s [auth] may not serve ``listeners``' addresses ([] when it may)."""
    if config.auth.mode != "none" or config.auth.allow_insecure_none:
        return []
    exposed = [
        f"{name}.listen = {section.listen}"
        for name, section in (("http", listeners.http), ("websocket", listeners.websocket))
        if not is_loopback(section.listen)
    ]
    if not exposed:
        return []
    return [
        f'auth.mode: "none" lets anyone connect as any uid, and {" and ".join(exposed)} '
        f"{'is' if len(exposed) == 1 else 'are'} reachable from other hosts; "
        'set auth.mode = "jwt" with auth.jwt_secret_file, or listen on 127.0.0.1, '
        "or set auth.allow_insecure_none = true to accept the risk"
    ]


def log_auth_warnings(config: Config) -> None:
    if config.auth.mode == "none":
        public = [
            str(s.listen) for s in (config.http, config.websocket) if not is_loopback(s.listen)
        ]
        log.warning(
            "auth_disabled",
            extra={
                "hint": 'auth.mode = "none" lets anyone connect as any uid: for development only',
                **({"public_listeners": public, "allow_insecure_none": True} if public else {}),
            },
        )
        return
    ws = config.websocket
    if (
        tls_files(config, "websocket") is None
        and ws.advertise.startswith("ws://")
        and not is_loopback(ws.listen)
    ):
        log.warning(
            "tokens_in_cleartext",
            extra={
                "hint": "websocket.advertise is ws:// on a non-loopback listener: tokens cross "
                "the network unencrypted; set websocket.tls_cert_file/tls_key_file or "
                "terminate TLS in a proxy and advertise wss://"
            },
        )


def tls_files(config: Config, section: str) -> tuple[Path, Path] | None:
    """The (certificate, key) files of listener ``section``, or None for plain TCP."""
    table = getattr(config, section)
    cert = getattr(table, "tls_cert_file", None)
    key = getattr(table, "tls_key_file", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise StartupError(
            f"{section}.tls_cert_file and {section}.tls_key_file: set both or neither"
        )
    return Path(cert), Path(key)


def server_tls_context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, the library's default ciphers, no client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No compression (CRIME) and no client-initiated renegotiation (a CPU sink).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if alpn:
        context.set_alpn_protocols(list(alpn))
    context.load_cert_chain(cert, key)
    return context


# -- connection accounting -----------------------------------------------------------


def address_key(remote: str) -> str:
    """What the per-address limit counts by: the IPv4 address, or the IPv6 /64.

    One IPv6 subscriber usually holds a whole /64, so counting single IPv6
    addresses would not limit anyone.
    """
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionCounter:
    """This instance's accepted WebSocket connections, in total and per address key."""

    def __init__(self) -> None:
        self.total = 0
        self._by_address: dict[str, int] = {}

    def of(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def add(self, address: str) -> Callable[[], None]:
        """Count one connection from ``address``; returns its release (idempotent)."""
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]

        return release


async def run_from_config(path: Path) -> int:
    """``linechatd run``: exit code 0 after a clean drain."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    logs.configure(level=config.log.level, fmt=config.log.format, instance=config.instance.id)
    try:
        await Gateway(config, config_path=path).run()
    except (StartupError, BaseExceptionGroup) as exc:
        # Raised inside a nursery, a StartupError arrives in an exception group.
        startup = startup_error(exc)
        if startup is None:
            raise
        log.error("startup_failed", extra={"reason": str(startup)})
        print(f"linechatd: cannot start: {startup}", file=sys.stderr)
        return 1
    return 0


def startup_error(exc: BaseException) -> StartupError | None:
    """The StartupError that ``exc`` is or only carries (None if it holds anything else)."""
    while isinstance(exc, BaseExceptionGroup):
        match, rest = exc.split(StartupError)
        if match is None or rest is not None:
            return None
        exc = match.exceptions[0]
    return exc if isinstance(exc, StartupError) else None
