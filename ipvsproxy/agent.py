"""The node agent: wires a source, the tracker, the reconciler and a dataplane.

`ipvsproxy run` is this plus flag parsing. The agent owns the threads (source
watch, runner, HTTP servers) and the signals: SIGTERM stops it and leaves the
kernel as it is (a restarting pod must not drop traffic); SIGHUP forces a full
resync.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from . import gcpause
from .config import AgentConfig
from .core import NodeCore
from .dataplane.base import Dataplane
from .model import ServiceRef, VSKey
from .objects import Service
from .observe import records
from .observe.health import Health, healthz_route, is_loopback, livez_route, serve
from .observe.metrics import Metrics, TrafficCollector
from .observe.servicehealth import ServiceHealthServer
from .reconcile import EventPoster, Firewall, SyncReport
from .schedulers import Registry, default_registry
from .sources.files import FileWatcher, ManifestReader
from .translate import node_addresses

if TYPE_CHECKING:
    from .sources.kube import KubeSource, Timing

log = logging.getLogger(__name__)

RECORD_INTERVAL = 5.0  # seconds between two writes of the record file, at least
RECORD_SHARE = 20  # ... and at least this many times the last write's duration


class ObjectEventPoster(Protocol):
    """Posts a Warning Event on an object; `version` (its resourceVersion) makes a
    recorder post one Event per version of the object, not one per relist."""

    def __call__(self, kind: str, namespace: str, name: str, reason: str, message: str, *,
                 version: str = "") -> None: ...


class Agent:
    """One node's proxy. Build, then `once()` or `run()`."""

    def __init__(
        self,
        cfg: AgentConfig,
        dataplane: Dataplane,
        *,
        dry_run: bool = False,
        registry: Registry | None = None,
        events: EventPoster | None = None,
        stats_dataplane: Callable[[], Dataplane] | None = None,
        record_state: bool = True,
        firewall: Firewall | None = None,
        clock: Callable[[], float] = time.monotonic,
        source_timing: Timing | None = None,
    ) -> None:
        self.clock = clock
        self.source_timing = source_timing  # the API source's backoff, pauses and jitter (None: real)
        self.cfg, self.dp = cfg, dataplane
        self.registry = registry or default_registry()
        self.events = events
        self.object_events: ObjectEventPoster | None = None  # Warning Events on bad objects
        self.source: KubeSource | None = None  # when the API is the source
        self.metrics = Metrics()
        self.health = Health(max_age=2 * cfg.sync_period + max(30.0, cfg.min_sync_period))
        self.core = NodeCore.build(
            cfg, dataplane, registry=self.registry, firewall=firewall, dry_run=dry_run,
            on_object_problem=self._object_problem, on_service_problem=self._service_problem,
            on_report=self._on_report, clock=clock,
        )
        self.tracker, self.reconciler = self.core.tracker, self.core.reconciler
        # Woken by every change the tracker records; syncs at most once per --min-sync-period.
        self.runner = self.core.runner()
        self.record_state = record_state and not dry_run
        self._record_dirty = False
        self._record_written = -1e9
        self._record_cost = 0.0  # seconds the last write took (on the clock)
        self._recorded = False  # written at least once
        self._servers: list[Any] = []
        self._stop_source: Callable[[], None] | None = None
        self.stats_dataplane = stats_dataplane
        self.service_health: ServiceHealthServer | None = None  # health-check node ports (run() only)
        self._node_seen = False
        self.phases: dict[str, float] = {}  # once(): seconds per step
        self.startup_gc = gcpause.StartupPause(clock)  # run(): the collector off until the first sync

    # ---- problem reporting -------------------------------------------------
    def _object_problem(self, kind: str, namespace: str, name: str, message: str, version: str) -> None:
        """Logged by the tracker; a Warning Event on the object when the API is the source."""
        if self.object_events is not None:
            try:
                self.object_events(kind, namespace, name, "InvalidObject", message, version=version)
            except Exception as exc:  # Events are best effort
                log.warning("could not post InvalidObject Event on %s %s/%s: %s", kind, namespace, name, exc)

    def _service_problem(self, svc: Service, reason: str, message: str) -> None:
        if reason == "InvalidScheduler":
            self.metrics.invalid_scheduler.inc()
        if self.events is not None:
            try:
                self.events(svc, reason, message)
            except Exception as exc:  # Events are best effort
                log.warning("could not post %s Event on Service %s: %s", reason, svc.id, exc)

    def _on_report(self, report: SyncReport | None, error: BaseException | None) -> None:
        self.startup_gc.end(freeze=report is not None)
        self.core.freeze_full_syncs = self.startup_gc.frozen
        self.metrics.record(report, error)
        if report is None:
            self.health.failure(str(error))
            return
        self.health.success()
        # Synced, but perhaps on what was seen before the API refused us (RBAC): /healthz says
        # why (503, for load balancers); /livez does not, since a restart would not help.
        self.health.blocked = self.source.blocked() if self.source is not None else None
        node = self.tracker.node
        self._node_seen = self._node_seen or node is not None
        # A deleted Node is no more eligible than one being deleted (KEP-3836).
        self.health.node_eligible = node.eligible if node is not None else not self._node_seen
        if self.service_health is not None:
            self.service_health.update(self.reconciler.health_checks)
        desired = self.reconciler.index.state
        self.metrics.virtual_servers.set(len(desired.services))
        self.metrics.real_servers.set(self.reconciler.index.real_servers)  # kept by the index: O(1) per sync
        self.metrics.draining.set(self.reconciler.draining)
        self.metrics.services_failing.set(self.reconciler.failing)
        if report.ops:
            self._record_dirty = True
        self._write_record()

    def _write_record(self, force: bool = False) -> None:
        """Record Service names for `list`. It is O(cluster) and runs between syncs (13 MB and
        0.4 s of host CPU at 10,000 Services, several seconds under emulation), so under churn
        it comes at most every RECORD_INTERVAL seconds and never takes more than
        1/RECORD_SHARE of the time: the syncs keep the rest."""
        if not self.record_state or not (self._record_dirty or force):
            return
        if not force and self.clock() - self._record_written < max(RECORD_INTERVAL,
                                                                    RECORD_SHARE * self._record_cost):
            return
        try:
            start = self.clock()
            records.write(self.cfg.state_dir, records.from_desired(self.reconciler.index.state,
                                                                   self.cfg.node_name, self.tracker.endpoints_of))
            self._record_dirty = False
            self._record_written = self.clock()
            self._record_cost = self._record_written - start
            self._recorded = True
        except OSError as exc:
            log.warning("cannot record state in %s: %s", self.cfg.state_dir, exc)
            self.record_state = False

    def name_of(self, key: VSKey) -> ServiceRef | None:
        vs = self.reconciler.index.state.services.get(key)
        return vs.service if vs else None

    # ---- sources -------------------------------------------------------------
    def load_files(self) -> list[str]:
        """Read --from-file manifests once (for --once, diff)."""
        return ManifestReader(self.cfg.from_files, self.cfg.service_proxy_name).load(self.tracker)

    def _kube_source(self) -> KubeSource:
        """The API source, with Events posted through it (never on a dry run:
        --dry-run and diff change nothing, Events included)."""
        from .sources.kube import EndpointsSource, KubeSource

        source = self.source = KubeSource(
            self.tracker, self.cfg.node_name, kubeconfig=self.cfg.kubeconfig, api_server=self.cfg.api_server,
            endpoints_source=EndpointsSource.parse(self.cfg.endpoints_source),
            service_proxy_name=self.cfg.service_proxy_name, timing=self.source_timing)
        source.on_blocked = self.health.set_blocked  # /healthz names what the API refuses
        if not self.reconciler.dry_run:
            self.events = self.events or source.post_event
            self.object_events = source.post_object_event
        return source

    def start_source(self) -> None:
        if self.cfg.from_files:
            watcher = FileWatcher(list(self.cfg.from_files), self.tracker,
                                  service_proxy_name=self.cfg.service_proxy_name)
            watcher.start()
            self._stop_source = watcher.stop
        else:
            source = self._kube_source()
            source.start()
            self._stop_source = source.stop

    # ---- running ---------------------------------------------------------------
    def once(self) -> SyncReport:
        """One full sync from manifests (or an API listing); raises on failure.

        `self.phases` gets the seconds each step took (read, setup, sync, record): the
        process-start benchmark splits a `run --once` with them."""
        with gcpause.paused():  # read + sync: bulk work (gcpause.py)
            return self._once()

    def _once(self) -> SyncReport:
        clock, phases = self.clock, self.phases
        t = clock()
        if self.cfg.from_files:
            self.load_files()
        else:
            self._kube_source().list_all()
        phases["read_s"], t = clock() - t, clock()
        if not self.reconciler.dry_run:
            self.dp.setup()
        phases["setup_s"], t = clock() - t, clock()
        report = self.reconciler.sync(full=True)
        phases["sync_s"], t = clock() - t, clock()
        self._on_report(report, None)
        if self._record_dirty or not self._recorded:  # else _on_report just wrote it
            self._write_record(force=True)
        phases["record_s"] = clock() - t
        if self.source is not None:
            self.source.flush()  # Events are posted in the background
        return report

    def _health_check_addresses(self) -> list[str]:
        """Where health-check node ports listen: every address, or the node's
        addresses --nodeport-addresses selects (as kube-proxy)."""
        if not self.cfg.nodeport_addresses:
            return []
        return node_addresses(self.tracker.node, self.cfg.nodeport_addresses)

    def _health_check_failed(self, sid: str, port: int, message: str) -> None:
        svc = self.tracker.services.get(sid)
        if svc is not None and self.events is not None:
            try:
                self.events(svc, "FailedToStartServiceHealthcheck", message)
            except Exception as exc:  # Events are best effort
                log.warning("could not post FailedToStartServiceHealthcheck Event on Service %s: %s", sid, exc)

    def start_service_health(self) -> None:
        self.service_health = ServiceHealthServer(
            self._health_check_addresses, self.health.healthy, on_listen_failure=self._health_check_failed)
        self.service_health.start()

    def serve_http(self) -> None:
        cfg = self.cfg
        if cfg.healthz_bind_address:
            # Sync errors name Services and addresses: said only on a loopback bind.
            detail = is_loopback(cfg.healthz_bind_address.rpartition(":")[0])
            self._servers.append(serve(cfg.healthz_bind_address, {
                "/healthz": healthz_route(self.health, detail=detail),
                "/livez": livez_route(self.health, detail=detail)}))
        if cfg.metrics_bind_address:
            if self.stats_dataplane is not None:
                stats_dp = self.stats_dataplane()
                self.metrics.registry.register(TrafficCollector(
                    stats_dp.service_stats, self.name_of, max_age=cfg.metrics_stats_interval,
                    per_address=cfg.metrics_per_address))
            detail = is_loopback(cfg.metrics_bind_address.rpartition(":")[0])
            self._servers.append(serve(cfg.metrics_bind_address, {
                "/metrics": lambda: (200, "text/plain; version=0.0.4", self.metrics.text()),
                "/healthz": healthz_route(self.health, detail=detail),
                # kube-proxy's status endpoint on its metrics port; the e2e test "should check kube-proxy
                # urls" and tooling that asks which mode a node's proxy runs in read it
                "/proxyMode": lambda: (200, "text/plain; charset=utf-8", b"ipvs"),
            }))

    def run(self, install_signals: bool = True) -> None:
        """Run until SIGTERM/SIGINT (or stop()); kernel state is left in place."""
        self.dp.setup()
        if install_signals:
            signal.signal(signal.SIGTERM, self._signal_stop)
            signal.signal(signal.SIGINT, self._signal_stop)
            signal.signal(signal.SIGHUP, self._signal_resync)
        self.serve_http()
        self.start_service_health()
        self.startup_gc.start()  # the initial list and the cold sync: bulk work (gcpause.py)
        self.start_source()
        thread = threading.Thread(target=self.runner.run, name="runner", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.5)
                self.startup_gc.expire()
        finally:
            self.startup_gc.end(freeze=False)
            self.shutdown()

    def _signal_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping; kernel state left in place", signum)
        self.runner.stop()

    def _signal_resync(self, signum: int, frame: FrameType | None) -> None:
        log.info("SIGHUP: full resync")
        self.request_full()

    def request_full(self) -> None:
        """A full resync as soon as the runner may."""
        self.core.request_full()
        self.runner.poke()

    def stop(self) -> None:
        self.runner.stop()

    def shutdown(self) -> None:
        if self._stop_source:
            self._stop_source()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        self._servers.clear()
        if self.service_health is not None:
            self.service_health.stop()
        self._write_record(force=True)
        self.dp.close()
