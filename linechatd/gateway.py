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

import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from trio_util import AsyncValue

from . import logs, serverapi, websocket
from .admission import ConnectionCounter, Refusal, UpgradeRequest, address_key, admit
from .auth import Authenticator, KeyFileError
from .balancer import Balancer, DuplicateInstanceError, drain_stagger
from .config import Config, ConfigError, Reload, load_config, reload_of
from .context import Context
from .http import HttpApi, Role, serve_http
from .kafka import GroupOffsetsPool, KafkaAdmin, KafkaFetcher, KafkaProducer, KafkaUnavailable
from .keyedrate import KeyedRateLimiter
from .listeners import UnfinishedRequests
from .metrics import Metrics
from .ownership import ROOT, InstanceInfo, OwnershipCache, ZkPaths
from .partitions import PartitionSupervisor
from .protocol import CloseCode, new_device_id
from .sdnotify import Notifier
from .session import Session
from .startup import (
    EXIT_CONFIG,
    ConfigurationError,
    StartupError,
    auth_exposure_problems,
    config_findings,
    log_auth_warnings,
    startup_error,
)
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
T = TypeVar("T")

KAFKA_CHECK_INTERVAL_S = 2.0
# Between attempts to reach ZooKeeper or Kafka at startup, doubling.
STARTUP_RETRY_MIN_S = 1.0
STARTUP_RETRY_MAX_S = 15.0
# A send that failed for want of the broker keeps the instance unready this long.
KAFKA_FAILURE_MEMORY_S = 5.0
# Addresses (and uids) whose handshake (resume) rate is remembered at once; see keyedrate.
RATE_KEYS = 65536
# How much longer than the grace period a drain may take (the last partition's
# hand-over, closing the listeners): what EXTEND_TIMEOUT_USEC asks systemd for.
DRAIN_STOP_MARGIN_S = 15.0
# Past the session timeout, how long a start waits for its instance id to be
# free before it counts as taken by another live instance.
CLAIM_MARGIN_S = 5.0


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
        paths = ZkPaths(config.cluster.name)
        metrics = Metrics()
        # Signals are ours from the first moment: a stop during startup is a
        # clean exit, not the default action's death.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as infra:
                infra.start_soon(self._listen_signals, signals, infra.cancel_scope)
                ctx = await _start_infrastructure(
                    infra, config, auth, paths, metrics, self.notifier
                )
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


def load_server_key(config: Config) -> bytes | None:
    """The server API's key, or None when it is off; StartupError names the key if unusable."""
    path = config.server_api.key_file
    if path is None:
        return None
    try:
        return serverapi.load_server_key(path)
    except (OSError, serverapi.ServerKeyError) as exc:
        raise StartupError(f"server_api.key_file: {exc}") from None


def _check_startup(config: Config) -> tuple[Authenticator, ListenerTLS]:
    """Refuse to start insecurely; load keys and certificates before binding anything."""
    findings = config_findings(config)
    if findings.errors:
        raise ConfigurationError("; ".join(findings.errors))
    for warning in findings.warnings:
        log.warning("config_warning", extra={"problem": warning})
    log_auth_warnings(config)
    try:
        auth = Authenticator(config.auth)
    except (OSError, KeyFileError) as exc:
        raise ConfigurationError(f"auth.jwt_secret_file: cannot use the key: {exc}") from None
    try:
        tls = ListenerTLS(config)
    except TLSFilesError as exc:
        raise ConfigurationError(str(exc)) from None
    load_server_key(config)
    return auth, tls


async def _until_reachable(
    what: str, attempt: Callable[[], Awaitable[T]], notifier: Notifier, attempt_s: float
) -> T:
    """``attempt()`` until it stops failing for want of ``what`` (logged; systemd kept waiting).

    A dependency that is down when an instance starts is an outage to wait
    out, not a configuration error: the instance keeps trying, not ready.
    """
    delay = STARTUP_RETRY_MIN_S
    while True:
        try:
            return await attempt()
        except (ZooKeeperUnavailable, KafkaUnavailable) as exc:
            log.warning(
                "startup_waiting", extra={"for": what, "error": str(exc), "retry_in_s": delay}
            )
            # Each attempt may take attempt_s; systemd's start timeout must not run out meanwhile.
            notifier.notify(
                f"EXTEND_TIMEOUT_USEC={int((delay + attempt_s + 5) * 1e6)}",
                f"STATUS=waiting for {what}: {exc}",
            )
            await trio.sleep(delay)
            delay = min(STARTUP_RETRY_MAX_S, delay * 2)


async def _start_infrastructure(
    infra: trio.Nursery,
    config: Config,
    auth: Authenticator,
    paths: ZkPaths,
    metrics: Metrics,
    notifier: Notifier,
) -> Context:
    """ZooKeeper, the cluster's records, topics, producer, fetcher and ownership cache."""

    async def connect_zookeeper() -> ZooKeeper:
        zk = ZooKeeper(
            config.zookeeper.hosts,
            session_timeout_s=config.zookeeper.session_timeout_s,
            connect_timeout_s=config.zookeeper.connect_timeout_s,
        )
        await infra.start(zk.run)
        return zk

    zk_wait = config.zookeeper.connect_timeout_s
    zk = await _until_reachable("zookeeper", connect_zookeeper, notifier, zk_wait)
    metrics.zk_connected.set(1)
    metrics.describe(config)

    async def cluster_recorded() -> None:
        try:
            await ensure_cluster(zk, paths, config)
        except ZooKeeperError as exc:
            raise ZooKeeperUnavailable(str(exc)) from None

    await _until_reachable("zookeeper", cluster_recorded, notifier, zk_wait)
    admin = KafkaAdmin(config.kafka.bootstrap_servers)
    await _until_reachable(
        "kafka", functools.partial(_ensure_topics, admin, config), notifier, 30.0
    )
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
    cache = OwnershipCache(zk, paths, config.cluster.partitions, instance=config.instance.id)
    await infra.start(cache.run)
    # Threads blocked in the group offsets' and replay readers' librdkafka
    # calls (a probe and a scan per partition may poll at once, as after a
    # failover, besides a commit).
    consumer_limiter = trio.CapacityLimiter(2 * config.cluster.partitions + 16)
    offsets = GroupOffsetsPool(
        config.kafka.bootstrap_servers,
        config.kafka.group_prefix,
        config.kafka.topic_prefix,
        limiter=consumer_limiter,
    )
    await infra.start(offsets.run)
    info = InstanceInfo(
        config.instance.id,
        config.websocket.advertise,
        config.http.advertise,
        admin_url=config.admin_url,
    )
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
        offsets=offsets,
        metrics=metrics,
        consumer_limiter=consumer_limiter,
        draining=trio.Event(),
    )


def _kafka_naming(config: Config) -> dict[str, str]:
    """What this cluster's topics and groups are called, recorded in its meta node."""
    return {
        "bootstrap_servers": config.kafka.bootstrap_servers,
        "topic_prefix": config.kafka.topic_prefix,
        "group_prefix": config.kafka.group_prefix,
    }


async def ensure_cluster(zk: ZooKeeperClient, paths: ZkPaths, config: Config) -> None:
    """Record the partition count on first start; refuse a different one later.

    Read first: a fleet restarting together then costs the ensemble reads, not
    a failed create per instance. The instance that creates the cluster also
    creates the partitions' parent nodes, so that no lease transaction fails
    for want of one.
    """
    # Before recording anything: a refused newcomer must not leave a record
    # that would then refuse the cluster it collided with.
    await _refuse_shared_topics(zk, paths, config)
    partitions = config.cluster.partitions
    doc = {
        "partitions": partitions,
        "created_by": config.instance.id,
        "created_at_ms": int(time.time() * 1000),
        "kafka": _kafka_naming(config),
    }
    try:
        data, stat = await zk.get(paths.meta)
    except NoNodeError:
        try:
            await zk.create(paths.meta, json.dumps(doc).encode(), makepath=True)
        except NodeExistsError:
            data, stat = await zk.get(paths.meta)
        else:
            log.info(
                "cluster_created", extra={"cluster": config.cluster.name, "partitions": partitions}
            )
            await zk.ensure_path(paths.partitions)
            await _create_partition_nodes(zk, paths, partitions)
            return
    try:
        recorded_doc = json.loads(data)
        recorded = int(recorded_doc["partitions"])
    except (ValueError, KeyError, TypeError):
        raise StartupError(
            f"{paths.meta} in ZooKeeper holds no partition count: {data[:100]!r}"
        ) from None
    if recorded != partitions:
        raise ConfigurationError(
            f"cluster.partitions: this instance is configured with {partitions} partitions, "
            f"but cluster {config.cluster.name!r} was created with {recorded}; "
            f"set cluster.partitions = {recorded} (the count is fixed for a cluster's lifetime)"
        ) from None
    if recorded_doc.get("kafka") != _kafka_naming(config):
        # The names as of now (the first start after an upgrade, or a
        # deliberate change of prefixes): what other clusters compare with.
        recorded_doc["kafka"] = _kafka_naming(config)
        try:
            await zk.set(paths.meta, json.dumps(recorded_doc).encode(), version=stat.version)
        except ZooKeeperError:
            pass  # another instance updated it meanwhile
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


def _brokers(bootstrap: str) -> set[str]:
    return {item.lower() for item in bootstrap.split(",")}


async def _refuse_shared_topics(zk: ZooKeeperClient, paths: ZkPaths, config: Config) -> None:
    """Two clusters on one Kafka with the same topic names would read each other's messages."""
    try:
        clusters = await zk.get_children(ROOT)
    except NoNodeError:
        return
    mine = _kafka_naming(config)
    for other in sorted(clusters):
        if other == config.cluster.name:
            continue
        try:
            data, _stat = await zk.get(ZkPaths(other).meta)
            naming = json.loads(data).get("kafka")
        except (NoNodeError, ValueError, AttributeError):
            continue
        if not isinstance(naming, dict):
            continue  # recorded by a version that did not record names
        same_kafka = _brokers(str(naming.get("bootstrap_servers", ""))) & _brokers(
            mine["bootstrap_servers"]
        )
        if same_kafka and (
            naming.get("topic_prefix") == mine["topic_prefix"]
            or naming.get("group_prefix") == mine["group_prefix"]
        ):
            raise ConfigurationError(
                f"kafka.topic_prefix: cluster {other!r} uses the same Kafka "
                f"({', '.join(sorted(same_kafka))}) with the same topic or group names "
                f"({mine['topic_prefix']}k, {mine['group_prefix']}k): the two clusters would "
                'read each other\'s messages; set topic_prefix = "{cluster}-topic-" and '
                'group_prefix = "{cluster}-consumer-group-" (or delete '
                f"{ZkPaths(other).root} in ZooKeeper if that cluster is gone)"
            )


async def _ensure_topics(admin: KafkaAdmin, config: Config) -> None:
    """Create the partitions' topics (or check the broker answers); KafkaUnavailable if it does not."""
    topics = [f"{config.kafka.topic_prefix}{k}" for k in range(config.cluster.partitions)]
    if config.kafka.create_topics:
        created = await admin.ensure_topics(
            topics,
            replication_factor=config.kafka.replication_factor,
            topic_config=_topic_config(config),
        )
        if created:
            log.info("topics_created", extra={"count": len(created)})
    else:
        await admin.check()


def _topic_config(config: Config) -> dict[str, str]:
    """Settings of the topics this instance creates (unset keys: the broker's defaults)."""
    settings = {}
    if config.kafka.min_insync_replicas is not None:
        settings["min.insync.replicas"] = str(config.kafka.min_insync_replicas)
    if config.kafka.topic_retention_s is not None:
        settings["retention.ms"] = str(int(config.kafka.topic_retention_s * 1000))
    return settings


class Instance:
    """A serving instance: partitions, listeners, balancer, readiness; drain and reload."""

    def __init__(
        self, ctx: Context, tls: ListenerTLS, notifier: Notifier, config_path: Path | None
    ) -> None:
        self.ctx = ctx
        self.tls = tls
        self.notifier = notifier
        self.config_path = config_path
        # Whether the instance can use the broker: its registration publishes
        # it to the others, and the balancer gives no partitions to an
        # instance that cannot.
        self.kafka_healthy = AsyncValue(True)
        self.supervisor = PartitionSupervisor(ctx, self.kafka_healthy)
        self.balancer = Balancer(ctx, self.supervisor)
        self.connections = ConnectionCounter()
        self.server_api = serverapi.ServerApi(ctx, self.supervisor.runtime)
        # Checked before anything was started; replaced by a reload.
        self.server_key = load_server_key(ctx.config.value)
        # The broker answered the last metadata probe (the topics were just checked).
        self._kafka_probe_ok = True
        limits, replay = ctx.config.value.limits, ctx.config.value.replay
        self.handshake_rate = KeyedRateLimiter(
            limits.handshakes_per_second_per_address,
            limits.handshake_burst_per_address,
            max_keys=RATE_KEYS,
        )
        self.resume_rate = KeyedRateLimiter(
            replay.resumes_per_minute_per_uid / 60,
            replay.resume_burst_per_uid,
            max_keys=RATE_KEYS,
        )
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
        try:
            await self.balancer.claim_registration(
                wait_s=config.zookeeper.session_timeout_s + CLAIM_MARGIN_S
            )
        except DuplicateInstanceError as exc:
            raise ConfigurationError(str(exc)) from None
        async with trio.open_nursery() as serving:
            await serving.start(self.supervisor.run)
            # Passed only when configured, so that serve_http needs the
            # parameter only once TLS can be configured.
            http_options: dict[str, Any] = {}
            http_context = self.tls.context("http")
            if http_context is not None:
                http_options["ssl_context"] = http_context
            separate_admin = config.admin.listen is not None
            http_binds = await serving.start(
                functools.partial(
                    serve_http,
                    HttpApi(ctx, self, role=Role.PUBLIC if separate_admin else Role.BOTH),
                    config.http.listen,
                    unfinished=self._unfinished_requests(config),
                    **http_options,
                )
            )
            admin_binds: list[str] = []
            if config.admin.listen is not None:
                admin_binds = await serving.start(
                    functools.partial(
                        serve_http,
                        HttpApi(ctx, self, role=Role.ADMIN),
                        config.admin.listen,
                        unfinished=self._unfinished_requests(config),
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
                    **({"admin": admin_binds} if admin_binds else {}),
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

    def _unfinished_requests(self, config: Config) -> UnfinishedRequests:
        """An HTTP listener's caps on requests still arriving: the WebSocket
        listener's numbers, counted per listener."""
        ws = config.websocket
        return UnfinishedRequests(
            ws.max_unfinished_handshakes,
            ws.max_unfinished_handshakes_per_address,
            address_key=address_key,
            on_refused=self.ctx.metrics.http_unfinished_refused.inc,
        )

    async def _serve_websocket(self, config: Config, *, task_status: trio.TaskStatus[int]) -> None:
        ws = config.websocket
        refused = self.ctx.metrics.handshakes.labels("too_many_unfinished")
        await websocket.serve(
            self._on_handshake,
            ws.listen.host,
            ws.listen.port,
            ssl_context=self.tls.context("websocket"),
            max_message_bytes=config.limits.max_frame_bytes,
            handshake_timeout_s=ws.handshake_timeout_s,
            partial_message_timeout_s=config.limits.partial_message_timeout_s,
            unfinished=UnfinishedRequests(
                ws.max_unfinished_handshakes,
                ws.max_unfinished_handshakes_per_address,
                address_key=address_key,
                on_refused=refused.inc,
            ),
            keepalive=websocket.TcpKeepalive(
                ws.tcp_keepalive_idle_s,
                ws.tcp_keepalive_interval_s,
                ws.tcp_keepalive_count,
                ws.tcp_user_timeout_s,
            ),
            task_status=task_status,
        )

    # -- readiness and status -------------------------------------------------

    @property
    def kafka_ok(self) -> bool:
        """The broker answers metadata requests and no send failed for want of it lately."""
        since_failure = trio.current_time() - self.ctx.producer.last_unreachable
        return self._kafka_probe_ok and since_failure > KAFKA_FAILURE_MEMORY_S

    async def _monitor(self) -> None:
        ctx = self.ctx
        metrics = ctx.metrics
        while True:
            metrics.zk_connected.set(1 if ctx.zk.connected else 0)
            metrics.view_publisher.set(1 if ctx.cache.publisher.elected.value else 0)
            metrics.view_entries_read.set(ctx.cache.follower.entries_read)
            try:
                await ctx.admin.check(timeout_s=KAFKA_CHECK_INTERVAL_S)
                self._kafka_probe_ok = True
            except KafkaUnavailable:
                self._kafka_probe_ok = False
            ok = self.kafka_ok
            if ok != self.kafka_healthy.value:
                log.warning("kafka_reachability", extra={"reachable": ok})
            self.kafka_healthy.value = ok
            metrics.kafka_ready.set(1 if ok else 0)
            metrics.producer_replacements.set(ctx.producer.replacements)
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
            "kafka": self.kafka_ok,
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
            "kafka": self.kafka_ok,
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

        now = trio.current_time()
        self._follow_rate_limits(config)
        decision = admit(
            UpgradeRequest(hs.path, hs.query, hs.headers.get("origin"), hs.remote),
            config=config,
            auth=ctx.auth.value,
            draining=ctx.draining.is_set(),
            serving=sup.runtime,
            owner_url=owner_url,
            connections=self.connections,
            new_device_id=new_device_id,
            handshake_wait=lambda address: self.handshake_rate.acquire(address, now),
            resume_wait=lambda uid: self.resume_rate.acquire(uid, now),
            page_urls=lambda: (o.info.http_url for o in ctx.cache.snapshot() if o is not None),
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
        # the connection when it ends; the device slot becomes the session's
        # own when the partition registers it.
        runtime, uid = decision.runtime, decision.params.uid
        release = self.connections.add(decision.address)
        release_device = runtime.reserve_device(uid)
        try:
            conn = await hs.accept()
            metrics.handshakes_accepted.inc()
            session = Session(
                conn=conn,
                params=decision.params,
                identity=decision.identity,
                partition=decision.partition,
                ctx=ctx,
                send_bucket=runtime.send_buckets.bucket(uid, trio.current_time()),
                on_end=release,
            )
            release_device()
            if not runtime.serve(session):
                # The partition stopped while we accepted: the client asks again.
                await conn.close(CloseCode.MOVED, "partition moved")
                await conn.aclose()
                release()
                return
        except BaseException:
            release_device()
            release()
            raise
        # The session's task, in the partition's nursery, owns the socket now.
        hs.detach()

    def _follow_rate_limits(self, config: Config) -> None:
        """The rate limiters take the configuration as it is now (a reload may change it)."""
        limits, replay = config.limits, config.replay
        self.handshake_rate.reconfigure(
            limits.handshakes_per_second_per_address, limits.handshake_burst_per_address
        )
        self.resume_rate.reconfigure(
            replay.resumes_per_minute_per_uid / 60, replay.resume_burst_per_uid
        )

    # -- drain and reload ---------------------------------------------------------

    def request_drain(self, reason: str) -> None:
        if not self._drain_requested.is_set():
            self._drain_reason = reason
            self._drain_requested.set()

    async def _drain(self, serving: trio.Nursery) -> None:
        """Staged shutdown: refuse new sockets, hand partitions over, then stop."""
        ctx, balancer = self.ctx, self.balancer
        grace = ctx.config.value.shutdown.grace_period_s
        # systemd's stop timeout follows the grace period, whatever TimeoutStopSec says.
        self.notifier.stopping(extend_s=grace + DRAIN_STOP_MARGIN_S)
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
        """Apply a re-read configuration; keep the running one if the file is invalid.

        Every changed key is logged with what happened to it: applied, or
        needing a restart (RELOAD in config.py says which).
        """
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
            # Independent of the rest: a renewed certificate applies even if
            # another part of the reload is refused.
            for problem in self.tls.reload(new):
                log.error("reload_tls_failed", extra={"problem": problem})
            findings = config_findings(new)
            # The listeners keep their running addresses until a restart.
            applied = old.with_live_keys_of(new)
            problems = [*findings.errors, *auth_exposure_problems(applied, old)]
            for problem in problems:
                log.error("reload_rejected", extra={"problem": problem})
            if problems:
                return False
            for warning in findings.warnings:
                log.warning("config_warning", extra={"problem": warning})
            try:
                auth = Authenticator(applied.auth)
            except (OSError, ValueError) as exc:
                log.error(
                    "reload_rejected",
                    extra={"problem": f"auth.jwt_secret_file: cannot use the key: {exc}"},
                )
                return False
            try:
                # Read again even when the path is the same: the key may be rotated in place.
                server_key = load_server_key(applied)
            except StartupError as exc:
                log.error("reload_rejected", extra={"problem": str(exc)})
                return False
            changed = old.changed_keys(new)
            for key in changed:
                if reload_of(key) is Reload.LIVE:
                    log.info("reload_key_applied", extra={"key": key})
                else:
                    log.warning("reload_needs_restart", extra={"key": key})
            if applied.auth != old.auth:
                log_auth_warnings(applied)
            ctx.auth.value = auth
            self.server_key = server_key
            ctx.config.value = applied
            if applied.log != old.log:
                logs.configure(
                    level=applied.log.level, fmt=applied.log.format, instance=applied.instance.id
                )
            self.balancer.reconfigure()
            log.info(
                "reload_applied",
                extra={"changed": [k for k in changed if reload_of(k) is Reload.LIVE]},
            )
            return True
        finally:
            self.notifier.ready()


async def run_from_config(path: Path) -> int:
    """``linechatd run``: 0 after a clean drain, EXIT_CONFIG when the configuration
    is at fault (the unit does not restart then), 1 when the instance cannot start
    for another reason."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
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
        return EXIT_CONFIG if isinstance(startup, ConfigurationError) else 1
    return 0
