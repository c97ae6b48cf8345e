"""The shipped examples/: every Service type translates to the virtual servers
its comments promise, and the CLI dry run prints the plan."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ipvsproxy.model import F_SCHED1, DesiredState
from ipvsproxy.schedulers import Registry
from ipvsproxy.sources.files import ManifestReader
from ipvsproxy.tracker import Tracker
from ipvsproxy.translate import Config, translate
from tests.unit.factories import SCTP, UDP, assert_family_consistent, key

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NODE = "demo-node"
NODE_V4, NODE_V6 = "198.18.0.1", "2001:2::1"


def _r(*last: int, port: int = 8080) -> set[tuple[str, int]]:
    return {(f"198.18.1.{n}", port) for n in last}


# Worked out by hand from the comments and objects in examples/*.yaml.
EXPECTED: dict[str, dict[tuple[str, int, int], set[tuple[str, int]]]] = {
    "demo/web": {("198.19.0.10", 80, 6): _r(11, 12, 13)},
    "demo/web-lc": {("198.19.0.11", 80, 6): _r(11, 12, 13)},
    "demo/web-sh": {("198.19.0.12", 80, 6): _r(11, 12, 13)},
    "demo/sticky": {("198.19.0.13", 80, 6): _r(11, 12)},
    "demo/dns": {("198.19.0.53", 53, UDP): _r(11, 12, port=5353), ("198.19.0.53", 53, 6): _r(11, 12)},
    # IPv4-only Services: no NodePort on the node's IPv6 address (docs/semantics.md rule 6)
    "demo/shop": {("198.19.0.30", 80, 6): _r(12, 13), (NODE_V4, 30080, 6): _r(12, 13)},
    "demo/edge": {("198.19.0.40", 443, 6): _r(12, 13), ("198.18.201.1", 443, 6): _r(12),
                  ("198.18.200.1", 443, 6): _r(12), (NODE_V4, 30443, 6): _r(12)},
    "demo/web6": {("198.19.0.60", 80, 6): _r(11), ("2001:2::60", 80, 6): {("2001:2::1:11", 8080),
                                                                          ("2001:2::1:12", 8080)}},
    "demo/legacy": {("198.19.0.70", 80, 6): _r(11, 12)},
    "demo/node-cache": {("198.19.0.80", 80, 6): _r(12)},
    "demo/zonal": {("198.19.0.90", 80, 6): _r(11)},
    "demo/signalling": {("198.19.0.100", 3868, SCTP): _r(11, port=3868)},
    "demo/rolling": {("198.19.0.110", 80, 6): _r(11)},
    "demo/empty": {("198.19.0.120", 80, 6): set()},
}


@pytest.fixture(scope="module")
def translated() -> tuple[DesiredState, list[str], Tracker]:
    tracker = Tracker(NODE)
    problems = ManifestReader([str(EXAMPLES)]).load(tracker)
    assert problems == []
    slices = [s for sid in tracker.slices_of for s in tracker.slices_for(sid)]
    desired, tproblems = translate(tracker.services.values(), slices, tracker.node, Config(NODE), Registry())
    return desired, tproblems, tracker


def test_examples_parse_cleanly(translated: tuple[DesiredState, list[str], Tracker]) -> None:
    _, _, tracker = translated
    assert tracker.node is not None and tracker.node.addresses == (NODE_V4, NODE_V6)
    assert tracker.node.zone == "zone-a"
    assert set(tracker.services) == set(EXPECTED) | {"demo/db-headless", "demo/search"}


@pytest.mark.parametrize("sid", sorted(EXPECTED))
def test_each_service(translated: tuple[DesiredState, list[str], Tracker], sid: str) -> None:
    desired, _, _ = translated
    got = {
        (k.address, k.port, k.protocol): {(r.address, r.port) for r in vs.reals}
        for k, vs in desired.services.items() if vs.service is not None and vs.service.service_id == sid
    }
    assert got == EXPECTED[sid]


def test_whole_table_and_bound_addresses(translated: tuple[DesiredState, list[str], Tracker]) -> None:
    desired, _, _ = translated
    want = {key(a, p, proto) for per in EXPECTED.values() for (a, p, proto) in per}
    assert set(desired.services) == want and len(want) == 20
    assert_family_consistent(desired)
    assert desired.addresses == {
        a for per in EXPECTED.values() for (a, _, _) in per if a not in (NODE_V4, NODE_V6)}
    assert NODE_V4 not in desired.addresses


def test_settings_from_examples(translated: tuple[DesiredState, list[str], Tracker]) -> None:
    desired, problems, _ = translated
    s = desired.services
    assert s[key("198.19.0.11")].scheduler == "lc"
    assert (s[key("198.19.0.12")].scheduler, s[key("198.19.0.12")].flags) == ("sh", F_SCHED1)
    assert s[key("198.19.0.13")].timeout == 60
    assert all(vs.timeout == 0 for k, vs in s.items() if k != key("198.19.0.13"))
    assert s[key("198.19.0.100", 3868, SCTP)].scheduler == "rr"
    assert len(problems) == 1 and "demo/signalling" in problems[0] and "fastest" in problems[0]
    assert s[key("198.18.200.1", 443)].local and not s[key("198.19.0.40", 443)].local
    assert s[key("198.19.0.80")].local


def test_cli_dry_run_prints_the_plan() -> None:
    from ipvsproxy.cli.main import cli
    from ipvsproxy.cli.run import run

    cli.add_command(run)
    result = CliRunner().invoke(cli, [
        "run", "--from-file", str(EXAMPLES), "--once", "--dry-run", "--dataplane", "memory",
        "--node-name", NODE,
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.splitlines()
    add_vs = [line for line in lines if line.startswith("add-vs ")]
    assert len(add_vs) == 20
    assert "add-vs TCP 198.19.0.12:80 sh flags=0x8 (demo/web-sh:http)" in lines
    assert "add-vs TCP 198.19.0.13:80 rr persistent=60s (demo/sticky:http)" in lines
    assert "add-vs TCP [2001:2::60]:80 rr (demo/web6:http)" in lines
    assert "add-rs UDP 198.19.0.53:53 -> 198.18.1.11:5353 w=1 (demo/dns:dns)" in lines
    assert sum(line.startswith("add-rs ") for line in lines) == 33
    assert sum(line.startswith("bind ") for line in lines) == 17
    assert not any("198.18.0.1" in line for line in lines if line.startswith("bind "))
    assert "dry run" in result.stderr
