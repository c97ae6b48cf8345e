#!/usr/bin/env bash
# Real Kubernetes v1.20.2 binaries for the integration tests, in a cache outside the repository:
#
#   $IPVSPROXY_CACHE/kubernetes-v1.20.2/bin/{kube-apiserver,kube-proxy,kubelet,kube-controller-manager,
#                                          kube-scheduler,e2e.test}
#   (IPVSPROXY_CACHE defaults to /var/cache/ipvsproxy)
#
# No Kubernetes binary is packaged for Debian, but bookworm carries the full v1.20.2 source (source
# package `kubernetes`, with vendor/) and Go 1.19 builds it. Two ways to fill the cache:
#   1. a prebuilt copy beside the checkout ($ROOT/../shared/kubernetes-v1.20.2: NAME.xz + SHA256SUMS of
#      the uncompressed binaries, built with the recipe below): unpacked and checked against SHA256SUMS;
#   2. otherwise (a user's machine) built from Debian's source package: `apt-get source` through a
#      private apt configuration (the system's own is left alone), GOPATH mode like upstream's
#      hack/lib/golang.sh, vendor/github.com/modern-go/reflect2 replaced by Debian's 1.0.2 (1.0.1 crashes
#      at run time with Go >= 1.18), `make gen_openapi`, then `go build` per binary. About 30 minutes
#      cold on 2 cores for all six; the Go build cache stays in the cache directory, so a rebuild is cheap.
# Also installs etcd (server + etcdctl) and openssl from apt: the tests start etcd + kube-apiserver.
#
# Options:   --from-source         ignore the prebuilt copy and build (still fast when already built)
#            --download-source     only fetch and unpack the Debian source package, then stop
#            --prepare-source      fetch and unpack it, install Go, swap in Debian's reflect2, then stop:
#                                  the tree is ready for `go build` in GOPATH mode (scripts/build-images.sh)
#            --print-bin           print the bin directory and exit (for scripts and tests)
# Env:       KUBERNETES_BINARIES   space-separated subset to install (default: all six; kubectl v1.20.2 too
#                                  when named here: the e2e suite execs it, scripts/conformance.sh)
#            KUBERNETES_PREBUILT   the prebuilt folder (default $ROOT/../shared/kubernetes-v1.20.2)
# Idempotent and quiet; fast when the cache is complete; fails loudly.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

KUBE_VERSION=v1.20.2
KUBE_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56  # upstream's v1.20.2 tag (what --version reports)
DEB_SOURCE=kubernetes
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
GO_PACKAGE=golang-1.19-go
GOROOT_BIN=/usr/lib/go-1.19/bin
ALL_BINARIES=(kube-apiserver kube-proxy kubelet kube-controller-manager kube-scheduler e2e.test)
OPTIONAL_BINARIES=(kubectl)  # only when asked for (KUBERNETES_BINARIES=kubectl): scripts/conformance.sh
RUN_PACKAGES=(etcd-server etcd-client openssl xz-utils)
BUILD_PACKAGES=("$GO_PACKAGE" rsync golang-github-modern-go-reflect2-dev dpkg-dev make)

CACHE=${IPVSPROXY_CACHE:-/var/cache/ipvsproxy}/kubernetes-$KUBE_VERSION
BIN=$CACHE/bin
PREBUILT=${KUBERNETES_PREBUILT:-$ROOT/../shared/kubernetes-$KUBE_VERSION}
read -r -a WANTED <<<"${KUBERNETES_BINARIES:-${ALL_BINARIES[*]}}"

from_source=0
download_only=0
prepare_only=0
for arg in "$@"; do
    case $arg in
        --from-source) from_source=1 ;;
        --download-source) download_only=1 ;;
        --prepare-source) prepare_only=1 ;;
        --print-bin) echo "$BIN"; exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install-kubernetes: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
for b in "${WANTED[@]}"; do
    [[ " ${ALL_BINARIES[*]} ${OPTIONAL_BINARIES[*]} " == *" $b "* ]] || { echo "install-kubernetes: unknown binary $b" >&2; exit 2; }
done

LOG_PREFIX=install-kubernetes
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

complete() {  # every wanted binary is in BIN and was installed by this script (stamp beside it)
    local b
    for b in "${WANTED[@]}"; do
        [[ -x $BIN/$b && -f $BIN/.$b.ok ]] || return 1
    done
}

# ---- 1. from the prebuilt copy ----------------------------------------------------------------------
install_prebuilt() {
    local b sum tmp
    tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
    trap 'rm -rf "$tmp"' RETURN
    for b in "${WANTED[@]}"; do
        [[ -x $BIN/$b && -f $BIN/.$b.ok ]] && continue
        sum=$(awk -v n="$b" '$2 == n {print $1}' "$PREBUILT/SHA256SUMS")
        if [[ -z $sum || ! -f $PREBUILT/$b.xz ]]; then
            log "$PREBUILT has no $b.xz or no SHA256SUMS line for it"
            return 1
        fi
        xz -dc "$PREBUILT/$b.xz" >"$tmp/$b"
        if ! (cd "$tmp" && printf '%s  %s\n' "$sum" "$b" | sha256sum -c --quiet - >/dev/null 2>&1); then
            log "$b from $PREBUILT does not match its SHA256SUMS line; not installed"
            return 1
        fi
        chmod 0755 "$tmp/$b"
        mv -f "$tmp/$b" "$BIN/$b"
        printf 'prebuilt %s sha256 %s\n' "$PREBUILT" "$sum" >"$BIN/.$b.ok"
    done
}

# ---- 2. from Debian's source package -----------------------------------------------------------------
debian_uris() {  # the machine's Debian mirror (deb822 sources first, then sources.list), else deb.debian.org
    local f uris
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # the stanza whose Suites holds bookworm: its URIs line
        uris=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/bookworm-security/ {
                      if (match($0, /URIs:[^\n]*/)) { print substr($0, RSTART + 5, RLENGTH - 5); exit } }' "$f")
        uris=$(echo "$uris" | xargs)
        [[ -n $uris ]] && { echo "$uris"; return; }
    done
    if [[ -f /etc/apt/sources.list ]]; then
        uris=$(awk '$1 == "deb" && $0 ~ / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
            /etc/apt/sources.list)
        [[ -n $uris ]] && { echo "$uris"; return; }
    fi
    echo http://deb.debian.org/debian
}

fetch_source() {  # -> $CACHE/src/tree: the unpacked source package (Debian patches applied)
    local apt_dir=$CACHE/apt dl=$CACHE/src/download tree=$CACHE/src/tree
    [[ -f $CACHE/src/.unpacked ]] && return 0
    apt_install dpkg-dev
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dl"
    cat >"$apt_dir/sources.list.d/debian-src.sources" <<EOF
Types: deb-src
URIs: $(debian_uris)
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    local apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
                    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -q)
    log "fetching Debian source package $DEB_SOURCE=$DEB_VERSION (about 40 MB)"
    run_quiet apt-get "${apt_opts[@]}" update
    (cd "$dl" && run_quiet apt-get "${apt_opts[@]}" source --download-only "$DEB_SOURCE=$DEB_VERSION")
    rm -rf "$tree"
    run_quiet dpkg-source --no-check -x "$(ls "$dl"/"${DEB_SOURCE}"_*.dsc | head -n 1)" "$tree"
    [[ -f $tree/cmd/kube-apiserver/apiserver.go ]] || { log "unpacked source has no cmd/kube-apiserver"; exit 1; }
    touch "$CACHE/src/.unpacked"
}

patch_reflect2() {  # vendor/github.com/modern-go/reflect2 1.0.1 crashes at run time with Go >= 1.18: Debian's 1.0.2
    [[ -f $CACHE/src/.reflect2 ]] && return 0
    local tree=$CACHE/src/tree
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/"
    rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod"
    touch "$CACHE/src/.reflect2"
}

build_from_source() {
    apt_install "${BUILD_PACKAGES[@]}"
    fetch_source
    local tree=$CACHE/src/tree gopath=$CACHE/gopath out=$CACHE/src/out b
    local pkg=k8s.io/kubernetes
    mkdir -p "$gopath/src/k8s.io" "$out"
    ln -sfn "$tree" "$gopath/src/$pkg"
    export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOPATH=$gopath GOCACHE=$CACHE/go-build
    export PATH=$GOROOT_BIN:$PATH
    patch_reflect2
    cd "$gopath/src/$pkg"  # GOPATH mode: the import path comes from where we stand
    if [[ ! -f $CACHE/src/.openapi ]]; then
        log "generating OpenAPI definitions (make gen_openapi, about 2 minutes)"
        run_quiet make gen_openapi
        touch "$CACHE/src/.openapi"
    fi
    local v=k8s.io/kubernetes/vendor/k8s.io ldflags="-s -w" x
    for x in component-base/version client-go/pkg/version; do
        ldflags+=" -X $v/$x.gitVersion=$KUBE_VERSION -X $v/$x.gitCommit=$KUBE_COMMIT -X $v/$x.gitMajor=1"
        ldflags+=" -X $v/$x.gitMinor=20 -X $v/$x.buildDate=1970-01-01T00:00:00Z"
    done
    for b in "${WANTED[@]}"; do
        [[ -x $BIN/$b && -f $BIN/.$b.ok ]] && continue
        local start=$SECONDS
        log "building $b from source (minutes, cold)"
        if [[ $b == e2e.test ]]; then
            if [[ ! -f $CACHE/src/.bindata ]]; then
                run_quiet hack/generate-bindata.sh
                touch "$CACHE/src/.bindata"
            fi
            run_quiet go test -c -trimpath -ldflags "$ldflags" -o "$out/$b" ./test/e2e
        else
            run_quiet go build -trimpath -ldflags "$ldflags" -o "$out/$b" "./cmd/$b"
        fi
        if [[ $b == kubectl ]]; then
            "$out/$b" version --client >/dev/null 2>&1 || { log "$b version --client failed"; exit 1; }
        elif [[ $b != e2e.test ]]; then
            "$out/$b" --version >/dev/null 2>&1 || { log "$b --version failed"; exit 1; }
        fi
        install -m 0755 "$out/$b" "$BIN/$b"
        printf 'built from %s=%s in %ss\n' "$DEB_SOURCE" "$DEB_VERSION" "$((SECONDS - start))" >"$BIN/.$b.ok"
    done
    cd "$ROOT"
}

# ---- main ----------------------------------------------------------------------------------------------
apt_install "${RUN_PACKAGES[@]}"
mkdir -p "$BIN" || { log "cannot create $BIN (set IPVSPROXY_CACHE to a writable folder)"; exit 1; }

if [[ $download_only == 1 ]]; then
    fetch_source
    log "source unpacked in $CACHE/src/tree"
    exit 0
fi
if [[ $prepare_only == 1 ]]; then
    apt_install "${BUILD_PACKAGES[@]}"
    fetch_source
    patch_reflect2
    exit 0
fi
complete && exit 0

if [[ $from_source == 0 && -f $PREBUILT/SHA256SUMS ]]; then
    install_prebuilt || { log "prebuilt copy unusable; building from source instead"; build_from_source; }
else
    build_from_source
fi
complete || { log "binaries missing from $BIN after install"; exit 1; }
log "Kubernetes $KUBE_VERSION in $BIN ($("$BIN/${WANTED[0]}" --version 2>/dev/null || echo "${WANTED[0]}"))"
