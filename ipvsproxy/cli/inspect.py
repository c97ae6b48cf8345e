"""`ipvsproxy list`, `diff` and `schedulers`: the kernel, in Service terms."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import click

from .. import view
from ..logfmt import escape
from ..model import join_host_port
from ..observe import records
from ..plan import Op, OpKind
from ..schedulers import default_registry
from . import common
from .common import make_config, summarize
from .options import opt, source_options, translate_options

FORMATS = click.Choice(["table", "wide", "json", "yaml"])


@click.command("list")
@click.argument("service", required=False)
@click.option("-n", "--namespace", default=None, help="Only Services in this namespace.")
@click.option("-o", "--output", "fmt", default="table", type=FORMATS, show_default=True, help="Output format.")
@click.option("--stats", is_flag=True, help="Add connection, packet and byte counters.")
@click.option("--rate", is_flag=True, help="Add connection, packet and byte rates (per second).")
@click.option("--no-foreign", is_flag=True, help="Hide virtual servers ipvsproxy does not own.")
@opt("state-dir", default="/run/ipvsproxy", help="Where the agent records Service names.")
@opt("interface", default="ipvsproxy0", help="The agent's dummy interface.")
@opt("dataplane", default="kernel", type=click.Choice(["kernel", "memory"]), hidden=True)
def list_cmd(service: str | None, namespace: str | None, fmt: str, stats: bool, rate: bool,
             no_foreign: bool, state_dir: str, interface: str, dataplane: str) -> None:
    """Virtual servers on this node, with the Service and pods behind each."""
    cfg = make_config(state_dir=state_dir, interface=interface)
    dp = common.open_dataplane(dataplane, cfg, for_reading=True, real_counters=stats or rate)
    try:
        observed = dp.observe()
    finally:
        dp.close()
    record = records.read(state_dir)
    doc = view.build(observed, record, node=record.node if record else "", namespace=namespace,
                     service=service, foreign=not no_foreign, stats=stats, rate=rate)
    if not doc["items"] and fmt in ("table", "wide"):
        click.echo("No virtual servers found" + (" matching the filter" if namespace or service else "") + ".",
                   err=True)
        return
    click.echo(view.render(doc, fmt, stats=stats, rate=rate))
    missing = view.unnamed(doc)
    if missing and fmt in ("table", "wide"):
        why = "no record" if record is None else "not in the record"
        click.echo(f"note: {missing} virtual server(s) owned by ipvsproxy cannot be named ({why} in "
                   f"{state_dir}; is the agent running on this node?)", err=True)


def _describe(op: Op) -> str:
    if op.kind is OpKind.BIND:
        return f"+ bind address {op.address}"
    if op.kind is OpKind.UNBIND:
        return f"- unbind address {op.address}"
    sign = {"add": "+", "del": "-", "edit": "~"}[op.kind.value.split("-")[0]]
    if op.real is not None:
        verb = {OpKind.ADD_RS: "add", OpKind.DEL_RS: "delete", OpKind.EDIT_RS: "set weight of"}[op.kind]
        extra = f" to {op.real.weight}" if op.kind is OpKind.EDIT_RS else ""
        note = f" ({op.note})" if op.note else ""
        real = join_host_port(op.real.address, op.real.port)
        return f"{sign} {verb} real server {real}{extra} on {op.key}{note}"
    verb = {OpKind.ADD_VS: "add", OpKind.EDIT_VS: "change", OpKind.DEL_VS: "delete"}[op.kind]
    sched = f" ({op.vs.scheduler})" if op.vs else ""
    note = f" [{op.note}]" if op.note else ""
    return f"{sign} {verb} virtual server {op.key}{sched}{note}"


@click.command()
@source_options
@translate_options
@click.option("-o", "--output", "fmt", default="text", type=click.Choice(["text", "json"]), show_default=True,
              help="text: grouped by Service; json: the operations as a document.")
@opt("dataplane", default="kernel", type=click.Choice(["kernel", "memory"]), hidden=True)
@click.pass_context
def diff(ctx: click.Context, /, fmt: str, dataplane: str, **flags: Any) -> None:
    """What a sync would change now. Exit 0: in sync; 1: differences; 2: trouble."""
    from ..agent import Agent  # only diff runs the agent: `list` starts without it (~0.1 s of imports)

    try:
        cfg = make_config(**flags)
        dp = common.open_for_plan(dataplane, cfg)
        report = Agent(cfg, dp, dry_run=True, record_state=False).once()
        dp.close()
    except Exception as exc:
        click.echo(f"ipvsproxy: error: {escape(str(exc))}", err=True)
        ctx.exit(2)
    ops = report.ops
    if fmt == "json":
        click.echo(json.dumps({"inSync": not ops, "operations": [
            {"op": op.kind.value, "service": str(op.service) if op.service else None,
             "virtualServer": str(op.key) if op.key else None,
             "real": f"{op.real.address}:{op.real.port}" if op.real else None,
             "weight": op.real.weight if op.real else None, "address": op.address, "note": op.note or None}
            for op in ops]}, indent=2))
    else:
        groups: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            groups[str(op.service) if op.service else ("addresses" if op.key is None else "(no Service)")].append(op)
        for name in sorted(groups):
            click.echo(escape(name))
            for op in groups[name]:
                click.echo(f"  {escape(_describe(op))}")
        click.echo(("in sync" if not ops else summarize(ops)), err=True)
    ctx.exit(1 if ops else 0)


@click.command()
@click.option("-o", "--output", "fmt", default="table", type=click.Choice(["table", "json"]), show_default=True,
              help="Output format.")
def schedulers(fmt: str) -> None:
    """The scheduler registry and whether this kernel has each module."""
    from ..dataplane.netlink import HOST_MODULES as mods

    rows = []
    for s in default_registry():
        state = ("loaded" if mods.loaded(s.module) else "built in" if mods.builtin(s.module)
                 else "available" if mods.available(s.module) else "missing")
        rows.append({"name": s.name, "module": s.module, "flags": list(s.flags), "kernel": state,
                     "source": "builtin" if s.builtin else "plugin", "description": s.description})
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = [["NAME", "MODULE", "FLAGS", "KERNEL", "SOURCE", "DESCRIPTION"]] + [
        [r["name"], r["module"], ",".join(r["flags"]) or "-", r["kernel"], r["source"], r["description"]]
        for r in rows]
    click.echo("\n".join(view._columns(table)))
    if all(r["kernel"] == "missing" for r in rows):
        click.echo("note: this kernel has no IPVS scheduler modules (is CONFIG_IP_VS set?)", err=True)
