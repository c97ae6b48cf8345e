"""The conntrack cleanup for removed UDP/SCTP real servers and deleted UDP/SCTP Services.

The raw ctnetlink codec (ct_wire.py) is checked against pyroute2's own encoder and
decoder (an independent implementation of the same wire format); the cleaner against a
fake wire that counts dumps: one pass per address family for a whole batch of removals,
kernel filters only where they are correct, and the work done off the caller's thread.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Sequence

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from ipvsproxy.dataplane import ct_wire
from ipvsproxy.dataplane.conntrack import ConntrackCleaner, Removal, doomed, kernel_filter, tuple_of
from ipvsproxy.dataplane.ct_wire import ConntrackError, Filter, Flow, decode_flow, encode_delete, encode_dump
from ipvsproxy.model import AF_INET, AF_INET6, Real, VSKey

UDP, SCTP = 17, 132


def pton(addr: str) -> bytes:
    return socket.inet_pton(AF_INET6 if ":" in addr else AF_INET, addr)


def kernel_entry(family: int, client: str, cport: int, vip: str, vport: int, rs: str, rport: int,
                 proto: int = UDP) -> bytes:
    """A conntrack entry as a dump returns it (encoded by pyroute2): client -> VIP, reply from the RS."""
    orig = NFCTAttrTuple(family=family, saddr=client, daddr=vip, proto=proto, sport=cport, dport=vport)
    reply = NFCTAttrTuple(family=family, saddr=rs, daddr=client, proto=proto, sport=rport, dport=cport)
    msg = nfct_msg.create_from(tuple_orig=orig, tuple_reply=reply)
    msg["nfgen_family"] = family
    msg["header"]["type"] = (1 << 8) | 0  # IPCTNL_MSG_CT_NEW
    msg.encode()
    return bytes(msg.data)


def flow(family: int, client: str, cport: int, vip: str, vport: int, rs: str, rport: int,
         proto: int = UDP) -> Flow:
    data = kernel_entry(family, client, cport, vip, vport, rs, rport, proto)
    f = decode_flow(data, 16, len(data))
    assert f is not None
    return f


# ---- the codec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family,client,vip,rs", [
    (AF_INET, "198.19.128.6", "198.18.0.53", "198.19.0.6"),
    (AF_INET6, "2001:2:0:c001::2", "2001:2::53", "2001:2:0:b001::2"),
])
@pytest.mark.parametrize("proto", [UDP, SCTP])
def test_decode_reads_what_pyroute2_encodes(family: int, client: str, vip: str, rs: str, proto: int) -> None:
    f = flow(family, client, 40000, vip, 53, rs, 5353, proto)
    assert f == Flow(family, proto, pton(client), pton(vip), 40000, 53, pton(rs), 5353)


def test_delete_request_is_what_pyroute2_decodes() -> None:
    f = flow(AF_INET6, "2001:2:0:c001::2", 40000, "2001:2::53", 53, "2001:2:0:b001::2", 5353, SCTP)
    data = encode_delete(f, 77, 0x5)
    msg = nfct_msg(data)
    msg.decode()
    assert msg["header"]["type"] == (1 << 8) | 2 and msg["header"]["sequence_number"] == 77
    assert msg["nfgen_family"] == AF_INET6
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == ("2001:2:0:c001::2", "2001:2::53", SCTP, 40000, 53)


def test_dump_request_filters_as_asked_and_never_by_ipv6_address() -> None:
    flt = Filter(proto=UDP, orig_dst=pton("198.18.0.53"), orig_dport=53, reply_src=pton("198.19.0.6"),
                 reply_sport=5353)
    msg = nfct_msg(encode_dump(AF_INET, flt, 5))
    msg.decode()
    assert msg["header"]["flags"] & 0x300 == 0x300  # NLM_F_DUMP
    flags = msg.get_attr("CTA_FILTER")
    assert flags.get_attr("CTA_FILTER_ORIG_FLAGS") == ct_wire.F_IP_DST | ct_wire.F_PROTO_NUM | ct_wire.F_PROTO_DST_PORT
    assert flags.get_attr("CTA_FILTER_REPLY_FLAGS") == ct_wire.F_IP_SRC | ct_wire.F_PROTO_NUM | ct_wire.F_PROTO_SRC_PORT
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == (None, "198.18.0.53", UDP, None, 53)
    assert tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == ("198.19.0.6", None, UDP, 5353, None)
    with pytest.raises(ValueError):
        encode_dump(AF_INET6, Filter(proto=UDP, orig_dst=pton("2001:2::53")), 6)
    plain = nfct_msg(encode_dump(AF_INET6, None, 7))
    plain.decode()
    assert plain.get_attr("CTA_FILTER") is None


# ---- what to ask the kernel for, what to delete ----------------------------------------------------

DNS4 = VSKey(AF_INET, UDP, "198.18.0.53", 53)
DNS6 = VSKey(AF_INET6, UDP, "2001:2::53", 53)


def test_kernel_filter_is_exact_for_one_ipv4_real_and_addressless_for_ipv6() -> None:
    f = kernel_filter(AF_INET, [Removal(DNS4, Real("198.19.0.6", 5353, 0))])
    assert f == Filter(UDP, pton("198.18.0.53"), 53, pton("198.19.0.6"), 5353)
    f6 = kernel_filter(AF_INET6, [Removal(DNS6, Real("2001:2:0:b001::2", 5353, 0))])
    assert f6 == Filter(UDP, None, 53, None, 5353)  # Linux 6.1 inverts IPv6 address filters
    many = kernel_filter(AF_INET, [Removal(DNS4, Real(f"198.19.0.{i}", 5353, 0)) for i in range(1, 51)])
    assert many == Filter(UDP, pton("198.18.0.53"), 53, None, 5353)
    assert kernel_filter(AF_INET, [Removal(DNS4)]) == Filter(UDP, pton("198.18.0.53"), 53, None, None)
    mixed = [Removal(DNS4, Real("198.19.0.6", 5353, 0)), Removal(VSKey(AF_INET, SCTP, "198.18.0.80", 80))]
    assert kernel_filter(AF_INET, mixed) is None


TABLE4 = [
    flow(AF_INET, "198.19.128.6", 40000, "198.18.0.53", 53, "198.19.0.6", 5353),   # to the removed RS
    flow(AF_INET, "198.19.128.6", 40001, "198.18.0.53", 53, "198.19.0.10", 5353),  # another RS: kept
    flow(AF_INET, "198.19.128.6", 40002, "198.18.0.54", 53, "198.19.0.6", 5353),   # another VIP: kept
    flow(AF_INET, "198.19.128.6", 40003, "198.18.0.53", 53, "198.19.0.6", 5354),   # another RS port: kept
]
TABLE6 = [
    flow(AF_INET6, "2001:2:0:c001::2", 40000, "2001:2::53", 53, "2001:2:0:b001::2", 5353),
    flow(AF_INET6, "2001:2:0:c001::2", 40001, "2001:2::53", 53, "2001:2:0:b002::2", 5353),
]


def test_doomed_entries_are_exactly_those_of_the_removals() -> None:
    assert doomed(AF_INET, TABLE4, [Removal(DNS4, Real("198.19.0.6", 5353, 0))]) == TABLE4[:1]
    # an uncompressed spelling of the same addresses still matches
    six = [Removal(VSKey(AF_INET6, UDP, "2001:2:0:0::53", 53), Real("2001:2:0:b001:0:0:0:2", 5353, 0))]
    assert doomed(AF_INET6, TABLE4 + TABLE6, six) == TABLE6[:1]
    # a deleted UDP Service: every entry to its VIP:port, whichever real server answered
    assert doomed(AF_INET, TABLE4, [Removal(DNS4)]) == [TABLE4[0], TABLE4[1], TABLE4[3]]
    sctp = [flow(AF_INET, "198.19.128.6", 40000, "198.18.0.80", 80, "198.19.0.6", 8080, SCTP),
            flow(AF_INET, "198.19.128.6", 40001, "198.18.0.80", 80, "198.19.0.6", 9090, SCTP)]
    assert doomed(AF_INET, sctp, [Removal(VSKey(AF_INET, SCTP, "198.18.0.80", 80), Real("198.19.0.6", 8080, 0))]) \
        == sctp[:1]


# ---- the cleaner -----------------------------------------------------------------------------------

class FakeWire:
    """Returns its table filtered as a correct kernel would; records dumps and deletes."""

    def __init__(self, table: list[Flow], *, refuse_filters: bool = False, fail_delete: int = 0,
                 gate: threading.Event | None = None) -> None:
        self.table, self.refuse_filters, self.fail_delete, self.gate = list(table), refuse_filters, fail_delete, gate
        self.dumps: list[tuple[int, Filter | None]] = []
        self.deleted: list[Flow] = []
        self.closed = False
        self.dumping = threading.Event()

    def flows(self, family: int, flt: Filter | None = None) -> list[Flow]:
        self.dumping.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if flt is not None and self.refuse_filters:
            raise ConntrackError(errno.EOPNOTSUPP, "conntrack dump: EOPNOTSUPP")
        self.dumps.append((family, flt))

        def ok(f: Flow) -> bool:
            return flt is None or all(want is None or want == have for want, have in (
                (flt.proto, f.proto), (flt.orig_dst, f.orig_dst), (flt.orig_dport, f.orig_dport),
                (flt.reply_src, f.reply_src), (flt.reply_sport, f.reply_sport)))
        return [f for f in self.table if f.family == family and ok(f)]

    def delete(self, flows: Sequence[Flow]) -> list[ConntrackError | None]:
        if self.fail_delete:
            return [ConntrackError(self.fail_delete, "refused") for _ in flows]
        self.deleted += flows
        self.table = [f for f in self.table if f not in flows]
        return [None] * len(flows)

    def close(self) -> None:
        self.closed = True


def big_table(n_reals: int, flows_each: int) -> list[Flow]:
    out = []
    for r in range(n_reals):
        for c in range(flows_each):
            out.append(Flow(AF_INET, UDP, pton(f"198.19.128.{c % 250 + 1}"), pton("198.18.0.53"), 10000 + c, 53,
                            pton(f"198.19.1.{r + 1}"), 5353))
            out.append(Flow(AF_INET6, UDP, pton(f"2001:2:0:c001::{c + 1:x}"), pton("2001:2::53"), 10000 + c, 53,
                            pton(f"2001:2:0:b001::{r + 1:x}"), 5353))
    return out


def test_fifty_removals_are_one_dump_per_family() -> None:
    wire = FakeWire(big_table(60, 5))
    cleaner = ConntrackCleaner(lambda: wire)
    gone = [Removal(DNS4, Real(f"198.19.1.{r + 1}", 5353, 0)) for r in range(50)]
    gone += [Removal(DNS6, Real(f"2001:2:0:b001::{r + 1:x}", 5353, 0)) for r in range(50)]
    assert cleaner.flush(gone) == 2 * 50 * 5  # every flow of the 50 removed, both families
    assert [fam for fam, _ in wire.dumps] == [AF_INET, AF_INET6]  # was one whole-table dump per removal
    assert len(wire.table) == 2 * 10 * 5  # the 10 kept real servers' flows are all there
    assert cleaner.stats.passes == 1 and cleaner.stats.dumps == 2


def test_one_removed_ipv4_real_reads_only_its_own_entries() -> None:
    wire = FakeWire(big_table(20, 50))
    cleaner = ConntrackCleaner(lambda: wire)
    assert cleaner.flush([Removal(DNS4, Real("198.19.1.7", 5353, 0))]) == 50
    assert cleaner.stats.scanned == 50  # the kernel's filter did the narrowing (IPv4)


def test_a_kernel_without_dump_filters_gets_whole_tables() -> None:
    wire = FakeWire(TABLE4 + TABLE6, refuse_filters=True)
    cleaner = ConntrackCleaner(lambda: wire)
    assert cleaner.flush([Removal(DNS4, Real("198.19.0.6", 5353, 0))]) == 1
    assert cleaner.flush([Removal(DNS4, Real("198.19.0.10", 5353, 0))]) == 1
    assert wire.dumps == [(AF_INET, None), (AF_INET, None)]  # asked once, then not again


def test_delete_errors_raise_and_reopen_the_socket() -> None:
    wires = [FakeWire(TABLE4, fail_delete=errno.EPERM), FakeWire(TABLE4)]
    opened: list[FakeWire] = []

    def opener() -> FakeWire:
        opened.append(wires[len(opened)])
        return opened[-1]

    cleaner = ConntrackCleaner(opener)
    with pytest.raises(ConntrackError):
        cleaner.flush([Removal(DNS4, Real("198.19.0.6", 5353, 0))])
    assert opened[0].closed
    assert cleaner.flush([Removal(DNS4, Real("198.19.0.6", 5353, 0))]) == 1
    assert len(opened) == 2


def test_submit_returns_at_once_and_batches_what_piles_up() -> None:
    gate = threading.Event()
    wire = FakeWire(TABLE4, gate=gate)
    cleaner = ConntrackCleaner(lambda: wire)
    cleaner.submit([Removal(DNS4, Real("198.19.0.6", 5353, 0))])  # the worker blocks in its dump...
    assert wire.dumping.wait(10)
    cleaner.submit([Removal(DNS4, Real("198.19.0.10", 5353, 0))])  # ...the caller (the sync) does not
    cleaner.submit([Removal(VSKey(AF_INET, UDP, "198.18.0.54", 53))])
    assert not cleaner.wait_idle(0)
    gate.set()
    assert cleaner.wait_idle(10)
    assert cleaner.stats.passes == 2  # the two later removals went together
    assert sorted(f.orig_sport for f in wire.deleted) == [40000, 40001, 40002]
    cleaner.close()
    assert wire.closed


def test_worker_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    cleaner = ConntrackCleaner(lambda: FakeWire(TABLE4, fail_delete=errno.EPERM))
    cleaner.submit([Removal(DNS4, Real("198.19.0.6", 5353, 0))])
    assert cleaner.wait_idle(10)
    assert cleaner.stats.errors == 1
    assert any("conntrack cleanup" in r.message for r in caplog.records)
    cleaner.close()


def test_create_request_is_a_nated_entry_pyroute2_decodes() -> None:
    f = Flow(AF_INET, UDP, pton("198.19.128.6"), pton("198.18.0.53"), 40000, 53, pton("198.19.0.6"), 5353)
    msg = nfct_msg(ct_wire.encode_create(f, 600, 9, 0x5))
    msg.decode()
    assert msg["header"]["flags"] & 0x600 == 0x600  # NLM_F_CREATE | NLM_F_EXCL
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == ("198.19.128.6", "198.18.0.53", UDP, 40000, 53)
    assert tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == ("198.19.0.6", "198.19.128.6", UDP, 5353, 40000)
    assert msg.get_attr("CTA_TIMEOUT") == 600
