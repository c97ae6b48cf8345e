"""The manifest source: files, directories, multi-doc, Lists, bad files, last good content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ipvsproxy.sources.files import ManifestReader, expand, read_file
from ipvsproxy.tracker import Tracker
from tests.unit.factories import NODE, legacy_endpoints, node, service, slice_


def write(path: Path, *docs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs))
    return path


def names(objs: list) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


def test_multi_document_file(tmp_path: Path) -> None:
    f = write(tmp_path / "a.yaml", service("web"), slice_("web", ["10.1.0.1"]), node(NODE),
              legacy_endpoints("legacy", ["10.1.0.2"]))
    found, problems = read_file(f)
    assert problems == [] and found is not None
    assert names(found["Service"]) == ["web"]
    assert names(found["EndpointSlice"]) == ["web-ipv4"]
    assert names(found["Node"]) == [NODE]
    assert names(found["Endpoints"]) == ["legacy"]


def test_kind_list_and_typed_lists(tmp_path: Path) -> None:
    f = write(tmp_path / "l.yaml",
              {"apiVersion": "v1", "kind": "List", "items": [service("a"), slice_("a", ["10.1.0.1"])]},
              {"apiVersion": "v1", "kind": "ServiceList", "items": [service("b")]},
              {"apiVersion": "v1", "kind": "List", "items": [
                  {"apiVersion": "v1", "kind": "List", "items": [service("c")]}]})
    found, problems = read_file(f)
    assert problems == [] and found is not None
    assert names(found["Service"]) == ["a", "b", "c"] and names(found["EndpointSlice"]) == ["a-ipv4"]


def test_json_file(tmp_path: Path) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [service("j")]}))
    found, _ = read_file(f)
    assert found is not None and names(found["Service"]) == ["j"]


def test_directories_recursive_sorted_only_manifest_suffixes(tmp_path: Path) -> None:
    write(tmp_path / "d" / "b.yaml", service("b"))
    write(tmp_path / "d" / "sub" / "a.yml", service("a"))
    (tmp_path / "d" / "README.md").write_text("not yaml: [")
    (tmp_path / "d" / "x.txt").write_text("kind: [")
    single = write(tmp_path / "single.yaml", service("s"))
    files = expand([str(tmp_path / "d"), str(single)])
    assert [f.name for f in files] == ["b.yaml", "a.yml", "single.yaml"]
    snap = ManifestReader([str(tmp_path / "d"), str(single)]).read()
    assert sorted(names(snap.objects["Service"])) == ["a", "b", "s"] and snap.problems == []


def test_invalid_yaml_file_skipped_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  labels: [a, b\n")
    good = write(tmp_path / "good.yaml", service("web"))
    snap = ManifestReader([str(tmp_path)]).read()
    assert names(snap.objects["Service"]) == ["web"]
    assert len(snap.problems) == 1
    msg = snap.problems[0]
    assert str(bad) in msg and "line" in msg and "invalid YAML" in msg
    assert str(good) not in msg


def test_yaml_error_line_number(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("a: 1\nb: 2\nc: [\n")
    _, problems = read_file(f)
    assert problems and " line " in problems[0]
    line = int(problems[0].split(" line ")[1].split(":")[0])
    assert 3 <= line <= 4


@pytest.mark.parametrize("text", [
    "kind: List\nitems: 5\n",
    "apiVersion: v1\nkind: [1]\n",
    "a: !!int ''\n",
    "a: 2001-02-30\n",
    "a: !!float x\n",
    "&a {kind: List, items: [*a]}\n",
    "[" * 3000 + "\n",
    "a: !!python/object:os.system x\n",
    "\x00\x01",
    "--- 5\n--- [1, 2]\n--- 'text'\n",
], ids=["items-int", "kind-list", "int-empty", "bad-date", "float-x", "recursive-list", "deep", "python-tag",
        "binary", "scalars"])
def test_nasty_files_never_raise_and_neighbours_still_read(tmp_path: Path, text: str) -> None:
    (tmp_path / "a-bad.yaml").write_text(text)
    write(tmp_path / "b-good.yaml", service("web"))
    snap = ManifestReader([str(tmp_path)]).read()
    assert names(snap.objects["Service"]) == ["web"]
    assert snap.problems and all("a-bad.yaml" in p for p in snap.problems)


def test_non_utf8_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "latin.yaml").write_bytes(b"name: \xff\xfe\n")
    found, problems = read_file(tmp_path / "latin.yaml")
    assert found is None and "latin.yaml" in problems[0]
    snap = ManifestReader([str(tmp_path / "nope.yaml")]).read()
    assert "nope.yaml" in snap.problems[0] and "missing" in snap.problems[0]


def test_unknown_api_version_skipped_ignored_kinds_silent(tmp_path: Path) -> None:
    old = dict(slice_("web", ["10.1.0.1"]), apiVersion="discovery.k8s.io/v1beta1")
    odd = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    f = write(tmp_path / "m.yaml", service("web"), old, odd, pod, "just text", None)
    found, problems = read_file(f)
    assert found is not None and names(found["Service"]) == ["web"] and "EndpointSlice" not in found
    assert len(problems) == 3
    assert "v1beta1" in problems[0] and "document 2" in problems[0]
    assert "Widget" in problems[1]
    assert "document 5" in problems[2] and "not an object" in problems[2]


def test_file_turning_invalid_keeps_last_good_objects(tmp_path: Path) -> None:
    f = write(tmp_path / "svc.yaml", service("web"), slice_("web", ["10.1.0.1"]))
    other = write(tmp_path / "other.yaml", service("api", cluster_ip="10.96.0.20"))
    reader = ManifestReader([str(tmp_path)])
    assert sorted(names(reader.read().objects["Service"])) == ["api", "web"]
    f.write_text("kind: Service\nmetadata: {name: [\n")
    write(other, service("api2", cluster_ip="10.96.0.21"))
    snap = reader.read()
    assert sorted(names(snap.objects["Service"])) == ["api2", "web"]
    assert names(snap.objects["EndpointSlice"]) == ["web-ipv4"]
    assert len(snap.problems) == 1 and "svc.yaml" in snap.problems[0]
    # fixed again: new content is used
    write(f, service("web2"))
    snap = reader.read()
    assert sorted(names(snap.objects["Service"])) == ["api2", "web2"] and snap.objects["EndpointSlice"] == []


def test_deleted_file_withdraws_its_objects(tmp_path: Path) -> None:
    f = write(tmp_path / "svc.yaml", service("web"))
    reader = ManifestReader([str(tmp_path)])
    assert names(reader.read().objects["Service"]) == ["web"]
    f.unlink()
    assert reader.read().objects["Service"] == []


def test_load_into_tracker_as_complete_listings(tmp_path: Path) -> None:
    f = write(tmp_path / "all.yaml", service("web"), service("api", cluster_ip="10.96.0.20"),
              slice_("web", ["10.1.0.1"]), node(NODE))
    t = Tracker(NODE)
    reader = ManifestReader([str(f)])
    assert reader.load(t) == []
    assert set(t.services) == {"default/web", "default/api"} and t.node is not None
    assert t.ready(["Service", "EndpointSlice", "Endpoints", "Node"])
    t.take_dirty()
    write(f, service("web"), slice_("web", ["10.1.0.1"]), node(NODE))
    reader.load(t)
    assert set(t.services) == {"default/web"}
    d, _ = t.take_dirty()
    assert set(d) == {"default/api"}
    f.write_text(": : :\n  - [")
    problems = reader.load(t)
    assert problems and set(t.services) == {"default/web"} and t.node is not None


def test_json_looking_text_that_is_yaml_flow_or_several_documents(tmp_path: Path) -> None:
    """JSON goes through the json module; text that only opens like JSON is still read as YAML."""
    flow = tmp_path / "flow.yaml"
    flow.write_text("{apiVersion: v1, kind: List, items: [" + json.dumps(service("f")) + "]}\n")
    two = tmp_path / "two.yaml"
    two.write_text(json.dumps(service("x")) + "\n---\n" + json.dumps(service("y")) + "\n")
    assert names(read_file(flow)[0]["Service"]) == ["f"]  # type: ignore[index]
    assert names(read_file(two)[0]["Service"]) == ["x", "y"]  # type: ignore[index]
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "List", "items": [')
    found, problems = read_file(bad)
    assert found is None and "invalid YAML" in problems[0] and "file skipped" in problems[0]
