"""The cyclic garbage collector is paused through bulk work and on again after it (gcpause.py).

What could go wrong and is checked: a pause that leaves the collector off (after an
exception, after nesting, from two threads, when the daemon's first sync never comes),
a pause that turns on a collector someone else had turned off, a full sync or a
`run --once` that runs with the collector on, an incremental sync that runs with it off,
the cold start's state not frozen, a later full sync's state not frozen again (or frozen with
its garbage cycles in it).
"""

from __future__ import annotations

import gc
import shutil
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from ipvsproxy import gcpause
from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.core import NodeCore, sync
from ipvsproxy.dataplane.base import Failure
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import ObservedState, ObservedVS, VSKey
from ipvsproxy.plan import Op
from ipvsproxy.sources.files import ManifestReader
from tests.unit.factories import FakeClock
from tests.unit.test_agent import EXAMPLES, WEB, Synced


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    assert gc.isenabled()
    yield
    gcpause._depth = 0
    gc.unfreeze()
    gc.enable()


def test_paused_turns_the_collector_off_for_the_block_and_back_on() -> None:
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():  # nested: still off, and still off after the inner block
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_paused_restores_the_collector_after_an_exception() -> None:
    with pytest.raises(RuntimeError), gcpause.paused():
        raise RuntimeError("sync failed")
    assert gc.isenabled()


def test_paused_leaves_off_a_collector_that_was_off() -> None:
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()


def test_the_last_pause_to_end_trims_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(gcpause, "trim_heap", lambda: trims.append(gcpause._depth))
    with gcpause.paused():
        with gcpause.paused():
            pass
        assert trims == []  # an inner pause ending is not the end of the bulk work
    assert trims == [0]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_trim_heap_gives_freed_pages_back() -> None:
    """Against the real C library: 30 MiB of 2 KiB blocks (malloc's heap, not pymalloc's arenas)
    freed between blocks still in use (one in 16: nothing at the heap's top to shrink by itself)
    stay resident until the trim."""
    blocks = [bytes(2048) for _ in range(16384)]
    keep = blocks[::16]
    del blocks
    before = _rss_kib()
    gcpause._libc_trim()()
    assert before - _rss_kib() > 16 * 1024, "malloc_trim gave back less than half of 30 MiB freed"
    del keep


def test_an_unmatched_resume_changes_nothing() -> None:
    gc.disable()
    gcpause.resume()  # no pause to end: the collector someone turned off stays off
    assert not gc.isenabled()
    gc.enable()
    gcpause.resume()
    assert gc.isenabled() and gcpause._depth == 0


def test_pauses_from_two_threads_end_when_the_last_ends() -> None:
    gcpause.pause()
    other_in, other_out = threading.Event(), threading.Event()

    def other() -> None:
        with gcpause.paused():
            other_in.set()
            other_out.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert other_in.wait(5)
    gcpause.resume()  # the first pause ends while the other thread's is still on
    assert not gc.isenabled()
    other_out.set()
    t.join(5)
    assert gc.isenabled()


def test_startup_pause_ends_with_the_first_sync_and_freezes_its_state() -> None:
    clock = FakeClock()
    pause = gcpause.StartupPause(clock, limit=300)
    pause.start()
    assert pause.active and not gc.isenabled()
    clock.advance(299)
    pause.expire()
    assert not gc.isenabled()  # not yet
    before = gc.get_freeze_count()
    pause.end(freeze=True)
    assert gc.isenabled() and not pause.active
    assert gc.get_freeze_count() > before  # the state alive now is in the permanent generation
    pause.end(freeze=True)  # a second end (later syncs report too): nothing more
    assert gc.isenabled()


def test_startup_pause_gives_up_after_its_limit_without_freezing() -> None:
    clock = FakeClock()
    pause = gcpause.StartupPause(clock, limit=300)
    pause.start()
    clock.advance(300)
    pause.expire()  # the API server never answered: the collector must not stay off
    assert gc.isenabled() and not pause.active
    assert gc.get_freeze_count() == 0
    pause.end(freeze=True)  # the first sync, late: the pause is over, nothing to freeze
    assert gc.get_freeze_count() == 0


def test_a_failed_first_sync_ends_the_pause_without_freezing() -> None:
    pause = gcpause.StartupPause(FakeClock())
    pause.start()
    pause.end(freeze=False)
    assert gc.isenabled() and gc.get_freeze_count() == 0


class RecordingDataplane(MemoryDataplane):
    """Notes whether the collector was on at each call a sync makes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def observe(self) -> ObservedState:
        self.seen.append(("observe", gc.isenabled()))
        return super().observe()

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        self.seen.append(("observe_keys", gc.isenabled()))
        return super().observe_keys(keys)

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        self.seen.append(("apply", gc.isenabled()))
        return super().apply(ops)


def config(tmp_path: Path, manifests: Path) -> AgentConfig:
    return AgentConfig(node_name="demo-node", from_files=(str(manifests),), min_sync_period=0.05, sync_period=30,
                       healthz_bind_address="", metrics_bind_address="", state_dir=str(tmp_path / "state"))


def test_run_once_reads_and_syncs_with_the_collector_paused(tmp_path: Path) -> None:
    dp = RecordingDataplane()
    Agent(config(tmp_path, EXAMPLES), dp).once()
    assert dp.seen and all(not on for _, on in dp.seen), dp.seen
    assert WEB in dp.state.services
    assert gc.isenabled()


def test_daemon_pauses_for_full_syncs_only_and_freezes_after_its_first(tmp_path: Path) -> None:
    manifests = tmp_path / "m"
    shutil.copytree(EXAMPLES, manifests)
    dp = RecordingDataplane()
    agent = Agent(config(tmp_path, manifests), dp)
    synced = Synced(agent)
    t = threading.Thread(target=agent.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    try:
        assert synced.wait_for(lambda: WEB in dp.state.services)
        assert dp.seen[0] == ("observe", False)  # the cold start: a full sync, collector off
        assert all(not on for _, on in dp.seen)
        assert synced.wait_for(lambda: gc.isenabled())  # on again once the first sync has ended
        assert not agent.startup_gc.active and agent.startup_gc.frozen
        assert gc.get_freeze_count() > 0

        # an incremental sync (one manifest changed) runs with the collector on
        dp.seen.clear()
        web = manifests / "10-web.yaml"
        web.write_text(web.read_text().replace("198.18.1.13]", "198.18.1.14]"))
        assert synced.wait_for(lambda: ("198.18.1.14", 8080) in dp.state.services[WEB].reals)
        assert dp.seen and ("observe", False) not in dp.seen
        assert any(on for _, on in dp.seen), dp.seen

        # a full resync (SIGHUP, or every --sync-period) runs with it off, then on again, and
        # freezes what is alive then: the objects the change above made join the frozen ones
        assert agent.core.freeze_full_syncs
        dp.seen.clear()
        frozen = gc.get_freeze_count()
        agent.request_full()
        assert synced.wait_for(lambda: ("observe", False) in dp.seen)
        assert synced.wait_for(lambda: gc.isenabled())
        assert synced.wait_for(lambda: gc.get_freeze_count() > frozen)
    finally:
        agent.stop()
        t.join(5)
    assert not t.is_alive() and gc.isenabled()



class Node:
    """A garbage cycle's member, with a weak reference to see it go."""

    def __init__(self) -> None:
        self.other: Node | None = None


def test_paused_with_freeze_collects_the_cycles_then_freezes_what_is_alive() -> None:
    kept = [Node() for _ in range(100)]
    with gcpause.paused(freeze=True):
        a, b = Node(), Node()
        a.other, b.other = b, a  # garbage once the names go: only the collector can free it
        gone = weakref.ref(a)
        del a, b
        made = [Node() for _ in range(1000)]
    assert gc.isenabled()
    assert gone() is None  # collected before the freeze, not kept forever in the permanent generation
    assert gc.get_freeze_count() >= len(kept) + len(made)
    assert not any(o is made[0] for o in gc.get_objects())  # frozen: in no generation a collection walks


def test_core_sync_freezes_full_syncs_only_when_asked(tmp_path: Path) -> None:
    dp = RecordingDataplane()
    core = NodeCore.build(config(tmp_path, EXAMPLES), dp)
    ManifestReader((str(EXAMPLES),), "").load(core.tracker)
    sync(core.reconciler, True)  # the cold start: the start-up pause freezes it, not the sync
    assert gc.get_freeze_count() == 0
    core.freeze_full_syncs = True
    core.sync_now(False)  # an incremental sync never freezes (nor pauses)
    assert gc.get_freeze_count() == 0
    core.sync_now(True)
    assert gc.get_freeze_count() > 0 and gc.isenabled()


def test_core_sync_pauses_full_syncs(tmp_path: Path) -> None:
    """The one sync path the daemon and the benchmark share (core.sync): full syncs paused."""
    dp = RecordingDataplane()
    core = NodeCore.build(config(tmp_path, EXAMPLES), dp)
    ManifestReader((str(EXAMPLES),), "").load(core.tracker)
    sync(core.reconciler, True)
    assert dp.seen and all(not on for _, on in dp.seen)
    assert WEB in dp.state.services and gc.isenabled()
