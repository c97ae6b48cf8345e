"""The scenarios, run through the agent's own code path on any dataplane.

Each drives the core `ipvsproxy run` runs, built the same way
(`core.NodeCore.build` from the agent's settings): raw dicts go in through
Tracker.replace/upsert, Reconciler.sync plans and applies. The dataplane
is wrapped in :class:`~.dataplanes.Timed` so a sync's time splits into
control plane (translate, plan, bookkeeping) and dataplane (the kernel, or
the in-memory model's copying).

cold     empty dataplane -> full table (list, then one full sync)
steady   nothing changed: a relist plus incremental sync, and a full resync
churn    one endpoint add/remove/scale per step, one sync per step; optionally
         also at a rate through the Runner (bounded-frequency, coalescing)
restart  a new agent on the programmed table adopts it (expect 0 operations)

Invariants are checked, not assumed: after every scenario the table equals
the desired state computed independently by translate().
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .. import gcpause
from ..config import RESYNC_DEFAULT, AgentConfig
from ..core import NodeCore, translation_config
from ..core import sync as core_sync
from ..dataplane.base import Dataplane
from ..model import DesiredState, ObservedState
from ..reconcile import Firewall, Reconciler, SyncReport
from ..schedulers import Registry, default_registry
from ..tracker import Tracker
from ..translate import translate
from .cluster import NODE_NAME, SyntheticCluster
from .dataplanes import Timed, TimedFirewall
from .progress import Progress, summary

Listing = list[tuple[str, list[dict[str, Any]]]]
CHURN_KINDS = (("add", 0.4), ("remove", 0.4), ("scale", 0.2))


def bench_settings(**overrides: Any) -> AgentConfig:
    """The agent's settings for a benchmark: the defaults `ipvsproxy run` ships, on
    the synthetic node, no HTTP, and a resync period longer than any run (the
    scenarios ask for every full sync themselves)."""
    return AgentConfig(node_name=NODE_NAME, sync_period=3600.0, healthz_bind_address="",
                       metrics_bind_address="", **overrides)


@dataclass
class Context:
    cluster: SyntheticCluster
    listing: Listing
    settings: AgentConfig
    registry: Registry
    progress: Progress

    @classmethod
    def build(cls, cluster: SyntheticCluster, progress: Progress | None = None) -> Context:
        """Render every object once, up front, so rendering is never timed."""
        progress = progress or Progress(False)
        listing: Listing = []
        n = len(cluster.services)
        for kind, objects in cluster.listing():
            listing.append((kind, list(progress.iterate(objects, f"render {kind}s", n))))
        return cls(cluster, listing, bench_settings(), default_registry(), progress)


@dataclass
class Agentlet:
    """The agent's core (core.NodeCore, what `ipvsproxy run` drives) on a timed dataplane."""

    core: NodeCore
    dp: Timed
    fw: TimedFirewall | None = None

    @property
    def tracker(self) -> Tracker:
        return self.core.tracker

    @property
    def rec(self) -> Reconciler:
        return self.core.reconciler


def make_agent(ctx: Context, dp: Dataplane, firewall: Firewall | None = None) -> Agentlet:
    """The agent's core (NodeCore.build, as agent.py builds it) on a timed dataplane and firewall."""
    timed = dp if isinstance(dp, Timed) else Timed(dp)
    fw = TimedFirewall(firewall) if firewall is not None else None
    core = NodeCore.build(ctx.settings, cast(Dataplane, timed), registry=ctx.registry, firewall=fw)
    return Agentlet(core, timed, fw)


def ingest(ctx: Context, tracker: Tracker) -> float:
    """List every kind into the tracker (the real parse path); returns seconds."""
    t = time.perf_counter()
    for kind, objects in ctx.listing:
        tracker.replace(kind, ctx.progress.iterate(objects, f"list {kind}s", len(objects)))
    return time.perf_counter() - t


def _wire(dp: Timed) -> Any:
    return getattr(dp.inner, "wire", None)


def _snapshot(dp: Timed) -> dict[str, int]:
    c = dp.counters
    snap = {"messages": c.messages, "round_trips": c.round_trips, "dumps": c.dumps}
    wire = _wire(dp)
    if wire is not None:
        w = wire.counters
        snap |= {"nl_sent": w.messages_sent, "nl_sendmsg": w.sendmsg_calls, "nl_recv": w.recv_calls}
    return snap


def timed_sync(agent: Agentlet, full: bool) -> tuple[SyncReport, dict[str, Any]]:
    """One sync with its costs: times split, operations by kind, netlink traffic."""
    before = _snapshot(agent.dp)
    agent.dp.reset()
    if agent.fw is not None:
        agent.fw.seconds = 0.0
        reads = agent.fw.reads
    cpu = time.process_time()
    report = core_sync(agent.rec, full, freeze=agent.core.freeze_full_syncs)
    cpu = time.process_time() - cpu  # this process's CPU (user + system: the netlink calls too)
    after = _snapshot(agent.dp)
    delta = {k: after[k] - before[k] for k in before}
    m: dict[str, Any] = {
        "sync_s": report.duration,
        "cpu_s": round(cpu, 4),
        "dataplane_s": agent.dp.total,
        "dataplane_split_s": dict(agent.dp.seconds),
        "control_plane_s": max(0.0, report.duration - agent.dp.total),
        "services_translated": report.services_translated,
        "write_ops": len(report.ops),
        "ops": dict(Counter(op.kind.value for op in report.ops)),
        "messages": delta["messages"],  # netlink write messages (the in-memory model counts one per op)
        "round_trips": delta["round_trips"],
        "dumps": delta["dumps"],
        "read_keys": agent.dp.read_keys,  # virtual servers read back for an incremental sync
    }
    if agent.fw is not None:  # the nftables companion's share of sync_s (real nft in the kernel bench)
        m["firewall_s"] = agent.fw.seconds
        m["firewall_reads"] = agent.fw.reads - reads
        m["control_plane_s"] = max(0.0, m["control_plane_s"] - agent.fw.seconds)
    if "nl_sent" in delta:  # every netlink request on the IPVS socket, reads included
        m["netlink"] = {"requests": delta["nl_sent"], "sendmsg": delta["nl_sendmsg"], "recv": delta["nl_recv"]}
    return report, m


# ---- invariants ---------------------------------------------------------------------------
def expected(ctx: Context, tracker: Tracker) -> DesiredState:
    """The desired state from scratch (pure translate), independent of the reconciler's index."""
    slices = [s for group in tracker.groups.values() for s in group]
    desired, _ = translate(tracker.services.values(), slices, tracker.node,
                            translation_config(ctx.settings), ctx.registry)
    return desired


def table_problems(desired: DesiredState, observed: ObservedState, *, addresses: bool = True,
                   owned_only: bool = False, limit: int = 5) -> list[str]:
    """Differences between a desired and an observed table (empty: equal)."""
    out: list[str] = []
    for key, vs in desired.services.items():
        obs = observed.services.get(key)
        if obs is None:
            out.append(f"missing virtual server {key}")
        elif obs.settings() != vs.settings():
            out.append(f"{key}: settings {obs.settings()} != desired {vs.settings()}")
        else:
            want = {(r.address, r.port, r.weight) for r in vs.reals}
            have = {(o.address, o.port, o.weight) for o in obs.reals.values()}
            if want != have:
                out.append(f"{key}: real servers differ: missing {sorted(want - have)[:3]}, "
                           f"extra {sorted(have - want)[:3]}")
        if len(out) >= limit:
            return out
    for key, obs in observed.services.items():
        if key not in desired.services and (obs.owned or not owned_only):
            out.append(f"unexpected virtual server {key}")
            if len(out) >= limit:
                return out
    if addresses and desired.addresses != observed.addresses:
        out.append(f"bound addresses differ: missing {sorted(desired.addresses - observed.addresses)[:3]}, "
                   f"extra {sorted(observed.addresses - desired.addresses)[:3]}")
    return out


def table_size(desired: DesiredState) -> dict[str, Any]:
    kinds = Counter(vs.service.kind for vs in desired.services.values() if vs.service)
    return {"virtual_servers": len(desired.services),
            "real_servers": sum(len(vs.reals) for vs in desired.services.values()),
            "addresses": len(desired.addresses), "by_kind": dict(kinds),
            "objects": len(desired.services) + sum(len(vs.reals) for vs in desired.services.values())}


def check(ctx: Context, agent: Agentlet, result: dict[str, Any], observe: Callable[[], ObservedState]) -> None:
    desired = expected(ctx, agent.tracker)
    problems = table_problems(desired, observe())
    index_problems = table_problems(desired, _as_observed(agent.rec.index.state))
    result["table_matches_desired"] = not problems
    result["index_matches_translate"] = not index_problems
    if problems or index_problems:
        result["problems"] = problems + index_problems


def _as_observed(desired: DesiredState) -> ObservedState:
    from ..plan import Op, OpKind, apply_op

    state = ObservedState()
    for vs in desired.services.values():
        apply_op(state, Op(OpKind.ADD_VS, vs.key, vs=vs))
        for r in vs.reals:
            apply_op(state, Op(OpKind.ADD_RS, vs.key, real=r))
    state.addresses = set(desired.addresses)
    return state


# ---- scenarios ------------------------------------------------------------------------------
def first_sync(ctx: Context, agent: Agentlet) -> tuple[float, SyncReport, dict[str, Any]]:
    """List everything, then one full sync, with the garbage collector paused as the daemon
    pauses it from its start to the end of its first sync, and what it built frozen after it
    as the daemon freezes it (gcpause.StartupPause; later full syncs freeze again);
    (ingest seconds, report, costs)."""
    with gcpause.paused():
        ingest_s = ingest(ctx, agent.tracker)
        report, m = timed_sync(agent, full=True)
        gc.freeze()
    agent.core.freeze_full_syncs = True
    return ingest_s, report, m


def cold(ctx: Context, dp: Dataplane, firewall: Firewall | None = None) -> tuple[dict[str, Any], Agentlet]:
    """Empty dataplane -> full table: list everything, then one full sync."""
    agent = make_agent(ctx, dp, firewall)
    agent.dp.setup()
    t0 = time.perf_counter()
    ingest_s, report, m = first_sync(ctx, agent)
    wall = time.perf_counter() - t0
    result = {"wall_s": wall, "ingest_s": ingest_s, **m, "latency_s": summary(report.latencies)}
    result["table"] = table_size(agent.rec.index.state)
    check(ctx, agent, result, agent.dp.inner.observe)
    return result, agent


def steady(ctx: Context, agent: Agentlet) -> dict[str, Any]:
    """Nothing changed: a relist (watch re-established) + incremental sync, then a full resync."""
    t0 = time.perf_counter()
    relist_s = ingest(ctx, agent.tracker)
    _, inc = timed_sync(agent, full=False)
    relist_wall = time.perf_counter() - t0
    _, full = timed_sync(agent, full=True)
    result = {"relist": {"wall_s": relist_wall, "ingest_s": relist_s, **inc}, "full_resync": full,
              "write_ops": inc["write_ops"] + full["write_ops"]}
    check(ctx, agent, result, agent.dp.inner.observe)
    return result


def churn(ctx: Context, agent: Agentlet, steps: int, seed: int) -> dict[str, Any]:
    """One change per step (endpoint add, remove, or a scale of 3), one incremental sync per step."""
    rng = random.Random(seed)
    candidates = ctx.cluster.churnable()
    kinds = [k for k, _ in CHURN_KINDS]
    weights = [w for _, w in CHURN_KINDS]
    records: list[dict[str, Any]] = []
    ctx.progress.start("churn", steps)
    for _ in range(steps):
        s = rng.choice(candidates)
        kind = rng.choices(kinds, weights)[0]
        slices = ctx.cluster.churn(s, kind)  # rendering is not timed
        t = time.perf_counter()
        for sl in slices:
            agent.tracker.upsert("EndpointSlice", sl)
        upsert_s = time.perf_counter() - t
        report, m = timed_sync(agent, full=False)
        sid = f"{s.namespace}/{s.name}"
        rec = {"kind": kind, "service": sid, "virtual_servers": len(agent.rec.index.keys_of.get(sid, ())),
               "upsert_s": upsert_s, "latency_s": max(report.latencies, default=None), **m}
        records.append(rec)
        ctx.progress.advance()
    ctx.progress.finish()
    result = summarize_churn(records)
    check(ctx, agent, result, agent.dp.inner.observe)
    return result


def summarize_churn(records: list[dict[str, Any]]) -> dict[str, Any]:
    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        per_vs = [r["write_ops"] / r["virtual_servers"] for r in rs if r["virtual_servers"]]
        out: dict[str, Any] = {
            "changes": len(rs),
            "write_ops": summary([r["write_ops"] for r in rs], digits=3),
            "write_ops_per_virtual_server": summary(per_vs, digits=3),
            "control_plane_ms": summary([r["upsert_s"] + r["control_plane_s"] for r in rs], 1000, 4),
            "sync_ms": summary([r["sync_s"] for r in rs], 1000, 4),
            "latency_ms": summary([r["latency_s"] for r in rs if r["latency_s"] is not None], 1000, 4),
        }
        if any("firewall_s" in r for r in rs):
            out["firewall_ms"] = summary([r["firewall_s"] for r in rs], 1000, 4)
            out["firewall_reads"] = sum(r["firewall_reads"] for r in rs)
        if any("netlink" in r for r in rs):
            out["netlink_requests"] = summary([r["netlink"]["requests"] for r in rs], digits=3)
            out["netlink_sendmsg"] = summary([r["netlink"]["sendmsg"] for r in rs], digits=3)
        return out

    single = [r for r in records if r["kind"] in ("add", "remove")]
    one_vs = [r for r in single if r["virtual_servers"] == 1]
    return {
        "all": block(records),
        "by_kind": {k: block([r for r in records if r["kind"] == k]) for k, _ in CHURN_KINDS},
        "single_endpoint": block(single),
        "single_endpoint_one_vs": block(one_vs),  # the "one endpoint change": one real server
        "full_syncs": sum(1 for r in records if r["dumps"]),
    }


RUNNER_STOP_S = 1800.0  # how long the churn phase waits for the runner's last sync to end


def churn_rate(ctx: Context, agent: Agentlet, rate: float, duration: float, min_period: float,
               seed: int, resync: str = RESYNC_DEFAULT) -> dict[str, Any]:
    """Changes at `rate` per second for `duration` s, synced by the real Runner (coalescing), with
    the periodic drift check of `ipvsproxy run` (--sync-period, 30 s by default; `resync` as
    --resync: one full sync, or a rolling round) in a phase that lasts longer than that."""
    rng = random.Random(seed)
    candidates = ctx.cluster.churnable()
    reports: list[tuple[float, SyncReport]] = []
    errors: list[str] = []
    got = threading.Event()

    def on_report(report: SyncReport | None, error: BaseException | None) -> None:
        if report is None:
            errors.append(str(error))
        else:
            reports.append((time.monotonic(), report))
        got.set()

    agent.core.on_report, agent.core.min_period = on_report, min_period
    agent.core.sync_period = AgentConfig().sync_period
    agent.core.rolling = resync == "rolling"
    runner = agent.core.runner()
    thread = threading.Thread(target=runner.run, name="bench-runner", daemon=True)
    thread.start()
    got.wait(600)  # the runner's first sync is a full one: not part of the measurement
    reports.clear()
    n = max(1, int(rate * duration))
    pauses: list[float] = []  # the collector's full (generation 2) collections in the phase, seconds each
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") == 2:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)
    read0, read_s0 = agent.dp.read_keys, agent.dp.seconds["observe_keys"]
    cpu0, t0 = time.process_time(), time.monotonic()
    ctx.progress.start(f"churn at {rate:g}/s", n)
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s = rng.choice(candidates)
        for sl in ctx.cluster.churn(s, "add" if rng.random() < 0.5 else "remove"):
            agent.tracker.upsert("EndpointSlice", sl)
        ctx.progress.advance()
    ctx.progress.finish()
    last = time.monotonic()
    deadline = last + max(30.0, 10 * min_period)
    while time.monotonic() < deadline:
        if reports and reports[-1][0] > last and not agent.tracker.changed.is_set():
            break
        got.clear()
        got.wait(0.05)
    runner.stop()
    # The runner ends after the sync under way, which in the test VM may be a full one of minutes:
    # the dataplane must not be read (check below) or closed (the caller) while it still runs.
    thread.join(RUNNER_STOP_S)
    gc.callbacks.remove(on_gc)
    if thread.is_alive():
        raise RuntimeError(f"churn: the agent's runner did not stop within {RUNNER_STOP_S:.0f} s of its last sync")
    elapsed = time.monotonic() - t0
    lat = [x for _, r in reports for x in r.latencies]
    result = {
        "rate_per_s": rate, "duration_s": duration, "min_sync_period_s": min_period, "changes": n,
        "resync": resync, "syncs": len(reports), "full_syncs": sum(1 for _, r in reports if r.full),
        "drift_rounds": agent.core.reconciler.sweeps, "keys_compared": sum(r.swept for _, r in reports),
        "errors": len(errors),
        "write_ops": sum(len(r.ops) for _, r in reports),
        # virtual servers read back from the kernel key by key (changed ones that could not be
        # planned from what was programmed, and the drift check's), and the time those reads took
        "read_keys": agent.dp.read_keys - read0,
        "read_keys_s": round(agent.dp.seconds["observe_keys"] - read_s0, 3),
        "sync_ms": summary([r.duration for _, r in reports], 1000, 4),
        "latency_ms": summary(lat, 1000, 4),
        "cpu_fraction": round((time.process_time() - cpu0) / elapsed, 4) if elapsed else None,
        "gc_full_collections": {"count": len(pauses), "max_ms": round(max(pauses, default=0.0) * 1000, 1),
                                "total_ms": round(sum(pauses) * 1000, 1)},
        "slowest_syncs": [sync_split(r) for _, r in sorted(reports, key=lambda x: -x[1].duration)[:SLOWEST]],
    }
    check(ctx, agent, result, agent.dp.inner.observe)
    return result


SLOWEST = 5  # syncs of the --churn-rate phase whose split the result keeps


def sync_split(r: SyncReport) -> dict[str, Any]:
    """One sync's time and where it went (SyncReport's split), in ms, with what it carried."""
    def ms(seconds: float) -> float:
        return round(seconds * 1000, 1)

    return {"ms": ms(r.duration), "compute_ms": ms(r.compute_s), "apply_ms": ms(r.apply_s),
            "firewall_ms": ms(r.firewall_s), "check_ms": ms(r.check_s),
            "services_translated": r.services_translated, "swept": r.swept, "write_ops": len(r.ops),
            "firewall_changes": r.firewall_changes, "full": r.full}


def restart(ctx: Context, dp: Dataplane, firewall: Firewall | None = None) -> dict[str, Any]:
    """A new agent (fresh tracker and reconciler) on an already programmed dataplane."""
    agent = make_agent(ctx, dp, firewall)
    agent.dp.setup()
    t0 = time.perf_counter()
    ingest_s, report, m = first_sync(ctx, agent)
    result = {"wall_s": time.perf_counter() - t0, "ingest_s": ingest_s, **m,
              "latency_s": summary(report.latencies)}
    check(ctx, agent, result, agent.dp.inner.observe)
    return result
