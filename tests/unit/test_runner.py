"""The sync schedule on a fake clock, without threads or sleeps: the
bounded-frequency runner (runner.py), the node core's decisions (core.py: full
or incremental, backoff with seeded jitter, readiness) and the pure
next_sync_due. `run_until` does what Runner.run does between two instants: it
steps the runner and moves the clock to whenever the runner would wake."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ipvsproxy.agent import Agent
from ipvsproxy.bench import scenarios
from ipvsproxy.bench.cluster import ClusterSpec, SyntheticCluster
from ipvsproxy.config import AgentConfig, parse_cidrs
from ipvsproxy.core import NodeCore, backoff_delay, next_sync_due
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, Delta, VSKey
from ipvsproxy.reconcile import SyncReport
from ipvsproxy.runner import Runner
from ipvsproxy.schedulers import Registry
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config
from tests.unit.factories import FakeClock
from tests.unit.test_reconcile import eps, svc

NODE = "n1"


def key(i: int) -> VSKey:
    return VSKey(AF_INET, 6, f"198.19.0.{i + 1}", 80)


def run_until(runner: Runner, clock: FakeClock, end: float) -> None:
    """Runner.run between now and `end`: step; sleep until the delay it returns (or a poke)."""
    while True:
        delay = runner.step()
        if delay is None or clock() + delay > end:
            clock.t = max(clock(), end)
            return
        clock.advance(delay)


class Lab:
    """A node core on the memory dataplane, built as the agent builds it (NodeCore.build),
    its runner around it, one fake clock for both."""

    def __init__(self, n: int = 3, *, min_period: float = 1.0, sync_period: float = 30.0,
                 dp: MemoryDataplane | None = None, listed: bool = True,
                 rng: random.Random | None = None, resync: str = "rolling") -> None:
        self.clock = FakeClock()
        self.dp = dp or MemoryDataplane()
        self.reports: list[tuple[float, SyncReport | None]] = []
        self.core = NodeCore.build(
            AgentConfig(node_name=NODE, sync_period=sync_period, min_sync_period=min_period, resync=resync), self.dp,
            registry=Registry(), clock=self.clock, rng=rng,
            on_report=lambda r, e: self.reports.append((self.clock(), r)))
        self.tracker, self.rec = self.core.tracker, self.core.reconciler
        self.runner = self.core.runner()
        if listed:
            self.tracker.replace("Service", [svc(f"s{i}", f"198.19.0.{i + 1}") for i in range(n)])
            self.tracker.replace("EndpointSlice", [eps(f"s{i}", [f"198.18.1.{i + 1}"]) for i in range(n)])
            self.tracker.replace("Node", [])

    def syncs(self) -> list[SyncReport]:
        return [r for _, r in self.reports if r is not None]


def test_next_sync_due_is_the_earliest_reason() -> None:
    assert next_sync_due(last_sync=100, last_full=90, sync_period=30) == 120
    assert next_sync_due(last_sync=100, last_full=90, sync_period=30, drain_check=5) == 105
    assert next_sync_due(last_sync=100, last_full=90, sync_period=30, drain_check=5, backoff=2) == 102
    assert next_sync_due(last_sync=100, last_full=90, sync_period=30, retry=101.5, backoff=2) == 101.5


def test_backoff_doubles_is_capped_and_its_jitter_is_seeded() -> None:
    a, b = random.Random(7), random.Random(7)
    delays = [backoff_delay(n, 1.0, a) for n in range(1, 10)]
    assert delays == [backoff_delay(n, 1.0, b) for n in range(1, 10)]  # the same seed, the same delays
    for n, d in enumerate(delays, start=1):
        nominal = min(2.0 ** min(n, 6), 60.0)
        assert 0.5 * nominal <= d <= 1.5 * nominal


@pytest.mark.parametrize("resync", ["full", "rolling"])
def test_first_sync_is_full_at_once_then_nothing_until_the_period(resync: str) -> None:
    lab = Lab(sync_period=30, resync=resync)
    assert lab.runner.step() == 30.0  # ran at once; the next is the periodic one
    assert [r.full for r in lab.syncs()] == [True] and len(lab.dp.state.services) == 3
    run_until(lab.runner, lab.clock, 1029.9)
    assert len(lab.syncs()) == 1  # nothing changed: no sync before the period
    run_until(lab.runner, lab.clock, 1030.0)
    if resync == "full":
        assert [r.full for r in lab.syncs()] == [True, True]  # the periodic full resync
    else:  # the drift-check round's first step, after the (empty) sync of changes: no full sync
        assert [(r.full, r.swept) for r in lab.syncs()] == [(True, 0), (False, 0), (False, 3)]


@pytest.mark.parametrize("resync", ["full", "rolling"])
def test_a_sync_that_changes_something_is_logged_a_periodic_noop_only_at_debug(
        caplog: pytest.LogCaptureFixture, resync: str) -> None:
    lab = Lab(2, sync_period=30, resync=resync)
    with caplog.at_level("DEBUG", logger="ipvsproxy.core"):
        lab.runner.step()  # the first sync programs 2 Services
        run_until(lab.runner, lab.clock, 1030.0)  # the periodic drift check finds nothing to do
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ipvsproxy.core"]
    assert lines[0][0] == "INFO", lines
    assert lines[0][1].startswith("sync: 2 services translated, ") and lines[0][1].endswith("(full)")
    assert [lvl for lvl, _ in lines[1:]] == ["DEBUG"] * len(lines[1:]) and lines[1:], lines
    assert all(msg.startswith("sync: 0 services translated, nothing to change in ") for _, msg in lines[1:])
    assert lines[-1][1].endswith("(full)" if resync == "full" else "(drift check: 2)")


def test_a_burst_of_changes_coalesces_into_few_syncs() -> None:
    lab = Lab(20, min_period=0.3, sync_period=60)
    run_until(lab.runner, lab.clock, lab.clock() + 1)
    assert len(lab.syncs()) == 1
    start = lab.clock()
    final: dict[str, list[str]] = {}
    for i in range(1000):  # 1,000 updates over one second, each a change
        run_until(lab.runner, lab.clock, start + i / 1000)
        name = f"s{i % 20}"
        final[name] = sorted(f"198.18.{1 + j}.{1 + i % 20}" for j in range(1 + (i // 20) % 5))
        lab.tracker.upsert("EndpointSlice", eps(name, final[name]))
    run_until(lab.runner, lab.clock, start + 2)
    got = {f"s{i}": sorted(a for a, _ in lab.dp.state.services[key(i)].reals) for i in range(20)}
    assert got == final
    times = [round(t - start, 6) for t, _ in lab.reports[1:]]
    assert times == [0.02, 0.32, 0.62, 0.92, 1.22]  # the first change (i=20), then one per interval
    assert all(not r.full for r in lab.syncs()[1:])  # incremental


def test_a_failed_sync_is_retried_after_a_jittered_backoff_then_incremental_again() -> None:
    calls = {"n": 0}

    class Broken(MemoryDataplane):
        def apply(self, ops: Any) -> Any:
            calls["n"] += 1
            if calls["n"] <= 3:
                raise OSError("netlink socket closed")
            return super().apply(ops)

    lab = Lab(2, min_period=0.5, sync_period=600, dp=Broken(), rng=random.Random(3))
    run_until(lab.runner, lab.clock, lab.clock() + 60)
    outcomes = [r is not None for _, r in lab.reports]
    assert outcomes == [False, False, False, True]
    assert lab.core.failures == 0 and lab.core.last_error is None and len(lab.dp.state.services) == 2
    rng = random.Random(3)
    want = [backoff_delay(n, 0.5, rng) for n in (1, 2, 3)]
    gaps = [b - a for (a, _), (b, _) in zip(lab.reports, lab.reports[1:], strict=False)]
    assert gaps == pytest.approx(want)  # the seeded jitter
    assert lab.syncs()[0].full  # a failed sync makes the next one full (the reconciler's need_full)


def test_the_first_sync_waits_until_every_kind_is_listed() -> None:
    lab = Lab(listed=False)  # NodeCore.build makes the first sync wait for the listings
    lab.tracker.replace("Service", [svc("a", "198.19.0.1")])
    run_until(lab.runner, lab.clock, lab.clock() + 100)
    assert lab.rec.syncs == 0 and lab.runner.step() is None  # not ready: waits for the next change
    lab.tracker.replace("EndpointSlice", [eps("a", ["198.18.1.1"])])
    run_until(lab.runner, lab.clock, lab.clock() + 100)
    assert lab.rec.syncs == 0  # no premature deletes before the Node is listed
    lab.tracker.replace("Node", [])
    run_until(lab.runner, lab.clock, lab.clock() + 1)
    assert lab.rec.syncs == 1 and key(0) in lab.dp.state.services


def test_a_requested_full_sync_and_a_drain_recheck_are_scheduled() -> None:
    lab = Lab(1, sync_period=300)  # drain_check: 5 s
    run_until(lab.runner, lab.clock, lab.clock() + 10)
    lab.dp.state.services[key(0)].reals[("198.18.1.1", 8080)].active = 2
    lab.tracker.upsert("EndpointSlice", eps("s0", []))  # the endpoint goes: it drains
    run_until(lab.runner, lab.clock, lab.clock() + 1)
    assert lab.rec.draining == 1
    t = lab.reports[-1][0]
    lab.dp.state.services[key(0)].reals[("198.18.1.1", 8080)].active = 0
    run_until(lab.runner, lab.clock, t + 5)
    assert lab.reports[-1][0] == t + 5 and lab.rec.draining == 0  # re-checked after drain_check
    lab.core.request_full()
    lab.runner.poke()
    run_until(lab.runner, lab.clock, lab.clock() + 1)
    assert lab.syncs()[-1].full


def test_a_poke_inside_the_interval_waits_and_stop_ends_the_loop() -> None:
    clock = FakeClock()
    calls: list[float] = []
    runner = Runner(lambda: calls.append(clock()) or None, min_interval=2.0, clock=clock)
    assert runner.step() is None and calls == [1000.0]  # ran; nothing due until poked
    clock.advance(0.5)
    runner.poke()
    assert runner.step() == 1.5 and calls == [1000.0]  # inside the interval: later
    clock.advance(1.5)
    assert runner.step() is None and calls == [1000.0, 1002.0]
    runner.stop()
    runner.run()  # returns at once: stopped
    assert runner.stopped and calls == [1000.0, 1002.0]


class Firewall:
    """Records the change deltas it is handed: (virtual servers added or changed, full)."""

    def __init__(self) -> None:
        self.syncs: list[tuple[int, bool]] = []

    def sync(self, delta: Delta, full: bool = False) -> int:
        self.syncs.append((sum(1 for change in delta.values() if change.new is not None), full))
        return 0

    def check_step(self, budget: int) -> int:
        return 0

    @property
    def behind(self) -> bool:
        return False


def test_build_wires_the_agent_settings_into_one_core() -> None:
    clock, fw = FakeClock(), Firewall()
    cfg = AgentConfig(node_name=NODE, scheduler="lc", exclude_cidrs=parse_cidrs("198.19.0.2/32"),
                      nodeport_addresses=parse_cidrs("198.18.0.0/24"), drain_grace_period=7.0,
                      sync_period=40.0, min_sync_period=2.0)
    core = NodeCore.build(cfg, MemoryDataplane(), registry=Registry(), firewall=fw, clock=clock)
    rec = core.reconciler
    assert rec.cfg == Config(NODE, "lc", parse_cidrs("198.18.0.0/24")) and rec.grace == 7.0
    assert (core.sync_period, core.min_period) == (40.0, 2.0)
    assert core.tracker.clock is clock and rec.clock is clock and core.clock is clock
    runner = core.runner()
    assert (runner.min_interval, runner.clock, runner.wake) == (2.0, clock, core.tracker.changed)
    core.tracker.replace("Service", [svc("s0", "198.19.0.1"), svc("s1", "198.19.0.2")])
    assert runner.step() is None and rec.syncs == 0  # not listed yet: the first sync waits
    core.tracker.replace("EndpointSlice", [eps("s0", ["198.18.1.1"]), eps("s1", ["198.18.1.2"])])
    core.tracker.replace("Node", [])
    assert runner.step() == 2.0 and rec.syncs == 0  # listed: due once --min-sync-period has passed
    clock.advance(2.0)
    assert runner.step() == 40.0 and rec.syncs == 1  # synced; the next is the periodic one
    assert set(rec.dp.state.services) == {key(0)}  # --exclude-cidrs: 198.19.0.2 is never touched
    assert fw.syncs == [(2, True)]  # the firewall got the delta of both Services (the first sync is full)
    assert rec.dp.state.services[key(0)].scheduler == "lc"
    dry = NodeCore.build(cfg, MemoryDataplane(), registry=Registry(), firewall=fw, dry_run=True)
    assert dry.reconciler.dry_run and dry.reconciler.firewall is None  # a dry run changes nothing


def test_the_agent_and_the_benchmark_run_the_same_core() -> None:
    ctx = scenarios.Context.build(SyntheticCluster(ClusterSpec(5, 2, seed=1)))
    bench = scenarios.make_agent(ctx, MemoryDataplane()).core
    agent = Agent(ctx.settings, MemoryDataplane(), registry=ctx.registry, record_state=False).core
    for core in (agent, bench):
        assert type(core) is NodeCore and core.reconciler.registry is ctx.registry
        assert not core.ready()  # both wait for every watched kind before the first sync
    assert (bench.sync_period, bench.min_period, bench.drain_check) == \
        (agent.sync_period, agent.min_period, agent.drain_check)
    assert (bench.reconciler.cfg, bench.reconciler.grace) == (agent.reconciler.cfg, agent.reconciler.grace)


def test_a_slow_sync_is_logged_with_where_its_time_went(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()

    class SlowCheck(Firewall):
        def check_step(self, budget: int) -> int:
            clock.advance(2.5)  # a drift-check step that reads for 2.5 s
            return 0

    core = NodeCore.build(AgentConfig(node_name=NODE, resync="rolling"), MemoryDataplane(), registry=Registry(),
                          firewall=SlowCheck(), clock=clock)
    core.tracker.replace("Service", [svc("s0", "198.19.0.1")])
    core.tracker.replace("EndpointSlice", [eps("s0", ["198.18.1.1"])])
    core.tracker.replace("Node", [])
    assert core.sync_now(True) is not None
    with caplog.at_level("INFO", logger="ipvsproxy.core"):
        report = core.sync_now(False, 8)  # a drift-check step: nothing to change, but slow
    assert report is not None and report.swept == 1
    assert (report.duration, report.check_s, report.compute_s, report.apply_s) == (2.5, 2.5, 0.0, 0.0)
    [line] = [r.getMessage() for r in caplog.records if r.name == "ipvsproxy.core"]
    assert line.endswith("in 2.500s (drift check: 1); translate and plan 0.000s, IPVS 0.000s, nftables 0.000s,"
                         " its drift check 2.500s"), line


class Stream:
    """100 changes a second (400, each to one of the Lab's 100 Services) from a source that runs
    alongside the syncs: each change upserted at its own instant on the fake clock, even in the
    middle of a sync, whose IPVS work takes 2.5 ms an operation (two a change) and whose
    drift-check reads (8 keys or more at once) take `read_s`."""

    def __init__(self, lab: Lab, read_s: float = 0.0) -> None:
        self.lab, self.fed = lab, 0
        run_until(lab.runner, lab.clock, lab.clock() + 1)  # the first (full) sync
        self.start = start = lab.clock()
        self.changes = [(start + i / 100, f"s{i % 100}", f"198.18.{2 + i // 100}.{1 + i % 100}") for i in range(400)]
        self.final = {name: [ip] for _, name, ip in self.changes}
        apply, observe_keys = lab.dp.apply, lab.dp.observe_keys

        def slow_apply(ops: Any) -> Any:
            self.feed(lab.clock() + 0.0025 * len(ops))
            return apply(ops)

        def slow_read(keys: Any) -> Any:
            keys = list(keys)
            if len(keys) >= 8:
                self.feed(lab.clock() + read_s)
            return observe_keys(keys)

        lab.dp.apply = slow_apply  # type: ignore[method-assign]
        lab.dp.observe_keys = slow_read  # type: ignore[method-assign]
        lab.reports.clear()

    def feed(self, until: float) -> None:
        lab, now = self.lab, self.lab.clock()
        while self.fed < len(self.changes) and self.changes[self.fed][0] <= until:
            at, name, ip = self.changes[self.fed]
            lab.clock.t = max(at, now)
            lab.tracker.upsert("EndpointSlice", eps(name, [ip]))
            self.fed += 1
        lab.clock.t = max(now, until)

    def run(self) -> list[float]:
        """Feed it all through the runner; check the table; the changes' latencies."""
        lab = self.lab
        while self.fed < len(self.changes):
            run_until(lab.runner, lab.clock, self.changes[self.fed][0])
            self.feed(self.changes[self.fed][0])
        run_until(lab.runner, lab.clock, self.start + 6)
        got = {f"s{i}": sorted(a for a, _ in lab.dp.state.services[key(i)].reals) for i in range(100)}
        assert got == self.final
        latencies = [x for r in lab.syncs() for x in r.latencies]
        assert len(latencies) >= 390 and not any(r.full for r in lab.syncs())  # (a few changed twice in a window)
        return latencies


@pytest.mark.parametrize("pieces", [True, False])
def test_a_stream_of_changes_goes_to_the_kernel_oldest_first(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture, pieces: bool) -> None:
    """100 changes a second, each 5 ms of IPVS work: in one sync per tick, the change that
    waited the whole 1-s window also waits for the ~100 behind it (~0.5 s); carried oldest
    first in pieces, it is in the kernel a piece after the tick began."""
    from ipvsproxy import core as core_mod
    if not pieces:
        monkeypatch.setattr(core_mod, "PIECE_S", 60.0)  # a piece as long as the tick: one sync
    lab = Lab(100, min_period=1.0, sync_period=600)
    stream = Stream(lab)
    with caplog.at_level("INFO", logger="ipvsproxy.core"):
        latencies = stream.run()
    said = [r.getMessage() for r in caplog.records if r.name == "ipvsproxy.core"]
    assert 4 <= len(said) < 10  # a tick's pieces are said as one sync
    if pieces:
        assert max(latencies) < 1.0 + 0.03  # the window, and one piece of ~2 changes
        assert len(lab.syncs()) > 4 * 10  # ticks of many pieces
        assert any("pieces, oldest changes first)" in m for m in said), said
    else:
        assert max(latencies) > 1.0 + 0.4  # the window, and the whole tick's ~100 changes
        assert len(lab.syncs()) < 10  # one a tick


def test_changes_seen_during_a_tick_never_wait_for_its_drift_check_step() -> None:
    """With a drift-check round under way (a 2-s period), each tick ends with a step whose
    reads take 0.3 s: the changes seen while the tick's pieces ran get a pass of their own
    before it, and the step carries none (those seen during it are the next tick's)."""
    lab = Lab(100, min_period=1.0, sync_period=2.0)
    latencies = Stream(lab, read_s=0.3).run()
    steps = [r for r in lab.syncs() if r.swept]
    assert len(steps) >= 3 and all(r.services_translated == 0 and not r.latencies for r in steps)
    assert max(latencies) < 1.0 + 0.03


def test_a_tick_takes_the_changes_seen_before_it_oldest_first_and_leaves_the_rest() -> None:
    t = Tracker(NODE)
    clock = FakeClock()
    t.clock = clock
    for name in ("a", "b", "c"):
        t.upsert("Service", svc(name, "198.19.0.9"))
        clock.advance(0.01)
    assert t.oldest_dirty() == 1000.0
    first, everything = t.take_dirty(until=1000.015)
    assert list(first) == ["ns/a", "ns/b"] and not everything
    assert t.changed.is_set() and t.oldest_dirty() == 1000.02  # c still waits, and says so
    t.upsert("Service", svc("a", "198.19.0.10"))  # changed again: seen anew, after c
    assert list(t.take_dirty(until=1000.02)[0]) == ["ns/c"]
    assert list(t.take_dirty()[0]) == ["ns/a"] and not t.changed.is_set() and t.oldest_dirty() is None
