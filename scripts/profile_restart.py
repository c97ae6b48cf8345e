"""Where restart adoption's time goes in the test VM: py-spy samples of the bench's restart.

    pip install --target /tmp/pyspy py-spy        # on the host, once (not a project dependency)
    VM_MEMORY=4G bash scripts/vm-run.sh -- \\
        "PY_SPY=/tmp/pyspy/bin/py-spy python scripts/profile_restart.py --services 10000"

Why a sampling profiler: cProfile's per-call cost under emulation inflates small functions
many times over, so a deterministic profile of the VM says little about where the wall time
goes (docs/benchmarks.md, "Restart adoption: less Python per Service"). py-spy reads the
interpreter's stacks from outside at --rate Hz and barely slows it.

Inside the VM: the bench's synthetic cluster programmed by a cold start (kernel dataplane,
nftables companion with the real `nft`), then `--runs` restart adoptions
(`bench.scenarios.restart`, as `ipvsproxy bench --scenario restart` runs it); the first is
not sampled (a control for py-spy's own cost), the others are. Then `ipvsadm -Sn` of the
same table, the yardstick of target 3, and the proc file's bytes read alone (the kernel's
share of that read). Written under results/: each sampled run's collapsed
stacks (`restart-N.txt`, py-spy's raw format) and `restart-profile.json` (each run's split,
the yardstick, and the sampled runs' time per phase and per leaf line, inside the timed
restart only: the bench's own check after it is left out).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Frames that mark a phase of the timed restart, in order of precedence: a sample belongs to the
# first phase whose frame is anywhere in its stack (so the companion's read and count come before
# its whole sync).
PHASES = (
    ("kernel table: /proc/net/ip_vs", "NetlinkDataplane._proc_reals"),
    ("kernel table: services dump", "IPVSWire.services"),
    ("kernel table: bound addresses", "NetlinkDataplane.bound_addresses"),
    ("companion: read", "NftFirewall._read"),
    ("companion: count", "NftFirewall._count"),
    ("companion: other", "NftFirewall.sync"),
    ("translate", "Reconciler.retranslate"),
    ("plan", "Reconciler._plan"),
    ("list (parse into the tracker)", "ingest"),
)


def phase_of(frames: list[str]) -> str:
    """The phase of one sampled stack (PHASES' precedence), "other" when none matches."""
    names = [f.split(" (", 1)[0] for f in frames]
    for label, marker in PHASES:
        if marker in names:
            return label
    return "other"


def summarize(path: Path, rate: int) -> dict[str, Any]:
    """Seconds per phase and the top leaf lines, over the samples inside first_sync."""
    phases: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "first_sync" not in stack:  # the bench's check after the restart is not timed
            continue
        frames = stack.split(";")
        phases[phase_of(frames)] += int(count)
        leaves[frames[-1]] += int(count)
    total = sum(phases.values())
    return {"sampled_s": round(total / rate, 2),
            "phases_s": {k: round(v / rate, 2) for k, v in phases.most_common()},
            "top_leaves": [[k, round(v / rate, 2)] for k, v in leaves.most_common(25)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="restarts; all but the first are sampled")
    ap.add_argument("--rate", type=int, default=40, help="py-spy samples per second")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not spy:
        print("profile_restart: py-spy not found (pip install --target /tmp/pyspy py-spy; PY_SPY=...)",
              file=sys.stderr)
        return 2

    from ipvsproxy.bench import kernel, scenarios
    from ipvsproxy.bench.cluster import ClusterSpec, SyntheticCluster
    from ipvsproxy.bench.dataplanes import open_instrumented
    from ipvsproxy.bench.scenarios import Context

    problem = kernel.kernel_problem()
    if problem:
        print(f"profile_restart: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    ctx = Context.build(SyntheticCluster(ClusterSpec(args.services, args.endpoints)))
    kernel.clean()
    dp, _ = open_instrumented(kernel.agent_config())
    result: dict[str, Any] = {"services": args.services, "endpoints": args.endpoints, "rate": args.rate,
                              "runs": []}
    try:
        cold, _agent = scenarios.cold(ctx, dp, kernel.open_firewall())
        result["cold_s"] = round(cold["wall_s"], 2)
        print(f"cold start {cold['wall_s']:.2f} s", flush=True)
        for i in range(args.runs):
            sampler = None
            stacks = out / f"restart-{i}.txt"
            if i:
                sampler = subprocess.Popen(
                    [spy, "record", "--pid", str(os.getpid()), "--rate", str(args.rate), "--format", "raw",
                     "--nonblocking", "--output", str(stacks)],
                    stdout=subprocess.DEVNULL, stderr=(out / f"py-spy-{i}.log").open("w"))
                time.sleep(3)  # attached before the restart begins
            dp2 = kernel.open_netlink()
            try:
                r = scenarios.restart(ctx, dp2, kernel.agent_firewall(True))
            finally:
                dp2.close()
            run = {k: r[k] for k in ("wall_s", "ingest_s", "sync_s", "control_plane_s", "firewall_s",
                                     "write_ops", "table_matches_desired")}
            run["observe_s"] = r["dataplane_split_s"]["observe"]
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)
                sampler.wait(120)
                if not stacks.exists():
                    print(f"profile_restart: py-spy wrote no samples (see {out}/py-spy-{i}.log)", file=sys.stderr)
                    return 1
                run["sampled"] = True
                run["profile"] = summarize(stacks, args.rate)
            result["runs"].append(run)
            print(f"restart {i}{' (sampled)' if sampler else ''}: {r['wall_s']:.2f} s (list {r['ingest_s']:.2f}, "
                  f"read {run['observe_s']:.2f}, control plane {r['control_plane_s']:.2f}, companion "
                  f"{r['firewall_s']:.2f}); table equal to the desired state: {r['table_matches_desired']}",
                  flush=True)
        t = time.perf_counter()  # the kernel's share of the proc read: the bytes alone, no parsing
        fd, size = os.open("/proc/net/ip_vs", os.O_RDONLY), 0
        try:
            while chunk := os.read(fd, 1 << 20):
                size += len(chunk)
        finally:
            os.close(fd)
        result["proc_bytes_s"], result["proc_bytes"] = round(time.perf_counter() - t, 2), size
        print(f"/proc/net/ip_vs read alone: {size} bytes in {result['proc_bytes_s']:.2f} s", flush=True)
        t = time.perf_counter()
        subprocess.run(["ipvsadm", "-Sn"], stdout=subprocess.DEVNULL, check=True)
        result["ipvsadm_save_s"] = round(time.perf_counter() - t, 2)
        print(f"ipvsadm -Sn {result['ipvsadm_save_s']:.2f} s", flush=True)
    finally:
        dp.close()
        kernel.open_firewall()  # leaves no table behind
        kernel.clean()
    (out / "restart-profile.json").write_text(json.dumps(result, indent=1) + "\n")
    for run in result["runs"]:
        if "profile" in run:
            print(json.dumps(run["profile"]["phases_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
