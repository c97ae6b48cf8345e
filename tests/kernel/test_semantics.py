"""Service semantics the kernel decides (docs/semantics.md), with real packets.

The agent runs in this process on the VM's root namespace (the node) with the
netlink dataplane and the nftables companion, reading manifests the test
rewrites. Namespaces made by netns.Netlab:

    outside   a client off the node: default route via the node, its address
              in no --cluster-cidr
    pod       a "pod on this node": a client whose address is in --cluster-cidr
    local     backend, an endpoint on this node (nodeName = NODE)
    remote    backend, an endpoint on another node (nodeName = other)

The node address clients use is the root side of the outside client's link
(`outside.gw4`): the Node object's InternalIP, and an address on a real (veth)
interface that is not ipvsproxy's dummy.

  rule 1  health-check node port: 200 with a local endpoint, 503 once it goes,
          connection refused once the Service goes (real HTTP from a client)
  rule 2  ETP=Local, no local endpoint: the pod is served by the remote
          endpoint, the outside client is dropped (the same address and port)
  rule 5  externalIPs: [an address of the node on a veth, not in the Node
          object]: served, never bound to the dummy, the node's other ports on
          it stay open, and it survives the Service's deletion and `ipvsproxy
          cleanup`
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns import Backend, Client, TcpListener, http_get, http_request, in_netns, outcome, wait_until

from ipvsproxy.agent import Agent
from ipvsproxy.cli.main import cli, register
from ipvsproxy.config import AgentConfig, parse_cidrs
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.dataplane.nft import NftFirewall

pytestmark = pytest.mark.kernel

NODE = "sem-node"
DEV = "ipvssem0"
HC_PORT = 31999
LB_LOCAL, LB_CLUSTER = "198.18.60.1", "198.18.60.2"  # load-balancer ingress IPs (bound to the dummy)
CIP = "198.18.61.1"


def svc(name: str, cluster_ip: str, *, etp: str | None = None, lb_ip: str | None = None, hc_port: int = 0,
        node_port: int = 0, external_ips: list[str] | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    spec: dict[str, Any] = {"type": "LoadBalancer" if lb_ip else "ClusterIP", "clusterIP": cluster_ip,
                            "clusterIPs": [cluster_ip], "ports": [port]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if hc_port:
        spec["healthCheckNodePort"] = hc_port
    if external_ips:
        spec["externalIPs"] = external_ips
    out: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "sem"},
                           "spec": spec}
    if lb_ip:
        out["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return out


def eps(name: str, members: list[tuple[Backend, str]], family: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
            "metadata": {"name": f"{name}-{family.lower()}", "namespace": "sem",
                         "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [b.ipv6 if family == "IPv6" else b.ipv4], "conditions": {"ready": True},
                           "nodeName": where, "targetRef": {"kind": "Pod", "name": b.name, "namespace": "sem"}}
                          for b, where in members]}


class Lab:
    """Namespaces, manifests and a running agent; close() removes everything."""

    def __init__(self, tmp: Path, backends: Callable[..., list[Backend]], clients: Callable[..., list[Client]]) -> None:
        self.local, self.remote = backends(2, names=["local", "remote"])
        self.outside, self.pod = clients(2, names=["outside", "pod"])
        self.node_ip = self.outside.gw4  # on the veth to the outside client: a real interface
        self.manifest = tmp / "cluster.yaml"
        self.write()
        pods = ",".join(f"{b.ipv4}/30,{b.ipv6}/64" for b in (self.pod, self.local, self.remote))
        self.cfg = AgentConfig(node_name=NODE, from_files=(str(self.manifest),), interface=DEV,
                               min_sync_period=0.1, sync_period=30.0, healthz_bind_address="",
                               metrics_bind_address="", cluster_cidrs=parse_cidrs(pods),
                               state_dir=str(tmp / "state"))
        self.agent = Agent(self.cfg, NetlinkDataplane(self.cfg), firewall=NftFirewall(self.cfg))
        self.thread = threading.Thread(target=self.agent.run, kwargs={"install_signals": False}, daemon=True)
        self.thread.start()

    def write(self, *objects: dict[str, Any]) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                "status": {"addresses": [{"type": "InternalIP", "address": self.node_ip}]}}
        tmp = self.manifest.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all([node, *objects], sort_keys=False))
        tmp.replace(self.manifest)  # atomic: the watcher never reads half a file

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "agent did not stop"


@pytest.fixture
def lab(tmp_path: Path, backends: Callable[..., list[Backend]], clients: Callable[..., list[Client]]) -> Iterator[Lab]:
    for m in ("nf_tables", "nft_fib_inet", "nft_fib_ipv4", "nft_fib_ipv6", "nft_ct", "nft_masq", "nft_chain_nat",
              "nft_reject_inet", "ip_vs_rr", "dummy"):
        subprocess.run(["modprobe", m], capture_output=True)
    lab = Lab(tmp_path, backends, clients)
    try:
        yield lab
    finally:
        if lab.thread.is_alive():
            lab.stop()
        register()
        from click.testing import CliRunner

        CliRunner().invoke(cli, ["cleanup", "--interface", DEV])


def ipvsadm() -> str:
    return subprocess.run(["ipvsadm", "-Sn"], capture_output=True, text=True, check=True).stdout


def bound(dev: str) -> str:
    return subprocess.run(["ip", "-o", "addr", "show", "dev", dev], capture_output=True, text=True).stdout


def answer(client: Client, addr: str, port: int, timeout: float = 3.0) -> str:
    """The backend that answered, or why nothing did."""
    return outcome(lambda: http_get(addr, port, client.ns, timeout=timeout))


def health_check(client: Client, addr: str) -> tuple[int, dict[str, Any]] | str:
    try:
        resp = http_request(addr, HC_PORT, client.ns, timeout=5)
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"error: {exc}"
    return resp.status, json.loads(resp.body)


def test_health_check_node_port_follows_the_local_endpoint_and_the_service(lab: Lab) -> None:
    """Rule 1: what a cloud load balancer sees, over real HTTP from a client namespace."""
    lb = svc("edge", CIP, etp="Local", lb_ip=LB_LOCAL, hc_port=HC_PORT, node_port=31080)
    lab.write(lb, eps("edge", [(lab.local, NODE), (lab.remote, "other")]))
    got = wait_until(lambda: isinstance(r := health_check(lab.outside, lab.node_ip), tuple) and r[0] == 200 and r,
                     timeout=120, what="health check 200 with a local endpoint")
    print(f"SEMANTICS health check with a local endpoint: {got}")
    assert got[1] == {"service": {"namespace": "sem", "name": "edge"}, "localEndpoints": 1,
                      "serviceProxyHealthy": True}
    assert answer(lab.outside, LB_LOCAL, 80) == "local"  # only the local endpoint, from anywhere

    lab.write(lb, eps("edge", [(lab.remote, "other")]))  # the local pod goes
    got = wait_until(lambda: isinstance(r := health_check(lab.outside, lab.node_ip), tuple) and r[0] == 503 and r,
                     timeout=60, what="health check 503 without a local endpoint")
    print(f"SEMANTICS health check without a local endpoint: {got}")
    assert got[1]["localEndpoints"] == 0

    lab.write()  # the Service goes
    wait_until(lambda: health_check(lab.outside, lab.node_ip) == "refused", timeout=60,
               what="health-check port closed with the Service")
    assert f"{LB_LOCAL}:80" not in ipvsadm()


def nolocal(v: int) -> str:
    """The nftables set of externalTrafficPolicy-Local keys without a local endpoint, as `nft` lists it."""
    return subprocess.run(["nft", "list", "set", "inet", "ipvsproxy", f"nolocal{v}"], capture_output=True,
                          text=True).stdout


def test_etp_local_without_local_endpoint_serves_pods_and_drops_outsiders(lab: Lab) -> None:
    """Rule 2: same address and port, two sources: a pod on the node is served by
    the remote endpoint, a client off the node is dropped (not refused, not served)."""
    local_policy = svc("edge", CIP, etp="Local", lb_ip=LB_LOCAL, node_port=31080)
    cluster_policy = svc("open", "198.18.61.2", etp="Cluster", lb_ip=LB_CLUSTER, node_port=31081)
    lab.write(local_policy, eps("edge", [(lab.remote, "other")]),
              cluster_policy, eps("open", [(lab.remote, "other")]))
    wait_until(lambda: answer(lab.pod, LB_LOCAL, 80) == "remote", timeout=120,
               what="the pod reaches the LB IP through the remote endpoint")
    # One sync programs IPVS, then nftables: on a loaded machine the pod can be served before
    # the nftables transaction lands, so the drop is probed once the set holds the keys.
    wait_until(lambda: f"{LB_LOCAL} . tcp . 80" in (n := nolocal(4)) and f"{lab.node_ip} . tcp . 31080" in n,
               timeout=60, what="the keys in the nolocal4 set")
    # the control: the outside client reaches the same remote endpoint through a Cluster-policy LB IP
    assert answer(lab.outside, LB_CLUSTER, 80) == "remote"
    assert answer(lab.outside, lab.node_ip, 31081) == "remote"
    results = {
        "pod -> LB IP": answer(lab.pod, LB_LOCAL, 80),
        "pod -> NodePort": answer(lab.pod, lab.node_ip, 31080),
        "outside -> LB IP": answer(lab.outside, LB_LOCAL, 80),
        "outside -> NodePort": answer(lab.outside, lab.node_ip, 31080),
    }
    print(f"SEMANTICS ETP=Local without a local endpoint: {results}")
    assert results == {"pod -> LB IP": "remote", "pod -> NodePort": "remote",
                       "outside -> LB IP": "timeout", "outside -> NodePort": "timeout"}
    nft = nolocal(4)
    assert f"{LB_LOCAL} . tcp . 80" in nft and f"{lab.node_ip} . tcp . 31080" in nft
    # a local endpoint comes back: everyone is served by it, nothing is dropped
    lab.write(local_policy, eps("edge", [(lab.remote, "other"), (lab.local, NODE)]),
              cluster_policy, eps("open", [(lab.remote, "other")]))
    wait_until(lambda: answer(lab.outside, LB_LOCAL, 80) == "local", timeout=60,
               what="the outside client served by the local endpoint")
    assert answer(lab.pod, LB_LOCAL, 80) == "local"


def test_etp_local_fallback_over_ipv6(lab: Lab) -> None:
    """Rule 2 for IPv6 (its own set and rule, nolocal6): served for the pod, dropped for the outsider."""
    lb6 = "2001:2:0:60::1"
    v6 = svc("edge6", "2001:2:0:61::1", etp="Local", lb_ip=lb6)
    v6["spec"]["ipFamilies"] = ["IPv6"]
    lab.write(v6, eps("edge6", [(lab.remote, "other")], "IPv6"))
    wait_until(lambda: answer(lab.pod, lb6, 80) == "remote", timeout=120,
               what="the pod reaches the IPv6 LB IP through the remote endpoint")
    wait_until(lambda: f"{lb6} . tcp . 80" in nolocal(6), timeout=60, what="the key in the nolocal6 set")
    results = {"pod": answer(lab.pod, lb6, 80), "outside": answer(lab.outside, lb6, 80)}
    print(f"SEMANTICS ETP=Local without a local endpoint, IPv6: {results}")
    assert results == {"pod": "remote", "outside": "timeout"}


def node_listener(addr: str, port: int) -> TcpListener:
    """A TCP listener of the node itself (root namespace), like sshd on the node's address."""
    return TcpListener(in_netns(None, socket.create_server, (addr, port)),
                       b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nnode")


def test_a_node_address_as_external_ip_is_served_never_bound_and_survives(lab: Lab) -> None:
    """Rule 5: externalIPs: [the node's own address] -- one the Node object does
    not list (the root side of the pod's link), so only rtnetlink can tell."""
    own = lab.pod.gw4
    ssh_like = node_listener(own, 2222)
    try:
        assert answer(lab.outside, own, 2222) == "node"
        lab.write(svc("web", "198.18.61.3", external_ips=[own]), eps("web", [(lab.remote, "other")]))
        wait_until(lambda: answer(lab.outside, own, 80) == "remote", timeout=120,
                   what="the external IP (a node address) served")
        assert f"-A -t {own}:80" in ipvsadm()
        assert own not in bound(DEV), bound(DEV)
        # not a VIP: the node's other ports on that address are not closed by the VIP port filter
        assert answer(lab.outside, own, 2222) == "node"
        vips = subprocess.run(["nft", "list", "set", "inet", "ipvsproxy", "vips4"], capture_output=True,
                              text=True).stdout
        assert own not in vips

        lab.write()  # the Service goes; then the agent stops and everything is cleaned up
        wait_until(lambda: f"{own}:80" not in ipvsadm(), timeout=60, what="virtual server deleted")
        assert own in bound(lab.pod.host_if)
        lab.stop()
        register()
        from click.testing import CliRunner

        out = CliRunner().invoke(cli, ["cleanup", "--interface", DEV])
        assert out.exit_code == 0, out.output
        assert own in bound(lab.pod.host_if), "cleanup took the node's own address"
        assert answer(lab.outside, own, 2222) == "node"
    finally:
        ssh_like.close()
