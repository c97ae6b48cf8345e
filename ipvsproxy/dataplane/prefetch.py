"""A whole-table read started early on a thread of its own, taken once by the sync it serves.

Why: at start-up the agent lists every Service and EndpointSlice before its first sync, and
that sync begins by reading the kernel's whole table (IPVS: /proc/net/ip_vs and a services
dump; nftables: the structure listing and every set's elements). Much of that read is the
kernel's work (the proc file's text, the netlink dumps) and `nft`'s, which run while the
Python thread waits. Started when the listing starts, the read overlaps it: on a restart at
10,000 Services in the test VM, the kernel's part of the read is seconds of the restart.

A prefetched read is taken at most once, by the first read that asks (`take`), and only if it
is at most `max_age` seconds old: at start-up nothing but this agent writes the table, and a
read older than that is read again rather than trusted. A read that failed on its thread is
read again too; the caller never sees the thread's exception, only a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_AGE_S = 60.0  # seconds a prefetched read may wait for the sync it serves


class Prefetch(Generic[T]):
    """`read()` running on a daemon thread from construction; `take()` waits for it."""

    def __init__(self, read: Callable[[], T], *, name: str, max_age: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.max_age, self.clock = name, max_age, clock
        self.started = clock()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(read,), name=name, daemon=True)
        self._thread.start()

    def _run(self, read: Callable[[], T]) -> None:
        try:
            self._result = read()
        except Exception as exc:  # said by take(); the caller reads again
            self._error = exc

    def wait(self) -> None:
        """Until the read has ended (before the reader's sockets are used or closed)."""
        self._thread.join()

    def take(self) -> T | None:
        """The read's result, once it has ended; None when it failed or is too old to trust."""
        self.wait()
        if self._error is not None:
            log.info("%s: the background read failed (%s); reading again", self.name, self._error)
            return None
        age = self.clock() - self.started
        if age > self.max_age:
            log.info("%s: the background read is %.0f s old (over %.0f s); reading again", self.name, age,
                     self.max_age)
            return None
        return self._result
