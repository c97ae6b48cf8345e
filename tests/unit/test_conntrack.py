"""The conntrack flush for removed UDP/SCTP real servers, against a fake ctnetlink socket that
speaks real pyroute2 messages (encoded and decoded, as the kernel's replies would be)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from ipvsproxy.dataplane.conntrack import ConntrackFlusher
from ipvsproxy.model import AF_INET, AF_INET6, Real, VSKey

UDP, SCTP = 17, 132


def entry(family: int, client: str, cport: int, vip: str, vport: int, rs: str, rport: int,
          proto: int = UDP) -> nfct_msg:
    """A conntrack entry as a dump returns it: client -> VIP, reply from the real server."""
    orig = NFCTAttrTuple(family=family, saddr=client, daddr=vip, proto=proto, sport=cport, dport=vport)
    reply = NFCTAttrTuple(family=family, saddr=rs, daddr=client, proto=proto, sport=rport, dport=cport)
    msg = nfct_msg.create_from(tuple_orig=orig, tuple_reply=reply)
    msg["nfgen_family"] = family
    msg.encode()
    out = nfct_msg(msg.data)
    out.decode()
    return out


class FakeCT:
    """Stands in for pyroute2.Conntrack(nfgen_family=family)."""

    def __init__(self, family: int, table: list[nfct_msg], fail_del: int = 0) -> None:
        self.family, self.table, self.fail_del = family, table, fail_del
        self.deleted: list[tuple[Any, ...]] = []
        self.dump_filters: list[NFCTAttrTuple] = []
        self.closed = False

    def dump(self, tuple_orig: NFCTAttrTuple) -> Iterator[nfct_msg]:
        assert tuple_orig.family == self.family  # an AF_INET request with an IPv6 tuple is EINVAL
        self.dump_filters.append(tuple_orig)
        yield from [m for m in self.table if m["nfgen_family"] == self.family]

    def entry(self, cmd: str, tuple_orig: NFCTAttrTuple) -> None:
        assert cmd == "del" and tuple_orig.family == self.family
        req = nfct_msg.create_from(tuple_orig=tuple_orig)  # must encode: every field present
        req.encode()
        if self.fail_del:
            raise NetlinkError(self.fail_del)
        t = tuple_orig
        self.deleted.append((t.saddr, t.daddr, t.proto, t.sport, t.dport))

    def close(self) -> None:
        self.closed = True


class Opener:
    def __init__(self, table: list[nfct_msg], fail_del: int = 0) -> None:
        self.table, self.fail_del = table, fail_del
        self.opened: list[FakeCT] = []

    def __call__(self, family: int) -> FakeCT:
        ct = FakeCT(family, self.table, self.fail_del)
        self.opened.append(ct)
        return ct


V4_TABLE = [
    entry(AF_INET, "198.19.128.6", 40000, "198.18.0.53", 53, "198.19.0.6", 5353),   # to the removed RS
    entry(AF_INET, "198.19.128.6", 40001, "198.18.0.53", 53, "198.19.0.10", 5353),  # another RS: kept
    entry(AF_INET, "198.19.128.6", 40002, "198.18.0.54", 53, "198.19.0.6", 5353),   # another VIP: kept
]
V6_TABLE = [
    entry(AF_INET6, "2001:2:0:c001::2", 40000, "2001:2::53", 53, "2001:2:0:b001::2", 5353),
    entry(AF_INET6, "2001:2:0:c001::2", 40001, "2001:2::53", 53, "2001:2:0:b002::2", 5353),
]


def test_ipv4_flush_deletes_only_flows_to_the_removed_real_server() -> None:
    opener = Opener(V4_TABLE)
    ct = ConntrackFlusher(opener)
    n = ct.flush(VSKey(AF_INET, UDP, "198.18.0.53", 53), Real("198.19.0.6", 5353, 0))
    assert n == 1
    (sock,) = opener.opened
    assert sock.family == AF_INET
    assert sock.deleted == [("198.19.128.6", "198.18.0.53", UDP, 40000, 53)]
    f = sock.dump_filters[0]  # never an address: the kernel's IPv6 address filter is unreliable
    assert (f.saddr, f.daddr, f.dport, f.proto) == (None, None, 53, UDP)


def test_ipv6_flush_uses_an_ipv6_request() -> None:
    opener = Opener(V4_TABLE + V6_TABLE)
    ct = ConntrackFlusher(opener)
    # an uncompressed spelling of the same addresses still matches
    n = ct.flush(VSKey(AF_INET6, UDP, "2001:2:0:0::53", 53), Real("2001:2:0:b001:0:0:0:2", 5353, 0))
    assert n == 1
    (sock,) = opener.opened
    assert sock.family == AF_INET6
    assert sock.deleted == [("2001:2:0:c001::2", "2001:2::53", UDP, 40000, 53)]


def test_one_socket_per_family_reused_across_removals_and_closed() -> None:
    opener = Opener(V4_TABLE + V6_TABLE)
    ct = ConntrackFlusher(opener)
    for _ in range(3):
        ct.flush(VSKey(AF_INET, UDP, "198.18.0.53", 53), Real("198.19.0.6", 5353, 0))
        ct.flush(VSKey(AF_INET6, UDP, "2001:2::53", 53), Real("2001:2:0:b001::2", 5353, 0))
    assert sorted(s.family for s in opener.opened) == [AF_INET, AF_INET6]
    ct.close()
    assert all(s.closed for s in opener.opened)


def test_sctp_entries_are_deleted_with_their_ports() -> None:
    table = [entry(AF_INET, "198.19.128.6", 40000, "198.18.0.80", 80, "198.19.0.6", 8080, SCTP),
             entry(AF_INET, "198.19.128.6", 40001, "198.18.0.80", 80, "198.19.0.6", 9090, SCTP)]
    opener = Opener(table)
    n = ConntrackFlusher(opener).flush(VSKey(AF_INET, SCTP, "198.18.0.80", 80), Real("198.19.0.6", 8080, 0))
    assert n == 1
    assert opener.opened[0].deleted == [("198.19.128.6", "198.18.0.80", SCTP, 40000, 80)]


def test_vanished_entry_is_fine_other_errors_reopen_the_socket() -> None:
    opener = Opener(V4_TABLE, fail_del=errno.ENOENT)
    ct = ConntrackFlusher(opener)
    assert ct.flush(VSKey(AF_INET, UDP, "198.18.0.53", 53), Real("198.19.0.6", 5353, 0)) == 0
    opener.fail_del = errno.EPERM
    ct = ConntrackFlusher(opener)
    with pytest.raises(NetlinkError):
        ct.flush(VSKey(AF_INET, UDP, "198.18.0.53", 53), Real("198.19.0.6", 5353, 0))
    assert opener.opened[-1].closed
    opener.fail_del = 0
    assert ct.flush(VSKey(AF_INET, UDP, "198.18.0.53", 53), Real("198.19.0.6", 5353, 0)) == 1
    assert len(opener.opened) == 3  # the failed socket was replaced


def test_open_socket_family(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyroute2

    from ipvsproxy.dataplane import conntrack

    seen: list[int] = []

    class Conntrack:
        def __init__(self, nfgen_family: int = socket.AF_INET) -> None:
            seen.append(nfgen_family)

    monkeypatch.setattr(pyroute2, "Conntrack", Conntrack)
    conntrack.open_socket(AF_INET6)
    assert seen == [AF_INET6]
