"""Every virtual server's real servers as /proc/net/ip_vs prints them: a whole-table read in
one file instead of one netlink dump per virtual server.

Why: IPVS's netlink API dumps real servers one virtual server at a time (GET_DEST needs the
service), so reading a table of 16,838 virtual servers (10,000 Services x 10) costs 16,838
requests and twice as many receives, ~30 s of the agent's Python in the test VM, about three
times `ipvsadm -Sn` on the same table. The proc file prints the same table in one pass of the
kernel (`ip_vs_info_seq_show` in net/netfilter/ipvs/ip_vs_ctl.c), each real server on a line:

    TCP  0A600001:0050 rr
      -> 0A000102:1F90      Masq    1      0          0
    TCP  [2001:0db8:0000:0000:0000:0000:0000:0001]:0050 rr
      -> [2001:0db8:0000:0000:0000:0000:0000:0102]:1F90      Masq    1      0          0

What a line holds is what a sync compares of a real server: address, port, weight, active
and inactive connections. What it lacks (a real server's traffic counters, thresholds, the
service's scheduler flags and netmask) is why the service settings still come from the
netlink services dump (one dump for the whole table) and why `ipvsproxy list --stats` reads
real servers over netlink. A virtual server whose lines cannot be read here is left out of
the result, and the caller dumps it over netlink instead (NetlinkDataplane.observe).
"""

from __future__ import annotations

import socket
import types
from collections.abc import Iterable, Mapping

from ..model import ObservedReal, VSKey

PROC_PATH = "/proc/net/ip_vs"
READ_SIZE = 1 << 20  # bytes per read(): the kernel re-walks its service table at each read's start

Reals = dict[tuple[str, int], ObservedReal]
NO_COUNTERS: Mapping[str, int] = types.MappingProxyType({})  # a real server's traffic counters: not here

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
_PROTOCOLS = {"TCP": int(socket.IPPROTO_TCP), "UDP": int(socket.IPPROTO_UDP), "SCTP": int(socket.IPPROTO_SCTP)}


def _endpoint(text: str) -> tuple[int, str, int]:
    """`0A000102:1F90` or `[2001:0db8:...:0102]:1F90` as (family, canonical address, port);
    ValueError (or OSError from inet_pton) when it is neither."""
    if text[0] == "[":
        addr, _, port = text[1:].partition("]:")
        return AF_INET6, socket.inet_ntop(AF_INET6, socket.inet_pton(AF_INET6, addr)), int(port, 16)
    addr, _, port = text.partition(":")
    if len(addr) != 8:
        raise ValueError(f"not an IPv4 address: {addr!r}")
    return AF_INET, socket.inet_ntop(AF_INET, bytes.fromhex(addr)), int(port, 16)


def parse(lines: Iterable[str]) -> dict[VSKey, Reals]:
    """The real servers of every (non firewall-mark) virtual server in the file's lines, as
    ObservedReal records without traffic counters. A virtual server with a line that does not
    read as expected is left out (the caller reads it another way); so are firewall-mark
    services and any protocol this module does not know."""
    out: dict[VSKey, Reals] = {}
    reals: Reals | None = None  # the current virtual server's (None: skipping its lines)
    key: VSKey | None = None
    ntop, fromhex = socket.inet_ntop, bytes.fromhex
    for line in lines:
        if line.startswith("  -> "):
            if reals is None:
                continue
            parts = line.split()
            try:
                ep = parts[1]
                if ep[0] != "[" and len(ep) == 13 and ep[8] == ":":  # IPv4, the common case inline
                    addr, port = ntop(AF_INET, fromhex(ep[:8])), int(ep[9:], 16)
                else:
                    _, addr, port = _endpoint(ep)
                reals[(addr, port)] = ObservedReal(addr, port, int(parts[3]), int(parts[4]), int(parts[5]),
                                                   NO_COUNTERS)
            except (IndexError, ValueError, OSError):
                if key is not None:
                    out.pop(key, None)
                reals = key = None
            continue
        reals = key = None
        parts = line.split()
        proto = _PROTOCOLS.get(parts[0]) if parts else None
        if proto is None or len(parts) < 3:  # the header lines, FWM services, anything unknown
            continue
        try:
            family, addr, port = _endpoint(parts[1])
        except (ValueError, OSError):
            continue
        key = VSKey(family, proto, addr, port)
        reals = out[key] = {}
    return out


def read(path: str = PROC_PATH) -> dict[VSKey, Reals]:
    """`parse` of the file at `path`, streamed (the text of a large table is never held whole);
    OSError when it cannot be read (no IPVS, no procfs), UnicodeDecodeError on a non-ASCII file."""
    with open(path, encoding="ascii", buffering=READ_SIZE) as f:
        return parse(f)
