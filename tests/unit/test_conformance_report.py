"""scripts/conformance_report.py turns e2e JUnit files into the ipvsproxy vs kube-proxy table.

The table is the evidence docs/conformance.md quotes, so its classification must be right: a pass,
a failure with its first line, the suite's own skip with its message, a spec outside the run's focus
(ginkgo lists those as skipped with no message) and a test our skip list removes (with our reason),
and the verdict "ipvsproxy passes every test kube-proxy passes" only when both columns ran.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from tests import scriptload

ROOT = Path(__file__).resolve().parents[2]

A = "[sig-network] Services should serve a basic endpoint from pods  [Conformance]"
B = "[sig-network] Services should prevent NodePort collisions"
C = "[sig-network] Networking Granular Checks: Services should update nodePort: http [Slow]"
D = "[sig-network] Services should work after restarting kube-proxy [Disruptive]"
E = "[sig-network] Services should be able to change the type and ports of a service [Slow] [DisabledForLargeClusters]"
SKIP = r"\[Disruptive\]|[Ll]oad.?[Bb]alancer"


report = scriptload.load("scripts/conformance_report.py", "conformance_report")


def junit(cases: list[tuple[str, str]]) -> str:
    body = []
    for name, kind in cases:
        inner = {"pass": "",
                 "fail": '<failure type="Failure">test/e2e/network/service.go:100\nTimed out after 120s</failure>',
                 "suite-skip": '<skipped message="skipped: Requires at least 2 nodes (not 1)"></skipped>',
                 "unfocused": "<skipped></skipped>"}[kind]
        body.append(f'<testcase name="{name}" classname="Kubernetes e2e suite" time="12.5">{inner}</testcase>')
    return f'<?xml version="1.0"?><testsuite tests="{len(cases)}">{"".join(body)}</testsuite>'


def run(tmp_path: Path, monkeypatch: Any, columns: dict[str, list[tuple[str, str]]]) -> tuple[int, str]:
    out = tmp_path / "conformance"
    for proxy, cases in columns.items():
        (out / proxy).mkdir(parents=True)
        (out / proxy / "junit_01.xml").write_text(junit(cases))
        (out / proxy / "seconds").write_text("600\n")
    monkeypatch.setattr(report, "selection", lambda focus: [A, B, C, D, E])
    monkeypatch.setattr(sys, "argv", ["conformance_report.py", "--out", str(out), "--skip", SKIP])
    rc = report.main()
    return rc, (out / "table.md").read_text()


def row(table: str, name: str) -> list[str]:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip("|").split(" | ")][1:]


def test_cells_and_verdict(tmp_path: Path, monkeypatch: Any) -> None:
    rc, table = run(tmp_path, monkeypatch, {
        "ipvsproxy": [(A, "pass"), (B, "fail"), (C, "unfocused"), (D, "unfocused")],
        "kube-proxy": [(A, "pass"), (B, "pass"), (C, "suite-skip"), (D, "unfocused")],
    })
    assert row(table, A) == ["**pass** (12 s)", "**pass** (12 s)"]
    assert row(table, B)[0].startswith("**FAIL** (12 s): test/e2e/network/service.go:100")
    assert row(table, B)[1] == "**pass** (12 s)"
    assert row(table, C) == ["not run (outside this run's focus)",
                             "skipped by the suite: skipped: Requires at least 2 nodes (not 1)"]
    assert all(c.startswith("skipped: [Disruptive]") for c in row(table, D))
    assert row(table, E) == ["not run", "not run"]  # not in either JUnit file
    assert rc == 1
    assert "Passed with kube-proxy but not with ipvsproxy: " + B in table
    assert "- ipvsproxy: 1 pass, 1 fail, 1 skipped, 2 not run (e2e.test wall time 600 s)" in table


def test_verdict_holds_when_ipvsproxy_passes_what_kube_proxy_passes(tmp_path: Path, monkeypatch: Any) -> None:
    rc, table = run(tmp_path, monkeypatch, {
        "ipvsproxy": [(A, "pass"), (B, "pass")],
        "kube-proxy": [(A, "pass"), (B, "fail")],
    })
    assert rc == 0
    assert "ipvsproxy passes every selected test kube-proxy passes." in table


def test_no_comparison_without_both_columns(tmp_path: Path, monkeypatch: Any) -> None:
    rc, table = run(tmp_path, monkeypatch, {"ipvsproxy": [(A, "pass")]})
    assert rc == 1
    assert "Not both columns ran to the end: no comparison." in table
    assert row(table, A) == ["**pass** (12 s)", "not run (no JUnit file)"]


FROZEN_LOG = (
    '{"msg":"PASSED ' + A + '","total":53,"completed":1,"skipped":44,"failed":0}\n'
    'SSSS\n'
    '{"msg":"FAILED ' + B + '","total":53,"completed":1,"skipped":45,"failed":1}\n'
)


def test_a_column_that_stopped_early_shows_what_its_log_says_ran_and_gives_no_verdict(
        tmp_path: Path, monkeypatch: Any) -> None:
    # A frozen VM leaves e2e.log but no JUnit file: the specs that ended are still shown, and the
    # column does not count as complete, so there is no verdict even though nothing failed on A
    out = tmp_path / "conformance"
    (out / "ipvsproxy").mkdir(parents=True)
    (out / "ipvsproxy" / "e2e.log").write_text(FROZEN_LOG)
    rc, table = run(tmp_path, monkeypatch, {"kube-proxy": [(A, "pass"), (B, "pass")]})
    assert row(table, A)[0].startswith("**pass** (from e2e.log")
    assert row(table, B)[0].startswith("**FAIL** (from e2e.log")
    assert row(table, C)[0] == "not run"
    assert rc == 1 and "Not both columns ran to the end: no comparison." in table


SKIP_LOG = """\
SSSS
------------------------------
S [SKIPPING] [38.091 seconds]
[sig-network] Networking
/tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/network/framework.go:23
  Granular Checks: Services
  /tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/network/networking.go:149
    should function for client IP based session affinity: http [LinuxOnly] [It]
    /tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/network/networking.go:414

    Requires at least 2 nodes (not 1)

    /tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/framework/network/utils.go:760
------------------------------
S [SKIPPING] [0.516 seconds]
[sig-network] Services
/tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/network/framework.go:23
  should reconcile LB health check interval [Slow][Serial] [It]
  /tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/network/service.go:2321

  Only supported for providers [gce] (not skeleton)

  /tmp/k8s/gopath/src/k8s.io/kubernetes/test/e2e/network/service.go:2325
------------------------------
"""


def test_specs_the_suite_skipped_at_run_time_carry_its_message() -> None:
    """The JUnit file records them as skipped without a message (as it does specs outside the
    focus): the reason comes from e2e.log, so the table does not call them "outside the focus"."""
    msgs = report.skip_messages(SKIP_LOG)
    affinity = ("[sig-network] Networking Granular Checks: Services should function for client IP based "
                "session affinity: http [LinuxOnly]")
    lb = "[sig-network] Services should reconcile LB health check interval [Slow][Serial]"
    assert msgs == {affinity: "Requires at least 2 nodes (not 1)",
                    lb: "Only supported for providers [gce] (not skeleton)"}
    results = {affinity: ("skip", "", 38.1), lb: ("skip", "", 0.5), "other": ("skip", "", 0.0)}
    skip = r"\[Disruptive\]"
    assert report.cell(affinity, results, skip, msgs) == "skipped by the suite: Requires at least 2 nodes (not 1)"
    assert report.cell("other", results, skip, msgs) == "not run (outside this run's focus)"


def test_a_column_resumed_after_a_frozen_boot_counts_both_boots(tmp_path: Path, monkeypatch: Any) -> None:
    # boot 1 froze after A passed and B failed; boot 2 ran the rest (A and B outside its focus, so its
    # JUnit file lists them as skipped without a message): the column is complete, A and B keep boot
    # 1's outcomes, and the verdict compares the whole column
    out = tmp_path / "conformance"
    (out / "ipvsproxy").mkdir(parents=True)
    (out / "ipvsproxy" / "e2e.boot1.log").write_text(FROZEN_LOG)
    (out / "ipvsproxy" / "freeze.boot1.txt").write_text("vCPU 0: native_safe_halt\n")  # the watchdog's sample
    (out / "ipvsproxy" / "junit_01.xml").write_text(junit([(A, "unfocused"), (B, "unfocused"), (C, "pass")]))
    # kube-proxy's first boot was stopped from outside (no freeze sample) after A passed: --resume
    (out / "kube-proxy").mkdir(parents=True)
    (out / "kube-proxy" / "e2e.boot1.log").write_text(FROZEN_LOG.split(B)[0])
    (out / "kube-proxy" / "junit_01.xml").write_text(junit([(A, "unfocused"), (B, "pass"), (C, "pass")]))
    monkeypatch.setattr(report, "selection", lambda focus: [A, B, C, D, E])
    monkeypatch.setattr(sys, "argv", ["conformance_report.py", "--out", str(out), "--skip", SKIP])
    rc = report.main()
    table = (out / "table.md").read_text()
    assert row(table, A)[0] == "**pass** (from e2e.boot1.log: that boot froze)"
    assert row(table, B)[0] == "**FAIL** (from e2e.boot1.log: that boot froze)"
    assert row(table, C)[0] == "**pass** (12 s)"
    assert row(table, A)[1] == "**pass** (from e2e.boot1.log: that boot was stopped)"
    assert rc == 1 and "Passed with kube-proxy but not with ipvsproxy: " + B in table
    assert "1 earlier boot(s) froze and the column was resumed" in table
    assert "1 earlier boot(s) was stopped and the column was resumed" in table


def test_the_focus_to_resume_with_is_every_selected_test_not_yet_ended(
        tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    out = tmp_path / "conformance"
    (out / "ipvsproxy").mkdir(parents=True)
    (out / "ipvsproxy" / "e2e.boot1.log").write_text(FROZEN_LOG)
    monkeypatch.setattr(report, "selection", lambda focus: [A, B, C, D, E])
    monkeypatch.setattr(sys, "argv", ["conformance_report.py", "--out", str(out), "--proxies", "ipvsproxy",
                                      "--skip", SKIP, "--remaining"])
    assert report.main() == 0
    focus = capsys.readouterr().out.strip()
    # C and E are left (A and B ended, D is on the skip list); the names match literally
    alternatives = focus.split("|")
    assert len(alternatives) == 2
    assert [n for n in (A, B, C, D, E) if re.search(focus, n)] == [C, E]
    assert r"\[sig-network\] Networking Granular Checks: Services should update nodePort: http \[Slow\]" in focus
