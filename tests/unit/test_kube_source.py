"""The live agent end to end: KubeSource (its own API client) against
the in-process FakeApiServer, driving the Agent onto the memory dataplane.

Everything runs with real threads; waits poll with deadlines (never fixed
sleeps), the backoff and watch lengths are shrunk (kubelab.FAST) so the whole
file takes seconds, and tests about backoff replace the source's pauses with
kubelab.Pauses, which records what was asked and waits for nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy import objects
from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.plan import OpKind
from ipvsproxy.sources import kube
from ipvsproxy.sources.kube import KubeSource
from ipvsproxy.tracker import Tracker
from tests.apiserver import FakeApiServer
from tests.unit.factories import node, port, service
from tests.unit.kubelab import (
    FAST,
    NODE,
    Live,
    Pauses,
    drop,
    ip_slice,
    key,
    op_summary,
    populate,
    programmed,
    rs,
    wait_until,
)

SCHED = "ipvsproxy.io/scheduler"


# ---- objects reach the dataplane ---------------------------------------------------------------
def test_service_slice_and_node_changes_reach_the_dataplane(api: FakeApiServer, live: Callable[..., Live]) -> None:
    api.create(node(NODE, internal=("192.0.2.1",)))
    api.create(service("web", type="NodePort", ports=[port(node_port=30080)]))
    api.create(ip_slice("web", ["10.0.0.1"]))
    lv = live()
    dp = lv.dp
    vip, np1 = key("10.96.0.10"), key("192.0.2.1", 30080)
    wait_until(lambda: dp.table() == {vip: rs("10.0.0.1"), np1: rs("10.0.0.1")}, what="web programmed")
    assert dp.state.addresses == {"10.96.0.10"}  # node addresses are not bound

    # EndpointSlice update: real servers follow
    api.update(ip_slice("web", ["10.0.0.1", "10.0.0.2"]))
    wait_until(lambda: dp.reals(vip) == rs("10.0.0.1", "10.0.0.2") == dp.reals(np1), what="endpoint added")

    # Service update: port and nodePort change move the virtual servers
    api.update(service("web", type="NodePort", ports=[port(port=81, node_port=30081)]))
    vip81, np81 = key("10.96.0.10", 81), key("192.0.2.1", 30081)
    wait_until(lambda: set(dp.table()) == {vip81, np81}, what="ports moved")
    assert dp.reals(vip81) == rs("10.0.0.1", "10.0.0.2")

    # Node update: the NodePort follows the node's address
    api.update(node(NODE, internal=("192.0.2.7",)))
    np_new = key("192.0.2.7", 30081)
    wait_until(lambda: set(dp.table()) == {vip81, np_new}, what="NodePort on the new node address")

    # a second Service appears
    api.create(service("api", cluster_ip="10.96.0.20"))
    wait_until(lambda: key("10.96.0.20") in dp.table(), what="second Service")
    assert dp.state.addresses == {"10.96.0.10", "10.96.0.20"}

    # EndpointSlice delete: the virtual server stays, with no real servers
    api.delete("EndpointSlice", "default", "web-ipv4")
    wait_until(lambda: dp.reals(vip81) == set() == dp.reals(np_new), what="reals removed")

    # Node delete: no node addresses, no NodePort virtual server
    api.delete("Node", None, NODE)
    wait_until(lambda: np_new not in dp.table(), what="NodePort gone with the Node")
    assert vip81 in dp.table()

    # Service delete: its virtual server and bound address go
    api.delete("Service", "default", "web")
    wait_until(lambda: set(dp.table()) == {key("10.96.0.20")}, what="web deleted")
    assert dp.state.addresses == {"10.96.0.20"}
    lv.stop()
    assert set(dp.table()) == {key("10.96.0.20")}  # stopping leaves the kernel as it is


def test_first_sync_waits_until_every_kind_was_listed(api: FakeApiServer, live: Callable[..., Live]) -> None:
    api.create(node(NODE))
    api.create(service("web", type="NodePort", ports=[port(node_port=30080)]))
    api.create(ip_slice("web", ["10.0.0.1"]))
    api.delay(0.8, path_contains="/api/v1/nodes")
    lv = live()
    tracker = lv.agent.tracker
    wait_until(lambda: {"Service", "EndpointSlice"} <= tracker.listed, what="Services and slices listed")
    assert "Node" not in tracker.listed
    assert lv.syncs == 0 and lv.dp.batches == []
    wait_until(lambda: key("192.0.2.1", 30080) in lv.dp.table(), what="NodePort")
    # the very first batch already had everything: the node's NodePort and the endpoints
    first = op_summary(lv.dp.batches[0])
    assert ("add-vs", "192.0.2.1:30080") in first and ("add-rs", "10.96.0.10:80 10.0.0.1") in first
    api.delay(0, path_contains="/api/v1/nodes")


# ---- resilience --------------------------------------------------------------------------------
def test_410_after_compaction_relists_without_losing_or_repeating_a_change(
        api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    lv = live()
    programmed(lv)
    src, mark = lv.source, len(lv.dp.batches)
    lists, errors = src.stats["lists"], src.stats["errors"]
    # the watches break and cannot come back while the cluster changes and etcd compacts
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(10**6, status=503, path_contains="watch=true")
    drop(api)
    api.delete("Service", "default", "a")
    api.update(ip_slice("b", ["10.0.2.1", "10.0.2.2"]))
    api.create(service("d", cluster_ip="10.96.0.4"))
    api.create(ip_slice("d", ["10.0.4.1"]))
    api.update(node(NODE, internal=("192.0.2.1",), hostname="renamed"))  # no effect on IPVS
    wait_until(lambda: src.stats["errors"] >= errors + 3, what="failed reconnects")
    assert set(lv.dp.table()) == {key("10.96.0.1"), key("10.96.0.2"), key("10.96.0.3")}  # last good state kept
    api.compact()
    api.clear_faults()
    want = {key("10.96.0.2"): rs("10.0.2.1", "10.0.2.2"), key("10.96.0.3"): rs("10.0.3.1"),
            key("10.96.0.4"): rs("10.0.4.1")}
    wait_until(lambda: lv.dp.table() == want, what="state after relist")
    lv.settle()
    assert src.stats["relists_410"] == 3 and src.stats["lists"] == lists + 3
    # every change applied exactly once, nothing else
    assert op_summary(lv.dp.ops(mark)) == sorted([
        ("del-vs", "10.96.0.1:80"), ("unbind", "10.96.0.1"),
        ("add-rs", "10.96.0.2:80 10.0.2.2"),
        ("bind", "10.96.0.4"), ("add-vs", "10.96.0.4:80"), ("add-rs", "10.96.0.4:80 10.0.4.1"),
    ])
    assert lv.dp.state.addresses == {"10.96.0.2", "10.96.0.3", "10.96.0.4"}


def test_dropped_watches_resume_where_they_stopped_without_relisting(
        api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    lv = live()
    programmed(lv)
    src, mark = lv.source, len(lv.dp.batches)
    lists, events, errors = src.stats["lists"], src.stats["events"], src.stats["errors"]
    r0, n_req = api.resource_version, len(api.requests)
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(10**6, status=503, path_contains="watch=true")
    drop(api)
    api.update(ip_slice("b", ["10.0.2.1", "10.0.2.9"]))
    api.delete("Service", "default", "c")
    wait_until(lambda: src.stats["errors"] >= errors + 3, what="failed reconnects")
    assert set(lv.dp.table()) == {key("10.96.0.1"), key("10.96.0.2"), key("10.96.0.3")}  # last good state kept
    api.clear_faults()
    want = {key("10.96.0.1"): rs("10.0.1.1"), key("10.96.0.2"): rs("10.0.2.1", "10.0.2.9")}
    wait_until(lambda: lv.dp.table() == want, what="changes made while disconnected")
    lv.settle()
    assert src.stats["lists"] == lists and src.stats["relists_410"] == 0
    assert src.stats["events"] == events + 2  # each missed change replayed once, nothing older
    # the watches came back from the resourceVersion they had reached
    resumed = [q["resourceVersion"] for m, p, q in api.requests[n_req:] if q.get("watch") == "true"]
    assert resumed[0] == r0 and all(int(rv) >= int(r0) for rv in resumed)
    assert op_summary(lv.dp.ops(mark)) == sorted([
        ("add-rs", "10.96.0.2:80 10.0.2.9"),
        ("del-vs", "10.96.0.3:80"), ("unbind", "10.96.0.3"),  # its real servers go with it
    ])


def test_500s_on_list_and_watch_are_retried_with_backoff(
        api: FakeApiServer, live: Callable[..., Live], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ipvsproxy.sources.kube")
    populate(api)
    api.fail_next(3, status=500, path_contains="/endpointslices?limit")  # the first list
    api.fail_next(2, status=503, path_contains="/api/v1/nodes?allowWatchBookmarks")  # the first watch
    lv = live()
    programmed(lv)
    assert api.count("GET", "/apis/discovery.k8s.io/v1/endpointslices") >= 4  # 3 failures, then the list
    src = lv.source
    wait_until(lambda: src.stats["watches"] >= 3, what="three watches open")
    before = dict(lv.dp.table())

    # later: the Service watch breaks and cannot come back at once; meanwhile a change and a
    # compaction, so it must relist, and the relist fails a few times
    caplog.clear()
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(2, status=503, path_contains="/api/v1/services?allowWatchBookmarks")
    api.fail_next(4, status=500, path_contains="/api/v1/services?labelSelector")  # lists only
    drop(api)
    api.create(service("d", cluster_ip="10.96.0.4"))
    api.compact()
    wait_until(lambda: src.stats["relists_410"] >= 1, what="410")
    wait_until(lambda: lv.dp.table().get(key("10.96.0.4")) == set(), what="d after the failures")
    assert {k: v for k, v in lv.dp.table().items() if k != key("10.96.0.4")} == before
    waits = [float(r.getMessage().rsplit(" in ", 1)[1].rstrip("s")) for r in caplog.records
             if r.getMessage().startswith("watch Service failed") and "(500)" in r.getMessage()]
    assert len(waits) == 4, waits  # one retry per failure, no hot loop
    # exponential: each step doubles (equal jitter keeps every wait in [step/2, step])
    for i, w in enumerate(waits):
        step = min(0.4, 0.05 * 2 ** i)
        assert step / 2 - 0.006 <= w <= step + 0.006, waits
    assert waits[2] > waits[0]
    list_requests = [q for m, p, q in api.requests if p == "/api/v1/services" and "watch" not in q]
    assert len(list_requests) == 1 + 4 + 1  # start, 4 failures, the relist


def test_retry_after_is_honoured(api: FakeApiServer, live: Callable[..., Live]) -> None:
    # the source's own backoff waits out a 429's Retry-After (urllib3 never retries by itself)
    populate(api, ["a"])
    api.fail_next(1, status=429, path_contains="/api/v1/services?labelSelector", retry_after=1)
    started = time.monotonic()
    lv = live()
    programmed(lv, ["a"])
    assert time.monotonic() - started >= 1.0
    assert api.count("GET", "/api/v1/services") >= 2


def test_an_http_410_on_a_watch_request_relists(api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api, ["a"])
    lv = live()
    programmed(lv, ["a"])
    src = lv.source
    lists = src.stats["lists"]
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(1, status=410, path_contains="/api/v1/services?allowWatchBookmarks")
    drop(api)
    api.create(service("b", cluster_ip="10.96.0.2"))
    wait_until(lambda: key("10.96.0.2") in lv.dp.table(), what="b")
    assert src.stats["relists_410"] == 1 and src.stats["lists"] == lists + 1


def test_persistent_410_backs_off_instead_of_hammering_the_server(
        api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api, ["a"])
    pauses = Pauses(hold_after=5)  # the sixth pause is held until released
    lv = live(timing=dataclasses.replace(FAST, pause=pauses))
    programmed(lv, ["a"])
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(10**6, status=410, path_contains="/api/v1/services?allowWatchBookmarks")
    drop(api)
    waits = pauses.wait_for("watch-Service", 6)
    lists = [q for m, p, q in list(api.requests) if p == "/api/v1/services" and "watch" not in q]
    assert len(lists) <= len(waits) + 2  # the first list, the relist on the first 410, then one per pause
    assert lv.source.stats["relists_410"] >= 5
    # backoff between relists (0.05 s doubling to 0.4 s, equal jitter), not a hot loop; the first
    # pause may be the dropped watch's, so the doubling is checked up to where it must have got
    assert all(0.025 <= w <= 0.4 for w in waits) and waits[-1] >= 0.2, waits
    api.clear_faults()
    pauses.release()
    api.create(service("b", cluster_ip="10.96.0.2"))
    wait_until(lambda: key("10.96.0.2") in lv.dp.table(), what="b after the 410s stop")


def test_slow_responses_are_tolerated(api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    api.delay(0.3)  # every request, watches and lists alike
    lv = live()
    programmed(lv)
    api.update(ip_slice("a", ["10.0.1.1", "10.0.1.2"]))
    wait_until(lambda: lv.dp.reals(key("10.96.0.1")) == rs("10.0.1.1", "10.0.1.2"), what="update")
    assert lv.source.stats["errors"] == 0


def test_bookmarks_advance_the_resource_version(api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    lv = live()
    programmed(lv)
    src = lv.source
    api.update(ip_slice("a", ["10.0.1.1", "10.0.1.5"]))
    wait_until(lambda: lv.dp.reals(key("10.96.0.1")) == rs("10.0.1.1", "10.0.1.5"), what="update")
    # writes the watches do not see move the global resourceVersion on; bookmarks carry it to us
    for i in range(3):
        api.create({"kind": "Endpoints", "metadata": {"name": f"other-{i}"}})
    target = api.resource_version
    wait_until(lambda: all(src.resource_versions.get(k) == target for k in src.kinds), what="bookmarks")
    lists, events = src.stats["lists"], src.stats["events"]

    def reconnected() -> None:
        n_req = len(api.requests)
        drop(api)
        wait_until(lambda: len({p for m, p, q in api.requests[n_req:] if q.get("watch")}) == 3
                   and api.open_watches() == 3, what="reconnect")
        assert {q["resourceVersion"] for m, p, q in api.requests[n_req:] if q.get("watch")} == {target}

    # a reconnect starts from the bookmark: no replay of the slice update
    reconnected()
    # and after a compaction at that point, no relist either
    api.compact()
    reconnected()
    lv.settle()
    assert src.stats["events"] == events and src.stats["lists"] == lists and src.stats["relists_410"] == 0


def test_a_burst_of_updates_coalesces_into_few_syncs(api: FakeApiServer, live: Callable[..., Live]) -> None:
    names = [f"s{i}" for i in range(10)]
    populate(api, names)
    lv = live(min_sync_period=0.2)
    programmed(lv, names)
    src = lv.source
    syncs, events = lv.syncs, src.stats["events"]
    last: dict[int, list[str]] = {}
    for n in range(1000):
        i = n % 10
        last[i] = [f"10.1.{i}.{j}" for j in range(1, 2 + n % 7)]
        api.update(ip_slice(f"s{i}", last[i]))
    want = {key(f"10.96.0.{i + 1}"): rs(*ips) for i, ips in last.items()}
    wait_until(lambda: lv.dp.table() == want, timeout=10, what="final state")
    wait_until(lambda: src.stats["events"] == events + 1000, what="all events")
    assert lv.syncs - syncs <= 20, f"{lv.syncs - syncs} syncs for 1000 events"


# ---- Events and bad input -----------------------------------------------------------------------
def posted(api: FakeApiServer, reason: str, name: str | None = None) -> list[dict[str, Any]]:
    return [e for e in api.events_posted()
            if e["reason"] == reason and (name is None or e["involvedObject"]["name"] == name)]


def test_invalid_scheduler_posts_one_warning_event_per_change(
        api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api, ["a"])
    api.create(service("web", cluster_ip="10.96.0.10", annotations={SCHED: "bogus"}))
    api.create(service("fine", cluster_ip="10.96.0.11", annotations={SCHED: "lc"}))
    lv = live()
    wait_until(lambda: key("10.96.0.10") in lv.dp.table() and key("10.96.0.11") in lv.dp.table(), what="Services")
    wait_until(lambda: posted(api, "InvalidScheduler"), what="the Event")
    assert lv.dp.state.services[key("10.96.0.10")].scheduler == "rr"  # served with the default
    assert lv.dp.state.services[key("10.96.0.11")].scheduler == "lc"
    # more syncs touching the Service (a slice change, full resyncs): no new Event
    api.create(ip_slice("web", ["10.0.0.1"]))
    wait_until(lambda: lv.dp.reals(key("10.96.0.10")) == rs("10.0.0.1"), what="slice")
    lv.settle()
    lv.settle()
    assert lv.source.flush()
    (event,) = posted(api, "InvalidScheduler")
    web = api.get("Service", "default", "web")
    assert web is not None
    assert event["type"] == "Warning" and "bogus" in event["message"]
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Service", "namespace": "default", "name": "web",
                                       "uid": web["metadata"]["uid"]}
    assert event["metadata"]["namespace"] == "default" and event["source"]["component"] == "ipvsproxy"
    # another bad value: one more Event
    api.update(service("web", cluster_ip="10.96.0.10", annotations={SCHED: "fastest"}))
    wait_until(lambda: len(posted(api, "InvalidScheduler")) == 2, what="second Event")
    assert "fastest" in posted(api, "InvalidScheduler")[1]["message"]
    # fixed: no Event, and the scheduler is used
    api.update(service("web", cluster_ip="10.96.0.10", annotations={SCHED: "sh"}))
    wait_until(lambda: lv.dp.state.services[key("10.96.0.10")].scheduler == "sh", what="sh")
    lv.settle()
    assert lv.source.flush() and len(posted(api, "InvalidScheduler")) == 2
    assert posted(api, "InvalidScheduler", "fine") == []


def test_a_slow_event_post_does_not_hold_up_syncs(api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api, ["a"])
    lv = live()
    programmed(lv, ["a"])
    api.delay(1.5, path_contains="/events")
    api.create(service("web", cluster_ip="10.96.0.10", annotations={SCHED: "bogus"}))
    wait_until(lambda: key("10.96.0.10") in lv.dp.table(), what="web")
    started = time.monotonic()
    api.update(ip_slice("a", ["10.0.1.1", "10.0.1.2"]))
    wait_until(lambda: lv.dp.reals(key("10.96.0.1")) == rs("10.0.1.1", "10.0.1.2"), what="next change")
    assert time.monotonic() - started < 1.0  # not stuck behind the Event post
    api.delay(0, path_contains="/events")
    wait_until(lambda: posted(api, "InvalidScheduler", "web"), what="the Event, late")


def test_bad_objects_are_skipped_with_one_warning_and_others_served(
        api: FakeApiServer, live: Callable[..., Live], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    populate(api, ["a"])
    api.create(service("badport", cluster_ip="10.96.0.20", ports=[port(port="eighty")]))  # type: ignore[arg-type]
    api.create(service("badtype", cluster_ip="10.96.0.21", type="Sideways"))
    nolabel = ip_slice("x", ["10.0.9.1"], name="nolabel")
    del nolabel["metadata"]["labels"]
    api.create(nolabel)
    api.create(service("two", cluster_ip="10.96.0.22",
                       ports=[port("ok", 80), port("bad", 70000)]))  # one bad port of two
    api.create(ip_slice("two", ["10.0.22.1"], ports=[("ok", 8080)]))
    lv = live()
    want = {key("10.96.0.1"): rs("10.0.1.1"), key("10.96.0.22"): rs("10.0.22.1")}
    wait_until(lambda: lv.dp.table() == want, what="the good Services")
    lv.settle()
    lv.settle()

    def warnings(name: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]

    assert len(warnings("default/badport")) == 1 and "invalid port 'eighty'" in warnings("default/badport")[0]
    assert len(warnings("default/badtype")) == 1 and "Sideways" in warnings("default/badtype")[0]
    assert len(warnings("default/nolabel")) == 1
    assert len(warnings("default/two")) == 1 and "70000" in warnings("default/two")[0]
    assert lv.source.flush()
    bad = posted(api, "InvalidObject")
    assert sorted((e["involvedObject"]["kind"], e["involvedObject"]["name"]) for e in bad) == [
        ("EndpointSlice", "nolabel"), ("Service", "badport"), ("Service", "badtype"), ("Service", "two")]
    assert all(e["type"] == "Warning" for e in bad)

    # a good Service turned bad keeps what was programmed
    api.update(service("a", cluster_ip="10.96.0.1", type="Sideways"))
    wait_until(lambda: len(posted(api, "InvalidObject", "a")) == 1, what="Event for a")
    lv.settle()
    assert lv.dp.table() == want

    # a relist files every object again: no second Event for the same version
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(10**6, status=503, path_contains="watch=true")
    drop(api)
    api.create({"kind": "Endpoints", "metadata": {"name": "unrelated"}})
    api.compact()
    api.clear_faults()
    wait_until(lambda: lv.source.stats["relists_410"] == 3, what="relists")
    lv.settle()
    assert lv.source.flush() and len(posted(api, "InvalidObject")) == 5
    assert lv.dp.table() == want


def test_events_go_out_in_the_background_each_one_on_a_fresh_or_clean_connection(api: FakeApiServer) -> None:
    # an Event response left unread used to poison the pooled connection for the next request
    src = KubeSource(Tracker(NODE), NODE, api_client=api.client(), timing=FAST)
    for i in range(40):
        src.post_object_event("Service", "ns", f"s{i}", "InvalidObject", f"bad {i}", uid=f"u{i}")
    src.post_object_event("Node", "default", NODE, "InvalidObject", "bad node")
    src.post_object_event("EndpointSlice", "ns", "x-1", "InvalidObject", "bad slice")
    assert src.flush()
    assert src.stats["events_posted"] == 42 and len(posted(api, "InvalidObject")) == 42
    by_name = {e["involvedObject"]["name"]: e for e in posted(api, "InvalidObject")}
    assert by_name["s7"]["involvedObject"] == {"apiVersion": "v1", "kind": "Service", "namespace": "ns",
                                               "name": "s7", "uid": "u7"}
    assert by_name["s7"]["metadata"]["namespace"] == "ns" and by_name["s7"]["message"] == "bad 7"
    assert by_name[NODE]["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": NODE}
    assert by_name[NODE]["metadata"]["namespace"] == "default"  # cluster-scoped objects' Events live there
    assert by_name["x-1"]["involvedObject"]["apiVersion"] == "discovery.k8s.io/v1"
    assert src.api.json("GET", "/api/v1/namespaces/ns/events")["items"]  # the pooled connections still work
    src.stop()


# ---- memory, pagination, once ---------------------------------------------------------------------
def test_the_agent_never_imports_the_official_client() -> None:
    # ~22 MiB and ~0.4 s of generated models the agent never used (issue 18, target 4)
    code = ("import sys, ipvsproxy.agent, ipvsproxy.sources.kube, ipvsproxy.cli.main; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_source_keeps_compact_records(api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    api.create(service("web", cluster_ip="10.96.0.10", annotations={SCHED: "bogus"}))  # an Event is posted too
    lv = live()
    wait_until(lambda: key("10.96.0.10") in lv.dp.table(), what="web")
    api.update(ip_slice("a", ["10.0.1.1", "10.0.1.2"]))
    wait_until(lambda: lv.dp.reals(key("10.96.0.1")) == rs("10.0.1.1", "10.0.1.2"), what="watched update")
    assert lv.source.flush() and posted(api, "InvalidScheduler")
    t = lv.agent.tracker
    assert {type(s) for s in t.services.values()} == {objects.Service}
    assert {type(s) for g in t.groups.values() for s in g} == {objects.EndpointSlice}
    assert type(t.node) is objects.Node
    records = [*t.services.values(), *(s for g in t.groups.values() for s in g), t.node]
    assert not any(hasattr(r, "__dict__") for r in records)  # slotted, no per-object dict


def test_lists_are_paged_and_a_relist_across_pages_drops_what_is_gone(
        api: FakeApiServer, live: Callable[..., Live], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "PAGE_SIZE", 7)
    names = [f"s{i:02d}" for i in range(30)]
    populate(api, names)
    api.fail_next(1, status=410, path_contains="/endpointslices?continue=")  # an expired continue token
    lv = live()
    programmed(lv, names)
    svc_lists = [q for m, p, q in api.requests if p == "/api/v1/services" and "watch" not in q]
    assert len(svc_lists) == 5 and all(q["limit"] == "7" for q in svc_lists)  # 30 = 7+7+7+7+2
    assert sum(1 for q in svc_lists if "continue" in q) == 4
    slice_firsts = [q for m, p, q in api.requests
                    if p == "/apis/discovery.k8s.io/v1/endpointslices" and "watch" not in q and "continue" not in q]
    assert len(slice_firsts) == 2  # the expired token restarted the listing
    # a relist (after a compaction) with objects gone from every page
    assert api.wait_for_watches(3)  # before the faults, which would keep them shut
    api.fail_next(10**6, status=503, path_contains="watch=true")
    drop(api)
    gone = names[::3]
    for name in gone:
        api.delete("Service", "default", name)
    api.compact()
    api.clear_faults()
    want = {key(f"10.96.0.{i}"): rs(f"10.0.{i}.1") for i, n in enumerate(names, 1) if n not in gone}
    wait_until(lambda: lv.dp.table() == want, what="deleted Services gone after the paged relist")


def test_once_lists_syncs_and_posts_events_but_dry_run_posts_none(api: FakeApiServer, tmp_path: Path) -> None:
    populate(api, ["a"])
    api.create(service("web", cluster_ip="10.96.0.10", annotations={SCHED: "bogus"}))
    cfg = AgentConfig(node_name=NODE, kubeconfig=api.write_kubeconfig(tmp_path / "kc"), state_dir=str(tmp_path))
    dry = Agent(cfg, MemoryDataplane(), dry_run=True, record_state=False, source_timing=FAST).once()
    assert {op.kind for op in dry.ops} >= {OpKind.ADD_VS, OpKind.ADD_RS}
    assert api.events_posted() == []
    dp = MemoryDataplane()
    Agent(cfg, dp, record_state=False, source_timing=FAST).once()
    assert set(dp.state.services) == {key("10.96.0.1"), key("10.96.0.10")}
    assert [e["involvedObject"]["name"] for e in posted(api, "InvalidScheduler")] == ["web"]  # flushed before return


def test_source_alone_follows_changes_and_stops_promptly(api: FakeApiServer) -> None:
    populate(api, ["a"])
    tracker = Tracker(NODE)
    src = KubeSource(tracker, NODE, api_client=api.client(), timing=FAST)
    src.start()
    wait_until(lambda: tracker.ready(), what="listed")
    assert set(tracker.services) == {"default/a"}
    api.create(service("b", cluster_ip="10.96.0.2"))
    wait_until(lambda: "default/b" in tracker.services, what="b")
    api.delete("Service", "default", "a")
    wait_until(lambda: "default/a" not in tracker.services, what="a deleted")
    assert src.resource_versions["Service"] == api.resource_version
    started = time.monotonic()
    src.stop()
    assert time.monotonic() - started < 2.5
    assert not any(t.is_alive() for t in src._threads)
    assert collections.Counter(m for m, _, _ in api.requests)["POST"] == 0
