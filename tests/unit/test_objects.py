"""Parsing Kubernetes dicts into compact records: what is kept, what is dropped, what is refused."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from ipvsproxy.model import AF_INET, AF_INET6
from ipvsproxy.objects import (
    Endpoint,
    EndpointSlice,
    InvalidObject,
    describe,
    parse_endpoints,
    parse_endpointslice,
    parse_node,
    parse_service,
)
from tests.unit.factories import TCP, UDP, endpoint, legacy_endpoints, node, port, service, slice_

# ---- Service ----------------------------------------------------------------


def test_service_record_fields() -> None:
    obj = service(
        "web", "prod", type="LoadBalancer", cluster_ips=["10.96.0.10", "fd00::10"],
        ports=[port("http", 80, node_port=30080), port("dns", 53, "UDP")],
        external_ips=["192.0.2.10"], ingress=[{"ip": "203.0.113.1"}], affinity=60,
        annotations={"ipvsproxy.io/scheduler": "sh", "ipvsproxy.io/scheduler-flags": "sh-port"},
        itp="Local", etp="Local", loadBalancerSourceRanges=["198.51.100.0/24"],
    )
    obj["metadata"]["uid"] = "u-1"
    svc, problems = parse_service(obj)
    assert problems == []
    assert svc.id == "prod/web" and svc.type == "LoadBalancer" and svc.uid == "u-1"
    assert svc.cluster_ips == ("10.96.0.10", "fd00::10")
    assert svc.external_ips == ("192.0.2.10",) and svc.lb_ips == ("203.0.113.1",)
    assert [(p.name, p.protocol, p.port, p.node_port) for p in svc.ports] == [
        ("http", TCP, 80, 30080), ("dns", UDP, 53, 0)]
    assert svc.affinity_timeout == 60
    assert svc.internal_local and svc.external_local and not svc.headless
    assert (svc.scheduler, svc.scheduler_flags) == ("sh", "sh-port")
    assert svc.source_ranges == ("198.51.100.0/24",)


def test_cluster_ip_used_when_cluster_ips_missing() -> None:
    svc, _ = parse_service(service(cluster_ip="10.96.0.10"))
    assert svc.cluster_ips == ("10.96.0.10",)


def test_cluster_ips_win_over_cluster_ip() -> None:
    svc, _ = parse_service(service(cluster_ip="10.96.0.10", cluster_ips=["10.96.0.11"]))
    assert svc.cluster_ips == ("10.96.0.11",)


def test_namespace_defaults() -> None:
    obj = service()
    del obj["metadata"]["namespace"]
    assert parse_service(obj)[0].id == "default/web"


def test_headless() -> None:
    svc, problems = parse_service(service(cluster_ip="None"))
    assert svc.headless and svc.cluster_ips == () and problems == []


def test_default_type_and_protocol() -> None:
    svc, _ = parse_service(service(ports=[{"name": "x", "port": 80}]))
    assert svc.type == "ClusterIP" and svc.ports[0].protocol == TCP


@pytest.mark.parametrize("bad_port", [0, -1, 65536, "80", 80.0, True, None, [80]])
def test_bad_port_dropped_with_problem(bad_port: Any) -> None:
    svc, problems = parse_service(service(ports=[port("bad", bad_port), port("ok", 81)]))
    assert [p.name for p in svc.ports] == ["ok"]
    assert len(problems) == 1 and "bad" in problems[0]


def test_unknown_protocol_dropped() -> None:
    svc, problems = parse_service(service(ports=[port("x", 80, "ICMP")]))
    assert svc.ports == () and "ICMP" in problems[0]


@pytest.mark.parametrize("np", [70000, -1, "30080", True])
def test_bad_node_port_dropped_port_kept(np: Any) -> None:
    svc, problems = parse_service(service(ports=[port("http", 80, node_port=np)]))
    assert [(p.port, p.node_port) for p in svc.ports] == [(80, 0)]
    assert len(problems) == 1 and "nodePort" in problems[0]


def test_duplicate_port_names_second_ignored() -> None:
    svc, problems = parse_service(service(ports=[port("http", 80), port("http", 81)]))
    assert [p.port for p in svc.ports] == [80] and "duplicate" in problems[0]


def test_same_name_different_protocol_both_kept() -> None:
    svc, problems = parse_service(service(ports=[port("dns", 53, "UDP"), port("dns", 53, "TCP")]))
    assert len(svc.ports) == 2 and problems == []


def test_bad_ips_dropped_duplicates_collapsed_canonicalised() -> None:
    svc, problems = parse_service(service(
        cluster_ips=["10.96.0.10", "10.96.0.10", "nope"], external_ips=["FD00::0:1", 17, "1.2.3.4/32"]))
    assert svc.cluster_ips == ("10.96.0.10",)
    assert svc.external_ips == ("fd00::1",)
    assert len(problems) == 3


def test_lb_ingress_proxy_mode_and_hostname_skipped() -> None:
    svc, problems = parse_service(service(type="LoadBalancer", ingress=[
        {"ip": "203.0.113.1", "ipMode": "Proxy"}, {"hostname": "x.example"}, {"ip": "203.0.113.2"}, "junk"]))
    assert svc.lb_ips == ("203.0.113.2",) and problems == []


@pytest.mark.parametrize("bad", ["Bogus", 5, ["NodePort"]])
def test_unknown_type_is_invalid(bad: Any) -> None:
    with pytest.raises(InvalidObject, match="default/web"):
        parse_service(service(type=bad))


def test_annotation_values_not_strings_are_ignored() -> None:
    svc, _ = parse_service(service(annotations={"ipvsproxy.io/scheduler": 5, "ipvsproxy.io/scheduler-flags": []}))
    assert svc.scheduler is None and svc.scheduler_flags is None


@pytest.mark.parametrize("obj", [
    None, [], "Service", 5,
    {"kind": "Service"},
    {"kind": "Service", "metadata": None},
    {"kind": "Service", "metadata": {"name": ""}},
    {"kind": "Service", "metadata": {"name": 5}},
    {"kind": "Service", "metadata": {"name": "a", "namespace": ["x"]}},
])
def test_unusable_objects_raise_invalid_object(obj: Any) -> None:
    for parse in (parse_service, parse_endpointslice, parse_endpoints):
        with pytest.raises(InvalidObject):
            parse(obj)
    if not isinstance(obj, dict) or not isinstance((obj.get("metadata") or {}).get("name"), str) \
            or not obj["metadata"]["name"]:
        with pytest.raises(InvalidObject):
            parse_node(obj)


def test_describe() -> None:
    assert describe(service("a", "b")) == "Service b/a"
    assert describe(node("n")) == "Node n"
    assert describe(5) == "non-object int"
    assert describe({"kind": "X"}) == "X (no metadata)"


# ---- EndpointSlice ------------------------------------------------------------


def _named(sl: EndpointSlice) -> dict[str, str]:
    return {e.address: t for e, t in sl.named() if t}


def test_slice_record() -> None:
    sl, problems = parse_endpointslice(slice_("web", [
        endpoint("10.1.0.1", target="web-0", zones=["z1"], node="n9"),
        endpoint("10.1.0.2", ready=False, serving=True, terminating=True, node=None),
    ], namespace="prod", ports=[("http", 8080), ("dns", 53, "UDP")]))
    assert problems == []
    assert sl.id == "prod/web-ipv4" and sl.service_id == "prod/web" and sl.family == AF_INET
    assert [(p.name, p.protocol, p.port) for p in sl.ports] == [("http", TCP, 8080), ("dns", UDP, 53)]
    assert sl.endpoints == (
        Endpoint("10.1.0.1", True, True, False, "n9", ("z1",)),
        Endpoint("10.1.0.2", False, True, True, "", None),
    )
    assert _named(sl) == {"10.1.0.1": "Pod/web-0"}


def test_targets_stay_in_step_with_the_endpoints_kept() -> None:
    # one line per endpoint kept: a dropped endpoint (bad address) takes no line, and a
    # name with a newline cannot shift the others (display only, but it must name the right pod)
    sl, problems = parse_endpointslice(slice_("web", [
        endpoint("10.1.0.1", target="web-0"),
        endpoint("bad", target="web-bad"),
        endpoint("10.1.0.3"),
        endpoint("10.1.0.4", target="web\n4"),
        endpoint("10.1.0.5", target="web-5"),
    ]))
    assert len(problems) == 1
    assert _named(sl) == {"10.1.0.1": "Pod/web-0", "10.1.0.4": "Pod/web 4",
                                       "10.1.0.5": "Pod/web-5"}
    bare, _ = parse_endpointslice(slice_("web", ["10.1.0.1", "10.1.0.2"]))
    assert bare.targets == "" and _named(bare) == {}


def test_unset_serving_is_true_as_kube_proxy_reads_it() -> None:
    """docs/semantics.md rule 10: kube-proxy reads a nil serving condition as true."""
    sl, _ = parse_endpointslice(slice_(endpoints=[endpoint("10.1.0.1", ready=False)]))
    assert sl.endpoints[0].serving and not sl.endpoints[0].terminating


def test_quoted_boolean_conditions_are_read_as_booleans() -> None:
    # hand-written YAML may quote them; bool("false") would have made these ready
    obj = slice_(endpoints=[endpoint("10.1.0.1"), endpoint("10.1.0.2"), endpoint("10.1.0.3"),
                            endpoint("10.1.0.4")])
    for e, conds in zip(obj["endpoints"], [
        {"ready": "false", "serving": "False", "terminating": "true"},
        {"ready": "True", "terminating": "FALSE"},
        {"ready": False, "serving": True, "terminating": True},
        {"ready": "maybe", "serving": 1},
    ], strict=True):
        e["conditions"] = conds
    sl, problems = parse_endpointslice(obj)
    got = [(e.ready, e.serving, e.terminating) for e in sl.endpoints]
    assert got == [(False, False, True), (True, True, False), (False, True, True), (True, True, False)]
    assert problems == [
        "EndpointSlice default/web-ipv4: condition ready is not a boolean ('maybe'); using true",
        "EndpointSlice default/web-ipv4: condition serving is not a boolean (1); using true",
    ]


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_the_common_endpoints_fast_path_reads_as_the_general_path(family: str) -> None:
    """parse_endpointslice reads a one-address endpoint with boolean conditions and no hints in
    a few steps; `"hints": {}` (no hints to the general path) sends the same endpoint the
    general way. Both must give the same endpoints, targets and problems, for every shape."""
    addrs: list[Any] = [["10.1.0.1"], ["2001:db8::1"], ["2001:DB8:0::1"], ["010.1.0.1"], ["10.1.0.1 "],
                        ["fe80::1%eth0"], ["::ffff:10.1.0.1"], [1], ["nonsense"], [], ["10.1.0.1", "10.1.0.2"],
                        ["2001:db8::1", "10.1.0.1"], "10.1.0.1", None]
    conds: list[Any] = [{}, {"ready": True}, {"ready": False, "serving": True, "terminating": True},
                        {"ready": None, "serving": None, "terminating": None}, {"ready": 1}, {"serving": 0},
                        {"terminating": "true"}, {"ready": "false"}, {"terminating": 1}, None, []]
    for a, c in itertools.product(addrs, conds):
        e: dict[str, Any] = {"addresses": a, "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "p"}}
        if c is not None:
            e["conditions"] = c
        obj = slice_(endpoints=[e], family=family)
        general = slice_(endpoints=[{**e, "hints": {}}], family=family)
        fast, slow = parse_endpointslice(obj), parse_endpointslice(general)
        assert fast == slow, (a, c)
        assert [(x.address, x.node, x.ready, x.serving, x.terminating, x.zones, x.nodes) for x in fast[0].endpoints] \
            == [(x.address, x.node, x.ready, x.serving, x.terminating, x.zones, x.nodes) for x in slow[0].endpoints]


def test_shared_strings_are_interned() -> None:
    # one string object per distinct namespace, node and port name, however many records repeat it
    a, _ = parse_endpointslice(slice_("a", [endpoint("10.1.0.1", node="node-" + "7")], namespace="ns" + "1"))
    b, _ = parse_endpointslice(slice_("b", [endpoint("10.1.0.2", node="".join(["node-", "7"]))],
                                      namespace="".join(["ns", "1"])))
    assert a.namespace is b.namespace and a.endpoints[0].node is b.endpoints[0].node
    assert a.ports[0].name is b.ports[0].name
    svc, _ = parse_service(service("a", "".join(["ns", "1"])))
    assert svc.namespace is a.namespace and svc.name is a.service


def test_ipv6_slice_drops_other_family_addresses() -> None:
    sl, _ = parse_endpointslice(slice_(endpoints=["10.1.0.1", "fd01::1"], family="IPv6"))
    assert sl.family == AF_INET6 and [e.address for e in sl.endpoints] == ["fd01::1"]


@pytest.mark.parametrize("mutate", [
    lambda o: o["metadata"].pop("labels"),
    lambda o: o["metadata"]["labels"].update({"kubernetes.io/service-name": ""}),
    lambda o: o.update({"addressType": "FQDN"}),
    lambda o: o.pop("addressType"),
])
def test_slice_without_service_label_or_bad_address_type_invalid(mutate: Any) -> None:
    obj = slice_(endpoints=["10.1.0.1"])
    mutate(obj)
    with pytest.raises(InvalidObject):
        parse_endpointslice(obj)


def test_slice_bad_ports_dropped() -> None:
    sl, problems = parse_endpointslice(slice_(ports=[("a", 0), ("b", 8080, "ICMP"), ("c", 8081)]))
    assert [p.name for p in sl.ports] == ["c"] and len(problems) == 2


def test_hints_with_nameless_zones_are_no_hints() -> None:
    obj = slice_(endpoints=[endpoint("10.1.0.1")])
    obj["endpoints"][0]["hints"] = {"forZones": [{"nope": 1}]}
    assert parse_endpointslice(obj)[0].endpoints[0].zones is None


# ---- Endpoints (legacy) -------------------------------------------------------


def test_endpoints_mirrored_per_family_ready_and_not_ready() -> None:
    slices, problems = parse_endpoints(legacy_endpoints(
        "legacy", ready=["10.1.0.1", "fd01::1", "bad"], not_ready=["10.1.0.3"], namespace="demo"))
    assert len(problems) == 1
    assert [(s.family, s.service_id, s.legacy) for s in slices] == [
        (AF_INET, "demo/legacy", True), (AF_INET6, "demo/legacy", True)]
    v4 = slices[0]
    assert [(e.address, e.ready, e.serving) for e in v4.endpoints] == [("10.1.0.1", True, True),
                                                                       ("10.1.0.3", False, False)]
    assert [(p.name, p.port) for p in v4.ports] == [("http", 8080)]
    named = legacy_endpoints("legacy", ready=["10.1.0.1", "10.1.0.2"], not_ready=["fd01::3"])
    named["subsets"][0]["addresses"][1]["targetRef"] = {"kind": "Pod", "name": "legacy-2"}
    named["subsets"][0]["notReadyAddresses"][0]["targetRef"] = {"kind": "Pod", "name": "legacy-3"}
    v4, v6 = parse_endpoints(named)[0]
    assert _named(v4) == {"10.1.0.2": "Pod/legacy-2"}
    assert _named(v6) == {"fd01::3": "Pod/legacy-3"}


def test_endpoints_without_subsets_give_no_slices() -> None:
    assert parse_endpoints({"kind": "Endpoints", "metadata": {"name": "x"}}) == ([], [])


# ---- Node -------------------------------------------------------------------------


def test_node_record() -> None:
    nd, problems = parse_node(node("n1", internal=["192.0.2.1", "fd00::1"], external=["198.51.100.1", "x"],
                                   zone="zone-a"))
    assert nd.name == "n1" and nd.zone == "zone-a"
    assert nd.addresses == ("192.0.2.1", "fd00::1", "198.51.100.1")
    assert len(problems) == 1


def test_scoped_ipv6_addresses_rejected() -> None:
    svc, problems = parse_service(service(cluster_ips=["fe80::1%eth0", "fd00::10"]))
    assert svc.cluster_ips == ("fd00::10",) and "fe80::1%eth0" in problems[0]
    sl, problems = parse_endpointslice(slice_(endpoints=["fe80::2%1"], family="IPv6"))
    assert sl.endpoints == () and problems


def test_an_endpoint_reads_back_every_condition_and_hint_it_was_built_with() -> None:
    # Endpoint packs its conditions and hints into one slot: each combination must read back
    for ready, serving, terminating in itertools.product((False, True), repeat=3):
        for zones, nodes in ((None, None), (("z1",), None), (None, ("n1",)), (("z1", "z2"), ("n1",))):
            ep = Endpoint("10.1.0.1", ready, serving, terminating, "n1", zones, nodes)
            assert (ep.ready, ep.serving, ep.terminating, ep.zones, ep.nodes) == (
                ready, serving, terminating, zones, nodes)
            assert ep == Endpoint("10.1.0.1", ready, serving, terminating, "n1", zones, nodes)
            assert ep != Endpoint("10.1.0.1", not ready, serving, terminating, "n1", zones, nodes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ep.address = "10.1.0.2"  # type: ignore[misc]
