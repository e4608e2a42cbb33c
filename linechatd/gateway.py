"""One gateway instance: the root of the nursery tree.

gateway (Gateway.run: signals, startup)
├── infrastructure nursery (outlives everything that uses it)
│   ├── zookeeper session          zk.ZooKeeper.run
│   ├── kafka producer             kafka.KafkaProducer.run
│   ├── kafka fetcher              kafka.KafkaFetcher.run (every held partition's topic)
│   └── ownership cache            ownership.OwnershipCache.run
└── serving nursery (Instance.run; cancelled first on shutdown)
    ├── partitions                 partitions.PartitionSupervisor.run
    ├── http server                http.serve_http
    ├── websocket listener         websocket.serve -> admission.admit -> partition hand-off
    ├── balancer                   balancer.Balancer.run
    └── readiness, watchdog

``Gateway`` is the process: it owns the signals (SIGTERM/SIGINT drain, again
exit at once; SIGHUP reload) and starts the infrastructure. ``Instance`` is
what serves once that is up: every part of it exists from its construction on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio
from trio_util import AsyncValue

from . import logs, websocket
from .admission import ConnectionCounter, Refusal, UpgradeRequest, admit
from .auth import Authenticator, KeyFileError
from .balancer import Balancer, drain_stagger
from .config import Config, ConfigError, load_config
from .context import Context
from .http import HttpApi, serve_http
from .kafka import KafkaAdmin, KafkaFetcher, KafkaProducer, KafkaUnavailable
from .metrics import Metrics
from .ownership import InstanceInfo, OwnershipCache, ZkPaths
from .partitions import PartitionSupervisor
from .protocol import CloseCode, new_device_id
from .sdnotify import Notifier
from .session import Session
from .startup import StartupError, auth_exposure_problems, log_auth_warnings, startup_error
from .tls import ListenerTLS, TLSFilesError
from .zk import (
    Create,
    NodeExistsError,
    NoNodeError,
    ZooKeeper,
    ZooKeeperClient,
    ZooKeeperError,
    ZooKeeperUnavailable,
)

__all__ = ["Gateway", "Instance", "StartupError", "run_from_config", "startup_error"]

log = logging.getLogger(__name__)

KAFKA_CHECK_INTERVAL_S = 5.0
# Sections a reload applies to the running instance; the rest need a restart.
LIVE_SECTIONS = ("partitions", "limits", "log", "auth", "replay", "shutdown")


class Gateway:
    """The process: signals, startup, and the instance once it serves."""

    def __init__(
        self, config: Config, *, config_path: Path | None = None, notifier: Notifier | None = None
    ) -> None:
        self.config_path = config_path
        self._initial = config
        self.notifier = notifier or Notifier()
        # None while starting: signals then stop the start instead of draining.
        self.instance: Instance | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self._initial
        auth, tls = _check_startup(config)
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
                ctx = await _start_infrastructure(infra, config, auth, zk, paths, metrics)
                instance = Instance(ctx, tls, self.notifier, self.config_path)
                self.instance = instance
                await instance.run(ready=functools.partial(task_status.started, self))
                infra.cancel_scope.cancel()
        log.info("gateway_stopped")

    async def _listen_signals(
        self, signals: AsyncIterator[int], startup_scope: trio.CancelScope
    ) -> None:
        """SIGTERM/SIGINT: drain (during startup: stop); again: exit at once. SIGHUP: reload."""
        async for signum in signals:
            name = signal.Signals(signum).name
            instance = self.instance
            if instance is None or not instance.ready:
                if signum == signal.SIGHUP:
                    log.info("reload_ignored_while_starting")
                    continue
                log.info("stopped_while_starting", extra={"signal": name})
                startup_scope.cancel()
                return
            if signum == signal.SIGHUP:
                await instance.reload()
            elif instance.drain_requested:
                log.warning("second_stop_signal", extra={"signal": name})
                os._exit(1)
            else:
                instance.request_drain(name)


def _check_startup(config: Config) -> tuple[Authenticator, ListenerTLS]:
    """Refuse to start insecurely; load keys and certificates before binding anything."""
    problems = auth_exposure_problems(config, config)
    if problems:
        raise StartupError("; ".join(problems))
    log_auth_warnings(config)
    try:
        auth = Authenticator(config.auth)
    except (OSError, KeyFileError) as exc:
        raise StartupError(f"auth.jwt_secret_file: cannot use the key: {exc}") from None
    try:
        tls = ListenerTLS(config)
    except TLSFilesError as exc:
        raise StartupError(str(exc)) from None
    return auth, tls


async def _start_infrastructure(
    infra: trio.Nursery,
    config: Config,
    auth: Authenticator,
    zk: ZooKeeper,
    paths: ZkPaths,
    metrics: Metrics,
) -> Context:
    """ZooKeeper, the cluster's records, topics, producer, fetcher and ownership cache."""
    try:
        await infra.start(zk.run)
    except ZooKeeperUnavailable as exc:
        raise StartupError(f"zookeeper.hosts: {exc}") from None
    metrics.zk_connected.set(1)
    try:
        await ensure_cluster(zk, paths, config)
    except ZooKeeperError as exc:
        raise StartupError(f"zookeeper.hosts: {exc}") from None
    admin = KafkaAdmin(config.kafka.bootstrap_servers)
    await _ensure_topics(admin, config)
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
    return Context(
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
        # Threads blocked in the replay readers' calls (a probe and a scan
        # per partition may poll at once, as after a failover).
        consumer_limiter=trio.CapacityLimiter(config.cluster.partitions + 16),
        draining=trio.Event(),
    )


async def ensure_cluster(zk: ZooKeeperClient, paths: ZkPaths, config: Config) -> None:
    """Record the partition count on first start; refuse a different one later.

    Read first: a fleet restarting together then costs the ensemble reads, not
    a failed create per instance. The instance that creates the cluster also
    creates the partitions' parent nodes, so that no lease transaction fails
    for want of one.
    """
    partitions = config.cluster.partitions
    doc = {
        "partitions": partitions,
        "created_by": config.instance.id,
        "created_at_ms": int(time.time() * 1000),
    }
    try:
        data, _stat = await zk.get(paths.meta)
    except NoNodeError:
        try:
            await zk.create(paths.meta, json.dumps(doc).encode(), makepath=True)
        except NodeExistsError:
            data, _stat = await zk.get(paths.meta)
        else:
            log.info(
                "cluster_created", extra={"cluster": config.cluster.name, "partitions": partitions}
            )
            await zk.ensure_path(paths.partitions)
            await _create_partition_nodes(zk, paths, partitions)
            return
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


# Parent nodes created per transaction when a cluster is created.
_PARENTS_PER_TRANSACTION = 512


async def _create_partition_nodes(zk: ZooKeeperClient, paths: ZkPaths, partitions: int) -> None:
    for start in range(0, partitions, _PARENTS_PER_TRANSACTION):
        batch = range(start, min(partitions, start + _PARENTS_PER_TRANSACTION))
        try:
            await zk.multi([Create(paths.partition(k)) for k in batch])
        except NodeExistsError:
            # Some exist already (an earlier attempt got this far): one by one.
            for k in batch:
                await zk.ensure_path(paths.partition(k))


async def _ensure_topics(admin: KafkaAdmin, config: Config) -> None:
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


class Instance:
    """A serving instance: partitions, listeners, balancer, readiness; drain and reload."""

    def __init__(
        self, ctx: Context, tls: ListenerTLS, notifier: Notifier, config_path: Path | None
    ) -> None:
        self.ctx = ctx
        self.tls = tls
        self.notifier = notifier
        self.config_path = config_path
        self.supervisor = PartitionSupervisor(ctx)
        self.balancer = Balancer(ctx, self.supervisor)
        self.connections = ConnectionCounter()
        self.kafka_ok = AsyncValue(True)  # the topics were just checked
        self._drain_requested = trio.Event()
        self._drain_reason = ""
        self._ready = trio.Event()
        self._started_at = time.time()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def drain_requested(self) -> bool:
        return self._drain_requested.is_set()

    async def run(self, *, ready: Callable[[], object] = lambda: None) -> None:
        """Serve until drained; ``ready()`` once every listener is bound and the balancer runs."""
        ctx = self.ctx
        config = ctx.config.value
        async with trio.open_nursery() as serving:
            await serving.start(self.supervisor.run)
            # Passed only when configured, so that serve_http needs the
            # parameter only once TLS can be configured.
            http_options: dict[str, Any] = {}
            http_context = self.tls.context("http")
            if http_context is not None:
                http_options["ssl_context"] = http_context
            http_binds = await serving.start(
                functools.partial(
                    serve_http, HttpApi(ctx, self), str(config.http.listen), **http_options
                )
            )
            ws_port = await serving.start(self._serve_websocket, config)
            await serving.start(self.balancer.run)
            serving.start_soon(self._monitor)
            serving.start_soon(self._watchdog)
            log.info(
                "gateway_ready",
                extra={
                    "http": http_binds,
                    "ws_port": ws_port,
                    "tls": self.tls.sections,
                    "cluster": config.cluster.name,
                    "partitions": config.cluster.partitions,
                },
            )
            self.notifier.ready(f"serving cluster {config.cluster.name}")
            self._ready.set()
            ready()
            await self._drain_requested.wait()
            await self._drain(serving)

    async def _serve_websocket(self, config: Config, *, task_status: trio.TaskStatus[int]) -> None:
        await websocket.serve(
            self._on_handshake,
            config.websocket.listen.host,
            config.websocket.listen.port,
            ssl_context=self.tls.context("websocket"),
            max_message_bytes=config.limits.max_frame_bytes,
            handshake_timeout_s=config.websocket.handshake_timeout_s,
            task_status=task_status,
        )

    # -- readiness and status -------------------------------------------------

    async def _monitor(self) -> None:
        ctx = self.ctx
        metrics = ctx.metrics
        while True:
            metrics.zk_connected.set(1 if ctx.zk.connected else 0)
            try:
                await ctx.admin.check(timeout_s=KAFKA_CHECK_INTERVAL_S)
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
            "zookeeper": ctx.zk.connected,
            "kafka": self.kafka_ok.value,
            "accepting": not ctx.draining.is_set(),
        }

    def status(self) -> dict[str, Any]:
        ctx = self.ctx
        partitions = []
        # Only partitions that serve: a lease still starting would answer 421.
        for runtime in (r for r in self.supervisor.runtimes() if r.serving):
            try:
                _low, high = runtime.cached_watermarks()
                lag: int | None = max(0, high - runtime.next_offset)
            except KafkaUnavailable:
                lag = None
            partitions.append(
                {
                    "partition": runtime.partition,
                    "epoch": runtime.epoch,
                    "since": runtime.serving_since,
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
            "target": self.balancer.target(),
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
            await hs.reject(500, {"error": "internal"})

    async def _handshake(self, hs: websocket.Handshake) -> None:
        ctx, sup = self.ctx, self.supervisor
        config = ctx.config.value
        metrics = ctx.metrics

        def owner_url(k: int) -> str | None:
            owner = ctx.cache.owner(k)
            if owner is None or owner.instance == ctx.info.instance:
                return None
            return owner.info.ws_url

        decision = admit(
            UpgradeRequest(hs.path, hs.query, hs.headers.get("origin"), hs.remote),
            config=config,
            auth=ctx.auth.value,
            draining=ctx.draining.is_set(),
            serving=sup.runtime,
            owner_url=owner_url,
            connections=self.connections,
            new_device_id=new_device_id,
        )
        if isinstance(decision, Refusal):
            metrics.handshakes.labels(decision.error).inc()
            # The query string only with its token redacted; no headers.
            log.debug(
                "handshake_rejected",
                extra={
                    "remote": hs.remote,
                    "status": decision.status,
                    "error": decision.error,
                    "query": websocket.redact_query(hs.query),
                },
            )
            headers = (
                {"Retry-After": str(decision.retry_after_s)} if decision.retry_after_s else None
            )
            await hs.reject(decision.status, {"error": decision.error, **decision.extra}, headers)
            return
        # Counted from before the first await: concurrent handshakes cannot all
        # pass the checks above and then all be accepted. The session releases
        # it when it ends.
        release = self.connections.add(decision.address)
        try:
            conn = await hs.accept()
            metrics.handshakes.labels("accepted").inc()
            session = Session(
                conn=conn,
                params=decision.params,
                identity=decision.identity,
                partition=decision.partition,
                ctx=ctx,
                on_end=release,
            )
            if not decision.runtime.serve(session):
                # The partition stopped while we accepted: the client asks again.
                await conn.close(CloseCode.MOVED, "partition moved")
                await conn.aclose()
                release()
                return
        except BaseException:
            release()
            raise
        # The session's task, in the partition's nursery, owns the socket now.
        hs.detach()

    # -- drain and reload ---------------------------------------------------------

    def request_drain(self, reason: str) -> None:
        if not self._drain_requested.is_set():
            self._drain_reason = reason
            self._drain_requested.set()

    async def _drain(self, serving: trio.Nursery) -> None:
        """Staged shutdown: refuse new sockets, hand partitions over, then stop."""
        ctx, balancer = self.ctx, self.balancer
        grace = ctx.config.value.shutdown.grace_period_s
        self.notifier.stopping()
        log.info("drain_started", extra={"reason": self._drain_reason, "grace_period_s": grace})
        started = trio.current_time()
        configured = ctx.config.value.shutdown.drain_stagger_s
        held = len(self.supervisor.held())
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
                extra={"left": len(self.supervisor.held())},
            )
        log.info("drain_finished", extra={"seconds": round(trio.current_time() - started, 3)})
        serving.cancel_scope.cancel()

    async def reload(self) -> bool:
        """Apply a re-read configuration; keep the running one if the file is invalid."""
        ctx = self.ctx
        if self.config_path is None:
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
            for problem in self.tls.reload(new):
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
            self.balancer.reconfigure()
            log.info(
                "reload_applied",
                extra={"changed": [s for s in LIVE_SECTIONS if getattr(old, s) != getattr(new, s)]},
            )
            return True
        finally:
            self.notifier.ready()


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
