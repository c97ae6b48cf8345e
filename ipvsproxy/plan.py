"""The planner: (desired, observed) -> the minimal ordered list of operations.

Pure. It never proposes a change to something ipvsproxy does not own (a
virtual server without the ownership mark, or inside --exclude-cidrs), except
taking over a foreign virtual server that sits on an address a Service now
claims, which it marks with a note (OpNote.ADOPT) so the caller logs it.

TCP real servers that are no longer wanted are drained (weight 0) and removed
once they have no active connections or their grace period has run out; UDP and
SCTP real servers go at once. `scope` limits the work to the virtual servers
that changed, so a one-endpoint change costs one comparison, not a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from .model import (
    FULL,
    DesiredState,
    ObservedReal,
    ObservedState,
    ObservedVS,
    Protocol,
    Real,
    Scope,
    ServiceRef,
    VirtualServer,
    VSKey,
    join_host_port,
)


class DrainKey(NamedTuple):
    """One draining real server of one virtual server."""

    key: VSKey
    address: str
    port: int


class OpKind(StrEnum):
    BIND = "bind"
    ADD_VS = "add-vs"
    EDIT_VS = "edit-vs"
    ADD_RS = "add-rs"
    EDIT_RS = "edit-rs"
    DEL_RS = "del-rs"
    DEL_VS = "del-vs"
    UNBIND = "unbind"


class OpNote(StrEnum):
    """Why an operation is there, where that matters to the caller (and to the log)."""

    NONE = ""
    DRAIN = "drain"  # a TCP real server set to weight 0: the reconciler times its drain
    DRAINED = "drained"  # a drained real server deleted
    RESTORE = "restore"  # a draining real server wanted again
    FLUSH = "flush"  # a UDP/SCTP real server deleted at once: its conntrack entries go too
    ADOPT = "adopt foreign"  # a foreign virtual server on an address a Service claims, taken over


@dataclass(frozen=True, slots=True)
class Op:
    """One change to the dataplane.

    Six slots: a cold start at 20,000 Services plans 342,000 of these, and they are the
    agent's memory peak (a seventh slot for the Service was 2.6 MiB of it); the Service is
    the desired virtual server's, which every operation on one carries."""

    kind: OpKind
    key: VSKey | None = None
    # The desired virtual server the operation works on: add-vs/edit-vs take its settings;
    # on a real server it only names the Service (None: a virtual server nobody wants).
    vs: VirtualServer | None = None
    real: Real | None = None
    address: str | None = None
    note: OpNote = OpNote.NONE

    @property
    def service(self) -> ServiceRef | None:
        return self.vs.service if self.vs is not None else None

    def __str__(self) -> str:
        if self.kind in (OpKind.BIND, OpKind.UNBIND):
            return f"{self.kind} {self.address}"
        text = f"{self.kind} {self.key}"
        if self.vs is not None and self.real is None:
            text += f" {self.vs.scheduler}"
            if self.vs.flags:
                text += f" flags={self.vs.flags:#x}"
            if self.vs.timeout:
                text += f" persistent={self.vs.timeout}s"
        if self.real is not None:
            text += f" -> {join_host_port(self.real.address, self.real.port)} w={self.real.weight}"
        if self.service is not None:
            text += f" ({self.service})"
        if self.note:
            text += f" [{self.note}]"
        return text


@dataclass(frozen=True, slots=True)
class DrainPolicy:
    """When a draining TCP real server may finally go."""

    grace: float = 30.0
    now: float = 0.0
    started: Mapping[DrainKey, float] | None = None  # drain start per real (monotonic)

    def expired(self, key: DrainKey) -> bool:
        start = (self.started or {}).get(key)
        return start is not None and self.now - start >= self.grace


def _plan_reals(vs: VirtualServer, obs: ObservedVS | None, drain: DrainPolicy,
                out: Mapping[OpKind, list[Op]]) -> None:
    """Append the real-server operations of one virtual server to `out` (by kind), each kind's
    in address order (what plan() promises, without sorting every operation at the end)."""
    have: Mapping[tuple[str, int], ObservedReal] = obs.reals if obs else {}
    if len(have) == len(vs.reals) and all(  # the common case of a full sync: nothing differs (reals
            (o := have.get((r.address, r.port))) is not None and o.weight == r.weight for r in vs.reals):  # unique)
        return
    key = vs.key
    add, edit = out[OpKind.ADD_RS], out[OpKind.EDIT_RS]
    edits = len(edit)
    want = {(r.address, r.port): r for r in vs.reals}
    for r in sorted(want.values()):
        o = have.get((r.address, r.port))
        if o is None:
            add.append(Op(OpKind.ADD_RS, key, real=r, vs=vs))
        elif o.weight != r.weight:
            note = OpNote.RESTORE if o.weight == 0 else OpNote.NONE
            edit.append(Op(OpKind.EDIT_RS, key, real=r, vs=vs, note=note))
    gone = [addr_port for addr_port in have if addr_port not in want]  # none, on a resync of a good table
    if not gone:
        return
    tcp = key.protocol == Protocol.TCP
    delete = out[OpKind.DEL_RS]
    edited = len(edit)
    for addr_port in sorted(gone):
        o = have[addr_port]
        real = Real(o.address, o.port, 0)
        if not tcp:
            delete.append(Op(OpKind.DEL_RS, key, real=real, vs=vs, note=OpNote.FLUSH))
        elif o.active == 0 or drain.expired(DrainKey(key, o.address, o.port)):
            note = OpNote.DRAINED if o.weight == 0 else OpNote.NONE
            delete.append(Op(OpKind.DEL_RS, key, real=real, vs=vs, note=note))
        elif o.weight != 0:
            edit.append(Op(OpKind.EDIT_RS, key, real=real, vs=vs, note=OpNote.DRAIN))
    if edits < edited < len(edit):  # weight changes and drains of one VS: one address order
        edit[edits:] = sorted(edit[edits:], key=_by_real)


def _by_real(op: Op) -> Real | tuple[()]:
    return op.real or ()


def plan(
    desired: DesiredState,
    observed: ObservedState,
    *,
    scope: Scope = FULL,
    excluded: Callable[[str], bool] = lambda address: False,
    drain: DrainPolicy | None = None,
    all_addresses: bool = False,
) -> list[Op]:
    """Operations that turn `observed` into `desired`, in a safe order.

    Order: bind addresses, add/edit virtual servers, add/edit real servers,
    delete real servers, delete virtual servers, unbind addresses, so that a
    virtual server never exists without its address and an address is never
    taken away from a live virtual server. Within a kind, by virtual server,
    then address (deterministic, so a dry run prints the same plan twice).

    With a scope, only those virtual servers and the addresses they sit on
    are compared (an incremental sync); with FULL, everything (a full sync,
    which also repairs addresses bound or lost behind our back). `all_addresses`: every
    address compared, with only the scope's virtual servers (the rolling drift check's last step).
    """
    drain = drain or DrainPolicy()
    keys = set(desired.services) | set(observed.services) if scope is FULL else set(scope)
    bind, unbind = desired.address_changes(observed.addresses, FULL if scope is FULL or all_addresses else keys)
    # One list per kind, filled in key order: concatenated, they are in plan order without a
    # sort of every operation (a tuple key per operation was half of a cold plan's time).
    out: dict[OpKind, list[Op]] = {k: [] for k in OpKind}
    for key in sorted(keys):
        if excluded(key.address):
            continue
        vs, obs = desired.services.get(key), observed.services.get(key)
        if vs is None:
            if obs is not None and obs.owned:
                out[OpKind.DEL_VS].append(Op(OpKind.DEL_VS, key))
            continue
        if obs is None:
            out[OpKind.ADD_VS].append(Op(OpKind.ADD_VS, key, vs=vs))
        elif not obs.owned:
            out[OpKind.EDIT_VS].append(Op(OpKind.EDIT_VS, key, vs=vs, note=OpNote.ADOPT))
        elif obs.settings() != vs.settings():
            out[OpKind.EDIT_VS].append(Op(OpKind.EDIT_VS, key, vs=vs))
        _plan_reals(vs, obs, drain, out)
    out[OpKind.BIND] = [Op(OpKind.BIND, address=a) for a in sorted(bind) if not excluded(a)]
    # as for unbind: an excluded address bound now could never go
    out[OpKind.UNBIND] = [Op(OpKind.UNBIND, address=a) for a in sorted(unbind) if not excluded(a)]
    return [op for kind in OpKind for op in out[kind]]


def pending_drains(desired: DesiredState, observed: ObservedState) -> list[DrainKey]:
    """TCP real servers still draining (weight 0, unwanted, connections left)."""
    out = []
    for key, obs in observed.services.items():
        zero = [ap for ap, o in obs.reals.items() if o.weight == 0]  # none, in most virtual servers
        if not zero:
            continue
        vs = desired.services.get(key)
        if vs is None or not obs.owned:
            continue
        want = {(r.address, r.port) for r in vs.reals}
        out += [DrainKey(key, a, p) for a, p in zero if (a, p) not in want]
    return out


def apply_op(state: ObservedState, op: Op) -> None:
    """Mirror one successful operation into an observed state (in place).

    The in-memory dataplane is this function; the reconciler uses it to keep
    its cached view of the kernel current between full dumps.
    """
    key = op.key
    if op.kind is OpKind.BIND and op.address:
        state.addresses.add(op.address)
    elif op.kind is OpKind.UNBIND and op.address:
        state.addresses.discard(op.address)
    elif key is None:
        return
    elif op.kind in (OpKind.ADD_VS, OpKind.EDIT_VS) and op.vs is not None:
        old = state.services.get(key)
        state.services[key] = ObservedVS(
            key, op.vs.scheduler, op.vs.kernel_flags, op.vs.timeout,
            old.reals if old else {}, old.stats if old else {},
        )
    elif op.kind is OpKind.DEL_VS:
        state.services.pop(key, None)
    elif op.real is not None and key in state.services:
        reals = state.services[key].reals
        rk = (op.real.address, op.real.port)
        if op.kind is OpKind.DEL_RS:
            reals.pop(rk, None)
        elif rk in reals:
            reals[rk].weight = op.real.weight
        else:
            reals[rk] = ObservedReal(op.real.address, op.real.port, op.real.weight)
