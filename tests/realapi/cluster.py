"""A real etcd + kube-apiserver (v1.20.2) on 127.0.0.1, for integration tests.

The in-repository stand-in (tests/apiserver.py) copies the API server's wire
protocol, but not its TLS, bearer tokens, RBAC, watch cache, etcd compaction,
expiring continue tokens or request timeouts. This runs the real thing:
etcd on a free loopback port with its data in a temporary directory, and
kube-apiserver with a CA and serving certificate made by openssl, static
token authentication, `--authorization-mode=Node,RBAC` and service-account
signing keys (so TokenRequest works). The binaries come from
scripts/install-kubernetes.sh's cache (KUBERNETES_BIN overrides).

Tests can restart the API server (same port, same etcd), compact etcd at its
current revision (`etcdctl compact`), and cut or restore every client
connection through `proxy` (a TCP relay in front of the API server).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = "v1.20.2"
ADMIN_TOKEN = "admin-token-for-tests"  # noqa: S105 - a throwaway cluster's token
NODE_TOKEN = "node-token-for-tests"  # noqa: S105


def kubernetes_bin() -> Path:
    env = os.environ.get("KUBERNETES_BIN")
    if env:
        return Path(env)
    out = subprocess.run(["bash", str(ROOT / "scripts/install-kubernetes.sh"), "--print-bin"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*cmd: str, cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


def make_pki(d: Path) -> None:
    """ca.{key,crt}; apiserver.{key,crt} for 127.0.0.1/localhost; sa.{key,pub} for service-account tokens."""
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ipvsproxy-test-ca",
         "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
         "-keyout", "apiserver.key", "-out", "apiserver.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
                               "extendedKeyUsage=serverAuth\n")
    _run("openssl", "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-extfile", "san.ext", "-out", "apiserver.crt", cwd=d)
    _run("openssl", "genrsa", "-out", "sa.key", "2048", cwd=d)
    _run("openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


class Relay:
    """A TCP relay to the API server whose connections a test can cut (and refuse) at will."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.refusing = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._conns.discard(s)

    def cut(self, refuse: bool = True) -> None:
        """Close every relayed connection; new ones are closed at once while `refuse`."""
        self.refusing = refuse
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.sock.close()


class Cluster:
    """etcd + kube-apiserver on loopback; `start()`, `stop()`, `restart_apiserver()`, `compact()`."""

    def __init__(self, *, watch_cache: bool = True, extra_args: tuple[str, ...] = (),
                 ready_timeout: float = 90.0) -> None:
        self.bin = kubernetes_bin()
        for name in ("kube-apiserver",):
            if not (self.bin / name).is_file():
                raise RuntimeError(f"{self.bin / name} is missing: run scripts/install-kubernetes.sh")
        for tool in ("etcd", "etcdctl", "openssl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found: run scripts/install-kubernetes.sh (it installs etcd, openssl)")
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.dir = Path(tempfile.mkdtemp(prefix="ipvsproxy-realapi-", dir=base))
        self.watch_cache, self.extra_args = watch_cache, extra_args
        self.ready_timeout = ready_timeout  # seconds; the emulated test VM needs ~50-110 s
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.relay: Relay | None = None
        self.url = f"https://127.0.0.1:{self.port}"

    # ---- processes -----------------------------------------------------------------------
    def start(self) -> Cluster:
        make_pki(self.dir)
        (self.dir / "tokens.csv").write_text(
            f'{ADMIN_TOKEN},admin,1,"system:masters"\n'
            f'{NODE_TOKEN},system:node:n1,2,"system:nodes"\n')
        # every request's user, verb and resource (not bodies): what an identity really uses
        (self.dir / "audit-policy.yaml").write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            "rules:\n- level: Metadata\n")
        self._start_etcd()
        self.start_apiserver()
        self.relay = Relay(self.port)
        return self

    def _start_etcd(self) -> None:
        data = self.dir / "etcd"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.dir / "etcd.log", "ab")  # noqa: SIM115 - the process keeps it
        self.etcd = subprocess.Popen(
            ["etcd", "--name", "test", "--data-dir", str(data),
             "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while subprocess.run(["etcdctl", "--endpoints", self.etcd_url, "endpoint", "health"],
                             capture_output=True).returncode:
            if self.etcd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {self._tail('etcd.log')}")
            time.sleep(0.2)

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def start_apiserver(self) -> None:
        d = self.dir
        args = [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}", "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            "--insecure-port=0", "--advertise-address=127.0.0.1",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}", f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", "--anonymous-auth=false",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            "--api-audiences=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/16", "--etcd-compaction-interval=0",
            f"--watch-cache={'true' if self.watch_cache else 'false'}",
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,DefaultStorageClass",
            f"--audit-policy-file={d / 'audit-policy.yaml'}", f"--audit-log-path={d / 'audit.log'}",
            "--audit-log-format=json",
            "--profiling=false", "--logtostderr=true", "--v=0", *self.extra_args,
        ]
        log = open(d / "apiserver.log", "ab")  # noqa: SIM115 - the process keeps it
        self.apiserver = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while not self._ready():
            if self.apiserver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver did not become ready: {self._tail('apiserver.log')}")
            time.sleep(0.25)

    def _ready(self) -> bool:
        try:
            return self.request("GET", "/readyz", raw=True) == "ok"
        except (OSError, urllib.error.URLError, RuntimeError):
            return False

    def stop_apiserver(self) -> None:
        if self.apiserver is not None and self.apiserver.poll() is None:
            self.apiserver.terminate()
            try:
                self.apiserver.wait(20)
            except subprocess.TimeoutExpired:
                self.apiserver.kill()
                self.apiserver.wait()
        self.apiserver = None

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def stop(self) -> None:
        if self.relay:
            self.relay.close()
        self.stop_apiserver()
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.terminate()
            try:
                self.etcd.wait(20)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
                self.etcd.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tail(self, name: str, n: int = 3000) -> str:
        try:
            return (self.dir / name).read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def audit(self, user: str) -> list[dict[str, Any]]:
        """The audit log's entries for one user (verb, objectRef, responseStatus ...)."""
        out = []
        with contextlib.suppress(OSError), open(self.dir / "audit.log") as f:
            for line in f:
                entry = json.loads(line)
                if entry.get("user", {}).get("username") == user:
                    out.append(entry)
        return out

    # ---- etcd ------------------------------------------------------------------------------------
    def etcd_revision(self) -> int:
        out = _run("etcdctl", "--endpoints", self.etcd_url, "endpoint", "status", "-w", "json")
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def compact(self) -> int:
        """`etcdctl compact` at etcd's current revision; returns it."""
        rev = self.etcd_revision()
        _run("etcdctl", "--endpoints", self.etcd_url, "compact", str(rev), "--physical")
        return rev

    # ---- clients ---------------------------------------------------------------------------------
    def write_kubeconfig(self, path: Path, token: str = ADMIN_TOKEN, via_relay: bool = False) -> Path:
        port = self.relay.port if via_relay and self.relay else self.port
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                      "certificate-authority": str(self.dir / "ca.crt")}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return path

    def request(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN,
                raw: bool = False, content_type: str = "application/json") -> Any:
        """One HTTPS request as `token`; the decoded JSON (or text with raw); raises RuntimeError on >= 400."""
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from None
        return text if raw else json.loads(text)
