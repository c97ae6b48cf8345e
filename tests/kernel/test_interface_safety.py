"""--interface safety and the kernel's address spelling, against the VM's kernel (issue 14 items 1 and 4).

Item 1: `--interface` naming a NIC (a veth here, holding a /32 and a /128 as a
GCE-style node does) or a dummy ipvsproxy did not make is refused by `run`,
`run --once --dry-run` and `cleanup` with exit 2, naming the interface and its
kind, and the link and its addresses are left exactly as they were. An
unmarked dummy with an adoptable name (what older versions made) is adopted:
marked with the alias, stale addresses unbound, deleted by `cleanup`.

Item 4: a Service holding an IPv4-mapped IPv6 address (`::ffff:198.18.142.1`)
and a link-local one: the kernel spells the first `::ffff:198.18.142.1`
(Python 3.11 `::ffff:c612:8e01`), so a second and third full sync must be
no-ops; and both addresses go when the Service goes (link-local ones were
never unbound), while the kernel's own link-local address stays.

Addresses: 198.18.140.0/24 and 2001:2:0:140::/64 on the refused links,
198.18.141.0/24 Services, 198.18.142.0/24 and 2001:2:0:142::/64 for item 4.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxylab import agent_config, ipvsadm, run_cli, service, write_manifests

from ipvsproxy.agent import Agent
from ipvsproxy.dataplane.base import INTERFACE_MARK
from ipvsproxy.dataplane.netlink import NetlinkDataplane

pytestmark = pytest.mark.kernel

NODE = "iface-node"
VETH, PEER, FOREIGN_DUMMY, OLD_DUMMY, DEV6 = "h14veth0", "h14veth1", "h14dummy0", "ipvsproxy14", "ipvsproxy15"
NIC_ADDRS = {"198.18.140.1/32", "2001:2:0:140::1/128"}
SVC_VIP = "198.18.141.10"


def ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def link(dev: str) -> dict | None:
    res = subprocess.run(["ip", "-j", "-d", "address", "show", "dev", dev], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    info: dict = json.loads(res.stdout)[0]
    return info


def addrs(dev: str, scope: str | None = "global") -> set[str]:
    info = link(dev)
    if info is None:
        return set()
    return {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", [])
            if scope is None or a.get("scope") == scope}


def delete(*devs: str) -> None:
    for dev in devs:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)


@pytest.fixture
def refused_links() -> Iterator[None]:
    """A veth (a NIC for all the agent can tell) and someone else's dummy, each with a /32 and a /128."""
    delete(VETH, FOREIGN_DUMMY, OLD_DUMMY, DEV6)
    ip("link", "add", VETH, "type", "veth", "peer", "name", PEER)
    ip("link", "add", FOREIGN_DUMMY, "type", "dummy")
    for dev in (VETH, FOREIGN_DUMMY):
        ip("link", "set", dev, "up")
        ip("address", "add", "198.18.140.1/32", "dev", dev)
        ip("address", "add", "2001:2:0:140::1/128", "dev", dev, "nodad")
    try:
        yield
    finally:
        delete(VETH, FOREIGN_DUMMY, OLD_DUMMY, DEV6)
        subprocess.run(["ipvsadm", "-D", "-t", f"{SVC_VIP}:80"], capture_output=True)


def test_run_and_cleanup_refuse_a_nic_or_a_foreign_dummy(refused_links: None, tmp_path: Path) -> None:
    manifests = tmp_path / "m"
    write_manifests(manifests, [service("iface", "web", [SVC_VIP], [{"name": "http", "port": 80,
                                                                     "protocol": "TCP"}])])
    common = ["--from-file", str(manifests), "--state-dir", str(tmp_path / "state"), "--node-name", NODE,
              "--healthz-bind-address", "", "--metrics-bind-address", "", "--no-nftables"]
    for dev, kind in ((VETH, "of kind veth"), (FOREIGN_DUMMY, "dummy interface h14dummy0: ipvsproxy did not")):
        before = link(dev)
        assert before is not None and addrs(dev) == NIC_ADDRS
        for args in (["run", "--once", "--interface", dev, *common],
                     ["run", "--once", "--dry-run", "--interface", dev, *common],
                     ["cleanup", "--interface", dev]):
            r = run_cli(*args)
            print(f"$ ipvsproxy {' '.join(args[:4])} -> {r.exit_code}: {r.output.strip()}")
            assert r.exit_code == 2, r.output
            assert f"--interface {dev}" in r.output and kind in r.output
            assert "Traceback" not in r.output
            after = link(dev)
            assert after is not None and after["ifindex"] == before["ifindex"]  # not deleted, not re-made
            assert addrs(dev) == NIC_ADDRS  # the /32 and /128 are still there
            assert after.get("ifalias") == before.get("ifalias")  # not marked either
        assert f"{SVC_VIP}:80" not in ipvsadm("-Ln")  # run refused before programming anything


def test_an_old_unmarked_ipvsproxy_dummy_is_adopted_marked_and_cleaned(refused_links: None,
                                                                       tmp_path: Path) -> None:
    ip("link", "add", OLD_DUMMY, "type", "dummy")
    ip("address", "add", "198.18.141.99/32", "dev", OLD_DUMMY)  # stale: no Service claims it
    manifests = tmp_path / "m"
    write_manifests(manifests, [service("iface", "web", [SVC_VIP], [{"name": "http", "port": 80,
                                                                     "protocol": "TCP"}])])
    r = run_cli("run", "--once", "--interface", OLD_DUMMY, "--from-file", str(manifests), "--state-dir",
                str(tmp_path / "state"), "--node-name", NODE, "--healthz-bind-address", "",
                "--metrics-bind-address", "", "--no-nftables")
    assert r.exit_code == 0, r.output
    info = link(OLD_DUMMY)
    assert info is not None and info.get("ifalias") == INTERFACE_MARK
    assert addrs(OLD_DUMMY) == {f"{SVC_VIP}/32"}
    r = run_cli("cleanup", "--interface", OLD_DUMMY)
    assert r.exit_code == 0, r.output
    assert link(OLD_DUMMY) is None
    assert f"{SVC_VIP}:80" not in ipvsadm("-Ln")
    # a dummy ipvsproxy creates carries the mark from the start
    r = run_cli("run", "--once", "--interface", DEV6, "--from-file", str(manifests), "--state-dir",
                str(tmp_path / "state"), "--node-name", NODE, "--healthz-bind-address", "",
                "--metrics-bind-address", "", "--no-nftables")
    assert r.exit_code == 0, r.output
    info = link(DEV6)
    assert info is not None and info.get("ifalias") == INTERFACE_MARK and info["linkinfo"]["info_kind"] == "dummy"
    assert run_cli("cleanup", "--interface", DEV6).exit_code == 0 and link(DEV6) is None


MAPPED, MAPPED_PY = "::ffff:198.18.142.1", "::ffff:c612:8e01"
LINK_LOCAL = "fe80::142:1"


def test_mapped_and_link_local_vips_are_stable_and_unbound_when_gone(refused_links: None, tmp_path: Path) -> None:
    manifests = tmp_path / "m"
    ports = [{"name": "http", "port": 80, "protocol": "TCP"}]
    svc = service("iface", "odd", ["2001:2:0:142::10"], ports)
    svc["spec"]["externalIPs"] = [MAPPED_PY, LINK_LOCAL]  # spelled as Python 3.11 prints it, on purpose
    write_manifests(manifests, [svc])
    cfg = agent_config(NODE, manifests, tmp_path / "state", interface=DEV6, nftables=False)
    dp = NetlinkDataplane(cfg)
    try:
        agent = Agent(cfg, dp, record_state=False)
        first = agent.once()
        assert {op.address for op in first.ops if op.kind.value == "bind"} == {
            "2001:2:0:142::10", MAPPED, LINK_LOCAL}
        kernel = addrs(DEV6, scope=None)
        print("kernel addresses:", sorted(kernel))
        assert {f"{MAPPED}/128", f"{LINK_LOCAL}/128", "2001:2:0:142::10/128"} <= kernel
        own_ll = {a for a in kernel if a.startswith("fe80:") and a != f"{LINK_LOCAL}/128"}
        assert f"[{MAPPED}]:80" in ipvsadm("-Ln")  # ipvsadm spells it as the kernel does
        for _ in range(2):  # full syncs against the kernel's own spelling: nothing to do
            again = agent.reconciler.sync(full=True)
            assert again.ops == [], [str(op) for op in again.ops]
        write_manifests(manifests, [])
        agent.load_files()
        gone = agent.reconciler.sync(full=True)
        assert {op.address for op in gone.ops if op.kind.value == "unbind"} == {
            "2001:2:0:142::10", MAPPED, LINK_LOCAL}
        left = addrs(DEV6, scope=None)
        print("kernel addresses after:", sorted(left))
        assert left == own_ll  # only the kernel's own link-local address is left
        assert agent.reconciler.sync(full=True).ops == []
    finally:
        dp.close()
