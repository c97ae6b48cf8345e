"""The agent against a real kube-apiserver v1.20.2: its Warning Events are stored
and `kubectl get events` reads them back; and it follows 1,000 Services x 10
endpoints created through the API (the time to converge and the process's RSS
are printed for the record)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.realapi.cluster import ROOT, Cluster
from tests.realapi.conftest import Api, Live, key, rs, wait_until

pytestmark = pytest.mark.realapi
KUBECTL = ROOT / ".cache/bin/kubectl"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_warning_events_are_readable_with_kubectl(cluster: Cluster, live: Callable[..., Live],
                                                  tmp_path: Path) -> None:
    assert KUBECTL.is_file(), f"{KUBECTL} missing: run scripts/install-helm.sh"
    api = Api(cluster, "t-events")
    svc = api.create_service("web", "10.96.5.1", annotations={"ipvsproxy.io/scheduler": "bogus"})
    api.create_slice("web", ["10.5.1.1"])
    lv = live()
    wait_until(lambda: lv.dp.table("10.96.5.") == {key("10.96.5.1"): rs("10.5.1.1")}, what="web programmed")
    wait_until(lambda: lv.source.stats["events_posted"] >= 1, what="the Event posted")
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubectl.conf")
    out = subprocess.run([str(KUBECTL), "--kubeconfig", str(kubeconfig), "get", "events", "-n", "t-events",
                          "-o", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    events = [e for e in json.loads(out.stdout)["items"] if e["reason"] == "InvalidScheduler"]
    assert len(events) == 1, events
    (event,) = events
    assert event["type"] == "Warning" and "bogus" in event["message"]
    assert event["involvedObject"]["kind"] == "Service" and event["involvedObject"]["name"] == "web"
    assert event["involvedObject"]["uid"] == svc["metadata"]["uid"]
    assert event["source"]["component"] == "ipvsproxy"
    # the human-readable table too
    table = subprocess.run([str(KUBECTL), "--kubeconfig", str(kubeconfig), "get", "events", "-n", "t-events"],
                           capture_output=True, text=True, timeout=60)
    assert "InvalidScheduler" in table.stdout and "service/web" in table.stdout


def test_follows_1000_services_with_10_endpoints_each(cluster: Cluster, live: Callable[..., Live]) -> None:
    api = Api(cluster, "t-scale")
    n, per = 1000, 10
    ips = [f"10.96.{100 + i // 250}.{i % 250 + 1}" for i in range(n)]
    before = rss_mib()
    lv = live()
    wait_until(lambda: lv.agent.tracker.ready(), what="the first listing")
    start = time.monotonic()
    api.many([lambda i=i: api.create_service(f"s{i}", ips[i]) for i in range(n)] +
             [lambda i=i: api.create_slice(f"s{i}", [f"10.{100 + i // 250}.{i % 250}.{j + 1}" for j in range(per)])
              for i in range(n)])
    created = time.monotonic() - start

    def converged() -> bool:
        table = {k: v for k, v in lv.dp.table("10.96.").items() if 100 <= int(k.address.split(".")[2]) < 104}
        return len(table) == n and all(len(v) == per for v in table.values())

    wait_until(converged, timeout=180, what=f"{n} Services x {per} endpoints programmed")
    total = time.monotonic() - start
    after = rss_mib()
    print(f"\nrealapi scale: {n} Services x {per} endpoints created through the API in {created:.1f}s; "
          f"agent converged {total:.1f}s after the first write ({total - created:.1f}s after the last); "
          f"process RSS {after:.0f} MiB ({after - before:+.0f} MiB while following)")
    # and back: deleting them all empties the table
    start = time.monotonic()
    api.many([lambda i=i: api.delete_service(f"s{i}") for i in range(n)])
    wait_until(lambda: not [k for k in lv.dp.table("10.96.") if 100 <= int(k.address.split(".")[2]) < 104],
               timeout=120, what="every Service gone")
    print(f"realapi scale: {n} deletions followed in {time.monotonic() - start:.1f}s")
