"""The reconciler: joins sources, translation, planner and dataplane.

A sync re-translates only the Services the tracker marked dirty, keeps the
desired state as an index (which Service holds which virtual server), and
plans only the virtual servers that changed: against what it programmed
there when that is known (no kernel read), else against a fresh read of just
those. A full sync (start-up, SIGHUP, after a sync that raised; every
--sync-period with --resync full) dumps the whole kernel table and repairs
drift; the rolling drift check does it a few keys per sync. Operations the
kernel refuses are accounted per Service (retry.py): that Service is retried
with backoff and reported, the sync itself succeeds and the next one stays
incremental. Timing (when to sync, full or not, backoff) is core.py's; the
thread that waits is runner.py's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from .dataplane.base import Dataplane, Failure
from .model import (
    FULL,
    Delta,
    DesiredState,
    ObservedState,
    ObservedVS,
    Scope,
    ServiceKind,
    VirtualServer,
    VSKey,
    merge_delta,
    record_change,
)
from .model import Protocol as IPProtocol
from .objects import Service
from .plan import DrainKey, DrainPolicy, Op, OpKind, OpNote, apply_op, pending_drains, plan
from .retry import Backoff, Failing, RetrySchedule
from .schedulers import Registry
from .tracker import Tracker
from .translate import Config, HealthCheck, Translation, translate_service

log = logging.getLogger(__name__)

# The rolling drift check reads this many of the kernel's keys (a services-only dump, identity
# decoded only) per key it compares (a fresh read of one virtual server and its real servers,
# then planned): in the test VM a key read costs ~75 us and a key compared ~3 ms, so reading
# adds about a fifth to a step, and the dump has been read when an eighth of the round is done.
KEYS_READ_PER_COMPARED = 8
# ... and the firewall's own drift check (Firewall.check_step) reads this many of the kernel's
# set elements per key compared: about 13 elements a virtual server of 10 endpoints, so its
# check ends in well under half a round, ~1,500 elements (a few netlink pages) a step at 10,000
# Services, instead of the whole table (~190,000 elements) in the round's last step.
FIREWALL_READ_PER_KEY = 32
# Virtual servers with a draining real server are read back for its connection count at most this
# often (and whenever they change), not at every sync: under churn with long-lived connections a
# node drains hundreds at once, and a read costs ~2 ms each under emulation. kube-proxy's graceful
# termination manager looks once a minute; core.py schedules a sync this often while any drain.
DRAIN_CHECK_S = 5.0

# Who hears about a Service's problem (reason, message): the agent turns it into a
# Warning Event on the Service (and a metric). The one name for this callback.
EventPoster = Callable[[Service, str, str], None]


class Firewall(Protocol):
    """Packet-filter companion to IPVS (dataplane/nft.py), kept in step after
    every sync from the same change delta the planner gets.

    `sync` takes the (old, new) virtual servers of the keys that changed and
    returns the number of changes it made; `full` asks it to also check the
    kernel for drift (the periodic full sync). `check_step` is one step of its
    own rolling drift check (a step of the reconciler's drift-check round: read
    about `budget` more of the kernel's elements, repair what differs). `behind`:
    an earlier sync of it failed and it has changes still to send (the
    reconciler calls it then even when nothing else changed)."""

    def sync(self, delta: Delta, full: bool = False) -> int: ...

    def check_step(self, budget: int) -> int: ...

    @property
    def behind(self) -> bool: ...


class SyncError(RuntimeError):
    """A sync could not apply everything; the next one will retry."""


@dataclass(slots=True)
class SyncReport:
    """What one sync did, for logs, metrics and benchmarks."""

    full: bool
    services_translated: int = 0
    ops: list[Op] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    duration: float = 0.0
    # event seen -> its change in IPVS and nftables (before a drift-check step's firewall check)
    latencies: list[float] = field(default_factory=list)
    firewall_changes: int = 0
    service_failures: dict[str, str] = field(default_factory=dict)  # Service id (or object) -> why
    recovered: list[str] = field(default_factory=list)  # Services that went through after failing
    swept: int = 0  # virtual servers the rolling drift check compared in this sync (--resync rolling)
    # Where the time went, seconds: translate + plan (with the drift check's reads), IPVS and
    # addresses, the nftables companion's change, its drift-check step. A slow sync says which.
    compute_s: float = 0.0
    apply_s: float = 0.0
    firewall_s: float = 0.0
    check_s: float = 0.0


class DesiredIndex:
    """The desired state kept per Service, so one Service can change alone.

    Two Services claiming one address:port: the first holds it; the other
    waits and is re-translated when the holder lets go.

    A bound address is reference-counted per key (VIP, protocol, port) held,
    never per virtual server produced: one Service yielding one key twice
    holds it once, so deleting the Service lets the address go.
    """

    def __init__(self) -> None:
        self.state = DesiredState()
        self.real_servers = 0  # over every virtual server in the state (a metric; kept, not summed per sync)
        self.keys_of: dict[str, tuple[VSKey, ...]] = {}  # tuples: a set per Service costs 2 MiB at 10k
        self.owner: dict[VSKey, str] = {}
        self.waiting: dict[VSKey, set[str]] = {}
        self.bind_refs: dict[str, int] = {}
        self.state.addresses = self.bind_refs.keys()  # the addresses to bind: those with a count

    def _bindable(self, vs: VirtualServer) -> bool:
        return vs.bind and vs.service is not None and vs.service.kind != ServiceKind.NODE_PORT

    def _ref(self, vs: VirtualServer, delta: int) -> None:
        if not self._bindable(vs):
            return
        n = self.bind_refs.get(vs.key.address, 0) + delta
        if n > 0:
            self.bind_refs[vs.key.address] = n
        else:
            self.bind_refs.pop(vs.key.address, None)

    def update(self, sid: str, servers: Iterable[VirtualServer]) -> IndexUpdate:
        """Set one Service's virtual servers; returns the change delta with the rest."""
        changes: Delta = {}
        freed_for: set[str] = set()
        problems: list[str] = []
        for key in self.keys_of.pop(sid, ()):
            old = self.state.services.pop(key)
            self.real_servers -= len(old.reals)
            self._ref(old, -1)
            del self.owner[key]
            record_change(changes, key, old, None)
            freed_for |= self.waiting.pop(key, set())
        for w in self.waiting.values():
            w.discard(sid)
        mine: set[VSKey] = set()
        for vs in servers:
            if vs.key in mine:  # the same key twice from one Service (externalIP == LB IP, a repeated port):
                continue  # the first wins, as in translate(), and is counted once, so its address goes with it
            holder = self.owner.get(vs.key)
            if holder is not None and holder < sid:
                self.waiting.setdefault(vs.key, set()).add(sid)
                problems.append(f"Service {sid}: {vs.key} already belongs to Service {holder}; ignored")
                continue
            if holder is not None and holder != sid:  # the first by namespace/name wins, as in translate()
                self._ref(self.state.services[vs.key], -1)
                self.keys_of[holder] = tuple(k for k in self.keys_of[holder] if k != vs.key)
                self.waiting.setdefault(vs.key, set()).add(holder)
                problems.append(f"Service {holder}: {vs.key} now belongs to Service {sid}; ignored")
            prior = self.state.services.get(vs.key)
            record_change(changes, vs.key, prior, vs)
            self.real_servers += len(vs.reals) - (len(prior.reals) if prior is not None else 0)
            self.state.services[vs.key] = vs
            self.owner[vs.key] = sid
            self._ref(vs, +1)
            mine.add(vs.key)
        if mine:
            self.keys_of[sid] = tuple(mine)
        freed_for.discard(sid)
        return IndexUpdate(changes, freed_for, problems)


class IndexUpdate(NamedTuple):
    """What setting one Service's virtual servers changed."""

    changes: Delta  # keys added, changed or removed: (old, new) each
    freed_for: set[str]  # Services to re-translate: a key they wanted is free now
    problems: list[str]  # conflict messages


class Computed(NamedTuple):
    """A planned sync, not yet applied."""

    ops: list[Op]
    full: bool
    seen: dict[str, float]  # Service id -> when its change was first seen
    translated: int  # Services re-translated
    swept: int = 0  # keys of the drift-check round compared
    remembered: frozenset[VSKey] = frozenset()  # keys planned against what was programmed, not read


@dataclass(slots=True)
class _Refused:
    """The operations refused for one Service (or unowned object) in one sync."""

    messages: list[str] = field(default_factory=list)
    keys: set[VSKey] = field(default_factory=set)
    addresses: set[str] = field(default_factory=set)


class Reconciler:
    """One sync at a time: translate what changed, plan, apply, remember."""

    def __init__(
        self,
        tracker: Tracker,
        dataplane: Dataplane,
        cfg: Config,
        registry: Registry,
        *,
        excluded: Callable[[str], bool] = lambda a: False,
        grace: float = 30.0,
        on_problem: EventPoster | None = None,
        dry_run: bool = False,
        firewall: Firewall | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        drain_check: float = 0.0,
    ) -> None:
        """`drain_check`: seconds between reads of the draining virtual servers (0: every sync;
        the agent's is DRAIN_CHECK_S)."""
        self.firewall = firewall
        self.clock = clock
        # The change delta not yet handed to the firewall (the planner gets it at once;
        # the firewall after the dataplane applied it, or at the next sync if that raised).
        self.unsent: Delta = {}
        self.tracker, self.dp, self.cfg, self.registry = tracker, dataplane, cfg, registry
        self.excluded, self.grace, self.on_problem, self.dry_run = excluded, grace, on_problem, dry_run
        self.index = DesiredIndex()
        # What the dataplane holds, as far as this sync needs it: the bound
        # addresses (kept current between full dumps by mirroring our binds)
        # and, during a sync only, the virtual servers being planned. Keeping
        # a mirror of the whole kernel table between syncs would cost ~40 MiB
        # at 10,000 Services: the desired index already is what was programmed
        # (_remembered), and the rest an incremental sync reads from the kernel.
        self.cache = ObservedState()
        self.need_full = True
        # The rolling drift check (--resync rolling): the keys of the current round not yet
        # compared with the kernel, popped from the end a few per sync (start_sweep, compute);
        # the kernel's keys join them as its dump is read, a few pages per step (_next_swept).
        self.sweep: list[VSKey] = []
        self._round_keys: set[VSKey] = set()  # every key of the round so far, compared or not
        self._key_pages: Generator[list[VSKey] | None, None, None] | None = None  # the round's dump, not yet read
        self.sweeps = 0  # rounds completed
        self.retries = RetrySchedule(backoff)
        self._attempted: list[Failing] = []  # retries released into the current sync
        self.drain_started: dict[DrainKey, float] = {}
        self.drain_check = drain_check
        self._drain_read: dict[VSKey, float] = {}  # a draining virtual server -> when it was last read
        self.sched_problems: dict[str, str] = {}
        self.pending_seen: dict[str, float] = {}
        self.invalid_schedulers = 0
        self.syncs = 0
        # The node's own addresses (every interface but the dummy one), re-read
        # on full syncs: an external address among them is never bound (rule 5).
        self.local_addresses: frozenset[str] = frozenset()
        # Service id -> its health-check node port (rule 1); only Services that have one.
        self.health_checks: dict[str, HealthCheck] = {}

    # ---- translation ------------------------------------------------------
    def _translate(self, sid: str) -> IndexUpdate:
        svc = self.tracker.services.get(sid)
        t = Translation()
        if svc is not None:
            t = translate_service(
                svc, self.tracker.slices_for(sid), self.tracker.node, self.cfg, self.registry,
                self.dp.scheduler_usable, self.local_addresses,
            )
            self._report_scheduler(svc, t.scheduler_problem)
        else:
            self.sched_problems.pop(sid, None)
        if t.health is not None:
            self.health_checks[sid] = t.health
        else:
            self.health_checks.pop(sid, None)
        update = self.index.update(sid, t.servers)
        for p in t.problems + update.problems:
            log.warning("%s", p)
        return update

    def _report_scheduler(self, svc: Service, problem: str | None) -> None:
        """Warn once per change of the problem, not once per sync."""
        if problem is None:
            self.sched_problems.pop(svc.id, None)
            return
        if self.sched_problems.get(svc.id) == problem:
            return
        self.sched_problems[svc.id] = problem
        self.invalid_schedulers += 1
        log.warning("%s", problem)
        if self.on_problem:
            self.on_problem(svc, "InvalidScheduler", problem)

    def retranslate(self, sids: Iterable[str]) -> Delta:
        """Re-translate Services (and any that were waiting on a freed key);
        returns what changed, (old, new) per virtual server key."""
        delta: Delta = {}
        todo = sorted(sids, reverse=True)
        done: set[str] = set()
        while todo:
            sid = todo.pop()
            if sid in done:
                continue
            done.add(sid)
            update = self._translate(sid)
            merge_delta(delta, update.changes)
            if self.firewall is not None:  # at once: a later Service that raises must not lose this one's
                merge_delta(self.unsent, update.changes)
            todo += update.freed_for - done
        return delta

    # ---- syncing ----------------------------------------------------------
    @property
    def sweeping(self) -> bool:
        """A drift-check round is under way: keys left to compare, or the kernel's not all read."""
        return bool(self.sweep) or self._key_pages is not None

    def start_sweep(self) -> None:
        """Begin a round of the rolling drift check: every virtual server desired or in the
        kernel, compared a few per sync (compute's `sweep`) against a fresh read of just
        those, as an incremental sync reads its scope. The desired keys are known at once;
        the kernel's come from a services-only dump read a few pages per step (_next_swept),
        so no step waits for the whole table. The node's own addresses are re-read now, as a
        full sync does."""
        self._read_local_addresses()
        self._end_sweep()
        self.sweep = list(self.index.state.services)  # unsorted: sorting 18,000 keys took ~0.3 s in the VM
        self._round_keys = set(self.sweep)
        self._key_pages = self.dp.service_key_pages()

    def _next_swept(self, n: int) -> list[VSKey]:
        """The round's next `n` keys to compare. Each step reads KEYS_READ_PER_COMPARED times as
        many of the kernel's keys as it compares (a key read is far cheaper than a key
        compared), and more while it has nothing to compare: the dump ends early in the round,
        and the keys only the kernel has (strays) are compared as soon as they are read."""
        want = n * KEYS_READ_PER_COMPARED
        while self._key_pages is not None and (want > 0 or len(self.sweep) < n):
            try:
                page = next(self._key_pages)
            except StopIteration:
                self._key_pages = None
                break
            if page:  # None: the dump restarted; the keys seen are in _round_keys already
                want -= len(page)
                fresh = [k for k in page if k not in self._round_keys]
                self._round_keys.update(fresh)
                self.sweep.extend(fresh)
        swept = self.sweep[-n:]
        del self.sweep[-n:]
        return swept

    def _end_sweep(self) -> None:
        """Forget the round under way (a full sync compares everything); its dump is closed."""
        if self._key_pages is not None:
            self._key_pages.close()
            self._key_pages = None
        self.sweep = []
        self._round_keys = set()

    def compute(self, full: bool = False, sweep: int = 0, until: float | None = None) -> Computed:
        """Translate pending changes and plan; nothing is applied. `sweep`: also compare the
        next `sweep` keys of the drift-check round (a new round when none is under way); the
        round's last sync checks the bound addresses too. `until`: only the changes first
        seen by then (Tracker.take_dirty; a full sync takes them all)."""
        began = False
        if full or self.need_full:
            self._read_local_addresses()
        elif sweep and not self.sweeping:
            self.start_sweep()
            began = True  # an empty table makes a round of no keys: its end still checks addresses
        dirty, _ = self.tracker.take_dirty(None if full or self.need_full else until)
        for sid, t in dirty.items():
            self.pending_seen.setdefault(sid, t)
        changes = self.retranslate(dirty)  # the one change delta: the planner's scope, the firewall's input
        now = self.clock()
        full = full or self.need_full
        released = self.retries.released(now, dirty)
        held_keys, held_addresses = self.retries.held(now, dirty)
        scope = set(changes) | self._retry_scope(released)
        # Only what this sync really re-plans counts as retried (and is forgotten if it goes
        # through): everything in a full sync; else a changed Service, or one with virtual
        # servers to re-plan (an address no Service claims waits for the next full sync).
        self._attempted = released if full else [f for f in released
                                                  if f.unit in dirty or self._retry_scope([f])]
        swept: list[VSKey] = []
        round_end = False
        remembered: dict[VSKey, ObservedVS] = {}
        if full:
            self._end_sweep()  # a full sync compares everything: a round under way has nothing left to do
            self.cache = self.dp.observe()
            for dk in pending_drains(self.index.state, self.cache):
                self.drain_started.setdefault(dk, now)
        else:
            if sweep and (self.sweeping or began):
                swept = self._next_swept(sweep)
                round_end = not self.sweeping
                if round_end:
                    self._round_keys = set()
                scope.update(swept)
            if round_end:  # the bound addresses are compared whole, as a full sync does
                self.cache.addresses = self.dp.bound_addresses()
            draining = {dk.key for dk in self.drain_started}
            scope |= self._drains_due(now, draining)
            remembered = self._remembered(changes, scope.difference(swept), draining)
            self.cache.services = self._read(scope.difference(remembered))
            self.cache.services.update(remembered)
            if swept:  # drains the kernel holds that this agent has not timed (a restart)
                for dk in pending_drains(self.index.state, self.cache):
                    self.drain_started.setdefault(dk, now)
        ops = self._plan(FULL if full else scope, now, all_addresses=round_end)
        if held_keys or held_addresses:  # Services in backoff wait for their turn, even in a full sync
            ops = [op for op in ops if op.key not in held_keys and op.address not in held_addresses]
        self.cache.services = {}  # planned: only the addresses are kept (see __init__)
        if round_end:
            self.sweeps += 1
        return Computed(ops, full, dict(self.pending_seen), len(dirty), len(swept), frozenset(remembered))

    def _plan(self, scope: Scope, now: float, all_addresses: bool = False) -> list[Op]:
        """plan() of the desired state against the cache over `scope`, drains timed at `now`."""
        return plan(self.index.state, self.cache, scope=scope, excluded=self.excluded,
                    drain=DrainPolicy(self.grace, now, self.drain_started), all_addresses=all_addresses)

    def _read(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS]:
        """The kernel's copy of these virtual servers, read one by one (those it lacks left out)."""
        return {k: o for k, o in self.dp.observe_keys(keys).items() if o is not None}

    def _drains_due(self, now: float, draining: set[VSKey]) -> set[VSKey]:
        """Of the `draining` virtual servers, those to read in this sync: not read for
        `drain_check` seconds (one that changes is read anyway: _remembered)."""
        read = self._drain_read = {k: t for k, t in self._drain_read.items() if k in draining}
        due = {k for k in draining if now - read.get(k, -math.inf) >= self.drain_check}
        for k in due:
            read[k] = now
        return due

    def _remembered(self, changes: Delta, scope: set[VSKey], draining: set[VSKey]) -> dict[VSKey, ObservedVS]:
        """The changed virtual servers an incremental sync plans against what this agent
        programmed (their previous desired state, which the last sync applied whole) instead of
        reading them from the kernel: a read costs a dump per virtual server (~2 ms in the test
        VM), most of a small sync. Read all the same: a new key (a foreign or stray virtual
        server may sit there), one whose operations the kernel refused or that waits in backoff
        (its kernel state is unknown), one with a draining real server, and a TCP one losing a
        real server (whether to drain it or delete it depends on its connections). Nothing is
        remembered in a dry run (it applies nothing). A remembered key whose operation the
        kernel refuses was changed behind the agent's back: sync() reads it and plans again."""
        if self.dry_run or not changes:
            return {}
        unsure = set(draining)
        for f in self.retries.failing.values():
            unsure |= f.keys
        out: dict[VSKey, ObservedVS] = {}
        for key, (old, new) in changes.items():
            if old is None or key in unsure or key not in scope:
                continue
            if new is not None and key.protocol == IPProtocol.TCP and _loses_a_real(old, new):
                continue
            out[key] = old.as_programmed()
        return out

    def _replan_refused(self, ops: list[Op], failures: list[Failure],
                        remembered: frozenset[VSKey]) -> tuple[list[Op], list[Failure]]:
        """Refusals on keys planned from memory: the kernel's copy was changed behind the agent's
        back (a real server or the virtual server deleted, say). Read those keys, plan them
        again and apply that now, as a sync that had read them would have; the refused
        operations give way to the new plan's. Addresses are not re-planned (binds are kept
        in the cache, not remembered). Returns (operations, failures) of the whole sync."""
        again = {f.op.key for f in failures if f.op.key in remembered}
        if not again:
            return ops, failures
        log.info("%d virtual server(s) differ from what was programmed; read and planned again", len(again))
        refused = {id(f.op) for f in failures if f.op.key in again}
        self.cache.services = self._read(again)
        more = self._plan(again, self.clock())
        self.cache.services = {}
        more = [op for op in more if op.kind is not OpKind.BIND and op.kind is not OpKind.UNBIND]
        return ([op for op in ops if id(op) not in refused] + more,
                [f for f in failures if f.op.key not in again] + self.dp.apply(more))

    def _read_local_addresses(self) -> None:
        """Re-read the node's own addresses; when they changed, every Service
        is re-translated (which of its addresses to bind may have changed)."""
        local = frozenset(self.dp.local_addresses())
        if local != self.local_addresses:
            self.local_addresses = local
            self.tracker.mark_all()

    def _retry_scope(self, released: Iterable[Failing]) -> set[VSKey]:
        """The virtual servers to re-plan for retries that are due: those whose
        operations failed, and those sitting on an address that failed to bind."""
        keys: set[VSKey] = set()
        addresses: set[str] = set()
        for f in released:
            keys |= f.keys
            addresses |= f.addresses
        if addresses:
            keys |= {k for k in self.index.state.services if k.address in addresses}
        return keys

    def _units_of(self, op: Op, by_address: dict[str, set[str]]) -> list[str]:
        """Whom a failed operation is held against: its Service, else the object itself."""
        if op.kind is OpKind.BIND or op.kind is OpKind.UNBIND:
            address = op.address or ""
            return sorted(by_address.get(address, ())) or [address]
        if op.service is not None:
            return [op.service.service_id]
        if op.key is not None:
            return [self.index.owner.get(op.key) or str(op.key)]
        return [str(op)]

    def _account(self, report: SyncReport, now: float) -> None:
        """Record refused operations per Service: backoff, one warning (and Event)
        per change of the problem; forget the Services whose retry went through."""
        grouped: dict[str, _Refused] = {}
        by_address: dict[str, set[str]] = {}  # Services on each failed address (one walk, not one per op)
        failed_addresses = {f.op.address for f in report.failures if f.op.address}
        if failed_addresses:
            for k, vs in self.index.state.services.items():
                if k.address in failed_addresses and vs.service is not None:
                    by_address.setdefault(k.address, set()).add(vs.service.service_id)
        for f in report.failures:
            for unit in self._units_of(f.op, by_address):
                refused = grouped.setdefault(unit, _Refused())
                refused.messages.append(f.message)
                if f.op.kind is OpKind.BIND or f.op.kind is OpKind.UNBIND:
                    refused.addresses.add(f.op.address or "")
                elif f.op.key is not None:
                    refused.keys.add(f.op.key)
        for retried in self._attempted:
            if retried.unit not in grouped and self.retries.succeeded(retried.unit) is not None:
                report.recovered.append(retried.unit)
                log.info("%s: programmed after %d failed attempt(s)", retried.unit, retried.attempts)
        self._attempted = []
        for unit, refused in grouped.items():
            msgs = refused.messages
            message = msgs[0] if len(msgs) == 1 else f"{msgs[0]} (and {len(msgs) - 1} more)"
            old = self.retries.failing.get(unit)
            rec = self.retries.failed(unit, message, refused.keys, refused.addresses, now)
            report.service_failures[unit] = message
            text = f"kernel refused {message}; attempt {rec.attempts}, next in {rec.due - now:.0f}s"
            log.error("%s: %s", unit, text)
            if old is not None and old.message == message:
                continue  # one Event per change of the problem, not one per attempt
            svc = self.tracker.services.get(unit)
            if svc is not None and self.on_problem is not None:
                self.on_problem(svc, "ProgrammingFailed", text)

    @property
    def failing(self) -> int:
        """How many Services (or unowned objects) the kernel is refusing now."""
        return len(self.retries)

    def next_retry(self) -> float | None:
        """When the earliest per-Service retry is due (on the reconciler's clock)."""
        return self.retries.next_due()

    def sync(self, full: bool = False, sweep: int = 0, until: float | None = None) -> SyncReport:
        """One sync. Operations the kernel refuses are accounted per Service and
        do not fail it; raises (after applying what it could) when the dataplane
        or the firewall fails as a whole. After a dataplane failure the next sync
        is a full one; after a firewall failure the firewall retries its own
        pending changes (and reads the kernel only if they were refused)."""
        start = self.clock()
        self.syncs += 1
        try:
            computed = self.compute(full, sweep, until)
        except Exception:
            self.need_full = True
            raise
        ops, full, seen, swept = computed.ops, computed.full, computed.seen, computed.swept
        report = SyncReport(full, computed.translated, ops, swept=swept)
        report.compute_s = self.clock() - start
        if self.dry_run:
            report.duration = report.compute_s
            return report
        try:
            report.failures = self.dp.apply(ops)
            if report.failures and computed.remembered:
                ops, report.failures = self._replan_refused(ops, report.failures, computed.remembered)
                report.ops = ops
        except Exception:
            self.need_full = True
            raise
        report.apply_s = self.clock() - start - report.compute_s
        failed = {id(f.op) for f in report.failures}
        now = self.clock()
        for op in ops:
            if id(op) in failed:
                continue
            if op.kind is OpKind.BIND or op.kind is OpKind.UNBIND:
                apply_op(self.cache, op)  # the bound addresses stay current between full dumps
            self._track_drain(op, now)
        self._account(report, now)
        programmed = self.clock()  # the changes are in IPVS; with the firewall's, in nftables too
        if self.firewall is not None:
            # The firewall owns the delta from here: a failure is retried (and
            # repaired) by the firewall itself, so it does not make the next
            # sync a full one for IPVS too.
            try:
                t = self.clock()
                if self.unsent or full or self.firewall.behind:
                    delta, self.unsent = self.unsent, {}
                    report.firewall_changes = self.firewall.sync(delta, full)
                programmed = self.clock()
                report.firewall_s = programmed - t
                if sweep and not full:  # a drift-check step: the firewall's too (the changes are done)
                    report.firewall_changes += self.firewall.check_step(max(1, swept) * FIREWALL_READ_PER_KEY)
                    report.check_s = self.clock() - t - report.firewall_s
            except Exception as exc:
                raise SyncError(f"nftables: {exc}") from exc
        done = self.clock()
        report.duration = done - start
        self.need_full = False
        report.latencies = [programmed - t for t in seen.values()]
        self.pending_seen.clear()
        for op in ops:
            if op.note == OpNote.ADOPT:
                log.warning("took over foreign virtual server %s: Service %s claims it",
                            op.key, op.service)
        return report

    def _track_drain(self, op: Op, now: float) -> None:
        if not self.drain_started and op.note is not OpNote.DRAIN:
            return  # nothing draining, nothing starting to: most syncs, every cold start
        if op.kind is OpKind.DEL_VS:  # a deleted virtual server takes its draining reals with it
            for k in [k for k in self.drain_started if k.key == op.key]:
                del self.drain_started[k]
            return
        if op.key is None or op.real is None:
            return
        dk = DrainKey(op.key, op.real.address, op.real.port)
        if op.kind is OpKind.EDIT_RS and op.note == OpNote.DRAIN:
            self.drain_started.setdefault(dk, now)
            self._drain_read[op.key] = now  # this sync read it: the next look is drain_check away
        elif op.kind in (OpKind.DEL_RS, OpKind.EDIT_RS, OpKind.ADD_RS):
            self.drain_started.pop(dk, None)

    @property
    def draining(self) -> int:
        return len(self.drain_started)


def _loses_a_real(old: VirtualServer, new: VirtualServer) -> bool:
    """Whether a change takes a real server (address, port) away from a virtual server."""
    kept = {(r.address, r.port) for r in new.reals}
    return any((r.address, r.port) not in kept for r in old.reals)
