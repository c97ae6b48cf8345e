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
from collections.abc import Iterable

PROC_PATH = "/proc/net/ip_vs"

ProcKey = tuple[int, int, str, int]  # family, protocol number, address, port: VSKey's fields
ProcReal = tuple[str, int, int, int, int]  # address, port, weight, active, inactive connections

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
_PROTOCOLS = {"TCP": int(socket.IPPROTO_TCP), "UDP": int(socket.IPPROTO_UDP), "SCTP": int(socket.IPPROTO_SCTP)}


def read_text(path: str = PROC_PATH) -> str:
    """The whole file in large reads (the kernel re-walks its service table at every read's
    start, so small reads of a big table cost more). Raises OSError when it cannot be read."""
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks).decode("ascii")


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


def parse(lines: Iterable[str]) -> dict[ProcKey, list[ProcReal]]:
    """The real servers of every (non firewall-mark) virtual server in the file's lines, each
    list in the kernel's order. A virtual server with a line that does not read as expected
    is left out (the caller reads it another way); so are firewall-mark services and any
    protocol this module does not know."""
    out: dict[ProcKey, list[ProcReal]] = {}
    reals: list[ProcReal] | None = None  # the current virtual server's (None: skipping its lines)
    key: ProcKey | None = None
    ntop4, fromhex = socket.inet_ntop, bytes.fromhex
    for line in lines:
        if line.startswith("  -> "):
            if reals is None:
                continue
            parts = line.split()
            try:
                ep = parts[1]
                if ep[0] != "[" and len(ep) == 13 and ep[8] == ":":  # IPv4, the common case inline
                    addr, port = ntop4(AF_INET, fromhex(ep[:8])), int(ep[9:], 16)
                else:
                    _, addr, port = _endpoint(ep)
                reals.append((addr, port, int(parts[3]), int(parts[4]), int(parts[5])))
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
        key = (family, proto, addr, port)
        reals = out[key] = []
    return out


def read(path: str = PROC_PATH) -> dict[ProcKey, list[ProcReal]]:
    """`parse` of the file at `path`; OSError when it cannot be read (no IPVS, no procfs)."""
    return parse(read_text(path).splitlines())
