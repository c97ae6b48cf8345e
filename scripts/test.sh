#!/usr/bin/env bash
# The project's test command (README, .ci/run): every stage runs, then a summary; non-zero if any failed.
#
#   setup    scripts/setup.sh (apt packages, .venv)            skipped with SKIP_SETUP=1 or inside the VM
#   ruff     ruff check ipvsproxy tests images scripts/clusterdns.py
#   mypy     mypy ipvsproxy images/build.py scripts/clusterdns.py (strict: pyproject.toml)
#   unit     pytest (host; pyproject's addopts deselect kernel and realapi tests); tests/contract's
#            dataplane contract runs here on the in-memory dataplane, and in the kernel stage on netlink
#   realapi  pytest -m realapi tests/realapi: the agent against a real kube-apiserver v1.20.2 + etcd on the
#            host (binaries from scripts/install-kubernetes.sh's cache). Skipped with SKIP_REALAPI=1 or in the VM.
#   images   scripts/build-images.sh (offline OCI archives; cached by content, so cheap when nothing changed),
#            then pytest -m images tests/images: each archive imported into a private containerd on the host
#            and run with runc. Skipped with SKIP_IMAGES=1 or in the VM.
#   kernel   pytest -m kernel tests/kernel tests/contract, all in ONE boot of the IPVS test VM (scripts/vm-run.sh);
#            run directly when IN_VM is set (already inside the guest). Skipped with SKIP_KERNEL=1. Includes
#            tests/kernel/test_migrate.py: etcd + kube-apiserver + the real kube-proxy v1.20.2 in the VM, the
#            switch to ipvsproxy, cleanup-kube-proxy and the rollback with traffic (figures: results/migrate.json).
#   cluster  pytest -m cluster tests/cluster in its own boot of the VM (4G): a single-node Kubernetes v1.20.2
#            without kube-proxy (scripts/cluster.sh), ipvsproxy installed by Helm, traffic from pods, scale,
#            helm upgrade/uninstall. Needs the image archives (scripts/build-images.sh, cached). Figures in
#            results/cluster-figures.json. About 50 minutes on an idle 2-core host. Skipped with SKIP_CLUSTER=1
#            or RUN_CLUSTER=0.
#
# Extra pytest arguments: UNIT_PYTEST_ARGS, REALAPI_PYTEST_ARGS, KERNEL_PYTEST_ARGS, CLUSTER_PYTEST_ARGS. The
# kernel and cluster stages' JUnit reports land in results/ (the VM's read-write folder).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

stages=()
results=()
failed=0

run_stage() {  # run_stage NAME OK_CODES COMMAND... ; OK_CODES: space-separated exit codes counted as pass
    local name=$1 ok=$2 rc=0 start end status
    shift 2
    printf '\n==> [%s] %s\n' "$name" "$*"
    start=$(date +%s)
    "$@" || rc=$?
    end=$(date +%s)
    if [[ " $ok " == *" $rc "* ]]; then
        status=PASS
    else
        status="FAIL (exit $rc)"
        [[ $rc == 5 ]] && status="FAIL (exit 5: no tests collected)"
        failed=1
    fi
    stages+=("$name")
    results+=("$(printf '%-28s %5ss' "$status" "$((end - start))")")
}

skip_stage() {
    stages+=("$1")
    results+=("skipped ($2)")
}

if [[ -n ${IN_VM:-} ]]; then
    # inside the guest the file system is read-only outside results/: keep caches in /tmp
    export MYPY_CACHE_DIR=/tmp/ipvsproxy-mypy-cache RUFF_CACHE_DIR=/tmp/ipvsproxy-ruff-cache
    export PYTHONDONTWRITEBYTECODE=1
    unit_cache=(-p no:cacheprovider)
else
    unit_cache=()
fi

if [[ -n ${IN_VM:-} ]]; then
    skip_stage setup "inside the VM"
elif [[ -n ${SKIP_SETUP:-} && ${SKIP_SETUP} != 0 ]]; then
    skip_stage setup "SKIP_SETUP"
else
    run_stage setup "0" bash scripts/setup.sh
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "test.sh: .venv is missing; run scripts/setup.sh (or drop SKIP_SETUP)" >&2
    exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"

run_stage ruff "0" ruff check ipvsproxy tests images scripts/clusterdns.py
run_stage mypy "0" mypy ipvsproxy images/build.py scripts/clusterdns.py

# Host unit tests; "no tests collected" (5) is a failure while tests/unit holds test files.
unit_ok="0"
compgen -G "tests/unit/test_*.py" >/dev/null || unit_ok="0 5"
# shellcheck disable=SC2086
run_stage unit "$unit_ok" pytest "${unit_cache[@]}" ${UNIT_PYTEST_ARGS:-}

if [[ -n ${IN_VM:-} ]]; then
    skip_stage realapi "inside the VM"
elif [[ -n ${SKIP_REALAPI:-} && ${SKIP_REALAPI} != 0 ]]; then
    skip_stage realapi "SKIP_REALAPI"
else
    # shellcheck disable=SC2086
    run_stage realapi "0" pytest -m realapi tests/realapi -p no:cacheprovider ${REALAPI_PYTEST_ARGS:-}
fi

if [[ -n ${IN_VM:-} ]]; then
    skip_stage images "inside the VM"
elif [[ -n ${SKIP_IMAGES:-} && ${SKIP_IMAGES} != 0 ]]; then
    skip_stage images "SKIP_IMAGES"
else
    run_stage images "0" bash -c 'bash scripts/build-images.sh && pytest -m images tests/images -p no:cacheprovider'
fi

mkdir -p results
kernel_cmd="pytest -m kernel tests/kernel tests/contract -p no:cacheprovider --junitxml=results/kernel-junit.xml ${KERNEL_PYTEST_ARGS:-}"
if [[ -n ${SKIP_KERNEL:-} && ${SKIP_KERNEL} != 0 ]]; then
    skip_stage kernel "SKIP_KERNEL"
elif [[ -n ${IN_VM:-} ]]; then
    run_stage kernel "0" bash -c "$kernel_cmd"
else
    run_stage kernel "0" bash scripts/vm-run.sh --rwdir "$ROOT/results" -- "$kernel_cmd"
fi

cluster_cmd="pytest -m cluster tests/cluster -p no:cacheprovider -s --junitxml=results/cluster-junit.xml ${CLUSTER_PYTEST_ARGS:-}"
if [[ ${RUN_CLUSTER:-1} == 0 || ( -n ${SKIP_CLUSTER:-} && ${SKIP_CLUSTER} != 0 ) ]]; then
    skip_stage cluster "SKIP_CLUSTER"
elif [[ -n ${IN_VM:-} ]]; then
    run_stage cluster "0" bash -c "$cluster_cmd"
else
    run_stage cluster "0" bash -c "bash scripts/build-images.sh >/dev/null && VM_MEMORY=\${CLUSTER_VM_MEMORY:-4G} bash scripts/vm-run.sh --rwdir '$ROOT/results' -- '$cluster_cmd'"
fi

printf '\n==> summary\n'
for i in "${!stages[@]}"; do
    printf '  %-8s %s\n' "${stages[$i]}" "${results[$i]}"
done
if [[ $failed != 0 ]]; then
    printf 'test.sh: FAILED\n'
    exit 1
fi
printf 'test.sh: all stages passed\n'
