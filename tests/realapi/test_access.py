"""How the agent reaches a real kube-apiserver v1.20.2: in-cluster credentials with
an explicit address when the in-cluster ClusterIP has no route yet, one clear log
line when it has none and no address is given, and each endpoints source."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from ipvsproxy.sources import kube
from ipvsproxy.sources.kube import EndpointsSource
from tests.realapi.cluster import ADMIN_TOKEN, Cluster, free_port
from tests.realapi.conftest import NODE, Api, Live, key, rs, wait_until

pytestmark = pytest.mark.realapi


@pytest.fixture
def in_pod(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pod's view: service-account token + CA files, and KUBERNETES_SERVICE_HOST/PORT naming
    an address nothing answers on (the ClusterIP before any service proxy programmed it)."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(ADMIN_TOKEN)
    (sa / "ca.crt").write_text((cluster.dir / "ca.crt").read_text())
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(free_port()))
    return sa


def test_explicit_api_server_address_brings_the_agent_up(
        cluster: Cluster, in_pod: Path, live: Callable[..., Live]) -> None:
    api = Api(cluster, "t-address")
    api.create_service("a", "10.96.7.1")
    api.create_slice("a", ["10.7.1.1"])
    lv = live(kubeconfig=None, api_server=cluster.url)  # a fresh (empty) table: no route to the ClusterIP
    wait_until(lambda: lv.dp.table("10.96.7.") == {key("10.96.7.1"): rs("10.7.1.1")}, what="a programmed")
    assert lv.source.api.host == cluster.url and not lv.source.via_cluster_ip


def test_unreachable_in_cluster_address_logs_one_clear_line(
        cluster: Cluster, in_pod: Path, live: Callable[..., Live], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ipvsproxy.sources.kube")
    lv = live(kubeconfig=None)
    assert lv.source.via_cluster_ip
    wait_until(lambda: lv.source.stats["errors"] >= 9, what="retries")
    hints = [r for r in caplog.records if "--api-server" in r.getMessage()]
    assert len(hints) == 1, [r.getMessage() for r in hints]
    (hint,) = hints
    assert hint.levelno == logging.ERROR and "apiServer.host" in hint.getMessage()
    assert not lv.agent.tracker.ready()


@pytest.mark.parametrize("source", ["auto", "v1beta1", "endpoints"])
def test_each_endpoints_source_the_server_serves(cluster: Cluster, live: Callable[..., Live], source: str) -> None:
    api = Api(cluster, "t-sources")
    if not cluster.request("GET", "/api/v1/namespaces/t-sources/services")["items"]:
        api.create_service("a", "10.96.8.1")
        api.create_slice("a", ["10.8.1.1", "10.8.1.2"])
        cluster.request("POST", "/api/v1/namespaces/t-sources/endpoints", {
            "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "a", "namespace": "t-sources"},
            "subsets": [{"addresses": [{"ip": "10.8.1.1", "nodeName": NODE}, {"ip": "10.8.1.2", "nodeName": NODE}],
                         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]})
    lv = live(endpoints_source=source)
    wait_until(lambda: lv.dp.table("10.96.8.") == {key("10.96.8.1"): rs("10.8.1.1", "10.8.1.2")}, what="a")
    want = EndpointsSource.V1BETA1 if source == "auto" else EndpointsSource(source)
    assert lv.source.endpoints_source is want


def test_forcing_v1_slices_on_a_v1_20_server_says_it_is_not_served(
        cluster: Cluster, live: Callable[..., Live], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "ipvsproxy.sources.kube")
    lv = live(endpoints_source="v1")
    wait_until(lambda: "does not serve /apis/discovery.k8s.io/v1/endpointslices" in caplog.text, what="the error")
    assert not lv.agent.tracker.ready()
