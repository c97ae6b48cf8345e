"""Input hygiene (issue 14 item 11): untrusted names cannot forge log or
output lines, and nonsensical flags are usage errors (exit 2)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ipvsproxy.cli.main import cli, register
from ipvsproxy.config import AgentConfig
from ipvsproxy.logfmt import EscapingFormatter, escape
from ipvsproxy.schedulers import default_registry
from tests.unit.factories import port, service

register()

FORGED = "1999-01-01 00:00:00,000 ERROR ipvsproxy: forged line"


def forging_manifest(path: Path) -> Path:
    """A Service whose name, port name and scheduler annotation carry newlines,
    and a second Service it conflicts with (one more warning naming it)."""
    bad = service(f"web\n{FORGED}", cluster_ip="10.96.0.10", ports=[port(f"http\n{FORGED} 2", 80)],
                  annotations={"ipvsproxy.io/scheduler": f"bogus\r\n{FORGED} 3"})
    other = service("a", namespace="a", cluster_ip="10.96.0.10", ports=[port("http", 80)])
    path.write_text(yaml.safe_dump_all([bad, other]))
    return path


def test_escape() -> None:
    assert escape("web\n2026 ERROR x\r\x1b[31m\u2028ok é") == "web\\n2026 ERROR x\\r\\x1b[31m\\u2028ok é"
    assert escape("plain/name:http") == "plain/name:http"


def test_formatter_escapes_the_message_and_its_arguments() -> None:
    rec = logging.LogRecord("ipvsproxy.x", logging.WARNING, __file__, 1, "Service %s: %s", ("a\nb", "c\nd"), None)
    out = EscapingFormatter("%(levelname)s %(name)s: %(message)s").format(rec)
    assert out == "WARNING ipvsproxy.x: Service a\\nb: c\\nd"
    assert rec.args == ("a\nb", "c\nd")  # the record itself is left as it was


def test_a_name_with_newlines_cannot_forge_agent_log_lines(tmp_path: Path) -> None:
    """The real command in its own process: every stderr line is one of ours."""
    f = forging_manifest(tmp_path / "forge.yaml")
    r = subprocess.run(
        [sys.executable, "-c", "from ipvsproxy.cli.main import main; main()", "run", "--once",
         "--dataplane", "memory", "--from-file", str(f), "--state-dir", str(tmp_path / "state"),
         "--healthz-bind-address", "", "--metrics-bind-address", ""],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert sum("forged line" in line for line in lines) >= 2  # the names were logged ...
    for line in lines:  # ... but inside the agent's own lines
        assert not line.startswith((FORGED[:10], "bogus", "http")), r.stderr
        assert line.startswith("synced:") or " WARNING ipvsproxy." in line, line


def test_dry_run_and_diff_print_one_line_per_operation(tmp_path: Path) -> None:
    f = forging_manifest(tmp_path / "forge.yaml")
    r = CliRunner().invoke(cli, ["run", "--once", "--dry-run", "--dataplane", "memory", "--from-file", str(f)])
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["bind", "add-vs"]
    r = CliRunner().invoke(cli, ["diff", "--dataplane", "memory", "--from-file", str(f)])
    assert not any(line.startswith(FORGED[:10]) for line in r.stdout.splitlines())


@pytest.mark.parametrize(("flags", "says"), [
    (["--sync-period", "0", "--min-sync-period", "0"], "--sync-period must be greater than 0"),
    (["--sync-period", "30s", "--min-sync-period", "0s"], "--min-sync-period must be greater than 0"),
    (["--sync-period", "10s", "--min-sync-period", "1m"], "must not be longer than --sync-period"),
    (["--scheduler", "bogus"], "--scheduler 'bogus' is not a known scheduler (known: dh, fo, lblc, lblcr, lc,"),
    (["--tcp-timeout", "500ms"], "--tcp-timeout must be 0"),
    (["--interface", "eth0/../x"], "not a valid interface name"),
    (["--interface", "a-name-that-is-too-long"], "not a valid interface name"),
    (["--healthz-bind-address", "foo"], "--healthz-bind-address 'foo' is not host:port"),
    (["--metrics-bind-address", "0.0.0.0:99999"], "--metrics-bind-address '0.0.0.0:99999' is not host:port"),
    (["--metrics-bind-address", "::1:9100"], "is not host:port"),
])
@pytest.mark.parametrize("command", [["run", "--once"], ["run", "--once", "--dry-run"]])
def test_nonsensical_flags_are_usage_errors(tmp_path: Path, command: list[str], flags: list[str],
                                            says: str) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": []}))
    r = CliRunner().invoke(cli, [*command, "--dataplane", "memory", "--from-file", str(f), "--state-dir",
                                 str(tmp_path / "state"), "--healthz-bind-address", "", "--metrics-bind-address",
                                 "", *flags])
    assert r.exit_code == 2, r.output
    assert says in r.stderr and "Traceback" not in r.stderr


def test_unknown_scheduler_is_refused_by_diff_too(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["diff", "--dataplane", "memory", "--scheduler", "bogus"])
    assert r.exit_code == 2 and "not a known scheduler" in r.stderr


def test_sensible_flags_have_no_problems() -> None:
    names = default_registry().names()
    assert AgentConfig(node_name="n").problems(names) == []
    assert AgentConfig(node_name="n", sync_period=1, min_sync_period=1, scheduler="mh", tcp_timeout=900,
                       interface="kube-ipvs0", healthz_bind_address="[::1]:10256",
                       metrics_bind_address=":10249").problems(names) == []
    assert AgentConfig(node_name="n", healthz_bind_address="", metrics_bind_address="localhost:9100"
                       ).problems(names) == []
