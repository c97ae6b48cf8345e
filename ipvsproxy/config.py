"""The agent's settings, parsed and validated once, shared by every command.

The CLI fills this from flags and IPVSPROXY_* environment variables; the
agent, dataplanes and sources read it. Parsing helpers for durations and CIDR
lists live here so the Helm chart's schema and the CLI agree on the formats.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """'30s', '1m30s', '500ms', '2h' or a plain number of seconds -> seconds."""
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            n, unit = float(m.group(1)), m.group(2)
            value += n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"invalid duration {text!r} (examples: 30s, 1m, 500ms)") from None
    if value < 0:
        raise ValueError(f"invalid duration {text!r}: negative")
    return value


def parse_cidrs(values: str | list[str] | tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """'10.0.0.0/8,fd00::/8' (or a list of such) -> networks; raises ValueError."""
    items = [values] if isinstance(values, str) else list(values)
    out = []
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"invalid CIDR {part!r} (example: 10.96.0.0/12)") from None
    return tuple(out)


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


@dataclass(slots=True)
class AgentConfig:
    """Everything `ipvsproxy run` can be told."""

    node_name: str = field(default_factory=default_node_name)
    from_files: tuple[str, ...] = ()
    kubeconfig: str | None = None
    api_server: str | None = None  # https://HOST:PORT: the API server without the kubernetes Service
    endpoints_source: str = "auto"  # auto (API discovery), v1, v1beta1 or endpoints
    interface: str = "ipvsproxy0"
    scheduler: str = "rr"
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    healthz_bind_address: str = "127.0.0.1:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    tcp_timeout: float = 0.0
    tcpfin_timeout: float = 0.0
    udp_timeout: float = 0.0
    strict_arp: bool = False
    drain_grace_period: float = 30.0
    load_modules: bool = True
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    nftables: bool = True
    state_dir: str = "/run/ipvsproxy"

    def excluded(self, address: str) -> bool:
        """True when --exclude-cidrs covers the address (never touch it)."""
        if not self.exclude_cidrs:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip.version == n.version and ip in n for n in self.exclude_cidrs)
