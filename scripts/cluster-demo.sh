#!/usr/bin/env bash
# Watch ipvsproxy on a real node: one run of the test VM that starts a single-node Kubernetes v1.20.2
# without kube-proxy (scripts/cluster.sh), installs the chart with helm, and sends traffic from pods
# through what the DaemonSet programmed — ClusterIP round robin, UDP, a NodePort, the `kubernetes`
# Service, `kubectl scale` 3 -> 1 -> 3, `helm upgrade`, deleting the agent pod, `helm uninstall` +
# `ipvsproxy cleanup` — printing every command, its output and `ipvsproxy list` as it goes.
# It is the cluster stage of scripts/test.sh (tests/cluster) run with CLUSTER_DEMO=1; figures land in
# results/cluster-figures.json. About 15-25 minutes under emulation.
#
#   bash scripts/cluster-demo.sh           (as root, after scripts/setup.sh; builds the images if needed)
# Env: VM_MEMORY (default 4G).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -x .venv/bin/pytest ]] || { echo "cluster-demo: run scripts/setup.sh first" >&2; exit 1; }
bash scripts/build-images.sh
VM_MEMORY=${VM_MEMORY:-4G} exec bash scripts/vm-run.sh --rwdir "$ROOT/results" -- \
    "CLUSTER_DEMO=1 pytest -m cluster tests/cluster -p no:cacheprovider -s -v"
