"""A whole-table read started early (dataplane/prefetch.py) and taken by the first sync: the
IPVS dataplane's (the bytes of /proc/net/ip_vs, parsed by the sync) and the nftables
companion's (the structure listing, a process of its own). What is taken must equal what the sync would have read
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
def prefetching(raw: Any) -> tuple[Any, TableWire, list[str]]:
    """A dataplane over TableWire whose start-up read of the file is `raw` (its bytes) and whose
    own reads of it are recorded by thread."""
    parsed_on: list[str] = []

    def table() -> dict[Any, Any]:
        parsed_on.append(threading.current_thread().name)
        return ipvs_proc.parse(SAMPLE.splitlines())

    dp, wire = observing(table)
    dp.proc_raw = raw
    return dp, wire, parsed_on


def test_observe_parses_the_file_the_prefetch_read_once() -> None:
    read_on: list[str] = []

    def raw() -> bytes:
        read_on.append(threading.current_thread().name)
        return SAMPLE.encode()

    dp, wire, parsed_on = prefetching(raw)
    expected = observing(lambda: ipvs_proc.parse(SAMPLE.splitlines()))[0].observe()
    dp.prefetch()
    first = dp.observe()
    assert read_on == ["ipvs-prefetch"] and parsed_on == []  # the file read on its thread only
    assert first == expected and wire.dests_dumped == []
    second = dp.observe()  # taken once: the next observe reads the file itself
    assert read_on == ["ipvs-prefetch"] and parsed_on == [threading.current_thread().name]
    assert second == expected


def test_a_prefetch_that_failed_is_read_again_by_observe(caplog: pytest.LogCaptureFixture) -> None:
    def raw() -> bytes:
        raise OSError(24, "Too many open files")

    dp, wire, parsed_on = prefetching(raw)
    dp.prefetch()
    with caplog.at_level(logging.INFO):
        state = dp.observe()
    assert any("Too many open files" in r.getMessage() for r in caplog.records)
    assert parsed_on == [threading.current_thread().name] and wire.dests_dumped == []
    assert reals(state, SVC_A) == {("10.0.1.2", 8080): (1, 3, 7), ("10.0.1.3", 8080): (0, 0, 12)}
    assert reals(state, SVC_B) == {("10.0.1.4", 53): (1, 0, 0)}


def test_no_prefetch_where_real_servers_are_read_over_netlink() -> None:
    dp, _ = observing(lambda: {}, real_counters=True)
    dp.proc_raw = lambda: pytest.fail("list --stats reads real servers over netlink: no file to read")
    dp.prefetch()
    assert dp._prefetch is None


def test_close_waits_for_a_prefetch_under_way() -> None:
    gate = threading.Event()

    def raw() -> bytes:
        gate.wait(5)
        return b""

    dp, _, _ = prefetching(raw)
    dp.conntrack = dp.addr = dp.links = types.SimpleNamespace(close=lambda: None)
    dp.prefetch()
    pre = dp._prefetch
    threading.Timer(0.05, gate.set).start()
    dp.close()
    assert dp._prefetch is None and not pre._thread.is_alive()


def test_parse_raw_is_parse_of_the_text() -> None:
    assert ipvs_proc.parse_raw(SAMPLE.encode()) == ipvs_proc.parse(SAMPLE.splitlines())
    with pytest.raises(UnicodeDecodeError):
        ipvs_proc.parse_raw(SAMPLE.encode() + b"\xff\n")


# ---- NftFirewall -----------------------------------------------------------------------------
def test_the_companion_adopts_from_its_prefetched_read_as_from_its_own() -> None:
    desired = state(*BASE[1:])  # one Service gone while the agent was away
    plain_kernel, pre_kernel = _kernel_after(state(*BASE)), _kernel_after(state(*BASE))
    listed_on: list[tuple[str, str]] = []

    def runner(doc: Any) -> Any:
        for c in doc["nftables"] if isinstance(doc, dict) else []:
            if "list" in c:
                listed_on.append((threading.current_thread().name, next(iter(c["list"]))))
        return pre_kernel(doc)

    plain, pre = Firewall(cfg(), nft=plain_kernel), Firewall(cfg(), nft=runner)
    pre.prefetch()
    assert pre.sync_state(desired) == plain.sync_state(desired) == 3
    assert pre._prefetch is None  # taken by the first sync
    assert listed_on[0] == ("nft-prefetch", "ruleset")  # the structure, listed on its thread
    assert [w for _, w in listed_on] == ["ruleset", "table"]  # then (a custom runner) the elements
    assert pre_kernel.transactions[-1] == plain_kernel.transactions[-1]
    assert pre.reads == plain.reads == 1 and pre.listings == plain.listings  # one read, not two
    assert pre_kernel.tables == plain_kernel.tables
