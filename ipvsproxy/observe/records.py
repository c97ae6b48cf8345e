"""What the agent records so `ipvsproxy list` can name Services offline.

The kernel knows addresses, not Services. After each sync that changed
something, the agent writes a small JSON file mapping every virtual server it
owns to its Service port and every real server to its endpoint (pod, node).
This file is only for display: ownership itself lives in the kernel (the
F_OWNED flag), so losing this file never makes the agent touch foreign state.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model import DesiredState, ServiceRef, VSKey

FILE = "services.json"


def key_text(key: VSKey) -> str:
    return f"{key.protocol}/{key.address}/{key.port}"


@dataclass(slots=True)
class Record:
    """Per virtual server: Service, and per real-server address: endpoint info."""

    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: float = 0.0
    node: str = ""

    def service_of(self, key: VSKey) -> ServiceRef | None:
        entry = self.services.get(key_text(key))
        if not entry:
            return None
        return ServiceRef(entry["namespace"], entry["name"], entry.get("port", ""), entry.get("kind", ""))

    def endpoint_of(self, key: VSKey, address: str) -> dict[str, str]:
        entry = self.services.get(key_text(key)) or {}
        return dict(entry.get("endpoints", {}).get(address, {}))


def from_desired(desired: DesiredState, node: str = "",
                 endpoints: Callable[[str], Iterable[tuple[str, str, str]]] = lambda service_id: ()) -> Record:
    """The record of a desired state. `endpoints` gives a Service's endpoints as (address,
    targetRef, node), e.g. ("10.1.0.9", "Pod/web-9", "node-2") (Tracker.endpoints_of): who
    stands behind a real server lives in the slices, not in the desired state (4 MiB at
    20,000 Services). One entry per endpoint, shared by the Service's virtual servers."""
    rec = Record(node=node)
    by_service: dict[str, dict[str, dict[str, str]]] = {}
    for key, vs in desired.services.items():
        if vs.service is None:
            continue
        sid = vs.service.service_id
        known = by_service.get(sid)
        if known is None:
            known = by_service[sid] = {a: {"target": t, "node": n} for a, t, n in endpoints(sid)}
        rec.services[key_text(key)] = {
            "namespace": vs.service.namespace,
            "name": vs.service.name,
            "port": vs.service.port_name,
            "kind": vs.service.kind,
            "endpoints": {r.address: known.get(r.address) or {"target": "", "node": ""} for r in vs.reals},
        }
    return rec


def write(state_dir: str, rec: Record) -> None:
    """Atomic write (rename), so readers never see half a file."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    rec.written = time.time()
    payload = {"node": rec.node, "written": rec.written, "services": rec.services}
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".services.")
    with os.fdopen(fd, "w") as f:
        # dumps, not dump: json.dump streams through the pure-Python encoder, 10x slower (7 s of
        # a 10,000-Service `run --once` on the development machine went to it)
        f.write(json.dumps(payload, separators=(",", ":")))
    os.replace(tmp, os.path.join(state_dir, FILE))


def read(state_dir: str) -> Record | None:
    try:
        with open(os.path.join(state_dir, FILE)) as f:
            data = json.load(f)
        services = dict(data.get("services", {}))
        return Record(services, float(data.get("written", 0)), str(data.get("node", "")))
    except (OSError, ValueError, AttributeError):
        return None
