"""One Service the kernel refuses must not wedge the node (issue 14 item 5).

The memory dataplane's `fail` hook plays the kernel refusing one Service's
operations; a fake clock drives the per-Service backoff. What is checked:
the sync still succeeds, later syncs stay incremental (no full dump), the
refused Service is left alone until its retry is due (or it changes), one
Warning Event per change of the problem, a metric, and /healthz stays 200.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, VSKey
from ipvsproxy.plan import Op
from ipvsproxy.reconcile import Reconciler
from ipvsproxy.retry import Backoff, RetrySchedule
from ipvsproxy.schedulers import Registry
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config

NODE = "n1"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def svc(name: str, ip: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": "TCP"}]},
    }


def eps(name: str, ips: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name + "-s", "namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def key(i: int) -> VSKey:
    return VSKey(AF_INET, 6, f"198.19.0.{i + 1}", 80)


BAD = key(3)


def refuse_bad(op: Op) -> str | None:
    return "Address family not supported by protocol" if op.key == BAD or op.address == BAD.address else None


def setup(n: int = 6) -> tuple[Tracker, MemoryDataplane, Reconciler, Clock, list[tuple[str, str, str]]]:
    tracker = Tracker(NODE)
    dp = MemoryDataplane(fail=refuse_bad)
    clock = Clock()
    events: list[tuple[str, str, str]] = []
    rec = Reconciler(tracker, dp, Config(NODE), Registry(), backoff=Backoff(base=1.0, cap=8.0), clock=clock,
                     on_problem=lambda s, r, m: events.append((s.id, r, m)))
    tracker.replace("Service", [svc(f"s{i}", f"198.19.0.{i + 1}") for i in range(n)])
    tracker.replace("EndpointSlice", [eps(f"s{i}", [f"198.18.1.{i + 1}"]) for i in range(n)])
    tracker.replace("Node", [])
    return tracker, dp, rec, clock, events


def touched(ops: list[Op]) -> set[Any]:
    return {op.key or op.address for op in ops}


def test_backoff_doubles_and_caps() -> None:
    b = Backoff(base=0.5, cap=10.0)
    assert [b.delay(n) for n in range(0, 8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert Backoff(base=1.0, cap=60.0).delay(10_000) == 60.0  # no overflow for a long-lived failure


def test_schedule_holds_until_due_or_changed() -> None:
    s = RetrySchedule(Backoff(base=2.0, cap=100.0))
    s.failed("ns/a", "refused", [BAD], [], now=10.0)
    assert s.next_due() == 12.0
    assert s.held(11.9, changed=()) == ({BAD}, set())
    assert s.released(11.9, changed=()) == []
    assert [f.unit for f in s.released(11.9, changed={"ns/a"})] == ["ns/a"]  # a changed Service goes at once
    assert s.held(11.9, changed={"ns/a"}) == (set(), set())
    assert [f.unit for f in s.released(12.0, changed=())] == ["ns/a"]
    again = s.failed("ns/a", "refused", [BAD], ["198.19.0.4"], now=12.0)
    assert again.attempts == 2 and again.due == 16.0
    assert s.held(13.0, changed=()) == ({BAD}, {"198.19.0.4"})
    assert s.succeeded("ns/a") is not None and len(s) == 0 and s.next_due() is None


def test_one_refused_service_does_not_fail_the_sync_nor_make_the_next_ones_full() -> None:
    tracker, dp, rec, clock, events = setup()
    r = rec.sync()  # raised SyncError before: one refusal failed the whole sync
    assert r.full
    assert set(r.service_failures) == {"ns/s3"}
    assert {k for k in dp.state.services} == {key(i) for i in range(6)} - {BAD}
    dumps = dp.counters.dumps
    for n in range(12):  # the issue saw 12 full dumps in 12 s, one per sync
        clock.t += 0.05  # all before the first retry is due (1 s)
        tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2", f"198.18.9.{n + 1}"]))
        r = rec.sync()
        assert not r.full and r.services_translated == 1
        assert BAD not in touched(r.ops) and BAD.address not in touched(r.ops)  # not retried before due
        assert not r.service_failures
    assert dp.counters.dumps == dumps  # every one of them incremental
    assert ("198.18.9.12", 8080) in dp.state.services[key(1)].reals
    assert [(sid, reason) for sid, reason, _ in events] == [("ns/s3", "ProgrammingFailed")]
    assert "Address family not supported" in events[0][2]


def test_refused_service_is_retried_with_backoff_on_the_clock() -> None:
    tracker, dp, rec, clock, events = setup()
    t0 = clock.t
    rec.sync()  # attempt 1 fails: next at t0+1
    attempts_at = []
    for step in range(1, 40):  # 0.5 s steps over ~20 s, no other change
        clock.t = t0 + step * 0.5
        assert rec.next_retry() is not None
        r = rec.sync()
        if BAD in touched(r.ops):
            assert r.service_failures == {"ns/s3": r.service_failures["ns/s3"]}
            attempts_at.append(clock.t - t0)
    assert attempts_at == [1.0, 3.0, 7.0, 15.0]  # 1, 2, 4, 8 s apart (capped at 8)
    assert rec.retries.failing["ns/s3"].attempts == 5
    # a full resync does not retry it early either, and repairs the rest
    clock.t = t0 + 20.0
    del dp.state.services[key(0)]
    r = rec.sync(full=True)
    assert BAD not in touched(r.ops) and key(0) in touched(r.ops)
    # the kernel takes it again: the next retry goes through and the Service is forgotten
    dp.fail = None
    clock.t = t0 + 23.0
    r = rec.sync()
    assert r.recovered == ["ns/s3"] and BAD in dp.state.services and BAD.address in dp.state.addresses
    assert rec.failing == 0 and rec.next_retry() is None
    assert len(events) == 1  # same problem each time: one Event


def test_changed_service_is_retried_at_once() -> None:
    tracker, dp, rec, clock, events = setup()
    rec.sync()
    clock.t += 0.1  # long before the retry is due
    tracker.upsert("Service", svc("s3", "198.19.0.99"))  # moved to an address the kernel takes
    r = rec.sync()
    assert not r.full and not r.service_failures and r.recovered == ["ns/s3"]
    assert VSKey(AF_INET, 6, "198.19.0.99", 80) in dp.state.services


def test_node_stays_healthy_and_the_failure_is_counted(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    docs = [svc(f"s{i}", f"198.19.0.{i + 1}") for i in range(5)] + [eps(f"s{i}", ["198.18.1.1"]) for i in range(5)]
    manifest.write_text(yaml.safe_dump_all(docs))
    cfg = AgentConfig(node_name=NODE, from_files=(str(manifest),), sync_period=30, state_dir=str(tmp_path / "st"))
    dp = MemoryDataplane(fail=refuse_bad)
    posted: list[tuple[str, str]] = []
    agent = Agent(cfg, dp, events=lambda s, r, m: posted.append((s.id, r)), record_state=False)
    agent.load_files()
    agent.tracker.replace("Node", [])
    agent.health.started -= 10 * agent.health.max_age  # long past the start-up grace
    runner = agent.core
    runner.sync_now(True)
    agent.reconciler.retries.failing["ns/s3"].due = 0.0  # due now (the schedule itself is tested above)
    runner.sync_now(False)
    assert runner.failures == 0  # no node-wide backoff
    ok, reason = agent.health.status()
    assert ok, reason  # was 503: no successful sync while one Service failed
    text = agent.metrics.text().decode()
    assert "ipvsproxy_service_programming_errors_total 2.0" in text
    assert "ipvsproxy_services_failing 1.0" in text
    assert "ipvsproxy_invalid_scheduler_total 0.0" in text  # not counted as a scheduler problem
    assert posted == [("ns/s3", "ProgrammingFailed")]
    assert len(dp.state.services) == 4


def test_an_address_no_service_claims_is_retried_by_full_syncs_only() -> None:
    tracker, dp, rec, clock, events = setup(2)
    dp.fail = lambda op: "Cannot assign requested address" if op.address == "198.19.9.9" else None
    dp.state.addresses.add("198.19.9.9")  # stale: bound by an earlier run, wanted by nobody
    r = rec.sync()
    assert r.service_failures == {"198.19.9.9": "unbind 198.19.9.9: Cannot assign requested address"}
    assert events == []  # no Service to post an Event on
    clock.t += 5.0  # due: but no incremental sync re-plans an address without virtual servers
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.7.7"]))
    r = rec.sync()
    assert not r.full and r.recovered == [] and rec.failing == 1
    dp.fail = None
    r = rec.sync(full=True)
    assert r.recovered == ["198.19.9.9"] and "198.19.9.9" not in dp.state.addresses and rec.failing == 0
