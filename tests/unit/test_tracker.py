"""The change tracker: which Services are dirty, last good records, slice grouping."""

from __future__ import annotations

from typing import Any

from ipvsproxy.tracker import Tracker
from tests.unit.factories import NODE, legacy_endpoints, node, service, slice_


def dirty(t: Tracker) -> tuple[set[str], bool]:
    d, everything = t.take_dirty()
    return set(d), everything


def fresh(*services: str) -> Tracker:
    t = Tracker(NODE)
    for name in services:
        t.upsert("Service", service(name, cluster_ip=None))
    t.take_dirty()
    return t


def addrs(t: Tracker, sid: str) -> set[str]:
    return {e.address for s in t.slices_for(sid) for e in s.endpoints}


def test_service_upsert_marks_it_once_and_unchanged_upsert_marks_nothing() -> None:
    t = Tracker(NODE)
    t.upsert("Service", service("a"))
    assert t.changed.is_set()
    assert dirty(t) == ({"default/a"}, False)
    assert not t.changed.is_set()
    t.upsert("Service", service("a"))
    assert dirty(t) == (set(), False)
    t.upsert("Service", service("a", cluster_ip="10.96.0.99"))
    assert dirty(t) == ({"default/a"}, False)
    assert t.services["default/a"].cluster_ips == ("10.96.0.99",)


def test_delete_service_marks_it_and_unknown_delete_marks_nothing() -> None:
    t = fresh("a", "b")
    t.delete("Service", "default", "a")
    assert dirty(t) == ({"default/a"}, False) and "default/a" not in t.services
    t.delete("Service", "default", "zzz")
    assert dirty(t) == (set(), False)


def test_first_seen_time_kept_across_changes() -> None:
    t = fresh()
    t.upsert("Service", service("a"))
    first = t._dirty["default/a"]
    t.upsert("Service", service("a", cluster_ip="10.96.0.2"))
    d, _ = t.take_dirty()
    assert d["default/a"] == first


def test_invalid_update_keeps_last_good_and_reports() -> None:
    seen: list[tuple[str, str, str, str]] = []
    t = Tracker(NODE, on_problem=lambda *a: seen.append(a))
    t.upsert("Service", service("a"))
    t.take_dirty()
    t.upsert("Service", service("a", type="Bogus"))
    assert t.services["default/a"].type == "ClusterIP"
    assert dirty(t) == (set(), False)
    assert len(seen) == 1 and seen[0][:3] == ("Service", "default", "a") and "Bogus" in seen[0][3]


def test_partial_problem_reported_and_record_updated() -> None:
    seen: list[Any] = []
    t = Tracker(NODE, on_problem=lambda *a: seen.append(a))
    t.upsert("Service", service("a", external_ips=["bad"]))
    assert "default/a" in t.services and len(seen) == 1


def test_invalid_slice_update_keeps_last_good() -> None:
    t = fresh("web")
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.1"], name="s1"))
    t.take_dirty()
    bad = slice_("web", ["10.1.0.2"], name="s1")
    bad["addressType"] = "FQDN"
    t.upsert("EndpointSlice", bad)
    assert addrs(t, "default/web") == {"10.1.0.1"}
    assert dirty(t) == (set(), False)


def test_slices_of_a_service_are_aggregated_and_marked() -> None:
    t = fresh("web", "api")
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.1"], name="s1"))
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.2"], name="s2"))
    t.upsert("EndpointSlice", slice_("api", ["10.2.0.1"], name="s3"))
    assert addrs(t, "default/web") == {"10.1.0.1", "10.1.0.2"}
    assert addrs(t, "default/api") == {"10.2.0.1"}
    assert dirty(t) == ({"default/web", "default/api"}, False)
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.3"], name="s2"))
    assert addrs(t, "default/web") == {"10.1.0.1", "10.1.0.3"}
    assert dirty(t) == ({"default/web"}, False)
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.3"], name="s2"))
    assert dirty(t) == (set(), False)
    t.delete("EndpointSlice", "default", "s1")
    assert addrs(t, "default/web") == {"10.1.0.3"}
    assert dirty(t) == ({"default/web"}, False)


def test_slice_moving_to_another_service_marks_both() -> None:
    t = fresh("web", "api")
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.1"], name="s1"))
    t.take_dirty()
    t.upsert("EndpointSlice", slice_("api", ["10.1.0.1"], name="s1"))
    assert dirty(t) == ({"default/web", "default/api"}, False)
    assert addrs(t, "default/web") == set() and addrs(t, "default/api") == {"10.1.0.1"}


def test_slice_for_unknown_service_marks_it_anyway() -> None:
    t = fresh()
    t.upsert("EndpointSlice", slice_("later", ["10.1.0.1"]))
    assert dirty(t) == ({"default/later"}, False)


def test_legacy_endpoints_grouped_per_object_and_deleted() -> None:
    t = fresh("legacy")
    t.upsert("Endpoints", legacy_endpoints("legacy", ready=["10.1.0.1", "fd01::1"]))
    assert addrs(t, "default/legacy") == {"10.1.0.1", "fd01::1"}
    assert all(s.legacy for s in t.slices_for("default/legacy"))
    assert dirty(t) == ({"default/legacy"}, False)
    t.upsert("Endpoints", legacy_endpoints("legacy", ready=["10.1.0.2"]))
    assert addrs(t, "default/legacy") == {"10.1.0.2"}
    assert dirty(t) == ({"default/legacy"}, False)
    t.delete("Endpoints", "default", "legacy")
    assert t.slices_for("default/legacy") == []
    assert dirty(t) == ({"default/legacy"}, False)


def test_legacy_and_slices_side_by_side() -> None:
    t = fresh("web")
    t.upsert("Endpoints", legacy_endpoints("web", ready=["10.9.0.1"]))
    t.upsert("EndpointSlice", slice_("web", ["10.1.0.1"]))
    assert {s.legacy for s in t.slices_for("default/web")} == {True, False}
    t.delete("EndpointSlice", "default", "web-ipv4")
    assert addrs(t, "default/web") == {"10.9.0.1"}


def test_node_changes_mark_all_other_nodes_ignored() -> None:
    t = fresh("a", "b")
    t.upsert("Node", node("other"))
    assert t.node is None and dirty(t) == (set(), False)
    t.upsert("Node", node(NODE))
    assert t.node is not None and t.node.addresses == ("192.0.2.1",)
    assert dirty(t) == ({"default/a", "default/b"}, True)
    t.upsert("Node", node(NODE))
    assert dirty(t) == (set(), False)
    t.upsert("Node", node(NODE, zone="z"))
    assert dirty(t) == ({"default/a", "default/b"}, True)
    t.delete("Node", "", "other")
    assert dirty(t) == (set(), False)
    t.delete("Node", "", NODE)
    assert t.node is None and dirty(t) == ({"default/a", "default/b"}, True)


def test_replace_upserts_and_deletes_unlisted() -> None:
    t = Tracker(NODE)
    t.replace("Service", [service("a"), service("b", cluster_ip="10.96.0.11")])
    assert dirty(t) == ({"default/a", "default/b"}, False)
    assert t.ready(["Service"]) and not t.ready()
    t.replace("Service", [service("b", cluster_ip="10.96.0.11"), service("c", cluster_ip="10.96.0.12")])
    assert dirty(t) == ({"default/a", "default/c"}, False)
    assert set(t.services) == {"default/b", "default/c"}


def test_replace_keeps_last_good_of_an_invalid_listed_object() -> None:
    t = Tracker(NODE)
    t.replace("Service", [service("a")])
    t.take_dirty()
    t.replace("Service", [service("a", type="Bogus")])
    assert "default/a" in t.services and dirty(t) == (set(), False)


def test_replace_slices_and_endpoints_and_nodes() -> None:
    t = fresh("web", "legacy")
    t.replace("EndpointSlice", [slice_("web", ["10.1.0.1"], name="s1"), slice_("web", ["10.1.0.2"], name="s2")])
    t.replace("Endpoints", [legacy_endpoints("legacy", ready=["10.9.0.1"])])
    t.replace("Node", [node(NODE)])
    assert t.ready(["EndpointSlice", "Endpoints", "Node"]) and not t.ready()
    t.take_dirty()
    t.replace("EndpointSlice", [slice_("web", ["10.1.0.2"], name="s2")])
    assert addrs(t, "default/web") == {"10.1.0.2"} and dirty(t) == ({"default/web"}, False)
    t.replace("Endpoints", [])
    assert t.slices_for("default/legacy") == [] and dirty(t) == ({"default/legacy"}, False)
    t.replace("Node", [])
    assert t.node is None and dirty(t)[1]


def test_replace_in_other_namespace_and_unknown_kind() -> None:
    t = Tracker(NODE)
    t.replace("Service", [service("a", "ns1"), service("a", "ns2")])
    assert set(t.services) == {"ns1/a", "ns2/a"}
    t.upsert("Pod", {"kind": "Pod", "metadata": {"name": "p"}})  # reported, not raised
    assert set(t.services) == {"ns1/a", "ns2/a"}
