#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for developing and testing ipvsproxy (run as root):
#   - apt: QEMU, Debian's kernel (it has IPVS; the test VM boots it), busybox-static (vng's initramfs),
#     ipvsadm, iproute2, kmod, nftables, conntrack, curl; iptables + ipset (the real kube-proxy's IPVS mode
#     needs them, with conntrack, in the migration test), tcpdump (that test's capture with MIGRATE_PCAP=1); mmdebstrap, gcc, libc6-dev, binutils (offline
#     image builds), containerd, runc, containernetworking-plugins (running them; the single-node cluster
#     in the VM, scripts/cluster.sh). Skipped when all are already installed.
#   - .venv (python3 from PATH) with the project in editable mode, its test extras, and virtme-ng.
#   - helm, kubectl, kubernetes-validate and hadolint for the chart tests (scripts/install-helm.sh).
#   - real Kubernetes v1.20.2 binaries + etcd for the integration tests (scripts/install-kubernetes.sh:
#     a cache under /var/cache/ipvsproxy, from ../shared's prebuilt copy when present, else built).
# Quiet unless something fails; fails loudly.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# iptables, ipset: the real kube-proxy's IPVS mode (migration test); tcpdump: its optional capture.
# mmdebstrap, gcc, libc6-dev, binutils: the offline image build (scripts/build-images.sh);
# containerd, runc, containernetworking-plugins: import and run those images (tests/images, the cluster in
# the VM: scripts/cluster.sh).
APT_PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static ipvsadm iproute2 kmod nftables conntrack curl
              iptables ipset tcpdump mmdebstrap gcc libc6-dev binutils containerd runc containernetworking-plugins)
VIRTME_NG=${VIRTME_NG:-virtme-ng}

LOG_PREFIX=setup
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

apt_install "${APT_PACKAGES[@]}"
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
    log "no kernel in /boot after installing linux-image-amd64"
    exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
    py=$(command -v python3 || true)
    [[ -n $py ]] || { log "python3 not found on PATH"; exit 1; }
    if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian's own python3 ships venv/ensurepip separately
        log "installing python3-venv (needed by $py -m venv)"
        export DEBIAN_FRONTEND=noninteractive
        run_quiet apt-get update -q
        run_quiet apt-get install -y -q --no-install-recommends python3-venv
    fi
    log "creating .venv with $py ($("$py" -V 2>&1))"
    run_quiet "$py" -m venv .venv
fi
log "installing the project (editable, [test]) and virtme-ng into .venv"
run_quiet .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' "$VIRTME_NG"
log "installing helm, kubectl, kubernetes-validate, hadolint (chart tests)"
run_quiet bash scripts/install-helm.sh
log "installing Kubernetes v1.20.2 binaries and etcd (integration tests; cached)"
run_quiet bash scripts/install-kubernetes.sh
log "ready: $(.venv/bin/python -V 2>&1), vng $(.venv/bin/vng --version 2>/dev/null | awk '{print $NF}'), kernel $(ls -1 /boot/vmlinuz-* | sort -V | tail -n 1)"
