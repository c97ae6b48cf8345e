"""Fixtures for the tests against a real kube-apiserver + etcd (marker `realapi`).

One cluster per session (it takes ~10 s to start); tests that restart the API
server or need other flags make their own. Every test works in its own
namespace and ClusterIP block, so they do not see each other's objects.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, VSKey
from ipvsproxy.plan import Op
from ipvsproxy.sources import kube
from ipvsproxy.sources.kube import KubeSource
from tests.realapi.cluster import Cluster

NODE = "n1"
NODE_IP = "192.0.2.1"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.request("POST", "/api/v1/nodes", node(NODE, NODE_IP))
        yield c


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "INITIAL_BACKOFF", 0.1)
    monkeypatch.setattr(kube, "MAX_BACKOFF", 1.0)


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
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except RuntimeError:  # a dict changed size while the runner wrote it: look again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def key(address: str, port_: int = 80) -> VSKey:
    return VSKey(AF_INET, 6, address, port_)


def rs(*ips: str) -> set[tuple[str, int]]:
    return {(ip, 8080) for ip in ips}


class RecordingDataplane(MemoryDataplane):
    """The memory dataplane, remembering every operation applied."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[Op] = []
        self.lock = threading.Lock()

    def apply(self, ops: Sequence[Op]) -> list[Any]:
        with self.lock:
            self.applied.extend(ops)
            return super().apply(ops)

    def table(self, prefix: str = "") -> dict[VSKey, set[tuple[str, int]]]:
        with self.lock:
            return {k: set(vs.reals) for k, vs in self.state.services.items() if k.address.startswith(prefix)}

    def ops(self, prefix: str, since: int = 0) -> list[Op]:
        with self.lock:
            return [op for op in self.applied[since:]
                    if (op.key.address if op.key is not None else op.address or "").startswith(prefix)]


class Live:
    """ipvsproxy's Agent with the real KubeSource, in this process, on a RecordingDataplane."""

    def __init__(self, cluster: Cluster, tmp_path: Path, *, via_relay: bool = False, token: str | None = None,
                 **cfg: Any) -> None:
        kw = {"via_relay": via_relay} | ({"token": token} if token else {})
        settings: dict[str, Any] = dict(
            node_name=NODE, kubeconfig=str(cluster.write_kubeconfig(tmp_path / "kubeconfig", **kw)),
            min_sync_period=0.05, sync_period=30, healthz_bind_address="", metrics_bind_address="",
            state_dir=str(tmp_path / "state"))
        settings.update(cfg)
        self.dp = RecordingDataplane()
        self.agent = Agent(AgentConfig(**settings), self.dp)
        self.thread = threading.Thread(target=self.agent.run, kwargs={"install_signals": False}, daemon=True)

    def start(self) -> Live:
        self.thread.start()
        wait_until(lambda: self.agent.source is not None, what="the kube source")
        return self

    @property
    def source(self) -> KubeSource:
        src = self.agent.source
        assert isinstance(src, KubeSource)
        return src

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "agent did not stop"


@pytest.fixture
def live(cluster: Cluster, tmp_path: Path, fast: None) -> Iterator[Callable[..., Live]]:
    made: list[Live] = []

    def make(c: Cluster | None = None, **kw: Any) -> Live:
        lv = Live(c or cluster, tmp_path, **kw).start()
        made.append(lv)
        return lv

    yield make
    for lv in made:
        if lv.thread.is_alive():
            lv.stop()
