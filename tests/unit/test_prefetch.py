"""A whole-table read started early (dataplane/prefetch.py) and taken by the first sync: the
IPVS dataplane's (the proc file and a services dump on a socket of its own) and the nftables
companion's (structure and elements). What is taken must equal what the sync would have read
itself; a failed or too old read is read again, on the caller's thread, and said in one line.
tests/kernel/test_ipvs_proc.py holds the IPVS one to the real kernel."""

from __future__ import annotations

import logging
import threading
import types
from typing import Any

import pytest

from ipvsproxy.dataplane import ipvs_proc
from ipvsproxy.dataplane.prefetch import Prefetch
from tests.nftdriver import Firewall
from tests.unit.test_ipvs_proc import SAMPLE, SVC_A, SVC_B, TableWire, observing, reals
from tests.unit.test_nft import BASE, _kernel_after, cfg, state


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_take_returns_what_the_thread_read() -> None:
    names: list[str] = []

    def read() -> int:
        names.append(threading.current_thread().name)
        return 42

    pre = Prefetch(read, name="test-prefetch")
    assert pre.take() == 42 and names == ["test-prefetch"]  # read on a thread of its own


def test_a_read_too_old_to_trust_is_read_again(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    pre = Prefetch(lambda: 1, name="test-prefetch", max_age=60.0, clock=clock)
    clock.now += 90.0
    with caplog.at_level(logging.INFO, logger="ipvsproxy.dataplane.prefetch"):
        assert pre.take() is None
    assert any("90 s old" in r.getMessage() for r in caplog.records)
    fresh = Prefetch(lambda: 1, name="test-prefetch", max_age=60.0, clock=clock)
    clock.now += 59.0
    assert fresh.take() == 1


def test_a_read_that_failed_on_its_thread_is_said_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def read() -> int:
        raise OSError(104, "Connection reset by peer")

    pre = Prefetch(read, name="test-prefetch")
    with caplog.at_level(logging.INFO, logger="ipvsproxy.dataplane.prefetch"):
        assert pre.take() is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "Connection reset by peer" in said[0] and "reading again" in said[0]


# ---- NetlinkDataplane ------------------------------------------------------------------------
class TwinTableWire(TableWire):
    """TableWire with `twin()`: a wire of its own over the same table (as IPVSWire.twin opens a
    socket of its own), which records the threads that dumped the services on it."""

    def __init__(self, table: Any, dumped_on: list[str]) -> None:
        super().__init__(table)
        self.dumped_on = dumped_on

    def services(self) -> Any:
        self.dumped_on.append(threading.current_thread().name)
        return super().services()

    def twin(self) -> TwinTableWire:
        return TwinTableWire(self.table_, self.dumped_on)

    def __enter__(self) -> TwinTableWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetching(proc: Any) -> tuple[Any, TwinTableWire, list[str]]:
    dp, plain = observing(proc)
    dumped_on: list[str] = []
    dp.wire = wire = TwinTableWire(plain.table_, dumped_on)
    return dp, wire, dumped_on


def test_observe_takes_the_prefetched_read_once() -> None:
    proc_on: list[str] = []

    def proc() -> dict[Any, Any]:
        proc_on.append(threading.current_thread().name)
        return ipvs_proc.parse(SAMPLE.splitlines())

    dp, wire, dumped_on = prefetching(proc)
    expected = observing(lambda: ipvs_proc.parse(SAMPLE.splitlines()))[0].observe()
    dp.prefetch()
    first = dp.observe()
    assert proc_on == ["ipvs-prefetch"] and dumped_on == ["ipvs-prefetch"]  # read on its thread
    assert first == expected and wire.dests_dumped == []
    second = dp.observe()  # taken once: the next observe reads the kernel again, here
    assert proc_on == ["ipvs-prefetch", threading.current_thread().name] and len(dumped_on) == 2
    assert second == expected


def test_a_prefetch_that_failed_is_read_again_by_observe(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def proc() -> dict[Any, Any]:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise UnicodeDecodeError("ascii", b"\xff", 0, 1, "ordinal not in range(128)")
        return ipvs_proc.parse(SAMPLE.splitlines())

    dp, wire, _ = prefetching(proc)
    dp.wire.twin = lambda: (_ for _ in ()).throw(OSError(24, "Too many open files"))  # no socket for it
    dp.prefetch()
    with caplog.at_level(logging.INFO):
        state = dp.observe()
    assert any("Too many open files" in r.getMessage() for r in caplog.records)
    assert calls == [threading.current_thread().name]  # the thread never got as far as the file
    assert reals(state, SVC_A) == {("10.0.1.2", 8080): (1, 3, 7), ("10.0.1.3", 8080): (0, 0, 12)}
    assert reals(state, SVC_B) == {("10.0.1.4", 53): (1, 0, 0)}


def test_close_waits_for_a_prefetch_under_way() -> None:
    gate = threading.Event()

    def proc() -> dict[Any, Any]:
        gate.wait(5)
        return {}

    dp, _, _ = prefetching(proc)
    dp.conntrack = dp.addr = dp.links = types.SimpleNamespace(close=lambda: None)
    dp.prefetch()
    pre = dp._prefetch
    threading.Timer(0.05, gate.set).start()
    dp.close()
    assert dp._prefetch is None and not pre._thread.is_alive()


# ---- NftFirewall -----------------------------------------------------------------------------
def test_the_companion_adopts_from_its_prefetched_read_as_from_its_own() -> None:
    desired = state(*BASE[1:])  # one Service gone while the agent was away
    plain_kernel, pre_kernel = _kernel_after(state(*BASE)), _kernel_after(state(*BASE))
    plain, pre = Firewall(cfg(), nft=plain_kernel), Firewall(cfg(), nft=pre_kernel)
    pre.prefetch()
    assert pre.sync_state(desired) == plain.sync_state(desired) == 3
    assert pre_kernel.transactions[-1] == plain_kernel.transactions[-1]
    assert pre.reads == plain.reads == 1 and pre.listings == plain.listings  # one read, not two
    assert pre_kernel.tables == plain_kernel.tables
