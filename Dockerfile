# syntax=docker/dockerfile:1
#
# ipvsproxy: the node agent image (the Helm chart in charts/ipvsproxy runs it as a DaemonSet).
#
#   docker build -t ipvsproxy:0.1.0 .
#
# What the container needs at run time (and nothing more; the chart sets exactly this):
#   - hostNetwork: true. The agent programs the node's own network namespace: IPVS virtual
#     servers, the dummy interface (ipvsproxy0) holding Service addresses, nftables rules.
#   - capabilities (drop ALL, then add):
#       NET_ADMIN   netlink writes: IPVS (generic netlink "IPVS"), links and addresses
#                   (rtnetlink), nftables, conntrack flushes, IPVS timeouts;
#       NET_RAW     raw IP/packet sockets: the in-pod diagnostics (ping, arping-style
#                   checks) and kube-proxy's convention; the agent's own netlink sockets
#                   (AF_NETLINK) need no NET_RAW, so it may be dropped where policy demands;
#       SYS_MODULE  ONLY when it loads kernel modules itself (ip_vs, ip_vs_<scheduler>,
#                   dummy, nf_conntrack); not needed with --no-load-modules when the host
#                   loads them (e.g. /etc/modules-load.d).
#     privileged is NOT needed. Sysctls (net.ipv4.vs.*, ip_forward, arp_*) live under
#     /proc/sys, which runtimes mount read-only in unprivileged containers: the chart's init
#     container writes them through the host's /proc/sys/net instead.
#   - user root (uid 0): Kubernetes gives added capabilities to uid 0 only (no ambient
#     capabilities), and netlink writes need them. No USER line on purpose.
#   - /lib/modules from the host, mounted read-only (modprobe and module checks).
#   - /run/ipvsproxy from the host, read-write: the state the agent keeps across restarts.
#   - NODE_NAME from the downward API (spec.nodeName).
FROM python:3.11-slim

# Kernel tools: modprobe (kmod) for module loading, nft for the packet-filter companion, and
# ip / ipvsadm / conntrack for debugging inside the pod (kubectl exec ... -- ipvsadm -Ln).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        conntrack \
        iproute2 \
        ipvsadm \
        kmod \
        nftables \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY ipvsproxy/ ipvsproxy/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

WORKDIR /
LABEL org.opencontainers.image.title="ipvsproxy" \
      org.opencontainers.image.description="Kubernetes service proxy that programs Linux IPVS" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["ipvsproxy"]
CMD ["run"]
