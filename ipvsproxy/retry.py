"""Per-Service failure accounting: which Services the kernel refused, and when to try again.

One Service the kernel will not take (an address it cannot bind, a protocol
IPVS was built without) must not wedge the node: before this, any refused
operation made the whole sync fail, every later sync a full dump, and /healthz
503. Instead the reconciler records the refusal against the Service it came
from, leaves that Service's refused virtual servers and addresses alone until
a backoff has passed (or the Service changes), and keeps every other Service
incremental. kube-proxy does the same in spirit: it logs per-Service errors
and stays healthy.

Everything here is pure and clock-driven (the caller passes `now`), so the
schedule is tested with a fake clock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .model import VSKey


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before attempt n+1 after n consecutive failures: base * 2**(n-1), capped."""

    base: float = 1.0
    cap: float = 120.0

    def delay(self, attempts: int) -> float:
        if attempts <= 0:
            return 0.0
        return min(self.base * 2.0 ** min(attempts - 1, 32), self.cap)


@dataclass(slots=True)
class Failing:
    """One Service (or, for objects no Service owns, one virtual server/address) being retried."""

    unit: str  # a Service id (namespace/name), or "<key>" / "<address>" when no Service owns it
    attempts: int
    due: float  # monotonic time of the next attempt
    message: str
    keys: frozenset[VSKey] = field(default_factory=frozenset)  # virtual servers whose ops failed
    addresses: frozenset[str] = field(default_factory=frozenset)  # addresses whose bind/unbind failed


class RetrySchedule:
    """The Services currently failing, with their next attempt time."""

    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff or Backoff()
        self.failing: dict[str, Failing] = {}

    def __len__(self) -> int:
        return len(self.failing)

    def failed(self, unit: str, message: str, keys: Iterable[VSKey], addresses: Iterable[str],
               now: float) -> Failing:
        """Record one more failed attempt; returns the record (attempts counts consecutive failures)."""
        old = self.failing.get(unit)
        attempts = (old.attempts if old else 0) + 1
        rec = self.failing[unit] = Failing(unit, attempts, now + self.backoff.delay(attempts), message,
                                           frozenset(keys), frozenset(addresses))
        return rec

    def succeeded(self, unit: str) -> Failing | None:
        """Forget a unit that went through; returns what it was (None if it was not failing)."""
        return self.failing.pop(unit, None)

    def released(self, now: float, changed: Collection[str]) -> list[Failing]:
        """Units whose retry is due, or whose Service changed (its new spec may fix it)."""
        return [f for f in self.failing.values() if f.due <= now or f.unit in changed]

    def held(self, now: float, changed: Collection[str]) -> tuple[set[VSKey], set[str]]:
        """(keys, addresses) not to touch now: what failed, for units still waiting."""
        keys: set[VSKey] = set()
        addresses: set[str] = set()
        for f in self.failing.values():
            if f.due > now and f.unit not in changed:
                keys |= f.keys
                addresses |= f.addresses
        return keys, addresses

    def next_due(self) -> float | None:
        """When the earliest retry is due (None: nothing failing)."""
        return min((f.due for f in self.failing.values()), default=None)
