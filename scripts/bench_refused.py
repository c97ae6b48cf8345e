"""What one Service the kernel refuses costs the node (issue 14 item 5), before and after.

    bash scripts/vm-run.sh -- "python scripts/bench_refused.py"
    bash scripts/vm-run.sh -- "python scripts/bench_refused.py --tree /path/to/old/checkout"

Inside the VM: an IPv4 Service and an IPv6 Service; IPv6 is disabled on the agent's dummy
interface, so the kernel refuses the IPv6 Service's address on every attempt. The IPv4
Service's endpoints then change 12 times, one sync each through the runner's own sync step
(the issue saw one a second). Printed: full IPVS dumps, failed syncs, whether /healthz
would answer 200 once the start-up grace is over, whether the IPv4 Service's last change
reached the kernel, and the wall time of the 12 syncs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NODE, DEV = "refused-bench", "ipvsref0"


def eps(name: str, family: str, addresses: list[str]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
            "metadata": {"name": f"{name}-a", "namespace": "bench", "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


def svc(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=str(ROOT))
    ap.add_argument("--syncs", type=int, default=12)
    a = ap.parse_args()
    if os.environ.get("BENCH_REFUSED_CHILD") != "1":
        env = dict(os.environ, PYTHONPATH=a.tree, BENCH_REFUSED_CHILD="1")
        return os.spawnve(os.P_WAIT, sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)

    from ipvsproxy.agent import Agent
    from ipvsproxy.config import AgentConfig
    from ipvsproxy.dataplane.netlink import NetlinkDataplane

    cfg = AgentConfig(node_name=NODE, interface=DEV, healthz_bind_address="", metrics_bind_address="",
                      nftables=False)
    dp = NetlinkDataplane(cfg)
    agent = Agent(cfg, dp, record_state=False)
    tr = agent.tracker
    tr.replace("Service", [svc("v4", "198.18.90.1"), svc("v6", "2001:2:0:90::1")])
    tr.replace("EndpointSlice", [eps("v4", "IPv4", ["198.18.91.1"]), eps("v6", "IPv6", ["2001:2:0:91::1"])])
    tr.replace("Node", [])
    dp.setup()
    Path(f"/proc/sys/net/ipv6/conf/{DEV}/disable_ipv6").write_text("1")
    agent.health.started -= 10 * agent.health.max_age
    runner = agent.core
    failed = 0
    runner.sync_now(True)
    failed += runner.failures > 0
    dumps = dp.counters.dumps
    t = time.monotonic()
    for n in range(a.syncs):
        tr.upsert("EndpointSlice", eps("v4", "IPv4", ["198.18.91.1", f"198.18.92.{n + 1}"]))
        before = runner.failures
        runner.sync_now(False)
        failed += runner.failures > before
    wall = time.monotonic() - t
    ok, reason = agent.health.status()
    programmed = f"198.18.92.{a.syncs}:8080" in subprocess.run(["ipvsadm", "-Ln", "-t", "198.18.90.1:80"],
                                                                 capture_output=True, text=True).stdout
    print(json.dumps({"tree": a.tree, "syncs": a.syncs, "full_dumps": dp.counters.dumps - dumps,
                      "failed_syncs": failed, "healthz_ok": ok, "healthz_reason": reason,
                      "ipv4_service_followed": programmed, "wall_s": round(wall, 2)}))
    dp.remove_interface()
    subprocess.run(["ipvsadm", "-D", "-t", "198.18.90.1:80"], capture_output=True)
    subprocess.run(["ipvsadm", "-D", "-t", "[2001:2:0:90::1]:80"], capture_output=True)
    dp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
