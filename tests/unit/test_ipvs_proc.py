"""/proc/net/ip_vs read as the whole table's real servers (dataplane/ipvs_proc.py), and
NetlinkDataplane.observe taking real servers from it: each virtual server the file does not
hold, or holds in lines that do not read, is dumped over netlink instead, and so is the whole
table when the file cannot be read. tests/kernel/test_ipvs_proc.py holds the same reading to
the real kernel's file, against the netlink dump of the same table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane import ipvs_proc
from ipvsproxy.dataplane.ipvs_wire import Dest, DestEntry, Stats, Svc, SvcEntry
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.model import AF_INET, AF_INET6, VSKey
from tests.unit.test_netlink_setup import FakeLinks

TCP, UDP, SCTP = 6, 17, 132

# As ip_vs_info_seq_show prints it (net/netfilter/ipvs/ip_vs_ctl.c), its printf formats below:
# three header lines, IPv4 in hex, IPv6 with %pI6 (eight groups, leading zeros), ports in hex,
# "ops " and "persistent <timeout> <netmask>" after the scheduler, a firewall-mark service as FWM.


def svc(proto: str, addr: str, port: int, sched: str, flags: str = "") -> str:
    return f"{proto}  {addr}:{port:04X} {sched} {flags}"  # ends in a space, as the kernel's does


def real(addr: str, port: int, fwd: str, weight: int, active: int, inactive: int) -> str:
    return f"  -> {addr}:{port:04X}      {fwd:<7} {weight:<6} {active:<10} {inactive:<10}"


V6_VIP, V6_REAL = "[2001:0db8:0000:0000:0000:0000:0000:0001]", "[2001:0db8:0000:0000:0000:0000:0001:0002]"
SAMPLE = "\n".join([
    "IP Virtual Server version 1.2.1 (size=4096)",
    "Prot LocalAddress:Port Scheduler Flags",
    "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn",
    svc("TCP", "0A600001", 80, "rr"),
    real("0A000102", 8080, "Masq", 1, 3, 7),
    real("0A000103", 8080, "Masq", 0, 0, 12),
    svc("UDP", "0A60000A", 53, "rr", "ops "),
    real("0A000104", 53, "Masq", 1, 0, 0),
    svc("TCP", "C0A80101", 443, "sh", "persistent 10800 FFFFFFFF"),
    real("0A000105", 443, "Route", 5, 1, 0),
    svc("SCTP", "0A60000B", 2905, "lc"),
    svc("TCP", V6_VIP, 80, "rr"),
    real(V6_REAL, 8080, "Masq", 1, 0, 0),
    "FWM  00000010 rr ",
    real("0A000106", 80, "Masq", 1, 0, 0),
]) + "\n"


def rows(table: dict[VSKey, ipvs_proc.Reals]) -> dict[tuple[int, int, str, int], list[tuple[str, int, int, int, int]]]:
    """Each virtual server's real servers as (address, port, weight, active, inactive), in order."""
    assert all(k == (r.address, r.port) for reals in table.values() for k, r in reals.items())
    return {(k.family, k.protocol, k.address, k.port): [(r.address, r.port, r.weight, r.active, r.inactive)
                                                        for r in reals.values()]
            for k, reals in table.items()}


def test_parse_reads_every_virtual_servers_real_servers() -> None:
    table = ipvs_proc.parse(SAMPLE.splitlines())
    assert all(dict(r.stats) == {} for reals in table.values() for r in reals.values())  # no counters here
    assert rows(table) == {
        (AF_INET, TCP, "10.96.0.1", 80): [("10.0.1.2", 8080, 1, 3, 7), ("10.0.1.3", 8080, 0, 0, 12)],
        (AF_INET, UDP, "10.96.0.10", 53): [("10.0.1.4", 53, 1, 0, 0)],
        (AF_INET, TCP, "192.168.1.1", 443): [("10.0.1.5", 443, 5, 1, 0)],
        (AF_INET, SCTP, "10.96.0.11", 2905): [],  # no real servers: an empty list, not absent
        (AF_INET6, TCP, "2001:db8::1", 80): [("2001:db8::1:2", 8080, 1, 0, 0)],  # canonical spelling
    }  # the firewall-mark service (and its real server) is not a VSKey: left out


def test_keys_equal_the_dataplanes_keys() -> None:
    table = ipvs_proc.parse(SAMPLE.splitlines())
    assert VSKey(AF_INET6, TCP, "2001:db8::1", 80) in table
    assert all(type(k) is VSKey and type(k.family) is int and type(k.protocol) is int for k in table)


@pytest.mark.parametrize("bad", [
    "  -> 0A00010:1F90      Masq    1      0          0",      # seven hex digits
    "  -> 0A000102:1F90      Masq    x      0          0",     # weight not a number
    "  -> 0A000102:1F90      Masq    1      0",                # a column short
    "  -> [2001:db8::zz]:1F90      Masq    1      0          0",  # not an IPv6 address
])
def test_a_virtual_server_with_a_line_that_does_not_read_is_left_out(bad: str) -> None:
    lines = [svc("TCP", "0A600001", 80, "rr"), real("0A000102", 8080, "Masq", 1, 0, 0), bad,
             real("0A000103", 8080, "Masq", 1, 0, 0), svc("TCP", "0A600002", 80, "rr"),
             real("0A000104", 8080, "Masq", 1, 0, 0)]
    table = ipvs_proc.parse(lines)
    assert rows(table) == {(AF_INET, TCP, "10.96.0.2", 80): [("10.0.1.4", 8080, 1, 0, 0)]}


def test_unknown_protocols_and_unreadable_service_lines_are_skipped_with_their_reals() -> None:
    lines = [svc("ICMP", "0A600001", 0, "rr"), real("0A000102", 0, "Masq", 1, 0, 0),
             "TCP  nonsense rr ", real("0A000103", 8080, "Masq", 1, 0, 0),
             svc("UDP", "0A600003", 53, "rr"), real("0A000104", 53, "Masq", 1, 0, 0)]
    assert rows(ipvs_proc.parse(lines)) == {(AF_INET, UDP, "10.96.0.3", 53): [("10.0.1.4", 53, 1, 0, 0)]}


def test_read_streams_a_file_larger_than_one_read(tmp_path: Path) -> None:
    lines = ["IP Virtual Server version 1.2.1 (size=4096)"]
    for s in range(3000):
        lines.append(svc("TCP", f"{0x0A600000 + s:08X}", 80, "rr"))
        lines += [real(f"{0x0A000000 + s * 10 + d:08X}", 8080, "Masq", 1, 0, 0) for d in range(10)]
    path = tmp_path / "ip_vs"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > ipvs_proc.READ_SIZE  # more than one read
    table = rows(ipvs_proc.read(str(path)))
    assert len(table) == 3000 and sum(map(len, table.values())) == 30000
    assert table[(AF_INET, TCP, "10.96.11.183", 80)][-1] == ("10.0.117.47", 8080, 1, 0, 0)  # 2999 * 10 + 9


# ---- NetlinkDataplane.observe with real servers from the file ------------------------------------
STATS = Stats(5, 6, 7, 8, 9, 0, 0, 0, 0, 0)


class TableWire:
    """The IPVS wire's read side over a fixed table: a services dump, a dests dump per service,
    and the whole table; counts the dests dumps."""

    def __init__(self, table: dict[Svc, list[DestEntry]]) -> None:
        self.table_ = table
        self.dests_dumped: list[Svc] = []

    def services(self) -> list[SvcEntry]:
        return [SvcEntry(s, STATS) for s in self.table_]

    def dests(self, svc: Svc) -> list[DestEntry]:
        self.dests_dumped.append(svc)
        return self.table_.get(svc, [])

    def table(self) -> list[tuple[SvcEntry, list[DestEntry]]]:
        return [(e, self.dests(e.svc)) for e in self.services()]

    def close(self) -> None:
        pass


SVC_A = Svc(AF_INET, TCP, "10.96.0.1", 80, "rr")
SVC_B = Svc(AF_INET, UDP, "10.96.0.10", 53, "rr")
KERNEL = {SVC_A: [DestEntry(Dest("10.0.1.2", 8080, 1), 3, 7, 0, STATS),
                  DestEntry(Dest("10.0.1.3", 8080, 0), 0, 12, 0, STATS)],
          SVC_B: [DestEntry(Dest("10.0.1.4", 53, 1), 0, 0, 0, STATS)]}


def observing(proc: Any, real_counters: bool = False) -> tuple[NetlinkDataplane, TableWire]:
    wire = TableWire(KERNEL)
    dp = NetlinkDataplane(AgentConfig(node_name="n"), links=FakeLinks(), wire=wire,  # type: ignore[arg-type]
                          addr=object(), conntrack=object(), real_counters=real_counters,  # type: ignore[arg-type]
                          proc_table=proc)
    return dp, wire


def reals(state: Any, svc: Svc) -> dict[tuple[str, int], tuple[int, int, int]]:
    vs = state.services[VSKey(svc.family, svc.protocol, svc.address, svc.port)]
    return {k: (r.weight, r.active, r.inactive) for k, r in vs.reals.items()}


def test_observe_takes_real_servers_from_the_file_and_settings_from_netlink() -> None:
    dp, wire = observing(lambda: ipvs_proc.parse(SAMPLE.splitlines()))
    state = dp.observe()
    assert wire.dests_dumped == []  # no dests dump at all
    assert reals(state, SVC_A) == {("10.0.1.2", 8080): (1, 3, 7), ("10.0.1.3", 8080): (0, 0, 12)}
    assert reals(state, SVC_B) == {("10.0.1.4", 53): (1, 0, 0)}
    vs = state.services[VSKey(AF_INET, TCP, "10.96.0.1", 80)]
    assert vs.scheduler == "rr" and vs.stats["conns"] == 5  # the service's own counters: netlink's
    assert all(dict(r.stats) == {} for r in vs.reals.values())  # a real server's: not read
    assert set(state.services) == {VSKey(AF_INET, TCP, "10.96.0.1", 80), VSKey(AF_INET, UDP, "10.96.0.10", 53)}


def test_a_virtual_server_the_file_lacks_is_dumped_over_netlink() -> None:
    only_a = {k: v for k, v in ipvs_proc.parse(SAMPLE.splitlines()).items() if k[1] == TCP}
    dp, wire = observing(lambda: only_a)
    state = dp.observe()
    assert wire.dests_dumped == [SVC_B]  # added after the file was read, or its lines were bad
    assert reals(state, SVC_B) == {("10.0.1.4", 53): (1, 0, 0)}
    assert reals(state, SVC_A) == {("10.0.1.2", 8080): (1, 3, 7), ("10.0.1.3", 8080): (0, 0, 12)}


def test_an_unreadable_file_means_netlink_for_everything_said_once(caplog: pytest.LogCaptureFixture) -> None:
    def unreadable() -> dict[Any, Any]:
        raise FileNotFoundError(2, "No such file or directory")

    dp, wire = observing(unreadable)
    with caplog.at_level(logging.INFO, logger="ipvsproxy.dataplane.netlink"):
        first, second = dp.observe(), dp.observe()
    assert wire.dests_dumped == [SVC_A, SVC_B, SVC_A, SVC_B]
    assert first == second and reals(first, SVC_A)[("10.0.1.2", 8080)] == (1, 3, 7)
    said = [r.getMessage() for r in caplog.records if "/proc/net/ip_vs" in r.getMessage()]
    assert len(said) == 1 and "over netlink" in said[0]


def test_real_counters_reads_every_real_server_over_netlink() -> None:
    read: list[int] = []

    def proc() -> dict[Any, Any]:
        read.append(1)
        return {}

    dp, wire = observing(proc, real_counters=True)
    state = dp.observe()
    assert read == [] and wire.dests_dumped == [SVC_A, SVC_B]  # `list --stats`: the counters of each
    assert state.services[VSKey(AF_INET, TCP, "10.96.0.1", 80)].reals[("10.0.1.2", 8080)].stats["conns"] == 5
