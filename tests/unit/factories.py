"""Concise builders for the Kubernetes dicts the sources hand over, and a
one-call translate for tests.

Every builder returns a plain dict shaped like `kubectl get -o json` output, so
the parsing layer (objects.py) is exercised too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ipvsproxy.model import AF_INET, AF_INET6, DesiredState, Protocol, VirtualServer, VSKey, family_of
from ipvsproxy.objects import parse_endpoints, parse_endpointslice, parse_node, parse_service
from ipvsproxy.schedulers import Registry
from ipvsproxy.translate import Config, translate

NODE = "n1"
TCP, UDP, SCTP = int(Protocol.TCP), int(Protocol.UDP), int(Protocol.SCTP)


def port(name: str = "http", port: int = 80, protocol: str = "TCP", target: Any = None,
         node_port: int | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "protocol": protocol, "port": port}
    if target is not None:
        p["targetPort"] = target
    if node_port is not None:
        p["nodePort"] = node_port
    return p


def service(
    name: str = "web",
    namespace: str = "default",
    *,
    cluster_ip: str | None = "10.96.0.10",
    cluster_ips: Sequence[str] | None = None,
    type: str | None = None,
    ports: Sequence[dict[str, Any]] | None = None,
    external_ips: Sequence[str] | None = None,
    ingress: Sequence[dict[str, Any]] | None = None,
    annotations: dict[str, Any] | None = None,
    affinity: int | None | bool = False,
    itp: str | None = None,
    etp: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A v1 Service. `affinity=None` means ClientIP with the default timeout,
    an int means ClientIP with that timeout, False means no affinity."""
    s: dict[str, Any] = dict(spec)
    if type is not None:
        s["type"] = type
    if cluster_ip is not None:
        s["clusterIP"] = cluster_ip
    if cluster_ips is not None:
        s["clusterIPs"] = list(cluster_ips)
    s["ports"] = list(ports) if ports is not None else [port()]
    if external_ips is not None:
        s["externalIPs"] = list(external_ips)
    if affinity is not False:
        s["sessionAffinity"] = "ClientIP"
        if affinity is not None:
            s["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    if itp is not None:
        s["internalTrafficPolicy"] = itp
    if etp is not None:
        s["externalTrafficPolicy"] = etp
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = dict(annotations)
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": s}
    if ingress is not None:
        obj["status"] = {"loadBalancer": {"ingress": list(ingress)}}
    return obj


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str | None = NODE,
    zones: Sequence[str] | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    conds: dict[str, Any] = {}
    for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if v is not None:
            conds[k] = v
    e: dict[str, Any] = {"addresses": [ip], "conditions": conds}
    if node is not None:
        e["nodeName"] = node
    if zones is not None:
        e["hints"] = {"forZones": [{"name": z} for z in zones]}
    if target is not None:
        e["targetRef"] = {"kind": "Pod", "name": target}
    return e


def slice_(
    service: str = "web",
    endpoints: Iterable[dict[str, Any] | str] = (),
    *,
    namespace: str = "default",
    name: str | None = None,
    family: str = "IPv4",
    ports: Sequence[tuple[str, int] | tuple[str, int, str]] = (("http", 8080),),
) -> dict[str, Any]:
    """An EndpointSlice; endpoints given as dicts or bare IPs (ready)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-{family.lower()}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": [
            {"name": p[0], "port": p[1], "protocol": p[2] if len(p) > 2 else "TCP"}  # type: ignore[misc]
            for p in ports
        ],
        "endpoints": [endpoint(e) if isinstance(e, str) else e for e in endpoints],
    }


def legacy_endpoints(
    name: str = "web",
    ready: Sequence[str] = (),
    not_ready: Sequence[str] = (),
    *,
    namespace: str = "default",
    ports: Sequence[tuple[str, int]] = (("http", 8080),),
) -> dict[str, Any]:
    """A v1 Endpoints object with one subset."""
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace},
        "subsets": [{
            "addresses": [{"ip": ip} for ip in ready],
            "notReadyAddresses": [{"ip": ip} for ip in not_ready],
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        }],
    }


def node(
    name: str = NODE,
    internal: Sequence[str] = ("192.0.2.1",),
    external: Sequence[str] = (),
    hostname: str | None = "host-1",
    zone: str | None = None,
) -> dict[str, Any]:
    addrs = [{"type": "InternalIP", "address": a} for a in internal]
    addrs += [{"type": "ExternalIP", "address": a} for a in external]
    if hostname is not None:
        addrs.append({"type": "Hostname", "address": hostname})
    meta: dict[str, Any] = {"name": name}
    if zone is not None:
        meta["labels"] = {"topology.kubernetes.io/zone": zone}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "status": {"addresses": addrs}}


def run(
    services: Iterable[dict[str, Any]],
    slices: Iterable[dict[str, Any]] = (),
    node_obj: dict[str, Any] | None = None,
    *,
    legacy: Iterable[dict[str, Any]] = (),
    node_name: str = NODE,
    scheduler: str = "rr",
    nodeport_cidrs: Sequence[Any] = (),
    registry: Registry | None = None,
    usable: Any = None,
) -> tuple[DesiredState, list[str]]:
    """Parse the dicts and translate the lot, as the --once path does."""
    svcs = [parse_service(s)[0] for s in services]
    sls = [parse_endpointslice(s)[0] for s in slices]
    for e in legacy:
        sls += parse_endpoints(e)[0]
    nd = parse_node(node_obj)[0] if node_obj is not None else None
    cfg = Config(node_name, scheduler, tuple(nodeport_cidrs))
    return translate(svcs, sls, nd, cfg, registry or Registry(), usable)


def key(address: str, port: int = 80, protocol: int = TCP) -> VSKey:
    return VSKey(AF_INET6 if ":" in address else AF_INET, protocol, address, port)


def reals(vs: VirtualServer) -> set[tuple[str, int]]:
    return {(r.address, r.port) for r in vs.reals}


def table(desired: DesiredState) -> dict[VSKey, set[tuple[str, int]]]:
    """Every virtual server with its real servers (address, port)."""
    return {k: reals(vs) for k, vs in desired.services.items()}


def assert_family_consistent(desired: DesiredState) -> None:
    for k, vs in desired.services.items():
        assert family_of(k.address) == k.family
        for r in vs.reals:
            assert family_of(r.address) == k.family, (k, r)


class CountingAddresses(set[str]):
    """An address set that counts membership tests and refuses to be walked
    (or diffed whole): proves a sync looked at a few addresses, not all."""

    def __init__(self, items: set[str]) -> None:
        super().__init__(items)
        self.lookups = 0

    def __repr__(self) -> str:
        return f"<{len(self)} addresses, {self.lookups} lookups>"

    def __contains__(self, item: object) -> bool:
        self.lookups += 1
        return super().__contains__(item)

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("a scoped plan walked every address")

    def __sub__(self, other: object) -> set[str]:
        raise AssertionError("a scoped plan diffed every address")

    __rsub__ = __sub__


class FakeClock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.t = now

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
