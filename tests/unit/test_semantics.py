"""Service semantics parity with kube-proxy: the rules of docs/semantics.md
that ipvsproxy once got wrong, one test each, plus a property test against an
independent reading of kube-proxy's rules on raw objects."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, AF_INET6
from ipvsproxy.objects import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    parse_endpointslice,
    parse_node,
    parse_service,
    proxy_name_selector,
    selected_by_proxy_name,
)
from ipvsproxy.reconcile import Reconciler
from ipvsproxy.schedulers import Registry
from ipvsproxy.sources.files import ManifestReader
from ipvsproxy.sources.kube import KubeSource
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config, translate, translate_service
from tests.apiserver import FakeApiServer
from tests.unit.factories import NODE, endpoint, key, node, port, reals, run, service, slice_, table
from tests.unit.kubelab import FAST, wait_until

EPS = ["10.1.0.1", "10.1.0.2"]
R2 = {("10.1.0.1", 8080), ("10.1.0.2", 8080)}


def labelled(obj: dict[str, Any], **labels: str) -> dict[str, Any]:
    obj["metadata"]["labels"] = dict(labels)
    return obj


# ---- rule 9: no cluster IP skips the whole Service ---------------------------------------------

@pytest.mark.parametrize("cluster_ip", ["", "None"])
def test_no_cluster_ip_skips_nodeports_and_external_ips_too(cluster_ip: str) -> None:
    svc = service(cluster_ip=cluster_ip, type="LoadBalancer", ports=[port("http", 80, node_port=30080)],
                  external_ips=["192.0.2.77"], ingress=[{"ip": "203.0.113.9"}])
    desired, _ = run([svc], [slice_(endpoints=EPS)], node())
    assert desired.services == {} and desired.addresses == set()


# ---- rule 10: serving unset is true ----------------------------------------------------------

def test_terminating_endpoint_without_a_serving_condition_is_used_as_fallback() -> None:
    sl = slice_(endpoints=[endpoint("10.1.0.1", ready=False, terminating=True)])  # no serving key
    desired, _ = run([service()], [sl])
    assert reals(desired.services[key("10.96.0.10")]) == {("10.1.0.1", 8080)}


# ---- rule 7: one IP:port in two slices ---------------------------------------------------------

@pytest.mark.parametrize("order", ["terminating-first", "terminating-last"])
def test_duplicate_endpoint_non_terminating_copy_wins_whatever_the_order(order: str) -> None:
    old = slice_(name="web-a", endpoints=[endpoint("10.1.0.1", ready=False, serving=True, terminating=True,
                                                   node="n2")])
    new = slice_(name="web-b", endpoints=[endpoint("10.1.0.1", ready=True, node=NODE)])
    slices = [old, new] if order == "terminating-first" else [new, old]
    if order == "terminating-last":  # slice names decide nothing either
        slices[0]["metadata"]["name"], slices[1]["metadata"]["name"] = "web-z", "web-a"
    svc = service(type="NodePort", etp="Local", ports=[port("http", 80, node_port=30080)])
    desired, _ = run([svc], slices, node())
    # the ready local copy is the one used: Local policy finds it on this node
    assert reals(desired.services[key("192.0.2.1", 30080)]) == {("10.1.0.1", 8080)}
    assert not desired.services[key("192.0.2.1", 30080)].local_origin_only


# ---- rule 8: hints.forNodes ---------------------------------------------------------------------

def _node_hinted(ip: str, nodes: list[str], zone: str = "z1") -> dict[str, Any]:
    e = endpoint(ip, zones=[zone])
    e["hints"]["forNodes"] = [{"name": n} for n in nodes]
    return e


def test_prefer_same_node_hints_narrow_to_this_nodes_endpoints() -> None:
    sl = slice_(endpoints=[_node_hinted("10.1.0.1", [NODE]), _node_hinted("10.1.0.2", ["n2"]),
                           _node_hinted("10.1.0.3", ["n3"])])
    desired, _ = run([service()], [sl], node(zone="z1"))
    assert reals(desired.services[key("10.96.0.10")]) == {("10.1.0.1", 8080)}


def test_node_hints_for_other_nodes_only_fall_back_to_zone_hints() -> None:
    sl = slice_(endpoints=[_node_hinted("10.1.0.1", ["n2"], "z1"), _node_hinted("10.1.0.2", ["n3"], "z2")])
    desired, _ = run([service()], [sl], node(zone="z1"))
    assert reals(desired.services[key("10.96.0.10")]) == {("10.1.0.1", 8080)}


def test_node_hints_ignored_unless_every_ready_endpoint_has_one() -> None:
    sl = slice_(endpoints=[_node_hinted("10.1.0.1", [NODE]), endpoint("10.1.0.2")])
    desired, _ = run([service()], [sl], node())
    assert reals(desired.services[key("10.96.0.10")]) == R2


# ---- rule 6: single-stack Services on a dual-stack node ------------------------------------------

def test_single_stack_service_gets_nothing_in_the_other_family() -> None:
    svc = service(type="LoadBalancer", ports=[port("http", 80, node_port=30080)],
                  external_ips=["192.0.2.50", "2001:db8::50"], ingress=[{"ip": "203.0.113.1"}, {"ip": "2001:db8::1"}])
    nd = node(internal=["192.0.2.1", "fd00:2::1"])
    desired, problems = run([svc], [slice_(endpoints=EPS), slice_(endpoints=["fd01::1"], family="IPv6")], nd)
    assert {k.family for k in desired.services} == {AF_INET}
    assert key("fd00:2::1", 30080) not in desired.services
    assert desired.addresses == {"10.96.0.10", "192.0.2.50", "203.0.113.1"}
    assert sum("2001:db8::50" in p for p in problems) == 1 and sum("2001:db8::1 " in p for p in problems) == 1


def test_ipv6_only_service_gets_ipv6_nodeports_only() -> None:
    svc = service(cluster_ip="fd00::10", type="NodePort", ports=[port("http", 80, node_port=30080)])
    nd = node(internal=["192.0.2.1", "fd00:2::1"])
    desired, _ = run([svc], [slice_(endpoints=["fd01::1"], family="IPv6")], nd)
    assert set(desired.services) == {key("fd00::10"), key("fd00:2::1", 30080)}


# ---- rule 3: service.kubernetes.io/service-proxy-name ---------------------------------------------

def test_proxy_name_selector_and_its_local_twin_agree() -> None:
    mine, theirs = service("a"), labelled(service("b"), **{SERVICE_PROXY_NAME_LABEL: "kube-router"})
    assert proxy_name_selector() == f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
    assert proxy_name_selector("ipvsproxy") == f"{SERVICE_PROXY_NAME_LABEL}=ipvsproxy,!{HEADLESS_LABEL}"
    assert selected_by_proxy_name(mine) and not selected_by_proxy_name(theirs)
    assert not selected_by_proxy_name(mine, "kube-router") and selected_by_proxy_name(theirs, "kube-router")
    assert not selected_by_proxy_name(theirs, "ipvsproxy")
    # service.kubernetes.io/headless (any value, even ""): no proxy's, whatever --service-proxy-name says
    for value in ("", "true"):
        assert not selected_by_proxy_name(labelled(service("c"), **{HEADLESS_LABEL: value}))
        both = labelled(service("d"), **{SERVICE_PROXY_NAME_LABEL: "kube-router", HEADLESS_LABEL: value})
        assert not selected_by_proxy_name(both, "kube-router")


def _write_manifest(path: Path, objs: list[dict[str, Any]]) -> None:
    import yaml

    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objs}))


def test_from_file_skips_services_of_another_proxy(tmp_path: Path) -> None:
    theirs = labelled(service("other", cluster_ip="10.96.0.20", external_ips=["192.0.2.20"]),
                      **{SERVICE_PROXY_NAME_LABEL: "kube-router"})
    _write_manifest(tmp_path / "c.yaml", [service("web"), theirs, slice_("other", EPS)])
    tracker = Tracker(NODE)
    ManifestReader([str(tmp_path)]).load(tracker)
    assert set(tracker.services) == {"default/web"}
    tracker = Tracker(NODE)
    ManifestReader([str(tmp_path)], service_proxy_name="kube-router").load(tracker)
    assert set(tracker.services) == {"default/other"}


@pytest.mark.parametrize(("label", "value"), [(SERVICE_PROXY_NAME_LABEL, "x"), (HEADLESS_LABEL, "")])
def test_api_source_selects_server_side_and_drops_a_service_that_gets_the_label(
        api: FakeApiServer, label: str, value: str) -> None:
    """A Service of another proxy, or labelled headless (the e2e test "should implement
    service.kubernetes.io/headless"), is not served; gaining the label takes it away, losing
    the label brings it back."""
    api.create(node(NODE))
    api.create(service("web"))
    api.create(labelled(service("other", cluster_ip="10.96.0.20"), **{label: value}))
    tracker = Tracker(NODE)
    src = KubeSource(tracker, NODE, api_client=api.client(), timing=FAST)
    src.start()
    try:
        wait_until(tracker.ready, what="listed")
        assert set(tracker.services) == {"default/web"}
        api.update(labelled(service("web"), **{label: value}))
        wait_until(lambda: not tracker.services, what=f"web labelled {label}")
        api.update(service("web"))
        wait_until(lambda: set(tracker.services) == {"default/web"}, what="web back without the label")
    finally:
        src.stop()
    queries = [q for m, p, q in list(api.requests) if m == "GET" and p.endswith("/services")]
    assert queries and all(q.get("labelSelector") == f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
                           for q in queries)


def test_service_proxy_name_flag_reaches_the_sources() -> None:
    from click.testing import CliRunner

    from ipvsproxy.cli.main import cli
    from ipvsproxy.cli.run import run as run_cmd

    cli.add_command(run_cmd)
    examples = str(Path(__file__).resolve().parents[2] / "examples")
    out = CliRunner().invoke(cli, ["run", "--from-file", examples, "--once", "--dry-run", "--dataplane", "memory",
                                   "--node-name", "demo-node", "--service-proxy-name", "nobody"])
    assert out.exit_code == 0, out.output
    assert not any(line.startswith("add-vs ") for line in out.stdout.splitlines())


# ---- rule 5: never bind a node's own address ---------------------------------------------------------

def test_external_ip_that_is_a_node_address_gets_servers_but_no_bind() -> None:
    svc = service(type="LoadBalancer", external_ips=["192.0.2.1", "192.0.2.50"], ingress=[{"ip": "198.51.100.9"}])
    desired, _ = run([svc], [slice_(endpoints=EPS)], node(internal=["192.0.2.1"]))
    assert key("192.0.2.1") in desired.services and not desired.services[key("192.0.2.1")].bind
    assert desired.addresses == {"10.96.0.10", "192.0.2.50", "198.51.100.9"}
    # an address on any other interface counts too, not only the Node object's
    parsed = parse_service(svc)[0]
    t = translate_service(parsed, [parse_endpointslice(slice_(endpoints=EPS))[0]], parse_node(node())[0],
                          Config(NODE), Registry(), local_addresses={"198.51.100.9"})
    assert t.addresses == {"10.96.0.10", "192.0.2.50"}


def test_reconciler_never_binds_or_unbinds_a_local_address() -> None:
    tracker = Tracker(NODE)
    tracker.replace("Node", [node()])
    svc = service(external_ips=["198.51.100.9"])
    tracker.replace("Service", [svc])
    tracker.replace("EndpointSlice", [slice_(endpoints=EPS)])
    dp = MemoryDataplane()
    dp.local = {"198.51.100.9"}  # e.g. k3s ServiceLB: the LB IP is the node's own
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    rec.sync()
    assert key("198.51.100.9") in dp.state.services
    assert dp.state.addresses == {"10.96.0.10"}
    # the address is later bound on our interface by someone: still not ours to keep
    tracker.replace("Service", [])
    rec.sync()
    assert dp.state.services == {} and dp.state.addresses == set()


def test_an_address_that_leaves_the_node_is_bound_at_the_next_full_sync() -> None:
    tracker = Tracker(NODE)
    tracker.replace("Node", [node()])
    tracker.replace("Service", [service(external_ips=["198.51.100.9"])])
    tracker.replace("EndpointSlice", [])
    dp = MemoryDataplane()
    dp.local = {"198.51.100.9"}
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    rec.sync()
    assert "198.51.100.9" not in dp.state.addresses
    dp.local = set()
    rec.sync()  # incremental: addresses are re-read on full syncs only
    rec.sync(full=True)
    assert "198.51.100.9" in dp.state.addresses


# ---- rule 2: externalTrafficPolicy Local with no local endpoint ------------------------------------------

def test_etp_local_without_local_endpoint_uses_cluster_endpoints_for_local_origin_only() -> None:
    svc = service(type="LoadBalancer", etp="Local", ports=[port("http", 80, node_port=30080)],
                  external_ips=["192.0.2.50"], ingress=[{"ip": "203.0.113.1"}])
    sl = slice_(endpoints=[endpoint("10.1.0.1", node="n2"), endpoint("10.1.0.2", node="n3")])
    desired, _ = run([svc], [sl], node())
    for ip, p in (("192.0.2.50", 80), ("203.0.113.1", 80), ("192.0.2.1", 30080)):
        vs = desired.services[key(ip, p)]
        assert reals(vs) == R2 and vs.local_origin_only and vs.local
    assert not desired.services[key("10.96.0.10")].local_origin_only
    # a local endpoint appears: only it, from anywhere
    sl = slice_(endpoints=[endpoint("10.1.0.1", node="n2"), endpoint("10.1.0.2", node=NODE)])
    desired, _ = run([svc], [sl], node())
    vs = desired.services[key("203.0.113.1")]
    assert reals(vs) == {("10.1.0.2", 8080)} and not vs.local_origin_only
    # no endpoint anywhere: nothing to fall back to (refused, not dropped)
    desired, _ = run([svc], [], node())
    assert not desired.services[key("203.0.113.1")].local_origin_only


def test_internal_traffic_policy_local_has_no_fallback() -> None:
    sl = slice_(endpoints=[endpoint("10.1.0.1", node="n2")])
    desired, _ = run([service(itp="Local")], [sl], node())
    assert reals(desired.services[key("10.96.0.10")]) == set()


# ---- rule 1: what the health-check node port reports ----------------------------------------------------

def test_health_check_node_port_counts_distinct_local_ready_addresses() -> None:
    svc = service(type="LoadBalancer", etp="Local", healthCheckNodePort=32000,
                  ports=[port("http", 80, node_port=30080), port("https", 443, node_port=30443)])
    sl = slice_(endpoints=[endpoint("10.1.0.1"), endpoint("10.1.0.2", node="n2"),
                           endpoint("10.1.0.3", ready=False, serving=True, terminating=True)],
                ports=[("http", 8080), ("https", 8443)])
    parsed = parse_service(svc)[0]
    t = translate_service(parsed, [parse_endpointslice(sl)[0]], parse_node(node())[0], Config(NODE), Registry())
    assert t.health == (32000, 1)  # 10.1.0.1 once for both ports; terminating ones do not count
    cluster_policy = parse_service(service(type="LoadBalancer", healthCheckNodePort=32000))[0]
    nodeport_type = parse_service(service(type="NodePort", etp="Local", healthCheckNodePort=32000))[0]
    assert cluster_policy.health_check_node_port == 0 == nodeport_type.health_check_node_port


def test_node_eligibility_follows_deletion_and_the_autoscaler_taint() -> None:
    assert parse_node(node())[0].eligible
    deleting = node()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not parse_node(deleting)[0].eligible
    tainted = node()
    tainted["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
    assert not parse_node(tainted)[0].eligible


# ---- the property: never a virtual server kube-proxy would not create -------------------------------------

NODE_V4, NODE_V6 = "192.0.2.1", "fd00:2::1"
OTHER_LOCAL = "198.51.100.7"  # an address on another interface of the node
V4_IPS = ["192.0.2.50", NODE_V4, OTHER_LOCAL, "203.0.113.1"]
V6_IPS = ["2001:db8::50", NODE_V6, "2001:db8::1"]


def _is6(ip: str) -> bool:
    return ":" in ip


@st.composite
def edge_endpoint(draw: st.DrawFn, family: str) -> dict[str, Any]:
    ip = draw(st.sampled_from(["10.1.0.1", "10.1.0.2", "10.1.0.3"] if family == "IPv4"
                              else ["fd01::1", "fd01::2"]))
    e: dict[str, Any] = {"addresses": [ip], "conditions": {}}
    for cond in ("ready", "serving", "terminating"):
        v = draw(st.sampled_from([None, True, False]))
        if v is not None:
            e["conditions"][cond] = v
    nd = draw(st.sampled_from([NODE, "n2", None]))
    if nd:
        e["nodeName"] = nd
    hints: dict[str, Any] = {}
    if draw(st.booleans()):
        hints["forZones"] = [{"name": z} for z in draw(st.lists(st.sampled_from(["z1", "z2"]), max_size=2))]
    if draw(st.booleans()):
        hints["forNodes"] = [{"name": n} for n in draw(st.lists(st.sampled_from([NODE, "n2"]), max_size=2))]
    if hints:
        e["hints"] = hints
    return e


@st.composite
def edge_cluster(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    stype = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]))
    cips = draw(st.sampled_from([[], ["None"], [""], ["10.96.0.10"], ["fd00::10"], ["10.96.0.10", "fd00::10"]]))
    spec: dict[str, Any] = {"type": stype, "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                                      "nodePort": 30080}]}
    if cips:
        spec["clusterIP"] = cips[0]
        spec["clusterIPs"] = cips
    spec["externalIPs"] = draw(st.lists(st.sampled_from(V4_IPS + V6_IPS), max_size=3, unique=True))
    for field in ("externalTrafficPolicy", "internalTrafficPolicy"):
        v = draw(st.sampled_from([None, "Local", "Cluster"]))
        if v:
            spec[field] = v
    svc: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                           "spec": spec}
    ingress = draw(st.lists(st.sampled_from(V4_IPS + V6_IPS), max_size=2, unique=True))
    if ingress:
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": i} for i in ingress]}}
    slices = []
    for i, fam in enumerate(draw(st.lists(st.sampled_from(["IPv4", "IPv6"]), max_size=3))):
        eps = draw(st.lists(edge_endpoint(fam), max_size=3))
        slices.append(slice_(endpoints=eps, family=fam, name=f"web-{i}"))
    return svc, slices


def kube_proxy_reference(svc: dict[str, Any], slices: list[dict[str, Any]],
                         local_addrs: set[str]) -> tuple[dict[tuple[str, int], set[tuple[str, int]]], set[str]]:
    """Which VIP:port kube-proxy's IPVS mode would create for this Service on
    node NODE (zone z1, addresses NODE_V4/NODE_V6), with which real servers,
    and which addresses it binds: written from kube-proxy's rules directly on
    the raw objects, independently of objects.py and translate.py."""
    spec = svc["spec"]
    cips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") is not None else [])
    if spec.get("type") == "ExternalName" or not cips or cips[0] in ("", "None"):  # ShouldSkipService
        return {}, set()
    ext_local = spec.get("externalTrafficPolicy") == "Local" and (
        spec.get("type") in ("NodePort", "LoadBalancer") or bool(spec.get("externalIPs")))
    int_local = spec.get("internalTrafficPolicy") == "Local"
    out: dict[tuple[str, int], set[tuple[str, int]]] = {}
    bound: set[str] = set()
    for six in {_is6(ip) for ip in cips}:
        eps: dict[str, dict[str, Any]] = {}
        for sl in slices:
            if (sl["addressType"] == "IPv6") != six:
                continue
            for e in sl["endpoints"]:
                c = e["conditions"]
                info = {"ready": c.get("ready", True), "serving": c.get("serving", True),
                        "terminating": c.get("terminating", False), "node": e.get("nodeName"),
                        "zones": [z["name"] for z in e.get("hints", {}).get("forZones", [])],
                        "nodes": [n["name"] for n in e.get("hints", {}).get("forNodes", [])]}
                ip = e["addresses"][0]
                # the non-terminating copy wins; between two of a kind kube-proxy's
                # choice is undefined, ours is the first by slice name
                if ip not in eps or (eps[ip]["terminating"] and not info["terminating"]):
                    eps[ip] = info
        ready = {ip for ip, i in eps.items() if i["ready"]}
        cluster = ready
        if ready and all(eps[ip]["nodes"] for ip in ready) and any(NODE in eps[ip]["nodes"] for ip in ready):
            cluster = {ip for ip in ready if NODE in eps[ip]["nodes"]}
        elif ready and all(eps[ip]["zones"] for ip in ready) and any("z1" in eps[ip]["zones"] for ip in ready):
            cluster = {ip for ip in ready if "z1" in eps[ip]["zones"]}
        if not cluster:
            cluster = {ip for ip, i in eps.items() if i["serving"] and i["terminating"]}
        mine = {ip: i for ip, i in eps.items() if i["node"] == NODE}
        local = {ip for ip, i in mine.items() if i["ready"]} or {
            ip for ip, i in mine.items() if i["serving"] and i["terminating"]}
        internal = local if int_local else cluster
        external = (local or cluster) if ext_local else cluster
        fam_ips = [ip for ip in cips if _is6(ip) == six]
        ext = [ip for ip in spec.get("externalIPs", []) if _is6(ip) == six]
        lbs = [i["ip"] for i in svc.get("status", {}).get("loadBalancer", {}).get("ingress", [])
               if _is6(i["ip"]) == six]
        for ip in fam_ips:
            out[(ip, 80)] = {(r, 8080) for r in internal}
            bound.add(ip)
        for ip in ext + lbs:
            out[(ip, 80)] = {(r, 8080) for r in external}
            if ip not in local_addrs | {NODE_V4, NODE_V6}:
                bound.add(ip)
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            out[(NODE_V6 if six else NODE_V4, 30080)] = {(r, 8080) for r in external}
    return out, bound


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edge_cluster())
def test_translation_matches_kube_proxy_on_edge_cases(cluster: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    svc, slices = cluster
    for sl in slices:  # every slice carries the Service's port
        sl["ports"] = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    want, want_bound = kube_proxy_reference(svc, slices, {OTHER_LOCAL})
    nd = parse_node(node(internal=[NODE_V4, NODE_V6], zone="z1"))[0]
    svcs = [parse_service(svc)[0]]
    sls = [parse_endpointslice(s)[0] for s in slices]
    desired, _ = translate(svcs, sls, nd, Config(NODE), Registry(), local_addresses={OTHER_LOCAL})
    got = {(k.address, k.port): {(r.address, r.port) for r in vs.reals} for k, vs in desired.services.items()}
    assert got == want
    assert desired.addresses == want_bound
    assert not desired.addresses & {NODE_V4, NODE_V6, OTHER_LOCAL}
    for k in desired.services:
        assert k.family == (AF_INET6 if _is6(k.address) else AF_INET)
        assert ipaddress.ip_address(k.address)


def test_reference_itself_sees_the_rules() -> None:
    """The oracle is not vacuous: it differs from the old translation on each rule's edge case."""
    svc = service(cluster_ip="", type="NodePort", ports=[port("http", 80, node_port=30080)])
    assert kube_proxy_reference(svc, [], set()) == ({}, set())
    v4only = service(type="NodePort", ports=[port("http", 80, node_port=30080)])
    got, _ = kube_proxy_reference(v4only, [], set())
    assert (NODE_V6, 30080) not in got and (NODE_V4, 30080) in got
    assert table(run([v4only], [], node(internal=[NODE_V4, NODE_V6]))[0]) == {
        key("10.96.0.10"): set(), key(NODE_V4, 30080): set()}


def test_every_rule_the_code_cites_is_in_docs_semantics() -> None:
    """Code and tests cite "docs/semantics.md rule N" (or "rule N" beside it): each N exists."""
    import re

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "semantics.md").read_text()
    defined = {int(n) for n in re.findall(r"^\*\*(\d+)\. ", doc, flags=re.M)}
    assert defined == set(range(1, max(defined) + 1))
    cited: set[int] = set()
    for path in [*(root / "ipvsproxy").rglob("*.py"), *(root / "tests").rglob("*.py")]:
        cited |= {int(n) for n in re.findall(r"semantics\.md\)? rule (\d+)", path.read_text())}
    assert cited and cited <= defined, cited - defined
