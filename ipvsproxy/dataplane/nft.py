"""The packet-filter companion to IPVS: one nftables table, ``inet ipvsproxy``.

IPVS alone does not make Services work. kube-proxy's IPVS mode adds iptables
and ipset rules for masquerading, hairpin and filtering; this module does the
same job with nftables (docs/nftables.md prints the rule set):

* masquerade: new connections to a Service address from outside the cluster
  CIDRs (--cluster-cidr), or from anywhere with --masquerade-all, get mark bit
  :data:`MASQ_MARK` before IPVS sees them; IPVS NAT keeps the mark and the
  ``postrouting`` nat chain masquerades marked packets, so replies from
  endpoints on other nodes come back through this node. Traffic policy Local
  keeps the client's address (never marked);
* hairpin: a packet IPVS sends from an endpoint to that same endpoint
  (saddr . proto . dport . daddr in ``hairpin4/6``) is masqueraded;
* filtering: a new connection to an address on the dummy interface on a port
  that is no Service port is refused (TCP reset / ICMP port unreachable)
  before IPVS (and the node's own sockets) see it: a filter chain at priority
  0 runs before IPVS's LOCAL_IN hook (priority 98);
* loadBalancerSourceRanges: packets to a LoadBalancer address:port from a
  source outside its ranges are dropped;
* externalTrafficPolicy Local with no local endpoint: the NodePort, external
  and load-balancer virtual servers get the cluster's endpoints so that pods
  and the host on this node can still use them (docs/semantics.md rule 2);
  new connections to them from elsewhere (neither a local address nor a
  --cluster-cidr source) are dropped, as kube-proxy's iptables and nftables
  modes drop them (the health-check node port keeps load balancers away).

The rules never change at run time; only set elements do. Every sync sends
the elements that changed (from the reconciler's change delta) as one
``nft -j -f -`` JSON transaction (one netlink batch: all or nothing); only a
full sync reads the table back to repair drift (see :class:`NftFirewall`).
Nothing outside the table is ever touched; cleanup deletes the table.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Collection, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from ..config import AgentConfig
from ..model import (
    Delta,
    DesiredState,
    Protocol,
    Real,
    ServiceKind,
    VirtualServer,
    VSKey,
    canonical_ip,
    family_of,
    ip_version,
)

if TYPE_CHECKING:
    from .nft_wire import ElementChange, NftWire

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "ipvsproxy"
MASQ_MARK = 0x4000  # kube-proxy's KUBE-MARK-MASQ bit: "masquerade me"
RULE_TAG = "ipvsproxy:"

NftRunner = Callable[[dict[str, Any]], dict[str, Any]]
# A runner that also takes the document as a file of JSON text, read from its start (`takes_file
# = True`, as run_nft_cli): the firewall then writes a transaction into an in-memory file one
# element at a time, and no copy of the document is ever whole in the agent's heap.
TakesFile = Callable[[dict[str, Any] | BinaryIO], dict[str, Any]]
KernelElem = tuple[Any, ...]  # a set element as the kernel holds it: a tuple of its fields
Elem = KernelElem | str  # an element as counted: a VIP is its address (VIP_SETS), a VSKey a tuple
ElementReader = Callable[["SetSpec"], set[KernelElem]]  # one set's elements, as the kernel holds them

# Protocols go to nft as numbers: nft resolves a name through /etc/protocols, which a minimal
# image (debian:bookworm-slim, no netbase) lacks ("Error: Could not resolve protocol name", seen
# in the chart's DaemonSet on a real node). Listings may still print names: both are read.
_TCP, _ICMP, _ICMPV6 = 6, 1, 58
# Element changes up to this many go as a netlink batch of our own (a change path's few, or a
# restart's): ~60 bytes each in one send. More (a table refilled whole) go through nft's memfd.
NETLINK_MAX_ELEMENTS = 20_000


class NftError(RuntimeError):
    """nft refused a command document (the message is nft's own), or did not
    answer in time (`timed_out`: a transaction may then have gone through)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def run_nft_cli(doc: dict[str, Any] | str | BinaryIO, *, binary: str = "nft", timeout: float = 60.0,
                terse: bool = False) -> dict[str, Any]:
    """Run one JSON command document (a dict, its JSON text, or a file holding that text, read
    from its start) through ``nft -j -f -`` (no shell).

    The document goes in on stdin (a file is handed over as nft's stdin, not read
    here), so no value ever reaches a command line;
    all commands of a document are one netlink batch (one transaction).
    Returns the parsed output ({} when nft printed nothing). ``terse``
    (``nft -t``) lists sets without their elements. The time allowed grows
    with the document: a first transaction at 10,000 Services carries
    ~170,000 elements (about 10 MB), which an emulated VM takes a minute for.
    """
    path = shutil.which(binary) or binary
    stdin: dict[str, Any]
    if isinstance(doc, (str, dict)):
        payload = doc if isinstance(doc, str) else json.dumps(doc)
        size, stdin = len(payload), {"input": payload.encode()}
    else:
        size, stdin = os.fstat(doc.fileno()).st_size - doc.tell(), {"stdin": doc}
    timeout += size / 100_000  # one more second per 100 kB
    try:
        proc = subprocess.run([path, "-j", *(["-t"] if terse else []), "-f", "-"], **stdin,
                              capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise NftError(f"the nft command ({binary}) is not installed; install the nftables package") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft did not answer within {timeout:.0f}s", timed_out=True) from None
    if proc.returncode != 0:
        msg = " ".join(line.replace("internal:0:0-0: ", "") for line in
                       proc.stderr.decode(errors="replace").splitlines() if line.strip())
        raise NftError(msg or f"nft exited with status {proc.returncode}")
    out = proc.stdout.strip()
    return json.loads(out) if out else {}


run_nft_cli.takes_file = True  # type: ignore[attr-defined]


def scratch_file() -> BinaryIO:
    """An unnamed in-memory file (memfd) for one transaction's text, nft's stdin; a temporary
    file where the kernel has no memfd. Either way the text is not in the agent's heap."""
    try:
        fd = os.memfd_create("ipvsproxy-nft", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()
    return open(fd, "w+b")


def _pending_of(dels: list[tuple[str, Collection[Elem]]],
                adds: list[tuple[str, Collection[Elem]]]) -> dict[str, dict[Elem, bool | None]]:
    """What a failed whole-table transaction leaves pending: each element with what the
    kernel held (True: there, to delete; False: missing, to add)."""
    pending: dict[str, dict[Elem, bool | None]] = {}
    for name, gone in dels:
        pending.setdefault(name, {}).update(dict.fromkeys(gone, True))
    for name, new in adds:
        pending.setdefault(name, {}).update(dict.fromkeys(new, False))
    return {name: elems for name, elems in pending.items() if elems}


@dataclass(frozen=True, slots=True)
class _Elements:
    """One add/delete of a set's elements, encoded when sent (as a dict, or straight to text)."""

    verb: str
    name: str  # a count set's name: "hairpin4/6" is set hairpin4's TCP elements, kept as Reals
    elems: Collection[Elem]

    def _head(self) -> dict[str, Any]:
        return {"family": FAMILY, "table": TABLE, "name": kernel_set(self.name)[0]}

    def _sorted(self) -> Iterator[Elem]:
        """The elements in order, as the kernel's set spells them (one at a time)."""
        try:  # one set's elements share a shape: tuples compare without a repr string each
            ordered = sorted(self.elems)
        except TypeError:
            ordered = sorted(self.elems, key=repr)
        return self._kernel(ordered)

    def _kernel(self, elems: Iterable[Elem]) -> Iterator[KernelElem]:
        """Counted elements as the kernel's set spells them (one at a time)."""
        proto = kernel_set(self.name)[1]
        return (_kernel_elem(e) for e in elems) if proto is None else (_hairpin_elem(proto, r) for r in elems)

    def json(self) -> dict[str, Any]:
        return {self.verb: {"element": {**self._head(), "elem": [_to_json(e) for e in self._sorted()]}}}

    def change(self) -> ElementChange:
        """The command for nft_wire.write_elements (elements in no particular order)."""
        base = kernel_set(self.name)[0]
        return self.verb == "add", base, _SPECS[base].type, self._kernel(self.elems)

    def write(self, out: TextIO) -> None:
        """The same command as json(), written as JSON text one element at a time."""
        out.write(json.dumps({self.verb: {"element": self._head()}})[:-3])  # without the closing '}}}'
        out.write(', "elem": [')
        dumps, write = json.dumps, out.write
        for i, e in enumerate(self._sorted()):
            if i:
                write(", ")
            write(dumps(_to_json(e)))
        out.write("]}}}")


# ---- the rule set ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetSpec:
    name: str
    type: tuple[str, ...]
    interval: bool = False
    comment: str = ""
    cidr: int | None = None  # which field holds a CIDR (interval sets)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": self.name,
                               "type": self.type[0] if len(self.type) == 1 else list(self.type)}
        if self.interval:
            out["flags"] = ["interval"]
        return out

    def matches(self, listed: dict[str, Any]) -> bool:
        typ = listed.get("type")
        typ = tuple(typ) if isinstance(typ, list) else (typ,)
        flags = listed.get("flags", [])
        flags = {flags} if isinstance(flags, str) else set(flags)
        return typ == self.type and ("interval" in flags) == self.interval


@dataclass(frozen=True, slots=True)
class ChainSpec:
    name: str
    type: str
    hook: str
    prio: int

    def json(self) -> dict[str, Any]:
        return {"family": FAMILY, "table": TABLE, "name": self.name, "type": self.type,
                "hook": self.hook, "prio": self.prio, "policy": "accept"}

    def matches(self, listed: dict[str, Any]) -> bool:
        return (listed.get("type"), listed.get("hook"), listed.get("prio"), listed.get("policy", "accept")) == (
            self.type, self.hook, self.prio, "accept")


@dataclass(frozen=True, slots=True)
class RuleSpec:
    chain: str
    name: str
    expr: tuple[dict[str, Any], ...]

    @property
    def comment(self) -> str:
        """Names the rule and fingerprints its expression: a restart compares
        comments to know whether the kernel's rules are this version's."""
        digest = hashlib.sha256(json.dumps(self.expr, sort_keys=True).encode()).hexdigest()[:10]
        return f"{RULE_TAG}{self.name}:{digest}"

    def json(self) -> dict[str, Any]:
        return {"family": FAMILY, "table": TABLE, "chain": self.chain, "comment": self.comment,
                "expr": list(self.expr)}


def _ip(v: int) -> str:
    return "ip" if v == 4 else "ip6"


def _payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _dst_key(v: int) -> dict[str, Any]:
    """daddr . l4proto . dport: the key of a virtual server."""
    return {"concat": [_payload(_ip(v), "daddr"), _meta("l4proto"), _payload("th", "dport")]}


_CT_NEW = _match({"ct": {"key": "state"}}, "new", "in")
_SET_MARK = {"mangle": {"key": _meta("mark"), "value": {"|": [_meta("mark"), MASQ_MARK]}}}


def _set_specs() -> list[SetSpec]:
    out = []
    for v in (4, 6):
        addr = "ipv4_addr" if v == 4 else "ipv6_addr"
        key = (addr, "inet_proto", "inet_service")
        out += [
            SetSpec(f"vips{v}", (addr,), comment="addresses on the dummy interface"),
            SetSpec(f"services{v}", key, comment="every virtual server: allowed ports"),
            SetSpec(f"masq{v}", key, comment="masquerade when the source is outside the cluster CIDRs"),
            SetSpec(f"masq_any{v}", key, comment="masquerade from any source"),
            SetSpec(f"cluster{v}", (addr,), interval=True, comment="--cluster-cidr", cidr=0),
            SetSpec(f"hairpin{v}", (addr, "inet_proto", "inet_service", addr),
                    comment="endpoint . proto . port . endpoint"),
            SetSpec(f"fw{v}", key, comment="LoadBalancer addresses with source ranges"),
            SetSpec(f"fw_allow{v}", (*key, addr), interval=True, comment="allowed LB sources", cidr=3),
            SetSpec(f"nolocal{v}", key, comment="externalTrafficPolicy Local, no local endpoint"),
        ]
    return out


CHAINS = (
    ChainSpec("prerouting", "filter", "prerouting", -150),  # mangle: mark before IPVS
    ChainSpec("output", "filter", "output", -150),  # before IPVS's LOCAL_OUT hook (-99)
    ChainSpec("input", "filter", "input", 0),  # before IPVS's LOCAL_IN hook (98)
    ChainSpec("postrouting", "nat", "postrouting", 100),  # srcnat
)


def _rule_specs() -> list[RuleSpec]:
    rules: list[RuleSpec] = []
    for v in (4, 6):
        ip, icmp = _ip(v), (_ICMP if v == 4 else _ICMPV6)
        rules += [
            RuleSpec("prerouting", f"masq-any-v{v}", (_CT_NEW, _match(_dst_key(v), f"@masq_any{v}"), _SET_MARK)),
            RuleSpec("prerouting", f"masq-outside-v{v}", (
                _CT_NEW, _match(_dst_key(v), f"@masq{v}"),
                _match(_payload(ip, "saddr"), f"@cluster{v}", "!="), _SET_MARK)),
            # The node's own connections to Services: never a pod's address.
            RuleSpec("output", f"masq-node-v{v}", (_CT_NEW, _match(_dst_key(v), f"@services{v}"), _SET_MARK)),
            RuleSpec("input", f"source-ranges-v{v}", (
                _match(_dst_key(v), f"@fw{v}"),
                _match({"concat": [*_dst_key(v)["concat"], _payload(ip, "saddr")]}, f"@fw_allow{v}", "!="),
                {"drop": None})),
            # Local policy without a local endpoint: only this node's own traffic
            # (pods: the cluster CIDRs; the host: a local source address).
            RuleSpec("input", f"no-local-endpoint-v{v}", (
                _CT_NEW, _match(_dst_key(v), f"@nolocal{v}"),
                _match(_payload(ip, "saddr"), f"@cluster{v}", "!="),
                _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local", "!="),
                {"drop": None})),
            RuleSpec("input", f"vip-tcp-v{v}", (
                _CT_NEW, _match(_payload(ip, "daddr"), f"@vips{v}"), _match(_meta("l4proto"), _TCP),
                _match(_dst_key(v), f"@services{v}", "!="), {"reject": {"type": "tcp reset"}})),
            RuleSpec("input", f"vip-other-v{v}", (
                _CT_NEW, _match(_payload(ip, "daddr"), f"@vips{v}"), _match(_meta("l4proto"), icmp, "!="),
                _match(_dst_key(v), f"@services{v}", "!="),
                {"reject": {"type": "icmpx", "expr": "port-unreachable"}})),
        ]
    rules.append(RuleSpec("postrouting", "masq-marked", (
        _match({"&": [_meta("mark"), MASQ_MARK]}, MASQ_MARK),
        {"mangle": {"key": _meta("mark"), "value": {"&": [_meta("mark"), 0xFFFFFFFF ^ MASQ_MARK]}}},
        {"masquerade": None})))
    for v in (4, 6):
        ip = _ip(v)
        rules.append(RuleSpec("postrouting", f"hairpin-v{v}", (
            _match({"concat": [_payload(ip, "saddr"), _meta("l4proto"), _payload("th", "dport"),
                               _payload(ip, "daddr")]}, f"@hairpin{v}"),
            {"masquerade": None})))
    return rules


SETS = tuple(_set_specs())
RULES = tuple(_rule_specs())
SET_NAMES = tuple(s.name for s in SETS)
_SPECS = {s.name: s for s in SETS}

# ---- hairpin elements, counted by real server ----------------------------------
# Set hairpin4/6 holds one element (endpoint . proto . port . endpoint) per real server and
# protocol: ~240,000 at 20,000 Services x 10, and as 4-tuples ~17 MiB of the agent's memory.
# The counts keep them as the desired state's own `Real` objects instead, in one count set per
# family and protocol ("hairpin4/6": hairpin4's TCP elements), and spell them as the kernel's
# elements only while a transaction is written or a read is compared.
HAIRPIN_COUNTS = {f"hairpin{v}": tuple(f"hairpin{v}/{int(p)}" for p in Protocol) for v in (4, 6)}
# The kernel's hairpin sets stay count sets too, always empty: a stray element lands there.
COUNT_NAMES = SET_NAMES + tuple(n for names in HAIRPIN_COUNTS.values() for n in names)


def kernel_set(name: str) -> tuple[str, int | None]:
    """A count set's name -> (the kernel's set, the protocol of a hairpin count set)."""
    base, _, proto = name.partition("/")
    return base, int(proto) if proto else None


# The sets keyed by virtual server (address . proto . port) count the desired state's own VSKey
# objects, not a 3-tuple of their own per virtual server (2 MiB at 20,000 Services), and spell
# them as the kernel's elements only while a transaction is written or a read is compared.
KEYED_SETS = frozenset(s.name for s in SETS if len(s.type) == 3)
# vips4/6 count the addresses themselves (the desired state's strings), not a 1-tuple of each.
VIP_SETS = frozenset(("vips4", "vips6"))


def _kernel_elem(elem: Elem) -> KernelElem:
    """A counted element -> the kernel's: a VSKey as (address, proto, port), a VIP's address as
    (address,); others as they are."""
    if type(elem) is VSKey:
        return (elem.address, elem.protocol, elem.port)
    return (elem,) if isinstance(elem, str) else elem


def _hairpin_elem(proto: int, real: Elem) -> KernelElem:
    """A Real (address, port, weight) counted in a hairpin count set -> the kernel's element."""
    return (real[0], proto, real[1], real[0])


def _by_count_set(kernel: dict[str, set[KernelElem]]) -> dict[str, set[Elem]]:
    """Sets as the kernel spells them -> as the counts do. A hairpin element whose two
    addresses differ, or with a protocol no Service uses, stays under the kernel's set
    name, which counts nothing: a full sync deletes it."""
    out: dict[str, set[Elem]] = {name: kernel.get(name, set()) for name in COUNT_NAMES}  # type: ignore[misc]
    for name in KEYED_SETS & kernel.keys():
        out[name] = {VSKey(family_of(e[0]), e[1], e[0], e[2]) if len(e) == 3 else e for e in kernel[name]}
    for name in VIP_SETS & kernel.keys():
        out[name] = {e[0] if len(e) == 1 else e for e in kernel[name]}
    for base, names in HAIRPIN_COUNTS.items():
        stray: set[Elem] = set()
        by_proto = {kernel_set(name)[1]: out[name] for name in names}  # a hairpin count set per protocol
        for elem in kernel.get(base, set()):
            counted = by_proto.get(elem[1]) if len(elem) == 4 and elem[0] == elem[3] else None
            if counted is not None:  # as the Real counted (address, port, weight 1): a tuple equal to it
                counted.add((elem[0], elem[2], 1))
            else:
                stray.add(elem)
        out[base] = stray
    return out


def _by_kernel_set(counted: dict[str, set[Elem]]) -> dict[str, set[Elem]]:
    """The inverse: each set's elements as the kernel spells them."""
    out: dict[str, set[Elem]] = {}
    for name, elems in counted.items():
        base, proto = kernel_set(name)
        out.setdefault(base, set()).update(
            (_kernel_elem(e) for e in elems) if proto is None else (_hairpin_elem(proto, r) for r in elems))
    return out


# ---- elements: desired and listed ----------------------------------------------


def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text.strip(), strict=False)


def _collapse(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> list[str]:
    """Non-overlapping networks (an interval set refuses overlapping elements)."""
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return [str(n) for n in [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]]


def _empty(names: tuple[str, ...] = COUNT_NAMES) -> dict[str, set[Elem]]:
    return {name: set() for name in names}


def _elem_json(value: Any) -> Any:
    """One tuple element -> JSON: CIDRs as prefixes (protocols stay numbers)."""
    if isinstance(value, str) and "/" in value:
        net = _net(value)
        return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    return value


def _to_json(elem: Elem) -> Any:
    parts = list(elem)
    if len(parts) == 1:
        return _elem_json(parts[0])
    return {"concat": [_elem_json(p) for p in parts]}


def _value_from_json(value: Any, cidr: bool) -> Any:
    """A listed value -> our tuple form: canonical address, CIDR ("a/n") where
    the field is a CIDR, protocol and port as numbers."""
    if isinstance(value, dict) and "prefix" in value:
        p = value["prefix"]
        net = _net(f"{p['addr']}/{p['len']}")
        return str(net) if cidr or net.num_addresses != 1 else str(net.network_address)
    if isinstance(value, dict) and "range" in value:
        lo, hi = (ipaddress.ip_address(x) for x in value["range"])
        nets = list(ipaddress.summarize_address_range(lo, hi))
        return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"
    if isinstance(value, str):
        if value in ("tcp", "udp", "sctp"):  # nft spells protocols in lower case
            return int(Protocol.parse(value))
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return value
        return str(ipaddress.ip_network(ip)) if cidr else canonical_ip(value)  # spelled as desired state is
    return value


def _elem_from_json(value: Any, spec: SetSpec) -> KernelElem:
    if isinstance(value, dict) and "elem" in value:  # {"elem": {"val": ..., "comment": ...}}
        value = value["elem"].get("val")
    parts = value["concat"] if isinstance(value, dict) and "concat" in value else [value]
    return tuple(_value_from_json(part, i == spec.cidr) for i, part in enumerate(parts))


@dataclass(slots=True)
class Listing:
    """Our table as `nft -j list table inet ipvsproxy` shows it."""

    sets: dict[str, dict[str, Any]]
    chains: dict[str, dict[str, Any]]
    rules: dict[str, list[str]]  # chain -> rule comments in order


def parse_listing(doc: dict[str, Any]) -> Listing:
    listing = Listing({}, {}, {})
    for item in doc.get("nftables", []):
        if "set" in item and item["set"].get("table") == TABLE:
            listing.sets[item["set"]["name"]] = item["set"]
        elif "chain" in item and item["chain"].get("table") == TABLE:
            listing.chains[item["chain"]["name"]] = item["chain"]
        elif "rule" in item and item["rule"].get("table") == TABLE:
            r = item["rule"]
            listing.rules.setdefault(r["chain"], []).append(r.get("comment", ""))
    return listing


# ---- the firewall ----------------------------------------------------------------


# The rolling check's cost of comparing: looking a counted element up among those read costs
# about an eighth of reading one, so a step compares this many per element of its budget.
COMPARED_PER_READ = 8
COMPARE_CHUNK = 2048  # counted elements looked up per piece of the comparison (a step's at the least)


@dataclass(slots=True)
class _Check:
    """The rolling drift check under way (`NftFirewall.check_step`): one set at a time, read a
    few pages per step, then its counts looked up among what was read a piece per step
    (`NftFirewall._check_set`); no step walks a whole set."""

    left: list[SetSpec]  # the sets still to check, taken from the end
    name: str = ""  # the kernel's set under check
    names: frozenset[str] = frozenset()  # its count sets (hairpin4: one per protocol)
    steps: Generator[int, None, _Drift] | None = None  # its check: yields the cost of each piece
    # Elements of the set under check that this companion added or deleted since its read
    # began: the read may have seen them before or after; the counts know them anyway.
    touched: set[tuple[str, Elem]] = field(default_factory=set)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()
        self.steps = None


_Drift = tuple[list[tuple[str, Collection[Elem]]], list[tuple[str, Collection[Elem]]]]  # (deletes, adds)


class NftFirewall:
    """Keeps table ``inet ipvsproxy`` in step with the desired state.

    ``nft`` runs one JSON command document and returns the parsed output; the
    default pipes it to ``nft -j -f -``. The firewall is driven by the
    reconciler's change delta ((old, new) virtual server per changed key, the
    same delta the planner gets): each virtual server's elements are
    reference-counted from it, so a sync costs the change, not the cluster.

    An incremental sync sends exactly the element adds and deletes of the
    changed elements, in one transaction, and reads nothing: a delete goes as
    "add, then delete" in that transaction, which nft accepts whether or not
    the element is there (a plain delete of a missing element is refused), so
    drift cannot block a change. The kernel's table is read (structure
    tersely, elements over netlink) and diffed whole only at start-up, by a
    full sync (the agent's --sync-period) and once after a transaction nft
    refused. After a failure the elements of that transaction stay pending
    and go with the next sync; a read that fails (or times out) on a table
    this process already keeps is not retried on the change path: the pending
    changes are sent without it, and the next full sync checks again.
    """

    def __init__(self, cfg: AgentConfig, *, nft: NftRunner | None = None,
                 elements: ElementReader | None = None) -> None:
        self.cfg = cfg
        self.nft: NftRunner = nft or run_nft_cli
        # How set contents are read back: straight from the kernel over netlink (nft_wire) by
        # default; with a custom `nft` and no reader, from that runner's listing.
        self._reader = elements
        self._wire: NftWire | None = None
        self._use_wire = nft is None and elements is None
        self.transactions = 0
        self.netlink_transactions = 0  # of them, sent over netlink without nft (element changes alone)
        self.reads = 0  # whole-table reads (start-up, full syncs, one after a refusal)
        self.listings = 0  # `nft list` documents sent (reads, cleanup): none on the change path
        self._warned: set[str] = set()
        self._has_cluster = {4: False, 6: False}
        self._static: list[tuple[str, Elem]] = []
        # The cluster CIDRs are filled with --masquerade-all too: the masq sets
        # stay empty then, and no-local-endpoint needs to know the pods.
        for net in _collapse(cfg.cluster_cidrs):
            v = ip_version(net)
            self._static.append((f"cluster{v}", (net,)))
            self._has_cluster[v] = True
        # What the desired state asks for: element -> how many contributions.
        self._counts: dict[str, dict[Elem, int]] = {name: {} for name in COUNT_NAMES}
        for name, elem in self._static:
            self._counts[name][elem] = 1
        # Elements whose kernel state may differ from the counts, with what the kernel
        # holds as far as we know (True/False; None: unknown, after a timeout).
        self._pending: dict[str, dict[Elem, bool | None]] = {}
        self._verified = False  # the table's structure is ours and its elements are counts + pending
        self._repair = False  # nft refused a transaction: read the table at the next sync
        self._check: _Check | None = None  # the rolling drift check under way (check_step)
        self.checks = 0  # rolling drift checks completed

    @property
    def behind(self) -> bool:
        """Changes of a failed sync are still to be sent (or the table to be checked)."""
        return bool(self._pending) or self._repair or not self._verified

    # ---- desired ------------------------------------------------------------
    def desired_elements(self, desired: DesiredState) -> dict[str, set[Elem]]:
        """Every set's elements for a desired state, computed from scratch (for
        checks and tests; the sync path counts deltas)."""
        return self.desired_elements_of(desired.services.values())

    def desired_elements_of(self, servers: Iterable[VirtualServer]) -> dict[str, set[Elem]]:
        """Every set's elements for these virtual servers, computed from scratch."""
        want = _empty()
        for name, elem in self._static:
            want[name].add(elem)
        for vs in servers:
            for name, elem in self._contribution(vs):
                want[name].add(elem)
        return _by_kernel_set(want)

    def _contribution(self, vs: VirtualServer | None) -> list[tuple[str, Elem]]:
        """The (set, element) pairs one virtual server needs (its address in
        vips4/6 when it is bound: a VIP comes and goes with its virtual servers)."""
        if vs is None:
            return []
        addr, proto, port = vs.key.address, vs.key.protocol, vs.key.port
        if Protocol.name_of(proto) is None or self.cfg.excluded(addr):
            return []
        v = ip_version(addr)
        key = vs.key  # counted as itself (KEYED_SETS)
        kind = vs.service.kind if vs.service is not None else ServiceKind.CLUSTER_IP
        out: list[tuple[str, Elem]] = [(f"services{v}", key)]
        if kind != ServiceKind.NODE_PORT and vs.bind:  # a node's own address is no VIP: its other ports stay open
            out.append((f"vips{v}", addr))  # counted as itself (VIP_SETS)
        if vs.local_origin_only:
            out.append((f"nolocal{v}", key))
        if not vs.local:
            if self.cfg.masquerade_all:
                out.append((f"masq_any{v}", key))
            elif self._has_cluster[v]:
                out.append((f"masq{v}", key))
            elif kind != ServiceKind.CLUSTER_IP:
                # No cluster CIDR known for this family: as kube-proxy does,
                # external kinds are masqueraded from anywhere, ClusterIPs not.
                out.append((f"masq_any{v}", key))
        hairpin = f"hairpin{v}/{proto}"  # the Real itself is the count (HAIRPIN_COUNTS)
        out += [(hairpin, r if r.weight == 1 else Real(r.address, r.port))
                for r in vs.reals if ip_version(r.address) == v]
        if kind == ServiceKind.LOAD_BALANCER and vs.source_ranges:
            nets = []
            for text in vs.source_ranges:
                try:
                    net = _net(text)
                except ValueError:
                    if text not in self._warned:
                        self._warned.add(text)
                        svc = f"Service {vs.service.service_id}: " if vs.service else ""
                        log.warning("%sinvalid loadBalancerSourceRanges entry %r skipped", svc, text)
                    continue
                if net.version == v:
                    nets.append(net)
            if nets:  # none of this family left: the address is not restricted (as kube-proxy)
                out.append((f"fw{v}", key))
                out += [(f"fw_allow{v}", (addr, proto, port, n)) for n in _collapse(nets)]
        return out

    def _count(self, delta: Delta, track: bool = True) -> None:
        """Bring the counts in step with a change delta; with `track`, every element
        whose presence changes joins the pending ones (with what the kernel held)."""
        pending = self._pending
        chk = self._check
        reading = chk.names if chk is not None and chk.steps is not None else frozenset()

        def bump(pairs: Iterable[tuple[str, Elem]], step: int) -> None:
            for name, elem in pairs:
                counts = self._counts[name]
                n = counts.get(elem, 0)
                if n + step > 0:
                    counts[elem] = n + step
                else:
                    counts.pop(elem, None)
                if (n > 0) != (n + step > 0):
                    if track:
                        pending.setdefault(name, {}).setdefault(elem, n > 0)
                    if name in reading:
                        chk.touched.add((name, elem))  # type: ignore[union-attr]

        for change in delta.values():
            if change.old is change.new:
                continue
            old, new = self._contribution(change.old), self._contribution(change.new)
            if old and new:  # one endpoint more or less: count only the pairs that differ
                o, n = set(old), set(new)
                if len(o) == len(old) and len(n) == len(new):
                    old, new = [p for p in old if p not in n], [p for p in new if p not in o]
            bump(old, -1)
            bump(new, +1)

    # ---- kernel ---------------------------------------------------------------
    def _run_terse(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A listing without set elements (`nft -t`) where the runner is the real nft."""
        self.listings += 1
        return run_nft_cli(doc, terse=True) if self.nft is run_nft_cli else self.nft(doc)

    def _structure_listing(self) -> Listing | None:
        """Our table's sets, chains and rules (None: no table). `list ruleset -t`
        is the one listing nft 1.0.6 makes without fetching every element:
        `list tables` and `list table -t` fetch them all (0.4 s at 50,000 on the host)."""
        doc = self._run_terse({"nftables": [{"list": {"ruleset": None}}]})
        if not any(item.get("table", {}).get("family") == FAMILY and item["table"].get("name") == TABLE
                   for item in doc.get("nftables", [])):
            return None
        return parse_listing(doc)

    def _list(self) -> dict[str, Any] | None:
        """`nft -j list table inet ipvsproxy`, elements included (None: no table)."""
        if self._structure_listing() is None:
            return None
        self.listings += 1
        return self.nft({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})

    def elements(self) -> dict[str, set[tuple[Any, ...]]]:
        """Current set contents as read from the kernel ({} without the table)."""
        doc = self._list()
        if doc is None:
            return {}
        listing = parse_listing(doc)
        specs = {s.name: s for s in SETS}
        return {name: {_elem_from_json(e, specs.get(name) or SetSpec(name, ())) for e in s.get("elem", [])}
                for name, s in listing.sets.items()}

    def _structure(self, listing: Listing | None) -> tuple[list[dict[str, Any]], int, set[str]]:
        """Commands that make the table, sets, chains and rules what this
        version wants; the number of rules added; the sets (re)created empty."""
        tbl = {"family": FAMILY, "name": TABLE}
        cmds: list[dict[str, Any]] = [{"add": {"table": tbl}}]
        if listing is None:
            cmds += [{"add": {"set": s.json()}} for s in SETS]
            cmds += [{"add": {"chain": c.json()}} for c in CHAINS]
            cmds += [{"add": {"rule": r.json()}} for r in RULES]
            return cmds, len(RULES), set(SET_NAMES)
        bad_sets = {s.name for s in SETS if s.name in listing.sets and not s.matches(listing.sets[s.name])}
        extra_sets = set(listing.sets) - set(SET_NAMES)
        chain_names = {c.name for c in CHAINS}
        bad_chains = {c.name for c in CHAINS if c.name in listing.chains and not c.matches(listing.chains[c.name])}
        extra_chains = set(listing.chains) - chain_names
        want_rules = {c.name: [r.comment for r in RULES if r.chain == c.name] for c in CHAINS}
        redo = {c for c in chain_names if listing.rules.get(c, []) != want_rules[c]} | bad_chains
        if bad_sets or extra_sets:
            redo = set(chain_names)  # rules reference the sets: take them all out first
        for name in sorted((redo | extra_chains) & set(listing.chains)):
            cmds.append({"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}})
        for name in sorted(bad_chains | extra_chains):
            cmds.append({"delete": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}})
        for name in sorted(bad_sets | extra_sets):
            cmds.append({"delete": {"set": {"family": FAMILY, "table": TABLE, "name": name}}})
        fresh = {s.name for s in SETS if s.name not in listing.sets} | bad_sets
        cmds += [{"add": {"set": s.json()}} for s in SETS if s.name in fresh]
        cmds += [{"add": {"chain": c.json()}} for c in CHAINS if c.name not in listing.chains or c.name in bad_chains]
        rules = [r for r in RULES if r.chain in redo or r.chain not in listing.chains]
        cmds += [{"add": {"rule": r.json()}} for r in rules]
        if len(cmds) > 1:
            log.info("nftables: adopting table %s %s: repairing %d chain(s) and %d set(s)", FAMILY, TABLE,
                     len(redo | bad_chains | extra_chains), len(bad_sets | extra_sets | fresh))
        return cmds, len(rules), fresh

    def _netlink(self) -> NftWire | None:
        """The netfilter netlink socket (opened on first use); None: this companion goes
        through its `nft` runner for everything (a custom runner, or no netlink)."""
        if self._wire is None and self._use_wire:
            from .nft_wire import NftWire

            try:
                self._wire = NftWire()
            except OSError as exc:
                log.warning("nftables: cannot use netlink (%s); reading and writing through nft", exc)
                self._use_wire = False
        return self._wire

    def _element_reader(self) -> ElementReader | None:
        """The netlink reader (opened on first use); None: read elements from nft's listing."""
        if self._reader is None:
            wire = self._netlink()
            if wire is None:
                return None

            def read(spec: SetSpec) -> set[KernelElem]:
                try:
                    return wire.elements(FAMILY, TABLE, spec.name, spec.type, interval=spec.interval,
                                         cidr=spec.cidr)
                except OSError as exc:
                    raise NftError(str(exc)) from None

            self._reader = read
        return self._reader

    def _read(self) -> tuple[list[dict[str, Any]], int, dict[str, set[Elem]]]:
        """Read the kernel's table: the structure commands still needed (none
        when it is this version's), how many rules they add, and every set's
        elements as the kernel holds them, spelled as the counts are (hairpin by Real)."""
        reader = self._element_reader()
        listing = self._structure_listing()
        cmds, nrules, fresh = self._structure(listing)
        if len(cmds) == 1:  # just the harmless "add table": the structure is ours already
            cmds, nrules = [], 0
        known: dict[str, set[KernelElem]] = {name: set() for name in SET_NAMES}
        if listing is not None:
            full: Listing | None = None
            if reader is None:  # elements from nft's own listing (a custom runner, or no netlink)
                self.listings += 1
                doc = self.nft({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})
                full = parse_listing(doc)
            for spec in SETS:
                if spec.name in fresh:
                    continue
                if reader is not None:
                    known[spec.name] = reader(spec)
                elif full is not None and spec.name in full.sets:
                    known[spec.name] = {_elem_from_json(e, spec) for e in full.sets[spec.name].get("elem", [])}
        self.reads += 1
        return cmds, nrules, _by_count_set(known)

    def check_step(self, budget: int) -> int:
        """One step of the rolling drift check (`--resync rolling`): about `budget` elements'
        worth of it, one set at a time (the structure first, tersely): a set's elements read a
        page at a time, then its counts looked up among them a piece at a time, then what
        differs repaired in one transaction. Elements this companion added or deleted while
        their set was under check are left out (the read may have seen them either way; the
        counts know them), as are those still pending. Returns the number of elements
        repaired. A full sync (`sync(full=True)`) reads everything at once and ends a check
        under way; a set that cannot be read, or a structure that is not ours, makes the next
        sync a full read."""
        if not self._verified or self._repair:
            return 0  # the next sync reads the whole table anyway
        chk = self._check
        dels: list[tuple[str, Collection[Elem]]] = []
        adds: list[tuple[str, Collection[Elem]]] = []
        try:
            if chk is None:
                cmds, _, _ = self._structure(self._structure_listing())
                if len(cmds) > 1:
                    log.warning("nftables: table %s %s is not as this version makes it; the next sync "
                                "reads and repairs it whole", FAMILY, TABLE)
                    self._repair = True
                    return 0
                chk = self._check = _Check(list(reversed(SETS)))
            while budget > 0:
                if chk.steps is None:
                    if not chk.left:
                        self._check = None
                        self.checks += 1
                        break
                    spec = chk.left.pop()
                    chk.name = spec.name
                    chk.names = frozenset(n for n in COUNT_NAMES if kernel_set(n)[0] == spec.name)
                    chk.steps = self._check_set(spec, chk)
                try:
                    budget -= next(chk.steps)
                except StopIteration as done:
                    chk.steps, chk.touched = None, set()
                    dels += done.value[0]
                    adds += done.value[1]
        except NftError as exc:
            self._end_check()
            self._repair = True
            log.warning("nftables: drift check: %s; the next sync reads the table whole", exc)
            return 0
        changes = sum(len(e) for _, e in dels) + sum(len(e) for _, e in adds)
        if changes:
            log.info("nftables: drift check: repairing %d elements changed behind the agent's back", changes)
            try:  # a delete goes as add + delete: it stays harmless if the element went meanwhile
                self._send([*(self._elements_cmd("add", n, e) for n, e in dels),
                            *(self._elements_cmd("delete", n, e) for n, e in dels),
                            *(self._elements_cmd("add", n, e) for n, e in adds)])
            except Exception:
                self._repair = True
                raise
            self.transactions += 1
        return changes

    @property
    def checking(self) -> str | None:
        """The set the rolling drift check is reading or comparing (None: none under way)."""
        chk = self._check
        return chk.name if chk is not None and chk.steps is not None else None

    def _check_set(self, spec: SetSpec, chk: _Check) -> Generator[int, None, _Drift]:
        """One set's drift check, a piece per `next` (each yields its cost in elements read):
        its elements read a page at a time, each page spelled as the counts are and what it
        holds that is not counted kept aside; then the counts, as they stand when the read
        ends, looked up among what was read, COMPARE_CHUNK at a time. Returns what to delete
        and add, left out what changed meanwhile (`chk.touched`) or is pending."""
        have: dict[str, set[Elem]] = {name: set() for name in chk.names}
        extra: dict[str, set[Elem]] = {name: set() for name in chk.names}  # read, and not counted then
        pages = self._set_pages(spec)
        try:
            for page in pages:
                if page is None:  # the dump restarted
                    for name in chk.names:
                        have[name].clear()
                        extra[name].clear()
                    continue
                counted = _by_count_set({spec.name: page})  # type: ignore[dict-item]
                for name in chk.names:
                    got, want = counted[name], self._counts[name]
                    have[name].update(got)
                    extra[name].update(e for e in got if e not in want)
                yield max(1, len(page))
        finally:
            pages.close()  # its socket, when the check ends early
        missing: dict[str, set[Elem]] = {name: set() for name in chk.names}  # counted, and not read
        for name in chk.names:
            seen, counted_now = have[name], list(self._counts[name])  # what changes later is touched
            for i in range(0, len(counted_now), COMPARE_CHUNK):
                part = counted_now[i:i + COMPARE_CHUNK]
                missing[name].update(e for e in part if e not in seen)
                yield max(1, len(part) // COMPARED_PER_READ)
        dels: list[tuple[str, Collection[Elem]]] = []
        adds: list[tuple[str, Collection[Elem]]] = []
        touched = chk.touched
        for name in chk.names:
            want, pending = self._counts[name], self._pending.get(name, {})
            gone = {e for e in extra[name] if e not in want and e not in pending and (name, e) not in touched}
            new = {e for e in missing[name] if e in want and e not in pending and (name, e) not in touched}
            if new and touched and (wire := self._netlink()) is not None and not spec.interval:
                # The set changed while it was read, and the kernel resumes a dump by count: an
                # element may have been passed over. Ask for the ones that seem missing.
                ordered = list(new)
                try:
                    there = wire.present(FAMILY, TABLE, spec.name, spec.type,
                                         list(_Elements("add", name, ordered)._kernel(ordered)))
                except OSError as exc:
                    raise NftError(str(exc)) from None
                new = {e for e, found in zip(ordered, there, strict=True) if not found}
            if gone:
                dels.append((name, gone))
            if new:
                adds.append((name, new))
        return dels, adds

    def _set_pages(self, spec: SetSpec) -> Generator[list[KernelElem] | None, None, None]:
        """One set's elements for the drift check: a page per receive over a netlink socket of
        its own (this one sends transactions between the pages), or, for an interval set (its
        start and end elements pair up across the dump) and without netlink, whole."""
        if not spec.interval and self._use_wire and self._netlink() is not None:
            from .nft_wire import NftWire

            try:
                with NftWire() as wire:
                    yield from wire.element_pages(FAMILY, TABLE, spec.name, spec.type, cidr=spec.cidr)
            except OSError as exc:
                raise NftError(str(exc)) from None
            return
        reader = self._element_reader()
        if reader is not None:
            yield list(reader(spec))
            return
        self.listings += 1
        listed = parse_listing(self.nft({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]}))
        if spec.name not in listed.sets:
            raise NftError(f"set {spec.name} is missing")
        yield [_elem_from_json(e, spec) for e in listed.sets[spec.name].get("elem", [])]

    def _end_check(self) -> None:
        if self._check is not None:
            self._check.close()
            self._check = None

    def sync(self, delta: Delta, full: bool = False) -> int:
        """Apply a change delta to the table in one transaction; with `full`
        (or at start-up, or after a refusal) read the table and repair drift
        too. Returns the number of element and rule changes (0: nothing sent).
        A failed transaction raises; its changes stay pending (see the class)."""
        # Until the table has been read once, nothing is pending: that read diffs the whole table
        # against the counts (and a failed one raises). At a cold start the pending elements would
        # be every element, the companion's share of the agent's memory peak.
        self._count(delta, track=self._verified)
        cmds: list[dict[str, Any] | _Elements] = []
        changes = 0
        dels: list[tuple[str, Collection[Elem]]] = []
        adds: list[tuple[str, Collection[Elem]]] = []
        read = full or not self._verified or self._repair
        if read:
            self._end_check()  # the whole table is read now: a rolling check under way has nothing left
            self._repair = False  # one attempt: a read that fails is not retried on the change path
            try:
                structure, changes, known = self._read()
                cmds = [*structure]
            except NftError as exc:
                if not self._verified:
                    raise
                log.warning("nftables: cannot read table %s %s (%s); sending the changes without a drift "
                            "check (the next full sync checks again)", FAMILY, TABLE, exc)
                read = False
        if read:  # the whole table against the counts; nothing stays pending
            for name in COUNT_NAMES:
                want, have = self._counts[name].keys(), known[name]
                dels.append((name, have - want))
                adds.append((name, want - have if have else want))  # a fresh set: no copy of them all
            # What stays pending is built only if the transaction fails (below): at a cold start
            # these would be every element again, a fifth of the first sync's memory peak.
            self._pending = {}
            safe_deletes = False  # just read: every delete names an element that is there
        else:  # only the pending elements can differ from the counts
            for name, elems in self._pending.items():
                counts = self._counts[name]
                dels.append((name, {e for e, had in elems.items() if had is not False and e not in counts}))
                adds.append((name, {e for e, had in elems.items() if had is not True and e in counts}))
            safe_deletes = True
        changes += sum(len(e) for _, e in dels) + sum(len(e) for _, e in adds)
        # Deletions first: an interval set refuses overlapping elements. A delete we cannot be
        # sure of goes as add + delete, which nft accepts whether or not the element is there.
        if safe_deletes:
            cmds += [self._elements_cmd("add", name, gone) for name, gone in dels if gone]
        cmds += [self._elements_cmd("delete", name, gone) for name, gone in dels if gone]
        cmds += [self._elements_cmd("add", name, new) for name, new in adds if new]
        if cmds:
            try:
                self._send(cmds)
            except Exception as exc:
                if read:
                    self._pending = _pending_of(dels, adds)
                if isinstance(exc, NftError) and exc.timed_out:
                    # it may have gone through: what the kernel holds is unknown now
                    for elems in self._pending.values():
                        for e in elems:
                            elems[e] = None
                else:  # refused (or failed otherwise): the kernel is not what we think; read it next sync
                    self._repair = True
                raise
            self.transactions += 1
        self._pending = {}
        self._verified = True
        return changes

    @staticmethod
    def _elements_cmd(verb: str, name: str, elems: Collection[Elem]) -> _Elements:
        return _Elements(verb, name, elems)

    def _send(self, cmds: list[dict[str, Any] | _Elements]) -> None:
        """One transaction. Element changes alone (no structure, no interval set) go over
        netlink as one nf_tables batch (nft_wire.write_elements), without starting nft.
        To a runner that takes a file, element commands are written as
        text one element at a time into an in-memory file that becomes nft's stdin: a first
        transaction's elements as a tree of dicts and lists were the agent's memory peak
        (~4x their JSON text: 34 MiB at 5,000 Services), and the whole text in the heap
        (built, then encoded for the pipe) ~3x."""
        elems = [c for c in cmds if isinstance(c, _Elements) and not _SPECS[kernel_set(c.name)[0]].interval]
        if (len(elems) == len(cmds) and sum(len(c.elems) for c in elems) <= NETLINK_MAX_ELEMENTS
                and (wire := self._netlink()) is not None):
            from .nft_wire import Unsent

            try:
                wire.write_elements(FAMILY, TABLE, [c.change() for c in elems])
            except Unsent as exc:
                log.info("nftables: %s; sending it through nft", exc)
            except OSError as exc:
                raise NftError(f"nftables: {exc}", timed_out=isinstance(exc, TimeoutError)) from None
            else:
                self.netlink_transactions += 1
                return
        meta: dict[str, Any] = {"metainfo": {"json_schema_version": 1}}
        if not getattr(self.nft, "takes_file", False):
            self.nft({"nftables": [meta, *(c.json() if isinstance(c, _Elements) else c for c in cmds)]})
            return
        runner: TakesFile = self.nft  # type: ignore[assignment]
        with scratch_file() as raw:
            out = io.TextIOWrapper(raw, encoding="utf-8")
            out.write('{"nftables": [' + json.dumps(meta))
            for c in cmds:
                out.write(", ")
                if isinstance(c, _Elements):
                    c.write(out)
                else:
                    out.write(json.dumps(c))
            out.write("]}")
            out.flush()
            out.detach()  # the file stays open for the runner
            raw.seek(0)
            runner(raw)

    def close(self) -> None:
        """Close the netlink socket (reopened when a read needs it) and a drift check's."""
        self._end_check()
        if self._wire is not None:
            self._wire.close()
            self._wire, self._reader = None, None

    def cleanup(self) -> bool:
        """Delete table inet ipvsproxy (and only it); True when it existed."""
        self._verified, self._repair, self._pending = False, False, {}
        self.close()
        if self._structure_listing() is None:
            return False
        self.nft({"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]})
        return True
