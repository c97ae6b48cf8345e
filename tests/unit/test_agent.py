"""The agent end to end on the memory dataplane: manifests re-read on change,
/healthz and /metrics over real HTTP, stop leaves the table in place.

No sleeps: waits are for the agent's own sync reports (an Event set by each)."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, VSKey
from ipvsproxy.observe.health import Health
from tests.unit.factories import FakeClock

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WEB = VSKey(AF_INET, 6, "198.19.0.10", 80)


class Synced:
    """Wakes a waiting test on every sync the agent reports."""

    def __init__(self, agent: Agent) -> None:
        self.event = threading.Event()
        self.count = 0
        inner = agent.core.on_report

        def hook(report: Any, error: BaseException | None) -> None:
            if inner is not None:
                inner(report, error)
            self.count += 1
            self.event.set()

        agent.core.on_report = hook

    def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> bool:
        """True once `cond` holds after some sync; False after `timeout` s without."""
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.event.wait(left)
            self.event.clear()
        return True


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture()
def running(tmp_path: Path) -> Iterator[tuple[Agent, MemoryDataplane, Path, Synced, threading.Thread]]:
    manifests = tmp_path / "m"
    shutil.copytree(EXAMPLES, manifests)
    cfg = AgentConfig(node_name="demo-node", from_files=(str(manifests),), min_sync_period=0.05,
                      sync_period=30, healthz_bind_address="127.0.0.1:0", metrics_bind_address="127.0.0.1:0",
                      state_dir=str(tmp_path / "state"))
    dp = MemoryDataplane()
    agent = Agent(cfg, dp, stats_dataplane=lambda: dp)
    synced = Synced(agent)
    t = threading.Thread(target=agent.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    assert synced.wait_for(lambda: WEB in dp.state.services)
    yield agent, dp, manifests, synced, t
    agent.stop()
    t.join(5)
    assert not t.is_alive()


Running = tuple[Agent, MemoryDataplane, Path, Synced, threading.Thread]


def port(agent: Agent, i: int) -> int:
    return int(agent._servers[i].server_address[1])


def test_manifest_change_reaches_dataplane(running: Running) -> None:
    agent, dp, manifests, synced, _ = running
    web = manifests / "10-web.yaml"
    web.write_text(web.read_text().replace("198.18.1.13]", "198.18.1.14]"))
    assert synced.wait_for(lambda: ("198.18.1.14", 8080) in dp.state.services[WEB].reals)
    assert ("198.18.1.13", 8080) not in dp.state.services[WEB].reals
    # a broken edit keeps what was programmed: the re-read's listing wakes one more sync, which changes nothing
    before = synced.count
    web.write_text("{{{ not yaml")
    assert synced.wait_for(lambda: synced.count > before)
    assert ("198.18.1.14", 8080) in dp.state.services[WEB].reals


def test_healthz_and_metrics(running: Running) -> None:
    agent, dp, *_ = running
    code, body = get(f"http://127.0.0.1:{port(agent, 0)}/healthz")
    assert code == 200 and '"nodeEligible": true' in body
    dp.state.services[WEB].stats = {"conns": 42, "inpkts": 7, "outpkts": 6, "inbytes": 900, "outbytes": 800}
    code, text = get(f"http://127.0.0.1:{port(agent, 1)}/metrics")
    assert code == 200
    assert "ipvsproxy_sync_duration_seconds_count" in text
    assert 'ipvsproxy_operations_total{kind="add-vs"}' in text
    assert "ipvsproxy_virtual_servers 20.0" in text
    assert "ipvsproxy_invalid_scheduler_total 1.0" in text  # demo/signalling asks for 'fastest'
    # per Service port by default (no address label); the web Service's other virtual servers have none yet
    assert 'ipvsproxy_service_connections_total{namespace="demo",port="http",service="web"} 42.0' in text
    assert 'direction="in"' in text and "ipvsproxy_network_programming_duration_seconds_bucket" in text
    # kube-proxy's /proxyMode on the metrics port (e2e "[sig-network] Networking should check kube-proxy urls")
    assert get(f"http://127.0.0.1:{port(agent, 1)}/proxyMode") == (200, "ipvs")


def test_stop_leaves_kernel_state(running: Running) -> None:
    agent, dp, _, _, thread = running
    before = set(dp.state.services)
    agent.stop()
    thread.join(5)
    assert not thread.is_alive()  # run() returned: shutdown is done
    assert set(dp.state.services) == before and dp.state.addresses


def test_health_goes_503_when_syncs_stop_succeeding() -> None:
    clock = FakeClock()
    h = Health(max_age=0.1, clock=clock)
    assert h.status()[0]
    h.success()
    assert h.status()[0]
    h.failure("netlink: Cannot allocate memory")
    clock.advance(0.15)
    ok, reason = h.status()
    assert not ok and "Cannot allocate memory" in reason


def test_the_record_file_takes_at_most_a_twentieth_of_the_time(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The record for `list` is O(cluster) and written between syncs: a write that takes 2 s is
    followed by 40 s without one (20x), a cheap one by 5 s; a forced one (exit, --once) always goes."""
    from ipvsproxy.observe import records

    clock = FakeClock()
    cfg = AgentConfig(node_name="demo-node", from_files=(str(EXAMPLES),), state_dir=str(tmp_path / "state"))
    agent = Agent(cfg, MemoryDataplane(), clock=clock)
    writes: list[float] = []
    cost = [2.0]

    def slow_write(state_dir: str, rec: records.Record) -> None:
        writes.append(clock())
        clock.advance(cost[0])

    monkeypatch.setattr(records, "write", slow_write)

    def changed(after: float) -> None:
        clock.advance(after)
        agent._record_dirty = True
        agent._write_record()

    changed(0)
    changed(10)
    changed(29)  # 39 s after the 2-s write ended: still within 20 x 2 s
    assert writes == [1000.0]
    changed(1)
    assert writes == [1000.0, 1042.0]
    cost[0] = 0.0
    changed(39)  # the write at 1042 took 2 s: 20 x 2 s again
    changed(1)
    assert writes == [1000.0, 1042.0, 1084.0]
    changed(5)  # that one cost nothing: every 5 s
    agent._write_record(force=True)
    assert writes == [1000.0, 1042.0, 1084.0, 1089.0, 1089.0]


def test_the_record_names_each_real_servers_pod_from_its_slice(tmp_path: Path) -> None:
    """The pods' names are not kept per endpoint (EndpointSlice.targets): the agent's record for
    `list` still names the pod behind each real server."""
    from ipvsproxy.observe import records

    cfg = AgentConfig(node_name="demo-node", from_files=(str(EXAMPLES),), state_dir=str(tmp_path / "state"))
    agent = Agent(cfg, MemoryDataplane())
    agent.once()
    rec = records.read(cfg.state_dir)
    assert rec is not None
    web = VSKey(AF_INET, 6, "198.19.0.10", 80)
    assert rec.endpoint_of(web, "198.18.1.11") == {"target": "Pod/web-0", "node": "demo-node"}
    named = {e["target"] for entry in rec.services.values() for e in entry["endpoints"].values()}
    assert {"Pod/web-0", "Pod/web-1", "Pod/web-2"} <= named  # and "" where a slice names no pod
