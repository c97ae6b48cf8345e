"""One Service the kernel really refuses must not wedge the node (issue 14 item 5), in the VM.

The refusal is the kernel's own: IPv6 is disabled on the agent's dummy interface
(net.ipv6.conf.<dev>.disable_ipv6=1), so binding the IPv6 Service's address fails
with EACCES, on every attempt. Meanwhile an IPv4 Service's endpoints change twelve
times. Before, every one of those syncs failed and was a full IPVS dump (the issue
saw 12 full dumps in 12 s) and /healthz went 503; now the refused Service is
retried with backoff and every other sync is incremental (the dataplane's dump
counter proves it), while real traffic reaches the IPv4 Service's new backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import Netlab, http_get, sysctl_set
from proxylab import READY, agent_config, endpoint_slice, ipvsadm, node, run_cli, service, write_manifests

from ipvsproxy.agent import Agent
from ipvsproxy.dataplane.netlink import NetlinkDataplane

pytestmark = pytest.mark.kernel

NODE, NS, DEV = "bad-node", "bad", "ipvsbad0"
GOOD, BAD6 = "198.18.40.1", "2001:2:0:40::1"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
EP_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def good_slice(addresses: list[str]) -> dict[str, Any]:
    return endpoint_slice(NS, "good", "a", "IPv4", [(a, f"p{i}", READY) for i, a in enumerate(addresses)],
                          EP_PORTS, NODE)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    manifests = tmp_path / "m"
    write_manifests(manifests, [
        node(NODE, ["198.18.250.40"]),
        service(NS, "good", [GOOD], HTTP),
        good_slice(["198.18.41.1"]),
        service(NS, "v6", [BAD6], HTTP),
        endpoint_slice(NS, "v6", "a", "IPv6", [("2001:2:0:41::1", "p6", READY)], EP_PORTS, NODE),
    ])
    cfg = agent_config(NODE, manifests, tmp_path / "state", interface=DEV, nftables=False)
    dp = NetlinkDataplane(cfg)
    a = Agent(cfg, dp, events=lambda s, r, m: a.posted.append((s.id, r)))  # type: ignore[attr-defined]
    a.posted = []  # type: ignore[attr-defined]
    try:
        yield a
    finally:
        dp.close()
        run_cli("cleanup", "--interface", DEV)


def test_refused_ipv6_service_leaves_the_rest_incremental_and_the_node_healthy(agent: Agent,
                                                                                netlab: Netlab) -> None:
    backend = netlab.backends(1, names=["good-a"])[0]
    dp = agent.dp
    assert isinstance(dp, NetlinkDataplane)
    agent.load_files()
    dp.setup()
    sysctl_set(f"net.ipv6.conf.{DEV}.disable_ipv6", 1)  # the kernel now refuses every IPv6 bind on it
    agent.health.started -= 10 * agent.health.max_age  # long past the start-up grace
    runner = agent.core
    runner.sync_now(True)
    assert runner.failures == 0, runner.last_error
    assert "198.18.41.1:8080" in ipvsadm("-Ln", "-t", f"{GOOD}:80")
    assert agent.reconciler.failing == 1 and "bad/v6" in agent.reconciler.retries.failing
    assert "Permission denied" in agent.reconciler.retries.failing["bad/v6"].message
    dumps = dp.counters.dumps
    for n in range(12):
        agent.tracker.upsert("EndpointSlice", good_slice(["198.18.41.1", f"198.18.42.{n + 1}"]))
        runner.sync_now(False)
        assert runner.failures == 0, runner.last_error
    agent.tracker.upsert("EndpointSlice", good_slice([backend.ipv4]))
    runner.sync_now(False)
    full_dumps = dp.counters.dumps - dumps
    assert full_dumps == 0, f"{full_dumps} full dumps in 13 syncs"  # 13 before: one per sync
    assert http_get(GOOD, 80, timeout=5) == "good-a"  # the IPv4 Service follows its endpoints
    ok, reason = agent.health.status()
    assert ok, reason
    assert agent.posted == [("bad/v6", "ProgrammingFailed")]  # type: ignore[attr-defined]
    assert "ipvsproxy_services_failing 1.0" in agent.metrics.text().decode()
