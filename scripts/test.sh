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
#            results/cluster-figures.json. About 20 minutes on an idle 2-core host. A boot whose guest froze
#            is booted again once (cluster_boots). Skipped with SKIP_CLUSTER=1 or RUN_CLUSTER=0.
#
# Extra pytest arguments: UNIT_PYTEST_ARGS, REALAPI_PYTEST_ARGS, KERNEL_PYTEST_ARGS, CLUSTER_PYTEST_ARGS. The
# kernel and cluster stages' JUnit reports land in results/ (the VM's read-write folder).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TEST_DEADLINE=$(( $(date +%s) + ${TEST_BUDGET:-5100} ))  # the cluster stage's retry stays inside it

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
# GODEBUG: the Go programs of tests/kernel/test_migrate.py (etcd, kube-apiserver, kube-proxy) run with
# asynchronous preemption off, as scripts/cluster.sh runs the node's: the emulated guest can freeze whole
# in signal delivery to Go programs (docs/troubleshooting.md, "The test VM").
kernel_cmd="GODEBUG=asyncpreemptoff=1 pytest -m kernel tests/kernel tests/contract -p no:cacheprovider --junitxml=results/kernel-junit.xml ${KERNEL_PYTEST_ARGS:-}"
if [[ -n ${SKIP_KERNEL:-} && ${SKIP_KERNEL} != 0 ]]; then
    skip_stage kernel "SKIP_KERNEL"
elif [[ -n ${IN_VM:-} ]]; then
    run_stage kernel "0" bash -c "$kernel_cmd"
else
    run_stage kernel "0" bash scripts/vm-run.sh --rwdir "$ROOT/results" -- "$kernel_cmd"
fi

# The cluster stage's boot prints a line per step and a heartbeat while one runs (tests/cluster/conftest.py);
# a guest silent for CLUSTER_IDLE_TIMEOUT seconds (default 600) is frozen (the emulated guest has frozen
# whole: docs/troubleshooting.md), and vm-run.sh stops it (exit 75). Such a boot is booted
# again once, the stage from the start, when TEST_BUDGET (seconds from this script's start, default
# 5100: CI stops a run at 90 minutes) leaves CLUSTER_RETRY_MIN seconds for it; the log says so.
cluster_boots() {
    local boot rc
    bash scripts/build-images.sh >/dev/null || return
    for boot in 1 2; do
        rc=0
        VM_DEADLINE=$TEST_DEADLINE VM_IDLE_TIMEOUT=${CLUSTER_IDLE_TIMEOUT:-600} VM_MEMORY=${CLUSTER_VM_MEMORY:-4G} \
            bash scripts/vm-run.sh --rwdir "$ROOT/results" -- "$cluster_cmd" || rc=$?
        (( rc == 75 && boot == 1 )) || return "$rc"
        if (( TEST_DEADLINE - $(date +%s) < ${CLUSTER_RETRY_MIN:-1800} )); then
            echo "test.sh: the cluster stage's VM froze; too little time left to boot it again" >&2
            return "$rc"
        fi
        echo "test.sh: the cluster stage's VM froze (boot 1); booting it again, the stage from the start" >&2
    done
}

cluster_cmd="pytest -m cluster tests/cluster -p no:cacheprovider -s --junitxml=results/cluster-junit.xml ${CLUSTER_PYTEST_ARGS:-}"
if [[ ${RUN_CLUSTER:-1} == 0 || ( -n ${SKIP_CLUSTER:-} && ${SKIP_CLUSTER} != 0 ) ]]; then
    skip_stage cluster "SKIP_CLUSTER"
elif [[ -n ${IN_VM:-} ]]; then
    run_stage cluster "0" bash -c "$cluster_cmd"
else
    run_stage cluster "0" cluster_boots
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
