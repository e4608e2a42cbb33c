"""Prometheus metrics of one gateway instance (its own registry, no globals).

Process metrics (``process_*``) come from :class:`ProcessMetrics`, which reads
only what the unit's sandbox leaves visible (``ProcSubset=pid``: this
process's own /proc entries, no /proc/stat): prometheus-client's own process
collector needs /proc/stat for the start time and would export nothing there.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .protocol import CloseCode

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "CLOSE_LABELS",
    "CONTENT_TYPE_LATEST",
    "RESIDENCE_STAGES",
    "Metrics",
    "ProcessMetrics",
    "Residence",
    "close_label",
]


class ProcessMetrics(Collector):
    """CPU, memory and descriptors of this process, from its own /proc entries and getrusage."""

    def __init__(self, proc: str = "/proc/self") -> None:
        self._proc = proc
        self._started = time.time()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds."
        )
        cpu.add_metric([], usage.ru_utime + usage.ru_stime)
        yield cpu
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            value=self._started,
        )
        try:
            with open(f"{self._proc}/statm", "rb") as statm:
                size, resident = (int(n) for n in statm.read().split()[:2])
        except (OSError, ValueError):
            pass
        else:
            yield GaugeMetricFamily(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                value=size * self._page,
            )
            yield GaugeMetricFamily(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                value=resident * self._page,
            )
        try:
            open_fds = len(os.listdir(f"{self._proc}/fd"))
        except OSError:
            pass
        else:
            yield GaugeMetricFamily(
                "process_open_fds", "Number of open file descriptors.", value=open_fds
            )
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        yield GaugeMetricFamily(
            "process_max_fds", "Maximum number of open file descriptors.", value=soft
        )


# linechatd_closes_total{code}: a fixed set, whatever clients send. The codes
# the server (or its transport: 1002 protocol error, 1007 invalid UTF-8)
# decides are themselves; a close the peer started is "peer", whatever code it
# chose, so that clients can neither create series nor fire the 1008/1009
# alerts; 1006 is a connection lost without a close frame.
CLOSE_LABELS = frozenset({*(str(int(code)) for code in CloseCode), "1002", "1007", "peer", "other"})


def close_label(code: int | None, *, by_peer: bool) -> str:
    """The ``code`` label of one closed session (see CLOSE_LABELS)."""
    if code == CloseCode.ABNORMAL or code is None:
        return str(int(CloseCode.ABNORMAL))
    if by_peer:
        return "peer"
    label = str(code)
    return label if label in CLOSE_LABELS else "other"


# Where a message waits inside the gateway (docs/performance.md):
#   read_to_produce  its frame read from the socket -> its record handed to librdkafka
#   report_to_ack    the report poll before the one that served its delivery report
#                    (the report arrived after it: an upper bound on the wait) -> its ack written
#   fetch_to_write   its record fetched by librdkafka -> its message written to the socket
RESIDENCE_STAGES = ("read_to_produce", "report_to_ack", "fetch_to_write")
# Fine at the bottom: a healthy gateway keeps a message for well under a millisecond.
_RESIDENCE_BUCKETS = (
    0.00002, 0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002,
    0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5,
)  # fmt: skip


class Residence:
    """``linechatd_gateway_residence_seconds{stage}``, observed on the hot path.

    prometheus_client's Histogram takes a lock and searches its buckets on
    every observation; this one is a list of counts owned by the trio thread,
    and one observation may stand for a whole batch that waited alike
    (``count``), so a batch costs one clock read and one call.
    """

    def __init__(self) -> None:
        self._counts = {stage: [0] * (len(_RESIDENCE_BUCKETS) + 1) for stage in RESIDENCE_STAGES}
        self._sums = dict.fromkeys(RESIDENCE_STAGES, 0.0)

    def observe(self, stage: str, seconds: float, count: int = 1) -> None:
        self._counts[stage][bisect_left(_RESIDENCE_BUCKETS, seconds)] += count
        self._sums[stage] += seconds * count

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "linechatd_gateway_residence_seconds",
            "Time a message spends inside the gateway, by stage",
            labels=["stage"],
        )
        for stage in RESIDENCE_STAGES:
            counts = list(self._counts[stage])
            cumulative = 0
            buckets = []
            for bound, n in zip((*_RESIDENCE_BUCKETS, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append((_bucket_label(bound), cumulative))
            family.add_metric([stage], buckets, self._sums[stage])
        yield family


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(ProcessMetrics())
        self.build_info = Gauge(
            "linechatd_build_info",
            "Always 1: the running version, its runtime and the cluster it serves",
            ["version", "python", "librdkafka", "cluster_name"],
            registry=r,
        )
        self.partitions_configured = Gauge(
            "linechatd_partitions_configured",
            "The cluster's partition count P (cluster.partitions)",
            registry=r,
        )
        self.send_ack = Histogram(
            "linechatd_send_ack_seconds",
            "From a send handed to the producer to the broker's report (ack or error)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            "linechatd_connections", "Open WebSocket sessions", ["partition"], registry=r
        )
        self.handshakes = Counter(
            "linechatd_handshakes_total", "WebSocket handshakes by result", ["result"], registry=r
        )
        # Every handshake counts one of these: looked up once, not per handshake
        # (a labelled child costs a lock and a dictionary lookup to find).
        self.handshakes_accepted = self.handshakes.labels("accepted")
        self.http_unfinished_refused = Counter(
            "linechatd_http_unfinished_refused_total",
            "HTTP connections closed because too many requests were still arriving "
            "(in total or from their address)",
            registry=r,
        )
        self._connections_of: dict[int, Gauge] = {}
        self.closes = Counter(
            "linechatd_closes_total",
            "WebSocket sessions closed, by the code the server chose ('peer': the client closed)",
            ["code"],
            registry=r,
        )
        self.messages_sent = Counter(
            "linechatd_messages_sent_total", "send frames accepted for producing", registry=r
        )
        self.messages_acked = Counter(
            "linechatd_messages_acked_total", "sends acknowledged by the broker", registry=r
        )
        self.messages_delivered = Counter(
            "linechatd_messages_delivered_total", "message frames queued to sockets", registry=r
        )
        self.errors = Counter(
            "linechatd_errors_total", "error frames sent, by code", ["code"], registry=r
        )
        self.bad_records = Counter(
            "linechatd_bad_records_total", "undecodable records skipped", ["partition"], registry=r
        )
        self.delivery_latency = Histogram(
            "linechatd_delivery_latency_seconds",
            "Record timestamp (produce) to socket write",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.partitions_held = Gauge(
            "linechatd_partitions_held", "Partitions this instance runs", registry=r
        )
        self.partition_owned = Gauge(
            "linechatd_partition_owned",
            "1 while this instance runs the partition",
            ["partition"],
            registry=r,
        )
        self.handover_gap = Histogram(
            "linechatd_handover_gap_seconds",
            "From a partition losing its owner to this instance serving it (as seen by this instance)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.lease_start = Histogram(
            "linechatd_lease_start_seconds",
            "From creating a partition's lock node to its subtree serving",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.lease_acquisitions = Counter(
            "linechatd_lease_acquisitions_total", "Partition leases acquired", registry=r
        )
        self.lease_losses = Counter(
            "linechatd_lease_ends_total",
            "Partition subtrees ended, by reason",
            ["reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "linechatd_consumer_lag_records",
            "Log end minus next offset to deliver",
            ["partition"],
            registry=r,
        )
        self.zk_connected = Gauge(
            "linechatd_zookeeper_connected",
            "1 while the ZooKeeper session is connected",
            registry=r,
        )
        self.view_publisher = Gauge(
            "linechatd_view_publisher",
            "1 while this instance publishes the view log (one instance per cluster)",
            registry=r,
        )
        self.view_entries_read = Gauge(
            "linechatd_view_log_entries_read",
            "View log entries this instance has read since start",
            registry=r,
        )
        self.kafka_ready = Gauge(
            "linechatd_kafka_reachable", "1 while the broker answers metadata requests", registry=r
        )
        self.producer_replacements = Gauge(
            "linechatd_kafka_producer_replacements",
            "Producers replaced after a fatal error (fenced, broken sequence) since start",
            registry=r,
        )
        self.replays = Counter(
            "linechatd_replays_total", "Resume requests served, by result", ["result"], registry=r
        )
        self.replayed_records = Counter(
            "linechatd_replayed_records_total", "Records sent to sessions by replay", registry=r
        )

        self.replay_scans = Counter(
            "linechatd_replay_scans_total",
            "Shared replay reads started: window probes and range scans",
            ["kind"],
            registry=r,
        )
        self.replay_consumers = Counter(
            "linechatd_replay_consumers_total", "Kafka consumers opened for replay", registry=r
        )

        self.publishes = Counter(
            "linechatd_publishes_total",
            "Server API publish requests, by result",
            ["result"],
            registry=r,
        )
        self.publish_recipients = Histogram(
            "linechatd_publish_recipients",
            "Recipients named by one publish request",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.publish_seconds = Histogram(
            "linechatd_publish_seconds",
            "From a publish request's records handed to the broker to all of them durable",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.presence_queries = Counter(
            "linechatd_presence_queries_total", "Server API presence requests answered", registry=r
        )
        self.presence_seconds = Histogram(
            "linechatd_presence_seconds",
            "A presence request's fan-out to the partitions' owners, until all answered",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self.residence = Residence()
        r.register(self.residence)

    def connections_of(self, partition: int) -> Gauge:
        """The open-sessions gauge of ``partition`` (its labelled child, kept)."""
        child = self._connections_of.get(partition)
        if child is None:
            child = self._connections_of[partition] = self.connections.labels(str(partition))
        return child

    def describe(self, config: Config) -> None:
        """The series that say what runs: build info and the partition count."""
        import confluent_kafka

        self.build_info.labels(
            __version__,
            platform.python_version(),
            confluent_kafka.libversion()[0],
            config.cluster.name,
        ).set(1)
        self.partitions_configured.set(config.cluster.partitions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
