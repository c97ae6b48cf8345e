"""The references ipvsproxy is measured against, in the same VM run.

`ipvsadm -R`: the C tool loading the identical table from restore text we
generate from the desired state (with the ownership mark as flag-3, so the
table is bit-for-bit what ipvsproxy programs). `ip -batch`: the addresses
bound the same way, for a like-for-like "whole node state" reference. The
naive pyroute2 loop: one request and one acknowledgement per object through
pyroute2's IPVS API, as a straightforward Python agent would do it.
"""

from __future__ import annotations

import gc
import subprocess
import time
from collections.abc import Iterable
from typing import Any

from ..model import (
    AF_INET6,
    F_OWNED,
    F_SCHED1,
    F_SCHED2,
    DesiredState,
    Protocol,
    VirtualServer,
    VSKey,
    ip_version,
    join_host_port,
)

_PROTO_FLAG = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}


def _sched_flags(vs: VirtualServer) -> str:
    names = []
    for bit, name in ((F_SCHED1, "flag-1"), (F_SCHED2, "flag-2"), (F_OWNED, "flag-3")):
        if vs.kernel_flags & bit:
            names.append(name)
    return ",".join(names)


def ipvsadm_rules(desired: DesiredState) -> str:
    """`ipvsadm -R` input for the desired table (what `ipvsadm -Sn` would print)."""
    lines: list[str] = []
    for key in sorted(desired.services, key=_sort_key):
        vs = desired.services[key]
        svc = f"{_PROTO_FLAG[Protocol(key.protocol)]} {join_host_port(key.address, key.port)}"
        line = f"-A {svc} -s {vs.scheduler}"
        if vs.timeout:
            line += f" -p {vs.timeout}"
            if key.family == AF_INET6:
                line += " -M 128"
        flags = _sched_flags(vs)
        if flags:
            line += f" -b {flags}"
        lines.append(line)
        for r in vs.reals:
            lines.append(f"-a {svc} -r {join_host_port(r.address, r.port)} -m -w {r.weight}")
    return "\n".join(lines) + "\n"


def _sort_key(key: VSKey) -> tuple[int, int, str, int]:
    return (key.family, key.protocol, key.address, key.port)


def ip_batch(addresses: Iterable[str], dev: str) -> str:
    """`ip -batch` input binding the addresses to the dummy interface."""
    out = []
    for a in sorted(addresses):
        out.append(f"address add {a}/128 dev {dev} nodad" if ip_version(a) == 6 else f"address add {a}/32 dev {dev}")
    return "\n".join(out) + "\n"


def run_timed(cmd: list[str], stdin: str) -> float:
    """Run a command feeding stdin; returns wall seconds; raises with its stderr on failure."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return elapsed


def ipvsadm_restore(desired: DesiredState) -> dict[str, Any]:
    rules = ipvsadm_rules(desired)
    seconds = run_timed(["ipvsadm", "-R"], rules)
    return {"wall_s": seconds, "lines": rules.count("\n"), "bytes": len(rules)}


def ipvsadm_save() -> dict[str, Any]:
    """`ipvsadm -Sn` of the table as it stands: the kernel's whole table dumped (one netlink dump
    per virtual server, decoded in C) and printed; the yardstick of restart adoption and the
    periodic full resync (issue 18's target 3)."""
    t = time.perf_counter()
    proc = subprocess.run(["ipvsadm", "-S", "-n"], capture_output=True, check=False)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"ipvsadm -Sn failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[:500]}")
    return {"wall_s": elapsed, "lines": proc.stdout.count(b"\n")}


def ipvsadm_clear() -> float:
    return run_timed(["ipvsadm", "-C"], "")


def naive_pyroute2(desired: DesiredState) -> dict[str, Any]:
    """Program the table one object at a time through pyroute2.IPVS (request + ack each)."""
    from pyroute2 import IPVS, IPVSDest, IPVSService

    objects = 0
    # The harness holds the whole synthetic cluster; pyroute2 allocates so much per message that
    # the cyclic GC would keep walking that heap (2.5x slower per object at 10k Services). Freeze
    # it, so the loop costs what it costs in a small process.
    gc.collect()
    gc.freeze()
    t = time.perf_counter()
    ipvs = IPVS()
    try:
        for key in sorted(desired.services, key=_sort_key):
            vs = desired.services[key]
            spec: dict[str, Any] = {"af": key.family, "protocol": key.protocol, "addr": key.address,
                                    "port": key.port, "sched_name": vs.scheduler,
                                    "flags": {"flags": vs.kernel_flags, "mask": 0xFFFFFFFF},
                                    # IPv6: the kernel reads a prefix length, host order, from this u32
                                    "netmask": "128.0.0.0" if key.family == AF_INET6 else "255.255.255.255"}
            if vs.timeout:
                spec["timeout"] = vs.timeout
            svc = IPVSService(**spec)
            ipvs.service("add", service=svc)
            objects += 1
            for r in vs.reals:
                ipvs.dest("add", service=svc, dest=IPVSDest(addr=r.address, port=r.port, weight=r.weight,
                                                            fwd_method=0))
                objects += 1
    finally:
        ipvs.close()
        gc.unfreeze()
    seconds = time.perf_counter() - t
    return {"wall_s": seconds, "objects": objects, "per_object_ms": 1000 * seconds / max(objects, 1)}


def subset(desired: DesiredState, max_objects: int) -> DesiredState:
    """The first virtual servers (sorted) whose objects (VS + RS) fit in max_objects."""
    out = DesiredState()
    n = 0
    for key in sorted(desired.services, key=_sort_key):
        vs = desired.services[key]
        cost = 1 + len(vs.reals)
        if n + cost > max_objects and out.services:
            break
        out.services[key] = vs
        n += cost
    return out
