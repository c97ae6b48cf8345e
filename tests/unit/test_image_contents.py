"""The ipvsproxy image has ONE list of contents (images/ipvsproxy.toml); nothing may drift from it.

Two recipes make the image: the Dockerfile (users with a registry) and images/build.py (offline,
mmdebstrap + OCI packing, for the test VM's containerd). Both must carry the same Debian packages at
the same versions, the same hash-locked Python dependencies, the same entrypoint, env and user, and
the image name must be the chart's default. These tests fail on any difference, and prove that the
comparison itself catches a changed package, version, entrypoint or env (mutations of the real file).
No build runs here: the offline recipe is run with its two side effects (mmdebstrap and the wheel
download) replaced by recorders.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import scriptload

ROOT = Path(__file__).resolve().parents[2]


build = scriptload.load("images/build.py", "images_build")
DOCKERFILE = (ROOT / "Dockerfile").read_text()


@pytest.fixture()
def contents() -> Any:
    return build.load_contents()


def test_dockerfile_says_what_the_list_says(contents: Any) -> None:
    assert build.dockerfile_drift(DOCKERFILE, contents) == []


@pytest.mark.parametrize(
    ("old", "new", "what"),
    [
        ("nftables=1.0.6-2+deb12u2", "nftables=1.0.6-2+deb12u1", "apt packages"),
        ("        kmod=30+20221128-1 \\\n", "", "apt packages"),
        ("        conntrack=1:1.4.7-1+b2 \\\n", "        conntrack=1:1.4.7-1+b2 \\\n        tcpdump=4.99.3-1 \\\n",
         "apt packages"),
        ('ENTRYPOINT ["ipvsproxy"]', 'ENTRYPOINT ["/opt/ipvsproxy/bin/ipvsproxy"]', "ENTRYPOINT"),
        ('CMD ["run"]', 'CMD ["run", "--no-load-modules"]', "CMD"),
        ("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=0", "ENV"),
        ("WORKDIR /\n", "WORKDIR /\nUSER 65534\n", "USER"),
        ('org.opencontainers.image.licenses="Apache-2.0"', 'org.opencontainers.image.licenses="MIT"', "LABEL"),
        ("COPY requirements.lock ./", "COPY requirements.txt ./", "COPY sources"),
        ("python3.11 -m venv /opt/ipvsproxy", "python3.11 -m venv /opt/venv", "RUN lacks"),
        ("pip install --no-cache-dir --require-hashes ", "pip install --no-cache-dir ", "RUN lacks"),
        ("ARG BASE_IMAGE=debian:bookworm-slim", "ARG BASE_IMAGE=debian:trixie-slim", "base image"),
    ],
)
def test_drift_is_caught(contents: Any, old: str, new: str, what: str) -> None:
    assert old in DOCKERFILE, f"the mutation no longer applies to the Dockerfile: {old!r}"
    problems = build.dockerfile_drift(DOCKERFILE.replace(old, new, 1), contents)
    assert any(p.startswith(what) or what in p for p in problems), problems


def test_list_matches_the_chart_and_the_package(contents: Any) -> None:
    values = yaml.safe_load((ROOT / "charts" / "ipvsproxy" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "ipvsproxy" / "Chart.yaml").read_text())
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert contents.repository == values["image"]["repository"]
    assert values["image"]["tag"] in ("", contents.tag)  # "" = appVersion
    assert contents.tag == chart["appVersion"] == cfg["metadata"]["version"]
    # what containerd calls the image = what the kubelet resolves "ipvsproxy:<tag>" to
    assert build.recipes()["ipvsproxy"].ref == f"docker.io/library/{contents.repository}:{contents.tag}"
    assert contents.config.entrypoint == ("ipvsproxy",)
    assert "ipvsproxy = ipvsproxy.cli.main:main" in cfg["options.entry_points"]["console_scripts"]
    assert contents.config.user in ("", "0", "root")  # netlink writes need uid 0 (see the Dockerfile)
    assert all(re.fullmatch(r"[0-9:.~+a-z-]+", v) for v in contents.apt.values()), contents.apt
    assert (ROOT / contents.lock).is_file()
    for src in contents.sources:
        assert (ROOT / src).exists(), src


def test_offline_build_installs_exactly_the_list(contents: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """Run the offline recipe with mmdebstrap and the wheel download recorded instead of run."""
    calls: list[tuple[Path, str, list[str], list[str]]] = []
    wheels = tmp_path / "wheels"
    wheels.mkdir()

    def fake_mmdebstrap(out: Path, variant: str, packages: list[str], hooks: list[str], slim: bool = True) -> None:
        calls.append((out, variant, packages, hooks))

    monkeypatch.setattr(build, "mmdebstrap", fake_mmdebstrap)
    monkeypatch.setattr(build, "_wheels", lambda c: wheels)
    work = tmp_path / "work"
    work.mkdir()
    layers, config = build._ipvsproxy_build(work)

    assert config == contents.config
    ((out, variant, packages, hooks),) = calls
    assert layers == [out]
    assert variant == contents.variant == "minbase"  # bookworm-slim is a minbase root file system
    assert sorted(packages) == sorted(f"{n}={v}" for n, v in contents.apt.items())
    script = "\n".join(hooks)
    assert f"python3.11 -m venv {contents.venv}" in script
    assert f"--require-hashes --only-binary=:all: --no-index --find-links /wheels -r {contents.lock}" in script
    assert "--no-deps --no-build-isolation ." in script
    assert 'rm -rf "$1/src" "$1/wheels"' in script  # nothing of the build is left in the image
    # the sources handed to pip are exactly the listed ones
    copied = sorted(p.name for p in (work / "src").iterdir())
    assert copied == sorted([contents.lock, *contents.sources])


def test_offline_build_refuses_a_drifted_dockerfile(tmp_path: Path, monkeypatch: Any) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "Dockerfile").write_text(DOCKERFILE.replace("iproute2=6.1.0-3", "iproute2=6.1.0-2"))
    monkeypatch.setattr(build, "ROOT", root)
    monkeypatch.setattr(build, "mmdebstrap", lambda *a, **k: pytest.fail("built despite the drift"))
    with pytest.raises(build.BuildError, match="apt packages"):
        build._ipvsproxy_build(tmp_path)


def test_image_config_is_what_oci_wants(contents: Any) -> None:
    j = contents.config.to_json()
    assert j["Entrypoint"] == ["ipvsproxy"] and j["Cmd"] == ["run"]
    assert "PATH=/opt/ipvsproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in j["Env"]
    assert "User" not in j  # root
