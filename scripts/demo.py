"""The demo, run inside the test VM: real pods-as-namespaces, real IPVS, real traffic.

Builds the network examples/ describes (node address 198.18.0.1, pods
198.18.1.11-13 and 2001:2::1:11-12 behind a bridge, clients in their own
namespaces on 198.18.2.0/24), runs `ipvsproxy run --from-file examples/
--once`, sends traffic through each scheduler, and prints the per-backend
distribution and `ipvsproxy list --stats`. All addresses are in the
benchmarking ranges; nothing leaves the VM.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PODS = {"web-0": ("198.18.1.11", "2001:2::1:11"), "web-1": ("198.18.1.12", "2001:2::1:12"),
        "web-2": ("198.18.1.13", None)}
CLIENTS = {"client-a": "198.18.2.11", "client-b": "198.18.2.12", "client-c": "198.18.2.13"}
SERVER = ROOT / "tests" / "kernel" / "servers.py"


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def veth(ns: str, bridge: str, v4: str, v6: str | None, gw4: str, gw6: str | None) -> None:
    host = f"v-{ns}"[:15]
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", host, "master", bridge, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
    sh("ip", "-n", ns, "route", "add", "default", "via", gw4)
    if v6 and gw6:
        sh("ip", "-n", ns, "addr", "add", f"{v6}/112", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", gw6)


def bridge(name: str, v4: str, v6: str | None = None) -> None:
    sh("ip", "link", "add", name, "type", "bridge")
    sh("ip", "addr", "add", v4, "dev", name)
    if v6:
        sh("ip", "addr", "add", v6, "dev", name, "nodad")
    sh("ip", "link", "set", name, "up")


def build_network() -> list[subprocess.Popen[bytes]]:
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        sh("sysctl", "-qw", f"{key}=1")
    sh("ip", "link", "add", "demo-node0", "type", "dummy")
    sh("ip", "addr", "add", "198.18.0.1/32", "dev", "demo-node0")
    sh("ip", "addr", "add", "2001:2::1/128", "dev", "demo-node0", "nodad")
    sh("ip", "link", "set", "demo-node0", "up")
    bridge("demo-pods", "198.18.1.1/24", "2001:2::1:1/112")
    bridge("demo-clients", "198.18.2.1/24")
    servers = []
    for pod, (v4, v6) in PODS.items():
        veth(pod, "demo-pods", v4, v6, "198.18.1.1", "2001:2::1:1")
        log = open(f"/tmp/demo-{pod}.log", "wb")  # never the VM's stdout (it would hold vng open)
        servers.append(subprocess.Popen(
            ["ip", "netns", "exec", pod, sys.executable, str(SERVER), "--name", pod, "--http", "8080",
             "--udp", "5353"], stdout=log, stderr=log, stdin=subprocess.DEVNULL))
    for client, v4 in CLIENTS.items():
        veth(client, "demo-clients", v4, None, "198.18.2.1", None)
    for v4, _ in PODS.values():
        wait_port(v4, 8080)
    return servers


def wait_port(addr: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"demo: backend {addr}:{port} did not start")


def http(addr: str, port: int, ns: str | None = None) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    cmd = ["curl", "-s", "--max-time", "5", f"http://{host}:{port}/"]
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or "(failed)"


def udp(addr: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(b"who", (addr, port))
        try:
            return s.recv(100).decode().strip()
        except OSError:
            return "(failed)"


def show(title: str, answers: list[str]) -> None:
    counts = collections.Counter(answers)
    dist = "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    print(f"  {title:<52} {dist}")


def main() -> int:
    servers = build_network()
    ipvsproxy = str(BIN / "ipvsproxy")
    try:
        print("== ipvsproxy run --from-file examples/ --once", flush=True)
        run = subprocess.run([ipvsproxy, "run", "--from-file", str(ROOT / "examples"), "--once",
                              "--node-name", "demo-node"], capture_output=True, text=True)
        print(run.stderr.strip())
        if run.returncode:
            return run.returncode
        print("\n== traffic (per-backend distribution)")
        show("rr   demo/web    198.19.0.10:80   x9", [http("198.19.0.10", 80) for _ in range(9)])
        show("lc   demo/web-lc 198.19.0.11:80   x9", [http("198.19.0.11", 80) for _ in range(9)])
        for c in CLIENTS:
            show(f"sh   demo/web-sh 198.19.0.12:80   x4 from {c}", [http("198.19.0.12", 80, c) for _ in range(4)])
        show("rr+affinity demo/sticky 198.19.0.13:80 x6", [http("198.19.0.13", 80) for _ in range(6)])
        show("udp  demo/dns    198.19.0.53:53   x6", [udp("198.19.0.53", 53) for _ in range(6)])
        show("ipv6 demo/web6   [2001:2::60]:80  x4", [http("2001:2::60", 80) for _ in range(4)])
        show("nodeport demo/shop 198.18.0.1:30080 x4", [http("198.18.0.1", 30080) for _ in range(4)])
        show("LB, traffic policy Local: demo/edge 198.18.200.1:443 x4",
             [http("198.18.200.1", 443) for _ in range(4)])
        print("\n== ipvsproxy list --stats", flush=True)
        listing = subprocess.run([ipvsproxy, "list", "--stats"], capture_output=True, text=True)
        print(listing.stdout + listing.stderr)
        return listing.returncode
    finally:
        for p in servers:
            p.terminate()
        subprocess.run([ipvsproxy, "cleanup"], capture_output=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
