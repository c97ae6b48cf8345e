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
from collections.abc import Iterable
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


# What Linux accepts as an interface name (dev_valid_name): 1-15 bytes, no '/',
# ':' or whitespace, not '.' or '..'.
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")


def interface_name_problem(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name, or None."""
    if not _IFNAME.match(name) or name in (".", "..") or len(name.encode()) > 15:
        return (f"--interface {name!r} is not a valid interface name "
                "(1-15 characters, no '/', ':' or whitespace)")
    return None


def bind_address_problem(flag: str, value: str) -> str | None:
    """Why `value` is no host:port to listen on ('' = off), or None."""
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    bad = f"--{flag} {value!r} is not host:port (examples: 127.0.0.1:10256, [::1]:10256, '' for off)"
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return bad
    if host.startswith("[") or ":" in host:
        try:
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError(host)
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return bad
    return None


def default_node_name() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


RESYNC_DEFAULT = "rolling"
RESYNC_MODES = (RESYNC_DEFAULT, "full")


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
    # How the periodic drift check runs: "rolling" (a round begins every --sync-period and compares
    # a few virtual servers per sync, so changes never wait behind it) or "full" (one full sync
    # every --sync-period, as kube-proxy does).
    resync: str = RESYNC_DEFAULT
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    service_proxy_name: str = ""  # "": the Services without a service-proxy-name label
    healthz_bind_address: str = "127.0.0.1:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    tcp_timeout: float = 0.0
    tcpfin_timeout: float = 0.0
    udp_timeout: float = 0.0
    strict_arp: bool = False
    drain_grace_period: float = 30.0
    load_modules: bool = True
    metrics_stats_interval: float = 10.0  # reuse one IPVS reading for /metrics this long
    metrics_per_address: bool = False  # ipvsproxy_service_* per virtual server instead of per Service port
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

    def problems(self, schedulers: Iterable[str] = ()) -> list[str]:
        """Settings that make no sense together, as usage errors (empty when fine).

        A zero --sync-period re-syncs in a loop, and a zero --min-sync-period
        lets a burst (or a failing sync's retry, whose backoff is a multiple
        of it) spin the CPU; --scheduler is checked against `schedulers` (the
        registry's names) when they are given.
        """
        out: list[str] = []
        if self.sync_period <= 0:
            out.append("--sync-period must be greater than 0")
        if self.min_sync_period <= 0:
            out.append("--min-sync-period must be greater than 0 (it also paces retries after a failure)")
        elif self.sync_period > 0 and self.min_sync_period > self.sync_period:
            out.append(f"--min-sync-period ({self.min_sync_period:g}s) must not be longer than "
                       f"--sync-period ({self.sync_period:g}s)")
        if self.resync not in RESYNC_MODES:
            out.append(f"--resync must be one of {', '.join(RESYNC_MODES)}, not {self.resync!r}")
        for flag, value in (("tcp-timeout", self.tcp_timeout), ("tcpfin-timeout", self.tcpfin_timeout),
                            ("udp-timeout", self.udp_timeout)):
            if 0 < value < 1 or value != int(value):
                out.append(f"--{flag} must be 0 (leave the kernel's) or whole seconds, not {value:g}s")
        known = sorted(schedulers)
        if known and self.scheduler not in known:
            out.append(f"--scheduler {self.scheduler!r} is not a known scheduler (known: {', '.join(known)})")
        for problem in (interface_name_problem(self.interface),
                        bind_address_problem("healthz-bind-address", self.healthz_bind_address),
                        bind_address_problem("metrics-bind-address", self.metrics_bind_address)):
            if problem:
                out.append(problem)
        return out
