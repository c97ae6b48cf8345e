"""Incremental syncs plan against what the agent programmed, on the real kernel.

A changed virtual server is planned against its previous desired state (the last
sync applied it whole) instead of a dump of its real servers: an added endpoint
reads nothing from the kernel, a removed TCP endpoint is read (its connections
decide drain or delete). When the kernel's copy was changed behind the agent's
back (`ipvsadm -D`, `ipvsadm -d`), the kernel refuses an operation planned from
memory (ESRCH, ENOENT, EEXIST): that virtual server is read, planned again and
applied in the same sync, with no failure reported and traffic flowing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netns import Backend, Netlab, hold_tcp, http_get
from proxylab import READY, agent_config, endpoint_slice, ipvsadm, node, run_cli, service, write_manifests

from ipvsproxy.agent import Agent
from ipvsproxy.dataplane.netlink import NetlinkDataplane
from ipvsproxy.model import ObservedVS, VSKey
from ipvsproxy.plan import OpKind
from ipvsproxy.reconcile import SyncReport

pytestmark = pytest.mark.kernel

NODE, NS, DEV = "mem-node", "mem", "ipvsmem0"
WEB, API = "198.18.60.1", "198.18.60.2"
HTTP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
EP_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def a_slice(name: str, backends: Iterable[Backend]) -> dict[str, Any]:
    return endpoint_slice(NS, name, "a", "IPv4", [(b.ipv4, b.name, READY) for b in backends], EP_PORTS, NODE)


class Lab:
    def __init__(self, agent: Agent, backends: list[Backend]) -> None:
        self.agent, self.backends = agent, backends
        self.read: list[VSKey] = []
        dp = agent.dp
        assert isinstance(dp, NetlinkDataplane)
        observe_keys = dp.observe_keys

        def counting(keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
            keys = list(keys)
            self.read += keys
            return observe_keys(keys)

        dp.observe_keys = counting  # type: ignore[method-assign]

    def sync(self, name: str, backends: Iterable[Backend]) -> SyncReport:
        self.read.clear()
        self.agent.tracker.upsert("EndpointSlice", a_slice(name, backends))
        report = self.agent.reconciler.sync()
        assert not report.full and report.failures == [] and self.agent.reconciler.failing == 0, \
            [f.message for f in report.failures]
        return report


@pytest.fixture
def lab(tmp_path: Path, netlab: Netlab) -> Iterator[Lab]:
    bs = netlab.backends(3, names=["mem-a", "mem-b", "mem-c"])
    manifests = tmp_path / "m"
    write_manifests(manifests, [node(NODE, ["198.18.250.60"]),
                                service(NS, "web", [WEB], HTTP), a_slice("web", bs[:2]),
                                service(NS, "api", [API], HTTP), a_slice("api", bs[:2])])
    cfg = agent_config(NODE, manifests, tmp_path / "state", interface=DEV, nftables=False)
    dp = NetlinkDataplane(cfg)
    agent = Agent(cfg, dp)
    try:
        agent.load_files()
        dp.setup()
        assert agent.reconciler.sync(full=True).failures == []
        yield Lab(agent, bs)
    finally:
        dp.close()
        run_cli("cleanup", "--interface", DEV)


def reals_of(vip: str) -> set[str]:
    return {line.split()[1] for line in ipvsadm("-Ln", "-t", f"{vip}:80").splitlines() if "->" in line
            and "RemoteAddress" not in line}


def test_an_added_endpoint_reads_nothing_a_removed_one_is_read(lab: Lab) -> None:
    a, b, c = lab.backends
    report = lab.sync("web", [a, b, c])
    assert [op.kind for op in report.ops] == [OpKind.ADD_RS] and lab.read == []
    assert reals_of(WEB) == {f"{x.ipv4}:8080" for x in (a, b, c)}
    with hold_tcp(WEB, 80) as held:  # a live connection on the endpoint about to go
        gone = next(x for x in (a, b, c) if x.name == held.backend)
        report = lab.sync("web", [x for x in (a, b, c) if x is not gone])
        assert len(lab.read) == 1  # its connection count decides: drained, not deleted
        assert [(op.kind, op.note) for op in report.ops] == [(OpKind.EDIT_RS, "drain")]
        assert held.request() == gone.name
    assert {http_get(WEB, 80, timeout=5) for _ in range(4)} <= {x.name for x in (a, b, c) if x is not gone}


def test_a_table_changed_behind_the_agents_back_is_repaired_in_the_same_sync(lab: Lab) -> None:
    a, b, c = lab.backends
    ipvsadm("-D", "-t", f"{WEB}:80")  # the whole virtual server
    ipvsadm("-d", "-t", f"{API}:80", "-r", f"{b.ipv4}:8080")  # one real server
    ipvsadm("-a", "-t", f"{API}:80", "-r", f"{c.ipv4}:8080", "-m", "-w", "1")  # one too many
    report = lab.sync("web", [a, b, c])  # refused (ESRCH): read, re-created whole
    assert (OpKind.ADD_VS, f"{WEB}") in [(op.kind, op.key.address if op.key else None) for op in report.ops]
    assert reals_of(WEB) == {f"{x.ipv4}:8080" for x in (a, b, c)}
    report = lab.sync("api", [a, b, c])  # c is there already (EEXIST): read, b added back
    assert reals_of(API) == {f"{x.ipv4}:8080" for x in (a, b, c)}
    assert {http_get(API, 80, timeout=5) for _ in range(6)} == {a.name, b.name, c.name}
    assert {http_get(WEB, 80, timeout=5) for _ in range(6)} == {a.name, b.name, c.name}
    assert lab.agent.reconciler.sync(full=True).ops == []
