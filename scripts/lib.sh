# Shared by the set-up scripts (setup.sh, install-kubernetes.sh, build-images.sh); source it after
# setting LOG_PREFIX. One spelling of: a prefixed log line, a command whose output shows only when
# it fails, and "install the apt packages that are not installed yet" (as root, quietly).
# shellcheck shell=bash

log() { printf '%s: %s\n' "${LOG_PREFIX:-ipvsproxy}" "$*" >&2; }

run_quiet() {  # run a command, show its output only if it fails (then exit with its status)
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if [[ $rc != 0 ]]; then
        printf '%s\n' "$out" | tail -n 60 >&2
        log "FAILED ($rc): $*"
        exit "$rc"
    fi
}

apt_install() {  # apt_install PACKAGE... : install those not yet installed
    local missing=() p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || missing+=("$p")
    done
    [[ ${#missing[@]} == 0 ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        log "missing apt packages (${missing[*]}); run as root"
        exit 1
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run_quiet apt-get update -q
    run_quiet apt-get install -y -q --no-install-recommends "${missing[@]}"
}
