"""An in-memory dataplane: the kernel's IPVS table as a Python dict.

Used by unit tests, --dry-run planning on machines without IPVS, and the
benchmark's control-plane scenarios. It models exactly what the planner's
apply_op models; every behaviour here also has a kernel test in tests/kernel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..model import ObservedState, ObservedVS, VSKey
from ..plan import Op, OpKind, apply_op
from .base import Counters, Failure


class MemoryDataplane:
    """Holds an ObservedState; `fail` lets tests make chosen operations fail."""

    def __init__(
        self,
        state: ObservedState | None = None,
        *,
        schedulers: set[str] | None = None,
        fail: Callable[[Op], str | None] | None = None,
    ) -> None:
        self.state = state or ObservedState()
        self.counters = Counters()
        self.schedulers = schedulers
        self.fail = fail
        self.interface = False
        self.local: set[str] = set()  # the node's own addresses (other interfaces), as a test sets them

    def setup(self) -> None:
        self.interface = True

    def observe(self) -> ObservedState:
        self.counters.dumps += 1
        return copy.deepcopy(self.state)

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        out: dict[VSKey, ObservedVS | None] = {}
        for key in keys:
            vs = self.state.services.get(key)
            out[key] = copy.deepcopy(vs) if vs is not None else None
        return out

    def service_stats(self) -> dict[VSKey, tuple[bool, Mapping[str, int]]]:
        self.counters.dumps += 1
        return {k: (vs.owned, dict(vs.stats)) for k, vs in self.state.services.items()}

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        failures = []
        for op in ops:
            problem = self.fail(op) if self.fail else None
            if problem is None and op.kind is OpKind.ADD_VS and op.key in self.state.services:
                problem = "File exists"
            if problem:
                failures.append(Failure(op, f"{op}: {problem}"))
                continue
            apply_op(self.state, op)
            self.counters.ops[op.kind.value] += 1
            self.counters.messages += 1
        if ops:
            self.counters.round_trips += 1
        return failures

    def scheduler_usable(self, name: str) -> bool:
        return self.schedulers is None or name in self.schedulers

    def local_addresses(self) -> set[str]:
        return set(self.local)

    def remove_interface(self) -> bool:
        had, self.interface = self.interface, False
        self.state.addresses.clear()
        return had

    def close(self) -> None:
        pass
