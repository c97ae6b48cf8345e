"""Properties (hypothesis): the planner converges, bad input never raises."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import (
    AF_INET,
    AF_INET6,
    F_OWNED,
    F_PERSISTENT,
    F_SCHED1,
    F_SCHED2,
    DesiredState,
    ObservedReal,
    ObservedState,
    ObservedVS,
    Real,
    ServiceRef,
    VirtualServer,
    VSKey,
)
from ipvsproxy.objects import InvalidObject, parse_endpoints, parse_endpointslice, parse_node, parse_service
from ipvsproxy.plan import apply_op, plan
from ipvsproxy.schedulers import Registry
from ipvsproxy.sources.files import ManifestReader
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config, translate
from tests.unit.factories import NODE, endpoint, legacy_endpoints, node, port, service, slice_

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- (a) and (b): plan converges -----------------------------------------------------

V4 = ["10.96.0.1", "10.96.0.2", "192.0.2.1"]
V6 = ["fd00::1", "fd00::2"]
keys = st.builds(
    lambda fam, proto, i, port: VSKey(fam, proto, (V4 if fam == AF_INET else V6)[i % (3 if fam == AF_INET else 2)],
                                      port),
    st.sampled_from([AF_INET, AF_INET6]), st.sampled_from([6, 17, 132]), st.integers(0, 2), st.sampled_from([80, 443]),
)
real_addr = st.sampled_from(["10.1.0.1", "10.1.0.2", "10.1.0.3", "fd01::1", "fd01::2"])
real_port = st.sampled_from([8080, 9090])
schedulers = st.sampled_from(["rr", "lc", "sh", "wlc"])
sched_flags = st.sampled_from([0, F_SCHED1, F_SCHED2, F_SCHED1 | F_SCHED2])


@st.composite
def desired_vs(draw: st.DrawFn, key: VSKey) -> VirtualServer:
    reals = draw(st.dictionaries(st.tuples(real_addr, real_port), st.integers(0, 5), max_size=4))
    return VirtualServer(
        key, draw(schedulers), draw(sched_flags), draw(st.sampled_from([0, 0, 60, 10800])),
        tuple(Real(a, p, w) for (a, p), w in sorted(reals.items())),
        ServiceRef("ns", "svc", "p", "ClusterIP"),
    )


@st.composite
def observed_vs(draw: st.DrawFn, key: VSKey) -> ObservedVS:
    reals = draw(st.dictionaries(st.tuples(real_addr, real_port),
                                 st.tuples(st.integers(0, 5), st.integers(0, 50)), max_size=4))
    flags = draw(sched_flags) | draw(st.sampled_from([0, F_OWNED, F_OWNED])) | draw(st.sampled_from([0, F_PERSISTENT]))
    return ObservedVS(
        key, draw(schedulers), flags, draw(st.sampled_from([0, 60, 300])),
        {(a, p): ObservedReal(a, p, w, 0, inact) for (a, p), (w, inact) in reals.items()},
    )


addresses = st.sets(st.sampled_from(V4 + V6 + ["10.96.0.99"]), max_size=4)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[DesiredState, ObservedState, set[str]]:
    dkeys = draw(st.sets(keys, max_size=6))
    okeys = draw(st.sets(keys, max_size=6))
    d = DesiredState({k: draw(desired_vs(k)) for k in dkeys}, draw(addresses))
    o = ObservedState({k: draw(observed_vs(k)) for k in okeys}, draw(addresses))
    excluded = draw(st.sets(st.sampled_from(V4 + V6), max_size=1))
    return d, o, excluded


def _reals(obs: ObservedVS) -> dict[tuple[str, int], int]:
    return {k: r.weight for k, r in obs.reals.items()}


@FAST
@given(scenario())
def test_applying_the_plan_yields_desired_and_replanning_is_empty(s: tuple[DesiredState, ObservedState, set[str]]
                                                                  ) -> None:
    desired, observed, excl = s
    excluded = excl.__contains__
    before = copy.deepcopy(observed)
    ops = plan(desired, observed, excluded=excluded)
    after = copy.deepcopy(observed)
    for op in ops:
        apply_op(after, op)
    # the same ops on the in-memory dataplane succeed (no add of an existing VS, etc.)
    dp = MemoryDataplane(copy.deepcopy(before))
    assert dp.apply(ops) == []
    assert dp.state == after

    for key in set(desired.services) | set(before.services):
        if excluded(key.address):
            assert after.services.get(key) == before.services.get(key)
            continue
        vs = desired.services.get(key)
        if vs is not None:
            got = after.services[key]
            assert got.owned and got.settings() == vs.settings()
            assert _reals(got) == {(r.address, r.port): r.weight for r in vs.reals}
        elif before.services[key].owned:
            assert key not in after.services
        else:  # foreign, unclaimed: untouched
            assert after.services[key] == before.services[key]
    for a in desired.addresses | before.addresses:
        if excluded(a):
            assert (a in after.addresses) == (a in before.addresses)
        else:
            assert (a in after.addresses) == (a in desired.addresses)
    assert plan(desired, after, excluded=excluded) == []


@FAST
@given(scenario(), st.data())
def test_scoped_plan_only_touches_scope_and_full_plan_finishes(s: tuple[DesiredState, ObservedState, set[str]],
                                                               data: st.DataObject) -> None:
    desired, observed, _ = s
    every = sorted(set(desired.services) | set(observed.services))
    scope = data.draw(st.sets(st.sampled_from(every))) if every else set()
    ops = plan(desired, observed, scope=scope)
    assert {op.key for op in ops if op.key is not None} <= scope
    for op in ops:
        apply_op(observed, op)
    for op in plan(desired, observed):
        apply_op(observed, op)
    assert plan(desired, observed) == []


# ---- (c) malformed objects ---------------------------------------------------------------

FIELDS = ["metadata", "name", "namespace", "labels", "annotations", "spec", "status", "type", "clusterIP",
          "clusterIPs", "ports", "port", "nodePort", "protocol", "externalIPs", "loadBalancer", "ingress", "ip",
          "ipMode", "sessionAffinity", "sessionAffinityConfig", "clientIP", "timeoutSeconds", "addressType",
          "endpoints", "addresses", "conditions", "ready", "serving", "terminating", "hints", "forZones",
          "nodeName", "targetRef", "subsets", "notReadyAddresses", "address", "kubernetes.io/service-name",
          "ipvsproxy.io/scheduler", "ipvsproxy.io/scheduler-flags", "internalTrafficPolicy",
          "externalTrafficPolicy", "topology.kubernetes.io/zone", "items", "kind", "apiVersion"]
STRINGS = ["", "None", "TCP", "UDP", "SCTP", "ICMP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName",
           "IPv4", "IPv6", "FQDN", "Local", "ClientIP", "Proxy", "VIP", "sh", "rr", "sh-port,mh-port", "10.0.0.1",
           "fd00::1", "300.1.1.1", "1.2.3.4/24", "fe80::1%eth0", "::ffff:1.2.3.4", " 10.0.0.2 ", "n1", "zone-a"]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-1, 70000)
           | st.sampled_from([2**64, -(2**63), 10**100]) | st.floats(allow_nan=True)
           | st.sampled_from(STRINGS) | st.text(max_size=10))
garbage = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), c,
                                                        max_size=4),
    max_leaves=10,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mangled(draw: st.DrawFn, template: Any) -> Any:
    """A valid object with some fields replaced by garbage or removed."""
    obj = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        if not path:
            if draw(st.booleans()):
                obj = draw(garbage)
            continue
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(garbage)
    return obj


SVC = service("web", type="LoadBalancer", cluster_ips=["10.96.0.10", "fd00::10"],
              ports=[port("http", 80, node_port=30080), port("dns", 53, "UDP")], external_ips=["192.0.2.10"],
              ingress=[{"ip": "203.0.113.1", "ipMode": "VIP"}], affinity=60, itp="Local", etp="Local",
              annotations={"ipvsproxy.io/scheduler": "sh", "ipvsproxy.io/scheduler-flags": "sh-port"},
              loadBalancerSourceRanges=["198.51.100.0/24"])
SLICE = slice_("web", [endpoint("10.1.0.1", zones=["zone-a"], target="web-0"),
                       endpoint("10.1.0.2", ready=False, serving=True, terminating=True)],
               ports=[("http", 8080), ("dns", 53, "UDP")])
EPS = legacy_endpoints("web", ["10.1.0.1", "fd01::1"], ["10.1.0.3"], ports=[("http", 8080)])
EPS["subsets"][0]["addresses"][0]["targetRef"] = {"kind": "Pod", "name": "p"}
NODE_OBJ = node(NODE, ["192.0.2.1", "fd00:2::1"], ["198.51.100.1"], zone="zone-a")
TEMPLATES = {"Service": (SVC, parse_service), "EndpointSlice": (SLICE, parse_endpointslice),
             "Endpoints": (EPS, parse_endpoints), "Node": (NODE_OBJ, parse_node)}


def test_templates_are_valid() -> None:
    for template, parse in TEMPLATES.values():
        assert parse(template)[1] == []


@st.composite
def bad_object(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    obj = draw(mangled(TEMPLATES[kind][0]) | garbage)
    return kind, obj


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_object())
def test_parse_raises_only_invalid_object(ko: tuple[str, Any]) -> None:
    kind, obj = ko
    for parse in (parse_service, parse_endpointslice, parse_endpoints, parse_node):
        try:
            _, problems = parse(obj)
        except InvalidObject as exc:
            assert str(exc)
        else:
            assert all(isinstance(p, str) for p in problems)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bad_object(), min_size=1, max_size=6))
def test_tracker_and_translate_never_raise(objs: list[tuple[str, Any]]) -> None:
    seen: list[str] = []
    t = Tracker(NODE, on_problem=lambda kind, ns, name, msg, version: seen.append(msg))
    for kind, _ in objs:  # a good version first, so mangled ones are updates
        t.upsert(kind, TEMPLATES[kind][0])
    for kind, obj in objs:
        t.upsert(kind, obj)
        t.upsert("Service", obj)
    t.replace("EndpointSlice", [o for _, o in objs])
    t.take_dirty()
    slices = [s for sid in list(t.slices_of) for s in t.slices_for(sid)]
    desired, problems = translate(t.services.values(), slices, t.node, Config(NODE, "rr"), Registry())
    ops = plan(desired, ObservedState())
    assert all(isinstance(p, str) for p in problems + seen)
    for op in ops:
        str(op)
    for vs in desired.services.values():
        assert 1 <= vs.key.port <= 65535 and all(1 <= r.port <= 65535 for r in vs.reals)


# ---- (d) manifest reader with random files -------------------------------------------------

TOKENS = ["kind: List\n", "items:", " 5", "\n- ", "apiVersion: v1\n", "kind: Service\n", "metadata:", " {name: x}",
          "!!int ''", "!!float x", "2001-02-30", "&a ", "*a", "[", "]", "{", "}", ": ", ",", "---\n", "\n", "  ",
          "'", '"', "#", "%YAML 1.1\n", "!!binary xyz", "? ", "|\n", "\t", "\x00", "\ufeff", "é", "<<: *a\n"]
yaml_text = st.lists(st.sampled_from(TOKENS) | st.text(max_size=8), max_size=25).map("".join) | st.text(max_size=80)

GOOD = "---\n".join([
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n"
    "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n",
    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
    "metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\n"
    "addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]\n",
])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(yaml_text, min_size=1, max_size=3))
def test_random_yaml_files_never_raise_and_good_file_still_read(texts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for i, text in enumerate(texts):
            (d / f"r{i}.yaml").write_text(text)
        (d / "good.yaml").write_text(GOOD)
        reader = ManifestReader([tmp])
        snap = reader.read()
        web = [o for o in snap.objects["Service"] if isinstance(o, dict) and o.get("metadata", {}) == {
            "name": "web", "namespace": "demo"}]
        assert len(web) == 1
        assert [o["metadata"]["name"] for o in snap.objects["EndpointSlice"]
                if isinstance(o.get("metadata"), dict) and o["metadata"].get("namespace") == "demo"
                and o["metadata"].get("name") == "web-1"] == ["web-1"]
        assert all(isinstance(p, str) for p in snap.problems)
        t = Tracker(NODE)
        reader.load(t)
        assert "demo/web" in t.services
        assert {e.address for s in t.slices_for("demo/web") for e in s.endpoints} == {"10.1.0.1"}
