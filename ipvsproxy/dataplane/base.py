"""The interface every dataplane implements (netlink for the kernel, memory for tests).

The reconciler and the CLI speak only to this; swapping the kernel for the
in-memory model is what makes the core testable on a machine without IPVS.
"""

from __future__ import annotations

import errno as _errno
import os
from collections import Counter
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..model import ObservedState, ObservedVS, VSKey, join_host_port
from ..plan import Op, OpKind

# The mark on the dummy interface ipvsproxy made (its IFLA_IFALIAS, `ip link show` prints it as
# "alias ..."): the agent binds, unbinds and deletes only on a dummy carrying it (dataplane/netlink.py).
INTERFACE_MARK = "managed-by: ipvsproxy"
# kube-proxy's dummy (IPVS mode): the Service addresses on it are kube-proxy's, never the node's own.
KUBE_PROXY_DUMMY = "kube-ipvs0"


class DataplaneError(RuntimeError):
    """The dataplane cannot work at all (message is the one line to show)."""


class InterfaceRefused(DataplaneError):
    """--interface names an interface that is not ipvsproxy's dummy: nothing
    may be bound, unbound or deleted on it (a usage error: exit 2)."""


@dataclass(slots=True)
class Failure:
    """An operation the dataplane refused, and why (names the object)."""

    op: Op
    message: str
    errno: int = 0  # the kernel's (or its model's) error number; 0 when there is none


def harmless(op: Op, errno: int) -> bool:
    """A refusal that means the operation's aim already holds: deleting what is
    gone (someone else removed it), binding what is bound, unbinding what is
    not. Every dataplane counts these as success."""
    if op.kind in (OpKind.DEL_VS, OpKind.DEL_RS):
        return errno in (_errno.ESRCH, _errno.ENOENT)
    if op.kind is OpKind.BIND:
        return errno == _errno.EEXIST
    if op.kind is OpKind.UNBIND:
        return errno == _errno.EADDRNOTAVAIL
    return False


_WHAT = {
    OpKind.ADD_VS: "add virtual server", OpKind.EDIT_VS: "edit virtual server",
    OpKind.DEL_VS: "delete virtual server", OpKind.ADD_RS: "add real server",
    OpKind.EDIT_RS: "set weight of real server", OpKind.DEL_RS: "delete real server",
    OpKind.BIND: "bind address", OpKind.UNBIND: "unbind address",
}


def describe_failure(op: Op, err: BaseException | int) -> str:
    """'Service demo/web:http: add real server 10.0.0.5:8080 to TCP 10.96.0.10:80: File exists'."""
    what = _WHAT[op.kind]
    if op.real is not None:
        what += f" {join_host_port(op.real.address, op.real.port)} of"
    target = str(op.key) if op.key is not None else str(op.address)
    code = err if isinstance(err, int) else getattr(err, "errno", 0)
    reason = os.strerror(code) if isinstance(code, int) and code else str(err)
    if op.kind in (OpKind.ADD_VS, OpKind.EDIT_VS) and code == _errno.ENOENT:
        reason += f" (is the scheduler module ip_vs_{op.vs.scheduler if op.vs else '?'} loadable?)"
    who = f"Service {op.service}: " if op.service else ""
    return f"{who}{what} {target}: {reason}"


@dataclass(slots=True)
class Counters:
    """What the dataplane did: operations by kind and netlink traffic."""

    ops: Counter[str] = field(default_factory=Counter)
    messages: int = 0  # netlink messages sent
    round_trips: int = 0  # sendmsg calls (each followed by reading replies)
    dumps: int = 0


class Dataplane(Protocol):
    counters: Counters

    def setup(self) -> None:
        """Make the dataplane usable: modules, sysctls, interface, timeouts."""

    def observe(self) -> ObservedState:
        """A full dump: every virtual server (ours and foreign) and our addresses. A real
        server's traffic counters may be left empty (NetlinkDataplane reads them only when
        made with real_counters, for `list --stats`); its weight and connections never are."""

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        """Fresh data for some virtual servers only (None: not in the kernel)."""

    def service_stats(self) -> dict[VSKey, tuple[bool, Mapping[str, int]]]:
        """Every virtual server's (owned, kernel counters), without real servers: what /metrics reads."""

    def service_key_pages(self) -> Generator[list[VSKey] | None, None, None]:
        """Every virtual server's key (ours and foreign) and nothing else, a page at a time as
        the kernel fills its dump: the cheapest whole-table read, which the rolling drift check
        reads a few pages per step beside the other requests. None: the dump restarted, and
        keys already given come again. Closing the iterator ends the dump."""

    def bound_addresses(self) -> set[str]:
        """The addresses on our dummy interface (what observe() reports, without the table)."""

    def apply(self, ops: Sequence[Op]) -> list[Failure]:
        """Carry out operations in order; failures are returned, never raised."""

    def scheduler_usable(self, name: str) -> bool:
        """Whether the scheduler's kernel module is present (loading it if needed)."""

    def local_addresses(self) -> set[str]:
        """The node's own addresses: every address on any interface other than
        our dummy one (an external address among them is never bound)."""

    def remove_interface(self) -> bool:
        """Delete our dummy interface (cleanup); True when it existed."""

    def close(self) -> None:
        """Release sockets."""
