"""One gateway instance: the root of the nursery tree.

gateway (Gateway.run)
├── infrastructure nursery (outlives everything that uses it)
│   ├── zookeeper session          zk.ZooKeeper.run
│   ├── kafka producer             kafka.KafkaProducer.run
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
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio
from trio_util import AsyncValue

from . import logs, websocket
from .auth import Authenticator, AuthError
from .balancer import Balancer
from .config import Config, ConfigError, load_config
from .context import Context
from .hashing import partition_for
from .http import HttpApi, serve_http
from .kafka import KafkaAdmin, KafkaProducer, KafkaUnavailable
from .metrics import Metrics
from .ownership import InstanceInfo, OwnershipCache, ZkPaths
from .partitions import PartitionSupervisor
from .protocol import HandshakeError, new_device_id, parse_handshake_query
from .sdnotify import Notifier
from .session import Session
from .zk import NodeExistsError, ZooKeeper, ZooKeeperUnavailable

log = logging.getLogger(__name__)

KAFKA_CHECK_INTERVAL_S = 5.0
# Sections a reload applies to the running instance; the rest need a restart.
LIVE_SECTIONS = ("partitions", "limits", "log", "auth", "replay", "shutdown")


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
        self._drain_reason = ""
        self._started_at = time.time()

    # -- lifecycle ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self._initial
        zk = ZooKeeper(
            config.zookeeper.hosts,
            session_timeout_s=config.zookeeper.session_timeout_s,
            connect_timeout_s=config.zookeeper.connect_timeout_s,
        )
        paths = ZkPaths(config.cluster.name)
        metrics = Metrics()
        auth = Authenticator(config.auth)
        async with trio.open_nursery() as infra:
            try:
                await infra.start(zk.run)
            except ZooKeeperUnavailable as exc:
                raise StartupError(f"zookeeper.hosts: {exc}") from None
            metrics.zk_connected.set(1)
            await self._ensure_cluster(zk, paths, config)
            await self._ensure_topics(config)
            self.kafka_ok.value = True
            producer = KafkaProducer(
                config.kafka.bootstrap_servers,
                linger_ms=config.kafka.linger_ms,
                timeout_s=config.kafka.produce_timeout_s,
            )
            await infra.start(producer.run)
            cache = OwnershipCache(zk, paths, config.cluster.partitions)
            await infra.start(cache.run)
            info = InstanceInfo(
                config.instance.id, config.websocket.advertise, config.http.advertise
            )
            ctx = self.ctx = Context(
                config=AsyncValue(config),
                auth=AsyncValue(auth),
                info=info,
                paths=paths,
                zk=zk,
                cache=cache,
                producer=producer,
                metrics=metrics,
                # One thread per partition consumer poll, plus replays.
                consumer_limiter=trio.CapacityLimiter(config.cluster.partitions + 16),
                draining=trio.Event(),
            )
            async with trio.open_nursery() as serving:
                self.supervisor = await serving.start(PartitionSupervisor(ctx).run)
                http_binds = await serving.start(
                    serve_http, HttpApi(ctx, self), str(config.http.listen)
                )
                ws_port = await serving.start(self._serve_websocket, config)
                self.balancer = await serving.start(Balancer(ctx, self.supervisor).run)
                serving.start_soon(self._monitor, zk, metrics)
                serving.start_soon(self._watchdog)
                log.info(
                    "gateway_ready",
                    extra={
                        "http": http_binds,
                        "ws_port": ws_port,
                        "cluster": config.cluster.name,
                        "partitions": config.cluster.partitions,
                    },
                )
                self.notifier.ready(f"serving cluster {config.cluster.name}")
                task_status.started(self)
                await self._serve_signals(serving)
            infra.cancel_scope.cancel()
        log.info("gateway_stopped")

    async def _serve_websocket(self, config: Config, *, task_status: trio.TaskStatus[int]) -> None:
        await websocket.serve(
            self._on_handshake,
            config.websocket.listen.host,
            config.websocket.listen.port,
            ssl_context=None,
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

    async def _ensure_topics(self, config: Config) -> None:
        admin = KafkaAdmin(config.kafka.bootstrap_servers)
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

    async def _monitor(self, zk: ZooKeeper, metrics: Metrics) -> None:
        admin = KafkaAdmin(self._initial.kafka.bootstrap_servers)
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
        for runtime in sup.runtimes():
            try:
                _low, high = runtime.consumer.cached_watermarks()
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
        expected_path = websocket_path(config.websocket.advertise)
        if hs.path != expected_path:
            metrics.handshakes.labels("not_found").inc()
            await hs.reject(
                404, {"error": "not_found", "message": f"the WebSocket endpoint is {expected_path}"}
            )
            return
        # Checked in the contract's order: parameters, token, ownership.
        try:
            params = parse_handshake_query(hs.query, new_device_id=new_device_id)
        except HandshakeError as exc:
            metrics.handshakes.labels(exc.code).inc()
            await hs.reject(exc.status, {"error": exc.code, "message": exc.message})
            return
        origins = config.websocket.allowed_origins
        origin = hs.headers.get("origin")
        if origins and origin is not None and origin.lower() not in origins:
            metrics.handshakes.labels("forbidden_origin").inc()
            await hs.reject(403, {"error": "forbidden_origin"})
            return
        try:
            identity = ctx.auth.value.authenticate(params.token, params.uid)
        except AuthError as exc:
            metrics.handshakes.labels(exc.code).inc()
            await hs.reject(exc.status, {"error": exc.code})
            return
        if ctx.draining.is_set():
            metrics.handshakes.labels("draining").inc()
            await hs.reject(503, {"error": "draining"}, {"Retry-After": "1"})
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
            metrics.handshakes.labels("wrong_instance").inc()
            await hs.reject(421, {"error": "wrong_instance", "url": url, "partition": k})
            return
        if runtime.devices_of(params.uid) >= config.limits.max_devices_per_uid:
            metrics.handshakes.labels("too_many_devices").inc()
            await hs.reject(429, {"error": "too_many_devices"})
            return
        conn = await hs.accept()
        metrics.handshakes.labels("accepted").inc()
        session = Session(conn=conn, params=params, identity=identity, runtime=runtime, ctx=ctx)
        if not await runtime.serve(session):
            await conn.close(1012, "partition moved")
            return
        # The socket's task now lives in the partition's nursery; this handler
        # only keeps the transport's connection open until that task ends.
        await session.finished.wait()

    # -- signals, drain, reload -------------------------------------------------

    def request_drain(self, reason: str) -> None:
        if not self._drain_requested.is_set():
            self._drain_reason = reason
            self._drain_requested.set()

    async def _serve_signals(self, serving: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:

            async def listen() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await self.reload()
                    elif self._drain_requested.is_set():
                        log.warning(
                            "second_stop_signal", extra={"signal": signal.Signals(signum).name}
                        )
                        os._exit(1)
                    else:
                        self.request_drain(signal.Signals(signum).name)

            serving.start_soon(listen)
            await self._drain_requested.wait()
            await self._drain(serving)

    async def _drain(self, serving: trio.Nursery) -> None:
        """Staged shutdown: refuse new sockets, hand partitions over, then stop."""
        ctx, balancer = self.ctx, self.balancer
        assert ctx is not None and balancer is not None
        grace = ctx.config.value.shutdown.grace_period_s
        self.notifier.stopping()
        log.info("drain_started", extra={"reason": self._drain_reason, "grace_period_s": grace})
        started = trio.current_time()
        with trio.move_on_after(grace) as scope:
            await balancer.drain(stagger_s=ctx.config.value.shutdown.drain_stagger_s)
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
            try:
                auth = Authenticator(applied.auth)
            except (OSError, ValueError) as exc:
                log.error("reload_rejected", extra={"problem": f"auth: cannot load key: {exc}"})
                return False
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
    from urllib.parse import urlsplit

    return urlsplit(advertise).path or "/"


async def run_from_config(path: Path) -> int:
    """``linechatd run``: exit code 0 after a clean drain."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=__import__("sys").stderr)
        return 2
    logs.configure(level=config.log.level, fmt=config.log.format, instance=config.instance.id)
    if config.auth.mode == "none":
        log.warning(
            "auth_disabled",
            extra={
                "hint": 'auth.mode = "none" lets anyone connect as any uid: for development only'
            },
        )
    try:
        await Gateway(config, config_path=path).run()
    except StartupError as exc:
        log.error("startup_failed", extra={"reason": str(exc)})
        print(f"linechatd: cannot start: {exc}", file=__import__("sys").stderr)
        return 1
    return 0
