"""The agent's own API client: kubeconfig and in-cluster loading, credentials, errors.

Requests go to the in-process FakeApiServer (plain HTTP; it records each request's
headers); TLS with a CA and a bearer token is proven against the real kube-apiserver
in tests/realapi (every test there connects through this client)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy.sources import apiclient
from ipvsproxy.sources.apiclient import ApiClient, ApiError, ConfigError, NotInCluster, from_kubeconfig, in_cluster
from tests.apiserver import FakeApiServer


def kubeconfig(path: Path, server: str, user: dict[str, Any], *, current: str = "c",
               cluster: dict[str, Any] | None = None, name: str = "x") -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": name, "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": name, "user": name}}]}))
    return path


@pytest.fixture
def api() -> Any:
    with FakeApiServer() as server:
        yield server


def last_auth(api: FakeApiServer) -> str | None:
    return api.headers[-1].get("Authorization")


def test_a_token_from_the_kubeconfig_is_sent(api: FakeApiServer, tmp_path: Path) -> None:
    client = from_kubeconfig(str(kubeconfig(tmp_path / "kc", api.url, {"token": "abc"})))
    assert client.json("GET", "/api/v1/services")["items"] == []
    assert last_auth(api) == "Bearer abc"


def test_basic_auth_and_no_auth(api: FakeApiServer, tmp_path: Path) -> None:
    from_kubeconfig(str(kubeconfig(tmp_path / "kc", api.url, {"username": "u", "password": "p"}))).json(
        "GET", "/api/v1/services")
    assert last_auth(api) == "Basic " + base64.b64encode(b"u:p").decode()
    from_kubeconfig(str(kubeconfig(tmp_path / "kc2", api.url, {}))).json("GET", "/api/v1/services")
    assert last_auth(api) is None


def test_a_token_file_is_read_relative_to_the_kubeconfig_and_reread_after_rotation(
        api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tok").write_text("one\n")
    client = from_kubeconfig(str(kubeconfig(tmp_path / "kc", api.url, {"tokenFile": "tok"})))
    client.json("GET", "/api/v1/services")
    assert last_auth(api) == "Bearer one"
    (tmp_path / "tok").write_text("two\n")
    client.json("GET", "/api/v1/services")
    assert last_auth(api) == "Bearer one"  # cached for TOKEN_REFRESH
    monkeypatch.setattr(apiclient, "TOKEN_REFRESH", 0.0)
    client.json("GET", "/api/v1/services")
    assert last_auth(api) == "Bearer two"


def test_in_cluster_credentials(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("podtoken")
    (sa / "ca.crt").write_text("")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ConfigError, match="in-cluster CA") as info:  # an empty CA file: said, not "not in a cluster"
        in_cluster(str(sa), env)
    assert not isinstance(info.value, NotInCluster)
    with pytest.raises(NotInCluster, match="KUBERNETES_SERVICE_HOST"):
        in_cluster(str(sa), {})
    with pytest.raises(NotInCluster, match="token missing"):
        in_cluster(str(tmp_path), env)
    assert apiclient.host_url("https", "fd00::1", "443") == "https://[fd00::1]:443"


def test_kubeconfig_lists_merge_first_wins(api: FakeApiServer, tmp_path: Path) -> None:
    first = kubeconfig(tmp_path / "a", api.url, {"token": "first"}, current="c")
    second = kubeconfig(tmp_path / "b", "http://192.0.2.1:1", {"token": "second"}, current="other")
    client = from_kubeconfig(None, {"KUBECONFIG": f"{tmp_path / 'missing'}:{first}:{second}"})
    client.json("GET", "/api/v1/services")
    assert last_auth(api) == "Bearer first"
    assert from_kubeconfig(None, {"KUBECONFIG": str(first)}, server="https://192.0.2.9:6443").host == \
        "https://192.0.2.9:6443"


@pytest.mark.parametrize(("user", "current", "match"), [
    ({"auth-provider": {"name": "oidc"}}, "c", "auth-provider"),
    ({}, "nope", "current-context 'nope' not found"),
    ({"client-certificate-data": "!!"}, "c", "not base64"),
])
def test_unusable_kubeconfigs_say_why(tmp_path: Path, user: dict[str, Any], current: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_kubeconfig(str(kubeconfig(tmp_path / "kc", "https://192.0.2.1", user, current=current)))
    with pytest.raises(ConfigError, match="not found"):
        from_kubeconfig(str(tmp_path / "absent"))
    (tmp_path / "bad").write_text("{")
    with pytest.raises(ConfigError, match="bad"):
        from_kubeconfig(str(tmp_path / "bad"))


def test_an_exec_plugin_token_is_cached_until_it_expires(api: FakeApiServer, tmp_path: Path) -> None:
    count = tmp_path / "count"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        f"p = {str(count)!r}\n"
        "n = int(open(p).read()) + 1 if os.path.exists(p) else 1\n"
        "open(p, 'w').write(str(n))\n"
        "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == 'ExecCredential'\n"
        "stamp = sys.argv[1]\n"
        "print(json.dumps({'status': {'token': f\"{os.environ['PREFIX']}{n}\","
        " **({'expirationTimestamp': stamp} if stamp else {})}}))\n")
    for stamp, want in (("2000-01-01T00:00:00Z", ["t1", "t2"]), ("", ["t3", "t3"])):
        exec_cfg = {"command": sys.executable, "args": [str(plugin), stamp],
                    "env": [{"name": "PREFIX", "value": "t"}], "apiVersion": "client.authentication.k8s.io/v1"}
        client = from_kubeconfig(str(kubeconfig(tmp_path / "kc", api.url, {"exec": exec_cfg})))
        seen = []
        for _ in range(2):
            client.json("GET", "/api/v1/services")
            seen.append(last_auth(api))
        assert seen == [f"Bearer {w}" for w in want]  # an expired token is fetched again
    bad = from_kubeconfig(str(kubeconfig(tmp_path / "kc", api.url, {"exec": {"command": "/bin/false"}})))
    with pytest.raises(ConfigError, match="exited 1"):
        bad.json("GET", "/api/v1/services")


def test_a_non_2xx_answer_is_an_api_error_with_status_body_and_headers(api: FakeApiServer) -> None:
    client = ApiClient(api.url)
    api.fail_next(1, status=429, retry_after=3)
    with pytest.raises(ApiError) as info:
        client.json("GET", "/api/v1/services", [("limit", 5), ("continue", None)])
    err = info.value
    assert err.status == 429 and err.headers and err.headers.get("Retry-After") == "3"
    assert isinstance(err.body, bytes) and json.loads(err.body)["kind"] == "Status"
    assert api.requests[-1] == ("GET", "/api/v1/services", {"limit": "5"})
    with pytest.raises(ApiError) as info:
        client.json("GET", "/api/v1/nothing-here")
    assert info.value.status == 404
    assert client.json("GET", "/api/v1/services")["kind"] == "ServiceList"  # the connection still serves


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_an_inline_client_certificate_is_loaded_and_leaves_no_file(tmp_path: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                    "-keyout", str(tmp_path / "k"), "-out", str(tmp_path / "c")], check=True, capture_output=True)
    b64 = {n: base64.b64encode((tmp_path / n).read_bytes()).decode() for n in ("c", "k")}
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    client = from_kubeconfig(str(kubeconfig(tmp_path / "kc", "https://192.0.2.1:6443",
                                            {"client-certificate-data": b64["c"], "client-key-data": b64["k"]},
                                            cluster={"certificate-authority-data": b64["c"]})))
    assert client.host == "https://192.0.2.1:6443"
    assert not {n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if "ipvsproxy-tls" in n}
    swapped = {"client-certificate-data": b64["k"], "client-key-data": b64["k"]}  # no certificate in it
    with pytest.raises(ConfigError, match="kubeconfig"):
        from_kubeconfig(str(kubeconfig(tmp_path / "kc", "https://192.0.2.1:6443", swapped)))
