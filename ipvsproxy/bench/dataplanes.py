"""Dataplane wrappers for measuring: timing proxies and a sink with no table.

:class:`Timed` forwards to any dataplane and accounts the time spent in it
(and how many virtual servers were read back), so a sync's duration can be
split into control-plane work (translate, plan, bookkeeping) and dataplane
work (the kernel, or the in-memory model's copying); :class:`TimedFirewall`
does the same for the nftables companion, which `ipvsproxy run` ships on
and which runs inside every sync. :class:`Sink` accepts
everything and keeps nothing: the RSS probe uses it so the kernel's copy of
the table is not counted as the agent's memory. :func:`open_instrumented` is the kernel dataplane
with its netlink exchanges timed (`run --timings`, the kernel benchmark).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

from ..config import AgentConfig
from ..dataplane.base import Counters, Dataplane, Failure
from ..model import Delta, ObservedState, ObservedVS, VSKey
from ..plan import Op
from ..reconcile import Firewall


class Timed:
    """A dataplane that times its inner one (implements the Dataplane protocol)."""

    def __init__(self, inner: Dataplane) -> None:
        self.inner = inner
        self.seconds = {"observe": 0.0, "observe_keys": 0.0, "apply": 0.0}
        self.read_keys = 0

    @property
    def counters(self) -> Counters:
        return self.inner.counters

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        for k in self.seconds:
            self.seconds[k] = 0.0
        self.read_keys = 0

    def setup(self) -> None:
        self.inner.setup()

    def observe(self) -> ObservedState:
        t = time.perf_counter()
        try:
            return self.inner.observe()
        finally:
            self.seconds["observe"] += time.perf_counter() - t

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        keys = list(keys)
        self.read_keys += len(keys)
        t = time.perf_counter()
        try:
            return self.inner.observe_keys(keys)
        finally:
            self.seconds["observe_keys"] += time.perf_counter() - t

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        t = time.perf_counter()
        try:
            return self.inner.apply(ops)
        finally:
            self.seconds["apply"] += time.perf_counter() - t

    def scheduler_usable(self, name: str) -> bool:
        return self.inner.scheduler_usable(name)

    def local_addresses(self) -> set[str]:
        return self.inner.local_addresses()

    def bound_addresses(self) -> set[str]:
        return self.inner.bound_addresses()

    def remove_interface(self) -> bool:
        return self.inner.remove_interface()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # wire, ipr, state ... of the inner dataplane
        return getattr(self.inner, name)


class TimedFirewall:
    """A firewall (the reconciler's Firewall protocol) that times its inner one."""

    def __init__(self, inner: Firewall) -> None:
        self.inner = inner
        self.seconds = 0.0

    def sync(self, delta: Delta, full: bool = False) -> int:
        t = time.perf_counter()
        try:
            return self.inner.sync(delta, full)
        finally:
            self.seconds += time.perf_counter() - t

    def check_step(self, budget: int) -> int:
        t = time.perf_counter()
        try:
            return self.inner.check_step(budget)
        finally:
            self.seconds += time.perf_counter() - t

    @property
    def behind(self) -> bool:
        return self.inner.behind

    def __getattr__(self, name: str) -> Any:  # reads, transactions ... of the inner firewall
        return getattr(self.inner, name)


class Sink:
    """Accepts every operation, stores nothing, always observes an empty table."""

    def __init__(self) -> None:
        self.counters = Counters()

    def setup(self) -> None:
        pass

    def observe(self) -> ObservedState:
        self.counters.dumps += 1
        return ObservedState()

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        return dict.fromkeys(keys)

    def service_key_pages(self) -> Generator[list[VSKey] | None, None, None]:
        yield from ()

    def service_stats(self) -> dict[VSKey, tuple[bool, Mapping[str, int]]]:
        return {}

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        for op in ops:
            self.counters.ops[op.kind.value] += 1
        self.counters.messages += len(ops)
        self.counters.round_trips += 1 if ops else 0
        return []

    def scheduler_usable(self, name: str) -> bool:
        return True

    def local_addresses(self) -> set[str]:
        return set()

    def bound_addresses(self) -> set[str]:
        return set()

    def remove_interface(self) -> bool:
        return False

    def close(self) -> None:
        pass


class TimedWire:
    """A netlink codec (IPVS or addresses) whose `execute` is timed into `acc[key]`;
    handed to NetlinkDataplane as its wire, so nothing private is patched."""

    def __init__(self, inner: Any, acc: dict[str, float], key: str) -> None:
        self.inner, self.acc, self.key = inner, acc, key

    def execute(self, requests: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.inner.execute(requests)
        finally:
            self.acc[self.key] += time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:  # counters, dumps, close ... of the inner codec
        return getattr(self.inner, name)


def open_instrumented(cfg: AgentConfig) -> tuple[Any, dict[str, float]]:
    """A NetlinkDataplane on `cfg` whose apply splits into IPVS netlink (encode + kernel) and
    address binding. Here, not in bench/kernel.py, so `run --timings` (the process-start child)
    does not import the synthetic-cluster generator and count it as its own set-up."""
    from ..dataplane.addr_wire import AddrWire
    from ..dataplane.ipvs_wire import IPVSWire
    from ..dataplane.netlink import HOST_MODULES, NetlinkDataplane

    HOST_MODULES.load("ip_vs")  # before the IPVS socket opens (NetlinkDataplane would do it for its own)
    acc = {"ipvs_netlink_s": 0.0, "addresses_s": 0.0}
    dp = NetlinkDataplane(cfg, wire=TimedWire(IPVSWire(), acc, "ipvs_netlink_s"),  # type: ignore[arg-type]
                          addr=TimedWire(AddrWire(), acc, "addresses_s"))  # type: ignore[arg-type]
    return dp, acc
