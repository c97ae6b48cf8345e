"""Network namespaces, veth links, test backends and traffic helpers for the kernel tests.

Everything here runs as root inside the IPVS test VM (scripts/vm-run.sh). All traffic stays
between namespaces created here and the VM's root namespace. Address plan (benchmarking ranges
only, RFC 2544 / RFC 5180):

    VIPs for tests          198.18.0.0/16          2001:2:0:0000::/52 (2001:2::/64, 2001:2:0:1::/64, ...)
    backend links (/30,/64) 198.19.0.0/17          2001:2:0:b000::/52
    client links  (/30,/64) 198.19.128.0/17        2001:2:0:c000::/52

Link n of a kind is a veth pair: `vpb<n>`/`vpc<n>` in the root namespace holds the first address
of the /30 (and `::1` of the /64), `eth0` in namespace `ipvsp-b<n>`/`ipvsp-c<n>` holds the second
(`::2`), with default routes (v4 and v6) via the root side. Namespaced sockets are opened from a
short-lived thread that setns()-es into the namespace, so a request costs no process start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SERVERS_PY = Path(__file__).with_name("servers.py")
NS_PREFIX = "ipvsp-"
VIP_DEV = "ipvstest0"
CLONE_NEWNET = 0x40000000

BACKEND_V4 = ipaddress.ip_network("198.19.0.0/17")
CLIENT_V4 = ipaddress.ip_network("198.19.128.0/17")
BACKEND_V6_SUBNET = 0xB000
CLIENT_V6_SUBNET = 0xC000
MAX_LINKS = 4095

_counters = {"b": itertools.count(1), "c": itertools.count(1)}
_libc = ctypes.CDLL(None, use_errno=True)


# ------------------------------------------------------------------------------------------------
# processes, sysctls, namespaces
# ------------------------------------------------------------------------------------------------

def sh(*args: str, input: str | None = None, check: bool = True) -> str:
    """Run a command; on failure raise with its stderr (tests show the real reason)."""
    res = subprocess.run(args, input=input, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def ip_batch(lines: Iterable[str], ns: str | None = None, force: bool = False) -> None:
    """Run many `ip` commands in one process (`ip [-n NS] [-force] -batch -`)."""
    text = "".join(f"{line}\n" for line in lines)
    if not text:
        return
    args = ["ip"] + (["-n", ns] if ns else []) + (["-force"] if force else []) + ["-batch", "-"]
    sh(*args, input=text, check=not force)


def sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def sysctl_get(key: str) -> str:
    return sysctl_path(key).read_text().strip()


def sysctl_set(key: str, value: str | int) -> None:
    sysctl_path(key).write_text(f"{value}\n")


def in_netns(ns: str | None, fn: Callable[..., T], *args: Any) -> T:
    """Call fn(*args) in network namespace `ns` (None: the caller's), from a throw-away thread.

    Sockets created there stay in that namespace for their whole life, whichever thread uses them.
    """
    if ns is None:
        return fn(*args)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def ns_socket(addr: str, kind: int, ns: str | None = None, proto: int = 0) -> socket.socket:
    """A socket of the family of `addr`, living in namespace `ns` (None: this process's)."""
    return in_netns(ns, socket.socket, family_of(addr), kind, proto)


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll pred() until it returns something truthy (returned); raise TimeoutError after timeout.

    Exceptions from pred() count as "not yet"; the last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # retried
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or pred}") from last
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------
# topology
# ------------------------------------------------------------------------------------------------

@dataclass
class Endpoint:
    """A namespace at the far end of a veth pair from the root namespace."""

    name: str
    ns: str
    index: int
    host_if: str       # root-namespace side of the veth
    ipv4: str          # address inside the namespace
    ipv6: str
    gw4: str           # root-side addresses (the namespace's default routes)
    gw6: str

    def addr(self, family: int | str) -> str:
        """ipv4 or ipv6, by socket family or by "4"/"6"/"v4"/"v6"."""
        return self.ipv6 if family in (socket.AF_INET6, 6, "6", "v6", "ipv6") else self.ipv4


@dataclass
class Client(Endpoint):
    pass


@dataclass
class Backend(Endpoint):
    """A backend namespace running servers.py: HTTP on http_port, UDP echo on udp_port."""

    http_port: int = 8080
    udp_port: int = 5353
    sctp_port: int | None = None
    workdir: Path = field(default_factory=lambda: Path("/tmp"))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> dict[str, int]:
        p = {"tcp": self.http_port, "udp": self.udp_port}
        if self.sctp_port:
            p["sctp"] = self.sctp_port
        return p

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"{self.name}.ready"

    def start(self, wait: bool = True, timeout: float = 90.0) -> None:
        """(Re)start the server process; with wait, block until its sockets are bound."""
        if self.proc and self.proc.poll() is None:
            return
        self.ready_file.unlink(missing_ok=True)
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-S", str(SERVERS_PY), "--name", self.name,
               "--http", str(self.http_port), "--udp", str(self.udp_port), "--ready", str(self.ready_file)]
        if self.sctp_port:
            cmd += ["--sctp", str(self.sctp_port)]
        with open(self.log, "ab") as log:  # never the VM's stdout: it would keep vng waiting
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait:
            wait_ready([self], timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the namespace and addresses stay."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_ready(backends: list[Backend], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(backends)
    while pending:
        for b in list(pending):
            if b.ready_file.exists():
                pending.remove(b)
            elif b.proc is None or b.proc.poll() is not None:
                log = b.log.read_text(errors="replace")[-2000:] if b.log.exists() else ""
                raise RuntimeError(f"backend {b.name} server exited before it was ready:\n{log}")
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"backends not ready after {timeout:.0f}s: {[b.name for b in pending]}")
        if pending:
            time.sleep(0.05)


def _link_addrs(kind: str, n: int) -> tuple[str, str, str, str]:
    """(gw4, ipv4, gw6, ipv6) for link n of kind "b" (backend) or "c" (client)."""
    if not 1 <= n <= MAX_LINKS:
        raise RuntimeError(f"out of {kind} link numbers ({n})")
    net4 = BACKEND_V4 if kind == "b" else CLIENT_V4
    base = net4.network_address + 4 * n
    subnet = (BACKEND_V6_SUBNET if kind == "b" else CLIENT_V6_SUBNET) + n
    return str(base + 1), str(base + 2), f"2001:2:0:{subnet:x}::1", f"2001:2:0:{subnet:x}::2"


class Netlab:
    """Creates namespaces, links, servers and VIPs; close() removes all of them (idempotent)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.endpoints: list[Endpoint] = []
        self.vip_devs: set[str] = set()

    def _links(self, kind: str, count: int, names: list[str] | None) -> list[tuple[int, str, str, str]]:
        if names is not None and len(names) != count:
            raise ValueError("names must have `count` entries")
        out = []
        for i in range(count):
            n = next(_counters[kind])
            ns = f"{NS_PREFIX}{kind}{n}"
            name = names[i] if names else f"{'backend' if kind == 'b' else 'client'}-{n}"
            out.append((n, ns, f"vp{kind}{n}", name))
        root: list[str] = []
        for n, ns, host_if, _ in out:
            gw4, _, gw6, _ = _link_addrs(kind, n)
            root += [f"netns add {ns}",
                     f"link add {host_if} type veth peer name eth0 netns {ns}",
                     f"addr add {gw4}/30 dev {host_if}",
                     f"addr add {gw6}/64 dev {host_if} nodad",
                     f"link set {host_if} up"]
        ip_batch(root)
        for n, ns, _, _ in out:
            gw4, v4, gw6, v6 = _link_addrs(kind, n)
            ip_batch([
                "link set lo up",
                f"addr add {v4}/30 dev eth0",
                f"addr add {v6}/64 dev eth0 nodad",
                "link set eth0 up",
                f"route add default via {gw4}",
                f"route add default via {gw6}",
            ], ns=ns)
        return out

    def backends(self, count: int = 3, *, http_port: int = 8080, udp_port: int = 5353, sctp_port: int | None = None,
                 names: list[str] | None = None, timeout: float = 90.0) -> list[Backend]:
        """`count` backend namespaces, each serving HTTP/UDP (and SCTP if sctp_port) under its name."""
        made: list[Backend] = []
        links = self._links("b", count, names)
        for n, ns, host_if, name in links:
            gw4, v4, gw6, v6 = _link_addrs("b", n)
            b = Backend(name=name, ns=ns, index=n, host_if=host_if, ipv4=v4, ipv6=v6, gw4=gw4, gw6=gw6,
                        http_port=http_port, udp_port=udp_port, sctp_port=sctp_port, workdir=self.workdir)
            self.endpoints.append(b)
            made.append(b)
        for b in made:  # servers start in parallel: Python start-up is slow in the emulated VM
            b.start(wait=False)
        wait_ready(made, timeout)
        return made

    def clients(self, count: int = 1, *, names: list[str] | None = None) -> list[Client]:
        """`count` client namespaces with their own source addresses, routed via the root namespace."""
        made: list[Client] = []
        for n, ns, host_if, name in self._links("c", count, names):
            gw4, v4, gw6, v6 = _link_addrs("c", n)
            c = Client(name=name, ns=ns, index=n, host_if=host_if, ipv4=v4, ipv6=v6, gw4=gw4, gw6=gw6)
            self.endpoints.append(c)
            made.append(c)
        return made

    def vips(self, *addrs: str, dev: str = VIP_DEV) -> list[str]:
        """Bind addresses (/32, /128, no DAD) to dummy interface `dev` in the root namespace (made if missing)."""
        lines = []
        if not Path(f"/sys/class/net/{dev}").exists():
            lines += [f"link add {dev} type dummy", f"link set {dev} up"]
        self.vip_devs.add(dev)
        for a in addrs:
            plen = 128 if ":" in a else 32
            lines.append(f"addr add {a}/{plen} dev {dev}" + (" nodad" if plen == 128 else ""))
        ip_batch(lines)
        return list(addrs)

    def close(self) -> None:
        for e in self.endpoints:
            if isinstance(e, Backend):
                try:
                    e.stop()
                except Exception:  # best effort: the namespace goes anyway
                    if e.proc:
                        e.proc.kill()
        lines = [f"link del {e.host_if}" for e in self.endpoints]
        lines += [f"netns del {e.ns}" for e in self.endpoints]
        lines += [f"link del {d}" for d in sorted(self.vip_devs)]
        ip_batch(lines, force=True)
        self.endpoints.clear()
        self.vip_devs.clear()


def remove_stale_namespaces() -> None:
    """Delete ipvsp-* namespaces and their veths left by an earlier, crashed session."""
    try:
        names = [n for n in os.listdir("/run/netns") if n.startswith(NS_PREFIX)]
    except FileNotFoundError:
        return
    lines = [f"netns del {n}" for n in names]
    hosts = [d for d in os.listdir("/sys/class/net") if d.startswith(("vpb", "vpc"))]
    lines += [f"link del {d}" for d in hosts]
    ip_batch(lines, force=True)


# ------------------------------------------------------------------------------------------------
# traffic
# ------------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str

    @property
    def backend(self) -> str:
        return self.body.strip()


def read_response(sock: socket.socket, buf: bytes = b"") -> tuple[Response, bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full HTTP response ({buf[:200]!r})")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of an HTTP body")
        buf += chunk
    return Response(status, headers, buf[:length].decode(errors="replace")), buf[length:]


def _request_bytes(addr: str, port: int, path: str, keepalive: bool) -> bytes:
    host = f"[{addr}]" if ":" in addr else addr
    conn = "keep-alive" if keepalive else "close"
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {conn}\r\n\r\n".encode()


def _connect(addr: str, port: int, ns: str | None, timeout: float, source: str | None,
             proto: str) -> socket.socket:
    ipproto = socket.IPPROTO_SCTP if proto == "sctp" else 0
    s = ns_socket(addr, socket.SOCK_STREAM, ns, ipproto)
    try:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((addr, port))
    except BaseException:
        s.close()
        raise
    return s


def http_request(addr: str, port: int, ns: str | None = None, *, path: str = "/", timeout: float = 10.0,
                 source: str | None = None, proto: str = "tcp") -> Response:
    """One GET (Connection: close) from namespace `ns` (None: root); the full response."""
    with _connect(addr, port, ns, timeout, source, proto) as s:
        s.sendall(_request_bytes(addr, port, path, keepalive=False))
        resp, _ = read_response(s)
        return resp


def http_get(addr: str, port: int, ns: str | None = None, *, timeout: float = 10.0, source: str | None = None,
             proto: str = "tcp") -> str:
    """GET http://addr:port/ from namespace `ns` (None: root namespace); the answering backend's name.

    Raises OSError (ConnectionRefusedError, TimeoutError, ...) when there is no answer.
    """
    return http_request(addr, port, ns, timeout=timeout, source=source, proto=proto).backend


def udp_ask(addr: str, port: int, ns: str | None = None, *, timeout: float = 5.0, source: str | None = None,
            attempts: int = 3, payload: bytes = b"who") -> str:
    """Send a datagram to addr:port from namespace `ns`; the answering backend's name.

    Resends (same socket, same source port: the same IPVS connection) up to `attempts` times
    within `timeout`; raises TimeoutError when nothing answers.
    """
    with ns_socket(addr, socket.SOCK_DGRAM, ns) as s:
        if source:
            s.bind((source, 0))
        s.connect((addr, port))
        s.settimeout(timeout / attempts)
        for _ in range(attempts):
            s.send(payload)
            try:
                return s.recv(65536).decode(errors="replace").strip()
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise TimeoutError(f"no UDP answer from {addr}:{port} (ns={ns}) within {timeout}s")


def outcome(attempt: Callable[[], str]) -> str:
    """What a connection attempt came to: its answer, or "refused", "timeout" or "error: ..."."""
    try:
        return attempt()
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error: {exc}"


class TcpListener:
    """Answers every connection on a listening socket with `reply`, from a thread, until close():
    a server of the node itself (sshd on its address) or of a namespace, without a process."""

    def __init__(self, sock: socket.socket, reply: bytes) -> None:
        self.sock, self.reply = sock, reply
        self.sock.settimeout(0.5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the accept timeout (to look at `stop`), or closed
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.reply)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


class HeldConnection:
    """An open keep-alive HTTP connection; `backend` is the name of the backend that answered."""

    def __init__(self, sock: socket.socket, addr: str, port: int) -> None:
        self.sock, self.addr, self.port = sock, addr, port
        self._buf = b""
        self.backend = ""
        self.backend = self.request()
        self.local = sock.getsockname()[:2]

    def request(self, timeout: float | None = None) -> str:
        """Another GET on this same connection; the answering backend's name (raises if it broke)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        self.sock.sendall(_request_bytes(self.addr, self.port, "/", keepalive=True))
        resp, self._buf = read_response(self.sock, self._buf)
        return resp.backend

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HeldConnection({self.local} -> {self.addr}:{self.port} backend={self.backend!r})"


def hold_tcp(addr: str, port: int, ns: str | None = None, *, timeout: float = 10.0, source: str | None = None,
             proto: str = "tcp") -> HeldConnection:
    """Open a connection to addr:port from `ns`, do one keep-alive GET and keep the socket open."""
    s = _connect(addr, port, ns, timeout, source, proto)
    try:
        return HeldConnection(s, addr, port)
    except BaseException:
        s.close()
        raise
