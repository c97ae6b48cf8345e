"""The offline-built image archives import into a real containerd and their containers run.

Why: the VM cluster and the e2e conformance run import these archives with `ctr -n k8s.io images
import` and start pods from them; a malformed layout, a wrong name or a broken binary must fail here,
on the host, in seconds, not as an ImagePullBackOff deep inside an emulated node. A private
containerd (its own root, state and socket under a temporary folder, native snapshotter, no CRI
plugin) is started for the session and stopped after; runc runs the containers.

Stage: `images` in scripts/test.sh (pytest -m images tests/images), after scripts/build-images.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.images

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("pause", "busybox", "agnhost", "ipvsproxy")


@pytest.fixture(scope="session")
def records() -> dict[str, dict[str, object]]:
    """Build what is missing (cheap when cached) and return the records by name."""
    proc = subprocess.run(["python3", str(ROOT / "images" / "build.py"), "--json", *NAMES],
                          capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    return {r["name"]: r for r in recs}


class Containerd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock = base / "containerd.sock"
        cfg = base / "config.toml"
        cfg.write_text(
            "version = 2\n"
            f'root = "{base}/root"\nstate = "{base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.sock}"\n'
        )
        self.log = (base / "containerd.log").open("w")
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False).returncode != 0:
            assert self.proc.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not answer in 30 s"
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ctr", "--address", str(self.sock), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert proc.returncode == 0, f"ctr {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc

    def stop(self) -> None:
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not installed (scripts/setup.sh installs containerd and runc)")
    if os.geteuid() != 0:
        pytest.fail("the images stage needs root (containerd, runc)")
    # short path: the socket path must fit in sun_path
    base = Path(tmp_path_factory.mktemp("ctrd"))
    c = Containerd(base)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def imported(containerd: Containerd, records: dict[str, dict[str, object]]) -> dict[str, str]:
    refs = {}
    for name in NAMES:
        out = containerd.ctr("images", "import", "--snapshotter", "native", str(records[name]["archive"])).stdout
        ref = str(records[name]["ref"])
        assert ref in out, out
        refs[name] = ref
    listed = containerd.ctr("images", "ls", "-q").stdout.split()
    assert set(refs.values()) <= set(listed), listed
    return refs


def run(containerd: Containerd, ref: str, cid: str, *args: str, opts: tuple[str, ...] = ()) -> str:
    proc = containerd.ctr("run", "--rm", "--snapshotter", "native", *opts, ref, cid, *args, check=False, timeout=180)
    assert proc.returncode == 0, f"{ref} {args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_references_are_what_the_consumers_ask_for(records: dict[str, dict[str, object]]) -> None:
    assert records["pause"]["ref"] == "k8s.gcr.io/pause:3.2"  # kubelet v1.20.2's default sandbox image
    assert records["busybox"]["ref"] == "docker.io/library/busybox:1.29"  # e2e manifest.go BusyBox
    assert records["agnhost"]["ref"] == "k8s.gcr.io/e2e-test-images/agnhost:2.21"  # e2e manifest.go Agnhost
    assert records["ipvsproxy"]["ref"] == "docker.io/library/ipvsproxy:0.1.0"  # chart default ipvsproxy:appVersion


def test_pause_runs(containerd: Containerd, imported: dict[str, str]) -> None:
    assert run(containerd, imported["pause"], "t-pause", "/pause", "-v").startswith("pause.c v3.4")


def test_busybox_shell_and_applets(containerd: Containerd, imported: dict[str, str]) -> None:
    out = run(containerd, imported["busybox"], "t-busybox", "sh", "-c",
              "echo hello from busybox; id -u; which wget nc nslookup sleep")
    assert out.split() == ["hello", "from", "busybox", "0", "/usr/bin/wget", "/usr/bin/nc", "/usr/bin/nslookup",
                           "/bin/sleep"], out


def test_agnhost_netexec_answers_hostname_over_http_and_udp(containerd: Containerd, imported: dict[str, str]) -> None:
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        http_port, udp_port = s1.getsockname()[1], s2.getsockname()[1]
    proc = containerd.ctr("run", "-d", "--snapshotter", "native", "--net-host", imported["agnhost"], "t-agnhost",
                          "/agnhost", "netexec", f"--http-port={http_port}", f"--udp-port={udp_port}")
    try:
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/hostname", timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert body == socket.gethostname(), body  # host network: the pod name would be the node's
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"hostname", ("127.0.0.1", udp_port))
            assert u.recv(1024).decode().strip() == socket.gethostname()
        # the tools the e2e tests exec in agnhost pods
        out = containerd.ctr("tasks", "exec", "--exec-id", "tools", "t-agnhost", "sh", "-c",
                             "for t in curl nc ss iperf bash nslookup wget; do "
                             "command -v $t >/dev/null || echo missing $t; done; "
                             f"curl -s http://127.0.0.1:{http_port}/hostname; echo; "
                             f"wget -q -T 1 -O - http://127.0.0.1:{http_port}/hostname").stdout
        assert out.split("\n") == [socket.gethostname()] * 2, out  # wget as the e2e probes call it
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", "t-agnhost", check=False)
        time.sleep(0.5)
        containerd.ctr("containers", "rm", "t-agnhost", check=False)
        del proc


def test_ipvsproxy_runs_readonly_with_the_charts_capabilities(containerd: Containerd, imported: dict[str, str]) -> None:
    # the chart: root, read-only root file system, all capabilities dropped but NET_ADMIN
    opts = ("--read-only", "--cap-drop", "CAP_ALL", "--cap-add", "CAP_NET_ADMIN")
    version = run(containerd, imported["ipvsproxy"], "t-ipvsproxy-v", "ipvsproxy", "--version", opts=opts)
    assert "0.1.0" in version, version
    help_text = run(containerd, imported["ipvsproxy"], "t-ipvsproxy-h", "ipvsproxy", "list", "--help", opts=opts)
    assert "Usage:" in help_text and "list" in help_text, help_text
    # the entrypoint and default command are the chart's: `ipvsproxy run` with its help
    run_help = run(containerd, imported["ipvsproxy"], "t-ipvsproxy-r", "ipvsproxy", "run", "--help", opts=opts)
    assert "--scheduler" in run_help
    tools = run(containerd, imported["ipvsproxy"], "t-ipvsproxy-t", "sh", "-c",
                "for t in ipvsadm nft ip conntrack modprobe python3.11; do command -v $t; done", opts=opts)
    assert len(tools.split()) == 6, tools


def test_sizes_are_recorded(records: dict[str, dict[str, object]]) -> None:
    for name in NAMES:
        rec = records[name]
        assert isinstance(rec["compressed"], int) and isinstance(rec["unpacked"], int)
        assert 0 < rec["compressed"] < rec["unpacked"], rec
        assert Path(str(rec["archive"])).stat().st_size >= rec["compressed"]
