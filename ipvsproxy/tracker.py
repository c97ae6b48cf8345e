"""Change tracking: the compact object store sources write into.

Sources (API watch, manifest files) push raw objects here; the tracker parses
them into compact records, remembers which Services changed since the last
sync (and when the change was first seen, for the network-programming latency
metric), and wakes the reconciler. Like kube-proxy's service/endpoints change
trackers, it lets a sync touch only what changed.

Bad input never gets further than this: an object that fails to parse is
reported once and skipped; an update that fails to parse keeps the last good
version, so nothing already programmed is lost.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from .objects import (
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    describe,
    parse_endpoints,
    parse_endpointslice,
    parse_node,
    parse_service,
)

log = logging.getLogger(__name__)

# (kind, namespace, name, message, resourceVersion): the version lets an Event recorder say
# a problem once per version of the object (a relist files the same version again).
ProblemHook = Callable[[str, str, str, str, str], None]


class GroupKey(NamedTuple):
    """The object a group of slices comes from: one EndpointSlice, or one
    core/v1 Endpoints object (mirrored into slices)."""

    kind: str  # "EndpointSlice" | "Endpoints"
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


# What a node proxy follows, listed once: the API source watches these (core/v1 Endpoints
# stand in for EndpointSlices on old clusters), and the first sync waits for each.
WATCHED_KINDS = ("Service", "EndpointSlice", "Node")


def object_key(obj: Any) -> tuple[str, str]:
    """(namespace, name) of a raw object, as the tracker files it ("default" when unnamespaced)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


class Tracker:
    """Thread-safe store of records plus the set of Services that changed."""

    def __init__(self, node_name: str, on_problem: ProblemHook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_name = node_name
        self.clock = clock  # first-seen times, for the network-programming latency
        self.on_problem = on_problem
        self.services: dict[str, Service] = {}
        self.groups: dict[GroupKey, list[EndpointSlice]] = {}  # slices by the object they come from
        self.slices_of: dict[str, tuple[GroupKey, ...]] = {}  # service id -> groups (tuples: small)
        self.node: Node | None = None
        self.listed: set[str] = set()
        self._dirty: dict[str, float] = {}  # service id -> first seen (on the clock)
        self._all_dirty: float | None = None
        self._lock = threading.RLock()
        self.changed = threading.Event()

    # ---- writes (from sources) -------------------------------------------
    def _problem(self, kind: str, obj: Any, message: str) -> None:
        ns, name = object_key(obj)
        log.warning("%s", message)
        if self.on_problem:
            meta = obj.get("metadata") if isinstance(obj, Mapping) else None
            version = str(meta.get("resourceVersion") or "") if isinstance(meta, Mapping) else ""
            self.on_problem(kind, ns, name, message, version)

    def _mark(self, service_id: str) -> None:
        self._dirty.setdefault(service_id, self.clock())
        # Event.set takes a lock and wakes waiters: 20,000 times in a 10,000-Service listing.
        # Skipping it when already set loses nothing: whoever clears the event clears it before
        # reading the changes, so after this change was recorded.
        if not self.changed.is_set():
            self.changed.set()

    def upsert(self, kind: str, obj: Any) -> None:
        """An object was added or changed."""
        with self._lock:
            try:
                if kind == "Service":
                    svc, problems = parse_service(obj)
                    sid = sys.intern(svc.id)  # one string per Service id, here and in slices_of (_set_slices)
                    if self.services.get(sid) != svc:
                        self.services[sid] = svc
                        self._mark(sid)
                elif kind == "EndpointSlice":
                    sl, problems = parse_endpointslice(obj)
                    self._set_slices(GroupKey("EndpointSlice", sl.namespace, sl.name), [sl])
                elif kind == "Endpoints":
                    slices, problems = parse_endpoints(obj)
                    ns, name = object_key(obj)
                    self._set_slices(GroupKey("Endpoints", ns, name), slices, f"{ns}/{name}")
                elif kind == "Node":
                    node, problems = parse_node(obj)
                    if node.name != self.node_name:
                        return
                    if node != self.node:
                        self.node = node
                        self._all_dirty = self._all_dirty or self.clock()
                        self.changed.set()
                else:
                    raise InvalidObject(f"{describe(obj)}: kind {kind!r} not handled")
            except InvalidObject as exc:
                self._problem(kind, obj, f"skipped: {exc}")
                return
            for p in problems:
                self._problem(kind, obj, p)

    def _set_slices(self, group: GroupKey, slices: list[EndpointSlice], service_id: str = "") -> None:
        """Replace the slices one object contributes (one EndpointSlice, or an
        Endpoints object's mirrored slices) and mark the Services affected."""
        old = self.groups.get(group, [])
        if old == slices:
            return
        for s in old:
            groups = tuple(g for g in self.slices_of.get(s.service_id, ()) if g != group)
            if groups:
                self.slices_of[s.service_id] = groups
            else:
                self.slices_of.pop(s.service_id, None)
            self._mark(s.service_id)
        if slices:
            self.groups[group] = slices
        else:
            self.groups.pop(group, None)
        for s in slices:
            sid = sys.intern(s.service_id)  # the same object as the Service's key: ~1 MiB at 20,000 Services
            groups = self.slices_of.get(sid, ())
            if group not in groups:
                self.slices_of[sid] = (*groups, group)
            self._mark(sid)
        if service_id:
            self._mark(service_id)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """An object is gone."""
        with self._lock:
            sid = f"{namespace}/{name}"
            if kind == "Service":
                if self.services.pop(sid, None) is not None:
                    self._mark(sid)
            elif kind in ("EndpointSlice", "Endpoints"):
                self._set_slices(GroupKey(kind, namespace, name), [])
            elif kind == "Node" and name == self.node_name and self.node is not None:
                self.node = None
                self._all_dirty = self._all_dirty or self.clock()
                self.changed.set()

    def replace(self, kind: str, objects: Iterable[Any]) -> None:
        """A full listing of one kind: upsert all, delete what is not listed."""
        with self._lock:
            seen: set[tuple[str, str]] = set()
            for obj in objects:
                seen.add(object_key(obj))
                self.upsert(kind, obj)
            self.finish_listing(kind, seen)

    def finish_listing(self, kind: str, seen: set[tuple[str, str]]) -> None:
        """The end of a listing whose objects were upserted as they came (a paged
        API list): delete what was not listed (keys as `object_key` gives them)."""
        with self._lock:
            for ns, name in self._names(kind) - seen:
                self.delete(kind, ns, name)
            self.listed.add(kind)
            self.changed.set()

    def _names(self, kind: str) -> set[tuple[str, str]]:
        if kind == "Service":
            return {(s.namespace, s.name) for s in self.services.values()}
        if kind in ("EndpointSlice", "Endpoints"):
            return {(g.namespace, g.name) for g in self.groups if g.kind == kind}
        if kind == "Node" and self.node is not None:
            return {("default", self.node.name)}
        return set()

    def mark_listed(self, kind: str) -> None:
        """Count `kind` as listed without filing anything under it (core/v1 Endpoints
        stand in for EndpointSlices when the cluster serves no slices)."""
        with self._lock:
            self.listed.add(kind)
            self.changed.set()

    def mark_all(self) -> None:
        """Everything needs re-translation (e.g. the node's own addresses changed)."""
        with self._lock:
            self._all_dirty = self._all_dirty or self.clock()
            self.changed.set()

    # ---- reads (from the reconciler) --------------------------------------
    def ready(self, kinds: Iterable[str] = WATCHED_KINDS) -> bool:
        """The first sync waits until every kind has been listed once."""
        with self._lock:
            return all(k in self.listed for k in kinds)

    def oldest_dirty(self) -> float | None:
        """When the longest-waiting change was first seen (None: nothing waits)."""
        with self._lock:
            if self._all_dirty is not None:
                return self._all_dirty
            return next(iter(self._dirty.values()), None)

    def take_dirty(self, until: float | None = None) -> tuple[dict[str, float], bool]:
        """Services changed since last call (id -> first seen), and 'everything' flag.

        `until`: only the Services first seen at or before it (the oldest changes; a sync
        carries a tick's changes oldest first, in pieces: core.py); the others stay for the
        next call. The changes are kept in the order they were first seen (a dict filled by
        setdefault on a monotonic clock), so the oldest is first and taking stops at the
        first younger one. Everything marked (mark_all, a relist) is taken whole."""
        with self._lock:
            everything = self._all_dirty is not None
            if until is None or everything:
                dirty, self._dirty = self._dirty, {}
            else:
                dirty = {}
                for sid, seen in self._dirty.items():
                    if seen > until:
                        break
                    dirty[sid] = seen
                for sid in dirty:
                    del self._dirty[sid]
                if self._dirty:  # younger changes wait: the event stays set for them
                    return dirty, False
            if everything:
                first = self._all_dirty or self.clock()
                for sid in self.services:
                    dirty.setdefault(sid, first)
            self._all_dirty = None
            self.changed.clear()
            return dirty, everything

    def slices_for(self, service_id: str) -> list[EndpointSlice]:
        with self._lock:
            return [s for g in self.slices_of.get(service_id, ()) for s in self.groups.get(g, ())]

    def endpoints_of(self, service_id: str) -> Iterator[tuple[str, str, str]]:
        """A Service's endpoints as (address, targetRef, node), e.g. ("10.1.0.9", "Pod/web-9",
        "node-2"), for display (`ipvsproxy list`); the desired state keeps neither name."""
        for s in self.slices_for(service_id):
            for e, target in s.named():
                yield e.address, target, e.node
