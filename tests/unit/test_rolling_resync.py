"""--resync rolling: the drift check as a round of small steps instead of one full sync.

The reconciler compares a few virtual servers per incremental sync against a fresh read of just
those; the round's last step compares the bound addresses and the firewall too. The node core
starts a round every --sync-period and paces its steps by their cost, so a change never waits
behind a whole-table dump."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

from ipvsproxy.config import AgentConfig
from ipvsproxy.core import SWEEP_MIN, NodeCore
from ipvsproxy.dataplane.memory import KEYS_PER_PAGE, MemoryDataplane
from ipvsproxy.model import AF_INET, F_OWNED, Delta, ObservedReal, ObservedState, ObservedVS, VSKey
from ipvsproxy.plan import OpKind
from ipvsproxy.reconcile import FIREWALL_READ_PER_KEY, KEYS_READ_PER_COMPARED, Reconciler
from ipvsproxy.schedulers import Registry
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config
from tests.unit.factories import FakeClock
from tests.unit.test_reconcile import NODE, eps, key, setup, svc


class CountingDataplane(MemoryDataplane):
    """The in-memory dataplane, counting whole-table dumps, per-key reads and key-dump pages."""

    def __init__(self) -> None:
        super().__init__()
        self.full_dumps = 0
        self.keys_read = 0
        self.pages_read = 0  # of the last key dump
        self.dump_open = False

    def observe(self) -> ObservedState:
        self.full_dumps += 1
        return super().observe()

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        keys = list(keys)
        self.keys_read += len(keys)
        return super().observe_keys(keys)

    def service_key_pages(self) -> Generator[list[VSKey] | None, None, None]:
        self.pages_read = 0
        self.dump_open = True
        try:
            for page in super().service_key_pages():
                self.pages_read += 1
                yield page
        finally:
            self.dump_open = False


class RecordingFirewall:
    """The reconciler's Firewall protocol: records whether each sync asked for a full check,
    and the budget of each step of its own drift check."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.steps: list[int] = []

    def sync(self, delta: Delta, full: bool = False) -> int:
        self.calls.append(full)
        return 0

    def check_step(self, budget: int) -> int:
        self.steps.append(budget)
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
        if not rec.sweeping:
            break
    assert steps == 4  # 21 keys (20 desired and the stray), 6 a step
    assert sorted(repaired, key=str) == sorted([(OpKind.ADD_RS, "198.18.1.4"), (OpKind.DEL_VS, stray),
                                                (OpKind.BIND, "198.19.0.8")], key=str)
    assert dp.full_dumps == dumps  # never the whole table
    assert stray not in dp.state.services and "198.19.0.8" in dp.state.addresses
    assert ("198.18.1.4", 8080) in dp.state.services[key(3)].reals
    assert rec.sweeps == 1


def test_the_kernels_keys_are_read_a_few_pages_a_step_and_its_strays_compared_as_they_come() -> None:
    tracker, dp, rec = programmed(20)
    strays = [VSKey(AF_INET, 6, f"198.19.{8 + i // 200}.{i % 200 + 1}", 81) for i in range(4 * KEYS_PER_PAGE)]
    for k in strays:
        dp.state.services[k] = ObservedVS(k, "rr", F_OWNED, 0, {})
    step = 2
    pages_a_step = -(-step * KEYS_READ_PER_COMPARED // KEYS_PER_PAGE)
    first = rec.sync(sweep=step)
    assert dp.pages_read == pages_a_step  # not the whole dump: a step reads a few pages
    assert rec.sweeping and len(first.ops) == step  # the strays of the page read are compared first
    deleted = {op.key for op in first.ops if op.kind is OpKind.DEL_VS}
    steps = 1
    while rec.sweeping:
        report = rec.sync(sweep=step)
        assert 0 < report.swept <= step
        deleted |= {op.key for op in report.ops if op.kind is OpKind.DEL_VS}
        steps += 1
    assert deleted == set(strays) and not set(strays) & set(dp.state.services)
    assert dp.pages_read == 5 and not dp.dump_open  # 420 keys: every page once, and the dump is over
    assert steps == (20 + len(strays)) // step and rec.sweeps == 1 and dp.full_dumps == 1


def test_a_full_sync_during_a_round_ends_the_kernels_dump() -> None:
    tracker, dp, rec = programmed(10)
    for i in range(3 * KEYS_PER_PAGE):
        k = VSKey(AF_INET, 17, f"198.19.9.{i % 250 + 1}", 1000 + i)
        dp.state.services[k] = ObservedVS(k, "rr", 0, 0, {})  # foreign: read, never touched
    rec.sync(sweep=1)
    assert dp.dump_open and dp.pages_read == 1
    assert rec.sync(full=True).full
    assert not dp.dump_open and not rec.sweeping


def test_the_address_check_waits_for_the_rounds_last_step_and_the_firewall_checks_a_bit_each_step() -> None:
    fw = RecordingFirewall()
    tracker, dp, rec = programmed(10, firewall=fw)
    fw.calls.clear()
    dp.state.addresses.discard("198.19.0.2")
    first = rec.sync(sweep=4)
    assert first.ops == [] and fw.calls == []  # nothing changed: no transaction asked for
    rec.sync(sweep=4)
    last = rec.sync(sweep=4)
    assert not rec.sweeping and [(op.kind, op.address) for op in last.ops] == [(OpKind.BIND, "198.19.0.2")]
    # never the whole firewall table at once: a step of its own check beside each of ours
    assert True not in fw.calls
    assert fw.steps == [4 * FIREWALL_READ_PER_KEY, 4 * FIREWALL_READ_PER_KEY, 2 * FIREWALL_READ_PER_KEY]
    rec.sync()  # not a drift-check step: the firewall's check does not move
    assert len(fw.steps) == 3


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
    assert rec.sweeping
    assert rec.sync(full=True).full
    assert rec.sweep == [] and not rec.sweeping and rec.sweeps == 0


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
    assert not nc.reconciler.sweeping and nc.reconciler.sweeps == 1 and dp.full_dumps == 1
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
    assert dp.full_dumps == 2 and not nc.reconciler.sweeping


def test_a_slow_step_makes_the_next_one_smaller() -> None:
    clock = FakeClock()
    nc, dp = core(600, clock, rolling=True)
    nc.tick()
    real_sync = nc.reconciler.sync

    def slow_sync(full: bool = False, sweep: int = 0, until: float | None = None) -> Any:
        report = real_sync(full, sweep, until)
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
    assert rec.sweeps == 1 and not rec.sweeping


def test_a_change_carried_by_a_drift_check_step_is_timed_before_the_firewalls_check() -> None:
    """The latency of a change ends when IPVS and nftables hold it, not after the firewall's
    own drift-check step that the same sync takes afterwards."""
    clock = FakeClock()

    class SlowCheck(RecordingFirewall):
        def check_step(self, budget: int) -> int:
            clock.advance(0.5)
            return super().check_step(budget)

    fw = SlowCheck()
    tracker, dp, rec = programmed(10, firewall=fw, clock=clock)
    tracker.clock = clock
    tracker.upsert("EndpointSlice", eps("s1", ["198.18.1.2", "198.18.3.2"]))
    clock.advance(0.25)
    report = rec.sync(sweep=4)
    assert report.services_translated == 1 and fw.steps == [4 * FIREWALL_READ_PER_KEY]
    assert report.latencies == [0.25] and report.duration == 0.5
