"""The Kubernetes API source: list + watch Services, endpoints and this Node.

Makes raw GETs by path through the project's own small client
(sources/apiclient.py: configuration, TLS, tokens) and reads the JSON itself:
the official client's model objects cost ~3x the memory of plain dicts and ~7x
the time (measured at 10,000 Services), importing that client alone cost ~22 MiB,
the tracker keeps only compact records anyway, and one code path then serves every
endpoints API generation: discovery.k8s.io/v1 EndpointSlices, v1beta1 ones
(Kubernetes 1.17-1.24; read as v1) or core/v1 Endpoints, the newest the server
lists in API discovery unless --endpoints-source says otherwise.

Each kind runs its own list-then-watch loop, held to client-go's reflector:
- the first list asks for resourceVersion=0, which the API server answers from
  its watch cache instead of a quorum read of etcd; a relist after a 410 reads
  etcd, paged (`limit` + `continue`, each page filed as it arrives), and a
  continue token that expires mid-list falls back to one unpaged list;
- the resourceVersion of every event and bookmark is remembered at once, so a
  watch that breaks resumes where it stopped (no replay, no relist); a 410 Gone
  (in the stream or as the HTTP status) relists, and the tracker drops what the
  listing no longer has, so deletions missed meanwhile are caught;
- each watch asks for its own length, 1-2x WATCH_TIMEOUT (5-10 minutes), so
  nodes do not reconnect in lockstep; a stream silent for WATCH_IDLE_TIMEOUT is
  cut and resumed (a hung server is noticed); a watch that ends at once with no
  event is an error; one line longer than MAX_LINE cuts the stream;
- connection losses, 5xx and 429 retry with exponential backoff and jitter
  (Retry-After honoured) while the kernel keeps serving the last good state; a
  refusal (403, 404) is one ERROR line per reason, retried, and reported to
  /healthz through `blocked()` until it clears;
- stop() returns within its timeout even while requests hang (threads are
  daemons), so SIGTERM ends the agent well within a pod's grace period.

Without --kubeconfig the agent uses in-cluster credentials, addressed to
--api-server when given: the in-cluster address is the `kubernetes` Service's
ClusterIP, which a node without kube-proxy reaches only once ipvsproxy itself
has programmed it; when it cannot be connected to, one line says what to set.

Warning Events are posted from a background thread (a slow API server never
holds up a sync), at most once per object version and message.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import os
import queue
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import tenacity

from ..objects import Service, proxy_name_selector
from ..tracker import WATCHED_KINDS, Tracker, object_key
from .apiclient import ApiClient, ApiError, ConfigError, NotInCluster, from_kubeconfig, host_url, in_cluster

log = logging.getLogger(__name__)

# Defaults, read when a KubeSource is made (unless its Timing says otherwise).
WATCH_TIMEOUT = 300  # shortest watch asked for: each asks for this x uniform(1, 2) (client-go: 5-10 minutes)
WATCH_IDLE_TIMEOUT = 60.0  # a watch stream silent this long is cut and resumed (a hung server is noticed)
SHORT_WATCH = 1.0  # a watch that ends cleanly this soon with no event is an error (client-go's "very short watch")
MAX_LINE = 16 << 20  # longest watch line (one event) read; longer ones cut the stream
PAGE_SIZE = 500  # objects per list page
INITIAL_BACKOFF = 0.2  # first retry after a failure, doubling up to MAX_BACKOFF
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 60.0  # longest Retry-After we honour
EVENT_QUEUE = 512  # Events waiting to be posted; more are dropped (and logged)


def wait_for_stop(stop: threading.Event, seconds: float) -> bool:
    """The real pause: `seconds`, or less when the source stops (then True)."""
    return stop.wait(seconds)


# How a source waits between attempts: (its stop event, seconds) -> True when it stopped meanwhile.
Pause = Callable[[threading.Event, float], bool]


@dataclass(frozen=True)
class Timing:
    """How a source paces itself, passed in: the backoff and watch length (None:
    the module's defaults above), every pause between attempts, the random
    spread of watch lengths and jitter, and the clock that times a watch. Tests
    pass a pause that records what was asked and returns at once (and may pass
    a seeded random source), so backoff is checked without waiting for it."""

    initial_backoff: float | None = None
    max_backoff: float | None = None
    watch_timeout: int | None = None
    pause: Pause = wait_for_stop
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic


class Gone(Exception):
    """410: our resourceVersion is too old; relist."""


class Stopped(Exception):
    """stop() was called while waiting to retry."""


class Transient(Exception):
    """A failure worth retrying (connection lost, 5xx, 429, bad stream)."""


class Idle(Exception):
    """A watch stream was silent for the idle timeout: resume at once on a new one."""


def _chain(exc: BaseException, then: Callable[[BaseException], BaseException | None]) -> Iterator[BaseException]:
    """An exception and those behind it (each once), following `then` from one to the next."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = then(e)


def _read_timeout(exc: BaseException) -> bool:
    """A socket read timed out (urllib3 wraps it in ReadTimeoutError or ProtocolError)."""
    def then(e: BaseException) -> BaseException | None:
        nested = next((a for a in getattr(e, "args", ()) if isinstance(a, BaseException)), None)
        return e.__cause__ or e.__context__ or nested

    return any(type(e).__name__ in ("ReadTimeoutError", "TimeoutError") or isinstance(e, TimeoutError)
               for e in _chain(exc, then))


class EndpointsSource(enum.Enum):
    """Where endpoints come from: the newest API generation the server serves, unless told."""

    V1 = "v1"  # discovery.k8s.io/v1 EndpointSlices (Kubernetes 1.21+)
    V1BETA1 = "v1beta1"  # discovery.k8s.io/v1beta1 EndpointSlices (1.17-1.24)
    ENDPOINTS = "endpoints"  # core/v1 Endpoints (every cluster)

    @classmethod
    def parse(cls, text: str) -> EndpointsSource | None:
        """'auto' (None: ask API discovery) or one of the values; ValueError otherwise."""
        if text == "auto":
            return None
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"invalid endpoints source {text!r} (auto, v1, v1beta1 or endpoints)") from None


HOSTNAME_LABEL = "kubernetes.io/hostname"


def from_v1beta1(obj: Any) -> Any:
    """A discovery.k8s.io/v1beta1 EndpointSlice read as v1: an endpoint's node is
    `nodeName` when set (1.20+, behind a feature gate until 1.21), else its
    `topology["kubernetes.io/hostname"]` (what kube-proxy 1.20 compared with its
    node). v1beta1 has no serving/terminating conditions or hints to carry over."""
    eps = obj.get("endpoints") if isinstance(obj, dict) else None
    for e in eps if isinstance(eps, list) else ():
        if isinstance(e, dict) and not e.get("nodeName"):
            topo = e.get("topology")
            host = topo.get(HOSTNAME_LABEL) if isinstance(topo, dict) else None
            if isinstance(host, str) and host:
                e["nodeName"] = host
    return obj


@dataclass(frozen=True, slots=True)
class Resource:
    """One collection to list and watch: the tracker kind its objects are filed
    as, the API path, and how an object is read (v1beta1 slices are converted)."""

    kind: str
    path: str
    field_selector: str | None = None
    api_version: str = "v1"
    label_selector: str | None = None
    convert: Callable[[Any], Any] | None = None


def endpoints_resource(source: EndpointsSource) -> Resource:
    if source is EndpointsSource.V1:
        return Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", api_version="discovery.k8s.io/v1")
    if source is EndpointsSource.V1BETA1:
        return Resource("EndpointSlice", "/apis/discovery.k8s.io/v1beta1/endpointslices",
                        api_version="discovery.k8s.io/v1beta1", convert=from_v1beta1)
    return Resource("Endpoints", "/api/v1/endpoints")


def choose_endpoints_source(apis: Any) -> EndpointsSource:
    """The newest endpoints API an /apis discovery document lists."""
    groups = apis.get("groups") if isinstance(apis, dict) else None
    versions: set[str] = set()
    for g in groups if isinstance(groups, list) else ():
        if isinstance(g, dict) and g.get("name") == "discovery.k8s.io":
            versions = {str(v.get("version")) for v in g.get("versions") or () if isinstance(v, dict)}
    for source in (EndpointsSource.V1, EndpointsSource.V1BETA1):
        if source.value in versions:
            return source
    return EndpointsSource.ENDPOINTS


@dataclass(slots=True)
class _Cursor:
    """Where one kind's loop stands: the resourceVersion to watch from (None:
    list first) and whether the current watch has delivered anything."""

    rv: str | None = None
    progress: bool = False
    expired: bool = False  # the last watch got a 410: the next list reads etcd, not the watch cache


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # token + ca.crt in a pod


def split_api_server(url: str) -> tuple[str, str, str]:
    """'https://HOST:PORT' (or HOST:PORT, HOST) -> (scheme, host, port); ValueError if unusable."""
    text = url.strip()
    parts = urllib.parse.urlsplit(text if "://" in text else "https://" + text)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"invalid API server address {url!r}: bad port") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"invalid API server address {url!r} (example: https://192.0.2.10:6443)")
    return parts.scheme, parts.hostname, str(port)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """How the API server is reached: the client, and whether its address is the
    in-cluster one (the `kubernetes` Service's ClusterIP, which only a service proxy
    makes reachable: on a node where that is ipvsproxy, it may not be yet)."""

    api: ApiClient
    cluster_ip: bool = False


def load_api(kubeconfig: str | None = None, api_server: str | None = None) -> ApiConfig:
    """--kubeconfig (its server replaced by --api-server when given); else in-cluster
    credentials with --api-server's address, or the ClusterIP from the environment;
    else $KUBECONFIG / ~/.kube/config."""
    if kubeconfig is None:
        environ: Mapping[str, str] = os.environ
        if api_server:
            scheme, host, port = split_api_server(api_server)
            if scheme != "https":
                raise RuntimeError(f"--api-server {api_server}: in a cluster the service-account token "
                                   "is only sent over https")
            environ = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        try:
            return ApiConfig(in_cluster(SERVICE_ACCOUNT_DIR, environ), cluster_ip=not api_server)
        except NotInCluster:
            pass
        except ConfigError as exc:
            raise RuntimeError(str(exc)) from None
    try:
        api = from_kubeconfig(kubeconfig, server=host_url(*split_api_server(api_server)) if api_server else None)
    except ConfigError as exc:
        raise RuntimeError(
            f"no Kubernetes API configuration: {exc} (run in a cluster, pass --kubeconfig, "
            "or use --from-file)") from None
    return ApiConfig(api)


def _connect_failure(exc: BaseException) -> bool:
    """The TCP connection itself failed (refused, no route, timed out connecting)."""
    def then(e: BaseException) -> BaseException | None:
        reason = getattr(e, "reason", None)
        return reason if isinstance(reason, BaseException) else (e.__cause__ or e.__context__)

    return any(type(e).__name__ in ("NewConnectionError", "ConnectTimeoutError")
               or isinstance(e, ConnectionRefusedError) for e in _chain(exc, then))


_FORBIDDEN = re.compile(r'cannot (\S+) resource "([^"]+)"(?: in API group "([^"]*)")?')


def describe(exc: BaseException) -> str:
    """One line for a log or /healthz: an API error's status and its Status message."""
    if isinstance(exc, ApiError):
        message = ""
        try:
            body = json.loads(exc.body) if exc.body else None
            message = str(body.get("message") or "") if isinstance(body, dict) else ""
        except ValueError:
            message = str(exc.body or "")[:200]
        text = f"{exc.status} {exc.reason or ''}".strip() + (f": {message}" if message else "")
        if exc.status == 403:
            m = _FORBIDDEN.search(message)
            if m:
                verb, resource, group = m.group(1), m.group(2), m.group(3) or ""
                text += (f" (the agent's ClusterRole needs verb {verb!r} on resource {resource!r}"
                         f"{f' in API group {group!r}' if group else ''})")
        return text
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.status is None or exc.status in (0, 408, 429) or exc.status >= 500
    return isinstance(exc, Transient | OSError | ValueError) or type(exc).__module__.startswith("urllib3")


def _gone(exc: BaseException) -> bool:
    return isinstance(exc, Gone) or (isinstance(exc, ApiError) and exc.status == 410)


def _retry_after(exc: BaseException | None) -> float:
    headers = getattr(exc, "headers", None) if isinstance(exc, ApiError) else None
    try:
        return min(float(headers.get("Retry-After") or 0), MAX_RETRY_AFTER) if headers else 0.0
    except (TypeError, ValueError):
        return 0.0


class KubeSource:
    """Feeds a Tracker from the API server until stop()."""

    kinds = WATCHED_KINDS

    def __init__(
        self,
        tracker: Tracker,
        node_name: str,
        *,
        kubeconfig: str | None = None,
        api_server: str | None = None,
        api_client: ApiClient | None = None,
        timing: Timing | None = None,
        page_size: int | None = None,
        endpoints_source: EndpointsSource | None = None,
        idle_timeout: float | None = None,
        service_proxy_name: str = "",
    ) -> None:
        self.tracker, self.node_name = tracker, node_name
        loaded = ApiConfig(api_client) if api_client is not None else load_api(kubeconfig, api_server)
        self.api, self.via_cluster_ip = loaded.api, loaded.cluster_ip
        self._route_hint = False  # the "set --api-server" line was logged
        self._blocked: dict[str, str] = {}  # role -> why it cannot list/watch (e.g. 403), until it can
        self.on_blocked: Callable[[str], None] | None = None  # told each new reason (the agent's /healthz)
        timing = timing or Timing()
        self.watch_timeout = WATCH_TIMEOUT if timing.watch_timeout is None else timing.watch_timeout
        self.max_backoff = MAX_BACKOFF if timing.max_backoff is None else timing.max_backoff
        self.initial_backoff = INITIAL_BACKOFF if timing.initial_backoff is None else timing.initial_backoff
        self._pause, self._rng, self._clock = timing.pause, timing.rng, timing.clock
        self.page_size = PAGE_SIZE if page_size is None else page_size
        self.idle_timeout = WATCH_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.short_watch, self.max_line = SHORT_WATCH, MAX_LINE
        # Another proxy's Services never reach us (kube-proxy's informer label selector).
        self.services = Resource("Service", "/api/v1/services", label_selector=proxy_name_selector(service_proxy_name))
        self.nodes = Resource("Node", "/api/v1/nodes", f"metadata.name={node_name}")
        # None until API discovery has chosen (at the first list), unless given
        self.endpoints_source = endpoints_source
        self.endpoints = endpoints_resource(endpoints_source) if endpoints_source else None
        self.resource_versions: dict[str, str] = {}  # kind -> last resourceVersion seen
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: set[Any] = set()
        self._event_queue: queue.Queue[dict[str, Any]] = queue.Queue(EVENT_QUEUE)
        self._event_thread: threading.Thread | None = None
        self._event_lock = threading.Lock()
        self._warned: dict[tuple[str, str, str, str], str] = {}  # (kind, ns, name, message) -> rv
        self._stats_lock = threading.Lock()
        self.stats = {"lists": 0, "pages": 0, "watches": 0, "relists_410": 0, "reconnects": 0,
                      "errors": 0, "events": 0, "events_posted": 0, "bookmarks": 0,
                      "expired_continues": 0, "idle_timeouts": 0}

    def _count(self, name: str) -> None:
        with self._stats_lock:  # three watch threads and the Event poster share the counters
            self.stats[name] += 1

    # ---- one request each ------------------------------------------------------
    def _get(self, path: str, query: dict[str, Any], timeout: Any) -> Any:
        """A raw GET (the urllib3 response, body unread); ApiError on a non-2xx status."""
        return self.api.request("GET", path, query.items(), timeout=timeout)

    def discover_endpoints(self) -> Resource:
        """The endpoints collection to follow: the one given, else the newest API
        generation the server lists in discovery (v1, v1beta1, then core/v1 Endpoints)."""
        if self.endpoints is not None:
            return self.endpoints
        resp = self._get("/apis", {}, 30)
        try:
            data = json.loads(resp.data)
        finally:
            resp.release_conn()
        source = choose_endpoints_source(data)
        log.info("endpoints from %s (chosen by API discovery; --endpoints-source overrides)",
                 endpoints_resource(source).path)
        self.endpoints_source, self.endpoints = source, endpoints_resource(source)
        return self.endpoints

    @property
    def resources(self) -> tuple[Resource, ...]:
        eps = (self.endpoints,) if self.endpoints is not None else ()
        return (self.services, *eps, self.nodes)

    def _file(self, res: Resource, obj: Any) -> None:
        self.tracker.upsert(res.kind, res.convert(obj) if res.convert else obj)

    def _list(self, res: Resource, from_cache: bool = True) -> str:
        """List one kind page by page, filing each page as it comes; returns the
        listing's resourceVersion (the first page's: later changes replay on the watch).

        from_cache: resourceVersion=0, which the API server answers from its watch cache
        (where client-go's reflector lists), not with a quorum read of etcd; a relist
        after a 410 reads etcd, since the cache may be what is behind."""
        seen: set[tuple[str, str]] = set()
        rv: str | None = None
        token: str | None = None
        paged = self.page_size > 0
        while True:
            query: dict[str, Any] = {"continue": token, "fieldSelector": res.field_selector,
                                     "labelSelector": res.label_selector,
                                     "limit": self.page_size if paged else None,
                                     "resourceVersion": "0" if from_cache and not token else None}
            try:
                resp = self._get(res.path, query, 60)
            except ApiError as exc:
                if token and exc.status == 410:
                    # The continue token expired (etcd compacted past the list's snapshot). Like
                    # client-go's pager, list everything in one request: paging again from the start
                    # can expire again, and again, and never complete.
                    log.info("list %s: continue token expired after %d objects; listing all in one request",
                             res.kind, len(seen))
                    self._count("expired_continues")
                    seen, rv, token, paged = set(), None, None, False
                    continue
                raise
            try:
                data = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(data, dict):
                raise Transient(f"list {res.kind}: not a list object")
            self._count("pages")
            meta = data.get("metadata") or {}
            if rv is None:
                rv = str(meta.get("resourceVersion") or "")
            for obj in data.get("items") or []:
                seen.add(object_key(obj))
                self._file(res, obj)
            del data
            token = meta.get("continue") or None
            if not token:
                break
        self.tracker.finish_listing(res.kind, seen)
        self._unblock(self._role(res))
        if res.kind == "Endpoints":  # core/v1 Endpoints stand in for slices: the first sync may go
            self.tracker.mark_listed("EndpointSlice")
        self._count("lists")
        self.resource_versions[res.kind] = rv = rv or ""
        return rv

    def _lines(self, resp: Any, kind: str) -> Iterator[bytes]:
        """The stream's lines; one longer than MAX_LINE (a server sending no newline) is an
        error rather than a buffer that grows without end."""
        buf = bytearray()
        for chunk in resp.stream(65536, decode_content=False):
            start = len(buf)
            buf.extend(chunk)
            cut = buf.find(b"\n", start)
            while cut != -1:
                yield bytes(buf[:cut])
                del buf[:cut + 1]
                cut = buf.find(b"\n")
            if len(buf) > self.max_line:
                raise Transient(f"watch {kind}: a line longer than {self.max_line} bytes; stream cut")
        if buf.strip():
            yield bytes(buf)

    def _stream(self, res: Resource, rv: str) -> Iterator[dict[str, Any]]:
        # like client-go's reflector, each watch asks for its own length in [timeout, 2 x timeout),
        # so nodes started together do not reconnect in lockstep
        timeout = int(self.watch_timeout * self._rng.uniform(1.0, 2.0))
        query: dict[str, Any] = {  # in the order the generated client sends them
            "allowWatchBookmarks": "true", "fieldSelector": res.field_selector,
            "labelSelector": res.label_selector, "resourceVersion": rv,
            "timeoutSeconds": timeout, "watch": "true",
        }
        resp = self._get(res.path, query, (10, self.idle_timeout))
        self._unblock(self._role(res))
        self._responses.add(resp)
        self._count("watches")
        ended = False
        started = self._clock()
        events = 0
        try:
            try:
                for line in self._lines(resp, res.kind):
                    if self._stop.is_set():
                        return
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise Transient(f"watch {res.kind}: undecodable line") from None
                    if isinstance(event, dict):
                        events += 1
                        yield event
            except Exception as exc:
                if not _read_timeout(exc) or self._stop.is_set():
                    raise
                # silent for idle_timeout: idle, or a hung server; either way resume on a new stream
                log.debug("watch %s: nothing for %.0fs; resuming on a new stream", res.kind, self.idle_timeout)
                self._count("idle_timeouts")
                raise Idle from None
            ended = True
            if not events and self._clock() - started < self.short_watch:
                raise Transient(f"watch {res.kind}: ended after {self._clock() - started:.2f}s "
                                "with no event (a very short watch)")
        finally:
            self._responses.discard(resp)
            if not ended:  # left mid-stream: the rest is unread, so the connection cannot be reused
                resp.close()
            resp.release_conn()

    def _watch(self, res: Resource, cur: _Cursor) -> None:
        """Follow one watch stream from cur.rv, advancing it with every event and
        bookmark, so a broken stream resumes exactly where it stopped."""
        assert cur.rv is not None
        for event in self._stream(res, cur.rv):
            etype, obj = event.get("type"), event.get("object")
            obj = obj if isinstance(obj, dict) else {}
            m = obj.get("metadata")
            meta: dict[str, Any] = m if isinstance(m, dict) else {}
            if etype == "ERROR":
                code = obj.get("code")
                if code == 410:
                    raise Gone(obj.get("message", "resource version too old"))
                raise Transient(f"watch {res.kind}: {code} {obj.get('message', '')}")
            rv = str(meta.get("resourceVersion") or "") or cur.rv
            if etype in ("ADDED", "MODIFIED"):
                self._count("events")
                self._file(res, obj)
            elif etype == "DELETED":
                self._count("events")
                self.tracker.delete(res.kind, str(meta.get("namespace") or "default"), str(meta.get("name")))
            elif etype == "BOOKMARK":
                self._count("bookmarks")
            else:
                log.debug("watch %s: event type %r ignored", res.kind, etype)
            cur.rv, cur.progress = rv, True
            self.resource_versions[res.kind] = rv

    # ---- the loop ------------------------------------------------------------------
    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Exponential backoff with equal jitter; a Retry-After header wins if longer."""
        step = min(self.max_backoff, self.initial_backoff * 2 ** min(state.attempt_number - 1, 30))
        wait: float = step * self._rng.uniform(0.5, 1.0)
        exc = state.outcome.exception() if state.outcome else None
        return max(wait, _retry_after(exc))

    def list_all(self) -> None:
        """List every kind once (for --once); retries transient failures a few times."""
        for role in self.kinds:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(_transient), stop=tenacity.stop_after_attempt(5),
                wait=self._wait, sleep=self._sleep, reraise=True,
            ):
                with attempt:
                    self._list(self._resource(role))

    @staticmethod
    def _role(res: Resource) -> str:
        return "EndpointSlice" if res.kind == "Endpoints" else res.kind

    def _resource(self, role: str) -> Resource:
        """The collection behind one of `kinds` (endpoints: chosen by discovery the first time)."""
        if role == "Service":
            return self.services
        if role == "Node":
            return self.nodes
        return self.discover_endpoints()

    def _cycle(self, res: Resource | str, cur: _Cursor) -> None:
        """List if needed, then watch until the stream ends. Raises what should
        be retried with backoff; returns when the next watch may start at once."""
        fresh = cur.rv is None
        if isinstance(res, str):
            res = self._resource(res)
        if fresh:
            cur.rv = self._list(res, from_cache=not cur.expired)
            cur.expired = False
        cur.progress = False
        try:
            self._watch(res, cur)
        except Exception as exc:
            if _gone(exc):
                self._count("relists_410")
                cur.rv, cur.expired = None, True
                if fresh and not cur.progress:  # 410 again straight after a list: back off
                    raise Transient(f"watch {res.kind}: 410 right after listing: {exc}") from None
                log.info("watch %s: %s; relisting", res.kind, exc)
                return
            if isinstance(exc, Idle):
                return
            if cur.progress and _transient(exc) and not self._stop.is_set():
                log.info("watch %s broke (%s); resuming from resourceVersion %s", res.kind, exc, cur.rv)
                self._count("reconnects")
                return
            raise

    def _follow(self, role: str) -> None:
        cur = _Cursor()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient), wait=self._wait,
            stop=tenacity.stop_never, sleep=self._sleep, before_sleep=self._log_retry(role),
        )
        while not self._stop.is_set():
            try:
                retrying(self._cycle, role, cur)
            except Stopped:
                return
            except Exception as exc:  # not transient (e.g. 403): say so once, wait, try again
                if self._stop.is_set():
                    return
                self._count("errors")
                if isinstance(exc, ApiError) and exc.status == 404 and role == "EndpointSlice":
                    why = f"the API server does not serve {self._resource(role).path} (see --endpoints-source)"
                else:
                    why = describe(exc)
                self._block(role, f"watch {role}: {why}")
                self._pause(self._stop, self.max_backoff)

    def _block(self, role: str, why: str) -> None:
        """A kind cannot be followed: one ERROR line per new reason (not one per retry)."""
        with self._stats_lock:
            new = self._blocked.get(role) != why
            self._blocked[role] = why
        if new:
            log.error("%s; retrying every %.0fs", why, self.max_backoff)
            if self.on_blocked is not None:
                self.on_blocked(why)
        else:
            log.debug("%s (still)", why)

    def _unblock(self, role: str) -> None:
        with self._stats_lock:
            was = self._blocked.pop(role, None)
        if was is not None:
            log.info("watch %s: works again (was: %s)", role, was)

    def blocked(self) -> str | None:
        """Why a kind cannot be followed (the first), or None: the agent's view is then stale."""
        with self._stats_lock:
            return next(iter(self._blocked.values()), None)

    def _sleep(self, seconds: float) -> None:
        if self._pause(self._stop, seconds):
            raise Stopped

    def _unreachable(self, exc: BaseException | None) -> None:
        """The in-cluster address cannot be connected to: say once what to set."""
        if not self.via_cluster_ip or exc is None or not _connect_failure(exc):
            return
        with self._stats_lock:
            if self._route_hint:
                return
            self._route_hint = True
        log.error("cannot connect to the API server at %s, the in-cluster address (the kubernetes Service's "
                  "ClusterIP, reachable only once a service proxy has programmed it on this node): set "
                  "--api-server=https://HOST:PORT to the API server's own address (chart values "
                  "apiServer.host and apiServer.port)", self.api.host)

    def _log_retry(self, kind: str) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            if self._stop.is_set():
                return
            self._count("errors")
            exc = state.outcome.exception() if state.outcome else None
            self._unreachable(exc)
            log.warning("watch %s failed (%s); retry %d in %.2fs", kind,
                        describe(exc) if exc else "?", state.attempt_number,
                        state.next_action.sleep if state.next_action else 0)
        return before_sleep

    def start(self) -> None:
        for role in self.kinds:
            t = threading.Thread(target=self._follow, args=(role,), name=f"watch-{role}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the watches (open streams are cut) and post what Events are queued, all
        within `timeout` in total: a thread stuck in a request to an API server that is
        gone (a list or connect that will time out much later) is a daemon, left behind,
        so SIGTERM ends the agent well inside a pod's grace period."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        for resp in list(self._responses):
            with contextlib.suppress(Exception):  # already closed is fine
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
        self.flush(timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.info("stopped; %s still waiting on the API server (left behind)", ", ".join(stuck))

    # ---- events --------------------------------------------------------------------
    def post_event(self, svc: Service, reason: str, message: str) -> None:
        """A Warning Event on the Service (kubectl describe svc shows it)."""
        self.post_object_event("Service", svc.namespace, svc.name, reason, message, uid=svc.uid)

    def post_object_event(self, kind: str, namespace: str, name: str, reason: str, message: str,
                          uid: str = "", *, version: str = "") -> None:
        """Queue a Warning Event on an object; the same message for the same object
        `version` (its resourceVersion: e.g. seen again in a relist) is posted once."""
        rv = version
        key = (kind, namespace, name, message)
        with self._event_lock:
            if rv and self._warned.get(key) == rv:
                return
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned[key] = rv
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cluster_scoped = kind == "Node"
        ns = "default" if cluster_scoped else namespace
        slice_version = self.endpoints.api_version if self.endpoints else "discovery.k8s.io/v1"
        involved: dict[str, Any] = {"apiVersion": "v1" if kind != "EndpointSlice" else slice_version,
                                    "kind": kind, "name": name}
        if not cluster_scoped:
            involved["namespace"] = namespace
        if uid:
            involved["uid"] = uid
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": ns},
            "involvedObject": involved,
            "reason": reason, "message": message[:1024], "type": "Warning", "count": 1,
            "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": "ipvsproxy", "host": self.node_name},
            "reportingComponent": "ipvsproxy", "reportingInstance": self.node_name,
        }
        try:
            self._event_queue.put_nowait(body)
        except queue.Full:
            log.warning("Event queue full; %s Event on %s %s/%s dropped", reason, kind, namespace, name)
            return
        with self._event_lock:
            if self._event_thread is None or not self._event_thread.is_alive():
                self._event_thread = threading.Thread(target=self._post_events, name="events", daemon=True)
                self._event_thread.start()

    def _post_events(self) -> None:
        while True:
            try:
                body = self._event_queue.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                ns = urllib.parse.quote(body["metadata"]["namespace"], safe="")
                # read whole: unread, the body would be the next request's on this connection
                self.api.json("POST", f"/api/v1/namespaces/{ns}/events", body=body, timeout=10)
                self._count("events_posted")
            except Exception as exc:  # Events are best effort
                log.warning("could not post %s Event on %s %s: %s", body["reason"],
                            body["involvedObject"]["kind"], body["involvedObject"]["name"], exc)
            finally:
                self._event_queue.task_done()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued Event has been posted (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._event_queue.all_tasks_done:
            while self._event_queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._event_queue.all_tasks_done.wait(left)
        return True
