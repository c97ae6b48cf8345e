"""The CLI on the in-memory dataplane: list in every format and filter, diff's
exit codes, cleanup's ownership rules, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ipvsproxy import view
from ipvsproxy.cli import common
from ipvsproxy.cli.main import cli, register
from ipvsproxy.dataplane.memory import MemoryDataplane
from ipvsproxy.model import AF_INET, AF_INET6, ObservedReal, ObservedState, ObservedVS, VSKey
from ipvsproxy.observe import records
from ipvsproxy.plan import apply_op, plan
from ipvsproxy.schedulers import Registry
from ipvsproxy.sources.files import ManifestReader
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config, translate

EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")
FOREIGN = VSKey(AF_INET, 6, "198.18.99.1", 80)


register()


@pytest.fixture()
def programmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MemoryDataplane:
    """A memory dataplane holding the examples' table, a foreign VS, and a record."""
    tracker = Tracker("demo-node")
    ManifestReader([EXAMPLES]).load(tracker)
    desired, _ = translate(tracker.services.values(), [s for g in tracker.groups.values() for s in g],
                           tracker.node, Config("demo-node"), Registry())
    dp = MemoryDataplane()
    for op in plan(desired, dp.state):
        apply_op(dp.state, op)
    web = dp.state.services[VSKey(AF_INET, 6, "198.19.0.10", 80)]
    web.reals[("198.18.1.11", 8080)].active = 1234567
    web.reals[("198.18.1.12", 8080)].weight = 0  # draining
    web.stats = {"conns": 4321, "inpkts": 10, "outpkts": 9, "inbytes": 123456789, "outbytes": 5,
                 "cps": 2, "inpps": 3, "outpps": 4, "inbps": 5000, "outbps": 6}
    for r in web.reals.values():
        r.stats = dict(web.stats)
    dp.state.services[FOREIGN] = ObservedVS(FOREIGN, "wlc", 0, 0, {("198.18.99.2", 80): ObservedReal(
        "198.18.99.2", 80, 1, 1, 0)})
    records.write(str(tmp_path), records.from_desired(desired, "demo-node", tracker.endpoints_of))
    monkeypatch.setattr(common, "open_dataplane", lambda kind, cfg, **kw: dp)
    monkeypatch.setenv("IPVSPROXY_STATE_DIR", str(tmp_path))
    return dp


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_list_table_names_services_pods_and_states(programmed: MemoryDataplane) -> None:
    code, out, _ = run("list", "-o", "wide")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["SERVICE", "TYPE", "VIRTUAL"]
    web = [line for line in lines if "demo/web:http" in line][0]
    assert "ClusterIP" in web and "TCP 198.19.0.10:80" in web and "1.2M" in web and "Pod/web-0" in web
    assert any("draining" in line and "198.18.1.12:8080" in line for line in lines)
    assert any(line.startswith("(foreign)") for line in lines)
    assert any("demo/shop:http" in line and "NodePort" in line and "198.18.0.1:30080" in line for line in lines)


def test_list_filters_and_hides_foreign(programmed: MemoryDataplane) -> None:
    _, out, _ = run("list", "-n", "demo", "web", "-o", "json")
    doc = json.loads(out)
    assert {i["service"] for i in doc["items"]} == {"web"}
    _, out, _ = run("list", "-n", "other")
    assert "demo/" not in out
    _, out, _ = run("list", "--no-foreign", "-o", "json")
    assert all(i["owner"] == "ipvsproxy" for i in json.loads(out)["items"])


def test_list_json_yaml_stats_and_rates_are_exact(programmed: MemoryDataplane) -> None:
    _, out, _ = run("list", "web", "--stats", "--rate", "-o", "json")
    item = json.loads(out)["items"][0]
    assert item["stats"]["conns"] == 4321 and item["stats"]["inbytes"] == 123456789
    assert item["rates"]["inbps"] == 5000
    assert item["realServers"][0]["activeConns"] == 1234567
    assert item["realServers"][0]["target"] == "Pod/web-0" and item["realServers"][0]["node"] == "demo-node"
    _, out, _ = run("list", "web", "-o", "yaml")
    assert yaml.safe_load(out)["items"][0]["scheduler"] == "rr"
    _, out, _ = run("list", "web", "--stats")
    assert "117.7Mi" in out  # human-readable bytes in table mode


def test_list_reads_real_server_counters_only_to_show_them(programmed: MemoryDataplane,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []

    def opened(kind: str, cfg: object, for_reading: bool = False, real_counters: bool = False) -> MemoryDataplane:
        asked.append(real_counters)
        return programmed

    monkeypatch.setattr(common, "open_dataplane", opened)
    for flags in ([], ["--stats"], ["--rate"], ["-o", "json"]):
        assert run("list", *flags)[0] == 0
    assert asked == [False, True, True, False]  # the kernel's real servers from /proc/net/ip_vs otherwise


def test_list_without_record_says_it_cannot_name(programmed: MemoryDataplane, tmp_path: Path) -> None:
    code, out, err = run("list", "--state-dir", str(tmp_path / "none"))
    assert code == 0 and "(unknown)" in out and "cannot be named" in err


def test_view_flags_and_human() -> None:
    assert view.human(999) == "999" and view.human(1500) == "1.5K" and view.human(2048, binary=True) == "2.0Ki"
    vs = ObservedVS(FOREIGN, "sh", 0x8 | 0x10 | 0x20, 0)
    assert view.flag_names(vs) == ["sh-fallback", "sh-port"]


def test_view_orders_by_numeric_address() -> None:
    key = VSKey(AF_INET, 6, "198.18.0.10", 80)
    reals = {(a, p): ObservedReal(a, p, 1) for a, p in
             (("198.18.1.10", 80), ("198.18.1.9", 8080), ("198.18.1.9", 443), ("198.18.1.100", 80))}
    state = ObservedState({k: ObservedVS(k, "rr", 0, 0, dict(reals) if k == key else {}) for k in (
        key, VSKey(AF_INET, 6, "198.18.0.9", 80), VSKey(AF_INET6, 6, "2001:2::1", 80))})
    doc = view.build(state, None)
    assert [i["address"] for i in doc["items"]] == ["198.18.0.9", "198.18.0.10", "2001:2::1"]
    assert [(r["address"], r["port"]) for r in doc["items"][1]["realServers"]] == [
        ("198.18.1.9", 443), ("198.18.1.9", 8080), ("198.18.1.10", 80), ("198.18.1.100", 80)]


def test_diff_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dp = MemoryDataplane()
    monkeypatch.setattr(common, "open_dataplane", lambda kind, cfg, **kw: dp)
    code, out, _ = run("diff", "--from-file", EXAMPLES, "--node-name", "demo-node")
    assert code == 1 and "demo/web:http" in out and "+ add virtual server TCP 198.19.0.10:80" in out
    code, out, _ = run("diff", "--from-file", EXAMPLES, "--node-name", "demo-node", "-o", "json")
    assert code == 1 and json.loads(out)["inSync"] is False
    # program it, then diff again: in sync
    code, _, _ = run("run", "--from-file", EXAMPLES, "--node-name", "demo-node", "--once",
                     "--state-dir", str(tmp_path))
    assert code == 0
    code, out, _ = run("diff", "--from-file", EXAMPLES, "--node-name", "demo-node")
    assert code == 0 and out == ""


def test_dry_run_prints_plan_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    dp = MemoryDataplane()
    monkeypatch.setattr(common, "open_dataplane", lambda kind, cfg, **kw: dp)
    code, out, err = run("run", "--from-file", EXAMPLES, "--node-name", "demo-node", "--once", "--dry-run")
    assert code == 0 and "add-vs TCP 198.19.0.10:80 rr (demo/web:http)" in out
    assert "bind 198.19.0.10" in out and "dry run" in err
    assert dp.state.services == {}


def test_cleanup_removes_only_ours_and_is_idempotent(programmed: MemoryDataplane) -> None:
    programmed.interface = True
    code, out, _ = run("cleanup")
    assert code == 0 and "left 1 foreign" in out
    assert list(programmed.state.services) == [FOREIGN] and not programmed.state.addresses
    code, out, _ = run("cleanup")
    assert code == 0 and "removed 0 virtual servers" in out


def test_schedulers_lists_registry() -> None:
    code, out, _ = run("schedulers", "-o", "json")
    rows = json.loads(out)
    assert code == 0 and {r["name"] for r in rows} >= {"rr", "lc", "sh", "mh", "ovf"}
    assert next(r for r in rows if r["name"] == "sh")["flags"] == ["sh-fallback", "sh-port"]


def test_errors_are_one_line_with_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipvsproxy.dataplane.base import DataplaneError

    def boom(kind: str, cfg: object, for_reading: bool = False) -> MemoryDataplane:
        raise DataplaneError("IPVS is not available: the kernel has no ip_vs module (CONFIG_IP_VS); "
                             "ipvsproxy needs a kernel with IPVS")

    monkeypatch.setattr(common, "open_dataplane", boom)
    r = CliRunner().invoke(cli, ["run", "--from-file", EXAMPLES, "--once"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        "ipvsproxy: error: IPVS is not available: the kernel has no ip_vs module (CONFIG_IP_VS); "
        "ipvsproxy needs a kernel with IPVS"]
    r = CliRunner().invoke(cli, ["run", "--sync-period", "soon"])
    assert r.exit_code == 2 and "invalid duration" in r.stderr
    r = CliRunner().invoke(cli, ["run", "--exclude-cidrs", "10.0.0.0/33"])
    assert r.exit_code == 2 and "invalid CIDR" in r.stderr
    for extra in ([], ["--once", "--dry-run"]):  # --timings times one real sync: said, not ignored
        r = CliRunner().invoke(cli, ["run", "--from-file", EXAMPLES, "--timings", "t.json", *extra])
        assert r.exit_code == 2 and "--timings needs --once" in r.stderr, r.stderr


def test_flags_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(kind: str, cfg: common.AgentConfig, for_reading: bool = False) -> MemoryDataplane:
        seen["cfg"] = cfg
        return MemoryDataplane()

    monkeypatch.setattr(common, "open_dataplane", fake)
    monkeypatch.setenv("IPVSPROXY_SCHEDULER", "lc")
    monkeypatch.setenv("IPVSPROXY_SYNC_PERIOD", "1m")
    monkeypatch.setenv("IPVSPROXY_EXCLUDE_CIDRS", "10.0.0.0/8,fd00::/8")
    code, out, _ = run("run", "--from-file", EXAMPLES, "--node-name", "demo-node", "--once", "--dry-run")
    assert code == 0 and "add-vs TCP 198.19.0.10:80 lc" in out
    cfg = seen["cfg"]
    assert cfg.sync_period == 60 and len(cfg.exclude_cidrs) == 2 and cfg.excluded("10.1.2.3")


def test_configuration_reference_is_generated_and_current() -> None:
    from ipvsproxy.cli.reference import render

    committed = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert committed == render(), "run: python -m ipvsproxy.cli.reference > docs/configuration.md"


class RecordingFirewall:
    def __init__(self) -> None:
        self.synced: list[int] = []

    behind = False

    def sync(self, delta: dict[object, object], full: bool = False) -> int:
        self.synced.append(len(delta))
        return 7

    def check_step(self, budget: int) -> int:
        return 0


def test_run_once_keeps_the_firewall_in_step(monkeypatch: pytest.MonkeyPatch) -> None:
    dp, fw = MemoryDataplane(), RecordingFirewall()
    monkeypatch.setattr(common, "open_dataplane", lambda kind, cfg, **kw: dp)
    monkeypatch.setattr(common, "open_firewall", lambda kind, cfg: fw)
    code, _, err = run("run", "--from-file", EXAMPLES, "--node-name", "demo-node", "--once")
    assert code == 0 and "7 nftables changes" in err
    assert fw.synced == [len(dp.state.services)] and fw.synced[0] > 0


def test_open_firewall_honours_flags_and_a_missing_nft(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from ipvsproxy.config import AgentConfig
    from ipvsproxy.dataplane.nft import NftFirewall

    cfg = AgentConfig(node_name="n")
    monkeypatch.setattr(common.shutil, "which", lambda name: "/usr/sbin/nft")
    assert isinstance(common.open_firewall("kernel", cfg), NftFirewall)
    assert common.open_firewall("memory", cfg) is None
    assert common.open_firewall("kernel", AgentConfig(node_name="n", nftables=False)) is None
    monkeypatch.setattr(common.shutil, "which", lambda name: None)
    assert common.open_firewall("kernel", cfg) is None
    assert "nft command is not installed" in caplog.text


def test_run_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    monkeypatch.setattr(common, "open_dataplane", lambda kind, cfg, **kw: MemoryDataplane())
    monkeypatch.setattr(common, "open_firewall", lambda kind, cfg: seen.append(cfg))
    code, _, err = run("run", "--from-file", EXAMPLES, "--node-name", "demo-node", "--once",
                       "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56", "--masquerade-all", "--no-nftables")
    assert code == 0, err
    cfg = seen[0]
    assert [str(n) for n in cfg.cluster_cidrs] == ["10.244.0.0/16", "fd00:10:244::/56"]  # type: ignore[attr-defined]
    assert cfg.masquerade_all is True and cfg.nftables is False  # type: ignore[attr-defined]


def test_a_subcommand_imports_only_its_own_module() -> None:
    """`ipvsproxy run` loads run's module, not bench's, list's or cleanup-kube-proxy's (each
    is imported when named: a second of a start in the emulated test VM); help lists them all."""
    import subprocess
    import sys

    probe = ("import sys\nfrom ipvsproxy.cli.main import cli\n"
             "ctx = cli.make_context('ipvsproxy', ['run', '--help'], resilient_parsing=True)\n"
             "assert cli.get_command(ctx, 'run') is not None\n"
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('ipvsproxy.cli.'))))\n"
             "print(' '.join(cli.list_commands(ctx)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded, listed = out.splitlines()
    assert "ipvsproxy.cli.run" in loaded.split()
    assert not {"ipvsproxy.cli.bench", "ipvsproxy.cli.inspect", "ipvsproxy.cli.kubeproxy",
                "ipvsproxy.cli.cleanup"} & set(loaded.split())
    assert listed.split() == ["bench", "cleanup", "cleanup-kube-proxy", "diff", "list", "run", "schedulers"]


def test_list_starts_without_the_agent() -> None:
    """`ipvsproxy list` reads the kernel and the agent's record: it loads neither the agent nor its
    metrics and HTTP servers (~0.1 s of imports on the host, over a second in the emulated VM)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom ipvsproxy.cli.main import cli\n"
             "ctx = cli.make_context('ipvsproxy', ['list', '--help'], resilient_parsing=True)\n"
             "assert cli.get_command(ctx, 'list') is not None\n"
             "print(' '.join(sorted(sys.modules)))\n")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.split())
    assert "ipvsproxy.cli.inspect" in loaded
    assert not {"ipvsproxy.agent", "prometheus_client", "http.server"} & loaded
