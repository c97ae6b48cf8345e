"""Kernel tests for ipvsproxy.dataplane.addr_wire (run inside the IPVS test VM).

Batched RTM_NEWADDR/RTM_DELADDR of IPv4 and IPv6 host addresses on a dummy
interface, with `ip -j address` as the independent witness: every error comes
back on the request (the address) it belongs to, and NetlinkDataplane maps
them to its operations. The bulk test prints (never asserts) timings of the
batch against `ip -batch` and pyroute2's one call per address.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.addr_wire import AddrRequest, AddrWire
from ipvsproxy.dataplane.base import INTERFACE_MARK
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.plan import Op, OpKind

pytestmark = pytest.mark.kernel

DEV = "addrwire0"


def ip(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, check=True).stdout


def bound(dev: str = DEV) -> set[str]:
    """Global addresses on dev (no link-local), with their prefix length."""
    out = set()
    for link in json.loads(ip("-j", "address", "show", "dev", dev)):
        for a in link.get("addr_info", []):
            if a.get("scope") != "link":
                out.add(f"{a['local']}/{a['prefixlen']}")
    return out


@pytest.fixture
def dev() -> Iterator[int]:
    if os.geteuid() != 0:
        pytest.skip("needs root (run inside the IPVS test VM)")
    subprocess.run(["ip", "link", "del", DEV], capture_output=True)
    ip("link", "add", DEV, "type", "dummy")
    ip("link", "set", DEV, "alias", INTERFACE_MARK)  # handed over: NetlinkDataplane uses only marked dummies
    ip("link", "set", DEV, "up")
    try:
        yield socket.if_nametoindex(DEV)
    finally:
        subprocess.run(["ip", "link", "del", DEV], capture_output=True)


@pytest.mark.parametrize("ack_all", [True, False])
def test_batched_bind_unbind_ipv4_ipv6_with_errors_on_their_address(dev: int, ack_all: bool) -> None:
    v4 = [f"198.18.7.{i}" for i in range(1, 101)]
    v6 = [f"2001:2:0:7::{i:x}" for i in range(1, 101)]
    with AddrWire(batch_size=64, ack_all=ack_all) as wire:
        adds = [AddrRequest(True, a, dev) for pair in zip(v4, v6, strict=True) for a in pair]
        assert wire.execute(adds) == [None] * 200
        assert wire.counters.sendmsg_calls == 4  # 200 requests, batches of 64
        assert bound() == {f"{a}/32" for a in v4} | {f"{a}/128" for a in v6}
        # IPv6 went in without duplicate address detection: usable at once, not "tentative"
        info = json.loads(ip("-j", "-6", "address", "show", "dev", DEV))[0]["addr_info"]
        assert all(not a.get("tentative") for a in info if a["local"] in v6)

        mixed = [
            AddrRequest(True, "198.18.7.1", dev),           # already bound
            AddrRequest(True, "198.18.8.1", dev),
            AddrRequest(False, "198.18.9.9", dev),          # never bound
            AddrRequest(True, "2001:2:0:7::1", dev),        # already bound
            AddrRequest(True, "2001:2:0:8::1", dev),
            AddrRequest(False, "2001:2:0:9::9", dev),       # never bound
            AddrRequest(True, "198.18.8.2", 999_999),       # no such interface
            AddrRequest(False, "198.18.7.2", dev),
            AddrRequest(False, "2001:2:0:7::2", dev),
        ]
        res = wire.execute(mixed)
        for r in res:
            print(r)
        codes = [r.errno if r else 0 for r in res]
        assert codes == [errno.EEXIST, 0, errno.EADDRNOTAVAIL, errno.EEXIST, 0, errno.EADDRNOTAVAIL,
                         errno.ENODEV, 0, 0]
        assert all(r is None or r.request is q for r, q in zip(res, mixed, strict=True))
        assert str(res[2]).startswith("delete address 198.18.9.9/32 on interface")
        now = bound()
        assert {"198.18.8.1/32", "2001:2:0:8::1/128"} <= now
        assert not {"198.18.7.2/32", "2001:2:0:7::2/128", "198.18.8.2/32"} & now

        dels = [AddrRequest(False, a.split("/")[0], dev) for a in now]
        assert wire.execute(dels) == [None] * len(dels)
        assert bound() == set()


def test_netlink_dataplane_binds_in_batches_and_maps_failures(dev: int) -> None:
    cfg = AgentConfig(node_name="n", interface=DEV, load_modules=False, healthz_bind_address="",
                      metrics_bind_address="")
    dp = NetlinkDataplane(cfg)
    try:
        ip("address", "add", "198.18.7.5/32", "dev", DEV)  # bound behind our back: "already so"
        binds = [Op(OpKind.BIND, address=a) for a in ("198.18.7.4", "198.18.7.5", "2001:2:0:7::4")]
        sends = dp.addr.counters.sendmsg_calls
        assert dp.apply(binds) == []
        assert dp.addr.counters.sendmsg_calls - sends == 1
        assert bound() == {"198.18.7.4/32", "198.18.7.5/32", "2001:2:0:7::4/128"}
        assert dp.counters.ops["bind"] == 2
        assert dp.observe().addresses == {"198.18.7.4", "198.18.7.5", "2001:2:0:7::4"}
        unbinds = [Op(OpKind.UNBIND, address=a) for a in ("198.18.7.4", "198.18.7.99", "2001:2:0:7::4")]
        assert dp.apply(unbinds) == []  # 198.18.7.99 was never there: already so
        assert bound() == {"198.18.7.5/32"}
        # a failure names its address: a multicast address cannot be a local one (EADDRNOTAVAIL)
        failures = dp.apply([Op(OpKind.BIND, address="198.18.7.6"), Op(OpKind.BIND, address="ff02::1:5")])
        assert [f.op.address for f in failures] == ["ff02::1:5"]
        print(failures[0].message)
        assert failures[0].message.startswith("bind address ff02::1:5: ")
        assert "198.18.7.6/32" in bound()
    finally:
        dp.close()


def test_bulk_bind_vs_ip_batch_and_pyroute2(dev: int) -> None:
    """2,000 addresses (half IPv6) three ways; timings printed only."""
    n = int(os.environ.get("ADDR_WIRE_BULK_N", "2000"))
    addrs = [f"198.18.{i // 250}.{i % 250 + 1}" if i % 2 else f"2001:2:0:7::{i + 1:x}" for i in range(n)]
    results = {}
    with AddrWire() as wire:
        t0 = time.perf_counter()
        assert not any(wire.execute([AddrRequest(True, a, dev) for a in addrs]))
        results["AddrWire"] = time.perf_counter() - t0
        assert len(bound()) == n
        assert not any(wire.execute([AddrRequest(False, a, dev) for a in addrs]))
    lines = "".join(f"address add {a}/{128 if ':' in a else 32} dev {DEV}{' nodad' if ':' in a else ''}\n"
                    for a in addrs)
    t0 = time.perf_counter()
    ip("-batch", "-", stdin=lines)
    results["ip -batch"] = time.perf_counter() - t0
    ip("address", "flush", "dev", DEV)
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        m = min(n, 500)  # one call each is slow under emulation: a slice, extrapolated
        t0 = time.perf_counter()
        for a in addrs[:m]:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            ipr.addr("add", index=dev, address=a, prefixlen=128 if ":" in a else 32, family=fam)
        results["pyroute2 loop (extrapolated)"] = (time.perf_counter() - t0) * n / m
    print(f"\nbinding {n} addresses:")
    for label, t in results.items():
        print(f"  {label:30s} {t:7.2f} s  {t / n * 1000:.3f} ms/address  {t / results['ip -batch']:.2f}x ip -batch")
