#!/usr/bin/env bash
# Kubernetes' own Service e2e tests (v1.20.2 e2e.test) against the single-node cluster in the test VM,
# once with ipvsproxy (installed by Helm) and once with kube-proxy v1.20.2 in IPVS mode, in one run of
# this script, each column in its own boot of the VM (a fresh cluster each):
#
#   bash scripts/conformance.sh [--proxies "ipvsproxy kube-proxy"] [--quick] [--focus REGEX] [--skip REGEX]
#
#   --proxies   which columns to run, in order (default both)
#   --quick     also skip the [Slow] tests (minutes each under emulation)
#   --focus     the selection (default '\[sig-network\] (Services|Networking)', issue 17)
#   --skip      replaces the default skip list (below), e.g. to try one of them anyway
#   --report    only rebuild the table from the results already there (no VM)
#   --resume    go on with columns whose last boot froze or was stopped: only the tests not yet ended
#
# Results: results/conformance/<proxy>/{junit_01.xml,e2e.log}, the table results/conformance/table.md
# (test x proxy: pass / fail / skipped with the reason), and a summary on stdout. Exit 0 when every
# selected test that passed with kube-proxy passed with ipvsproxy too.
#
# The default skip list, each with why (the suite's own skips — fewer than 2 nodes, provider not
# gce/aws — are reported with the suite's message):
#   \[Disruptive\]                  restarts kube-proxy/the API server or deletes iptables rules over
#                                   SSH to the node (no SSH into the VM); also every SCTP test
#   \[Feature:Networking-IPv4\] / IPv6  "Internet connection for containers": traffic leaves the VM
#                                   (it must not; the VM has no route out)
#   \[Feature:Networking-Performance\]  1 GB iperf transfers: an hour under emulation, no pass/fail value
#   [Ll]oad.?[Bb]alancer|ESIPP      needs a cloud provider's load balancer (the suite skips them on
#                                   provider "skeleton" anyway; skipping saves a namespace each)
# Needs: scripts/cluster.sh (the cluster without kube-proxy), scripts/build-images.sh (images),
# scripts/install-kubernetes.sh (kube-proxy, e2e.test, kubectl v1.20.2), helm (scripts/install-helm.sh).
# Env: VM_MEMORY (default 6G), VM_TIMEOUT per boot (default 14400), E2E_TIMEOUT per column (default 3h),
#      CLUSTER_SH (default scripts/cluster.sh), FROZEN_AFTER (default 1200: seconds without e2e output
#      after which the VM is taken to be frozen and stopped), BOOTS_PER_COLUMN (default 3: a frozen
#      column is resumed in a new boot with the tests not yet ended), VM_CPUS (guest vCPUs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=$ROOT/results/conformance
CACHE=${IPVSPROXY_CACHE:-/var/cache/ipvsproxy}
FOCUS='\[sig-network\] (Services|Networking)'
SKIP_DEFAULT='\[Disruptive\]|\[Feature:Networking-IPv4\]|\[Feature:Networking-IPv6\]|\[Feature:Networking-Performance\]|[Ll]oad.?[Bb]alancer|ESIPP'
SKIP=$SKIP_DEFAULT
PROXIES="ipvsproxy kube-proxy"
E2E_TIMEOUT=${E2E_TIMEOUT:-3h}
# the cluster's addresses (scripts/cluster.sh)
NODE_IP=198.18.100.1
POD_CIDR=198.18.0.0/24
NODE_NAME=${NODE_NAME:-ipvsproxy-node}
CLUSTER_SH=${CLUSTER_SH:-$ROOT/scripts/cluster.sh}

log() { printf 'conformance: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

in_vm=0
report_only=0
resume=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --in-vm) in_vm=1 ;;
        --proxies) PROXIES=$2; shift ;;
        --quick) SKIP="$SKIP|\[Slow\]" ;;
        --focus) FOCUS=$2; shift ;;
        --skip) SKIP=$2; shift ;;
        --report) report_only=1 ;;
        --resume) resume=1 ;;
        -h|--help) usage; exit 0 ;;
        *) log "unknown option $1 (see --help)"; exit 2 ;;
    esac
    shift
done
for p in $PROXIES; do
    [[ $p == ipvsproxy || $p == kube-proxy ]] || die "unknown proxy $p (ipvsproxy, kube-proxy)"
done

report() {
    python3 "$ROOT/scripts/conformance_report.py" --out "$OUT" --proxies "$PROXIES" --focus "$FOCUS" --skip "$SKIP"
}

# ---- inside the VM -----------------------------------------------------------------------------------
kc() { kubectl "$@"; }

wait_true() {  # wait_true SECONDS WHAT COMMAND...
    local deadline=$(( $(date +%s) + $1 )) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || { log "timed out waiting for $what"; return 1; }
        sleep 2
    done
}

HELM_VALUES=(--set apiServer.host=$NODE_IP --set apiServer.port=6443 --set config.clusterCIDR=$POD_CIDR
             --set image.pullPolicy=Never)
INSTALLED_BY=helm

proxy_up_ipvsproxy() {
    if ! helm install ipvsproxy "$ROOT/charts/ipvsproxy" --namespace kube-system "${HELM_VALUES[@]}" \
            >"$OUT/ipvsproxy/helm.log" 2>&1; then
        if grep -q kubeVersion "$OUT/ipvsproxy/helm.log"; then
            # the chart's kubeVersion floor is above v1.20: the same manifests, applied without Helm's check
            log "helm install refused v1.20.2 (chart kubeVersion); applying helm template's output instead"
            INSTALLED_BY=template
            helm template ipvsproxy "$ROOT/charts/ipvsproxy" --namespace kube-system "${HELM_VALUES[@]}" \
                | kubectl apply -f - >>"$OUT/ipvsproxy/helm.log" 2>&1 || { cat "$OUT/ipvsproxy/helm.log" >&2; return 1; }
        else
            cat "$OUT/ipvsproxy/helm.log" >&2
            return 1
        fi
    fi
    echo "$INSTALLED_BY" >"$OUT/ipvsproxy/installed-by"
    wait_true 900 "the ipvsproxy DaemonSet to be ready" \
        sh -c "[ \"\$(kubectl -n kube-system get ds ipvsproxy -o jsonpath='{.status.numberReady}')\" = 1 ]" \
        || { kc -n kube-system describe pods -l app.kubernetes.io/name=ipvsproxy | tail -n 40 >&2; return 1; }
}

proxy_down_ipvsproxy() {
    kc -n kube-system logs ds/ipvsproxy --tail=-1 >"$OUT/ipvsproxy/agent.log" 2>&1 || true
    if [[ $INSTALLED_BY == helm ]]; then
        helm uninstall ipvsproxy --namespace kube-system --wait >>"$OUT/ipvsproxy/helm.log" 2>&1 || true
    else
        helm template ipvsproxy "$ROOT/charts/ipvsproxy" --namespace kube-system "${HELM_VALUES[@]}" \
            | kubectl delete -f - >>"$OUT/ipvsproxy/helm.log" 2>&1 || true
    fi
    wait_true 300 "the ipvsproxy pod to go" \
        sh -c "[ -z \"\$(kubectl -n kube-system get pods -l app.kubernetes.io/name=ipvsproxy -o name)\" ]" || true
    # what the agent leaves on the node by design (docs/operating.md): virtual servers, addresses, nft table
    ipvsproxy cleanup >>"$OUT/ipvsproxy/helm.log" 2>&1 || log "ipvsproxy cleanup failed (see $OUT/ipvsproxy/helm.log)"
}

proxy_up_kube_proxy() {
    local kbin=$1
    setsid "$kbin/kube-proxy" --kubeconfig="$KUBECONFIG" --proxy-mode=ipvs --hostname-override="$NODE_NAME" \
        --cluster-cidr=$POD_CIDR --ipvs-scheduler=rr --healthz-bind-address=0.0.0.0:10256 \
        --metrics-bind-address=127.0.0.1:10249 --v=2 >"$OUT/kube-proxy/kube-proxy.log" 2>&1 </dev/null &
    echo $! >"$OUT/kube-proxy/pid"
    wait_true 300 "kube-proxy's /healthz" curl -sf http://127.0.0.1:10256/healthz \
        || { tail -n 30 "$OUT/kube-proxy/kube-proxy.log" >&2; return 1; }
}

proxy_down_kube_proxy() {
    local kbin=$1 pid
    pid=$(cat "$OUT/kube-proxy/pid" 2>/dev/null || true)
    [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    "$kbin/kube-proxy" --cleanup --proxy-mode=ipvs >>"$OUT/kube-proxy/kube-proxy.log" 2>&1 || true
}

# Every [sig-network] Networking test starts with `http.Get("http://google.com")` from e2e.test itself
# (networking.go's BeforeEach, "not really a test of kubernetes in any way") and fails at once without
# an answer. Test traffic must not leave the VM (and has no route out), so e2e.test alone runs in a
# private mount namespace whose /etc/hosts names google.com 127.0.0.2, where a local HTTP server
# answers 200: the check is answered inside the VM, and nothing else (the node, the pods) sees it.
INTERNET_STUB_ADDR=127.0.0.2
INTERNET_STUB_DIR=/run/ipvsproxy-conformance/internet
internet_stub_up() {
    local dir=$INTERNET_STUB_DIR
    mkdir -p "$dir/www"
    echo "in-VM stand-in for the e2e suite's internet pre-check" >"$dir/www/index.html"
    { cat /etc/hosts; echo "$INTERNET_STUB_ADDR google.com www.google.com"; } >"$dir/hosts"
    setsid python3 -m http.server 80 --bind "$INTERNET_STUB_ADDR" --directory "$dir/www" \
        >"$OUT/internet-stub.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    wait_true 30 "the internet stand-in" curl -sf "http://$INTERNET_STUB_ADDR/"
}

internet_stub_down() {
    local pid
    pid=$(cat "$INTERNET_STUB_DIR/pid" 2>/dev/null || true)
    [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
}

run_e2e() {  # run_e2e PROXY KBIN
    local proxy=$1 kbin=$2 rc=0 start
    start=$(date +%s)
    # e2e.test is a ginkgo binary; the report dir gets junit_01.xml. Its own /etc/hosts: see internet_stub_up.
    timeout -k 60 "$E2E_TIMEOUT" unshare --mount --propagation private \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$INTERNET_STUB_DIR/hosts" \
        "$kbin/e2e.test" --kubeconfig="$KUBECONFIG" --provider=skeleton --num-nodes=1 \
        --kubectl-path="$kbin/kubectl" --report-dir="$OUT/$proxy" --disable-log-dump \
        --ginkgo.focus="$FOCUS" --ginkgo.skip="$SKIP" --ginkgo.noColor --ginkgo.v \
        --system-pods-startup-timeout=10m --node-schedulable-timeout=10m \
        --allowed-not-ready-nodes=0 --minStartupPods=0 \
        >"$OUT/$proxy/e2e.log" 2>&1 || rc=$?
    printf '%s\n' "$(( $(date +%s) - start ))" >"$OUT/$proxy/seconds"
    log "$proxy: e2e.test exit $rc after $(cat "$OUT/$proxy/seconds") s ($(grep -E '^(SUCCESS|FAIL)!' "$OUT/$proxy/e2e.log" | tail -n 1))"
}

in_guest() {
    [[ -n ${IN_VM:-} ]] || die "--in-vm is for inside the test VM"
    [[ -f $CLUSTER_SH ]] || die "$CLUSTER_SH missing (the single-node cluster, issue 16)"
    export HOME=/tmp/conformance-home  # kubectl's caches; the guest's / is read-only
    mkdir -p "$HOME"
    local kbin=$CACHE/kubernetes-v1.20.2/bin host=/run/ipvsproxy-conformance/host
    # virtme mounts a tmpfs on the guest's /var/cache: reach the host's through a read-only bind of /
    if [[ ! -x $kbin/e2e.test ]]; then
        mkdir -p "$host"
        mountpoint -q "$host" || mount --bind -o ro / "$host"
        kbin=$host$kbin
    fi
    # The node's Go programs run without asynchronous preemption (scripts/cluster.sh says why: the
    # emulated guest has frozen delivering their signals); its `env`, evaluated below, carries the
    # setting to e2e.test and kube-proxy started from here. CONFORMANCE_GODEBUG="" turns it off.
    if [[ -n ${CONFORMANCE_GODEBUG+set} ]]; then
        export GODEBUG=$CONFORMANCE_GODEBUG
    fi
    SANDBOX_IMAGE=k8s.gcr.io/pause:3.2 bash "$CLUSTER_SH" start
    eval "$(bash "$CLUSTER_SH" env)"
    trap 'internet_stub_down; bash "$CLUSTER_SH" stop || true' EXIT
    internet_stub_up || die "the internet stand-in did not start (see $OUT/internet-stub.log)"
    [[ -x $kbin/kubectl ]] || die "$kbin/kubectl missing (KUBERNETES_BINARIES=kubectl bash scripts/install-kubernetes.sh)"
    local p
    for p in $PROXIES; do
        mkdir -p "$OUT/$p"
        rm -f "$OUT/$p"/junit_*.xml
        # the guest kernel's text symbols: a freeze's instruction pointers get names (qemu_monitor.py)
        awk '$2 == "t" || $2 == "T"' /proc/kallsyms >"$OUT/$p/kallsyms" 2>/dev/null || true
        log "$p: starting"
        if [[ $p == ipvsproxy ]]; then
            proxy_up_ipvsproxy || { echo "proxy did not start" >"$OUT/$p/error"; continue; }
            run_e2e "$p" "$kbin"
            proxy_down_ipvsproxy
        else
            proxy_up_kube_proxy "$kbin" || { echo "proxy did not start" >"$OUT/$p/error"; continue; }
            run_e2e "$p" "$kbin"
            proxy_down_kube_proxy "$kbin"
        fi
    done
}

if [[ $in_vm == 1 ]]; then
    in_guest
    exit 0
fi

# ---- on the host ------------------------------------------------------------------------------------
if [[ $report_only == 1 ]]; then
    report
    exit $?
fi
for p in iptables ipset; do  # kube-proxy's IPVS mode uses both
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    if [[ $status != installed ]]; then
        log "installing $p (kube-proxy's IPVS mode needs it)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iptables ipset >/dev/null
    fi
done
bash scripts/build-images.sh >/dev/null
KUBERNETES_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy e2e.test kubectl" \
    bash scripts/install-kubernetes.sh
bash scripts/install-helm.sh >/dev/null
mkdir -p "$OUT"
kill_tree() {  # kill_tree PID: the process and all its descendants (vm-run.sh, vng, QEMU)
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
# Each column gets its own boot of the VM and so a fresh cluster: no column inherits the other's
# leftovers, and a boot that freezes costs only its own column (the emulated guest has frozen five
# times, 28 to 127 minutes after boot, in one-column boots too: docs/conformance.md). The guest
# kernel's console goes to results/conformance/<proxy>/console.log, the evidence of a freeze.
# Watchdog: a running column's e2e log changes every few seconds (pods are polled every 2-3 s);
# stop a boot after FROZEN_AFTER quiet seconds rather than wait out VM_TIMEOUT, and say so.
FROZEN_AFTER=${FROZEN_AFTER:-1200}
# A column whose boot froze is resumed in a new boot (up to BOOTS_PER_COLUMN boots) with the tests
# its logs do not show as ended; the frozen boot's logs stay as e2e.bootN.log / console.bootN.log and
# the report counts what they show. Each e2e test makes its own namespace and objects, so a test run
# in the second boot is the same test as in the first.
BOOTS_PER_COLUMN=${BOOTS_PER_COLUMN:-3}
column_boot() {  # column_boot PROXY FOCUS -> the boot's exit status (124: frozen)
    local proxy=$1 focus=$2 vm rc=0 frozen=0 newest args boot mon=/tmp/ipvsproxy-conformance-$1.monitor
    args=(--proxies "$proxy" --focus "$focus" --skip "$SKIP")
    mkdir -p "$OUT/$proxy"
    rm -f "$OUT/$proxy/e2e.log" "$OUT/$proxy/seconds" "$OUT/$proxy/freeze.txt" "$mon"
    VM_MONITOR=$mon VM_CONSOLE=1 VM_MEMORY=${VM_MEMORY:-6G} VM_TIMEOUT=${VM_TIMEOUT:-14400} \
        bash scripts/vm-run.sh --rwdir "$ROOT/results" -- \
        CLUSTER_SH="$(printf '%q' "$CLUSTER_SH")" bash scripts/conformance.sh --in-vm "$(printf '%q ' "${args[@]}")" \
        >"$OUT/$proxy/console.log" 2>&1 &
    vm=$!
    boot=$(date +%s)
    while kill -0 "$vm" 2>/dev/null; do
        sleep 30
        newest=$(stat -c %Y "$OUT/$proxy/e2e.log" 2>/dev/null || echo "$boot")
        if (( $(date +%s) - newest > FROZEN_AFTER )) && kill -0 "$vm" 2>/dev/null; then
            log "$proxy: no e2e output for ${FROZEN_AFTER}s: the VM looks frozen; its vCPUs to $OUT/$proxy/freeze.txt, then stopping it"
            python3 "$ROOT/scripts/qemu_monitor.py" "$mon" --kallsyms "$OUT/$proxy/kallsyms" \
                >"$OUT/$proxy/freeze.txt" 2>&1 || true
            frozen=1
            kill_tree "$vm"
            break
        fi
    done
    wait "$vm" || rc=$?
    (( frozen )) && rc=124
    log "$proxy: VM boot exit $rc after $(( $(date +%s) - boot )) s$( (( frozen )) && echo ' (stopped: frozen)')"
    return "$rc"
}
run_column() {  # run_column PROXY: boots until the column's e2e.test runs to the end (or BOOTS_PER_COLUMN)
    local proxy=$1 n=1 focus=$FOCUS rc=124
    if [[ $resume == 1 ]]; then  # go on from the boots already there (the last one froze or was stopped)
        while [[ -f $OUT/$proxy/e2e.boot$n.log ]]; do n=$((n + 1)); done
        ls "$OUT/$proxy"/junit_*.xml >/dev/null 2>&1 && { log "$proxy: already ran to the end"; return 0; }
        [[ -f $OUT/$proxy/e2e.log ]] || n=$((n - 1))
    else
        rm -f "$OUT/$proxy"/e2e.boot*.log "$OUT/$proxy"/console.boot*.log "$OUT/$proxy"/freeze.boot*.txt
        n=0
    fi
    while :; do
        if (( n > 0 )); then  # the boot before froze: keep its logs, go on with what it did not end
            (( rc == 124 && n < BOOTS_PER_COLUMN )) || return 0  # done, failed otherwise, or out of boots
            [[ -f $OUT/$proxy/e2e.log ]] && mv "$OUT/$proxy/e2e.log" "$OUT/$proxy/e2e.boot$n.log"
            [[ -f $OUT/$proxy/console.log ]] && mv "$OUT/$proxy/console.log" "$OUT/$proxy/console.boot$n.log"
            [[ -f $OUT/$proxy/freeze.txt ]] && mv "$OUT/$proxy/freeze.txt" "$OUT/$proxy/freeze.boot$n.txt"
            focus=$(python3 "$ROOT/scripts/conformance_report.py" --out "$OUT" --proxies "$proxy" \
                --focus "$FOCUS" --skip "$SKIP" --remaining) || return 0
            [[ -n $focus ]] || { log "$proxy: every selected test ended before the freeze"; return 0; }
            log "$proxy: boot $((n + 1)) resumes with the $(tr -cd '|' <<<"$focus" | wc -c | awk '{print $1 + 1}') tests not yet ended"
        fi
        n=$((n + 1))
        rc=0
        column_boot "$proxy" "$focus" || rc=$?
    done
}
log "one run, one VM boot per column: ${PROXIES// / then } (selection: $FOCUS; skipping: $SKIP)"
start=$(date +%s)
for p in $PROXIES; do
    run_column "$p"  # a column that never finished shows what its logs say ran; the next one still runs
done
log "all columns after $(( $(date +%s) - start )) s"
report
