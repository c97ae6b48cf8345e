"""One cluster, three endpoints API generations: discovery.k8s.io/v1 EndpointSlices,
discovery.k8s.io/v1beta1 EndpointSlices (read through the kube source's conversion:
the node from `topology["kubernetes.io/hostname"]`) and core/v1 Endpoints give the
same desired state.

Generated clusters use only what all three can say: ready or not (with v1's
serving = ready and terminating = false, which is what v1 says of such endpoints),
the node, ports. What only the newer forms carry (v1's serving/terminating for an
endpoint that is not ready, hints/zones) is left out; docs/operating.md says so.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvsproxy.sources.kube import EndpointsSource, choose_endpoints_source, from_v1beta1
from tests.unit.factories import NODE, node, port, run, service, table

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NODES = [NODE, "n2", None]
PORTS = {"http": (80, 8080, "TCP"), "dns": (53, 5353, "UDP")}


@st.composite
def clusters(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Services with their endpoints: name, type, policies, port names, [(ip, ready, node)]."""
    out = []
    for i in range(draw(st.integers(1, 4))):
        eps = draw(st.lists(st.tuples(st.integers(1, 6), st.booleans(), st.sampled_from(NODES)),
                            max_size=6, unique_by=lambda e: e[0]))
        out.append({
            "name": f"s{i}", "ip": f"10.96.0.{i + 1}",
            "type": draw(st.sampled_from(["ClusterIP", "NodePort"])),
            "etp": draw(st.sampled_from([None, "Local"])), "itp": draw(st.sampled_from([None, "Local"])),
            "ports": draw(st.sets(st.sampled_from(sorted(PORTS)), min_size=1)),
            "endpoints": [(f"10.1.{i}.{n}", ready, nd) for n, ready, nd in eps],
        })
    return out


def services(cluster: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(cluster):
        ports = [port(name, p, proto, target=t, node_port=30000 + 10 * i + k if c["type"] == "NodePort" else None)
                 for k, (name, (p, t, proto)) in enumerate(sorted((n, PORTS[n]) for n in c["ports"]))]
        out.append(service(c["name"], cluster_ip=c["ip"], type=c["type"], ports=ports,
                           etp=c["etp"] if c["type"] == "NodePort" else None, itp=c["itp"]))
    return out


def slice_ports(c: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": n, "port": PORTS[n][1], "protocol": PORTS[n][2]} for n in sorted(c["ports"])]


def v1(c: dict[str, Any]) -> dict[str, Any]:
    eps = []
    for ip, ready, nd in c["endpoints"]:
        e: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": False}}
        if nd:
            e["nodeName"] = nd
        eps.append(e)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{c['name']}-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": c["name"]}},
            "ports": slice_ports(c), "endpoints": eps}


def v1beta1(c: dict[str, Any]) -> dict[str, Any]:
    """As v1.20's EndpointSlice controller writes it: ready only, the node in topology."""
    obj = v1(c)
    obj["apiVersion"] = "discovery.k8s.io/v1beta1"
    for e, (_, ready, nd) in zip(obj["endpoints"], c["endpoints"], strict=True):
        e["conditions"] = {"ready": ready}
        e.pop("nodeName", None)
        if nd:
            e["topology"] = {"kubernetes.io/hostname": nd, "topology.kubernetes.io/zone": "z1"}
    return from_v1beta1(obj)


def endpoints(c: dict[str, Any]) -> dict[str, Any]:
    def addr(ip: str, nd: str | None) -> dict[str, Any]:
        return {"ip": ip, "nodeName": nd} if nd else {"ip": ip}

    subset: dict[str, Any] = {"ports": slice_ports(c)}
    ready = [addr(ip, nd) for ip, r, nd in c["endpoints"] if r]
    not_ready = [addr(ip, nd) for ip, r, nd in c["endpoints"] if not r]
    if ready:
        subset["addresses"] = ready
    if not_ready:
        subset["notReadyAddresses"] = not_ready
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": c["name"], "namespace": "default"},
            "subsets": [subset] if c["endpoints"] else []}


@FAST
@given(clusters())
def test_three_generations_give_the_same_desired_state(cluster: list[dict[str, Any]]) -> None:
    nd = node(NODE, internal=("192.0.2.1",))
    from_v1, _ = run(services(cluster), [v1(c) for c in cluster], nd)
    from_beta, _ = run(services(cluster), [v1beta1(c) for c in cluster], nd)
    from_endpoints, _ = run(services(cluster), [], nd, legacy=[endpoints(c) for c in cluster])
    assert table(from_beta) == table(from_v1)
    assert table(from_endpoints) == table(from_v1)
    assert from_beta.services == from_v1.services


def test_v1beta1_node_is_nodename_when_set_else_the_hostname_topology() -> None:
    obj = {"endpoints": [{"addresses": ["10.0.0.1"], "topology": {"kubernetes.io/hostname": "h1"}},
                         {"addresses": ["10.0.0.2"], "nodeName": "n2", "topology": {"kubernetes.io/hostname": "h2"}},
                         {"addresses": ["10.0.0.3"]}, "junk"]}
    eps = from_v1beta1(obj)["endpoints"]
    assert [e.get("nodeName") if isinstance(e, dict) else e for e in eps] == ["h1", "n2", None, "junk"]


def test_discovery_picks_the_newest_endpoints_api_served() -> None:
    def apis(*versions: str) -> dict[str, Any]:
        return {"groups": [{"name": "apps", "versions": [{"version": "v1"}]},
                           {"name": "discovery.k8s.io", "versions": [{"version": v} for v in versions]}]}

    assert choose_endpoints_source(apis("v1", "v1beta1")) is EndpointsSource.V1
    assert choose_endpoints_source(apis("v1beta1")) is EndpointsSource.V1BETA1
    assert choose_endpoints_source(apis()) is EndpointsSource.ENDPOINTS
    assert choose_endpoints_source({"groups": [{"name": "apps", "versions": [{"version": "v1"}]}]}) \
        is EndpointsSource.ENDPOINTS
    assert choose_endpoints_source("garbage") is EndpointsSource.ENDPOINTS
