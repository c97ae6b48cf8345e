#!/usr/bin/env bash
# A single-node Kubernetes v1.20.2 cluster WITHOUT kube-proxy, inside the IPVS test VM (IN_VM set):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd + runc + bridge CNI,
# kubelet, and a cluster DNS for cluster.local (scripts/clusterdns.py on the node address, port 53:
# the kubelet's --cluster-dns). Service traffic is left to whatever proxy gets installed (ipvsproxy,
# with Helm).
#
#   bash scripts/cluster.sh start    start everything, import the images, wait for the node to be
#                                    Ready; prints the seconds each step took (also in $STATE/times)
#   bash scripts/cluster.sh stop     stop every pod and component, remove the interfaces, unmount
#   bash scripts/cluster.sh env      print `export KUBECONFIG=...` (and PATH for kubectl/helm)
#
# Everything it writes is on tmpfs in the guest ($STATE, /var/lib/{containerd,kubelet}, /var/log/pods).
# Addresses are synthetic (198.18.0.0/15): the node is 198.18.100.1 on a dummy interface `node0`
# (also the default route, so nothing leaves the VM), pods get 198.18.0.0/24 on the bridge `cni0`,
# Services 198.19.0.0/16 (the `kubernetes` Service is 198.19.0.1:443 -> 198.18.100.1:6443).
# Node prerequisites set here, as kubeadm's preflight expects them of a node: cgroup v1 hierarchies
# (the guest's init is not systemd; kubelet 1.20 and the cgroupfs driver), br_netfilter with
# net.bridge.bridge-nf-call-iptables=1 (so replies between two pods on the bridge pass IPVS),
# overlay, ip_forward.
# Images: every OCI archive in $IMAGES (default /var/cache/ipvsproxy/images, from
# scripts/build-images.sh) is imported into containerd's k8s.io namespace; the pause image is
# containerd's sandbox image. Binaries: scripts/install-kubernetes.sh's cache (KUBERNETES_BIN).
# Env: STATE (default /run/ipvsproxy-cluster), IPVSPROXY_CACHE, IMAGES, KUBERNETES_BIN, NODE_NAME (ipvsproxy-node),
#      READY_TIMEOUT (seconds for each wait, default 600), SANDBOX_IMAGE (k8s.gcr.io/pause:3.2),
#      KCM_CONTROLLERS (the controller-manager's --controllers), PYTHON (python3; runs clusterdns.py),
#      GODEBUG (default asyncpreemptoff=1 for the node's Go programs; GODEBUG="" turns it off).
# Access is deliberately simple (a throwaway cluster in a VM): static tokens for the admin and the
# node, the kubelet's API open to the API server (anonymous, AlwaysAllow).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${STATE:-/run/ipvsproxy-cluster}
CACHE=${IPVSPROXY_CACHE:-/var/cache/ipvsproxy}
NODE_NAME=${NODE_NAME:-ipvsproxy-node}
NODE_IP=198.18.100.1
POD_CIDR=198.18.0.0/24
POD_GW=198.18.0.1
SERVICE_CIDR=198.19.0.0/16
SERVICE_API_IP=198.19.0.1
API_PORT=6443
READY_TIMEOUT=${READY_TIMEOUT:-600}
ADMIN_TOKEN=ipvsproxy-cluster-admin-token
NODE_TOKEN=ipvsproxy-cluster-node-token
SANDBOX_IMAGE=${SANDBOX_IMAGE:-k8s.gcr.io/pause:3.2}
KUBECTL=$ROOT/.cache/bin/kubectl
PYTHON=${PYTHON:-python3}
CLUSTERDNS=$ROOT/scripts/clusterdns.py
# only the controllers a one-node cluster uses (each costs CPU under emulation); KCM_CONTROLLERS='*' for all
KCM_CONTROLLERS=${KCM_CONTROLLERS:-serviceaccount,serviceaccount-token,namespace,garbagecollector,deployment,replicaset,replicationcontroller,daemonset,statefulset,job,endpoint,endpointslice,endpointslicemirroring,podgc}

# The emulated guest's kernel has livelocked delivering signals to Go programs (both vCPUs in
# get_signal for minutes, the whole VM frozen: docs/conformance.md, the fifth freeze; once in a CI
# run of the cluster stage, during the e2e subset). Go preempts a busy goroutine with SIGURG every
# 10 ms; without asynchronous preemption the node's Go programs (etcd, the control plane, kubelet,
# containerd, and what runs with `env`'s settings: kubectl, helm, e2e.test) take far fewer signals.
# Pods do not inherit it, nor does ipvsproxy (Python).
export GODEBUG=${GODEBUG-asyncpreemptoff=1}

log() { printf 'cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

t0=$(date +%s.%N)
mark() {  # mark NAME: seconds since start, into $STATE/times and the log
    local t
    t=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    printf '%s %s\n' "$1" "$t" >>"$STATE/times"
    log "$1 after $t s"
}

kc() { "$KUBECTL" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND every second until it succeeds or READY_TIMEOUT
    local what=$1 deadline=$(( $(date +%s) + READY_TIMEOUT ))
    shift
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) > deadline )); then
            log "timed out waiting for $what"
            return 1
        fi
        sleep 1
    done
}

daemon() {  # daemon NAME COMMAND...: start in the background, log to $STATE/log/NAME.log, pid file
    local name=$1
    shift
    setsid "$@" >"$STATE/log/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/pid/$name"
}

alive() { [[ -f $STATE/pid/$1 ]] && kill -0 "$(cat "$STATE/pid/$1")" 2>/dev/null; }

check_alive() {  # fail with the component's log tail when it died
    alive "$1" || { tail -n 30 "$STATE/log/$1.log" >&2; die "$1 exited (log above: $STATE/log/$1.log)"; }
}

kubeconfig() {  # kubeconfig FILE TOKEN
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority: $STATE/pki/ca.crt
users:
- name: user
  user:
    token: $2
contexts:
- name: local
  context: {cluster: local, user: user}
current-context: local
EOF
}

pki() {
    local d=$STATE/pki
    mkdir -p "$d"
    (
        cd "$d"
        # EC keys: RSA key generation takes tens of seconds under emulation
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -subj /CN=ipvsproxy-cluster-ca -keyout ca.key -out ca.crt
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=kube-apiserver \
            -keyout apiserver.key -out apiserver.csr
        printf '%s\n' \
            "subjectAltName=IP:$NODE_IP,IP:$SERVICE_API_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
            "extendedKeyUsage=serverAuth" >san.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile san.ext -out apiserver.crt
        openssl ecparam -name prime256v1 -genkey -noout -out sa.key
        openssl ec -in sa.key -pubout -out sa.pub
    ) >"$STATE/log/pki.log" 2>&1 || { cat "$STATE/log/pki.log" >&2; die "openssl failed"; }
    printf '%s\n' "$ADMIN_TOKEN,admin,1,\"system:masters\"" \
        "$NODE_TOKEN,system:node:$NODE_NAME,2,\"system:nodes\"" >"$d/tokens.csv"
    kubeconfig "$STATE/admin.kubeconfig" "$ADMIN_TOKEN"
    (umask 077; printf '%s\n' "$ADMIN_TOKEN" >"$d/admin.token")  # the cluster DNS reads Services with it
    kubeconfig "$STATE/kubelet.kubeconfig" "$NODE_TOKEN"
}

cgroups_v1() {  # kubelet 1.20 + cgroupfs: mount the v1 hierarchies the guest's init did not
    if [[ -d /sys/fs/cgroup/memory && -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]]; then
        return 0
    fi
    if mountpoint -q /sys/fs/cgroup; then
        umount /sys/fs/cgroup
    fi
    mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
    local c
    for c in cpuset "cpu,cpuacct" blkio memory devices freezer "net_cls,net_prio" perf_event hugetlb pids; do
        mkdir -p "/sys/fs/cgroup/$c"
        mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c" || die "cannot mount the cgroup v1 hierarchy $c"
    done
    ln -sfn cpu,cpuacct /sys/fs/cgroup/cpu
    ln -sfn cpu,cpuacct /sys/fs/cgroup/cpuacct
    ln -sfn net_cls,net_prio /sys/fs/cgroup/net_cls
    ln -sfn net_cls,net_prio /sys/fs/cgroup/net_prio
    mkdir -p /sys/fs/cgroup/systemd
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
    echo 1 >/sys/fs/cgroup/memory/memory.use_hierarchy 2>/dev/null || true
}

node_network() {
    modprobe br_netfilter
    modprobe overlay
    modprobe bridge
    sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
    ip link show node0 >/dev/null 2>&1 || ip link add node0 type dummy
    ip addr replace "$NODE_IP/32" dev node0
    ip link set node0 up
    ip link set lo up
    # the default route ends on the dummy: a component looking for "the host's address" finds the
    # node address, and nothing addressed elsewhere leaves the VM
    ip route replace default dev node0 src "$NODE_IP"
    hostname "$NODE_NAME" 2>/dev/null || true
    # the guest's resolv.conf names the host's resolver: inside the VM a lookup must fail at once
    printf 'nameserver 127.0.0.1\n' >"$STATE/resolv.conf"
    mountpoint -q /etc/resolv.conf || mount --bind "$STATE/resolv.conf" /etc/resolv.conf
}

write_configs() {
    mkdir -p "$STATE/cni/net.d" "$STATE/cni/ipam" "$STATE/containerd"
    cat >"$STATE/cni/net.d/10-pods.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
    cat >"$STATE/containerd/config.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$SANDBOX_IMAGE"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
}

import_images() {  # import_images SMALL|LARGE: archives under / over 8 MB (the pause image is small)
    local f n=0 size
    shopt -s nullglob
    for f in "$IMAGES"/*.oci.tar; do
        size=$(stat -c %s "$f")
        if [[ $1 == SMALL ]] && (( size > 8000000 )); then continue; fi
        if [[ $1 == LARGE ]] && (( size <= 8000000 )); then continue; fi
        ctr -n k8s.io images import "$f" >>"$STATE/log/images-$1.log" 2>&1 \
            || { tail -n 5 "$STATE/log/images-$1.log" >&2; die "cannot import $f"; }
        n=$((n + 1))
    done
    shopt -u nullglob
    [[ $1 == LARGE ]] || (( n > 0 )) || die "no image archives in $IMAGES (scripts/build-images.sh)"
}

start() {
    [[ -n ${IN_VM:-} ]] || die "run me inside the test VM (IN_VM set), e.g. bash scripts/vm-run.sh -- bash scripts/cluster.sh start"
    for t in etcd containerd runc ctr openssl "$PYTHON"; do
        command -v "$t" >/dev/null || die "$t missing: bash scripts/setup.sh"
    done
    [[ -x $KUBECTL ]] || die "$KUBECTL missing: bash scripts/install-helm.sh"
    if alive kubelet 2>/dev/null; then
        die "already running (bash scripts/cluster.sh stop first)"
    fi

    mkdir -p "$STATE"
    mountpoint -q "$STATE" || mount -t tmpfs -o mode=700 ipvsproxy-cluster "$STATE"
    mkdir -p "$STATE/log" "$STATE/pid"
    : >"$STATE/times"
    for d in /var/lib/containerd /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd; do
        mkdir -p "$d"
        mountpoint -q "$d" || mount -t tmpfs -o mode=755 ipvsproxy-cluster "$d"
    done

    # virtme puts a tmpfs on the guest's /var/cache: reach the host's cache through a bind of /
    if [[ ! -d $CACHE && $CACHE == /var/cache/* ]]; then
        mkdir -p "$STATE/host"
        mountpoint -q "$STATE/host" || mount --bind -o ro / "$STATE/host"
        CACHE=$STATE/host$CACHE
    fi
    IMAGES=${IMAGES:-$CACHE/images}
    KBIN=${KUBERNETES_BIN:-$CACHE/kubernetes-v1.20.2/bin}
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
        [[ -x $KBIN/$b ]] || die "$KBIN/$b missing: bash scripts/install-kubernetes.sh"
    done

    cgroups_v1
    node_network
    pki
    write_configs

    # Under emulation the Go binaries take tens of seconds just to start: etcd, containerd and the
    # API server start at once, the kubelet as soon as the pause image is in (it retries the API).
    daemon etcd etcd --name node --data-dir "$STATE/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster node=http://127.0.0.1:2380 --log-level warn --logger zap
    daemon containerd containerd --config "$STATE/containerd/config.toml"
    local p=$STATE/pki
    daemon kube-apiserver "$KBIN/kube-apiserver" \
        --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 --secure-port=$API_PORT \
        --insecure-port=0 --advertise-address=$NODE_IP \
        --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
        --client-ca-file="$p/ca.crt" --token-auth-file="$p/tokens.csv" \
        --authorization-mode=Node,RBAC --anonymous-auth=false \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
        --api-audiences=https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range=$SERVICE_CIDR --service-node-port-range=30000-32767 \
        --kubelet-preferred-address-types=InternalIP \
        --allow-privileged=true --profiling=false --logtostderr=true --v=0 \
        --disable-admission-plugins=TaintNodesByCondition
    # the cluster DNS: answers from the API server (SERVFAIL until it is up), for pods on the node address
    daemon clusterdns "$PYTHON" "$CLUSTERDNS" serve --listen "$NODE_IP:53" \
        --api-server "https://$NODE_IP:$API_PORT" --ca-file "$p/ca.crt" --token-file "$p/admin.token" \
        --domain cluster.local --ttl 5
    # TaintNodesByCondition (on by default) creates the node with node.kubernetes.io/not-ready:NoSchedule
    # and leaves its removal to the controller-manager's nodelifecycle controller, which this cluster
    # does not run (under emulation its 40 s grace period marks a busy node NotReady and evicts pods):
    # without the plugin the node is schedulable once Ready. (Found by the cluster test: the echo
    # pods stayed Pending with no node while the DaemonSet pod, which tolerates every taint, ran.)
    wait_for etcd etcdctl --endpoints http://127.0.0.1:2379 endpoint health || { check_alive etcd; exit 1; }
    mark etcd
    wait_for containerd ctr --address /run/containerd/containerd.sock version || { check_alive containerd; exit 1; }
    mark containerd
    # the small images (pause) before the kubelet starts, the large ones while it registers: under
    # emulation unpacking them takes minutes
    import_images SMALL
    mark images-small
    import_images LARGE &
    local large=$!

    daemon kubelet "$KBIN/kubelet" \
        --kubeconfig="$STATE/kubelet.kubeconfig" --root-dir=/var/lib/kubelet \
        --container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
        --runtime-request-timeout=10m --hostname-override="$NODE_NAME" --node-ip=$NODE_IP \
        --cgroup-driver=cgroupfs --fail-swap-on=false \
        --anonymous-auth=true --authorization-mode=AlwaysAllow --read-only-port=0 \
        --cluster-domain=cluster.local --cluster-dns=$NODE_IP --resolv-conf="$STATE/resolv.conf" \
        --pod-infra-container-image="$SANDBOX_IMAGE" --make-iptables-util-chains=false \
        --eviction-hard= --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
        --enforce-node-allocatable= --cgroups-per-qos=true \
        --volume-plugin-dir="$STATE/volume-plugins" --cert-dir="$STATE/kubelet-pki" \
        --logtostderr=true --v=0

    wait_for kube-apiserver sh -c "[ \"\$('$KUBECTL' --kubeconfig '$STATE/admin.kubeconfig' get --raw /readyz 2>/dev/null)\" = ok ]" \
        || { check_alive kube-apiserver; exit 1; }
    mark kube-apiserver
    # the controller-manager gives the API server 10 s at start, then exits: start it (and the
    # scheduler) once the API server is ready
    daemon kube-controller-manager "$KBIN/kube-controller-manager" \
        --kubeconfig="$STATE/admin.kubeconfig" --authentication-kubeconfig="$STATE/admin.kubeconfig" \
        --authorization-kubeconfig="$STATE/admin.kubeconfig" \
        --controllers="$KCM_CONTROLLERS" \
        --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
        --service-cluster-ip-range=$SERVICE_CIDR --allocate-node-cidrs=false \
        --leader-elect=false --port=0 --bind-address=127.0.0.1 --logtostderr=true --v=0
    daemon kube-scheduler "$KBIN/kube-scheduler" \
        --kubeconfig="$STATE/admin.kubeconfig" --authentication-kubeconfig="$STATE/admin.kubeconfig" \
        --authorization-kubeconfig="$STATE/admin.kubeconfig" \
        --leader-elect=false --port=0 --bind-address=127.0.0.1 --logtostderr=true --v=0
    # the API server creates the kubernetes Service at start: the first name the DNS must answer
    wait_for "the cluster DNS to answer kubernetes.default.svc.cluster.local" \
        "$PYTHON" "$CLUSTERDNS" query --server "$NODE_IP:53" kubernetes.default.svc.cluster.local \
        || { check_alive clusterdns; exit 1; }
    mark cluster-dns
    wait_for "the node to register" kc get node "$NODE_NAME" || { check_alive kubelet; exit 1; }
    mark node-registered
    wait_for "the node to be Ready" sh -c "'$KUBECTL' --kubeconfig '$STATE/admin.kubeconfig' get node '$NODE_NAME' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True" \
        || { for c in kubelet kube-controller-manager kube-scheduler; do check_alive $c; done; exit 1; }
    mark node-ready
    wait_for "the node to be schedulable (no taints)" sh -c "[ -z \"\$('$KUBECTL' --kubeconfig '$STATE/admin.kubeconfig' get node '$NODE_NAME' -o jsonpath='{.spec.taints}')\" ]" \
        || { kc get node "$NODE_NAME" -o jsonpath='{.spec.taints}' >&2; exit 1; }
    wait_for "the default service account" kc -n default get serviceaccount default \
        || { check_alive kube-controller-manager; exit 1; }
    mark default-serviceaccount
    wait "$large" || die "importing the images failed"
    mark images
    log "images: $(ctr -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
    log "ready: export KUBECONFIG=$STATE/admin.kubeconfig"
}

stop() {
    [[ -d $STATE/pid ]] || { log "not running"; return 0; }
    local name pid
    # the kubelet first (it would restart containers), then every pod's container, then the rest
    for name in kubelet kube-scheduler kube-controller-manager clusterdns; do
        stop_one "$name"
    done
    if alive containerd; then
        local ctr_=(ctr --address /run/containerd/containerd.sock -n k8s.io)
        for c in $("${ctr_[@]}" tasks ls -q 2>/dev/null); do
            "${ctr_[@]}" tasks kill -s KILL "$c" >/dev/null 2>&1 || true
        done
        for c in $("${ctr_[@]}" tasks ls -q 2>/dev/null); do
            for _ in $(seq 50); do
                "${ctr_[@]}" tasks delete "$c" >/dev/null 2>&1 && break
                sleep 0.2
            done
        done
    fi
    # the runc shims outlive containerd: end exactly those (identified by their executable)
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/exe" 2>/dev/null) == */containerd-shim-runc-v2 ]] && kill -TERM "${p#/proc/}" 2>/dev/null
    done
    for name in containerd kube-apiserver etcd; do
        stop_one "$name"
    done
    # what the CNI bridge plugin and the node set-up left in the network namespace
    for l in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
        [[ $l == veth* ]] && ip link del "$l" 2>/dev/null || true
    done
    ip link del cni0 2>/dev/null || true
    ip route del default dev node0 2>/dev/null || true
    ip link del node0 2>/dev/null || true
    # pods' mounts under the kubelet's and containerd's directories, then our tmpfs
    grep -oE ' (/var/lib/kubelet|/run/containerd|/var/lib/containerd)[^ ]*' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    for d in /var/lib/containerd /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd; do
        mountpoint -q "$d" && umount -l "$d"
    done
    mountpoint -q "$STATE/host" && umount -l "$STATE/host"
    mountpoint -q /etc/resolv.conf && umount /etc/resolv.conf
    umount -l "$STATE" 2>/dev/null || rm -rf "$STATE"
    log "stopped"
}

stop_one() {
    local name=$1 pid
    alive "$name" || return 0
    pid=$(cat "$STATE/pid/$name")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$STATE/pid/$name"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    env)
        # kubectl's and helm's caches: the guest's $HOME is read-only, and a kubectl without its
        # discovery cache sends dozens of requests per command
        printf 'export KUBECONFIG=%s\nexport PATH=%s:$PATH\n' "$STATE/admin.kubeconfig" "$ROOT/.cache/bin"
        printf 'export GODEBUG=%s\n' "$GODEBUG"
        printf 'export KUBECACHEDIR=%s HELM_CACHE_HOME=%s HELM_CONFIG_HOME=%s HELM_DATA_HOME=%s\n' \
            "$STATE/kube-cache" "$STATE/helm/cache" "$STATE/helm/config" "$STATE/helm/data" ;;
    *) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
