"""Translation rules of docs/semantics.md, one by one: Services + EndpointSlices + Node -> virtual servers."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ipvsproxy.model import AF_INET, AF_INET6, F_OWNED, F_PERSISTENT, F_SCHED1, Real
from ipvsproxy.objects import parse_endpointslice, parse_node, parse_service
from ipvsproxy.schedulers import Registry
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config, translate, translate_service
from tests.unit.factories import (
    NODE,
    SCTP,
    TCP,
    UDP,
    endpoint,
    key,
    legacy_endpoints,
    node,
    port,
    reals,
    run,
    service,
    slice_,
    table,
)

EPS = ["10.1.0.1", "10.1.0.2"]
R2 = {("10.1.0.1", 8080), ("10.1.0.2", 8080)}


# ---- ClusterIP --------------------------------------------------------------

def test_cluster_ip_one_vs_per_port_with_ready_endpoints_nat_weight_1() -> None:
    svc = service(ports=[port("http", 80), port("metrics", 9090)])
    sl = slice_(endpoints=EPS, ports=[("http", 8080), ("metrics", 9100)])
    desired, problems = run([svc], [sl])
    assert problems == []
    assert table(desired) == {
        key("10.96.0.10", 80): R2,
        key("10.96.0.10", 9090): {("10.1.0.1", 9100), ("10.1.0.2", 9100)},
    }
    vs = desired.services[key("10.96.0.10", 80)]
    assert all(r.weight == 1 for r in vs.reals)
    assert vs.scheduler == "rr" and vs.flags == 0 and vs.timeout == 0
    assert vs.kernel_flags == F_OWNED
    assert vs.service is not None and vs.service.kind == "ClusterIP" and str(vs.service) == "default/web:http"
    assert desired.addresses == {"10.96.0.10"}


def test_every_cluster_ip_gets_a_vs_dual_stack_each_family_its_own_endpoints() -> None:
    svc = service(cluster_ips=["10.96.0.10", "fd00::10"])
    v4 = slice_(endpoints=EPS)
    v6 = slice_(endpoints=["fd01::1", "fd01::2"], family="IPv6")
    desired, _ = run([svc], [v4, v6])
    assert table(desired) == {
        key("10.96.0.10"): R2,
        key("fd00::10"): {("fd01::1", 8080), ("fd01::2", 8080)},
    }
    assert desired.services[key("fd00::10")].key.family == AF_INET6
    assert desired.services[key("10.96.0.10")].key.family == AF_INET
    assert desired.addresses == {"10.96.0.10", "fd00::10"}


def test_ipv6_only_service_ignores_ipv4_endpoints() -> None:
    desired, _ = run([service(cluster_ip="fd00::10")], [slice_(endpoints=EPS)])
    assert table(desired) == {key("fd00::10"): set()}


def test_ipv6_addresses_are_canonicalised() -> None:
    desired, _ = run([service(cluster_ip="FD00:0:0::0010")],
                     [slice_(endpoints=["FD01:0::1"], family="IPv6")])
    assert table(desired) == {key("fd00::10"): {("fd01::1", 8080)}}


@pytest.mark.parametrize("proto,num", [("TCP", TCP), ("UDP", UDP), ("SCTP", SCTP), ("udp", UDP)])
def test_protocols(proto: str, num: int) -> None:
    svc = service(ports=[port("p", 53, proto)])
    sl = slice_(endpoints=EPS, ports=[("p", 5353, proto.upper())])
    desired, _ = run([svc], [sl])
    assert table(desired) == {key("10.96.0.10", 53, num): {("10.1.0.1", 5353), ("10.1.0.2", 5353)}}


def test_tcp_and_udp_on_the_same_port_are_two_vs_matched_by_protocol() -> None:
    svc = service(ports=[port("dns", 53, "UDP"), port("dns-tcp", 53, "TCP")])
    sl = slice_(endpoints=["10.1.0.1"], ports=[("dns", 5353, "UDP"), ("dns-tcp", 8053, "TCP")])
    desired, _ = run([svc], [sl])
    assert table(desired) == {
        key("10.96.0.10", 53, UDP): {("10.1.0.1", 5353)},
        key("10.96.0.10", 53, TCP): {("10.1.0.1", 8053)},
    }


def test_port_name_must_match_and_protocol_too() -> None:
    svc = service(ports=[port("http", 80, "TCP")])
    sl = slice_(endpoints=EPS, ports=[("other", 8080), ("http", 9999, "UDP")])
    desired, _ = run([svc], [sl])
    assert table(desired) == {key("10.96.0.10"): set()}


def test_named_target_port_resolved_per_slice() -> None:
    """Two slices of one Service, the same port name at different numbers."""
    svc = service(ports=[port("http", 80, target="http")])
    a = slice_(endpoints=["10.1.0.1"], name="web-a", ports=[("http", 8080)])
    b = slice_(endpoints=["10.1.0.2"], name="web-b", ports=[("http", 9090)])
    desired, _ = run([svc], [a, b])
    assert table(desired) == {key("10.96.0.10"): {("10.1.0.1", 8080), ("10.1.0.2", 9090)}}


def test_unnamed_single_port() -> None:
    svc = service(ports=[{"port": 80, "protocol": "TCP"}])
    sl = slice_(endpoints=EPS, ports=[("", 8080)])
    desired, _ = run([svc], [sl])
    assert table(desired) == {key("10.96.0.10"): R2}


def test_slices_of_other_services_and_namespaces_are_not_used() -> None:
    svc = service()
    other = slice_("api", endpoints=["10.2.0.1"])
    other_ns = slice_("web", endpoints=["10.3.0.1"], namespace="prod")
    desired, _ = run([svc], [slice_(endpoints=EPS), other, other_ns])
    assert table(desired) == {key("10.96.0.10"): R2}


def test_duplicate_endpoint_across_slices_is_one_real() -> None:
    a = slice_(endpoints=EPS, name="a")
    b = slice_(endpoints=["10.1.0.2"], name="b")
    desired, _ = run([service()], [a, b])
    assert len(desired.services[key("10.96.0.10")].reals) == 2


def test_reals_are_sorted_and_shared_by_the_ports_virtual_servers() -> None:
    sl = slice_(endpoints=[endpoint("10.1.0.9", target="web-9", node="n2"), endpoint("10.1.0.1")])
    desired, _ = run([service(external_ips=["192.0.2.7"])], [sl])
    vs, ext = (desired.services[key(ip)] for ip in ("10.96.0.10", "192.0.2.7"))
    assert vs.reals == (Real("10.1.0.1", 8080), Real("10.1.0.9", 8080))
    assert ext.reals is vs.reals  # one tuple per Service port and family, not one per address


def test_the_tracker_says_who_stands_behind_each_address_for_display() -> None:
    # the desired state keeps no endpoint records: `list` learns pod and node from the slices
    tracker = Tracker(NODE)
    tracker.replace("EndpointSlice", [
        slice_(name="a", endpoints=[endpoint("10.1.0.9", target="web-9", node="n2"), endpoint("10.1.0.1")]),
        slice_(name="b", endpoints=[endpoint("10.1.0.3", target="web-3", node=None)]),
        slice_("other", endpoints=[endpoint("10.1.0.4", target="other-4")])])
    assert sorted(tracker.endpoints_of("default/web")) == [
        ("10.1.0.1", "", NODE), ("10.1.0.3", "Pod/web-3", ""), ("10.1.0.9", "Pod/web-9", "n2")]
    assert list(tracker.endpoints_of("default/nothing")) == []


# ---- no VS ------------------------------------------------------------------

@pytest.mark.parametrize("svc", [
    service(cluster_ip="None"),
    service(cluster_ip=None, cluster_ips=["None"]),
    service(type="ExternalName", cluster_ip=None, externalName="db.example.org"),
    service(type="ExternalName", cluster_ip=None, externalName="x.org", external_ips=["192.0.2.50"]),
], ids=["headless", "headless-clusterIPs", "externalname", "externalname-with-externalips"])
def test_headless_and_external_name_give_nothing(svc: dict) -> None:
    desired, _ = run([svc], [slice_(endpoints=EPS)], node(), )
    assert desired.services == {} and desired.addresses == set()


def test_no_endpoints_keeps_vs_without_reals() -> None:
    desired, _ = run([service()])
    assert table(desired) == {key("10.96.0.10"): set()}
    assert desired.addresses == {"10.96.0.10"}


def test_service_without_ports_has_no_vs() -> None:
    desired, _ = run([service(ports=[])], [slice_(endpoints=EPS)])
    assert desired.services == {}


# ---- external IPs, load balancers, NodePorts --------------------------------

def test_external_ips_get_a_vs_each_with_same_reals_and_are_bound() -> None:
    svc = service(external_ips=["192.0.2.10", "192.0.2.11"])
    desired, _ = run([svc], [slice_(endpoints=EPS)])
    assert table(desired) == {key(a): R2 for a in ("10.96.0.10", "192.0.2.10", "192.0.2.11")}
    assert desired.services[key("192.0.2.10")].service.kind == "ExternalIP"  # type: ignore[union-attr]
    assert desired.addresses == {"10.96.0.10", "192.0.2.10", "192.0.2.11"}


def test_lb_ingress_ips_vip_mode_only_and_hostname_only_skipped() -> None:
    svc = service(type="LoadBalancer", ports=[port("http", 80, node_port=30080)], ingress=[
        {"ip": "203.0.113.1"},
        {"ip": "203.0.113.2", "ipMode": "VIP"},
        {"ip": "203.0.113.3", "ipMode": "Proxy"},
        {"hostname": "lb.example.org"},
    ])
    desired, _ = run([svc], [slice_(endpoints=EPS)], node(internal=["192.0.2.1"]))
    assert table(desired) == {
        key("10.96.0.10"): R2,
        key("203.0.113.1"): R2,
        key("203.0.113.2"): R2,
        key("192.0.2.1", 30080): R2,
    }
    lb = desired.services[key("203.0.113.1")]
    assert lb.service is not None and lb.service.kind == "LoadBalancer"
    assert desired.addresses == {"10.96.0.10", "203.0.113.1", "203.0.113.2"}


def test_lb_source_ranges_only_on_lb_addresses() -> None:
    svc = service(type="LoadBalancer", ingress=[{"ip": "203.0.113.1"}],
                  loadBalancerSourceRanges=["198.51.100.0/24"])
    desired, _ = run([svc], [slice_(endpoints=EPS)])
    assert desired.services[key("203.0.113.1")].source_ranges == ("198.51.100.0/24",)
    assert desired.services[key("10.96.0.10")].source_ranges == ()


def test_nodeport_on_internal_and_external_ips_not_hostname_and_not_bound() -> None:
    svc = service(type="NodePort", ports=[port("http", 80, node_port=30080)],
                  cluster_ips=["10.96.0.10", "fd00::10"])
    nd = node(internal=["192.0.2.1", "fd00:2::1"], external=["198.51.100.1"], hostname="node-1")
    v6 = slice_(endpoints=["fd01::1"], family="IPv6")
    desired, _ = run([svc], [slice_(endpoints=EPS), v6], nd)
    assert table(desired) == {
        key("10.96.0.10"): R2,
        key("fd00::10"): {("fd01::1", 8080)},
        key("192.0.2.1", 30080): R2,
        key("198.51.100.1", 30080): R2,
        key("fd00:2::1", 30080): {("fd01::1", 8080)},
    }
    assert desired.services[key("192.0.2.1", 30080)].service.kind == "NodePort"  # type: ignore[union-attr]
    assert desired.addresses == {"10.96.0.10", "fd00::10"}


def test_nodeport_filtered_by_nodeport_cidrs() -> None:
    svc = service(type="NodePort", ports=[port("http", 80, node_port=30080)],
                  cluster_ips=["10.96.0.10", "fd00::10"])
    nd = node(internal=["192.0.2.1", "fd00:2::1"], external=["198.51.100.1"])
    desired, _ = run([svc], [slice_(endpoints=EPS)], nd,
                     nodeport_cidrs=[ipaddress.ip_network("192.0.2.0/24")])
    assert {k for k in desired.services if k.port == 30080} == {key("192.0.2.1", 30080)}
    desired, _ = run([svc], [slice_(endpoints=EPS)], nd,
                     nodeport_cidrs=[ipaddress.ip_network("fd00:2::/64"), ipaddress.ip_network("10.0.0.0/8")])
    assert {k for k in desired.services if k.port == 30080} == {key("fd00:2::1", 30080)}


def test_nodeport_needs_a_node_and_a_node_port() -> None:
    svc = service(type="NodePort", ports=[port("http", 80, node_port=30080)])
    assert set(run([svc], [slice_(endpoints=EPS)])[0].services) == {key("10.96.0.10")}
    no_np = service(type="NodePort", ports=[port("http", 80)])
    assert set(run([no_np], [], node())[0].services) == {key("10.96.0.10")}


def test_cluster_ip_service_with_stray_node_port_gets_no_nodeport_vs() -> None:
    svc = service(ports=[port("http", 80, node_port=30080)])
    assert set(run([svc], [], node())[0].services) == {key("10.96.0.10")}


def test_node_addresses_of_other_nodes_ignored_by_tracker_not_translate() -> None:
    # translate takes the node record it is given; its name is not re-checked.
    svc = service(type="NodePort", ports=[port("http", 80, node_port=30080)])
    desired, _ = run([svc], [], node("n1", internal=["192.0.2.7"]))
    assert key("192.0.2.7", 30080) in desired.services


# ---- session affinity ---------------------------------------------------------

def test_session_affinity_default_timeout() -> None:
    vs = run([service(affinity=None)])[0].services[key("10.96.0.10")]
    assert vs.timeout == 10800
    assert vs.kernel_flags & F_PERSISTENT


def test_session_affinity_custom_timeout_on_every_vs() -> None:
    svc = service(type="NodePort", affinity=60, ports=[port("http", 80, node_port=30080)],
                  external_ips=["192.0.2.10"])
    desired, _ = run([svc], [], node())
    assert {vs.timeout for vs in desired.services.values()} == {60}
    assert len(desired.services) == 3


@pytest.mark.parametrize("bad", [0, -5, 86401, "60", True, 1.5])
def test_session_affinity_bad_timeout_uses_default_with_problem(bad: object) -> None:
    svc, problems = parse_service(service(affinity=bad))  # type: ignore[arg-type]
    assert svc.affinity_timeout == 10800
    assert any("sessionAffinity" in p for p in problems)


def test_no_affinity_not_persistent() -> None:
    vs = run([service(sessionAffinity="None")])[0].services[key("10.96.0.10")]
    assert vs.timeout == 0 and not vs.kernel_flags & F_PERSISTENT


# ---- endpoint selection ---------------------------------------------------------

def test_only_ready_endpoints_when_some_are_ready() -> None:
    sl = slice_(endpoints=[
        endpoint("10.1.0.1"),
        endpoint("10.1.0.2", ready=False, serving=True, terminating=True),
        endpoint("10.1.0.3", ready=False),
    ])
    assert table(run([service()], [sl])[0]) == {key("10.96.0.10"): {("10.1.0.1", 8080)}}


def test_missing_ready_condition_counts_as_ready() -> None:
    sl = slice_(endpoints=[endpoint("10.1.0.1", ready=None)])
    assert table(run([service()], [sl])[0]) == {key("10.96.0.10"): {("10.1.0.1", 8080)}}


def test_fallback_to_serving_terminating_when_none_ready() -> None:
    sl = slice_(endpoints=[
        endpoint("10.1.0.1", ready=False, serving=True, terminating=True),
        endpoint("10.1.0.2", ready=False, serving=False, terminating=True),
        endpoint("10.1.0.3", ready=False, serving=True, terminating=False),
        endpoint("10.1.0.4", ready=False),
    ])
    assert table(run([service()], [sl])[0]) == {key("10.96.0.10"): {("10.1.0.1", 8080)}}


def test_nothing_usable_means_no_reals() -> None:
    sl = slice_(endpoints=[endpoint("10.1.0.1", ready=False, serving=False, terminating=True)])
    assert table(run([service()], [sl])[0]) == {key("10.96.0.10"): set()}


def _policy_fixture(**kw: object) -> tuple[dict, dict, dict]:
    svc = service(type="LoadBalancer", ports=[port("http", 80, node_port=30080)],
                  external_ips=["192.0.2.10"], ingress=[{"ip": "203.0.113.1"}], **kw)  # type: ignore[arg-type]
    sl = slice_(endpoints=[endpoint("10.1.0.1", node=NODE), endpoint("10.1.0.2", node="n2")])
    return svc, sl, node(internal=["192.0.2.1"])


def test_internal_traffic_policy_local_limits_cluster_ip_only() -> None:
    svc, sl, nd = _policy_fixture(itp="Local")
    desired, _ = run([svc], [sl], nd)
    assert reals(desired.services[key("10.96.0.10")]) == {("10.1.0.1", 8080)}
    for k in (key("192.0.2.10"), key("203.0.113.1"), key("192.0.2.1", 30080)):
        assert reals(desired.services[k]) == R2, k
    assert desired.services[key("10.96.0.10")].local
    assert not desired.services[key("192.0.2.10")].local


def test_external_traffic_policy_local_limits_nodeport_external_lb_only() -> None:
    svc, sl, nd = _policy_fixture(etp="Local")
    desired, _ = run([svc], [sl], nd)
    assert reals(desired.services[key("10.96.0.10")]) == R2
    for k in (key("192.0.2.10"), key("203.0.113.1"), key("192.0.2.1", 30080)):
        assert reals(desired.services[k]) == {("10.1.0.1", 8080)}, k
        assert desired.services[k].local


def test_both_policies_local() -> None:
    svc, sl, nd = _policy_fixture(itp="Local", etp="Local")
    desired, _ = run([svc], [sl], nd)
    assert all(reals(vs) == {("10.1.0.1", 8080)} for vs in desired.services.values())


def test_local_policy_with_no_local_endpoint_has_no_reals() -> None:
    svc = service(itp="Local")
    sl = slice_(endpoints=[endpoint("10.1.0.2", node="n2")])
    assert table(run([svc], [sl], node())[0]) == {key("10.96.0.10"): set()}


def test_local_policy_falls_back_to_local_terminating() -> None:
    svc = service(itp="Local")
    sl = slice_(endpoints=[
        endpoint("10.1.0.1", ready=False, serving=True, terminating=True, node=NODE),
        endpoint("10.1.0.2", node="n2"),
    ])
    assert table(run([svc], [sl], node())[0]) == {key("10.96.0.10"): {("10.1.0.1", 8080)}}


def _zoned(*eps: dict) -> set[tuple[str, int]]:
    desired, _ = run([service()], [slice_(endpoints=eps)], node(zone="zone-a"))
    return reals(desired.services[key("10.96.0.10")])


def test_topology_hints_honoured_when_all_have_hints_and_zone_matches() -> None:
    got = _zoned(endpoint("10.1.0.1", zones=["zone-a"]), endpoint("10.1.0.2", zones=["zone-b"]),
                 endpoint("10.1.0.3", zones=["zone-b", "zone-a"]))
    assert got == {("10.1.0.1", 8080), ("10.1.0.3", 8080)}


def test_topology_hints_ignored_when_one_ready_endpoint_lacks_them() -> None:
    got = _zoned(endpoint("10.1.0.1", zones=["zone-a"]), endpoint("10.1.0.2"))
    assert got == R2


def test_topology_hints_ignored_when_one_has_an_empty_hint_list() -> None:
    got = _zoned(endpoint("10.1.0.1", zones=["zone-a"]), endpoint("10.1.0.2", zones=[]))
    assert got == R2


def test_topology_hints_not_ready_endpoints_do_not_count() -> None:
    got = _zoned(endpoint("10.1.0.1", zones=["zone-a"]), endpoint("10.1.0.2", zones=["zone-b"]),
                 endpoint("10.1.0.3", ready=False))
    assert got == {("10.1.0.1", 8080)}


def test_topology_hints_no_zone_match_uses_all() -> None:
    got = _zoned(endpoint("10.1.0.1", zones=["zone-b"]), endpoint("10.1.0.2", zones=["zone-c"]))
    assert got == R2


def test_topology_hints_node_without_zone_uses_all() -> None:
    sl = slice_(endpoints=[endpoint("10.1.0.1", zones=["zone-a"]), endpoint("10.1.0.2", zones=["zone-b"])])
    assert reals(run([service()], [sl], node())[0].services[key("10.96.0.10")]) == R2
    assert reals(run([service()], [sl])[0].services[key("10.96.0.10")]) == R2


def test_topology_hints_not_applied_with_local_policy() -> None:
    svc = service(itp="Local")
    sl = slice_(endpoints=[endpoint("10.1.0.1", zones=["zone-b"]), endpoint("10.1.0.2", zones=["zone-a"], node="n2")])
    desired, _ = run([svc], [sl], node(zone="zone-a"))
    assert reals(desired.services[key("10.96.0.10")]) == {("10.1.0.1", 8080)}


# ---- legacy Endpoints -------------------------------------------------------------

def test_legacy_endpoints_used_when_no_slice() -> None:
    ep = legacy_endpoints(ready=["10.1.0.1", "fd01::1"], not_ready=["10.1.0.3"])
    svc = service(cluster_ips=["10.96.0.10", "fd00::10"])
    desired, _ = run([svc], legacy=[ep])
    assert table(desired) == {key("10.96.0.10"): {("10.1.0.1", 8080)}, key("fd00::10"): {("fd01::1", 8080)}}


def test_legacy_not_ready_addresses_are_not_served_even_when_alone() -> None:
    ep = legacy_endpoints(not_ready=["10.1.0.3"])
    assert table(run([service()], legacy=[ep])[0]) == {key("10.96.0.10"): set()}


def test_endpointslices_win_over_legacy_endpoints() -> None:
    ep = legacy_endpoints(ready=["10.9.9.9"])
    desired, _ = run([service()], [slice_(endpoints=EPS)], legacy=[ep])
    assert table(desired) == {key("10.96.0.10"): R2}


def test_empty_endpointslice_still_wins_over_legacy() -> None:
    ep = legacy_endpoints(ready=["10.9.9.9"])
    desired, _ = run([service()], [slice_(endpoints=[])], legacy=[ep])
    assert table(desired) == {key("10.96.0.10"): set()}


# ---- schedulers in translation ----------------------------------------------------

def test_scheduler_annotation_and_flags() -> None:
    svc = service(annotations={"ipvsproxy.io/scheduler": "sh", "ipvsproxy.io/scheduler-flags": "sh-fallback"})
    desired, problems = run([svc])
    vs = desired.services[key("10.96.0.10")]
    assert (vs.scheduler, vs.flags) == ("sh", F_SCHED1) and problems == []
    assert vs.kernel_flags == F_SCHED1 | F_OWNED


def test_cluster_default_scheduler() -> None:
    desired, _ = run([service()], scheduler="lc")
    assert desired.services[key("10.96.0.10")].scheduler == "lc"


def test_bad_scheduler_falls_back_with_a_problem_naming_the_service() -> None:
    svc = service(annotations={"ipvsproxy.io/scheduler": "fastest"})
    desired, problems = run([svc], scheduler="wlc")
    assert desired.services[key("10.96.0.10")].scheduler == "wlc"
    assert len(problems) == 1 and "default/web" in problems[0] and "fastest" in problems[0]


def test_unusable_scheduler_falls_back() -> None:
    svc = service(annotations={"ipvsproxy.io/scheduler": "mh"})
    desired, problems = run([svc], usable=lambda name: name != "mh")
    assert desired.services[key("10.96.0.10")].scheduler == "rr"
    assert problems and "ip_vs_mh" in problems[0]


def test_translate_service_reports_scheduler_problem() -> None:
    svc, _ = parse_service(service(annotations={"ipvsproxy.io/scheduler": "nope"}))
    t = translate_service(svc, [], None, Config(NODE), Registry())
    assert t.scheduler_problem is not None and "nope" in t.scheduler_problem
    assert [vs.scheduler for vs in t.servers] == ["rr"]


# ---- conflicts and addresses --------------------------------------------------------

def test_two_services_same_vip_port_first_by_namespace_name_wins_any_order() -> None:
    a = service("a", "ns1", cluster_ip="10.96.0.10")
    b = service("b", "ns1", cluster_ip="10.96.0.99", external_ips=["10.96.0.10"])
    c = service("a", "ns0", cluster_ip="10.96.0.50", external_ips=["10.96.0.10"])
    slices = [slice_("a", ["10.1.0.1"], namespace="ns1"), slice_("b", ["10.1.0.2"], namespace="ns1"),
              slice_("a", ["10.1.0.3"], namespace="ns0")]
    results = []
    for seed in range(6):
        order = [a, b, c]
        random.Random(seed).shuffle(order)
        desired, problems = run(order, slices)
        results.append((table(desired), sorted(problems)))
        owner = desired.services[key("10.96.0.10")].service
        assert owner is not None and owner.service_id == "ns0/a"
        assert reals(desired.services[key("10.96.0.10")]) == {("10.1.0.3", 8080)}
        assert len(problems) == 2 and all("already belongs to Service ns0/a" in p for p in problems)
    assert all(r == results[0] for r in results)


def test_conflict_on_different_port_is_no_conflict() -> None:
    a = service("a", cluster_ip="10.96.0.10", ports=[port("http", 80)])
    b = service("b", cluster_ip="10.96.0.10", ports=[port("http", 81)])
    desired, problems = run([a, b])
    assert set(desired.services) == {key("10.96.0.10", 80), key("10.96.0.10", 81)} and problems == []


def test_addresses_to_bind_only_those_with_a_vs() -> None:
    svc = service(type="LoadBalancer", ports=[port("http", 80, node_port=30080)], external_ips=["192.0.2.10"],
                  ingress=[{"ip": "203.0.113.1"}, {"ip": "203.0.113.9", "ipMode": "Proxy"}])
    headless = service("h", cluster_ip="None", external_ips=["192.0.2.77"])
    no_ports = service("np", cluster_ip="10.96.0.77", ports=[])
    desired, _ = run([svc, headless, no_ports], [], node(internal=["192.0.2.1"]))
    assert desired.addresses == {"10.96.0.10", "192.0.2.10", "203.0.113.1"}
    assert desired.addresses <= {k.address for k in desired.services}


# ---- bad input in translation ----------------------------------------------------------

def test_bad_fields_dropped_service_still_served() -> None:
    svc = service(cluster_ips=["10.96.0.10", "not-an-ip"], external_ips=["300.1.1.1", "192.0.2.10"],
                  ports=[port("http", 80), port("bad", 70000), port("sctp?", 81, "ICMP")])
    desired, _ = run([svc], [slice_(endpoints=EPS)])
    assert table(desired) == {key("10.96.0.10"): R2, key("192.0.2.10"): R2}
    _, problems = parse_service(svc)
    assert len(problems) == 4


def test_bad_endpoint_addresses_dropped() -> None:
    sl = slice_(endpoints=["10.1.0.1", "bogus", "fd01::1"])
    rec, problems = parse_endpointslice(sl)
    assert [e.address for e in rec.endpoints] == ["10.1.0.1"]
    assert any("bogus" in p for p in problems)


def test_node_hostname_addresses_ignored() -> None:
    rec, problems = parse_node(node(internal=["192.0.2.1"], external=["198.51.100.1"], hostname="host"))
    assert rec.addresses == ("192.0.2.1", "198.51.100.1") and problems == []


def test_whole_translate_is_deterministic_over_input_order() -> None:
    svcs = [service(f"s{i}", cluster_ip=f"10.96.0.{i}", external_ips=["192.0.2.1"]) for i in range(1, 8)]
    slices = [slice_(f"s{i}", [f"10.1.0.{i}"]) for i in range(1, 8)]
    base = run(svcs, slices)[0]
    parsed = [parse_service(s)[0] for s in svcs]
    psl = [parse_endpointslice(s)[0] for s in slices]
    for seed in range(5):
        rng = random.Random(seed)
        s2, l2 = parsed[:], psl[:]
        rng.shuffle(s2)
        rng.shuffle(l2)
        d, _ = translate(s2, l2, None, Config(NODE), Registry())
        assert d == base


def test_external_traffic_policy_applies_to_external_ips_of_a_cluster_ip_type() -> None:
    """docs/semantics.md rule 4, as kube-proxy (ExternalPolicyLocal): a ClusterIP
    Service with externalIPs has an external traffic policy too."""
    svc = service(external_ips=["192.0.2.10"], etp="Local")
    sl = slice_(endpoints=[endpoint("10.1.0.1", node=NODE), endpoint("10.1.0.2", node="n2")])
    desired, _ = run([svc], [sl], node())
    assert reals(desired.services[key("192.0.2.10")]) == {("10.1.0.1", 8080)}
    assert desired.services[key("192.0.2.10")].local
    assert reals(desired.services[key("10.96.0.10")]) == R2  # the ClusterIP keeps policy Cluster
    assert not desired.services[key("10.96.0.10")].local
    # without externalIPs a ClusterIP Service has no external policy at all
    plain, _ = parse_service(service(etp="Local"))
    assert not plain.external_local


def test_the_plain_endpoint_fast_path_selects_what_kube_proxys_selection_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """translate._plain_reals (every endpoint ready, not terminating, no hints: nothing to
    choose) against the general path (_candidates, _select) on 400 random Services: ports named
    or not, two slices with shared endpoints, IPv4 and IPv6, a legacy Endpoints beside the
    slices, Cluster and Local policies, some endpoints not ready, terminating, or with zone
    hints. Every Service's virtual servers must be the same either way, and most must have
    taken the fast path (or the comparison says little)."""
    import ipvsproxy.translate as tr

    rng = random.Random(7)
    nd = node(zone="z1")
    cases = []
    for i in range(400):
        named = rng.random() < 0.7
        sp = port("http" if named else "", 80, target="http" if named else 8080)
        cases.append(service(f"s{i}", cluster_ips=[f"10.96.{i // 200}.{i % 200 + 1}", f"fd00::{i + 1:x}"],
                             ports=[sp], etp=rng.choice([None, None, "Local"]), itp=rng.choice([None, None, "Local"]),
                             type="NodePort"))
    slices, legacy = [], []
    for i in range(400):
        shape = rng.random()
        for half, family in (("a", "IPv4"), ("b", "IPv4"), ("c", "IPv6")):
            eps = []
            for d in range(rng.randint(0, 4)):
                ip = f"10.1.{i % 250}.{d + 1}" if family == "IPv4" else f"fd01::{i:x}:{d + 1}"
                if shape < 0.6:  # plain
                    eps.append(endpoint(ip, node=rng.choice([NODE, "n2"])))
                else:
                    eps.append(endpoint(ip, ready=rng.random() < 0.5, serving=rng.choice([None, True, False]),
                                        terminating=rng.choice([None, False, True]), node=rng.choice([NODE, "n2"]),
                                        zones=rng.choice([None, None, ["z1"], ["z2"]])))
            slices.append(slice_(f"s{i}", eps, name=f"s{i}-{half}", family=family, ports=[("http", 8080)]))
        if rng.random() < 0.1:
            legacy.append(legacy_endpoints(f"s{i}", ready=[f"10.9.{i % 250}.1"], ports=[("http", 8080)]))
    taken = []
    real_plain = tr._plain_reals

    def counted(*args: object) -> object:
        out = real_plain(*args)  # type: ignore[arg-type]
        taken.append(out is not None)
        return out

    monkeypatch.setattr(tr, "_plain_reals", counted)
    fast, fast_problems = run(cases, slices, nd, legacy=legacy)
    monkeypatch.setattr(tr, "_plain_reals", lambda *a: None)
    general, general_problems = run(cases, slices, nd, legacy=legacy)
    assert fast == general and fast_problems == general_problems
    assert sum(taken) > 200 and not all(taken)
    assert sum(len(vs.reals) for vs in fast.services.values()) > 500
