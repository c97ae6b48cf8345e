"""An in-memory dataplane: the kernel's IPVS table as a Python dict.

Used by unit tests, --dry-run planning on machines without IPVS, and the
benchmark's control-plane scenarios. It is as strict as the kernel: each
operation is refused with the errno Linux's ip_vs_ctl.c (and rtnetlink) give
(kube-proxy's FakeIPVS, pyroute2's ipmock): adding what exists EEXIST, anything
on a virtual server that does not exist ESRCH, editing or deleting a real
server that does not exist ENOENT, an unknown scheduler ENOENT, binding a bound
address EEXIST, unbinding an unbound one EADDRNOTAVAIL. Refusals that mean the
aim already holds are success, by the same rule as the kernel dataplane
(base.harmless). tests/contract/test_dataplane_contract.py runs the same
scenarios against both.
"""

from __future__ import annotations

import copy
import errno
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence

from ..model import ObservedState, ObservedVS, VSKey
from ..plan import Op, OpKind, apply_op
from .base import Counters, Failure, describe_failure, harmless

# Keys per page of service_key_pages: about what one receive of the kernel's services dump
# holds (a reply skb of up to 32 KiB, ~300 bytes per service with its counters).
KEYS_PER_PAGE = 100


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

    def service_key_pages(self) -> Generator[list[VSKey] | None, None, None]:
        self.counters.dumps += 1
        keys = list(self.state.services)
        for i in range(0, len(keys), KEYS_PER_PAGE):
            yield keys[i:i + KEYS_PER_PAGE]

    def service_stats(self) -> dict[VSKey, tuple[bool, Mapping[str, int]]]:
        self.counters.dumps += 1
        return {k: (vs.owned, dict(vs.stats)) for k, vs in self.state.services.items()}

    def refusal(self, op: Op) -> int:
        """The errno the kernel would refuse `op` with against this table (0: it would not)."""
        if op.kind is OpKind.BIND:
            return errno.EEXIST if op.address in self.state.addresses else 0
        if op.kind is OpKind.UNBIND:
            return 0 if op.address in self.state.addresses else errno.EADDRNOTAVAIL
        if op.key is None:
            return errno.EINVAL
        vs = self.state.services.get(op.key)
        if op.kind is OpKind.ADD_VS:
            if vs is not None:
                return errno.EEXIST
            return 0 if op.vs is None or self.scheduler_usable(op.vs.scheduler) else errno.ENOENT
        if vs is None:  # ip_vs_ctl.c: no such service -> ESRCH, for itself and its destinations
            return errno.ESRCH
        if op.kind is OpKind.EDIT_VS:
            return 0 if op.vs is None or self.scheduler_usable(op.vs.scheduler) else errno.ENOENT
        if op.kind is OpKind.DEL_VS or op.real is None:
            return 0
        there = (op.real.address, op.real.port) in vs.reals
        if op.kind is OpKind.ADD_RS:
            return errno.EEXIST if there else 0
        return 0 if there else errno.ENOENT  # EDIT_RS, DEL_RS

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        failures = []
        for op in ops:
            problem = self.fail(op) if self.fail else None
            if problem:
                failures.append(Failure(op, f"{op}: {problem}"))
                continue
            self.counters.messages += 1
            code = self.refusal(op)
            if code and not harmless(op, code):
                failures.append(Failure(op, describe_failure(op, code), code))
                continue
            if op.kind is OpKind.BIND:
                self.interface = True
            if code and op.kind in (OpKind.BIND, OpKind.UNBIND):
                continue  # already (un)bound: nothing done, nothing counted (as the kernel dataplane)
            apply_op(self.state, op)
            self.counters.ops[op.kind.value] += 1
        if ops:
            self.counters.round_trips += 1
        return failures

    def scheduler_usable(self, name: str) -> bool:
        return self.schedulers is None or name in self.schedulers

    def local_addresses(self) -> set[str]:
        return set(self.local)

    def bound_addresses(self) -> set[str]:
        return set(self.state.addresses)

    def remove_interface(self) -> bool:
        had, self.interface = self.interface, False
        self.state.addresses.clear()
        return had

    def close(self) -> None:
        pass
