"""/healthz and /livez, and the hardened HTTP server every endpoint of the agent uses.

Healthy means: the last successful sync is younger than the allowed age
(two sync periods plus a margin, like kube-proxy's healthz), or the agent is
still starting and has not failed yet. The answers follow kube-proxy's
``pkg/proxy/healthcheck/proxier_health.go`` (docs/semantics.md rule 1):
``/healthz`` is also 503 while this Node is being deleted or carries the
Cluster Autoscaler's ToBeDeleted taint (KEP-3836), so load balancers stop
sending new connections here; ``/livez`` ignores the Node (a liveness probe
must not restart a proxy because its node is draining).

The server (:func:`serve`) is exposed to the network, so it is bounded: a
per-connection socket timeout (an idle or slow client holds a thread for a
few seconds, not forever), a cap on concurrent connections (beyond it new
ones are closed at once), no traceback for a client that goes away, and no
detail (sync errors name Services and addresses) on a non-loopback bind.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..model import family_of

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds a connection may stay silent before it is closed
MAX_CONNECTIONS = 64  # concurrent connections per server; more are closed at once

Route = Callable[[], tuple[int, str, bytes]]  # -> (status, content type, body)


class Health:
    """Tracks sync outcomes and answers is-healthy questions."""

    def __init__(self, max_age: float, clock: Callable[[], float] = time.time) -> None:
        self.max_age = max_age
        self.clock = clock
        self.started = clock()
        self.last_success: float | None = None
        self.last_error: str | None = None
        # False while this Node is being deleted or tainted ToBeDeletedByClusterAutoscaler.
        self.node_eligible = True
        # Why the API server refuses what the agent must list or watch (RBAC), until it stops:
        # the data may be stale, which /healthz (not /livez) reports.
        self.blocked: str | None = None

    def set_blocked(self, why: str | None) -> None:
        self.blocked = why

    def success(self) -> None:
        self.last_success, self.last_error = self.clock(), None

    def failure(self, error: str) -> None:
        self.last_error = error

    def status(self) -> tuple[bool, str]:
        """Whether the proxy itself is healthy (the Node plays no part), and why."""
        now = self.clock()
        if self.last_success is None:
            if now - self.started > self.max_age:
                why = self.last_error or "waiting for the first sync (sources not listed yet?)"
                return False, f"no successful sync in {now - self.started:.0f}s: {why}"
            return True, "starting"
        age = now - self.last_success
        if age > self.max_age:
            return False, f"last successful sync {age:.0f}s ago: {self.last_error or 'no sync since'}"
        return True, f"last successful sync {age:.1f}s ago"

    def healthy(self) -> bool:
        return self.status()[0]


def go_time(t: float | None) -> str:
    """A time as Go's time.Time prints it (kube-proxy's %q of one); the zero time for None."""
    if t is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    d = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return d.strftime("%Y-%m-%d %H:%M:%S.%f").rstrip("0").rstrip(".") + " +0000 UTC"


def is_loopback(host: str) -> bool:
    """Whether a bind host is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def healthz_route(health: Health, *, detail: bool = False) -> Route:
    """kube-proxy's /healthz: 200 when the proxy is healthy and the Node eligible.
    With `detail` (loopback binds only) the body also says why."""

    def route() -> tuple[int, str, bytes]:
        ok, reason = health.status()
        if ok and health.blocked:
            ok, reason = False, health.blocked
        eligible = health.node_eligible
        ok = ok and eligible
        now = health.clock()
        last = now if ok else health.last_success
        body: dict[str, Any] = {"lastUpdated": go_time(last), "currentTime": go_time(now), "nodeEligible": eligible}
        if detail:
            body["reason"] = reason if eligible else "node is being deleted or tainted ToBeDeletedByClusterAutoscaler"
            body["lastSuccess"] = health.last_success  # Unix time of the last good sync (lastUpdated is "now")
        return (200 if ok else 503), "application/json", json.dumps(body).encode()
    return route


def livez_route(health: Health, *, detail: bool = False) -> Route:
    """kube-proxy's /livez: the proxy's own health; the Node plays no part."""

    def route() -> tuple[int, str, bytes]:
        ok, reason = health.status()
        now = health.clock()
        body: dict[str, Any] = {"lastUpdated": go_time(now if ok else health.last_success),
                                "currentTime": go_time(now)}
        if detail:
            body["reason"] = reason
            body["lastSuccess"] = health.last_success
        return (200 if ok else 503), "application/json", json.dumps(body).encode()
    return route


@dataclass(slots=True)
class ServerStats:
    """What a server turned away (tests and logs read it)."""

    rejected: int = 0  # connections closed at once: too many open
    client_errors: int = 0  # clients that timed out or went away mid-request


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with a cap on concurrent connections and quiet
    handling of clients that misbehave."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int = MAX_CONNECTIONS, family: int = socket.AF_INET) -> None:
        self.address_family = family
        self.slots = threading.BoundedSemaphore(max_connections)
        self.stats = ServerStats()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # "::" serves IPv4 too (as Go's listener on ":port" does)
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.stats.rejected += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # a thread per connection
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One quiet line, never a traceback: a client that resets, times out
        or hangs up is its own business."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            self.stats.client_errors += 1
            log.debug("http %s: client %s: %s", self.server_address, client_address, exc)
        else:
            log.warning("http %s: request from %s failed: %s: %s", self.server_address, client_address,
                        type(exc).__name__, exc)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(address: str, routes: Mapping[str, Route], *, default: Route | None = None,
          max_connections: int = MAX_CONNECTIONS, timeout: float = REQUEST_TIMEOUT,
          name: str = "") -> BoundedHTTPServer:
    """Serve GET (and HEAD) routes on host:port in a daemon thread; returns the
    server. `default` answers every path no route names (else 404)."""
    host, port = _split(address)
    family = family_of(host)

    conn_timeout = timeout

    class Handler(BaseHTTPRequestHandler):
        timeout = conn_timeout  # socket timeout for every read and write of a connection


        def _answer(self, with_body: bool) -> None:
            route = routes.get(self.path.split("?")[0]) or default
            code, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(False)

        def log_message(self, *args: object) -> None:
            pass

    server = BoundedHTTPServer((host, port), Handler, max_connections=max_connections, family=family)
    threading.Thread(target=server.serve_forever, name=name or f"http-{address}", daemon=True).start()
    return server
