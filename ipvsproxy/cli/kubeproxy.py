"""`ipvsproxy cleanup-kube-proxy`: remove what kube-proxy's IPVS mode left on a node ipvsproxy
now runs, and nothing else.

Its own command rather than a flag of `cleanup`: `cleanup` removes ipvsproxy's state and needs
no cluster, while this one reads the cluster (like `diff`) to know which Services exist, so it
never deletes a virtual server a current Service claims. The decision is `leftovers.py` (pure);
this module reads the node with the real tools (iptables-save, ipset save, ip -j addr, /proc)
and carries the steps out through them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

import click

from .. import leftovers as lo
from ..agent import Agent
from ..dataplane.base import Dataplane
from ..logfmt import escape
from ..model import VSKey
from ..plan import Op, OpKind
from . import common
from .common import make_config
from .options import opt, source_options, translate_options


def _run(argv: Sequence[str]) -> str:
    """Run a tool; its stdout, or ToolError with its own message (one line)."""
    res = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        msg = " ".join((res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}").split())
        raise lo.ToolError(f"{' '.join(argv[:4])}...: {msg}" if len(argv) > 4 else f"{' '.join(argv)}: {msg}")
    return res.stdout


class Iptables:
    """iptables or ip6tables (whichever backend the node's alternatives pick, as kube-proxy used)."""

    def __init__(self, tool: str) -> None:
        self.tool = tool

    def save(self) -> str | None:
        return _run([f"{self.tool}-save"]) if shutil.which(f"{self.tool}-save") else None

    def delete_rule(self, rule: lo.Rule) -> None:
        _run([self.tool, "-w", "5", "-t", rule.table, "-D", rule.chain, *rule.spec])

    def flush_chain(self, table: str, chain: str) -> None:
        _run([self.tool, "-w", "5", "-t", table, "-F", chain])

    def delete_chain(self, table: str, chain: str) -> None:
        _run([self.tool, "-w", "5", "-t", table, "-X", chain])


class Ipset:
    def save(self) -> str | None:
        return _run(["ipset", "save"]) if shutil.which("ipset") else None

    def destroy(self, name: str) -> None:
        _run(["ipset", "destroy", name])


class Links:
    def dump(self) -> dict[str, lo.LinkInfo]:
        out: dict[str, lo.LinkInfo] = {}
        for link in json.loads(_run(["ip", "-j", "-d", "addr", "show"]) or "[]"):
            addrs = frozenset(a["local"] for a in link.get("addr_info", [])
                              if a.get("local") and a.get("scope") != "link")
            out[link["ifname"]] = lo.LinkInfo(link["ifname"], link.get("linkinfo", {}).get("info_kind", ""),
                                              link.get("ifalias", ""), addrs)
        return out

    def delete(self, name: str) -> None:
        _run(["ip", "link", "del", "dev", name])


def kube_proxy_pids(proc: str = "/proc") -> tuple[int, ...]:
    """Processes named kube-proxy on this node (in this PID namespace: the chart runs with hostPID)."""
    pids = []
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                with open(f"{proc}/{entry}/comm") as f:
                    if f.read().strip() == "kube-proxy":
                        pids.append(int(entry))
            except OSError:
                continue  # exited meanwhile
    return tuple(sorted(pids))


def _delete_vs(dp: Dataplane, key: VSKey) -> None:
    failures = dp.apply([Op(OpKind.DEL_VS, key)])
    if failures:
        raise lo.ToolError(failures[0].message)


@click.command("cleanup-kube-proxy")
@source_options
@translate_options
@opt("dry-run", is_flag=True, help="Print what would be removed; change nothing.")
@opt("dataplane", default="kernel", type=click.Choice(["kernel", "memory"]), hidden=True)
@click.pass_context
def cleanup_kube_proxy(ctx: click.Context, /, dry_run: bool, dataplane: str, **flags: Any) -> None:
    """Remove kube-proxy's IPVS-mode leftovers (kube-ipvs0, its iptables chains and ipsets, virtual
    servers of Services that no longer exist) once ipvsproxy runs the node; refuses while
    kube-proxy runs. Exit 0: done; 1: refused or a step failed."""
    cfg = make_config(**flags)
    pids = kube_proxy_pids()
    if pids:  # before anything else: kube-proxy's next sync would re-create what this removes
        click.echo(f"ipvsproxy: error: {escape(lo.refusal_running(pids))}", err=True)
        ctx.exit(1)
    dp = common.open_dataplane(dataplane, cfg)
    try:
        try:
            agent = Agent(cfg, dp, dry_run=True, record_state=False)
            agent.once()
            desired = frozenset(agent.reconciler.index.state.services)
        except Exception as exc:
            click.echo(f"ipvsproxy: error: cannot read the cluster's Services: {escape(str(exc))}", err=True)
            ctx.exit(1)
        tools = {t: Iptables(t) for t in lo.IPTABLES_TOOLS}
        rulesets = {t: lo.parse_iptables_save(text) for t, tool in tools.items() if (text := tool.save()) is not None}
        ipset = Ipset()
        links = Links()
        view = lo.NodeView(
            services={k: vs.owned for k, vs in dp.observe().services.items()}, desired=desired,
            rulesets=rulesets, ipsets=lo.parse_ipset_save(ipset.save() or ""), links=links.dump(),
            kube_proxy=pids, excluded=cfg.excluded)
        plan = lo.plan_leftovers(view)
        if plan.refusal:
            click.echo(f"ipvsproxy: error: {escape(plan.refusal)}", err=True)
            ctx.exit(1)
        for why in plan.kept:
            click.echo(f"kept: {escape(why)}")
        if dry_run:
            for step in plan.steps:
                click.echo(f"would {escape(str(step))}")
            click.echo(f"# dry run: {len(plan.steps)} steps; nothing changed", err=True)
            return
        failures = lo.apply_steps(plan.steps, lo.Seams(lambda k: _delete_vs(dp, k), tools, ipset, links))
    finally:
        dp.close()
    failed = {id(s) for s, _ in failures}
    for step in plan.steps:
        if id(step) not in failed:
            click.echo(escape(str(step)))
    for step, message in failures:
        click.echo(f"ipvsproxy: error: {escape(str(step))}: {escape(message)}", err=True)
    counts = {k: sum(1 for s in plan.steps if s.kind is k and id(s) not in failed) for k in lo.StepKind}
    click.echo(f"removed {counts[lo.StepKind.DEL_VS]} virtual servers, {counts[lo.StepKind.DEL_RULE]} rules, "
               f"{counts[lo.StepKind.DEL_CHAIN]} chains, {counts[lo.StepKind.DESTROY_SET]} ipsets"
               f"{', interface ' + lo.KUBE_IPVS0 if counts[lo.StepKind.DEL_LINK] else ''}; "
               f"{len(failures)} failed, {len(plan.kept)} kept")
    if failures:
        ctx.exit(1)
