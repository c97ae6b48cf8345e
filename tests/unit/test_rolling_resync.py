"""--resync rolling: the drift check as a round of small steps instead of one full sync.

The reconciler compares a few virtual servers per incremental sync against a fresh read of just
those; the round's last step compares the bound addresses and the firewall too. The node core
starts a round every --sync-period and paces its steps by their cost, so a change never waits
behind a whole-table dump."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ipvsproxy.config import AgentConfig
from ipvsproxy.core import SWEEP_MIN, NodeCore
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, F_OWNED, Delta, ObservedReal, ObservedState, ObservedVS, VSKey
from ipvsproxy.plan import OpKind
from ipvsproxy.reconcile import Reconciler
from ipvsproxy.schedulers import Registry
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config
from tests.unit.factories import FakeClock
from tests.unit.test_reconcile import NODE, eps, key, setup, svc


class CountingDataplane(MemoryDataplane):
    """The in-memory dataplane, counting whole-table dumps and per-key reads."""

    def __init__(self) -> None:
        super().__init__()
        self.full_dumps = 0
        self.keys_read = 0

    def observe(self) -> ObservedState:
        self.full_dumps += 1
        return super().observe()

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        keys = list(keys)
        self.keys_read += len(keys)
        return super().observe_keys(keys)


class RecordingFirewall:
    """The reconciler's Firewall protocol: records whether each sync asked for a full check."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def sync(self, delta: Delta, full: bool = False) -> int:
        self.calls.append(full)
        return 0

    @property
    def behind(self) -> bool:
        return False


def programmed(n: int, **kw: Any) -> tuple[Tracker, CountingDataplane, Reconciler]:
    dp = CountingDataplane()
    tracker, _, rec = setup(n, dp, **kw)
    assert rec.sync().full  # the start-up sync is full in either mode
    return tracker, dp, rec


def test_a_round_repairs_drift_a_few_keys_at_a_time_without_a_dump() -> None:
    tracker, dp, rec = programmed(20)
    dumps = dp.full_dumps
    # drift behind the agent's back: a real server gone, a stray owned virtual server, an address lost
    del dp.state.services[key(3)].reals[("198.18.1.4", 8080)]
    stray = VSKey(AF_INET, 6, "198.19.9.9", 80)
    dp.state.services[stray] = ObservedVS(stray, "rr", F_OWNED, 0,
                                          {("198.18.9.9", 80): ObservedReal("198.18.9.9", 80, 1)})
    dp.state.addresses.discard("198.19.0.8")
    repaired: list[tuple[OpKind, Any]] = []
    steps = 0
    while True:
        report = rec.sync(sweep=6)
        steps += 1
        assert not report.full and 0 < report.swept <= 6
        repaired += [(op.kind, op.real.address if op.real else op.key if op.key else op.address) for op in report.ops]
        if not rec.sweep:
            break
    assert steps == 4  # 21 keys (20 desired and the stray), 6 a step
    assert sorted(repaired, key=str) == sorted([(OpKind.ADD_RS, "198.18.1.4"), (OpKind.DEL_VS, stray),
                                                (OpKind.BIND, "198.19.0.8")], key=str)
    assert dp.full_dumps == dumps  # never the whole table
    assert stray not in dp.state.services and "198.19.0.8" in dp.state.addresses
    assert ("198.18.1.4", 8080) in dp.state.services[key(3)].reals
    assert rec.sweeps == 1


def test_the_address_check_and_the_firewall_check_wait_for_the_rounds_last_step() -> None:
    fw = RecordingFirewall()
    tracker, dp, rec = programmed(10, firewall=fw)
    fw.calls.clear()
    dp.state.addresses.discard("198.19.0.2")
    first = rec.sync(sweep=4)
    assert first.ops == [] and fw.calls == []  # nothing changed, the firewall not asked
    rec.sync(sweep=4)
    last = rec.sync(sweep=4)
    assert not rec.sweep and [(op.kind, op.address) for op in last.ops] == [(OpKind.BIND, "198.19.0.2")]
    assert fw.calls == [True]  # the round's end reads the firewall's table, as a full sync does


def test_a_change_during_a_round_goes_in_the_next_step_and_the_round_goes_on() -> None:
    tracker, dp, rec = programmed(30)
    rec.sync(sweep=5)
    left = len(rec.sweep)
    tracker.upsert("EndpointSlice", eps("s7", ["198.18.1.8", "198.18.2.8", "198.18.3.8"]))
    report = rec.sync(sweep=5)
    assert [(op.kind, op.real.address if op.real else None) for op in report.ops] == [(OpKind.ADD_RS, "198.18.3.8")]
    assert report.latencies and len(rec.sweep) == left - 5


def test_a_full_sync_ends_a_round_under_way() -> None:
    tracker, dp, rec = programmed(10)
    rec.sync(sweep=3)
    assert rec.sweep
    assert rec.sync(full=True).full
    assert rec.sweep == [] and rec.sweeps == 0


def core(n: int, clock: FakeClock, **kw: Any) -> tuple[NodeCore, CountingDataplane]:
    tracker = Tracker(NODE, clock=clock)
    dp = CountingDataplane()
    rec = Reconciler(tracker, dp, Config(NODE), Registry(), clock=clock)
    tracker.replace("Service", [svc(f"s{i}", f"198.19.{i // 250}.{i % 250 + 1}") for i in range(n)])
    tracker.replace("EndpointSlice", [])
    tracker.replace("Node", [])
    return NodeCore(tracker, rec, sync_period=30.0, min_period=1.0, clock=clock, **kw), dp


def test_the_node_core_starts_a_round_every_sync_period_and_paces_its_steps() -> None:
    clock = FakeClock()
    nc, dp = core(500, clock, rolling=True)
    nc.tick()  # start-up: full
    assert dp.full_dumps == 1 and nc.next_due() == nc.last_full + 30.0
    clock.advance(30.0)
    due = nc.tick()  # the period passed: a round begins, no dump
    # the first step: SWEEP_MIN keys, the cost per key not known yet
    assert dp.full_dumps == 1 and len(nc.reconciler.sweep) == 500 - SWEEP_MIN
    assert due == clock() + 1.0  # the next step one min_period on, not at the next period
    clock.advance(1.0)
    nc.tick()  # the fake clock says that step took no time: the rest of the round at once
    assert not nc.reconciler.sweep and nc.reconciler.sweeps == 1 and dp.full_dumps == 1
    assert dp.keys_read >= 500 > SWEEP_MIN
    assert nc.next_due() == nc.last_full + 30.0  # idle until the next round
    clock.advance(30.0)
    nc.tick()
    assert nc.reconciler.sweeps == 2 and dp.full_dumps == 1  # the next round, in one step at that cost


def test_in_full_mode_the_node_core_does_a_full_sync_every_period() -> None:
    clock = FakeClock()
    nc, dp = core(10, clock)
    nc.tick()
    clock.advance(30.0)
    nc.tick()
    assert dp.full_dumps == 2 and not nc.reconciler.sweep


def test_a_slow_step_makes_the_next_one_smaller() -> None:
    clock = FakeClock()
    nc, dp = core(600, clock, rolling=True)
    nc.tick()
    real_sync = nc.reconciler.sync

    def slow_sync(full: bool = False, sweep: int = 0) -> Any:
        report = real_sync(full, sweep)
        report.duration = 0.01 * report.swept  # 10 ms a key, as under emulation
        return report

    nc.reconciler.sync = slow_sync  # type: ignore[method-assign]
    clock.advance(30.0)
    nc.tick()
    first = 600 - len(nc.reconciler.sweep)
    clock.advance(1.0)
    nc.tick()
    second = 600 - len(nc.reconciler.sweep) - first
    assert first == SWEEP_MIN  # the first step: the cost per key is not known yet
    assert second == 20  # then 0.2 s at 10 ms a key


def test_resync_is_checked() -> None:
    assert AgentConfig(node_name="n", resync="rolling").problems() == []
    assert any("--resync" in p for p in AgentConfig(node_name="n", resync="sometimes").problems())
    assert NodeCore.build(AgentConfig(node_name="n"), MemoryDataplane()).rolling  # the default
    assert not NodeCore.build(AgentConfig(node_name="n", resync="full"), MemoryDataplane()).rolling


def test_the_sync_that_ends_a_round_refreezes_as_a_full_sync_does(monkeypatch: Any) -> None:
    from ipvsproxy import core as core_mod
    from ipvsproxy import gcpause

    frozen: list[int] = []
    monkeypatch.setattr(gcpause, "refreeze", lambda: frozen.append(1))
    tracker, dp, rec = programmed(10)
    core_mod.sync(rec, False, freeze=True, sweep=4)
    core_mod.sync(rec, False, freeze=True, sweep=4)
    assert frozen == []
    core_mod.sync(rec, False, freeze=True, sweep=4)  # the round's last keys
    assert frozen == [1] and rec.sweeps == 1
    core_mod.sync(rec, False, freeze=False, sweep=4)  # not the daemon (no start-up freeze yet): never
    core_mod.sync(rec, False, freeze=False, sweep=100)
    assert frozen == [1] and rec.sweeps == 2


def test_a_round_over_an_empty_table_still_checks_the_addresses() -> None:
    tracker, dp, rec = programmed(0)
    dp.state.addresses.add("198.19.5.5")  # bound by hand on our interface, no virtual server anywhere
    report = rec.sync(sweep=8)
    assert [(op.kind, op.address) for op in report.ops] == [(OpKind.UNBIND, "198.19.5.5")]
    assert rec.sweeps == 1 and not rec.sweep
