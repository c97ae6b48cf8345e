"""The Kubernetes API source: list + watch Services, EndpointSlices and this Node.

Uses the official client, but asks for raw responses (`_preload_content=False`)
and reads them with json: the client's model objects cost ~3x the memory of
plain dicts and ~7x the time (../shared/anchors.md), and the tracker keeps
only compact records anyway. Each kind runs its own list-then-watch loop:
the resourceVersion is kept across watches, bookmarks advance it, a 410 Gone
relists (the tracker diffs the listing, so deletions missed are caught), and
connection losses or 5xx retry with exponential backoff and jitter while the
kernel keeps serving the last good state.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import tenacity
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from ..objects import Service
from ..tracker import Tracker

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300  # seconds the server keeps one watch open (it adds jitter itself)


class Gone(Exception):
    """410: our resourceVersion is too old; relist."""


class Stopped(Exception):
    """stop() was called while waiting to retry."""


class Transient(Exception):
    """A failure worth retrying (connection lost, 5xx, 429, bad stream)."""


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    lister: Callable[..., Any]
    field_selector: str | None = None


def load_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster config, else --kubeconfig / $KUBECONFIG / ~/.kube/config."""
    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except config.ConfigException:
            pass
    try:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (config.ConfigException, OSError, TypeError) as exc:
        raise RuntimeError(
            f"no Kubernetes API configuration: {exc} (run in a cluster, pass --kubeconfig, "
            "or use --from-file)") from None
    return client.ApiClient(cfg)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status is None or exc.status in (0, 408, 429) or exc.status >= 500
    return isinstance(exc, Transient | OSError | ValueError) or type(exc).__module__.startswith("urllib3")


class KubeSource:
    """Feeds a Tracker from the API server until stop()."""

    kinds = ("Service", "EndpointSlice", "Node")

    def __init__(
        self,
        tracker: Tracker,
        node_name: str,
        *,
        kubeconfig: str | None = None,
        api_client: client.ApiClient | None = None,
        watch_timeout: int = WATCH_TIMEOUT,
        max_backoff: float = 30.0,
    ) -> None:
        self.tracker, self.node_name = tracker, node_name
        self.api = api_client or load_client(kubeconfig)
        self.core = client.CoreV1Api(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)
        self.watch_timeout, self.max_backoff = watch_timeout, max_backoff
        self.resources = (
            Resource("Service", self.core.list_service_for_all_namespaces),
            Resource("EndpointSlice", self.discovery.list_endpoint_slice_for_all_namespaces),
            Resource("Node", self.core.list_node, f"metadata.name={node_name}"),
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: set[Any] = set()
        self.stats = {"lists": 0, "watches": 0, "relists_410": 0, "errors": 0, "events": 0}

    # ---- one request each ------------------------------------------------------
    def _list(self, res: Resource) -> str:
        kw: dict[str, Any] = {"_preload_content": False, "_request_timeout": 60}
        if res.field_selector:
            kw["field_selector"] = res.field_selector
        resp = res.lister(**kw)
        try:
            data = json.loads(resp.data)
        finally:
            resp.release_conn()
        self.stats["lists"] += 1
        self.tracker.replace(res.kind, data.get("items") or [])
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    def _events(self, res: Resource, rv: str) -> Iterator[dict[str, Any]]:
        kw: dict[str, Any] = {
            "watch": True, "resource_version": rv, "allow_watch_bookmarks": True,
            "timeout_seconds": self.watch_timeout, "_preload_content": False,
            "_request_timeout": (10, self.watch_timeout + 30),
        }
        if res.field_selector:
            kw["field_selector"] = res.field_selector
        resp = res.lister(**kw)
        self._responses.add(resp)
        self.stats["watches"] += 1
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    raise Transient(f"watch {res.kind}: undecodable line") from None
                if isinstance(event, dict):
                    yield event
        finally:
            self._responses.discard(resp)
            resp.release_conn()

    def _watch(self, res: Resource, rv: str) -> str:
        """Follow one watch stream; returns the last resourceVersion seen."""
        for event in self._events(res, rv):
            etype, obj = event.get("type"), event.get("object") or {}
            meta = obj.get("metadata") or {}
            if etype == "ERROR":
                code = obj.get("code")
                if code == 410:
                    raise Gone(obj.get("message", "resource version too old"))
                raise Transient(f"watch {res.kind}: {code} {obj.get('message', '')}")
            rv = str(meta.get("resourceVersion") or rv)
            if etype == "BOOKMARK":
                continue
            self.stats["events"] += 1
            if etype in ("ADDED", "MODIFIED"):
                self.tracker.upsert(res.kind, obj)
            elif etype == "DELETED":
                self.tracker.delete(res.kind, str(meta.get("namespace") or "default"), str(meta.get("name")))
        return rv

    # ---- the loop ------------------------------------------------------------------
    def list_all(self) -> None:
        """List every kind once (for --once); retries transient failures a few times."""
        for res in self.resources:
            for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception(_transient), stop=tenacity.stop_after_attempt(5),
                wait=tenacity.wait_exponential_jitter(initial=0.5, max=self.max_backoff), reraise=True,
            ):
                with attempt:
                    self._list(res)

    def _follow(self, res: Resource) -> None:
        rv: str | None = None

        def cycle() -> None:
            nonlocal rv
            if rv is None:
                rv = self._list(res)
            try:
                rv = self._watch(res, rv)
            except Gone as exc:
                log.info("watch %s: %s; relisting", res.kind, exc)
                self.stats["relists_410"] += 1
                rv = None

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient),
            wait=tenacity.wait_exponential_jitter(initial=0.2, max=self.max_backoff),
            stop=tenacity.stop_never, sleep=self._sleep, before_sleep=self._log_retry(res.kind),
        )
        while not self._stop.is_set():
            try:
                retrying(cycle)
            except Stopped:
                return
            except Exception as exc:  # not transient (e.g. 403): say so, wait, try again
                self.stats["errors"] += 1
                log.error("watch %s: %s", res.kind, exc)
                self._stop.wait(self.max_backoff)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped

    def _log_retry(self, kind: str) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            self.stats["errors"] += 1
            exc = state.outcome.exception() if state.outcome else None
            log.warning("watch %s failed (%s); retry %d in %.1fs", kind, exc, state.attempt_number,
                        state.next_action.sleep if state.next_action else 0)
        return before_sleep

    def start(self) -> None:
        for res in self.resources:
            t = threading.Thread(target=self._follow, args=(res,), name=f"watch-{res.kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for resp in list(self._responses):
            with contextlib.suppress(Exception):  # already closed is fine
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()

    # ---- events --------------------------------------------------------------------
    def post_event(self, svc: Service, reason: str, message: str) -> None:
        """A Warning Event on the Service (kubectl describe svc shows it)."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{svc.name}.", "namespace": svc.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": svc.namespace,
                               "name": svc.name, "uid": svc.uid or None},
            "reason": reason, "message": message[:1024], "type": "Warning", "count": 1,
            "firstTimestamp": now, "lastTimestamp": now,
            "source": {"component": "ipvsproxy", "host": self.node_name},
            "reportingComponent": "ipvsproxy", "reportingInstance": self.node_name,
        }
        event = client.CoreV1Event.from_dict(body)
        assert event is not None
        self.core.create_namespaced_event(svc.namespace, event, _request_timeout=10)
