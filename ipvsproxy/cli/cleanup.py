"""`ipvsproxy cleanup`: remove everything ipvsproxy owns, and nothing else."""

from __future__ import annotations

import shutil

import click

from ..config import AgentConfig
from ..model import ObservedState
from ..plan import Op, OpKind
from . import common
from .common import make_config
from .options import CIDRs, opt


def cleanup_ops(observed: ObservedState, excluded: object = None) -> list[Op]:
    """Delete every owned virtual server and unbind every address on our interface."""
    ops = [Op(OpKind.DEL_VS, key) for key, vs in sorted(observed.services.items()) if vs.owned]
    return ops + [Op(OpKind.UNBIND, address=a) for a in sorted(observed.addresses)]


def _remove_nft_table(cfg: AgentConfig) -> bool:
    """Delete table inet ipvsproxy (only it); a host without nft has none to delete."""
    from ..dataplane.nft import NftError, NftFirewall

    if shutil.which("nft") is None:
        return False
    try:
        return NftFirewall(cfg).cleanup()
    except NftError as exc:
        click.echo(f"ipvsproxy: warning: could not delete table inet ipvsproxy: {exc}", err=True)
        return False


@click.command()
@opt("interface", default="ipvsproxy0",
     help="The agent's dummy interface (deleted at the end; anything but ipvsproxy's dummy is refused).")
@opt("exclude-cidrs", default="", type=CIDRs(), help="Virtual servers in these ranges are left alone.")
@opt("dataplane", default="kernel", type=click.Choice(["kernel", "memory"]), hidden=True)
def cleanup(interface: str, exclude_cidrs: tuple[object, ...], dataplane: str) -> None:
    """Remove ipvsproxy's virtual servers, addresses and dummy interface."""
    cfg = make_config(interface=interface, exclude_cidrs=exclude_cidrs, load_modules=False)
    dp = common.open_dataplane(dataplane, cfg)
    try:
        observed = dp.observe()
        ops = [op for op in cleanup_ops(observed) if op.key is None or not cfg.excluded(op.key.address)]
        failures = dp.apply(ops)
        removed = dp.remove_interface()
    finally:
        dp.close()
    table = _remove_nft_table(cfg) if dataplane == "kernel" else False
    for f in failures:
        click.echo(f"ipvsproxy: error: {f.message}", err=True)
    foreign = sum(1 for vs in observed.services.values() if not vs.owned)
    n_vs = sum(1 for op in ops if op.kind is OpKind.DEL_VS)
    click.echo(f"removed {n_vs} virtual servers, {len(ops) - n_vs} addresses"
               f"{', interface ' + interface if removed else ''}"
               f"{', table inet ipvsproxy' if table else ''}; left {foreign} foreign virtual servers")
    if failures:
        raise SystemExit(1)
