"""The vocabulary every layer shares: virtual servers, real servers, states.

Pure data, no I/O. Desired state comes out of translation; observed state comes
out of a dataplane dump; the planner compares the two. Everything here is
immutable (or treated so) so that states can be cached and diffed cheaply.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum
from typing import NamedTuple, TypeAlias

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

# IPVS service flags (include/uapi/linux/ip_vs.h).
F_PERSISTENT = 0x01
F_HASHED = 0x02
F_ONEPACKET = 0x04
F_SCHED1 = 0x08
F_SCHED2 = 0x10
F_SCHED3 = 0x20
# The ownership mark. SCHED3 is read by no in-kernel scheduler, survives in the
# kernel across our restarts and shows in `ipvsadm -Sn` as "flag-3": a virtual
# server carrying it was created by ipvsproxy.
F_OWNED = F_SCHED3
SCHED_FLAGS = F_SCHED1 | F_SCHED2


class Protocol(IntEnum):
    """IP protocols a Service port can use."""

    TCP = 6
    UDP = 17
    SCTP = 132

    @classmethod
    def parse(cls, name: str) -> Protocol:
        """'TCP' -> Protocol.TCP; raises ValueError on anything else."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unsupported protocol {name!r} (want TCP, UDP or SCTP)") from None

    @classmethod
    def name_of(cls, number: int) -> str | None:
        """6 -> 'TCP'; None for a protocol a Service cannot use (a foreign virtual server's).
        The one protocol table: IPVS messages, nftables elements and `list` all spell through it."""
        member = cls._value2member_map_.get(number)
        return member.name if isinstance(member, Protocol) else None


class ServiceKind(StrEnum):
    """As which kind of address a virtual server serves a Service port."""

    CLUSTER_IP = "ClusterIP"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"
    NODE_PORT = "NodePort"


class Full(Enum):
    """`FULL` stands where a scope of virtual servers is expected and means all of them
    (a full sync), so that "everything" is said, not implied by a None."""

    SYNC = "full"


FULL = Full.SYNC
Scope: TypeAlias = "Collection[VSKey] | Full"


def family_of(address: str) -> int:
    """AF_INET or AF_INET6 for a textual IP address (or CIDR). The one place that
    tells the families apart by spelling; everything else asks here."""
    return AF_INET6 if ":" in address else AF_INET


def ip_version(address: str) -> int:
    """4 or 6 for a textual IP address (or CIDR), as nftables set names and
    ipaddress networks count them."""
    return 6 if family_of(address) == AF_INET6 else 4


def canonical_ip(address: str) -> str:
    """Normalise an IP address the way the kernel reports it (raises ValueError
    when it is not one).

    IPv6 is spelled by inet_ntop, as IPVS and address dumps come back: Python
    3.11 writes the IPv4-mapped ``::ffff:10.0.0.1`` as ``::ffff:a00:1``, so a
    Service holding it never matched the kernel and was bound and unbound on
    alternate full syncs. A scope (``fe80::1%eth0``) is kept, for the caller
    to refuse.
    """
    # Fast path (C, no objects): half the EndpointSlice parse went to ipaddress.ip_address.
    # It answers only where the result is certainly what the slow path gives: IPv4 already
    # spelled canonically, and IPv6 without a scope or an embedded IPv4 part.
    try:
        if ":" in address:
            if "." not in address and "%" not in address:
                return socket.inet_ntop(AF_INET6, socket.inet_pton(AF_INET6, address))
        elif socket.inet_ntop(AF_INET, socket.inet_pton(AF_INET, address)) == address:
            return address
    except (OSError, ValueError):
        pass  # the slow path says what is wrong, in its words
    ip = ipaddress.ip_address(address.strip())
    if ip.version == 4:
        return str(ip)
    text = socket.inet_ntop(AF_INET6, ip.packed)
    return f"{text}%{ip.scope_id}" if ip.scope_id else text


class VSKey(NamedTuple):
    """What identifies a virtual server in the kernel."""

    family: int
    protocol: int
    address: str
    port: int

    def __str__(self) -> str:
        proto = Protocol.name_of(self.protocol) or str(self.protocol)
        return f"{proto} {join_host_port(self.address, self.port)}"


def join_host_port(address: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    return f"[{address}]:{port}" if family_of(address) == AF_INET6 else f"{address}:{port}"


class Real(NamedTuple):
    """A real server (endpoint) of a virtual server. Forwarding is always NAT."""

    address: str
    port: int
    weight: int = 1


class ServiceRef(NamedTuple):
    """Which Service port a virtual server comes from, and as which kind of address."""

    namespace: str
    name: str
    port_name: str
    kind: ServiceKind

    @property
    def service_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.name}{port}"


class Settings(NamedTuple):
    """A virtual server's settings as the kernel stores them: what an edit changes."""

    scheduler: str
    flags: int  # kernel flags (ownership mark and persistence included)
    timeout: int


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """A desired virtual server: settings plus real servers."""

    key: VSKey
    scheduler: str = "rr"
    flags: int = 0  # scheduler flags only (SCHED1/SCHED2); persistence is `timeout`
    timeout: int = 0  # persistence timeout in seconds; 0 = not persistent
    reals: tuple[Real, ...] = ()  # one per (address, port), in order (translate makes them so)
    service: ServiceRef | None = None
    # For the packet filter (dataplane/nft.py), not for IPVS: traffic policy
    # Local means "keep the client's address" (no masquerade); source ranges
    # are the Service's loadBalancerSourceRanges (LoadBalancer addresses only).
    local: bool = False
    source_ranges: tuple[str, ...] = ()
    # Whether the address is bound to the dummy interface: never a NodePort's,
    # nor an address the node already has on another interface (the reconciler
    # would otherwise unbind it one day). docs/semantics.md rule 5.
    bind: bool = True
    # externalTrafficPolicy Local with no local endpoint: the real servers are
    # the cluster's, for traffic that starts on this node (pods, the host);
    # traffic from elsewhere is dropped by the packet filter (rule 2).
    local_origin_only: bool = False

    @property
    def kernel_flags(self) -> int:
        """The flags word as the kernel stores it (with our ownership mark)."""
        return self.flags | F_OWNED | (F_PERSISTENT if self.timeout else 0)

    def settings(self) -> Settings:
        return Settings(self.scheduler, self.kernel_flags, self.timeout)

    def as_programmed(self) -> ObservedVS:
        """The kernel's copy of this virtual server once programmed whole: what an incremental
        sync plans against instead of reading the kernel (reconcile.Reconciler._remembered)."""
        return ObservedVS(self.key, self.scheduler, self.kernel_flags, self.timeout,
                          {(r.address, r.port): ObservedReal(r.address, r.port, r.weight) for r in self.reals})


@dataclass(slots=True)
class ObservedReal:
    """A real server as the dataplane reports it."""

    address: str
    port: int
    weight: int
    active: int = 0
    inactive: int = 0
    stats: Mapping[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ObservedVS:
    """A virtual server as the dataplane reports it."""

    key: VSKey
    scheduler: str
    flags: int  # kernel flags, HASHED masked off
    timeout: int
    reals: dict[tuple[str, int], ObservedReal] = field(default_factory=dict)
    stats: Mapping[str, int] = field(default_factory=dict)

    @property
    def owned(self) -> bool:
        return bool(self.flags & F_OWNED)

    def settings(self) -> Settings:
        return Settings(self.scheduler, self.flags, self.timeout if self.flags & F_PERSISTENT else 0)


@dataclass(slots=True)
class ObservedState:
    """The dataplane's table plus the addresses bound on our interface."""

    services: dict[VSKey, ObservedVS] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)


@dataclass(slots=True)
class DesiredState:
    """What the node should look like: virtual servers and addresses to bind."""

    services: dict[VSKey, VirtualServer] = field(default_factory=dict)
    # A set, or (the reconciler's DesiredIndex) the keys of its count per address: a set of
    # 20,000 strings is a 2 MiB table beside the counts' 0.6 MiB.
    addresses: AbstractSet[str] = field(default_factory=set)

    @classmethod
    def of(cls, servers: Iterable[VirtualServer], addresses: Iterable[str] = ()) -> DesiredState:
        return cls({vs.key: vs for vs in servers}, set(addresses))

    def address_changes(self, have: set[str], scope: Scope = FULL) -> AddressChanges:
        """(to bind, to unbind) against the addresses `have`. With a scope only
        the addresses of those virtual servers are compared: a desired address
        comes and goes only with a virtual server on it (DesiredIndex), so one
        outside the scope cannot have changed, and diffing every address would
        make each small sync cost O(cluster)."""
        if scope is FULL:
            return AddressChanges(set(self.addresses - have), set(have - self.addresses))
        addrs = {key.address for key in scope}
        return AddressChanges({a for a in addrs if a in self.addresses and a not in have},
                              {a for a in addrs if a in have and a not in self.addresses})


class AddressChanges(NamedTuple):
    """Addresses to bind and to unbind."""

    bind: set[str]
    unbind: set[str]


class Change(NamedTuple):
    """One virtual server's change: what it was and what it is now (None: absent)."""

    old: VirtualServer | None
    new: VirtualServer | None


# The change delta of one sync, produced once (reconcile.DesiredIndex) and handed to every
# backend: its keys are the planner's scope, its (old, new) pairs drive the firewall's counts.
Delta: TypeAlias = "dict[VSKey, Change]"


def record_change(delta: Delta, key: VSKey, old: VirtualServer | None, new: VirtualServer | None) -> None:
    """Add one change to a delta (in place); a key changed twice keeps its first `old`."""
    earlier = delta.get(key)
    delta[key] = Change(old if earlier is None else earlier.old, new)


def merge_delta(into: Delta, more: Delta) -> None:
    """Fold a later delta into an earlier one (in place)."""
    for key, change in more.items():
        record_change(into, key, change.old, change.new)
