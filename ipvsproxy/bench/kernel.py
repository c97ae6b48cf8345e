"""End-to-end runs against the real kernel (inside the test VM) and the references.

Order within one run (one table size): ipvsproxy cold start on an empty
kernel, steady resync, restart adoption, churn (all through NetlinkDataplane,
the agent's real kernel path); then, on a cleared kernel, `ipvsadm -R` of the
identical table and `ip -batch` of its addresses; then the naive pyroute2
loop on a slice of the table (it is far too slow for the whole one), with its
per-object cost extrapolated. Results are reported as ratios to `ipvsadm -R`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from ..config import RESYNC_DEFAULT, AgentConfig
from ..dataplane.base import INTERFACE_MARK, DataplaneError
from ..model import DesiredState
from . import references, scenarios
from .dataplanes import open_instrumented
from .scenarios import Context

INTERFACE = "ipvsbench0"
MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_lc", "ip_vs_sh", "dummy")


def kernel_problem() -> str | None:
    """Why the kernel benchmark cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the kernel benchmark needs root (run it in the IPVS test VM: scripts/bench-vm.sh)"
    if shutil.which("ipvsadm") is None:
        return "ipvsadm is not installed (apt-get install ipvsadm)"
    subprocess.run(["modprobe", "-a", *MODULES], capture_output=True, check=False)
    if not os.path.exists("/proc/net/ip_vs"):
        return "the kernel has no IPVS (ip_vs module); run it in the IPVS test VM: scripts/bench-vm.sh"
    return None


def agent_config() -> AgentConfig:
    return scenarios.bench_settings(interface=INTERFACE, state_dir="/tmp/ipvsproxy-bench")


def open_netlink() -> Any:
    from ..dataplane.netlink import NetlinkDataplane

    return NetlinkDataplane(agent_config())


def clean() -> float:
    """Empty IPVS table, no bench interface; returns seconds spent flushing."""
    t = references.ipvsadm_clear()
    subprocess.run(["ip", "link", "del", INTERFACE], capture_output=True, check=False)
    return t


def _take(acc: dict[str, float]) -> dict[str, float]:
    out = {k: round(v, 6) for k, v in acc.items()}
    for k in acc:
        acc[k] = 0.0
    return out


def open_firewall() -> Any:
    """The nftables companion with the real `nft`, as `ipvsproxy run` ships it (a fresh table)."""
    from ..dataplane.nft import NftFirewall

    fw = NftFirewall(agent_config())
    fw.cleanup()
    return fw


def run_kernel(ctx: Context, selected: set[str], *, reference: bool, churn_steps: int, seed: int,
               naive_objects: int, nftables: bool = True, process_start: tuple[str, ...] = (),
               churn_rate: float = 0.0, churn_duration: float = 5.0, min_sync_period: float = 1.0,
               resync: str = RESYNC_DEFAULT) -> dict[str, Any]:
    problem = kernel_problem()
    if problem:
        raise DataplaneError(problem)
    note = ctx.progress.note
    out: dict[str, Any] = {"scenarios": {}, "references": {}, "ratios": {}}
    sc = out["scenarios"]
    out["flush_before_s"] = clean()
    dp, acc = open_instrumented(agent_config())
    try:
        note("kernel: cold start through NetlinkDataplane")
        fw = open_firewall() if nftables else None
        cold, agent = scenarios.cold(ctx, dp, fw)
        cold["apply_split_s"] = _take(acc)
        sc["cold"] = cold
        desired = agent.rec.index.state
        snapshot = DesiredState(dict(desired.services), set(desired.addresses))
        if "steady" in selected:
            note("kernel: steady resync")
            sc["steady"] = scenarios.steady(ctx, agent)
        if "restart" in selected:
            note("kernel: restart adoption (a new agent on the programmed table)")
            dp2 = open_netlink()
            try:
                sc["restart"] = scenarios.restart(ctx, dp2, agent_firewall(nftables))
            finally:
                dp2.close()
        if "steady" in selected or "restart" in selected:  # their yardstick, on the same table
            note("kernel: `ipvsadm -Sn` of the programmed table (the kernel's dump, target 3)")
            out["kernel_dump"] = references.ipvsadm_save()
        if "churn" in selected and churn_steps:
            note(f"kernel: churn, {churn_steps} changes")
            _take(acc)
            sc["churn"] = scenarios.churn(ctx, agent, churn_steps, seed)
        if "churn" in selected and churn_rate > 0:  # through the Runner, as `run` syncs (--resync)
            note(f"kernel: churn at {churn_rate:g}/s for {churn_duration:g} s, --resync {resync}")
            _take(acc)
            sc["churn_rate"] = scenarios.churn_rate(ctx, agent, churn_rate, churn_duration, min_sync_period,
                                                    seed + 1, resync=resync)
    finally:
        dp.close()
        if nftables:
            open_firewall()  # leaves no table behind
    if reference:
        out["references"] = run_references(ctx, snapshot, naive_objects)
        out["ratios"] = ratios(sc["cold"], out["references"], cold_table_objects(sc["cold"]))
    for fmt in process_start:
        out.setdefault("process_start", {})[fmt] = run_process_start(ctx, snapshot, fmt, nftables)
    base = out["references"].get("ipvsadm_restore", {}).get("wall_s")
    for fmt, ps in (out.get("process_start") or {}).items():
        if base and ps.get("wall_s"):
            out["ratios"][f"process_start_{fmt}_to_ipvsadm"] = round(ps["wall_s"] / base, 4)
    clean()
    return out


def run_process_start(ctx: Context, desired: DesiredState, fmt: str, nftables: bool) -> dict[str, Any]:
    """`ipvsproxy run --from-file --once` in a fresh process on an empty kernel, then the table checked."""
    from . import procstart

    ctx.progress.note(f"kernel: process start, `run --from-file cluster.{fmt} --once`")
    clean()
    if nftables:
        open_firewall()
    extra = ["--interface", INTERFACE, "--nftables" if nftables else "--no-nftables"]
    result = procstart.measure(ctx, fmt, "kernel", extra)
    result["table_problems"] = _kernel_problems(desired)
    result["table_matches_desired"] = not result["table_problems"]
    if nftables:
        open_firewall()  # leaves no table behind
    clean()
    return result


def agent_firewall(nftables: bool) -> Any:
    """A second companion on the table the first one left (restart adoption)."""
    if not nftables:
        return None
    from ..dataplane.nft import NftFirewall

    return NftFirewall(agent_config())


def cold_table_objects(cold: dict[str, Any]) -> int:
    return int(cold["table"]["objects"])


def run_references(ctx: Context, desired: DesiredState, naive_objects: int) -> dict[str, Any]:
    note = ctx.progress.note
    refs: dict[str, Any] = {}
    refs["flush_s"] = clean()
    note("reference: ipvsadm -R of the identical table")
    r = references.ipvsadm_restore(desired)
    r["table_problems"] = _kernel_problems(desired)
    r["table_matches_desired"] = not r["table_problems"]
    refs["ipvsadm_restore"] = r
    subprocess.run(["ip", "link", "add", INTERFACE, "type", "dummy"], capture_output=True, check=True)
    subprocess.run(["ip", "link", "set", INTERFACE, "alias", INTERFACE_MARK], capture_output=True, check=True)
    refs["ip_batch_addresses"] = {
        "wall_s": references.run_timed(["ip", "-batch", "-"], references.ip_batch(desired.addresses, INTERFACE)),
        "addresses": len(desired.addresses)}
    clean()
    if naive_objects:
        part = references.subset(desired, naive_objects)
        note(f"reference: naive pyroute2 loop on {sum(1 + len(v.reals) for v in part.services.values())} objects")
        n = references.naive_pyroute2(part)
        n["table_matches_desired"] = not _kernel_problems(part)
        clean()
        small = references.ipvsadm_restore(part)
        clean()
        n["ipvsadm_restore_same_objects_s"] = small["wall_s"]
        n["ratio_to_ipvsadm_same_objects"] = round(n["wall_s"] / small["wall_s"], 3) if small["wall_s"] else None
        refs["naive_pyroute2"] = n
    return refs


def _kernel_problems(desired: DesiredState) -> list[str]:
    from ..dataplane.netlink import NetlinkDataplane

    dp = NetlinkDataplane(agent_config(), read_only=True)
    try:
        return scenarios.table_problems(desired, dp.observe(), addresses=False)
    finally:
        dp.close()


def ratios(cold: dict[str, Any], refs: dict[str, Any], objects: int) -> dict[str, Any]:
    """Everything relative to `ipvsadm -R` of the same table in the same VM run."""
    base = refs.get("ipvsadm_restore", {}).get("wall_s")
    if not base:
        return {}
    split = cold.get("apply_split_s", {})
    out: dict[str, Any] = {
        "cold_wall_to_ipvsadm": cold["wall_s"] / base,
        "cold_sync_to_ipvsadm": cold["sync_s"] / base,
        "cold_ipvs_netlink_to_ipvsadm": split.get("ipvs_netlink_s", 0.0) / base,
        "cold_without_addresses_to_ipvsadm": (cold["wall_s"] - split.get("addresses_s", 0.0)) / base,
    }
    ip = refs.get("ip_batch_addresses", {}).get("wall_s")
    if ip:
        out["cold_wall_to_ipvsadm_plus_ip_batch"] = cold["wall_s"] / (base + ip)
    naive = refs.get("naive_pyroute2")
    if naive:
        est = naive["per_object_ms"] / 1000 * objects
        out["naive_extrapolated_s"] = est
        out["naive_extrapolated_to_ipvsadm"] = est / base
    return {k: round(v, 4) for k, v in out.items()}
