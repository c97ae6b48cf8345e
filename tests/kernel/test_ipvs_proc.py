"""A whole-table read takes real servers from /proc/net/ip_vs, on the real kernel.

The agent's dataplane (real_counters=False, NetlinkDataplane's default) reads every virtual
server's settings from the netlink services dump and their real servers from the proc file
in one read, instead of one netlink dests dump per virtual server. Here the two reads of the
same table must agree on everything a sync compares (settings, real servers, weights, active
and inactive connections, a held connection counted), for IPv4 and IPv6, persistence, one-
packet scheduling, scheduler flags, direct routing, weight 0, a firewall-mark service left
out by both, and a table larger than one read of the file; and the proc read must make no
dests dump at all.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from netns import Netlab, hold_tcp, http_get, wait_until

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.model import ObservedState

pytestmark = pytest.mark.kernel

WEB, V6, PERSIST, OPS, SH = "198.18.61.1", "2001:db8:61::1", "198.18.61.2", "198.18.61.3", "198.18.61.4"
BULK = 2000  # virtual servers x 10 real servers: ~1.3 MB of the file, more than one read


def bulk_vip(i: int) -> str:
    return f"10.61.{i // 250}.{i % 250 + 1}"


def restore(lines: list[str]) -> None:
    res = subprocess.run(["ipvsadm", "-R"], input="\n".join(lines) + "\n", capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture
def table(netlab: Netlab) -> Iterator[list[Any]]:
    bs = netlab.backends(2, names=["proc-a", "proc-b"])
    netlab.vips(WEB)
    a, b = bs
    lines = [f"-A -t {WEB}:80 -s rr", f"-a -t {WEB}:80 -r {a.ipv4}:8080 -m -w 1",
             f"-a -t {WEB}:80 -r {b.ipv4}:8080 -m -w 0",
             f"-A -t [{V6}]:80 -s wlc", f"-a -t [{V6}]:80 -r [{a.ipv6}]:8080 -m -w 3",
             f"-A -t {PERSIST}:443 -s rr -p 600 -M 255.255.255.0", f"-a -t {PERSIST}:443 -r {a.ipv4}:443 -m",
             f"-A -u {OPS}:53 -s rr -o", f"-a -u {OPS}:53 -r {a.ipv4}:5353 -m -w 2",
             f"-A -t {SH}:80 -s sh -b sh-port,sh-fallback", f"-a -t {SH}:80 -r {b.ipv4}:80 -g -w 4",
             "-A -f 61 -s rr", f"-a -f 61 -r {a.ipv4}:0 -m"]
    for i in range(BULK):
        vip = bulk_vip(i)
        lines.append(f"-A -t {vip}:80 -s rr")
        lines += [f"-a -t {vip}:80 -r 10.62.{i % 250}.{d + 1}:8080 -m -w {d % 3}" for d in range(10)]
    restore(lines)
    try:
        yield bs
    finally:
        restore([f"-D -t {WEB}:80", f"-D -t [{V6}]:80", f"-D -t {PERSIST}:443", f"-D -u {OPS}:53",
                 f"-D -t {SH}:80", "-D -f 61"] + [f"-D -t {bulk_vip(i)}:80" for i in range(BULK)])


def read(real_counters: bool) -> tuple[ObservedState, int]:
    dp = NetlinkDataplane(AgentConfig(node_name="proc-node", interface="ipvsproc0"), read_only=True,
                          real_counters=real_counters)
    try:
        state = dp.observe()
        return state, dp.wire.counters.recv_calls
    finally:
        dp.close()


def conns_of(state: ObservedState, real: str) -> int:
    """The conns counter of one real server of the WEB virtual server (a netlink read)."""
    vs = next(vs for k, vs in state.services.items() if (k.address, k.port) == (WEB, 80))
    return int(vs.reals[(real, 8080)].stats["conns"])


def compared(state: ObservedState) -> dict[Any, Any]:
    """What a sync compares of each virtual server (a real server's traffic counters are not)."""
    return {key: (vs.scheduler, vs.flags, vs.timeout,
                  {k: (r.weight, r.active, r.inactive) for k, r in vs.reals.items()})
            for key, vs in state.services.items()}


def test_the_proc_file_and_the_dests_dumps_read_the_same_table(table: list[Any]) -> None:
    a, b = table
    assert http_get(WEB, 80, timeout=10) == a.name  # a finished connection: inactive on a
    with hold_tcp(WEB, 80) as held:  # weight 0 on b: every connection goes to a
        assert held.backend == a.name
        fast, fast_recvs = read(real_counters=False)
        full, full_recvs = read(real_counters=True)
    assert compared(fast) == compared(full)
    assert len(fast.services) >= BULK + 5 and full_recvs >= 2 * len(full.services)
    assert fast_recvs < len(fast.services) // 10  # the services dump only: no dests dump per service
    by_addr = {(k.address, k.port): vs for k, vs in fast.services.items()}
    web = by_addr[(WEB, 80)].reals
    assert web[(a.ipv4, 8080)].active == 1 and web[(a.ipv4, 8080)].inactive >= 1
    assert web[(b.ipv4, 8080)].weight == 0
    assert by_addr[(V6, 80)].reals[(a.ipv6, 8080)].weight == 3  # canonical IPv6 spelling, both ways
    assert by_addr[(SH, 80)].reals[(b.ipv4, 80)].weight == 4  # direct routing: the service port
    assert by_addr[(bulk_vip(BULK - 1), 80)].reals[(f"10.62.{(BULK - 1) % 250}.10", 8080)].weight == 9 % 3
    assert all(k.port != 0 for k in fast.services)  # the firewall-mark service: in neither
    assert dict(web[(a.ipv4, 8080)].stats) == {}  # the proc file has no traffic counters
    # The netlink dump has them, as of the kernel's last estimator run (every 2 s, summing the
    # per-CPU counters): polled, as tests/kernel/test_list.py waits for them.
    wait_until(lambda: conns_of(read(real_counters=True)[0], a.ipv4) >= 2, 15, 0.5,
               what="the real server's conns counter to show both connections")
