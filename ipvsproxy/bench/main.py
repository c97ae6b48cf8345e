"""The harness: for each cluster size, build the cluster, run the scenarios, write results.

`ipvsproxy bench` (cli/bench.py) and `python -m ipvsproxy.bench` call
:func:`run`. The JSON document is rewritten after every cluster size, so a
long run that is interrupted still leaves its finished sizes behind.
"""

from __future__ import annotations

import contextlib
import cProfile
import datetime
import io
import json
import logging
import os
import platform
import pstats
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import RESYNC_DEFAULT
from . import procstart, report, rss, scenarios
from .cluster import ClusterSpec, SyntheticCluster
from .progress import Progress

SCENARIOS = ("cold", "steady", "churn", "restart")
SCHEMA = "ipvsproxy-bench/1"


@dataclass
class Options:
    scenarios: tuple[str, ...] = SCENARIOS
    services: tuple[int, ...] = (1000,)
    endpoints: int = 10
    dataplane: str = "memory"  # memory | kernel
    reference: bool = True
    out: str = "results/bench.json"
    plot: str | None = None
    seed: int = 1
    noise: bool = True
    churn_steps: int = 300
    churn_rate: float = 0.0
    churn_duration: float = 5.0
    min_sync_period: float = 1.0
    resync: str = RESYNC_DEFAULT  # the --churn-rate phase's drift check, as `run --resync`
    rss: bool | None = None  # None: on for the memory dataplane
    naive_objects: int = 2000
    nftables: bool = True  # kernel runs: the nftables companion with the real nft, as `run` ships
    profile: str | None = None  # directory for cProfile output of the cold start
    include: tuple[str, ...] = field(default_factory=tuple)
    nft_cost: tuple[int, ...] = ()  # set-element counts: the companion with the real nft (bench/nftcost.py)
    process_start: tuple[str, ...] = ()  # manifest formats for `run --from-file --once` (bench/procstart.py)
    progress: bool = False


def environment() -> dict[str, Any]:
    commit = ""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[2], check=False, timeout=10).stdout.strip()
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "in_vm": bool(os.environ.get("IN_VM")), "commit": commit, "argv": sys.argv[1:]}


def _profile_cold(ctx: scenarios.Context, dp: Any, path: str) -> tuple[dict[str, Any], Any, list[str]]:
    prof = cProfile.Profile()
    result, agent = prof.runcall(scenarios.cold, ctx, dp)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(path)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    top = [ln.rstrip() for ln in buf.getvalue().splitlines() if ln.strip()][-16:]
    return result, agent, top


def run_memory(ctx: scenarios.Context, opts: Options, n: int) -> dict[str, Any]:
    from ..dataplane.memory import MemoryDataplane

    sc: dict[str, Any] = {}
    dp = MemoryDataplane()
    out: dict[str, Any] = {"scenarios": sc}
    ctx.progress.note(f"memory: cold start, {n} Services")
    if opts.profile:
        path = str(Path(opts.profile) / f"bench-cold-memory-{n}.pstats")
        sc["cold"], agent, out["profile_cold_top"] = _profile_cold(ctx, dp, path)
        out["profile_cold_file"] = path
    else:
        sc["cold"], agent = scenarios.cold(ctx, dp)
    if "steady" in opts.scenarios:
        ctx.progress.note("memory: steady resync")
        sc["steady"] = scenarios.steady(ctx, agent)
    if "restart" in opts.scenarios:
        ctx.progress.note("memory: restart adoption")
        sc["restart"] = scenarios.restart(ctx, dp)
    for fmt in opts.process_start:
        ctx.progress.note(f"memory: process start, `run --from-file cluster.{fmt} --once`")
        out.setdefault("process_start", {})[fmt] = procstart.measure(ctx, fmt, "memory")
    if "churn" in opts.scenarios:
        if opts.churn_steps:
            sc["churn"] = scenarios.churn(ctx, agent, opts.churn_steps, opts.seed)
        if opts.churn_rate > 0:
            sc["churn_rate"] = scenarios.churn_rate(ctx, agent, opts.churn_rate, opts.churn_duration,
                                                    opts.min_sync_period, opts.seed + 1, resync=opts.resync)
    return out


def load_includes(paths: tuple[str, ...]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"{p}: not an ipvsproxy bench result (schema {doc.get('schema')!r})")
        for r in doc.get("runs", []):
            runs.append({**r, "source": r.get("source") or p})
    return runs


def run(opts: Options) -> dict[str, Any]:
    progress = Progress(opts.progress)
    quiet = logging.getLogger("ipvsproxy.reconcile")  # one INFO line per sync would drown the output
    if quiet.getEffectiveLevel() < logging.WARNING:
        quiet.setLevel(logging.WARNING)
    doc: dict[str, Any] = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "environment": environment(), "options": asdict(opts), "runs": []}
    doc["runs"] += load_includes(opts.include)
    want_rss = opts.rss if opts.rss is not None else opts.dataplane == "memory"
    for n in opts.services:
        cluster = SyntheticCluster(ClusterSpec(n, opts.endpoints, opts.seed, opts.noise))
        progress.note(f"building {n} Services x {opts.endpoints} endpoints (seed {opts.seed})")
        ctx = scenarios.Context.build(cluster, progress)
        result: dict[str, Any] = {"services": n, "endpoints": opts.endpoints, "dataplane": opts.dataplane,
                                  "seed": opts.seed, "in_vm": bool(os.environ.get("IN_VM"))}
        if opts.dataplane == "memory":
            result |= run_memory(ctx, opts, n)
        else:
            from .kernel import run_kernel

            result |= run_kernel(ctx, set(opts.scenarios), reference=opts.reference, churn_steps=opts.churn_steps
                                 if "churn" in opts.scenarios else 0, seed=opts.seed,
                                 naive_objects=opts.naive_objects, nftables=opts.nftables,
                                 process_start=opts.process_start, churn_rate=opts.churn_rate,
                                 churn_duration=opts.churn_duration, min_sync_period=opts.min_sync_period,
                                 resync=opts.resync)
        del ctx, cluster
        if want_rss and "cold" in opts.scenarios:
            progress.note(f"RSS probe (fresh process), {n} Services")
            result["rss"] = {mode: rss.run_child(n, opts.endpoints, opts.seed, mode, opts.noise)
                             for mode in ("full", "paged")}
        doc["runs"].append(result)
        doc["targets"] = report.targets(doc)
        report.write_json(doc, opts.out)
    if opts.nft_cost:
        from . import nftcost

        progress.note(f"nftables companion with the real nft: {', '.join(map(str, opts.nft_cost))} elements")
        doc["nft_cost"] = nftcost.run_isolated(opts.nft_cost)
    doc["targets"] = report.targets(doc)
    if opts.plot:
        doc["plots"] = report.plot(doc, opts.plot)
    report.write_json(doc, opts.out)
    return doc
