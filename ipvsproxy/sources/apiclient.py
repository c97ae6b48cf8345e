"""The agent's Kubernetes API client: where the API server is, how to trust it,
how to authenticate, and one raw request by path over a urllib3 pool.

Why not the official `kubernetes` package: the source makes raw requests by
path and reads the JSON itself (sources/kube.py), so all it used of that
package was the configuration loaders and the transport, and importing it
costs ~22 MiB of RSS and ~0.4 s on the host (seconds in the emulated test VM)
for thousands of generated models the agent never builds: a seventh of the
memory budget at 20,000 Services (issue 18, target 4). What a node proxy
needs is small and settled:

- in a pod: the service-account token and CA (the token re-read every
  minute, since kubelet rotates bound tokens; client-go does the same), the
  address from KUBERNETES_SERVICE_HOST/PORT or --api-server;
- a kubeconfig (--kubeconfig, else $KUBECONFIG, a colon-separated list merged
  first-wins as kubectl merges it, else ~/.kube/config): the current context's
  cluster (server, certificate-authority[-data], insecure-skip-tls-verify,
  tls-server-name) and user (token, tokenFile, client-certificate[-data] and
  client-key[-data], username/password, and `exec` credential plugins, whose
  token is cached until it expires). Legacy `auth-provider` plugins (gone from
  client-go since 1.26) are refused with a clear error.

Every failed request raises ApiError (status, reason, body, headers); a
connection failure is urllib3's own exception, as before. urllib3 never
retries by itself (retries=False): the source's backoff decides, Retry-After
included, so no wait hides inside a request.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3

TOKEN_REFRESH = 60.0  # seconds between re-reads of a token file (kubelet rotates service-account tokens)
EXEC_TIMEOUT = 60.0  # longest an exec credential plugin may take
USER_AGENT = "ipvsproxy"


class ConfigError(Exception):
    """No usable API configuration (a missing file, no current context, an unsupported auth)."""


class NotInCluster(ConfigError):
    """No service-account credentials here (the agent is not in a pod)."""


class ApiError(Exception):
    """The API server answered with a non-2xx status."""

    def __init__(self, status: int, reason: str = "", body: bytes | str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status, self.reason, self.body, self.headers = status, reason, body, headers
        super().__init__(f"({status}) {reason}".strip())


@dataclass(frozen=True)
class ExecPlugin:
    """A kubeconfig user's `exec` credential plugin (client.authentication.k8s.io)."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"


class ApiClient:
    """One API server, its TLS trust and credentials; thread-safe (the watch threads share it)."""

    def __init__(self, host: str, *, ca_file: str | None = None, ca_data: str | None = None,
                 verify: bool = True, cert_file: str | None = None, key_file: str | None = None,
                 cert_data: str | None = None, key_data: str | None = None, token: str | None = None,
                 token_file: str | None = None, username: str | None = None, password: str | None = None,
                 exec_plugin: ExecPlugin | None = None, tls_server_name: str | None = None) -> None:
        self.host = host.rstrip("/")
        self._token, self._token_file, self._exec = token, token_file, exec_plugin
        self._basic = (f"Basic {base64.b64encode(f'{username}:{password}'.encode()).decode()}"
                       if username is not None and password is not None else None)
        self._lock = threading.Lock()
        self._file_token: tuple[float, str] | None = None  # (read at, token)
        self._exec_token: tuple[float, str] | None = None  # (expires at, token)
        kw: dict[str, Any] = {"num_pools": 2, "maxsize": 8, "retries": False, "block": False}
        if self.host.startswith("https:"):
            ctx = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                kw.update(cert_reqs="CERT_NONE", assert_hostname=False)
            if cert_data is not None and key_data is not None:
                _load_cert_data(ctx, cert_data, key_data)
            elif cert_file is not None:
                ctx.load_cert_chain(cert_file, key_file)
            kw["ssl_context"] = ctx
            if tls_server_name:
                kw["server_hostname"] = tls_server_name
        self._pool = urllib3.PoolManager(**kw)

    # ---- credentials ----------------------------------------------------------------------
    def _authorization(self) -> str | None:
        if self._token_file:
            with self._lock:
                now = time.monotonic()
                if self._file_token is None or now - self._file_token[0] >= TOKEN_REFRESH:
                    with open(self._token_file) as f:
                        self._file_token = (now, f.read().strip())
                return f"Bearer {self._file_token[1]}"
        if self._token:
            return f"Bearer {self._token}"
        if self._exec is not None:
            with self._lock:
                if self._exec_token is None or time.time() >= self._exec_token[0]:
                    self._exec_token = _run_exec(self._exec)
                return f"Bearer {self._exec_token[1]}"
        return self._basic

    # ---- requests -------------------------------------------------------------------------
    def request(self, method: str, path: str, query: Iterable[tuple[str, Any]] = (), *,
                body: Any = None, timeout: float | tuple[float, float] | None = None) -> Any:
        """One request; the urllib3 response, body unread (stream it, or read .data, then
        release_conn()). ApiError on a non-2xx status (its body read)."""
        params = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in query if v is not None]
        url = self.host + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if isinstance(timeout, tuple):
            t: Any = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            t = urllib3.Timeout(total=timeout) if timeout is not None else urllib3.Timeout(connect=30, read=None)
        resp = self._pool.request(method, url, body=data, headers=headers, timeout=t,
                                  preload_content=False, redirect=False)
        if not 200 <= resp.status <= 299:
            payload = resp.read()
            resp.release_conn()
            with self._lock:  # a 401 may be an expired exec token or a rotated file: fetch afresh next time
                if resp.status == 401:
                    self._exec_token = self._file_token = None
            raise ApiError(resp.status, resp.reason or "", payload, dict(resp.headers))
        return resp

    def json(self, method: str, path: str, query: Iterable[tuple[str, Any]] = (), *,
             body: Any = None, timeout: float | tuple[float, float] | None = None) -> Any:
        """One request whose JSON answer is read whole (the connection goes back to the pool)."""
        resp = self.request(method, path, query, body=body, timeout=timeout)
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()


def _load_cert_data(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """A client certificate given inline: ssl loads only from files, so through a private
    temporary directory that is gone as soon as the context holds the pair."""
    with tempfile.TemporaryDirectory(prefix="ipvsproxy-tls-") as d:
        cert, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        for path, text in ((cert, cert_pem), (key, key_pem)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(text)
        ctx.load_cert_chain(cert, key)


def _run_exec(plugin: ExecPlugin) -> tuple[float, str]:
    """Run an exec credential plugin: (expires at, token); ConfigError if it gives none."""
    env = dict(os.environ)
    env.update(plugin.env)
    env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": plugin.api_version, "kind": "ExecCredential",
                                              "spec": {"interactive": False}})
    try:
        proc = subprocess.run([plugin.command, *plugin.args], env=env, capture_output=True, text=True,
                              timeout=EXEC_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"exec credential plugin {plugin.command}: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        raise ConfigError(f"exec credential plugin {plugin.command} exited {proc.returncode}: {last}")
    try:
        status = json.loads(proc.stdout).get("status") or {}
        token = status["token"]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise ConfigError(f"exec credential plugin {plugin.command}: no status.token in its output "
                          "(client certificates from a plugin are not supported)") from None
    expires = float("inf")
    stamp = status.get("expirationTimestamp")
    if stamp:
        try:
            when = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
            expires = when.timestamp() - 10  # refresh a little early
        except ValueError:
            expires = time.time() + TOKEN_REFRESH
    return expires, str(token)


# ---- loaders ----------------------------------------------------------------------------------
def host_url(scheme: str, host: str, port: str | int) -> str:
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def in_cluster(sa_dir: str, environ: Mapping[str, str]) -> ApiClient:
    """A pod's credentials: the service-account token and CA in sa_dir, the address from
    KUBERNETES_SERVICE_HOST/PORT in environ. NotInCluster when any of these is missing,
    ConfigError when the CA cannot be used."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise NotInCluster("not in a cluster: KUBERNETES_SERVICE_HOST/PORT unset")
    token, ca = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    for path in (token, ca):
        if not os.path.isfile(path):
            raise NotInCluster(f"not in a cluster: {path} missing")
    try:
        return ApiClient(host_url("https", host, port), ca_file=ca, token_file=token)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"in-cluster CA {ca}: {' '.join(str(exc).split())}") from None


def kubeconfig_paths(path: str | None, environ: Mapping[str, str]) -> list[str]:
    if path:
        return [path]
    listed = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return listed or [os.path.join(os.path.expanduser("~"), ".kube", "config")]


def _merged(paths: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """kubectl's merge: the first file to set current-context or to name an entry wins.
    Returns (merged document, entry -> the file's directory, for relative paths)."""
    import yaml  # here, not at the top: an agent in a pod reads no kubeconfig (~1 MiB)

    merged: dict[str, Any] = {"current-context": "", "clusters": {}, "users": {}, "contexts": {}}
    base: dict[str, str] = {}
    found = False
    for path in paths:
        try:
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
        except FileNotFoundError:
            if len(paths) == 1:
                raise ConfigError(f"kubeconfig {path} not found") from None
            continue
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"kubeconfig {path}: {' '.join(str(exc).split())}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"kubeconfig {path}: not a mapping")
        found = True
        merged["current-context"] = merged["current-context"] or doc.get("current-context") or ""
        for section, inner in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for entry in doc.get(section) or []:
                named = isinstance(entry, dict) and isinstance(entry.get("name"), str)
                if named and entry["name"] not in merged[section]:
                    merged[section][entry["name"]] = entry.get(inner) or {}
                    base[f"{section}/{entry['name']}"] = os.path.dirname(os.path.abspath(path))
    if not found:
        raise ConfigError(f"no kubeconfig found ({os.pathsep.join(paths)})")
    return merged, base


def from_kubeconfig(path: str | None = None, environ: Mapping[str, str] | None = None,
                    server: str | None = None) -> ApiClient:
    """The current context of a kubeconfig (path, else $KUBECONFIG, else ~/.kube/config);
    `server` in place of its cluster's address when given."""
    doc, base = _merged(kubeconfig_paths(path, os.environ if environ is None else environ))
    name = doc["current-context"]
    if not name or name not in doc["contexts"]:
        raise ConfigError(f"kubeconfig: current-context {name!r} not found" if name
                          else "kubeconfig: no current-context")
    ctx = doc["contexts"][name]
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if cluster_name not in doc["clusters"]:
        raise ConfigError(f"kubeconfig: context {name!r} names cluster {cluster_name!r}, which is not there")
    cluster: dict[str, Any] = doc["clusters"][cluster_name]
    user: dict[str, Any] = doc["users"].get(user_name) or {}
    cdir, udir = base.get(f"clusters/{cluster_name}", ""), base.get(f"users/{user_name}", "")

    def file(entry: dict[str, Any], key: str, where: str) -> str | None:
        value = entry.get(key)
        return os.path.join(where, value) if isinstance(value, str) and value else None

    def data(entry: dict[str, Any], key: str) -> str | None:
        value = entry.get(key)
        if not value:
            return None
        try:
            return base64.b64decode(value, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"kubeconfig: {key} is not base64 PEM") from None

    server = server or cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ConfigError(f"kubeconfig: cluster {cluster_name!r} has no server")
    if user.get("auth-provider"):
        raise ConfigError(f"kubeconfig: user {user_name!r} uses an auth-provider plugin, which ipvsproxy does not "
                          "support (use a token, a client certificate or an exec plugin)")
    plugin = None
    if isinstance(user.get("exec"), dict):
        e = user["exec"]
        env = tuple((str(v.get("name")), str(v.get("value"))) for v in e.get("env") or [] if isinstance(v, dict))
        plugin = ExecPlugin(str(e.get("command") or ""), tuple(str(a) for a in e.get("args") or ()), env,
                            str(e.get("apiVersion") or ExecPlugin.api_version))
    try:
        return ApiClient(
            server, ca_file=file(cluster, "certificate-authority", cdir),
            ca_data=data(cluster, "certificate-authority-data"),
            verify=not cluster.get("insecure-skip-tls-verify", False),
            tls_server_name=cluster.get("tls-server-name") or None,
            cert_file=file(user, "client-certificate", udir), key_file=file(user, "client-key", udir),
            cert_data=data(user, "client-certificate-data"), key_data=data(user, "client-key-data"),
            token=user.get("token") or None, token_file=file(user, "tokenFile", udir),
            username=user.get("username"), password=user.get("password"), exec_plugin=plugin)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"kubeconfig: {' '.join(str(exc).split())}") from None
