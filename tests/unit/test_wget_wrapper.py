"""The test images' `wget` (images/build.py WGET_WRAPPER) run with the real busybox-static.

Debian's busybox-static wget (bookworm: 1.35.0, built without FEATURE_WGET_TIMEOUT) segfaults on
`-T`, which is how the e2e suite's probes call it (`wget -q -T 1 -O - URL`). The wrapper runs the
same applet under busybox's `timeout` instead; here it fetches, fails and times out as a probe needs.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import scriptload

build = scriptload.load("images/build.py", "images_build")
BUSYBOX = Path("/bin/busybox")

pytestmark = pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox-static (scripts/setup.sh installs it)")


@pytest.fixture
def wget(tmp_path: Path) -> Path:
    """The wrapper as /usr/bin/wget in the images, with `busybox` on PATH beside it."""
    (tmp_path / "busybox").symlink_to(BUSYBOX)
    script = tmp_path / "wget"
    script.write_bytes(build.WGET_WRAPPER)
    script.chmod(0o755)
    return script


def run(wget: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{wget.parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BUSYBOX), "sh", str(wget), *args], capture_output=True, text=True, env=env,
                          timeout=30, check=False)


@pytest.fixture
def server() -> Iterator[int]:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = b"pod-1"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("timeout", [["-T", "1"], ["-T1"], ["--timeout=1"], []])
def test_the_probe_gets_the_answer(wget: Path, server: int, timeout: list[str]) -> None:
    proc = run(wget, "-q", *timeout, "-O", "-", f"http://127.0.0.1:{server}/hostname")
    assert (proc.returncode, proc.stdout) == (0, "pod-1"), proc.stderr


def test_a_refused_connection_is_an_error_not_a_crash(wget: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        proc = run(wget, "-q", "-T", "1", "-O", "-", f"http://127.0.0.1:{port}/")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # busybox wget's error exit; 139 was SIGSEGV


def test_a_server_that_never_answers_is_given_up_on(wget: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts the connection, never answers
        proc = run(wget, "-q", "-T", "1", "-O", "-", f"http://127.0.0.1:{s.getsockname()[1]}/")
    # busybox timeout SIGTERMs the request it runs in its own process (a shell sees 143)
    assert proc.returncode in (-15, 143), (proc.returncode, proc.stderr)
