"""The conntrack cleanup against the VM's real conntrack table, both address families.

Entries are inserted through ctnetlink (what `conntrack -I` does): NAT'd flows
client -> VIP:53 whose replies come from real servers, as IPVS with conntrack=1
leaves them. `conntrack -L` (the conntrack tool, an independent reader) counts
what is left. This is where the kernel's dump filters are proven: an IPv4 filter
on addresses and ports must return exactly the matching entries, and an IPv6
one is never asked for addresses (Debian's 6.1 kernel inverts them), so IPv6
deletes only the removed real server's entries too. Then the netlink dataplane
itself: a sync that deletes a UDP real server and one that deletes a UDP
virtual server hand the cleanup to the background worker.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.conntrack import ConntrackCleaner, Removal
from ipvsproxy.dataplane.ct_wire import ConntrackWire, Flow
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.model import AF_INET, AF_INET6, Real, VirtualServer, VSKey
from ipvsproxy.plan import Op, OpKind

pytestmark = pytest.mark.kernel

UDP = 17
V4 = {"vip": "198.18.70.53", "other_vip": "198.18.70.54", "client": "198.18.71.{}", "real": "198.18.72.{}"}
V6 = {"vip": "2001:2:0:70::53", "other_vip": "2001:2:0:70::54", "client": "2001:2:0:71::{:x}",
      "real": "2001:2:0:72::{:x}"}


def pton(a: str) -> bytes:
    return socket.inet_pton(AF_INET6 if ":" in a else AF_INET, a)


def flows(family: int, names: dict[str, str], vip: str, reals: range, per_real: int) -> list[Flow]:
    return [Flow(family, UDP, pton(names["client"].format(c + 1)), pton(vip), 20000 + r * 100 + c, 53,
                 pton(names["real"].format(r)), 5353)
            for r in reals for c in range(per_real)]


def listed(family: str, vip: str, real: str | None = None) -> int:
    """Entries `conntrack -L` shows to vip:53 (replies from `real`, when given)."""
    args = ["conntrack", "-L", "-f", family, "-p", "udp", "--orig-dst", vip, "--dport", "53"]
    if real is not None:
        args += ["--reply-src", real]
    res = subprocess.run(args, capture_output=True, text=True)
    return sum(1 for line in res.stdout.splitlines() if line.startswith("udp"))


@pytest.fixture
def wire() -> Iterator[ConntrackWire]:
    subprocess.run(["modprobe", "nf_conntrack_netlink"], capture_output=True)
    w = ConntrackWire()
    try:
        yield w
    finally:
        for fam in ("ipv4", "ipv6"):
            for vip in (V4["vip"], V4["other_vip"], V6["vip"], V6["other_vip"]):
                if (fam == "ipv6") == (":" in vip):
                    subprocess.run(["conntrack", "-D", "-f", fam, "--orig-dst", vip], capture_output=True)
        w.close()


@pytest.mark.parametrize("family,names,fam", [(AF_INET, V4, "ipv4"), (AF_INET6, V6, "ipv6")])
def test_one_pass_deletes_exactly_the_removed_real_servers_entries(wire: ConntrackWire, family: int,
                                                                    names: dict[str, str], fam: str) -> None:
    # the other VIP's flows answer from other real servers (a reply tuple is unique in the table too)
    table = flows(family, names, names["vip"], range(1, 7), 5) + flows(family, names, names["other_vip"],
                                                                       range(51, 53), 5)
    assert [e for e in wire.create(table) if e is not None] == []
    assert listed(fam, names["vip"]) == 30 and listed(fam, names["other_vip"]) == 10
    key = VSKey(family, UDP, names["vip"], 53)
    # one removed real server: the narrowest filter the family allows
    cleaner = ConntrackCleaner()
    try:
        assert cleaner.flush([Removal(key, Real(names["real"].format(1), 5353, 0))]) == 5
        if family == AF_INET:
            assert cleaner.stats.scanned == 5  # the kernel returned only the doomed entries
        assert listed(fam, names["vip"], names["real"].format(1)) == 0
        assert listed(fam, names["vip"]) == 25 and listed(fam, names["other_vip"]) == 10
        # three more at once: one dump
        dumps = cleaner.stats.dumps
        gone = [Removal(key, Real(names["real"].format(r), 5353, 0)) for r in (2, 3, 4)]
        assert cleaner.flush(gone) == 15 and cleaner.stats.dumps == dumps + 1
        assert listed(fam, names["vip"]) == 10
        assert listed(fam, names["vip"], names["real"].format(5)) == 5  # kept real servers keep theirs
        # the Service itself deleted: everything to its VIP:port, nothing else
        assert cleaner.flush([Removal(key)]) == 10
        assert listed(fam, names["vip"]) == 0 and listed(fam, names["other_vip"]) == 10
    finally:
        cleaner.close()


def test_the_dataplane_hands_udp_removals_to_the_worker(wire: ConntrackWire, tmp_path: object) -> None:
    cfg = AgentConfig(node_name="ct-node", interface="ipvsct0", healthz_bind_address="", metrics_bind_address="")
    dp = NetlinkDataplane(cfg)
    key = VSKey(AF_INET, UDP, V4["vip"], 53)
    vs = VirtualServer(key, "rr")
    r1, r2 = (Real(V4["real"].format(i), 5353, 1) for i in (1, 2))
    try:
        assert dp.apply([Op(OpKind.ADD_VS, key, vs=vs), Op(OpKind.ADD_RS, key, real=r1),
                         Op(OpKind.ADD_RS, key, real=r2)]) == []
        assert [e for e in wire.create(flows(AF_INET, V4, V4["vip"], range(1, 3), 4)) if e is not None] == []
        assert listed("ipv4", V4["vip"]) == 8
        assert dp.apply([Op(OpKind.DEL_RS, key, real=r1)]) == []
        assert dp.conntrack.wait_idle(60)
        assert listed("ipv4", V4["vip"], r1.address) == 0 and listed("ipv4", V4["vip"], r2.address) == 4
        assert dp.apply([Op(OpKind.DEL_VS, key)]) == []  # the UDP Service IP goes: its flows too
        assert dp.conntrack.wait_idle(60)
        assert listed("ipv4", V4["vip"]) == 0
        assert dp.conntrack.stats.errors == 0 and dp.conntrack.stats.passes == 2
    finally:
        dp.apply([Op(OpKind.DEL_VS, key)])
        dp.remove_interface()
        dp.close()
