"""The netlink dataplane proven with real traffic (inside the IPVS test VM).

One network for the module (module_netlab): three backends (HTTP on 8080, UDP
echo on 5353, each answering its own name) and six clients, each in its own
namespace; the VM's root namespace is the node. The test writes manifests with
those addresses and runs ipvsproxy on them, then checks the kernel table with
`ipvsadm` and sends traffic. Addresses only in 198.18.0.0/15 and 2001:2::/48:

    dp/web         ClusterIP 198.18.10.1 + 2001:2:0:10::1, NodePort (TCP 80/30080, UDP 53/30053), rr
    dp/web-lc      198.18.10.2:80 lc
    dp/web-sh      198.18.10.3:80 sh, sh-fallback
    dp/web-sticky  198.18.10.4:80 rr, sessionAffinity ClientIP (60 s)
    dp/extra       198.18.10.5:80 (only while the diff test adds it)
    node addresses the root side of client 0's link (NodePorts; never bound on ipvsproxy0)
    foreign        198.18.20.1:80 made with ipvsadm: must survive every sync

Tests share the kernel state and run in file order; each one that changes the
manifests puts the base back.
"""

from __future__ import annotations

import collections
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns import Backend, Client, Netlab, hold_tcp, http_get, udp_ask, wait_until
from proxylab import (
    READY,
    TERMINATING,
    agent_config,
    bound,
    endpoint_slice,
    hostport,
    ipvsadm,
    node,
    op_counts,
    reals,
    rules,
    run_cli,
    service,
    sync,
    write_manifests,
)

from ipvsproxy.config import AgentConfig
from ipvsproxy.reconcile import SyncReport

pytestmark = pytest.mark.kernel

NODE, NS, DEV = "dp-node", "dp", "ipvsproxy0"
WEB4, WEB6 = "198.18.10.1", "2001:2:0:10::1"
LC, SH, STICKY, EXTRA = "198.18.10.2", "198.18.10.3", "198.18.10.4", "198.18.10.5"
FOREIGN = "198.18.20.1"
HTTP_NP, DNS_NP, AFFINITY = 30080, 30053, 60
SCHED = "ipvsproxy.io/scheduler"
FLAGS = "ipvsproxy.io/scheduler-flags"


@dataclass
class Lab:
    netlab: Netlab
    backends: list[Backend]
    clients: list[Client]
    manifests: Path
    cfg: AgentConfig
    foreign: set[str]

    @property
    def node4(self) -> str:
        return self.clients[0].gw4

    @property
    def node6(self) -> str:
        return self.clients[0].gw6

    def objects(self, *, lc_scheduler: str = "lc", sticky_backends: int = 3, sh_terminating: str | None = None,
                extra: bool = False) -> list[dict[str, Any]]:
        """The cluster as manifests; keyword arguments are the changes the tests make."""
        bs = self.backends
        http = {"name": "http", "protocol": "TCP", "port": 8080}

        def eps(family: str, members: list[Backend], terminating: str | None = None
                ) -> list[tuple[str, str, dict[str, bool]]]:
            return [(b.ipv6 if family == "IPv6" else b.ipv4, b.name, TERMINATING if b.name == terminating else READY)
                    for b in members]

        def simple(name: str, vip: str, members: list[Backend], terminating: str | None = None,
                   **kw: Any) -> list[dict[str, Any]]:
            return [service(NS, name, [vip], [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                            **kw),
                    endpoint_slice(NS, name, "v4", "IPv4", eps("IPv4", members, terminating), [http], NODE)]

        web_ports = [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "http", "nodePort": HTTP_NP},
                     {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353, "nodePort": DNS_NP}]
        slice_ports = [http, {"name": "dns", "protocol": "UDP", "port": 5353}]
        objs = [node(NODE, [self.node4, self.node6]),
                service(NS, "web", [WEB4, WEB6], web_ports, type="NodePort"),
                endpoint_slice(NS, "web", "v4", "IPv4", eps("IPv4", bs), slice_ports, NODE),
                endpoint_slice(NS, "web", "v6", "IPv6", eps("IPv6", bs), slice_ports, NODE)]
        objs += simple("web-lc", LC, bs, annotations={SCHED: lc_scheduler})
        objs += simple("web-sh", SH, bs, sh_terminating, annotations={SCHED: "sh", FLAGS: "sh-fallback"})
        objs += simple("web-sticky", STICKY, bs[:sticky_backends], affinity=AFFINITY)
        if extra:
            objs += simple("extra", EXTRA, bs[:2])
        return objs

    def apply(self, **changes: Any) -> SyncReport:
        """Write the manifests and sync once (a fresh agent, like `run --once`)."""
        write_manifests(self.manifests, self.objects(**changes))
        report = sync(self.cfg)
        assert not report.failures
        self.check_foreign()
        return report

    def check_foreign(self) -> None:
        have = rules()
        assert self.foreign <= have, f"foreign virtual server changed:\n{sorted(have)}"

    def expected_rules(self) -> set[str]:
        """`ipvsadm -Sn` lines for the base manifests (the ownership mark shows as flag-3)."""
        out: set[str] = set()

        def vs(flag: str, vip: str, port: int, sched: str, target: int, v6: bool = False, extra: str = "",
               members: list[Backend] | None = None) -> None:
            out.add(f"-A {flag} {hostport(vip, port)} -s {sched}{extra}")
            for b in members or self.backends:
                out.add(f"-a {flag} {hostport(vip, port)} -r {hostport(b.ipv6 if v6 else b.ipv4, target)} -m -w 1")

        for addr, v6 in ((WEB4, False), (WEB6, True), (self.node4, False), (self.node6, True)):
            np = addr in (self.node4, self.node6)
            vs("-t", addr, HTTP_NP if np else 80, "rr", 8080, v6, " -b flag-3")
            vs("-u", addr, DNS_NP if np else 53, "rr", 5353, v6, " -b flag-3")
        vs("-t", LC, 80, "lc", 8080, extra=" -b flag-3")
        # ipvsadm names only sh's own flags for sh (the kernel holds flag-3 too: a re-sync changes nothing)
        vs("-t", SH, 80, "sh", 8080, extra=" -b sh-fallback")
        vs("-t", STICKY, 80, "rr", 8080, extra=f" -p {AFFINITY} -b flag-3")
        return out


@pytest.fixture(scope="module")
def lab(module_netlab: Netlab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    bs = module_netlab.backends(3, names=["web-a", "web-b", "web-c"])
    cs = module_netlab.clients(6)
    base = tmp_path_factory.mktemp("dataplane")
    ipvsadm("-A", "-t", f"{FOREIGN}:80", "-s", "wlc")
    ipvsadm("-a", "-t", f"{FOREIGN}:80", "-r", f"{bs[0].ipv4}:8080", "-m", "-w", "3")
    foreign = {f"-A -t {FOREIGN}:80 -s wlc", f"-a -t {FOREIGN}:80 -r {bs[0].ipv4}:8080 -m -w 3"}
    assert foreign <= rules()
    cfg = agent_config(NODE, base / "manifests", base / "state")
    lab = Lab(module_netlab, bs, cs, base / "manifests", cfg, foreign)
    try:
        yield lab
    finally:
        run_cli("cleanup", "--interface", DEV)
        ipvsadm("-D", "-t", f"{FOREIGN}:80")


def owned_rules(lab: Lab) -> set[str]:
    return rules() - lab.foreign


# ---- programming ---------------------------------------------------------------------------------

def test_run_once_programs_the_table(lab: Lab) -> None:
    write_manifests(lab.manifests, lab.objects())
    res = run_cli("run", "--from-file", str(lab.manifests), "--once", "--node-name", NODE,
                  "--state-dir", lab.cfg.state_dir, "--interface", DEV)
    assert res.exit_code == 0, res.output
    # 11 virtual servers x 3 real servers, 5 addresses bound
    assert "synced: 49 operations (33 add-rs, 11 add-vs, 5 bind)" in res.output, res.output
    assert owned_rules(lab) == lab.expected_rules()
    lab.check_foreign()
    # Service addresses on the dummy interface; node addresses (NodePorts) stay where they are
    assert bound(DEV) == {WEB4, WEB6, LC, SH, STICKY}
    assert lab.node4 in bound(lab.clients[0].host_if)
    # the same manifests again: nothing to do
    assert lab.apply().ops == []


# ---- schedulers, with traffic ------------------------------------------------------------------

def test_rr_spreads_evenly_tcp_udp_ipv6_nodeport(lab: Lab) -> None:
    names = [b.name for b in lab.backends]
    c = lab.clients[0]
    assert collections.Counter(http_get(WEB4, 80) for _ in range(9)) == {n: 3 for n in names}
    assert collections.Counter(udp_ask(WEB4, 53) for _ in range(6)) == {n: 2 for n in names}
    assert collections.Counter(http_get(WEB6, 80) for _ in range(6)) == {n: 2 for n in names}
    assert collections.Counter(udp_ask(WEB6, 53) for _ in range(3)) == {n: 1 for n in names}
    # NodePorts on the node's address, from a client namespace
    assert collections.Counter(http_get(lab.node4, HTTP_NP, ns=c.ns) for _ in range(3)) == {n: 1 for n in names}
    assert collections.Counter(udp_ask(lab.node4, DNS_NP, ns=c.ns) for _ in range(3)) == {n: 1 for n in names}
    assert collections.Counter(http_get(lab.node6, HTTP_NP, ns=c.ns) for _ in range(3)) == {n: 1 for n in names}


def _no_active(vip: str, *but: str) -> bool:
    return all(active == 0 for rs, (_, active, _) in reals("-t", f"{vip}:80").items() if rs not in but)


def test_lc_sends_new_connections_away_from_held_ones(lab: Lab) -> None:
    by_name = {b.name: f"{b.ipv4}:8080" for b in lab.backends}
    names = set(by_name)
    with hold_tcp(LC, 80) as held:
        busy = held.backend
        assert reals("-t", f"{LC}:80")[by_name[busy]][1] == 1  # one active connection
        answers = []
        for _ in range(4):
            answers.append(http_get(LC, 80))
            wait_until(lambda: _no_active(LC, by_name[busy]), 10, what="short connections to turn inactive")
        assert busy not in answers and set(answers) == names - {busy}, answers
        with hold_tcp(LC, 80) as held2:
            assert held2.backend != busy
            last = names - {busy, held2.backend}
            answers = []
            for _ in range(3):
                answers.append(http_get(LC, 80))
                wait_until(lambda: _no_active(LC, by_name[busy], by_name[held2.backend]), 10)
            assert set(answers) == last, answers
            assert held.request() == busy and held2.request() == held2.backend


GOLDEN_RATIO_32 = 0x61C88647


def sh_bucket(addr: str, offset: int = 0) -> int:
    """The kernel's ip_vs_sh_hashkey (port 0: no sh-port): a bucket of 256."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        fold = int(ip)
    else:
        a, b, c, d = struct.unpack("!4I", ip.packed)
        fold = a ^ b ^ c ^ d
    return (offset + (((fold * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> 24)) & 0xFF


def sh_predict(order: list[str], client: str) -> str:
    """Which real server (in the kernel's list order, all weight 1) sh picks for a client address."""
    return order[sh_bucket(client) % len(order)]


def test_sh_pins_each_client_and_spreads_clients(lab: Lab) -> None:
    by_addr = {f"{b.ipv4}:8080": b.name for b in lab.backends}
    order = [by_addr[rs] for rs in reals("-t", f"{SH}:80")]
    seen = {}
    for c in lab.clients:
        answers = {http_get(SH, 80, ns=c.ns) for _ in range(3)}
        assert len(answers) == 1, f"{c.name} ({c.ipv4}) moved between backends: {answers}"
        seen[c.ipv4] = answers.pop()
    assert len(set(seen.values())) >= 2, f"all clients on one backend: {seen}"
    assert seen == {a: sh_predict(order, a) for a in seen}, (seen, order)


def test_sh_fallback_moves_a_client_off_a_draining_backend(lab: Lab) -> None:
    by_name = {b.name: f"{b.ipv4}:8080" for b in lab.backends}
    before = {c.name: http_get(SH, 80, ns=c.ns) for c in lab.clients}
    client = lab.clients[0]
    with hold_tcp(SH, 80, ns=client.ns) as held:
        victim = held.backend
        assert victim == before[client.name]
        # the pod behind `victim` terminates: its real server drains (weight 0) while a connection is open
        report = lab.apply(sh_terminating=victim)
        assert op_counts(report) == {"edit-rs": 1}, [str(op) for op in report.ops]
        assert reals("-t", f"{SH}:80")[by_name[victim]][:2] == (0, 1)
        moved = {http_get(SH, 80, ns=client.ns) for _ in range(3)}
        assert len(moved) == 1 and victim not in moved, moved  # sh-fallback: another backend, always the same
        for c in lab.clients[1:]:
            if before[c.name] != victim:
                assert http_get(SH, 80, ns=c.ns) == before[c.name]  # everyone else stays put
        assert held.request() == victim  # the drained backend still serves its open connection
    wait_until(lambda: reals("-t", f"{SH}:80")[by_name[victim]][1] == 0, 10, what="held connection to close")
    report = lab.apply(sh_terminating=victim)
    assert op_counts(report) == {"del-rs": 1}, [str(op) for op in report.ops]
    report = lab.apply()
    assert op_counts(report) == {"add-rs": 1}, [str(op) for op in report.ops]


def test_session_affinity_pins_a_client(lab: Lab) -> None:
    pinned = []
    for c in lab.clients[:3]:
        answers = {http_get(STICKY, 80, ns=c.ns) for _ in range(4)}
        assert len(answers) == 1, f"{c.name} was not pinned: {answers}"
        pinned.append(answers.pop())
    # rr still chooses the first backend for each new client: three clients, three backends
    assert sorted(pinned) == sorted(b.name for b in lab.backends)
    templates = ipvsadm("-Lnc")  # persistence templates: client address, port 0
    assert all(f"{c.ipv4}:0 " in templates for c in lab.clients[:3]), templates


# ---- incremental changes -----------------------------------------------------------------------

def test_resync_changes_only_the_difference(lab: Lab) -> None:
    web_rules = {r for r in owned_rules(lab) if f" {WEB4}:80 " in f"{r} "}
    with hold_tcp(WEB4, 80, ns=lab.clients[1].ns) as held:
        report = lab.apply(lc_scheduler="rr", sticky_backends=2, extra=True)
        assert op_counts(report) == {"bind": 1, "add-vs": 1, "add-rs": 2, "edit-vs": 1, "del-rs": 1}, \
            [str(op) for op in report.ops]
        assert {http_get(EXTRA, 80) for _ in range(2)} == {b.name for b in lab.backends[:2]}
        assert f"-A -t {LC}:80 -s rr -b flag-3" in rules()
        assert held.request() == held.backend

        report = lab.apply()
        assert op_counts(report) == {"unbind": 1, "del-vs": 1, "add-rs": 1, "edit-vs": 1}, \
            [str(op) for op in report.ops]
        assert lab.apply().ops == []
        assert owned_rules(lab) == lab.expected_rules()
        assert bound(DEV) == {WEB4, WEB6, LC, SH, STICKY}
        # the untouched virtual server and its connection never noticed
        assert {r for r in owned_rules(lab) if f" {WEB4}:80 " in f"{r} "} == web_rules
        assert held.request() == held.backend
        assert f"{lab.clients[1].ipv4}:{held.local[1]}" in ipvsadm("-Lnc")


def test_foreign_virtual_server_survives_and_cleanup_leaves_it(lab: Lab) -> None:
    lab.check_foreign()
    res = run_cli("cleanup", "--interface", DEV)
    assert res.exit_code == 0, res.output
    assert "left 1 foreign virtual servers" in res.output, res.output
    left = owned_rules(lab)
    assert not {r for r in left if "flag-3" in r} and not left & lab.expected_rules(), left
    assert not Path(f"/sys/class/net/{DEV}").exists()
