"""The fake API server, exercised through the real kubernetes client (typed, Watch and raw calls)."""

from __future__ import annotations

import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.apiserver import FakeApiServer


def svc(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def slice_(name: str, service: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def node(name: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]}}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.1, timeout_scale=0.1) as server:
        yield server


@pytest.fixture
def core(api: FakeApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(client.ApiClient(api.configuration()))


@pytest.fixture
def disc(api: FakeApiServer) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(client.ApiClient(api.configuration()))


def background(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def events(w: watch.Watch, func: Callable[..., Any], **kw: Any) -> list[tuple[str, str, str]]:
    return [(e["type"], e["raw_object"].get("metadata", {}).get("name", ""),
             e["raw_object"]["metadata"]["resourceVersion"]) for e in w.stream(func, **kw)]


def test_list_carries_the_current_resource_version_and_items_without_kind(
        api: FakeApiServer, core: client.CoreV1Api) -> None:
    a = api.create(svc("a"))
    api.create(svc("b", ns="other"))
    assert a["metadata"]["uid"] and a["metadata"]["creationTimestamp"].endswith("Z")
    listed = core.list_service_for_all_namespaces()
    assert listed.metadata.resource_version == api.resource_version
    assert int(api.resource_version) == int(a["metadata"]["resourceVersion"]) + 1
    assert [s.metadata.name for s in listed.items] == ["a", "b"]
    assert [s.metadata.name for s in core.list_namespaced_service("other").items] == ["b"]
    raw = json.loads(core.list_service_for_all_namespaces(_preload_content=False).data)
    assert raw["kind"] == "ServiceList" and raw["apiVersion"] == "v1"
    assert raw["metadata"]["resourceVersion"] == api.resource_version
    assert "kind" not in raw["items"][0]  # like the real server: list items carry no kind/apiVersion
    assert core.read_namespaced_service("a", "default").spec.cluster_ip == "10.96.0.10"


def test_selectors_and_pagination(api: FakeApiServer, core: client.CoreV1Api, disc: client.DiscoveryV1Api) -> None:
    api.create(slice_("a-1", "a"))
    api.create(slice_("a-2", "a"))
    api.create(slice_("b-1", "b"))
    api.create(svc("x", tier="web"))
    api.create(svc("y"))
    got = disc.list_endpoint_slice_for_all_namespaces(label_selector="kubernetes.io/service-name=a")
    assert [s.metadata.name for s in got.items] == ["a-1", "a-2"]
    assert got.items[0].endpoints[0].conditions.ready is True
    assert [s.metadata.name for s in core.list_service_for_all_namespaces(label_selector="tier=web").items] == ["x"]
    assert [s.metadata.name for s in core.list_service_for_all_namespaces(label_selector="!tier").items] == ["y"]
    assert [s.metadata.name for s in core.list_namespaced_service("default", field_selector="metadata.name=y").items] \
        == ["y"]
    page = disc.list_endpoint_slice_for_all_namespaces(limit=2)
    assert len(page.items) == 2 and page.metadata.remaining_item_count == 1
    rest = disc.list_endpoint_slice_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["b-1"] and not rest.metadata._continue


def test_pages_continue_after_the_last_key_with_the_first_pages_resource_version(
        api: FakeApiServer, core: client.CoreV1Api) -> None:
    for name in "abcde":
        api.create(svc(name))
    first = core.list_service_for_all_namespaces(limit=2)
    rv, token = first.metadata.resource_version, first.metadata._continue
    assert [s.metadata.name for s in first.items] == ["a", "b"] and first.metadata.remaining_item_count == 3
    api.delete("Service", "default", "a")  # an offset token would now skip "c"
    api.create(svc("f"))
    rest = core.list_service_for_all_namespaces(limit=2, _continue=token)
    assert [s.metadata.name for s in rest.items] == ["c", "d"]
    assert rest.metadata.resource_version == rv != api.resource_version
    last = core.list_service_for_all_namespaces(limit=2, _continue=rest.metadata._continue)
    assert [s.metadata.name for s in last.items] == ["e", "f"] and not last.metadata._continue
    # a token from before a compaction has expired, like the real server's
    api.compact()
    with pytest.raises(ApiException) as e:
        core.list_service_for_all_namespaces(limit=2, _continue=rest.metadata._continue)
    assert e.value.status == 410 and json.loads(e.value.body)["reason"] == "Expired"
    with pytest.raises(ApiException) as e:
        core.list_service_for_all_namespaces(limit=2, _continue="not-a-token")
    assert e.value.status == 400


def test_nodes_by_name_and_field_selector(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.create(node("n1"))
    api.create(node("n2"))
    assert core.read_node("n1").status.addresses[0].address == "192.168.1.10"
    assert core.read_node("n2").metadata.namespace is None
    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name=n2").items] == ["n2"]
    with pytest.raises(ApiException) as e:
        core.read_node("missing")
    assert e.value.status == 404 and json.loads(e.value.body)["reason"] == "NotFound"


def test_watch_from_zero_sends_added_for_existing_objects(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.create(svc("a"))
    api.create(svc("b"))
    for rv in ("0", None):
        kw = {"resource_version": rv} if rv else {}
        got = events(watch.Watch(), core.list_service_for_all_namespaces, timeout_seconds=3, **kw)
        assert [(t, n) for t, n, _ in got] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_replays_history_after_the_given_resource_version(api: FakeApiServer, core: client.CoreV1Api) -> None:
    first = api.create(svc("a"))["metadata"]["resourceVersion"]
    api.create(svc("b"))
    api.update({**svc("a"), "spec": {"clusterIP": "10.96.0.11"}})
    api.delete("Service", "default", "b")
    api.create(node("n1"))  # another kind: not in the services stream
    w = watch.Watch()
    got = events(w, core.list_service_for_all_namespaces, resource_version=first, timeout_seconds=3)
    assert [(t, n) for t, n, _ in got] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    rvs = [int(rv) for _, _, rv in got]
    assert rvs == sorted(rvs) and rvs[0] > int(first)
    assert w.resource_version == got[-1][2]


def test_live_create_update_delete_arrive_in_order(api: FakeApiServer, disc: client.DiscoveryV1Api) -> None:
    start = api.resource_version
    w = watch.Watch()

    def writes() -> None:
        assert api.wait_for_watches(1)
        api.create(slice_("a-1", "a"))
        api.apply({**slice_("a-1", "a"), "endpoints": []})
        api.delete("EndpointSlice", "default", "a-1")

    background(writes)
    seen = []
    for e in w.stream(disc.list_endpoint_slice_for_all_namespaces, resource_version=start):
        seen.append((e["type"], e["object"].metadata.name, e["object"].endpoints))
        if e["type"] == "DELETED":
            w.stop()
    assert [t for t, _, _ in seen] == ["ADDED", "MODIFIED", "DELETED"]
    assert seen[1][2] == [] and api.get("EndpointSlice", "default", "a-1") is None


def test_watch_selector_transitions_become_added_and_deleted(api: FakeApiServer, core: client.CoreV1Api) -> None:
    start = api.create(svc("a"))["metadata"]["resourceVersion"]
    api.update(svc("a", tier="web"))
    api.update(svc("a", tier="db"))
    got = events(watch.Watch(), core.list_service_for_all_namespaces, resource_version=start,
                 label_selector="tier=web", timeout_seconds=2)
    assert [t for t, _, _ in got] == ["ADDED", "DELETED"]


def test_bookmarks_only_when_asked(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.create(svc("a"))
    rv = api.resource_version
    w = watch.Watch()
    got = list(w.stream(core.list_service_for_all_namespaces, resource_version=rv, allow_watch_bookmarks=True,
                        timeout_seconds=5))
    assert len(got) >= 3 and {e["type"] for e in got} == {"BOOKMARK"}
    assert got[0]["raw_object"] == {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}
    assert w.resource_version == rv
    assert events(watch.Watch(), core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=3) == []
    api.set_bookmark_interval(0)
    assert events(watch.Watch(), core.list_service_for_all_namespaces, resource_version=rv,
                  allow_watch_bookmarks=True, timeout_seconds=3) == []


def test_bookmark_follows_live_writes(api: FakeApiServer, core: client.CoreV1Api) -> None:
    start = api.resource_version
    w = watch.Watch()
    background(lambda: api.wait_for_watches(1) and api.create(svc("a")))
    seen = []
    for e in w.stream(core.list_service_for_all_namespaces, resource_version=start, allow_watch_bookmarks=True):
        seen.append((e["type"], e["raw_object"]["metadata"]["resourceVersion"]))
        if e["type"] == "BOOKMARK" and len(seen) > 1:
            w.stop()
    assert seen[0][0] == "ADDED" and seen[-1] == ("BOOKMARK", api.resource_version)


def test_watch_from_compacted_resource_version_gets_410(api: FakeApiServer, core: client.CoreV1Api) -> None:
    old = api.create(svc("a"))["metadata"]["resourceVersion"]
    api.create(svc("b"))
    now = api.compact()
    # raw: an HTTP 200 stream holding one ERROR event, then the end
    resp = core.list_service_for_all_namespaces(watch=True, resource_version=old, _preload_content=False)
    assert resp.status == 200
    lines = [json.loads(line) for line in resp.data.decode().splitlines()]
    assert lines == [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
        "message": f"too old resource version: {old} ({now})"}}]
    # Watch with timeout_seconds raises at once
    with pytest.raises(ApiException) as e:
        list(watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=old, timeout_seconds=1))
    assert e.value.status == 410 and "Expired" in e.value.reason
    # without timeout_seconds, Watch retries once from the same rv, then raises
    before = api.count("GET", "/api/v1/services")
    with pytest.raises(ApiException) as e:
        list(watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=old))
    assert e.value.status == 410 and api.count("GET", "/api/v1/services") - before == 2
    # the compaction point itself is still watchable; an exact list at an old rv is 410 too
    assert events(watch.Watch(), core.list_service_for_all_namespaces, resource_version=now, timeout_seconds=2) == []
    with pytest.raises(ApiException) as e:
        core.list_service_for_all_namespaces(resource_version=old, resource_version_match="Exact")
    assert e.value.status == 410


def test_drop_watches_breaks_the_stream(api: FakeApiServer, core: client.CoreV1Api) -> None:
    background(lambda: api.wait_for_watches(1) and api.drop_watches())
    with pytest.raises(urllib3.exceptions.ProtocolError):
        list(watch.Watch().stream(core.list_service_for_all_namespaces, resource_version=api.resource_version))
    assert api.open_watches() == 0
    core.list_service_for_all_namespaces()  # the server itself is fine


def test_stop_does_not_hang_with_open_watches() -> None:
    api = FakeApiServer().start()
    core = client.CoreV1Api(client.ApiClient(api.configuration()))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            list(watch.Watch().stream(core.list_node, resource_version="1"))
        except Exception as e:  # noqa: BLE001 - anything ends it
            errors.append(e)

    t = background(run)
    assert api.wait_for_watches(1)
    started = time.monotonic()
    api.stop()
    t.join(5)
    assert time.monotonic() - started < 2 and not t.is_alive()


def test_fail_next_gives_status_errors(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.create(node("n1"))
    api.fail_next(2, status=500)
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            core.list_node()
        assert e.value.status == 500 and json.loads(e.value.body)["kind"] == "Status"
    assert len(core.list_node().items) == 1
    api.fail_next(1, status=503, path_contains="watch=true")
    core.list_node()  # not a watch: untouched
    with pytest.raises(ApiException) as e:
        list(watch.Watch().stream(core.list_node, timeout_seconds=1))
    assert e.value.status == 503
    assert [e["type"] for e in watch.Watch().stream(core.list_node, timeout_seconds=2)] == ["ADDED"]


def test_delay_slows_matching_requests(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.delay(0.3, path_contains="/nodes")
    started = time.monotonic()
    core.list_node()
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    core.list_service_for_all_namespaces()
    assert time.monotonic() - started < 0.3
    api.delay(0, path_contains="/nodes")
    started = time.monotonic()
    core.list_node()
    assert time.monotonic() - started < 0.3


def test_events_posted_and_patched(api: FakeApiServer, core: client.CoreV1Api) -> None:
    ref = {"kind": "Service", "name": "a", "namespace": "default"}
    ev = {"metadata": {"generateName": "a."}, "involvedObject": ref,
          "reason": "InvalidScheduler", "message": "bogus", "type": "Warning", "count": 1}
    made = core.create_namespaced_event("default", ev)
    assert made.metadata.name.startswith("a.") and made.kind == "Event"
    core.patch_namespaced_event(made.metadata.name, "default", {"count": 2})
    events_v1 = client.EventsV1Api(client.ApiClient(api.configuration()))
    events_v1.create_namespaced_event("kube-system", {
        "metadata": {"name": "b.1"}, "reason": "Started", "action": "Start", "note": "n", "type": "Normal",
        "reportingController": "ipvsproxy", "reportingInstance": "n1", "eventTime": "2024-01-01T00:00:00.000000Z"})
    posted = api.events_posted()
    assert [(e["apiVersion"], e["reason"], e["metadata"]["namespace"]) for e in posted] == [
        ("v1", "InvalidScheduler", "default"), ("events.k8s.io/v1", "Started", "kube-system")]
    assert posted[0]["count"] == 2 and posted[0]["involvedObject"]["name"] == "a"


def test_replace_patch_and_conflicts_over_http(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.create(svc("a"))
    got = core.read_namespaced_service("a", "default")
    stale = got.metadata.resource_version
    got.metadata.labels = {"x": "1"}
    assert core.replace_namespaced_service("a", "default", got).metadata.labels == {"x": "1"}
    got.metadata.resource_version = stale
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_service("a", "default", got)
    assert e.value.status == 409
    patched = core.patch_namespaced_service("a", "default", [{"op": "add", "path": "/metadata/labels/y", "value": "2"}])
    assert patched.metadata.labels == {"x": "1", "y": "2"}
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service("default", svc("a"))
    assert e.value.status == 409
    core.delete_namespaced_service("a", "default")
    assert api.list("Service") == []


def test_legacy_endpoints_list_and_watch(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.create({"kind": "Endpoints", "metadata": {"name": "a"},
                "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]})
    assert core.list_endpoints_for_all_namespaces().items[0].subsets[0].addresses[0].ip == "10.0.0.1"
    got = events(watch.Watch(), core.list_namespaced_endpoints, namespace="default", timeout_seconds=2)
    assert [(t, n) for t, n, _ in got] == [("ADDED", "a")]


def test_kubeconfig_loads_and_requests_are_logged(api: FakeApiServer, tmp_path: pathlib.Path) -> None:
    api.create(node("n1"))
    cfg = client.Configuration()
    config.load_kube_config(config_file=api.write_kubeconfig(tmp_path / "kubeconfig"), client_configuration=cfg)
    assert cfg.host == api.url
    assert client.VersionApi(client.ApiClient(cfg)).get_code().git_version.startswith("v1.")
    assert [n.metadata.name for n in client.CoreV1Api(client.ApiClient(cfg)).list_node().items] == ["n1"]
    assert ("GET", "/api/v1/nodes", {}) in api.requests
