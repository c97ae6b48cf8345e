"""scripts/clusterdns.py against a real kube-apiserver v1.20.2: Services created through the API resolve over
real UDP and TCP sockets at once (no cache, no watch lag), headless Services to their ready endpoints from
the v1beta1 EndpointSlices v1.20 serves, ExternalName to a CNAME; a deleted Service stops resolving at once;
a token the API server rejects gives SERVFAIL, never a false NXDOMAIN.

The server runs as the program scripts/cluster.sh starts in the VM (`clusterdns.py serve`), on a free
loopback port; dnspython asks the questions.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests import scriptload
from tests.realapi.cluster import ADMIN_TOKEN, Cluster, free_port
from tests.realapi.conftest import Api

pytestmark = pytest.mark.realapi

ROOT = Path(__file__).resolve().parents[2]
NS = "t-dns"
cdns: Any = scriptload.load("scripts/clusterdns.py", "clusterdns")


@pytest.fixture(scope="module")
def server(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    d = tmp_path_factory.mktemp("clusterdns")
    (d / "token").write_text(ADMIN_TOKEN + "\n")
    port = free_port()
    log = open(d / "clusterdns.log", "wb")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/clusterdns.py"), "serve", "--listen", f"127.0.0.1:{port}",
         "--api-server", cluster.url, "--ca-file", str(cluster.dir / "ca.crt"), "--token-file", str(d / "token")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:  # the kubernetes Service (the API server makes it) answers once the server is up
            try:
                if answer(port, "kubernetes.default.svc.cluster.local", timeout=1):
                    break
            except (OSError, dns.exception.Timeout):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"clusterdns did not answer: {(d / 'clusterdns.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        # it logs one line per query and one when it stops (SIGTERM ends it cleanly)
        text = (d / "clusterdns.log").read_text()
        assert "stopped" in text and "Traceback" not in text, text[-3000:]


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False, timeout: float = 5) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=timeout)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)


def answer(port: int, name: str, rdtype: str = "A", tcp: bool = False, timeout: float = 5) -> list[str]:
    r = ask(port, name, rdtype, tcp, timeout)
    return sorted(f"{dns.rdatatype.to_text(s.rdtype)} {rd.to_text()}" for s in r.answer for rd in s)


def create(cluster: Cluster, obj: dict[str, Any]) -> None:
    kind = obj["kind"]
    path = (f"/api/v1/namespaces/{NS}/services" if kind == "Service"
            else f"/apis/discovery.k8s.io/v1beta1/namespaces/{NS}/endpointslices")
    cluster.request("POST", path, obj)


def svc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}


PORTS = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_new_service_resolves_at_once_and_a_deleted_one_stops(cluster: Cluster, server: int, tcp: bool) -> None:
    Api(cluster, NS)
    name = f"web-{'tcp' if tcp else 'udp'}"
    ip = "10.96.53.2" if tcp else "10.96.53.1"
    fqdn = f"{name}.{NS}.svc.cluster.local"
    assert ask(server, fqdn, tcp=tcp).rcode() == dns.rcode.NXDOMAIN
    create(cluster, svc(name, {"type": "ClusterIP", "clusterIP": ip, "ports": PORTS}))
    assert answer(server, fqdn, tcp=tcp) == [f"A {ip}"]  # no wait: every answer is a fresh GET
    r = ask(server, fqdn, "AAAA", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority  # v4 only: no AAAA, SOA for caching
    cluster.request("DELETE", f"/api/v1/namespaces/{NS}/services/{name}")
    assert ask(server, fqdn, tcp=tcp).rcode() == dns.rcode.NXDOMAIN


def test_a_nodeport_service_resolves_to_its_cluster_ip(cluster: Cluster, server: int) -> None:
    Api(cluster, NS)
    create(cluster, svc("np", {"type": "NodePort", "clusterIP": "10.96.53.3", "ports": PORTS}))
    assert answer(server, f"np.{NS}.svc.cluster.local") == ["A 10.96.53.3"]


def test_a_headless_service_resolves_to_its_ready_endpoints(cluster: Cluster, server: int) -> None:
    Api(cluster, NS)
    create(cluster, svc("hl", {"clusterIP": "None", "ports": PORTS}))
    fqdn = f"hl.{NS}.svc.cluster.local"
    r = ask(server, fqdn)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer  # exists, no endpoint yet
    create(cluster, {
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "hl-a", "namespace": NS, "labels": {"kubernetes.io/service-name": "hl"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.53.0.1"], "conditions": {"ready": True}, "hostname": "hl-0"},
                      {"addresses": ["10.53.0.2"], "conditions": {"ready": True}},
                      {"addresses": ["10.53.0.3"], "conditions": {"ready": False}}]})
    for tcp in (False, True):
        assert answer(server, fqdn, tcp=tcp) == ["A 10.53.0.1", "A 10.53.0.2"]
    assert answer(server, f"hl-0.{fqdn}") == ["A 10.53.0.1"]
    # another Service's slice (other label) is not this one's
    create(cluster, svc("hl2", {"clusterIP": "None", "ports": PORTS}))
    assert ask(server, f"hl2.{NS}.svc.cluster.local").answer == []


def test_external_name_is_a_cname(cluster: Cluster, server: int) -> None:
    Api(cluster, NS)
    create(cluster, svc("ext", {"type": "ExternalName", "externalName": "foo.example.com"}))
    create(cluster, svc("inzone", {"type": "ExternalName", "externalName": "kubernetes.default.svc.cluster.local"}))
    assert answer(server, f"ext.{NS}.svc.cluster.local") == ["CNAME foo.example.com."]
    assert answer(server, f"inzone.{NS}.svc.cluster.local", tcp=True) == [
        "A 10.96.0.1", "CNAME kubernetes.default.svc.cluster.local."]


def test_names_that_do_not_exist(cluster: Cluster, server: int) -> None:
    Api(cluster, NS)
    assert ask(server, f"nosuch.{NS}.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert ask(server, f"{NS}.svc.cluster.local").rcode() == dns.rcode.NOERROR  # the namespace exists
    assert ask(server, "nosuch-ns.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    t0 = time.monotonic()
    assert ask(server, "example.com").rcode() == dns.rcode.NXDOMAIN
    assert time.monotonic() - t0 < 1.0  # answered, not forwarded and timed out


def test_a_rejected_token_is_servfail_not_nxdomain(cluster: Cluster) -> None:
    directory = cdns.KubeDirectory(cluster.url, "not-a-token", str(cluster.dir / "ca.crt"))
    srv = cdns.Server("127.0.0.1", 0, cdns.Resolver(directory)).start()
    try:
        assert ask(srv.port, "kubernetes.default.svc.cluster.local").rcode() == dns.rcode.SERVFAIL
    finally:
        srv.close()
