"""Process start -> complete table: `ipvsproxy run --from-file FILE --once` as a user runs it.

The in-process cold start (scenarios.cold) starts its clock after the imports and
with the objects already decoded; a user's start pays for the interpreter, the
imports and reading the manifests too (issue 18). This runs the real command in a
fresh interpreter on the synthetic cluster written as one manifest file (YAML or
JSON, a `kind: List` as `kubectl get -o yaml|json` prints it) and times it from
just before `exec` to the last object in the table. The child's hidden `--timings`
flag reports when its `run` command was entered and how long each step of
`Agent.once` took, which splits the wall into:

- **start**: interpreter start-up + imports + flag parsing (exec -> `run` entered),
  of which `interpreter_s` is a bare `python -c pass`;
- **read**: reading and parsing the manifests into the tracker;
- **control plane**: translate + plan + bookkeeping (the sync minus the dataplane
  and the nftables companion);
- **requests** (kernel dataplane only): turning operations into netlink
  requests and results back into failures, Python work;
- **kernel** (or, in memory, the fake kernel): dataplane setup + the sync's
  dataplane time (the netlink exchanges, packing included, and dumps);
  **nftables**: the companion's first transaction.

Whatever runs after the last object (writing the state record for `ipvsproxy
list`, interpreter exit) is reported as `after_s`, not counted in the measure.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .cluster import NODE_NAME
from .scenarios import Context

FORMATS = ("yaml", "json", "api")  # manifest formats, or "api": listed from the in-process API stand-in


def write_manifest(ctx: Context, fmt: str, directory: Path) -> Path:
    """The whole synthetic cluster as one `kind: List` manifest (not timed)."""
    items = [obj for _, objects in ctx.listing for obj in objects]
    doc = {"apiVersion": "v1", "kind": "List", "items": items}
    path = directory / f"cluster.{fmt}"
    with path.open("w") as f:
        if fmt == "json":
            json.dump(doc, f)
        else:
            yaml.dump(doc, f, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))
    return path


def _bare_interpreter() -> float:
    t = time.time()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.time() - t


def command(source: list[str], timings: Path, state: Path, dataplane: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ipvsproxy", "--log-level", "warning", "run", *source, "--once",
            "--node-name", NODE_NAME, "--state-dir", str(state), "--healthz-bind-address", "",
            "--metrics-bind-address", "", "--dataplane", dataplane, "--timings", str(timings), *extra]


def measure(ctx: Context, fmt: str, dataplane: str, extra: list[str] | None = None) -> dict[str, Any]:
    """One `run --once` in a fresh process; the table is whatever the dataplane holds before
    (the caller empties the kernel first). `fmt` "api": the objects are served by the
    in-process API stand-in (tests/apiserver.py, the one the unit tests use; it needs the
    repository's tests/ on the path) and the child lists them with `--kubeconfig`, paged,
    as the agent does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPVSPROXY_")}  # flags only
    with tempfile.TemporaryDirectory(prefix="ipvsproxy-procstart-") as tmp, contextlib.ExitStack() as stack:
        d = Path(tmp)
        if fmt == "api":
            source = serve_api(ctx, d, stack)
            size = 0.0
        else:
            manifest = write_manifest(ctx, fmt, d)
            source, size = ["--from-file", str(manifest)], manifest.stat().st_size / 1e6
        timings = d / "timings.json"
        cmd = command(source, timings, d / "state", dataplane, extra or [])
        interpreter = _bare_interpreter()
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        exited = time.time() - t0
        out: dict[str, Any] = {"format": fmt, "dataplane": dataplane, "manifest_mb": round(size, 2),
                               "returncode": proc.returncode, "exit_s": round(exited, 4),
                               "interpreter_s": round(interpreter, 4)}
        if proc.returncode != 0 or not timings.exists():
            out["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return out
        t = json.loads(timings.read_text())
    return out | split(t, t0, exited)


def serve_api(ctx: Context, directory: Path, stack: contextlib.ExitStack) -> list[str]:
    """The cluster in the API stand-in (started on `stack`); the child's source flags."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.append(root)  # tests/ of this checkout
    try:  # imported by name: the stand-in is test code, not part of the package (nor of its type check)
        stand_in: Any = importlib.import_module("tests.apiserver")
    except ImportError as exc:
        raise RuntimeError(f"--process-start api needs the repository's tests/apiserver.py: {exc}") from None
    api = stack.enter_context(stand_in.FakeApiServer())
    for _, objects in ctx.listing:
        for obj in objects:
            api.create(obj)
    return ["--kubeconfig", api.write_kubeconfig(directory / "kubeconfig")]


def split(t: dict[str, Any], t0: float, exited: float) -> dict[str, Any]:
    """The child's timings (see module docstring) as seconds from exec.

    With the kernel dataplane the netlink codecs are timed too: then "kernel" is the setup,
    the dumps and the netlink exchanges (IPVS requests, address binds: packing included, as
    the issue counted them), and turning operations into requests and results back into
    failures is "requests", Python work like the control plane."""
    start = t["entered_unix"] - t0
    last = t["once_unix"] - t0 + t["read_s"] + t["setup_s"] + t["sync_s"]
    dataplane, firewall = t["dataplane_s"], t["firewall_s"]
    control = max(0.0, t["sync_s"] - dataplane - firewall)
    netlink = sum((t.get("netlink_split_s") or {}).values())
    requests = 0.0
    if netlink:
        parts = t.get("dataplane_split_s") or {}
        requests = max(0.0, parts.get("apply", dataplane) - netlink)
    kernel = t["setup_s"] + dataplane - requests
    parts_s = {"start": start, "read": t["read_s"], "control_plane": control, "requests": requests,
               "kernel": kernel, "nftables": firewall,
               "other": max(0.0, last - start - t["read_s"] - t["sync_s"] - t["setup_s"])}
    python = last - kernel - firewall
    return {
        "wall_s": round(last, 4),  # exec -> last object in the table
        "split_s": {k: round(v, 4) for k, v in parts_s.items()},
        "setup_s": round(t["setup_s"], 4),
        "after_s": round(exited - last, 4),  # state record for `list`, exit
        "netlink_split_s": t.get("netlink_split_s") or {},
        "dataplane_split_s": t.get("dataplane_split_s") or {},
        "write_ops": t["write_ops"], "failures": t["failures"], "firewall_changes": t["firewall_changes"],
        "python_share": round(python / last, 4) if last else None,  # of exec -> last object
    }
