#!/usr/bin/env python3
"""Measure how `ipvsproxy run` (memory dataplane, its own process) copes with a faulty
API server: the in-repository stand-in (tests/apiserver.py) with one watch fault at a
time. The figures issue 15 item 4 compares with client-go's reflector:

  empty     watch requests per second while every Service watch ends at once, empty
  hang      seconds until a Service watch that hangs (200, then nothing) is replaced
  lengths   the timeoutSeconds the first watches ask for
  list      the first Service list's resourceVersion parameter (0: the watch cache)
  flood     the agent's RSS growth while a Service watch streams bytes with no newline
  sigterm   seconds from SIGTERM to exit while every request hangs

    .venv/bin/python scripts/watch-faults.py [--code DIR] [--only NAME,...] [--hang-limit SECONDS]

--code runs another checkout's ipvsproxy package (e.g. an export of the base commit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agentlab import ChildProcess  # noqa: E402
from tests.apiserver import FakeApiServer  # noqa: E402
from tests.unit.factories import node, service, slice_  # noqa: E402

SERVICES = "/api/v1/services"


class Agent(ChildProcess):
    """`ipvsproxy run` of the --code checkout on the memory dataplane, following `api`."""

    def __init__(self, api: FakeApiServer, code: str | None) -> None:
        self.dir = tempfile.mkdtemp(prefix="ipvsproxy-faults-")
        super().__init__("ipvsproxy", Path(self.dir) / "agent.log")
        self.start([sys.executable, "-c", "from ipvsproxy.cli.main import main; main()", "run", "--dataplane",
                    "memory", "--kubeconfig", api.write_kubeconfig(Path(self.dir) / "kubeconfig"), "--node-name",
                    "n1", "--healthz-bind-address", "", "--metrics-bind-address", "", "--state-dir",
                    self.dir + "/state", "--no-nftables"],
                   env=dict(os.environ, PYTHONPATH=code or str(ROOT)), cwd=self.dir)

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> float:
        """SIGTERM (SIGKILL after 120 s); the seconds it took to exit."""
        started = time.monotonic()
        self.term(120)
        return time.monotonic() - started


def populated() -> FakeApiServer:
    api = FakeApiServer().start()
    api.create(node("n1"))
    api.create(service("a", cluster_ip="10.96.0.1"))
    api.create(slice_("a", ["10.0.0.1"]))
    return api


def watches(api: FakeApiServer) -> list[dict[str, str]]:
    return [q for m, p, q in list(api.requests) if p == SERVICES and q.get("watch") == "true"]


def following(code: str | None, bookmarks: bool = True) -> tuple[FakeApiServer, Agent]:
    """A populated stand-in and an agent following it, once its three watches are open."""
    api = populated()
    if not bookmarks:
        api.set_bookmark_interval(0)
    agent = Agent(api, code)
    wait_for(lambda: api.open_watches() >= 3, 30)
    return api, agent


def wait_for(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", help="directory holding the ipvsproxy package to run (default: this checkout)")
    ap.add_argument("--only", default="empty,hang,lengths,list,flood,sigterm")
    ap.add_argument("--hang-limit", type=float, default=400.0, help="give up waiting for a hung watch after this")
    args = ap.parse_args()
    only = set(args.only.split(","))

    if only & {"empty", "lengths", "list"}:
        api = populated()
        agent = Agent(api, args.code)
        wait_for(lambda: len(watches(api)) >= 1, 30)
        if "lengths" in only:
            wait_for(lambda: api.open_watches() >= 3, 10)
            print(f"lengths: timeoutSeconds of the first watches: "
                  f"{sorted(int(q['timeoutSeconds']) for m, p, q in api.requests if q.get('watch') == 'true')}")
        if "list" in only:
            first = next(q for m, p, q in api.requests if p == SERVICES and q.get("watch") != "true")
            rv = first.get("resourceVersion", "(none: etcd quorum read)")
            print(f"list: first Service list resourceVersion={rv}")
        if "empty" in only:
            api.watch_fault("empty", SERVICES)
            api.drop_watches()
            time.sleep(1)
            before, t = len(watches(api)), time.monotonic()
            time.sleep(5)
            rate = (len(watches(api)) - before) / (time.monotonic() - t)
            print(f"empty: {rate:.1f} Service watch requests per second (over 5 s)")
        agent.stop()
        api.stop()

    if "hang" in only:
        api, agent = following(args.code, bookmarks=False)
        api.watch_fault("hang", SERVICES)
        api.drop_watches()
        wait_for(lambda: api.open_watches() >= 3, 30)
        before, t = len(watches(api)), time.monotonic()
        if wait_for(lambda: len(watches(api)) > before, args.hang_limit):
            print(f"hang: the hung Service watch was replaced after {time.monotonic() - t:.0f}s")
        else:
            print(f"hang: still hung after {args.hang_limit:.0f}s")
        api.clear_faults()
        agent.stop()
        api.stop()

    if "flood" in only:
        api, agent = following(args.code)
        time.sleep(1)
        start_rss = agent.rss_mib()
        api.watch_fault("flood", SERVICES)
        api.drop_watches()
        peak = start_rss
        t = time.monotonic()
        while time.monotonic() - t < 20 and agent.running:
            peak = max(peak, agent.rss_mib())
            time.sleep(0.2)
        print(f"flood: agent RSS {start_rss:.0f} MiB -> peak {peak:.0f} MiB in 20 s of a Service watch with no newline")
        api.clear_faults()
        api.drop_watches()
        agent.stop()
        api.stop()

    if "sigterm" in only:
        api, agent = following(args.code)
        api.delay(1000)  # every request from now on hangs
        sent = len(api.requests)
        api.drop_watches()
        wait_for(lambda: len(api.requests) >= sent + 3, 10)
        time.sleep(1)
        print(f"sigterm: exited {agent.stop():.1f}s after SIGTERM with every API request hanging")
        api.clear_faults()
        api.stop()


if __name__ == "__main__":
    main()
