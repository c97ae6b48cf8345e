"""An in-process stand-in for the Kubernetes API server, for tests.

`FakeApiServer` speaks enough of the real wire protocol (JSON over HTTP/1.1,
chunked watch streams) that the official `kubernetes` Python client works
against it unchanged, typed calls and `_preload_content=False` raw calls alike.

Resources: core/v1 services, endpoints, nodes and events; discovery.k8s.io/v1
endpointslices; events.k8s.io/v1 events (stored with the core ones, kind
"Event"). Verbs: list (labelSelector, fieldSelector, limit/continue), watch,
get, create (POST), replace (PUT), patch (JSON patch for a list body, merge
patch otherwise) and delete.

Semantics copied from the real server:
- one global resourceVersion counter, bumped by every write; list responses
  carry the current one; list *items* have no kind/apiVersion (like the real
  server; watch event objects do carry them);
- watch with resourceVersion "" or "0" sends ADDED for every existing object,
  then live events; with N it replays history after N, then live events; an N
  older than the last `compact()` gets one ERROR event (Status, code 410,
  reason Expired) on an HTTP 200 stream, which then ends;
- a write that moves an object into (out of) a watch's selector is ADDED
  (DELETED) for that watch; DELETED events carry the deletion's resourceVersion;
- BOOKMARK events (only with allowWatchBookmarks=true) every
  `bookmark_interval` seconds when the stream is idle; timeoutSeconds ends the
  stream cleanly.
Approximations: a list at an older exact resourceVersion is served from the
current state unless it is older than the compaction point (then 410). A
continue token names the first page's resourceVersion and the last key
returned; the next page is the current state after that key (the real server
serves the first page's snapshot), carries the first page's resourceVersion,
and is 410 Expired once that is older than the last `compact()`.

Fault injection: `fail_next`, `delay`, `drop_watches`, `watch_fault` (watches that
end at once, hang, or stream bytes with no newline); every request is logged
in `requests` as (method, path, query).

    with FakeApiServer() as api:
        api.create({"kind": "Service", "metadata": {"name": "a"}, "spec": {}})
        core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(api.configuration()))
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ipvsproxy.sources.apiclient import ApiClient

if TYPE_CHECKING:
    import kubernetes.client

Obj = dict[str, Any]
Matcher = Callable[[Obj], bool]


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("Service", "v1", "services", True),
        Kind("Endpoints", "v1", "endpoints", True),
        Kind("Node", "v1", "nodes", False),
        Kind("Event", "v1", "events", True),
        Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True),
    )
}
# (URL prefix, plural) -> (kind, apiVersion served there)
ROUTES: dict[tuple[str, str], tuple[str, str]] = {
    ("/api/v1", "services"): ("Service", "v1"),
    ("/api/v1", "endpoints"): ("Endpoints", "v1"),
    ("/api/v1", "nodes"): ("Node", "v1"),
    ("/api/v1", "events"): ("Event", "v1"),
    ("/apis/discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", "discovery.k8s.io/v1"),
    ("/apis/events.k8s.io/v1", "events"): ("Event", "events.k8s.io/v1"),
}
_PATH = re.compile(r"^(/api/v1|/apis/[^/]+/[^/]+)(?:/namespaces/([^/]+))?/([^/]+)(?:/([^/]+))?(?:/status)?$")
_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict",
            410: "Expired", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable", 504: "Timeout"}


def status(code: int, message: str, reason: str | None = None) -> Obj:
    """A k8s Status object, as the API server returns for errors."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason or _REASONS.get(code, "Unknown"), "code": code}


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.body = code, status(code, message, reason)


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def selector(label_selector: str | None = None, field_selector: str | None = None) -> Matcher:
    """Equality-based selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k` (labels); `path=v`, `path!=v` (fields)."""
    tests: list[Matcher] = []
    for source, is_label in ((label_selector, True), (field_selector, False)):
        for term in filter(None, (t.strip() for t in (source or "").split(","))):
            m = re.fullmatch(r"(!?)([^=!]+?)\s*(?:(==|=|!=)\s*(.*))?", term)
            if not m:
                raise ApiError(400, f"unable to parse selector term {term!r}")
            neg, key, op, want = m.groups()

            def get(o: Obj, key: str = key, is_label: bool = is_label) -> Any:
                if is_label:
                    return (o.get("metadata", {}).get("labels") or {}).get(key)
                value = _lookup(o, key)
                return "" if value is None else str(value)

            if op is None:
                tests.append(lambda o, get=get, neg=neg: (get(o) is None) == bool(neg))
            else:
                tests.append(lambda o, get=get, want=want, eq=op != "!=": (get(o) == want) == eq)
    return lambda o: all(t(o) for t in tests)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patch; lists are replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 JSON patch: add, replace, remove, test."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        try:
            parent: Any = doc
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            last: Any = parts[-1]
            if isinstance(parent, list):
                last = len(parent) if last == "-" else int(last)
            if op["op"] == "test":
                if parent[last] != op["value"]:
                    raise ApiError(422, f"test failed at {op['path']}")
            elif op["op"] == "remove":
                del parent[last]
            elif op["op"] == "add" and isinstance(parent, list):
                parent.insert(last, op["value"])
            elif op["op"] in ("add", "replace"):
                parent[last] = op["value"]
            else:
                raise ApiError(422, f"unsupported patch op {op['op']!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(422, f"cannot apply {op}: {e!r}") from e
    return doc


@dataclass(eq=False)
class _Watch:
    kind: str
    matches: Matcher
    sock: socket.socket
    pending: deque[tuple[str, Obj]] = field(default_factory=deque)
    dropped: bool = False


def _event(typ: str, old: Obj | None, new: Obj, matches: Matcher) -> tuple[str, Obj] | None:
    """What a watch with this selector sees of a write (None: nothing)."""
    if typ != "MODIFIED":
        return (typ, new) if matches(new) else None
    was, now = old is not None and matches(old), matches(new)
    if was and now:
        return ("MODIFIED", new)
    return ("ADDED", new) if now else ("DELETED", new) if was else None


def _today() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _QuietServer(ThreadingHTTPServer):
    """Clients dropping their connections (what the tests provoke) is not an error worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeApiServer:
    """A thread-safe in-memory API server on 127.0.0.1; use as a context manager."""

    def __init__(self, bookmark_interval: float = 0.2, timeout_scale: float = 1.0) -> None:
        """timeout_scale multiplies a watch's timeoutSeconds (the client only takes whole seconds)."""
        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in KINDS}
        self._history: list[tuple[int, str, str, Obj | None, Obj]] = []  # rv, kind, type, old, new
        self._rv = 1
        self._compacted = 0
        self._watches: set[_Watch] = set()
        self._conns: set[socket.socket] = set()
        self._faults: list[list[Any]] = []  # [remaining, status, path_contains, retry_after]
        self._delays: dict[str | None, float] = {}
        self._watch_faults: dict[str | None, str] = {}  # path_contains -> "empty" | "hang" | "flood"
        self._posted: list[tuple[str, str, Obj]] = []
        self._stopping = False
        self.bookmark_interval = bookmark_interval
        self.timeout_scale = timeout_scale
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, in the order of `requests`
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeApiServer:
        api = self

        class Handler(_Handler):
            server_api = api

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
        self.drop_watches()
        with self._cond:
            for sock in list(self._conns):
                _shutdown(sock)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def client(self) -> ApiClient:
        """The agent's own API client, for this server."""
        return ApiClient(self.url)

    def configuration(self) -> kubernetes.client.Configuration:
        """The official client's configuration (an independent client: tests of this server)."""
        import kubernetes.client

        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        cfg.verify_ssl = False
        return cfg

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> str:
        """Write a kubeconfig (JSON is YAML) for this server: no auth, insecure. Returns path."""
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
               "users": [{"name": "fake", "user": {}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}]}
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        return str(path)

    # ---- fault injection -------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 500, path_contains: str | None = None,
                  retry_after: int | None = None) -> None:
        """The next n requests whose "path?query" contains path_contains get a Status error."""
        with self._cond:
            self._faults.append([n, status, path_contains, retry_after])

    def delay(self, seconds: float, path_contains: str | None = None) -> None:
        """Delay every matching request by seconds from now on (0 removes the delay)."""
        with self._cond:
            if seconds > 0:
                self._delays[path_contains] = seconds
            else:
                self._delays.pop(path_contains, None)

    def watch_fault(self, mode: str | None, path_contains: str | None = None) -> None:
        """From now on, matching watches: "empty" (200, then the stream ends at once with no
        event), "hang" (200, then nothing: no event, bookmark or end, whatever timeoutSeconds
        says), "flood" (200, then bytes with no newline until the client goes); None clears."""
        assert mode in (None, "empty", "hang", "flood")
        with self._cond:
            if mode is None:
                self._watch_faults.pop(path_contains, None)
            else:
                self._watch_faults[path_contains] = mode
            self._cond.notify_all()

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()
            self._delays.clear()
            self._watch_faults.clear()
            self._cond.notify_all()

    def set_bookmark_interval(self, seconds: float) -> None:
        with self._cond:
            self.bookmark_interval = seconds
            self._cond.notify_all()

    def drop_watches(self) -> int:
        """Abruptly close every open watch connection (no terminating chunk). Returns how many."""
        with self._cond:
            for w in self._watches:
                w.dropped = True
                _shutdown(w.sock)
            dropped = len(self._watches)
            self._watches.clear()
            self._cond.notify_all()
            return dropped

    def open_watches(self) -> int:
        with self._cond:
            return len(self._watches)

    def wait_for_watches(self, n: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least n watches are open (registered and replayed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._watches) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        with self._cond:
            return sum(1 for m, p, _ in self.requests
                       if (method is None or m == method) and (path_contains is None or path_contains in p))

    # ---- control API (objects are plain dicts) ---------------------------------------------------
    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def create(self, obj: Obj) -> Obj:
        with self._cond:
            return self._create(copy.deepcopy(obj))

    def update(self, obj: Obj) -> Obj:
        """Replace an existing object (no resourceVersion check); bumps the resourceVersion."""
        with self._cond:
            return self._replace(copy.deepcopy(obj), check_rv=False)

    def apply(self, obj: Obj) -> Obj:
        with self._cond:
            spec, ns, name = self._key(copy.deepcopy(obj))
            exists = (ns, name) in self._objects[spec.kind]
            return self.update(obj) if exists else self.create(obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj:
        with self._cond:
            ns = namespace or "default" if KINDS[kind].namespaced else ""
            old = self._objects[kind].get((ns, name))
            if old is None:
                raise KeyError(f"{kind} {ns}/{name} not found")
            return self._commit(kind, "DELETED", old, copy.deepcopy(old))

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        with self._cond:
            ns = namespace or "default" if KINDS[kind].namespaced else ""
            return copy.deepcopy(self._objects[kind].get((ns, name)))

    def list(self, kind: str) -> list[Obj]:
        with self._cond:
            return [copy.deepcopy(o) for _, o in sorted(self._objects[kind].items())]

    def events_posted(self) -> list[Obj]:
        """Events created over HTTP (core or events.k8s.io), in order, as they are now (or were last)."""
        with self._cond:
            return [copy.deepcopy(self._objects["Event"].get((ns, name), snap)) for ns, name, snap in self._posted]

    def compact(self) -> str:
        """Forget history up to now: watches from an older resourceVersion get 410 Expired."""
        with self._cond:
            self._compacted = self._rv
            self._history.clear()
            return str(self._rv)

    # ---- store internals (call with the lock held) -----------------------------------------------
    def _key(self, obj: Obj) -> tuple[Kind, str, str]:
        spec = KINDS.get(obj.get("kind", ""))
        if spec is None:
            raise ApiError(400, f"unknown kind {obj.get('kind')!r}")
        meta = obj.setdefault("metadata", {})
        if not spec.namespaced:
            meta.pop("namespace", None)
        ns = meta.setdefault("namespace", "default") if spec.namespaced else ""
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, f"{spec.kind} metadata.name: Required value")
        return spec, ns, meta["name"]

    def _create(self, obj: Obj) -> Obj:
        spec, ns, name = self._key(obj)
        if (ns, name) in self._objects[spec.kind]:
            raise ApiError(409, f'{spec.plural} "{name}" already exists', "AlreadyExists")
        obj.setdefault("apiVersion", spec.api_version)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_today())
        return self._commit(spec.kind, "ADDED", None, obj)

    def _replace(self, obj: Obj, check_rv: bool) -> Obj:
        spec, ns, name = self._key(obj)
        old = self._objects[spec.kind].get((ns, name))
        if old is None:
            raise ApiError(404, f'{spec.plural} "{name}" not found')
        want = obj["metadata"].get("resourceVersion")
        if check_rv and want and want != old["metadata"]["resourceVersion"]:
            raise ApiError(409, f'Operation cannot be fulfilled on {spec.plural} "{name}": the object has been '
                                "modified; please apply your changes to the latest version and try again")
        obj.setdefault("apiVersion", old.get("apiVersion", spec.api_version))
        for keep in ("uid", "creationTimestamp"):
            obj["metadata"][keep] = old["metadata"][keep]
        return self._commit(spec.kind, "MODIFIED", old, obj)

    def _commit(self, kind: str, typ: str, old: Obj | None, new: Obj) -> Obj:
        self._rv += 1
        new.setdefault("kind", kind)
        new["metadata"]["resourceVersion"] = str(self._rv)
        key = (new["metadata"].get("namespace", ""), new["metadata"]["name"])
        if typ == "DELETED":
            self._objects[kind].pop(key, None)
        else:
            self._objects[kind][key] = new
        self._history.append((self._rv, kind, typ, old, new))
        for w in self._watches:
            ev = _event(typ, old, new, w.matches) if w.kind == kind else None
            if ev:
                w.pending.append(ev)
        self._cond.notify_all()
        return copy.deepcopy(new)

    # ---- HTTP ------------------------------------------------------------------------------------
    def _handle(self, h: _Handler, method: str) -> None:
        url = urlsplit(h.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        target = f"{path}?{url.query}"
        with self._cond:
            self.requests.append((method, path, query))
            self.headers.append(dict(h.headers.items()))
            fault = next((f for f in self._faults if f[2] is None or f[2] in target), None)
            if fault:
                fault[0] -= 1
                if fault[0] <= 0:
                    self._faults.remove(fault)
            pause = max((s for pc, s in self._delays.items() if pc is None or pc in target), default=0.0)
        if pause:
            time.sleep(pause)
        if fault:
            extra = {"Retry-After": str(fault[3])} if fault[3] is not None else {}
            return h.send_json(fault[1], status(fault[1], f"injected failure ({fault[1]})"), extra)
        try:
            result = self._route(h, method, path, query, raw)
        except ApiError as e:
            result = (e.code, e.body)
        if result is not None:
            h.send_json(*result)

    def _route(self, h: _Handler, method: str, path: str, q: dict[str, str], raw: bytes) -> tuple[int, Any] | None:
        if method == "GET" and path in ("/version", "/api", "/apis", "/healthz", "/readyz", "/livez"):
            return 200, self._discovery(path)
        if method == "GET" and any(path == prefix for prefix, _ in ROUTES):
            return 200, self._resources(path)
        m = _PATH.match(path)
        route = ROUTES.get((m.group(1), m.group(3))) if m else None
        if not m or not route:
            raise ApiError(404, f"the server could not find the requested resource ({path})")
        kind, api_version = route
        spec, ns, name = KINDS[kind], m.group(2), m.group(4)
        if ns and not spec.namespaced:
            raise ApiError(404, f"{spec.plural} is not namespaced")
        if name is None and method == "GET":
            if q.get("watch", "").lower() in ("true", "1"):
                self._watch(h, kind, api_version, ns, q)
                return None
            return 200, self._list(kind, api_version, ns, q)
        try:
            body = json.loads(raw) if raw else None
        except ValueError as e:
            raise ApiError(400, f"invalid JSON body: {e}") from e
        with self._cond:
            if name is None and method == "POST":
                if not isinstance(body, dict):
                    raise ApiError(400, "body must be an object")
                body.setdefault("kind", kind)
                body.setdefault("apiVersion", api_version)
                body.setdefault("metadata", {})
                if ns:
                    body["metadata"]["namespace"] = ns
                obj = self._create(body)
                if kind == "Event":
                    self._posted.append((obj["metadata"]["namespace"], obj["metadata"]["name"], obj))
                return 201, obj
            if name is None:
                raise ApiError(405, f"{method} is not allowed on a collection")
            key = (ns or "default" if spec.namespaced else "", name)
            old = self._objects[kind].get(key)
            if old is None and method != "PUT":
                raise ApiError(404, f'{spec.plural} "{name}" not found')
            if method == "GET":
                return 200, copy.deepcopy(old)
            if method == "DELETE":
                return 200, self._commit(kind, "DELETED", old, copy.deepcopy(old))
            if method == "PATCH":
                ctype = h.headers.get("Content-Type", "")
                if isinstance(body, list) or "json-patch" in ctype:
                    body = json_patch(old, body or [])
                else:
                    body = merge_patch(copy.deepcopy(old), body or {})
            if not isinstance(body, dict):
                raise ApiError(400, "body must be an object")
            body.setdefault("kind", kind)
            body.setdefault("metadata", {}).update(name=name)
            if spec.namespaced:
                body["metadata"]["namespace"] = key[0]
            return 200, self._replace(body, check_rv=True)

    def _list(self, kind: str, api_version: str, ns: str | None, q: dict[str, str]) -> Obj:
        matches = selector(q.get("labelSelector"), q.get("fieldSelector"))
        with self._cond:
            rv = q.get("resourceVersion", "")
            if rv not in ("", "0") and q.get("resourceVersionMatch") == "Exact" and _int(rv) < self._compacted:
                raise ApiError(410, f"too old resource version: {rv} ({self._compacted})", "Expired")
            items = [(key, o) for key, o in sorted(self._objects[kind].items()) if ns in (None, key[0]) and matches(o)]
            snapshot, after = self._rv, None
            if q.get("continue"):
                snapshot, after = _decode_continue(q["continue"])
                if snapshot < self._compacted:
                    raise ApiError(410, "The provided continue parameter is too old to display a consistent list "
                                        "result. You can start a new list without the continue parameter.", "Expired")
                items = [(key, o) for key, o in items if key > after]
            meta: Obj = {"resourceVersion": str(snapshot)}
            limit = _int(q.get("limit") or "0")
            page = items[:limit] if limit > 0 else items
            if limit > 0 and limit < len(items):
                meta.update({"continue": _encode_continue(snapshot, page[-1][0]),
                             "remainingItemCount": len(items) - limit})
            # Shared, not copied: a stored object is never changed in place (every write stores a
            # new one, _commit), so the page is encoded after the lock is released as it stands now.
            # A deep copy per item was most of a list's time (1,000 Services x 10: ~0.4 s on the host).
            out = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for _, o in page]
            return {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": out}

    def _watch(self, h: _Handler, kind: str, api_version: str, ns: str | None, q: dict[str, str]) -> None:
        sel = selector(q.get("labelSelector"), q.get("fieldSelector"))
        w = _Watch(kind, lambda o: ns in (None, o["metadata"].get("namespace")) and sel(o), h.connection)
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = float(q["timeoutSeconds"]) * self.timeout_scale if q.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout is not None else None
        rv = q.get("resourceVersion", "")
        from_rv = _int(rv) if rv else 0
        h.start_stream()
        path = urlsplit(h.path).path
        with self._cond:
            mode = next((m for pc, m in self._watch_faults.items() if pc is None or pc in path), None)
        if mode is not None:
            self._faulty_watch(h, w, mode)
            return
        with self._cond:
            if rv in ("", "0"):
                w.pending.extend(("ADDED", o) for _, o in sorted(self._objects[kind].items()) if w.matches(o))
            elif from_rv < self._compacted:
                expired = status(410, f"too old resource version: {rv} ({self._compacted})", "Expired")
                h.write_chunk(_line("ERROR", expired))
                h.end_stream()
                return
            else:
                for hrv, hkind, typ, old, new in self._history:
                    ev = _event(typ, old, new, w.matches) if hrv > from_rv and hkind == kind else None
                    if ev:
                        w.pending.append(ev)
            self._watches.add(w)
            self._cond.notify_all()
        last_bookmark = time.monotonic()
        try:
            while True:
                with self._cond:
                    while not (w.pending or w.dropped or self._stopping):
                        wake = [deadline] if deadline else []
                        if bookmarks and self.bookmark_interval > 0:
                            wake.append(last_bookmark + self.bookmark_interval)
                        left = min(wake) - time.monotonic() if wake else 1.0
                        if left <= 0:
                            break
                        self._cond.wait(min(left, 1.0))
                    batch = [(typ, copy.deepcopy(o)) for typ, o in w.pending]
                    w.pending.clear()
                    dropped, current = w.dropped or self._stopping, str(self._rv)
                if dropped:
                    h.close_connection = True
                    return
                for typ, obj in batch:
                    h.write_chunk(_line(typ, obj))
                now = time.monotonic()
                if deadline and now >= deadline:
                    break
                interval = self.bookmark_interval
                if bookmarks and not batch and interval > 0 and now >= last_bookmark + interval:
                    mark = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": current}}
                    h.write_chunk(_line("BOOKMARK", mark))
                    last_bookmark = now
            h.end_stream()
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(w)

    def _faulty_watch(self, h: _Handler, w: _Watch, mode: str) -> None:
        with self._cond:
            self._watches.add(w)
            self._cond.notify_all()
        try:
            if mode == "empty":
                h.end_stream()
                return
            junk = b"x" * 65536
            while True:
                with self._cond:
                    if w.dropped or self._stopping:
                        h.close_connection = True
                        return
                    if mode == "hang":
                        self._cond.wait(0.5)
                        continue
                h.write_chunk(junk)
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(w)

    def _discovery(self, path: str) -> Any:
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "0" * 40,
                    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
                    "compiler": "gc", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.url[7:]}]}
        if path == "/apis":
            groups = sorted({p.split("/")[2] for p, _ in ROUTES if p.startswith("/apis/")})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]}
        return "ok"

    def _resources(self, prefix: str) -> Obj:
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        resources = [{"name": plural, "singularName": "", "namespaced": KINDS[kind].namespaced, "kind": kind,
                      "verbs": verbs} for (p, plural), (kind, _) in ROUTES.items() if p == prefix]
        group_version = "v1" if prefix == "/api/v1" else prefix.removeprefix("/apis/")
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise ApiError(400, f"invalid integer {value!r}") from e


def _encode_continue(rv: int, key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([rv, *key]).encode()).decode()


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        rv, ns, name = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(rv), (str(ns), str(name))
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"invalid continue token {token!r}") from e


def _line(typ: str, obj: Obj) -> bytes:
    return json.dumps({"type": typ, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_api: FakeApiServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK stall every response ~40 ms (the real API server sets it too)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server_api._cond:
            self.server_api._conns.add(self.connection)

    def finish(self) -> None:
        with self.server_api._cond:
            self.server_api._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _dispatch(self) -> None:
        try:
            self.server_api._handle(self, self.command)
        except OSError:  # the client went away (or drop_watches/stop shut the socket)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch
