"""Prometheus metrics: sync cost, programming latency, table size, traffic.

Each agent gets its own CollectorRegistry (tests run several). Per-Service
traffic is read from the kernel's IPVS counters at scrape time through a
separate read-only dataplane handle, so scrapes never race the reconciler;
a reading is reused for --metrics-stats-interval (docs/metrics.md).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..model import ServiceRef, VSKey
from ..reconcile import SyncReport

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300)


ServiceStats = Callable[[], Mapping[VSKey, tuple[bool, Mapping[str, int]]]]  # key -> (owned, kernel counters)
_FIELDS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")


class TrafficCollector(Collector):
    """ipvsproxy_service_* counters from the kernel's per-virtual-server stats.

    The cost is bounded two ways: the kernel is read with one services-only
    IPVS dump (no real servers, no addresses), and that reading is reused for
    `max_age` seconds, so several scrapers (or a fast one) cost one dump per
    interval. By default the series are per Service port (namespace, service,
    port): the sum over its virtual servers (ClusterIPs, external and LB IPs,
    NodePorts, both families). `per_address` keeps one series per virtual
    server, with kind and address labels (5 series each: costly at scale).
    """

    def __init__(self, read: ServiceStats, name_of: Callable[[VSKey], ServiceRef | None], *,
                 max_age: float = 10.0, per_address: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.name_of = read, name_of
        self.max_age, self.per_address, self.clock = max_age, per_address, clock
        self.labels = ["namespace", "service", "port"] + (["kind", "address"] if per_address else [])
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, ...], list[int]] | None = None
        self._read_at = 0.0
        self._families: tuple[dict[tuple[str, ...], list[int]], list[Metric]] | None = None
        self.dumps = 0  # kernel readings so far

    def rows(self) -> dict[tuple[str, ...], list[int]]:
        """label values -> [conns, inpkts, outpkts, inbytes, outbytes], at most max_age old."""
        with self._lock:  # concurrent scrapes share one reading
            now = self.clock()
            if self._rows is not None and now - self._read_at < self.max_age:
                return self._rows
            stats = self.read()
            self.dumps += 1
            rows: dict[tuple[str, ...], list[int]] = {}
            for key, (owned, counters) in stats.items():
                ref = self.name_of(key) if owned else None
                if ref is None or not counters:
                    continue
                lv: tuple[str, ...] = (ref.namespace, ref.name, ref.port_name)
                if self.per_address:
                    lv += (ref.kind, f"{key.address}:{key.port}")
                row = rows.setdefault(lv, [0] * len(_FIELDS))
                for i, f in enumerate(_FIELDS):
                    row[i] += counters.get(f, 0)
            self._rows, self._read_at = rows, now
            return rows

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self.rows()
        except Exception:  # a failed scrape must not break /metrics
            return
        with self._lock:
            if self._families is None or self._families[0] is not rows:  # built once per reading
                self._families = (rows, self._build(rows))
            families = self._families[1]
        yield from families

    def _build(self, rows: dict[tuple[str, ...], list[int]]) -> list[Metric]:
        conns = CounterMetricFamily("ipvsproxy_service_connections", "Connections scheduled", labels=self.labels)
        pkts = CounterMetricFamily("ipvsproxy_service_packets", "Packets", labels=self.labels + ["direction"])
        octets = CounterMetricFamily("ipvsproxy_service_bytes", "Bytes", labels=self.labels + ["direction"])
        for lv, (c, inp, outp, inb, outb) in rows.items():
            labels = list(lv)
            conns.add_metric(labels, c)
            pkts.add_metric(labels + ["in"], inp)
            pkts.add_metric(labels + ["out"], outp)
            octets.add_metric(labels + ["in"], inb)
            octets.add_metric(labels + ["out"], outb)
        return [conns, pkts, octets]


class Metrics:
    """The agent's metrics; `record` is fed every sync outcome."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram("ipvsproxy_sync_duration_seconds", "Time a sync took",
                                       ["mode"], buckets=BUCKETS, registry=r)
        self.programming = Histogram(
            "ipvsproxy_network_programming_duration_seconds",
            "From a change being seen to the kernel being updated", buckets=LATENCY_BUCKETS, registry=r)
        self.operations = Counter("ipvsproxy_operations", "Dataplane operations applied", ["kind"],
                                  registry=r)
        self.sync_errors = Counter("ipvsproxy_sync_errors", "Syncs that failed", registry=r)
        self.op_errors = Counter("ipvsproxy_operation_errors", "Operations the kernel refused", ["kind"],
                                 registry=r)
        self.invalid_scheduler = Counter("ipvsproxy_invalid_scheduler",
                                         "Services that asked for an unusable scheduler", registry=r)
        self.service_errors = Counter(
            "ipvsproxy_service_programming_errors",
            "Failed attempts to program one Service (the kernel refused some of its operations)", registry=r)
        self.services_failing = Gauge(
            "ipvsproxy_services_failing", "Services the kernel refuses now, being retried with backoff",
            registry=r)
        self.virtual_servers = Gauge("ipvsproxy_virtual_servers", "Virtual servers ipvsproxy wants",
                                     registry=r)
        self.real_servers = Gauge("ipvsproxy_real_servers", "Real servers ipvsproxy wants", registry=r)
        self.draining = Gauge("ipvsproxy_draining_real_servers", "TCP real servers being drained",
                              registry=r)
        self.last_success = Gauge("ipvsproxy_last_successful_sync_timestamp_seconds",
                                  "Unix time of the last successful sync", registry=r)

    def record(self, report: SyncReport | None, error: BaseException | None) -> None:
        if report is None:
            self.sync_errors.inc()
            return
        self.sync_duration.labels("full" if report.full else "partial").observe(report.duration)
        failed = {id(f.op) for f in report.failures}
        done = collections.Counter(op.kind.value for op in report.ops if id(op) not in failed)
        for kind, n in done.items():  # one labels() per kind, not per operation (184,696 at a cold start)
            self.operations.labels(kind).inc(n)
        for f in report.failures:
            self.op_errors.labels(f.op.kind.value).inc()
        self.service_errors.inc(len(report.service_failures))
        for lat in report.latencies:
            self.programming.observe(lat)
        self.last_success.set_to_current_time()

    def text(self) -> bytes:
        return generate_latest(self.registry)
