"""Health-check node ports: what cloud load balancers ask before sending a node traffic.

A LoadBalancer Service with externalTrafficPolicy Local gets a
``spec.healthCheckNodePort``; the load balancer probes it on every node and
sends traffic only to nodes answering 200, i.e. nodes with a ready local
endpoint (an ETP=Local Service on a node without one would otherwise drop
what it is sent). This module serves those ports as kube-proxy does
(``pkg/proxy/healthcheck/service_health.go``; docs/semantics.md rule 1):
one listener per port on every node address (or the ``--nodeport-addresses``
ones), the same status codes, headers and body, opened and closed as Services
come and go.

A sync never waits for a socket: :meth:`ServiceHealthServer.update` only
records the wanted ports and the counts (answers read the counts when asked,
so a changed count needs no listener work); a worker thread opens and closes
listeners, and retries ports it could not open (another process holding one)
every few seconds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from ..model import join_host_port
from .health import MAX_CONNECTIONS, REQUEST_TIMEOUT, BoundedHTTPServer, Route, serve

log = logging.getLogger(__name__)

RETRY = 5.0  # seconds between attempts to open a port that failed
ListenFailure = Callable[[str, int, str], None]  # (service id, port, message)


def body(namespace: str, name: str, count: int, healthy: bool) -> bytes:
    """kube-proxy's body, byte for byte (a dedented Go template, tabs and all)."""
    return (
        "{\n"
        '\t"service": {\n'
        f"\t\t\"namespace\": {json.dumps(namespace)},\n"
        f"\t\t\"name\": {json.dumps(name)}\n"
        "\t},\n"
        f'\t"localEndpoints": {count},\n'
        f'\t"serviceProxyHealthy": {"true" if healthy else "false"}\n'
        "}"
    ).encode()


class ServiceHealthServer:
    """The listeners of every health-check node port of this node."""

    def __init__(
        self,
        addresses: Callable[[], Sequence[str]],
        proxy_healthy: Callable[[], bool],
        *,
        on_listen_failure: ListenFailure | None = None,
        retry: float = RETRY,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """`addresses`: where to listen (called when a port is opened; empty:
        every address, IPv4 and IPv6)."""
        self.addresses, self.proxy_healthy = addresses, proxy_healthy
        self.on_listen_failure = on_listen_failure
        self.retry, self.max_connections, self.timeout = retry, max_connections, timeout
        self._lock = threading.Lock()
        self._want: dict[str, int] = {}  # service id -> port
        self._counts: dict[str, int] = {}  # service id -> local ready endpoints
        self._open: dict[str, tuple[int, list[BoundedHTTPServer]]] = {}  # worker thread only
        self._failed: dict[str, str] = {}  # service id -> last error (reported once per change)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- from the sync -----------------------------------------------------
    def update(self, checks: Mapping[str, tuple[int, int]]) -> None:
        """Service id -> (health-check node port, local ready endpoints). Cheap:
        records the state and wakes the worker."""
        want = {sid: port for sid, (port, _) in checks.items()}
        with self._lock:
            self._counts = {sid: count for sid, (_, count) in checks.items()}
            changed = want != self._want
            self._want = want
        if changed:
            self._idle.clear()
            self._wake.set()

    # ---- answering -----------------------------------------------------------
    def _route(self, sid: str) -> Route:
        namespace, _, name = sid.partition("/")

        def route() -> tuple[int, str, bytes]:
            with self._lock:
                count = self._counts.get(sid, 0)
            healthy = self.proxy_healthy()
            code = 200 if count and healthy else 503
            return code, "application/json", body(namespace, name, count, healthy)
        return route

    # ---- the worker ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="health-check-ports", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        for sid in list(self._open):
            self._close(sid)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Until the listeners match the last update (tests)."""
        return self._idle.wait(timeout)

    @property
    def ports(self) -> dict[str, int]:
        """Service id -> the port it is served on now."""
        return {sid: port for sid, (port, _) in list(self._open.items())}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._reconcile()
            self._wake.wait(self.retry if self._failed else None)
            self._wake.clear()

    def _reconcile(self) -> None:
        with self._lock:
            want = dict(self._want)
        for sid, (port, _) in list(self._open.items()):
            if want.get(sid) != port:
                self._close(sid)
        for sid in list(self._failed):
            if sid not in want:
                del self._failed[sid]
        for sid, port in sorted(want.items()):
            if sid not in self._open and not self._stop.is_set():
                self._listen(sid, port)
        with self._lock:
            if want == self._want and not self._failed:
                self._idle.set()

    def _listen(self, sid: str, port: int) -> None:
        addrs = list(self.addresses()) or [""]
        servers: list[BoundedHTTPServer] = []
        try:
            for addr in addrs:
                try:
                    servers.append(self._serve(addr, port, sid))
                except OSError:
                    if addr:
                        raise
                    servers.append(self._serve("0.0.0.0", port, sid))  # no IPv6 on this node
        except OSError as exc:
            for s in servers:
                s.shutdown()
                s.server_close()
            message = f"cannot serve health check of Service {sid} on port {port}: {exc.strerror or exc}"
            if self._failed.get(sid) != message:
                log.error("%s; will retry", message)
                if self.on_listen_failure is not None:
                    try:
                        self.on_listen_failure(sid, port, message)
                    except Exception as err:  # Events are best effort
                        log.warning("could not report the health-check failure of %s: %s", sid, err)
            self._failed[sid] = message
            return
        self._failed.pop(sid, None)
        self._open[sid] = (port, servers)
        log.info("serving health check of Service %s on port %d", sid, port)

    def _serve(self, addr: str, port: int, sid: str) -> BoundedHTTPServer:
        host = addr or "::"
        return serve(join_host_port(host, port), {}, default=self._route(sid), max_connections=self.max_connections,
                     timeout=self.timeout, name=f"hc-{port}")

    def _close(self, sid: str) -> None:
        port, servers = self._open.pop(sid)
        for s in servers:
            s.shutdown()
            s.server_close()
        log.info("closed health check of Service %s on port %d", sid, port)
