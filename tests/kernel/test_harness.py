"""The kernel-test fixtures, proven against real IPVS programmed with plain `ipvsadm` (no project code)."""

from __future__ import annotations

import collections
import subprocess
from collections.abc import Callable, Iterator

import pytest
from netns import Backend, Client, hold_tcp, http_get, udp_ask

pytestmark = pytest.mark.kernel


def ipvsadm(*args: str) -> str:
    res = subprocess.run(["ipvsadm", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ipvsadm {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


@pytest.fixture
def service() -> Iterator[Callable[..., str]]:
    """service(proto_flag, vip_port, backends, port, sched="rr") adds a NAT virtual server; deleted at teardown."""
    made: list[tuple[str, str]] = []

    def add(flag: str, vip: str, backends: list[Backend], port: int, sched: str = "rr", v6: bool = False) -> str:
        ipvsadm("-A", flag, vip, "-s", sched)
        made.append((flag, vip))
        for b in backends:
            rs = f"[{b.ipv6}]:{port}" if v6 else f"{b.ipv4}:{port}"
            ipvsadm("-a", flag, vip, "-r", rs, "-m")
        return vip

    yield add
    for flag, vip in made:
        subprocess.run(["ipvsadm", "-D", flag, vip], capture_output=True)


def test_tcp_round_robin_from_root(backends: Callable[..., list[Backend]], vips: Callable[..., list[str]],
                                   service: Callable[..., str]) -> None:
    bs = backends(3)
    vips("198.18.100.1")
    service("-t", "198.18.100.1:80", bs, bs[0].http_port)
    answers = collections.Counter(http_get("198.18.100.1", 80) for _ in range(6))
    assert answers == {b.name: 2 for b in bs}, ipvsadm("-Ln")


def test_backends_answer_directly(backends: Callable[..., list[Backend]]) -> None:
    (b,) = backends(1)
    assert http_get(b.ipv4, b.http_port) == b.name
    assert http_get(b.ipv6, b.http_port) == b.name
    assert udp_ask(b.ipv4, b.udp_port) == b.name
    assert udp_ask(b.ipv6, b.udp_port) == b.name
    b.stop()
    with pytest.raises(OSError):
        http_get(b.ipv4, b.http_port, timeout=5)
    b.start()
    assert http_get(b.ipv4, b.http_port) == b.name


def test_udp_service(backends: Callable[..., list[Backend]], vips: Callable[..., list[str]],
                     service: Callable[..., str]) -> None:
    bs = backends(3)
    vips("198.18.100.2")
    service("-u", "198.18.100.2:53", bs, bs[0].udp_port)
    answers = collections.Counter(udp_ask("198.18.100.2", 53) for _ in range(3))
    assert answers == {b.name: 1 for b in bs}, ipvsadm("-Ln")


def test_ipv6_vip(backends: Callable[..., list[Backend]], vips: Callable[..., list[str]],
                  service: Callable[..., str]) -> None:
    bs = backends(2)
    vips("2001:2::100")
    service("-t", "[2001:2::100]:80", bs, bs[0].http_port, v6=True)
    service("-u", "[2001:2::100]:53", bs, bs[0].udp_port, v6=True)
    answers = collections.Counter(http_get("2001:2::100", 80) for _ in range(4))
    assert answers == {b.name: 2 for b in bs}, ipvsadm("-Ln")
    assert {udp_ask("2001:2::100", 53) for _ in range(2)} == {b.name for b in bs}


def test_client_namespaces(backends: Callable[..., list[Backend]], clients: Callable[..., list[Client]],
                           vips: Callable[..., list[str]], service: Callable[..., str]) -> None:
    bs = backends(2)
    cs = clients(2)
    assert cs[0].ipv4 != cs[1].ipv4
    vips("198.18.100.3", "2001:2::103")
    service("-t", "198.18.100.3:80", bs, bs[0].http_port)
    service("-t", "[2001:2::103]:80", bs, bs[0].http_port, v6=True)
    names = {b.name for b in bs}
    for c in cs:
        assert http_get("198.18.100.3", 80, ns=c.ns) in names
        assert http_get("2001:2::103", 80, ns=c.ns) in names
    # a held connection keeps its backend, shows up as an active connection from the client's address
    with hold_tcp("198.18.100.3", 80, ns=cs[0].ns) as held:
        assert held.backend in names
        assert held.local[0] == cs[0].ipv4
        assert held.request() == held.backend
        conns = ipvsadm("-Lnc")
        assert f"{cs[0].ipv4}:{held.local[1]}" in conns, conns
        assert "ESTABLISHED" in conns
