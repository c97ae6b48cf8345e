"""The nftables companion driven by whole desired states, for tests.

The agent hands NftFirewall the reconciler's change delta, never a desired
state; tests find it easier to say "now the node wants this". This subclass
keeps the state it was last given and turns each new one into the delta the
reconciler would have produced, so unit tests (tests/unit/test_nft.py) and
kernel tests (tests/kernel/test_nft.py) exercise the same sync path.
"""

from __future__ import annotations

from typing import Any

from ipvsproxy.dataplane.nft import NftFirewall
from ipvsproxy.model import FULL, Change, DesiredState, Scope, VirtualServer, VSKey


class Firewall(NftFirewall):
    """The companion as the reconciler drives it: each sync gets the change delta
    from the state it was last given (every key, or only those of `scope`), and is
    a full one (a drift check) unless a scope is given."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: dict[VSKey, VirtualServer] = {}

    def sync_state(self, desired: DesiredState, scope: Scope = FULL) -> int:
        keys = self.seen.keys() | desired.services.keys() if scope is FULL else set(scope)
        delta = {k: Change(self.seen.get(k), desired.services.get(k)) for k in keys}
        for k, change in delta.items():
            if change.new is None:
                self.seen.pop(k, None)
            else:
                self.seen[k] = change.new
        return self.sync(delta, full=scope is FULL)
