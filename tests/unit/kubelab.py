"""The agent on the in-process API stand-in (tests/apiserver.py), shared by the
unit tests of the API source (test_kube_source.py, test_kube_reflector.py; their
fixtures are in tests/unit/conftest.py).

`FAST` shrinks the source's backoff and watch lengths so real-thread tests take
seconds; `Pauses` replaces its pauses altogether where a test is about backoff:
it records what each watch thread was told to wait and returns at once, so the
backoff is checked from what was asked, not by sleeping to see it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipvsproxy.plan import Op, OpKind
from ipvsproxy.sources import kube
from tests import agentlab
from tests.agentlab import NODE, key, rs, wait_until
from tests.apiserver import FakeApiServer
from tests.unit.factories import node, service, slice_

__all__ = ["NODE", "key", "rs", "wait_until"]

# 0.05 s doubling to 0.4 s; watches asked for 100-200 s, which the stand-in (timeout_scale 0.02) ends in 2-4 s
FAST = kube.Timing(initial_backoff=0.05, max_backoff=0.4, watch_timeout=100)


class Pauses:
    """A KubeSource pause (kube.Timing.pause) that waits for nothing: it records the
    seconds each thread (watch-Service, ...) was told to wait and returns at once.
    After `hold_after` pauses a thread is held until `release()`, so a fault that
    never clears cannot spin it."""

    def __init__(self, hold_after: int = 1000) -> None:
        self.hold_after = hold_after
        self.asked: dict[str, list[float]] = {}
        self._cond = threading.Condition()
        self._released = threading.Event()

    def __call__(self, stop: threading.Event, seconds: float) -> bool:
        name = threading.current_thread().name
        with self._cond:
            asked = self.asked.setdefault(name, [])
            asked.append(seconds)
            self._cond.notify_all()
            held = len(asked) > self.hold_after
        if held:
            self._released.wait()
        return stop.is_set()

    def wait_for(self, thread: str, n: int, timeout: float = 5.0) -> list[float]:
        """The first pauses of `thread`, once it has asked for `n` of them."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.asked.get(thread, ())) >= n, timeout), \
                f"{thread} paused {len(self.asked.get(thread, ()))} times, not {n}"
            return list(self.asked[thread])

    def release(self) -> None:
        self._released.set()


class Live(agentlab.Live):
    """An Agent running against a FakeApiServer, on a RecordingDataplane."""

    def __init__(self, api: FakeApiServer, tmp_path: Path, *, timing: kube.Timing = FAST, **cfg: Any) -> None:
        self.api = api
        self.pauses = timing.pause if isinstance(timing.pause, Pauses) else None
        super().__init__(str(api.write_kubeconfig(tmp_path / "kubeconfig")), tmp_path, timing=timing, **cfg)

    def stop(self, within: float = 5.0) -> None:
        if self.pauses is not None:
            self.pauses.release()
        started = time.monotonic()
        super().stop(within)
        assert time.monotonic() - started < 4
        for t in self.agent.source._threads if self.agent.source else ():
            assert not t.is_alive(), f"{t.name} still running"

    def settle(self) -> None:
        """A forced full sync has started after everything so far, and finished (so nothing is pending)."""
        for _ in range(2):  # the first may join a sync already under way
            before = self.syncs
            self.agent.request_full()
            wait_until(lambda: self.syncs > before, what="a forced sync")  # noqa: B023
        wait_until(lambda: not self.agent.core.full_requested, what="sync started")

    def watch_requests(self, path: str) -> list[dict[str, str]]:
        return [q for m, p, q in list(self.api.requests) if m == "GET" and p == path and q.get("watch") == "true"]


def ip_slice(svc: str, ips: Sequence[str], **kw: Any) -> dict[str, Any]:
    return slice_(svc, list(ips), **kw)


def op_summary(ops: Sequence[Op]) -> list[tuple[str, str]]:
    out = []
    for op in ops:
        if op.kind in (OpKind.BIND, OpKind.UNBIND):
            out.append((op.kind.value, str(op.address)))
        elif op.real is not None:
            out.append((op.kind.value, f"{op.key.address}:{op.key.port} {op.real.address}"))  # type: ignore[union-attr]
        else:
            out.append((op.kind.value, f"{op.key.address}:{op.key.port}"))  # type: ignore[union-attr]
    return sorted(out)


def drop(api: FakeApiServer) -> None:
    """Cut every watch connection, once all three are open."""
    assert api.wait_for_watches(3)
    api.drop_watches()


def populate(api: FakeApiServer, names: Sequence[str] = ("a", "b", "c")) -> None:
    """Node n1 (192.0.2.1), and per name a Service 10.96.0.N:80 with a slice of one endpoint 10.0.N.1."""
    api.create(node(NODE))
    for i, name in enumerate(names, 1):
        api.create(service(name, cluster_ip=f"10.96.0.{i}"))
        api.create(ip_slice(name, [f"10.0.{i}.1"]))


def programmed(lv: Live, names: Sequence[str] = ("a", "b", "c")) -> None:
    want = {key(f"10.96.0.{i}"): rs(f"10.0.{i}.1") for i, _ in enumerate(names, 1)}
    wait_until(lambda: lv.dp.table() == want, what=f"{names} programmed")
