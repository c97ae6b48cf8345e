"""Health over real HTTP on the loopback: kube-proxy's /healthz, /livez and
health-check node ports (docs/semantics.md rule 1), and the bounds every HTTP
server of the agent keeps (timeouts, a connection cap, no tracebacks, no
detail for strangers)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipvsproxy.agent import Agent
from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.observe.health import Health, healthz_route, livez_route, serve
from ipvsproxy.observe.servicehealth import ServiceHealthServer, body
from tests.agentlab import wait_until
from tests.unit.factories import endpoint, node, port, service, slice_


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused(p: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", p)) != 0


# ---- /healthz and /livez -----------------------------------------------------------------------

def test_healthz_and_livez_have_kube_proxys_shape_and_node_semantics() -> None:
    clock = Clock()
    h = Health(max_age=60, clock=clock)
    h.success()
    srv = serve("127.0.0.1:0", {"/healthz": healthz_route(h), "/livez": livez_route(h)})
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        code, headers, raw = get(base + "/healthz")
        assert code == 200 and headers["Content-Type"] == "application/json"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert json.loads(raw) == {"lastUpdated": "1970-01-12 13:46:40 +0000 UTC",
                                   "currentTime": "1970-01-12 13:46:40 +0000 UTC", "nodeEligible": True}
        # KEP-3836: the node is being deleted -> load balancers are told to go; liveness is unaffected
        h.node_eligible = False
        code, _, raw = get(base + "/healthz")
        assert code == 503 and json.loads(raw)["nodeEligible"] is False
        code, _, raw = get(base + "/livez")
        assert code == 200 and set(json.loads(raw)) == {"lastUpdated", "currentTime"}
        # the proxy itself stops syncing: both fail, lastUpdated is the last success
        clock.now += 120
        code, _, raw = get(base + "/livez")
        assert code == 503 and json.loads(raw)["lastUpdated"] == "1970-01-12 13:46:40 +0000 UTC"
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_api_refusal_fails_healthz_with_its_reason_but_not_livez() -> None:
    """RBAC took a verb away: the data may be stale, which load balancers hear; a restart
    would not help (the agent recovers on its own once the verb is back), so /livez stays 200."""
    h = Health(max_age=60, clock=Clock())
    h.success()
    healthz, livez = healthz_route(h, detail=True), livez_route(h, detail=True)
    h.set_blocked("watch Service: 403 Forbidden (needs verb 'watch' on resource 'services')")
    code, _, raw = healthz()
    assert code == 503 and "needs verb 'watch'" in json.loads(raw)["reason"]
    assert livez()[0] == 200
    h.set_blocked(None)
    code, _, raw = healthz()
    assert code == 200 and json.loads(raw)["lastSuccess"] == h.last_success  # lastUpdated is "now"


@contextlib.contextmanager
def healthz_served(health: Health, bind: str) -> Iterator[int]:
    """An agent's health endpoints bound to `bind` (port 0: any), serving `health`; the port."""
    agent = Agent(AgentConfig(node_name="n1", healthz_bind_address=bind, metrics_bind_address=""),
                  MemoryDataplane(), record_state=False)
    agent.health = health
    agent.serve_http()
    try:
        yield agent._servers[0].server_address[1]
    finally:
        agent.shutdown()


def test_health_details_only_on_a_loopback_bind() -> None:
    """Issue 14 item 9: sync errors name Services and addresses; a stranger
    reaching a non-loopback bind learns only healthy or not."""
    h = Health(max_age=60)
    h.failure("Service prod/payments: add-vs TCP 10.96.7.7:443: Cannot allocate memory")
    h.started -= 3600
    with healthz_served(h, "0.0.0.0:0") as p:
        for path in ("/healthz", "/livez"):
            code, _, raw = get(f"http://127.0.0.1:{p}{path}")
            assert code == 503 and b"prod" not in raw and b"10.96" not in raw and b"reason" not in raw
    with healthz_served(h, "127.0.0.1:0") as p:
        code, _, raw = get(f"http://127.0.0.1:{p}/healthz")
        assert code == 503 and "Cannot allocate memory" in json.loads(raw)["reason"]


# ---- hardening: timeouts, a connection cap, no tracebacks ---------------------------------------

def test_an_idle_connection_is_closed_after_the_timeout() -> None:
    srv = serve("127.0.0.1:0", {"/healthz": lambda: (200, "text/plain", b"ok")}, timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1])) as s:
            s.settimeout(5)
            assert s.recv(100) == b""  # the server hung up on us (before: it waited forever)
        wait_until(lambda: srv.slots.acquire(blocking=False) and (srv.slots.release() or True), what="slot freed")
    finally:
        srv.shutdown()
        srv.server_close()


def test_connections_beyond_the_cap_are_closed_at_once_and_threads_stay_bounded() -> None:
    srv = serve("127.0.0.1:0", {"/healthz": lambda: (200, "text/plain", b"ok")}, max_connections=4, timeout=30)
    addr = ("127.0.0.1", srv.server_address[1])
    threads_before = threading.active_count()
    idle = [socket.create_connection(addr) for _ in range(4)]
    try:
        wait_until(lambda: threading.active_count() >= threads_before + 4, what="4 handler threads")
        extra = [socket.create_connection(addr) for _ in range(20)]
        for s in extra:
            s.settimeout(5)
            assert s.recv(10) == b""  # closed without an answer
            s.close()
        assert srv.stats.rejected == 20
        assert threading.active_count() <= threads_before + 4
    finally:
        for s in idle:
            s.close()
    # once the idle ones are gone (their threads see the EOF), requests are served again
    def served() -> bool:
        try:
            return get(f"http://{addr[0]}:{addr[1]}/healthz")[0] == 200
        except OSError:  # still full: closed at once
            return False

    wait_until(served, what="served again")
    srv.shutdown()
    srv.server_close()


def test_clients_that_reset_or_time_out_leave_no_traceback(capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    srv = serve("127.0.0.1:0", {"/healthz": lambda: (200, "text/plain", b"ok" * 100_000)}, timeout=0.2)
    addr = ("127.0.0.1", srv.server_address[1])
    try:
        for _ in range(5):
            s = socket.create_connection(addr)
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST while the server writes 200 kB
            s2 = socket.create_connection(addr)
            s2.sendall(b"GET /hea")  # then silence: the timeout
            s2.settimeout(5)
            assert s2.recv(10) == b""
            s2.close()
        wait_until(lambda: srv.stats.client_errors >= 1 or srv.slots._value == 64,  # type: ignore[attr-defined]
             what="handlers done")
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception" not in err
    assert not any("Traceback" in r.getMessage() or r.exc_info for r in caplog.records)


# ---- health-check node ports ------------------------------------------------------------------

@pytest.fixture
def hc() -> Iterator[tuple[ServiceHealthServer, list[tuple[str, int, str]], list[bool]]]:
    failures: list[tuple[str, int, str]] = []
    healthy = [True]
    server = ServiceHealthServer(lambda: ["127.0.0.1"], lambda: healthy[0],
                                 on_listen_failure=lambda *a: failures.append(a), retry=0.05)
    server.start()
    yield server, failures, healthy
    server.stop()


def test_health_check_port_answers_like_kube_proxy(hc: Any) -> None:
    server, _, healthy = hc
    p = free_port()
    server.update({"prod/web": (p, 2)})
    assert server.wait_idle()
    code, headers, raw = get(f"http://127.0.0.1:{p}/any/path")
    assert code == 200
    assert headers["Content-Type"] == "application/json" and headers["X-Content-Type-Options"] == "nosniff"
    assert raw == (b'{\n\t"service": {\n\t\t"namespace": "prod",\n\t\t"name": "web"\n\t},\n'
                   b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
    assert json.loads(raw)["localEndpoints"] == 2
    # the local endpoint goes: 503, same listener
    listener = server._open["prod/web"][1][0]
    server.update({"prod/web": (p, 0)})
    code, _, raw = get(f"http://127.0.0.1:{p}/")
    assert code == 503 and json.loads(raw)["localEndpoints"] == 0
    assert server._open["prod/web"][1][0] is listener
    # an unhealthy proxy is 503 even with endpoints (serviceProxyHealthy false)
    server.update({"prod/web": (p, 1)})
    healthy[0] = False
    code, _, raw = get(f"http://127.0.0.1:{p}/")
    assert code == 503 and json.loads(raw)["serviceProxyHealthy"] is False
    # the Service goes: the port closes
    server.update({})
    assert server.wait_idle()
    assert refused(p) and server.ports == {}


def test_a_new_port_moves_the_listener(hc: Any) -> None:
    server, _, _ = hc
    p1, p2 = free_port(), free_port()
    server.update({"a/x": (p1, 1)})
    assert server.wait_idle()
    server.update({"a/x": (p2, 1)})
    assert server.wait_idle()
    assert refused(p1) and get(f"http://127.0.0.1:{p2}/")[0] == 200


def test_a_busy_port_is_reported_once_and_retried(hc: Any) -> None:
    server, failures, _ = hc
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    p = holder.getsockname()[1]
    server.update({"a/x": (p, 1), "a/y": (free_port(), 1)})
    wait_until(lambda: failures, what="a failure report")
    assert "a/y" in wait_until(lambda: server.ports, what="the other port served")
    wait_until(lambda: server._failed.get("a/x"), what="failed")
    holder.close()
    wait_until(lambda: "a/x" in server.ports, what="retried and served")
    assert len(failures) == 1 and failures[0][:2] == ("a/x", p) and "in use" in failures[0][2]


def test_update_never_waits_for_a_listener() -> None:
    """A sync hands over the ports and goes on, even while the worker is stuck opening one."""
    stuck, release = threading.Event(), threading.Event()
    server = ServiceHealthServer(lambda: ["127.0.0.1"], lambda: True)
    original = server._serve

    def slow(addr: str, p: int, sid: str) -> Any:
        stuck.set()
        release.wait(10)
        return original(addr, p, sid)

    server._serve = slow  # type: ignore[method-assign]
    server.start()
    try:
        server.update({"a/x": (free_port(), 1)})
        assert stuck.wait(5)
        done = threading.Event()
        threading.Thread(target=lambda: (server.update({"a/x": (free_port(), 0)}), done.set()), daemon=True).start()
        assert done.wait(1), "update() blocked behind the worker"
    finally:
        release.set()
        server.stop()


def test_body_escapes_names() -> None:
    assert json.loads(body('we"ird', "n\\", 3, False)) == {
        "service": {"namespace": 'we"ird', "name": "n\\"}, "localEndpoints": 3, "serviceProxyHealthy": False}


def test_agent_opens_and_closes_health_check_ports_as_services_come_and_go(tmp_path: Path) -> None:
    p = free_port()
    lb = service("edge", type="LoadBalancer", etp="Local", healthCheckNodePort=p,
                 ports=[port("http", 80, node_port=30080)], ingress=[{"ip": "203.0.113.1"}])
    sl = slice_("edge", [endpoint("10.1.0.1", node="n1"), endpoint("10.1.0.2", node="n2")])
    manifest = tmp_path / "c.yaml"

    def write(*objs: dict[str, Any]) -> None:
        manifest.write_text(yaml.safe_dump_all([node("n1"), *objs]))

    write(lb, sl)
    cfg = AgentConfig(node_name="n1", from_files=(str(manifest),), min_sync_period=0.05, sync_period=30,
                      healthz_bind_address="", metrics_bind_address="", nodeport_addresses=(),
                      state_dir=str(tmp_path / "s"))
    agent = Agent(cfg, MemoryDataplane(), record_state=False)
    t = threading.Thread(target=agent.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    try:
        wait_until(lambda: agent.service_health is not None and agent.service_health.ports, what="port opened")
        code, _, raw = get(f"http://127.0.0.1:{p}/")
        assert code == 200 and json.loads(raw)["localEndpoints"] == 1
        write(lb, slice_("edge", [endpoint("10.1.0.2", node="n2")]))
        wait_until(lambda: get(f"http://127.0.0.1:{p}/")[0] == 503, what="503 without a local endpoint")
        write()
        wait_until(lambda: refused(p), what="port closed with the Service")
    finally:
        agent.stop()
        t.join(5)
    assert not t.is_alive()


def test_agent_tells_healthz_when_its_node_is_leaving() -> None:
    from ipvsproxy.reconcile import SyncReport

    agent = Agent(AgentConfig(node_name="n1", healthz_bind_address="", metrics_bind_address=""),
                  MemoryDataplane(), record_state=False)
    agent._on_report(SyncReport(full=True), None)
    assert agent.health.node_eligible  # no Node seen yet: eligible, as kube-proxy starts
    agent.tracker.upsert("Node", node("n1"))
    agent._on_report(SyncReport(full=True), None)
    assert agent.health.node_eligible
    tainted = node("n1")
    tainted["spec"] = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}
    agent.tracker.upsert("Node", tainted)
    agent._on_report(SyncReport(full=True), None)
    assert not agent.health.node_eligible
    agent.tracker.upsert("Node", node("n1"))
    agent._on_report(SyncReport(full=True), None)
    assert agent.health.node_eligible
    agent.tracker.delete("Node", "", "n1")
    agent._on_report(SyncReport(full=True), None)
    assert not agent.health.node_eligible  # deleted is not coming back
