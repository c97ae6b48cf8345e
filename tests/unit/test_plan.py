"""The planner: minimal ops, drains, ownership, exclusions, scope and order."""

from __future__ import annotations

import copy

import pytest

from ipvsproxy.model import (
    AF_INET,
    F_OWNED,
    F_PERSISTENT,
    F_SCHED1,
    F_SCHED2,
    DesiredState,
    ObservedReal,
    ObservedState,
    ObservedVS,
    Real,
    ServiceRef,
    VirtualServer,
    VSKey,
)
from ipvsproxy.plan import DrainPolicy, Op, OpKind, apply_op, pending_drains, plan
from tests.unit.factories import SCTP, TCP, UDP, CountingAddresses

K1 = VSKey(AF_INET, TCP, "10.96.0.1", 80)
K2 = VSKey(AF_INET, TCP, "10.96.0.2", 80)
KU = VSKey(AF_INET, UDP, "10.96.0.3", 53)
KS = VSKey(AF_INET, SCTP, "10.96.0.4", 3868)
REF = ServiceRef("default", "web", "http", "ClusterIP")


def vs(key: VSKey = K1, *ips: str, sched: str = "rr", flags: int = 0, timeout: int = 0,
       weight: int = 1) -> VirtualServer:
    return VirtualServer(key, sched, flags, timeout, tuple(Real(ip, 8080, weight) for ip in ips), REF)


def desired(*servers: VirtualServer, addresses: tuple[str, ...] | None = None) -> DesiredState:
    addrs = addresses if addresses is not None else tuple({s.key.address for s in servers})
    return DesiredState.of(servers, addrs)


def observed_of(d: DesiredState) -> ObservedState:
    """What the kernel holds after `d` was applied."""
    obs = ObservedState()
    for op in plan(d, obs):
        apply_op(obs, op)
    return obs


def kinds(ops: list[Op]) -> list[OpKind]:
    return [op.kind for op in ops]


def foreign(key: VSKey, *ips: str, sched: str = "wlc") -> ObservedVS:
    return ObservedVS(key, sched, 0, 0, {(ip, 8080): ObservedReal(ip, 8080, 1) for ip in ips})


# ---- basics ---------------------------------------------------------------------


def test_empty_to_desired_then_no_change() -> None:
    d = desired(vs(K1, "10.1.0.1", "10.1.0.2"), vs(KU, "10.1.0.1"))
    ops = plan(d, ObservedState())
    assert kinds(ops) == [OpKind.BIND, OpKind.BIND, OpKind.ADD_VS, OpKind.ADD_VS,
                          OpKind.ADD_RS, OpKind.ADD_RS, OpKind.ADD_RS]
    obs = ObservedState()
    for op in ops:
        apply_op(obs, op)
    assert plan(d, obs) == []
    assert all(o.flags & F_OWNED for o in obs.services.values())
    assert obs.addresses == {"10.96.0.1", "10.96.0.3"}


def test_one_endpoint_added_is_one_op() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1"), vs(K2, "10.1.0.1")))
    ops = plan(desired(vs(K1, "10.1.0.1", "10.1.0.2"), vs(K2, "10.1.0.1")), obs)
    assert len(ops) == 1
    assert ops[0].kind is OpKind.ADD_RS and ops[0].key == K1 and ops[0].real == Real("10.1.0.2", 8080, 1)
    assert ops[0].service == REF


def test_one_idle_endpoint_removed_is_one_delete() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1", "10.1.0.2")))
    ops = plan(desired(vs(K1, "10.1.0.1")), obs)
    assert len(ops) == 1
    assert ops[0].kind is OpKind.DEL_RS and ops[0].real is not None and ops[0].real.address == "10.1.0.2"


def test_weight_change_is_edit_rs() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1")))
    ops = plan(desired(vs(K1, "10.1.0.1", weight=5)), obs)
    assert kinds(ops) == [OpKind.EDIT_RS] and ops[0].real == Real("10.1.0.1", 8080, 5) and ops[0].note == ""


def test_as_many_real_servers_as_wanted_is_not_the_same_real_servers() -> None:
    """A virtual server whose real servers all match is skipped without a diff; one with as
    many real servers as wanted but another one in place of a wanted one, or one weight
    different, is still diffed in full."""
    obs = observed_of(desired(vs(K1, "10.1.0.1", "10.1.0.2"), vs(K2, "10.1.0.1", "10.1.0.2")))
    ops = plan(desired(vs(K1, "10.1.0.1", "10.1.0.3"), vs(K2, "10.1.0.1", "10.1.0.2")), obs)
    assert [(op.kind, op.key, op.real.address if op.real else None) for op in ops] == [
        (OpKind.ADD_RS, K1, "10.1.0.3"), (OpKind.DEL_RS, K1, "10.1.0.2")]
    obs.services[K2].reals[("10.1.0.2", 8080)] = ObservedReal("10.1.0.2", 8080, 3)
    ops = plan(desired(vs(K1, "10.1.0.1", "10.1.0.2"), vs(K2, "10.1.0.1", "10.1.0.2")), obs)
    assert [(op.kind, op.key, op.real) for op in ops] == [(OpKind.EDIT_RS, K2, Real("10.1.0.2", 8080, 1))]


# ---- drains -----------------------------------------------------------------------


def _with_active(obs: ObservedState, key: VSKey, ip: str, active: int, weight: int | None = None) -> None:
    r = obs.services[key].reals[(ip, 8080)]
    r.active = active
    if weight is not None:
        r.weight = weight


def test_tcp_removal_with_active_connections_drains_then_deletes() -> None:
    d_before = desired(vs(K1, "10.1.0.1", "10.1.0.2"))
    d_after = desired(vs(K1, "10.1.0.1"))
    obs = observed_of(d_before)
    _with_active(obs, K1, "10.1.0.2", 3)
    ops = plan(d_after, obs)
    assert len(ops) == 1
    assert (ops[0].kind, ops[0].real, ops[0].note) == (OpKind.EDIT_RS, Real("10.1.0.2", 8080, 0), "drain")
    apply_op(obs, ops[0])
    assert obs.services[K1].reals[("10.1.0.2", 8080)].weight == 0
    # still connections, grace not expired: nothing to do, and it is a pending drain
    assert plan(d_after, obs) == []
    assert pending_drains(d_after, obs) == [(K1, "10.1.0.2", 8080)]
    # connections gone: delete
    _with_active(obs, K1, "10.1.0.2", 0)
    ops = plan(d_after, obs)
    assert [(op.kind, op.note) for op in ops] == [(OpKind.DEL_RS, "drained")]
    apply_op(obs, ops[0])
    assert plan(d_after, obs) == [] and pending_drains(d_after, obs) == []


def test_drain_grace_expiry_deletes_despite_connections() -> None:
    d = desired(vs(K1, "10.1.0.1"))
    obs = observed_of(desired(vs(K1, "10.1.0.1", "10.1.0.2")))
    _with_active(obs, K1, "10.1.0.2", 7, weight=0)
    started = {(K1, "10.1.0.2", 8080): 100.0}
    assert plan(d, obs, drain=DrainPolicy(30.0, 129.9, started)) == []
    ops = plan(d, obs, drain=DrainPolicy(30.0, 130.0, started))
    assert kinds(ops) == [OpKind.DEL_RS]
    # no recorded start: never expires by time
    assert plan(d, obs, drain=DrainPolicy(0.0, 1e9, {})) == []


def test_active_but_expired_while_still_weighted_deletes() -> None:
    d = desired(vs(K1))
    obs = observed_of(desired(vs(K1, "10.1.0.2")))
    _with_active(obs, K1, "10.1.0.2", 2)
    ops = plan(d, obs, drain=DrainPolicy(1.0, 10.0, {(K1, "10.1.0.2", 8080): 0.0}))
    assert kinds(ops) == [OpKind.DEL_RS]


@pytest.mark.parametrize("key", [KU, KS], ids=["udp", "sctp"])
def test_udp_sctp_removal_deletes_at_once_with_flush(key: VSKey) -> None:
    obs = observed_of(desired(vs(key, "10.1.0.1", "10.1.0.2")))
    _with_active(obs, key, "10.1.0.2", 9)
    ops = plan(desired(vs(key, "10.1.0.1")), obs)
    assert [(op.kind, op.note) for op in ops] == [(OpKind.DEL_RS, "flush")]


def test_restore_drained_endpoint_edits_weight_back() -> None:
    d = desired(vs(K1, "10.1.0.1", "10.1.0.2"))
    obs = observed_of(d)
    _with_active(obs, K1, "10.1.0.2", 4, weight=0)
    ops = plan(d, obs)
    assert [(op.kind, op.real, op.note) for op in ops] == [(OpKind.EDIT_RS, Real("10.1.0.2", 8080, 1), "restore")]


# ---- ownership --------------------------------------------------------------------


def test_foreign_vs_never_touched_when_not_claimed() -> None:
    obs = ObservedState({K2: foreign(K2, "10.9.0.1")})
    before = copy.deepcopy(obs)
    assert plan(DesiredState(), obs) == []
    assert plan(desired(vs(K1, "10.1.0.1")), obs, scope=[K1, K2]) == plan(desired(vs(K1, "10.1.0.1")),
                                                                          ObservedState())
    assert obs == before


def test_foreign_vs_claimed_is_adopted_with_a_note() -> None:
    obs = ObservedState({K1: foreign(K1, "10.9.0.1", "10.1.0.1")})
    d = desired(vs(K1, "10.1.0.1"), addresses=())
    ops = plan(d, obs)
    assert [(op.kind, op.note) for op in ops] == [(OpKind.EDIT_VS, "adopt foreign"), (OpKind.DEL_RS, "")]
    assert ops[0].vs is not None and ops[0].vs.kernel_flags & F_OWNED
    for op in ops:
        apply_op(obs, op)
    assert obs.services[K1].owned and plan(d, obs) == []


def test_foreign_vs_with_same_settings_is_still_adopted() -> None:
    obs = ObservedState({K1: ObservedVS(K1, "rr", 0, 0, {("10.1.0.1", 8080): ObservedReal("10.1.0.1", 8080, 1)})})
    ops = plan(desired(vs(K1, "10.1.0.1"), addresses=()), obs)
    assert [(op.kind, op.note) for op in ops] == [(OpKind.EDIT_VS, "adopt foreign")]


def test_owned_vs_no_longer_desired_is_deleted() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1"), vs(K2)))
    ops = plan(desired(vs(K2)), obs)
    assert [(op.kind, op.key or op.address) for op in ops] == [(OpKind.DEL_VS, K1), (OpKind.UNBIND, "10.96.0.1")]


def test_foreign_address_on_other_interfaces_is_not_our_business() -> None:
    # addresses in ObservedState are those on our interface; a desired address
    # already there is not re-bound.
    obs = ObservedState(addresses={"10.96.0.1"})
    assert OpKind.BIND not in kinds(plan(desired(vs(K1)), obs))


# ---- exclusions and scope -------------------------------------------------------------


def test_excluded_keys_untouched_even_if_desired() -> None:
    excluded = {"10.96.0.1"}.__contains__
    owned_obs = observed_of(desired(vs(K1, "10.1.0.1")))
    assert plan(DesiredState(), owned_obs, excluded=excluded) == []
    assert plan(desired(vs(K1, "10.1.0.2"), addresses=()), owned_obs, excluded=excluded) == []
    assert plan(desired(vs(K1, "10.1.0.2")), ObservedState(), excluded=excluded) == []
    foreign_obs = ObservedState({K1: foreign(K1, "10.9.0.1")})
    assert plan(desired(vs(K1, "10.1.0.1"), addresses=()), foreign_obs, excluded=excluded) == []
    # other keys still planned
    ops = plan(desired(vs(K1), vs(K2), addresses=()), ObservedState(), excluded=excluded)
    assert [op.key for op in ops] == [K2]


def test_excluded_addresses_neither_bound_nor_unbound() -> None:
    excluded = {"10.96.0.1"}.__contains__
    assert plan(DesiredState(addresses={"10.96.0.1"}), ObservedState(), excluded=excluded) == []
    assert plan(DesiredState(), ObservedState(addresses={"10.96.0.1"}), excluded=excluded) == []


def test_scope_limits_vs_work() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1"), vs(K2, "10.1.0.1")))
    d = desired(vs(K1, "10.1.0.9"), vs(K2, "10.1.0.9"))
    ops = plan(d, obs, scope=[K2])
    assert {op.key for op in ops} == {K2} and len(ops) == 2
    assert len(plan(d, obs)) == 4
    assert plan(d, obs, scope=[]) == []


def test_scope_with_key_neither_side_knows() -> None:
    assert plan(DesiredState(), ObservedState(), scope=[K1]) == []


def test_scope_limits_address_work_full_plan_repairs_everything() -> None:
    # K2's address went missing and a stray address appeared behind our back:
    # a scoped (incremental) plan for K1 leaves both alone, a full plan repairs both.
    d = desired(vs(K1, "10.1.0.1"), vs(K2, "10.1.0.1"))
    obs = observed_of(d)
    obs.addresses.discard(K2.address)
    obs.addresses.add("10.96.0.99")
    assert plan(d, obs, scope=[K1]) == []
    assert [(op.kind, op.address) for op in plan(d, obs, scope=[K2])] == [(OpKind.BIND, K2.address)]
    assert [(op.kind, op.address) for op in plan(d, obs)] == [
        (OpKind.BIND, K2.address), (OpKind.UNBIND, "10.96.0.99")]
    # a scoped key whose Service went away still unbinds its own address
    gone = desired(vs(K2, "10.1.0.1"))
    assert [(op.kind, op.key or op.address) for op in plan(gone, observed_of(d), scope=[K1])] == [
        (OpKind.DEL_VS, K1), (OpKind.UNBIND, K1.address)]


def test_scoped_plan_examines_only_scoped_addresses() -> None:
    servers = [vs(VSKey(AF_INET, TCP, f"10.96.{i // 250}.{i % 250 + 1}", 80), "10.1.0.1")
               for i in range(2000)]
    d = desired(*servers)
    obs = observed_of(d)
    d.addresses, obs.addresses = CountingAddresses(d.addresses), CountingAddresses(obs.addresses)
    new = vs(servers[7].key, "10.1.0.1", "10.1.0.2")
    d.services[new.key] = new
    ops = plan(d, obs, scope=[new.key])
    assert [op.kind for op in ops] == [OpKind.ADD_RS]
    assert d.addresses.lookups + obs.addresses.lookups <= 4  # one address (twice each), not 2,000


# ---- order ----------------------------------------------------------------------------


def test_bind_before_add_vs_and_del_vs_before_unbind() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1", "10.1.0.2"), vs(K2, "10.1.0.1")))
    obs.addresses.add("10.96.0.99")
    d = desired(vs(K1, "10.1.0.1", "10.1.0.3"), vs(KU, "10.1.0.1"))
    ops = plan(d, obs)
    order = kinds(ops)
    assert order == [OpKind.BIND, OpKind.ADD_VS, OpKind.ADD_RS, OpKind.ADD_RS, OpKind.DEL_RS,
                     OpKind.DEL_VS, OpKind.UNBIND, OpKind.UNBIND]
    assert ops[0].address == "10.96.0.3" and ops[1].key == KU
    assert {op.address for op in ops if op.kind is OpKind.UNBIND} == {"10.96.0.2", "10.96.0.99"}
    # the ops are sorted by the documented order, whatever the input
    assert [op.kind for op in ops] == sorted(order, key=list(OpKind).index)


def test_plan_is_deterministic() -> None:
    servers = [vs(VSKey(AF_INET, TCP, f"10.96.1.{i}", 80), f"10.1.0.{i}") for i in range(1, 30)]
    a = plan(desired(*servers), ObservedState())
    b = plan(desired(*reversed(servers)), ObservedState())
    assert a == b


def test_plan_order_is_kind_then_virtual_server_then_address() -> None:
    """The order plan() builds per kind equals one sort of every operation by (kind, key, address,
    real server), as it was computed before the per-kind lists, with weight changes and drains of
    one virtual server interleaved by address, on unsorted input."""
    import random

    rng = random.Random(3)
    keys = [VSKey(AF_INET, rng.choice((TCP, UDP)), f"10.96.{rng.randrange(4)}.{i}", 80) for i in range(40)]
    ips = [f"10.1.{rng.randrange(3)}.{i}" for i in range(60)]
    before = desired(*(vs(k, *rng.sample(ips, 6)) for k in keys[:30]))
    obs = observed_of(before)
    for o in obs.services.values():
        for r in o.reals.values():
            r.active = rng.choice((0, 0, 3))
            r.weight = rng.choice((1, 1, 0))
    servers = [VirtualServer(k, "rr", 0, 0, tuple(Real(ip, 8080, rng.choice((1, 2)))
                                                  for ip in rng.sample(ips, 6)), REF) for k in keys[10:]]
    rng.shuffle(servers)
    ops = plan(DesiredState.of(servers, [s.key.address for s in servers[:25]]), obs)
    order = list(OpKind)
    assert ops == sorted(ops, key=lambda op: (order.index(op.kind), op.key or (), op.address or "", op.real or ()))
    assert {OpKind.ADD_RS, OpKind.EDIT_RS, OpKind.DEL_RS, OpKind.DEL_VS, OpKind.UNBIND} <= set(kinds(ops))


# ---- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("new", [
    vs(K1, "10.1.0.1", sched="lc"),
    vs(K1, "10.1.0.1", sched="sh", flags=F_SCHED1),
    vs(K1, "10.1.0.1", timeout=60),
], ids=["scheduler", "flags", "persistence"])
def test_settings_change_is_edit_vs(new: VirtualServer) -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1")))
    ops = plan(desired(new), obs)
    assert [(op.kind, op.note) for op in ops] == [(OpKind.EDIT_VS, "")]
    apply_op(obs, ops[0])
    assert plan(desired(new), obs) == []


def test_flag_and_timeout_changes_on_persistent_vs() -> None:
    base = vs(K1, sched="sh", flags=F_SCHED1, timeout=60)
    obs = observed_of(desired(base))
    assert obs.services[K1].flags == F_SCHED1 | F_OWNED | F_PERSISTENT
    for new in (vs(K1, sched="sh", flags=F_SCHED2, timeout=60), vs(K1, sched="sh", flags=F_SCHED1, timeout=61),
                vs(K1, sched="sh", flags=F_SCHED1)):
        ops = plan(desired(new), obs)
        assert kinds(ops) == [OpKind.EDIT_VS], new


def test_observed_timeout_without_persistent_flag_is_not_a_difference() -> None:
    obs = observed_of(desired(vs(K1)))
    obs.services[K1].timeout = 300  # kernel reports a timeout; not persistent
    assert plan(desired(vs(K1)), obs) == []


# ---- apply_op and Op text -------------------------------------------------------------


def test_apply_op_edit_vs_keeps_reals() -> None:
    obs = observed_of(desired(vs(K1, "10.1.0.1")))
    apply_op(obs, Op(OpKind.EDIT_VS, K1, vs=vs(K1, sched="lc")))
    assert obs.services[K1].scheduler == "lc" and list(obs.services[K1].reals) == [("10.1.0.1", 8080)]


def test_op_text() -> None:
    ops = plan(desired(vs(K1, "10.1.0.1", sched="sh", flags=F_SCHED1, timeout=60)), ObservedState())
    assert [str(op) for op in ops] == [
        "bind 10.96.0.1",
        "add-vs TCP 10.96.0.1:80 sh flags=0x8 persistent=60s (default/web:http)",
        "add-rs TCP 10.96.0.1:80 -> 10.1.0.1:8080 w=1 (default/web:http)",
    ]
