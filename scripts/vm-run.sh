#!/usr/bin/env bash
# Run a shell command as root inside the IPVS test VM (Debian's kernel under QEMU, booted once).
#
#   scripts/vm-run.sh [--rwdir DIR]... [--timeout SECONDS] -- COMMAND...
#
# COMMAND (joined into one shell string) runs inside the guest from the repository root,
# with the project's .venv/bin first on PATH and IN_VM=1 set, after the IPVS/netdev
# modules are loaded and `lo` is up. The exit status is the guest command's status.
# Only the --rwdir folders (default: results/) are writable from the guest and persisted
# to the host; everything else the guest writes is lost.
# VM boots are serialised across users of this machine by flock on /tmp/ipvsproxy-vm.lock.
# Environment: VM_KERNEL=/boot/vmlinuz-... to pick a kernel (default: the newest one),
# VM_MEMORY (default 2G), VM_TIMEOUT (seconds for the whole vng run, default 3600),
# VM_LOCK (the flock file, default /tmp/ipvsproxy-vm.lock; another path lets a second VM run beside),
# VM_DEADLINE (Unix time: the run ends by then; when the lock frees later, it gives up, exit 124),
# VM_CONSOLE=1 (the guest kernel's messages on stderr too: vng --verbose; for a run that may hang),
# VM_CPUS (guest vCPUs, vng --cpus; default vng's own: the host's cores),
# VM_MONITOR=PATH (a QEMU human monitor on this unix socket: `info registers -a` of a frozen guest),
# VM_IDLE_TIMEOUT (seconds: a guest that prints nothing for that long is taken to be frozen, stopped,
# and the exit status is 75; for a command that prints a heartbeat, as the cluster stage does).
# See docs/troubleshooting.md ("The test VM") for why the VM exists and why --disable-kvm.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODULES_REQUIRED="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh dummy veth nf_conntrack"
MODULES_OPTIONAL="ip_vs_mh ip_vs_wlc ip_vs_dh ip_vs_sed ip_vs_nq ip_vs_fo ip_vs_ovf ip_vs_lblc ip_vs_lblcr
                  bridge sctp nf_conntrack_netlink nf_tables"

# ---------------------------------------------------------------------------------------------
# Guest side: `vm-run.sh --in-guest CMDFILE` is what the VM executes.
# ---------------------------------------------------------------------------------------------
if [[ ${1:-} == --in-guest ]]; then
    cmdfile=$2
    cd "$ROOT"
    export IN_VM=1 HOME=${HOME:-/root} PYTHONDONTWRITEBYTECODE=1
    export PATH="$ROOT/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for m in $MODULES_REQUIRED; do
        modprobe "$m" || echo "vm-run: WARNING: modprobe $m failed" >&2
    done
    for m in $MODULES_OPTIONAL; do
        modprobe -q "$m" 2>/dev/null || true
    done
    ip link set lo up
    # virtme-init mounts an empty tmpfs over /var/cache; bring the host's build cache
    # (/var/cache/ipvsproxy: the Kubernetes binaries the kernel tests run) back, from a
    # plain (non-recursive) bind of / that does not carry that tmpfs.
    if [[ ! -d /var/cache/ipvsproxy ]]; then
        mkdir -p /run/vm-hostroot
        if mount --bind / /run/vm-hostroot && [[ -d /run/vm-hostroot/var/cache/ipvsproxy ]]; then
            mkdir -p /var/cache/ipvsproxy
            mount --bind /run/vm-hostroot/var/cache/ipvsproxy /var/cache/ipvsproxy ||
                echo "vm-run: WARNING: cannot bind /var/cache/ipvsproxy into the guest" >&2
        fi
    fi
    # The command runs in its own session with stdin from /dev/null; whatever it leaves behind
    # (a background server that still holds the guest's stdout would keep vng waiting) is
    # killed when it returns.
    setsid bash "$cmdfile" </dev/null &
    sid=$!
    rc=0
    wait "$sid" || rc=$?
    out=$(readlink /proc/$$/fd/1 || true)
    err=$(readlink /proc/$$/fd/2 || true)
    keep=" $$ "          # this script and its ancestors (they hold stdout too) survive
    a=$PPID
    while [[ -n $a && $a != 0 ]]; do
        keep+="$a "
        a=$(awk '{print $4}' "/proc/$a/stat" 2>/dev/null || true)
    done
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [[ $keep == *" $pid "* ]] && continue
        stat=$(cat "$p/stat" 2>/dev/null) || continue
        stat=${stat##*) }          # fields after "(comm) "
        read -r _state _ppid _pgrp session _ <<<"$stat"
        holds=0
        for fd in 1 2; do
            t=$(readlink "$p/fd/$fd" 2>/dev/null) || continue
            if [[ -n $t && ( $t == "$out" || $t == "$err" ) ]]; then holds=1; fi
        done
        if [[ $session == "$sid" || $holds == 1 ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    exit "$rc"
fi

# ---------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------
usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

rwdirs=()
timeout_s=${VM_TIMEOUT:-3600}
while [[ $# -gt 0 ]]; do
    case $1 in
        --rwdir) [[ $# -ge 2 ]] || usage; rwdirs+=("$2"); shift 2 ;;
        --rwdir=*) rwdirs+=("${1#--rwdir=}"); shift ;;
        --timeout) [[ $# -ge 2 ]] || usage; timeout_s=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || usage
[[ ${#rwdirs[@]} -gt 0 ]] || rwdirs=("$ROOT/results")

if [[ -n ${IN_VM:-} ]]; then
    # Already inside the VM: just run the command (same environment the guest wrapper gives).
    cd "$ROOT"
    export PATH="$ROOT/.venv/bin:$PATH"
    exec bash -c "$*"
fi

kernel=${VM_KERNEL:-$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)}
if [[ -z $kernel || ! -r $kernel ]]; then
    echo "vm-run: no readable /boot/vmlinuz-* (install linux-image-amd64: scripts/setup.sh)" >&2
    exit 1
fi
vng=$ROOT/.venv/bin/vng
[[ -x $vng ]] || vng=$(command -v vng || true)
if [[ -z $vng ]]; then
    echo "vm-run: vng (virtme-ng) not found; run scripts/setup.sh" >&2
    exit 1
fi
export PATH="$(dirname "$vng"):$PATH"     # vng runs virtme-run from PATH

# The guest cannot write bytecode (its file system is read-only outside the rwdirs), so each Python
# process there compiled the project's modules from source again: 45 modules, ~1.5 s of every agent
# start under emulation (a profile of `run --once`). An installed package has its .pyc from pip (the
# image's does); compile them here, on the host, where they are written (git ignores __pycache__).
"$ROOT/.venv/bin/python" -m compileall -q -j 0 "$ROOT/ipvsproxy" "$ROOT/tests" >/dev/null 2>&1 || true

vng_args=(--run "$kernel" --disable-kvm --user root --memory "${VM_MEMORY:-2G}" --cwd "$ROOT")
for d in "${rwdirs[@]}"; do
    mkdir -p "$d"
    vng_args+=(--rwdir "$(cd "$d" && pwd)")
done
[[ ${VM_CONSOLE:-0} == 1 ]] && vng_args+=(--verbose)
[[ -n ${VM_CPUS:-} ]] && vng_args+=(--cpus "$VM_CPUS")
[[ -n ${VM_MONITOR:-} ]] && vng_args+=("--qemu-opts=-monitor unix:$VM_MONITOR,server=on,wait=off")  # "=": the value starts with "-"

# The command travels in a file under the first rwdir (the guest sees the host's file system;
# the kernel command line that --exec uses is limited to ~2 KiB).
cmddir=$(cd "${rwdirs[0]}" && pwd)
cmdfile=$(mktemp "$cmddir/.vm-cmd.XXXXXX")
trap 'rm -f "$cmdfile"' EXIT
printf '%s\n' "$*" >"$cmdfile"

# flock queues this boot behind other users' VMs (2 cores: one emulated VM at a time).
lock=${VM_LOCK:-/tmp/ipvsproxy-vm.lock}
exec 9>>"$lock"
if ! flock -n 9; then
    echo "vm-run: waiting for $lock (another test VM is running)" >&2
    flock 9
fi
start=$(date +%s)
if [[ -n ${VM_DEADLINE:-} ]]; then
    left=$((VM_DEADLINE - start))
    if (( left < 60 )); then
        echo "vm-run: the lock came free too close to VM_DEADLINE ($left s left); not booting" >&2
        exit 124
    fi
    (( left < timeout_s )) && timeout_s=$left
fi
# QEMU opens the guest's stdout/stderr as files at /proc/self/fd/{1,2}, which TRUNCATES them
# when they are regular files (`test.sh > log` lost everything before the VM's output). So vng
# writes into pipes, and cat copies to our stdout/stderr. vng's status goes through a file.
rcfile="$cmdfile.rc"
pidfile="$cmdfile.pid"    # the `timeout` that runs vng (the watchdog stops it)
stamp="$cmdfile.out"      # the guest's output, for its time of last change (VM_IDLE_TIMEOUT)
frozen="$cmdfile.frozen"
trap 'rm -f "$cmdfile" "$rcfile" "$pidfile" "$stamp" "$frozen"' EXIT
copy() {  # the guest's output to ours; with VM_IDLE_TIMEOUT, also to $stamp as it comes
    if [[ -n ${VM_IDLE_TIMEOUT:-} ]]; then tee -a "$stamp"; else cat; fi
}
watchdog=
if [[ -n ${VM_IDLE_TIMEOUT:-} ]]; then
    : >"$stamp"
    # The emulated guest has frozen whole (both vCPUs livelocked in the kernel: docs/troubleshooting.md,
    # "The test VM"); nothing inside can fail the command then, and VM_TIMEOUT would be spent waiting.
    (
        while sleep 15; do
            pid=$(cat "$pidfile" 2>/dev/null) || continue
            kill -0 "$pid" 2>/dev/null || exit 0
            idle=$(( $(date +%s) - $(stat -c %Y "$stamp") ))
            if (( idle > VM_IDLE_TIMEOUT )); then
                echo "vm-run: no output from the guest for $idle s (VM_IDLE_TIMEOUT=$VM_IDLE_TIMEOUT): the VM looks frozen; stopping it" >&2
                : >"$frozen"
                kill -TERM "$pid" 2>/dev/null  # timeout passes it on to vng and QEMU
                exit 0
            fi
        done
    ) &
    watchdog=$!
fi
exec 4<&0  # vng's stdin, as when it ran in the foreground (a background job's would be /dev/null)
{
    {
        rc=0
        timeout -k 30 "$timeout_s" "$vng" "${vng_args[@]}" \
            --exec "bash $ROOT/scripts/vm-run.sh --in-guest $cmdfile" 2>&1 1>&3 3>&- <&4 4<&- &
        echo $! >"$pidfile"
        wait $! || rc=$?
        echo "$rc" >"$rcfile"
    } | copy >&2
} 3>&1 | copy
if [[ -n $watchdog ]]; then kill "$watchdog" 2>/dev/null || true; fi
rc=$(cat "$rcfile" 2>/dev/null || echo 1)
end=$(date +%s)
exec 9>&-
if [[ -e $frozen ]]; then
    rc=75
    echo "vm-run: stopped a frozen VM (no output for more than $VM_IDLE_TIMEOUT s)" >&2
elif [[ $rc == 124 ]]; then
    echo "vm-run: the VM run timed out after $timeout_s s" >&2
fi
echo "vm-run: guest exit status $rc; vng wall time $((end - start)) s ($(basename "$kernel"))" >&2
exit "$rc"
