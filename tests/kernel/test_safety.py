"""Safety under continuous traffic: the agent as a real process against the real kernel (in the VM).

Every test keeps client loops running for its whole length (one request after another from a
client namespace, every failure counted) while it restarts, drains, deletes, kills or cleans up,
and prints the counts (`SAFETY <scenario>: requests=... failed=...`) so CI logs show them.

The agent is `ipvsproxy run --from-file DIR` (the file source re-reads changed manifests), started
and signalled like a DaemonSet's container would be. Tests run in file order and share the
backends and one agent process (a process start costs ~25 s in the emulated VM, mostly imports
over 9p, so there are as few as the scenarios need: 5 agent starts, 1 diff, 2 cleanups):

    restart      3 x SIGTERM + start: nothing dropped, a draining real server stays at weight 0
    drain        a removed TCP endpoint: held connections finish on it, new ones avoid it; its
                 real server goes when they close, or when the grace period runs out
    udp          a removed UDP endpoint (IPv4 and IPv6): conntrack flushed, no datagram reaches it
    kill9        kill -9 in the middle of a big sync; the next agent converges (`diff` exits 0)
    foreign      foreign ipvsadm services and foreign addresses, made before the first agent
                 starts, survive every sync, restart and kill -9 above, and `ipvsproxy cleanup`
                 (twice), which removes everything ipvsproxy owns

Addresses: Service VIPs 198.18.50.0/24 and 2001:2:0:50::/64 (on ipvsproxy0), the big manifest
2001:2:0:200::/64 (endpoints 2001:2:0:bf0X::/64, never contacted), foreign 198.18.60.0/24 and
2001:2:0:60::/64 (on the test's own dummy) and 198.18.61.1 / 2001:2:0:61::1 (on a veth).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns import Backend, Client, HeldConnection, Netlab, hold_tcp, http_get, in_netns, ns_socket, udp_ask

from ipvsproxy.dataplane.conntrack import tuple_of
from tests.agentlab import ChildProcess

pytestmark = pytest.mark.kernel

IPVSPROXY = str(Path(sys.executable).with_name("ipvsproxy"))
NODE = "safety-node"
NAMESPACE = "safety"
HEALTHZ = "127.0.0.1:19256"
DEV = "ipvsproxy0"
WEB4 = "198.18.50.10"
DNS4, DNS6 = "198.18.50.53", "2001:2:0:50::53"
OUR_PREFIXES = ("198.18.50.", "[2001:2:0:50::", "[2001:2:0:200::")
BIG_N, BIG_RS = 120, 5
FOREIGN_TCP, FOREIGN_UDP6 = "198.18.60.1", "2001:2:0:60::1"
FOREIGN_VETH_ADDRS = ("198.18.61.1", "2001:2:0:61::1")
FOREIGN_DUMMY = "ipvstest0"
GRACE = 15.0  # --drain-grace-period: longer than an agent lives in the restart test, short enough to wait for
T0 = time.monotonic()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


# ------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------

def service(name: str, ips: list[str], proto: str, port: int, target: int) -> dict[str, Any]:
    fams = ["IPv6" if ":" in ip else "IPv4" for ip in ips]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ipFamilies": fams,
                     "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
                     "ports": [{"name": "p", "port": port, "protocol": proto, "targetPort": target}]}}


def slice_(name: str, family: str, addrs: list[str], proto: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-{family.lower()}", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": family, "ports": [{"name": "p", "port": port, "protocol": proto}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": NODE} for a in addrs]}


def big_vip(i: int) -> str:
    return f"2001:2:0:200::{i + 1:x}"


def big_manifest() -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in range(BIG_N):
        name = f"big-{i}"
        objs.append(service(name, [big_vip(i)], "TCP", 80, 8080))
        objs.append(slice_(name, "IPv6", [f"2001:2:0:bf0{j}::{i + 1:x}" for j in range(BIG_RS)], "TCP", 8080))
    return objs


def write_json(path: Path, objs: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")  # not a manifest suffix: the watcher never reads half a file
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# the kernel, read back
# ------------------------------------------------------------------------------------------------

@dataclass
class RS:
    weight: int
    active: int
    inactive: int


Table = dict[str, dict[str, RS]]


def ipvs_table() -> Table:
    """`ipvsadm -Ln` as {"TCP 198.18.50.10:80": {"198.19.0.6:8080": RS}} (ours and foreign)."""
    out: dict[str, dict[str, RS]] = {}
    current: dict[str, RS] | None = None
    for line in sh("ipvsadm", "-Ln").stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("TCP", "UDP", "SCTP"):
            current = out.setdefault(f"{parts[0]} {parts[1]}", {})
        elif parts[:1] == ["->"] and current is not None and parts[1] != "RemoteAddress:Port":
            current[parts[1]] = RS(int(parts[3]), int(parts[4]), int(parts[5]))
    return out


def save_lines(*prefixes: str) -> list[str]:
    """Sorted `ipvsadm -Sn` lines mentioning any of the prefixes (all lines without prefixes)."""
    lines = sh("ipvsadm", "-Sn").stdout.splitlines()
    return sorted(ln for ln in lines if not prefixes or any(p in ln for p in prefixes))


def hp(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def bound(dev: str) -> set[str]:
    res = sh("ip", "-o", "addr", "show", "dev", dev, check=False)
    if res.returncode != 0:
        return set()
    return {p.split()[3].split("/")[0] for p in res.stdout.splitlines() if " scope link" not in p}


def link_exists(dev: str) -> bool:
    return Path(f"/sys/class/net/{dev}").exists()


def udp_counters(ns: str) -> int:
    """Every UDP datagram that reached namespace `ns` (delivered, no port, or in error; v4 + v6)."""
    def read() -> int:
        total = 0
        lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        heads = [ln.split() for ln in lines if ln.startswith("Udp:")]
        fields = dict(zip(heads[0][1:], map(int, heads[1][1:]), strict=True))
        total += fields["InDatagrams"] + fields["NoPorts"] + fields["InErrors"]
        for ln in Path("/proc/thread-self/net/snmp6").read_text().splitlines():
            name, _, value = ln.partition(" ")
            if name in ("Udp6InDatagrams", "Udp6NoPorts", "Udp6InErrors"):
                total += int(value)
        return total
    return in_netns(ns, read)


def ct_entries(vip: str, vport: int, addr: str, port: int) -> int:
    """Conntrack entries of UDP flows to vip:vport whose reply comes from addr:port (NAT'd to that
    real server). The kernel filters by protocol and port, so the many TCP entries of the other
    loops are not parsed (pyroute2 is slow in the emulated VM); never by address: Debian's 6.1
    kernel inverts its IPv6 address filter."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    want, to = ipaddress.ip_address(addr), ipaddress.ip_address(vip)
    orig = NFCTAttrTuple(family=family, dport=vport, proto=socket.IPPROTO_UDP)
    with closing(Conntrack(nfgen_family=family)) as ct:
        return sum(1 for e in ct.dump(tuple_orig=orig)
                   if (o := tuple_of(e.get_attr("CTA_TUPLE_ORIG")))[1] and ipaddress.ip_address(o[1]) == to
                   and (r := tuple_of(e.get_attr("CTA_TUPLE_REPLY")))[0] and ipaddress.ip_address(r[0]) == want
                   and r[3] == port)


# ------------------------------------------------------------------------------------------------
# the agent process
# ------------------------------------------------------------------------------------------------

class AgentProc(ChildProcess):
    """`ipvsproxy run` as a child process, its output in a log file (never the VM's stdout)."""

    def __init__(self, workdir: Path, manifests: Path) -> None:
        super().__init__("ipvsproxy", workdir / "agent.log")
        self.workdir, self.manifests = workdir, manifests
        self.grace: float | None = None
        self.starts = 0
        self.start_to_sync: list[float] = []  # seconds from exec to the first successful sync

    def start(self, grace: float) -> None:  # type: ignore[override]  (the agent's command is its own)
        assert not self.running, "agent already running"
        cmd = [IPVSPROXY, "run", "--from-file", str(self.manifests), "--node-name", NODE,
               "--state-dir", str(self.workdir / "state"), "--min-sync-period", "200ms", "--sync-period", "10s",
               "--drain-grace-period", f"{grace}s", "--healthz-bind-address", HEALTHZ,
               "--metrics-bind-address", ""]
        self.starts += 1
        super().start(cmd, f"start #{self.starts}: ")
        self.grace = grace

    def ensure(self, grace: float) -> None:
        """Running with this grace period (restarted if it runs with another)."""
        if self.running and self.grace == grace:
            return
        if self.running:
            self.stop()
        self.start(grace)
        self.wait_synced()

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://{HEALTHZ}/healthz", timeout=2) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))
        except (OSError, ValueError):
            return None

    def wait_synced(self, after: float | None = None, timeout: float = 180.0) -> float:
        """Until a sync succeeded after `after` (default: this process's start); its time."""
        after = self.started if after is None else after
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise AssertionError(f"the agent exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
            h = self.health()
            if h and h.get("lastSuccess") and h["lastSuccess"] >= after:
                if after == self.started:
                    self.start_to_sync.append(h["lastSuccess"] - self.started)
                return float(h["lastSuccess"])
            if time.monotonic() > deadline:
                raise AssertionError(f"no successful sync after {timeout:.0f}s (healthz {h}):\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as the kubelet does; the exit status (ignoring it fails the test)."""
        code = self.term(timeout)
        if self.killed:
            raise AssertionError(f"the agent ignored SIGTERM for {timeout:.0f}s:\n{self.tail()}")
        return code


def run_cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IPVSPROXY, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------------
# client traffic
# ------------------------------------------------------------------------------------------------

@dataclass
class Result:
    start: float
    backend: str | None
    error: str | None


@dataclass
class Traffic:
    """A client loop in a thread: `ask()` again and again until stopped; every result kept."""

    label: str
    ask: Callable[[], str]
    interval: float = 0.1
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{self.label}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                self.results.append(Result(t, self.ask(), None))
            except Exception as exc:  # counted, never raised: the loop runs for the whole test
                self.results.append(Result(t, None, f"{type(exc).__name__}: {exc}"))
            self._stop.wait(self.interval)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.error]

    def answered_by(self, name: str, since: float) -> list[Result]:
        return [r for r in self.results if r.start >= since and r.backend == name]

    def wait_requests(self, n: int, timeout: float = 60.0) -> None:
        """Until n more requests were made (traffic really flows across an event)."""
        target = len(self.results) + n
        deadline = time.monotonic() + timeout
        while len(self.results) < target and time.monotonic() < deadline:
            time.sleep(0.05)


class StickyUDP:
    """One UDP socket (one source port: one IPVS connection, one conntrack entry) asking over and over.

    A request resends up to 3 times (1 s apart) like a resolver; only a request with no answer at
    all is a failure. Datagrams that went unanswered are counted in `lost`.
    """

    def __init__(self, addr: str, port: int, ns: str) -> None:
        self.sock = ns_socket(addr, socket.SOCK_DGRAM, ns)
        self.sock.connect((addr, port))
        self.sock.settimeout(1.0)
        self.lost = 0

    def ask(self) -> str:
        for _ in range(3):
            self.sock.send(b"who")
            try:
                return self.sock.recv(65536).decode(errors="replace").strip()
            except (TimeoutError, ConnectionRefusedError):
                self.lost += 1
        raise TimeoutError("no UDP answer after 3 sends")

    def close(self) -> None:
        self.sock.close()


def report(scenario: str, loops: list[Traffic], extra: str = "") -> int:
    """Print the counts (CI logs show them); the number of failed requests."""
    total = sum(len(t.results) for t in loops)
    failed = sum(len(t.failed) for t in loops)
    per = ", ".join(f"{t.label}={len(t.results)}/{len(t.failed)}" for t in loops)
    print(f"\nSAFETY {scenario}: requests={total} failed={failed} ({per}){' ' + extra if extra else ''}")
    for t in loops:
        for r in t.failed[:5]:
            print(f"  {t.label} failure at +{r.start - T0:.1f}s: {r.error}")
    return failed


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

@dataclass
class Lab:
    netlab: Netlab
    backends: list[Backend]
    client: Client
    workdir: Path
    manifests: Path
    agent: AgentProc
    held: list[HeldConnection] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)            # `ipvsadm -Sn` lines of the foreign services
    foreign_addrs: dict[str, set[str]] = field(default_factory=dict)  # device -> addresses on it

    def add_foreign(self) -> None:
        """Foreign state, there before the first agent starts and through every test: two ipvsadm
        virtual servers (on a foreign dummy), addresses on that dummy and on a veth."""
        b0, b1, _ = self.backends
        self.netlab.vips(FOREIGN_TCP, FOREIGN_UDP6, "198.18.60.2", dev=FOREIGN_DUMMY)
        for a in FOREIGN_VETH_ADDRS:
            sh("ip", "addr", "add", f"{a}/{128 if ':' in a else 32}", "dev", self.client.host_if,
               *(["nodad"] if ":" in a else []))
        sh("ipvsadm", "-A", "-t", f"{FOREIGN_TCP}:80", "-s", "wlc")
        sh("ipvsadm", "-a", "-t", f"{FOREIGN_TCP}:80", "-r", hp(b0.ipv4, 8080), "-m", "-w", "3")
        sh("ipvsadm", "-A", "-u", hp(FOREIGN_UDP6, 53), "-s", "rr", "-p", "60")
        sh("ipvsadm", "-a", "-u", hp(FOREIGN_UDP6, 53), "-r", hp(b1.ipv6, 5353), "-m", "-w", "2")
        self.foreign = save_lines(FOREIGN_TCP, FOREIGN_UDP6)
        assert len(self.foreign) == 4, self.foreign
        self.foreign_addrs = {d: bound(d) for d in (self.client.host_if, FOREIGN_DUMMY)}
        assert set(FOREIGN_VETH_ADDRS) <= self.foreign_addrs[self.client.host_if]

    def foreign_intact(self, when: str) -> None:
        assert save_lines(FOREIGN_TCP, FOREIGN_UDP6) == self.foreign, f"foreign virtual servers changed by {when}"
        for dev, addrs in self.foreign_addrs.items():
            assert bound(dev) == addrs, f"foreign addresses on {dev} changed by {when}"

    def foreign_loops(self) -> list[Traffic]:
        return [Traffic("foreign", lambda: http_get(FOREIGN_TCP, 80, self.client.ns, timeout=10), interval=0.1),
                Traffic("foreign6", lambda: udp_ask(FOREIGN_UDP6, 53, self.client.ns, timeout=3), interval=0.2)]

    def write(self, web: list[Backend] | None = None, dns: list[Backend] | None = None) -> None:
        """The small manifest: Service web (TCP, IPv4) and dns (UDP, dual stack) with these endpoints."""
        web = self.backends if web is None else web
        dns = self.backends if dns is None else dns
        write_json(self.manifests / "services.json", [
            service("web", [WEB4], "TCP", 80, 8080),
            slice_("web", "IPv4", [b.ipv4 for b in web], "TCP", 8080),
            service("dns", [DNS4, DNS6], "UDP", 53, 5353),
            slice_("dns", "IPv4", [b.ipv4 for b in dns], "UDP", 5353),
            slice_("dns", "IPv6", [b.ipv6 for b in dns], "UDP", 5353),
        ])

    def web_on_every_backend(self) -> None:
        """The plain manifests, the agent running on them (started if need be), web on all three backends."""
        self.write()
        self.agent.ensure(grace=GRACE)
        self.wait_table(expect_web(self.backends), "web with 3 real servers")

    def web_loop(self) -> Traffic:
        return Traffic("web", lambda: http_get(WEB4, 80, self.client.ns, timeout=10))

    def dns_loop(self, addr: str) -> Traffic:
        return Traffic(f"dns{'6' if ':' in addr else '4'}",
                       lambda: udp_ask(addr, 53, self.client.ns, timeout=3, attempts=3), interval=0.2)

    def hold(self, target: Backend, count: int = 1, tries: int = 30) -> list[HeldConnection]:
        """`count` open keep-alive connections to web that IPVS sent to `target`."""
        got: list[HeldConnection] = []
        for _ in range(tries):
            h = hold_tcp(WEB4, 80, self.client.ns)
            if h.backend == target.name:
                got.append(h)
                self.held.append(h)
                if len(got) == count:
                    return got
            else:
                h.close()
        raise AssertionError(f"no connection landed on {target.name} in {tries} tries: {ipvs_table()}")

    def wait_table(self, pred: Callable[[Table], bool], what: str,
                   timeout: float = 60.0) -> float:
        """Poll `ipvsadm -Ln` until pred(table); the monotonic time right after the read that saw it
        (anything that starts later starts after the change)."""
        deadline = time.monotonic() + timeout
        while True:
            table = ipvs_table()
            t = time.monotonic()
            if pred(table):
                return t
            if t > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                     f"table: {table}\nagent log:\n{self.agent.tail()}")
            if self.agent.proc is not None and not self.agent.running and self.agent.proc.returncode != -9:
                raise AssertionError(f"the agent exited while waiting for {what}:\n{self.agent.tail()}")
            time.sleep(0.1)


def web_reals(table: Table) -> dict[str, RS]:
    return table.get(f"TCP {WEB4}:80", {})


def expect_web(backends: list[Backend], drained: tuple[Backend, ...] = ()) -> Callable[[Table], bool]:
    def pred(table: Table) -> bool:
        reals = web_reals(table)
        want = {hp(b.ipv4, 8080): 1 for b in backends} | {hp(b.ipv4, 8080): 0 for b in drained}
        return {k: v.weight for k, v in reals.items()} == want
    return pred


@pytest.fixture(scope="module")
def lab(module_netlab: Netlab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    start = time.monotonic()
    workdir = tmp_path_factory.mktemp("safety")
    manifests = workdir / "manifests"
    manifests.mkdir()
    backends = module_netlab.backends(3)
    (client,) = module_netlab.clients(1)
    lab = Lab(module_netlab, backends, client, workdir, manifests, AgentProc(workdir, manifests))
    try:
        lab.add_foreign()
        yield lab
    finally:
        for h in lab.held:
            h.close()
        if lab.agent.running:
            lab.agent.stop()
        if link_exists(DEV) or any(p in ln for ln in save_lines() for p in OUR_PREFIXES):
            run_cli("cleanup")
        for vs in (f"-t {FOREIGN_TCP}:80", f"-u [{FOREIGN_UDP6}]:53"):
            sh("ipvsadm", "-D", *vs.split(), check=False)
        problems = lab.agent.problems()
        print(f"\nSAFETY module: {time.monotonic() - start:.0f}s in this module, {lab.agent.starts} agent starts "
              f"(exec to first sync: {', '.join(f'{t:.1f}s' for t in lab.agent.start_to_sync)}), "
              f"{len(problems)} warning/error lines in the agent log")
        for p in problems[:20]:
            print(f"  agent: {p}")


# ------------------------------------------------------------------------------------------------
# (1) restarts
# ------------------------------------------------------------------------------------------------

def test_restart_three_times_drops_nothing_and_keeps_drains(lab: Lab) -> None:
    b0, b1, b2 = lab.backends
    lab.web_on_every_backend()
    lab.foreign_intact("the first sync")
    loops = [lab.web_loop().start(), lab.dns_loop(DNS4).start(), lab.dns_loop(DNS6).start(),
             *(t.start() for t in lab.foreign_loops())]
    try:
        (held,) = lab.hold(b2)
        lab.write(web=[b0, b1])
        t_drain = lab.wait_table(expect_web([b0, b1], drained=(b2,)), "b2 drained to weight 0")
        snapshot = save_lines(*OUR_PREFIXES)
        assert f"-a -t {WEB4}:80 -r {hp(b2.ipv4, 8080)} -m -w 0" in snapshot, snapshot
        for i in range(3):
            loops[0].wait_requests(5)
            assert lab.agent.stop() == 0, lab.agent.tail()
            assert save_lines(*OUR_PREFIXES) == snapshot, f"SIGTERM changed the kernel (restart {i + 1})"
            lab.foreign_intact(f"SIGTERM {i + 1}")
            assert held.request() == b2.name  # the drained backend still serves its connection
            loops[0].wait_requests(5)  # traffic flows while no agent runs
            lab.agent.start(grace=GRACE)  # each agent lives far less than the grace period
            lab.agent.wait_synced()
            loops[0].wait_requests(5)
            assert save_lines(*OUR_PREFIXES) == snapshot, f"restart {i + 1} changed the kernel"
            lab.foreign_intact(f"restart {i + 1}")
            assert web_reals(ipvs_table())[hp(b2.ipv4, 8080)].weight == 0
            assert held.request() == b2.name
    finally:
        for t in loops:
            t.stop()
        for h in lab.held:
            h.close()
    late = loops[0].answered_by(b2.name, t_drain)
    failed = report("restart", loops, f"restarts=3 drained_weight_kept=True late_answers_from_drained={len(late)}")
    assert failed == 0
    assert late == [], f"a new connection reached the drained backend (was its weight reset?) " \
        f"{[round(r.start - t_drain, 2) for r in late]}s after the drain was seen"


# ------------------------------------------------------------------------------------------------
# (2) TCP drain
# ------------------------------------------------------------------------------------------------

def test_removed_endpoint_drains_then_goes(lab: Lab) -> None:
    b0, b1, b2 = lab.backends
    lab.web_on_every_backend()
    web = lab.web_loop().start()
    try:
        # (a) connections to the removed endpoint complete; its real server goes once they close
        held = lab.hold(b1, count=2)
        lab.write(web=[b0, b2])
        t_drain = lab.wait_table(expect_web([b0, b2], drained=(b1,)), "b1 drained to weight 0")
        web.wait_requests(10)
        for _ in range(3):
            for h in held:
                assert h.request() == b1.name
            time.sleep(0.3)
        rs = web_reals(ipvs_table())[hp(b1.ipv4, 8080)]
        assert rs.weight == 0 and rs.active >= 2, rs
        for h in held:
            h.close()
        t_gone = lab.wait_table(lambda t: hp(b1.ipv4, 8080) not in web_reals(t), "b1 deleted after its "
                                "connections closed", timeout=GRACE + 30)
        assert t_gone - t_drain < GRACE, "deleted by the grace period, not because its connections closed"

        # (b) a connection that stays open: the real server goes when the grace period runs out
        (keep,) = lab.hold(b0)
        lab.write(web=[b2])
        t_drain2 = lab.wait_table(expect_web([b2], drained=(b0,)), "b0 drained to weight 0")
        uses = 0
        while hp(b0.ipv4, 8080) in web_reals(ipvs_table()):
            if time.monotonic() - t_drain2 < GRACE - 2:  # keep using it while it must still work
                assert keep.request() == b0.name
                uses += 1
            time.sleep(0.5)
            assert time.monotonic() - t_drain2 < GRACE + 30, "b0 never deleted"
        t_gone2 = time.monotonic()
        assert t_gone2 - t_drain2 >= GRACE - 1.5, f"deleted after {t_gone2 - t_drain2:.1f}s, before the grace period"
        web.wait_requests(5)
    finally:
        web.stop()
    late = web.answered_by(b1.name, t_drain) + web.answered_by(b0.name, t_drain2)
    failed = report("drain", [web], f"closed->deleted={t_gone - t_drain:.1f}s "
                    f"grace->deleted={t_gone2 - t_drain2:.1f}s (grace {GRACE:.0f}s) held_uses={uses} "
                    f"late_answers_from_drained={len(late)}")
    assert failed == 0
    assert late == [], [(r.start - t_drain, r.backend) for r in late]


# ------------------------------------------------------------------------------------------------
# (3) UDP delete + conntrack flush
# ------------------------------------------------------------------------------------------------

def test_deleted_udp_backend_gets_no_datagram(lab: Lab) -> None:
    victim, *others = lab.backends
    lab.write()
    lab.agent.ensure(grace=GRACE)
    dns_keys = [f"UDP {hp(DNS4, 53)}", f"UDP {hp(DNS6, 53)}"]
    v4rs, v6rs = hp(victim.ipv4, 5353), hp(victim.ipv6, 5353)

    def dns_has(present: bool) -> Callable[[Table], bool]:
        def pred(t: Table) -> bool:
            n = [len(t.get(k, {})) for k in dns_keys]
            has = [v4rs in t.get(dns_keys[0], {}), v6rs in t.get(dns_keys[1], {})]
            return (all(has) and n == [3, 3]) if present else not any(has)
        return pred

    lab.wait_table(dns_has(True), "dns with 3 real servers per family")
    # a sticky socket per family whose flow IPVS sent to the victim (one source port, kept)
    sticky: list[StickyUDP] = []
    for addr in (DNS4, DNS6):
        for _ in range(30):
            s = StickyUDP(addr, 53, lab.client.ns)
            if s.ask() == victim.name:
                sticky.append(s)
                break
            s.close()
        else:
            raise AssertionError(f"no UDP flow to {addr} landed on {victim.name}")
    loops = [Traffic(f"sticky{i}", s.ask, interval=0.1).start() for i, s in zip("46", sticky, strict=True)]
    loops += [lab.dns_loop(DNS4).start(), lab.dns_loop(DNS6).start()]
    try:
        def left() -> tuple[int, int]:
            return ct_entries(DNS4, 53, victim.ipv4, 5353), ct_entries(DNS6, 53, victim.ipv6, 5353)

        assert all(left()), f"no flows to flush: {left()}"
        lab.write(dns=others)
        t_gone = lab.wait_table(dns_has(False), "the victim's UDP real servers deleted")
        deadline = time.monotonic() + 10
        while (n := left()) != (0, 0):
            assert time.monotonic() < deadline, f"conntrack entries to the deleted backend not flushed: {n}"
            time.sleep(0.1)
        t_flushed = time.monotonic()
        before = udp_counters(victim.ns)
        for t in loops:
            t.wait_requests(20)
        after = udp_counters(victim.ns)
    finally:
        for t in loops:
            t.stop()
        for s in sticky:
            s.close()
    late = [r for t in loops for r in t.answered_by(victim.name, t_flushed)]
    moved = {r.backend for t in loops[:2] for r in t.results if r.start > t_flushed}
    lost = sum(s.lost for s in sticky)
    failed = report("udp", loops, f"datagrams_at_deleted_backend={after - before} "
                    f"deleted->flushed={t_flushed - t_gone:.1f}s sticky_lost_datagrams={lost} "
                    f"sticky_now_at={sorted(moved)}")
    assert failed == 0
    assert after == before, f"{after - before} UDP datagrams reached the deleted backend"
    assert late == []
    assert moved and victim.name not in moved
    flush_warnings = [p for p in lab.agent.problems() if "conntrack" in p]
    assert flush_warnings == [], flush_warnings


# ------------------------------------------------------------------------------------------------
# (5) kill -9 mid-sync
# ------------------------------------------------------------------------------------------------

def _big_progress() -> tuple[int, int, int]:
    """(big virtual servers, their real servers, big addresses bound) from /proc (cheap to poll)."""
    vs = rs = 0
    for line in Path("/proc/net/ip_vs").read_text().splitlines():
        if line.startswith("TCP  [2001:0002:0000:0200:"):
            vs += 1
        elif line.startswith("  -> [2001:0002:0000:bf0"):
            rs += 1
    addrs = sum(1 for ln in Path("/proc/net/if_inet6").read_text().splitlines()
                if ln.startswith("2001000200000200") and ln.split()[-1] == DEV)
    return vs, rs, addrs


def test_kill9_mid_sync_then_converges(lab: Lab) -> None:
    b0, b1, b2 = lab.backends
    lab.web_on_every_backend()
    web = lab.web_loop().start()
    try:
        write_json(lab.manifests / "big.json", big_manifest())  # the running agent re-reads and syncs
        t_start = time.monotonic()
        deadline = time.monotonic() + 180
        while (progress := _big_progress()) == (0, 0, 0):
            assert lab.agent.running, lab.agent.tail()
            assert time.monotonic() < deadline, "the big sync never started"
            time.sleep(0.005)
        lab.agent.kill9()
        t_first = time.monotonic() - t_start
        at_kill = _big_progress()
        full = (BIG_N, BIG_N * BIG_RS, BIG_N)
        print(f"\nkill -9 {t_first:.1f}s after the manifest changed, big VS/RS/addresses at "
              f"{at_kill} of {full} (first seen {progress})")
        assert at_kill != full, "the sync had finished before the kill (make the manifest bigger)"
        lab.foreign_intact("kill -9 mid-sync")
        t_restart = time.monotonic()
        lab.agent.start(grace=GRACE)
        lab.agent.wait_synced()
        lab.wait_table(lambda t: _big_progress() == full, "the big manifest fully programmed", timeout=120)
        converged = time.monotonic() - t_restart
        table = ipvs_table()
        for i in range(BIG_N):
            reals = table[f"TCP {hp(big_vip(i), 80)}"]
            assert {k: v.weight for k, v in reals.items()} == {
                hp(f"2001:2:0:bf0{j}::{i + 1:x}", 8080): 1 for j in range(BIG_RS)}, (i, reals)
        assert expect_web([b0, b1, b2])(table)
        assert bound(DEV) == {WEB4, DNS4, DNS6} | {big_vip(i) for i in range(BIG_N)}
        lab.foreign_intact("the restart after kill -9")
        # the agent's own view: nothing left to do (diff only reads; the converged agent keeps running)
        t_diff = time.monotonic()
        diff = run_cli("diff", "--from-file", str(lab.manifests), "--node-name", NODE)
        t_diff = time.monotonic() - t_diff
        web.wait_requests(5)
    finally:
        web.stop()
    failed = report("kill9", [web], f"killed_at={at_kill} of {full}, converged {converged:.1f}s after restart, "
                    f"diff_exit={diff.returncode} ({t_diff:.1f}s)")
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert failed == 0


# ------------------------------------------------------------------------------------------------
# (4) foreign state, cleanup
# ------------------------------------------------------------------------------------------------

def test_foreign_state_survives_sync_restart_and_cleanup(lab: Lab) -> None:
    """The foreign state was made before the first agent started; the tests before this one
    checked it after each of their restarts and the kill -9. Here: a full resync, then cleanup."""
    b0, b1, _ = lab.backends
    lab.foreign_intact("the syncs, restarts and kill -9 of the tests before")
    if not lab.agent.running:
        lab.write()
        lab.agent.start(grace=GRACE)
        lab.agent.wait_synced()
    loops = [lab.web_loop().start(), *(t.start() for t in lab.foreign_loops())]
    try:
        if lab.agent.starts < 2:  # run on its own: restart here
            assert lab.agent.stop() == 0
            lab.foreign_intact("SIGTERM")
            lab.agent.start(grace=GRACE)
            lab.agent.wait_synced()
            lab.foreign_intact("a restart")
        t = time.time()
        lab.agent.signal(signal.SIGHUP)  # a full resync: dumps the whole table, repairs drift
        lab.agent.wait_synced(after=t)
        loops[0].wait_requests(5)
        lab.foreign_intact("a full sync (SIGHUP)")
    finally:
        for tr in loops:
            tr.stop()
    failed = report("foreign", loops, "(before cleanup)")
    assert failed == 0
    assert lab.agent.stop() == 0
    ours_before = [ln for ln in save_lines(*OUR_PREFIXES) if ln.startswith("-A")]
    t0 = time.monotonic()
    first = run_cli("cleanup")
    t1 = time.monotonic()
    second = run_cli("cleanup")
    t2 = time.monotonic()
    print(f"SAFETY cleanup: first ({t1 - t0:.1f}s): {first.stdout.strip()} | "
          f"second ({t2 - t1:.1f}s): {second.stdout.strip()}")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert f"removed {len(ours_before)} virtual servers" in first.stdout, (ours_before, first.stdout)
    assert "removed 0 virtual servers, 0 addresses" in second.stdout, second.stdout
    assert save_lines(*OUR_PREFIXES) == [], "cleanup left virtual servers ipvsproxy owns"
    assert not link_exists(DEV), f"cleanup left {DEV}"
    lab.foreign_intact("cleanup")
    assert http_get(FOREIGN_TCP, 80, lab.client.ns) == b0.name  # the foreign services still serve
    assert udp_ask(FOREIGN_UDP6, 53, lab.client.ns) == b1.name
