"""The kernel dataplane: IPVS over generic netlink, addresses over rtnetlink.

IPVS messages and address binds go through our own batched codecs
(ipvs_wire, addr_wire: many messages per send, acks mapped back by sequence
number), because a plain pyroute2 loop spends ~25 ms of Python per IPVS
object and ~11 ms per address under emulation; the dummy interface and
address dumps through link_wire (importing pyroute2 for them cost seconds
of every start under emulation). Kernel errors come back as Failures whose
message names the Service and the object, never as exceptions.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import subprocess
import typing
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..config import AgentConfig
from ..model import (
    AF_INET6,
    F_OWNED,
    F_PERSISTENT,
    ObservedReal,
    ObservedState,
    ObservedVS,
    Protocol,
    VirtualServer,
    VSKey,
    family_of,
)
from ..plan import Op, OpKind
from ..schedulers import default_registry
from . import ipvs_proc
from .addr_wire import IFA_F_NODAD, AddrRequest, AddrWire
from .base import (
    INTERFACE_MARK,
    KUBE_PROXY_DUMMY,
    Counters,
    DataplaneError,
    Failure,
    InterfaceRefused,
    describe_failure,
    harmless,
)
from .conntrack import ConntrackCleaner, Removal
from .ipvs_wire import (
    Cmd,
    Dest,
    DestEntry,
    IPVSUnavailable,
    IPVSWire,
    Request,
    Stats,
    Svc,
    SvcEntry,
)
from .link_wire import AddrInfo, LinkInfo, LinkWire

log = logging.getLogger(__name__)

NO_IPVS = (
    "IPVS is not available: the kernel has no ip_vs module (CONFIG_IP_VS); ipvsproxy needs a kernel with IPVS"
)
SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}
STRICT_ARP = {"net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2"}
_DEST_CMD = {OpKind.ADD_RS: Cmd.NEW_DEST, OpKind.EDIT_RS: Cmd.SET_DEST, OpKind.DEL_RS: Cmd.DEL_DEST}
_MODULE = re.compile(r"^[a-z0-9_]+$")


def _modprobe(name: str) -> None:
    try:
        subprocess.run(["modprobe", "-q", name], check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("modprobe %s: %s", name, exc)


def _module_name(path: str) -> str:
    """'kernel/net/netfilter/ipvs/ip_vs_lc.ko.xz' -> 'ip_vs_lc' (the kernel spells - as _)."""
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


@dataclass(frozen=True, slots=True)
class KernelModules:
    """Which kernel modules the running kernel has, and loading them.

    A module compiled in (``CONFIG_IP_VS_LC=y``) never shows up as
    ``/sys/module/<name>`` (only modules with parameters do), so "loaded"
    alone would call a built-in scheduler unavailable; ``modules.builtin``
    lists them. The roots and ``modprobe`` are injectable so a test can stand
    in a kernel with its modules built in.
    """

    sysfs: str = "/sys/module"
    lib: str = field(default_factory=lambda: f"/lib/modules/{os.uname().release}")
    modprobe: Callable[[str], None] = _modprobe

    def loaded(self, name: str) -> bool:
        return os.path.isdir(os.path.join(self.sysfs, name))

    def _listed(self, name: str, index: str) -> bool:
        try:
            with open(os.path.join(self.lib, index)) as f:
                return any(_module_name(line.split(":")[0].strip()) == name for line in f)
        except OSError:
            return False

    def builtin(self, name: str) -> bool:
        return self._listed(name, "modules.builtin")

    def available(self, name: str) -> bool:
        """Loaded, built in, or present as a module file for the running kernel."""
        return self.loaded(name) or self.builtin(name) or self._listed(name, "modules.dep")

    def load(self, name: str) -> bool:
        """modprobe a module when it is neither loaded nor built in; True when it is there after."""
        if self.loaded(name) or self.builtin(name):
            return True
        if not _MODULE.match(name):
            return False
        self.modprobe(name)
        return self.loaded(name)


HOST_MODULES = KernelModules()


class Sysctls(typing.Protocol):
    """Where kernel settings are written (kube-proxy's utilsysctl)."""

    def write(self, path: str, value: str) -> None:
        """Set `path` (e.g. "net/ipv4/ip_forward") to `value`; a failure is logged, not raised."""


@dataclass(frozen=True, slots=True)
class ProcSysctls:
    """The running kernel's settings under /proc/sys (the root injectable for tests)."""

    root: str = "/proc/sys"

    def write(self, path: str, value: str) -> None:
        full = os.path.join(self.root, path)
        try:
            with open(full) as f:
                if f.read().strip() == value:
                    return
            with open(full, "w") as f:
                f.write(value)
        except OSError as exc:
            log.warning("cannot set %s=%s: %s", path.replace("/", "."), value, exc)


HOST_SYSCTLS = ProcSysctls()


# Unmarked dummies adopted (and marked) by name: the ones older versions created (ipvsproxy0 by
# default, any ipvsproxy* by --interface), and kube-proxy's, which holds only Service addresses
# (docs/operating.md, migrating from kube-proxy).
_ADOPTABLE = re.compile(r"^(ipvsproxy.*|kube-ipvs0)$")


def interface_refusal(name: str, kind: str | None, alias: str | None) -> str | None:
    """Why ipvsproxy must not touch the existing interface `name` (None: it may).

    Only a dummy that carries the mark, or an unmarked (alias-less) dummy
    with an adoptable name, is ipvsproxy's: anything else could be a node's
    NIC (its /32 or /128 unbound takes the node offline) or another tool's
    dummy (node-local DNS, a CNI) whose addresses are not ours to unbind.
    """
    hint = "(ipvsproxy creates and marks its own dummy when the name is free; pick such a name)"
    if kind != "dummy":
        what = f"of kind {kind}" if kind else "with no kind (a physical device)"
        return (f"--interface {name}: refusing to use interface {name} {what}: ipvsproxy binds, unbinds "
                f"and deletes addresses only on its own dummy interface {hint}")
    if alias == INTERFACE_MARK or (not alias and _ADOPTABLE.match(name)):
        return None
    marked = f"alias {alias!r}" if alias else "no alias"
    return (f"--interface {name}: refusing to use dummy interface {name}: ipvsproxy did not create it "
            f"({marked}, not {INTERFACE_MARK!r}); to hand it over: ip link set dev {name} alias "
            f"'{INTERFACE_MARK}' {hint}")


def _kernel_link_local(addr: str, flags: int) -> bool:
    """The link-local address the kernel gives an interface that comes up (not
    ours to unbind). Ours are told apart by IFA_F_NODAD, which every bind
    sets: skipping every fe80:: address left a link-local Service VIP bound
    for ever."""
    return ipaddress.ip_address(addr).is_link_local and not flags & IFA_F_NODAD


class StatsView(Mapping[str, int]):
    """The IPVS counters of one object ("conns", "inpkts", ... "outbps") as a
    read-only mapping over the decoded wire record. A full dump (every
    --sync-period) reads every real server: a dict of ten counters each was
    ~0.3 KiB on top of the record, ~45 MiB per dump at 10,000 Services x 10;
    this view is 56 bytes."""

    __slots__ = ("_s",)
    KEYS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes", "cps", "inpps", "outpps", "inbps", "outbps")
    _KEYSET = frozenset(KEYS)

    def __init__(self, s: Stats) -> None:
        self._s = s

    def __getitem__(self, key: str) -> int:
        if key not in self._KEYSET:
            raise KeyError(key)
        value: int = getattr(self._s, key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)

    def __repr__(self) -> str:
        return repr(dict(self))


def _stats(s: Stats) -> Mapping[str, int]:
    return StatsView(s)


def svc_of(key: VSKey, vs: VirtualServer | None = None) -> Svc:
    """The wire form of a virtual server (settings from vs when given)."""
    netmask = 128 if key.family == AF_INET6 else 0xFFFFFFFF
    if vs is None:
        return Svc(key.family, key.protocol, key.address, key.port, netmask=netmask)
    return Svc(key.family, key.protocol, key.address, key.port, vs.scheduler, vs.kernel_flags,
               vs.timeout, netmask)


def observed_vs(entry: SvcEntry, dests: Iterable[DestEntry]) -> ObservedVS:
    s = entry.svc
    key = VSKey(s.family, s.protocol, s.address, s.port)
    return ObservedVS(key, s.scheduler, s.flags, s.timeout if s.flags & F_PERSISTENT else 0,
                      observed_reals(dests), stats=_stats(entry.stats))


def observed_reals(dests: Iterable[DestEntry]) -> dict[tuple[str, int], ObservedReal]:
    return {(d.dest.address, d.dest.port): ObservedReal(d.dest.address, d.dest.port, d.dest.weight,
                                                        d.active_conns, d.inact_conns, _stats(d.stats))
            for d in dests}


class Links(typing.Protocol):
    """What the dataplane asks of links and addresses (link_wire.LinkWire; a test's fake).
    Each raises OSError saying what it could not do, in the kernel's words."""

    def link(self, name: str) -> LinkInfo | None: ...
    def add_dummy(self, name: str) -> None: ...
    def set_alias(self, index: int, alias: str) -> None: ...
    def set_up(self, index: int) -> None: ...
    def delete(self, index: int) -> None: ...
    def addresses(self, family: int, index: int | None = None,
                  other_than: Collection[int | None] = ()) -> list[AddrInfo]: ...
    def close(self) -> None: ...


class NetlinkDataplane:
    """Programs the running kernel. Needs root with CAP_NET_ADMIN.

    Every kernel handle is injectable (kube-proxy's KernelHandler, utilsysctl and
    NetLinkHandle; kube-router's LinuxNetworking): `modules` (sysfs, the module
    index, modprobe), `sysctls`, `links` (link_wire.LinkWire: the dummy interface and
    address dumps), `wire` (IPVS), `addr` (address binds), `conntrack`. Left out, each is
    the running kernel's; a test hands in fakes to run setup() and the interface
    rules on a host without IPVS (tests/unit/test_netlink_setup.py).
    """

    def __init__(self, cfg: AgentConfig, *, read_only: bool = False, batch_size: int = 256,
                 modules: KernelModules | None = None, sysctls: Sysctls | None = None, links: Links | None = None,
                 wire: IPVSWire | None = None, addr: AddrWire | None = None,
                 conntrack: ConntrackCleaner | None = None, real_counters: bool = False,
                 proc_table: Callable[[], dict[VSKey, ipvs_proc.Reals]] = ipvs_proc.read) -> None:
        self.cfg = cfg
        self.read_only = read_only
        # False: observe() reads real servers from /proc/net/ip_vs in one file read, without
        # their traffic counters, which only `list --stats` shows and asks for (ipvs_proc.py)
        self.real_counters = real_counters
        self.proc_table = proc_table
        self._proc_warned = False
        self.modules = modules or HOST_MODULES
        self.sysctls: Sysctls = sysctls or HOST_SYSCTLS
        self.counters = Counters()
        self._usable: dict[str, bool] = {}
        self.registry = default_registry()
        if cfg.load_modules and not read_only:
            self.modules.load("ip_vs")
        try:
            self.wire = wire or IPVSWire(batch_size=batch_size)
        except IPVSUnavailable:
            raise DataplaneError(NO_IPVS) from None
        except PermissionError:
            raise DataplaneError("cannot open netlink for IPVS: permission denied (run as root with "
                                 "CAP_NET_ADMIN)") from None
        self.links: Links = links or LinkWire()  # the dummy interface, the node's addresses
        self.addr = addr or AddrWire(batch_size=batch_size)  # binds/unbinds, batched like IPVS messages
        self._ifindex: int | None = None
        self._alias: str | None = None  # the interface's alias when it was looked up
        # its socket and worker thread start on the first UDP/SCTP removal
        self.conntrack = conntrack or ConntrackCleaner()

    # ---- setup --------------------------------------------------------------
    def setup(self) -> None:
        """Modules, sysctls, the dummy interface and IPVS timeouts."""
        cfg = self.cfg
        self.ifindex()  # an --interface that is not ours is refused before anything is changed
        if cfg.load_modules:
            for mod in ("ip_vs", f"ip_vs_{cfg.scheduler}", "dummy", "nf_conntrack"):
                if not self.modules.load(mod):
                    log.warning("kernel module %s is not loaded and could not be loaded", mod)
        for path, value in SYSCTLS.items():
            self.sysctls.write(path, value)
        if cfg.strict_arp:
            for path, value in STRICT_ARP.items():
                self.sysctls.write(path, value)
        self.ensure_interface()
        timeouts = [int(cfg.tcp_timeout), int(cfg.tcpfin_timeout), int(cfg.udp_timeout)]
        if any(timeouts):
            self.wire.set_config(*timeouts)

    def ensure_interface(self) -> int:
        """Our dummy's index: created and marked when missing, adopted (marked)
        when it is an unmarked one of ours; raises InterfaceRefused on anything else."""
        idx = self.ifindex()
        name = self.cfg.interface
        if idx is None:
            try:
                self.links.add_dummy(name)
            except OSError as exc:
                raise DataplaneError(f"{exc.strerror or exc} (is the 'dummy' kernel module available?)") from None
            found = self.links.link(name)
            if found is None:
                raise DataplaneError(f"dummy interface {name} vanished right after it was created")
            try:
                self.links.set_alias(found.index, INTERFACE_MARK)
            except OSError as exc:
                self.links.delete(found.index)  # an unmarked dummy would be refused next time
                raise DataplaneError(f"{exc.strerror or exc} (marking dummy interface {name} as "
                                     "ipvsproxy's)") from None
            log.info("created dummy interface %s (alias %r)", name, INTERFACE_MARK)
            idx = self.ifindex()
            assert idx is not None
        elif self._alias != INTERFACE_MARK:
            self.links.set_alias(idx, INTERFACE_MARK)
            log.info("adopted dummy interface %s (marked with alias %r)", name, INTERFACE_MARK)
            self._alias = INTERFACE_MARK
        self.links.set_up(idx)
        return idx

    def ifindex(self) -> int | None:
        """The index of our interface (None when there is none); raises
        InterfaceRefused when the name is taken by an interface not ours."""
        if self._ifindex is None:
            link = self.links.link(self.cfg.interface)
            if link is None:
                return None
            refusal = interface_refusal(self.cfg.interface, link.kind, link.alias)
            if refusal:
                raise InterfaceRefused(refusal)
            self._ifindex, self._alias = link.index, link.alias
        return self._ifindex

    def bound_addresses(self) -> set[str]:
        idx = self.ifindex()
        if idx is None:
            return set()
        out = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for a in self.links.addresses(family, idx):
                if a.address and not (family == AF_INET6 and _kernel_link_local(a.address, a.flags)):
                    out.add(a.address)
        return out

    def local_addresses(self) -> set[str]:
        """Every address on an interface other than ours (rtnetlink): the node's
        own, which an external or load-balancer IP must never be bound over.

        Not kube-proxy's dummy (kube-ipvs0): what it holds are Service addresses that
        kube-proxy bound, which ipvsproxy binds on its own interface too when it takes
        the node over; else they would vanish with kube-ipvs0 (docs/operating.md)."""
        kube_ipvs0 = self.links.link(KUBE_PROXY_DUMMY)
        skip = {self.ifindex(), kube_ipvs0.index if kube_ipvs0 is not None else None}
        out = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for a in self.links.addresses(family, other_than=skip):
                addr = a.local or a.address  # LOCAL: not a peer's
                if addr and "%" not in addr:
                    out.add(str(ipaddress.ip_address(addr)))  # spelled as Service IPs are
        return out

    # ---- reading --------------------------------------------------------------
    def observe(self) -> ObservedState:
        self.counters.dumps += 1
        state = ObservedState(addresses=self.bound_addresses())
        # Real servers from the file; a virtual server it lacks (added after it was read, or its
        # lines did not read; all of them with real_counters or no file) by a dests dump of its own.
        table = {} if self.real_counters else self._proc_reals()
        for entry in self.wire.services():  # the settings and counters of every virtual server
            obs = observed_vs(entry, ())
            reals = table.get(obs.key)
            obs.reals = observed_reals(self.wire.dests(entry.svc)) if reals is None else reals
            state.services[obs.key] = obs
        return state

    def _proc_reals(self) -> dict[VSKey, ipvs_proc.Reals]:
        """Every virtual server's real servers from /proc/net/ip_vs ({}: unreadable here, so
        observe dumps them over netlink; said once)."""
        try:
            return self.proc_table()
        except (OSError, UnicodeDecodeError) as exc:
            if not self._proc_warned:
                log.info("cannot read %s (%s); reading real servers over netlink, one dump per virtual "
                         "server", ipvs_proc.PROC_PATH, exc)
                self._proc_warned = True
            return {}

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        keys = list(keys)
        entries = self.wire.services_of([svc_of(key) for key in keys])  # pipelined; dumps go one at a time
        return {key: None if entry is None else observed_vs(entry, self.wire.dests(entry.svc))
                for key, entry in zip(keys, entries, strict=True)}

    def service_key_pages(self) -> Generator[list[VSKey] | None, None, None]:
        self.counters.dumps += 1
        with self.wire.twin() as wire:  # a socket of its own: this one serves the syncs meanwhile
            for page in wire.service_key_pages():
                yield None if page is None else [VSKey(*k) for k in page]

    def service_stats(self) -> dict[VSKey, tuple[bool, Mapping[str, int]]]:
        """One services-only IPVS dump: no real servers, no addresses (what /metrics needs)."""
        self.counters.dumps += 1
        out: dict[VSKey, tuple[bool, Mapping[str, int]]] = {}
        for entry in self.wire.services():
            s = entry.svc
            out[VSKey(s.family, s.protocol, s.address, s.port)] = (bool(s.flags & F_OWNED), _stats(entry.stats))
        return out

    def scheduler_usable(self, name: str) -> bool:
        if name not in self._usable:
            sched = self.registry.get(name)
            module = sched.module if sched else f"ip_vs_{name}"
            ok = self.modules.load(module) if self.cfg.load_modules and not self.read_only else \
                self.modules.available(module)
            self._usable[name] = ok
        return self._usable[name]

    # ---- writing ----------------------------------------------------------------
    def _requests(self, op: Op, ids: dict[VSKey, Svc]) -> Request | None:
        """The IPVS request for one operation. `ids` holds one identity-only Svc per virtual
        server for the whole apply: its real servers' requests share it, so the wire encodes
        the service identity once per virtual server, not once per real server (IPVSWire
        reuses the last nest while the Svc object is the same)."""
        key = op.key
        if key is None:
            return None
        if op.kind is OpKind.ADD_VS:
            return Request(Cmd.NEW_SERVICE, svc_of(key, op.vs))
        if op.kind is OpKind.EDIT_VS:
            return Request(Cmd.SET_SERVICE, svc_of(key, op.vs))
        svc = ids.get(key)
        if svc is None:
            svc = ids[key] = svc_of(key)
        if op.kind is OpKind.DEL_VS:
            return Request(Cmd.DEL_SERVICE, svc)
        assert op.real is not None
        dest = Dest(op.real.address, op.real.port, op.real.weight, 0, family_of(op.real.address))
        return Request(_DEST_CMD[op.kind], svc, dest)

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        if self.read_only:
            raise DataplaneError("dataplane opened read-only")
        failures: list[Failure] = []
        binds = [op for op in ops if op.kind is OpKind.BIND]
        unbinds = [op for op in ops if op.kind is OpKind.UNBIND]
        ipvs = [op for op in ops if op.kind not in (OpKind.BIND, OpKind.UNBIND)]
        sent = self._sent()
        self._addresses(binds, failures)
        ids: dict[VSKey, Svc] = {}
        reqs = [(op, self._requests(op, ids)) for op in ipvs]
        results = self.wire.execute([r for _, r in reqs if r is not None])
        removed: list[Removal] = []
        for (op, _), err in zip(reqs, results, strict=True):
            if err is not None and not harmless(op, err.errno):
                failures.append(Failure(op, describe_failure(op, err), err.errno))
                continue
            self.counters.ops[op.kind.value] += 1
            if op.key is not None and op.key.protocol != Protocol.TCP:
                if op.kind is OpKind.DEL_RS and op.real is not None:
                    removed.append(Removal(op.key, op.real))
                elif op.kind is OpKind.DEL_VS:
                    removed.append(Removal(op.key))
        # Stale UDP/SCTP flows to what went: deleted in the background, one pass for the lot,
        # so the sync (every other Service's update) never waits for a conntrack table walk.
        if removed:
            self.conntrack.submit(removed)
        self._addresses(unbinds, failures)
        now = self._sent()
        self.counters.messages += now[0] - sent[0]
        self.counters.round_trips += now[1] - sent[1]
        return failures

    def _sent(self) -> tuple[int, int]:
        """(messages, sendmsg calls) so far on both wires: IPVS and addresses."""
        w, a = self.wire.counters, self.addr.counters
        return w.messages_sent + a.messages_sent, w.sendmsg_calls + a.sendmsg_calls

    def _addresses(self, ops: Sequence[Op], failures: list[Failure]) -> None:
        """Bind (or unbind) addresses on our interface: all BIND (or all UNBIND)
        ops in batches of RTM_NEWADDR/RTM_DELADDR, each error on its own op."""
        if not ops:
            return
        add = ops[0].kind is OpKind.BIND
        try:
            idx = self.ensure_interface() if add else self.ifindex()
        except Exception as exc:
            failures += [Failure(op, describe_failure(op, exc), getattr(exc, "errno", 0) or 0) for op in ops]
            return
        if idx is None:  # no interface: nothing of ours is bound
            return
        results = self.addr.execute([AddrRequest(add, op.address or "", idx) for op in ops])
        for op, err in zip(ops, results, strict=True):
            if err is None:
                self.counters.ops[op.kind.value] += 1
            elif not harmless(op, err.errno or 0):  # already (un)bound is not a failure
                if err.errno == errno.ENODEV:
                    self._ifindex = None  # the interface went away behind our back: look it up again
                failures.append(Failure(op, describe_failure(op, err), err.errno or 0))

    def remove_interface(self) -> bool:
        """Delete our dummy (only ever a dummy ifindex() accepted)."""
        idx = self.ifindex()
        if idx is None:
            return False
        self.links.delete(idx)
        self._ifindex = None
        return True

    def close(self) -> None:
        self.conntrack.close()
        self.wire.close()
        self.addr.close()
        self.links.close()
