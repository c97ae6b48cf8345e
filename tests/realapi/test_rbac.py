"""The chart's RBAC as shipped, against a real kube-apiserver v1.20.2 with
`--authorization-mode=Node,RBAC`: the rendered ServiceAccount, ClusterRole and
ClusterRoleBinding applied with kubectl, a token for that ServiceAccount from the
TokenRequest API (`kubectl create token`), and the agent running with exactly that
identity. Then one permission is taken away and given back."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipvsproxy.observe.health import healthz_route, livez_route
from tests.realapi.cluster import ROOT, Cluster
from tests.realapi.conftest import Api, Live, key, rs, wait_until

pytestmark = pytest.mark.realapi
HELM, KUBECTL = ROOT / ".cache/bin/helm", ROOT / ".cache/bin/kubectl"
SA_USER = "system:serviceaccount:kube-system:ipvsproxy"


def kubectl(cluster: Cluster, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([str(KUBECTL), "--kubeconfig", str(kubeconfig), *args], input=stdin,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def chart_rbac() -> list[dict[str, Any]]:
    out = subprocess.run([str(HELM), "template", "ipvsproxy", str(ROOT / "charts/ipvsproxy"), "-n", "kube-system"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_the_agent_runs_with_the_charts_rbac_and_recovers_a_permission(
        cluster: Cluster, live: Callable[..., Live], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert HELM.is_file() and KUBECTL.is_file(), "run scripts/install-helm.sh"
    admin = cluster.write_kubeconfig(tmp_path / "admin.conf")
    rbac = chart_rbac()
    assert sorted(d["kind"] for d in rbac) == ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"]
    (role,) = [d for d in rbac if d["kind"] == "ClusterRole"]
    kubectl(cluster, admin, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))
    token = kubectl(cluster, admin, "create", "token", "ipvsproxy", "-n", "kube-system").strip()
    assert token.count(".") == 2  # a JWT from the TokenRequest API

    api = Api(cluster, "t-rbac")
    api.create_service("a", "10.96.9.1", annotations={"ipvsproxy.io/scheduler": "bogus"})  # an Event to post
    api.create_slice("a", ["10.9.1.1"])
    caplog.set_level(logging.INFO, "ipvsproxy.sources.kube")
    lv = live(token=token, via_relay=True)
    wait_until(lambda: lv.dp.table("10.96.9.") == {key("10.96.9.1"): rs("10.9.1.1")}, what="a, as the chart's SA")
    wait_until(lambda: lv.source.stats["events_posted"] >= 1, what="the InvalidScheduler Event")
    assert lv.source.blocked() is None and "forbidden" not in caplog.text.lower()

    # what the identity really used, from the API server's audit log: exactly what is granted
    def used() -> set[tuple[str, str, str]]:
        return {(e["objectRef"].get("apiGroup", ""), e["objectRef"]["resource"], e["verb"])
                for e in cluster.audit(SA_USER) if e.get("objectRef")}

    assert cluster.relay is not None
    cluster.relay.cut(refuse=False)  # a watch is audited once it ends: end them (the agent resumes)
    wait_until(lambda: used() >= granted(role), what=f"every granted verb used (used: {sorted(used())})")
    assert used() == granted(role), sorted(used() ^ granted(role))
    denied = [e for e in cluster.audit(SA_USER) if e.get("responseStatus", {}).get("code") == 403]
    assert not denied
    print(f"\nrealapi rbac: used = granted = {sorted(used())}")

    # take "watch" on services away; the open watch ends (cut), the next one is refused
    narrowed = json.loads(json.dumps(role))
    for rule in narrowed["rules"]:
        if rule["resources"] == ["services"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "watch"]
    kubectl(cluster, admin, "apply", "-f", "-", stdin=json.dumps(narrowed))
    cluster.relay.cut(refuse=False)
    wait_until(lambda: lv.source.blocked(), what="the refused watch")
    healthz = healthz_route(lv.agent.health, detail=True)
    livez = livez_route(lv.agent.health, detail=True)
    wait_until(lambda: healthz()[0] == 503, what="/healthz 503")
    reason = json.loads(healthz()[2])["reason"]
    assert 'needs verb \'watch\' on resource \'services\'' in reason, reason
    assert livez()[0] == 200  # stale data is no reason to restart the agent: it recovers on its own
    wait_until(lambda: lv.source.stats["errors"] >= 3, what="a few retries")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, lines  # one clear line, not one per retry
    assert "watch Service: 403 Forbidden" in lines[0] and "needs verb 'watch' on resource 'services'" in lines[0]

    # given back: it recovers on its own
    kubectl(cluster, admin, "apply", "-f", "-", stdin=json.dumps(role))
    wait_until(lambda: lv.source.blocked() is None, timeout=30, what="the watch allowed again")
    api.create_service("b", "10.96.9.2")
    api.create_slice("b", ["10.9.2.1"])
    wait_until(lambda: key("10.96.9.2") in lv.dp.table("10.96.9."), what="b after recovery")
    wait_until(lambda: healthz()[0] == 200, what="/healthz 200 again")
    assert "works again" in caplog.text
