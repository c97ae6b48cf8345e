"""`ipvsproxy bench`: the benchmark harness (docs/benchmarks.md).

Benchmark flags deliberately read no IPVSPROXY_* environment variables: an
agent's environment (IPVSPROXY_MIN_SYNC_PERIOD, ...) must not change what a
benchmark measures.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import click

from ..config import RESYNC_DEFAULT, RESYNC_MODES
from .options import Duration


def _sizes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        for part in filter(None, (p.strip() for p in v.split(","))):
            try:
                n = int(part.lower().replace("k", "000").replace("_", ""))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number (examples: 1000, 5k)") from None
            if n < 1:
                raise click.BadParameter(f"{part!r}: need at least one")
            out.append(n)
    return tuple(out) or (1000,)


def _formats(values: tuple[str, ...]) -> tuple[str, ...]:
    from ..bench.procstart import FORMATS

    out: list[str] = []
    for v in values:
        for part in filter(None, (p.strip().lower() for p in v.split(","))):
            if part not in FORMATS:
                raise click.BadParameter(f"{part!r}: one of {', '.join(FORMATS)}")
            out.append(part)
    return tuple(dict.fromkeys(out))


def _scenarios(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from ..bench.main import SCENARIOS

    chosen = set(values) or {"all"}
    if "all" in chosen:
        return SCENARIOS
    return tuple(s for s in SCENARIOS if s in chosen or s == "cold")  # everything starts from a cold start


@click.command()
@click.option("--scenario", "scenarios", multiple=True, callback=_scenarios,
              type=click.Choice(["cold", "steady", "churn", "restart", "all"]),
              help="Scenario to run (repeatable; default all). Every run starts with a cold start.")
@click.option("--services", multiple=True, callback=_sizes, metavar="N[,N...]",
              help="Cluster sizes in Services (repeatable or comma list; 5k = 5000).  [default: 1000]")
@click.option("--endpoints", default=10, show_default=True, type=click.IntRange(0, 1000),
              help="Endpoints per Service.")
@click.option("--dataplane", default="memory", show_default=True, type=click.Choice(["memory", "kernel"]),
              help="memory: control-plane cost on any host; kernel: end to end, needs root and IPVS "
                   "(the test VM: scripts/bench-vm.sh).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="With --dataplane kernel: also time `ipvsadm -R` (and `ip -batch`) of the identical table "
                   "and a naive pyroute2 loop, and report ratios to `ipvsadm -R`.")
@click.option("--nftables/--no-nftables", default=True, show_default=True,
              help="With --dataplane kernel: run the nftables companion with the real nft inside every sync, "
                   "as `ipvsproxy run` ships it, and report its share (firewall_ms).")
@click.option("--nft-cost", multiple=True, callback=lambda c, p, v: _sizes(c, p, v) if v else (), metavar="N[,N...]",
              help="Also measure the nftables companion alone with the real nft, in a private network "
                   "namespace, at these numbers of set elements (e.g. 1k,10k,50k): one change, one drift "
                   "check. Needs root, nft and unshare.")
@click.option("--process-start", "process_start", multiple=True, metavar="FORMAT[,FORMAT]",
              callback=lambda c, p, v: _formats(v),
              help="Also time `ipvsproxy run --from-file cluster.FORMAT --once` in a fresh process, exec to "
                   "the last object in the table, split into start-up, reading, control plane and kernel "
                   "(FORMAT: yaml, json, or api: listed from the in-process API stand-in of tests/apiserver.py).")
@click.option("--naive-objects", default=2000, show_default=True, type=click.IntRange(0),
              help="Objects (virtual + real servers) the naive pyroute2 loop programs; its per-object cost "
                   "is extrapolated to the whole table. The loop needs pyroute2 (pip install "
                   "'ipvsproxy[bench]'); 0 leaves it out.")
@click.option("--churn-steps", default=300, show_default=True, type=click.IntRange(0),
              help="Endpoint changes in the churn scenario, one sync each.")
@click.option("--churn-rate", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Also churn at this many changes per second through the agent's Runner (0 = off).")
@click.option("--churn-duration", default="5s", show_default=True, type=Duration(),
              help="How long the --churn-rate phase runs.")
@click.option("--min-sync-period", default="1s", show_default=True, type=Duration(),
              help="The Runner's --min-sync-period during the --churn-rate phase.")
@click.option("--resync", default=RESYNC_DEFAULT, show_default=True, type=click.Choice(RESYNC_MODES),
              help="The drift check during the --churn-rate phase, as `run --resync`.")
@click.option("--rss/--no-rss", default=None,
              help="Measure agent RSS in a fresh process after a cold start.  [default: on with memory]")
@click.option("--noise/--no-noise", default=True, show_default=True,
              help="Realistic metadata bulk (managedFields, last-applied-configuration) in the objects.")
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of the synthetic cluster.")
@click.option("--out", default="results/bench.json", show_default=True, type=click.Path(dir_okay=False),
              help="JSON result file (schema in docs/benchmarks.md).")
@click.option("--plot", default=None, type=click.Path(file_okay=False),
              help="Write PNG plots of cost against cluster size here (needs matplotlib: the `plot` extra).")
@click.option("--include", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Merge the runs of an earlier result file (repeatable), e.g. host + VM into one report.")
@click.option("--report-only", is_flag=True, help="Run nothing: merge --include files, judge targets, plot.")
@click.option("--profile", default=None, type=click.Path(file_okay=False),
              help="cProfile the cold start into this directory (memory dataplane).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr.  [default: when stderr is a terminal]")
def bench(report_only: bool, progress: bool | None, churn_duration: float, min_sync_period: float,
          **kw: Any) -> None:
    """Benchmark the agent on synthetic clusters: cold start, steady resync, churn, restart."""
    from ..bench import report
    from ..bench.main import Options, run

    opts = Options(**kw, churn_duration=churn_duration, min_sync_period=min_sync_period,
                   progress=sys.stderr.isatty() if progress is None else progress)
    if report_only:
        if not opts.include:
            raise click.UsageError("--report-only needs at least one --include FILE")
        opts.services = ()
    elif opts.dataplane == "kernel" and opts.naive_objects and importlib.util.find_spec("pyroute2") is None:
        raise click.UsageError("the naive reference loop needs pyroute2 (pip install 'ipvsproxy[bench]'), "
                               "or run with --naive-objects 0")
    doc = run(opts)
    click.echo(report.text_summary(doc))
    click.echo(f"results: {opts.out}" + (f"; plots: {', '.join(doc.get('plots') or [])}" if opts.plot else ""))
    if opts.plot and not doc.get("plots"):
        click.echo("bench: no plots written (install matplotlib: pip install 'ipvsproxy[plot]')", err=True)
    broken = invariant_failures(doc)
    if broken:
        for b in broken:
            click.echo(f"ipvsproxy: error: invariant broken: {b}", err=True)
        sys.exit(1)


def invariant_failures(doc: dict[str, Any]) -> list[str]:
    """Harness invariants (not performance targets): tables equal the desired state, no writes when idle."""
    out = []
    for r in doc.get("runs", []):
        if r.get("source"):
            continue  # included from an earlier file: judged when it was made
        where = f"{r['dataplane']} N={r['services']}"
        for name, sc in r.get("scenarios", {}).items():
            if sc.get("table_matches_desired") is False or sc.get("index_matches_translate") is False:
                out.append(f"{where} {name}: table differs from the desired state: {sc.get('problems')}")
        for name in ("steady", "restart"):
            ops = r.get("scenarios", {}).get(name, {}).get("write_ops")
            if ops:
                out.append(f"{where} {name}: {ops} write operations (expected none)")
        for fmt, ps in (r.get("process_start") or {}).items():
            if ps.get("error") or ps.get("failures"):
                out.append(f"{where} process start ({fmt}): {ps.get('error') or str(ps['failures']) + ' failures'}")
            if ps.get("table_matches_desired") is False:
                out.append(f"{where} process start ({fmt}): the kernel table differs from the desired state: "
                           f"{ps.get('table_problems')}")
            cold_ops = r.get("scenarios", {}).get("cold", {}).get("write_ops")
            if ps.get("write_ops") is not None and cold_ops is not None and ps["write_ops"] != cold_ops:
                out.append(f"{where} process start ({fmt}): {ps['write_ops']} write operations, the in-process "
                           f"cold start {cold_ops}")
        for name, ref in (r.get("references") or {}).items():
            if isinstance(ref, dict) and ref.get("table_matches_desired") is False:
                out.append(f"{where} reference {name}: the kernel table differs from the desired state")
    for size in (doc.get("nft_cost") or {}).get("sizes", []):
        where = f"nftables companion at {size['elements']} elements"
        if size.get("table_matches_desired") is False:
            out.append(f"{where}: the table differs from the desired state")
        if size.get("change_reads") or size.get("change_listings"):
            out.append(f"{where}: an incremental change read the table ({size['change_reads']} reads,"
                       f" {size['change_listings']} listings)")
    return out


if __name__ == "__main__":
    bench(prog_name="ipvsproxy bench")
