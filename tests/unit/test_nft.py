"""Unit tests for ipvsproxy.dataplane.nft against a fake `nft`.

The fake keeps a small model of one nftables ruleset (tables, sets with
elements, chains, rules), answers `list` commands in the shape nft 1.0.6
prints (protocols by name, /32 and /128 prefixes as bare addresses), applies
each document all-or-nothing like a netlink batch, and records every
document it was sent.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from ipvsproxy.config import AgentConfig, parse_cidrs
from ipvsproxy.dataplane import nft as nft_module
from ipvsproxy.dataplane.nft import (
    CHAINS,
    RULES,
    SET_NAMES,
    NftError,
    run_nft_cli,
    scratch_file,
)
from ipvsproxy.model import AF_INET, AF_INET6, DesiredState, Real, ServiceRef, VirtualServer, VSKey
from tests.nftdriver import Firewall

TCP, UDP = 6, 17


def _kernel_value(v: Any) -> Any:
    """How nft prints a value back: single-address prefixes as the address."""
    if isinstance(v, dict) and "prefix" in v:
        p = v["prefix"]
        full = 128 if ":" in p["addr"] else 32
        return p["addr"] if p["len"] == full else v
    if isinstance(v, dict) and "concat" in v:
        return {"concat": [_kernel_value(x) for x in v["concat"]]}
    return v


class FakeNft:
    """nft's JSON interface over an in-memory rule set. Like run_nft_cli it takes documents as
    a file of JSON text too (`takes_file`, the default: the firewall then writes element lists
    into an in-memory file)."""

    def __init__(self, takes_file: bool = True) -> None:
        self.takes_file = takes_file
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.docs: list[dict[str, Any]] = []  # every document received
        self.fail_next: str | None = None  # refuse the next transaction with this message
        self.time_out_next = False  # apply the next transaction, then report a timeout

    # what was sent, without the read-only `list` documents
    @property
    def transactions(self) -> list[list[dict[str, Any]]]:
        return [[c for c in d["nftables"] if "metainfo" not in c] for d in self.docs
                if not any("list" in c for c in d["nftables"])]

    def __call__(self, doc: dict[str, Any] | BinaryIO) -> dict[str, Any]:
        if not isinstance(doc, dict):
            assert self.takes_file, "a file sent to a runner that takes dicts"
            doc = json.loads(doc.read())
        json.dumps(doc)  # must be plain JSON
        self.docs.append(copy.deepcopy(doc))
        cmds = [c for c in doc["nftables"] if "metainfo" not in c]
        if len(cmds) == 1 and "list" in cmds[0]:
            return self._list(cmds[0]["list"])
        if self.fail_next:
            msg, self.fail_next = self.fail_next, None
            raise NftError(msg)
        saved = copy.deepcopy(self.tables)
        try:
            for c in cmds:
                (verb, obj), = c.items()
                (kind, body), = obj.items()
                getattr(self, f"_{verb}")(kind, body)
        except Exception:
            self.tables = saved
            raise
        if self.time_out_next:  # nft was killed after the kernel took the batch
            self.time_out_next = False
            raise NftError("nft did not answer within 60s", timed_out=True)
        return {}

    def _table(self, body: dict[str, Any], create: bool = False) -> dict[str, Any]:
        key = (str(body["family"]), str(body.get("table", body.get("name"))))
        if key not in self.tables:
            if not create:
                raise NftError("No such file or directory")
            self.tables[key] = {"sets": {}, "chains": {}, "rules": {}}
        return self.tables[key]

    def _add(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "table":
            self._table(body, create=True)
            return
        t = self._table(body)
        if kind == "set":
            t["sets"].setdefault(body["name"], {**body, "elem": []})
        elif kind == "chain":
            t["chains"].setdefault(body["name"], body)
            t["rules"].setdefault(body["name"], [])
        elif kind == "rule":
            for e in body["expr"]:
                if "match" in e and isinstance(e["match"]["right"], str) and e["match"]["right"].startswith("@"):
                    assert e["match"]["right"][1:] in t["sets"], "rule refers to a missing set"
            t["rules"][body["chain"]].append(body)
        elif kind == "element":
            s = t["sets"][body["name"]]
            for e in body["elem"]:
                v = _kernel_value(e)
                if v not in s["elem"]:
                    s["elem"].append(v)

    def _delete(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "table":
            if (body["family"], body["name"]) not in self.tables:
                raise NftError("No such file or directory")
            del self.tables[(body["family"], body["name"])]
            return
        t = self._table(body)
        if kind == "set":
            assert not any(r for rs in t["rules"].values() for r in rs
                           if f'"@{body["name"]}"' in json.dumps(r)), "set still in use"
            del t["sets"][body["name"]]
        elif kind == "chain":
            assert not t["rules"][body["name"]], "chain not empty"
            del t["chains"][body["name"]]
            del t["rules"][body["name"]]
        elif kind == "element":
            s = t["sets"][body["name"]]
            for e in body["elem"]:
                v = _kernel_value(e)
                if v not in s["elem"]:
                    raise NftError("Could not process rule: No such file or directory")
                s["elem"].remove(v)

    def _flush(self, kind: str, body: dict[str, Any]) -> None:
        assert kind == "chain"
        self._table(body)["rules"][body["name"]] = []

    def _list(self, what: dict[str, Any]) -> dict[str, Any]:
        meta = {"metainfo": {"version": "1.0.6", "json_schema_version": 1}}
        if "tables" in what:
            return {"nftables": [meta, *({"table": {"family": f, "name": n, "handle": 1}} for f, n in self.tables)]}
        if "ruleset" in what:  # every table (the real nft's terse listing leaves the elements out)
            return {"nftables": [meta, *(item for f, n in self.tables for item in self._items(f, n))]}
        body = what["table"]
        return {"nftables": [meta, *self._items(body["family"], body["name"])]}

    def _items(self, family: str, name: str) -> list[dict[str, Any]]:
        t = self._table({"family": family, "name": name})
        out: list[dict[str, Any]] = [{"table": {"family": family, "name": name}}]
        for s in t["sets"].values():
            item = {k: v for k, v in s.items() if k != "elem"}
            if s["elem"]:
                item["elem"] = [self._named(e) for e in s["elem"]]
            out.append({"set": item})
        out += [{"chain": c} for c in t["chains"].values()]
        out += [{"rule": r} for rs in t["rules"].values() for r in rs]
        return out

    @staticmethod
    def _named(e: Any) -> Any:
        names = {6: "tcp", 17: "udp", 132: "sctp"}
        if isinstance(e, dict) and "concat" in e:
            return {"concat": [names.get(x, x) if i == 1 and isinstance(x, int) else x
                               for i, x in enumerate(e["concat"])]}
        return e

    def elems(self, name: str, family: str = "inet", table: str = "ipvsproxy") -> list[Any]:
        return self.tables[(family, table)]["sets"][name]["elem"]


def svc(address: str, port: int, kind: str = "ClusterIP", reals: tuple[tuple[str, int], ...] = (("10.244.1.5", 8080),),
        *, local: bool = False, ranges: tuple[str, ...] = (), proto: int = TCP) -> VirtualServer:
    fam = AF_INET6 if ":" in address else AF_INET
    return VirtualServer(VSKey(fam, proto, address, port), reals=tuple(Real(a, p) for a, p in reals),
                         service=ServiceRef("default", "web", "http", kind), local=local, source_ranges=ranges)


def state(*servers: VirtualServer) -> DesiredState:
    return DesiredState.of(servers, {s.key.address for s in servers
                                     if s.service is not None and s.service.kind != "NodePort"})


def cfg(**kw: Any) -> AgentConfig:
    kw.setdefault("cluster_cidrs", parse_cidrs("10.244.0.0/16,fd00:244::/56"))
    return AgentConfig(node_name="n1", nftables=True, **kw)


BASE = (
    svc("10.96.0.10", 80),
    svc("10.96.0.10", 53, proto=UDP, reals=(("10.244.2.7", 53),)),
    svc("192.168.1.10", 30080, "NodePort", reals=(("10.244.2.7", 8080),)),
    svc("fd00:96::10", 80, reals=(("fd00:244::5", 8080),)),
)


@pytest.fixture(params=[True, False], ids=["file", "dict"])
def nft(request: pytest.FixtureRequest) -> FakeNft:
    return FakeNft(takes_file=request.param)


def test_the_file_document_is_the_dict_document() -> None:
    big = [svc(f"10.96.{i // 200}.{i % 200 + 1}", 80, reals=((f"10.244.{i % 7}.{i % 250 + 1}", 8080),))
           for i in range(600)]
    docs = []
    for takes_file in (True, False):
        kernel = FakeNft(takes_file)
        fw = Firewall(cfg(), nft=kernel)
        fw.sync_state(state(*BASE, *big))
        fw.sync_state(state(*BASE, *big[1:]), scope={big[0].key})
        docs.append(kernel.docs)
    assert docs[0] == docs[1] and len(docs[0]) >= 2


def test_first_sync_creates_table_chains_sets_rules_and_elements_in_one_transaction(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)
    n = fw.sync_state(state(*BASE))
    assert len(nft.transactions) == 1
    tx = nft.transactions[0]
    assert tx[0] == {"add": {"table": {"family": "inet", "name": "ipvsproxy"}}}
    added = [(verb, kind) for c in tx for verb, obj in c.items() for kind in obj]
    assert added.count(("add", "set")) == len(SET_NAMES) == 18
    assert added.count(("add", "chain")) == len(CHAINS) == 4
    assert added.count(("add", "rule")) == len(RULES)
    # sets come before the rules that use them
    assert max(i for i, a in enumerate(added) if a == ("add", "set")) < added.index(("add", "rule"))
    assert not any(verb in ("flush", "delete") for verb, _ in added)
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in tx if "chain" in c.get("add", {})}
    assert (chains["input"]["type"], chains["input"]["hook"], chains["input"]["prio"]) == ("filter", "input", 0)
    assert chains["output"]["prio"] < -99  # before IPVS's LOCAL_OUT hook
    assert (chains["postrouting"]["type"], chains["postrouting"]["prio"]) == ("nat", 100)
    els = fw.elements()
    assert els["vips4"] == {("10.96.0.10",)}
    assert els["vips6"] == {("fd00:96::10",)}
    assert els["services4"] == {("10.96.0.10", TCP, 80), ("10.96.0.10", UDP, 53), ("192.168.1.10", TCP, 30080)}
    assert els["masq4"] == els["services4"]
    assert els["masq6"] == {("fd00:96::10", TCP, 80)}
    assert els["masq_any4"] == set()
    assert els["cluster4"] == {("10.244.0.0/16",)}
    assert els["cluster6"] == {("fd00:244::/56",)}
    assert els["hairpin4"] == {("10.244.1.5", TCP, 8080, "10.244.1.5"), ("10.244.2.7", UDP, 53, "10.244.2.7"),
                               ("10.244.2.7", TCP, 8080, "10.244.2.7")}
    assert els["hairpin6"] == {("fd00:244::5", TCP, 8080, "fd00:244::5")}
    n_elems = sum(len(v) for v in els.values())
    assert n == n_elems + len(RULES)


def test_second_identical_sync_sends_nothing(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(*BASE))
    sent = len(nft.docs)
    assert fw.sync_state(state(*BASE), scope=set()) == 0
    assert len(nft.docs) == sent  # an incremental sync: not even a listing
    assert fw.sync_state(state(*BASE)) == 0  # a full sync reads the table, and finds nothing to send
    assert len(nft.transactions) == 1


def test_an_incremental_sync_never_reads_the_table(nft: FakeNft) -> None:
    """A change costs one small transaction whatever the table holds: the
    whole-table listing (seconds at 10,000 Services, minutes under emulation)
    belongs to full syncs only."""
    servers = [svc(f"10.96.{i // 250}.{i % 250 + 1}", 80) for i in range(500)]
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(*servers))
    assert fw.reads == 1
    for i in range(20):
        added = svc("10.96.9.9", 80, reals=(("10.244.9.1", 8000 + i),))
        before = len(nft.docs)
        assert fw.sync_state(state(*servers, added), scope={added.key}) > 0
        assert len(nft.docs) == before + 1  # the transaction, and nothing else
        assert not any("list" in c for c in nft.docs[-1]["nftables"])
    assert fw.reads == 1
    assert fw.elements() == fw.desired_elements(state(*servers, added))


def test_one_vip_added_is_only_element_adds_in_one_transaction(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(*BASE))
    n = fw.sync_state(state(*BASE, svc("10.96.0.20", 443, reals=(("10.244.1.5", 8443),))))
    assert len(nft.transactions) == 2
    tx = nft.transactions[1]
    assert all(list(c) == ["add"] and list(c["add"]) == ["element"] for c in tx)
    got = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in tx}
    assert got == {
        "vips4": ["10.96.0.20"],
        "services4": [{"concat": ["10.96.0.20", 6, 443]}],
        "masq4": [{"concat": ["10.96.0.20", 6, 443]}],
        "hairpin4": [{"concat": ["10.244.1.5", 6, 8443, "10.244.1.5"]}],
    }
    assert n == 4


def test_removal_is_element_deletes(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(*BASE))
    n = fw.sync_state(state(*BASE[:2], BASE[3]))  # the NodePort goes
    tx = nft.transactions[-1]
    assert all(list(c) == ["delete"] and list(c["delete"]) == ["element"] for c in tx)
    got = {c["delete"]["element"]["name"]: c["delete"]["element"]["elem"] for c in tx}
    assert got == {
        "services4": [{"concat": ["192.168.1.10", 6, 30080]}],
        "masq4": [{"concat": ["192.168.1.10", 6, 30080]}],
        "hairpin4": [{"concat": ["10.244.2.7", 6, 8080, "10.244.2.7"]}],
    }
    assert n == 3
    assert ("192.168.1.10",) not in fw.elements()["vips4"]  # a node address was never a VIP


def test_deletes_come_before_adds_in_the_transaction(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)
    lb = svc("198.51.100.7", 80, "LoadBalancer", ranges=("203.0.113.0/25",))
    fw.sync_state(state(lb))
    wider = svc("198.51.100.7", 80, "LoadBalancer", ranges=("203.0.113.0/24",))  # overlaps the old range
    assert fw.sync_state(state(wider)) == 2
    verbs = [next(iter(c)) for c in nft.transactions[-1]]
    assert verbs == ["delete", "add"]
    assert fw.elements()["fw_allow4"] == {("198.51.100.7", TCP, 80, "203.0.113.0/24")}


def test_local_policy_is_never_masqueraded(nft: FakeNft) -> None:
    local_np = svc("192.168.1.10", 30081, "NodePort", local=True)
    local_lb = svc("198.51.100.8", 80, "LoadBalancer", local=True)
    for c in (cfg(), cfg(masquerade_all=True), cfg(cluster_cidrs=())):
        fw = Firewall(c, nft=FakeNft())
        want = fw.desired_elements(state(*BASE, local_np, local_lb))
        for key in (("192.168.1.10", TCP, 30081), ("198.51.100.8", TCP, 80)):
            assert key in want["services4"]
            assert key not in want["masq4"] and key not in want["masq_any4"]
        assert ("10.244.1.5", TCP, 8080, "10.244.1.5") in want["hairpin4"]  # hairpin still applies


def test_masquerade_modes(nft: FakeNft) -> None:
    ext = svc("203.0.113.5", 80, "ExternalIP")
    # --masquerade-all: every Service from any source; the cluster CIDRs play no part
    want = Firewall(cfg(masquerade_all=True), nft=nft).desired_elements(state(*BASE, ext))
    assert want["masq_any4"] == want["services4"] and want["masq_any6"] == want["services6"]
    assert want["masq4"] == set() and want["cluster4"] == {("10.244.0.0/16",)}  # known pods: rule 2
    # no cluster CIDR: external kinds from anywhere, ClusterIPs not at all (kube-proxy's behaviour)
    want = Firewall(cfg(cluster_cidrs=()), nft=nft).desired_elements(state(*BASE, ext))
    assert want["masq_any4"] == {("192.168.1.10", TCP, 30080), ("203.0.113.5", TCP, 80)}
    assert want["masq4"] == set() and want["masq_any6"] == set()
    # a v4 cluster CIDR only: v4 by source, v6 ClusterIP untouched
    want = Firewall(cfg(cluster_cidrs=parse_cidrs("10.244.0.0/16")), nft=nft).desired_elements(state(*BASE))
    assert ("fd00:96::10", TCP, 80) not in want["masq6"] | want["masq_any6"]
    assert ("10.96.0.10", TCP, 80) in want["masq4"]
    # overlapping cluster CIDRs are merged (an interval set refuses overlaps)
    want = Firewall(cfg(cluster_cidrs=parse_cidrs("10.0.0.0/8,10.244.0.0/16")), nft=nft).desired_elements(
        state(*BASE))
    assert want["cluster4"] == {("10.0.0.0/8",)}


def test_local_policy_without_local_endpoint_is_for_local_origin_only(nft: FakeNft) -> None:
    """docs/semantics.md rule 2: the fallback virtual servers go in nolocal4/6,
    which the input chain drops unless the source is a pod or the node."""
    lb = dataclasses.replace(svc("198.51.100.8", 80, "LoadBalancer", local=True), local_origin_only=True)
    np6 = dataclasses.replace(svc("fd00:1::1", 30081, "NodePort", local=True), local_origin_only=True)
    want = Firewall(cfg(), nft=nft).desired_elements(state(*BASE, lb, np6))
    assert want["nolocal4"] == {("198.51.100.8", TCP, 80)} and want["nolocal6"] == {("fd00:1::1", TCP, 30081)}
    rule = next(r for r in RULES if r.name == "no-local-endpoint-v4")
    assert rule.chain == "input" and {"drop": None} in rule.expr
    text = json.dumps(rule.expr)
    assert "@nolocal4" in text and "@cluster4" in text and '"fib"' in text


def test_a_node_address_is_never_a_vip(nft: FakeNft) -> None:
    """docs/semantics.md rule 5: an external IP that is the node's own address
    is not in vips4, so the VIP port filter never closes the node's other ports."""
    own = dataclasses.replace(svc("192.168.1.10", 80, "ExternalIP"), bind=False)
    fw = Firewall(cfg(), nft=nft)
    want = fw.desired_elements(DesiredState.of([*BASE, own], {"10.96.0.10", "fd00:96::10"}))
    assert ("192.168.1.10", TCP, 80) in want["services4"]
    assert ("192.168.1.10",) not in want["vips4"]


def test_load_balancer_source_ranges(nft: FakeNft) -> None:
    lb4 = svc("198.51.100.7", 80, "LoadBalancer",
              ranges=("203.0.113.0/24", "203.0.113.128/25", " 192.0.2.1 ", "2001:db8::/32"))
    lb6 = svc("2001:db8:1::7", 80, "LoadBalancer", ranges=("203.0.113.0/24", "2001:db8::/32"))
    open_lb = svc("198.51.100.9", 80, "LoadBalancer")
    cluster_ip = svc("10.96.0.11", 80, ranges=("203.0.113.0/24",))  # ranges only count on LB addresses
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(lb4, lb6, open_lb, cluster_ip))
    els = fw.elements()
    assert els["fw4"] == {("198.51.100.7", TCP, 80)}
    assert els["fw_allow4"] == {("198.51.100.7", TCP, 80, "203.0.113.0/24"),
                                ("198.51.100.7", TCP, 80, "192.0.2.1/32")}
    assert els["fw6"] == {("2001:db8:1::7", TCP, 80)}
    assert els["fw_allow6"] == {("2001:db8:1::7", TCP, 80, "2001:db8::/32")}
    sent = [c["add"]["element"] for c in nft.transactions[0] if "element" in c.get("add", {})]
    allow = next(e for e in sent if e["name"] == "fw_allow4")["elem"]
    assert {"concat": ["198.51.100.7", 6, 80, {"prefix": {"addr": "203.0.113.0", "len": 24}}]} in allow
    assert fw.sync_state(state(lb4, lb6, open_lb, cluster_ip)) == 0  # /32 read back as a bare address: no churn


def test_bad_cidr_is_skipped_with_one_warning(nft: FakeNft, caplog: pytest.LogCaptureFixture) -> None:
    lb = svc("198.51.100.7", 80, "LoadBalancer", ranges=("203.0.113.0/24", "300.1.2.0/24", "; rm -rf /"))
    fw = Firewall(cfg(), nft=nft)
    with caplog.at_level(logging.WARNING, logger="ipvsproxy.dataplane.nft"):
        fw.sync_state(state(lb))
        fw.sync_state(state(lb, svc("10.96.0.1", 443)))
    warnings = [r.getMessage() for r in caplog.records if "loadBalancerSourceRanges" in r.getMessage()]
    assert len(warnings) == 2 and "'300.1.2.0/24'" in warnings[0] and "default/web" in warnings[0]
    assert fw.elements()["fw_allow4"] == {("198.51.100.7", TCP, 80, "203.0.113.0/24")}
    assert "rm -rf" not in json.dumps(nft.docs)


def test_excluded_cidrs_are_left_alone(nft: FakeNft) -> None:
    fw = Firewall(cfg(exclude_cidrs=parse_cidrs("10.96.0.0/24")), nft=nft)
    want = fw.desired_elements(state(*BASE))
    assert ("10.96.0.10",) not in want["vips4"]
    assert all(e[0] != "10.96.0.10" for e in want["services4"] | want["masq4"])


def _kernel_after(desired: DesiredState, c: AgentConfig | None = None) -> FakeNft:
    """A fake kernel holding what an earlier agent left (a restart's view)."""
    kernel = FakeNft()
    Firewall(c or cfg(), nft=kernel).sync_state(desired)
    kernel.docs.clear()
    return kernel


def test_restart_adopts_the_table_and_changes_only_the_difference() -> None:
    kernel = _kernel_after(state(*BASE))
    fw = Firewall(cfg(), nft=kernel)
    assert fw.sync_state(state(*BASE)) == 0
    assert kernel.transactions == []
    listed = [c for d in kernel.docs for c in d["nftables"] if "list" in c]
    assert {"list": {"table": {"family": "inet", "name": "ipvsproxy"}}} in listed
    # a second restart, with one Service gone meanwhile
    fw = Firewall(cfg(), nft=kernel)
    assert fw.sync_state(state(*BASE[1:])) == 3  # 10.96.0.10:80's services4, masq4 and hairpin4 elements
    tx = kernel.transactions[-1]
    assert all(list(c) == ["delete"] and "element" in c["delete"] for c in tx)
    assert {c["delete"]["element"]["name"] for c in tx} == {"services4", "masq4", "hairpin4"}


def test_adoption_from_a_canned_listing() -> None:
    """The shape `nft -j list table inet ipvsproxy` printed on Debian 12 (nft 1.0.6)."""
    kernel = _kernel_after(state(*BASE))
    listing = kernel._list({"table": {"family": "inet", "name": "ipvsproxy"}})
    # exactly what nft prints: protocol names, bare /32, handles, no prefixes for hosts
    for item in listing["nftables"]:
        if "set" in item:
            item["set"]["handle"] = 7
    svcs = next(i["set"] for i in listing["nftables"] if i.get("set", {}).get("name") == "services4")
    assert {"concat": ["10.96.0.10", "udp", 53]} in svcs["elem"]
    canned = json.loads(json.dumps(listing))
    docs: list[dict[str, Any]] = []

    def nft(doc: dict[str, Any]) -> dict[str, Any]:
        docs.append(doc)
        cmd = doc["nftables"][-1]
        if cmd == {"list": {"tables": None}}:
            return {"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "ipvsproxy"}},
                                 {"table": {"family": "ip", "name": "nat"}}]}
        if "list" in cmd:
            return canned
        return {}

    fw = Firewall(cfg(), nft=nft)
    added = svc("10.96.0.30", 8080, reals=())
    assert fw.sync_state(state(*BASE, added)) == 3  # vips4, services4, masq4
    tx = [c for c in docs[-1]["nftables"] if "metainfo" not in c]
    assert {next(iter(c)) for c in tx} == {"add"}
    assert {c["add"]["element"]["name"] for c in tx} == {"vips4", "services4", "masq4"}


def test_adoption_repairs_stale_rules_and_a_wrong_set() -> None:
    kernel = _kernel_after(state(*BASE))
    t = kernel.tables[("inet", "ipvsproxy")]
    t["rules"]["input"][0]["comment"] = "ipvsproxy:old-version:0000000000"
    fw = Firewall(cfg(), nft=kernel)
    assert fw.sync_state(state(*BASE)) == len([r for r in RULES if r.chain == "input"])
    tx = kernel.transactions[-1]
    assert tx[1] == {"flush": {"chain": {"family": "inet", "table": "ipvsproxy", "name": "input"}}}
    assert all(c["add"]["rule"]["chain"] == "input" for c in tx[2:])
    # a set of the wrong type (an older layout): every chain is emptied, the set remade and refilled
    t["sets"]["vips4"]["type"] = "ipv6_addr"
    t["sets"]["leftover"] = {"family": "inet", "table": "ipvsproxy", "name": "leftover", "type": "mark", "elem": []}
    fw = Firewall(cfg(), nft=kernel)
    n = fw.sync_state(state(*BASE))
    assert n == len(RULES) + 1  # the rules, plus vips4's one element
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in kernel.transactions[-1]]
    assert verbs.count(("flush", "chain")) == 4
    assert ("delete", "set") in verbs and verbs.index(("delete", "set")) > verbs.index(("flush", "chain"))
    assert "leftover" not in kernel.tables[("inet", "ipvsproxy")]["sets"]
    assert fw.elements()["vips4"] == {("10.96.0.10",)}
    assert Firewall(cfg(), nft=kernel).sync_state(state(*BASE)) == 0


def test_drift_does_not_block_a_change_and_nothing_is_read() -> None:
    """Someone emptied a set behind our back: the incremental delete of an element that is
    gone still goes through (nft refuses a plain delete of a missing element; an add and a
    delete in one transaction it accepts), and nothing is read on the way."""
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    kernel.elems("services4").clear()
    reads, docs = fw.reads, len(kernel.docs)
    assert fw.sync_state(state(*BASE[1:]), scope={BASE[0].key}) == 3  # services4, masq4, hairpin4
    assert fw.reads == reads and len(kernel.docs) == docs + 1
    tx = kernel.transactions[-1]
    deleted = {c["delete"]["element"]["name"] for c in tx if "delete" in c}
    readded = {c["add"]["element"]["name"] for c in tx if "add" in c}
    assert deleted == readded == {"services4", "masq4", "hairpin4"}  # 10.96.0.10 keeps its UDP port
    assert [next(iter(c)) for c in tx] == ["add"] * 3 + ["delete"] * 3
    assert not fw.behind
    assert fw.sync_state(state(*BASE[1:])) == 2  # the full sync puts back the other two it lost
    assert fw.elements() == fw.desired_elements(state(*BASE[1:]))


def test_a_refused_transaction_keeps_its_changes_and_the_next_sync_repairs_once() -> None:
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    reads = fw.reads
    kernel.fail_next = "Error: Could not process rule: No buffer space available"
    with pytest.raises(NftError, match="No buffer space"):
        fw.sync_state(state(*BASE[1:]), scope={BASE[0].key})
    assert fw.reads == reads and fw.behind
    # the retry has nothing new to send: it reads the table once and sends what failed
    assert fw.sync({}) == 3
    assert fw.reads == reads + 1 and not fw.behind
    assert fw.elements() == fw.desired_elements(state(*BASE[1:]))
    fw.sync_state(state(*BASE), scope={BASE[0].key})
    assert fw.reads == reads + 1  # and back to incremental


def test_a_timed_out_transaction_is_sent_again_without_a_read() -> None:
    """nft killed after its timeout may or may not have committed the batch: the next sync
    sends those elements again (adds, and deletes as add + delete), reading nothing."""
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    reads = fw.reads
    kernel.time_out_next = True  # it did commit
    with pytest.raises(NftError, match="did not answer") as err:
        fw.sync_state(state(*BASE[1:]), scope={BASE[0].key})
    assert err.value.timed_out
    back = svc("10.96.0.10", 80, reals=(("10.244.1.9", 8080),))  # and it comes back changed meanwhile
    assert fw.sync_state(state(back, *BASE[1:]), scope={back.key}) > 0
    assert fw.reads == reads
    assert fw.elements() == fw.desired_elements(state(back, *BASE[1:]))
    kernel.fail_next = "Error: Could not process rule: No buffer space available"
    with pytest.raises(NftError):
        fw.sync_state(state(*BASE), scope={back.key})  # refused this time: nothing went in
    assert fw.sync({}) > 0
    assert fw.elements() == fw.desired_elements(state(*BASE))


def test_a_read_that_fails_is_not_retried_on_the_change_path() -> None:
    """The drift check of a full sync cannot read the table (nft times out, as a listing did
    in the emulated VM): the changes go out without it, and incremental syncs after it do not
    try the read again (the next full sync does)."""
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))

    def slow_lists(doc: dict[str, Any]) -> dict[str, Any]:
        if any("list" in c for c in doc["nftables"]):
            raise NftError("nft did not answer within 60s", timed_out=True)
        return kernel(doc)

    fw.nft = slow_lists
    added = svc("10.96.0.20", 443)
    assert fw.sync_state(state(*BASE, added)) == 3  # full: the read fails, the change goes anyway
    assert not fw.behind
    for port in (444, 445):
        more = svc("10.96.0.20", port)
        assert fw.sync_state(state(*BASE, added, more), scope={more.key}) == 2  # services4, masq4
        added = more
    fw.nft = kernel
    assert fw.sync_state(state(*BASE, added)) == 4  # full, and it reads: ports 443 and 444 go (2 sets each)
    assert kernel.elems("services4") and fw.elements() == fw.desired_elements(state(*BASE, added))


def test_the_first_sync_raises_when_the_table_cannot_be_read(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)

    def no_lists(doc: dict[str, Any]) -> dict[str, Any]:
        if any("list" in c for c in doc["nftables"]):
            raise NftError("nft did not answer within 60s", timed_out=True)
        return nft(doc)

    fw.nft = no_lists
    with pytest.raises(NftError):
        fw.sync_state(state(*BASE))
    assert fw.behind and nft.transactions == []
    fw.nft = nft
    assert fw.sync_state(state(*BASE), scope=set()) > 0  # still unverified: this one reads
    assert fw.elements() == fw.desired_elements(state(*BASE))


@pytest.mark.parametrize("fault", ["refused", "timed out"])
def test_a_first_sync_that_fails_keeps_nothing_pending_and_the_next_one_reads(nft: FakeNft, fault: str) -> None:
    """Until the table has been read once nothing is kept pending (at a cold start that would be
    every element): the next sync reads the whole table and sends what differs, whatever the
    first transaction left (nothing when refused, everything when it timed out after committing)."""
    fw = Firewall(cfg(), nft=nft)
    if fault == "refused":
        nft.fail_next = "Error: Could not process rule: No buffer space available"
    else:
        nft.time_out_next = True
    with pytest.raises(NftError):
        fw.sync_state(state(*BASE))
    assert fw.behind
    reads = fw.reads
    later = svc("10.96.0.20", 443, reals=(("10.244.3.3", 8443),))
    assert fw.sync_state(state(*BASE, later), scope={later.key}) > 0
    assert fw.reads == reads + 1 and not fw.behind
    assert fw.elements() == fw.desired_elements(state(*BASE, later))
    fw.sync_state(state(*BASE), scope={later.key})
    assert fw.reads == reads + 1  # read once, then incremental
    assert fw.elements() == fw.desired_elements(state(*BASE))


def test_an_incremental_sync_never_calls_the_element_reader(nft: FakeNft) -> None:
    reads: list[str] = []

    def reader(spec: Any) -> set[tuple[Any, ...]]:
        reads.append(spec.name)
        return {e for e in fw.elements().get(spec.name, set())}

    fw = Firewall(cfg(), nft=nft, elements=reader)
    fw.sync_state(state(*BASE))
    assert reads == []  # a fresh table: every set made empty, nothing to read
    reads.clear()
    fw.sync_state(state(*BASE, svc("10.96.0.20", 443)), scope={svc("10.96.0.20", 443).key})
    assert reads == []
    fw.sync_state(state(*BASE, svc("10.96.0.20", 443)))
    assert sorted(reads) == sorted(SET_NAMES)


def test_the_full_sync_repairs_silent_drift() -> None:
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    kernel.elems("vips4").clear()
    assert fw.sync_state(state(*BASE), scope=set()) == 0  # incremental: trusts its memory
    assert fw.sync_state(state(*BASE)) == 1  # full (the periodic resync): reads and repairs
    assert fw.elements()["vips4"] == {("10.96.0.10",)}


def test_hairpin_drift_is_repaired_element_by_element() -> None:
    """Hairpin elements are counted by real server (one count set per protocol); the kernel's
    4-field elements are compared after a read: one gone comes back, a foreign one (two
    different addresses, or a protocol no Service has) goes, the rest stay untouched."""
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    hairpin = kernel.elems("hairpin4")
    hairpin.remove({"concat": ["10.244.2.7", 17, 53, "10.244.2.7"]})
    hairpin.append({"concat": ["10.244.1.5", 6, 8080, "10.244.9.9"]})
    hairpin.append({"concat": ["10.244.1.5", 1, 8080, "10.244.1.5"]})
    sent = len(kernel.docs)
    assert fw.sync_state(state(*BASE)) == 3
    tx = [c for c in kernel.docs[sent:][-1]["nftables"] if "element" in next(iter(c.values()), {})]
    assert [(next(iter(c)), c[next(iter(c))]["element"]["name"]) for c in tx] == [
        ("delete", "hairpin4"), ("add", "hairpin4")]
    assert fw.elements()["hairpin4"] == fw.desired_elements(state(*BASE))["hairpin4"] == {
        ("10.244.1.5", TCP, 8080, "10.244.1.5"), ("10.244.2.7", UDP, 53, "10.244.2.7"),
        ("10.244.2.7", TCP, 8080, "10.244.2.7")}
    assert fw.sync_state(state(*BASE)) == 0


def test_hairpin_counts_hold_the_desired_states_own_reals() -> None:
    """The memory point of counting by real server: no 4-tuple per endpoint is kept."""
    fw = Firewall(cfg(), nft=FakeNft())
    fw.sync_state(state(*BASE))
    counted = [r for name, counts in fw._counts.items() if name.startswith("hairpin") for r in counts]
    reals = [r for vs in BASE for r in vs.reals]
    assert len(counted) == 4 and all(any(c is r for r in reals) for c in counted)


def test_keyed_sets_count_the_desired_states_own_keys_and_repair_drift() -> None:
    """services/masq/nolocal/fw elements are counted as the virtual servers' own VSKey objects
    (no 3-tuple per virtual server) and compared with the kernel's 3-field elements after a read."""
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    counted = [k for name, counts in fw._counts.items() if name.startswith(("services", "masq")) for k in counts]
    assert counted and all(any(k is vs.key for vs in BASE) for k in counted)
    services = kernel.elems("services4")
    gone = services.pop()
    services.append({"concat": ["10.96.0.99", 6, 81]})  # not ours to keep
    assert fw.sync_state(state(*BASE)) == 2
    assert gone in kernel.elems("services4") and {"concat": ["10.96.0.99", 6, 81]} not in kernel.elems("services4")
    assert fw.elements()["services4"] == fw.desired_elements(state(*BASE))["services4"]
    assert fw.sync_state(state(*BASE)) == 0


def test_a_failure_that_persists_is_raised(nft: FakeNft) -> None:
    fw = Firewall(cfg(), nft=nft)

    def broken(doc: dict[str, Any]) -> dict[str, Any]:
        if any("list" in c for c in doc["nftables"]):
            return nft(doc)
        raise NftError("Could not process rule: Operation not supported")

    fw.nft = broken
    with pytest.raises(NftError, match="not supported"):
        fw.sync_state(state(*BASE))
    fw.nft = nft
    assert fw.sync_state(state(*BASE)) > 0


def test_cleanup_deletes_only_our_table(nft: FakeNft) -> None:
    nft({"nftables": [{"add": {"table": {"family": "inet", "name": "keepme"}}},
                      {"add": {"table": {"family": "ip", "name": "ipvsproxy"}}}]})
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(*BASE))
    nft.docs.clear()
    assert fw.cleanup() is True
    assert nft.transactions == [[{"delete": {"table": {"family": "inet", "name": "ipvsproxy"}}}]]
    assert set(nft.tables) == {("inet", "keepme"), ("ip", "ipvsproxy")}
    assert fw.cleanup() is False
    assert len(nft.transactions) == 1
    assert fw.elements() == {}
    # every command ever sent names our table only
    fw.sync_state(state(*BASE))
    for doc in nft.transactions:
        for c in doc:
            body = next(iter(next(iter(c.values())).values()))
            assert body["family"] == "inet" and body.get("table", body.get("name")) == "ipvsproxy"


def test_run_nft_cli_pipes_json_without_a_shell(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    fake = tmp_path / "nft"
    fake.write_text(f'#!/bin/sh\necho "$@" > {seen}.args\ncat > {seen}.json\n'
                    'echo \'{"nftables": [{"metainfo": {}}]}\'\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    doc = {"nftables": [{"list": {"table": {"family": "inet", "name": "x; echo pwned"}}}]}
    assert run_nft_cli(doc, binary=str(fake)) == {"nftables": [{"metainfo": {}}]}
    assert Path(f"{seen}.args").read_text().strip() == "-j -f -"
    assert json.loads(Path(f"{seen}.json").read_text()) == doc
    with scratch_file() as f:  # a file goes in as nft's stdin, from its start
        f.write(json.dumps(doc).encode())
        f.seek(0)
        assert run_nft_cli(f, binary=str(fake)) == {"nftables": [{"metainfo": {}}]}
    assert json.loads(Path(f"{seen}.json").read_text()) == doc
    fail = tmp_path / "nft-fail"
    fail.write_text("#!/bin/sh\necho 'internal:0:0-0: Error: Could not process rule: No such file' >&2\nexit 1\n")
    fail.chmod(fail.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(NftError, match=r"^Error: Could not process rule: No such file$"):
        run_nft_cli(doc, binary=str(fail))
    empty = tmp_path / "nft-quiet"
    empty.write_text("#!/bin/sh\ncat >/dev/null\n")
    empty.chmod(empty.stat().st_mode | stat.S_IEXEC)
    assert run_nft_cli(doc, binary=str(empty)) == {}
    with pytest.raises(NftError, match="not installed"):
        run_nft_cli(doc, binary=os.fspath(tmp_path / "missing"))


def test_incremental_syncs_match_a_full_recompute() -> None:
    """Random changes (reals, kinds, policies, ranges, shared endpoints): after
    every sync the kernel holds exactly what a from-scratch computation wants."""
    import random

    rnd = random.Random(7)
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    kinds = ("ClusterIP", "ExternalIP", "LoadBalancer", "NodePort")
    current: dict[VSKey, VirtualServer] = {}
    for step in range(60):
        for _ in range(rnd.randint(1, 6)):
            six = rnd.random() < 0.3
            addr = f"fd00:96::{rnd.randint(1, 6):x}" if six else f"10.96.0.{rnd.randint(1, 6)}"
            port = rnd.choice((80, 443, 30080))
            key = VSKey(AF_INET6 if six else AF_INET, TCP, addr, port)
            if key in current and rnd.random() < 0.3:
                del current[key]
                continue
            pool = [f"fd00:244::{i}" for i in range(1, 5)] if six else [f"10.244.1.{i}" for i in range(1, 5)]
            reals = tuple((a, 8080) for a in rnd.sample(pool, rnd.randint(0, 3)))
            ranges = tuple(rnd.sample(["203.0.113.0/24", "198.51.100.0/25", "bogus", "2001:db8::/48"],
                                      rnd.randint(0, 2)))
            current[key] = svc(addr, port, rnd.choice(kinds), reals, local=rnd.random() < 0.3, ranges=ranges)
        desired = state(*current.values())
        fw.sync_state(desired)
        if step % 10 == 0:
            assert fw.sync_state(state(*current.values())) == 0  # equal, not identical: still nothing
        want = fw.desired_elements(desired)
        assert fw.elements() == want, f"step {step}"
    fresh = Firewall(cfg(), nft=kernel)
    assert fresh.sync_state(state(*current.values())) == 0


class _NoWalk(dict):  # type: ignore[type-arg]
    """A services mapping that refuses to be walked: a scoped sync must only look keys up."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("a scoped firewall sync walked every virtual server")

    keys = items = values = __iter__  # type: ignore[assignment]


def test_scoped_syncs_look_only_at_the_scope_and_match_a_full_recompute() -> None:
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    current = {vs.key: vs for vs in BASE}
    fw.sync_state(state(*current.values()))
    changes = [
        svc("10.96.0.10", 80, reals=(("10.244.1.5", 8080), ("10.244.1.6", 8080))),  # one more endpoint
        svc("10.96.0.77", 443, "LoadBalancer", ranges=("203.0.113.0/24",)),  # a new address
        None,  # delete the new address's only virtual server
    ]
    for change in changes:
        if change is None:
            key = VSKey(AF_INET, TCP, "10.96.0.77", 443)
            del current[key]
        else:
            key = change.key
            current[key] = change
        desired = state(*current.values())
        scoped = DesiredState(_NoWalk(desired.services), desired.addresses)
        assert fw.sync_state(scoped, {key}) > 0
        assert fw.elements() == fw.desired_elements(desired)
    assert ("10.96.0.77",) not in fw.elements()["vips4"]
    assert fw.sync_state(state(*current.values())) == 0  # a full pass finds nothing left to do


def test_protocols_go_to_nft_as_numbers(nft: FakeNft) -> None:
    """nft resolves protocol names through /etc/protocols, which the image (bookworm-slim, no
    netbase) lacks: every rule and element the agent sends names protocols by number."""
    fw = Firewall(cfg(), nft=nft)
    fw.sync_state(state(*BASE))
    sent = json.dumps(nft.transactions)
    for name in ('"tcp"', '"udp"', '"sctp"', '"icmp"', '"ipv6-icmp"'):
        assert name not in sent
    assert '"right": 6' in sent or '"right": 6,' in sent


# ---- the rolling drift check (--resync rolling): a set at a time, a few pages a step -------


def check_round(fw: Firewall, budget: int = 1) -> tuple[int, int]:
    """Steps of the companion's own drift check until one has ended: (steps, elements repaired)."""
    checks, steps, repaired = fw.checks, 0, 0
    while fw.checks == checks:
        repaired += fw.check_step(budget)
        steps += 1
        assert steps < 100
    return steps, repaired


def test_the_rolling_check_repairs_drift_a_set_at_a_time_never_the_whole_table_at_once() -> None:
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    reads = fw.reads
    kernel.elems("vips4").clear()
    kernel.elems("services4").append({"concat": ["10.96.0.99", 6, 81]})  # not ours to keep
    kernel.elems("hairpin4").remove({"concat": ["10.244.2.7", 17, 53, "10.244.2.7"]})
    steps, repaired = check_round(fw)
    assert repaired == 3 and steps >= len(SET_NAMES)  # a small budget: about a set a step
    assert fw.reads == reads  # never the whole-table read of a full sync
    assert fw.elements() == fw.desired_elements(state(*BASE))
    assert check_round(fw, budget=10_000) == (1, 0)  # a large budget: every set in one step, nothing to do
    assert fw.sync_state(state(*BASE)) == 0


def test_the_rolling_check_compares_a_large_set_a_piece_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # Comparing a set read whole with its counts walks every element (~157,000 hairpin elements at
    # 10,000 Services: seconds in the test VM); it goes a piece per step, as the read does.
    monkeypatch.setattr(nft_module, "COMPARE_CHUNK", 10)
    servers = [svc(f"10.96.1.{i}", 80) for i in range(1, 101)]
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*servers))
    kernel.elems("services4").remove({"concat": ["10.96.1.50", 6, 80]})
    steps_on_it, repaired, checks = 0, 0, fw.checks
    while fw.checks == checks:
        repaired += fw.check_step(nft_module.COMPARE_CHUNK // nft_module.COMPARED_PER_READ)
        steps_on_it += fw.checking == "services4"
    assert steps_on_it >= 100 // 10  # a read, then ten pieces of ten counted elements: never the whole set
    assert repaired == 1 and fw.elements() == fw.desired_elements(state(*servers))


def test_an_element_changed_while_its_set_is_read_is_not_repaired_from_the_stale_read() -> None:
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    while fw.checking != "services4":
        fw.check_step(1)  # a budget of 1: services4's one page read (the fake lists a set whole), not compared
    sent = len(kernel.transactions)
    extra = svc("10.96.0.20", 443)
    fw.sync_state(state(*BASE, extra), scope={extra.key})  # a change while the set is being read
    gone = BASE[0]
    fw.sync_state(state(*BASE[1:], extra), scope={gone.key})  # and a Service removed
    assert len(kernel.transactions) == sent + 2
    assert fw._check.touched  # the changes, known to the check under way
    steps, repaired = check_round(fw)
    assert repaired == 0 and len(kernel.transactions) == sent + 2  # the counts knew them: no "drift"
    assert fw.elements() == fw.desired_elements(state(*BASE[1:], extra))


def test_the_rolling_check_leaves_a_structure_that_is_not_ours_to_the_next_full_read() -> None:
    kernel = FakeNft()
    fw = Firewall(cfg(), nft=kernel)
    fw.sync_state(state(*BASE))
    kernel.tables[("inet", "ipvsproxy")]["rules"]["input"] = []  # a chain flushed by hand
    assert fw.check_step(1) == 0 and fw.behind  # the structure differs: the next sync reads it all
    assert fw._check is None
    reads = fw.reads
    assert fw.sync_state(state(*BASE), scope=set()) > 0
    assert fw.reads == reads + 1 and fw.elements() == fw.desired_elements(state(*BASE))


def test_a_full_sync_ends_the_rolling_check_under_way() -> None:
    fw = Firewall(cfg(), nft=FakeNft())
    fw.sync_state(state(*BASE))
    fw.check_step(1)
    assert fw._check is not None
    fw.sync_state(state(*BASE))  # full
    assert fw._check is None and fw.checks == 0
