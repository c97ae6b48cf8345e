"""The nftables companion's own cost, with the real ``nft``: per change and per drift check.

Why this exists: the churn scenario runs the companion with a no-op ``nft`` on
the host, so it could not see that a change waited for a whole-table read
(issue 18: minutes under emulation). Here :class:`~ipvsproxy.dataplane.nft.NftFirewall`
runs as the agent runs it (``nft -j -f -`` transactions, set contents read over
netlink) against tables of a chosen number of set elements, and reports:

* one endpoint added to a Service, removed again, and one Service added: the time of the
  incremental sync, and how many whole-table reads and ``nft list``
  documents it issued (must be 0);
* the full drift check (a full sync with nothing changed: structure listing,
  every set read over netlink, whole-table diff);
* a restart: a new companion adopting the table (one read, nothing sent);
* for comparison, ``nft -j list table`` (what the drift check used to read).

The measurement runs in a private network namespace (``unshare --net``), so the
host's own ruleset is never read or touched: :func:`run_isolated` starts this
module as ``python -m ipvsproxy.bench.nftcost N...`` inside one and reads its
JSON. Needs root, ``nft`` and ``unshare``; otherwise it says why and measures
nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from ..config import AgentConfig, parse_cidrs
from ..model import AF_INET, Change, Delta, Real, ServiceKind, ServiceRef, VirtualServer, VSKey

ENDPOINTS = 10
PER_SERVICE = 3 + ENDPOINTS  # services4, vips4 and masq4, plus one hairpin4 element per endpoint
PODS = "198.19.0.0/16"


def _server(i: int, endpoints: int = ENDPOINTS) -> VirtualServer:
    """Service i: a ClusterIP in 198.18.0.0/16 with `endpoints` pods in 198.19.0.0/16."""
    vip = f"198.18.{i >> 8 & 255}.{i & 255}"
    reals = tuple(Real(f"198.19.{(i * 16 + e) >> 8 & 255}.{(i * 16 + e) & 255}", 8080 + (i >> 12))
                  for e in range(endpoints))
    return VirtualServer(VSKey(AF_INET, 6, vip, 80), reals=reals,
                         service=ServiceRef("bench", f"svc-{i}", "http", ServiceKind.CLUSTER_IP))


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"median": round(statistics.median(ms), 2), "max": round(ms[-1], 2), "n": len(ms)}


def measure(elements: int, changes: int = 20) -> dict[str, Any]:
    """One table of about `elements` set elements: cold, per-change and drift-check costs."""
    from ..dataplane.nft import FAMILY, SETS, TABLE, NftError, NftFirewall, run_nft_cli
    from ..dataplane.nft_wire import NftWire

    n = max(1, elements // PER_SERVICE)
    fw = NftFirewall(AgentConfig(node_name="bench", cluster_cidrs=parse_cidrs(PODS), nftables=True))
    fw.cleanup()
    current = {vs.key: vs for vs in (_server(i) for i in range(n))}
    t = time.perf_counter()
    fw.sync({k: Change(None, vs) for k, vs in current.items()}, full=True)
    out: dict[str, Any] = {"elements": sum(len(v) for v in fw.desired_elements_of(current.values()).values()),
                           "services": n, "cold_s": round(time.perf_counter() - t, 3)}

    def timed(delta: Delta) -> float:
        t0 = time.perf_counter()
        fw.sync(delta)
        return time.perf_counter() - t0

    reads, listings, tx, nl = fw.reads, fw.listings, fw.transactions, fw.netlink_transactions
    endpoint, removed, service = [], [], []
    for c in range(changes):
        old = current[_server(c * 7 % n).key]
        new = VirtualServer(old.key, reals=(*old.reals, Real(f"198.19.255.{c + 1}", old.reals[0].port)),
                            service=old.service)
        endpoint.append(timed({new.key: Change(old, new)}))
        removed.append(timed({new.key: Change(new, old)}))  # and gone again: a delete
        added = _server(n + c)
        current[added.key] = added
        service.append(timed({added.key: Change(None, added)}))
    out["one_endpoint_ms"] = _summary(endpoint)
    out["one_endpoint_removed_ms"] = _summary(removed)
    out["one_service_ms"] = _summary(service)
    out["change_reads"] = fw.reads - reads
    out["change_listings"] = fw.listings - listings
    out["change_transactions"] = fw.transactions - tx
    out["change_netlink_transactions"] = fw.netlink_transactions - nl  # of them, without starting nft
    checks = []
    for _ in range(3):
        t = time.perf_counter()
        sent = fw.sync({}, full=True)
        checks.append(time.perf_counter() - t)
        out.setdefault("drift_check_changes", sent)
    out["drift_check_ms"] = _summary(checks)
    t = time.perf_counter()  # a restart: a new companion adopts the table (reads it, sends nothing)
    fresh = NftFirewall(fw.cfg)
    out["adoption_changes"] = fresh.sync({k: Change(None, vs) for k, vs in current.items()}, full=True)
    out["adoption_ms"] = round((time.perf_counter() - t) * 1000, 1)
    fresh.close()
    t = time.perf_counter()
    try:  # under emulation this listing can outlast nft's 60 s limit: that is a result too
        run_nft_cli({"nftables": [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]})
        out["nft_list_table_s"] = round(time.perf_counter() - t, 3)
    except NftError as exc:
        out["nft_list_table_s"] = None
        out["nft_list_table_error"] = str(exc)
    with NftWire() as wire:  # nft's own listing outlasts 60 s at 10,000 elements under emulation
        held = {spec.name: wire.elements(FAMILY, TABLE, spec.name, spec.type, interval=spec.interval,
                                         cidr=spec.cidr) for spec in SETS}
    out["table_matches_desired"] = held == fw.desired_elements_of(current.values())
    fw.cleanup()
    return out


def run_isolated(sizes: tuple[int, ...], changes: int = 20, timeout: float = 3600.0) -> dict[str, Any]:
    """`measure` each size in a fresh private network namespace; {"skipped": why} when it cannot."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (nft, and unshare for a private network namespace)"}
    for tool in ("nft", "unshare"):
        if shutil.which(tool) is None:
            return {"skipped": f"{tool} is not installed"}
    cmd = ["unshare", "--net", "--", sys.executable, "-m", "ipvsproxy.bench.nftcost",
           f"--changes={changes}", *map(str, sizes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"skipped": f"the measurement failed: {tail}"}
    return {"command": " ".join(cmd[3:]), "sizes": json.loads(proc.stdout)}


def main(argv: list[str]) -> int:
    changes = 20
    sizes = []
    for arg in argv:
        if arg.startswith("--changes="):
            changes = int(arg.split("=", 1)[1])
        else:
            sizes.append(int(arg))
    print(json.dumps([measure(n, changes) for n in sizes]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
