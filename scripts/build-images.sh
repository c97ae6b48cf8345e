#!/usr/bin/env bash
# Build the container images offline (no Docker, no registry) as OCI archives for `ctr images import`:
#
#   scripts/build-images.sh [NAME...]         build what is missing (default: all) and print a table:
#                                             name, reference, compressed and unpacked size, archive path
#   scripts/build-images.sh --archive NAME    build NAME if missing, print only its archive path
#   scripts/build-images.sh --json [NAME...]  one JSON record per image (ref, digest, sizes, build seconds)
#   scripts/build-images.sh --list            the names and references, nothing built
#
# Images (references are what their consumers ask for, so nothing needs overriding):
#   pause      k8s.gcr.io/pause:3.2                     kubelet v1.20.2's default --pod-infra-container-image,
#                                                       from the tree's build/pause/linux/pause.c (gcc -static)
#   busybox    docker.io/library/busybox:1.29           the e2e suite's BusyBox: Debian's busybox-static
#   agnhost    k8s.gcr.io/e2e-test-images/agnhost:2.21  the e2e suite's agnhost (netexec answers /hostname over
#                                                       HTTP and UDP), from the tree's test/images/agnhost on a
#                                                       Debian root file system (mmdebstrap) with curl, nc, ss, dig
#   ipvsproxy  docker.io/library/ipvsproxy:<appVersion> the chart's default image, exactly images/ipvsproxy.toml
#                                                       (the list the Dockerfile is checked against)
# Archives go to $IPVSPROXY_CACHE/images (default /var/cache/ipvsproxy/images), named by a hash of every
# input, so a rerun with nothing changed builds nothing. Cold: see docs/images.md for measured times.
# Installs what it needs from apt (run as root); the Kubernetes source tree comes from
# scripts/install-kubernetes.sh --prepare-source (Debian's source package, Go 1.19, GOPATH mode).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_PACKAGES=(mmdebstrap busybox-static gcc libc6-dev binutils python3)

LOG_PREFIX=build-images
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

case ${1:-} in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

apt_install "${APT_PACKAGES[@]}"

# The Kubernetes tree (pause.c, agnhost) and Go; quick when it is already there.
need_tree=0
case " $* " in
    *" --list "*) ;;
    *" pause "*|*" agnhost "*) need_tree=1 ;;
    *)
        # no names (all images) or --archive/--json with a name that needs it
        names=$(printf '%s\n' "$@" | grep -v '^--' || true)
        [[ -z $names ]] && need_tree=1
        ;;
esac
if [[ $need_tree == 1 ]]; then
    bash "$ROOT/scripts/install-kubernetes.sh" --prepare-source
fi

exec python3 "$ROOT/images/build.py" "$@"
