"""Partition subtrees: one nursery per held lease, and the supervisor that owns them.

    partitions (PartitionSupervisor.run)
    └── partition k (PartitionRuntime.run: its own cancel scope)
        ├── lease watch   returns when the lease ends -> cancels this subtree
        ├── feed          topic-k, assigned to the instance's fetcher -> bounded feed
        ├── delivery      each record -> the sessions of its recipient
        ├── committer     the next owner's starting point (a hint)
        ├── replay hub    shared reads for resuming sessions (replay.py)
        └── sessions      the sockets of k's users (closed with 1012)

A lease is taken by creating the ephemeral node ``partitions/<k>/owner``; the
subtree starts only once that node is ours and runs only while it exists and
the session that created it can be trusted (zk.py decides when it cannot: on
SUSPENDED, early enough that the server has not yet expired the session).
Whatever ends a lease, the subtree's cancel scope is cancelled with the reason,
and nothing outside the subtree notices.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import trio
from trio_util import AsyncValue

from .kafka import CommitsPaused, KafkaUnavailable, Record, TopicFeed
from .keyedcount import KeyedCounter
from .membership import Lease
from .protocol import RecordError, decode_record, message_frame
from .ratelimit import UidBuckets
from .registrar import Registrar
from .replay import ReplayHub
from .zk import NodeStat, NoNodeError, SessionState, ZooKeeperError

if TYPE_CHECKING:
    from .context import Context
    from .session import Session

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 1.0
# How often an idle sweep looks at the configuration again while idle
# timeouts are off.
IDLE_SWEEP_OFF_S = 30.0


class PartitionState(enum.Enum):
    """A partition subtree's lifecycle: STARTING -> SERVING -> STOPPING -> STOPPED.

    STARTING may go straight to STOPPING (the lease ended, or Kafka failed,
    before the subtree served). Only a SERVING partition takes sessions.
    """

    STARTING = "starting"  # lease taken: start offset, assignment, lease confirmation
    SERVING = "serving"  # delivering and accepting its users' sockets
    STOPPING = "stopping"  # cancelled: sockets closing (1012), last commit, lease given back
    STOPPED = "stopped"


class EndReason(enum.Enum):
    """Why a partition subtree ended; it decides whether the subtree may still write."""

    RELEASED = "released"  # the balancer gave it away: commit, then delete the lease
    DRAIN = "drain"  # the instance is draining: the same
    SHUTDOWN = "shutdown"  # the process stops (after a drain ran out of time)
    FAILED = "failed"  # a bug or a fatal consumer error: hand the lease back, retry later
    KAFKA_UNAVAILABLE = "kafka_unavailable"  # the broker could not be used: hand the lease back
    KAFKA_UNREACHABLE = "kafka_unreachable"  # given up to an instance that can reach the broker
    LEASE_LOST = "lease_lost"  # the lock node is gone or belongs to another epoch
    ZOOKEEPER_SESSION = "zookeeper_session"  # suspended or expired: assume the lease lost

    @property
    def graceful(self) -> bool:
        """May the ending subtree still write (a last commit, deleting its lease node)?

        Only while the lease is still known to be ours; once it may belong to
        someone else, nothing of this subtree writes anything.
        """
        return self not in (EndReason.LEASE_LOST, EndReason.ZOOKEEPER_SESSION)


class EndedBeforeStart(Exception):
    """The lease ended (or was given back) while the subtree was starting."""


class PartitionRuntime:
    """Everything this instance runs for partition ``partition`` under one lease."""

    def __init__(
        self, partition: int, epoch: int, ctx: Context, *, generation: int, registrar: Registrar
    ) -> None:
        self.partition = partition
        self.epoch = epoch
        self.generation = generation  # the ZooKeeper session that holds the lease
        self._registrar = registrar
        self.state = AsyncValue(PartitionState.STARTING)
        self.end_reason: EndReason | None = None
        self.gives_back = True  # a graceful end deletes the lease node (see stop())
        self.serving_since: float | None = None  # wall clock, once SERVING
        self._ctx = ctx
        self.topic = ctx.topic(partition)
        self.group = ctx.group(partition)
        # Resumes share its reads (one scan for a reconnect storm, not one consumer each).
        self.replay_hub = ReplayHub(ctx, partition)
        self.sessions: dict[str, set[Session]] = {}
        # Device slots held by handshakes between admission and serve().
        self._reserved: KeyedCounter[str] = KeyedCounter()
        limits = ctx.config.value.limits
        # One send allowance per uid, shared by its devices and kept across reconnects.
        self.send_buckets = UidBuckets(limits.sends_per_second, limits.send_burst)
        self.next_offset = 0  # the offset after the last one delivered
        self._committed = -1
        # The group's offsets (consumer-group-k): read at start, committed while held.
        self._offsets = ctx.offsets.of(partition)
        self._scope = trio.CancelScope()
        # Open exactly while SERVING: sessions are started in it (see serve()).
        self._nursery: trio.Nursery | None = None
        # This partition's share of the instance's fetcher, while assigned.
        self._feed: TopicFeed | None = None

    def __repr__(self) -> str:
        return f"<PartitionRuntime {self.partition} epoch={self.epoch} {self.state.value.value}>"

    @property
    def serving(self) -> bool:
        return self.state.value is PartitionState.SERVING

    @property
    def session_count(self) -> int:
        return sum(len(s) for s in self.sessions.values())

    def stop(self, reason: EndReason, *, give_back: bool = True) -> None:
        """End this subtree (the first reason given wins); returns at once.

        ``give_back=False``: a graceful end leaves the lease node to the caller,
        which gives several back in one transaction once they all stopped.
        """
        if self.end_reason is None:
            self.gives_back = give_back
        self._stopping(reason)
        self._scope.cancel(reason=f"partition {self.partition}: {reason.value}")

    def _stopping(self, reason: EndReason) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if self.state.value in (PartitionState.STARTING, PartitionState.SERVING):
            self.state.value = PartitionState.STOPPING

    # -- sessions -----------------------------------------------------------

    def serve(self, session: Session) -> bool:
        """Register ``session``, fix its live split and start it here; False unless SERVING.

        This is the one deliberate nursery hand-off: a socket belongs to its
        partition, so losing the lease closes it, whoever accepted it. All in
        one step, with no checkpoint: every record below ``next_offset`` was
        offered to sessions before this one existed, every later one will be
        offered to it.
        """
        nursery = self._nursery
        if self.state.value is not PartitionState.SERVING or nursery is None:
            return False
        self.sessions.setdefault(session.uid, set()).add(session)
        session.join(self.next_offset)
        nursery.start_soon(session.run, self)
        return True

    def leave(self, session: Session) -> None:
        devices = self.sessions.get(session.uid)
        if devices is not None:
            devices.discard(session)
            if not devices:
                del self.sessions[session.uid]

    def devices_of(self, uid: str) -> int:
        """Sessions of ``uid`` here, counting those admitted and not yet served."""
        return len(self.sessions.get(uid, ())) + self._reserved.of(uid)

    def reserve_device(self, uid: str) -> Callable[[], None]:
        """Hold one of ``uid``'s device slots until the returned release (idempotent) is called.

        Taken in the same step as the admission check that counted the slots,
        so concurrent handshakes of one uid cannot all pass it; released just
        before ``serve()`` registers the session (again with no checkpoint
        between) or when the handshake fails.
        """
        return self._reserved.add(uid)

    # -- the subtree ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ctx, k = self._ctx, self.partition
        try:
            with self._scope:
                self.next_offset = self._committed = await self._start_offset()
                async with ctx.fetcher.assignment(self.topic, self.next_offset) as feed:
                    self._feed = feed
                    async with trio.open_nursery() as nursery:
                        confirmed = trio.Event()
                        # The lease holder: it lives exactly as long as the
                        # nursery may take sessions (see _hold_lease).
                        nursery.start_soon(self._hold_lease, confirmed)
                        # Nothing runs until ZooKeeper has shown us our own node
                        # (a lost lease cancels this wait).
                        await confirmed.wait()
                        nursery.start_soon(self._deliver, feed)
                        nursery.start_soon(self._commit_loop)
                        nursery.start_soon(self._sweep_idle)
                        nursery.start_soon(self.replay_hub.run)
                        self._nursery = nursery
                        self.serving_since = time.time()
                        self.state.value = PartitionState.SERVING
                        ctx.metrics.partition_owned.labels(str(k)).set(1)
                        log.info(
                            "partition_started",
                            extra={"partition": k, "epoch": self.epoch, "offset": self.next_offset},
                        )
                        task_status.started()
        except KafkaUnavailable as exc:
            log.warning("partition_start_failed", extra={"partition": k, "error": str(exc)})
            self._stopping(EndReason.KAFKA_UNAVAILABLE)
            if self.serving_since is None:
                raise
        except Exception:
            self._stopping(EndReason.FAILED)
            raise
        finally:
            self._nursery = None
            self._feed = None
            self._stopping(EndReason.FAILED)  # a reason given earlier wins
            with trio.CancelScope(shield=True):
                await self._finish()
            self.state.value = PartitionState.STOPPED
        if self.serving_since is None:
            reason = self.end_reason.value if self.end_reason else "?"
            raise EndedBeforeStart(f"partition {k}: {reason}")

    async def _finish(self) -> None:
        ctx, k = self._ctx, self.partition
        reason = self.end_reason or EndReason.FAILED
        served = self.serving_since is not None
        # A subtree that never served wrote nothing and may hand its node back.
        graceful = reason.graceful or not served
        # Given up for want of the broker: a commit could only wait for it.
        if graceful and served and ctx.zk.connected and reason is not EndReason.KAFKA_UNREACHABLE:
            await self._commit(self.next_offset)
        ctx.metrics.partition_owned.labels(str(k)).set(0)
        try:
            ctx.metrics.consumer_lag.remove(str(k))
        except KeyError:
            pass
        if served:
            ctx.metrics.lease_losses.labels(reason.value).inc()
            # Logged before the lease is given back: from here on nothing of
            # this subtree runs, and the next owner can only start after the
            # delete below, so the log never shows two owners at once.
            log.info(
                "partition_stopped",
                extra={
                    "partition": k,
                    "epoch": self.epoch,
                    "reason": reason.value,
                    "offset": self.next_offset,
                },
            )
        if not ctx.zk.connected:
            return
        try:
            if graceful and self.gives_back:
                # The lease node and its line in our registration go in one transaction.
                if await self._registrar.remove_leases({k: self.epoch}):
                    log.info("lease_released", extra={"partition": k, "epoch": self.epoch})
            elif reason is EndReason.LEASE_LOST:
                # The node is gone or another's: only our registration still lists it.
                await self._registrar.forget_lease(k)
        except (ZooKeeperError, NoNodeError) as exc:
            # The node dies with the session at the latest; until then the
            # balancer finds it (ours, not running) and deletes or re-takes it.
            log.warning("lease_delete_failed", extra={"partition": k, "error": str(exc)})

    async def _hold_lease(self, confirmed: trio.Event) -> None:
        """Return (ending the subtree) once the lease cannot be trusted.

        Watches the lease node itself rather than the ownership cache: this
        session reads its own create first, so the first view is never stale.

        This task is also the anchor of the SERVING state: it is the first
        child of the subtree's nursery and leaves it last, and however it ends
        (the lease ended, a sibling failed, the partition was stopped) it marks
        the partition STOPPING on its way out, before the nursery can close.
        So a SERVING partition's nursery is always open: ``serve()`` can start
        a session there without ever meeting a closed nursery.
        """
        ctx, k, epoch, generation = self._ctx, self.partition, self.epoch, self.generation
        reason = EndReason.LEASE_LOST
        detail = ""
        node_gone = trio.Event()

        def on_node(_data: bytes | None, stat: NodeStat | None) -> None:
            nonlocal detail
            if node_gone.is_set():
                return
            if stat is None:
                detail = "lease node deleted"
                node_gone.set()
            elif stat.czxid != epoch:
                detail = f"lease node now has epoch {stat.czxid}"
                node_gone.set()
            else:
                confirmed.set()

        async def session_gone() -> None:
            nonlocal reason, detail
            info = await ctx.zk.session.wait_value(
                lambda s: s.state is not SessionState.CONNECTED or s.generation != generation
            )
            reason = EndReason.ZOOKEEPER_SESSION
            detail = f"session {info.state.value}" + (" (degraded)" if info.degraded else "")

        try:
            async with trio.open_nursery() as nursery:

                async def first(fn: Callable[[], Awaitable[object]]) -> None:
                    await fn()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first, session_gone)
                nursery.start_soon(first, node_gone.wait)
                nursery.start_soon(ctx.zk.watch_data, ctx.paths.owner(k), on_node)
            log.warning(
                "lease_ended",
                extra={"partition": k, "epoch": epoch, "reason": reason.value, "detail": detail},
            )
            self.stop(reason)
        finally:
            # Cancelled because a sibling failed: that is the reason.
            self._stopping(EndReason.FAILED)

    async def _start_offset(self) -> int:
        """Where live delivery starts: the group's committed offset, else the log end.

        With nothing committed yet, nobody is owed older records except
        through a client's explicit resume.
        """
        offsets = self._offsets
        committed = await offsets.committed()
        return committed if committed >= 0 else await offsets.end_offset()

    async def _commit(self, offset: int) -> bool:
        """Record where the next owner's live tail should start (a hint)."""
        with trio.CancelScope(shield=True):
            try:
                await self._offsets.commit(offset)
            except CommitsPaused:
                return False  # the failure that paused them was logged
            except KafkaUnavailable as exc:
                log.warning("kafka_commit_failed", extra={"topic": self.topic, "error": str(exc)})
                return False
        return True

    def cached_watermarks(self) -> tuple[int, int]:
        """(low, high) of this partition's topic as last fetched; no waiting."""
        if self._feed is None:
            raise KafkaUnavailable(f"{self.topic}: not fetched here")
        return self._feed.cached_watermarks()

    async def _deliver(self, feed: TopicFeed) -> None:
        # Each batch is delivered inside the fetcher's hand-over, not by a
        # wake-up of this task (one per partition with records in a fetch).
        await feed.deliver(self._deliver_batch)

    def _deliver_batch(self, batch: Sequence[Record], fetched_at: float) -> None:
        ctx, k = self._ctx, self.partition
        metrics = ctx.metrics
        now = time.time()
        # Each session's frames of this batch, written once it is all queued.
        touched: dict[Session, None] = {}
        written = 0
        for record in batch:
            # No await from here to the offers below: a session registering
            # reads next_offset as its live split point and relies on every
            # record at or above it being offered to it.
            self.next_offset = record.offset + 1
            try:
                chat = decode_record(record.value)
            except RecordError as exc:
                # A poisoned record must never stop the partition.
                metrics.bad_records.labels(str(k)).inc()
                # Sizes and kinds only: the message text may quote the record.
                log.warning(
                    "bad_record_skipped",
                    extra={
                        "partition": k,
                        "offset": record.offset,
                        "kind": exc.kind,
                        "bytes": None if record.value is None else len(record.value),
                    },
                )
                continue
            delivered = 0
            for uid in chat.addressees:
                devices = self.sessions.get(uid)
                if not devices:
                    continue
                frame = message_frame(chat, k, record.offset, uid)
                for session in devices:
                    session.queue(record.offset, frame)
                    touched[session] = None
                delivered += len(devices)
            if not delivered:
                continue
            written += delivered
            metrics.messages_delivered.inc(delivered)
            metrics.delivery_latency.observe(max(0.0, now - chat.ts / 1000))
        if touched:
            for session in touched:
                session.write_queued()
            metrics.residence.observe("fetch_to_write", time.perf_counter() - fetched_at, written)

    async def _sweep_idle(self) -> None:
        """Close the sessions whose clients went silent: one task per partition, not per socket."""
        while True:
            idle_s = self._ctx.config.value.limits.idle_timeout_s
            await trio.sleep(max(1.0, idle_s / 4) if idle_s > 0 else IDLE_SWEEP_OFF_S)
            if idle_s <= 0:
                continue
            now = trio.current_time()
            for devices in list(self.sessions.values()):
                for session in list(devices):
                    session.check_idle(now)

    async def _commit_loop(self) -> None:
        while True:
            await trio.sleep(COMMIT_INTERVAL_S)
            if self.next_offset != self._committed and self._ctx.zk.connected:
                offset = self.next_offset
                if await self._commit(offset):
                    self._committed = offset
            try:
                _low, high = self.cached_watermarks()
                self._ctx.metrics.consumer_lag.labels(str(self.partition)).set(
                    max(0, high - self.next_offset)
                )
            except KafkaUnavailable:
                pass


class PartitionSupervisor:
    """Owns the ``partitions`` nursery: takes leases and runs their subtrees."""

    def __init__(self, ctx: Context, kafka_healthy: AsyncValue[bool] | None = None) -> None:
        self._ctx = ctx
        # The registration publishes whether this instance can reach the broker.
        self.registrar = Registrar(ctx, kafka_healthy)
        self._runtimes: dict[int, PartitionRuntime] = {}
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()  # one batch of lease changes at a time keeps the logic simple

    def runtime(self, k: int) -> PartitionRuntime | None:
        """The serving subtree of partition ``k``, if this instance holds its lease."""
        runtime = self._runtimes.get(k)
        return runtime if runtime is not None and runtime.serving else None

    def held(self) -> list[int]:
        return sorted(self._runtimes)

    def runtimes(self) -> list[PartitionRuntime]:
        return [self._runtimes[k] for k in sorted(self._runtimes)]

    def leftovers(self) -> dict[int, Lease]:
        """Leases this session holds but runs no subtree for (they survived a SUSPENDED
        connection, or a write whose answer came too late)."""
        return {k: v for k, v in self.registrar.leases.items() if k not in self._runtimes}

    def _count(self) -> None:
        self._ctx.metrics.partitions_held.set(len(self._runtimes))

    async def run(
        self, *, task_status: trio.TaskStatus[PartitionSupervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                # Cancelled from outside (the drain ran out of time): each
                # subtree still says why it ended and hands its lease back.
                self.stop_all(EndReason.SHUTDOWN)

    async def acquire(self, partitions: Sequence[int]) -> list[int]:
        """Take the leases of ``partitions`` and start their subtrees; the ones now serving.

        The lease nodes are created a batch per transaction (with their lines in
        our registration); the subtrees start side by side.
        """
        ctx = self._ctx
        async with self._lock:
            wanted = [k for k in partitions if k not in self._runtimes]
            before = ctx.zk.session.value
            if (
                not wanted
                or self._nursery is None
                or ctx.draining.is_set()
                or before.state is not SessionState.CONNECTED
            ):
                return []
            asked_at = trio.current_time()
            gaps = {k: ctx.cache.ownerless_for(k) for k in wanted}
            try:
                created = await self.registrar.create_leases(wanted)
            except (ZooKeeperError, NoNodeError) as exc:
                # The transaction may still land later: the registration then lists
                # the leases (ours, not running) and the balancer re-takes or frees them.
                log.warning("lease_create_failed", extra={"partitions": wanted, "error": str(exc)})
                return []
            session = ctx.zk.session.value
            if (
                session.state is not SessionState.CONNECTED
                or session.generation != before.generation
            ):
                # Our session became untrustworthy while we asked: never start
                # a subtree on such a lease.
                return []
            return await self._start(created, session.generation, asked_at, gaps)

    async def resume(self, leases: Mapping[int, Lease]) -> list[int]:
        """Start subtrees for leases this session already holds (``leftovers``)."""
        ctx = self._ctx
        async with self._lock:
            session = ctx.zk.session.value
            if self._nursery is None or ctx.draining.is_set() or not self.registrar.registered:
                return []
            mine: dict[int, Lease] = {}
            for k, lease in leases.items():
                if k in self._runtimes:
                    continue
                stat = await ctx.zk.exists(ctx.paths.owner(k))
                if (
                    stat is not None
                    and stat.ephemeral_owner == session.session_id
                    and stat.czxid == lease.epoch
                ):
                    mine[k] = lease
                else:
                    await self.registrar.forget_lease(k)
            return await self._start(mine, session.generation, trio.current_time(), {})

    async def _start(
        self,
        leases: Mapping[int, Lease],
        generation: int,
        asked_at: float,
        gaps: Mapping[int, float | None],
    ) -> list[int]:
        ctx, nursery = self._ctx, self._nursery
        assert nursery is not None
        started: list[int] = []

        async def start(k: int, lease: Lease) -> None:
            runtime = PartitionRuntime(
                k, lease.epoch, ctx, generation=generation, registrar=self.registrar
            )
            self._runtimes[k] = runtime
            try:
                await nursery.start(self._run_runtime, runtime)
            except KafkaUnavailable:
                return
            except EndedBeforeStart as exc:
                log.info("partition_start_abandoned", extra={"partition": k, "reason": str(exc)})
                return
            except Exception:
                log.exception("partition_start_failed", extra={"partition": k})
                return
            ctx.metrics.lease_acquisitions.inc()
            started_in = trio.current_time() - asked_at
            ctx.metrics.lease_start.observe(started_in)
            ownerless_for = gaps.get(k)
            if ownerless_for is not None:
                ctx.metrics.handover_gap.observe(ownerless_for + started_in)
            started.append(k)

        async with trio.open_nursery() as starting:
            for k, lease in sorted(leases.items()):
                starting.start_soon(start, k, lease)
        self._count()
        return sorted(started)

    async def _run_runtime(
        self, runtime: PartitionRuntime, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await runtime.run(task_status=task_status)
        except Exception:
            if runtime.serving_since is None:
                raise  # reported by acquire()
            # A partition is a fault boundary: its failure ends its subtree
            # (and lease) only; the balancer takes a partition again later.
            log.exception("partition_failed", extra={"partition": runtime.partition})
        finally:
            if self._runtimes.get(runtime.partition) is runtime:
                del self._runtimes[runtime.partition]
            self._count()

    async def release(self, partitions: Sequence[int], reason: EndReason) -> None:
        """End these partitions' subtrees side by side and give their leases back in one
        transaction (the others see them all free at once); wait until done."""
        ctx = self._ctx
        runtimes = [r for k in partitions if (r := self._runtimes.get(k)) is not None]
        for runtime in runtimes:
            runtime.stop(reason, give_back=False)
        for runtime in runtimes:
            await runtime.state.wait_value(PartitionState.STOPPED)
        # Those that ended for this reason (not, say, a lost lease meanwhile).
        leases = {
            r.partition: r.epoch for r in runtimes if r.end_reason is reason and not r.gives_back
        }
        if not leases or not ctx.zk.connected:
            return
        try:
            released = await self.registrar.remove_leases(leases)
        except (ZooKeeperError, NoNodeError) as exc:
            # The nodes die with the session at the latest; until then the
            # balancer finds them (ours, not running) and deletes or re-takes them.
            log.warning(
                "lease_delete_failed", extra={"partitions": sorted(leases), "error": str(exc)}
            )
            return
        for k in released:
            log.info("lease_released", extra={"partition": k, "epoch": leases[k]})

    def stop_all(self, reason: EndReason) -> None:
        for runtime in list(self._runtimes.values()):
            runtime.stop(reason)
