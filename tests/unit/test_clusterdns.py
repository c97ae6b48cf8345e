"""scripts/clusterdns.py, the test cluster's DNS for cluster.local: its wire format and its name rules.

The e2e Service tests reach Services by name through it, so a wrong answer there shows up as a proxy
failure. Queries are built and responses read by dnspython (an independent implementation of the wire
format), against an in-memory Directory; tests/realapi/test_clusterdns.py runs the same server against a
real kube-apiserver over real UDP and TCP sockets.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import scriptload

cdns: Any = scriptload.load("scripts/clusterdns.py", "clusterdns")

ip = ipaddress.ip_address


@dataclass
class FakeDirectory:
    """The cluster's objects in memory; counts the lookups (a name that cannot exist must cost none)."""

    services: dict[tuple[str, str], Any] = field(default_factory=dict)
    slices: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    namespaces: set[str] = field(default_factory=lambda: {"default", "kube-system", "t1"})
    fail: bool = False
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def service(self, ns: str, name: str) -> Any:
        self.calls.append(("service", ns, name))
        if self.fail:
            raise cdns.LookupFailed("API server down")
        return self.services.get((ns, name))

    def endpoints(self, ns: str, name: str) -> list[Any]:
        self.calls.append(("endpoints", ns, name))
        return self.slices.get((ns, name), [])

    def namespace_exists(self, ns: str) -> bool:
        self.calls.append(("namespace", ns, ""))
        return ns in self.namespaces


def cluster() -> FakeDirectory:
    d = FakeDirectory()
    d.services[("default", "kubernetes")] = cdns.Service(cdns.ServiceKind.CLUSTER_IP, (ip("198.19.0.1"),))
    d.services[("t1", "echo")] = cdns.Service(cdns.ServiceKind.CLUSTER_IP, (ip("198.19.4.7"),))
    d.services[("t1", "dual")] = cdns.Service(cdns.ServiceKind.CLUSTER_IP, (ip("198.19.4.8"), ip("fd00::8")))
    d.services[("t1", "web")] = cdns.Service(cdns.ServiceKind.HEADLESS)
    d.slices[("t1", "web")] = [
        cdns.Endpoint((ip("198.18.0.11"),), True, "web-0"),
        cdns.Endpoint((ip("198.18.0.12"),), True, "web-1"),
        cdns.Endpoint((ip("198.18.0.13"),), False, "web-2"),  # not ready: not published
        cdns.Endpoint((ip("198.18.0.11"),), True, ""),  # the same address in a second slice: once
        cdns.Endpoint((ip("fd00::11"),), True, "web-0"),
    ]
    d.services[("t1", "ext")] = cdns.Service(cdns.ServiceKind.EXTERNAL_NAME, external_name="foo.example.com")
    d.services[("t1", "alias")] = cdns.Service(cdns.ServiceKind.EXTERNAL_NAME,
                                               external_name="kubernetes.default.svc.cluster.local")
    d.services[("t1", "loop-a")] = cdns.Service(cdns.ServiceKind.EXTERNAL_NAME,
                                                external_name="loop-b.t1.svc.cluster.local")
    d.services[("t1", "loop-b")] = cdns.Service(cdns.ServiceKind.EXTERNAL_NAME,
                                                external_name="loop-a.t1.svc.cluster.local")
    return d


def ask(directory: FakeDirectory, name: str, rdtype: str = "A", *, udp: bool = True,
        want_dnssec: bool = False, use_edns: bool | int = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=use_edns, want_dnssec=want_dnssec)
    raw = cdns.handle(q.to_wire(), cdns.Resolver(directory), udp=udp)
    assert raw is not None
    r = dns.message.from_wire(raw)
    assert q.is_response(r), "id and question echoed"
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RD and not r.flags & dns.flags.RA
    return r


def answers(r: dns.message.Message) -> list[tuple[str, str, str]]:
    return [(str(rrset.name), dns.rdatatype.to_text(rrset.rdtype), rd.to_text()) for rrset in r.answer for rd in rrset]


def soa_minimum(r: dns.message.Message) -> int:
    (rrset,) = r.authority
    assert rrset.rdtype == dns.rdatatype.SOA and str(rrset.name) == "cluster.local."
    return int(rrset[0].minimum)


# ---- Services ------------------------------------------------------------------------------------------------

def test_a_service_name_is_its_cluster_ip_with_a_short_ttl() -> None:
    r = ask(cluster(), "echo.t1.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert answers(r) == [("echo.t1.svc.cluster.local.", "A", "198.19.4.7")]
    assert r.answer[0].ttl == 5


def test_the_question_is_answered_in_the_clients_spelling() -> None:
    r = ask(cluster(), "Echo.T1.SVC.cluster.LOCAL.")
    assert answers(r) == [("Echo.T1.SVC.cluster.LOCAL.", "A", "198.19.4.7")]


def test_aaaa_of_a_v4_only_service_is_noerror_without_records() -> None:
    r = ask(cluster(), "echo.t1.svc.cluster.local", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert soa_minimum(r) == 5  # what a resolver may cache the "no AAAA" for


def test_dual_stack_answers_each_family_to_its_type() -> None:
    d = cluster()
    assert answers(ask(d, "dual.t1.svc.cluster.local", "A")) == [("dual.t1.svc.cluster.local.", "A", "198.19.4.8")]
    assert answers(ask(d, "dual.t1.svc.cluster.local", "AAAA")) == [("dual.t1.svc.cluster.local.", "AAAA", "fd00::8")]
    assert len(answers(ask(d, "dual.t1.svc.cluster.local", "ANY"))) == 2


def test_an_unknown_service_is_nxdomain_with_the_zones_soa() -> None:
    d = cluster()
    r = ask(d, "nosuch.t1.svc.cluster.local")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA and not r.answer
    assert soa_minimum(r) == 5
    assert d.calls == [("service", "t1", "nosuch")]


def test_other_types_of_an_existing_service_are_noerror_without_records() -> None:
    for rdtype in ("SRV", "TXT", "MX", "PTR"):
        r = ask(cluster(), "echo.t1.svc.cluster.local", rdtype)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer, rdtype


def test_a_headless_service_is_its_ready_endpoints() -> None:
    d = cluster()
    r = ask(d, "web.t1.svc.cluster.local")
    assert answers(r) == [("web.t1.svc.cluster.local.", "A", "198.18.0.11"),
                          ("web.t1.svc.cluster.local.", "A", "198.18.0.12")]
    assert answers(ask(d, "web.t1.svc.cluster.local", "AAAA")) == [("web.t1.svc.cluster.local.", "AAAA", "fd00::11")]


def test_a_headless_service_without_ready_endpoints_exists_but_has_no_address() -> None:
    d = cluster()
    d.slices[("t1", "web")] = [cdns.Endpoint((ip("198.18.0.13"),), False, "web-2")]
    r = ask(d, "web.t1.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_a_headless_endpoint_by_its_hostname() -> None:
    d = cluster()
    assert answers(ask(d, "web-1.web.t1.svc.cluster.local")) == [("web-1.web.t1.svc.cluster.local.", "A",
                                                                  "198.18.0.12")]
    assert ask(d, "web-2.web.t1.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN  # not ready
    assert ask(d, "web-9.web.t1.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert ask(d, "web-0.echo.t1.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN  # echo is not headless


def test_external_name_is_a_cname_and_an_outside_target_is_not_followed() -> None:
    d = cluster()
    r = ask(d, "ext.t1.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR
    assert answers(r) == [("ext.t1.svc.cluster.local.", "CNAME", "foo.example.com.")]
    assert answers(ask(d, "ext.t1.svc.cluster.local", "AAAA")) == answers(r)  # a CNAME answers every type


def test_external_name_to_a_cluster_name_is_followed() -> None:
    # the e2e "change the type ... to ExternalName" tests point it at another Service's FQDN and nslookup it
    r = ask(cluster(), "alias.t1.svc.cluster.local")
    assert answers(r) == [("alias.t1.svc.cluster.local.", "CNAME", "kubernetes.default.svc.cluster.local."),
                          ("kubernetes.default.svc.cluster.local.", "A", "198.19.0.1")]
    assert answers(ask(cluster(), "alias.t1.svc.cluster.local", "CNAME")) == answers(r)[:1]


def test_an_external_name_loop_ends() -> None:
    r = ask(cluster(), "loop-a.t1.svc.cluster.local", udp=False)
    assert r.rcode() == dns.rcode.NOERROR
    assert 2 <= len(r.answer) <= cdns.CNAME_DEPTH + 1
    assert {rr.rdtype for rr in r.answer} == {dns.rdatatype.CNAME}


# ---- the rest of the name space --------------------------------------------------------------------------------

def test_the_search_path_candidates_a_pod_tries_first_are_nxdomain() -> None:
    # a pod in namespace t1 looking up "kubernetes.default" and "kubernetes.default.svc" (ndots:5, search
    # t1.svc.cluster.local svc.cluster.local cluster.local) asks these before the name that exists
    d = cluster()
    for name in ("kubernetes.default.t1.svc.cluster.local", "kubernetes.default.svc.t1.svc.cluster.local",
                 "kubernetes.default.svc.svc.cluster.local", "kubernetes.default.svc.cluster.local.cluster.local",
                 "kubernetes.default.cluster.local"):
        assert ask(d, name).rcode() == dns.rcode.NXDOMAIN, name
    assert answers(ask(d, "kubernetes.default.svc.cluster.local"))[0][2] == "198.19.0.1"


def test_names_outside_the_zone_are_nxdomain_at_once_and_not_authoritative() -> None:
    d = cluster()
    for name in ("example.com", "echo", "echo.t1", "cluster.local.example.com", "localcluster.local", "."):
        r = ask(d, name)
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.flags & dns.flags.AA and not r.authority, name
    assert d.calls == [], "nothing outside the zone is looked up (or forwarded)"


def test_names_no_object_can_have_cost_no_lookup() -> None:
    d = cluster()
    for name in ("a_b.t1.svc.cluster.local", "-x.t1.svc.cluster.local", "x.t1.svc.svc.t1.svc.cluster.local",
                 "x.y.cluster.local", "_http._tcp.echo.t1.svc.cluster.local"):
        assert ask(d, name).rcode() == dns.rcode.NXDOMAIN, name
    assert d.calls == []


def test_a_dot_inside_a_label_does_not_make_two_labels() -> None:
    q = dns.message.make_query(dns.name.Name([b"echo.t1", b"svc", b"cluster", b"local", b""]), "A")
    d = cluster()
    r = dns.message.from_wire(cdns.handle(q.to_wire(), cdns.Resolver(d), udp=True))
    assert r.rcode() == dns.rcode.NXDOMAIN and d.calls == []


def test_the_zone_and_its_structure_exist_without_records() -> None:
    d = cluster()
    for name in ("cluster.local", "svc.cluster.local", "pod.cluster.local", "t1.svc.cluster.local"):
        r = ask(d, name)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer, name
    assert ask(d, "nosuch-ns.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    soa = ask(d, "cluster.local", "SOA")
    assert answers(soa)[0][:2] == ("cluster.local.", "SOA")


def test_pod_names_are_their_address() -> None:
    d = cluster()
    assert answers(ask(d, "198-18-0-5.t1.pod.cluster.local")) == [("198-18-0-5.t1.pod.cluster.local.", "A",
                                                                   "198.18.0.5")]
    assert ask(d, "198-18-0-5.t1.pod.cluster.local", "AAAA").rcode() == dns.rcode.NOERROR
    assert ask(d, "198-18-0.t1.pod.cluster.local").rcode() == dns.rcode.NXDOMAIN


def test_an_api_failure_is_servfail_not_nxdomain() -> None:
    d = cluster()
    d.fail = True
    assert ask(d, "echo.t1.svc.cluster.local").rcode() == dns.rcode.SERVFAIL


def test_a_bug_answers_servfail() -> None:
    class Broken(FakeDirectory):
        def service(self, ns: str, name: str) -> Any:
            raise KeyError(name)

    assert ask(Broken(), "echo.t1.svc.cluster.local").rcode() == dns.rcode.SERVFAIL


def test_other_classes_are_refused_and_other_opcodes_not_implemented() -> None:
    q = dns.message.make_query("echo.t1.svc.cluster.local", "A", rdclass=dns.rdataclass.CH)
    r = dns.message.from_wire(cdns.handle(q.to_wire(), cdns.Resolver(cluster()), udp=True))
    assert r.rcode() == dns.rcode.REFUSED
    q = dns.message.make_query("echo.t1.svc.cluster.local", "A")
    q.set_opcode(dns.opcode.STATUS)
    r = dns.message.from_wire(cdns.handle(q.to_wire(), cdns.Resolver(cluster()), udp=True))
    assert r.rcode() == dns.rcode.NOTIMP and r.opcode() == dns.opcode.STATUS


# ---- size, EDNS, malformed messages ------------------------------------------------------------------------------

def many_endpoints(n: int) -> FakeDirectory:
    d = cluster()
    d.slices[("t1", "web")] = [cdns.Endpoint((ip(f"198.18.1.{i}"),)) for i in range(1, n + 1)]
    return d


def test_a_large_answer_is_truncated_over_udp_and_whole_over_tcp() -> None:
    d = many_endpoints(60)
    r = ask(d, "web.t1.svc.cluster.local")
    assert r.flags & dns.flags.TC and not r.answer
    r = ask(d, "web.t1.svc.cluster.local", udp=False)
    assert not r.flags & dns.flags.TC and len(answers(r)) == 60


def test_answers_up_to_512_bytes_fit_in_udp_with_the_owner_compressed() -> None:
    r = ask(many_endpoints(25), "web.t1.svc.cluster.local")
    assert not r.flags & dns.flags.TC and len(answers(r)) == 25


def test_an_edns_query_gets_a_plain_answer() -> None:
    r = ask(cluster(), "echo.t1.svc.cluster.local", use_edns=0)
    assert r.edns == -1 and answers(r) == [("echo.t1.svc.cluster.local.", "A", "198.19.4.7")]


def header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, 0, 0, 0)


def test_malformed_messages() -> None:
    res = cdns.Resolver(cluster())
    question = cdns.encode_name("echo.t1.svc.cluster.local") + struct.pack("!HH", 1, 1)
    assert cdns.handle(b"\x12", res, udp=True) is None
    assert cdns.handle(header(flags=0x8000) + question, res, udp=True) is None  # a response: never answered
    for bad in (header(qd=2) + question + question, header(qd=0), header() + b"\x04echo",
                header() + b"\xc0\x0c" + b"\0\1\0\1", header() + b"\x40abc\0\0\1\0\1",
                header() + question[:-2]):
        r = dns.message.from_wire(cdns.handle(bad, res, udp=True), question_only=True)
        assert r.id == 0x1234 and r.rcode() == dns.rcode.FORMERR, bad


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_get_a_response_or_are_dropped(data: bytes) -> None:
    out = cdns.handle(data, cdns.Resolver(cluster()), udp=True)
    assert out is None or len(out) >= 12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=0, max_size=6))
def test_classify_is_consistent_with_the_name(labels: list[str]) -> None:
    name = ".".join([*labels, "cluster", "local"])
    node = cdns.classify(name, "cluster.local")
    if isinstance(node, cdns.ServiceNode):
        assert name == f"{node.name}.{node.ns}.svc.cluster.local"
    elif isinstance(node, cdns.EndpointNode):
        assert name == f"{node.hostname}.{node.service}.{node.ns}.svc.cluster.local"
    elif isinstance(node, cdns.NamespaceNode):
        assert name in (f"{node.ns}.svc.cluster.local", f"{node.ns}.pod.cluster.local")


# ---- from API objects ------------------------------------------------------------------------------------------

def test_services_from_the_api_objects() -> None:
    s = cdns.service_from_json
    assert s({"spec": {"type": "NodePort", "clusterIP": "198.19.0.9", "clusterIPs": ["198.19.0.9"]}}) == \
        cdns.Service(cdns.ServiceKind.CLUSTER_IP, (ip("198.19.0.9"),))
    assert s({"spec": {"type": "ClusterIP", "clusterIP": "198.19.0.9"}}).cluster_ips == (ip("198.19.0.9"),)
    assert s({"spec": {"type": "ClusterIP", "clusterIPs": ["198.19.0.9", "fd00::9"]}}).cluster_ips == \
        (ip("198.19.0.9"), ip("fd00::9"))
    assert s({"spec": {"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"]}}).kind is \
        cdns.ServiceKind.HEADLESS
    assert s({"spec": {"type": "ExternalName", "externalName": "foo.example.com."}}) == \
        cdns.Service(cdns.ServiceKind.EXTERNAL_NAME, external_name="foo.example.com")


def test_endpoints_from_slices_v1beta1_and_v1() -> None:
    slices = [
        {"addressType": "IPv4", "endpoints": [
            {"addresses": ["198.18.0.1"], "conditions": {"ready": True}, "hostname": "a"},
            {"addresses": ["198.18.0.2"], "conditions": {"ready": False}},
            {"addresses": ["198.18.0.3"], "conditions": {}},  # unset: ready
            {"addresses": ["not-an-ip"]}]},
        {"addressType": "FQDN", "endpoints": [{"addresses": ["x.example.com"]}]},
        {"addressType": "IPv6", "endpoints": None},
    ]
    assert cdns.endpoints_from_slices(slices) == [
        cdns.Endpoint((ip("198.18.0.1"),), True, "a"), cdns.Endpoint((ip("198.18.0.2"),), False),
        cdns.Endpoint((ip("198.18.0.3"),), True), cdns.Endpoint((), True)]


# ---- real sockets on loopback, and the command line --------------------------------------------------------------

@pytest.fixture
def server() -> Any:
    s = cdns.Server("127.0.0.1", 0, cdns.Resolver(cluster())).start()
    yield s
    s.close()


def test_the_server_answers_over_udp_and_tcp(server: Any) -> None:
    q = dns.message.make_query("echo.t1.svc.cluster.local", "A")
    for r in (dns.query.udp(q, "127.0.0.1", port=server.port, timeout=5),
              dns.query.tcp(q, "127.0.0.1", port=server.port, timeout=5)):
        assert answers(r) == [("echo.t1.svc.cluster.local.", "A", "198.19.4.7")]


def test_several_queries_on_one_tcp_connection(server: Any) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for name in ("echo.t1.svc.cluster.local", "nosuch.t1.svc.cluster.local", "web.t1.svc.cluster.local"):
            q = dns.message.make_query(name, "A")
            dns.query.send_tcp(s, q)
            r, _ = dns.query.receive_tcp(s)
            assert q.is_response(r)


def test_the_query_command(server: Any) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cdns.main(["query", "--server", f"127.0.0.1:{server.port}", "echo.t1.svc.cluster.local"]) == 0
        assert cdns.main(["query", "--tcp", "--server", f"127.0.0.1:{server.port}", "nosuch.t1.svc.cluster.local"]) == 1
        assert cdns.main(["query", "--server", f"127.0.0.1:{server.port}", "echo.t1.svc.cluster.local", "AAAA"]) == 1
    assert out.getvalue().splitlines() == ["NOERROR", "echo.t1.svc.cluster.local. 5 A 198.19.4.7", "NXDOMAIN",
                                           "NOERROR"]


def test_command_line_errors_are_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = io.StringIO()
    with redirect_stderr(err):
        assert cdns.main(["query", "--server", f"127.0.0.1:{port}", "--timeout", "1", "x.cluster.local"]) == 2
        assert cdns.main(["serve", "--listen", "127.0.0.1:0", "--api-server", "https://127.0.0.1:1",
                          "--token-file", "/nonexistent/token"]) == 1
        assert cdns.main(["serve", "--listen", "127.0.0.1:0", "--api-server", "ftp://x",
                          "--token-file", "/dev/null"]) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("clusterdns: ") for line in lines), lines
    assert "/nonexistent/token" in lines[1] and "http(s) URL" in lines[2]


def test_a_busy_port_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        err = io.StringIO()
        with redirect_stderr(err):
            assert cdns.main(["serve", "--listen", f"127.0.0.1:{port}", "--api-server", "https://127.0.0.1:1",
                              "--token-file", "/dev/null"]) == 1
    assert err.getvalue().startswith("clusterdns: ") and "in use" in err.getvalue()
