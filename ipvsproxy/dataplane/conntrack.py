"""Flushing the conntrack entries of removed UDP/SCTP real servers and deleted UDP/SCTP Services.

IPVS NAT with net.ipv4.vs.conntrack=1 leaves a conntrack entry per flow whose
original direction is client -> VIP:port and whose reply direction is
real server -> client. After a UDP/SCTP real server is deleted, a client that
keeps sending from the same port would otherwise keep following that entry
to a dead pod (kube-proxy #76664, #71514), so the entries are deleted, the way
kube-proxy does with `conntrack -D --orig-dst VIP --dst-nat POD`; and when a
UDP/SCTP virtual server goes, every entry to its VIP:port goes too (kube-proxy
flushes a deleted UDP Service IP's entries).

What it costs: the first version dumped the whole conntrack table once per
removed real server, parsed it with pyroute2 and ran inside the sync (17 s to
remove one DNS backend with 20,000 entries; every other Service waited). Now
the sync only hands the removals to a background worker (:class:`ConntrackCleaner`),
which takes whatever piled up, reads each address family ONCE for all of them
(a raw, struct-parsed dump narrowed in the kernel where the filter is correct:
ct_wire.py) and deletes the matches in batches. The sync never waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ..model import AF_INET6, Real, VSKey, join_host_port
from .ct_wire import ConntrackError, ConntrackWire, Filter, Flow

log = logging.getLogger(__name__)

Tuple = tuple[str | None, str | None, int | None, int | None, int | None]  # saddr, daddr, proto, sport, dport


def tuple_of(nla: Any) -> Tuple:
    """(saddr, daddr, proto, sport, dport) of a pyroute2 CTA_TUPLE_* attribute; ports for any
    protocol (pyroute2's own parser reads them only for TCP and UDP). For tests that count
    entries through pyroute2, an independent witness of this module's own parser."""
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


class Removal(NamedTuple):
    """What went away: one real server of a virtual server, or (real None) the virtual server."""

    key: VSKey
    real: Real | None = None

    def __str__(self) -> str:
        if self.real is None:
            return f"{self.key} (deleted)"
        return f"{self.key} -> {join_host_port(self.real.address, self.real.port)}"


class Wire(Protocol):
    def flows(self, family: int, flt: Filter | None = None) -> list[Flow]: ...

    def delete(self, flows: Sequence[Flow]) -> list[ConntrackError | None]: ...

    def close(self) -> None: ...


def _family(key: VSKey) -> int:
    return socket.AF_INET6 if key.family == AF_INET6 else socket.AF_INET


def _pack(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address)


def kernel_filter(family: int, removals: Sequence[Removal]) -> Filter | None:
    """The narrowest kernel-side filter that still returns every entry of `removals` (one family).

    Protocol and ports when they are shared; addresses only for IPv4 (Linux 6.1's IPv6 address
    filter is inverted). What the kernel returns is matched again by :func:`doomed`.
    """
    protos = {r.key.protocol for r in removals}
    if len(protos) != 1:
        return None
    proto = protos.pop()
    ports = {r.key.port for r in removals}
    v4 = family == socket.AF_INET
    vips = {r.key.address for r in removals}
    reals = {(r.real.address, r.real.port) if r.real else None for r in removals}
    real_addrs = {r[0] if r else None for r in reals}
    real_ports = {r[1] if r else None for r in reals}  # None in it: a whole virtual server went
    return Filter(
        proto=proto,
        orig_dport=ports.pop() if len(ports) == 1 else None,
        orig_dst=_pack(family, vips.pop()) if v4 and len(vips) == 1 else None,
        reply_src=_pack(family, a) if v4 and len(real_addrs) == 1 and (a := real_addrs.pop()) else None,
        reply_sport=real_ports.pop() if len(real_ports) == 1 else None,
    )


def doomed(family: int, flows: Iterable[Flow], removals: Sequence[Removal]) -> list[Flow]:
    """The entries to delete: to a removed real server through its virtual server, or to a deleted
    virtual server at all."""
    by_real = {(_pack(family, r.key.address), r.key.port, r.key.protocol, _pack(family, r.real.address),
                r.real.port) for r in removals if r.real is not None}
    by_vip = {(_pack(family, r.key.address), r.key.port, r.key.protocol) for r in removals if r.real is None}
    out = []
    for f in flows:
        if f.family != family:
            continue
        vip = (f.orig_dst, f.orig_dport, f.proto)
        if vip in by_vip or (f.orig_dst, f.orig_dport, f.proto, f.reply_src, f.reply_sport) in by_real:
            out.append(f)
    return out


@dataclass(slots=True)
class CleanupStats:
    """What the cleaner has done, for logs, tests and the benchmark."""

    passes: int = 0  # batches handled (each: one dump per family involved)
    dumps: int = 0
    scanned: int = 0  # entries the kernel returned
    deleted: int = 0
    errors: int = 0
    last_seconds: float = 0.0  # duration of the last batch
    seconds: list[float] = field(default_factory=list)


class ConntrackCleaner:
    """Deletes conntrack entries of removals off the sync's path.

    `submit` queues and returns at once; a worker thread (started on first use)
    takes everything queued so far as one batch. `flush` does one batch in the
    caller's thread (the worker's body; tests and benchmarks call it directly).
    """

    def __init__(self, opener: Callable[[], Wire] = ConntrackWire, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.opener, self.clock = opener, clock
        self._wire: Wire | None = None
        self._pending: list[Removal] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = CleanupStats()
        self._filters_ok = True  # until a kernel (< 5.8) refuses CTA_FILTER

    # ---- the sync's side -----------------------------------------------------------------
    def submit(self, removals: Iterable[Removal]) -> None:
        batch = list(removals)
        if not batch:
            return
        with self._lock:
            if self._stop:
                return
            self._pending += batch
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="conntrack-cleanup", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is queued or being flushed (tests, benchmarks, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
            return True

    def close(self, wait: float = 10.0) -> None:
        """Finish what is queued (at most `wait` seconds: `run --once` exits right after its
        sync), then stop the worker and close the socket."""
        self.wait_idle(wait)
        with self._lock:
            self._stop = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(5)
        self._drop()

    # ---- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                self.flush(batch)
            except Exception as exc:  # best effort: IPVS expires these anyway (expire_nodest_conn)
                self.stats.errors += 1
                log.warning("conntrack cleanup of %d removal(s) (%s%s): %s", len(batch), batch[0],
                            ", ..." if len(batch) > 1 else "", exc)
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            with contextlib.suppress(Exception):  # already broken
                wire.close()

    def flush(self, removals: Sequence[Removal]) -> int:
        """One pass: per address family one dump (kernel-filtered where correct), then the
        matching entries deleted in batches. Returns how many were deleted; raises on netlink
        errors other than an entry that vanished meanwhile (the socket is then reopened)."""
        start = self.clock()
        families: dict[int, list[Removal]] = {}
        for r in dict.fromkeys(removals):
            families.setdefault(_family(r.key), []).append(r)
        deleted = 0
        try:
            if self._wire is None:
                self._wire = self.opener()
            wire = self._wire
            for family, items in families.items():
                flows = self._dump(wire, family, items)
                self.stats.dumps += 1
                self.stats.scanned += len(flows)
                doom = doomed(family, flows, items)
                errors = [e for e in wire.delete(doom) if e is not None] if doom else []
                if errors:
                    raise errors[0]
                deleted += len(doom)
        except Exception:
            self._drop()
            raise
        finally:
            self.stats.passes += 1
            self.stats.last_seconds = self.clock() - start
            self.stats.seconds.append(self.stats.last_seconds)
            del self.stats.seconds[:-100]
        self.stats.deleted += deleted
        if deleted:
            log.debug("conntrack: %d entries of %d removal(s) deleted in %.3fs", deleted, len(removals),
                      self.stats.last_seconds)
        return deleted

    def _dump(self, wire: Wire, family: int, items: Sequence[Removal]) -> list[Flow]:
        flt = kernel_filter(family, items) if self._filters_ok else None
        if flt is None:
            return wire.flows(family)
        try:
            return wire.flows(family, flt)
        except ConntrackError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no CTA_FILTER before Linux 5.8
                raise
            log.info("conntrack: the kernel does not filter dumps (%s); reading whole tables", exc)
            self._filters_ok = False
            return wire.flows(family)
