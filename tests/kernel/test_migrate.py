"""The move from the real kube-proxy (v1.20.2, --proxy-mode=ipvs) to ipvsproxy and back, with
traffic flowing the whole time (issue 19; docs/operating.md "Migrating from kube-proxy").

One real etcd + kube-apiserver (tests/realapi/cluster.py, started once: 1-4 minutes in the
emulated VM) holds a Node and five Services whose EndpointSlices point at backends in network
namespaces: web (ClusterIP TCP), sticky (sessionAffinity ClientIP), np (NodePort, reached on the
node address), dns (UDP) and old (deleted while neither proxy runs, so it becomes a leftover).
kube-proxy runs with `--ipvs-scheduler=lc`, and so does ipvsproxy. Four client namespaces, one
per Service, ask again and again, one attempt per request; every failure is counted, and
followed at once by a snapshot of the IPVS connections and conntrack entries of its source port.
One client per Service, not one for all: a client that reuses a source port towards two
virtual servers sharing a real server within IPVS's connection timeouts gets the reply of one
rewritten with the other's address (IPVS finds its connections on the reply path by client and
real server only; kubernetes/kubernetes#107249). A single client asking everything hit that
about once in 2,000-3,500 requests with kube-proxy alone as with ipvsproxy (docs/operating.md),
which is not what this test measures. In file order:

    switch     kube-proxy programs the node; `cleanup-kube-proxy` refuses while it runs; SIGTERM
               (kube-proxy 1.20 installs no handler: it dies without its cleanup, like SIGKILL);
               `ipvsproxy run` adopts its virtual servers. Failed requests, time to a complete
               and owned table, what was adopted and what changed.
    cleanup    `ipvsproxy cleanup-kube-proxy` with traffic: kube-ipvs0, kube-proxy's chains and
               ipsets and old's virtual server go; a foreign ipvsadm virtual server, a non-KUBE
               iptables rule, another ipset, KUBE-MARK-MASQ/-DROP (the kubelet's too) and
               ipvsproxy's table stay.
    rollback   SIGTERM to ipvsproxy, kube-proxy started again, then `ipvsproxy cleanup`.

Each prints `MIGRATE <step>: requests=... failed=...` and the figures land in
results/migrate.json when results/ is writable (the VM's read-write folder), with the proxies'
logs (migrate-agent.log: every sync at debug level), the heartbeat's stalls and, with
MIGRATE_PCAP=1, a capture of the test's traffic (migrate-migrate.pcap). MIGRATE_BASELINE_S=120
watches kube-proxy alone that much longer (a control for the switch's count).

Addresses: Services 198.18.112.0/20 (the API server's service range), the node 198.18.9.1 (its
own dummy), foreign 198.18.60.1; backends and clients from netns.py's plan.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns import Backend, Client, Netlab, ns_socket, read_response

from tests.agentlab import ChildProcess
from tests.realapi.cluster import Cluster, kubernetes_bin

# The kernel stage runs it (scripts/test.sh); alone:
#   bash scripts/vm-run.sh -- 'pytest -m kernel tests/kernel/test_migrate.py -p no:cacheprovider -s'
pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
IPVSPROXY = str(Path(sys.executable).with_name("ipvsproxy"))
NODE, NODE_IP = "migrate-node", "198.18.9.1"
NS = "mig"
SERVICE_RANGE = "198.18.112.0/20"
WEB, STICKY, NP, DNS, OLD = "198.18.112.10", "198.18.112.11", "198.18.112.12", "198.18.112.53", "198.18.112.20"
NODE_PORT = 30080
FOREIGN = "198.18.60.1"
KP_HEALTHZ, KP_METRICS = "127.0.0.1:10266", "127.0.0.1:10259"
AGENT_HEALTHZ = "127.0.0.1:19266"
FOREIGN_RULE = ("-s", "198.18.61.0/24", "-m", "comment", "--comment", "migrate-test", "-j", "ACCEPT")
FOREIGN_SET = "migrate-test-set"
# what kube-proxy changes on start (restored at the end: later test modules share this VM boot)
SYSCTLS = ("net/ipv4/conf/all/route_localnet", "net/ipv4/vs/conntrack", "net/ipv4/vs/conn_reuse_mode",
           "net/ipv4/vs/expire_nodest_conn", "net/ipv4/vs/expire_quiescent_template", "net/ipv4/ip_forward",
           "net/netfilter/nf_conntrack_tcp_timeout_established", "net/netfilter/nf_conntrack_tcp_timeout_close_wait")
T0 = time.monotonic()
FIGURES: dict[str, Any] = {}
TIMELINE: dict[str, str] = {}  # step -> UTC wall clock (the proxies' logs and the failures use it too)
FIGURES["timeline"] = TIMELINE


def sh(*args: str, check: bool = True) -> str:
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def save_lines(*needles: str) -> list[str]:
    """`ipvsadm -Sn` lines mentioning any of the needles."""
    return sorted(ln for ln in sh("ipvsadm", "-Sn").splitlines() if any(n in ln for n in needles))


def virtual_servers() -> dict[str, str]:
    """{"-t 198.18.112.10:80": the rest of its -A line} from `ipvsadm -Sn`."""
    out = {}
    for ln in sh("ipvsadm", "-Sn").splitlines():
        tok = ln.split()
        if tok[:1] == ["-A"]:
            out[f"{tok[1]} {tok[2]}"] = " ".join(tok[3:])
    return out


def reals() -> list[str]:
    return sorted(ln for ln in sh("ipvsadm", "-Sn").splitlines() if ln.startswith("-a "))


def addresses(dev: str) -> set[str]:
    res = subprocess.run(["ip", "-o", "addr", "show", "dev", dev, "scope", "global"], capture_output=True, text=True)
    return set(re.findall(r"inet (\S+?)/", res.stdout))


def link_exists(dev: str) -> bool:
    return Path(f"/sys/class/net/{dev}").exists()


def iptables_chains() -> set[str]:
    """"nat KUBE-SERVICES", ... for every chain iptables-save lists."""
    out, table = set(), ""
    for ln in sh("iptables-save").splitlines():
        if ln.startswith("*"):
            table = ln[1:]
        elif ln.startswith(":"):
            out.add(f"{table} {ln[1:].split()[0]}")
    return out


def ipsets() -> set[str]:
    return set(sh("ipset", "list", "-n").split())


# ---- traffic ---------------------------------------------------------------------------------------

class RequestFailed(Exception):
    """One failed request, with what the kernel tables need to find it again (its source port)."""

    def __init__(self, phase: str, sport: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__} in {phase} (source port {sport}): {cause}")
        self.phase, self.sport = phase, sport


def tcp_ask(addr: str, port: int, ns: str, timeout: float) -> tuple[str, int]:
    """One HTTP GET (Connection: close) from namespace ns: (backend, source port). No retry: the
    kernel's own SYN retransmissions (1 s, 3 s) are all a request gets within `timeout`."""
    s = ns_socket(addr, socket.SOCK_STREAM, ns)
    phase = "connect"
    try:
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            phase = "response"
            s.sendall(f"GET / HTTP/1.1\r\nHost: {addr}:{port}\r\nConnection: close\r\n\r\n".encode())
            resp, _ = read_response(s)
            return resp.backend, s.getsockname()[1]
        except OSError as exc:
            sport = 0
            with contextlib.suppress(OSError):
                sport = s.getsockname()[1]  # bound by the connect attempt, kept until close
            raise RequestFailed(phase, sport, exc) from exc
    finally:
        s.close()


def udp_once(addr: str, port: int, ns: str, timeout: float) -> tuple[str, int]:
    """One datagram, one answer awaited: (backend, source port). Never resent: a lost datagram counts."""
    with ns_socket(addr, socket.SOCK_DGRAM, ns) as s:
        s.settimeout(timeout)
        s.connect((addr, port))
        sport = s.getsockname()[1]
        try:
            s.send(b"who")
            return s.recv(65536).decode(errors="replace").strip(), sport
        except OSError as exc:
            raise RequestFailed("answer", sport, exc) from exc


def conntrack_stats() -> dict[str, int]:
    """`conntrack -S` summed over CPUs (insert_failed: a new connection dropped because its reply
    tuple was taken; drop; clash_resolve; ...)."""
    out: dict[str, int] = {}
    for ln in sh("conntrack", "-S", check=False).splitlines():
        for k, v in re.findall(r"(\w+)=(\d+)", ln):
            if k != "cpu":
                out[k] = out.get(k, 0) + int(v)
    return out


def utc(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}"


@dataclass
class Req:
    """One request: when it started (monotonic, and wall clock to line up with the proxies' logs),
    how long it took, who answered or what failed, and its source port."""

    t: float
    wall: float
    took: float
    backend: str | None
    error: str | None
    sport: int = 0


@dataclass
class Loop:
    """One client loop in a thread: ask() again and again; every answer or failure kept. A failure
    is followed at once by a snapshot of what the kernel holds for its source port."""

    label: str
    ask: Callable[[], tuple[str, int]]
    interval: float = 0.1
    on_failure: Callable[[Loop, Req], None] | None = None
    results: list[Req] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"loop-{self.label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t, wall = time.monotonic(), time.time()
            try:
                backend, sport = self.ask()
                req = Req(t, wall, time.monotonic() - t, backend, None, sport)
            except Exception as exc:  # counted, never raised
                req = Req(t, wall, time.monotonic() - t, None, f"{type(exc).__name__}: {exc}",
                          getattr(exc, "sport", 0))
            self.results.append(req)
            if req.error and self.on_failure is not None:
                self.on_failure(self, req)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def since(self, t: float) -> list[Req]:
        return [r for r in self.results if r.t >= t]


class Traffic:
    """Loops against every Service; `window(name)` marks a step, `count(name)` closes it."""

    def __init__(self, clients: list[Client]) -> None:
        web, sticky, nodeport, dns = (c.ns for c in clients)
        self.clients = {"web": clients[0], "sticky": clients[1], "nodeport": clients[2], "dns": clients[3]}
        self.snapshots: list[dict[str, Any]] = []
        snap = self.snapshot
        self.loops = [
            Loop("web", lambda: tcp_ask(WEB, 80, web, 5), on_failure=snap),
            Loop("sticky", lambda: tcp_ask(STICKY, 80, sticky, 5), on_failure=snap),
            Loop("nodeport", lambda: tcp_ask(NODE_IP, NODE_PORT, nodeport, 5), on_failure=snap),
            Loop("dns", lambda: udp_once(DNS, 53, dns, 3), interval=0.2, on_failure=snap),
        ]
        self.marks: dict[str, float] = {}
        self.ct_marks: dict[str, dict[str, int]] = {}

    def snapshot(self, loop: Loop, req: Req) -> None:
        """What IPVS and conntrack hold for the failed request's source port, right after it failed."""
        proto = "udp" if loop.label == "dns" else "tcp"
        src = f"{self.clients[loop.label].ipv4}:{req.sport}"
        out: dict[str, Any] = {"loop": loop.label, "started": utc(req.wall), "took_s": round(req.took, 2),
                               "error": req.error, "taken": utc(time.time())}
        out["ipvs_connections"] = [ln for ln in sh("ipvsadm", "-Lnc", check=False).splitlines() if src in ln]
        out["conntrack"] = sh("conntrack", "-L", "-p", proto, "--orig-port-src", str(req.sport),
                              check=False).splitlines() if req.sport else []
        out["ipvs_table"] = sh("ipvsadm", "-Ln", check=False).splitlines()
        out["conntrack_stats"] = conntrack_stats()
        self.snapshots.append(out)
        print(f"\nMIGRATE failure snapshot: {json.dumps(out, indent=1)}", flush=True)

    def window(self, name: str) -> None:
        self.marks[name] = time.monotonic()
        self.ct_marks[name] = conntrack_stats()

    def wait_requests(self, n: int = 3, timeout: float = 60.0) -> None:
        """Until every loop made n more requests (traffic really flows across what follows)."""
        targets = [len(lp.results) + n for lp in self.loops]
        deadline = time.monotonic() + timeout
        while any(len(lp.results) < t for lp, t in zip(self.loops, targets, strict=True)):
            if time.monotonic() > deadline:
                raise AssertionError("the client loops stalled")
            time.sleep(0.05)

    def count(self, name: str) -> dict[str, Any]:
        start = self.marks[name]
        per = {lp.label: lp.since(start) for lp in self.loops}
        failed = {k: [r for r in v if r.error] for k, v in per.items()}
        took = sorted(r.took for v in per.values() for r in v if not r.error)
        out = {"requests": sum(len(v) for v in per.values()), "failed": sum(len(v) for v in failed.values()),
               "per_loop": {k: [len(v), len(failed[k])] for k, v in per.items()},
               "seconds": round(time.monotonic() - start, 1),
               "answered_in_s": {"median": round(took[len(took) // 2], 3) if took else None,
                                 "max": round(took[-1], 3) if took else None},
               "sticky_backends": sorted({r.backend for r in per["sticky"] if r.backend}),
               "conntrack_counters": {k: v - self.ct_marks[name].get(k, 0) for k, v in conntrack_stats().items()
                                      if v != self.ct_marks[name].get(k, 0)},
               "failures": [f"{k} {utc(r.wall)} (+{r.t - T0:.1f}s) {r.error}" for k, v in failed.items() for r in v]}
        print(f"\nMIGRATE {name}: requests={out['requests']} failed={out['failed']} {out['per_loop']} "
              f"in {out['seconds']}s; answered in {out['answered_in_s']}")
        for f in out["failures"]:
            print(f"  failure: {f}")
        return out

    def stop(self) -> None:
        for lp in self.loops:
            lp.stop()


# ---- the two proxies --------------------------------------------------------------------------------

def kube_proxy_synced_at() -> float:
    """kube-proxy's last completed sync (epoch seconds, 0 before the first), from its /metrics."""
    try:
        with urllib.request.urlopen(f"http://{KP_METRICS}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    m = re.search(r"^kubeproxy_sync_proxy_rules_last_timestamp_seconds (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(pred: Callable[[], Any], what: str, timeout: float, proc: ChildProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if proc is not None and not proc.running:
            raise AssertionError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f"\n{proc.name} log:\n{proc.tail()}" if proc else ""))
        time.sleep(0.2)


# ---- objects ------------------------------------------------------------------------------------------

def service(name: str, ip: str, proto: str, port: int, target: int, *, node_port: int | None = None,
            affinity: int | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"name": "p", "port": port, "protocol": proto, "targetPort": target}
    spec: dict[str, Any] = {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": ip, "ports": [p]}
    if node_port:
        p["nodePort"] = node_port
    if affinity:
        spec |= {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": affinity}}}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def endpoint_slice(name: str, proto: str, port: int, backends: list[Backend]) -> dict[str, Any]:
    """As v1.20's controller writes it (discovery.k8s.io/v1beta1, topology): what both proxies read."""
    return {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-s", "namespace": NS, "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "p", "port": port, "protocol": proto}],
            "endpoints": [{"addresses": [b.ipv4], "conditions": {"ready": True},
                           "topology": {"kubernetes.io/hostname": NODE}} for b in backends]}


# ---- the module's lab -------------------------------------------------------------------------------------

@dataclass
class Mig:
    netlab: Netlab
    backends: list[Backend]
    clients: list[Client]
    cluster: Cluster
    workdir: Path
    kubeconfig: Path
    kube_proxy: ChildProcess
    agent: ChildProcess
    traffic: Traffic | None = None
    foreign: list[str] = field(default_factory=list)
    before: dict[str, str] = field(default_factory=dict)  # kube-proxy's virtual servers (ipvsadm -Sn)
    reals_before: list[str] = field(default_factory=list)
    steps_done: set[str] = field(default_factory=set)

    def start_kube_proxy(self) -> None:
        bin_dir = kubernetes_bin()
        self.kube_proxy.start([
            str(bin_dir / "kube-proxy"), "--kubeconfig", str(self.kubeconfig), "--proxy-mode=ipvs",
            "--ipvs-scheduler=lc", f"--hostname-override={NODE}", f"--nodeport-addresses={NODE_IP}/32",
            f"--healthz-bind-address={KP_HEALTHZ}", f"--metrics-bind-address={KP_METRICS}",
            "--conntrack-max-per-core=0",  # leave nf_conntrack_max alone
            # without it kube-proxy deletes every virtual server it does not own (cleanLegacyService)
            f"--ipvs-exclude-cidrs={FOREIGN}/32", "--v=2"])

    def start_agent(self) -> None:
        self.agent.start([
            IPVSPROXY, "--log-level", "debug", "run", "--kubeconfig", str(self.kubeconfig), "--node-name", NODE,
            "--scheduler", "lc",
            "--nodeport-addresses", f"{NODE_IP}/32", "--healthz-bind-address", AGENT_HEALTHZ,
            "--metrics-bind-address", "", "--state-dir", str(self.workdir / "state"),
            "--min-sync-period", "200ms"])

    def cli(self, *args: str) -> tuple[int, str, float]:
        """`ipvsproxy ARGS` as its own process, as an operator runs it: (exit, output, seconds)."""
        t = time.monotonic()
        res = subprocess.run([IPVSPROXY, *args], capture_output=True, text=True, timeout=900,
                             stdin=subprocess.DEVNULL)
        return res.returncode, res.stdout + res.stderr, time.monotonic() - t

    def cluster_args(self) -> list[str]:
        return ["--kubeconfig", str(self.kubeconfig), "--node-name", NODE, "--scheduler", "lc",
                "--nodeport-addresses", f"{NODE_IP}/32", "--state-dir", str(self.workdir / "state")]


# A separate process that notices when the VM stops running its processes (the host starves the
# emulated CPUs): it sleeps 0.1 s again and again and writes down every wake-up 0.5 s or more late.
HEARTBEAT = """
import sys, time
out = open(sys.argv[1], "a", buffering=1)
while True:
    t = time.monotonic()
    time.sleep(0.1)
    late = time.monotonic() - t - 0.1
    if late >= 0.5:
        w = time.time()
        out.write(time.strftime("%H:%M:%S", time.gmtime(w)) + ".%03d late %.2fs\\n" % (w % 1 * 1000, late))
"""


class Diagnostics:
    """What a failed request is explained with, kept in results/ (the VM's read-write folder): the
    proxies' logs, the heartbeat's stalls and, with MIGRATE_PCAP=1, a capture of the test's traffic."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stalls = workdir / "stalls.txt"
        self.stalls.touch()
        self.procs = [subprocess.Popen([sys.executable, "-S", "-c", HEARTBEAT, str(self.stalls)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)]
        self.pcap: Path | None = None
        if os.environ.get("MIGRATE_PCAP") and shutil.which("tcpdump"):
            self.pcap = workdir / "migrate.pcap"
            self.procs.append(subprocess.Popen(
                ["tcpdump", "-i", "any", "-nn", "-s", "200", "-U", "-w", str(self.pcap),
                 f"tcp port 80 or tcp port 8080 or tcp port {NODE_PORT} or udp port 53 or udp port 5353"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))

    def close(self, logs: list[Path]) -> None:
        for p in self.procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        results = ROOT / "results"
        if not results.is_dir():
            return
        for f in [*logs, self.stalls, *([self.pcap] if self.pcap else [])]:
            with contextlib.suppress(OSError):
                if f.exists():
                    shutil.copyfile(f, results / f"migrate-{f.name}")


def _need_tools() -> None:
    missing = [t for t in ("iptables", "iptables-save", "ipset", "conntrack", "etcd") if shutil.which(t) is None]
    bin_dir = kubernetes_bin()
    missing += [str(bin_dir / b) for b in ("kube-proxy", "kube-apiserver") if not (bin_dir / b).is_file()]
    if missing:
        msg = f"kube-proxy's IPVS mode needs {', '.join(missing)}: run scripts/setup.sh"
        if os.environ.get("IN_VM"):
            pytest.fail(msg)
        pytest.skip(msg)


def _remove_foreign() -> None:
    subprocess.run(["iptables", "-w", "5", "-D", "INPUT", *FOREIGN_RULE], capture_output=True)
    subprocess.run(["ipset", "destroy", FOREIGN_SET], capture_output=True)
    subprocess.run(["ipvsadm", "-D", "-t", f"{FOREIGN}:80"], capture_output=True)


@pytest.fixture(scope="module")
def mig(module_netlab: Netlab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mig]:
    _need_tools()
    sysctls = {k: Path("/proc/sys", k).read_text() for k in SYSCTLS if Path("/proc/sys", k).exists()}
    workdir = tmp_path_factory.mktemp("migrate")
    diag = Diagnostics(workdir)
    backends = module_netlab.backends(2)
    clients = module_netlab.clients(4)
    module_netlab.vips(NODE_IP, dev="mignode0")
    module_netlab.vips(FOREIGN)  # a foreign ipvsadm virtual server, there through every step
    sh("ipvsadm", "-A", "-t", f"{FOREIGN}:80", "-s", "wlc")
    sh("ipvsadm", "-a", "-t", f"{FOREIGN}:80", "-r", f"{backends[0].ipv4}:8080", "-m", "-w", "2")
    sh("iptables", "-w", "5", "-A", "INPUT", *FOREIGN_RULE)
    sh("ipset", "create", FOREIGN_SET, "hash:ip")
    t = time.monotonic()
    try:
        cluster = Cluster(extra_args=(f"--service-cluster-ip-range={SERVICE_RANGE}",), ready_timeout=600).start()
    except BaseException:
        diag.close([])
        _remove_foreign()
        raise
    FIGURES["apiserver_ready_s"] = round(time.monotonic() - t, 1)
    lab = Mig(module_netlab, backends, clients, cluster, workdir, cluster.write_kubeconfig(workdir / "kubeconfig"),
              ChildProcess("kube-proxy", workdir / "kube-proxy.log"), ChildProcess("ipvsproxy", workdir / "agent.log"))
    lab.foreign = save_lines(FOREIGN)
    try:
        c = cluster
        c.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
        c.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for svc, sl in (
            (service("web", WEB, "TCP", 80, 8080), endpoint_slice("web", "TCP", 8080, backends)),
            (service("sticky", STICKY, "TCP", 80, 8080, affinity=1800),
             endpoint_slice("sticky", "TCP", 8080, backends)),
            (service("np", NP, "TCP", 80, 8080, node_port=NODE_PORT), endpoint_slice("np", "TCP", 8080, backends)),
            (service("dns", DNS, "UDP", 53, 5353), endpoint_slice("dns", "UDP", 5353, backends)),
            (service("old", OLD, "TCP", 80, 8080), endpoint_slice("old", "TCP", 8080, backends)),
        ):
            c.request("POST", f"/api/v1/namespaces/{NS}/services", svc)
            c.request("POST", f"/apis/discovery.k8s.io/v1beta1/namespaces/{NS}/endpointslices", sl)
        yield lab
    finally:
        if lab.traffic:
            lab.traffic.stop()
        for p in (lab.agent, lab.kube_proxy):
            if p.running:
                p.term()
        FIGURES["stalls"] = diag.stalls.read_text().splitlines()
        if lab.traffic:
            FIGURES["failure_snapshots"] = lab.traffic.snapshots
        diag.close([lab.agent.log, lab.kube_proxy.log])
        print(f"\nMIGRATE figures: {json.dumps(FIGURES)}")
        with contextlib.suppress(OSError):
            (ROOT / "results").is_dir() and (ROOT / "results/migrate.json").write_text(
                json.dumps(FIGURES, indent=2) + "\n")
        # kube-proxy's own cleanup (flushes IPVS: nothing else of this VM boot is in it now), then ours
        subprocess.run([str(kubernetes_bin() / "kube-proxy"), "--cleanup", "--proxy-mode=ipvs"], capture_output=True)
        subprocess.run([IPVSPROXY, "cleanup"], capture_output=True)
        for table, chain in (("nat", "KUBE-MARK-MASQ"), ("nat", "KUBE-MARK-DROP")):
            subprocess.run(["iptables", "-w", "5", "-t", table, "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-w", "5", "-t", table, "-X", chain], capture_output=True)
        _remove_foreign()
        subprocess.run(["ip", "link", "del", "kube-ipvs0"], capture_output=True)
        for k, v in sysctls.items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", k).write_text(v)
        cluster.stop()


KEYS = {f"-t {WEB}:80", f"-t {STICKY}:80", f"-t {NP}:80", f"-t {NODE_IP}:{NODE_PORT}", f"-u {DNS}:53",
        "-t 198.18.112.1:443"}  # the last: the `kubernetes` Service (no endpoints: no controller runs)


def test_switch_from_kube_proxy(mig: Mig) -> None:
    mig.start_kube_proxy()
    wait_for(lambda: kube_proxy_synced_at() > 0 and KEYS | {f"-t {OLD}:80"} <= virtual_servers().keys(),
             "kube-proxy's first complete sync", 300, mig.kube_proxy)
    assert "Using ipvs Proxier" in mig.kube_proxy.log.read_text(), mig.kube_proxy.tail()
    with contextlib.suppress(OSError):  # what kube-proxy made, for the record (and the unit tests' fixture)
        (ROOT / "results").is_dir() and (ROOT / "results/migrate-kube-proxy-state.txt").write_text(
            sh("iptables-save") + "\n" + sh("ipset", "save") + "\n" + sh("ipvsadm", "-Sn"))
    mig.before = {k: v for k, v in virtual_servers().items() if k in KEYS}
    mig.reals_before = reals()
    assert all(v.startswith("-s lc") for v in mig.before.values()), mig.before
    assert "-p 1800" in mig.before[f"-t {STICKY}:80"]
    assert {WEB, STICKY, NP, DNS, OLD} <= addresses("kube-ipvs0")

    mig.traffic = tr = Traffic(mig.clients)
    tr.window("kube-proxy")
    tr.wait_requests(5)
    time.sleep(float(os.environ.get("MIGRATE_BASELINE_S", "0")))  # a longer look at kube-proxy alone, on demand
    FIGURES["kube_proxy_alone"] = tr.count("kube-proxy")
    assert FIGURES["kube_proxy_alone"]["failed"] == 0, "traffic through kube-proxy's table failed"

    # the leftovers command refuses while kube-proxy runs, and changes nothing
    state = (virtual_servers(), iptables_chains(), ipsets(), addresses("kube-ipvs0"))
    rc, out, _ = mig.cli("cleanup-kube-proxy", *mig.cluster_args())
    assert rc == 1 and "kube-proxy is still running on this node" in out, out
    assert "Traceback" not in out
    assert (virtual_servers(), iptables_chains(), ipsets(), addresses("kube-ipvs0")) == state

    tr.window("switch")
    TIMELINE["kube-proxy SIGTERM"] = utc(time.time())
    assert mig.kube_proxy.term() == -signal.SIGTERM  # no handler in 1.20: no cleanup either
    assert virtual_servers().keys() >= KEYS and link_exists("kube-ipvs0"), "kube-proxy cleaned up on SIGTERM"
    # deleted while no proxy runs: its virtual server and address are left for the cleanup step
    mig.cluster.request("DELETE", f"/api/v1/namespaces/{NS}/services/old")

    t_start = time.monotonic()
    TIMELINE["ipvsproxy run"] = utc(time.time())
    mig.start_agent()

    def owned() -> bool:
        vs = virtual_servers()
        return all("flag-3" in vs.get(k, "") for k in KEYS) and {WEB, STICKY, NP, DNS} <= addresses("ipvsproxy0")

    wait_for(owned, "ipvsproxy's table complete and owned", 900, mig.agent)
    took = time.monotonic() - t_start
    TIMELINE["ipvsproxy's table owned"] = utc(time.time())

    def first_sync_done() -> bool:  # its nftables transaction too; the took-over lines come before this one
        return re.search(r"INFO ipvsproxy.core: sync: ", mig.agent.log.read_text(errors="replace")) is not None

    # the IPVS part of the first sync lands before its nftables part (one run: 43 s before, under load)
    wait_for(first_sync_done, "the end of ipvsproxy's first sync", 300, mig.agent)
    took_sync = time.monotonic() - t_start
    TIMELINE["ipvsproxy's first sync done"] = utc(time.time())
    tr.wait_requests(5)
    switch = tr.count("switch")
    log = mig.agent.log.read_text(errors="replace")
    adopted = sorted(re.findall(r"took over foreign virtual server (\S+ \S+):", log))
    syncs = re.findall(r"INFO ipvsproxy.core: (sync: .*)", log)
    after = {k: v for k, v in virtual_servers().items() if k in KEYS}
    FIGURES["switch"] = switch | {"owned_after_s": round(took, 1), "first_sync_done_after_s": round(took_sync, 1),
                                  "adopted": adopted,
                                  "first_sync": syncs[0] if syncs else None,
                                  "changed": {k: [mig.before[k], after[k]] for k in KEYS if mig.before[k] != after[k]}}
    print(f"MIGRATE switch: table owned {took:.1f}s after `ipvsproxy run` started; adopted {adopted}; "
          f"first sync: {FIGURES['switch']['first_sync']}")
    assert len(adopted) == len(KEYS)
    # adoption edits in place: the same scheduler and persistence, our mark added; real servers untouched
    assert after == {k: f"{v} -b flag-3" for k, v in mig.before.items()}, after
    assert [r for r in reals() if OLD not in r] == [r for r in mig.reals_before if OLD not in r]
    assert f"-t {OLD}:80" in virtual_servers() and "flag-3" not in virtual_servers()[f"-t {OLD}:80"]
    assert save_lines(FOREIGN) == mig.foreign
    mig.steps_done.add("switch")  # the node is ipvsproxy's: the later steps can run whatever the count below
    assert len(switch["sticky_backends"]) == 1, f"session affinity broken: {switch['sticky_backends']}"
    assert switch["failed"] == 0, switch["failures"]


def test_cleanup_kube_proxy_leftovers(mig: Mig) -> None:
    assert "switch" in mig.steps_done, "needs the switch"
    assert mig.traffic is not None
    tr = mig.traffic
    before_chains, before_sets = iptables_chains(), ipsets()
    assert {"nat KUBE-SERVICES", "nat KUBE-POSTROUTING", "filter KUBE-FORWARD"} <= before_chains
    assert "KUBE-CLUSTER-IP" in before_sets
    tr.window("cleanup")
    TIMELINE["cleanup-kube-proxy"] = utc(time.time())
    rc, out, took = mig.cli("cleanup-kube-proxy", *mig.cluster_args())
    TIMELINE["cleanup-kube-proxy done"] = utc(time.time())
    tr.wait_requests(10)
    cleanup = tr.count("cleanup")
    FIGURES["cleanup"] = cleanup | {"command_s": round(took, 1), "output": out.strip().splitlines()[-1:]}
    print(f"MIGRATE cleanup: the command took {took:.1f}s:\n{out}")
    assert rc == 0, out
    assert not link_exists("kube-ipvs0")
    vs = virtual_servers()
    assert f"-t {OLD}:80" not in vs
    assert all("flag-3" in vs[k] for k in KEYS), vs  # ipvsproxy's table stays
    assert {WEB, STICKY, NP, DNS} <= addresses("ipvsproxy0")
    chains = iptables_chains()
    gone = {"nat KUBE-SERVICES", "nat KUBE-POSTROUTING", "nat KUBE-FIREWALL", "nat KUBE-NODE-PORT",
            "nat KUBE-LOAD-BALANCER", "filter KUBE-FORWARD"}
    assert not gone & chains, chains
    assert {"nat KUBE-MARK-MASQ", "nat KUBE-MARK-DROP"} <= chains  # the kubelet's too: kube-proxy leaves them
    assert "-j KUBE-" not in sh("iptables-save", "-t", "nat") + sh("iptables-save", "-t", "filter")
    assert " ".join(FOREIGN_RULE[:2]) in sh("iptables-save", "-t", "filter")
    assert not {s for s in ipsets() if s.startswith("KUBE-")}, ipsets()
    assert FOREIGN_SET in ipsets()
    assert save_lines(FOREIGN) == mig.foreign
    assert "table inet ipvsproxy" in sh("nft", "list", "tables")
    mig.steps_done.add("cleanup")
    assert len(cleanup["sticky_backends"]) == 1, cleanup["sticky_backends"]
    assert cleanup["failed"] == 0, cleanup["failures"]


def test_rollback_to_kube_proxy(mig: Mig) -> None:
    assert "cleanup" in mig.steps_done, "needs the cleanup"
    assert mig.traffic is not None
    tr = mig.traffic
    tr.window("rollback")
    TIMELINE["ipvsproxy SIGTERM"] = utc(time.time())
    FIGURES["agent_exit"] = mig.agent.term()
    t_start = time.time()
    TIMELINE["kube-proxy started again"] = utc(t_start)
    mig.start_kube_proxy()
    wait_for(lambda: kube_proxy_synced_at() > t_start, "kube-proxy's first sync after the rollback", 300,
             mig.kube_proxy)
    took = time.time() - t_start
    TIMELINE["kube-proxy synced"] = utc(time.time())
    vs = virtual_servers()
    tr.wait_requests(5)
    rollback = tr.count("rollback")
    # kube-proxy re-made kube-ipvs0 and its chains and sets; it rewrote the flags (drops our mark)
    assert {WEB, STICKY, NP, DNS} <= addresses("kube-ipvs0")
    assert "nat KUBE-SERVICES" in iptables_chains() and "KUBE-CLUSTER-IP" in ipsets()
    assert not any("flag-3" in vs[k] for k in KEYS), vs
    # then ipvsproxy's own leftovers: ipvsproxy0 and table inet ipvsproxy (it owns no virtual server now)
    tr.window("rollback-cleanup")
    TIMELINE["ipvsproxy cleanup"] = utc(time.time())
    rc, out, took_cleanup = mig.cli("cleanup")
    TIMELINE["ipvsproxy cleanup done"] = utc(time.time())
    tr.wait_requests(10)
    after_cleanup = tr.count("rollback-cleanup")
    FIGURES["rollback"] = rollback | {"kube_proxy_synced_after_s": round(took, 1), "cleanup": after_cleanup,
                                      "cleanup_output": out.strip(), "cleanup_s": round(took_cleanup, 1)}
    assert rc == 0, out
    assert "removed 0 virtual servers" in out, out
    assert not link_exists("ipvsproxy0")
    assert virtual_servers().keys() >= KEYS
    assert save_lines(FOREIGN) == mig.foreign
    assert rollback["failed"] == 0, rollback["failures"]
    assert after_cleanup["failed"] == 0, after_cleanup["failures"]
