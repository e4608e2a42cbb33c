"""The measurements, each a bounded phase that stops by itself.

Every phase reports what it measured even when a target is missed; a phase
that fails outright records ``{"error": ...}`` and the run goes on.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import procstat
from .loadgen import LoadGen
from .systems import Linechatd, System

QUANTILES = (0.5, 0.9, 0.99, 0.999)
# Points of the latency distribution kept for the CDF plot.
CDF_POINTS = tuple(i / 100 for i in range(1, 100)) + (0.995, 0.999, 0.9999)


@dataclass(frozen=True)
class Settings:
    pairs: int = 256  # sender/recipient pairs in the throughput and latency phases
    step_s: float = 5.0  # length of one open-loop step
    drain_s: float = 5.0  # how long a step may take to deliver what it sent
    start_rate: float = 2000.0  # total msg/s of the first saturation step
    max_rate: float = 64000.0
    bisect_steps: int = 3
    max_steps: int = 12
    pass_p99_ms: float = 500.0  # a step whose p99 is above this is past saturation
    latency_rate: float = 1000.0
    latency_s: float = 10.0
    connection_targets: tuple[int, ...] = (10_000, 50_000)
    connect_concurrency: int = 256
    connect_deadline_s: float = 240.0
    source_addresses: int = 8  # 127.0.0.2 ... spread the idle connections over these
    close_per_second: float = 2000.0  # idle connections are closed at this pace
    probe_interval_s: float = 0.02
    failover_timeout_s: float = 60.0
    profile_s: float = 15.0
    settle_s: float = 2.0  # pauses that let queues drain and allocations settle
    idle_measure_s: float = 3.0  # CPU sampled over this long with idle connections
    smoke: bool = False


def percentiles(samples_us: Sequence[int]) -> dict[str, float | None]:
    if not samples_us:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    ordered = sorted(samples_us)
    n = len(ordered)

    def q(p: float) -> float:
        return round(ordered[min(n - 1, int(p * n))] / 1000, 3)

    return {
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": round(ordered[-1] / 1000, 3),
        "samples": n,
    }


def cdf(samples_us: Sequence[int]) -> list[tuple[float, float]]:
    if not samples_us:
        return []
    ordered = sorted(samples_us)
    n = len(ordered)
    return [(p, ordered[min(n - 1, int(p * n))] / 1000) for p in CDF_POINTS]


_RESIDENCE_BUCKET = re.compile(
    r'^linechatd_gateway_residence_seconds_bucket\{(?=[^}]*le="([^"]+)")(?=[^}]*stage="([^"]+)")'
    r"[^}]*\} ([0-9.e+]+)$",
    re.MULTILINE,
)


def scrape_residence(http_urls: Sequence[str]) -> dict[str, dict[float, float]]:
    """Every gateway's residence histogram, summed: stage -> upper bound -> cumulative count."""
    total: dict[str, dict[float, float]] = {}
    for url in http_urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue
        for le, stage, value in _RESIDENCE_BUCKET.findall(text):
            bound = math.inf if le == "+Inf" else float(le)
            buckets = total.setdefault(stage, {})
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return total


def residence_between(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, dict[str, float | None]]:
    """p50/p99 (ms) of each stage over what was observed between two scrapes.

    Interpolated linearly inside a bucket; a quantile past the last finite
    bound is reported as that bound (a lower bound).
    """
    out: dict[str, dict[str, float | None]] = {}
    for stage, buckets in after.items():
        bounds = sorted(buckets)
        cum = [buckets[b] - before.get(stage, {}).get(b, 0.0) for b in bounds]
        count = cum[-1] if cum else 0.0
        result: dict[str, float | None] = {"count": count}
        for name, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
            if count <= 0:
                result[name] = None
                continue
            target = q * count
            lower, below = 0.0, 0.0
            value = None
            for bound, c in zip(bounds, cum, strict=True):
                if c >= target:
                    if bound == math.inf:
                        value = lower
                    else:
                        share = (target - below) / (c - below) if c > below else 1.0
                        value = lower + (bound - lower) * share
                    break
                lower, below = bound, c
            result[name] = round(value * 1000, 3) if value is not None else None
        out[stage] = result
    return out


def _merge(replies: Sequence[dict[str, Any]], key: str) -> array[int]:
    merged = array("q")
    for reply in replies:
        if reply is not None:
            merged.frombytes(reply[key])
    return merged


class CpuMeter:
    """CPU of the system's servers, its helpers, the load generator and everyone else."""

    def __init__(self, system: System, loadgen: LoadGen) -> None:
        self.system = system
        self.loadgen = loadgen

    def start(self) -> dict[str, Any]:
        return {
            "servers": procstat.sample(self.system.server_pids()),
            "server_threads": procstat.thread_cpu_seconds(self.system.server_pids()),
            "helpers": {n: procstat.sample([p]) for n, p in self.system.extra.items()},
            "loadgen": procstat.sample(self.loadgen.pids),
            "machine": procstat.system_busy(),
            "at": time.monotonic(),
        }

    def stop(self, begun: dict[str, Any]) -> dict[str, Any]:
        servers = procstat.sample(self.system.server_pids())
        loadgen = procstat.sample(self.loadgen.pids)
        busy, total = procstat.system_busy()
        busy0, total0 = begun["machine"]
        elapsed = time.monotonic() - begun["at"]
        cores = os.cpu_count() or 1
        machine_cores = (busy - busy0) / max(1.0, total - total0) * cores
        helpers = {
            n: round(procstat.sample([p]).rate_since(s), 3)
            for n, s in begun["helpers"].items()
            for p in [self.system.extra[n]]
        }
        server_cores = servers.rate_since(begun["servers"])
        threads = procstat.thread_cpu_seconds(self.system.server_pids())
        threads0 = begun["server_threads"]
        loadgen_cores = loadgen.rate_since(begun["loadgen"])
        return {
            "elapsed_s": round(elapsed, 3),
            "server_cpu_s": round(servers.cpu_s - begun["servers"].cpu_s, 3),
            "server_cores": round(server_cores, 3),
            # The servers' CPU seconds by kind of thread (procstat._thread_group).
            "server_thread_cpu_s": {
                group: round(max(0.0, cpu_s - threads0.get(group, 0.0)), 3)
                for group, cpu_s in sorted(threads.items())
            },
            "helper_cores": helpers,
            "loadgen_cores": round(loadgen_cores, 3),
            # Whatever else ran on the machine meanwhile (other jobs skew everything).
            "other_cores": round(
                max(0.0, machine_cores - server_cores - loadgen_cores - sum(helpers.values())), 3
            ),
        }


class Bench:
    """One system's phases, sharing its connections and the load generator."""

    def __init__(
        self,
        system: System,
        loadgen: LoadGen,
        settings: Settings,
        say: Callable[[str], None],
    ) -> None:
        self.system = system
        self.loadgen = loadgen
        self.settings = settings
        self.say = say
        self.cpu = CpuMeter(system, loadgen)
        # Cores the servers and helpers use with no clients at all (see run._idle):
        # subtracted for the marginal cost of a message.
        self.idle_cores: float | None = None
        self.idle_helper_cores: dict[str, float] = {}
        self._pairs: list[list[tuple[str, str]]] = []  # per worker: (sender uid, recipient uid)
        self._items: list[list[tuple[str, str, str | None]]] = []

    # -- the sender/recipient pairs -------------------------------------------------

    def open_pairs(self) -> dict[str, Any]:
        """Senders on one server, their recipients on another (both directions)."""
        system, workers = self.system, len(self.loadgen)
        n_servers = len(system.servers)
        half = max(1, self.settings.pairs // 2)
        pairs: list[tuple[str, int, str, int]] = []
        for src in range(n_servers):
            dst = (src + 1) % n_servers
            senders = system.uids(src, f"s{src}-", half)
            recipients = system.uids(dst, f"r{dst}-", half)
            pairs += [(s, src, r, dst) for s, r in zip(senders, recipients, strict=True)]
        self._pairs = [[] for _ in range(workers)]
        self._items = [[] for _ in range(workers)]
        for i, (s, src, r, dst) in enumerate(pairs):
            w = i % workers
            self._pairs[w].append((s, r))
            self._items[w].append((s, system.url(s, src), None))
            self._items[w].append((r, system.url(r, dst), None))
        return self._open_items(self._items)

    def _open_items(self, items: list[list[tuple[str, str, str | None]]]) -> dict[str, Any]:
        replies = self.loadgen.call(
            [{"op": "open", "dialect": self.system.dialect, "items": chunk} for chunk in items],
            timeout=120,
        )
        opened = sum(r["opened"] for r in replies)
        failures: Counter[str] = Counter()
        for r in replies:
            failures.update(r["failures"])
        if failures:
            raise RuntimeError(f"could not open the load connections: {dict(failures)}")
        return {"opened": opened}

    def reopen_pairs(self) -> None:
        self.loadgen.broadcast({"op": "close", "uids": None}, timeout=60)
        time.sleep(self.settings.settle_s / 2)
        self._open_items(self._items)

    def close_pairs(self) -> None:
        self.loadgen.broadcast({"op": "close", "uids": None}, timeout=60)

    # -- one open-loop step -------------------------------------------------------------

    def step(self, rate: float, duration_s: float) -> dict[str, Any]:
        s = self.settings
        workers = len(self.loadgen)
        start_at = time.monotonic() + 0.3
        gateways = [
            srv.http_url
            for srv in self.system.servers
            if isinstance(self.system, Linechatd) and srv.http_url and srv.running()
        ]
        residence_before = scrape_residence(gateways)
        begun = self.cpu.start()
        replies = self.loadgen.call(
            [
                {
                    "op": "load",
                    "pairs": self._pairs[w],
                    "rate": rate / workers,
                    "duration_s": duration_s,
                    "start_at": start_at,
                    "drain_s": s.drain_s,
                }
                for w in range(workers)
            ],
            timeout=duration_s + s.drain_s + 60,
        )
        cpu = self.cpu.stop(begun)
        residence = residence_between(residence_before, scrape_residence(gateways))
        sent = sum(r["sent"] for r in replies)
        received = sum(r["received"] for r in replies)
        acked = sum(r["acked"] for r in replies)
        errors = sum(r["errors"] for r in replies)
        closed = sum(r["closed"] for r in replies)
        error_codes: Counter[str] = Counter()
        close_codes: Counter[str] = Counter()
        for r in replies:
            error_codes.update(r["error_codes"])
            close_codes.update(r["close_codes"])
        latencies = _merge(replies, "latency_us")
        lat = percentiles(latencies)
        acks = percentiles(_merge(replies, "ack_latency_us"))
        lags = percentiles(_merge(replies, "pacer_lag_us"))
        last = max(r["last_receive_ns"] for r in replies)
        first = min(r["first_send_ns"] for r in replies if r["first_send_ns"]) if sent else 0
        span_s = (last - first) / 1e9 if last > first else duration_s
        at_end = sum(r["received_when_sending_ended"] for r in replies)
        lossless = sent > 0 and received == sent and acked == sent and errors == 0 and closed == 0
        keeping_up = lat["p99_ms"] is not None and lat["p99_ms"] <= s.pass_p99_ms
        result = {
            "offered_per_s": rate,
            "duration_s": duration_s,
            "sent": sent,
            "acked": acked,
            "received": received,
            "received_when_sending_ended": at_end,
            "stale_from_earlier_steps": sum(r.get("stale_from_earlier_steps", 0) for r in replies),
            "errors": errors,
            "error_codes": dict(error_codes),
            "closed": closed,
            "close_codes": dict(close_codes),
            "lossless": lossless,
            "passed": lossless and keeping_up,
            "delivered_per_s": round(received / span_s, 1) if span_s > 0 else 0.0,
            "delivered_per_s_per_process": round(received / span_s / len(self.system.servers), 1)
            if span_s > 0
            else 0.0,
            "cpu_us_per_msg": round(cpu["server_cpu_s"] / received * 1e6, 1) if received else None,
            "cpu_us_per_msg_marginal": self._marginal(
                cpu["server_cores"], self.idle_cores, cpu, received
            ),
            "cpu_us_per_msg_by_thread": {
                group: round(cpu_s / received * 1e6, 1)
                for group, cpu_s in cpu["server_thread_cpu_s"].items()
            }
            if received
            else {},
            "helper_cpu_us_per_msg": {
                name: self._marginal(cores, None, cpu, received)
                for name, cores in cpu["helper_cores"].items()
            },
            "helper_cpu_us_per_msg_marginal": {
                name: self._marginal(cores, self.idle_helper_cores.get(name), cpu, received)
                for name, cores in cpu["helper_cores"].items()
            },
            "latency": lat,
            "ack_latency": acks,
            "residence": residence,
            "pacer_lag": lags,
            "cpu": cpu,
            "cdf": cdf(latencies),
        }
        self.say(
            f"  {self.system.name}: {rate:>8.0f} msg/s offered -> "
            f"{result['delivered_per_s']:>8.0f} delivered/s, p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, undelivered {sent - received}, errors {errors}, "
            f"closes {closed}, "
            f"server {cpu['server_cores']:.2f} cores, "
            + "".join(f"{k} {v:.2f}, " for k, v in cpu["helper_cores"].items())
            + f"loadgen {cpu['loadgen_cores']:.2f}, others {cpu['other_cores']:.2f} "
            f"-> {'pass' if result['passed'] else 'FAIL'}"
            + "".join(
                f"; {stage} p50/p99 {r['p50_ms']}/{r['p99_ms']} ms"
                for stage, r in residence.items()
            )
            + (
                "; server CPU-us/msg by thread: "
                + ", ".join(f"{g} {v}" for g, v in result["cpu_us_per_msg_by_thread"].items())
                if result["cpu_us_per_msg_by_thread"]
                else ""
            )
        )
        if not result["passed"]:
            # Overload may have closed sessions (1013) and left backlogs: start clean.
            self._settle()
        return result

    @staticmethod
    def _marginal(
        cores: float, idle: float | None, cpu: dict[str, Any], received: int
    ) -> float | None:
        """CPU-µs per delivered message, less what the same processes burn with no load."""
        if not received:
            return None
        busy = max(0.0, cores - (idle or 0.0)) * cpu["elapsed_s"]
        return round(busy / received * 1e6, 1)

    def _settle(self) -> None:
        time.sleep(self.settings.settle_s)
        self.reopen_pairs()
        time.sleep(self.settings.settle_s / 2)

    # -- phases ------------------------------------------------------------------------

    def saturation(self) -> dict[str, Any]:
        """Highest open-loop rate delivered without loss and with a bounded p99."""
        s = self.settings
        steps: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        low, high = 0.0, None  # highest passing rate, lowest failing rate
        bisections = 0
        rate = s.start_rate
        while len(steps) < s.max_steps:
            result = self.step(rate, s.step_s)
            steps.append(result)
            if result["passed"]:
                low = max(low, rate)
                if best is None or rate > best["offered_per_s"]:
                    best = result
            else:
                high = rate if high is None else min(high, rate)
            if high is None:
                rate *= 2
                if rate > s.max_rate:
                    break
                continue
            if bisections >= s.bisect_steps or (low and high - low <= 0.05 * high):
                break
            if not low:
                rate = high / 2
                if rate < s.start_rate / 8:
                    break
            else:
                rate = round((low + high) / 2, -1)
                bisections += 1
        summary: dict[str, Any] = {"steps": steps}
        if best is not None:
            summary.update(
                {
                    "max_offered_per_s": best["offered_per_s"],
                    "delivered_per_s": best["delivered_per_s"],
                    "delivered_per_s_per_process": best["delivered_per_s_per_process"],
                    "cpu_us_per_msg": best["cpu_us_per_msg"],
                    "cpu_us_per_msg_marginal": best["cpu_us_per_msg_marginal"],
                    "helper_cpu_us_per_msg": best["helper_cpu_us_per_msg"],
                    "helper_cpu_us_per_msg_marginal": best["helper_cpu_us_per_msg_marginal"],
                    "latency": best["latency"],
                    "server_cores": best["cpu"]["server_cores"],
                    "loadgen_cores": best["cpu"]["loadgen_cores"],
                    "other_cores": best["cpu"]["other_cores"],
                    "first_failing_rate": high,
                }
            )
        else:
            summary["error"] = "no step passed"
        return summary

    def latency(self, rate: float) -> dict[str, Any]:
        result = self.step(rate, self.settings.latency_s)
        return {
            "rate_per_s": rate,
            **result["latency"],
            "ack": result["ack_latency"],
            "lossless": result["lossless"],
            "cpu_us_per_msg": result["cpu_us_per_msg"],
            "cpu_us_per_msg_marginal": result["cpu_us_per_msg_marginal"],
            "cpu_us_per_msg_by_thread": result["cpu_us_per_msg_by_thread"],
            "helper_cpu_us_per_msg": result["helper_cpu_us_per_msg"],
            "residence": result["residence"],
            "loadgen_cores": result["cpu"]["loadgen_cores"],
            "server_cores": result["cpu"]["server_cores"],
            "other_cores": result["cpu"]["other_cores"],
            "pacer_lag": result["pacer_lag"],
            "cdf": result["cdf"],
        }

    def connections(self, fd_limit: int) -> dict[str, Any]:
        """Idle connections on server 0: RSS per connection and handshakes per second."""
        s, system = self.settings, self.system
        server = system.servers[0]
        workers = len(self.loadgen)
        budget = max(0, fd_limit - _open_fds(server.pid) - 256)
        per_worker_budget = max(0, fd_limit - 256)
        targets = [min(t, budget, per_worker_budget * workers) for t in s.connection_targets]
        baseline_rss = procstat.rss_bytes(server.pid)
        points: list[dict[str, Any]] = []
        uids = system.uids(0, "idle-", max(targets) if targets else 0)
        sources = [f"127.0.0.{2 + i}" for i in range(s.source_addresses)]
        opened = 0
        for requested, target in zip(s.connection_targets, targets, strict=True):
            batch = uids[opened:target]
            chunks: list[list[tuple[str, str, str | None]]] = [[] for _ in range(workers)]
            for i, uid in enumerate(batch):
                chunks[i % workers].append((uid, system.url(uid, 0), sources[i % len(sources)]))
            started = time.monotonic()
            replies = self.loadgen.call(
                [
                    {
                        "op": "open",
                        "dialect": system.dialect,
                        "items": chunk,
                        "concurrency": max(1, s.connect_concurrency // workers),
                        "read_buffer": 1024,
                        "deadline_s": s.connect_deadline_s,
                    }
                    for chunk in chunks
                ],
                timeout=s.connect_deadline_s + 120,
            )
            elapsed = time.monotonic() - started
            got = sum(r["opened"] for r in replies)
            failures: Counter[str] = Counter()
            for r in replies:
                failures.update(r["failures"])
            connect = percentiles(_merge(replies, "connect_us"))
            opened += got
            time.sleep(s.settle_s)  # let allocations settle before reading RSS
            begun = self.cpu.start()
            time.sleep(s.idle_measure_s)
            idle = self.cpu.stop(begun)
            open_now = sum(r["open_now"] for r in self.loadgen.broadcast({"op": "count"}, 30))
            rss = procstat.rss_bytes(server.pid)
            point = {
                "requested": requested,
                "target": target,
                "connections": open_now,
                "opened_in_batch": got,
                "failed_in_batch": sum(failures.values()),
                "failures": dict(failures),
                "handshakes_per_s": round(got / elapsed, 1) if elapsed > 0 else None,
                "connect_latency": connect,
                "rss_mib": round(rss / 2**20, 1),
                "baseline_rss_mib": round(baseline_rss / 2**20, 1),
                "rss_per_conn_kib": round((rss - baseline_rss) / open_now / 1024, 2)
                if open_now
                else None,
                "idle_server_cores": idle["server_cores"],
            }
            points.append(point)
            self.say(
                f"  {system.name}: {open_now} idle connections on {server.name}: "
                f"RSS {point['rss_mib']} MiB ({point['rss_per_conn_kib']} KiB/conn over "
                f"{point['baseline_rss_mib']} MiB), {point['handshakes_per_s']} handshakes/s, "
                f"failed {point['failed_in_batch']} {dict(failures) if failures else ''}"
            )
            if target < requested:
                self.say(
                    f"  {system.name}: {requested} connections asked, {target} possible here "
                    f"(RLIMIT_NOFILE {fd_limit})"
                )
        self.loadgen.broadcast(
            {"op": "close", "uids": None, "per_second": s.close_per_second / workers},
            timeout=120 + max(targets, default=0) / s.close_per_second,
        )
        rates = [p["handshakes_per_s"] for p in points if p["handshakes_per_s"]]
        return {
            "server": server.name,
            "fd_limit": fd_limit,
            "points": points,
            "handshakes_per_s": max(rates) if rates else None,
            "rss_per_conn_kib": points[-1]["rss_per_conn_kib"] if points else None,
            "max_connections": max((p["connections"] for p in points), default=0),
        }

    def failover(self, how: signal.Signals, timeout_s: float) -> dict[str, Any]:
        """Stop the last instance with ``how``; when do its partitions deliver again?"""
        system = self.system
        assert isinstance(system, Linechatd)
        victim = system.servers[-1]
        survivor = system.servers[0]
        victim_id = victim.meta["instance"]
        partitions = [k for k, o in enumerate(system.owners) if o == victim_id]
        probes: list[tuple[str, str]] = []
        taken: set[int] = set()
        for uid in system.uids(len(system.servers) - 1, "probe-", len(partitions) * 20):
            from linechatd.hashing import partition_for

            k = partition_for(uid, system.partitions)
            if k not in taken:
                taken.add(k)
                probes.append((uid, system.url(uid, len(system.servers) - 1)))
            if len(taken) == len(partitions):
                break
        # One sender per 4 probes: at 50 msgs/s per probe that is 200 sends (and
        # acks) per connection per second, well within what one socket carries.
        senders = system.uids(0, "prober-", max(1, -(-len(probes) // 4)))
        self.loadgen.call(
            [
                {
                    "op": "probe_start",
                    "senders": [(uid, system.url(uid, 0)) for uid in senders],
                    "probes": probes,
                    "interval_s": self.settings.probe_interval_s,
                }
            ]
            + [None] * (len(self.loadgen) - 1),
            timeout=60,
        )
        time.sleep(0.5)
        t0 = time.monotonic()
        victim.signal(how)
        reply = self.loadgen.call(
            [{"op": "probe_result", "t0": t0, "timeout_s": timeout_s}]
            + [None] * (len(self.loadgen) - 1),
            timeout=timeout_s + 60,
        )[0]
        exit_code = victim.wait_exit(30)
        back = sorted(reply["back_after_s"].values())
        outages = sorted(reply["outage_s"].values())
        result = {
            "signal": how.name,
            "partitions": len(probes),
            "recovered": reply["recovered"],
            "first_back_s": round(back[0], 3) if back else None,
            "median_back_s": round(back[len(back) // 2], 3) if back else None,
            "all_back_s": round(back[-1], 3) if back and len(back) == len(probes) else None,
            "median_outage_s": round(outages[len(outages) // 2], 3) if outages else None,
            "max_outage_s": round(outages[-1], 3) if outages else None,
            "victim_exit_code": exit_code,
            "survivor": survivor.name,
        }
        self.say(
            f"  {system.name}: {how.name} {victim.name}: {result['recovered']}/{len(probes)} "
            f"partitions delivering again on {survivor.name}; first after "
            f"{result['first_back_s']} s, all after {result['all_back_s']} s "
            f"(per-partition outage median {result['median_outage_s']} s, "
            f"max {result['max_outage_s']} s)"
        )
        return result


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
