"""/healthz: 200 while syncs succeed, 503 with the reason when they do not.

Healthy means: the last successful sync is younger than the allowed age
(two sync periods plus a margin, like kube-proxy's healthz), or the agent is
still starting and has not failed yet.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health:
    """Tracks sync outcomes and answers is-healthy questions."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.started = time.time()
        self.last_success: float | None = None
        self.last_error: str | None = None

    def success(self) -> None:
        self.last_success, self.last_error = time.time(), None

    def failure(self, error: str) -> None:
        self.last_error = error

    def status(self) -> tuple[bool, str]:
        now = time.time()
        if self.last_success is None:
            if now - self.started > self.max_age:
                why = self.last_error or "waiting for the first sync (sources not listed yet?)"
                return False, f"no successful sync in {now - self.started:.0f}s: {why}"
            return True, "starting"
        age = now - self.last_success
        if age > self.max_age:
            return False, f"last successful sync {age:.0f}s ago: {self.last_error or 'no sync since'}"
        return True, f"last successful sync {age:.1f}s ago"


def serve(address: str, routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> ThreadingHTTPServer:
    """Serve GET routes on host:port in a daemon thread; returns the server."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            route = routes.get(self.path.split("?")[0])
            code, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{address}", daemon=True).start()
    return server


def healthz_route(health: Health) -> Callable[[], tuple[int, str, bytes]]:
    def route() -> tuple[int, str, bytes]:
        ok, reason = health.status()
        body = json.dumps({"healthy": ok, "reason": reason, "lastSuccess": health.last_success})
        return (200 if ok else 503), "application/json", (body + "\n").encode()
    return route
