"""Kubernetes Services + EndpointSlices + this Node -> desired IPVS state.

Pure functions implementing SPEC.md "Translation rules". Work is per Service
(:func:`translate_service`) so the reconciler can redo only the Services that
changed; :func:`translate` does a whole cluster (used by --once, diff, tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .model import (
    AF_INET,
    AF_INET6,
    DesiredState,
    EndpointMap,
    Real,
    ServiceRef,
    VirtualServer,
    VSKey,
    family_of,
)
from .objects import Endpoint, EndpointSlice, Node, Service, ServicePort
from .schedulers import Registry

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Config:
    """Node-wide settings translation depends on."""

    node_name: str
    scheduler: str = "rr"
    nodeport_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(slots=True)
class Translation:
    """The virtual servers of one Service and what went wrong on the way."""

    servers: list[VirtualServer] = field(default_factory=list)
    addresses: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    scheduler_problem: str | None = None


def node_addresses(node: Node | None, cidrs: Sequence[IPNetwork]) -> list[str]:
    """Node addresses that carry NodePorts (all of them unless CIDRs narrow it)."""
    if node is None:
        return []
    if not cidrs:
        return list(node.addresses)
    return [
        a for a in node.addresses
        if any(ipaddress.ip_address(a) in net for net in cidrs if net.version == (6 if ":" in a else 4))
    ]


class _Candidate:
    """A (address, port) real server with what selection needs to know."""

    __slots__ = ("ep", "port")

    def __init__(self, ep: Endpoint, port: int) -> None:
        self.ep, self.port = ep, port


def _candidates(slices: Iterable[EndpointSlice], sp: ServicePort, family: int) -> list[_Candidate]:
    """Endpoints for one Service port and family; named ports resolve per slice.

    EndpointSlices win over legacy Endpoints when a Service has both.
    """
    slices = list(slices)
    if any(not s.legacy for s in slices):
        slices = [s for s in slices if not s.legacy]
    seen: set[tuple[str, int]] = set()
    out = []
    for s in slices:
        if s.family != family:
            continue
        port = next((p.port for p in s.ports if p.name == sp.name and p.protocol == sp.protocol), None)
        if port is None:
            continue
        for ep in s.endpoints:
            if (ep.address, port) not in seen:
                seen.add((ep.address, port))
                out.append(_Candidate(ep, port))
    return out


def _select(cands: list[_Candidate], node: Node | None, local: bool, node_name: str) -> list[_Candidate]:
    """kube-proxy's endpoint selection for one traffic policy.

    Ready endpoints (narrowed to this node for Local, or to this zone by
    topology hints for Cluster); with none ready, serving+terminating ones.
    """
    if local:
        cands = [c for c in cands if c.ep.node == node_name]
    ready = [c for c in cands if c.ep.ready]
    if ready:
        if not local and node is not None and node.zone and all(c.ep.zones is not None for c in ready):
            zoned = [c for c in ready if node.zone in (c.ep.zones or ())]
            if zoned:
                return zoned
        return ready
    return [c for c in cands if c.ep.serving and c.ep.terminating]


def _reals(chosen: list[_Candidate]) -> tuple[tuple[Real, ...], EndpointMap]:
    return tuple(sorted(Real(c.ep.address, c.port) for c in chosen)), EndpointMap(c.ep for c in chosen)


def translate_service(
    svc: Service,
    slices: Iterable[EndpointSlice],
    node: Node | None,
    cfg: Config,
    registry: Registry,
    usable: Callable[[str], bool] | None = None,
) -> Translation:
    """All virtual servers for one Service."""
    out = Translation()
    if svc.type == "ExternalName" or svc.headless:
        return out
    choice = registry.choose(svc.scheduler, svc.scheduler_flags, cfg.scheduler, usable)
    if choice.problem:
        out.scheduler_problem = f"Service {svc.id}: {choice.problem}; using {choice.scheduler!r}"
    slices = list(slices)
    np_addrs = node_addresses(node, cfg.nodeport_cidrs) if svc.type in ("NodePort", "LoadBalancer") else []
    for sp in svc.ports:
        for family in (AF_INET, AF_INET6):
            cands = _candidates(slices, sp, family)
            picked = {
                local: _reals(_select(cands, node, local, cfg.node_name))
                for local in {svc.internal_local, svc.external_local}
            }
            vips = [(ip, "ClusterIP", svc.internal_local, True) for ip in svc.cluster_ips]
            vips += [(ip, "ExternalIP", svc.external_local, True) for ip in svc.external_ips]
            vips += [(ip, "LoadBalancer", svc.external_local, True) for ip in svc.lb_ips]
            if sp.node_port:
                vips += [(ip, "NodePort", svc.external_local, False) for ip in np_addrs]
            for ip, kind, local, bind in vips:
                if family_of(ip) != family:
                    continue
                port = sp.node_port if kind == "NodePort" else sp.port
                rs, eps = picked[local]
                out.servers.append(
                    VirtualServer(
                        key=VSKey(family, sp.protocol, ip, port),
                        scheduler=choice.scheduler,
                        flags=choice.flags,
                        timeout=svc.affinity_timeout,
                        reals=rs,
                        service=ServiceRef(svc.namespace, svc.name, sp.name, kind),
                        local=local,
                        source_ranges=svc.source_ranges if kind == "LoadBalancer" else (),
                        endpoints=eps,
                    )
                )
                if bind:
                    out.addresses.add(ip)
    return out


def translate(
    services: Iterable[Service],
    slices: Iterable[EndpointSlice],
    node: Node | None,
    cfg: Config,
    registry: Registry,
    usable: Callable[[str], bool] | None = None,
) -> tuple[DesiredState, list[str]]:
    """The whole node's desired state, and every problem met on the way.

    Two Services claiming the same address:port: the first by namespace/name
    keeps it, the other is told (deterministic whatever the input order).
    """
    by_service: dict[str, list[EndpointSlice]] = {}
    for s in slices:
        by_service.setdefault(s.service_id, []).append(s)
    desired = DesiredState()
    problems: list[str] = []
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        t = translate_service(svc, by_service.get(svc.id, ()), node, cfg, registry, usable)
        problems += t.problems
        if t.scheduler_problem:
            problems.append(t.scheduler_problem)
        for vs in t.servers:
            prior = desired.services.get(vs.key)
            if prior is not None and prior.service is not None:
                problems.append(
                    f"Service {svc.id}: {vs.key} already belongs to Service "
                    f"{prior.service.service_id}; ignored"
                )
                continue
            desired.services[vs.key] = vs
        desired.addresses |= t.addresses
    return desired, problems
