"""`cleanup-kube-proxy`'s steps through the real iptables and ipset (ipvsproxy/cli/kubeproxy.py's
seams), in a throw-away network namespace on the host: kube-proxy v1.20's chains, jumps and
ipsets (tests/unit/test_leftovers.py's fixture) restored with iptables-restore and ipset restore,
then planned and removed by the code the command runs. Proves the tools take the steps as
written (rule specs from iptables-save, -F/-X, ipset destroy) and refuse a set in use as the
fakes do. Needs root and network namespaces (skipped otherwise, with the reason); IPVS is not
involved, so it runs on the host, not in the test VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from tests.unit.test_leftovers import IPTABLES_SAVE, IPSET_SAVE
from ipvsproxy import leftovers as lo
from ipvsproxy.cli.kubeproxy import Iptables, Ipset, Links

subprocess.run(["ipset", "restore"], input=IPSET_SAVE, text=True, check=True)
subprocess.run(["iptables-restore"], input=IPTABLES_SAVE, text=True, check=True)
tools = {t: Iptables(t) for t in lo.IPTABLES_TOOLS}

def view():
    rulesets = {t: lo.parse_iptables_save(x) for t, tool in tools.items() if (x := tool.save()) is not None}
    return lo.NodeView(services={}, desired=frozenset(), rulesets=rulesets,
                       ipsets=lo.parse_ipset_save(Ipset().save() or ""), links=Links().dump())

seams = lo.Seams(lambda k: None, tools, Ipset(), Links())
plan = lo.plan_leftovers(view())
sets_first = lo.apply_steps([s for s in plan.steps if s.kind is lo.StepKind.DESTROY_SET][:1], seams)
failures = lo.apply_steps(plan.steps, seams)
again = lo.plan_leftovers(view())
print(json.dumps({
    "steps": [str(s) for s in plan.steps], "sets_first": [m for _, m in sets_first],
    "failures": [m for _, m in failures], "again": [str(s) for s in again.steps],
    "iptables": subprocess.run(["iptables-save"], capture_output=True, text=True).stdout,
    "ipsets": subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout.split(),
}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace of its own)")
    missing = [t for t in ("ip", "iptables", "iptables-restore", "ipset") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh installs them)")
    name = f"ipvsp-lo-{uuid.uuid4().hex[:8]}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot create a network namespace: {res.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_real_tools_take_the_steps(netns: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT, str(ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    (refused,) = out["sets_first"]  # the kernel refuses to destroy a set a rule matches on, as the fake does
    assert refused.startswith("ipset destroy KUBE-CLUSTER-IP: ") and "Set cannot be destroyed: it is in use" in refused
    assert out["failures"] == []
    assert len(out["steps"]) == 4 + 6 + 6 + 5  # jumps, flushes, deletions, sets
    assert out["again"] == []
    saved = out["iptables"]
    assert "KUBE-SERVICES" not in saved and "KUBE-FORWARD" not in saved and "KUBE-POSTROUTING" not in saved
    assert ":KUBE-MARK-MASQ" in saved and ":KUBE-MARK-DROP" in saved
    assert "-A INPUT -s 198.18.61.0/24 -m comment --comment migrate-test -j ACCEPT" in saved
    assert "-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE" in saved
    assert out["ipsets"] == ["migrate-test-set"]
