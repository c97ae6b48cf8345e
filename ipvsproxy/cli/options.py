"""Click option types and the option sets shared by run, diff and list.

Every option reads IPVSPROXY_<FLAG> from the environment (docs/configuration.md), so the
DaemonSet can be configured either way; docs/configuration.md is generated
from these declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import parse_cidrs, parse_duration

F = TypeVar("F", bound=Callable[..., Any])


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2's annotations
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class CIDRs(click.ParamType):  # type: ignore[type-arg]
    name = "cidrs"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_cidrs(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _api_server(value: str | None, param: click.Parameter, ctx: click.Context) -> str | None:
    if not value:
        return None
    from ..sources.kube import split_api_server

    try:
        split_api_server(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


def env(flag: str) -> str:
    return "IPVSPROXY_" + flag.upper().replace("-", "_")


def opt(flag: str, *names: str, **kw: Any) -> Callable[[F], F]:
    """An option --flag that also reads IPVSPROXY_FLAG ('a/--no-a' for boolean pairs)."""
    kw.setdefault("show_default", True)
    kw.setdefault("show_envvar", True)
    return click.option(f"--{flag}", *names, envvar=env(flag.split("/")[0]), **kw)


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


source_options = _stack(
    opt("from-file", "from_files", multiple=True, type=click.Path(exists=True),
        help="Read Services/EndpointSlices/Nodes from YAML or JSON files or directories instead of the API "
             "(repeatable; re-read when they change; must exist at start; a file that turns empty, "
             "invalid or missing keeps its last good content). JSON (`kubectl get -o json`) is read "
             "about 25x faster than YAML: prefer it for large clusters."),
    opt("kubeconfig", default=None, type=click.Path(dir_okay=False),
        help="Kubeconfig to use when not in a cluster (else $KUBECONFIG, ~/.kube/config)."),
    opt("api-server", default=None, callback=lambda ctx, param, value: _api_server(value, param, ctx),
        help="The API server's own address, https://HOST:PORT, instead of the in-cluster kubernetes "
             "Service ClusterIP (which needs a service proxy: on a node without kube-proxy, set this). "
             "With --kubeconfig it replaces the kubeconfig's server."),
    opt("endpoints-source", default="auto", type=click.Choice(["auto", "v1", "v1beta1", "endpoints"]),
        help="Where endpoints come from: discovery.k8s.io/v1 or v1beta1 EndpointSlices, or core/v1 "
             "Endpoints; auto takes the newest the API server serves."),
    opt("node-name", default=None, help="This node's name.  [default: $NODE_NAME, else the host name]",
        show_default=False),
    opt("service-proxy-name", default="",
        help="Proxy only the Services labelled service.kubernetes.io/service-proxy-name=NAME "
             "(default: only those without the label, as kube-proxy).", metavar="NAME"),
)

translate_options = _stack(
    opt("interface", default="ipvsproxy0",
        help="Dummy interface that holds the Service addresses: created and marked (alias 'managed-by: "
             "ipvsproxy') when missing; an existing one must be such a dummy (or an unmarked "
             "ipvsproxy*/kube-ipvs0 dummy, adopted), anything else is refused."),
    opt("scheduler", default="rr", help="Cluster default IPVS scheduler (see `ipvsproxy schedulers`)."),
    opt("exclude-cidrs", default="", type=CIDRs(),
        help="Comma list of CIDRs whose virtual servers are never touched."),
    opt("nodeport-addresses", default="", type=CIDRs(),
        help="Comma list of CIDRs selecting the node addresses that carry NodePorts "
             "(default: all InternalIP/ExternalIP of the Node)."),
    opt("drain-grace-period", default="30s", type=Duration(),
        help="Longest a removed TCP endpoint is drained before its real server is deleted."),
    opt("state-dir", default="/run/ipvsproxy",
        help="Where the agent records Service names for `ipvsproxy list`."),
)
