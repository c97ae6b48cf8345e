"""The interface every dataplane implements (netlink for the kernel, memory for tests).

The reconciler and the CLI speak only to this; swapping the kernel for the
in-memory model is what makes the core testable on a machine without IPVS.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..model import ObservedState, ObservedVS, VSKey
from ..plan import Op

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
        """A full dump: every virtual server (ours and foreign) and our addresses."""

    def observe_keys(self, keys: Iterable[VSKey]) -> dict[VSKey, ObservedVS | None]:
        """Fresh data for some virtual servers only (None: not in the kernel)."""

    def service_stats(self) -> dict[VSKey, tuple[bool, Mapping[str, int]]]:
        """Every virtual server's (owned, kernel counters), without real servers: what /metrics reads."""

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
