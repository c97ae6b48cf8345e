"""The reconciler on the in-memory dataplane: incremental work, retries, drift repair,
drains, and Events once per change."""

from __future__ import annotations

from typing import Any

import pytest

from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, F_OWNED, Delta, ObservedReal, ObservedVS, VSKey
from ipvsproxy.plan import OpKind
from ipvsproxy.reconcile import Reconciler, SyncError
from ipvsproxy.schedulers import Registry
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config
from tests.unit.factories import CountingAddresses, FakeClock

NODE = "n1"


def svc(name: str, ip: str, port: int = 80, proto: str = "TCP", **ann: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "annotations": ann},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": proto}]},
    }


def eps(name: str, ips: list[str], port: int = 8080, proto: str = "TCP") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name + "-s", "namespace": "ns", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def setup(n: int = 3, dp: MemoryDataplane | None = None, **kw: Any) -> tuple[Tracker, MemoryDataplane, Reconciler]:
    tracker = Tracker(NODE)
    dp = dp or MemoryDataplane()
    rec = Reconciler(tracker, dp, Config(NODE), Registry(), **kw)
    tracker.replace("Service", [svc(f"s{i}", f"198.19.0.{i + 1}") for i in range(n)])
    tracker.replace("EndpointSlice", [eps(f"s{i}", [f"198.18.1.{i + 1}", f"198.18.2.{i + 1}"]) for i in range(n)])
    tracker.replace("Node", [])
    return tracker, dp, rec


def key(i: int, port: int = 80, proto: int = 6) -> VSKey:
    return VSKey(AF_INET, proto, f"198.19.0.{i + 1}", port)


def test_first_sync_programs_everything_then_nothing() -> None:
    tracker, dp, rec = setup(5)
    r = rec.sync()
    assert r.full
    assert sum(1 for op in r.ops if op.kind is OpKind.ADD_VS) == 5
    assert sum(1 for op in r.ops if op.kind is OpKind.ADD_RS) == 10
    assert set(dp.state.addresses) == {f"198.19.0.{i}" for i in range(1, 6)}
    assert all(vs.owned for vs in dp.state.services.values())
    assert rec.sync().ops == []
    assert rec.sync(full=True).ops == []


def test_one_endpoint_change_is_one_op_and_touches_one_service() -> None:
    tracker, dp, rec = setup(200)
    rec.sync()
    dumps = dp.counters.dumps
    tracker.upsert("EndpointSlice", eps("s7", ["198.18.1.8", "198.18.2.8", "198.18.3.8"]))
    r = rec.sync()
    assert not r.full and r.services_translated == 1
    assert [(op.kind, op.real.address if op.real else None) for op in r.ops] == [(OpKind.ADD_RS, "198.18.3.8")]
    assert dp.counters.dumps == dumps  # no full dump for an incremental sync
    assert ("198.18.3.8", 8080) in dp.state.services[key(7)].reals


def test_removed_tcp_endpoint_drains_while_connections_remain() -> None:
    tracker, dp, rec = setup(1, grace=60)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 3  # live connections
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    r = rec.sync()
    assert [(op.kind, op.note) for op in r.ops] == [(OpKind.EDIT_RS, "drain")]
    assert dp.state.services[key(0)].reals[("198.18.2.1", 8080)].weight == 0
    assert rec.draining == 1
    assert rec.sync().ops == []  # still connections: keep draining
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 0
    r = rec.sync()
    assert [(op.kind, op.note) for op in r.ops] == [(OpKind.DEL_RS, "drained")]
    assert rec.draining == 0


def test_deleting_a_service_forgets_its_draining_reals() -> None:
    tracker, dp, rec = setup(2, grace=60)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 3
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    rec.sync()
    assert rec.draining == 1
    tracker.replace("Service", [svc("s1", "198.19.0.2")])  # s0 goes while its real server drains
    r = rec.sync()
    assert OpKind.DEL_VS in {op.kind for op in r.ops}
    assert key(0) not in dp.state.services
    assert rec.draining == 0  # no drain left behind to re-check (or count in metrics) forever
    assert rec.drain_started == {}


def test_drain_grace_period_expires() -> None:
    clock = FakeClock()
    tracker, dp, rec = setup(1, grace=30, clock=clock)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 3
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    rec.sync()
    clock.advance(29.9)
    assert rec.sync().ops == []  # still draining: connections left, grace not over
    clock.advance(0.1)
    assert [op.kind for op in rec.sync().ops] == [OpKind.DEL_RS]


def test_endpoint_coming_back_is_restored() -> None:
    tracker, dp, rec = setup(1)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 1
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    rec.sync()
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.2.1"]))
    r = rec.sync()
    assert [(op.kind, op.note, op.real.weight if op.real else None) for op in r.ops] == [
        (OpKind.EDIT_RS, "restore", 1)]
    assert rec.draining == 0


def test_restart_adopts_without_flush_and_keeps_drains() -> None:
    tracker, dp, rec = setup(3)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 2
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    rec.sync()
    # a new agent process: same kernel, fresh memory
    tracker2 = Tracker(NODE)
    rec2 = Reconciler(tracker2, dp, Config(NODE), Registry())
    tracker2.replace("Service", [svc(f"s{i}", f"198.19.0.{i + 1}") for i in range(3)])
    tracker2.replace("EndpointSlice", [eps("s0", ["198.18.1.1"])] +
                     [eps(f"s{i}", [f"198.18.1.{i + 1}", f"198.18.2.{i + 1}"]) for i in range(1, 3)])
    r = rec2.sync()
    assert r.ops == []  # no flush, drained weight stays 0
    assert dp.state.services[key(0)].reals[("198.18.2.1", 8080)].weight == 0
    assert rec2.draining == 1


def test_udp_endpoint_removed_at_once() -> None:
    tracker = Tracker(NODE)
    dp = MemoryDataplane()
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    tracker.replace("Service", [svc("dns", "198.19.0.53", 53, "UDP")])
    tracker.replace("EndpointSlice", [eps("dns", ["198.18.1.1", "198.18.1.2"], 5353, "UDP")])
    rec.sync()
    dp.state.services[VSKey(AF_INET, 17, "198.19.0.53", 53)].reals[("198.18.1.2", 5353)].active = 5
    tracker.upsert("EndpointSlice", eps("dns", ["198.18.1.1"], 5353, "UDP"))
    assert [(op.kind, op.note) for op in rec.sync().ops] == [(OpKind.DEL_RS, "flush")]


def test_full_resync_repairs_drift_and_spares_foreign() -> None:
    tracker, dp, rec = setup(3)
    rec.sync()
    foreign = VSKey(AF_INET, 6, "198.18.99.1", 80)
    dp.state.services[foreign] = ObservedVS(foreign, "wlc", 0, 0, {("198.18.99.2", 80): ObservedReal(
        "198.18.99.2", 80, 1)})
    del dp.state.services[key(1)]  # someone deleted ours by hand
    dp.state.addresses.discard("198.19.0.3")
    dp.state.services[key(2)].reals[("198.18.1.3", 8080)].weight = 7
    assert rec.sync().ops == []  # incremental sync: nothing changed in the cluster
    r = rec.sync(full=True)
    kinds = sorted(op.kind.value for op in r.ops)
    assert kinds == ["add-rs", "add-rs", "add-vs", "bind", "edit-rs"]
    assert foreign in dp.state.services and dp.state.services[foreign].scheduler == "wlc"
    assert rec.sync(full=True).ops == []


def test_foreign_on_claimed_address_is_adopted() -> None:
    tracker, dp, rec = setup(1)
    dp.state.services[key(0)] = ObservedVS(key(0), "wlc", 0, 0, {})
    r = rec.sync()
    assert any(op.kind is OpKind.EDIT_VS and op.note == "adopt foreign" for op in r.ops)
    assert dp.state.services[key(0)].flags & F_OWNED


def test_service_deleted_removes_vs_and_address() -> None:
    tracker, dp, rec = setup(2)
    rec.sync()
    tracker.delete("Service", "ns", "s1")
    r = rec.sync()
    assert sorted(op.kind.value for op in r.ops) == ["del-vs", "unbind"]
    assert key(1) not in dp.state.services and "198.19.0.2" not in dp.state.addresses


def test_failed_ops_are_retried_and_nothing_is_lost() -> None:
    tracker, dp, rec = setup(2)
    rec.sync()
    broken = {"on": True}
    dp.fail = lambda op: "No such file or directory" if broken["on"] and op.kind is OpKind.ADD_RS else None
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.2.1", "198.18.3.1"]))
    r = rec.sync()  # refused operations are accounted to their Service, not raised (issue 14 item 5)
    assert list(r.service_failures) == ["ns/s0"] and rec.failing == 1
    assert ("198.18.3.1", 8080) not in dp.state.services[key(0)].reals
    broken["on"] = False
    rec.retries.failing["ns/s0"].due = 0.0  # its backoff has passed (the schedule: test_service_failures.py)
    r = rec.sync()
    assert [op.kind for op in r.ops] == [OpKind.ADD_RS]
    assert ("198.18.3.1", 8080) in dp.state.services[key(0)].reals


def test_invalid_scheduler_reported_once_per_change() -> None:
    seen: list[tuple[str, str]] = []
    tracker = Tracker(NODE)
    dp = MemoryDataplane()
    rec = Reconciler(tracker, dp, Config(NODE), Registry(), on_problem=lambda s, r, m: seen.append((s.id, r)))
    tracker.replace("Service", [svc("a", "198.19.0.1", **{"ipvsproxy.io/scheduler": "bogus"})])
    tracker.replace("EndpointSlice", [])
    rec.sync()
    tracker.upsert("EndpointSlice", eps("a", ["198.18.1.1"]))  # Service re-translated, same problem
    rec.sync()
    rec.sync(full=True)
    assert seen == [("ns/a", "InvalidScheduler")]
    assert dp.state.services[key(0)].scheduler == "rr"  # served with the default
    tracker.upsert("Service", svc("a", "198.19.0.1", **{"ipvsproxy.io/scheduler": "sh",
                                                         "ipvsproxy.io/scheduler-flags": "mh-port"}))
    rec.sync()
    assert len(seen) == 2


def test_unloadable_scheduler_falls_back() -> None:
    tracker = Tracker(NODE)
    dp = MemoryDataplane(schedulers={"rr", "lc"})
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    tracker.replace("Service", [svc("a", "198.19.0.1", **{"ipvsproxy.io/scheduler": "mh"}),
                                svc("b", "198.19.0.2", **{"ipvsproxy.io/scheduler": "lc"})])
    rec.sync()
    assert dp.state.services[key(0)].scheduler == "rr"
    assert dp.state.services[key(1)].scheduler == "lc"


def test_conflicting_services_handover() -> None:
    tracker = Tracker(NODE)
    dp = MemoryDataplane()
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    tracker.replace("Service", [svc("a", "198.19.0.1"), svc("b", "198.19.0.1", **{"ipvsproxy.io/scheduler": "lc"})])
    rec.sync()
    assert dp.state.services[key(0)].scheduler == "rr"
    tracker.delete("Service", "ns", "a")
    rec.sync()
    assert dp.state.services[key(0)].scheduler == "lc"  # b takes over once a lets go
    assert "198.19.0.1" in dp.state.addresses


def test_excluded_cidrs_are_never_touched() -> None:
    tracker = Tracker(NODE)
    dp = MemoryDataplane()
    rec = Reconciler(tracker, dp, Config(NODE), Registry(), excluded=lambda a: a.startswith("198.19.0.2"))
    tracker.replace("Service", [svc("a", "198.19.0.1"), svc("b", "198.19.0.2")])
    rec.sync()
    assert key(0) in dp.state.services and key(1) not in dp.state.services


def test_incremental_sync_leaves_unrelated_addresses_full_sync_repairs_them() -> None:
    tracker, dp, rec = setup(250)
    rec.sync()
    dp.state.addresses.discard("198.19.0.3")  # s2's address unbound behind our back
    rec.cache.addresses.discard("198.19.0.3")  # ... even if we had seen it go
    rec.index.state.addresses = CountingAddresses(rec.index.state.addresses)
    rec.cache.addresses = CountingAddresses(rec.cache.addresses)
    tracker.upsert("EndpointSlice", eps("s7", ["198.18.1.8", "198.18.2.8", "198.18.3.8"]))
    r = rec.sync()
    assert [op.kind for op in r.ops] == [OpKind.ADD_RS]  # s2's address is not this sync's business
    looked = rec.index.state.addresses.lookups + rec.cache.addresses.lookups
    assert looked <= 4  # s7's address only, not all 250
    rec.index.state.addresses = set(rec.index.state.addresses.copy())
    rec.cache.addresses = set(rec.cache.addresses.copy())
    r = rec.sync(full=True)
    assert [(op.kind, op.address) for op in r.ops] == [(OpKind.BIND, "198.19.0.3")]
    assert "198.19.0.3" in dp.state.addresses


def test_no_mirror_of_the_kernel_table_is_kept_between_syncs() -> None:
    tracker, dp, rec = setup(5)
    rec.sync()
    assert rec.cache.services == {}  # an incremental sync reads (or remembers) just its scope
    assert rec.cache.addresses == dp.state.addresses  # binds are mirrored: the address diff needs them
    dp.state.services[key(3)].reals[("198.18.1.4", 8080)].weight = 5  # drift outside the next scope
    tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2"]))
    tracker.delete("Service", "ns", "s4")
    r = rec.sync()
    assert sorted((op.kind.value, op.address or str(op.key)) for op in r.ops) == [
        ("del-rs", str(key(1))), ("del-vs", str(key(4))), ("unbind", "198.19.0.5")]
    assert rec.cache.services == {} and "198.19.0.5" not in rec.cache.addresses
    assert [op.kind for op in rec.sync(full=True).ops] == [OpKind.EDIT_RS]  # the full resync repairs


def test_firewall_gets_the_change_delta_the_planner_got() -> None:
    """One change delta per sync: its keys are the planner's scope, its (old, new)
    pairs go to the firewall as they are (no re-diff of the desired state)."""
    calls: list[tuple[Delta, bool]] = []

    class Firewall:
        behind = False

        def sync(self, delta: Delta, full: bool = False) -> int:
            calls.append((dict(delta), full))
            return 0

    tracker, dp, rec = setup(50, firewall=Firewall())
    rec.sync()
    assert len(calls[0][0]) == 50 and calls[0][1] is True
    assert all(c.old is None and c.new is rec.index.state.services[k] for k, c in calls[0][0].items())
    before = rec.index.state.services[key(7)]
    tracker.upsert("EndpointSlice", eps("s7", ["198.18.1.8"]))
    r = rec.sync()
    assert {op.key for op in r.ops} == {key(7)}
    (delta, full), = calls[1:]
    assert not full and list(delta) == [key(7)]
    assert delta[key(7)].old is before and delta[key(7)].new is rec.index.state.services[key(7)]
    rec.sync()  # nothing changed: the firewall is not called
    rec.sync(full=True)  # the full sync: an empty delta, and the firewall checks the kernel
    assert calls[2:] == [({}, True)]


def test_a_firewall_failure_is_retried_by_the_firewall_not_by_a_full_sync() -> None:
    calls: list[tuple[int, bool]] = []

    class Firewall:
        behind = False
        fail = False

        def sync(self, delta: Delta, full: bool = False) -> int:
            calls.append((len(delta), full))
            if self.fail:
                self.fail, self.behind = False, True
                raise RuntimeError("nft did not answer within 60s")
            self.behind = False
            return len(delta)

    fw = Firewall()
    tracker, dp, rec = setup(5, firewall=fw)
    rec.sync()
    fw.fail = True
    tracker.upsert("EndpointSlice", eps("s3", ["198.18.1.9"]))
    with pytest.raises(SyncError, match="nftables: nft did not answer"):
        rec.sync()
    assert not rec.need_full  # IPVS is in step: no full dump for a firewall failure
    r = rec.sync()  # nothing new, but the firewall is behind: it is called to catch up
    assert not r.full and r.ops == []
    assert calls[1:] == [(1, False), (0, False)]
    rec.sync()
    assert len(calls) == 3  # in step again: not called when nothing changed


class ReadCounting(MemoryDataplane):
    """The in-memory kernel, counting the virtual servers a sync reads key by key."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[VSKey] = []

    def observe_keys(self, keys: Any) -> dict[VSKey, ObservedVS | None]:
        keys = list(keys)
        self.read += keys
        return super().observe_keys(keys)


def test_an_added_endpoint_is_planned_from_what_was_programmed_without_a_kernel_read() -> None:
    dp = ReadCounting()
    tracker, _, rec = setup(3, dp=dp)
    rec.sync()
    tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2", "198.18.2.2", "198.18.3.2"]))
    r = rec.sync()
    assert [(op.kind, op.real.address if op.real else None) for op in r.ops] == [(OpKind.ADD_RS, "198.18.3.2")]
    assert dp.read == []
    tracker.upsert("Service", svc("s7", "198.19.0.8"))  # a new key: a foreign server may sit there
    rec.sync()
    assert dp.read == [key(7)]


def test_a_removed_tcp_endpoint_is_read_its_connections_decide() -> None:
    dp = ReadCounting()
    tracker, _, rec = setup(2, dp=dp, grace=60)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 2
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2"]))
    r = rec.sync()
    assert sorted(dp.read) == [key(0), key(1)]
    assert sorted((op.kind, op.key, op.note) for op in r.ops if op.key is not None) == [
        (OpKind.DEL_RS, key(1), ""), (OpKind.EDIT_RS, key(0), "drain")]
    dp.read.clear()
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.4.1"]))  # draining: read again
    rec.sync()
    assert dp.read == [key(0)]


def test_a_removed_udp_endpoint_needs_no_read() -> None:
    dp = ReadCounting()
    tracker = Tracker(NODE)
    rec = Reconciler(tracker, dp, Config(NODE), Registry())
    tracker.replace("Service", [svc("u", "198.19.0.1", 53, "UDP")])
    tracker.replace("EndpointSlice", [eps("u", ["198.18.1.1", "198.18.2.1"], 53, "UDP")])
    rec.sync()
    tracker.upsert("EndpointSlice", eps("u", ["198.18.1.1"], 53, "UDP"))
    r = rec.sync()
    assert [(op.kind, op.note) for op in r.ops] == [(OpKind.DEL_RS, "flush")] and dp.read == []
    assert list(dp.state.services[key(0, 53, 17)].reals) == [("198.18.1.1", 53)]


def test_a_virtual_server_changed_behind_the_agents_back_is_read_and_repaired_in_the_same_sync() -> None:
    dp = ReadCounting()
    tracker, _, rec = setup(3, dp=dp)
    rec.sync()
    del dp.state.services[key(1)]  # deleted behind our back (ipvsadm -D)
    dp.state.services[key(2)].reals.pop(("198.18.1.3", 8080))  # a real server too
    tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2", "198.18.2.2", "198.18.3.2"]))
    tracker.upsert("EndpointSlice", eps("s2", ["198.18.2.3"]))  # drops the real server already gone
    r = rec.sync()
    assert r.failures == [] and r.service_failures == {} and rec.failing == 0
    assert sorted(dp.read) == [key(1), key(2)]  # s1 read once refused; s2 read as it loses a real
    assert sorted(dp.state.services[key(1)].reals) == [(f"198.18.{i}.2", 8080) for i in (1, 2, 3)]
    assert list(dp.state.services[key(2)].reals) == [("198.18.2.3", 8080)]
    assert (OpKind.ADD_VS, key(1)) in [(op.kind, op.key) for op in r.ops]
    assert rec.sync(full=True).ops == []


def test_a_refused_key_is_read_until_it_goes_through() -> None:
    refuse = {"on": True}
    dp = ReadCounting()
    dp.fail = lambda op: ("injected" if refuse["on"] and op.real is not None and op.real.address == "198.18.3.1"
                          else None)
    clock = FakeClock()
    tracker, _, rec = setup(2, dp=dp, clock=clock)
    rec.sync()
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.2.1", "198.18.3.1"]))
    r = rec.sync()
    assert r.service_failures and dp.read == [key(0)]  # planned from memory, refused, read: still refused
    dp.read.clear()
    refuse["on"] = False
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.2.1", "198.18.3.1", "198.18.4.1"]))
    r = rec.sync()
    assert dp.read == [key(0)] and r.recovered == ["ns/s0"] and rec.failing == 0
    dp.read.clear()
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.2.1", "198.18.3.1", "198.18.4.1", "198.18.5.1"]))
    rec.sync()
    assert dp.read == []  # programmed whole again: remembered


def test_a_dry_run_reads_what_it_plans() -> None:
    dp = ReadCounting()
    tracker, _, rec = setup(2, dp=dp)
    rec.sync()
    rec.dry_run = True
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1", "198.18.2.1", "198.18.3.1"]))
    rec.sync()
    assert dp.read == [key(0)]


def test_draining_virtual_servers_are_read_every_drain_check_not_every_sync() -> None:
    dp = ReadCounting()
    clock = FakeClock()
    tracker, _, rec = setup(3, dp=dp, grace=60, clock=clock, drain_check=5.0)
    rec.sync()
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 3
    tracker.upsert("EndpointSlice", eps("s0", ["198.18.1.1"]))
    assert [op.note for op in rec.sync().ops] == ["drain"] and rec.draining == 1
    dp.state.services[key(0)].reals[("198.18.2.1", 8080)].active = 0  # its last connection closed
    dp.read.clear()
    clock.advance(1)
    tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2", "198.18.2.2", "198.18.3.2"]))  # another Service
    assert [op.kind for op in rec.sync().ops] == [OpKind.ADD_RS]
    assert dp.read == [] and rec.draining == 1  # the draining one is not read at this sync...
    clock.advance(4)
    r = rec.sync()  # ... but at the drain check (core.py schedules one while any drain)
    assert dp.read == [key(0)] and [(op.kind, op.note) for op in r.ops] == [(OpKind.DEL_RS, "drained")]
    assert rec.draining == 0
