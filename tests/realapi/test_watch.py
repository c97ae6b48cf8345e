"""The agent against a real kube-apiserver v1.20.2 + etcd: list, watch, bookmarks,
etcd compaction (410 -> relist), an API server restart mid-watch, and a paged
list whose continue token expires.

Each test has its own namespace and ClusterIP block (10.96.N.0/24) and looks
only at the virtual servers in that block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from ipvsproxy.plan import OpKind
from ipvsproxy.sources import kube
from ipvsproxy.sources.kube import EndpointsSource, KubeSource
from tests.realapi.cluster import Cluster
from tests.realapi.conftest import NODE, NODE_IP, Api, Live, key, node, rs, wait_until

pytestmark = pytest.mark.realapi


def test_list_watch_and_bookmarks(cluster: Cluster, live: Callable[..., Live],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "WATCH_TIMEOUT", 6)  # the watch cache bookmarks ~2 s before a watch's timeout
    api = Api(cluster, "t-watch")
    api.create_service("a", "10.96.1.1")
    api.create_slice("a", ["10.1.1.1", "10.1.1.2"])
    lv = live()
    wait_until(lambda: lv.dp.table("10.96.1.") == {key("10.96.1.1"): rs("10.1.1.1", "10.1.1.2")}, what="listed")
    # v1.20 serves EndpointSlices only as v1beta1: discovery chose it
    assert lv.source.endpoints_source is EndpointsSource.V1BETA1

    api.create_service("b", "10.96.1.2")
    api.create_slice("b", ["10.1.2.1"])
    api.replace_slice("a", ["10.1.1.3"])
    wait_until(lambda: lv.dp.table("10.96.1.") == {key("10.96.1.1"): rs("10.1.1.3"), key("10.96.1.2"): rs("10.1.2.1")},
               what="watched create + update")
    api.delete_service("a")
    wait_until(lambda: set(lv.dp.table("10.96.1.")) == {key("10.96.1.2")}, what="watched delete")

    # bookmarks: another Node changes; the watch on ours (a field selector) gets no event for it,
    # but its resourceVersion moves past it on the next bookmark, so a resumed watch starts there
    n2 = cluster.request("POST", "/api/v1/nodes", node("n2-watch", "192.0.2.2"))
    last = int(n2["metadata"]["resourceVersion"])
    wait_until(lambda: int(lv.source.resource_versions["Node"] or 0) >= last, timeout=20,
               what="a bookmark on the Node watch")
    assert lv.source.stats["bookmarks"] >= 1
    assert lv.source.stats["lists"] == 3 and lv.source.stats["relists_410"] == 0
    assert lv.agent.tracker.node is not None and lv.agent.tracker.node.addresses == (NODE_IP,)


@pytest.mark.parametrize("watch_cache", [False, True], ids=["etcd", "watch-cache"])
def test_compaction_410_relists_with_no_change_lost_or_repeated(
        tmp_path: Any, live: Callable[..., Live], watch_cache: bool) -> None:
    """The agent is cut off; meanwhile Services change and etcd is compacted. Without the
    watch cache, its watch from the old resourceVersion reaches etcd: 410. With it, the
    cache (re-filled after a restart) has nothing that old: 410 too. Either way the agent
    relists and applies each change exactly once."""
    with Cluster(watch_cache=watch_cache) as c:
        c.request("POST", "/api/v1/nodes", node(NODE, NODE_IP))
        api = Api(c, "t-compact")
        for i in (1, 2, 3):
            api.create_service(f"s{i}", f"10.96.2.{i}")
            api.create_slice(f"s{i}", [f"10.2.{i}.1"])
        lv = live(c, via_relay=True)
        wait_until(lambda: len(lv.dp.table("10.96.2.")) == 3, what="listed")
        assert c.relay is not None
        c.relay.cut()  # every connection closed, new ones refused
        mark = len(lv.dp.batches)
        api.delete_service("s1")
        api.delete_slice("s1-s")
        api.replace_slice("s2", ["10.2.2.1", "10.2.2.2"])
        api.create_service("s4", "10.96.2.4")
        api.create_slice("s4", ["10.2.4.1"])
        c.compact()
        if watch_cache:
            c.restart_apiserver()
        c.relay.restore()
        want = {key("10.96.2.2"): rs("10.2.2.1", "10.2.2.2"), key("10.96.2.3"): rs("10.2.3.1"),
                key("10.96.2.4"): rs("10.2.4.1")}
        wait_until(lambda: lv.dp.table("10.96.2.") == want, timeout=30, what="the changes after the relist")
        wait_until(lambda: lv.source.stats["relists_410"] >= 1, what="a 410 relist")
        lv.agent.request_full()
        wait_until(lambda: not lv.agent.core.full_requested, what="a full sync")
        ops = Counter((op.kind, op.key.address if op.key else op.address, op.real.address if op.real else "")
                      for op in lv.dp.ops(mark, "10.96.2."))
        # s1's real server goes with its virtual server, or just before it (the slice's delete seen first)
        assert ops.pop((OpKind.DEL_RS, "10.96.2.1", "10.2.1.1"), 0) <= 1
        assert ops == Counter({
            (OpKind.DEL_VS, "10.96.2.1", ""): 1,
            (OpKind.UNBIND, "10.96.2.1", ""): 1,
            (OpKind.ADD_RS, "10.96.2.2", "10.2.2.2"): 1,
            (OpKind.BIND, "10.96.2.4", ""): 1, (OpKind.ADD_VS, "10.96.2.4", ""): 1,
            (OpKind.ADD_RS, "10.96.2.4", "10.2.4.1"): 1,
        }), ops  # nothing for s3 (unchanged), nothing twice
        assert lv.dp.table("10.96.2.") == want
        lv.stop()


def test_apiserver_restart_mid_watch(cluster: Cluster, live: Callable[..., Live]) -> None:
    api = Api(cluster, "t-restart")
    api.create_service("a", "10.96.3.1")
    api.create_slice("a", ["10.3.1.1"])
    lv = live()
    wait_until(lambda: lv.dp.table("10.96.3.") == {key("10.96.3.1"): rs("10.3.1.1")}, what="listed")
    watches = lv.source.stats["watches"]
    cluster.restart_apiserver()
    api.replace_slice("a", ["10.3.1.2"])
    api.create_service("b", "10.96.3.2")
    api.create_slice("b", ["10.3.2.1"])
    wait_until(lambda: lv.dp.table("10.96.3.") == {key("10.96.3.1"): rs("10.3.1.2"), key("10.96.3.2"): rs("10.3.2.1")},
               timeout=30, what="changes after the restart")
    assert lv.source.stats["watches"] > watches


def test_expired_continue_token_still_gives_a_complete_list(
        live: Callable[..., Live], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every continued page finds etcd compacted past the list's snapshot (410 Expired):
    like client-go's pager, the source falls back to one full, unpaged list. (The watch
    cache answers resourceVersion=0 lists whole, so this server reads etcd: it pages.)"""
    with Cluster(watch_cache=False) as c:
        c.request("POST", "/api/v1/nodes", node(NODE, NODE_IP))
        api = Api(c, "t-continue")
        api.many([lambda i=i: api.create_service(f"s{i}", f"10.96.4.{i}") for i in range(1, 31)])
        monkeypatch.setattr(kube, "PAGE_SIZE", 10)
        real_get = KubeSource._get
        expired: list[str] = []

        def get(self: KubeSource, path: str, query: dict[str, Any], timeout: Any) -> Any:
            if path == "/api/v1/services" and query.get("continue"):
                api.create_service(f"bump{len(expired)}", f"10.96.4.{200 + len(expired)}")  # a newer revision
                c.compact()
                expired.append(path)
            return real_get(self, path, query, timeout)

        monkeypatch.setattr(KubeSource, "_get", get)
        lv = live(c)
        wait_until(lambda: len(lv.dp.table("10.96.4.")) >= 30, timeout=30, what="every Service listed")
        assert expired, "no continued page was requested"
        assert lv.source.stats["expired_continues"] >= 1
        assert {k.address for k in lv.dp.table("10.96.4.")} >= {f"10.96.4.{i}" for i in range(1, 31)}
        lv.stop()
