"""Prometheus metrics: sync cost, programming latency, table size, traffic.

Each agent gets its own CollectorRegistry (tests run several). Per-Service
traffic is read from the kernel's IPVS counters at scrape time through a
separate read-only dataplane handle, so scrapes never race the reconciler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..model import ObservedState, ServiceRef, VSKey
from ..reconcile import SyncReport

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300)


class TrafficCollector(Collector):
    """ipvsproxy_service_* counters from the kernel's per-virtual-server stats."""

    def __init__(self, observe: Callable[[], ObservedState], name_of: Callable[[VSKey], ServiceRef | None]):
        self.observe, self.name_of = observe, name_of

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "service", "port", "kind", "address"]
        conns = CounterMetricFamily("ipvsproxy_service_connections", "Connections scheduled", labels=labels)
        pkts = CounterMetricFamily("ipvsproxy_service_packets", "Packets", labels=labels + ["direction"])
        octets = CounterMetricFamily("ipvsproxy_service_bytes", "Bytes", labels=labels + ["direction"])
        try:
            state = self.observe()
        except Exception:  # a failed scrape must not break /metrics
            return
        for key, vs in state.services.items():
            ref = self.name_of(key) if vs.owned else None
            if ref is None or not vs.stats:
                continue
            lv = [ref.namespace, ref.name, ref.port_name, ref.kind, f"{key.address}:{key.port}"]
            conns.add_metric(lv, vs.stats.get("conns", 0))
            for d in ("in", "out"):
                pkts.add_metric(lv + [d], vs.stats.get(f"{d}pkts", 0))
                octets.add_metric(lv + [d], vs.stats.get(f"{d}bytes", 0))
        yield from (conns, pkts, octets)


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
        for op in report.ops:
            if id(op) not in failed:
                self.operations.labels(op.kind.value).inc()
        for f in report.failures:
            self.op_errors.labels(f.op.kind.value).inc()
        self.service_errors.inc(len(report.service_failures))
        for lat in report.latencies:
            self.programming.observe(lat)
        self.last_success.set_to_current_time()

    def text(self) -> bytes:
        return generate_latest(self.registry)
