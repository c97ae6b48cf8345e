"""What `ipvsproxy list` shows: the kernel's table in Service terms.

Pure: takes an observed table and the agent's record (Service names, pods)
and builds the documented JSON document (docs/list-output.md); the table
renderer formats that same document, so every output format agrees.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from .logfmt import escape
from .model import F_PERSISTENT, F_SCHED1, F_SCHED2, F_SCHED3, ObservedState, ObservedVS, Protocol, join_host_port
from .observe.records import Record

API_VERSION = "ipvsproxy.io/v1"
STATS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
RATES = ("cps", "inpps", "outpps", "inbps", "outbps")


def flag_names(vs: ObservedVS) -> list[str]:
    """Scheduler flags by name (sh-fallback...), as ipvsadm shows them."""
    out = []
    for bit, n in ((F_SCHED1, "fallback"), (F_SCHED2, "port")):
        if vs.flags & bit:
            out.append(f"{vs.scheduler}-{n}" if vs.scheduler in ("sh", "mh") else f"flag-{bit >> 3}")
    if vs.flags & F_SCHED3 and not vs.owned:
        out.append("flag-3")
    return out


def build(
    observed: ObservedState,
    record: Record | None,
    *,
    node: str = "",
    namespace: str | None = None,
    service: str | None = None,
    foreign: bool = True,
    stats: bool = False,
    rate: bool = False,
) -> dict[str, Any]:
    """The list document: one item per virtual server, real servers inside."""
    items = []
    for key in sorted(observed.services, key=lambda k: (k.family, ipaddress.ip_address(k.address), k.protocol, k.port)):
        vs = observed.services[key]
        ref = record.service_of(key) if (record and vs.owned) else None
        if not vs.owned and not foreign:
            continue
        if namespace is not None and (ref is None or ref.namespace != namespace):
            continue
        if service is not None and (ref is None or ref.name != service):
            continue
        item: dict[str, Any] = {
            "namespace": ref.namespace if ref else None,
            "service": ref.name if ref else None,
            "portName": ref.port_name if ref else None,
            "type": ref.kind if ref else None,
            "owner": "ipvsproxy" if vs.owned else "foreign",
            "protocol": Protocol.name_of(key.protocol) or str(key.protocol),
            "address": key.address,
            "port": key.port,
            "scheduler": vs.scheduler,
            "flags": flag_names(vs),
            "persistence": vs.timeout if vs.flags & F_PERSISTENT else 0,
        }
        if stats:
            item["stats"] = {k: int(vs.stats.get(k, 0)) for k in STATS}
        if rate:
            item["rates"] = {k: int(vs.stats.get(k, 0)) for k in RATES}
        reals = []
        for (addr, port), r in sorted(observed.services[key].reals.items(),
                                      key=lambda kv: (ipaddress.ip_address(kv[0][0]), kv[0][1])):
            ep = record.endpoint_of(key, addr) if (record and vs.owned) else {}
            real: dict[str, Any] = {
                "address": addr, "port": port, "weight": r.weight,
                "state": "active" if r.weight > 0 else "draining" if vs.owned else "quiescent",
                "activeConns": r.active, "inactiveConns": r.inactive,
                "target": ep.get("target") or None, "node": ep.get("node") or None,
            }
            if stats:
                real["stats"] = {k: int(r.stats.get(k, 0)) for k in STATS}
            if rate:
                real["rates"] = {k: int(r.stats.get(k, 0)) for k in RATES}
            reals.append(real)
        item["realServers"] = reals
        items.append(item)
    return {"apiVersion": API_VERSION, "kind": "VirtualServerList", "node": node or None, "items": items}


def human(n: int, binary: bool = False) -> str:
    """1234 -> 1.2K (or 1.2Ki for bytes); exact below 1000."""
    base, units = (1024.0, ("Ki", "Mi", "Gi", "Ti", "Pi")) if binary else (1000.0, ("K", "M", "G", "T", "P"))
    if n < base:
        return str(n)
    v = float(n)
    for unit in units:
        v /= base
        if v < base:
            return f"{v:.1f}{unit}"
    return f"{v:.1f}{units[-1]}"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    rows = [[escape(c) for c in r] for r in rows]  # a name holding a newline must not make a row of its own
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _name(item: dict[str, Any]) -> str:
    if item["owner"] == "foreign":
        return "(foreign)"
    if item["service"] is None:
        return "(unknown)"
    port = f":{item['portName']}" if item["portName"] else ""
    return f"{item['namespace']}/{item['service']}{port}"


def _vip(item: dict[str, Any]) -> str:
    return f"{item['protocol']} {join_host_port(item['address'], item['port'])}"


def table(doc: dict[str, Any], *, wide: bool = False, stats: bool = False, rate: bool = False) -> str:
    """kubectl-style aligned columns: one line per real server, grouped by virtual server."""
    head = ["SERVICE", "TYPE", "VIRTUAL SERVER", "SCHED", "FLAGS", "PERSIST", "BACKEND", "WEIGHT", "STATE",
            "ACTIVE", "INACTIVE"]
    if wide:
        head += ["POD", "NODE"]
    if stats:
        head += ["CONNS", "PKTS IN", "PKTS OUT", "BYTES IN", "BYTES OUT"]
    if rate:
        head += ["CPS", "PPS IN", "PPS OUT", "BPS IN", "BPS OUT"]
    rows = [head]
    for item in doc["items"]:
        vs_cols = [_name(item), item["type"] or "-", _vip(item), item["scheduler"],
                   ",".join(item["flags"]) or "-", f"{item['persistence']}s" if item["persistence"] else "-"]
        reals = item["realServers"] or [None]
        for i, r in enumerate(reals):
            row = vs_cols if i == 0 else [""] * len(vs_cols)
            if r is None:
                row = row + ["<none>", "", "", "", ""] + (["", ""] if wide else [])
            else:
                row = row + [join_host_port(r["address"], r["port"]), str(r["weight"]), r["state"],
                             human(r["activeConns"]), human(r["inactiveConns"])]
                if wide:
                    row += [r["target"] or "-", r["node"] or "-"]
            counters = r if r is not None else item  # a real server's own counters
            if stats:
                row += [human(counters["stats"][k], binary=k.endswith("bytes")) for k in STATS]
            if rate:
                row += [human(counters["rates"][k], binary=k.endswith("bps")) for k in RATES]
            rows.append(row)
    return "\n".join(_columns(rows))


def render(doc: dict[str, Any], fmt: str, *, stats: bool = False, rate: bool = False) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, sort_keys=False)
    if fmt == "yaml":
        import yaml  # only here: the agent imports this module and never prints YAML

        return yaml.safe_dump(doc, sort_keys=False).rstrip()
    return table(doc, wide=fmt == "wide", stats=stats, rate=rate)


def unnamed(doc: dict[str, Any]) -> int:
    return sum(1 for i in doc["items"] if i["owner"] == "ipvsproxy" and i["service"] is None)


