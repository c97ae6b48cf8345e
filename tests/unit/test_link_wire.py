"""Host tests for ipvsproxy.dataplane.link_wire against a fake rtnetlink kernel whose
replies pyroute2 encodes and whose requests pyroute2 decodes (an independent reading of
the wire format): looking a link up by name (kind, alias; ENODEV is "none"), creating
a dummy, marking, bringing up and deleting a link, and address dumps over several
receives. The real kernel answers the same in the VM (tests/kernel/test_link_wire.py)."""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ipvsproxy.dataplane.link_wire import AddrInfo, LinkInfo, LinkWire

NLMSG = struct.Struct("=IHHII")
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 17, 18, 20, 22


class FakeRtnl:
    """Links and addresses as the kernel answers for them (requests decoded by pyroute2)."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.links: dict[int, dict[str, Any]] = {1: {"name": "lo", "kind": None, "alias": None, "up": True}}
        self.addrs: list[tuple[int, int, str, str | None, int]] = []  # index, family, address, local, flags
        self.requests: list[Any] = []
        self.without_ifa_flags: set[str] = set()  # addresses answered as older kernels do
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def _ack(self, seq: int, err: int, msg: bytes = b"\0" * 16) -> bytes:
        return NLMSG.pack(36, 2, 0x100, seq, 0) + struct.pack("=i", -err) + msg[:16]

    def _link_reply(self, seq: int, index: int) -> bytes:
        link = self.links[index]
        m = ifinfmsg()
        m["index"] = index
        attrs: list[Any] = [("IFLA_IFNAME", link["name"])]
        if link["alias"]:
            attrs.append(("IFLA_IFALIAS", link["alias"]))
        if link["kind"]:
            attrs.append(("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", link["kind"])]}))
        m["attrs"] = attrs
        m["header"]["type"], m["header"]["sequence_number"] = RTM_NEWLINK, seq
        m.encode()
        return bytes(m.data)

    def _addr_reply(self, seq: int, index: int, family: int, address: str, local: str | None, flags: int) -> bytes:
        m = ifaddrmsg()
        m["family"], m["index"], m["prefixlen"], m["flags"] = family, index, 128 if family == 10 else 32, flags & 0xFF
        attrs: list[Any] = [("IFA_ADDRESS", address)]
        if address not in self.without_ifa_flags:
            attrs.append(("IFA_FLAGS", flags))
        if local:
            attrs.append(("IFA_LOCAL", local))
        m["attrs"] = attrs
        m["header"]["type"], m["header"]["sequence_number"] = RTM_NEWADDR, seq
        m["header"]["flags"] = 2  # NLM_F_MULTI
        m.encode()
        return bytes(m.data)

    def answer(self, data: bytes) -> list[bytes]:
        _, ty, fl, seq, _ = NLMSG.unpack_from(data, 0)
        if ty == RTM_GETADDR:
            msg = ifaddrmsg(data)
            msg.decode()
            self.requests.append(("dump", msg["family"]))
            out = [self._addr_reply(seq, *a) for a in self.addrs if a[1] == msg["family"]]
            # several receives, as a long dump comes, then NLMSG_DONE
            return [b"".join(out[:2]), b"".join(out[2:]), NLMSG.pack(20, 3, 2, seq, 0) + b"\0" * 4]
        msg = ifinfmsg(data)
        msg.decode()
        name, index = msg.get_attr("IFLA_IFNAME"), msg["index"]
        if ty == RTM_GETLINK:
            self.requests.append(("get", name))
            found = [i for i, link in self.links.items() if link["name"] == name]
            return [self._link_reply(seq, found[0]) if found else self._ack(seq, errno.ENODEV, data)]
        if ty == RTM_NEWLINK and not index:
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            self.requests.append(("create", name, kind, fl))
            if any(link["name"] == name for link in self.links.values()):
                return [self._ack(seq, errno.EEXIST, data)]
            if kind != "dummy":
                return [self._ack(seq, errno.EOPNOTSUPP, data)]
            self.links[max(self.links) + 1] = {"name": name, "kind": kind, "alias": None, "up": False}
            return [self._ack(seq, 0, data)]
        if index not in self.links:
            return [self._ack(seq, errno.ENODEV, data)]
        if ty == RTM_DELLINK:
            self.requests.append(("delete", index))
            del self.links[index]
        else:
            alias = msg.get_attr("IFLA_IFALIAS")
            self.requests.append(("set", index, alias, msg["flags"], msg["change"]))
            if alias is not None:
                self.links[index]["alias"] = alias
            if msg["change"] & 1:
                self.links[index]["up"] = bool(msg["flags"] & 1)
        return [self._ack(seq, 0, data)]

    def run(self) -> None:
        while True:
            data = self.theirs.recv(1 << 20)
            if not data:
                return
            for reply in self.answer(data):
                if reply:
                    self.theirs.send(reply)

    def close(self) -> None:
        self.ours.close()
        self.thread.join(5)
        self.theirs.close()


@pytest.fixture
def kernel() -> Iterator[FakeRtnl]:
    k = FakeRtnl()
    yield k
    k.close()


def test_a_link_is_looked_up_by_name_with_its_kind_and_alias(kernel: FakeRtnl) -> None:
    kernel.links[7] = {"name": "eth0", "kind": None, "alias": None, "up": True}
    kernel.links[9] = {"name": "nodelocaldns", "kind": "dummy", "alias": "the node's DNS", "up": True}
    wire = LinkWire.for_socket(kernel.ours)
    assert wire.link("eth0") == LinkInfo(7, "eth0", None, None)  # a physical device has no kind
    assert wire.link("nodelocaldns") == LinkInfo(9, "nodelocaldns", "dummy", "the node's DNS")
    assert wire.link("missing0") is None  # ENODEV
    assert kernel.requests == [("get", "eth0"), ("get", "nodelocaldns"), ("get", "missing0")]


def test_a_dummy_is_created_marked_brought_up_and_deleted(kernel: FakeRtnl) -> None:
    wire = LinkWire.for_socket(kernel.ours)
    wire.add_dummy("ipvsproxy0")
    link = wire.link("ipvsproxy0")
    assert link is not None and link.kind == "dummy" and link.alias is None
    wire.set_alias(link.index, "ipvsproxy")
    wire.set_up(link.index)
    assert kernel.links[link.index] == {"name": "ipvsproxy0", "kind": "dummy", "alias": "ipvsproxy", "up": True}
    (_, _, _, flags), = [r for r in kernel.requests if r[0] == "create"]
    assert flags == 0x1 | 0x4 | 0x400 | 0x200  # REQUEST|ACK|CREATE|EXCL: a taken name is EEXIST, never reused
    with pytest.raises(OSError) as taken:
        wire.add_dummy("ipvsproxy0")
    assert taken.value.errno == errno.EEXIST
    assert str(taken.value.strerror) == "cannot create dummy interface ipvsproxy0: File exists"
    wire.delete(link.index)
    assert wire.link("ipvsproxy0") is None
    with pytest.raises(OSError, match=r"cannot bring interface 99 up: No such device") as gone:
        wire.set_up(99)
    assert gone.value.errno == errno.ENODEV


def test_address_dumps_read_every_message_of_one_family_and_filter_by_interface(kernel: FakeRtnl) -> None:
    kernel.addrs = [(1, 2, "127.0.0.1", "127.0.0.1", 0x80), (3, 2, "198.18.0.1", "198.18.0.1", 0x80),
                    (4, 2, "10.9.9.11", "10.9.9.10", 0x80), (3, 2, "198.18.0.2", "198.18.0.2", 0x80),
                    (3, 10, "fd00::9", None, 0x82), (3, 10, "fe80::1", None, 0x80), (3, 10, "fd00::a", None, 0x02)]
    kernel.without_ifa_flags = {"fd00::a"}  # no IFA_FLAGS attribute: the header's (8-bit) flags
    wire = LinkWire.for_socket(kernel.ours)
    v4 = wire.addresses(socket.AF_INET)
    assert [(a.index, a.address, a.local) for a in v4] == [
        (1, "127.0.0.1", "127.0.0.1"), (3, "198.18.0.1", "198.18.0.1"), (4, "10.9.9.11", "10.9.9.10"),
        (3, "198.18.0.2", "198.18.0.2")]
    assert [a.address for a in wire.addresses(socket.AF_INET, 3)] == ["198.18.0.1", "198.18.0.2"]
    assert [a.address for a in wire.addresses(socket.AF_INET, other_than={3, None})] == ["127.0.0.1", "10.9.9.11"]
    assert wire.addresses(socket.AF_INET6, 3) == [AddrInfo(3, socket.AF_INET6, "fd00::9", None, 0x82),
                                                  AddrInfo(3, socket.AF_INET6, "fe80::1", None, 0x80),
                                                  AddrInfo(3, socket.AF_INET6, "fd00::a", None, 0x02)]
    assert kernel.requests == [("dump", 2), ("dump", 2), ("dump", 2), ("dump", 10)]


def test_the_agent_never_imports_pyroute2() -> None:
    """pyroute2's import alone cost 0.3-0.6 s of every start on the host, seconds in the VM."""
    code = ("import sys; import ipvsproxy.agent, ipvsproxy.dataplane.netlink, ipvsproxy.cli.main, "
            "ipvsproxy.sources.kube; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
