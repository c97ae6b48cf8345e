"""Synthetic clusters: N Services x M endpoints as raw Kubernetes dicts.

Deterministic from a seed. Every address comes from the benchmarking ranges
only (RFC 2544 / RFC 5180): Service VIPs in 198.18.0.0/16, endpoints in
198.19.0.0/16, IPv6 in 2001:2::/48. The objects are shaped like
`kubectl get -o json` output, with realistic metadata (labels, annotations
and, with ``noise``, managedFields-sized bulk) so that the real parsing path
(Tracker.replace -> objects.parse_*) is what gets measured.

Objects are rendered on demand from a compact description, so a caller can
stream 20,000 Services without holding their dicts, and churn can re-render
one EndpointSlice after changing its endpoints.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

NODE_NAME = "bench-node-0"
NODE_IPS = ("198.18.255.1", "2001:2:0:ff::1")
MAX_SERVICES = 32_000  # ClusterIPs come from 198.18.0.0/17

_VIP4 = int(ipaddress.IPv4Address("198.18.0.0"))
_EXT4 = int(ipaddress.IPv4Address("198.18.128.0"))
_EP4 = int(ipaddress.IPv4Address("198.19.0.0"))
_VIP6 = int(ipaddress.IPv6Address("2001:2:0:1::"))
_EXT6 = int(ipaddress.IPv6Address("2001:2:0:3::"))
_EP6 = int(ipaddress.IPv6Address("2001:2:0:2::"))
_PORTS = (("http", 80, 8080), ("https", 443, 8443), ("metrics", 9090, 9090), ("grpc", 50051, 50051))


def vip4(i: int) -> str:
    return str(ipaddress.IPv4Address(_VIP4 + 1 + i))


def ext4(i: int) -> str:
    return str(ipaddress.IPv4Address(_EXT4 + 1 + i))


def ep4(k: int) -> str:
    return str(ipaddress.IPv4Address(_EP4 + 1 + k % 65_534))  # wraps; unique within a Service


def vip6(i: int) -> str:
    return str(ipaddress.IPv6Address(_VIP6 + 1 + i))


def ext6(i: int) -> str:
    return str(ipaddress.IPv6Address(_EXT6 + 1 + i))


def ep6(k: int) -> str:
    return str(ipaddress.IPv6Address(_EP6 + 1 + k))


@dataclass(slots=True)
class Port:
    name: str
    protocol: str
    port: int
    target: int
    node_port: int = 0


@dataclass(slots=True)
class Endpoint:
    k: int  # address index (see ep4/ep6)
    node: str
    ready: bool = True
    terminating: bool = False


@dataclass(slots=True)
class SvcSpec:
    """The compact description of one Service and its endpoints."""

    index: int
    namespace: str
    name: str
    type: str  # ClusterIP | NodePort | LoadBalancer | Headless | ExternalName
    ports: list[Port]
    dual: bool = False
    scheduler: str | None = None
    scheduler_flags: str | None = None
    affinity: int | None = None  # None: no affinity; 0: ClientIP with the default timeout
    etp_local: bool = False
    itp_local: bool = False
    external_ip: bool = False
    ext_index: int = -1
    endpoints: list[Endpoint] = field(default_factory=list)
    generation: int = 1  # bumped by churn (resourceVersion of the slice)

    @property
    def has_slices(self) -> bool:
        return self.type != "ExternalName"

    @property
    def programmable(self) -> bool:
        """Has virtual servers (not headless, not ExternalName)."""
        return self.type not in ("Headless", "ExternalName")


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    services: int = 1000
    endpoints: int = 10
    seed: int = 1
    noise: bool = True  # managedFields and last-applied-configuration bulk
    namespaces: int = 0  # 0: one per 100 Services
    nodes: int = 100


class SyntheticCluster:
    """A deterministic cluster; render Services, EndpointSlices and the Node."""

    def __init__(self, spec: ClusterSpec) -> None:
        if not 1 <= spec.services <= MAX_SERVICES:
            raise ValueError(f"--services must be between 1 and {MAX_SERVICES} (VIPs come from 198.18.0.0/17)")
        if not 0 <= spec.endpoints <= 1000:
            raise ValueError("--endpoints must be between 0 and 1000")
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.next_ep = 0
        self.next_node_port = 30000
        self.node_names = [NODE_NAME] + [f"bench-node-{i}" for i in range(1, max(1, spec.nodes))]
        namespaces = spec.namespaces or max(1, spec.services // 100)
        self.services: list[SvcSpec] = []
        ext = 0
        for i in range(spec.services):
            svc = self._make(i, f"bench-ns-{i % namespaces:03d}", ext)
            if svc.ext_index >= 0:
                ext += 1
            self.services.append(svc)

    # ---- construction ----------------------------------------------------
    def _make(self, i: int, namespace: str, ext: int) -> SvcSpec:
        r = self.rng.random
        roll = r()
        stype = ("ClusterIP" if roll < 0.75 else "NodePort" if roll < 0.85 else "LoadBalancer" if roll < 0.92
                 else "Headless" if roll < 0.97 else "ExternalName")
        nports = 1 if r() < 0.75 else 2 if r() < 0.8 else 3
        if stype in ("NodePort", "LoadBalancer") and self.next_node_port + nports > 32768:
            stype = "ClusterIP"  # the NodePort range (30000-32767) is used up, as it would be in a cluster
        ports = []
        for n in range(nports):
            pname, port, target = _PORTS[n]
            roll = r()
            proto = "TCP" if roll < 0.90 else "UDP" if roll < 0.99 else "SCTP"
            if proto == "UDP":
                pname, port, target = f"dns{n}", 53 + n, 5353 + n
            node_port = 0
            if stype in ("NodePort", "LoadBalancer"):
                node_port, self.next_node_port = self.next_node_port, self.next_node_port + 1
            ports.append(Port(pname, proto, port, target, node_port))
        svc = SvcSpec(i, namespace, f"svc-{i:05d}", stype, ports, dual=r() < 0.10)
        roll = r()
        if roll < 0.08:
            svc.scheduler = "lc"
        elif roll < 0.15:
            svc.scheduler = "sh"
            svc.scheduler_flags = "sh-port" if r() < 0.5 else None
        elif roll < 0.20:
            svc.scheduler = "rr"
        if r() < 0.10:
            svc.affinity = 3600 if r() < 0.5 else 0
        svc.etp_local = stype in ("NodePort", "LoadBalancer") and r() < 0.3
        svc.itp_local = r() < 0.02
        svc.external_ip = stype == "ClusterIP" and r() < 0.02
        if stype == "LoadBalancer" or svc.external_ip:
            svc.ext_index = ext
        if svc.has_slices:
            svc.endpoints = [self.new_endpoint() for _ in range(self.spec.endpoints)]
        return svc

    def new_endpoint(self) -> Endpoint:
        """A fresh endpoint (new pod IP): 95% ready, 3% not ready, 2% terminating."""
        k, self.next_ep = self.next_ep, self.next_ep + 1
        roll = self.rng.random()
        return Endpoint(k, self.rng.choice(self.node_names), ready=roll < 0.95, terminating=roll >= 0.98)

    # ---- rendering -----------------------------------------------------------
    def service(self, s: SvcSpec) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "selector": {"app": s.name},
            "sessionAffinity": "None",
            "type": "ClusterIP" if s.type == "Headless" else s.type,
        }
        if s.type == "ExternalName":
            spec["externalName"] = f"{s.name}.example.invalid"
        else:
            spec["ports"] = [self._svc_port(p) for p in s.ports]
            if s.type == "Headless":
                spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            else:
                ips = [vip4(s.index)] + ([vip6(s.index)] if s.dual else [])
                spec["clusterIP"], spec["clusterIPs"] = ips[0], ips
            spec["ipFamilies"] = ["IPv4", "IPv6"] if s.dual else ["IPv4"]
            spec["ipFamilyPolicy"] = "PreferDualStack" if s.dual else "SingleStack"
            spec["internalTrafficPolicy"] = "Local" if s.itp_local else "Cluster"
        if s.type in ("NodePort", "LoadBalancer"):
            spec["externalTrafficPolicy"] = "Local" if s.etp_local else "Cluster"
        if s.affinity is not None:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": s.affinity or 10800}}
        if s.external_ip:
            spec["externalIPs"] = [ext4(s.ext_index)]
        status: dict[str, Any] = {"loadBalancer": {}}
        if s.type == "LoadBalancer":
            ingress = [{"ip": ext4(s.ext_index), "ipMode": "VIP"}]
            if s.dual:
                ingress.append({"ip": ext6(s.ext_index), "ipMode": "VIP"})
            status["loadBalancer"]["ingress"] = ingress
        annotations: dict[str, str] = {}
        if s.scheduler:
            annotations["ipvsproxy.io/scheduler"] = s.scheduler
        if s.scheduler_flags:
            annotations["ipvsproxy.io/scheduler-flags"] = s.scheduler_flags
        meta = self._meta(s, s.name, "Service", annotations, {"app": s.name})
        obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec, "status": status}
        if self.spec.noise:
            meta["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = json.dumps(
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": s.name, "namespace": s.namespace,
                                                                     "labels": meta["labels"]},
                 "spec": {k: v for k, v in spec.items() if k in ("ports", "selector", "type")}},
                separators=(",", ":"))
        return obj

    @staticmethod
    def _svc_port(p: Port) -> dict[str, Any]:
        out: dict[str, Any] = {"name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target}
        if p.node_port:
            out["nodePort"] = p.node_port
        return out

    def _meta(self, s: SvcSpec, name: str, kind: str, annotations: dict[str, str],
              labels: dict[str, str]) -> dict[str, Any]:
        labels = {**labels, "app.kubernetes.io/name": s.name, "app.kubernetes.io/instance": f"{s.name}-prod",
                  "app.kubernetes.io/part-of": f"shop-{s.index % 37}", "team": f"team-{s.index % 23}"}
        meta: dict[str, Any] = {
            "name": name, "namespace": s.namespace,
            "uid": f"{s.index:08x}-{kind[:4].lower():0>4}-4bec-9a1e-{s.generation:012x}",
            "resourceVersion": str(1_000_000 + s.index * 7 + s.generation),
            "creationTimestamp": "2024-05-01T12:00:00Z",
            "labels": labels, "annotations": annotations,
        }
        if self.spec.noise:
            meta["managedFields"] = [{
                "apiVersion": "v1" if kind == "Service" else "discovery.k8s.io/v1",
                "fieldsType": "FieldsV1", "manager": "kubectl-client-side-apply" if kind == "Service"
                else "kube-controller-manager", "operation": "Update", "time": "2024-05-01T12:00:00Z",
                "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in labels}},
                             "f:spec": {"f:ports": {f'k:{{"port":{p.port},"protocol":"{p.protocol}"}}':
                                                    {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {},
                                                     "f:targetPort": {}} for p in s.ports}}},
            }]
        return meta

    def slices(self, s: SvcSpec) -> list[dict[str, Any]]:
        """The Service's EndpointSlices: one per address family (M <= 1000)."""
        if not s.has_slices:
            return []
        return [self.slice(s, fam) for fam in ((4, 6) if s.dual else (4,))]

    def slice(self, s: SvcSpec, fam: int) -> dict[str, Any]:
        ports = [{"name": p.name, "protocol": p.protocol, "port": p.target} for p in s.ports]
        endpoints = []
        for e in s.endpoints:
            ep: dict[str, Any] = {
                "addresses": [ep4(e.k) if fam == 4 else ep6(e.k)],
                "conditions": {"ready": e.ready, "serving": e.ready or e.terminating,
                               "terminating": e.terminating},
                "nodeName": e.node, "zone": f"zone-{e.k % 3}",
                "targetRef": {"kind": "Pod", "name": f"{s.name}-{e.k:x}", "namespace": s.namespace,
                              "uid": f"{e.k:08x}-0000-4000-8000-000000000000"},
            }
            endpoints.append(ep)
        labels = {"kubernetes.io/service-name": s.name,
                  "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
        annotations = {"endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T12:00:00Z"}
        meta = self._meta(s, f"{s.name}-{'ipv4' if fam == 4 else 'ipv6'}", "EndpointSlice", annotations, labels)
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Service", "name": s.name, "controller": True,
                                    "blockOwnerDeletion": True, "uid": f"{s.index:08x}"}]
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4" if fam == 4 else "IPv6", "endpoints": endpoints, "ports": ports}

    def node(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "zone-0",
                                                           "kubernetes.io/hostname": NODE_NAME}},
                "status": {"addresses": [{"type": "InternalIP", "address": NODE_IPS[0]},
                                         {"type": "InternalIP", "address": NODE_IPS[1]},
                                         {"type": "Hostname", "address": NODE_NAME}]}}

    def iter_services(self) -> Iterator[dict[str, Any]]:
        for s in self.services:
            yield self.service(s)

    def iter_slices(self) -> Iterator[dict[str, Any]]:
        for s in self.services:
            yield from self.slices(s)

    def listing(self) -> list[tuple[str, Iterator[dict[str, Any]]]]:
        """(kind, objects) in the order the agent lists them."""
        return [("Service", self.iter_services()), ("EndpointSlice", self.iter_slices()),
                ("Node", iter([self.node()]))]

    # ---- churn ---------------------------------------------------------------------
    def churnable(self) -> list[SvcSpec]:
        return [s for s in self.services if s.programmable and s.ports]

    def churn(self, s: SvcSpec, kind: str, scale: int = 3) -> list[dict[str, Any]]:
        """Change one Service's endpoints; returns its re-rendered slices.

        add: one new ready endpoint; remove: one endpoint goes (never the
        last); scale: `scale` endpoints added or removed at once.
        """
        if kind == "add":
            s.endpoints.append(self.new_endpoint_ready())
        elif kind == "remove":
            if len(s.endpoints) > 1:
                s.endpoints.pop(self.rng.randrange(len(s.endpoints)))
            else:
                s.endpoints.append(self.new_endpoint_ready())
        elif kind == "scale":
            if len(s.endpoints) > scale and self.rng.random() < 0.5:
                for _ in range(scale):
                    s.endpoints.pop(self.rng.randrange(len(s.endpoints)))
            else:
                s.endpoints += [self.new_endpoint_ready() for _ in range(scale)]
        else:
            raise ValueError(f"unknown churn kind {kind!r}")
        s.generation += 1
        return self.slices(s)

    def new_endpoint_ready(self) -> Endpoint:
        """A new pod scheduled on a random node, ready (what a rollout produces)."""
        k, self.next_ep = self.next_ep, self.next_ep + 1
        return Endpoint(k, self.rng.choice(self.node_names))
