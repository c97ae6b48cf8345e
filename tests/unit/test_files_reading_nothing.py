"""--from-file that reads nothing must not withdraw Services (issue 14 item 2).

A path that does not exist when the agent starts is a usage error; a file
that turns empty (`kubectl get ... -o yaml > cluster.yaml` truncates it
first), unreadable or missing keeps its last good content with a warning
until it is valid again. Real files in a temporary directory throughout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ipvsproxy.cli.main import cli, register
from ipvsproxy.sources.files import ManifestReader
from ipvsproxy.tracker import Tracker
from tests.unit.factories import NODE, node, service, slice_

register()


def write(path: Path, *docs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs))
    return path


def cluster(path: Path) -> Path:
    return write(path, service("web"), service("api", cluster_ip="10.96.0.20"), slice_("web", ["10.1.0.1"]),
                 node(NODE))


@pytest.mark.parametrize("args", [
    ["run", "--once", "--dataplane", "memory"],
    ["run", "--once", "--dry-run", "--dataplane", "memory"],
    ["diff", "--dataplane", "memory"],
])
def test_a_path_missing_at_start_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    cluster(tmp_path / "cluster.yaml")
    typo = str(tmp_path / "typo" / "cluster.yaml")
    r = CliRunner().invoke(cli, [*args, "--from-file", str(tmp_path / "cluster.yaml"), "--from-file", typo,
                                 "--state-dir", str(tmp_path / "state")])
    assert r.exit_code == 2, r.output
    assert typo in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr and "synced" not in r.stderr


def test_the_same_run_with_the_path_present_syncs(tmp_path: Path) -> None:
    f = cluster(tmp_path / "cluster.yaml")
    r = CliRunner().invoke(cli, ["run", "--once", "--dataplane", "memory", "--from-file", str(f),
                                 "--state-dir", str(tmp_path / "state"), "--healthz-bind-address", "",
                                 "--metrics-bind-address", ""])
    assert r.exit_code == 0, r.output
    assert "synced: " in r.stderr and "2 add-vs" in r.stderr


def test_truncated_file_keeps_its_last_good_content_until_rewritten(tmp_path: Path) -> None:
    f = cluster(tmp_path / "cluster.yaml")
    tracker = Tracker(NODE)
    reader = ManifestReader([str(f)])
    assert reader.load(tracker) == []
    f.write_text("")  # `> cluster.yaml`: truncated, not yet written
    problems = reader.load(tracker)
    assert set(tracker.services) == {"default/web", "default/api"} and tracker.node is not None
    assert len(tracker.slices_for("default/web")) == 1
    assert len(problems) == 1 and "cluster.yaml" in problems[0] and "empty" in problems[0]
    assert "keeping its last good content" in problems[0]
    f.write_text("# written by a script\n\n")  # comments only: still nothing
    assert reader.load(tracker) and set(tracker.services) == {"default/web", "default/api"}
    write(f, service("web"), node(NODE))  # valid again: the new content counts, api goes
    assert reader.load(tracker) == []
    assert set(tracker.services) == {"default/web"}


def test_an_empty_list_is_a_deliberate_withdrawal(tmp_path: Path) -> None:
    f = cluster(tmp_path / "cluster.yaml")
    tracker = Tracker(NODE)
    reader = ManifestReader([str(f)])
    reader.load(tracker)
    write(f, {"apiVersion": "v1", "kind": "List", "items": []})
    assert reader.load(tracker) == []
    assert tracker.services == {}


def test_file_in_a_directory_turning_empty_keeps_its_content(tmp_path: Path) -> None:
    d = tmp_path / "manifests"
    cluster(d / "a.yaml")
    write(d / "b.yaml", service("db", cluster_ip="10.96.0.30"))
    tracker = Tracker(NODE)
    reader = ManifestReader([str(d)])
    reader.load(tracker)
    (d / "a.yaml").write_text("   \n")
    problems = reader.load(tracker)
    assert set(tracker.services) == {"default/web", "default/api", "default/db"}
    assert len(problems) == 1 and "a.yaml" in problems[0]


def test_missing_file_or_directory_keeps_its_content_until_back(tmp_path: Path) -> None:
    f = cluster(tmp_path / "cluster.yaml")
    d = tmp_path / "more"
    write(d / "db.yaml", service("db", cluster_ip="10.96.0.30"))
    tracker = Tracker(NODE)
    reader = ManifestReader([str(f), str(d)])
    reader.load(tracker)
    f.unlink()
    shutil.rmtree(d)
    problems = reader.load(tracker)
    assert set(tracker.services) == {"default/web", "default/api", "default/db"}
    assert len(problems) == 2 and all("missing; keeping its last good content" in p for p in problems)
    assert str(f) in problems[0] and str(d) in problems[1]
    write(d / "db2.yaml", service("db2", cluster_ip="10.96.0.31"))  # the directory is back, with new content
    cluster(f)
    assert reader.load(tracker) == []
    assert set(tracker.services) == {"default/web", "default/api", "default/db2"}


def test_unreadable_file_keeps_its_content(tmp_path: Path) -> None:
    f = cluster(tmp_path / "cluster.yaml")
    tracker = Tracker(NODE)
    reader = ManifestReader([str(f)])
    reader.load(tracker)
    f.write_bytes(b"\xff\xfe garbage")  # not UTF-8: cannot be read as text
    problems = reader.load(tracker)
    assert set(tracker.services) == {"default/web", "default/api"}
    assert "cannot read" in problems[0] and "keeping its last good content" in problems[0]
