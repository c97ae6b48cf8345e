#!/usr/bin/env bash
# The README's main job: set up this machine (scripts/setup.sh), boot the IPVS test VM and run the
# demo in it (scripts/demo.py): backends in network namespaces, `ipvsproxy run --from-file examples/
# --once`, real traffic through each scheduler, then `ipvsproxy list --stats`.
# SKIP_SETUP=1 skips the set-up step.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z ${SKIP_SETUP:-} || ${SKIP_SETUP} == 0 ]]; then
    bash scripts/setup.sh
fi
export PATH="$ROOT/.venv/bin:$PATH"
exec bash scripts/vm-run.sh -- python scripts/demo.py
