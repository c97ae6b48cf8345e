"""Fixtures for kernel tests: real IPVS, real traffic between network namespaces (inside the test VM).

Run them with `bash scripts/vm-run.sh -- 'pytest -m kernel tests/kernel -p no:cacheprovider'`.
Outside the VM (not root, or no IPVS) every test here is skipped; inside it (IN_VM set) a missing
IPVS is an error. Helpers for traffic live in netns.py (`from netns import http_get, ...`).

Fixtures
    netlab          function-scoped netns.Netlab (everything it made is removed at teardown)
    module_netlab   the same, shared by a test module
    backends        factory: backends(count=3, *, http_port=8080, udp_port=5353, sctp_port=None,
                    names=None, timeout=90.0) -> list[Backend]
    clients         factory: clients(count=1, *, names=None) -> list[Client]
    vips            factory: vips(*addrs, dev="ipvstest0") -> list[str], bound to a dummy interface
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import netns` from test modules (importlib mode)

import netns  # noqa: E402

SESSION_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.vs.conntrack": "1",
    # new namespaces copy these from the root namespace (so no DAD, no rp_filter in them either)
    "net.core.devconf_inherit_init_net": "1",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


def _kernel_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ipvsadm"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/proc/net/ip_vs"):
        subprocess.run(["modprobe", "ip_vs"], capture_output=True)
    if not os.path.exists("/proc/net/ip_vs"):
        return "the kernel has no IPVS (ip_vs module)"
    return None


@pytest.fixture(scope="session", autouse=True)
def kernel_env() -> Iterator[None]:
    """Session set-up: check root + IPVS, set forwarding/conntrack sysctls (restored afterwards)."""
    problem = _kernel_problem()
    if problem:
        if os.environ.get("IN_VM"):
            pytest.fail(f"kernel tests inside the VM: {problem}")
        pytest.skip(f"kernel tests {problem}: run them in the IPVS test VM (scripts/vm-run.sh)")
    saved: dict[str, str] = {}
    for key, value in SESSION_SYSCTLS.items():
        try:
            saved[key] = netns.sysctl_get(key)
            netns.sysctl_set(key, value)
        except OSError as exc:
            if key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.vs.conntrack"):
                raise RuntimeError(f"cannot set {key}={value}: {exc}") from exc
    netns.remove_stale_namespaces()
    try:
        yield
    finally:
        for key, value in saved.items():
            with contextlib.suppress(OSError):
                netns.sysctl_set(key, value)


@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[netns.Netlab]:
    lab = netns.Netlab(tmp_path / "netlab")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def module_netlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[netns.Netlab]:
    lab = netns.Netlab(tmp_path_factory.mktemp("netlab"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def backends(netlab: netns.Netlab) -> Callable[..., list[netns.Backend]]:
    return netlab.backends


@pytest.fixture
def clients(netlab: netns.Netlab) -> Callable[..., list[netns.Client]]:
    return netlab.clients


@pytest.fixture
def vips(netlab: netns.Netlab) -> Callable[..., list[str]]:
    return netlab.vips
