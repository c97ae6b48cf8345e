"""Host tests for ipvsproxy.dataplane.addr_wire: message layout (decoded by
pyroute2's own ifaddrmsg), batching and error mapping against a fake kernel,
and NetlinkDataplane's use of it (binds before IPVS, unbinds after, harmless
errors, one failure per address)."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from ipvsproxy.dataplane.addr_wire import AddrError, AddrRequest, AddrWire, encode_addr
from ipvsproxy.dataplane.base import Counters
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.model import AF_INET, VSKey
from ipvsproxy.plan import Op, OpKind

NLMSG = struct.Struct("=IHHII")


def decode(data: bytes) -> Any:
    msg = ifaddrmsg(data)
    msg.decode()
    return msg


@pytest.mark.parametrize(("add", "address", "family", "prefix"), [
    (True, "198.18.0.1", socket.AF_INET, 32), (True, "2001:2::1", socket.AF_INET6, 128),
    (False, "198.18.0.1", socket.AF_INET, 32), (False, "2001:2::1", socket.AF_INET6, 128),
])
def test_layout_is_what_ip_address_sends(add: bool, address: str, family: int, prefix: int) -> None:
    data = encode_addr(AddrRequest(add, address, 7), 42, 5)
    msg = decode(data)
    assert msg["header"]["length"] == len(data)
    assert msg["header"]["type"] == (20 if add else 21)
    assert msg["header"]["sequence_number"] == 42
    # add: REQUEST|ACK|CREATE|EXCL (an address already there is EEXIST, not silently replaced)
    assert msg["header"]["flags"] == (5 | 0x400 | 0x200 if add else 5)
    assert (msg["family"], msg["prefixlen"], msg["scope"], msg["index"]) == (family, prefix, 0, 7)
    nodad = 0x02 if add and family == socket.AF_INET6 else 0
    assert msg["flags"] == nodad
    assert msg.get_attrs("IFA_LOCAL") == [address] and msg.get_attrs("IFA_ADDRESS") == [address]


class FakeRtnl:
    """Acks every RTM_NEWADDR/DELADDR (and barrier NOOP) like the kernel: errno by policy."""

    def __init__(self, policy: Callable[[bytes], int]) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.policy = policy
        self.sends = 0
        self.messages: list[bytes] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            data = self.theirs.recv(1 << 20)
            if not data:
                return
            self.sends += 1
            out = []
            off = 0
            while off + 16 <= len(data):
                ln, ty, fl, seq, _ = NLMSG.unpack_from(data, off)
                msg = data[off:off + ln]
                off += (ln + 3) & ~3
                err = 0
                if ty in (20, 21):
                    self.messages.append(msg)
                    err = self.policy(msg)
                if fl & 4 or err:
                    out.append(NLMSG.pack(36, 2, 0x100, seq, 0) + struct.pack("=i", -err) + msg[:16])
            if out:
                self.theirs.send(b"".join(out))

    def close(self) -> None:
        self.ours.close()
        self.thread.join(5)
        self.theirs.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[bytes], int]], FakeRtnl]]:
    made: list[FakeRtnl] = []

    def make(policy: Callable[[bytes], int]) -> FakeRtnl:
        made.append(FakeRtnl(policy))
        return made[-1]

    yield make
    for k in made:
        k.close()


def address_of(msg: bytes) -> str:
    return str(decode(msg).get_attr("IFA_LOCAL"))


def requests(n: int, add: bool = True) -> list[AddrRequest]:
    out = []
    for i in range(n):
        a = f"198.18.{i // 250}.{i % 250 + 1}" if i % 2 else f"2001:2::{i + 1:x}"
        out.append(AddrRequest(add, a, 3))
    return out


@pytest.mark.parametrize("ack_all", [True, False])
def test_batches_and_maps_each_error_to_its_address(fake: Any, ack_all: bool) -> None:
    reqs = requests(600)
    bad = {reqs[5].address: errno.EEXIST, reqs[300].address: errno.EADDRNOTAVAIL,
           reqs[599].address: errno.ENODEV}
    kernel = fake(lambda m: bad.get(address_of(m), 0))
    wire = AddrWire.for_socket(kernel.ours, batch_size=100, ack_all=ack_all)
    res = wire.execute(reqs)
    errs = {i: r for i, r in enumerate(res) if r is not None}
    assert set(errs) == {5, 300, 599}
    for i, e in errs.items():
        assert isinstance(e, AddrError) and e.request is reqs[i] and e.errno == bad[reqs[i].address]
    assert str(errs[300]) == f"add address {reqs[300].address}/128 on interface 3: Cannot assign requested address"
    assert [address_of(m) for m in kernel.messages] == [r.address for r in reqs]  # all, in order
    assert wire.counters.sendmsg_calls == kernel.sends == 6
    assert wire.counters.messages_sent == 600 + (0 if ack_all else 6)


def test_unencodable_address_fails_alone(fake: Any) -> None:
    kernel = fake(lambda m: 0)
    wire = AddrWire.for_socket(kernel.ours)
    res = wire.execute([AddrRequest(True, "198.18.0.1", 3), AddrRequest(True, "not-an-ip", 3),
                        AddrRequest(False, "2001:2::1", 3)])
    assert res[0] is None and res[2] is None
    assert res[1] is not None and res[1].errno == errno.EINVAL and "invalid request" in str(res[1])
    assert len(kernel.messages) == 2


class _Wire:
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.counters = SimpleNamespace(messages_sent=0, sendmsg_calls=0)

    def execute(self, reqs: list[Any]) -> list[Any]:
        self.requests += reqs
        return [None] * len(reqs)


def dataplane(addr: AddrWire, ifindex: int | None = 9) -> NetlinkDataplane:
    """A NetlinkDataplane without its constructor (no kernel): our fakes for the wires."""
    dp = NetlinkDataplane.__new__(NetlinkDataplane)
    dp.read_only = False
    dp.counters = Counters()
    dp.wire = _Wire()  # type: ignore[assignment]
    dp.addr = addr
    dp._ifindex = ifindex
    dp.ensure_interface = lambda: 9  # type: ignore[method-assign]
    return dp


def test_dataplane_binds_in_one_batch_and_reports_failures_per_address(fake: Any) -> None:
    refuse = {"198.18.0.3": errno.EPERM, "198.18.0.4": errno.EEXIST, "198.18.0.9": errno.EADDRNOTAVAIL,
              "2001:2::9": errno.ENODEV}
    kernel = fake(lambda m: refuse.get(address_of(m), 0))
    dp = dataplane(AddrWire.for_socket(kernel.ours))
    key = VSKey(AF_INET, 6, "198.18.0.1", 80)
    ops = [Op(OpKind.BIND, address=f"198.18.0.{i}") for i in range(1, 5)]
    ops += [Op(OpKind.BIND, address="2001:2::1"), Op(OpKind.ADD_VS, key)]
    ops += [Op(OpKind.UNBIND, address=a) for a in ("198.18.0.8", "198.18.0.9", "2001:2::9")]
    failures = dp.apply(ops)
    assert kernel.sends == 2  # one batch of binds, one of unbinds
    assert [decode(m)["header"]["type"] for m in kernel.messages] == [20] * 5 + [21] * 3
    # EEXIST on bind and EADDRNOTAVAIL on unbind are "already so"; the rest fail on their own op
    assert [(f.op.address, f.message) for f in failures] == [
        ("198.18.0.3", "bind address 198.18.0.3: Operation not permitted"),
        ("2001:2::9", "unbind address 2001:2::9: No such device"),
    ]
    assert dp.counters.ops["bind"] == 3 and dp.counters.ops["unbind"] == 1  # what was done
    assert dp._ifindex is None  # ENODEV: the interface is looked up again next time


def test_dataplane_unbind_without_interface_is_nothing_to_do(fake: Any) -> None:
    kernel = fake(lambda m: 0)
    dp = dataplane(AddrWire.for_socket(kernel.ours), ifindex=None)
    dp.ifindex = lambda: None  # type: ignore[method-assign]
    assert dp.apply([Op(OpKind.UNBIND, address="198.18.0.1")]) == []
    assert kernel.messages == []
