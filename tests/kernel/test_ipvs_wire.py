"""Kernel tests for ipvsproxy.dataplane.ipvs_wire (run inside the IPVS test VM).

Needs root and the ip_vs, ip_vs_rr, ip_vs_sh modules loaded; `ipvsadm` is the
independent witness.  Every test flushes IPVS before and after: inside the VM
nothing else uses it.  IPVS_WIRE_BULK_N sets the bulk-load size (default 2000
services x 10 destinations); timings are printed, never asserted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ipvsproxy.dataplane.ipvs_wire import Cmd, Dest, IPVSError, IPVSWire, Request, Svc

pytestmark = pytest.mark.kernel

V4, V6 = socket.AF_INET, socket.AF_INET6
TCP, UDP, SCTP = 6, 17, 132
SCHED1, SCHED2, PERSISTENT = 0x8, 0x10, 0x1


def ipvsadm(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["ipvsadm", *args], input=stdin, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def wire() -> Iterator[IPVSWire]:
    if os.geteuid() != 0 or shutil.which("ipvsadm") is None:
        pytest.skip("needs root and ipvsadm (run inside the IPVS test VM)")
    with IPVSWire() as w:
        w.flush()
        try:
            yield w
        finally:
            w.flush()


def hostport(family: int, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == V6 else f"{addr}:{port}"


def saved_table() -> tuple[dict[tuple[str, str], dict[str, str]], set[tuple[str, ...]]]:
    """Parse `ipvsadm -Sn` into services {(proto-flag, vip): options} and dest tuples."""
    services: dict[tuple[str, str], dict[str, str]] = {}
    dests: set[tuple[str, ...]] = set()
    valued = {"-t", "-u", "--sctp-service", "-s", "-p", "-M", "-r", "-w", "-x", "-y", "-b",
              "pe"}
    for line in ipvsadm("-Sn").splitlines():
        tok = line.split()
        if not tok:
            continue
        opts: dict[str, str] = {}
        i = 1
        while i < len(tok):
            if tok[i] in valued and i + 1 < len(tok):
                opts[tok[i]] = tok[i + 1]
                i += 2
            else:
                opts[tok[i]] = ""
                i += 1
        proto = next(k for k in ("-t", "-u", "--sctp-service") if k in opts)
        if tok[0] == "-A":
            services[(proto, opts[proto])] = opts
        else:
            method = next((k for k in ("-m", "-g", "-i") if k in opts), "?")
            dests.add((proto, opts[proto], opts["-r"], method, opts.get("-w", "")))
    return services, dests


PFLAG = {TCP: "-t", UDP: "-u", SCTP: "--sctp-service"}

SERVICES = [
    Svc(V4, TCP, "198.18.0.1", 80),
    Svc(V4, UDP, "198.18.0.1", 53, "sh", SCHED1 | SCHED2),
    Svc(V4, SCTP, "198.18.0.2", 3868, "rr", PERSISTENT, 300),
    Svc(V4, TCP, "198.18.0.3", 443, "sh", PERSISTENT | SCHED1, 10800, 0xFFFFFF00),
    Svc(V6, TCP, "fd00::1", 80),
    Svc(V6, UDP, "fd00::1", 53, "sh", SCHED2, 0, 128),
    Svc(V6, SCTP, "fd00::2", 3868, "rr", PERSISTENT, 60, 64),
]


def dests_for(svc: Svc, n: int = 3) -> list[Dest]:
    if svc.family == V6:
        return [Dest(f"fd00:1::{k + 1}", 8000 + k, k + 1) for k in range(n)]
    return [Dest(f"198.19.0.{k + 1}", 8000 + k, k + 1) for k in range(n)]


def check_against_ipvsadm(expected: dict[Svc, list[Dest]]) -> None:
    services, dests = saved_table()
    assert len(services) == len(expected)
    want_dests: set[tuple[str, ...]] = set()
    for svc, ds in expected.items():
        opts = services[(PFLAG[svc.protocol], hostport(svc.family, svc.address, svc.port))]
        assert opts["-s"] == svc.scheduler
        if svc.flags & PERSISTENT:
            assert opts["-p"] == str(svc.timeout)
            if svc.family == V4 and svc.netmask != 0xFFFFFFFF:
                assert opts["-M"] == socket.inet_ntoa(svc.netmask.to_bytes(4, "big"))
            if svc.family == V6 and svc.netmask != 128:
                assert opts["-M"] == str(svc.netmask)
        else:
            assert "-p" not in opts
        bflags = set(opts.get("-b", "").split(",")) - {""}
        assert len(bflags) == bin(svc.flags & (SCHED1 | SCHED2)).count("1")
        for d in ds:
            want_dests.add((PFLAG[svc.protocol], hostport(svc.family, svc.address, svc.port),
                            hostport(svc.family, d.address, d.port), "-m", str(d.weight)))
    assert dests == want_dests


def test_info_and_config(wire: IPVSWire) -> None:
    version, tab = wire.info()
    assert version >= 0x010200 and tab > 0
    old = wire.get_config()
    try:
        wire.set_config(901, 121, 301)
        assert wire.get_config() == (901, 121, 301)
        wire.set_config(0, 0, 302)  # 0 leaves a timeout unchanged
        assert wire.get_config() == (901, 121, 302)
    finally:
        wire.set_config(*old)


@pytest.mark.parametrize("ack_all", [True, False])
def test_add_edit_delete_matches_ipvsadm(ack_all: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with IPVSWire(ack_all=ack_all) as wire:
        wire.flush()
        try:
            table = {svc: dests_for(svc) for svc in SERVICES}
            reqs = []
            for svc, ds in table.items():
                reqs.append(Request(Cmd.NEW_SERVICE, svc))
                reqs.extend(Request(Cmd.NEW_DEST, svc, d) for d in ds)
            assert wire.execute(reqs) == [None] * len(reqs)
            print("\n" + ipvsadm("-Sn"))
            check_against_ipvsadm(table)
            got = {e.svc: [d.dest for d in ds] for e, ds in wire.table()}
            assert got == {svc: ds[::-1] for svc, ds in table.items()}  # kernel: newest first

            # edit: weights, a scheduler change, drop a dest and a service
            s0, s5 = SERVICES[0], SERVICES[5]
            new_s0 = Svc(V4, TCP, "198.18.0.1", 80, "sh", SCHED1)
            edits = [Request(Cmd.SET_DEST, s0, Dest(d.address, d.port, 9)) for d in table[s0]]
            edits += [Request(Cmd.SET_SERVICE, new_s0),
                      Request(Cmd.DEL_DEST, s5, table[s5][1]),
                      Request(Cmd.SET_DEST, s5, Dest(table[s5][0].address, table[s5][0].port, 0)),
                      Request(Cmd.DEL_SERVICE, SERVICES[6])]
            assert wire.execute(edits) == [None] * len(edits)
            expected = dict(table)
            del expected[SERVICES[6]]
            del expected[s0]
            expected[new_s0] = [Dest(d.address, d.port, 9) for d in table[s0]]
            expected[s5] = [Dest(table[s5][0].address, table[s5][0].port, 0), table[s5][2]]
            check_against_ipvsadm(expected)
            addrs = {e.svc: sorted(d.dest.address for d in ds) for e, ds in wire.table()}
            assert addrs == {svc: sorted(d.address for d in ds) for svc, ds in expected.items()}
            weights = {(e.svc, d.dest.address): d.dest.weight for e, ds in wire.table() for d in ds}
            assert weights == {(s, d.address): d.weight for s, ds in expected.items() for d in ds}
            assert wire.dests(new_s0)[0].dest.weight == 9
            assert all(e.stats.conns == 0 for e in wire.services())
        finally:
            wire.flush()


@pytest.mark.parametrize("ack_all", [True, False])
def test_errors_map_to_their_request(ack_all: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with IPVSWire(ack_all=ack_all) as wire:
        wire.flush()
        try:
            a = Svc(V4, TCP, "198.18.1.1", 80)
            b = Svc(V4, TCP, "198.18.1.2", 80)
            c = Svc(V6, UDP, "fd00::7", 53)
            missing = Svc(V4, TCP, "198.18.1.9", 80)
            reqs = [
                Request(Cmd.NEW_SERVICE, a),
                Request(Cmd.NEW_SERVICE, b),
                Request(Cmd.NEW_SERVICE, a),  # duplicate
                Request(Cmd.NEW_SERVICE, c),
                Request(Cmd.NEW_DEST, missing, Dest("198.19.1.1", 80)),
                Request(Cmd.NEW_DEST, a, Dest("198.19.1.1", 80)),
                Request(Cmd.NEW_DEST, a, Dest("198.19.1.1", 80)),  # duplicate dest
                Request(Cmd.DEL_DEST, b, Dest("198.19.1.5", 80)),  # no such dest
                Request(Cmd.NEW_SERVICE, Svc(V4, TCP, "198.18.1.3", 80, "nosuchsched")),
                Request(Cmd.NEW_SERVICE, Svc(V6, TCP, "fd00::8", 80, netmask=0)),  # bad /0
                Request(Cmd.NEW_DEST, c, Dest("fd00::70", 53)),
            ]
            res = wire.execute(reqs)
            for r in res:
                print(r)
            codes = [r.errno if r else 0 for r in res]
            assert codes == [0, 0, errno.EEXIST, 0, errno.ESRCH, 0, errno.EEXIST, errno.ENOENT,
                             errno.ENOENT, errno.EINVAL, 0]
            assert all(r is None or r.request is q for r, q in zip(res, reqs, strict=True))
            assert "scheduler module missing?" in str(res[8])
            assert str(res[2]) == "add service TCP 198.18.1.1:80: File exists (already exists)"
            assert {e.svc for e in wire.services()} == {a, b, c}
            assert [d.dest for d in wire.dests(c)] == [Dest("fd00::70", 53)]
            assert wire.dests(missing) == []
        finally:
            wire.flush()


def test_flush_then_zero(wire: IPVSWire) -> None:
    svc = Svc(V4, TCP, "198.18.2.1", 80)
    assert wire.execute([Request(Cmd.NEW_SERVICE, svc)]) == [None]
    wire.zero()
    wire.flush()
    assert wire.services() == []
    with pytest.raises(IPVSError):  # a bad config value is refused and raised
        wire.set_config(-5 & 0xFFFFFFFF, 0, 0)


def bulk(n_svc: int, n_dest: int) -> tuple[list[Request], str]:
    reqs: list[Request] = []
    lines: list[str] = []
    for i in range(n_svc):
        vip = f"198.18.{i // 250}.{i % 250 + 1}"
        svc = Svc(V4, TCP, vip, 80)
        reqs.append(Request(Cmd.NEW_SERVICE, svc))
        lines.append(f"-A -t {vip}:80 -s rr")
        for k in range(n_dest):
            rip = f"10.{i // 250}.{i % 250}.{k + 1}"
            reqs.append(Request(Cmd.NEW_DEST, svc, Dest(rip, 8080)))
            lines.append(f"-a -t {vip}:80 -r {rip}:8080 -m -w 1")
    return reqs, "\n".join(lines) + "\n"


def netns_run(ns: str, *cmd: str, stdin: str | None = None) -> tuple[float, str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    t0 = time.perf_counter()
    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True,
                          text=True, env=env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    return elapsed, proc.stdout


def load_in_this_netns(n: int, ack_all: bool) -> dict[str, float]:
    """Bulk-load and dump with IPVSWire (run via `ip netns exec`, see __main__)."""
    reqs, _ = bulk(n, 10)
    with IPVSWire(ack_all=ack_all) as w:
        t0 = time.perf_counter()
        res = w.execute(reqs)
        t_load = time.perf_counter() - t0
        assert not any(res), [r for r in res if r][:3]
        c = w.counters
        sends, recvs = c.sendmsg_calls, c.recv_calls
        t0 = time.perf_counter()
        table = w.table()
        t_dump = time.perf_counter() - t0
        assert len(table) == n and all(len(ds) == 10 for _, ds in table)
    return {"load": t_load, "dump": t_dump, "sends": sends, "recvs": recvs}


def test_bulk_load_vs_ipvsadm_restore(wire: IPVSWire) -> None:
    """Each loader runs in a fresh network namespace (own IPVS table, empty dest trash)."""
    n = int(os.environ.get("IPVS_WIRE_BULK_N", "2000"))
    reqs, rules = bulk(n, 10)
    print(f"\nbulk load: {n} services x 10 destinations = {len(reqs)} objects")
    results: dict[str, float] = {}
    for k, label in enumerate(["wire ack_all=True", "ipvsadm -R", "wire ack_all=False"]):
        ns = f"ipvswire{k}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        # Without lo up a fresh netns has no local routing table and the kernel
        # refuses IPv4 real servers with EINVAL (inet_addr_type() check).
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        try:
            if label == "ipvsadm -R":
                results[label], _ = netns_run(ns, "ipvsadm", "-R", stdin=rules)
                t_save, saved = netns_run(ns, "ipvsadm", "-Sn")
                assert len(saved.splitlines()) == len(reqs)
                print(f"  ipvsadm -R {results[label]:.2f} s; ipvsadm -Sn dump {t_save:.2f} s")
            else:
                _, out = netns_run(ns, sys.executable, __file__, str(n), str(label.endswith("True")))
                r = json.loads(out)
                results[label] = r["load"]
                print(f"  {label}: load {r['load']:.2f} s ({r['sends']} sends, "
                      f"{r['recvs']} recvs); table() dump {r['dump']:.2f} s")
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=True)
    base = results["ipvsadm -R"]
    for label, t in results.items():
        print(f"  {label:20s} {t:7.2f} s  {t / base:.2f}x ipvsadm -R")


if __name__ == "__main__":
    print(json.dumps(load_in_this_netns(int(sys.argv[1]), sys.argv[2] == "True")))
