"""Agent memory: a fresh process holding the agent's state after a cold start.

`python -m ipvsproxy.bench.rss --services N --endpoints M [--mode full|paged]`
prints one JSON object. The child imports what the agent imports (the agent,
the API source and its client, the netlink codecs), builds an :class:`~ipvsproxy.agent.Agent`
on a dataplane that keeps no table (the kernel's copy is not the agent's
memory) and with the nftables companion (as `ipvsproxy run` has it by
default; a no-op `nft`), feeds it the cluster the way the Kubernetes source
does, runs the cold-start sync, and reads VmRSS/VmHWM from /proc/self/status.
The list responses come from a second process (`--serve`), standing in for
the API server: the synthetic cluster's own model is not agent memory (in
the probe's process it was ~15 MiB of the peak at 10,000 Services).

Modes: ``paged`` is what sources/kube.py does (since 2b57a27): pages of 500
objects (limit/continue), each decoded and upserted as it arrives; the
agent-RSS target is judged on it. ``full`` decodes each kind as one list
response (what the agent did before): kept to show what an unpaginated
list costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO


def status_mib() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    out["ru_maxrss"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _bodies(objects: Iterator[dict[str, Any]], page: int) -> Iterator[bytes]:
    """List response bodies as the API server sends them (page=0: one body)."""
    items: list[bytes] = []
    for obj in objects:
        items.append(json.dumps(obj, separators=(",", ":")).encode())
        if page and len(items) == page:
            yield b'{"kind":"List","metadata":{"continue":"x"},"items":[' + b",".join(items) + b"]}"
            items = []
    if items or not page:
        yield b'{"kind":"List","metadata":{},"items":[' + b",".join(items) + b"]}"


def _command(services: int, endpoints: int, seed: int, mode: str, noise: bool, *extra: str) -> list[str]:
    """This module run in a fresh interpreter for one cluster (the probe, or with --serve its source)."""
    return [sys.executable, "-m", "ipvsproxy.bench.rss", *extra, "--services", str(services), "--endpoints",
            str(endpoints), "--seed", str(seed), "--mode", mode] + ([] if noise else ["--no-noise"])


def serve(services: int, endpoints: int, seed: int, mode: str, noise: bool, out: BinaryIO) -> None:
    """Write the synthetic cluster's list responses as frames (``KIND LENGTH\\n`` + body;
    LENGTH -1 ends a kind's listing). Run in its own process: the generator's model of the
    cluster (~15 MiB at 10,000 Services) is not the agent's memory, as the API server's is not."""
    from .cluster import ClusterSpec, SyntheticCluster

    cluster = SyntheticCluster(ClusterSpec(services, endpoints, seed, noise))
    for kind, objects in cluster.listing():
        for body in _bodies(objects, 500 if mode == "paged" else 0):
            out.write(b"%s %d\n" % (kind.encode(), len(body)))
            out.write(body)
        out.write(b"%s -1\n" % kind.encode())
    out.flush()


def _frames(proc: subprocess.Popen[bytes]) -> Iterator[tuple[str, bytes | None]]:
    """(kind, body) per list response from a serving child; (kind, None) when a listing ends."""
    assert proc.stdout is not None
    while header := proc.stdout.readline():
        kind, length = header.decode().split()
        yield kind, (proc.stdout.read(int(length)) if int(length) >= 0 else None)


def measure(services: int, endpoints: int, seed: int, mode: str, noise: bool) -> dict[str, Any]:
    import ipvsproxy.agent as agent_mod
    import ipvsproxy.dataplane.netlink  # noqa: F401  (the netlink codecs, as the agent loads them)
    import ipvsproxy.sources.kube  # noqa: F401  (the API source and its own client, as the agent loads them)

    kube = "kubernetes" in sys.modules  # the official client: ~22 MiB, no longer imported since issue 18
    from ..config import AgentConfig
    from ..core import sync as core_sync
    from ..dataplane.nft import NftFirewall
    from ..tracker import object_key
    from .cluster import NODE_NAME
    from .dataplanes import Sink

    gc.collect()
    baseline = status_mib()
    cfg = AgentConfig(node_name=NODE_NAME, healthz_bind_address="", metrics_bind_address="")
    # The nftables companion, as `ipvsproxy run` wires it by default (--nftables): its element
    # counts are agent memory; its `nft` runner is a no-op (the kernel's table is not).
    # A transaction's text goes to nft in an in-memory file, outside the heap: its size is
    # reported beside the RSS (it is memory the pod's cgroup pays for while nft reads it).
    tx_bytes = [0]

    def no_nft(doc: dict[str, Any] | BinaryIO) -> dict[str, Any]:
        if not isinstance(doc, dict):
            tx_bytes[0] = max(tx_bytes[0], os.fstat(doc.fileno()).st_size)
        return {"nftables": []}

    no_nft.takes_file = True  # type: ignore[attr-defined]  # the document written as for the real nft
    firewall = NftFirewall(cfg, nft=no_nft) if cfg.nftables else None
    agent = agent_mod.Agent(cfg, Sink(), record_state=False, firewall=firewall)
    cmd = _command(services, endpoints, seed, mode, noise, "--serve")
    t0 = time.perf_counter()
    response_bytes = 0
    seen: set[tuple[str, str]] = set()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as server:
        for kind, body in _frames(server):
            if body is None:
                agent.tracker.finish_listing(kind, seen)
                seen = set()
                continue
            response_bytes += len(body)
            data = json.loads(body)
            del body
            for obj in data["items"]:  # filed page by page, as sources/kube.py lists
                seen.add(object_key(obj))
                agent.tracker.upsert(kind, obj)
            del data
    if server.returncode != 0:
        raise RuntimeError(f"the list server exited with status {server.returncode}")
    report = core_sync(agent.reconciler, True)  # the daemon's full sync (gcpause: collector paused, heap trimmed)
    elapsed = time.perf_counter() - t0
    write_ops = len(report.ops)
    del report  # the agent does not keep a sync's report (Runner drops it after on_report)
    gc.collect()
    after = status_mib()
    desired = agent.reconciler.index.state
    return {
        "services": services, "endpoints": endpoints, "mode": mode, "kubernetes_client_imported": kube,
        "baseline_mib": baseline["VmRSS"], "rss_mib": after["VmRSS"], "peak_mib": after["VmHWM"],
        "ru_maxrss_mib": after["ru_maxrss"], "agent_state_mib": round(after["VmRSS"] - baseline["VmRSS"], 1),
        "list_response_mb": round(response_bytes / 1e6, 1), "cold_start_s": round(elapsed, 3),
        "write_ops": write_ops, "virtual_servers": len(desired.services),
        "nft_transaction_mb": round(tx_bytes[0] / 1e6, 1),
        "real_servers": sum(len(vs.reals) for vs in desired.services.values()),
        "note": "the list responses come from a separate process; peak includes one response at a time",
    }


def run_child(services: int, endpoints: int, seed: int, mode: str, noise: bool,
              timeout: float = 1800) -> dict[str, Any]:
    """Run the probe in a fresh interpreter (so the number is the agent's, not the harness's)."""
    proc = subprocess.run(_command(services, endpoints, seed, mode, noise), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ipvsproxy.bench.rss", description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mode", choices=("full", "paged"), default="full")
    p.add_argument("--no-noise", action="store_true")
    p.add_argument("--serve", action="store_true", help="write the list responses instead (the probe's source)")
    a = p.parse_args(argv)
    if a.serve:
        serve(a.services, a.endpoints, a.seed, a.mode, not a.no_noise, sys.stdout.buffer)
        return
    print(json.dumps(measure(a.services, a.endpoints, a.seed, a.mode, not a.no_noise)))


if __name__ == "__main__":
    main()
