#!/usr/bin/env bash
# The end-to-end benchmark: `ipvsproxy bench --dataplane kernel` inside the IPVS test VM.
#
#   scripts/bench-vm.sh [ipvsproxy bench flags...]
#
# Default flags: --services 10000 --endpoints 10 --naive-objects 2000 --churn-steps 100 --process-start json.
# Runs in ONE boot of the VM (Debian's kernel under QEMU/TCG, booted through scripts/vm-run.sh,
# which queues behind other users' VMs with flock /tmp/ipvsproxy-vm.lock), where it times
# ipvsproxy's cold start through the real netlink dataplane, `ipvsadm -R` and `ip -batch` of
# the identical table, and a naive pyroute2 loop, and writes results/bench-vm.json (results/
# is the VM's only folder written back to the host). Python under emulation is 10-25x slower
# than on the host, so kernel-side results are read as RATIOS to `ipvsadm -R`, same run.
#
# Afterwards, on the host, when results/bench-host.json exists (from the host benchmark in
# docs/benchmarks.md), the two are merged into results/bench.json and the plots are redrawn
# into ${BENCH_PLOT:-docs/img}.
# Environment: BENCH_OUT (default results/bench-vm.json), VM_TIMEOUT (default 5400 s),
# VM_MEMORY (default 2G).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
out=${BENCH_OUT:-results/bench-vm.json}
case $out in results/*) ;; *) echo "bench-vm: BENCH_OUT must be under results/ (the VM's writable folder)" >&2; exit 2 ;; esac
if [[ $# -eq 0 ]]; then
    set -- --services 10000 --endpoints 10 --naive-objects 2000 --churn-steps 100 --process-start json
fi
mkdir -p results
quoted=$(printf ' %q' "$@")
# Inside the guest the file system is read-only outside results/: no plots there, no bytecode.
VM_TIMEOUT=${VM_TIMEOUT:-5400} bash scripts/vm-run.sh --rwdir "$ROOT/results" -- \
    "python -m ipvsproxy bench --dataplane kernel --progress --out $out$quoted"

if [[ -f results/bench-host.json ]]; then
    .venv/bin/python -m ipvsproxy bench --report-only --include results/bench-host.json --include "$out" \
        --out results/bench.json --plot "${BENCH_PLOT:-docs/img}"
fi
