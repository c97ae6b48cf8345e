"""Kernel tests for ipvsproxy.dataplane.nft (run inside the IPVS test VM).

Real traffic between network namespaces this module creates; the VM's root
namespace is the node (IPVS through `ipvsadm`, the packet filter through
NftFirewall). Addresses only in 198.18.0.0/15 and 2001:2::/48:

    c1   198.18.1.2  2001:2:0:1::2   client, default route via the node
    c2   198.18.2.2  2001:2:0:2::2   second client, default route via the node
    ep   198.18.3.2  2001:2:0:3::2   "remote" endpoint: NO default route, it
                                      can only answer the node's own address
                                      on its link, i.e. masqueraded traffic
    pod  198.18.4.2  2001:2:0:4::2   local endpoint, default route via the node
    node (root ns): 198.18.{1..4}.1, 2001:2:0:{1..4}::1; dummy ipvsproxy0
         holds the VIPs 198.18.100.10 (ClusterIP), 198.18.100.20 (LoadBalancer)
         and 2001:2:0:100::10 (ClusterIP); NodePort 30080 (Cluster policy,
         endpoint ep) and 30081 (Local policy, endpoint ep) on 198.18.1.1
         and 2001:2:0:1::1.

Every server is a listening socket made inside its namespace and served by a
thread of this process; every client socket is made inside the client's
namespace (a socket stays in the namespace it was created in).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from netns import TcpListener, outcome

from ipvsproxy.config import AgentConfig, parse_cidrs
from ipvsproxy.dataplane.nft import FAMILY, TABLE, NftError
from ipvsproxy.model import AF_INET, AF_INET6, DesiredState, Real, ServiceRef, VirtualServer, VSKey
from tests.nftdriver import Firewall

pytestmark = pytest.mark.kernel

NS = ("c1", "c2", "ep", "pod")
PREFIX = "nftt-"
LINKS = {"c1": 1, "c2": 2, "ep": 3, "pod": 4}
VIP4, LB4, VIP6 = "198.18.100.10", "198.18.100.20", "2001:2:0:100::10"
NODE4, NODE6 = "198.18.1.1", "2001:2:0:1::1"
EP4, EP6, POD4, POD6 = "198.18.3.2", "2001:2:0:3::2", "198.18.4.2", "2001:2:0:4::2"
DUMMY = "ipvsproxy0"
PODS = "198.18.3.0/24,198.18.4.0/24,2001:2:0:3::/64,2001:2:0:4::/64"  # the cluster CIDRs
TIMEOUT = 3.0

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def sh(*args: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def ns(name: str) -> str:
    return PREFIX + name


def nsexec(name: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns(name), *args)


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this thread in a namespace (None: stay in the node's)."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns(name)}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
        os.close(target)


def tcp_server(where: str | None, port: int, name: str) -> TcpListener:
    """A TCP server (IPv4 and IPv6) in namespace `where` (None: the node) answering its name to every connection."""
    with in_netns(where):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 and v6
    sock.bind(("::", port))
    sock.listen(64)
    return TcpListener(sock, name.encode())


def fetch(client: str, address: str, port: int, timeout: float = TIMEOUT) -> str:
    """Connect from a client namespace: the server's name, 'refused' or 'timeout'."""
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    with in_netns(client):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)

        def answer() -> str:
            s.connect((address, port))
            return s.recv(64).decode() or "closed"

        return outcome(answer)


def ipvsadm(*args: str) -> None:
    sh("ipvsadm", *args)


def hp(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def vs(address: str, port: int, kind: str, reals: list[tuple[str, int]], *, local: bool = False,
       ranges: tuple[str, ...] = ()) -> VirtualServer:
    fam = AF_INET6 if ":" in address else AF_INET
    return VirtualServer(VSKey(fam, 6, address, port), reals=tuple(Real(a, p) for a, p in reals),
                         service=ServiceRef("default", f"svc-{port}", "http", kind), local=local,
                         source_ranges=ranges)


def desired() -> DesiredState:
    servers = [
        vs(NODE4, 30080, "NodePort", [(EP4, 8080)]),
        vs(NODE6, 30080, "NodePort", [(EP6, 8080)]),
        vs(NODE4, 30081, "NodePort", [(EP4, 8080)], local=True),
        vs(VIP4, 80, "ClusterIP", [(POD4, 8080)]),
        vs(VIP6, 80, "ClusterIP", [(POD6, 8080)]),
        vs(LB4, 80, "LoadBalancer", [(POD4, 8080)], ranges=("198.18.1.0/24", "not-a-cidr", "2001:2::/64")),
    ]
    return DesiredState.of(servers, {VIP4, LB4, VIP6})


def table_exists(name: str, family: str = "inet") -> bool:
    return subprocess.run(["nft", "list", "table", family, name], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def topology() -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("ipvsadm") is None or shutil.which("nft") is None:
        pytest.skip("needs root, ipvsadm and nft (run inside the IPVS test VM)")
    for m in ("ip_vs", "ip_vs_rr", "dummy", "veth", "nf_tables", "nft_masq", "nft_ct", "nft_chain_nat",
              "nft_reject_inet"):
        subprocess.run(["modprobe", m], capture_output=True)
    for k, v in (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1"),
                 ("net.ipv4.vs.conntrack", "1"), ("net.ipv4.conf.all.rp_filter", "0")):
        sh("sysctl", "-qw", f"{k}={v}")
    sh("ip", "link", "set", "lo", "up")
    for name in NS:
        n = LINKS[name]
        sh("ip", "netns", "add", ns(name))
        nsexec(name, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"n-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns(name))
        sh("ip", "link", "set", f"n-{name}", "up")
        sh("ip", "addr", "add", f"198.18.{n}.1/24", "dev", f"n-{name}")
        sh("ip", "addr", "add", f"2001:2:0:{n}::1/64", "dev", f"n-{name}", "nodad")
        nsexec(name, "ip", "link", "set", "eth0", "up")
        nsexec(name, "ip", "addr", "add", f"198.18.{n}.2/24", "dev", "eth0")
        nsexec(name, "ip", "addr", "add", f"2001:2:0:{n}::2/64", "dev", "eth0", "nodad")
        if name != "ep":  # the remote endpoint's replies reach only its own link
            nsexec(name, "ip", "route", "add", "default", "via", f"198.18.{n}.1")
            nsexec(name, "ip", "-6", "route", "add", "default", "via", f"2001:2:0:{n}::1")
    sh("ip", "link", "add", DUMMY, "type", "dummy")
    sh("ip", "link", "set", DUMMY, "up")
    for a in (f"{VIP4}/32", f"{LB4}/32"):
        sh("ip", "addr", "add", a, "dev", DUMMY)
    sh("ip", "addr", "add", f"{VIP6}/128", "dev", DUMMY, "nodad")
    ipvsadm("-C")
    for server in desired().services.values():
        vip = hp(server.key.address, server.key.port)
        ipvsadm("-A", "-t", vip, "-s", "rr")
        for r in server.reals:
            ipvsadm("-a", "-t", vip, "-r", hp(r.address, r.port), "-m")
    servers = [tcp_server("ep", 8080, "ep"), tcp_server("pod", 8080, "pod"), tcp_server(None, 2222, "node")]
    time.sleep(1)  # addresses settle
    try:
        yield
    finally:
        for s in servers:
            s.close()
        ipvsadm("-C")
        subprocess.run(["nft", "delete", "table", FAMILY, TABLE], capture_output=True)
        sh("ip", "link", "del", DUMMY, check=False)
        for name in NS:
            sh("ip", "link", "del", f"n-{name}", check=False)
            sh("ip", "netns", "del", ns(name), check=False)


def firewall(cidrs: str = PODS, masquerade_all: bool = False) -> Firewall:
    return Firewall(AgentConfig(node_name="node", cluster_cidrs=parse_cidrs(cidrs), masquerade_all=masquerade_all,
                                nftables=True))


@pytest.fixture
def clean(topology: None) -> Iterator[None]:
    subprocess.run(["nft", "delete", "table", FAMILY, TABLE], capture_output=True)
    yield
    subprocess.run(["nft", "delete", "table", FAMILY, TABLE], capture_output=True)


def test_nodeport_to_remote_endpoint_needs_the_masquerade(clean: None) -> None:
    assert fetch("c1", NODE4, 30080) == "timeout"  # IPVS alone: ep cannot answer c1
    assert fetch("c1", NODE6, 30080) == "timeout"
    fw = firewall()
    assert fw.sync_state(desired()) > 0
    print("\nnft ruleset after the first sync:\n" + sh("nft", "list", "table", FAMILY, TABLE))
    assert fetch("c1", NODE4, 30080) == "ep"
    assert fetch("c1", NODE6, 30080) == "ep"
    assert fetch("c1", NODE4, 30081) == "timeout"  # traffic policy Local: client address kept
    # the client inside the cluster CIDRs: not masqueraded, no answer again
    fw2 = firewall("198.18.0.0/15,2001:2::/48")
    assert fw2.sync_state(desired()) > 0
    assert fetch("c1", NODE4, 30080) == "timeout"
    assert fetch("c1", NODE6, 30080) == "timeout"
    # --masquerade-all
    fw3 = firewall("198.18.0.0/15", masquerade_all=True)
    assert fw3.sync_state(desired()) > 0
    assert fetch("c1", NODE4, 30080) == "ep"
    assert fetch("c1", NODE6, 30080) == "ep"
    assert fw3.cleanup() is True
    assert fetch("c1", NODE4, 30080) == "timeout"


def test_hairpin(clean: None) -> None:
    assert fetch("pod", VIP4, 80) == "timeout"  # lands on itself with its own source: martian
    print(f"\nhairpin without the firewall: v6 -> {fetch('pod', VIP6, 80)}")
    fw = firewall()
    fw.sync_state(desired())
    assert fetch("pod", VIP4, 80) == "pod"
    assert fetch("pod", VIP6, 80) == "pod"
    assert fetch("c1", VIP4, 80) == "pod"  # not hairpin, still fine


def test_non_service_port_on_a_vip_is_refused(clean: None) -> None:
    assert fetch("c1", VIP4, 2222) == "node"  # without the filter the node's own socket answers
    assert fetch("c1", VIP6, 2222) == "node"
    firewall().sync_state(desired())
    assert fetch("c1", VIP4, 2222) == "refused"
    assert fetch("c1", VIP6, 2222) == "refused"
    assert fetch("c1", LB4, 2222) == "refused"
    assert fetch("c1", VIP4, 80) == "pod"  # the Service port works
    assert fetch("c1", NODE4, 2222) == "node"  # a node address is not a VIP: untouched


def test_load_balancer_source_ranges(clean: None) -> None:
    assert fetch("c2", LB4, 80) == "pod"  # no filter yet
    fw = firewall()
    fw.sync_state(desired())
    assert fetch("c1", LB4, 80) == "pod"  # 198.18.1.0/24 is allowed
    assert fetch("c2", LB4, 80) == "timeout"  # 198.18.2.2 is not: dropped
    assert fetch("c2", VIP4, 80) == "pod"  # the ClusterIP has no ranges
    # Incremental changes: ranges (an interval set) go through nft, the rest as one netlink batch
    lb = VSKey(AF_INET, 6, LB4, 80)
    wider = desired()
    wider.services[lb] = vs(LB4, 80, "LoadBalancer", [(POD4, 8080)], ranges=("198.18.1.0/24", "198.18.2.0/24"))
    netlink, tx = fw.netlink_transactions, fw.transactions
    assert fw.sync_state(wider, scope={lb}) > 0
    assert (fw.transactions, fw.netlink_transactions) == (tx + 1, netlink)
    assert fetch("c2", LB4, 80) == "pod"  # 198.18.2.2 allowed now
    open_lb = desired()
    open_lb.services[lb] = vs(LB4, 80, "LoadBalancer", [(POD4, 8080)])
    assert fw.sync_state(open_lb, scope={lb}) > 0  # no ranges: fw4 and fw_allow4 elements go
    back = desired()
    assert fw.sync_state(back, scope={lb}) > 0  # ranges again, narrow
    assert fetch("c2", LB4, 80) == "timeout"
    assert fw.elements() == fw.desired_elements(back)
    noranges = desired()
    del noranges.services[VSKey(AF_INET, 6, VIP4, 80)]  # a ClusterIP goes: no interval set touched
    assert fw.sync_state(noranges, scope={VSKey(AF_INET, 6, VIP4, 80)}) > 0
    assert fw.netlink_transactions == netlink + 1
    assert fw.elements() == fw.desired_elements(noranges)


def test_foreign_table_survives_sync_and_cleanup_and_restart_adopts(clean: None) -> None:
    sh("nft", "-f", "-", stdin=(
        "table inet keepme {\n chain c { type filter hook input priority 10; policy accept; counter; }\n}\n"
        "table ip keepnat {\n chain post { type nat hook postrouting priority 110; }\n}\n"))
    try:
        before = sh("nft", "list", "table", "inet", "keepme")
        fw = firewall()
        first = fw.sync_state(desired())
        assert first > 0
        assert fw.sync_state(desired()) == 0  # nothing changed: nothing sent
        want = fw.desired_elements(desired())
        assert {k: v for k, v in fw.elements().items()} == want
        # a restart: a new instance adopts the table and changes nothing
        t0 = time.monotonic()
        assert firewall().sync_state(desired()) == 0
        log.info("adoption took %.2fs", time.monotonic() - t0)
        # drift: an element removed by hand and a stale one added; a restart repairs just that
        sh("nft", "delete", "element", "inet", TABLE, "vips4", "{", VIP4, "}")
        sh("nft", "add", "element", "inet", TABLE, "vips4", "{", "198.18.100.99", "}")
        fw2 = firewall()
        assert fw2.sync_state(desired()) == 2
        assert fw2.elements()["vips4"] == {(VIP4,), (LB4,)}
        # one Service fewer: only its elements go
        less = desired()
        del less.services[VSKey(AF_INET, 6, NODE4, 30081)]
        assert fw2.sync_state(less) == 1  # services4 only (Local: never in a masquerade set)
        assert fetch("c1", NODE4, 30080) == "ep"
        assert table_exists("keepme") and table_exists("keepnat", "ip")
        assert fw2.cleanup() is True
        assert fw2.cleanup() is False
        assert not table_exists(TABLE)
        after = sh("nft", "list", "table", "inet", "keepme")
        assert before.split("counter")[0] == after.split("counter")[0]
        assert "counter packets" in after
        assert table_exists("keepnat", "ip")
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "keepme"], capture_output=True)
        subprocess.run(["nft", "delete", "table", "ip", "keepnat"], capture_output=True)


def test_sets_read_over_netlink_equal_the_nft_listing_and_full_syncs_repair_drift(clean: None) -> None:
    """The drift check reads set contents with its own netlink dump (nft's listing is
    far too slow at scale under emulation): every set, both families, intervals and
    concatenations included, must read back exactly as nft lists it."""
    from ipvsproxy.dataplane.nft import SETS
    from ipvsproxy.dataplane.nft_wire import NftWire

    fw = firewall(PODS + ",10.96.0.0/12")
    assert fw.sync_state(desired()) > 0
    listed = fw.elements()
    with NftWire() as wire:
        read = {s.name: wire.elements(FAMILY, TABLE, s.name, s.type, interval=s.interval, cidr=s.cidr) for s in SETS}
    assert read == {s.name: listed.get(s.name, set()) for s in SETS}
    assert read == fw.desired_elements(desired())
    assert read["fw_allow4"] and read["cluster4"] and read["cluster6"] and read["hairpin6"]  # all shapes present
    sh("nft", "delete", "element", "inet", TABLE, "vips4", "{", VIP4, "}")
    reads = fw.reads
    assert fw.sync_state(desired(), scope=set()) == 0  # incremental: trusts its memory, reads nothing
    assert fw.reads == reads
    assert fw.sync_state(desired()) == 1  # the periodic full sync: reads over netlink, repairs
    assert fw.reads == reads + 1 and fw.elements()["vips4"] == {(VIP4,), (LB4,)}
    # drift an incremental change must not trip on: an element it deletes is already gone
    sh("nft", "delete", "element", "inet", TABLE, "services4", "{", f"{VIP4} . tcp . 80", "}")
    less = desired()
    del less.services[VSKey(AF_INET, 6, VIP4, 80)]
    netlink = fw.netlink_transactions
    assert fw.sync_state(less, scope={VSKey(AF_INET, 6, VIP4, 80)}) > 0  # add + delete: accepted
    assert fw.reads == reads + 1
    assert fw.netlink_transactions == netlink + 1  # element changes alone: one batch over netlink
    assert fw.elements() == fw.desired_elements(less)
    subprocess.run(["nft", "delete", "table", FAMILY, TABLE], capture_output=True, check=True)
    with pytest.raises(NftError):  # the table went behind our back: an incremental change is refused ...
        fw.sync_state(desired(), scope={VSKey(AF_INET, 6, VIP4, 80)})
    assert fw.reads == reads + 1
    assert fw.sync({}) > 0  # ... and the next sync reads the table (none) and rebuilds it
    assert fw.reads == reads + 2
    assert fw.elements() == fw.desired_elements(desired())


def test_the_rolling_check_reads_a_few_pages_a_step_over_netlink_and_repairs_only_drift(clean: None) -> None:
    """--resync rolling: the companion's drift check reads one set at a time, a netlink page or so a
    step (on a socket of its own, while changes go out as usual), and repairs what changed behind
    its back, not what it changed itself while a set was being read."""
    def many(n: int, start: int = 0) -> list[VirtualServer]:
        return [vs(f"10.97.{i // 250}.{i % 250 + 1}", 80, "ClusterIP",
                   [(f"198.18.3.{i % 200 + 1}", 8000 + k) for k in range(3)]) for i in range(start, start + n)]

    solo = vs("10.97.9.1", 80, "ClusterIP", [("198.18.4.100", 6000)])  # its hairpin element its own
    servers = [solo, *many(600)]
    want = DesiredState.of(servers, {v.key.address for v in servers})
    fw = firewall()
    assert fw.sync_state(want) > 0
    reads = fw.reads
    sh("nft", "delete", "element", "inet", TABLE, "services4", "{", "10.97.1.7 . tcp . 80", "}")
    sh("nft", "add", "element", "inet", TABLE, "hairpin4", "{", "198.18.3.9 . tcp . 9999 . 198.18.3.9", "}")
    sh("nft", "delete", "element", "inet", TABLE, "vips4", "{", "10.97.2.1", "}")
    steps, repaired, changed = 0, 0, False
    checks = fw.checks
    while fw.checks == checks:
        repaired += fw.check_step(50)
        steps += 1
        if not changed and fw.checking == "hairpin4":  # its first page read (50 a step), the rest not
            # a change while hairpin4 is half read: one Service more, one less, each with hairpin
            # elements of its own
            extra = vs("10.97.9.2", 80, "ClusterIP", [("198.18.4.1", 7000), ("198.18.4.2", 7000)])
            servers = [*servers, extra]
            fw.sync_state(DesiredState.of(servers, {v.key.address for v in servers}), scope={extra.key})
            servers.remove(solo)
            fw.sync_state(DesiredState.of(servers, {v.key.address for v in servers}), scope={solo.key})
            changed = True
        assert steps < 200
    want = DesiredState.of(servers, {v.key.address for v in servers})
    assert changed and repaired == 3  # the drift, and nothing of what it changed itself meanwhile
    assert steps >= 8  # sets of 600 to 1,200 elements, 50 a step: a netlink page a step, never a whole set
    assert fw.reads == reads  # no whole-table read
    assert fw.elements() == fw.desired_elements(want)
    wire = fw._netlink()  # what the check asks when a set changed under its read: is this element there?
    assert wire is not None and wire.present(FAMILY, TABLE, "hairpin4", ("ipv4_addr", "inet_proto", "inet_service",
                                                                         "ipv4_addr"),
                                             [("198.18.4.1", 6, 7000, "198.18.4.1"),
                                              ("198.18.4.100", 6, 6000, "198.18.4.100")]) == [True, False]


def test_companion_cost_with_the_real_nft_reads_nothing_on_the_change_path() -> None:
    """`ipvsproxy bench --nft-cost`: the companion alone, real nft, in its own network
    namespace: every change is one transaction and no read, and the table ends as wanted."""
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, nft and unshare (run inside the IPVS test VM)")
    from ipvsproxy.bench.nftcost import run_isolated

    result = run_isolated((1000,), changes=3, timeout=600)
    assert "skipped" not in result, result
    (one,) = result["sizes"]
    print(f"\nnftables companion at {one['elements']} elements: {one}")
    assert one["elements"] >= 950 and one["table_matches_desired"]
    assert one["change_reads"] == 0 and one["change_listings"] == 0
    assert one["change_transactions"] == 9  # one per change (3 x endpoint added, removed, Service added)
    assert one["change_netlink_transactions"] == 9  # each one nf_tables batch over netlink: nft not started
    assert one["drift_check_changes"] == 0 and one["adoption_changes"] == 0
