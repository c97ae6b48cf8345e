"""The manifest source: Services, EndpointSlices, Endpoints and Nodes from YAML.

Accepts what `kubectl get svc,endpointslices,nodes -A -o yaml` prints: files
or directories of them, multi-document, `kind: List` wrappers. One bad file or
document is skipped with a warning naming it; the rest is used. The agent
polls the files' modification times and re-reads them when they change.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..objects import describe, selected_by_proxy_name
from ..tracker import Tracker

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
KIND_OF = {
    ("v1", "Service"): "Service",
    ("discovery.k8s.io/v1", "EndpointSlice"): "EndpointSlice",
    ("v1", "Endpoints"): "Endpoints",
    ("v1", "Node"): "Node",
}
IGNORED_KINDS = {"Event", "Pod", "Namespace", "ConfigMap", "Deployment", "ReplicaSet", "DaemonSet"}


@dataclass(slots=True)
class Snapshot:
    """Every object read, by kind, plus the warnings met."""

    objects: dict[str, list[Any]] = field(default_factory=lambda: {k: [] for k in set(KIND_OF.values())})
    problems: list[str] = field(default_factory=list)


def expand(paths: Iterable[str]) -> list[Path]:
    """Files named, plus the manifest files inside directories named (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        else:
            out.append(p)
    return out


def _items(doc: Any, depth: int = 0) -> Iterator[Any]:
    if isinstance(doc, dict) and doc.get("kind") == "List" or (
        isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") and "items" in doc
    ):
        items = doc.get("items")
        if not isinstance(items, list) or depth > 8:  # `items: 5`, or a List holding itself (YAML anchors)
            yield doc  # reported as not handled
            return
        for item in items:
            yield from _items(item, depth + 1)
    elif doc is not None:
        yield doc


def _load(text: str) -> list[Any]:
    """The documents in a manifest. JSON (`kubectl get -o json`) is YAML too, but PyYAML builds
    it 50x slower than the json module (5 s against 0.1 s for 1,000 Services x 10 endpoints on
    the development machine, ten times that in the emulated test VM): text that opens like a
    JSON document is decoded as JSON first, and goes to the YAML loader when it is not JSON."""
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            return [json.loads(text)]
        except ValueError:
            pass  # YAML flow style, or several documents: YAML's loader reads it or says what is wrong
    import yaml  # here, not at the top: an agent reading the API never needs it (~1 MiB)

    # libyaml's loader when PyYAML has it: 2.5x faster on a large manifest (and tens of seconds
    # per start in the emulated test VM); the same safe constructors either way.
    return list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def read_file(path: Path) -> tuple[dict[str, list[Any]] | None, list[str]]:
    """Objects in one file by kind (None when the file as a whole is unusable)."""
    problems: list[str] = []
    try:
        docs = _load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{path}: cannot read: {exc}; file skipped"]
    except Exception as exc:  # PyYAML constructors raise plain errors too: `!!int ""`, `2001-02-30`, deep nesting
        # PyYAML is imported by _load only for a file that is not JSON (~1 s of a start in the test VM)
        yaml = sys.modules.get("yaml")
        if yaml is not None and isinstance(exc, yaml.YAMLError):
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            return None, [f"{path}{line}: invalid YAML ({reason}); file skipped"]
        return None, [f"{path}: invalid YAML ({type(exc).__name__}: {exc}); file skipped"]
    if all(doc is None for doc in docs):  # zero bytes, blanks or comments: read mid-rewrite (`> file`)?
        return None, [f"{path}: empty (no YAML documents); file skipped"]
    found: dict[str, list[Any]] = {}
    for i, doc in enumerate(docs):
        for obj in _items(doc):
            if not isinstance(obj, dict):
                problems.append(f"{path} document {i + 1}: not an object; skipped")
                continue
            kind = KIND_OF.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
            if kind is None:
                if str(obj.get("kind")) not in IGNORED_KINDS:
                    problems.append(
                        f"{path} document {i + 1}: {describe(obj)} apiVersion "
                        f"{obj.get('apiVersion')!r} not handled; skipped"
                    )
                continue
            found.setdefault(kind, []).append(obj)
    return found, problems


class ManifestReader:
    """Reads manifests, remembering each file's last good content.

    A file that turns unreadable, invalid or empty, and a named file or
    directory that goes missing, keeps contributing what it held last time it
    was good (with a warning), so a bad edit or a rewrite caught half-way
    (`kubectl get ... -o yaml > cluster.yaml` truncates the file first) never
    withdraws programmed Services. To withdraw every Service of a file, write
    an empty List (`kind: List`, `items: []`) or delete the file from its
    directory; a file deleted from a directory named is a deliberate removal.
    """

    def __init__(self, paths: Iterable[str], service_proxy_name: str = "") -> None:
        self.paths = list(paths)
        self.service_proxy_name = service_proxy_name
        self.last_good: dict[Path, dict[str, list[Any]]] = {}

    def read(self) -> Snapshot:
        snap = Snapshot()

        def add(found: dict[str, list[Any]]) -> None:
            for kind, objs in found.items():
                if kind == "Service":  # another proxy's Services are not ours (as the API's label selector)
                    objs = [o for o in objs if selected_by_proxy_name(o, self.service_proxy_name)]
                snap.objects[kind] += objs

        for named in map(Path, self.paths):
            if not named.exists():
                kept = [c for f, c in self.last_good.items() if f == named or named in f.parents]
                if kept:
                    n = sum(len(objs) for c in kept for objs in c.values())
                    snap.problems.append(f"{named}: missing; keeping its last good content ({n} objects) "
                                         "until it is back")
                else:
                    snap.problems.append(f"{named}: missing; nothing read from it")
                for c in kept:
                    add(c)
                continue
            for path in expand([str(named)]):
                found, problems = read_file(path)
                if found is None and path in self.last_good:
                    problems = [*problems[:-1], problems[-1] + " (keeping its last good content until it is "
                                "valid again)"]
                snap.problems += problems
                if found is None:
                    found = self.last_good.get(path, {})
                else:
                    self.last_good[path] = found
                add(found)
        return snap

    def load(self, tracker: Tracker) -> list[str]:
        """Read into the tracker as complete listings; returns the warnings."""
        snap = self.read()
        for p in snap.problems:
            log.warning("%s", p)
        for kind, objs in snap.objects.items():
            tracker.replace(kind, objs)
        return snap.problems


def _fingerprint(paths: Iterable[str]) -> tuple[tuple[str, float, int], ...]:
    out = []
    for f in expand(paths):
        try:
            st = f.stat()
            out.append((str(f), st.st_mtime, st.st_size))
        except OSError:
            out.append((str(f), -1.0, -1))
    return tuple(out)


class FileWatcher:
    """Re-reads the manifests whenever a file's mtime, size or the file set changes."""

    def __init__(self, paths: list[str], tracker: Tracker, interval: float = 1.0,
                 on_reload: Callable[[], None] | None = None, service_proxy_name: str = "") -> None:
        self.paths, self.tracker, self.interval, self.on_reload = paths, tracker, interval, on_reload
        self.reader = ManifestReader(paths, service_proxy_name)
        self._stop = threading.Event()
        self._seen = _fingerprint(paths)
        self.thread = threading.Thread(target=self._loop, name="file-watch", daemon=True)

    def start(self) -> None:
        self.reader.load(self.tracker)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            fp = _fingerprint(self.paths)
            if fp != self._seen:
                self._seen = fp
                log.info("manifests changed; re-reading %s", ", ".join(self.paths))
                self.reader.load(self.tracker)
                if self.on_reload:
                    self.on_reload()

    def stop(self) -> None:
        self._stop.set()

