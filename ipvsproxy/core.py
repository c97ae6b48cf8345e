"""The node core: tracker, reconciler and firewall, with no thread, socket or signal.

Feed it changes (sources write into `core.tracker`), ask it to sync
(`sync_now`), or let a runner call `tick`, which decides whether this sync is
full or incremental, runs it, accounts the outcome (failures back off with
seeded jitter) and says when the next one is due. Time comes from a clock
passed in, so the schedule is tested with a fake clock; `next_sync_due` is the
schedule as a pure function.

`NodeCore.build` is the one construction path: it wires the tracker, the
reconciler (with the firewall) and the core from the agent's settings, so the
daemon (agent.py), which adds threads, HTTP, signals and sources around it,
and the benchmark (bench/), which drives it without them, run the same core.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

from . import gcpause
from .config import AgentConfig
from .dataplane.base import Dataplane
from .reconcile import DRAIN_CHECK_S, EventPoster, Firewall, Reconciler, SyncReport
from .runner import Runner
from .schedulers import Registry, default_registry
from .tracker import ProblemHook, Tracker
from .translate import Config

log = logging.getLogger(__name__)

ReportHook = Callable[[SyncReport | None, BaseException | None], None]  # (report, or the error)

MAX_BACKOFF = 60.0  # seconds between attempts after consecutive failed syncs, at most
# The rolling drift check (--resync rolling) compares a few virtual servers per step, as many as
# fit in this share of --min-sync-period by the last step's cost per key. A step is a sync of its
# own right after the one that carries the changes, and the runner measures its interval from the
# start of a tick, so a change arriving during a step waits no longer than it would anyway.
SWEEP_SHARE = 0.2
SWEEP_MIN = 8  # keys per sync at least, however slow the last ones were
# A tick's changes go to the kernel oldest first, in pieces (NodeCore._changes): the first piece
# is the changes seen within this many seconds of the oldest, and no piece spans less.
PIECE_S = 0.02
SLOW_SYNC_S = 1.0  # a sync this long is logged with where its time went (SyncReport's split)


def backoff_delay(failures: int, base: float, rng: random.Random) -> float:
    """How long to wait after `failures` consecutive failed syncs: doubling from
    `base`, capped, with jitter (x0.5 to x1.5) so nodes do not retry in step."""
    return min(base * 2.0 ** min(failures, 6), MAX_BACKOFF) * (0.5 + rng.random())


def next_sync_due(
    *,
    last_sync: float,
    last_full: float,
    sync_period: float,
    drain_check: float | None = None,
    backoff: float | None = None,
    retry: float | None = None,
    sweep: float | None = None,
) -> float:
    """When the next sync is due, with nothing changed: the periodic full resync (or the
    next round of the rolling drift check), a re-check of draining real servers
    (`drain_check`: while any drain), a retry after a failed sync (`backoff`: while
    failing), a Service's retry (`retry`) or the drift check's next step (`sweep`: while a
    round is under way)."""
    due = last_full + sync_period
    if sweep is not None:
        due = min(due, last_sync + sweep)
    if drain_check is not None:
        due = min(due, last_sync + drain_check)
    if backoff is not None:
        due = min(due, last_sync + backoff)
    if retry is not None:
        due = min(due, retry)
    return due


def sync(reconciler: Reconciler, full: bool, *, freeze: bool = False, sweep: int = 0,
         until: float | None = None) -> SyncReport:
    """One reconciler sync; a full one walks the whole state, so the cyclic garbage collector
    is paused through it, and with `freeze` (the daemon, once its start-up state is frozen) the
    state it leaves is frozen after it (gcpause.py says why). `sweep`: keys of the rolling drift
    check compared too (incremental syncs only); the sync that ends a round freezes as a full
    one does. `until`: only the changes first seen by then (incremental syncs only). The daemon
    and the benchmark both sync here."""
    if not full:
        rounds = reconciler.sweeps
        report = reconciler.sync(False, sweep, until)
        if freeze and reconciler.sweeps != rounds:  # a drift-check round ended: as after a full sync
            gcpause.refreeze()
        return report
    with gcpause.paused(freeze=freeze):
        return reconciler.sync(True)


def _say(reports: list[SyncReport]) -> None:
    """Log a sync (or the pieces of one tick's changes, as one): what it did, at info level
    when it changed something or was slow (then with where its time went), else at debug."""
    last = reports[-1]
    duration = sum(r.duration for r in reports)
    ops = sum(len(r.ops) for r in reports)
    fw = sum(r.firewall_changes for r in reports)
    translated = sum(r.services_translated for r in reports)
    nft = f", {fw} nftables changes" if fw else ""
    kind = " (full)" if last.full else f" (drift check: {last.swept})" if last.swept else ""
    if len(reports) > 1:
        kind += f" ({len(reports)} pieces, oldest changes first)"
    slow = duration >= SLOW_SYNC_S
    if slow:  # where its time went
        kind += (f"; translate and plan {sum(r.compute_s for r in reports):.3f}s,"
                 f" IPVS {sum(r.apply_s for r in reports):.3f}s,"
                 f" nftables {sum(r.firewall_s for r in reports):.3f}s,"
                 f" its drift check {sum(r.check_s for r in reports):.3f}s")
    if ops or fw or slow:
        log.info("sync: %d services translated, %d operations%s in %.3fs%s", translated, ops, nft, duration, kind)
    else:  # the periodic full resync, every --sync-period: said only at debug level
        log.debug("sync: %d services translated, nothing to change in %.3fs%s", translated, duration, kind)


def translation_config(cfg: AgentConfig) -> Config:
    """The part of the agent's settings translation depends on."""
    return Config(cfg.node_name, cfg.scheduler, cfg.nodeport_addresses)


class NodeCore:
    """One node's proxy state machine. Not thread-safe beyond what the tracker is:
    one caller syncs at a time (the runner's thread, or a test)."""

    @classmethod
    def build(
        cls,
        cfg: AgentConfig,
        dataplane: Dataplane,
        *,
        registry: Registry | None = None,
        firewall: Firewall | None = None,
        dry_run: bool = False,
        on_object_problem: ProblemHook | None = None,
        on_service_problem: EventPoster | None = None,
        on_report: ReportHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> NodeCore:
        """The core `ipvsproxy run` runs, from its settings: a tracker for
        `cfg.node_name`, a reconciler on `dataplane` (and `firewall`, never on a
        dry run), the sync schedule of --sync-period and --min-sync-period, the
        first sync waiting until every watched kind is listed; one `clock` for
        all three. The hooks are where problems and sync reports go."""
        tracker = Tracker(cfg.node_name, on_problem=on_object_problem, clock=clock)
        reconciler = Reconciler(
            tracker, dataplane, translation_config(cfg), registry or default_registry(),
            excluded=cfg.excluded, grace=cfg.drain_grace_period, on_problem=on_service_problem,
            dry_run=dry_run, firewall=None if dry_run else firewall, clock=clock, drain_check=DRAIN_CHECK_S,
        )
        return cls(tracker, reconciler, sync_period=cfg.sync_period, min_period=cfg.min_sync_period,
                   clock=clock, rng=rng, ready=tracker.ready, on_report=on_report,
                   rolling=cfg.resync == "rolling")

    def __init__(
        self,
        tracker: Tracker,
        reconciler: Reconciler,
        *,
        sync_period: float = 30.0,
        min_period: float = 1.0,
        drain_check: float = DRAIN_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        ready: Callable[[], bool] | None = None,
        on_report: ReportHook | None = None,
        rolling: bool = False,
    ) -> None:
        self.tracker, self.reconciler = tracker, reconciler
        # --resync rolling: every --sync-period a drift-check round begins, compared a few keys
        # per sync (SWEEP_SHARE) instead of one full sync that holds up the changes behind it.
        self.rolling = rolling
        # seconds per key compared, as the last drift-check step took; unknown at first, so a round's
        # first step compares SWEEP_MIN keys (at an assumed 1 ms a key it compared 200, which took
        # ~10 s under emulation, and the changes behind that tick waited for it)
        self.sweep_cost = math.inf
        self.sync_period, self.min_period, self.drain_check = sync_period, min_period, drain_check
        self.clock = clock
        self.rng = rng or random.Random()
        # The first sync waits until every watched kind has been listed once.
        self.ready = ready or (lambda: True)
        self.on_report = on_report
        self.full_requested = False
        self.failures = 0
        self.backoff = 0.0
        self.last_error: str | None = None
        self.last_sync = self.last_full = -1e9
        # Set once the state of the first sync is frozen (the daemon: gcpause.StartupPause): from
        # then on each full sync freezes the state it leaves too.
        self.freeze_full_syncs = False

    def runner(self) -> Runner:
        """A bounded-frequency runner for `tick`, on this core's clock, woken by
        every change the tracker records, at most once per `min_period`."""
        return Runner(self.tick, min_interval=self.min_period, clock=self.clock, wake=self.tracker.changed)

    def request_full(self) -> None:
        """Make the next sync a full one (SIGHUP); the caller pokes its runner."""
        self.full_requested = True

    def sync_now(self, full: bool, sweep: int = 0, until: float | None = None,
                 say: bool = True) -> SyncReport | None:
        """One sync, accounted (failures counted, the report hook called); the
        report, or None when it raised. A full sync walks the whole state: the cyclic
        garbage collector is paused through it (gcpause.py says why). `say`: log its line
        (the pieces of a tick's changes are said together: _changes)."""
        try:
            report = sync(self.reconciler, full, freeze=self.freeze_full_syncs, sweep=sweep, until=until)
        except Exception as exc:  # any failure: keep serving the last good state, retry
            self.failures += 1
            self.last_error = str(exc)
            log.error("sync failed (attempt %d): %s", self.failures, exc)
            if self.on_report:
                self.on_report(None, exc)
            return None
        self.failures = 0
        self.last_error = None
        if say:
            _say([report])
        if self.on_report:
            self.on_report(report, None)
        return report

    def tick(self) -> float | None:
        """The runner's function: one sync if the sources are ready (full when
        asked for or when the sync period has passed); returns when the next
        sync is due (None: not ready yet, wait for a change)."""
        if not self.ready():
            return None
        now = self.clock()
        due = now - self.last_full >= self.sync_period
        sweep = 0
        if self.rolling:  # full only at start-up, on SIGHUP or after a failed sync
            full = self.full_requested or self.reconciler.need_full
            if not full and (due or self.reconciler.sweeping):
                sweep = max(SWEEP_MIN, int(SWEEP_SHARE * self.min_period / self.sweep_cost))
            if full or (due and not self.reconciler.sweeping):  # a round begins (or a full sync did it all)
                self.last_full = now
        else:
            full = self.full_requested or due
            if full:
                self.last_full = now
        self.full_requested = False
        self.last_sync = now
        report = self.sync_now(full) if full else self._changes(now)
        if sweep and report is not None:  # the changes went first: they never wait behind a drift-check step
            # nor do those seen while they were synced: a pass of their own, then a step that
            # carries no change (those seen from here on are the next tick's)
            if self.tracker.oldest_dirty() is not None:  # (a tick with a drift-check step is never full)
                report = self._changes(self.clock())
            if report is not None:
                report = self.sync_now(False, sweep, until=-math.inf)
            if report is not None and report.swept:
                self.sweep_cost = max(report.duration / report.swept, 1e-6)
        self.backoff = backoff_delay(self.failures, self.min_period, self.rng)
        return self.next_due()

    def _changes(self, start: float) -> SyncReport | None:
        """The changes first seen before this tick began (`start`), oldest first, in pieces
        that keep pace with their arrival: the first piece is the changes seen within
        PIECE_S of the oldest, each next one those seen in as long a span as the last piece
        took to sync (at least PIECE_S). A lone change, or a burst seen at once, is one sync
        as before; under a steady stream the change that waited the whole coalescing window
        is in the kernel a piece's sync after the tick begins, not after all the changes that
        came behind it (issue 18, target 5). Changes seen after `start` wait for the next
        tick (the runner's interval bounds how often there is one). The pieces are logged
        as one sync. Returns the last piece's report (None: one failed; the rest wait for
        the retry)."""
        reports: list[SyncReport] = []
        span = PIECE_S
        while True:
            oldest = self.tracker.oldest_dirty()
            if oldest is None or oldest > start:
                break
            report = self.sync_now(False, until=min(start, oldest + span), say=False)
            if report is None:  # failed (and said so): what is left waits for the retry
                if reports:
                    _say(reports)
                return None
            reports.append(report)
            span = max(PIECE_S, report.duration)
        if not reports:  # nothing changed: a sync all the same (retries, drains, a full one due)
            return self.sync_now(False)
        _say(reports)
        return reports[-1]

    def next_due(self) -> float:
        return next_sync_due(
            last_sync=self.last_sync, last_full=self.last_full, sync_period=self.sync_period,
            drain_check=self.drain_check if self.reconciler.draining else None,
            backoff=self.backoff if self.failures else None,
            retry=self.reconciler.next_retry(),
            sweep=self.min_period if self.reconciler.sweeping else None,
        )
