"""Host tests for ipvsproxy.dataplane.ipvs_wire: byte layout, dump parsing, batching.

Byte layouts are checked by decoding our messages with pyroute2's own IPVS
message classes; dump replies are built with pyroute2's encoder; batching and
error mapping run against a fake "kernel" thread on a SOCK_SEQPACKET pair.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyroute2.netlink.generic.ipvs import ipvsmsg

from ipvsproxy.dataplane import ipvs_wire as w
from ipvsproxy.dataplane.ipvs_wire import (
    Cmd,
    Dest,
    DestEntry,
    IPVSError,
    IPVSWire,
    Request,
    Stats,
    Svc,
)

FAM = 0x2A
V4 = socket.AF_INET
V6 = socket.AF_INET6
SVC4 = Svc(V4, 6, "198.18.0.1", 80, "sh", 0x18, 300, 0xFFFFFF00)
SVC6 = Svc(V6, 17, "fd00::5", 53, "rr", 0x1, 60, 128)
NLMSG = struct.Struct("=IHHII")


def decode(data: bytes) -> Any:
    msg = ipvsmsg(data)
    msg.decode()
    return msg


def svc_attrs(msg: Any) -> dict[str, Any]:
    return dict(msg.get_attr("IPVS_CMD_ATTR_SERVICE")["attrs"])


def dest_attrs(msg: Any) -> dict[str, Any]:
    return dict(msg.get_attr("IPVS_CMD_ATTR_DEST")["attrs"])


# --- encoding -------------------------------------------------------------------------------
def test_new_service_v4_layout() -> None:
    data = w.encode_request(Request(Cmd.NEW_SERVICE, SVC4), FAM, 77, 5)
    msg = decode(data)
    assert msg["header"]["type"] == FAM
    assert msg["header"]["sequence_number"] == 77
    assert msg["header"]["flags"] == 5
    assert msg["header"]["length"] == len(data)
    assert msg["cmd"] == 1 and msg["version"] == 1
    a = svc_attrs(msg)
    assert a["IPVS_SVC_ATTR_AF"] == V4
    assert a["IPVS_SVC_ATTR_PROTOCOL"] == 6
    assert a["IPVS_SVC_ATTR_ADDR"] == "198.18.0.1"
    assert a["IPVS_SVC_ATTR_PORT"] == 80
    assert a["IPVS_SVC_ATTR_SCHED_NAME"] == "sh"
    assert a["IPVS_SVC_ATTR_FLAGS"]["flags"] == 0x18
    assert a["IPVS_SVC_ATTR_FLAGS"]["mask"] == 0xFFFFFFFF
    assert a["IPVS_SVC_ATTR_TIMEOUT"] == 300
    assert a["IPVS_SVC_ATTR_NETMASK"] == "255.255.255.0"  # big-endian mask for v4


def test_addresses_are_16_bytes() -> None:
    data = w.encode_request(Request(Cmd.DEL_SERVICE, SVC4), FAM, 1, 5)
    # nlmsghdr(16) genlhdr(4) nest(4) AF(8) PROTOCOL(8) -> ADDR attribute header
    ln, ty = struct.unpack_from("=HH", data, 40)
    assert (ln, ty) == (20, 3)
    assert data[44:60] == socket.inet_aton("198.18.0.1") + bytes(12)


def test_new_service_v6_netmask_is_prefix_length() -> None:
    for netmask in (128, 0xFFFFFFFF):  # the v4-style default also means /128 for v6
        svc = Svc(V6, 17, "fd00::5", 53, netmask=netmask)
        data = w.encode_request(Request(Cmd.SET_SERVICE, svc), FAM, 2, 5)
        a = svc_attrs(decode(data))
        assert a["IPVS_SVC_ATTR_ADDR"] == "fd00::5"
        # pyroute2 reads the u32 as an IPv4 address; the kernel stores 128 in host order
        assert struct.unpack("=I", socket.inet_aton(a["IPVS_SVC_ATTR_NETMASK"]))[0] == 128
    with pytest.raises(ValueError):
        w.encode_request(Request(Cmd.NEW_SERVICE, Svc(V6, 6, "fd00::1", 1, netmask=129)), FAM, 1, 5)


def test_flags_hashed_bit_is_never_sent() -> None:
    svc = Svc(V4, 6, "198.18.0.1", 80, flags=0x1 | 0x2 | 0x4)
    a = svc_attrs(decode(w.encode_request(Request(Cmd.NEW_SERVICE, svc), FAM, 1, 5)))
    assert a["IPVS_SVC_ATTR_FLAGS"] == {"flags": 0x5, "mask": 0xFFFFFFFF}


def test_del_service_sends_identity_only() -> None:
    a = svc_attrs(decode(w.encode_request(Request(Cmd.DEL_SERVICE, SVC6), FAM, 1, 5)))
    assert set(a) == {"IPVS_SVC_ATTR_AF", "IPVS_SVC_ATTR_PROTOCOL", "IPVS_SVC_ATTR_ADDR",
                      "IPVS_SVC_ATTR_PORT"}
    assert a["IPVS_SVC_ATTR_ADDR"] == "fd00::5" and a["IPVS_SVC_ATTR_PORT"] == 53


@pytest.mark.parametrize("cmd", [Cmd.NEW_DEST, Cmd.SET_DEST])
def test_dest_layout_v4(cmd: Cmd) -> None:
    d = Dest("10.1.2.3", 8080, weight=7, fwd_method=0, u_threshold=100, l_threshold=10)
    msg = decode(w.encode_request(Request(cmd, SVC4, d), FAM, 3, 5))
    assert msg["cmd"] == int(cmd)
    s = svc_attrs(msg)  # service identity nested too (required for SET/DEL_DEST)
    assert (s["IPVS_SVC_ATTR_ADDR"], s["IPVS_SVC_ATTR_PORT"]) == ("198.18.0.1", 80)
    a = dest_attrs(msg)
    # without ADDR_FAMILY pyroute2 cannot type the address: it returns the raw
    # attribute (4-byte header + 16-byte union nf_inet_addr)
    assert a["IPVS_DEST_ATTR_ADDR"][:4] == struct.pack("=HH", 20, 1)
    assert a["IPVS_DEST_ATTR_ADDR"][4:] == socket.inet_aton("10.1.2.3") + bytes(12)
    assert a["IPVS_DEST_ATTR_PORT"] == 8080
    assert a["IPVS_DEST_ATTR_WEIGHT"] == 7
    assert a["IPVS_DEST_ATTR_FWD_METHOD"] == 0
    assert a["IPVS_DEST_ATTR_U_THRESH"] == 100
    assert a["IPVS_DEST_ATTR_L_THRESH"] == 10
    assert "IPVS_DEST_ATTR_ADDR_FAMILY" not in a


def test_dest_v6_in_v6_service_and_mixed_family() -> None:
    a = dest_attrs(decode(w.encode_request(
        Request(Cmd.NEW_DEST, SVC6, Dest("fd00::10", 53, 3)), FAM, 4, 5)))
    assert a["IPVS_DEST_ATTR_ADDR"][4:] == socket.inet_pton(V6, "fd00::10")
    a = dest_attrs(decode(w.encode_request(
        Request(Cmd.NEW_DEST, SVC4, Dest("fd00::10", 80, 3, 2, family=V6)), FAM, 4, 5)))
    assert a["IPVS_DEST_ATTR_ADDR_FAMILY"] == V6
    assert a["IPVS_DEST_ATTR_ADDR"] == "fd00::10"
    assert a["IPVS_DEST_ATTR_FWD_METHOD"] == 2


def test_del_dest_sends_identity_only() -> None:
    msg = decode(w.encode_request(Request(Cmd.DEL_DEST, SVC4, Dest("10.0.0.9", 90)), FAM, 5, 5))
    assert set(dest_attrs(msg)) == {"IPVS_DEST_ATTR_ADDR", "IPVS_DEST_ATTR_PORT"}
    assert svc_attrs(msg)["IPVS_SVC_ATTR_PORT"] == 80


def test_describe() -> None:
    assert w.describe(Request(Cmd.NEW_SERVICE, SVC4)) == "add service TCP 198.18.0.1:80"
    assert (w.describe(Request(Cmd.DEL_DEST, SVC6, Dest("fd00::1", 5)))
            == "delete destination [fd00::1]:5 of service UDP [fd00::5]:53")


# --- dump decoding ----------------------------------------------------------------------------
def pyroute2_msg(cmd: int, attrs: list[Any], seq: int, flags: int = 2) -> bytes:
    msg = ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["header"]["type"] = FAM
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def stats_attrs(base: int) -> list[Any]:
    names = ["CONNS", "INPKTS", "OUTPKTS", "INBYTES", "OUTBYTES", "CPS", "INPPS", "OUTPPS",
             "INBPS", "OUTBPS"]
    return [[f"IPVS_STATS_ATTR_{n}", base + i] for i, n in enumerate(names)]


def svc_reply(seq: int, svc: Svc, with64: bool = True, fwmark: int = 0, flags: int = 2) -> bytes:
    if fwmark:
        ident: list[Any] = [["IPVS_SVC_ATTR_AF", svc.family], ["IPVS_SVC_ATTR_FWMARK", fwmark]]
    else:
        ident = [["IPVS_SVC_ATTR_AF", svc.family], ["IPVS_SVC_ATTR_PROTOCOL", svc.protocol],
                 ["IPVS_SVC_ATTR_ADDR", svc.address], ["IPVS_SVC_ATTR_PORT", svc.port]]
    mask = (socket.inet_ntoa(struct.pack("=I", svc.netmask)) if svc.family == V6
            else socket.inet_ntoa(struct.pack(">I", svc.netmask)))
    attrs = ident + [
        ["IPVS_SVC_ATTR_SCHED_NAME", svc.scheduler],
        ["IPVS_SVC_ATTR_FLAGS", {"flags": svc.flags | 0x2, "mask": 0xFFFFFFFF}],
        ["IPVS_SVC_ATTR_TIMEOUT", svc.timeout],
        ["IPVS_SVC_ATTR_NETMASK", mask],
        ["IPVS_SVC_ATTR_STATS", {"attrs": stats_attrs(1)}],
    ]
    if with64:
        attrs.append(["IPVS_SVC_ATTR_STATS64", {"attrs": stats_attrs(1000)}])
    return pyroute2_msg(1, [["IPVS_CMD_ATTR_SERVICE", {"attrs": attrs}]], seq, flags)


def dest_reply(seq: int, d: Dest, fam: int, with64: bool = True) -> bytes:
    attrs: list[Any] = [
        ["IPVS_DEST_ATTR_ADDR_FAMILY", fam], ["IPVS_DEST_ATTR_ADDR", d.address],
        ["IPVS_DEST_ATTR_PORT", d.port], ["IPVS_DEST_ATTR_FWD_METHOD", d.fwd_method],
        ["IPVS_DEST_ATTR_WEIGHT", d.weight], ["IPVS_DEST_ATTR_U_THRESH", d.u_threshold],
        ["IPVS_DEST_ATTR_L_THRESH", d.l_threshold], ["IPVS_DEST_ATTR_ACTIVE_CONNS", 4],
        ["IPVS_DEST_ATTR_INACT_CONNS", 5], ["IPVS_DEST_ATTR_PERSIST_CONNS", 6],
        ["IPVS_DEST_ATTR_STATS", {"attrs": stats_attrs(1)}],
    ]
    if with64:
        attrs.append(["IPVS_DEST_ATTR_STATS64", {"attrs": stats_attrs(2000)}])
    return pyroute2_msg(5, [["IPVS_CMD_ATTR_DEST", {"attrs": attrs}]], seq)


def test_decode_service_prefers_stats64_and_masks_hashed() -> None:
    for svc in (SVC4, SVC6):
        data = svc_reply(1, svc)
        entry = w.decode_service(data, 20, len(data))
        assert entry is not None
        assert entry.svc == svc
        assert entry.stats == Stats(*range(1000, 1010))
    data = svc_reply(1, SVC4, with64=False)
    entry = w.decode_service(data, 20, len(data))
    assert entry is not None and entry.stats == Stats(*range(1, 11))


def test_decode_fwmark_service_is_skipped() -> None:
    data = svc_reply(1, SVC4, fwmark=7)
    assert w.decode_service(data, 20, len(data)) is None


# --- fake kernel on a socket pair -------------------------------------------------------------
Policy = Callable[[int, int, int, bytes], "int | list[bytes]"]


class FakeKernel:
    """Reads batches like the kernel does; replies with acks/errors/dumps in order.

    ``policy(index, cmd, flags, message)`` returns an errno (0 = success) or,
    for dump requests, a list of reply messages (DONE is appended here).
    """

    def __init__(self, policy: Policy, dgram_per_reply: bool = True) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.policy = policy
        self.dgram_per_reply = dgram_per_reply
        self.received: list[bytes] = []
        self.sends = 0
        self.count = 0  # family (non-NOOP) messages seen
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            data = self.theirs.recv(1 << 20)
            if not data:
                return
            self.sends += 1
            out: list[bytes] = []
            for msg in split(data):
                ln, ty, fl, seq, _ = NLMSG.unpack_from(msg)
                index = self.count
                self.count += ty == FAM
                self.received.append(msg)
                cmd = msg[16] if ty == FAM else 0
                verdict = self.policy(index, cmd, fl, msg) if ty == FAM else 0
                if isinstance(verdict, list):  # replies; a dump's end with NLMSG_DONE
                    out.extend(verdict)
                    if fl & 0x300:
                        out.append(NLMSG.pack(20, 3, 2, seq, 0) + struct.pack("=i", 0))
                elif fl & 4 or verdict:
                    out.append(NLMSG.pack(36, 2, 0x100, seq, 0) + struct.pack("=i", -verdict)
                               + msg[:16])
            if self.dgram_per_reply:
                for o in out:
                    self.theirs.send(o)
            elif out:
                self.theirs.send(b"".join(out))

    def close(self) -> None:
        self.ours.close()
        self.thread.join(5)
        self.theirs.close()


def split(data: bytes) -> Iterator[bytes]:
    off = 0
    while off + 16 <= len(data):
        ln = NLMSG.unpack_from(data, off)[0]
        yield data[off:off + ln]
        off += (ln + 3) & ~3


def wire_for(kernel: FakeKernel, batch: int = 256, ack_all: bool = True) -> IPVSWire:
    return IPVSWire.for_socket(kernel.ours, FAM, batch_size=batch, ack_all=ack_all)


def bulk_requests(n_svc: int, n_dest: int) -> list[Request]:
    reqs: list[Request] = []
    for i in range(n_svc):
        svc = Svc(V4, 6, f"198.18.{i // 250}.{i % 250 + 1}", 80)
        reqs.append(Request(Cmd.NEW_SERVICE, svc))
        reqs.extend(Request(Cmd.NEW_DEST, svc, Dest(f"10.{i // 250}.{i % 250}.{k + 1}", 8080))
                    for k in range(n_dest))
    return reqs


@pytest.mark.parametrize("ack_all", [True, False])
def test_execute_batches_and_maps_errors_by_sequence(ack_all: bool) -> None:
    fail = {5: errno.EEXIST, 301: errno.ENOENT, 599: errno.ESRCH}
    kernel = FakeKernel(lambda i, cmd, fl, m: fail.get(i, 0))
    try:
        wire = wire_for(kernel, batch=100, ack_all=ack_all)
        reqs = bulk_requests(60, 9)  # 600 requests
        results = wire.execute(reqs)
        assert len(results) == 600
        errs = {i: r for i, r in enumerate(results) if r is not None}
        assert set(errs) == set(fail)
        for i, e in errs.items():
            assert e.errno == fail[i] and e.request is reqs[i]
        assert str(errs[301]) == ("add destination 10.0.30.1:8080 to service TCP "
                                  "198.18.0.31:80: No such file or directory")
        assert wire.counters.sendmsg_calls == 6
        assert wire.counters.messages_sent == 600 + (0 if ack_all else 6)
        expected_flags = 5 if ack_all else 1
        assert all(NLMSG.unpack_from(m)[2] == expected_flags
                   for m in kernel.received if NLMSG.unpack_from(m)[1] == FAM)
        # every request reached the "kernel" in order, decodable by pyroute2
        fam_msgs = [m for m in kernel.received if NLMSG.unpack_from(m)[1] == FAM]
        assert [m[16] for m in fam_msgs] == [int(r.cmd) for r in reqs]
    finally:
        kernel.close()


def test_execute_scheduler_hint_and_multi_ack_datagrams() -> None:
    kernel = FakeKernel(lambda i, cmd, fl, m: errno.ENOENT if i == 1 else 0,
                        dgram_per_reply=False)
    try:
        wire = wire_for(kernel)
        svc = Svc(V4, 6, "198.18.0.1", 80, "nosuch")
        res = wire.execute([Request(Cmd.NEW_SERVICE, SVC4), Request(Cmd.NEW_SERVICE, svc)])
        assert res[0] is None
        assert isinstance(res[1], IPVSError)
        assert str(res[1]) == ("add service TCP 198.18.0.1:80: No such file or directory "
                               "(scheduler module missing?)")
    finally:
        kernel.close()


def test_execute_encoding_errors_are_per_request() -> None:
    kernel = FakeKernel(lambda i, cmd, fl, m: 0)
    try:
        wire = wire_for(kernel)
        bad = Svc(V4, 6, "not-an-ip", 80)
        reqs = [Request(Cmd.NEW_SERVICE, SVC4), Request(Cmd.NEW_SERVICE, bad),
                Request(Cmd.NEW_DEST, SVC4, Dest("10.0.0.1", 1, weight=-1)),
                Request(Cmd.NEW_DEST, SVC4, Dest("10.0.0.2", 1))]
        res = wire.execute(reqs)
        assert res[0] is None and res[3] is None
        assert res[1] is not None and res[1].errno == errno.EINVAL and res[1].request is reqs[1]
        assert res[2] is not None and "invalid request" in str(res[2])
        assert len(kernel.received) == 2
    finally:
        kernel.close()


def test_dumps_services_dests_and_table() -> None:
    dests = {SVC4: [Dest("10.0.0.1", 8080, 3), Dest("fd00::9", 80, 1, 2, family=V6)],
             SVC6: [Dest("fd00::10", 53, 2)]}
    busy_once: set[int] = set()

    def policy(i: int, cmd: int, fl: int, msg: bytes) -> int | list[bytes]:
        seq = NLMSG.unpack_from(msg)[3]
        if cmd == 4:
            return [svc_reply(seq, SVC4), svc_reply(seq, SVC4, fwmark=3), svc_reply(seq, SVC6)]
        assert cmd == 8 and fl & 0x300 == 0x300
        a = svc_attrs(decode(msg))
        svc = SVC4 if a["IPVS_SVC_ATTR_AF"] == V4 else SVC6
        if svc is SVC6 and not busy_once:  # a long dump is running: EBUSY, must be resent
            busy_once.add(i)
            return errno.EBUSY
        return [dest_reply(seq, d, d.family or svc.family) for d in dests[svc]]

    kernel = FakeKernel(policy)
    try:
        wire = wire_for(kernel)
        svcs = wire.services()
        assert [e.svc for e in svcs] == [SVC4, SVC6]
        table = wire.table()
        assert [e.svc for e, _ in table] == [SVC4, SVC6]
        assert [[d.dest for d in ds] for _, ds in table] == [dests[SVC4], dests[SVC6]]
        first = table[0][1][0]
        assert first == DestEntry(dests[SVC4][0], 4, 5, 6, Stats(*range(2000, 2010)))
        assert busy_once
        assert [d.dest for d in wire.dests(SVC4)] == dests[SVC4]
    finally:
        kernel.close()


def test_transact_error_raises() -> None:
    kernel = FakeKernel(lambda i, cmd, fl, m: errno.EPERM)
    try:
        with pytest.raises(IPVSError) as info:
            wire_for(kernel).flush()
        assert info.value.errno == errno.EPERM
    finally:
        kernel.close()


def test_encoding_speed_host() -> None:
    """Pure-Python cost of a 2,000 x 10 batch load against the fake kernel (print only)."""
    kernel = FakeKernel(lambda i, cmd, fl, m: 0)
    try:
        wire = wire_for(kernel, ack_all=False)
        reqs = bulk_requests(2000, 10)
        t0 = time.perf_counter()
        assert not any(wire.execute(reqs))
        dt = time.perf_counter() - t0
        print(f"\nhost: {len(reqs)} requests through the fake kernel in {dt * 1000:.0f} ms")
        t0 = time.perf_counter()
        sid = w._svc_id(SVC4)
        for r in reqs:
            w.encode_request(r, FAM, 1, 5, sid)
        print(f"host: encode only {(time.perf_counter() - t0) / len(reqs) * 1e6:.2f} us/msg")
    finally:
        kernel.close()


def test_dest_fast_path_matches_generic_parser() -> None:
    for fam, addr in ((V4, "10.0.0.1"), (V6, "fd00::1")):
        for with64 in (True, False):
            data = dest_reply(1, Dest(addr, 8080, 3, 2), fam, with64)
            fast = w._dest_decoder(V4)(data, 20, len(data))
            assert fast == w._decode_dest_slow(data, 20, len(data), V4)
            assert fast is not None and fast.dest.family == (0 if fam == V4 else V6)
    # a layout the shape does not match (no stats at all) still decodes
    data = pyroute2_msg(5, [["IPVS_CMD_ATTR_DEST", {"attrs": [
        ["IPVS_DEST_ATTR_ADDR_FAMILY", V4], ["IPVS_DEST_ATTR_ADDR", "10.0.0.2"],
        ["IPVS_DEST_ATTR_PORT", 81]]}]], 1)
    entry = w._dest_decoder(V4)(data, 20, len(data))
    assert entry is not None and entry.dest == Dest("10.0.0.2", 81, 0)


def test_observed_counters_are_a_view_of_the_wire_record() -> None:
    from ipvsproxy.dataplane.netlink import StatsView, observed_vs

    entry = w.SvcEntry(SVC4, Stats(*range(1, 11)))
    dests = [DestEntry(Dest("10.0.0.1", 8080, 3), 4, 5, 6, Stats(*range(100, 110)))]
    obs = observed_vs(entry, dests)
    real = obs.reals[("10.0.0.1", 8080)]
    assert (real.weight, real.active, real.inactive) == (3, 4, 5)
    assert isinstance(real.stats, StatsView)
    assert dict(real.stats) == dict(zip(StatsView.KEYS, range(100, 110), strict=True))
    assert obs.stats["conns"] == 1 and obs.stats.get("outbps") == 10 and obs.stats.get("nope", 0) == 0
    with pytest.raises(KeyError):
        obs.stats["svc"]


def test_service_fast_path_matches_generic_parser() -> None:
    for svc in (SVC4, SVC6, Svc(V4, 17, "10.0.0.9", 53, "sed", 1, 300, 0xFFFFFF00),
                Svc(V4, 6, "10.0.0.10", 80, "mh", 0x30)):
        for with64 in (True, False):
            data = svc_reply(1, svc, with64)
            for _ in range(2):  # learns the shape, then uses it
                fast = w.decode_service(data, 20, len(data))
                assert fast == w._decode_service_slow(data, 20, len(data))
                assert fast is not None and fast.svc == svc
    # a firewall-mark service of some learnt size still decodes (generically) as None
    data = svc_reply(1, SVC4, fwmark=7)
    assert w.decode_service(data, 20, len(data)) is None


@pytest.mark.parametrize("dgram_per_reply", [True, False])
def test_services_of_pipelines_gets_and_maps_replies_by_sequence(dgram_per_reply: bool) -> None:
    svcs = [Svc(V4, 6, f"10.1.{i // 250}.{i % 250 + 1}", 80) for i in range(300)]
    missing = {3, 64, 299}

    def policy(i: int, cmd: int, fl: int, m: bytes) -> int | list[bytes]:
        assert cmd == w.CMD_GET_SERVICE and not fl & 0x300  # a GET, not a dump
        return errno.ESRCH if i in missing else [svc_reply(NLMSG.unpack_from(m)[3], svcs[i], flags=0)]

    kernel = FakeKernel(policy, dgram_per_reply)
    try:
        wire = wire_for(kernel, batch=64)
        got = wire.services_of(svcs)
        assert [e is None for e in got] == [i in missing for i in range(300)]
        assert [e.svc for e in got if e is not None] == [s for i, s in enumerate(svcs) if i not in missing]
        assert kernel.sends < 30  # batches, not one send per service
        assert len(kernel.received) == 300  # one message per service: no barrier, no ack asked for
        assert not any(NLMSG.unpack_from(m)[2] & 0x4 for m in kernel.received)
    finally:
        kernel.close()


def test_services_of_raises_other_kernel_errors_after_reading_the_batch() -> None:
    svcs = [Svc(V4, 6, f"10.1.0.{i + 1}", 80) for i in range(5)]

    def policy(i: int, cmd: int, fl: int, m: bytes) -> int | list[bytes]:
        return errno.EPERM if i == 2 else [svc_reply(NLMSG.unpack_from(m)[3], svcs[i % 5], flags=0)]

    kernel = FakeKernel(policy)
    try:
        wire = wire_for(kernel)
        with pytest.raises(IPVSError) as info:
            wire.services_of(svcs)
        assert info.value.errno == errno.EPERM and "10.1.0.3:80" in str(info.value)
        # the socket is in step afterwards: the next request gets its own answer
        assert [e.svc for e in wire.services_of(svcs[:2]) if e is not None] == svcs[:2]
    finally:
        kernel.close()


def test_the_key_dump_comes_a_receive_at_a_time_and_a_restart_says_so() -> None:
    svcs = [Svc(V4, 6, f"10.2.0.{i + 1}", 80) for i in range(3)]
    dumps: list[int] = []

    def policy(i: int, cmd: int, fl: int, m: bytes) -> int | list[bytes]:
        assert cmd == w.CMD_GET_SERVICE and fl & 0x300 == 0x300
        seq = NLMSG.unpack_from(m)[3]
        dumps.append(i)
        if len(dumps) % 2:  # two pages, then a stale dump in the way: EBUSY, start again
            busy = NLMSG.pack(36, 2, 0x100, seq, 0) + struct.pack("=i", -errno.EBUSY) + m[:16]
            return [svc_reply(seq, svcs[0]), svc_reply(seq, svcs[1]), busy]
        return [svc_reply(seq, s) for s in svcs] + [svc_reply(seq, SVC4, fwmark=7)]

    kernel = FakeKernel(policy)  # a datagram per reply: one message a receive
    try:
        wire = wire_for(kernel)
        key = [(s.family, s.protocol, s.address, s.port) for s in svcs]
        assert list(wire.service_key_pages()) == [[key[0]], [key[1]], None, [key[0]], [key[1]], [key[2]]]
        assert [e.svc for e in wire.services()] == svcs  # the whole dump: a restarted one counted once
        pages = wire.service_key_pages()
        assert next(pages) == [key[0]]
        pages.close()  # given up half-way: what the kernel still sends of it is passed over
        assert [e.svc for e in wire.services()] == svcs and len(dumps) == 6
    finally:
        kernel.close()


def test_service_keys_decode_the_identity_only() -> None:
    for svc in (SVC4, SVC6, Svc(V4, 17, "10.0.0.9", 53, "sed", 1, 300, 0xFFFFFF00)):
        for with64 in (True, False):
            data = svc_reply(1, svc, with64)
            for _ in range(2):  # learns the shape, then uses it
                assert w.decode_service_key(data, 20, len(data)) == (svc.family, svc.protocol, svc.address, svc.port)
    data = svc_reply(1, SVC4, fwmark=7)
    assert w.decode_service_key(data, 20, len(data)) is None
