"""What kube-proxy's IPVS mode leaves on a node, and what of it may go: the pure part of
`ipvsproxy cleanup-kube-proxy`.

Moving a node from kube-proxy (IPVS mode) to ipvsproxy leaves kube-proxy's state behind
(docs/operating.md): its dummy interface `kube-ipvs0`, its iptables chains and ipsets, and the
virtual servers of Services deleted while neither proxy ran. This module decides, from a
snapshot of the node (`NodeView`), exactly which of those to delete and in which order
(`plan_leftovers`), and carries the steps out through small seams (`apply_steps`) that the
command implements with the real tools and the unit tests with fakes that fail where the tools
fail. It does no I/O itself.

What counts as kube-proxy's is kube-proxy v1.20's own definition (pkg/proxy/ipvs/proxier.go:
`iptablesJumpChain`, `iptablesCleanupChains`, `ipsetInfo`, `DefaultDummyDevice`, used by its
`CleanupLeftovers`), never a `KUBE-` prefix: KUBE-MARK-MASQ and KUBE-MARK-DROP are shared with
the kubelet and stay, as kube-proxy's own cleanup leaves them. A virtual server is kube-proxy's
when its address is on kube-ipvs0 or kube-proxy's ipsets list it (they are the record of its
last sync: Service IP,protocol:port for ClusterIP/external/load-balancer addresses, the port for
NodePorts); it is deleted only when no current Service claims it and it is not ipvsproxy's.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol as TypingProtocol

from .dataplane.base import INTERFACE_MARK, KUBE_PROXY_DUMMY
from .model import AF_INET, AF_INET6, Protocol, VSKey, canonical_ip, join_host_port

KUBE_IPVS0 = KUBE_PROXY_DUMMY  # kube-proxy's DefaultDummyDevice

# (table, from chain, to chain): the jumps kube-proxy's IPVS mode puts into the built-in chains.
JUMPS = (("nat", "OUTPUT", "KUBE-SERVICES"), ("nat", "PREROUTING", "KUBE-SERVICES"),
         ("nat", "POSTROUTING", "KUBE-POSTROUTING"), ("filter", "FORWARD", "KUBE-FORWARD"))
# iptablesCleanupChains: flushed, then deleted (KUBE-MARK-MASQ/-DROP are the kubelet's too: kept).
CHAINS = (("nat", "KUBE-SERVICES"), ("nat", "KUBE-POSTROUTING"), ("nat", "KUBE-FIREWALL"),
          ("nat", "KUBE-NODE-PORT"), ("nat", "KUBE-LOAD-BALANCER"), ("filter", "KUBE-FORWARD"))

# ipsetInfo. Members of the "IP,proto:port" sets name a virtual server; the bitmap:port sets a NodePort.
_ADDRESS_SETS = ("KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-LOAD-BALANCER",
                 "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-NODE-PORT-SCTP-HASH",
                 "KUBE-NODE-PORT-LOCAL-SCTP-HASH")
_PORT_SETS = {"KUBE-NODE-PORT-TCP": Protocol.TCP, "KUBE-NODE-PORT-LOCAL-TCP": Protocol.TCP,
              "KUBE-NODE-PORT-UDP": Protocol.UDP, "KUBE-NODE-PORT-LOCAL-UDP": Protocol.UDP}
_OTHER_SETS = ("KUBE-LOOP-BACK", "KUBE-LOAD-BALANCER-SOURCE-IP", "KUBE-LOAD-BALANCER-SOURCE-CIDR")


def _v6(name: str) -> str:
    """The IPv6 proxier's name for a set (ipvs/ipset.go: "KUBE-" becomes "KUBE-6-")."""
    return name.replace("KUBE-", "KUBE-6-", 1)


ADDRESS_SETS = frozenset(_ADDRESS_SETS) | {_v6(n) for n in _ADDRESS_SETS}
PORT_SETS = {**_PORT_SETS, **{_v6(n): p for n, p in _PORT_SETS.items()}}
IPSETS = ADDRESS_SETS | PORT_SETS.keys() | set(_OTHER_SETS) | {_v6(n) for n in _OTHER_SETS}
IPTABLES_TOOLS = ("iptables", "ip6tables")


# ---- snapshots of the node ------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One iptables rule as iptables-save prints it: `-A CHAIN SPEC...` in TABLE."""

    table: str
    chain: str
    spec: tuple[str, ...]

    @property
    def target(self) -> str | None:
        """The chain or target it jumps/goes to (-j/-g), if any."""
        for flag in ("-j", "--jump", "-g", "--goto"):
            if flag in self.spec:
                i = self.spec.index(flag)
                return self.spec[i + 1] if i + 1 < len(self.spec) else None
        return None

    def match_sets(self) -> set[str]:
        """The ipsets the rule matches on (--match-set NAME)."""
        return {self.spec[i + 1] for i, tok in enumerate(self.spec[:-1]) if tok in ("--match-set", "--set")}

    def __str__(self) -> str:
        return f"-t {self.table} -A {self.chain} {shlex.join(self.spec)}"


@dataclass(frozen=True)
class Ruleset:
    """One tool's (iptables or ip6tables) tables: the chains that exist and their rules."""

    chains: frozenset[tuple[str, str]] = frozenset()  # (table, chain), built-in ones included
    rules: tuple[Rule, ...] = ()


def parse_iptables_save(text: str) -> Ruleset:
    """iptables-save output -> Ruleset; raises ValueError on a line it cannot read."""
    table = ""
    chains: set[tuple[str, str]] = set()
    rules: list[Rule] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and table:
            chains.add((table, line[1:].split()[0]))
        elif line.startswith("-A ") and table:
            try:
                tokens = shlex.split(line)
            except ValueError as exc:
                raise ValueError(f"iptables-save line {n}: {exc}: {line!r}") from None
            rules.append(Rule(table, tokens[1], tuple(tokens[2:])))
        else:
            raise ValueError(f"iptables-save line {n} not understood: {line!r}")
    return Ruleset(frozenset(chains), tuple(rules))


def parse_ipset_save(text: str) -> dict[str, tuple[str, ...]]:
    """`ipset save` output -> {set name: members}; raises ValueError on a line it cannot read."""
    sets: dict[str, list[str]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            raise ValueError(f"ipset save line {n}: {exc}: {line!r}") from None
        if tokens[0] == "create" and len(tokens) >= 3:
            sets.setdefault(tokens[1], [])
        elif tokens[0] == "add" and len(tokens) >= 3:
            sets.setdefault(tokens[1], []).append(tokens[2])
        else:
            raise ValueError(f"ipset save line {n} not understood: {line!r}")
    return {k: tuple(v) for k, v in sets.items()}


@dataclass(frozen=True)
class LinkInfo:
    """One network interface: its kind (dummy, veth, ... or "" for a plain device), alias, addresses."""

    name: str
    kind: str
    alias: str = ""
    addresses: frozenset[str] = frozenset()


@dataclass(frozen=True)
class NodeView:
    """Everything the decision needs, read from the node (and the cluster) by the caller."""

    services: Mapping[VSKey, bool]  # every virtual server in the kernel -> owned by ipvsproxy
    desired: frozenset[VSKey]  # what the current Services want on this node (ipvsproxy's translation)
    rulesets: Mapping[str, Ruleset]  # "iptables"/"ip6tables" -> its tables (absent: tool missing)
    ipsets: Mapping[str, tuple[str, ...]]
    links: Mapping[str, LinkInfo]
    kube_proxy: tuple[int, ...] = ()  # pids of running kube-proxy processes
    excluded: Callable[[str], bool] = field(default=lambda address: False)  # --exclude-cidrs


# ---- the plan ------------------------------------------------------------------------------------

class StepKind(Enum):
    DEL_VS = "delete-virtual-server"
    DEL_RULE = "delete-rule"
    FLUSH_CHAIN = "flush-chain"
    DEL_CHAIN = "delete-chain"
    DESTROY_SET = "destroy-ipset"
    DEL_LINK = "delete-link"


@dataclass(frozen=True)
class Step:
    """One change, in the order `plan_leftovers` returns them."""

    kind: StepKind
    key: VSKey | None = None  # DEL_VS
    tool: str = ""  # iptables or ip6tables (rules and chains)
    rule: Rule | None = None  # DEL_RULE
    table: str = ""  # FLUSH_CHAIN, DEL_CHAIN
    chain: str = ""
    name: str = ""  # DESTROY_SET (set), DEL_LINK (interface)

    def __str__(self) -> str:
        if self.kind is StepKind.DEL_VS:
            return f"delete virtual server {self.key}"
        if self.kind is StepKind.DEL_RULE:
            return f"{self.tool}: delete rule {self.rule}"
        if self.kind in (StepKind.FLUSH_CHAIN, StepKind.DEL_CHAIN):
            verb = "flush" if self.kind is StepKind.FLUSH_CHAIN else "delete"
            return f"{self.tool}: {verb} chain {self.chain} (table {self.table})"
        if self.kind is StepKind.DESTROY_SET:
            return f"ipset: destroy {self.name}"
        return f"delete interface {self.name}"


@dataclass
class Leftovers:
    """The steps, what stays and why, and the reason to do nothing at all (refusal)."""

    steps: list[Step] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    refusal: str | None = None


def _set_member_key(member: str) -> tuple[str, int, int] | None:
    """'10.96.0.1,tcp:80' -> ('10.96.0.1', 6, 80); None when it is not an IP,proto:port member."""
    ip, sep, rest = member.rpartition(",")
    proto, sep2, port = rest.partition(":")
    if not sep or not sep2 or not port.isdigit():
        return None
    try:
        return canonical_ip(ip.strip("[]")), Protocol.parse(proto), int(port)
    except ValueError:
        return None


def kube_proxy_keys(view: NodeView) -> set[VSKey]:
    """The virtual servers in the kernel that kube-proxy made (see the module docstring)."""
    on_dummy = view.links[KUBE_IPVS0].addresses if KUBE_IPVS0 in view.links else frozenset()
    by_address: set[tuple[str, int, int]] = set()
    node_ports: set[tuple[int, int]] = set()
    for name, members in view.ipsets.items():
        if name in ADDRESS_SETS:
            by_address |= {k for m in members if (k := _set_member_key(m)) is not None}
        elif name in PORT_SETS:
            node_ports |= {(int(PORT_SETS[name]), int(m.rpartition(":")[2])) for m in members
                           if m.rpartition(":")[2].isdigit()}
    return {k for k in view.services
            if k.address in on_dummy or (k.address, k.protocol, k.port) in by_address
            or (k.protocol, k.port) in node_ports}


def refusal_running(pids: Sequence[int]) -> str:
    return (f"kube-proxy is still running on this node (pid {', '.join(str(p) for p in pids)}): stop it "
            "first; its next sync would re-create what this removes")


def _refusal(view: NodeView) -> str | None:
    if view.kube_proxy:
        return refusal_running(view.kube_proxy)
    waiting = sorted(k for k in view.desired if k in view.services and not view.services[k])
    if waiting:
        shown = ", ".join(str(k) for k in waiting[:3]) + (f" and {len(waiting) - 3} more" if len(waiting) > 3 else "")
        return (f"ipvsproxy has not taken over this node yet: {len(waiting)} virtual server(s) of current Services "
                f"are not ipvsproxy's ({shown}); start `ipvsproxy run` and let it sync first")
    return None


def plan_leftovers(view: NodeView) -> Leftovers:
    """What to delete, in a safe order: virtual servers, then the jumps into kube-proxy's chains,
    the chains (flushed, then deleted), the ipsets (only once no rule matches on them: the
    kernel refuses to destroy a set in use), and kube-ipvs0 last, when nothing needs it."""
    out = Leftovers(refusal=_refusal(view))
    if out.refusal:
        return out
    ours = kube_proxy_keys(view)
    gone: set[VSKey] = set()
    for key in sorted(ours):
        if view.services[key]:
            continue  # ipvsproxy's now (adopted): never a leftover
        if key in view.desired:
            out.kept.append(f"virtual server {key}: a current Service claims it")
        elif view.excluded(key.address):
            out.kept.append(f"virtual server {key}: in --exclude-cidrs")
        else:
            gone.add(key)
            out.steps.append(Step(StepKind.DEL_VS, key=key))

    remaining_rules: list[Rule] = []
    for tool in IPTABLES_TOOLS:
        rs = view.rulesets.get(tool)
        if rs is None:
            continue
        doomed = [c for c in CHAINS if c in rs.chains]
        doomed_set = set(doomed)
        for rule in rs.rules:
            if (rule.table, rule.chain) in doomed_set:
                continue  # goes with its chain
            if (rule.table, rule.target) in doomed_set:
                out.steps.append(Step(StepKind.DEL_RULE, tool=tool, rule=rule))
            else:
                remaining_rules.append(rule)
        out.steps += [Step(StepKind.FLUSH_CHAIN, tool=tool, table=t, chain=c) for t, c in doomed]
        out.steps += [Step(StepKind.DEL_CHAIN, tool=tool, table=t, chain=c) for t, c in doomed]

    in_use = {s: r for r in remaining_rules for s in r.match_sets()}
    for name in sorted(IPSETS & view.ipsets.keys()):
        if name in in_use:
            out.kept.append(f"ipset {name}: a rule kube-proxy did not make matches on it ({in_use[name]})")
        else:
            out.steps.append(Step(StepKind.DESTROY_SET, name=name))

    link = view.links.get(KUBE_IPVS0)
    if link is not None:
        reason = _link_needed(view, link, gone)
        if reason:
            out.kept.append(f"interface {KUBE_IPVS0}: {reason}")
        else:
            out.steps.append(Step(StepKind.DEL_LINK, name=KUBE_IPVS0))
    return out


def _link_needed(view: NodeView, link: LinkInfo, gone: set[VSKey]) -> str | None:
    """Why kube-ipvs0 must stay (None: it can go)."""
    if link.alias == INTERFACE_MARK:
        return "ipvsproxy's own interface now (--interface kube-ipvs0): `ipvsproxy cleanup` removes it"
    if link.kind != "dummy":
        return f"not a dummy interface (kind {link.kind or 'none'}): not kube-proxy's"
    elsewhere = set().union(*(li.addresses for n, li in view.links.items() if n != KUBE_IPVS0))
    needed = sorted({k.address for k in view.services if k not in gone
                     and k.address in link.addresses and k.address not in elsewhere})
    if needed:
        return (f"it alone holds {', '.join(needed)}, used by virtual servers that stay: is ipvsproxy "
                "running (it binds them on its own interface)?")
    return None


# ---- carrying it out -----------------------------------------------------------------------------

class ToolError(RuntimeError):
    """A tool refused a step (the message is the tool's own, on one line)."""


class IptablesSeam(TypingProtocol):
    def delete_rule(self, rule: Rule) -> None: ...
    def flush_chain(self, table: str, chain: str) -> None: ...
    def delete_chain(self, table: str, chain: str) -> None: ...


class IpsetSeam(TypingProtocol):
    def destroy(self, name: str) -> None: ...


class LinkSeam(TypingProtocol):
    def delete(self, name: str) -> None: ...


@dataclass
class Seams:
    """Where the steps go: virtual servers (a callable: the dataplane), iptables per tool, ipset, links."""

    delete_vs: Callable[[VSKey], None]
    iptables: Mapping[str, IptablesSeam]
    ipset: IpsetSeam
    links: LinkSeam


def apply_steps(steps: Sequence[Step], seams: Seams) -> list[tuple[Step, str]]:
    """Carry the steps out in order; every refusal is returned (step, message), never raised,
    and the next steps still run (each undoes one independent thing)."""
    failures: list[tuple[Step, str]] = []
    for step in steps:
        try:
            if step.kind is StepKind.DEL_VS:
                assert step.key is not None
                seams.delete_vs(step.key)
            elif step.kind is StepKind.DEL_RULE:
                assert step.rule is not None
                seams.iptables[step.tool].delete_rule(step.rule)
            elif step.kind is StepKind.FLUSH_CHAIN:
                seams.iptables[step.tool].flush_chain(step.table, step.chain)
            elif step.kind is StepKind.DEL_CHAIN:
                seams.iptables[step.tool].delete_chain(step.table, step.chain)
            elif step.kind is StepKind.DESTROY_SET:
                seams.ipset.destroy(step.name)
            else:
                seams.links.delete(step.name)
        except ToolError as exc:
            failures.append((step, str(exc)))
    return failures


def vs_key(protocol: int, address: str, port: int) -> VSKey:
    """A VSKey from parts (for callers that read virtual servers some other way)."""
    address = canonical_ip(address)
    return VSKey(AF_INET6 if ":" in address else AF_INET, protocol, address, port)


def describe(keys: Iterable[VSKey]) -> str:
    return ", ".join(f"{Protocol(k.protocol).name} {join_host_port(k.address, k.port)}" for k in sorted(keys))
