"""Benchmark: what removing UDP endpoints costs with a full conntrack table (docs/benchmarks.md).

Runs inside the IPVS test VM, as root:

    bash scripts/vm-run.sh --timeout 3600 -- "python scripts/bench_conntrack.py --out results/ct-after.json"
    bash scripts/vm-run.sh --timeout 3600 -- "python scripts/bench_conntrack.py --tree /path/to/old/checkout \
        --out results/ct-before.json"

For each table size (0 / 20,000 / 100,000 entries) and each number of endpoints removed in
one sync (1 / 50), a fresh process (PYTHONPATH=--tree, so an older checkout is measured the
same way) programs a UDP Service (VIP:53, 60 endpoints) through the reconciler, fills the
conntrack table through ctnetlink (what `conntrack -I` does: half the entries are NAT'd DNS
flows spread over the 60 endpoints, half go to another VIP:53), removes the endpoints and
measures:

- sync: how long `Reconciler.sync()` took (what every other Service update waits for);
- flush: how long the conntrack cleanup took (inside the sync before; in the background
  worker after), and when the last doomed entry was gone, counted from the sync's start;
- deleted: entries deleted (the table's count before minus after).

A case that runs longer than --timeout is stopped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VIP, OTHER, DEV, NODE = "198.18.80.53", "198.18.80.54", "ipvsbench0", "ct-bench"
ENDPOINTS = 60


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True).stdout


def ct_count() -> int:
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())


def fill(n: int) -> None:
    """n NAT'd UDP entries through ctnetlink, stdlib only (independent of the tree measured)."""
    def nla(ty: int, payload: bytes) -> bytes:
        ln = 4 + len(payload)
        return struct.pack("=HH", ln, ty) + payload + b"\0" * ((4 - ln % 4) % 4)

    def tup(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
        ip = nla(1 | 0x8000, nla(1, src) + nla(2, dst))
        pr = nla(2 | 0x8000, nla(1, bytes([17])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport)))
        return ip + pr

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    sock.bind((0, 0))
    vip, other = socket.inet_aton(VIP), socket.inet_aton(OTHER)
    seq, sent, batch = 1, 0, []
    for i in range(n):
        client = socket.inet_aton(f"198.19.{(i >> 8) & 0xFF}.{i & 0xFF}")
        cport = 1024 + (i >> 16)
        if i % 2 == 0:
            dst, real = vip, socket.inet_aton(f"198.18.81.{(i // 2) % ENDPOINTS + 1}")
        else:
            dst, real = other, socket.inet_aton(f"198.18.82.{(i // 2) % ENDPOINTS + 1}")
        body = (struct.pack("=BBH", socket.AF_INET, 0, 0) + nla(1 | 0x8000, tup(client, dst, cport, 53))
                + nla(2 | 0x8000, tup(real, client, 5353, cport)) + nla(7, struct.pack("!I", 1200)))
        batch.append(struct.pack("=IHHII", 16 + len(body), (1 << 8) | 0, 0x1 | 0x4 | 0x400 | 0x200, seq, 0) + body)
        seq += 1
        if len(batch) == 200 or i == n - 1:
            sock.send(b"".join(batch))
            acks = 0
            while acks < len(batch):
                data = sock.recv(1 << 20)
                off = 0
                while off + 16 <= len(data):
                    ln, ty = struct.unpack_from("=IH", data, off)
                    if ty == 2:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err:
                            raise OSError(err, f"conntrack create: {os.strerror(err)}")
                        acks += 1
                    off += (ln + 3) & ~3
            sent += len(batch)
            batch = []
    sock.close()


def expected(entries: int, removed: int) -> int:
    """Entries fill() gives the removed endpoints (the last `removed` of the 60)."""
    doomed = set(range(ENDPOINTS - removed, ENDPOINTS))
    return sum(1 for j in range((entries + 1) // 2) if j % ENDPOINTS in doomed)


def run_case(entries: int, removed: int) -> dict[str, Any]:
    """One case, in this process (PYTHONPATH decides which ipvsproxy is measured)."""
    from ipvsproxy.config import AgentConfig
    from ipvsproxy.dataplane.netlink import NetlinkDataplane
    from ipvsproxy.model import VSKey
    from ipvsproxy.plan import Op, OpKind
    from ipvsproxy.reconcile import Reconciler
    from ipvsproxy.schedulers import Registry
    from ipvsproxy.tracker import Tracker
    from ipvsproxy.translate import Config

    def eps(n: int) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": "dns-a", "namespace": "b", "labels": {"kubernetes.io/service-name": "dns"}},
                "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": [{"addresses": [f"198.18.81.{i + 1}"], "conditions": {"ready": True}}
                              for i in range(n)]}

    cfg = AgentConfig(node_name=NODE, interface=DEV, healthz_bind_address="", metrics_bind_address="")
    dp = NetlinkDataplane(cfg)
    tracker = Tracker(NODE)
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    tracker.replace("Service", [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "b"},
                                 "spec": {"clusterIP": VIP, "ports": [{"name": "dns", "port": 53,
                                                                      "protocol": "UDP"}]}}])
    tracker.replace("EndpointSlice", [eps(ENDPOINTS)])
    tracker.replace("Node", [])
    dp.setup()
    rec.sync(full=True)
    sh("conntrack", "-F")
    t = time.monotonic()
    fill(entries)
    fill_s = time.monotonic() - t
    before = ct_count()
    flush_time = [0.0]
    cleaner = getattr(dp, "conntrack", None)
    if hasattr(dp, "flush_conntrack"):  # the old code: flushes inside the sync, one dump per removal
        inner = dp.flush_conntrack

        def timed(op: Any) -> None:
            s = time.monotonic()
            inner(op)
            flush_time[0] += time.monotonic() - s
        dp.flush_conntrack = timed  # type: ignore[method-assign]
    tracker.upsert("EndpointSlice", eps(ENDPOINTS - removed))
    t0 = time.monotonic()
    report = rec.sync()
    sync_s = time.monotonic() - t0
    if cleaner is not None and hasattr(cleaner, "wait_idle"):  # the new code: a background worker
        cleaner.wait_idle(3600)
        flush_time[0] = sum(cleaner.stats.seconds)
    gone_s = time.monotonic() - t0
    after = ct_count()
    dels = sum(1 for op in report.ops if op.kind.value == "del-rs")
    dp.apply([Op(OpKind.DEL_VS, VSKey(socket.AF_INET, 17, VIP, 53))])
    dp.remove_interface()
    dp.close()
    return {"entries": entries, "removed": removed, "del_rs": dels, "fill_s": round(fill_s, 2),
            "sync_s": round(sync_s, 3), "flush_s": round(flush_time[0], 3), "gone_after_s": round(gone_s, 3),
            "deleted": before - after, "expected": expected(entries, removed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(ROOT), help="checkout whose ipvsproxy is measured")
    ap.add_argument("--entries", default="0,20000,100000")
    ap.add_argument("--removed", default="1,50")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per case")
    ap.add_argument("--out", default="")
    ap.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(*a.case)), flush=True)
        return 0
    sh("modprobe", "nf_conntrack_netlink")
    Path("/proc/sys/net/netfilter/nf_conntrack_max").write_text("400000")
    with open("/sys/module/nf_conntrack/parameters/hashsize", "w") as f:
        f.write("131072")
    results = []
    env = dict(os.environ, PYTHONPATH=a.tree)
    for n in map(int, a.entries.split(",")):
        for k in map(int, a.removed.split(",")):
            try:
                out = subprocess.run([sys.executable, __file__, "--case", str(n), str(k)], env=env,
                                     capture_output=True, text=True, timeout=a.timeout)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {"entries": n, "removed": k,
                                                            "error": out.stderr.strip()[-400:]}
            except subprocess.TimeoutExpired:
                row = {"entries": n, "removed": k, "timeout_s": a.timeout}
                sh("ip", "link", "del", DEV)
                sh("ipvsadm", "-D", "-u", f"{VIP}:53")
            sh("conntrack", "-F")
            print(json.dumps(row), flush=True)
            results.append(row)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"tree": a.tree, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
