"""Fixtures for the tests against a real kube-apiserver + etcd (marker `realapi`).

One cluster per session (it takes ~10 s to start); tests that restart the API
server or need other flags make their own. Every test works in its own
namespace and ClusterIP block, so they do not see each other's objects.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy.sources import kube
from tests import agentlab
from tests.agentlab import NODE, key, rs
from tests.realapi.cluster import Cluster

__all__ = ["NODE", "key", "rs"]  # the tests import them from here
NODE_IP = "192.0.2.1"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.request("POST", "/api/v1/nodes", node(NODE, NODE_IP))
        yield c


# ---- objects ------------------------------------------------------------------------------------
def node(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service(ns: str, name: str, ip: str, port: int = 80, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
            "spec": {"type": "ClusterIP", "clusterIP": ip,
                     "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}}


def slice_v1beta1(ns: str, svc: str, ips: Sequence[str], name: str | None = None,
                  node_name: str = NODE) -> dict[str, Any]:
    """A discovery.k8s.io/v1beta1 EndpointSlice as v1.20's controller writes it (topology, ready only)."""
    return {
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{svc}-s", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                       "topology": {"kubernetes.io/hostname": node_name}} for ip in ips],
    }


class Api:
    """Writes through the real API server as admin, in one namespace."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.c, self.ns = cluster, ns
        try:
            cluster.request("POST", "/api/v1/namespaces", namespace(ns))
        except RuntimeError as exc:
            if " 409 " not in str(exc):
                raise

    def create_service(self, name: str, ip: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        return self.c.request("POST", f"/api/v1/namespaces/{self.ns}/services",
                              service(self.ns, name, ip, annotations=annotations))

    def delete_service(self, name: str) -> None:
        self.c.request("DELETE", f"/api/v1/namespaces/{self.ns}/services/{name}")

    def create_slice(self, svc: str, ips: Sequence[str], name: str | None = None) -> dict[str, Any]:
        return self.c.request("POST", f"/apis/discovery.k8s.io/v1beta1/namespaces/{self.ns}/endpointslices",
                              slice_v1beta1(self.ns, svc, ips, name))

    def replace_slice(self, svc: str, ips: Sequence[str], name: str | None = None) -> dict[str, Any]:
        path = f"/apis/discovery.k8s.io/v1beta1/namespaces/{self.ns}/endpointslices/{name or svc + '-s'}"
        current = self.c.request("GET", path)
        body = slice_v1beta1(self.ns, svc, ips, name)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.c.request("PUT", path, body)

    def delete_slice(self, name: str) -> None:
        self.c.request("DELETE", f"/apis/discovery.k8s.io/v1beta1/namespaces/{self.ns}/endpointslices/{name}")

    def many(self, calls: Sequence[Callable[[], Any]], workers: int = 8) -> None:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(c) for c in calls]:
                f.result()


# ---- the agent ---------------------------------------------------------------------------------
def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """agentlab.wait_until with the real API server's pace."""
    return agentlab.wait_until(cond, timeout, what, interval=0.05)


# The source's backoff shrunk (0.1 s doubling to 1 s) so recoveries are seen within a test's waits.
FAST = kube.Timing(initial_backoff=0.1, max_backoff=1.0)


class Live(agentlab.Live):
    """ipvsproxy's Agent with the real KubeSource, in this process, on a RecordingDataplane."""

    def __init__(self, cluster: Cluster, tmp_path: Path, *, via_relay: bool = False, token: str | None = None,
                 **cfg: Any) -> None:
        kw = {"via_relay": via_relay} | ({"token": token} if token else {})
        super().__init__(str(cluster.write_kubeconfig(tmp_path / "kubeconfig", **kw)), tmp_path, timing=FAST, **cfg)


@pytest.fixture
def live(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., Live]]:
    made: list[Live] = []

    def make(c: Cluster | None = None, **kw: Any) -> Live:
        lv = Live(c or cluster, tmp_path, **kw).start()
        made.append(lv)
        return lv

    yield make
    for lv in made:
        if lv.thread.is_alive():
            lv.stop()
