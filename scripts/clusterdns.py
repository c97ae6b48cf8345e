"""A small authoritative DNS server for `cluster.local`, for the single-node test cluster in the VM.

Why: Kubernetes' own Service e2e tests reach most Services by name (`nc -zv -t -w 2 affinity-clusterip 80`,
`curl http://<svc>.<ns>.svc.cluster.local:80/`), so without a cluster DNS they fail whichever proxy runs.
CoreDNS is not packaged in Debian and its image cannot be fetched offline, so scripts/cluster.sh runs this
instead: test infrastructure, not part of ipvsproxy. It answers the names kube-dns / CoreDNS's `kubernetes`
plugin answers for what those tests use, from a fresh GET to the API server on every query (so a Service
created a moment ago resolves at once, and nothing is cached here):

    <svc>.<ns>.svc.<domain>            A/AAAA: the ClusterIP(s); headless: the ready endpoints' addresses;
                                       ExternalName: a CNAME (followed when the target is in <domain>)
    <hostname>.<svc>.<ns>.svc.<domain> a headless Service's endpoint that has that hostname
    <a-b-c-d>.<ns>.pod.<domain>        A a.b.c.d (CoreDNS's `pods insecure`)
    <domain>, svc.<domain>, pod.<domain>, <ns>.svc.<domain> (namespace exists): NOERROR, no data
    any other name in <domain>         NXDOMAIN (with the zone's SOA, TTL = --ttl)
    any name outside <domain>          NXDOMAIN at once: the VM is offline, nothing is forwarded

A name that exists but has no record of the asked type (AAAA of a v4-only Service, SRV, TXT ...) gets
NOERROR with no answer. UDP answers over 512 bytes are truncated (TC) and the client retries over TCP.
An API error other than 404 answers SERVFAIL (the client retries), never a wrong NXDOMAIN.

    python3 scripts/clusterdns.py serve --listen 198.18.100.1:53 --api-server https://198.18.100.1:6443 \\
        --ca-file ca.crt --token-file admin.token [--domain cluster.local] [--ttl 5]
    python3 scripts/clusterdns.py query --server 198.18.100.1:53 [--tcp] NAME [TYPE]
        prints the answer; exit 0 for NOERROR with at least one record, 1 for any other answer, 2 for none

Standard library only, so it runs with any python3 >= 3.11 in the VM.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import logging
import random
import re
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from types import FrameType
from typing import Protocol

log = logging.getLogger("clusterdns")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---- wire format (RFC 1035) -------------------------------------------------------------------------------------

class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class RType(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


CLASS_IN = 1
CLASS_ANY = 255
UDP_LIMIT = 512  # no EDNS here: larger answers are truncated and retried over TCP
MAX_NAME = 255
MAX_LABEL = 63


class FormatError(ValueError):
    """A message that is not a well-formed query."""


def rtype_name(value: int) -> str:
    try:
        return RType(value).name
    except ValueError:
        return f"TYPE{value}"


@dataclass(frozen=True)
class Question:
    name: str  # lower case, no trailing dot ("" is the root)
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True)
class Query:
    id: int
    opcode: int
    rd: bool
    question: Question
    question_wire: bytes  # echoed as it came (the client's spelling and case)


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    length = 1
    while True:
        if offset >= len(data):
            raise FormatError("name runs past the message")
        n = data[offset]
        if n & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise FormatError("truncated compression pointer")
            jumps += 1
            if jumps > 32:
                raise FormatError("compression pointer loop")
            if end is None:
                end = offset + 2
            offset = ((n & 0x3F) << 8) | data[offset + 1]
            continue
        if n & 0xC0:
            raise FormatError(f"unsupported label type {n >> 6}")
        offset += 1
        if n == 0:
            break
        raw = data[offset:offset + n]
        if len(raw) != n:
            raise FormatError("label runs past the message")
        length += n + 1
        if length > MAX_NAME:
            raise FormatError("name longer than 255 bytes")
        # a dot inside a label is escaped, so it can never pass for two labels (and matches no object name)
        labels.append(raw.decode("ascii", errors="replace").lower().replace(".", "\\."))
        offset += n
    return ".".join(labels), (end if end is not None else offset)


def encode_name(name: str) -> bytes:
    name = name.rstrip(".")
    out = bytearray()
    for label in name.split(".") if name else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= MAX_LABEL:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    out += b"\0"
    if len(out) > MAX_NAME:
        raise ValueError(f"name longer than 255 bytes: {name!r}")
    return bytes(out)


def parse_query(data: bytes) -> Query:
    """The one question of a query. FormatError for anything else (the server answers FORMERR or drops it)."""
    if len(data) < 12:
        raise FormatError("shorter than a DNS header")
    qid, flags, qdcount, _an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if flags & 0x8000:
        raise FormatError("a response, not a query")
    if qdcount != 1:
        raise FormatError(f"{qdcount} questions (1 expected)")
    name, offset = read_name(data, 12)
    if offset + 4 > len(data):
        raise FormatError("question runs past the message")
    qtype, qclass = struct.unpack("!HH", data[offset:offset + 4])
    return Query(id=qid, opcode=(flags >> 11) & 0xF, rd=bool(flags & 0x0100),
                 question=Question(name, qtype, qclass), question_wire=data[12:offset + 4])


@dataclass(frozen=True)
class Record:
    name: str
    rtype: RType
    ttl: int
    rdata: bytes

    def wire(self, question: Question) -> bytes:
        # the owner is most often the question's name: point at it (offset 12) instead of spelling it again
        owner = b"\xc0\x0c" if self.name == question.name else encode_name(self.name)
        return owner + struct.pack("!HHIH", self.rtype, CLASS_IN, self.ttl, len(self.rdata)) + self.rdata


def address_record(name: str, ip: IPAddress, ttl: int) -> Record:
    return Record(name, RType.A if ip.version == 4 else RType.AAAA, ttl, ip.packed)


def cname_record(name: str, target: str, ttl: int) -> Record:
    return Record(name, RType.CNAME, ttl, encode_name(target))


def soa_record(zone: str, ttl: int, serial: int = 1) -> Record:
    """The zone's SOA, for negative answers; its minimum (the negative-caching TTL) is `ttl`."""
    rdata = (encode_name(f"ns.dns.{zone}") + encode_name(f"hostmaster.{zone}")
             + struct.pack("!IIIII", serial, 7200, 1800, 86400, ttl))
    return Record(zone, RType.SOA, ttl, rdata)


@dataclass(frozen=True)
class Answer:
    rcode: Rcode
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    authoritative: bool = False


def build_response(query: Query, answer: Answer, limit: int | None = None) -> bytes:
    """The response to `query`. Over `limit` bytes (UDP): no records, TC set, so the client asks over TCP."""
    def message(records: Sequence[Record], authority: Sequence[Record], truncated: bool) -> bytes:
        flags = 0x8000 | (query.opcode << 11) | int(answer.rcode)
        flags |= (0x0400 if answer.authoritative else 0) | (0x0200 if truncated else 0)
        flags |= 0x0100 if query.rd else 0
        head = struct.pack("!HHHHHH", query.id, flags, 1, len(records), len(authority), 0)
        return (head + query.question_wire + b"".join(r.wire(query.question) for r in records)
                + b"".join(r.wire(query.question) for r in authority))

    out = message(answer.answers, answer.authority, False)
    if limit is not None and len(out) > limit:
        out = message((), (), True)
    return out


def error_response(data: bytes, rcode: Rcode) -> bytes | None:
    """FORMERR/NOTIMP for a message we could not take as a query: its id, no question; None if not even that."""
    if len(data) < 12 or data[2] & 0x80:
        return None  # too short for an id, or a response (answering those could loop)
    qid, flags = struct.unpack("!HH", data[:4])
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | int(rcode), 0, 0, 0, 0)


# ---- what the cluster holds -----------------------------------------------------------------------------------

class ServiceKind(Enum):
    CLUSTER_IP = "ClusterIP"  # also NodePort and LoadBalancer: they have a ClusterIP
    HEADLESS = "Headless"
    EXTERNAL_NAME = "ExternalName"


@dataclass(frozen=True)
class Service:
    kind: ServiceKind
    cluster_ips: tuple[IPAddress, ...] = ()
    external_name: str = ""


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[IPAddress, ...]
    ready: bool = True
    hostname: str = ""


class LookupFailed(Exception):
    """The API server did not answer (or answered an error other than 404): the query gets SERVFAIL."""


class Directory(Protocol):
    """The cluster's objects, as this server needs them (the seam to the API server)."""

    def service(self, ns: str, name: str) -> Service | None: ...

    def endpoints(self, ns: str, name: str) -> list[Endpoint]: ...

    def namespace_exists(self, ns: str) -> bool: ...


def service_from_json(obj: dict[str, object]) -> Service:
    """A v1 Service object (as the API server returns it) -> Service."""
    spec = obj.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    if spec.get("type") == "ExternalName":
        return Service(ServiceKind.EXTERNAL_NAME, external_name=str(spec.get("externalName") or "").rstrip("."))
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not isinstance(ips, list) or not ips or "None" in ips:
        return Service(ServiceKind.HEADLESS)
    parsed = []
    for ip in ips:
        try:
            parsed.append(ipaddress.ip_address(str(ip)))
        except ValueError:
            continue
    return Service(ServiceKind.CLUSTER_IP, tuple(parsed))


def endpoints_from_slices(slices: Iterable[dict[str, object]]) -> list[Endpoint]:
    """EndpointSlices (discovery.k8s.io v1 or v1beta1) -> endpoints; FQDN slices are left out."""
    out = []
    for s in slices:
        if s.get("addressType") not in ("IPv4", "IPv6"):
            continue
        eps = s.get("endpoints")
        for ep in eps if isinstance(eps, list) else []:
            if not isinstance(ep, dict):
                continue
            conditions = ep.get("conditions")
            # unset means ready (the API's documented reading)
            ready = not isinstance(conditions, dict) or conditions.get("ready") is not False
            addrs = []
            for a in ep.get("addresses") or []:
                try:
                    addrs.append(ipaddress.ip_address(str(a)))
                except ValueError:
                    continue
            out.append(Endpoint(tuple(addrs), ready, str(ep.get("hostname") or "")))
    return out


# ---- the name rules ---------------------------------------------------------------------------------------------

# Kubernetes object names a query can name: DNS-1123 labels (Services are DNS-1035, a subset). Anything else
# cannot exist, so it is NXDOMAIN without asking the API server (and never reaches a URL path).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def _label(s: str) -> bool:
    return bool(_LABEL.match(s))


@dataclass(frozen=True)
class ZoneNode:
    """The apex, svc.<zone>, pod.<zone>: names that exist and hold no records (SOA at the apex)."""
    apex: bool


@dataclass(frozen=True)
class NamespaceNode:
    ns: str


@dataclass(frozen=True)
class ServiceNode:
    ns: str
    name: str


@dataclass(frozen=True)
class EndpointNode:
    ns: str
    service: str
    hostname: str


@dataclass(frozen=True)
class PodNode:
    ip: IPAddress


@dataclass(frozen=True)
class NoSuchName:
    """In the zone, but of no shape that can exist."""


@dataclass(frozen=True)
class OutsideZone:
    pass


Node = ZoneNode | NamespaceNode | ServiceNode | EndpointNode | PodNode | NoSuchName | OutsideZone


def classify(name: str, zone: str) -> Node:
    """What a (lower-case) name is in `zone`, by its shape alone."""
    name, zone = name.rstrip(".").lower(), zone.rstrip(".").lower()
    if name == zone:
        return ZoneNode(apex=True)
    if not name.endswith("." + zone):
        return OutsideZone()
    labels = name[: -len(zone) - 1].split(".")
    *rest, kind = labels
    if kind not in ("svc", "pod"):
        return NoSuchName()
    if not rest:
        return ZoneNode(apex=False)
    if not all(_label(x) for x in rest):
        return NoSuchName()
    if kind == "svc":
        if len(rest) == 1:
            return NamespaceNode(rest[0])
        if len(rest) == 2:
            return ServiceNode(ns=rest[1], name=rest[0])
        if len(rest) == 3:
            return EndpointNode(ns=rest[2], service=rest[1], hostname=rest[0])
        return NoSuchName()
    if len(rest) == 1:
        return NamespaceNode(rest[0])
    if len(rest) == 2:
        text = rest[0]
        try:
            ip: IPAddress = ipaddress.IPv4Address(text.replace("-", "."))
        except ValueError:
            try:
                ip = ipaddress.IPv6Address(text.replace("-", ":"))
            except ValueError:
                return NoSuchName()
        return PodNode(ip)
    return NoSuchName()


CNAME_DEPTH = 8
_VERSIONS: dict[int, set[int]] = {RType.A: {4}, RType.AAAA: {6}, RType.ANY: {4, 6}}  # IP versions per qtype


@dataclass
class Resolver:
    """The answer to one question, from a Directory; pure apart from what the Directory does."""

    directory: Directory
    zone: str = "cluster.local"
    ttl: int = 5

    def answer(self, q: Question) -> Answer:
        if q.qclass not in (CLASS_IN, CLASS_ANY):
            return Answer(Rcode.REFUSED)
        node = classify(q.name, self.zone)
        if isinstance(node, OutsideZone):
            return Answer(Rcode.NXDOMAIN)  # offline: nothing to forward to
        try:
            records = self._records(q.name, node, q.qtype, 0)
        except LookupFailed:
            return Answer(Rcode.SERVFAIL)
        soa = (soa_record(self.zone, self.ttl),)
        if records is None:
            return Answer(Rcode.NXDOMAIN, authority=soa, authoritative=True)
        if not records:
            return Answer(Rcode.NOERROR, authority=soa, authoritative=True)
        return Answer(Rcode.NOERROR, tuple(records), authoritative=True)

    def _records(self, name: str, node: Node, qtype: int, depth: int) -> list[Record] | None:
        """The records of `name` for `qtype`; [] for a name with none of that type; None for no such name."""
        if isinstance(node, OutsideZone | NoSuchName):
            return None
        if isinstance(node, ZoneNode):
            return [soa_record(self.zone, self.ttl)] if node.apex and qtype in (RType.SOA, RType.ANY) else []
        if isinstance(node, NamespaceNode):
            return [] if self.directory.namespace_exists(node.ns) else None
        if isinstance(node, PodNode):
            return self._addresses(name, [node.ip], qtype)
        if isinstance(node, EndpointNode):
            svc = self.directory.service(node.ns, node.service)
            if svc is None or svc.kind is not ServiceKind.HEADLESS:
                return None
            ips = [ip for ep in self.directory.endpoints(node.ns, node.service)
                   if ep.ready and ep.hostname == node.hostname for ip in ep.addresses]
            return self._addresses(name, ips, qtype) if ips else None
        svc = self.directory.service(node.ns, node.name)
        if svc is None:
            return None
        if svc.kind is ServiceKind.EXTERNAL_NAME:
            return self._cname(name, svc.external_name, qtype, depth)
        if svc.kind is ServiceKind.HEADLESS:
            ips = [ip for ep in self.directory.endpoints(node.ns, node.name) if ep.ready for ip in ep.addresses]
            return self._addresses(name, ips, qtype)
        return self._addresses(name, list(svc.cluster_ips), qtype)

    def _addresses(self, name: str, ips: Sequence[IPAddress], qtype: int) -> list[Record]:
        versions = _VERSIONS.get(qtype, set())
        seen: list[IPAddress] = []
        for ip in ips:
            if ip.version in versions and ip not in seen:
                seen.append(ip)
        return [address_record(name, ip, self.ttl) for ip in seen]

    def _cname(self, name: str, target: str, qtype: int, depth: int) -> list[Record]:
        if not target:
            return []
        out = [cname_record(name, target, self.ttl)]
        if qtype in (RType.CNAME, RType.ANY) or depth >= CNAME_DEPTH:
            return out
        # a target in this zone is answered here too (as CoreDNS does); one outside stays a bare CNAME
        node = classify(target, self.zone)
        if not isinstance(node, OutsideZone):
            more = self._records(target.lower(), node, qtype, depth + 1)
            out += more or []
        return out


# ---- the API server --------------------------------------------------------------------------------------------

class KubeDirectory:
    """Directory over the API server: one GET per question (no cache, so a new Service resolves at once)."""

    def __init__(self, url: str, token: str, ca_file: str | None, timeout: float = 4.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise ValueError(f"--api-server must be an http(s) URL, not {url!r}")
        self.scheme, self.host = parsed.scheme, parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.token, self.timeout = token, timeout
        self.context = ssl.create_default_context(cafile=ca_file) if parsed.scheme == "https" else None
        self._pool: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._slices = "/apis/discovery.k8s.io/v1"  # v1.20 serves only v1beta1: switched on the first 404

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, path: str) -> dict[str, object] | None:
        """The JSON object at `path`; None on 404; LookupFailed on anything else that is not 200."""
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more on a new one
            conn = self._connection()
            try:
                conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}",
                                                   "Accept": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if attempt == 2:
                    raise LookupFailed(f"GET {path}: {exc}") from None
                continue
            with self._lock:
                self._pool.append(conn)
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise LookupFailed(f"GET {path}: {resp.status} {body[:200]!r}")
            try:
                obj = json.loads(body)
            except ValueError:
                raise LookupFailed(f"GET {path}: not JSON") from None
            if not isinstance(obj, dict):
                raise LookupFailed(f"GET {path}: not an object")
            return obj
        raise AssertionError("unreachable")

    def service(self, ns: str, name: str) -> Service | None:
        obj = self.get(f"/api/v1/namespaces/{ns}/services/{name}")
        return service_from_json(obj) if obj is not None else None

    def endpoints(self, ns: str, name: str) -> list[Endpoint]:
        query = urllib.parse.urlencode({"labelSelector": f"kubernetes.io/service-name={name}"})
        obj = self.get(f"{self._slices}/namespaces/{ns}/endpointslices?{query}")
        if obj is None and self._slices.endswith("/v1"):
            self._slices = "/apis/discovery.k8s.io/v1beta1"
            obj = self.get(f"{self._slices}/namespaces/{ns}/endpointslices?{query}")
        if obj is None:
            raise LookupFailed("the API server serves no EndpointSlices (discovery.k8s.io v1 or v1beta1)")
        items = obj.get("items")
        return endpoints_from_slices(i for i in items if isinstance(i, dict)) if isinstance(items, list) else []

    def namespace_exists(self, ns: str) -> bool:
        return self.get(f"/api/v1/namespaces/{ns}") is not None


# ---- the server --------------------------------------------------------------------------------------------------

def handle(data: bytes, resolver: Resolver, udp: bool) -> bytes | None:
    """One message in, the response out (None: drop it). Logs one line per query."""
    t0 = time.monotonic()
    try:
        query = parse_query(data)
    except FormatError as exc:
        log.info("dropped or FORMERR: %s", exc)
        return error_response(data, Rcode.FORMERR)
    if query.opcode != 0:
        answer = Answer(Rcode.NOTIMP)
    else:
        try:
            answer = resolver.answer(query.question)
        except Exception:  # a bug here must not leave the client waiting for its timeout
            log.exception("answering %s", query.question)
            answer = Answer(Rcode.SERVFAIL)
    out = build_response(query, answer, UDP_LIMIT if udp else None)
    q = query.question
    log.info("%s %s %s -> %s, %d record(s)%s, %.0f ms", "udp" if udp else "tcp", q.name or ".",
             rtype_name(q.qtype), answer.rcode.name, len(answer.answers),
             " (truncated)" if out[2] & 0x02 else "", (time.monotonic() - t0) * 1000)
    return out


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        out = handle(data, self.server.resolver, udp=True)
        if out is not None:
            sock.sendto(out, self.client_address)


class _TCPHandler(socketserver.StreamRequestHandler):
    server: _TCPServer
    timeout = 10

    def handle(self) -> None:
        while True:
            try:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                (n,) = struct.unpack("!H", head)
                data = self.rfile.read(n)
                if len(data) < n:
                    return
            except OSError:
                return
            out = handle(data, self.server.resolver, udp=False)
            if out is None:
                return
            self.wfile.write(struct.pack("!H", len(out)) + out)
            self.wfile.flush()


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True
    resolver: Resolver


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    resolver: Resolver


@dataclass
class Server:
    """UDP and TCP on one address; `start()` serves in threads, `close()` stops."""

    host: str
    port: int
    resolver: Resolver
    _servers: list[socketserver.BaseServer] = field(default_factory=list)

    def start(self) -> Server:
        udp = _UDPServer((self.host, self.port), _UDPHandler)
        udp.resolver = self.resolver
        self.port = int(udp.server_address[1])  # port 0: the one the kernel chose, for TCP too
        try:
            tcp = _TCPServer((self.host, self.port), _TCPHandler)
        except OSError:
            udp.server_close()
            raise
        tcp.resolver = self.resolver
        self._servers = [udp, tcp]
        for s in self._servers:
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
        return self

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()


# ---- a client (cluster.sh's readiness check, and by hand) ------------------------------------------------------

def ask(server: tuple[str, int], name: str, qtype: int, tcp: bool = False, timeout: float = 3.0) -> bytes:
    """One query to `server`; the raw response."""
    qid = random.randrange(65536)
    msg = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    if tcp:
        with socket.create_connection(server, timeout=timeout) as s:
            s.sendall(struct.pack("!H", len(msg)) + msg)
            head = _recv_exactly(s, 2)
            return _recv_exactly(s, struct.unpack("!H", head)[0])
    with socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect(server)  # connected: a closed port is refused at once (ICMP), not a timeout
        s.send(msg)
        while True:
            data = s.recv(65535)
            if data[:2] == msg[:2]:
                return data


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed mid-message")
        buf += chunk
    return buf


def describe(data: bytes) -> tuple[Rcode, list[str]]:
    """A response's rcode and its answer records as text ("name TTL TYPE data")."""
    if len(data) < 12:
        raise FormatError("shorter than a DNS header")
    _qid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    offset = 12
    for _ in range(qd):
        _, offset = read_name(data, offset)
        offset += 4
    lines = []
    for _ in range(an):
        owner, offset = read_name(data, offset)
        rtype, _cls, ttl, n = struct.unpack("!HHIH", data[offset:offset + 10])
        offset += 10
        rdata = data[offset:offset + n]
        if rtype in (RType.A, RType.AAAA):
            text = str(ipaddress.ip_address(rdata))
        elif rtype == RType.CNAME:
            text = read_name(data, offset)[0]
        else:
            text = rdata.hex()
        offset += n
        lines.append(f"{owner}. {ttl} {rtype_name(rtype)} {text}")
    return Rcode(flags & 0xF), lines


# ---- command line ------------------------------------------------------------------------------------------------

def host_port(text: str, default_port: int = 53) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clusterdns.py", description="cluster.local DNS for the test cluster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="answer queries (UDP and TCP)")
    serve.add_argument("--listen", type=host_port, default=("127.0.0.1", 53), help="HOST:PORT (default 127.0.0.1:53)")
    serve.add_argument("--api-server", required=True, help="https://HOST:PORT of the kube-apiserver")
    serve.add_argument("--token-file", required=True, help="a file holding a bearer token that may read Services")
    serve.add_argument("--ca-file", help="the API server's CA certificate")
    serve.add_argument("--domain", default="cluster.local")
    serve.add_argument("--ttl", type=int, default=5, help="seconds, for answers and the SOA minimum (default 5)")
    query = sub.add_parser("query", help="ask a server one question, print the answer")
    query.add_argument("--server", type=host_port, default=("127.0.0.1", 53))
    query.add_argument("--tcp", action="store_true")
    query.add_argument("--timeout", type=float, default=3.0)
    query.add_argument("name")
    query.add_argument("type", nargs="?", default="A", choices=[t.name for t in RType])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    if args.cmd == "query":
        try:
            rcode, lines = describe(ask(args.server, args.name, RType[args.type], args.tcp, args.timeout))
        except (OSError, FormatError, ValueError) as exc:
            print(f"clusterdns: no answer from {args.server[0]}:{args.server[1]}: {exc}", file=sys.stderr)
            return 2
        print(rcode.name)
        for line in lines:
            print(line)
        return 0 if rcode is Rcode.NOERROR and lines else 1

    try:
        with open(args.token_file) as f:
            token = f.read().strip()
        directory = KubeDirectory(args.api_server, token, args.ca_file)
        server = Server(args.listen[0], args.listen[1], Resolver(directory, args.domain, args.ttl)).start()
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"clusterdns: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving %s on %s:%d (UDP and TCP) from %s, TTL %d s", args.domain, server.host, server.port,
             args.api_server, args.ttl)
    stop.wait()
    server.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
