"""`ipvsproxy list` against the real kernel (inside the IPVS test VM).

Two Services programmed by ipvsproxy (lst/shop TCP 198.18.11.1:80, lst/dns UDP
198.18.11.2:53) and one foreign virtual server made with ipvsadm
(198.18.21.1:80) carry real traffic from the root namespace to two backend
namespaces; `list --stats -o json` must report exactly the counters that
`ipvsadm -Ln --stats --exact` reports (and `--rate` the rates), for every
virtual and real server, and name the Service each virtual server belongs to.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netns import Backend, Netlab, http_get, udp_ask, wait_until
from proxylab import (
    READY,
    agent_config,
    endpoint_slice,
    hostport,
    ipvsadm,
    node,
    run_cli,
    service,
    sync,
    write_manifests,
)

pytestmark = pytest.mark.kernel

NODE, NS = "lst-node", "lst"
SHOP, DNS, FOREIGN = "198.18.11.1", "198.18.11.2", "198.18.21.1"
Counters = tuple[int, ...]
Table = dict[tuple[str, str], tuple[Counters, dict[str, Counters]]]
STATS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")  # ipvsadm --stats columns
RATES = ("cps", "inpps", "outpps", "inbps", "outbps")  # ipvsadm --rate columns


@dataclass
class ListLab:
    backends: list[Backend]
    state_dir: str


def kernel_table(option: str) -> Table:
    """`ipvsadm -Ln --stats|--rate --exact`: {(protocol, vip:port): (counters, {real: counters})}."""
    out: Table = {}
    reals: dict[str, Counters] = {}
    for line in ipvsadm("-Ln", option, "--exact").splitlines():
        tok = line.split()
        if len(tok) != 7 or not tok[2].isdigit():
            continue
        nums = tuple(int(t) for t in tok[2:7])
        if tok[0] in ("TCP", "UDP", "SCTP"):
            reals = {}
            out[(tok[0], tok[1])] = (nums, reals)
        elif tok[0] == "->":
            reals[tok[1]] = nums
    return out


def listed_table(doc: dict[str, Any], field: str, names: tuple[str, ...]) -> Table:
    """The same shape from `ipvsproxy list --stats|--rate -o json` (field "stats" or "rates")."""
    return {
        (item["protocol"], hostport(item["address"], item["port"])): (
            tuple(item[field][k] for k in names),
            {hostport(r["address"], r["port"]): tuple(r[field][k] for k in names) for r in item["realServers"]},
        )
        for item in doc["items"]
    }


def both(lab: ListLab, option: str, field: str, names: tuple[str, ...]) -> tuple[Table, Table]:
    """ipvsadm's and ipvsproxy's reading of the same kernel counters. The kernel folds its per-CPU
    counters (and rates) into what it reports every 2 s: a fold between two reads shows different
    numbers, so ipvsadm reads before and after `list`, and it all repeats until they agree."""
    for _ in range(5):
        before = kernel_table(option)
        listed = listed_table(list_json(lab, option), field, names)
        if before == kernel_table(option):
            return before, listed
    raise AssertionError("IPVS counters never held still for two reads")


def list_json(lab: ListLab, *args: str) -> dict[str, Any]:
    res = run_cli("list", "-o", "json", "--state-dir", lab.state_dir, *args)
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


@pytest.fixture(scope="module")
def lab(module_netlab: Netlab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListLab]:
    bs = module_netlab.backends(2, names=["lst-a", "lst-b"])
    base = tmp_path_factory.mktemp("list")
    http = [{"name": "http", "protocol": "TCP", "port": 8080}]
    dns = [{"name": "dns", "protocol": "UDP", "port": 5353}]
    eps = [(b.ipv4, b.name, READY) for b in bs]
    write_manifests(base / "manifests", [
        node(NODE, ["198.18.11.254"]),
        service(NS, "shop", [SHOP], [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]),
        endpoint_slice(NS, "shop", "1", "IPv4", eps, http, NODE),
        service(NS, "dns", [DNS], [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}]),
        endpoint_slice(NS, "dns", "1", "IPv4", eps, dns, NODE),
    ])
    cfg = agent_config(NODE, base / "manifests", base / "state")
    ipvsadm("-A", "-t", f"{FOREIGN}:80", "-s", "rr")
    ipvsadm("-a", "-t", f"{FOREIGN}:80", "-r", f"{bs[1].ipv4}:8080", "-m")
    module_netlab.vips(FOREIGN)
    try:
        assert not sync(cfg).failures
        yield ListLab(bs, cfg.state_dir)
    finally:
        run_cli("cleanup")
        ipvsadm("-D", "-t", f"{FOREIGN}:80")


def test_list_stats_and_rates_match_ipvsadm(lab: ListLab) -> None:
    for _ in range(6):
        http_get(SHOP, 80)
    for _ in range(4):
        udp_ask(DNS, 53)
    for _ in range(3):
        http_get(FOREIGN, 80)
    traffic = {("TCP", f"{SHOP}:80"): 6, ("UDP", f"{DNS}:53"): 4, ("TCP", f"{FOREIGN}:80"): 3}

    def counted() -> bool:
        k = kernel_table("--stats")
        return all(k[key][0][0] == n for key, n in traffic.items())

    wait_until(counted, 15, 0.2, what="IPVS counters to show the traffic")
    kernel, listed = both(lab, "--stats", "stats", STATS)
    assert set(traffic) <= set(listed)
    for key in traffic:
        assert listed[key] == kernel[key], key
        assert all(c[1] > 0 and c[3] > 0 for c in kernel[key][1].values()), kernel[key]  # every real had traffic
    assert listed == {k: v for k, v in kernel.items() if k in listed}
    kernel, listed = both(lab, "--rate", "rates", RATES)
    assert any(sum(kernel[key][0]) for key in traffic), kernel  # rates right after the traffic are not all 0
    assert listed == {k: v for k, v in kernel.items() if k in listed}


def test_list_names_services_and_filters(lab: ListLab) -> None:
    doc = list_json(lab, "--stats", "--rate")
    assert doc["apiVersion"] == "ipvsproxy.io/v1" and doc["kind"] == "VirtualServerList" and doc["node"] == NODE
    items = {(i["protocol"], i["address"], i["port"]): i for i in doc["items"]}
    shop, dns, foreign = items[("TCP", SHOP, 80)], items[("UDP", DNS, 53)], items[("TCP", FOREIGN, 80)]
    assert (shop["namespace"], shop["service"], shop["portName"], shop["type"], shop["owner"]) == \
        (NS, "shop", "http", "ClusterIP", "ipvsproxy")
    assert (dns["namespace"], dns["service"], dns["portName"], dns["owner"]) == (NS, "dns", "dns", "ipvsproxy")
    assert (foreign["service"], foreign["owner"], foreign["flags"]) == (None, "foreign", [])
    assert {(r["target"], r["node"], r["weight"], r["state"]) for r in shop["realServers"]} == \
        {(f"Pod/{b.name}", NODE, 1, "active") for b in lab.backends}
    assert set(shop["rates"]) == {"cps", "inpps", "outpps", "inbps", "outbps"}
    assert [(i["service"]) for i in list_json(lab, "-n", NS, "dns")["items"]] == ["dns"]
    assert list_json(lab, "-n", "elsewhere")["items"] == []
    table = run_cli("list", "--state-dir", lab.state_dir, "-o", "wide").stdout
    assert "lst/shop:http" in table and "Pod/lst-a" in table and "(foreign)" in table, table
    assert Path(lab.state_dir, "services.json").exists()
