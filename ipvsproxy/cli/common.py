"""Building blocks the commands share: config from flags, opening a dataplane."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from ..config import AgentConfig, default_node_name
from ..dataplane.base import Dataplane, DataplaneError
from ..plan import Op
from ..schedulers import default_registry

if TYPE_CHECKING:
    from ..dataplane.nft import NftFirewall

log = logging.getLogger("ipvsproxy")


def make_config(**flags: Any) -> AgentConfig:
    """AgentConfig from the click parameters (names match the fields); settings
    that make no sense (AgentConfig.problems) are a usage error (exit 2)."""
    cfg = AgentConfig()
    for name, value in flags.items():
        if name == "node_name":
            value = value or default_node_name()
        if hasattr(cfg, name) and value is not None:
            setattr(cfg, name, tuple(value) if isinstance(value, list) else value)
    problems = cfg.problems(default_registry().names() if "scheduler" in flags else ())
    if problems:
        raise click.UsageError("; ".join(problems))
    return cfg


def open_dataplane(kind: str, cfg: AgentConfig, *, for_reading: bool = False,
                   real_counters: bool = False) -> Dataplane:
    """The kernel dataplane, or the in-memory one (dry runs on hosts without IPVS);
    `real_counters`: its whole-table reads carry every real server's traffic counters."""
    if kind == "memory":
        from ..dataplane.memory import MemoryDataplane

        return MemoryDataplane()
    from ..dataplane.netlink import NetlinkDataplane

    return NetlinkDataplane(cfg, read_only=for_reading, real_counters=real_counters)


def open_firewall(kind: str, cfg: AgentConfig) -> NftFirewall | None:
    """The nftables companion for the kernel dataplane, unless --no-nftables or nft is missing."""
    if kind != "kernel" or not cfg.nftables:
        return None
    from ..dataplane.nft import NftFirewall

    if shutil.which("nft") is None:
        log.warning("nftables companion off: the nft command is not installed (install nftables, "
                    "or pass --no-nftables); masquerade, hairpin and VIP filtering are not in place")
        return None
    return NftFirewall(cfg)


def open_for_plan(kind: str, cfg: AgentConfig) -> Dataplane:
    """For --dry-run and diff: the kernel if it has IPVS, else an empty table."""
    try:
        return open_dataplane(kind, cfg, for_reading=True)
    except DataplaneError as exc:
        if kind != "kernel":
            raise
        click.echo(f"ipvsproxy: warning: {exc}; planning against an empty table", err=True)
        return open_dataplane("memory", cfg)


def summarize(ops: Sequence[Op]) -> str:
    if not ops:
        return "no changes"
    counts = Counter(op.kind.value for op in ops)
    return f"{len(ops)} operations (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")"
