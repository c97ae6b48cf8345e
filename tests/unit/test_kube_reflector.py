"""Watches held to client-go's reflector (k8s.io/client-go/tools/cache/reflector.go),
against the in-process API server with faults injected: a watch that ends at once
is an error with backoff; a stream that hangs is noticed; watch lengths are spread;
the first list is served from the watch cache; an expired continue token gives a
complete list; one watch line has a size bound; stopping does not wait on an API
server that hangs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from ipvsproxy.sources import kube
from ipvsproxy.sources.kube import KubeSource
from tests.apiserver import FakeApiServer
from tests.unit.factories import service
from tests.unit.kubelab import FAST, Live, Pauses, drop, key, populate, programmed, rs, wait_until

SERVICES = "/api/v1/services"


def service_watches(api: FakeApiServer) -> list[dict[str, str]]:
    return [q for m, p, q in list(api.requests) if m == "GET" and p == SERVICES and q.get("watch") == "true"]


def service_lists(api: FakeApiServer) -> list[dict[str, str]]:
    return [q for m, p, q in list(api.requests) if m == "GET" and p == SERVICES and q.get("watch") != "true"]


def test_a_watch_that_ends_at_once_is_an_error_with_backoff(
        api: FakeApiServer, live: Callable[..., Live], caplog: pytest.LogCaptureFixture) -> None:
    populate(api)
    api.watch_fault("empty", SERVICES)
    pauses = Pauses(hold_after=4)  # the fifth pause is held until released
    caplog.set_level(logging.WARNING, "ipvsproxy.sources.kube")
    lv = live(timing=dataclasses.replace(FAST, pause=pauses))
    programmed(lv)
    waits = pauses.wait_for("watch-Service", 5)
    # a backoff before every watch after the first (before: none, ~1,000 watches a second), doubling
    assert len(service_watches(api)) <= len(waits) + 1
    for i, wait in enumerate(waits):
        step = min(0.4, 0.05 * 2 ** i)
        assert step / 2 <= wait <= step, waits  # equal jitter
    assert "very short watch" in caplog.text
    # the server recovers: the watch resumes and changes flow again
    api.watch_fault(None, SERVICES)
    pauses.release()
    api.create(service("d", cluster_ip="10.96.0.4"))
    wait_until(lambda: key("10.96.0.4") in lv.dp.table(), what="d after recovery")
    assert lv.source.stats["relists_410"] == 0


def test_a_hung_watch_stream_is_noticed_and_resumed(
        api: FakeApiServer, live: Callable[..., Live], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "WATCH_IDLE_TIMEOUT", 0.5)
    api.set_bookmark_interval(0)  # the real server may send nothing for minutes
    populate(api)
    lv = live()
    programmed(lv)
    api.watch_fault("hang", SERVICES)
    drop(api)
    before = len(service_watches(api))
    wait_until(lambda: len(service_watches(api)) >= before + 2, timeout=10,  # two 0.5-s idle timeouts and
               what="hung watches given up")  # their retry backoff; a loaded CI host takes longer
    api.watch_fault(None, SERVICES)
    api.drop_watches()  # the hung streams' server side ends
    api.create(service("d", cluster_ip="10.96.0.4"))
    wait_until(lambda: key("10.96.0.4") in lv.dp.table(), what="d once the server answers again")
    assert lv.source.stats["idle_timeouts"] >= 2 and lv.source.stats["lists"] == 3  # resumed, not relisted


def test_watch_lengths_are_spread_over_one_to_two_times_the_timeout(
        api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    lv = live()
    programmed(lv)
    for _ in range(4):
        drop(api)
    wait_until(lambda: api.open_watches() == 3, what="watches back")
    lengths = [int(q["timeoutSeconds"]) for m, p, q in list(api.requests) if q.get("watch") == "true"]
    assert len(lengths) >= 15
    assert all(100 <= n < 200 for n in lengths), lengths
    assert len(set(lengths)) >= 5, lengths  # before: every one 100 (every node in lockstep)


def test_first_list_from_the_watch_cache_relist_after_410_from_etcd(
        api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    lv = live()
    programmed(lv)
    (first,) = service_lists(api)
    assert first.get("resourceVersion") == "0"  # before: no resourceVersion, a quorum read of etcd
    api.create(service("d", cluster_ip="10.96.0.4"))
    wait_until(lambda: key("10.96.0.4") in lv.dp.table(), what="d")
    api.compact()
    api.watch_fault("hang", SERVICES)  # so the next watch comes only after the drop below
    drop(api)
    api.watch_fault(None, SERVICES)
    api.drop_watches()
    api.create(service("e", cluster_ip="10.96.0.5"))
    wait_until(lambda: key("10.96.0.5") in lv.dp.table(), what="e")
    lists = service_lists(api)
    assert len(lists) >= 1
    if len(lists) > 1:  # a 410 came: that relist reads etcd
        assert "resourceVersion" not in lists[-1]


def test_an_expired_continue_token_still_completes_the_list(
        api: FakeApiServer, live: Callable[..., Live], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "PAGE_SIZE", 2)
    populate(api, ["a", "b", "c", "d", "e"])
    real_get = KubeSource._get
    bumps: list[int] = []

    def get(self: KubeSource, path: str, query: dict[str, Any], timeout: Any) -> Any:
        if path == SERVICES and query.get("continue"):  # every continued page finds etcd compacted
            bumps.append(1)
            api.create(service(f"bump{len(bumps)}", cluster_ip=f"10.96.1.{len(bumps)}"))
            api.compact()
        return real_get(self, path, query, timeout)

    monkeypatch.setattr(KubeSource, "_get", get)
    lv = live()
    # before: paged from the start forever, never complete
    wait_until(lambda: all(lv.dp.reals(key(f"10.96.0.{i}")) == rs(f"10.0.{i}.1") for i in range(1, 6)),
               what="a to e programmed")
    assert lv.source.stats["expired_continues"] >= 1
    unpaged = [q for q in service_lists(api) if "limit" not in q]
    assert unpaged, "no full list after the expired continue token"


def test_a_watch_line_has_a_size_bound(
        api: FakeApiServer, live: Callable[..., Live], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kube, "MAX_LINE", 1 << 20)
    populate(api)
    lv = live()
    programmed(lv)
    caplog.set_level(logging.WARNING, "ipvsproxy.sources.kube")
    api.watch_fault("flood", SERVICES)
    drop(api)
    wait_until(lambda: "a line longer than 1048576 bytes" in caplog.text, timeout=5, what="the stream cut")
    api.watch_fault(None, SERVICES)
    api.drop_watches()
    api.create(service("d", cluster_ip="10.96.0.4"))
    wait_until(lambda: key("10.96.0.4") in lv.dp.table(), what="d after the flood")


def test_stop_does_not_wait_on_an_api_server_that_hangs(api: FakeApiServer, live: Callable[..., Live]) -> None:
    populate(api)
    lv = live()
    programmed(lv)
    api.delay(1000)  # every request from now on hangs (connect works, no answer)
    sent = len(api.requests)
    drop(api)
    wait_until(lambda: len(api.requests) >= sent + 3, what="the three watches waiting on the hung server")
    started = time.monotonic()
    lv.agent.stop()
    lv.thread.join(10)
    took = time.monotonic() - started
    assert not lv.thread.is_alive()
    assert took < 3.5, f"stopping took {took:.1f}s"  # before: 2 s per watch thread, one after another
    api.clear_faults()
