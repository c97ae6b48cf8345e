"""The benchmark harness against the real kernel at small N (inside the IPVS test VM).

Invariants, not numbers: the kernel table after the cold start equals the
desired state (and so does the table `ipvsadm -R` and the naive pyroute2 loop
load from the same desired state), an idle resync and a restart write
nothing, and one endpoint change on a one-virtual-server Service costs at most
three netlink requests (read the service, dump its destinations, one write).
"""

from __future__ import annotations

import subprocess

import pytest

from ipvsproxy.bench import kernel
from ipvsproxy.bench.cluster import ClusterSpec, SyntheticCluster
from ipvsproxy.bench.scenarios import Context

pytestmark = pytest.mark.kernel


@pytest.fixture
def clean_kernel():
    kernel.clean()
    yield
    kernel.clean()


def test_kernel_run_invariants(clean_kernel: None) -> None:
    ctx = Context.build(SyntheticCluster(ClusterSpec(40, 3, seed=11)))
    out = kernel.run_kernel(ctx, {"cold", "steady", "churn", "restart"}, reference=True, churn_steps=40,
                            seed=11, naive_objects=60)
    sc = out["scenarios"]
    cold = sc["cold"]
    assert cold["table_matches_desired"], cold.get("problems")
    t = cold["table"]
    assert cold["ops"] == {"bind": t["addresses"], "add-vs": t["virtual_servers"], "add-rs": t["real_servers"]}
    # every IPVS write went out batched: far fewer sendmsg calls than messages
    assert cold["netlink"]["requests"] >= t["objects"]
    assert cold["netlink"]["sendmsg"] < cold["netlink"]["requests"]
    assert sc["steady"]["write_ops"] == 0 and sc["steady"]["table_matches_desired"]
    assert sc["restart"]["write_ops"] == 0 and sc["restart"]["table_matches_desired"]
    churn = sc["churn"]
    assert churn["table_matches_desired"], churn.get("problems")
    one = churn["single_endpoint_one_vs"]
    if one["changes"]:
        assert one["write_ops"]["max"] <= 1
        assert one["netlink_requests"]["max"] <= 3
    refs = out["references"]
    assert refs["ipvsadm_restore"]["table_matches_desired"], refs["ipvsadm_restore"]["table_problems"]
    assert refs["naive_pyroute2"]["table_matches_desired"]
    assert 0 < refs["naive_pyroute2"]["objects"] <= 60
    assert out["ratios"]["cold_wall_to_ipvsadm"] > 0
    # run_kernel leaves the kernel as it found it: no virtual servers, no bench interface
    assert subprocess.run(["ipvsadm", "-Sn"], capture_output=True, text=True, check=True).stdout.strip() == ""
    link = subprocess.run(["ip", "link", "show", kernel.INTERFACE], capture_output=True, check=False)
    assert link.returncode != 0
