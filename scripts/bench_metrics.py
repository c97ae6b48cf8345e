"""Benchmark: what a /metrics scrape costs with N Services programmed (docs/benchmarks.md).

    python scripts/bench_metrics.py --services 5000                      # memory dataplane (host)
    bash scripts/vm-run.sh -- "python scripts/bench_metrics.py --kernel --services 5000"
    ... --tree /path/to/old/checkout    # measure an older ipvsproxy the same way

Each Service has a ClusterIP and an external IP (2 virtual servers) and 3 endpoints. The agent's
traffic collector is built as the agent builds it (a separate read-only dataplane), and
scraped 10 times back to back, as several Prometheus servers or a fast one would. Printed:
time of the first scrape and the mean of the next 9, kernel readings (dumps) taken, and the
number of ipvsproxy_service_* series exported.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=5000)
    ap.add_argument("--kernel", action="store_true", help="the netlink dataplane (inside the VM)")
    ap.add_argument("--tree", default=str(ROOT))
    ap.add_argument("--scrapes", type=int, default=10)
    a = ap.parse_args()
    if os.environ.get("BENCH_METRICS_CHILD") != "1":  # re-run with the tree first on sys.path
        env = dict(os.environ, PYTHONPATH=a.tree, BENCH_METRICS_CHILD="1")
        return os.spawnve(os.P_WAIT, sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)

    from prometheus_client import CollectorRegistry, generate_latest

    from ipvsproxy.config import AgentConfig
    from ipvsproxy.dataplane.memory import MemoryDataplane
    from ipvsproxy.observe.metrics import TrafficCollector
    from ipvsproxy.reconcile import Reconciler
    from ipvsproxy.schedulers import Registry
    from ipvsproxy.tracker import Tracker
    from ipvsproxy.translate import Config

    node = "metrics-bench"
    n = a.services

    def ip(i: int, second: int) -> str:  # up to 50,000 Services (198.19.200-202.x are the endpoints)
        return f"198.{second}.{i // 250}.{i % 250 + 1}"

    services = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"s{i}", "namespace": "bench"},
                 "spec": {"type": "ClusterIP", "clusterIP": ip(i, 18), "externalIPs": [ip(i, 19)],
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}
                for i in range(n)]
    slices = [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": f"s{i}-a", "namespace": "bench", "labels": {"kubernetes.io/service-name": f"s{i}"}},
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [f"198.19.{200 + j}.{i % 250 + 1}"], "conditions": {"ready": True}}
                             for j in range(3)]} for i in range(n)]
    tracker = Tracker(node)
    tracker.replace("Service", services)
    tracker.replace("EndpointSlice", slices)
    tracker.replace("Node", [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                              "status": {"addresses": [{"type": "InternalIP", "address": "198.18.250.9"}]}}])
    cfg = AgentConfig(node_name=node, interface="ipvsmetrics0", healthz_bind_address="", metrics_bind_address="")
    if a.kernel:
        from ipvsproxy.dataplane.netlink import NetlinkDataplane

        dp: Any = NetlinkDataplane(cfg)
        dp.setup()
        stats_dp: Any = NetlinkDataplane(cfg, read_only=True)
    else:
        dp = stats_dp = MemoryDataplane()
    rec = Reconciler(tracker, dp, Config(node), Registry())
    t = time.monotonic()
    rec.sync(full=True)
    program_s = time.monotonic() - t
    vss = len(rec.index.state.services)
    if not a.kernel:  # the kernel keeps counters for every virtual server; the memory model only when told
        for obs in dp.state.services.values():
            obs.stats = {"conns": 1, "inpkts": 2, "outpkts": 3, "inbytes": 4, "outbytes": 5}

    def name_of(key: Any) -> Any:
        vs = rec.index.state.services.get(key)
        return vs.service if vs else None

    params = inspect.signature(TrafficCollector.__init__).parameters
    new = "max_age" in params
    read = stats_dp.service_stats if new else stats_dp.observe
    collector = TrafficCollector(read, name_of)
    reg = CollectorRegistry()
    reg.register(collector)
    dumps0 = stats_dp.counters.dumps
    times = []
    text = b""
    for _ in range(a.scrapes):
        t = time.monotonic()
        text = generate_latest(reg)
        times.append(time.monotonic() - t)
    series = sum(1 for line in text.decode().splitlines() if line.startswith("ipvsproxy_service_"))
    print(json.dumps({"tree": a.tree, "code": "after" if new else "before", "kernel": a.kernel, "services": n,
                      "virtual_servers": vss, "program_s": round(program_s, 2),
                      "first_scrape_s": round(times[0], 4),
                      "next_scrapes_mean_s": round(sum(times[1:]) / max(1, len(times) - 1), 4),
                      "kernel_reads": stats_dp.counters.dumps - dumps0, "series": series,
                      "bytes": len(text)}))
    if a.kernel:
        from ipvsproxy.model import DesiredState
        from ipvsproxy.plan import plan

        dp.apply(plan(DesiredState(), dp.observe()))
        dp.remove_interface()
        dp.close()
        stats_dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
