"""The benchmark harness at small N: its invariants, not its numbers.

Operation counts follow from the table (a cold start writes every virtual
server, real server and address once; an idle resync and a restart write
nothing; one endpoint change writes at most one operation per virtual server
of that Service), and after every scenario the table equals the desired state.
"""

from __future__ import annotations

import io
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ipvsproxy.bench import references, report, scenarios
from ipvsproxy.bench.cluster import ClusterSpec, SyntheticCluster
from ipvsproxy.bench.dataplanes import Sink, Timed
from ipvsproxy.bench.main import Options, run
from ipvsproxy.bench.progress import Progress, percentile, summary
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, AF_INET6, F_OWNED, DesiredState, ObservedState, Real, VirtualServer, VSKey
from ipvsproxy.plan import Op, OpKind, apply_op
from ipvsproxy.tracker import Tracker

BENCH_NETS = [ipaddress.ip_network(n) for n in ("198.18.0.0/15", "2001:2::/48")]


def small(n: int = 60, m: int = 4, seed: int = 7) -> scenarios.Context:
    return scenarios.Context.build(SyntheticCluster(ClusterSpec(n, m, seed)))


def _ips(obj: Any) -> list[str]:
    """Every string in obj that parses as an IP address."""
    out: list[str] = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _ips(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _ips(v)
    elif isinstance(obj, str):
        try:
            ipaddress.ip_address(obj)
            out.append(obj)
        except ValueError:
            pass
    return out


# ---- the synthetic cluster ------------------------------------------------------------------
def test_cluster_is_deterministic_and_seeded() -> None:
    a, b = SyntheticCluster(ClusterSpec(40, 3, seed=5)), SyntheticCluster(ClusterSpec(40, 3, seed=5))
    assert list(a.iter_services()) == list(b.iter_services())
    assert list(a.iter_slices()) == list(b.iter_slices())
    c = SyntheticCluster(ClusterSpec(40, 3, seed=6))
    assert list(a.iter_services()) != list(c.iter_services())


def test_cluster_uses_only_benchmarking_addresses() -> None:
    cl = SyntheticCluster(ClusterSpec(300, 3, seed=2))
    ips = _ips(list(cl.iter_services()) + list(cl.iter_slices()) + [cl.node()])
    assert len(ips) > 1000
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        assert any(addr.version == n.version and addr in n for n in BENCH_NETS), ip


def test_cluster_has_the_mix_and_parses_cleanly() -> None:
    cl = SyntheticCluster(ClusterSpec(400, 2, seed=3))
    problems: list[str] = []
    tracker = Tracker("bench-node-0", on_problem=lambda *a: problems.append(a[3]))
    for kind, objects in cl.listing():
        tracker.replace(kind, objects)
    assert problems == []
    types = {s.type for s in cl.services}
    assert types == {"ClusterIP", "NodePort", "LoadBalancer", "Headless", "ExternalName"}
    assert {s.scheduler for s in cl.services} >= {None, "lc", "sh"}
    assert any(s.affinity is not None for s in cl.services) and any(s.dual for s in cl.services)
    assert {p.protocol for s in cl.services for p in s.ports} >= {"TCP", "UDP"}
    assert len(tracker.services) == 400


def test_node_ports_stay_unique_when_the_range_runs_out() -> None:
    cl = SyntheticCluster(ClusterSpec(14_000, 0, seed=1, noise=False))
    ports = [p.node_port for s in cl.services for p in s.ports if p.node_port]
    assert len(ports) == len(set(ports)) and max(ports) <= 32767


def test_churn_changes_endpoints() -> None:
    cl = SyntheticCluster(ClusterSpec(10, 3, seed=1))
    s = cl.churnable()[0]
    before = len(s.endpoints)
    assert len(cl.churn(s, "add")[0]["endpoints"]) == before + 1
    assert len(cl.churn(s, "remove")[0]["endpoints"]) == before
    with pytest.raises(ValueError):
        cl.churn(s, "explode")


def test_cluster_size_limits() -> None:
    with pytest.raises(ValueError, match="--services"):
        SyntheticCluster(ClusterSpec(0, 1))


# ---- scenarios on the in-memory dataplane ---------------------------------------------------
def test_cold_start_writes_every_object_once_and_matches_the_desired_state() -> None:
    ctx = small()
    dp = MemoryDataplane()
    res, agent = scenarios.cold(ctx, dp)
    t = res["table"]
    assert res["table_matches_desired"] and res["index_matches_translate"]
    assert res["ops"] == {"bind": t["addresses"], "add-vs": t["virtual_servers"], "add-rs": t["real_servers"]}
    assert res["write_ops"] == t["objects"] + t["addresses"] == dp.counters.messages
    assert res["services_translated"] == 60 and res["latency_s"]["count"] == 60
    assert len(dp.state.services) == t["virtual_servers"]
    assert res["control_plane_s"] <= res["sync_s"]


def test_steady_and_restart_write_nothing() -> None:
    ctx = small()
    dp = MemoryDataplane()
    _, agent = scenarios.cold(ctx, dp)
    st = scenarios.steady(ctx, agent)
    assert st["write_ops"] == 0 and st["relist"]["services_translated"] == 0
    assert st["full_resync"]["dumps"] == 1 and st["table_matches_desired"]
    rs = scenarios.restart(ctx, dp)
    assert rs["write_ops"] == 0 and rs["table_matches_desired"] and rs["services_translated"] == 60


def test_churn_costs_at_most_one_operation_per_virtual_server() -> None:
    ctx = small()
    _, agent = scenarios.cold(ctx, MemoryDataplane())
    res = scenarios.churn(ctx, agent, 60, seed=3)
    assert res["table_matches_desired"] and res["full_syncs"] == 0
    assert res["all"]["changes"] == 60
    one = res["single_endpoint_one_vs"]
    assert one["changes"] > 0 and one["write_ops"]["max"] <= 1
    assert res["single_endpoint"]["write_ops_per_virtual_server"]["max"] <= 1
    assert res["by_kind"]["scale"]["write_ops_per_virtual_server"]["max"] <= 3


def test_churn_at_a_rate_coalesces_through_the_runner() -> None:
    ctx = small(30, 3)
    _, agent = scenarios.cold(ctx, MemoryDataplane())
    res = scenarios.churn_rate(ctx, agent, rate=200, duration=0.2, min_period=0.05, seed=1)
    assert res["errors"] == 0 and res["table_matches_desired"]
    assert 1 <= res["syncs"] <= res["changes"] == 40
    assert res["latency_ms"]["count"] >= 1
    assert res["read_keys"] > 0 and res["read_keys_s"] >= 0  # removed TCP endpoints are read back (drain or not)
    slow = res["slowest_syncs"]  # where the slowest syncs' time went
    ms = [s["ms"] for s in slow]
    assert 1 <= len(slow) <= scenarios.SLOWEST and ms == sorted(ms, reverse=True)
    assert abs(ms[0] - res["sync_ms"]["max"]) < 0.1
    for s in slow:
        assert s["compute_ms"] + s["apply_ms"] + s["firewall_ms"] + s["check_ms"] <= s["ms"] + 0.4  # rounding


def test_timed_splits_and_sink_keeps_nothing() -> None:
    sink = Sink()
    timed = Timed(sink)
    key = VSKey(AF_INET, 6, "198.18.0.1", 80)
    ops = [Op(OpKind.ADD_VS, key, vs=VirtualServer(key)), Op(OpKind.ADD_RS, key, real=Real("198.19.0.1", 80))]
    assert timed.apply(ops) == [] and timed.counters.messages == 2
    assert timed.observe().services == {} and timed.observe_keys([key]) == {key: None}
    assert timed.read_keys == 1 and timed.total >= 0
    timed.reset()
    assert timed.total == 0 and timed.read_keys == 0


def test_table_problems_finds_each_kind_of_difference() -> None:
    key = VSKey(AF_INET, 6, "198.18.0.1", 80)
    vs = VirtualServer(key, reals=(Real("198.19.0.1", 80), Real("198.19.0.2", 80)))
    desired = DesiredState.of([vs], ["198.18.0.1"])
    observed = ObservedState()
    assert table_problem_count(desired, observed) == 2  # missing VS, missing address
    apply_op(observed, Op(OpKind.ADD_VS, key, vs=vs))
    apply_op(observed, Op(OpKind.ADD_RS, key, real=Real("198.19.0.1", 80)))
    observed.addresses.add("198.18.0.1")
    assert "real servers differ" in scenarios.table_problems(desired, observed)[0]
    apply_op(observed, Op(OpKind.ADD_RS, key, real=Real("198.19.0.2", 80)))
    assert scenarios.table_problems(desired, observed) == []
    other = VSKey(AF_INET, 17, "198.18.0.9", 53)
    apply_op(observed, Op(OpKind.ADD_VS, other, vs=VirtualServer(other, scheduler="lc")))
    assert scenarios.table_problems(desired, observed) == [f"unexpected virtual server {other}"]


def table_problem_count(desired: DesiredState, observed: ObservedState) -> int:
    return len(scenarios.table_problems(desired, observed))


# ---- references ---------------------------------------------------------------------------------
def test_ipvsadm_rules_encode_the_identical_table() -> None:
    k4 = VSKey(AF_INET, 6, "198.18.0.1", 80)
    k6 = VSKey(AF_INET6, 17, "2001:2:0:1::1", 53)
    ks = VSKey(AF_INET, 132, "198.18.0.2", 3868)
    desired = DesiredState.of([
        VirtualServer(k4, "sh", flags=0x10, timeout=3600, reals=(Real("198.19.0.1", 8080),)),
        VirtualServer(k6, reals=(Real("2001:2:0:2::1", 5353, 1),)),
        VirtualServer(ks, "lc"),
    ])
    text = references.ipvsadm_rules(desired)
    assert text.splitlines() == [
        "-A -t 198.18.0.1:80 -s sh -p 3600 -b flag-2,flag-3",
        "-a -t 198.18.0.1:80 -r 198.19.0.1:8080 -m -w 1",
        "-A --sctp-service 198.18.0.2:3868 -s lc -b flag-3",
        "-A -u [2001:2:0:1::1]:53 -s rr -b flag-3",
        "-a -u [2001:2:0:1::1]:53 -r [2001:2:0:2::1]:5353 -m -w 1",
    ]
    assert F_OWNED == 0x20  # flag-3 is the ownership mark ipvsproxy adopts on restart
    assert references.ip_batch(["198.18.0.1", "2001:2::1"], "ipvsbench0").splitlines() == [
        "address add 198.18.0.1/32 dev ipvsbench0", "address add 2001:2::1/128 dev ipvsbench0 nodad"]


def test_subset_stays_within_the_object_budget() -> None:
    ctx = small()
    _, agent = scenarios.cold(ctx, MemoryDataplane())
    part = references.subset(agent.rec.index.state, 100)
    n = sum(1 + len(vs.reals) for vs in part.services.values())
    assert 0 < n <= 100 and set(part.services) <= set(agent.rec.index.state.services)


# ---- report, progress, CLI ------------------------------------------------------------------------
def _run(n: int, dp: str, **sc: Any) -> dict[str, Any]:
    return {"services": n, "endpoints": 10, "dataplane": dp, "scenarios": sc}


def _churn(median: float, ops: int) -> dict[str, Any]:
    blk = {"changes": 5, "write_ops": {"max": ops}, "control_plane_ms": {"median": median}}
    return {"single_endpoint": blk, "single_endpoint_one_vs": blk}


def test_targets_are_judged_met_or_not() -> None:
    doc = {"runs": [
        _run(1000, "memory", churn=_churn(0.10, 1)),
        {**_run(10_000, "memory", churn=_churn(0.12, 1), steady={"write_ops": 0}),
         "rss": {"full": {"rss_mib": 180.0, "peak_mib": 300.0}}},
        _run(20_000, "memory", churn=_churn(0.5, 1)),
        {**_run(10_000, "kernel", steady={"write_ops": 0}), "ratios": {"cold_wall_to_ipvsadm": 1.7}},
    ]}
    t = {x["id"]: x for x in report.targets(doc)}
    assert t["cold-start-vs-ipvsadm"]["met"] is False and t["cold-start-vs-ipvsadm"]["measured"] == 1.7
    assert t["one-change-ops"]["met"] is True
    assert t["churn-independent-of-n"]["met"] is False  # 0.5 ms at 20k vs 0.1 ms at 1k
    assert t["steady-no-writes"]["met"] is True
    assert t["agent-rss"]["met"] is False
    assert all(x["met"] is None for x in report.targets({"runs": []}))
    # judged on the paged probe (how the agent lists) when the file has it
    doc["runs"][1]["rss"]["paged"] = {"rss_mib": 120.0, "peak_mib": 170.0}
    t = {x["id"]: x for x in report.targets(doc)}
    assert t["agent-rss"]["met"] is True and t["agent-rss"]["measured"]["judged_on"] == "paged"


def test_the_end_to_end_targets_are_judged_per_size_from_the_kernel_runs() -> None:
    def kernel(n: int, *, one_max: float, start: float, share: float, restart: float, rate: float = 0.0,
               p99: float = 0.0) -> dict[str, Any]:
        sc = {"churn": {"single_endpoint": {"sync_ms": {"median": 10.0, "max": one_max}}},
              "steady": {"full_resync": {"sync_s": 16.0, "cpu_s": 15.0, "dataplane_split_s": {"observe": 10.0}}},
              "restart": {"wall_s": restart, "dataplane_split_s": {"observe": 10.0}}}
        if rate:
            sc["churn_rate"] = {"rate_per_s": rate, "min_sync_period_s": 1.0, "latency_ms": {"p99": p99}}
        return {**_run(n, "kernel", **sc), "process_start": {"json": {"python_share": share}},
                "ratios": {"process_start_json_to_ipvsadm": start}}

    doc = {"runs": [kernel(1000, one_max=30.0, start=1.9, share=0.7, restart=27.0),
                    kernel(10_000, one_max=40.0, start=0.7, share=0.49, restart=19.0, rate=100, p99=1005.0),
                    {**_run(20_000, "memory"), "rss": {"paged": {"rss_mib": 143.5, "peak_mib": 177.1}}}]}
    t = {x["id"]: x for x in report.end_to_end_targets(doc)}
    assert t["e2e-one-change"]["met"] is True and t["e2e-one-change"]["measured"][1000]["max_ms"] == 30.0
    assert t["e2e-process-start"]["met"] is False  # 1.9x at 1,000; 0.7x at 10,000
    assert t["e2e-process-start"]["measured"] == {1000: {"json": 1.9}, 10_000: {"json": 0.7}}
    assert t["e2e-python-share"]["met"] is True and t["e2e-python-share"]["measured"] == 0.49
    assert t["e2e-resync-restart"]["met"] is False  # restart 2.7x the dump at 1,000
    assert t["e2e-resync-restart"]["measured"][10_000] == {"full_resync": 1.6, "restart": 1.9, "resync_cpu_share": 0.5,
                                                           "against": "the agent's own dump"}
    doc["runs"][1]["kernel_dump"] = {"wall_s": 9.5}  # `ipvsadm -Sn` timed in the run: the yardstick
    doc["runs"][0]["kernel_dump"] = {"wall_s": 14.0}
    t = {x["id"]: x for x in report.end_to_end_targets(doc)}
    assert t["e2e-resync-restart"]["measured"][10_000] == {"full_resync": 1.684, "restart": 2.0,
                                                           "resync_cpu_share": 0.5, "against": "ipvsadm -Sn"}
    assert t["e2e-resync-restart"]["met"] is True  # 1,000: 16 / 14 and 27 / 14 = 1.93x
    doc["runs"][1]["kernel_dump"] = {"wall_s": 9.4}
    assert {x["id"]: x for x in report.end_to_end_targets(doc)}["e2e-resync-restart"]["met"] is False  # 2.02x
    assert t["e2e-rss-20k"]["met"] is True and t["e2e-rss-20k"]["measured"]["peak_ratio"] == 1.234
    assert t["e2e-churn-p99"]["met"] is True and t["e2e-churn-p99"]["measured"]["limit_ms"] == 1010.0
    doc["runs"][1]["scenarios"]["churn"]["single_endpoint"]["sync_ms"]["max"] = 3100.0
    doc["runs"][1]["scenarios"]["churn_rate"]["latency_ms"]["p99"] = 18000.0
    t = {x["id"]: x for x in report.targets(doc)}  # judged with the others
    assert t["e2e-one-change"]["met"] is False and t["e2e-churn-p99"]["met"] is False
    assert all(x["met"] is None for x in report.end_to_end_targets({"runs": []}))


def test_progress_bar_and_statistics() -> None:
    out = io.StringIO()
    p = Progress(True, out)
    assert list(p.iterate(range(3000), "things", 3000)) == list(range(3000))
    p.note("phase")
    assert "things" in out.getvalue() and "100.0%" in out.getvalue() and "bench: phase" in out.getvalue()
    silent = io.StringIO()
    assert list(Progress(False, silent).iterate(range(3), "x", 3)) == [0, 1, 2] and silent.getvalue() == ""
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([], 99) is None
    assert summary([0.001, 0.003], 1000)["median"] == 2.0


def test_bench_command_writes_json_and_exits_zero(tmp_path: Path) -> None:
    from ipvsproxy.cli.bench import bench

    out = tmp_path / "b.json"
    r = CliRunner().invoke(bench, ["--services", "40", "--endpoints", "3", "--churn-steps", "20", "--no-rss",
                                   "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "ipvsproxy-bench/1" and doc["runs"][0]["services"] == 40
    assert set(doc["runs"][0]["scenarios"]) == {"cold", "steady", "restart", "churn"}
    assert "memory N=    40" in r.output
    again = tmp_path / "merged.json"
    r = CliRunner().invoke(bench, ["--report-only", "--include", str(out), "--out", str(again)])
    assert r.exit_code == 0, r.output
    assert json.loads(again.read_text())["runs"][0]["source"] == str(out)
    r = CliRunner().invoke(bench, ["--report-only"])
    assert r.exit_code == 2
    r = CliRunner().invoke(bench, ["--services", "lots"])
    assert r.exit_code == 2 and "not a number" in r.output


def test_the_naive_loop_without_pyroute2_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyroute2 is no runtime dependency (the `bench` extra): without it the kernel benchmark says
    what to install, or how to leave the loop out, before it builds anything."""
    import importlib.util

    from ipvsproxy.cli.bench import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyroute2" else real(name, *a))
    r = CliRunner().invoke(bench, ["--dataplane", "kernel", "--services", "40", "--out", str(tmp_path / "k.json")])
    assert r.exit_code == 2 and "ipvsproxy[bench]" in r.output and "--naive-objects 0" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "k.json").exists()


def test_scenario_selection_always_includes_the_cold_start(tmp_path: Path) -> None:
    doc = run(Options(scenarios=("cold", "steady"), services=(20,), endpoints=2, rss=False,
                      out=str(tmp_path / "x.json")))
    assert set(doc["runs"][0]["scenarios"]) == {"cold", "steady"}


def test_invariant_failures_are_reported() -> None:
    from ipvsproxy.cli.bench import invariant_failures

    doc = {"runs": [{**_run(10, "memory", cold={"table_matches_desired": False, "problems": ["x"]},
                             steady={"write_ops": 2}), "references": {"ipvsadm_restore":
                                                                       {"table_matches_desired": False}}}]}
    assert len(invariant_failures(doc)) == 3


def test_rss_probe_runs_in_a_fresh_process() -> None:
    from ipvsproxy.bench import rss

    res = rss.run_child(30, 2, 1, "paged", True, timeout=120)
    assert res["rss_mib"] > 10 and res["peak_mib"] >= res["rss_mib"] * 0.9
    assert res["write_ops"] > 0 and res["virtual_servers"] > 0


def test_nft_cost_results_are_judged_and_reported() -> None:
    from ipvsproxy.bench import report
    from ipvsproxy.cli.bench import invariant_failures

    one = {"elements": 1000, "one_endpoint_ms": {"median": 3.0, "max": 6.0}, "one_service_ms": {"median": 3.5},
           "change_reads": 0, "change_listings": 0, "drift_check_ms": {"median": 11.0}, "nft_list_table_s": 0.02,
           "table_matches_desired": True}
    doc: dict[str, Any] = {"runs": [], "nft_cost": {"sizes": [one]}}
    assert invariant_failures(doc) == []
    assert "at 1000 elements: one endpoint median 3.0 ms" in report.text_summary(doc)
    doc["nft_cost"]["sizes"] = [{**one, "change_reads": 1}, {**one, "table_matches_desired": False}]
    broken = invariant_failures(doc)
    assert len(broken) == 2 and "read the table" in broken[0] and "differs" in broken[1]
    doc["nft_cost"] = {"skipped": "nft is not installed"}
    assert "not measured: nft is not installed" in report.text_summary(doc)


def test_process_start_runs_the_real_command_and_splits_its_time(tmp_path: Path) -> None:
    """`bench --process-start`: `ipvsproxy run --once` in a fresh process writes what the in-process
    cold start writes, from YAML, from JSON and from the API stand-in, and its split adds up to its wall."""
    from ipvsproxy.cli.bench import bench, invariant_failures

    out = tmp_path / "p.json"
    r = CliRunner().invoke(bench, ["--services", "30", "--endpoints", "3", "--scenario", "cold", "--no-rss",
                                   "--process-start", "yaml,json,api", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    run_ = json.loads(out.read_text())["runs"][0]
    cold_ops = run_["scenarios"]["cold"]["write_ops"]
    for fmt in ("yaml", "json", "api"):
        ps = run_["process_start"][fmt]
        assert "error" not in ps, ps
        assert ps["write_ops"] == cold_ops > 0 and ps["failures"] == 0
        parts = ps["split_s"]
        assert ps["split_s"]["start"] >= ps["interpreter_s"] * 0.5 > 0
        assert abs(sum(parts.values()) - ps["wall_s"]) < 0.01 and ps["exit_s"] >= ps["wall_s"]
        assert 0 < ps["python_share"] <= 1
        assert f"process start ({fmt}" in r.output
    bad = {"runs": [{**run_, "process_start": {"json": {**run_["process_start"]["json"], "write_ops": 1}}}]}
    assert any("process start (json)" in b for b in invariant_failures(bad))
    r = CliRunner().invoke(bench, ["--process-start", "toml"])
    assert r.exit_code == 2 and "one of yaml, json, api" in r.output


def test_run_timings_flag_only_splits_a_once_run(tmp_path: Path) -> None:
    """The hidden --timings of `run --once` writes the steps; the sync is the ordinary one."""
    from ipvsproxy.cli.main import cli, register
    from tests.unit.factories import NODE, node, service, slice_

    register()
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        service("web"), slice_("web", ["10.1.0.1", "10.1.0.2"]), node(NODE)]}))
    t = tmp_path / "t.json"
    r = CliRunner().invoke(cli, ["run", "--from-file", str(f), "--once", "--dataplane", "memory", "--node-name",
                                 NODE, "--state-dir", str(tmp_path / "s"), "--timings", str(t)])
    assert r.exit_code == 0, r.output
    doc = json.loads(t.read_text())
    assert doc["write_ops"] >= 3 and doc["failures"] == 0
    assert {"read_s", "setup_s", "sync_s", "record_s", "dataplane_s"} <= set(doc)
    assert doc["entered_unix"] <= doc["once_unix"] <= doc["done_unix"]
