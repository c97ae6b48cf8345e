"""Build the project's container images offline, as OCI archives, without Docker or a registry.

Why: the test VM runs a real Kubernetes node (containerd) with no registry to pull from, and the
e2e conformance suite wants its images under fixed names. Every image here is made from what this
machine already trusts: Debian packages (mmdebstrap, busybox-static, gcc) and the Kubernetes
v1.20.2 source tree that scripts/install-kubernetes.sh unpacks. The result is an OCI image layout
in a tar file that `ctr -n k8s.io images import` (and podman/skopeo) accept, named with the
reference its consumer asks for (kubelet's default pause image, the e2e suite's agnhost and
busybox, the Helm chart's default ipvsproxy image).

The ipvsproxy image follows images/ipvsproxy.toml, the one list of what it contains; the
Dockerfile is checked against the same list (tests/unit/test_image_contents.py).

Archives are cached under /var/cache/ipvsproxy/images/, named by a key over every input (sources,
the list, this file, tool versions), so a rerun with nothing changed costs a hash of the inputs.

    python3 images/build.py [--cache DIR] [--json] [NAME...]      # build what is missing, print a table
    python3 images/build.py --archive NAME                        # build if missing, print the path

Driven by scripts/build-images.sh, which installs the tools first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import inspect
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "images" / "ipvsproxy.toml"
DEFAULT_CACHE = Path(os.environ.get("IPVSPROXY_CACHE", "/var/cache/ipvsproxy")) / "images"
KUBE_CACHE = Path(os.environ.get("IPVSPROXY_CACHE", "/var/cache/ipvsproxy")) / "kubernetes-v1.20.2"
KUBE_TREE = KUBE_CACHE / "src" / "tree"
GOROOT_BIN = "/usr/lib/go-1.19/bin"
# One fixed timestamp for every file and blob we write ourselves (2021-01-13, the v1.20.2 release).
EPOCH = 1610496000
# Debian's bookworm-slim drops these from every package (debuerreotype's slimify list).
SLIM_EXCLUDES = (
    "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/linda/*", "/usr/share/lintian/overrides/*",
    "/usr/share/locale/*", "/usr/share/man/*", "/usr/share/groff/*",
)
SLIM_INCLUDES = ("/usr/share/doc/*/copyright",)


class BuildError(Exception):
    """A build step failed; the message says which and why (one line for the CLI)."""


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The OCI image configuration fields we set (https://github.com/opencontainers/image-spec/blob/main/config.md)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = (("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),)
    workdir: str = "/"
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    exposed_ports: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in self.env], "WorkingDir": self.workdir}
        if self.entrypoint:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            out["Cmd"] = list(self.cmd)
        if self.user:
            out["User"] = self.user
        if self.labels:
            out["Labels"] = dict(self.labels)
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        return out


@dataclasses.dataclass(frozen=True)
class Built:
    """One archive in the cache and what `ctr images import` will call it."""

    name: str
    ref: str
    archive: Path
    digest: str  # the manifest's digest (what containerd shows)
    compressed: int  # bytes of the gzip layers (what a registry would transfer)
    unpacked: int  # bytes of the uncompressed layer tars (about the size on disk after import)
    seconds: float  # how long the build took when it ran
    key: str

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["archive"] = str(self.archive)
        return d


# ---- OCI packing ------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    _add_bytes(tar, f"blobs/sha256/{digest}", data)
    return digest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = EPOCH
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def pack_oci(layers: list[Path], config: ImageConfig, ref: str, out: Path) -> tuple[str, int, int]:
    """Write an OCI image layout tar at `out` with the given uncompressed layer tars, bottom first.

    Returns (manifest digest, compressed layer bytes, uncompressed layer bytes). The index names the
    manifest with the full reference in both org.opencontainers.image.ref.name and
    io.containerd.image.name, so `ctr images import` keeps the name without --base-name.
    """
    diff_ids: list[str] = []
    layer_descs: list[dict[str, Any]] = []
    compressed = unpacked = 0
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as oci:
        _add_bytes(oci, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        for layer in layers:
            diff_ids.append("sha256:" + _sha256_file(layer))
            unpacked += layer.stat().st_size
            gz = Path(tmp) / "layer.tar.gz"
            with (
                layer.open("rb") as src,
                gz.open("wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0, filename="") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
            digest = _sha256_file(gz)
            size = gz.stat().st_size
            compressed += size
            info = oci.gettarinfo(str(gz), arcname=f"blobs/sha256/{digest}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
            with gz.open("rb") as f:
                oci.addfile(info, f)
            gz.unlink()
            layer_descs.append(
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{digest}", "size": size}
            )
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH))
        cfg = {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": config.to_json(),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": created, "created_by": "images/build.py (ipvsproxy, offline)"} for _ in layers],
        }
        cfg_bytes = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
        cfg_digest = _blob(oci, cfg_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{cfg_digest}",
                "size": len(cfg_bytes),
            },
            "layers": layer_descs,
        }
        man_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        man_digest = _blob(oci, man_bytes)
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": f"sha256:{man_digest}",
                    "size": len(man_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref},
                }
            ],
        }
        _add_bytes(oci, "index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
    return f"sha256:{man_digest}", compressed, unpacked


class RootfsTar:
    """A deterministic layer tar written entry by entry (root-owned, fixed mtime)."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar

    @classmethod
    @contextlib.contextmanager
    def create(cls, path: Path) -> Iterator[RootfsTar]:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            yield cls(tar)

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode, info.mtime = kind, mode, EPOCH
        return info

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def copy(self, name: str, src: Path, mode: int = 0o755) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = src.stat().st_size
        with src.open("rb") as f:
            self.tar.addfile(info, f)

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)


# ---- helpers -----------------------------------------------------------------------------------------


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, what: str = "") -> str:
    """Run a build command; on failure raise BuildError with the tail of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        sys.stderr.write(tail + "\n")
        raise BuildError(f"{what or cmd[0]} failed (exit {proc.returncode}): {shlex.join(cmd)[:300]}")
    return proc.stdout


def dpkg_version(package: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise BuildError(f"Debian package {package} is not installed (run scripts/build-images.sh, which installs it)")
    return proc.stdout


def hash_paths(h: Any, base: Path, paths: list[str]) -> None:
    """Feed file names and contents under base into h, in a stable order; caches are left out."""
    for rel in paths:
        p = base / rel
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_dir() or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(f.relative_to(base).as_posix().encode() + b"\0")
            if f.is_symlink():
                h.update(b"->" + os.readlink(f).encode())
            else:
                h.update(hashlib.sha256(f.read_bytes()).digest())


def debian_sources() -> Path:
    """The host's apt sources (deb822 first): mmdebstrap uses the same mirror and suites (updates, security)."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        if "bookworm" in f.read_text():
            return f
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file() and "bookworm" in legacy.read_text():
        return legacy
    raise BuildError("no bookworm apt source in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list")


def mmdebstrap(out: Path, variant: str, packages: list[str], hooks: list[str], slim: bool = True) -> None:
    """A Debian bookworm root file system as a tar (mmdebstrap root mode, reproducible timestamps)."""
    cmd = ["mmdebstrap", "--mode=root", f"--variant={variant}", "--format=tar", "--quiet",
           "--aptopt=APT::Install-Recommends false"]  # like the Dockerfile's --no-install-recommends
    # merged /usr from the start (symlinks + usr-is-merged), as Debian's bookworm images are; without it apt
    # satisfies "usrmerge | usr-is-merged" with usrmerge, which drags in perl (40 MB)
    cmd.append("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr")
    if packages:
        cmd.append("--include=" + ",".join(packages))
    if slim:
        cmd += [f"--dpkgopt=path-exclude={p}" for p in SLIM_EXCLUDES]
        cmd += [f"--dpkgopt=path-include={p}" for p in SLIM_INCLUDES]
    # no apt lists or caches in the image (like the Dockerfile's rm -rf /var/lib/apt/lists/*)
    hooks = [*hooks, 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb']
    cmd += [f"--customize-hook={h}" for h in hooks]
    cmd += ["bookworm", str(out), str(debian_sources())]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(EPOCH))
    run(cmd, env=env, what="mmdebstrap")


def go_env() -> dict[str, str]:
    """GOPATH mode over the Kubernetes tree, as scripts/install-kubernetes.sh builds it."""
    gopath = KUBE_CACHE / "gopath"
    link = gopath / "src" / "k8s.io" / "kubernetes"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(KUBE_TREE)
    return dict(
        os.environ,
        GO111MODULE="off",
        GOPROXY="off",
        GOFLAGS="",
        CGO_ENABLED="0",
        GOPATH=str(gopath),
        GOCACHE=str(KUBE_CACHE / "go-build"),
        PATH=f"{GOROOT_BIN}:{os.environ.get('PATH', '')}",
    )


def need_tree() -> None:
    if not (KUBE_TREE / "build" / "pause" / "linux" / "pause.c").is_file():
        raise BuildError(f"no Kubernetes source tree in {KUBE_TREE} (scripts/install-kubernetes.sh --prepare-source)")


# ---- the images ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    ref: str
    doc: str
    inputs: Callable[[Any], None]  # feeds the cache key
    build: Callable[[Path], tuple[list[Path], ImageConfig]]  # work dir -> layer tars, config
    helpers: tuple[Any, ...] = ()  # other code the build runs: its source is part of the cache key


def _pause_inputs(h: Any) -> None:
    need_tree()
    hash_paths(h, KUBE_TREE, ["build/pause/linux/pause.c"])
    h.update(dpkg_version("gcc").encode() + dpkg_version("libc6-dev").encode())


def _pause_build(work: Path) -> tuple[list[Path], ImageConfig]:
    # build/pause/Makefile: CFLAGS = -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV), then strip
    binary = work / "pause"
    src = KUBE_TREE / "build" / "pause" / "linux" / "pause.c"
    run(["gcc", "-Os", "-Wall", "-Werror", "-static", "-DVERSION=v3.4-k8s-v1.20.2", "-o", str(binary), str(src)])
    run(["strip", str(binary)])
    layer = work / "layer.tar"
    with RootfsTar.create(layer) as t:
        t.copy("pause", binary, 0o755)
    return [layer], ImageConfig(entrypoint=("/pause",))


BUSYBOX = Path("/bin/busybox")

# Debian's busybox-static before 1.36.1-5 is built without FEATURE_WGET_TIMEOUT, and its wget then
# segfaults on -T (the option parser writes through a NULL pointer; bookworm ships 1.35.0). The e2e
# suite's probes run `wget -q -T 1 -O - URL` in exec pods: every one of them answered "Segmentation
# fault" in the 2026-12-01 conformance run, for either proxy. So agnhost's `wget` is this script: the
# same applet, with -T N turned into busybox's `timeout N` around it (a bound on the whole request).
# Not in the busybox image: its busybox sh runs applets itself whatever PATH holds (standalone shell),
# so a script there is never reached; the probes that use wget run in agnhost pods.
WGET_WRAPPER = b"""#!/bin/sh
# wget = busybox wget, with -T N as `timeout N` (Debian's busybox-static wget segfaults on -T).
t= want=
for a in "$@"; do
    shift
    if [ -n "$want" ]; then t=$a want=; continue; fi
    case $a in
        -T) want=1 ;;
        -T?*) t=${a#-T} ;;
        --timeout=*) t=${a#--timeout=} ;;
        *) set -- "$@" "$a" ;;
    esac
done
if [ -n "$t" ]; then exec busybox timeout "$t" busybox wget "$@"; fi
exec busybox wget "$@"
"""


def _busybox_inputs(h: Any) -> None:
    h.update(dpkg_version("busybox-static").encode())
    hash_paths(h, BUSYBOX.parent, [BUSYBOX.name])


def _busybox_build(work: Path) -> tuple[list[Path], ImageConfig]:
    applets = run([str(BUSYBOX), "--list-full"]).split()
    layer = work / "layer.tar"
    with RootfsTar.create(layer) as t:
        for d in ("bin", "dev", "etc", "home", "proc", "root", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var",
                  "var/spool", "var/spool/mail", "var/www"):
            t.dir(d, 0o700 if d == "root" else 0o755)
        t.dir("tmp", 0o1777)
        t.copy("bin/busybox", BUSYBOX, 0o755)
        for applet in sorted(set(applets)):
            if applet != "bin/busybox":
                t.symlink(applet, "/bin/busybox")
        t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n")
        t.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return [layer], ImageConfig(cmd=("sh",))


def _agnhost_inputs(h: Any) -> None:
    need_tree()
    hash_paths(h, KUBE_TREE, ["test/images/agnhost"])
    h.update(b"reflect2 patched" if (KUBE_CACHE / "src" / ".reflect2").is_file() else b"vendor as shipped")
    h.update(dpkg_version("golang-1.19-go").encode() + dpkg_version("mmdebstrap").encode())
    h.update(json.dumps(AGNHOST_PACKAGES).encode())
    _busybox_inputs(h)  # its nslookup and wget applets
    h.update(WGET_WRAPPER)


# What agnhost's Alpine image adds with apk (its Dockerfile), from Debian: the e2e tests exec curl,
# nc, ss, iperf and bash in agnhost pods, and `nslookup` and `wget` (the ExternalName and the
# serve-hostname Service tests run them; here they are
# busybox-static's applets, 2 MB, where Debian's bind9-dnsutils would pull libicu, 36 MB; wget through
# WGET_WRAPPER). Left out:
# bind-tools' dig (only the DNS tests use it) and the CoreDNS binary (a download, not in the tree).
AGNHOST_PACKAGES = ["bash", "curl", "netcat-openbsd", "iproute2", "iperf"]


def _agnhost_build(work: Path) -> tuple[list[Path], ImageConfig]:
    need_tree()
    binary = work / "agnhost"
    # GOPATH mode: the import path comes from where we stand, so PWD must be the symlink, not the tree
    pkg_dir = KUBE_CACHE / "gopath" / "src" / "k8s.io" / "kubernetes"
    run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(binary), "./test/images/agnhost"],
        cwd=pkg_dir, env={**go_env(), "PWD": str(pkg_dir)}, what="go build agnhost")
    porter = KUBE_TREE / "test" / "images" / "agnhost" / "porter"
    hooks = [
        f'cp {shlex.quote(str(binary))} "$1/agnhost"',
        'ln -s agnhost "$1/agnhost-2"',
        'mkdir -p "$1/uploads"',
        f'cp {shlex.quote(str(porter / "localhost.crt"))} {shlex.quote(str(porter / "localhost.key"))} "$1/"',
        f'cp {shlex.quote(str(BUSYBOX))} "$1/usr/bin/busybox"',
        'ln -s busybox "$1/usr/bin/nslookup"',
        f'printf %s {shlex.quote(WGET_WRAPPER.decode())} > "$1/usr/bin/wget"',
        'chmod 755 "$1/usr/bin/wget"',
    ]
    layer = work / "rootfs.tar"
    mmdebstrap(layer, "minbase", AGNHOST_PACKAGES, hooks)
    ports = ("80/tcp", "8080/tcp", "8081/tcp", "9376/tcp")
    return [layer], ImageConfig(entrypoint=("/agnhost",), cmd=("pause",), exposed_ports=ports)


# ---- the ipvsproxy image: images/ipvsproxy.toml ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contents:
    """images/ipvsproxy.toml, typed: what the ipvsproxy image contains."""

    repository: str
    tag: str
    base: str
    variant: str
    apt: dict[str, str]
    lock: str
    venv: str
    sources: list[str]
    config: ImageConfig

    @property
    def ref(self) -> str:
        repo = self.repository
        first = repo.split("/", 1)[0]
        if "/" not in repo:
            repo = f"docker.io/library/{repo}"
        elif "." not in first and ":" not in first and first != "localhost":
            repo = f"docker.io/{repo}"
        return f"{repo}:{self.tag}"


def load_contents(path: Path = SPEC) -> Contents:
    raw = tomllib.loads(path.read_text())
    img, cfg = raw["image"], raw["config"]
    config = ImageConfig(
        entrypoint=tuple(cfg["entrypoint"]),
        cmd=tuple(cfg["cmd"]),
        env=tuple((k, str(v)) for k, v in cfg["env"].items()),
        workdir=cfg["workdir"],
        user=cfg["user"],
        labels=tuple(cfg["labels"].items()),
    )
    return Contents(
        repository=img["repository"],
        tag=img["tag"],
        base=img["base"],
        variant=img["variant"],
        apt=dict(raw["apt"]),
        lock=raw["python"]["lock"],
        venv=raw["python"]["venv"],
        sources=list(raw["python"]["sources"]),
        config=config,
    )


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _kv_pairs(args: str) -> dict[str, str]:
    """ENV/LABEL/ARG arguments in key=value form (values may be double-quoted)."""
    return {k: v[0] for k, *v in (w.split("=", 1) for w in shlex.split(args)) if v}


def dockerfile_drift(text: str, c: Contents) -> list[str]:
    """How the Dockerfile differs from images/ipvsproxy.toml; empty when they say the same."""
    ins = dockerfile_instructions(text)
    kinds: dict[str, list[str]] = {}
    for kw, rest in ins:
        kinds.setdefault(kw, []).append(rest)
    problems: list[str] = []

    def differ(what: str, dockerfile: object, listed: object) -> None:
        if dockerfile != listed:
            problems.append(f"{what}: Dockerfile {dockerfile!r} != images/ipvsproxy.toml {listed!r}")

    args: dict[str, str] = {}
    for rest in kinds.get("ARG", []):
        args.update(_kv_pairs(rest))
    differ("base image", args.get("BASE_IMAGE", "").split("@")[0], c.base)
    apt: dict[str, str] = {}
    runs = kinds.get("RUN", [])
    for rest in runs:
        for cmd in rest.split("&&"):
            words = cmd.split()
            if words[:2] == ["apt-get", "install"]:
                apt.update(w.partition("=")[::2] for w in words[2:] if not w.startswith("-"))
    differ("apt packages", apt, c.apt)
    env: dict[str, str] = {}
    for rest in kinds.get("ENV", []):
        env.update(_kv_pairs(rest))
    differ("ENV", env, dict(c.config.env))
    labels: dict[str, str] = {}
    for rest in kinds.get("LABEL", []):
        labels.update(_kv_pairs(rest))
    differ("LABEL", labels, dict(c.config.labels))
    differ("ENTRYPOINT", [json.loads(e) for e in kinds.get("ENTRYPOINT", [])], [list(c.config.entrypoint)])
    differ("CMD", [json.loads(e) for e in kinds.get("CMD", [])], [list(c.config.cmd)])
    differ("last WORKDIR", (kinds.get("WORKDIR") or ["/"])[-1], c.config.workdir)
    differ("USER", (kinds.get("USER") or [""])[-1], c.config.user)
    copied: list[str] = []
    for rest in kinds.get("COPY", []):
        copied += [w.rstrip("/") for w in rest.split() if not w.startswith("--")][:-1]
    differ("COPY sources", sorted(copied), sorted([c.lock, *c.sources]))
    python = next((n for n in c.apt if n.startswith("python3.") and "-" not in n), "")
    joined = " ".join(runs)
    for needed in (f"{python} -m venv {c.venv}", f"-r {c.lock}", "--require-hashes", "--only-binary=:all:",
                   "--no-deps --no-build-isolation ."):
        if needed not in joined:
            problems.append(f"Dockerfile RUN lacks {needed!r} (the offline build does it: images/build.py)")
    return problems


def _ipvsproxy_inputs(h: Any) -> None:
    c = load_contents()
    hash_paths(h, ROOT, ["images/ipvsproxy.toml", c.lock, *c.sources])
    h.update(dpkg_version("mmdebstrap").encode())


def _wheels(c: Contents) -> Path:
    """The lock file's wheels, downloaded once per lock file (hash-checked by pip)."""
    lock = ROOT / c.lock
    key = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    dest = DEFAULT_CACHE / "wheels" / key
    if (dest / ".complete").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    # pip from the project's .venv (scripts/setup.sh): Debian's python3 has no pip unless python3-pip is installed
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.is_file() else sys.executable
    run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--require-hashes",
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--platform",
         "manylinux_2_36_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64",
         "-d", str(dest), "-r", str(lock)], what="pip download (requirements.lock)")
    (dest / ".complete").touch()
    return dest


def _ipvsproxy_build(work: Path) -> tuple[list[Path], ImageConfig]:
    c = load_contents()
    drift = dockerfile_drift((ROOT / "Dockerfile").read_text(), c)
    if drift:
        raise BuildError("the Dockerfile and images/ipvsproxy.toml differ: " + "; ".join(drift))
    wheels = _wheels(c)
    src = work / "src"
    src.mkdir()
    for rel in [c.lock, *c.sources]:
        p = ROOT / rel
        if p.is_dir():
            shutil.copytree(p, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / rel)
    venv = shlex.quote(c.venv)
    pip = f"{venv}/bin/pip"
    env = "env PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1"
    python = next(name for name in c.apt if name.startswith("python3.") and "-" not in name)
    # The Dockerfile's two pip steps, with the wheels from a local folder instead of PyPI.
    hooks = [
        f'cp -a {shlex.quote(str(src))} "$1/src"',
        f'mkdir -p "$1/wheels" && cp {shlex.quote(str(wheels))}/*.whl "$1/wheels/"',
        f'chroot "$1" {python} -m venv {venv}',
        f'chroot "$1" sh -c "cd /src && {env} {pip} install --no-cache-dir --require-hashes --only-binary=:all: '
        f'--no-index --find-links /wheels -r {shlex.quote(c.lock)}"',
        f'chroot "$1" sh -c "cd /src && {env} {pip} install --no-cache-dir --no-deps --no-build-isolation ."',
        'rm -rf "$1/src" "$1/wheels"',
    ]
    layer = work / "rootfs.tar"
    mmdebstrap(layer, c.variant, [f"{n}={v}" for n, v in c.apt.items()], hooks)
    return [layer], c.config


def recipes() -> dict[str, Recipe]:
    c = load_contents()
    return {
        r.name: r
        for r in (
            Recipe("pause", "k8s.gcr.io/pause:3.2",
                   "kubelet v1.20.2's default sandbox image, from build/pause/linux/pause.c (static)",
                   _pause_inputs, _pause_build),
            Recipe("busybox", "docker.io/library/busybox:1.29",
                   "the e2e suite's BusyBox image: Debian's busybox-static and its applets",
                   _busybox_inputs, _busybox_build),
            Recipe("agnhost", "k8s.gcr.io/e2e-test-images/agnhost:2.21",
                   "the e2e suite's agnhost (netexec, serve-hostname, ...) from test/images/agnhost",
                   _agnhost_inputs, _agnhost_build, (mmdebstrap, go_env, need_tree)),
            Recipe("ipvsproxy", c.ref, "the agent, as images/ipvsproxy.toml lists (the chart's default image)",
                   _ipvsproxy_inputs, _ipvsproxy_build,
                   (mmdebstrap, _wheels, load_contents, Contents, dockerfile_drift, _kv_pairs)),
        )
    }


# ---- cache ------------------------------------------------------------------------------------------


def cache_key(r: Recipe) -> str:
    """A hash of everything the archive is made from: the recipe's own code (its two functions and the shared
    packing code, not the rest of this file, so editing one recipe rebuilds one image) and its inputs."""
    h = hashlib.sha256()
    h.update(r.ref.encode())
    for fn in (r.inputs, r.build, pack_oci, _add_bytes, _blob, RootfsTar, ImageConfig, *r.helpers):
        h.update(inspect.getsource(fn).encode())
    h.update(repr((SLIM_EXCLUDES, SLIM_INCLUDES, EPOCH)).encode())
    r.inputs(h)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[IO[str]]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(built: Built, cache: Path) -> Built:
    """Hard-link the archive to CACHE/NAME.oci.tar: the top level holds exactly one archive per image, the one
    this checkout asked for last (a cluster script can import CACHE/*.oci.tar)."""
    top = cache / f"{built.name}.oci.tar"
    tmp = cache / f".{built.name}.oci.tar.new"
    tmp.unlink(missing_ok=True)
    os.link(built.archive, tmp)
    tmp.replace(top)
    rec = dataclasses.replace(built, archive=top)
    (cache / f".{built.name}.json.new").write_text(json.dumps(rec.to_json(), indent=1) + "\n")
    (cache / f".{built.name}.json.new").replace(cache / f"{built.name}.json")
    return rec


def ensure(r: Recipe, cache: Path, log: Callable[[str], None]) -> Built:
    store = cache / "store"
    store.mkdir(parents=True, exist_ok=True)
    key = cache_key(r)
    stem = f"{r.name}-{r.ref.rsplit(':', 1)[1]}-{key}"
    archive, record = store / f"{stem}.oci.tar", store / f"{stem}.json"
    with locked(cache / f".{r.name}.lock"):
        if archive.is_file() and record.is_file():
            d = json.loads(record.read_text())
            return publish(Built(**{**d, "archive": archive}), cache)
        log(f"building {r.name} ({r.ref}): {r.doc}")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=store, prefix=f".build-{r.name}-") as tmp:
            layers, config = r.build(Path(tmp))
            partial = Path(tmp) / "image.oci.tar"
            digest, compressed, unpacked = pack_oci(layers, config, r.ref, partial)
            partial.replace(archive)
        built = Built(r.name, r.ref, archive, digest, compressed, unpacked, round(time.monotonic() - start, 1), key)
        d = built.to_json()
        record.write_text(json.dumps(d, indent=1) + "\n")
        log(f"built {r.name} in {built.seconds:.0f}s")
        return publish(built, cache)


def human(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build-images", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help="images to build (default: all, in order)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="archive folder (default %(default)s)")
    ap.add_argument("--archive", metavar="NAME", help="build NAME if missing and print only its archive path")
    ap.add_argument("--json", action="store_true", help="print the records as JSON lines")
    ap.add_argument("--list", action="store_true", help="print the image names and references, build nothing")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(f"build-images: {msg}", file=sys.stderr, flush=True)

    try:
        all_recipes = recipes()
        if args.list:
            for r in all_recipes.values():
                print(f"{r.name:<10} {r.ref:<45} {r.doc}")
            return 0
        names = [args.archive] if args.archive else (args.names or list(all_recipes))
        unknown = [n for n in names if n not in all_recipes]
        if unknown:
            log(f"unknown image {', '.join(unknown)} (known: {', '.join(all_recipes)})")
            return 2
        built = [ensure(all_recipes[n], args.cache, log) for n in names]
    except (BuildError, OSError, KeyError, tomllib.TOMLDecodeError) as e:
        log(f"error: {e}")
        return 1
    if args.archive:
        print(built[0].archive)
    elif args.json:
        for b in built:
            print(json.dumps(b.to_json()))
    else:
        print(f"{'NAME':<10} {'REFERENCE':<45} {'COMPRESSED':>10} {'UNPACKED':>10}  ARCHIVE")
        for b in built:
            print(f"{b.name:<10} {b.ref:<45} {human(b.compressed):>10} {human(b.unpacked):>10}  {b.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
