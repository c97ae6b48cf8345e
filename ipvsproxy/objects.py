"""Compact records of the Kubernetes objects translation needs, parsed from dicts.

Sources hand us JSON-like dicts (from the API server or YAML files). Holding
those, or the client's model objects, costs hundreds of MiB at 10,000
Services; these records keep only the fields translation reads, in tuples and
slotted classes. Parsing is also where bad input is caught: a field that is
wrong is dropped with a problem message, an object that is unusable raises
:class:`InvalidObject`. Nothing here ever raises anything else.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .model import Protocol, canonical_ip, family_of
from .schedulers import ANNOTATION, FLAGS_ANNOTATION

DEFAULT_AFFINITY_TIMEOUT = 10800
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
# A Service carrying this label belongs to another proxy (kube-proxy's informers
# select "!service.kubernetes.io/service-proxy-name"); docs/semantics.md rule 3.
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
# A Service carrying this label (any value) is no proxy's: kube-proxy's informers also select
# "!service.kubernetes.io/headless" (noHeadlessEndpoints); docs/semantics.md rule 3.
HEADLESS_LABEL = "service.kubernetes.io/headless"
# The Cluster Autoscaler's taint on a node it is about to delete (KEP-3836).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


class InvalidObject(ValueError):
    """The object cannot be used at all; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: int
    port: int
    node_port: int = 0


class ServiceType(StrEnum):
    """A Service's spec.type."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"

    @property
    def has_node_ports(self) -> bool:
        return self in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)


class _Namespaced:
    """The `namespace/name` id of a namespaced record (a mixin: the dataclass holds the fields)."""

    __slots__ = ()
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Service(_Namespaced):
    namespace: str
    name: str
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    affinity_timeout: int = 0  # 0 = no session affinity
    internal_local: bool = False
    external_local: bool = False
    headless: bool = False
    scheduler: str | None = None
    scheduler_flags: str | None = None
    source_ranges: tuple[str, ...] = ()
    uid: str = ""
    health_check_node_port: int = 0  # served only for LoadBalancer + externalTrafficPolicy Local


_READY, _SERVING, _TERMINATING = 1, 2, 4
_PLAIN = _READY | _SERVING  # and no hints: the state is the bits alone


@dataclass(frozen=True, slots=True, init=False, repr=False)
class Endpoint:
    """One endpoint of a slice, in three slots: there is one per endpoint in the cluster (213,520 at
    20,000 Services x 10), so the three conditions share a small int and the rarely set topology
    hints ride with them only when present (56 B an endpoint, not 96: 8 MiB at that size). Its
    targetRef (the pod's name, display only) is kept by the slice (EndpointSlice.targets).
    Built and read by the names below, as a record of seven fields."""

    address: str
    node: str
    _state: int | tuple[int, tuple[str, ...] | None, tuple[str, ...] | None]  # bits, or (bits, zones, nodes)

    def __init__(self, address: str, ready: bool = True, serving: bool = True, terminating: bool = False,
                 node: str = "", zones: tuple[str, ...] | None = None,
                 nodes: tuple[str, ...] | None = None) -> None:
        bits = (_READY if ready else 0) | (_SERVING if serving else 0) | (_TERMINATING if terminating else 0)
        put = object.__setattr__
        put(self, "address", address)
        put(self, "node", node)
        put(self, "_state", bits if zones is None and nodes is None else (bits, zones, nodes))

    @classmethod
    def of(cls, address: str, node: str, bits: int) -> Endpoint:
        """An endpoint without topology hints from its condition bits (the parse's fast path)."""
        ep = object.__new__(cls)
        put = object.__setattr__
        put(ep, "address", address)
        put(ep, "node", node)
        put(ep, "_state", bits)
        return ep

    @staticmethod
    def all_plain(endpoints: Iterable[Endpoint]) -> bool:
        """Every one ready, serving, not terminating and without topology hints: the common
        endpoint, for which kube-proxy's selection has nothing to choose (translate's fast path)."""
        return all(ep._state == _PLAIN for ep in endpoints)

    def _bits(self) -> int:
        state = self._state
        return state if type(state) is int else state[0]  # type: ignore[index]

    @property
    def ready(self) -> bool:
        return bool(self._bits() & _READY)

    @property
    def serving(self) -> bool:
        return bool(self._bits() & _SERVING)

    @property
    def terminating(self) -> bool:
        return bool(self._bits() & _TERMINATING)

    @property
    def zones(self) -> tuple[str, ...] | None:
        """Topology hints (forZones); None = no hints."""
        state = self._state
        return None if type(state) is int else state[1]  # type: ignore[index]

    @property
    def nodes(self) -> tuple[str, ...] | None:
        """hints.forNodes (PreferSameNode); None = no hints."""
        state = self._state
        return None if type(state) is int else state[2]  # type: ignore[index]

    def __repr__(self) -> str:
        return (f"Endpoint(address={self.address!r}, ready={self.ready}, serving={self.serving}, "
                f"terminating={self.terminating}, node={self.node!r}, zones={self.zones!r}, "
                f"nodes={self.nodes!r})")


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    protocol: int
    port: int


@dataclass(frozen=True, slots=True)
class EndpointSlice(_Namespaced):
    namespace: str
    name: str
    service: str  # owning Service name (label kubernetes.io/service-name)
    family: int
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    legacy: bool = False  # mirrored from a v1 Endpoints object
    # The endpoints' targetRefs ("Pod/web-1", "" when one does not say), a line each in endpoint
    # order; "" when none says. For display only (`ipvsproxy list`), so one string per slice,
    # not one per endpoint: a str object costs ~50 B before its first character, 10 MiB at
    # 20,000 Services x 10.
    targets: str = ""

    @property
    def service_id(self) -> str:
        return f"{self.namespace}/{self.service}"

    def named(self) -> Iterator[tuple[Endpoint, str]]:
        """Each endpoint with its targetRef ("" when it has none)."""
        targets = self.targets.split("\n") if self.targets else itertools.repeat("")
        return zip(self.endpoints, targets, strict=False)  # repeat("") is endless


def _target(ref: Any) -> str:
    """A targetRef as "Kind/name" ("" without a name), on one line (EndpointSlice.targets)."""
    ref = _mapping(ref)
    name = ref.get("name")
    return f"{ref.get('kind', '')}/{name}".replace("\n", " ") if name else ""


def _joined(targets: list[str]) -> str:
    return "\n".join(targets) if any(targets) else ""


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    addresses: tuple[str, ...] = ()  # InternalIP and ExternalIP, canonical
    zone: str = ""
    # False while the node is being deleted or carries the autoscaler's
    # ToBeDeleted taint: /healthz then tells load balancers to go (KEP-3836).
    eligible: bool = True


def proxy_name_selector(proxy_name: str = "") -> str:
    """The label selector for the Services this proxy owns: those without a
    service-proxy-name label, or (``--service-proxy-name NAME``) exactly those
    labelled NAME; never one labelled service.kubernetes.io/headless (kube-proxy
    server.go: noProxyName and noHeadlessEndpoints on its informer factory)."""
    if proxy_name:
        return f"{SERVICE_PROXY_NAME_LABEL}={proxy_name},!{HEADLESS_LABEL}"
    return f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"


def selected_by_proxy_name(obj: Any, proxy_name: str = "") -> bool:
    """Whether a raw Service belongs to this proxy (what the selector of
    :func:`proxy_name_selector` selects, for sources that cannot ask the API)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    labels = labels if isinstance(labels, Mapping) else {}
    if HEADLESS_LABEL in labels:
        return False
    if proxy_name:
        return labels.get(SERVICE_PROXY_NAME_LABEL) == proxy_name
    return SERVICE_PROXY_NAME_LABEL not in labels


def describe(obj: Any) -> str:
    """'Service default/web' for messages, whatever shape obj has."""
    if not isinstance(obj, Mapping):
        return f"non-object {type(obj).__name__}"
    kind = obj.get("kind") or "object"
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return f"{kind} (no metadata)"
    ns, name = meta.get("namespace"), meta.get("name")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _mapping(value: Any) -> Mapping[str, Any]:
    # type() first: the isinstance check against the Mapping ABC was 0.5 s of a 10,000-Service parse
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _shared(value: Any) -> str:
    """A string that many records repeat (namespace, node, port name, Service
    name), interned: at 10,000 Services x 10 endpoints one copy per distinct
    value instead of one per record saves ~8 MiB (each JSON value is its own
    string object)."""
    return sys.intern(value if type(value) is str else str(value or ""))


def _meta(obj: Any, namespaced: bool = True) -> tuple[str, str, Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise InvalidObject(f"{describe(obj)}: not a mapping")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise InvalidObject(f"{describe(obj)}: metadata.name missing")
    ns = meta.get("namespace") or ("default" if namespaced else "")
    if not isinstance(ns, str):
        raise InvalidObject(f"{describe(obj)}: metadata.namespace is not a string")
    return _shared(ns), meta["name"], meta


def _ips(values: Any, what: str, problems: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for v in _list(values):
        try:
            ip = canonical_ip(str(v)) if isinstance(v, str) else None
        except ValueError:
            ip = None
        if ip is None or "%" in ip:  # a scoped IPv6 address ("fe80::1%eth0") is no Service or endpoint address
            problems.append(f"{what}: invalid IP {v!r} ignored")
        elif ip not in out:
            out.append(ip)
    return tuple(out)


def _port(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= 65535 else None


def parse_service(obj: Any) -> tuple[Service, list[str]]:
    """A Service record and the problems found (fields dropped or defaulted)."""
    ns, name, meta = _meta(obj)
    where = f"Service {ns}/{name}"
    spec = _mapping(obj.get("spec"))
    problems: list[str] = []
    try:
        stype = ServiceType(spec.get("type") or "ClusterIP")
    except ValueError:
        raise InvalidObject(f"{where}: unknown type {spec.get('type')!r}") from None
    raw_ips = _list(spec.get("clusterIPs")) or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    headless = any(str(ip) == "None" for ip in raw_ips)
    cluster_ips = () if headless else _ips(raw_ips, f"{where} clusterIPs", problems)
    ports: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    for i, p in enumerate(_list(spec.get("ports"))):
        p = _mapping(p)
        pname = p.get("name") or ""
        try:
            proto = Protocol.parse(str(p.get("protocol") or "TCP"))
        except ValueError as exc:
            problems.append(f"{where} port {pname or i}: {exc}; port ignored")
            continue
        port = _port(p.get("port"))
        if port is None or not isinstance(pname, str):
            problems.append(f"{where} port {pname or i}: invalid port {p.get('port')!r}; ignored")
            continue
        node_port = p.get("nodePort") or 0
        if node_port and _port(node_port) is None:
            problems.append(f"{where} port {pname or i}: invalid nodePort {node_port!r}; ignored")
            node_port = 0
        if (pname, proto) in seen:
            problems.append(f"{where}: duplicate port name {pname!r}; second one ignored")
            continue
        seen.add((pname, proto))
        ports.append(ServicePort(_shared(pname), int(proto), port, int(node_port)))
    timeout = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = _mapping(_mapping(spec.get("sessionAffinityConfig")).get("clientIP"))
        raw = cfg.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw <= 86400:
            timeout = raw
        else:
            problems.append(f"{where}: invalid sessionAffinity timeout {raw!r}; using 10800")
            timeout = DEFAULT_AFFINITY_TIMEOUT
    lb = _mapping(_mapping(obj.get("status")).get("loadBalancer"))
    lb_raw = [
        i.get("ip") for i in map(_mapping, _list(lb.get("ingress")))
        if i.get("ip") and i.get("ipMode") != "Proxy"
    ]
    ann = _mapping(meta.get("annotations"))
    sched, flags = ann.get(ANNOTATION), ann.get(FLAGS_ANNOTATION)
    external_ips = _ips(spec.get("externalIPs"), f"{where} externalIPs", problems)
    # kube-proxy's ExternalPolicyLocal (pkg/api/v1/service/util.go): NodePort and
    # LoadBalancer Services, and any Service with externalIPs (a ClusterIP one too).
    external_local = spec.get("externalTrafficPolicy") == "Local" and (
        stype.has_node_ports or bool(external_ips))
    hcnp = 0
    if stype == ServiceType.LOAD_BALANCER and external_local:  # NeedsHealthCheck
        raw_hc = spec.get("healthCheckNodePort")
        hcnp = _port(raw_hc) or 0
        if raw_hc is not None and not hcnp:
            problems.append(f"{where}: invalid healthCheckNodePort {raw_hc!r}; no health check served")
    svc = Service(
        namespace=ns,
        name=_shared(name),  # the EndpointSlices' service-name label shares it
        type=stype,
        cluster_ips=cluster_ips,
        external_ips=external_ips,
        lb_ips=_ips(lb_raw, f"{where} loadBalancer ingress", problems),
        ports=tuple(ports),
        affinity_timeout=timeout,
        internal_local=spec.get("internalTrafficPolicy") == "Local",
        external_local=external_local,
        headless=headless,
        scheduler=sched if isinstance(sched, str) else None,
        scheduler_flags=flags if isinstance(flags, str) else None,
        source_ranges=tuple(str(r) for r in _list(spec.get("loadBalancerSourceRanges"))),
        uid=str(meta.get("uid") or ""),
        health_check_node_port=hcnp,
    )
    return svc, problems


def _condition(conds: Mapping[str, Any], key: str, default: bool, where: str, problems: list[str]) -> bool:
    """An endpoint condition: a boolean, or "true"/"false" as hand-written YAML
    may quote it (bool("false") would be True). Anything else: the default."""
    v = conds.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    problems.append(f"{where}: condition {key} is not a boolean ({v!r}); using {str(default).lower()}")
    return default


def _one_ip(value: Any, family: int) -> str | None:
    """A lone endpoint address as `_ips` and the family filter would keep it; None: not
    certainly so (the general path decides, and says what is wrong)."""
    if type(value) is not str:
        return None
    try:
        ip = canonical_ip(value)
    except ValueError:
        return None
    return ip if "%" not in ip and family_of(ip) == family else None


def _bits(conds: dict[str, Any]) -> int | None:
    """The three conditions as Endpoint's bits when each is a boolean or unset (ready and
    serving default to true, terminating to false); None: one needs `_condition`."""
    ready, serving, terminating = conds.get("ready"), conds.get("serving"), conds.get("terminating")
    bits = 0
    if ready is None or ready is True:
        bits = _READY
    elif ready is not False:
        return None
    if serving is None or serving is True:
        bits |= _SERVING
    elif serving is not False:
        return None
    if terminating is True:
        bits |= _TERMINATING
    elif terminating is not None and terminating is not False:
        return None
    return bits


def parse_endpointslice(obj: Any) -> tuple[EndpointSlice, list[str]]:
    """An EndpointSlice record and the problems found."""
    ns, name, meta = _meta(obj)
    where = f"EndpointSlice {ns}/{name}"
    service = _mapping(meta.get("labels")).get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise InvalidObject(f"{where}: no {SERVICE_NAME_LABEL} label")
    service = _shared(service)
    atype = obj.get("addressType")
    if atype not in ("IPv4", "IPv6"):
        raise InvalidObject(f"{where}: addressType {atype!r} not supported (IPv4 or IPv6)")
    family = family_of("::" if atype == "IPv6" else "0.0.0.0")
    problems: list[str] = []
    ports = []
    for p in map(_mapping, _list(obj.get("ports"))):
        pname = p.get("name") or ""
        port = _port(p.get("port"))
        try:
            proto = Protocol.parse(str(p.get("protocol") or "TCP"))
        except ValueError as exc:
            problems.append(f"{where} port {pname!r}: {exc}; ignored")
            continue
        if port is None or not isinstance(pname, str):
            problems.append(f"{where} port {pname!r}: invalid port {p.get('port')!r}; ignored")
            continue
        ports.append(SlicePort(_shared(pname), int(proto), port))
    endpoints = []
    targets: list[str] = []
    for e in map(_mapping, _list(obj.get("endpoints"))):
        # The common endpoint (one address, boolean conditions, no hints) in a few steps; it is
        # read as the general path below reads it (anything else, or anything wrong: that path).
        raw, conds = e.get("addresses"), e.get("conditions")
        if type(raw) is list and len(raw) == 1 and type(conds) is dict and e.get("hints") is None:
            addr, bits = _one_ip(raw[0], family), _bits(conds)
            if addr is not None and bits is not None:
                endpoints.append(Endpoint.of(addr, _shared(e.get("nodeName")), bits))
                targets.append(_target(e.get("targetRef")))
                continue
        addrs = _ips(e.get("addresses"), where, problems)
        addrs = tuple(a for a in addrs if family_of(a) == family)
        if not addrs:
            continue
        conds = _mapping(e.get("conditions"))
        ready = _condition(conds, "ready", True, where, problems)
        hints = e.get("hints")
        zones = nodes = None
        if isinstance(hints, Mapping):
            # An empty (or nameless) forZones/forNodes list is no hint at all, as in kube-proxy.
            names = (_mapping(z).get("name") for z in _list(hints.get("forZones")))
            zones = tuple(_shared(n) for n in names if isinstance(n, str) and n) or None
            names = (_mapping(z).get("name") for z in _list(hints.get("forNodes")))
            nodes = tuple(_shared(n) for n in names if isinstance(n, str) and n) or None
        endpoints.append(
            Endpoint(
                address=addrs[0],
                ready=ready,
                # An unset serving condition is true (kube-proxy: nil = true), not "= ready".
                serving=_condition(conds, "serving", True, where, problems),
                terminating=_condition(conds, "terminating", False, where, problems),
                node=_shared(e.get("nodeName")),
                zones=zones,
                nodes=nodes,
            )
        )
        targets.append(_target(e.get("targetRef")))
    return EndpointSlice(ns, name, service, family, tuple(ports), tuple(endpoints),
                         targets=_joined(targets)), problems


def parse_endpoints(obj: Any) -> tuple[list[EndpointSlice], list[str]]:
    """Legacy v1 Endpoints read as EndpointSlice mirroring reads them.

    One slice per subset and address family; notReadyAddresses become endpoints
    that are not ready. The Service name is the Endpoints object's name.
    """
    ns, name, _ = _meta(obj)
    where = f"Endpoints {ns}/{name}"
    problems: list[str] = []
    slices = []
    for i, subset in enumerate(map(_mapping, _list(obj.get("subsets")))):
        ports = []
        for p in map(_mapping, _list(subset.get("ports"))):
            port = _port(p.get("port"))
            try:
                proto = Protocol.parse(str(p.get("protocol") or "TCP"))
            except ValueError as exc:
                problems.append(f"{where}: {exc}; port ignored")
                continue
            if port is None:
                problems.append(f"{where}: invalid port {p.get('port')!r}; ignored")
                continue
            ports.append(SlicePort(_shared(p.get("name")), int(proto), port))
        by_family: dict[int, tuple[list[Endpoint], list[str]]] = {}
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for a in map(_mapping, _list(subset.get(key))):
                ips = _ips([a.get("ip")], where, problems)
                if not ips:
                    continue
                eps, targets = by_family.setdefault(family_of(ips[0]), ([], []))
                eps.append(Endpoint(ips[0], ready, ready, False, _shared(a.get("nodeName"))))
                targets.append(_target(a.get("targetRef")))
        for fam, (eps, targets) in sorted(by_family.items()):
            slices.append(
                EndpointSlice(ns, f"{name}-legacy-{i}-{fam}", name, fam, tuple(ports), tuple(eps),
                              legacy=True, targets=_joined(targets))
            )
    return slices, problems


def parse_node(obj: Any) -> tuple[Node, list[str]]:
    """A Node record: its name, InternalIP/ExternalIP addresses, zone, and
    whether load balancers may use it (not being deleted, no ToBeDeleted taint)."""
    _, name, meta = _meta(obj, namespaced=False)
    problems: list[str] = []
    raw = [
        a.get("address")
        for a in map(_mapping, _list(_mapping(obj.get("status")).get("addresses")))
        if a.get("type") in ("InternalIP", "ExternalIP")
    ]
    addrs = _ips(raw, f"Node {name} addresses", problems)
    zone = _mapping(meta.get("labels")).get(ZONE_LABEL) or ""
    taints = (_mapping(t).get("key") for t in _list(_mapping(obj.get("spec")).get("taints")))
    eligible = not meta.get("deletionTimestamp") and TO_BE_DELETED_TAINT not in taints
    return Node(name, addrs, str(zone), eligible), problems
