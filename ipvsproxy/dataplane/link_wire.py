"""The dummy interface and the node's addresses over rtnetlink, without pyroute2.

Why: pyroute2's ``IPRoute`` was the agent's last use of pyroute2. Importing it
cost 0.3-0.6 s on the host, several seconds at every start in the emulated
test VM (part of the 8.3 s "opening the dataplane" of a 1,000-Service start,
docs/benchmarks.md), and it decoded every address of an address dump into
objects of its own, where a full sync lists every bound address (11,102 at
10,000 Services). The dataplane asks six things of links, all answered here
with :mod:`struct` over the socket machinery the IPVS and address codecs share
(:class:`~.netlink_wire.NetlinkWire`): one interface by name (index, kind,
alias), create a dummy, set an alias, bring a link up, delete a link, and the
addresses of one family (optionally of one interface).

A kernel error raises OSError whose text says what could not be done and
the kernel's words ("cannot create dummy interface x: Operation not
supported: Unknown device type"). Messages are what ``ip link`` and ``ip
address show`` send: ``RTM_GETLINK``
with ``IFLA_IFNAME`` (ENODEV: no such interface), ``RTM_NEWLINK`` with
``NLM_F_CREATE|NLM_F_EXCL`` and ``IFLA_LINKINFO``/``IFLA_INFO_KIND`` to create,
``RTM_NEWLINK`` on an index to change (``IFLA_IFALIAS``; ``IFF_UP`` in
``ifi_flags``/``ifi_change``), ``RTM_DELLINK``, and an ``RTM_GETADDR`` dump.
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

from .addr_wire import IFA_ADDRESS, IFA_LOCAL, RTM_NEWADDR
from .netlink_wire import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG,
    NetlinkWire,
    attrs,
    nla,
)

__all__ = ["AddrInfo", "LinkInfo", "LinkWire"]

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_GETADDR = 22
IFLA_IFNAME, IFLA_LINKINFO, IFLA_IFALIAS = 3, 18, 20
IFLA_INFO_KIND = 1
IFA_FLAGS = 8
IFF_UP = 0x1

IFINFO = struct.Struct("=BxHiII")  # struct ifinfomsg: family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # struct ifaddrmsg: family, prefixlen, flags, scope, index
_U32 = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One interface as the dataplane needs to know it."""

    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND ("dummy", "veth", ...); None for a physical device
    alias: str | None  # IFLA_IFALIAS


@dataclass(frozen=True, slots=True)
class AddrInfo:
    """One address of an interface (IFA_ADDRESS; IFA_LOCAL where it differs: a peer's)."""

    index: int
    family: int
    address: str | None
    local: str | None
    flags: int  # IFA_FLAGS when the kernel sends it (it holds all of them), else ifa_flags


def _text(buf: bytes | bytearray, where: tuple[int, int] | None) -> str | None:
    if where is None:
        return None
    return bytes(buf[where[0]:where[0] + where[1]]).split(b"\0", 1)[0].decode(errors="replace")


def _ip(buf: bytes | bytearray, where: tuple[int, int] | None, family: int) -> str | None:
    if where is None or where[1] not in (4, 16):
        return None
    return socket.inet_ntop(family, bytes(buf[where[0]:where[0] + where[1]]))


def _link_message(cmd: int, flags: int, index: int, body: bytes = b"", *, up: bool = False) -> bytes:
    """nlmsghdr + ifinfomsg + attributes, the sequence number left 0 (see _with_seq)."""
    info = IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)
    return NLMSG.pack(16 + IFINFO.size + len(body), cmd, flags, 0, 0) + info + body


def _with_seq(message: bytes, seq: int) -> bytes:
    return message[:8] + _U32.pack(seq) + message[12:]


class LinkWire(NetlinkWire):
    """An rtnetlink socket for the dummy interface and address listings."""

    def __init__(self) -> None:
        self._open(NETLINK_ROUTE, 16, True)

    @classmethod
    def for_socket(cls, sock: socket.socket) -> LinkWire:
        """Wrap an already-open socket (tests, fakes)."""
        self = cls.__new__(cls)
        self._setup(sock, 16, True)
        return self

    def _change(self, message: bytes, what: str) -> None:
        self.transact(lambda seq: _with_seq(message, seq), what)

    def link(self, name: str) -> LinkInfo | None:
        """The interface called `name` (None: there is none)."""
        msg = _link_message(RTM_GETLINK, NLM_F_REQUEST, 0, nla(IFLA_IFNAME, name.encode() + b"\0"))
        try:
            reply = self.transact(lambda seq: _with_seq(msg, seq), f"cannot look up interface {name}")
        except OSError as exc:
            if exc.errno == _errno.ENODEV:
                return None
            raise
        if reply is None or reply[0] != RTM_NEWLINK:
            return None
        _, off, ln = reply
        return self._decode_link(off, ln)

    def _decode_link(self, off: int, ln: int) -> LinkInfo:
        buf = self._buf
        _, _, index, _, _ = IFINFO.unpack_from(buf, off + 16)
        a = attrs(buf, off + 16 + IFINFO.size, off + ln)
        kind = None
        info = a.get(IFLA_LINKINFO)
        if info is not None:
            kind = _text(buf, attrs(buf, info[0], info[0] + info[1]).get(IFLA_INFO_KIND))
        return LinkInfo(index, _text(buf, a.get(IFLA_IFNAME)) or "", kind, _text(buf, a.get(IFLA_IFALIAS)))

    def add_dummy(self, name: str) -> None:
        """Create a dummy interface `name` (EEXIST when the name is taken)."""
        kind = nla(IFLA_LINKINFO, nla(IFLA_INFO_KIND, b"dummy"))
        body = nla(IFLA_IFNAME, name.encode() + b"\0") + kind
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        self._change(_link_message(RTM_NEWLINK, flags, 0, body), f"cannot create dummy interface {name}")

    def set_alias(self, index: int, alias: str) -> None:
        body = nla(IFLA_IFALIAS, alias.encode() + b"\0")
        self._change(_link_message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, index, body),
                     f"cannot set the alias of interface {index}")

    def set_up(self, index: int) -> None:
        self._change(_link_message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, index, up=True),
                     f"cannot bring interface {index} up")

    def delete(self, index: int) -> None:
        self._change(_link_message(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, index), f"cannot delete interface {index}")

    def addresses(self, family: int, index: int | None = None,
                  other_than: Collection[int | None] = ()) -> list[AddrInfo]:
        """Every address of `family` (on interface `index` only, when given; on none of
        `other_than`: those are passed over before their attributes are read, as the
        node's addresses are looked for past the 10,000 on our own interface)."""
        request = NLMSG.pack(16 + IFADDR.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 0, 0) + \
            IFADDR.pack(family, 0, 0, 0, 0)
        buf = self._buf

        def decode(ty: int, off: int, ln: int) -> AddrInfo | None:
            if ty != RTM_NEWADDR:
                return None
            fam, _, flags, _, idx = IFADDR.unpack_from(buf, off + 16)
            if fam != family or (index is not None and idx != index) or idx in other_than:
                return None
            a = attrs(buf, off + 16 + IFADDR.size, off + ln)
            full = a.get(IFA_FLAGS)
            if full is not None and full[1] >= 4:
                flags = _U32.unpack_from(buf, full[0])[0]
            return AddrInfo(idx, fam, _ip(buf, a.get(IFA_ADDRESS), fam), _ip(buf, a.get(IFA_LOCAL), fam), flags)

        return self.dump(lambda seq: _with_seq(request, seq), decode, f"cannot list the addresses of family {family}")
