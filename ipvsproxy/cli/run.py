"""`ipvsproxy run`: the node agent (or one sync with --once, a plan with --dry-run)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from ..agent import Agent
from ..config import RESYNC_DEFAULT, RESYNC_MODES
from ..logfmt import escape
from ..reconcile import SyncReport
from . import common
from .common import make_config, summarize
from .options import CIDRs, Duration, opt, source_options, translate_options


@click.command()
@source_options
@translate_options
@opt("sync-period", default="30s", type=Duration(), help="The drift check that repairs the kernel tables, this often.")
@opt("resync", default=RESYNC_DEFAULT, type=click.Choice(RESYNC_MODES),
     help="The drift check every --sync-period: a round that compares a few virtual servers per sync, "
          "so changes never wait behind it (rolling), or one full sync (full, as kube-proxy).")
@opt("min-sync-period", default="1s", type=Duration(),
     help="At most one sync per interval; bursts of events coalesce (greater than 0, at most --sync-period).")
@opt("once", is_flag=True, help="One full sync, then exit (non-zero if it failed).")
@opt("dry-run", is_flag=True, help="Compute and print the operations; change nothing.")
@opt("healthz-bind-address", default="127.0.0.1:10256", help="host:port for /healthz ('' = off).")
@opt("metrics-bind-address", default="127.0.0.1:10249", help="host:port for /metrics ('' = off).")
@opt("metrics-stats-interval", default="10s", type=Duration(),
     help="Reuse one reading of the kernel's IPVS counters for /metrics this long (0s = read per scrape).")
@opt("metrics-per-address", is_flag=True,
     help="ipvsproxy_service_* series per virtual server (kind, address labels) instead of per Service port.")
@opt("tcp-timeout", default="0s", type=Duration(), help="IPVS TCP idle timeout (0 = leave the kernel's).")
@opt("tcpfin-timeout", default="0s", type=Duration(), help="IPVS TCP FIN_WAIT timeout (0 = leave).")
@opt("udp-timeout", default="0s", type=Duration(), help="IPVS UDP timeout (0 = leave the kernel's).")
@opt("strict-arp", is_flag=True, help="Set arp_ignore=1 and arp_announce=2 (needed by MetalLB L2).")
@opt("load-modules/--no-load-modules", "load_modules", default=True,
     help="Load ip_vs, ip_vs_<scheduler> and dummy when missing.")
@opt("cluster-cidr", "cluster_cidrs", default="", type=CIDRs(),
     help="Comma list of the pod CIDRs: Service traffic from outside them is masqueraded (nftables).")
@opt("masquerade-all", is_flag=True, help="Masquerade all traffic to Services (nftables).")
@opt("nftables/--no-nftables", "nftables", default=True,
     help="Keep table inet ipvsproxy (masquerade, hairpin, VIP port filter, LB source ranges) in step.")
@opt("dataplane", default="kernel", type=click.Choice(["kernel", "memory"]), hidden=True,
     help="Where to program (memory: a simulation, for demos and tests).")
@click.option("--timings", default=None, hidden=True, type=click.Path(dir_okay=False),
              help="With --once: write how long each step took, as JSON, here (`ipvsproxy bench --process-start`).")
def run(once: bool, dry_run: bool, dataplane: str, timings: str | None, **flags: Any) -> None:
    """Run the node agent: follow Services and program IPVS."""
    entered = time.time()  # exec -> here: interpreter start-up, imports, flag parsing
    if timings and (not once or dry_run):
        raise click.UsageError("--timings needs --once (and no --dry-run): it times one sync")
    cfg = make_config(**flags)
    if timings:
        _once_timed(cfg, dataplane, timings, entered)
        return
    if dry_run:
        dp = common.open_for_plan(dataplane, cfg)
        agent = Agent(cfg, dp, dry_run=True)
        report = agent.once()
        for op in report.ops:
            click.echo(escape(str(op)))
        click.echo(f"# dry run: {summarize(report.ops)}; nothing changed", err=True)
        return
    dp = common.open_dataplane(dataplane, cfg)
    agent = Agent(cfg, dp, firewall=common.open_firewall(dataplane, cfg),
                  stats_dataplane=lambda: common.open_dataplane(dataplane, cfg, for_reading=True))
    if once:
        _sync_once(agent, dp)
        return
    agent.run()


def _sync_once(agent: Agent, dp: Any) -> SyncReport:
    """`run --once`: one full sync, the dataplane closed after it, and its one-line summary."""
    try:
        report = agent.once()
    finally:
        dp.close()
    nft = f", {report.firewall_changes} nftables changes" if report.firewall_changes else ""
    click.echo(f"synced: {summarize(report.ops)}{nft} in {report.duration:.3f}s", err=True)
    return report


def _once_timed(cfg: Any, dataplane: str, path: str, entered: float) -> None:
    """`run --once` with its time split into steps, for the process-start benchmark: the
    dataplane and the nftables companion are wrapped in the benchmark's timers (and the kernel
    dataplane's netlink codecs too), which changes nothing they do."""
    from ..bench.dataplanes import Timed, TimedFirewall

    acc: dict[str, float] = {}
    if dataplane == "kernel":
        from ..bench.dataplanes import open_instrumented

        inner, acc = open_instrumented(cfg)
    else:
        inner = common.open_dataplane(dataplane, cfg)
    dp = Timed(inner)
    fw = common.open_firewall(dataplane, cfg)
    tfw = TimedFirewall(fw) if fw is not None else None
    agent = Agent(cfg, dp, firewall=tfw)  # type: ignore[arg-type]
    once_unix = time.time()
    report = _sync_once(agent, dp)
    doc = {"entered_unix": entered, "once_unix": once_unix, **agent.phases, "dataplane_s": dp.total,
           "dataplane_split_s": dict(dp.seconds),
           "netlink_split_s": acc, "firewall_s": tfw.seconds if tfw is not None else 0.0,
           "write_ops": len(report.ops), "failures": len(report.failures),
           "firewall_changes": report.firewall_changes, "done_unix": time.time()}
    Path(path).write_text(json.dumps(doc))
