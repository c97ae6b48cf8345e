"""The /metrics traffic collector's cost bounds (issue 14 item 8), on a fake clock.

Before, every scrape dumped all of IPVS (virtual and real servers) and exported
5 series per virtual server, labelled by address. Now one services-only reading
is reused for max_age seconds and the series are per Service port by default.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, generate_latest

from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, AF_INET6, F_OWNED, ObservedVS, ServiceRef, VSKey
from ipvsproxy.observe.metrics import TrafficCollector


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


WEB4 = VSKey(AF_INET, 6, "198.19.0.10", 80)
WEB6 = VSKey(AF_INET6, 6, "2001:2::10", 80)
WEB_NP = VSKey(AF_INET, 6, "198.18.0.1", 30080)
DNS = VSKey(AF_INET, 17, "198.19.0.53", 53)
FOREIGN = VSKey(AF_INET, 6, "198.19.9.9", 80)
REFS = {
    WEB4: ServiceRef("demo", "web", "http", "ClusterIP"),
    WEB6: ServiceRef("demo", "web", "http", "ClusterIP"),
    WEB_NP: ServiceRef("demo", "web", "http", "NodePort"),
    DNS: ServiceRef("kube-system", "dns", "dns", "ClusterIP"),
}


def dataplane() -> MemoryDataplane:
    dp = MemoryDataplane()
    for i, k in enumerate([WEB4, WEB6, WEB_NP, DNS]):
        dp.state.services[k] = ObservedVS(k, "rr", F_OWNED, 0, stats={
            "conns": 10 * (i + 1), "inpkts": 100 * (i + 1), "outpkts": 90 * (i + 1),
            "inbytes": 1000 * (i + 1), "outbytes": 900 * (i + 1)})
    dp.state.services[FOREIGN] = ObservedVS(FOREIGN, "rr", 0, 0, stats={"conns": 7})
    return dp


def scrape(c: TrafficCollector) -> str:
    r = CollectorRegistry()
    r.register(c)
    return generate_latest(r).decode()


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_one_kernel_reading_per_interval_however_many_scrapes() -> None:
    dp, clock = dataplane(), Clock()
    c = TrafficCollector(dp.service_stats, REFS.get, max_age=10.0, clock=clock)
    for _ in range(5):
        scrape(c)
    assert dp.counters.dumps == 1 and c.dumps == 1
    dp.state.services[DNS].stats = {"conns": 1000}
    clock.t += 9.9
    assert 'service="dns"} 40.0' in scrape(c)  # the reading is reused...
    clock.t += 0.1
    assert 'service="dns"} 1000.0' in scrape(c)  # ...until it is max_age old
    assert dp.counters.dumps == 2


def test_zero_interval_reads_every_scrape() -> None:
    dp, clock = dataplane(), Clock()
    c = TrafficCollector(dp.service_stats, REFS.get, max_age=0.0, clock=clock)
    scrape(c)
    scrape(c)
    assert dp.counters.dumps == 2


def test_per_service_aggregation_is_the_default() -> None:
    text = scrape(TrafficCollector(dataplane().service_stats, REFS.get, clock=Clock()))
    conns = series(text, "ipvsproxy_service_connections_total")
    assert sorted(conns) == [
        'ipvsproxy_service_connections_total{namespace="demo",port="http",service="web"} 60.0',  # 10+20+30
        'ipvsproxy_service_connections_total{namespace="kube-system",port="dns",service="dns"} 40.0',
    ]
    assert 'ipvsproxy_service_bytes_total{direction="in",namespace="demo",port="http",service="web"} 6000.0' in text
    assert "address=" not in text and "198.19.9.9" not in text  # foreign virtual servers are not ours
    assert len(series(text, "ipvsproxy_service_packets_total")) == 4  # 2 Service ports x in/out


def test_per_address_is_an_option() -> None:
    text = scrape(TrafficCollector(dataplane().service_stats, REFS.get, per_address=True, clock=Clock()))
    conns = series(text, "ipvsproxy_service_connections_total")
    assert len(conns) == 4
    assert ('ipvsproxy_service_connections_total{address="2001:2::10:80",kind="ClusterIP",namespace="demo",'
            'port="http",service="web"} 20.0') in conns
    assert ('ipvsproxy_service_connections_total{address="198.18.0.1:30080",kind="NodePort",namespace="demo",'
            'port="http",service="web"} 30.0') in conns


def test_a_failed_reading_leaves_metrics_working_and_is_retried() -> None:
    clock = Clock()
    calls = {"n": 0}
    good = dataplane()

    def read() -> Mapping[VSKey, tuple[bool, Mapping[str, int]]]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("netlink: No buffer space available")
        return good.service_stats()

    c = TrafficCollector(read, REFS.get, max_age=10.0, clock=clock)
    assert series(scrape(c), "ipvsproxy_service_connections_total") == []
    assert len(series(scrape(c), "ipvsproxy_service_connections_total")) == 2  # not cached as empty
