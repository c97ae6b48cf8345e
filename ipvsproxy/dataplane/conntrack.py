"""Flushing the conntrack entries of a removed UDP/SCTP real server.

IPVS NAT with net.ipv4.vs.conntrack=1 leaves a conntrack entry per flow whose
original direction is client -> VIP:port and whose reply direction is
real server -> client. After a UDP/SCTP real server is deleted, a client that
keeps sending from the same port would otherwise keep following that entry
to a dead pod (kube-proxy #76664, #71514), so the entries are deleted with the
real server, the way kube-proxy does with `conntrack -D --orig-dst VIP
--dst-nat POD`.

A ctnetlink request carries its address family in the message header: an
IPv6 tuple sent in an AF_INET request is rejected (EINVAL). pyroute2 fixes
the family per socket, so there is one socket per family, opened on first use
and kept for the life of the dataplane (not one per removal).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from ..model import Real, VSKey

Tuple = tuple[str | None, str | None, int | None, int | None, int | None]  # saddr, daddr, proto, sport, dport


def open_socket(family: int) -> Any:
    """A pyroute2 ctnetlink socket whose requests are of `family`."""
    from pyroute2 import Conntrack

    return Conntrack(nfgen_family=family)


def tuple_of(nla: Any) -> Tuple:
    """(saddr, daddr, proto, sport, dport) of a CTA_TUPLE_* attribute; ports for any protocol
    (pyroute2's own parser reads them only for TCP and UDP, but deleting an SCTP entry needs them)."""
    ip = nla.get_attr("CTA_TUPLE_IP") if nla is not None else None
    proto = nla.get_attr("CTA_TUPLE_PROTO") if nla is not None else None
    saddr = daddr = None
    if ip is not None:
        saddr = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
        daddr = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    if proto is None:
        return saddr, daddr, None, None, None
    return (saddr, daddr, proto.get_attr("CTA_PROTO_NUM"), proto.get_attr("CTA_PROTO_SRC_PORT"),
            proto.get_attr("CTA_PROTO_DST_PORT"))


def same_ip(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class ConntrackFlusher:
    """Deletes the conntrack entries of flows to one virtual server NAT'd to one real server."""

    def __init__(self, opener: Callable[[int], Any] = open_socket) -> None:
        self.opener = opener
        self._socks: dict[int, Any] = {}

    def _sock(self, family: int) -> Any:
        sock = self._socks.get(family)
        if sock is None:
            sock = self._socks[family] = self.opener(family)
        return sock

    def _drop(self, family: int) -> None:
        sock = self._socks.pop(family, None)
        if sock is not None:
            with contextlib.suppress(Exception):  # already broken
                sock.close()

    def flush(self, key: VSKey, real: Real) -> int:
        """Delete the entries client -> key whose reply comes from `real`; returns how many.

        Entries that vanish meanwhile are fine; other netlink errors are raised (and the
        socket is reopened on the next call).
        """
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        family = socket.AF_INET6 if key.family == socket.AF_INET6 else socket.AF_INET
        ct = self._sock(family)
        try:
            # The kernel filters by protocol and VIP port only (Linux >= 5.8; older kernels dump
            # the whole family); addresses and the reply direction are checked here. Its IPv6
            # address filter cannot be trusted: Debian's 6.1 kernel was seen returning exactly
            # the entries whose address did NOT match.
            orig = NFCTAttrTuple(family=family, dport=key.port, proto=key.protocol)
            doomed = []
            for msg in ct.dump(tuple_orig=orig):
                o = tuple_of(msg.get_attr("CTA_TUPLE_ORIG"))
                r = tuple_of(msg.get_attr("CTA_TUPLE_REPLY"))
                if (o[2] == key.protocol and same_ip(o[1], key.address) and o[4] == key.port
                        and same_ip(r[0], real.address) and r[3] == real.port):
                    doomed.append(o)
            deleted = 0
            for saddr, daddr, proto, sport, dport in doomed:
                try:
                    ct.entry("del", tuple_orig=NFCTAttrTuple(family=family, saddr=saddr, daddr=daddr,
                                                             proto=proto, sport=sport, dport=dport))
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # ENOENT: expired or deleted meanwhile
                        raise
        except Exception:
            self._drop(family)
            raise
        return deleted

    def close(self) -> None:
        for family in list(self._socks):
            self._drop(family)
