"""The results table of scripts/conformance.sh: each selected e2e test x each proxy.

Why a separate step: the e2e runs happen inside the VM and leave JUnit files behind; the table
(results/conformance/table.md, pasted into docs/conformance.md) is rebuilt from them on the host,
also after a partial run (`scripts/conformance.sh --report`). The selection is what e2e.test itself
lists for the focus (`--ginkgo.dryRun`), so a test that never ran is shown as "not run", not lost.

    python3 scripts/conformance_report.py --out results/conformance --proxies "ipvsproxy kube-proxy" --skip REGEX
Exit status: 0 when every test that passed with kube-proxy passed with ipvsproxy too (and both ran).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

E2E = Path(os.environ.get("IPVSPROXY_CACHE", "/var/cache/ipvsproxy")) / "kubernetes-v1.20.2" / "bin" / "e2e.test"
FOCUS = r"\[sig-network\] (Services|Networking)"

# Why the default skip list skips (scripts/conformance.sh's header says the same).
OUR_SKIPS = [
    (r"\[Disruptive\]", "skipped: [Disruptive] (restart kube-proxy / the API server or delete iptables rules "
                        "over SSH to the node, no SSH into the VM; the SCTP tests carry the tag too)"),
    (r"\[Feature:Networking-IPv4\]", "skipped: needs Internet access from pods (traffic must not leave the VM)"),
    (r"\[Feature:Networking-IPv6\]", "skipped: needs Internet access from pods (traffic must not leave the VM)"),
    (r"\[Feature:Networking-Performance\]", "skipped: 1 GB iperf performance run (no pass/fail value, hours "
                                            "under emulation)"),
    (r"[Ll]oad.?[Bb]alancer", "skipped: needs a cloud provider's load balancer"),
    (r"ESIPP", "skipped: needs a cloud provider's load balancer"),
    (r"\[Slow\]", "skipped: [Slow] (--quick)"),
]


def selection(focus: str) -> list[str]:
    proc = subprocess.run([str(E2E), "--ginkgo.dryRun", f"--ginkgo.focus={focus}", "--ginkgo.noColor"],
                          capture_output=True, text=True, timeout=300, check=False)
    return sorted(logged_outcomes(proc.stdout, "dry run"))  # a dry run "passes" every selected spec


def parse_junit(path: Path) -> dict[str, tuple[str, str, float]]:
    """testcase name -> (status, detail, seconds); status: pass, fail, skip."""
    out: dict[str, tuple[str, str, float]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name", "").strip()
        secs = float(tc.get("time") or 0)
        failure = tc.find("failure")
        if failure is None:
            failure = tc.find("error")
        skipped = tc.find("skipped")
        if failure is not None:
            msg = (failure.get("message") or failure.text or "").strip().splitlines()
            out[name] = ("fail", msg[0][:160] if msg else "", secs)
        elif skipped is not None:
            msg = (skipped.get("message") or skipped.text or "").strip().splitlines()
            out[name] = ("skip", msg[0][:160] if msg else "", secs)
        else:
            out[name] = ("pass", "", secs)
    return out


def skip_messages(log: str) -> dict[str, str]:
    """Test name -> the message of a spec the suite skipped at run time, from e2e.log's
    "S [SKIPPING]" blocks (the JUnit file records those without the message): the nested
    container texts up to the "[It]" line make the name, the first line after it the reason."""
    out: dict[str, str] = {}
    for block in log.split("S [SKIPPING]")[1:]:
        lines = [ln.strip() for ln in block.splitlines()[1:]]
        parts: list[str] = []
        for i, ln in enumerate(lines):
            if not ln or ln.startswith("/"):
                continue
            if ln.endswith(" [It]"):
                parts.append(ln[:-5])
                reason = next((x for x in lines[i + 1:] if x and not x.startswith("/")), "")
                out[" ".join(parts)] = reason[:160]
                break
            parts.append(ln)
    return out


def logged_outcomes(log: str, source: str) -> dict[str, tuple[str, str, float]]:
    """Test name -> (pass|fail, where it was read, -1.0) from the progress lines e2e.test prints as
    each spec ends (`{"msg":"PASSED <name>",...}`): what a boot that froze before writing its JUnit
    file still ran. Durations are not in those lines (-1)."""
    out: dict[str, tuple[str, str, float]] = {}
    for status, name in re.findall(r'\{"msg":"(PASSED|FAILED) (.*?)","total"', log):
        out[name] = ("pass" if status == "PASSED" else "fail", source, -1.0)
    return out


def ended_how(log: Path) -> str:
    """How an earlier boot of a column ended: the watchdog keeps a freeze.bootN.txt next to the
    e2e.bootN.log of a boot it stopped as frozen; a boot stopped from outside (--resume) has none."""
    return "froze" if log.with_name(log.name.replace("e2e.", "freeze.").replace(".log", ".txt")).exists() \
        else "was stopped"


def column(out: Path) -> tuple[dict[str, tuple[str, str, float]] | None, bool, dict[str, str]]:
    """One proxy's results: (test -> outcome, or None when nothing ran; whether its last boot ran
    e2e.test to the end; the suite's skip messages). A column whose boot froze was resumed in a new
    boot with the tests not yet ended (scripts/conformance.sh): the frozen boots' logs were kept as
    e2e.bootN.log, and their outcomes stand unless the last boot's JUnit file ran the test again."""
    merged: dict[str, tuple[str, str, float]] = {}
    skipped: dict[str, str] = {}
    frozen = sorted(out.glob("e2e.boot*.log"), key=lambda f: int(re.sub(r"\D", "", f.name) or 0))
    for f in frozen:
        text = f.read_text(errors="replace")
        merged.update(logged_outcomes(text, f"from {f.name}: that boot {ended_how(f)}"))
        skipped.update(skip_messages(text))
    log = out / "e2e.log"
    last = log.read_text(errors="replace") if log.is_file() else ""
    skipped.update(skip_messages(last))
    junits = sorted(out.glob("junit_*.xml"))
    if not junits:
        merged.update(logged_outcomes(last, "from e2e.log: the column stopped before its JUnit file"))
        return (merged or None), False, skipped
    for j in junits:
        for name, outcome in parse_junit(j).items():
            # outside a resumed boot's focus, a test is "skipped" with no message: an earlier outcome stands
            if outcome[0] == "skip" and not outcome[1] and name in merged:
                continue
            merged[name] = outcome
    return merged, True, skipped


def go_regex_any(names: list[str]) -> str:
    """A Go (RE2) regular expression matching any of these test names literally."""
    return "|".join(re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", n) for n in names)


def our_skip(name: str, skip: str) -> str | None:
    if not re.search(skip, name):
        return None
    for rx, why in OUR_SKIPS:
        if rx in skip and re.search(rx, name):
            return why
    return "skipped: --skip " + skip


def cell(name: str, results: dict[str, tuple[str, str, float]] | None, skip: str,
         skipped: dict[str, str] | None = None) -> str:
    why = our_skip(name, skip)
    if why:
        return why
    if results is None:
        return "not run (no JUnit file)"
    if name not in results:
        return "not run"
    status, detail, secs = results[name]
    took = f"{secs:.0f} s" if secs >= 0 else detail  # read from a log: detail says which
    if status == "pass":
        return f"**pass** ({took})"
    if status == "fail":
        return (f"**FAIL** ({took}): {detail}" if secs >= 0 else f"**FAIL** ({took})").replace("|", "\\|")
    if not detail:
        detail = (skipped or {}).get(name, "")
    if not detail:  # ginkgo reports specs outside --ginkgo.focus / --ginkgo.skip as skipped, without a message
        return "not run (outside this run's focus)"
    return f"skipped by the suite: {detail}".replace("|", "\\|")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--proxies", default="ipvsproxy kube-proxy")
    ap.add_argument("--skip", default="")
    ap.add_argument("--focus", default=FOCUS)
    ap.add_argument("--remaining", action="store_true",
                    help="print a focus for the selected tests the column (one proxy) has not yet ended")
    args = ap.parse_args()
    proxies = args.proxies.split()
    names = selection(args.focus)
    if not names:
        print(f"conformance_report: e2e.test lists no test for {args.focus!r} ({E2E})", file=sys.stderr)
        return 1
    if args.remaining:
        ended, _, _ = column(args.out / proxies[0])
        print(go_regex_any([n for n in names if n not in (ended or {}) and not our_skip(n, args.skip)]))
        return 0
    results: dict[str, dict[str, tuple[str, str, float]] | None] = {}
    walls: dict[str, str] = {}
    skipped: dict[str, dict[str, str]] = {}
    complete: set[str] = set()  # columns whose last boot ran e2e.test to the end
    for p in proxies:
        results[p], done, skipped[p] = column(args.out / p)
        if done:
            complete.add(p)
        secs = args.out / p / "seconds"
        walls[p] = f"{int(secs.read_text()):d} s" if secs.is_file() else "-"
        earlier = list((args.out / p).glob("e2e.boot*.log"))
        if earlier:
            how = ", ".join(sorted({ended_how(f) for f in earlier}))
            walls[p] += f" in its last boot; {len(earlier)} earlier boot(s) {how} and the column was resumed"
    lines = [f"| test | {' | '.join(proxies)} |", "|---|" + "---|" * len(proxies)]
    counts: dict[str, dict[str, int]] = {p: {"pass": 0, "fail": 0, "skip": 0, "not run": 0} for p in proxies}
    for n in names:
        cells = [cell(n, results[p], args.skip, skipped[p]) for p in proxies]
        for p, c in zip(proxies, cells, strict=True):
            outcome = ("pass" if c.startswith("**pass") else "fail" if c.startswith("**FAIL")
                       else "not run" if c.startswith("not run") else "skip")
            counts[p][outcome] += 1
        lines.append(f"| {n.replace('|', '/')} | {' | '.join(cells)} |")
    summary = [f"Selection: `--ginkgo.focus='{args.focus}'`: {len(names)} tests in e2e.test v1.20.2.", ""]
    for p in proxies:
        tally = counts[p]
        summary.append(f"- {p}: {tally['pass']} pass, {tally['fail']} fail, {tally['skip']} skipped, "
                       f"{tally['not run']} not run "
                       f"(e2e.test wall time {walls[p]})")
    ok = True
    if {"ipvsproxy", "kube-proxy"} <= complete:
        ipv, kp = results["ipvsproxy"] or {}, results["kube-proxy"] or {}
        missing = [n for n in names if kp.get(n, ("",))[0] == "pass" and ipv.get(n, ("",))[0] != "pass"]
        ok = not missing
        summary.append("")
        summary.append("ipvsproxy passes every selected test kube-proxy passes." if ok else
                       "Passed with kube-proxy but not with ipvsproxy: " + "; ".join(missing))
    else:
        ok = False
        summary.append("")
        summary.append("Not both columns ran to the end: no comparison.")
    text = "\n".join(summary + ["", *lines]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
