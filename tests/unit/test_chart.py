"""The Helm chart (charts/ipvsproxy): lint, render, schema-validate, and check what it grants.

Needs helm (and kubernetes-validate) from `bash scripts/install-helm.sh`; without them these
tests fail rather than skip, so a machine that never ran the set-up cannot look green.
"""

from __future__ import annotations

import configparser
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ipvsproxy"
RELEASE = "ipvsproxy"
NAMESPACE = "kube-system"
K8S_VERSION = "1.35.0"
INSTALL_HINT = "run `bash scripts/install-helm.sh` (installs helm, kubectl and kubernetes-validate)"

# Value sets rendered by most tests: each one exercises a different branch of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "metrics": {"metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "interval": "15s",
                                                                 "labels": {"release": "prometheus"}}}},
    "metrics-no-servicemonitor": {"metrics": {"enabled": True, "port": 9249}},
    "no-modules": {"config": {"loadModules": False}},
    "custom": {"config": {
        "scheduler": "lc",
        "syncPeriod": "1m30s",
        "minSyncPeriod": "500ms",
        "interface": "kube-ipvs0",
        "excludeCIDRs": ["10.10.0.0/16", "fd00:10::/64"],
        "nodePortAddresses": ["192.168.0.0/24", "2001:db8::/32"],
        "tcpTimeout": "15m",
        "tcpfinTimeout": "2m",
        "udpTimeout": "300s",
        "strictARP": True,
        "clusterCIDR": "10.244.0.0/16,fd00:10:244::/56",
        "masqueradeAll": True,
        "nftables": False,
        "drainGracePeriod": "2m",
        "logLevel": "debug",
        "extraArgs": ["--node-name=$(NODE_NAME)"],
    }},
    "loopback-healthz": {"config": {"healthzBindAddress": "127.0.0.1:10256"}},
    "ipv6-loopback-healthz": {"config": {"healthzBindAddress": "[::1]:10266"}},
    "no-healthz": {"config": {"healthzBindAddress": ""}},
    "legacy-endpoints": {"rbac": {"legacyEndpoints": True}},
    "endpoints-source": {"config": {"endpointsSource": "endpoints"}, "apiServer": {"host": "192.0.2.10"}},
    "v1beta1-source": {"config": {"endpointsSource": "v1beta1"}, "apiServer": {"host": "fd00::10", "port": 443}},
    "existing-serviceaccount": {"serviceAccount": {"create": False, "name": "proxy"}, "rbac": {"create": False}},
    "privileged": {"securityContext": {"privileged": True}},
    "opt-in-capabilities": {"securityContext": {"sysModule": True, "netRaw": True}},
    "extra": {
        "image": {"repository": "registry.example.com/net/ipvsproxy", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/team": "net"},
        "podLabels": {"example.com/tier": "node"},
        "serviceAccount": {"annotations": {"example.com/role": "proxy"}},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "example.com/proxy", "operator": "NotIn", "values": ["kube-proxy"]}]}]}}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
        "sysctlInit": {"enabled": False},
    },
}

# The RBAC a service proxy needs (docs/operating.md): exactly this, by default.
EXPECTED_RULES = {
    ("", "services", "list"), ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "nodes", "list"), ("", "nodes", "watch"),  # listed and watched by name (a field selector): no get
    ("", "events", "create"),  # core/v1 Events, created only (sources/kube.py): no patch, no events.k8s.io
}

CONFIG_KEYS = {
    "scheduler", "syncPeriod", "resync", "minSyncPeriod", "interface", "excludeCIDRs", "nodePortAddresses",
    "healthzBindAddress", "metricsBindAddress", "tcpTimeout", "tcpfinTimeout", "udpTimeout", "strictARP",
    "clusterCIDR", "masqueradeAll", "nftables", "drainGracePeriod", "logLevel", "loadModules", "stateDir", "extraArgs",
    "endpointsSource",
}


# ---- tools ----------------------------------------------------------------------------------


def _tool(name: str, *candidates: Path) -> str:
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found: {INSTALL_HINT}", pytrace=False)


@functools.cache
def helm() -> str:
    return _tool("helm", ROOT / ".cache" / "bin" / "helm")


@functools.cache
def kubernetes_validate() -> str:
    return _tool("kubernetes-validate", Path(sys.executable).parent / "kubernetes-validate",
                 ROOT / ".venv" / "bin" / "kubernetes-validate")


def run_helm(*args: str, values: dict[str, Any] | None = None, tmp: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [helm(), *args]
    if values:
        assert tmp is not None
        f = tmp / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(f)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    """helm template of one value set -> the rendered objects (cached; do not mutate)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        proc = run_helm("template", RELEASE, str(CHART), "-n", NAMESPACE,
                        values=VALUE_SETS[name], tmp=Path(d))
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def daemonset(name: str = "default") -> dict[str, Any]:
    return one(render(name), "DaemonSet")


def pod_spec(name: str = "default") -> dict[str, Any]:
    return daemonset(name)["spec"]["template"]["spec"]


def agent(name: str = "default") -> dict[str, Any]:
    containers = pod_spec(name)["containers"]
    assert [c["name"] for c in containers] == ["ipvsproxy"]
    return containers[0]


def all_containers(name: str) -> list[dict[str, Any]]:
    spec = pod_spec(name)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def caps(container: dict[str, Any]) -> set[str]:
    return set(container["securityContext"]["capabilities"].get("add", []))


def rbac_rules(name: str) -> set[tuple[str, str, str]]:
    role = one(render(name), "ClusterRole")
    return {(group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def flag_values(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for a in args:
        flag, sep, value = a.partition("=")
        out[flag] = value if sep else None
    return out


# ---- lint and Kubernetes schemas ------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_defaults(strict: bool) -> None:
    proc = run_helm("lint", str(CHART), *(["--strict"] if strict else []))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_value_sets(name: str, tmp_path: Path) -> None:
    proc = run_helm("lint", "--strict", str(CHART), "-n", NAMESPACE, values=VALUE_SETS[name], tmp=tmp_path)
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_pass_kubernetes_schemas(name: str, tmp_path: Path) -> None:
    docs = [d for d in render(name) if d["kind"] != "ServiceMonitor"]  # a CRD: not in core schemas
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([kubernetes_validate(), "--strict", "-k", K8S_VERSION, str(out)],
                          capture_output=True, text=True, timeout=120)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "ERROR" not in report and "WARN" not in report, report
    assert report.count("passed") == len(docs), report


def test_install_dry_run_renders_notes() -> None:
    proc = run_helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} get ds {RELEASE}" in notes
    assert "-- ipvsproxy list" in notes


@pytest.mark.parametrize("version", ["1.20.2", "1.24.0", K8S_VERSION])
def test_installs_on_every_kubernetes_the_agent_reads(version: str) -> None:
    """kubeVersion admits v1.20 on: the agent reads v1beta1 slices and core/v1 Endpoints (was >=1.25,
    and `helm install` refused the v1.20.2 cluster of tests/cluster)."""
    proc = run_helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", version)
    assert "kind: DaemonSet" in proc.stdout
    refused = run_helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", "1.19.0",
                       check=False)
    assert refused.returncode != 0 and "kubeVersion" in refused.stderr + refused.stdout


def test_chart_metadata_matches_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "ipvsproxy"
    assert str(chart["appVersion"]) == "0.1.0" == cfg["metadata"]["version"]
    assert daemonset()["spec"]["template"]["spec"]["containers"][0]["image"] == "ipvsproxy:0.1.0"


# ---- RBAC -----------------------------------------------------------------------------------


def test_rbac_is_exactly_what_a_service_proxy_needs() -> None:
    assert rbac_rules("default") == EXPECTED_RULES
    docs = render("default")
    binding = one(docs, "ClusterRoleBinding")
    sa = one(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one(docs, "ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert pod_spec()["serviceAccountName"] == sa["metadata"]["name"]


def test_rbac_legacy_endpoints_only_when_asked() -> None:
    assert not any(r for r in rbac_rules("default") if r[1] == "endpoints")
    assert rbac_rules("legacy-endpoints") == EXPECTED_RULES | {("", "endpoints", "list"), ("", "endpoints", "watch")}


def test_rbac_follows_the_endpoints_source() -> None:
    slices = {("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch")}
    legacy = {("", "endpoints", "list"), ("", "endpoints", "watch")}
    assert rbac_rules("endpoints-source") == (EXPECTED_RULES - slices) | legacy
    assert rbac_rules("v1beta1-source") == EXPECTED_RULES


def test_api_server_address_and_endpoints_source_flags() -> None:
    default = flag_values(agent("default")["args"])
    assert "--api-server" not in default and "--endpoints-source" not in default  # auto, in-cluster
    flags = flag_values(agent("endpoints-source")["args"])
    assert flags["--api-server"] == "https://192.0.2.10:6443" and flags["--endpoints-source"] == "endpoints"
    flags = flag_values(agent("v1beta1-source")["args"])
    assert flags["--api-server"] == "https://[fd00::10]:443" and flags["--endpoints-source"] == "v1beta1"
    params = _parse_with_cli(agent("v1beta1-source")["command"] + agent("v1beta1-source")["args"])
    assert params["api_server"] == "https://[fd00::10]:443" and params["endpoints_source"] == "v1beta1"


def test_existing_serviceaccount_without_rbac() -> None:
    kinds = {d["kind"] for d in render("existing-serviceaccount")}
    assert kinds == {"DaemonSet"}
    assert pod_spec("existing-serviceaccount")["serviceAccountName"] == "proxy"


# ---- the DaemonSet --------------------------------------------------------------------------


def test_daemonset_is_a_node_agent() -> None:
    ds = daemonset()
    spec = pod_spec()
    assert ds["metadata"]["namespace"] == NAMESPACE
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    selector = ds["spec"]["selector"]["matchLabels"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_node_name_from_downward_api() -> None:
    env = {e["name"]: e for e in agent()["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_host_mounts() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in agent()["volumeMounts"]}
    lib = mounts["/lib/modules"]
    assert lib["readOnly"] is True
    assert volumes[lib["name"]]["hostPath"]["path"] == "/lib/modules"
    state = mounts["/run/ipvsproxy"]
    assert not state.get("readOnly")
    assert volumes[state["name"]]["hostPath"] == {"path": "/run/ipvsproxy", "type": "DirectoryOrCreate"}
    assert "--state-dir=/run/ipvsproxy" in agent()["args"]
    for container in all_containers("default"):
        for m in container["volumeMounts"]:
            if m["mountPath"] == "/lib/modules":
                assert m["readOnly"] is True, container["name"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_never_privileged_unless_asked(name: str) -> None:
    for container in all_containers(name):
        sc = container["securityContext"]
        if name == "privileged" and container["name"] == "ipvsproxy":
            assert sc["privileged"] is True
            continue
        assert sc.get("privileged") is not True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_capabilities_exactly_what_the_agent_uses(name: str) -> None:
    """The long-running container: NET_ADMIN only, unless asked (issue 14 item 10). SYS_MODULE
    goes to whoever loads the modules: the init container, or the agent when there is none."""
    values = VALUE_SETS[name]
    load_modules = values.get("config", {}).get("loadModules", True)
    sc = values.get("securityContext", {})
    inits = pod_spec(name).get("initContainers", [])
    agent_loads = load_modules and (sc.get("sysModule", False) or not inits)
    expected = {"NET_ADMIN"} | ({"SYS_MODULE"} if agent_loads else set()) | ({"NET_RAW"} if sc.get("netRaw") else set())
    assert caps(agent(name)) == expected
    assert ("--no-load-modules" in agent(name)["args"]) == (not agent_loads)
    for init in inits:
        assert caps(init) <= {"NET_ADMIN", "SYS_MODULE"}, init["name"]
        assert ("SYS_MODULE" in caps(init)) == load_modules


def test_default_agent_drops_sys_module_and_net_raw() -> None:
    assert caps(agent("default")) == {"NET_ADMIN"}
    (init,) = pod_spec("default")["initContainers"]
    assert "SYS_MODULE" in caps(init) and "modprobe" in init["command"][-1]  # the init loads the modules
    assert "--no-load-modules" in agent("default")["args"]
    assert caps(agent("opt-in-capabilities")) == {"NET_ADMIN", "NET_RAW", "SYS_MODULE"}
    assert "--no-load-modules" not in agent("opt-in-capabilities")["args"]


def test_root_with_read_only_root_filesystem() -> None:
    sc = agent()["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert "/tmp" in {m["mountPath"] for m in agent()["volumeMounts"]}


def test_sysctl_init_container() -> None:
    inits = pod_spec()["initContainers"]
    assert [c["name"] for c in inits] == ["sysctls"]
    script = inits[0]["command"][-1]
    for key in ("ipv4/vs/conntrack 1", "ipv4/vs/expire_nodest_conn 1",
                "ipv4/vs/expire_quiescent_template 1", "ipv4/ip_forward 1"):
        assert f"set_sysctl {key}" in script
    assert "arp_ignore" not in script
    assert "modprobe" in script and "ip_vs_rr" in script
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mount = next(m for m in inits[0]["volumeMounts"] if m["mountPath"] == "/host/proc/sys/net")
    assert volumes[mount["name"]]["hostPath"]["path"] == "/proc/sys/net"
    # The agent container itself never gets the host's /proc/sys.
    assert "/host/proc/sys/net" not in {m["mountPath"] for m in agent()["volumeMounts"]}

    custom = pod_spec("custom")["initContainers"][0]["command"][-1]
    assert "set_sysctl ipv4/conf/all/arp_ignore 1" in custom and "set_sysctl ipv4/conf/all/arp_announce 2" in custom
    assert "ip_vs_lc" in custom
    assert "modprobe" not in pod_spec("no-modules")["initContainers"][0]["command"][-1]
    assert "initContainers" not in pod_spec("extra")
    assert "initContainers" not in pod_spec("privileged")
    assert "host-proc-sys-net" not in {v["name"] for v in pod_spec("extra")["volumes"]}


# ---- probes ---------------------------------------------------------------------------------


def _probe_target(name: str, probe: str) -> tuple[str | None, int]:
    c = agent(name)
    get = c[probe]["httpGet"]
    assert get["path"] == ("/livez" if probe == "livenessProbe" else "/healthz")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
    return get.get("host"), port


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_probes_reach_healthz(probe: str) -> None:
    # Default: bound to all addresses, probed at the pod IP (the node IP on the host network).
    assert "--healthz-bind-address=0.0.0.0:10256" in agent()["args"]
    assert _probe_target("default", probe) == (None, 10256)
    # Loopback binding: the kubelet shares the host network, so it probes loopback directly.
    assert _probe_target("loopback-healthz", probe) == ("127.0.0.1", 10256)
    assert _probe_target("ipv6-loopback-healthz", probe) == ("::1", 10266)
    # healthz off: no probe that could never succeed.
    assert probe not in agent("no-healthz")
    assert "healthz" not in {p["name"] for p in agent("no-healthz")["ports"]}


# ---- arguments ------------------------------------------------------------------------------


def test_command_and_default_args() -> None:
    c = agent()
    assert c["command"] == ["ipvsproxy", "--log-level=info", "run"]
    assert flag_values(c["args"]) == {
        "--scheduler": "rr", "--sync-period": "30s", "--resync": "rolling", "--min-sync-period": "1s",
        "--interface": "ipvsproxy0",
        "--healthz-bind-address": "0.0.0.0:10256", "--metrics-bind-address": "127.0.0.1:10249",
        "--tcp-timeout": "0s", "--tcpfin-timeout": "0s", "--udp-timeout": "0s",
        "--drain-grace-period": "30s", "--state-dir": "/run/ipvsproxy",
        "--no-load-modules": None,  # the init container loaded them; the agent has no SYS_MODULE
    }


def test_custom_args_pass_through() -> None:
    c = agent("custom")
    assert c["command"] == ["ipvsproxy", "--log-level=debug", "run"]
    flags = flag_values(c["args"])
    assert flags["--scheduler"] == "lc"
    assert flags["--sync-period"] == "1m30s"
    assert flags["--min-sync-period"] == "500ms"
    assert flags["--interface"] == "kube-ipvs0"
    assert flags["--exclude-cidrs"] == "10.10.0.0/16,fd00:10::/64"
    assert flags["--nodeport-addresses"] == "192.168.0.0/24,2001:db8::/32"
    assert flags["--tcp-timeout"] == "15m"
    assert flags["--tcpfin-timeout"] == "2m"
    assert flags["--udp-timeout"] == "300s"
    assert flags["--strict-arp"] is None
    assert flags["--cluster-cidr"] == "10.244.0.0/16,fd00:10:244::/56"
    assert flags["--masquerade-all"] is None
    assert flags["--no-nftables"] is None
    assert flags["--drain-grace-period"] == "2m"
    assert c["args"][-1] == "--node-name=$(NODE_NAME)"
    assert "--no-load-modules" in flags  # the init container loads them (sysctlInit is on)


def test_boolean_flags_only_when_set() -> None:
    default = flag_values(agent()["args"])
    for flag in ("--strict-arp", "--masquerade-all", "--no-nftables", "--cluster-cidr",
                 "--exclude-cidrs", "--nodeport-addresses"):
        assert flag not in default
    assert "--no-load-modules" in agent("no-modules")["args"]
    assert "--no-load-modules" not in agent("opt-in-capabilities")["args"]


def _parse_with_cli(argv: list[str]) -> dict[str, Any]:
    """Parse a rendered command line with the real click CLI, without running it."""
    from ipvsproxy.cli.main import cli, register

    register()
    split = argv.index("run")
    group_ctx = cli.make_context("ipvsproxy", argv[1:split + 1])
    run_cmd = cli.commands["run"]
    run_ctx = run_cmd.make_context("run", argv[split + 1:], parent=group_ctx)
    return {**group_ctx.params, **run_ctx.params}


def _cli_flags() -> set[str]:
    from ipvsproxy.cli.main import cli, register

    register()
    names: set[str] = set()
    for cmd in (cli, cli.commands["run"]):
        for p in cmd.params:
            names.update(o for o in [*p.opts, *p.secondary_opts] if o.startswith("--"))
    return names


def test_default_command_line_parses_with_the_cli() -> None:
    c = agent()
    params = _parse_with_cli(c["command"] + c["args"])
    assert params["scheduler"] == "rr"
    assert params["sync_period"] == 30.0
    assert params["healthz_bind_address"] == "0.0.0.0:10256"
    assert params["load_modules"] is False  # the init container loads them
    assert params["log_level"] == "info"


@pytest.mark.parametrize("name", ["custom", "no-modules", "metrics", "loopback-healthz"])
def test_every_rendered_flag_is_known_to_the_cli(name: str) -> None:
    c = agent(name)
    argv = c["command"] + [a for a in c["args"] if not a.startswith("--node-name=$(")]
    known = _cli_flags()
    unknown = {a.partition("=")[0] for a in argv if a.startswith("--")} - known
    assert not unknown, f"the chart renders flags `ipvsproxy run` does not have: {sorted(unknown)}"
    params = _parse_with_cli(argv)
    if name == "no-modules":
        assert params["load_modules"] is False
    if name == "custom":
        assert params["scheduler"] == "lc"
        assert params["min_sync_period"] == 0.5
        assert params["strict_arp"] is True
        assert params["masquerade_all"] is True
        assert params["nftables"] is False
        assert [str(n) for n in params["cluster_cidrs"]] == ["10.244.0.0/16", "fd00:10:244::/56"]


# ---- metrics --------------------------------------------------------------------------------


def test_metrics_off_by_default() -> None:
    docs = render("default")
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}
    annotations = daemonset()["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any(k.startswith("prometheus.io/") for k in annotations)


def test_metrics_enabled_scrape_annotations_service_and_servicemonitor() -> None:
    docs = render("metrics")
    ds = one(docs, "DaemonSet")
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "10249"
    assert annotations["prometheus.io/path"] == "/metrics"
    c = ds["spec"]["template"]["spec"]["containers"][0]
    assert "--metrics-bind-address=0.0.0.0:10249" in c["args"]
    assert {"name": "metrics", "containerPort": 10249, "protocol": "TCP"} in c["ports"]

    svc = one(docs, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 10249, "targetPort": "metrics", "protocol": "TCP"}]

    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"


def test_servicemonitor_only_when_enabled() -> None:
    docs = render("metrics-no-servicemonitor")
    assert "ServiceMonitor" not in {d["kind"] for d in docs}
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9249
    ds = one(docs, "DaemonSet")
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9249"
    assert "--metrics-bind-address=0.0.0.0:9249" in ds["spec"]["template"]["spec"]["containers"][0]["args"]


def test_extra_values_reach_the_pod() -> None:
    ds = daemonset("extra")
    tpl = ds["spec"]["template"]
    assert tpl["spec"]["containers"][0]["image"] == "registry.example.com/net/ipvsproxy:0.1.0-rc1"
    assert tpl["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert tpl["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert tpl["metadata"]["annotations"]["example.com/team"] == "net"
    assert tpl["metadata"]["labels"]["example.com/tier"] == "node"
    assert "nodeAffinity" in tpl["spec"]["affinity"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": "10%"}
    sa = one(render("extra"), "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"example.com/role": "proxy"}


# ---- values.schema.json ---------------------------------------------------------------------


BAD_VALUES = {
    "unknown scheduler": ["--set", "config.scheduler=bogus"],
    "bad IPv4 CIDR prefix": ["--set", "config.excludeCIDRs={10.0.0.0/33}"],
    "bad IPv4 CIDR address": ["--set", "config.excludeCIDRs={300.0.0.0/8}"],
    "not a CIDR": ["--set", "config.nodePortAddresses={eth0}"],
    "bad IPv6 CIDR prefix": ["--set", "config.nodePortAddresses={fd00::/129}"],
    "CIDR without prefix": ["--set", "config.excludeCIDRs={10.0.0.1}"],
    "bad cluster CIDR": ["--set", "config.clusterCIDR=10.244.0.0"],
    "duration without unit": ["--set", "config.syncPeriod=30"],
    "duration with bad unit": ["--set", "config.minSyncPeriod=30sec"],
    "negative duration": ["--set", "config.tcpTimeout=-1s"],
    "bad drain grace period": ["--set", "config.drainGracePeriod=soon"],
    "metrics port too high": ["--set", "metrics.port=70000"],
    "metrics port zero": ["--set", "metrics.port=0"],
    "healthz port too high": ["--set", "config.healthzBindAddress=0.0.0.0:99999"],
    "healthz without port": ["--set", "config.healthzBindAddress=0.0.0.0"],
    "unknown config key": ["--set", "config.ipvsScheduler=rr"],
    "unknown top-level key": ["--set", "metricz.enabled=true"],
    "bad log level": ["--set", "config.logLevel=verbose"],
    "interface name too long": ["--set", "config.interface=averyveryverylongname"],
    "interface a NIC": ["--set", "config.interface=eth0"],
    "interface another tool's dummy": ["--set", "config.interface=nodelocaldns"],
    "interface prefix only in the middle": ["--set", "config.interface=eth0ipvsproxy"],
    "zero sync period": ["--set", "config.syncPeriod=0s"],
    "zero min sync period": ["--set-string", "config.minSyncPeriod=0"],
    "boolean as string": ["--set-string", "config.strictARP=yes"],
}


@pytest.mark.parametrize("args", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_schema_rejects_bad_values(args: list[str]) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0, f"accepted {args}:\n{proc.stdout[:500]}"
    assert "schema" in proc.stderr, proc.stderr


GOOD_VALUES = {
    "every scheduler": [a for s in ("wrr", "sh", "mh", "lblcr", "ovf") for a in ("--set", f"config.scheduler={s}")],
    "IPv6 and IPv4 CIDRs": ["--set", "config.excludeCIDRs={0.0.0.0/0,::/0,fd00::/8,2001:db8:0:0:0:0:0:1/128}"],
    "compound durations": ["--set", "config.syncPeriod=1h2m3s", "--set", "config.minSyncPeriod=1.5s",
                           "--set-string", "config.tcpTimeout=0"],
    "IPv6 bind address": ["--set", "config.metricsBindAddress=[::]:9100"],
    "dual-stack cluster CIDR": ["--set", "config.clusterCIDR=10.244.0.0/16\\,fd00:10:244::/56"],
    "maxUnavailable percent": ["--set", "updateStrategy.rollingUpdate.maxUnavailable=20%"],
    "another ipvsproxy interface": ["--set", "config.interface=ipvsproxy-b2"],
}


@pytest.mark.parametrize("args", list(GOOD_VALUES.values()), ids=list(GOOD_VALUES))
def test_schema_accepts_good_values(args: list[str]) -> None:
    run_helm("template", RELEASE, str(CHART), *args)


def test_schema_and_values_describe_the_same_config() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    assert set(config["properties"]) == set(values["config"]) == CONFIG_KEYS
    assert set(schema["properties"]) - {"global"} == set(values)
    assert config["properties"]["scheduler"]["enum"] == [
        "rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "sed", "nq", "lblc", "lblcr", "fo", "ovf"]


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values["config"]:
        assert f"`config.{key}`" in readme, key
    for key in ("image.repository", "metrics.enabled", "metrics.serviceMonitor.enabled", "rbac.create",
                "serviceAccount.create", "priorityClassName", "sysctlInit.enabled", "securityContext.privileged"):
        assert f"`{key}`" in readme, key
    assert "helm install ipvsproxy charts/ipvsproxy -n kube-system" in readme
