"""One contract, two dataplanes: every scenario runs against the in-memory
dataplane (on the host, unit stage) and the netlink dataplane on the real
kernel (in the IPVS test VM, kernel stage: `pytest -m kernel tests/contract`).

The in-memory model stands in for the kernel in every unit test, so it must
accept and refuse exactly what the kernel does, with the same errno: adding
what exists (EEXIST), anything on a missing virtual server (ESRCH), editing a
missing real server (ENOENT); deleting what is gone, binding a bound address
and unbinding an unbound one count as done on both.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator

import pytest

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.base import Dataplane, Failure
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, AF_INET6, F_OWNED, Real, ServiceKind, ServiceRef, VirtualServer, VSKey
from ipvsproxy.plan import Op, OpKind

DEV = "ipvsct0"  # the netlink variant's own dummy interface, deleted afterwards
REF = ServiceRef("contract", "svc", "p", ServiceKind.CLUSTER_IP)
A = VSKey(AF_INET, 6, "198.18.250.1", 80)
B = VSKey(AF_INET, 17, "198.18.250.2", 53)
C6 = VSKey(AF_INET6, 6, "2001:2:0:250::1", 80)
KEYS = (A, B, C6)
R1, R2 = Real("198.18.251.1", 8080), Real("198.18.251.2", 8080)
R6 = Real("2001:2:0:251::1", 8080)


def _netlink() -> Dataplane:
    problem = None
    if os.geteuid() != 0:
        problem = "needs root"
    elif not os.path.exists("/proc/net/ip_vs"):
        subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
        if not os.path.exists("/proc/net/ip_vs"):
            problem = "the kernel has no IPVS"
    if problem:
        if os.environ.get("IN_VM"):
            pytest.fail(f"contract suite inside the VM: {problem}")
        pytest.skip(f"netlink dataplane {problem}: run it in the IPVS test VM (scripts/vm-run.sh)")
    from ipvsproxy.dataplane.netlink import NetlinkDataplane

    dp = NetlinkDataplane(AgentConfig(node_name="contract", interface=DEV, nftables=False))
    dp.setup()
    return dp


def _clean(dp: Dataplane) -> None:
    """Leave no virtual server or address of ours behind (on the kernel: in the root namespace)."""
    state = dp.observe()
    ops = [Op(OpKind.DEL_VS, k) for k in state.services if k in KEYS]
    dp.apply(ops)
    dp.remove_interface()


@pytest.fixture(params=[
    pytest.param("memory"),
    pytest.param("netlink", marks=pytest.mark.kernel),
])
def dp(request: pytest.FixtureRequest) -> Iterator[Dataplane]:
    plane: Dataplane = MemoryDataplane() if request.param == "memory" else _netlink()
    _clean(plane)
    plane.setup()
    try:
        yield plane
    finally:
        _clean(plane)
        plane.close()


def vs(key: VSKey, *reals: Real, scheduler: str = "rr", timeout: int = 0) -> VirtualServer:
    return VirtualServer(key, scheduler, timeout=timeout, reals=reals, service=REF)


def add(v: VirtualServer) -> list[Op]:
    return [Op(OpKind.ADD_VS, v.key, vs=v)] + [Op(OpKind.ADD_RS, v.key, real=r) for r in v.reals]


def refused(failures: list[Failure]) -> list[tuple[OpKind, int]]:
    return [(f.op.kind, f.errno) for f in failures]


def table(dp: Dataplane) -> dict[VSKey, dict[tuple[str, int], int]]:
    """Our virtual servers with their real servers' weights."""
    state = dp.observe()
    return {k: {rk: r.weight for rk, r in o.reals.items()} for k, o in state.services.items() if k in KEYS}


def test_added_virtual_servers_are_observed_with_their_settings(dp: Dataplane) -> None:
    assert dp.apply(add(vs(A, R1, R2, scheduler="wrr", timeout=60)) + add(vs(B, R1)) + add(vs(C6, R6))) == []
    assert table(dp) == {A: {(R1.address, 8080): 1, (R2.address, 8080): 1}, B: {(R1.address, 8080): 1},
                         C6: {(R6.address, 8080): 1}}
    got = dp.observe_keys([A, VSKey(AF_INET, 6, "198.18.250.9", 80)])
    obs = got[A]
    assert obs is not None and obs.owned and obs.settings() == vs(A, timeout=60, scheduler="wrr").settings()
    assert obs.flags & F_OWNED
    assert got[VSKey(AF_INET, 6, "198.18.250.9", 80)] is None
    owned = dp.service_stats()
    assert owned[A][0] and owned[C6][0]
    assert keys_of(dp.service_key_pages()) == set(owned) == {A, B, C6}
    assert dp.counters.ops["add-vs"] == 3 and dp.counters.ops["add-rs"] == 4


def keys_of(pages: Iterable[list[VSKey] | None]) -> set[VSKey]:
    out: set[VSKey] = set()
    for page in pages:
        out.update(page or ())
    return out


def test_the_key_dump_is_read_a_page_at_a_time_beside_other_requests(dp: Dataplane) -> None:
    many = [VSKey(AF_INET, 6, f"198.18.252.{i // 200}", 1000 + i % 200) for i in range(450)]
    try:
        assert dp.apply([op for k in many for op in add(vs(k))]) == []
        pages = dp.service_key_pages()
        first = next(pages)
        assert first and len(first) < len(many)  # a page, not the whole table
        # meanwhile the dataplane serves the syncs: a write, a read
        assert dp.apply(add(vs(A, R1))) == []
        assert dp.observe_keys([A])[A] is not None
        seen = set(first) | keys_of(pages)
        assert set(many) <= seen
        abandoned = dp.service_key_pages()
        assert next(abandoned)
        abandoned.close()  # a dump given up half-way leaves nothing behind
        assert keys_of(dp.service_key_pages()) >= set(many) | {A}
        assert dp.observe_keys([B])[B] is None
    finally:
        dp.apply([Op(OpKind.DEL_VS, k) for k in many])


def test_adding_an_existing_virtual_server_or_real_server_is_refused_eexist(dp: Dataplane) -> None:
    assert dp.apply(add(vs(A, R1))) == []
    failures = dp.apply(add(vs(A, R1)))
    assert refused(failures) == [(OpKind.ADD_VS, errno.EEXIST), (OpKind.ADD_RS, errno.EEXIST)]
    assert "File exists" in failures[0].message and "contract/svc:p" in failures[0].message
    assert table(dp) == {A: {(R1.address, 8080): 1}}


def test_anything_on_a_missing_virtual_server_is_refused_esrch(dp: Dataplane) -> None:
    ops = [Op(OpKind.EDIT_VS, A, vs=vs(A)), Op(OpKind.ADD_RS, A, real=R1),
           Op(OpKind.EDIT_RS, A, real=R1._replace(weight=0))]
    assert refused(dp.apply(ops)) == [(OpKind.EDIT_VS, errno.ESRCH), (OpKind.ADD_RS, errno.ESRCH),
                                      (OpKind.EDIT_RS, errno.ESRCH)]
    assert table(dp) == {}


def test_editing_a_missing_real_server_is_refused_enoent(dp: Dataplane) -> None:
    assert dp.apply(add(vs(A, R1))) == []
    assert refused(dp.apply([Op(OpKind.EDIT_RS, A, real=R2._replace(weight=0))])) == [(OpKind.EDIT_RS, errno.ENOENT)]
    assert table(dp) == {A: {(R1.address, 8080): 1}}


def test_deleting_what_is_gone_counts_as_done(dp: Dataplane) -> None:
    assert dp.apply(add(vs(A, R1))) == []
    gone = [Op(OpKind.DEL_RS, A, real=R2), Op(OpKind.DEL_RS, B, real=R1), Op(OpKind.DEL_VS, B)]
    assert dp.apply(gone) == []
    assert table(dp) == {A: {(R1.address, 8080): 1}}


def test_weights_edit_and_a_deleted_virtual_server_takes_its_reals(dp: Dataplane) -> None:
    assert dp.apply(add(vs(A, R1, R2))) == []
    assert dp.apply([Op(OpKind.EDIT_RS, A, real=R1._replace(weight=0)),
                     Op(OpKind.EDIT_VS, A, vs=vs(A, scheduler="wlc"))]) == []
    assert table(dp) == {A: {(R1.address, 8080): 0, (R2.address, 8080): 1}}
    assert dp.observe().services[A].scheduler == "wlc"
    assert dp.apply([Op(OpKind.DEL_VS, A)]) == []
    assert dp.apply([Op(OpKind.ADD_VS, A, vs=vs(A))]) == []
    assert table(dp) == {A: {}}  # re-created empty: the old real servers went with it


def test_one_refused_operation_does_not_stop_the_batch(dp: Dataplane) -> None:
    ops = [*add(vs(A, R1)), Op(OpKind.ADD_RS, B, real=R1), *add(vs(C6, R6))]
    assert refused(dp.apply(ops)) == [(OpKind.ADD_RS, errno.ESRCH)]
    assert table(dp) == {A: {(R1.address, 8080): 1}, C6: {(R6.address, 8080): 1}}


@pytest.mark.parametrize("address", ["198.18.250.1", "2001:2:0:250::1"])
def test_binding_is_idempotent_both_ways(dp: Dataplane, address: str) -> None:
    bound: Callable[[], bool] = lambda: address in dp.observe().addresses  # noqa: E731
    assert dp.apply([Op(OpKind.BIND, address=address)]) == [] and bound()
    assert dp.apply([Op(OpKind.BIND, address=address)]) == [] and bound()  # already bound: done
    assert dp.apply([Op(OpKind.UNBIND, address=address)]) == [] and not bound()
    assert dp.apply([Op(OpKind.UNBIND, address=address)]) == [] and not bound()  # not bound: done
