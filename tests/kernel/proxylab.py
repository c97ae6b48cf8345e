"""Helpers for kernel tests that run ipvsproxy itself against the VM's kernel.

Manifests (Services, EndpointSlices, a Node) are written by the test with its own
backends' addresses; syncs go through the real CLI (click's CliRunner, in-process:
a subprocess costs seconds in the emulated VM) or through Agent.once(), whose
SyncReport says which operations a sync applied. `ipvsadm` is the independent
witness of what the kernel holds.
"""

from __future__ import annotations

import collections
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner, Result

from ipvsproxy.agent import Agent
from ipvsproxy.cli.main import cli, register
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.reconcile import SyncReport

register()

READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


def ipvsadm(*args: str) -> str:
    res = subprocess.run(["ipvsadm", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ipvsadm {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def rules() -> set[str]:
    """`ipvsadm -Sn` as a set of lines (whitespace normalised)."""
    return {" ".join(line.split()) for line in ipvsadm("-Sn").splitlines() if line.strip()}


def reals(flag: str, vip: str) -> dict[str, tuple[int, int, int]]:
    """Real servers of one virtual server in the kernel's own order (`--nosort`):
    {"addr:port": (weight, active, inactive)}."""
    out: dict[str, tuple[int, int, int]] = {}
    for line in ipvsadm("-Ln", "--nosort", flag, vip).splitlines():
        tok = line.split()
        if len(tok) == 6 and tok[0] == "->" and tok[1] != "RemoteAddress:Port":
            out[tok[1]] = (int(tok[3]), int(tok[4]), int(tok[5]))
    return out


def bound(dev: str) -> set[str]:
    """Global addresses on an interface (empty when it does not exist)."""
    res = subprocess.run(["ip", "-o", "addr", "show", "dev", dev, "scope", "global"], capture_output=True,
                         text=True)
    return {m.group(1) for m in re.finditer(r"inet6? (\S+?)/\d+", res.stdout)}


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# ---- manifests --------------------------------------------------------------------------------

def node(name: str, addresses: Iterable[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def service(namespace: str, name: str, cluster_ips: list[str], ports: list[dict[str, Any]], *,
            type: str = "ClusterIP", annotations: dict[str, str] | None = None,
            affinity: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": type, "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
                            "ports": ports}
    if len(cluster_ips) > 1:
        spec["ipFamilyPolicy"] = "PreferDualStack"
    if affinity is not None:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def endpoint_slice(namespace: str, service_name: str, suffix: str, family: str,
                   endpoints: list[tuple[str, str, dict[str, bool]]], ports: list[dict[str, Any]],
                   node_name: str) -> dict[str, Any]:
    """endpoints: (address, pod name, conditions); family "IPv4" or "IPv6"."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
        "metadata": {"name": f"{service_name}-{suffix}", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "ports": ports,
        "endpoints": [{"addresses": [a], "conditions": dict(c), "nodeName": node_name,
                       "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}}
                      for a, pod, c in endpoints],
    }


def write_manifests(directory: Path, objects: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))


# ---- running ipvsproxy -------------------------------------------------------------------------

def run_cli(*args: str) -> Result:
    """`ipvsproxy ARGS...` in this process; output is stdout and stderr together."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def agent_config(node_name: str, manifests: Path, state_dir: Path, **kw: Any) -> AgentConfig:
    return AgentConfig(node_name=node_name, from_files=(str(manifests),), state_dir=str(state_dir),
                       healthz_bind_address="", metrics_bind_address="", **kw)


def sync(cfg: AgentConfig) -> SyncReport:
    """What `ipvsproxy run --once` does (a fresh agent: one full sync), returning the report."""
    dp = NetlinkDataplane(cfg)
    try:
        return Agent(cfg, dp).once()
    finally:
        dp.close()


def op_counts(report: SyncReport) -> dict[str, int]:
    return dict(collections.Counter(op.kind.value for op in report.ops))
