# syntax=docker/dockerfile:1
#
# ipvsproxy: the node agent image (the Helm chart in charts/ipvsproxy runs it as a DaemonSet).
#
#   docker build -t ipvsproxy:0.1.0 .
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest> -t ipvsproxy:0.1.0 .
#
# What the image contains is listed ONCE, in images/ipvsproxy.toml (packages and versions, lock file,
# virtualenv, entrypoint, env, user). scripts/build-images.sh builds the same image offline from that
# list (no Docker, no registry: docs/images.md), and tests/unit/test_image_contents.py fails when this
# file says anything else. Change both together.
#
# What the container needs at run time (and nothing more; the chart sets exactly this):
#   - hostNetwork: true. The agent programs the node's own network namespace: IPVS virtual
#     servers, the dummy interface (ipvsproxy0) holding Service addresses, nftables rules.
#   - capabilities (drop ALL, then add; the chart's defaults):
#       NET_ADMIN   netlink writes: IPVS (generic netlink "IPVS"), links and addresses
#                   (rtnetlink), nftables, conntrack flushes, IPVS timeouts. The only one
#                   the long-running container gets by default.
#       SYS_MODULE  NOT for the agent by default: the chart's init container loads the
#                   modules (ip_vs, ip_vs_<scheduler>, dummy, nf_conntrack) and the agent
#                   runs with --no-load-modules (IPVS loads a scheduler module a Service
#                   asks for later by itself). Opt in (securityContext.sysModule) to have the
#                   agent load modules; it gets it anyway when there is no init container.
#       NET_RAW     NOT needed: the agent's sockets are netlink and TCP. Opt in
#                   (securityContext.netRaw) for diagnostics run in the pod (ping, arping).
#     privileged is NOT needed. Sysctls (net.ipv4.vs.*, ip_forward, arp_*) live under
#     /proc/sys, which runtimes mount read-only in unprivileged containers: the chart's init
#     container writes them through the host's /proc/sys/net instead.
#   - user root (uid 0): Kubernetes gives added capabilities to uid 0 only (no ambient
#     capabilities), and netlink writes need them. No USER line on purpose.
#   - /lib/modules from the host, mounted read-only (modprobe and module checks).
#   - /run/ipvsproxy from the host, read-write: the state the agent keeps across restarts.
#   - NODE_NAME from the downward API (spec.nodeName).
#
# Reproducible: two builds of one commit carry the same software. The interpreter and the
# kernel tools are Debian bookworm packages pinned to exact versions (a version that moves
# makes the build fail, it never silently differs); the Python dependencies come from
# requirements.lock (pip-compile --generate-hashes; regenerate with the command in its
# header), installed with --require-hashes and wheels only, and the package itself is built
# without build isolation by the setuptools/wheel pinned there. To pin the base image too,
# build with --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest>.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# Kernel tools: modprobe (kmod) for module loading, nft for the packet-filter companion, and
# ip / ipvsadm / conntrack for debugging inside the pod (kubectl exec ... -- ipvsadm -Ln).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        conntrack=1:1.4.7-1+b2 \
        iproute2=6.1.0-3 \
        ipvsadm=1:1.31-1+b1 \
        kmod=30+20221128-1 \
        nftables=1.0.6-2+deb12u2 \
        python3.11=3.11.2-6+deb12u9 \
        python3.11-venv=3.11.2-6+deb12u9 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/ipvsproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

WORKDIR /src
COPY requirements.lock ./
RUN python3.11 -m venv /opt/ipvsproxy \
    && pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements.lock
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY ipvsproxy/ ipvsproxy/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info

WORKDIR /
LABEL org.opencontainers.image.title="ipvsproxy" \
      org.opencontainers.image.description="Kubernetes service proxy that programs Linux IPVS" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["ipvsproxy"]
CMD ["run"]
