"""The live agent end to end on the real kernel: the real `kubernetes` client
following the in-process API server (tests/apiserver.py) over loopback, the
netlink dataplane and the nftables companion, with real traffic while the
Service scales up and down, its watches drop and its history is compacted."""

from __future__ import annotations

import collections
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import Backend, http_get, wait_until

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.dataplane.nft import NftFirewall
from tests.apiserver import FakeApiServer

pytestmark = pytest.mark.kernel

NODE = "live-node"
VIP = "198.19.77.10"
NS = "live"


def service(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": NS, "annotations": annotations or {}},
            "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP], "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}


def slice_of(backends: list[Backend]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-abc", "namespace": NS, "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [b.ipv4], "conditions": {"ready": True}, "nodeName": NODE,
                           "targetRef": {"kind": "Pod", "name": b.name, "namespace": NS}} for b in backends]}


def node() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.250.1"}]}}


def answers(n: int) -> collections.Counter[str]:
    """n new connections from the node to the Service: who answered (failures counted as 'failed')."""
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        try:
            out[http_get(VIP, 80, timeout=3)] += 1
        except OSError:
            out["failed"] += 1
    return out


def ipvsadm_table() -> str:
    return subprocess.run(["ipvsadm", "-Sn"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def resync() -> str:
    return "full"


@pytest.fixture
def live(tmp_path: Path, resync: str) -> Iterator[tuple[FakeApiServer, Agent]]:
    api = FakeApiServer().start()
    api.set_bookmark_interval(1.0)
    cfg = AgentConfig(node_name=NODE, kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"),
                      min_sync_period=0.2, sync_period=5.0, drain_grace_period=2.0, resync=resync,
                      healthz_bind_address="", metrics_bind_address="", state_dir=str(tmp_path / "state"))
    dp = NetlinkDataplane(cfg)
    agent = Agent(cfg, dp, firewall=NftFirewall(cfg))
    thread = threading.Thread(target=agent.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield api, agent
    finally:
        agent.stop()
        thread.join(30)
        api.stop()
        from click.testing import CliRunner

        from ipvsproxy.cli.main import cli, register

        register()
        CliRunner().invoke(cli, ["cleanup"])


def test_agent_follows_the_api_server_with_traffic(live: tuple[FakeApiServer, Agent],
                                                   backends: Callable[..., list[Backend]]) -> None:
    api, agent = live
    b0, b1, b2 = backends(3)
    names = {b.name for b in (b0, b1, b2)}
    api.create(node())
    api.create(service())
    api.create(slice_of([b0]))

    wait_until(lambda: answers(1)[b0.name] == 1, timeout=180, what="the Service answers from its one endpoint")
    assert answers(4) == {b0.name: 4}
    assert "-A -t 198.19.77.10:80 -s rr" in ipvsadm_table()

    def nft_services() -> str:  # the firewall transaction follows the IPVS writes of the same sync
        return subprocess.run(["nft", "list", "set", "inet", "ipvsproxy", "services4"], capture_output=True,
                              text=True).stdout

    wait_until(lambda: "198.19.77.10 . tcp . 80" in nft_services(), timeout=30, what="nft services4 element")

    # scale up: new connections spread over all three
    api.update(slice_of([b0, b1, b2]))
    wait_until(lambda: set(answers(6)) == names, timeout=60, what="traffic spread over 3 endpoints")
    spread = answers(9)
    print(f"LIVE scale-up 9 requests: {dict(spread)}")
    assert spread == {b0.name: 3, b1.name: 3, b2.name: 3}

    # drift: a virtual server and the VIP removed by hand come back with the periodic full resync
    subprocess.run(["ipvsadm", "-D", "-t", f"{VIP}:80"], check=True)
    subprocess.run(["ip", "addr", "del", f"{VIP}/32", "dev", "ipvsproxy0"], check=True)
    wait_until(lambda: set(answers(3)) <= names and "-A -t 198.19.77.10:80 -s rr" in ipvsadm_table(),
               timeout=60, what="drift repaired by the full resync")

    # scale down while the watches are dropped and history compacted: relist, then converge
    api.drop_watches()
    api.update(slice_of([b2]))
    api.compact()
    wait_until(lambda: answers(3) == {b2.name: 3}, timeout=60, what="traffic only to the remaining endpoint")
    assert answers(6) == {b2.name: 6}

    # a scheduler annotation reaches the kernel; the Service's deletion removes its virtual server
    api.update(service({"ipvsproxy.io/scheduler": "lc"}))
    wait_until(lambda: "-A -t 198.19.77.10:80 -s lc" in ipvsadm_table(), timeout=60, what="scheduler lc")
    api.delete("Service", NS, "web")
    wait_until(lambda: "198.19.77.10:80" not in ipvsadm_table(), timeout=60, what="virtual server deleted")
    addrs = subprocess.run(["ip", "-o", "addr", "show", "dev", "ipvsproxy0"], capture_output=True,
                           text=True).stdout
    assert VIP not in addrs
    ok, reason = agent.health.status()
    assert ok, reason


@pytest.mark.parametrize("resync", ["rolling"])
def test_the_rolling_drift_check_repairs_the_kernel_without_a_full_sync(
        live: tuple[FakeApiServer, Agent], backends: Callable[..., list[Backend]]) -> None:
    """--resync rolling on the real kernel: a virtual server, a real server, the VIP and the nftables
    element removed by hand come back through the round's small steps (per-key reads, one
    services-only dump), with no full sync after the start-up one; traffic flows again."""
    api, agent = live
    b0, b1 = backends(2)
    api.create(node())
    api.create(service())
    api.create(slice_of([b0, b1]))
    wait_until(lambda: set(answers(4)) == {b0.name, b1.name}, timeout=180, what="the Service answers from both")
    full_syncs: list[bool] = []
    hook = agent.core.on_report

    def on_report(report: Any, error: BaseException | None) -> None:
        if report is not None:
            full_syncs.append(report.full)
        if hook:
            hook(report, error)

    agent.core.on_report = on_report
    rounds = agent.reconciler.sweeps
    subprocess.run(["ipvsadm", "-d", "-t", f"{VIP}:80", "-r", f"{b1.ipv4}:8080"], check=True)
    subprocess.run(["ip", "addr", "del", f"{VIP}/32", "dev", "ipvsproxy0"], check=True)
    subprocess.run(["nft", "delete", "element", "inet", "ipvsproxy", "services4", "{ 198.19.77.10 . tcp . 80 }"],
                   check=True)
    wait_until(lambda: set(answers(4)) == {b0.name, b1.name} and agent.reconciler.sweeps > rounds + 1,
               timeout=60, what="drift repaired by the rolling drift check")
    listed = subprocess.run(["nft", "list", "set", "inet", "ipvsproxy", "services4"], capture_output=True,
                            text=True).stdout
    assert "198.19.77.10 . tcp . 80" in listed
    assert full_syncs and not any(full_syncs)  # every repair came from the rolling steps
