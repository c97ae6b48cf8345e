"""A bounded-frequency runner: calls one function when it is due or poked,
never more often than a minimum interval.

kube-proxy's BoundedFrequencyRunner: a burst of changes (pokes) becomes one
call per `min_interval`, and the function says itself when it next wants to
run (a periodic resync, a drain re-check, a retry). The runner knows nothing
of syncs, trackers or reconcilers; it takes a function and a clock, so its
decisions (:meth:`Runner.step`) are tested with a fake clock and no thread.
Only :meth:`Runner.run` waits, on real time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The function run: returns when (on the runner's clock) it next wants to run, or None for
# "only when poked".
Due = Callable[[], float | None]


class Runner:
    """Calls `fn` when it is due or poked, at most once per `min_interval`."""

    def __init__(
        self,
        fn: Due,
        *,
        min_interval: float,
        clock: Callable[[], float] = time.monotonic,
        wake: threading.Event | None = None,
    ) -> None:
        self.fn, self.min_interval, self.clock = fn, min_interval, clock
        # Set by poke() (or by whoever shares the event: the tracker sets it on every change).
        self.wake = wake if wake is not None else threading.Event()
        self._stopped = threading.Event()
        self.due: float | None = clock()  # the first call is due at once
        self.last_run: float | None = None
        self.runs = 0

    def poke(self) -> None:
        """Run soon (after `min_interval` since the last call): something changed."""
        self.wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self.wake.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _delay(self, now: float) -> float | None:
        """Seconds until the next call (None: not until poked): when it is due or
        was poked, but never sooner than `min_interval` after the last one."""
        if self.wake.is_set():
            target = now
        elif self.due is None:
            return None
        else:
            target = self.due
        if self.last_run is not None:
            target = max(target, self.last_run + self.min_interval)
        return max(0.0, target - now)

    def step(self) -> float | None:
        """Call the function if it is due (or poked) and the interval allows;
        returns the seconds until the next look (None: until poked)."""
        now = self.clock()
        if self._delay(now) == 0.0:
            self.wake.clear()  # a change from now on is for the next call
            self.last_run = now
            self.runs += 1
            self.due = self.fn()
            now = self.clock()
        return self._delay(now)

    def run(self) -> None:
        """Loop until stop(): step, then wait for the delay or a poke."""
        while not self._stopped.is_set():
            delay = self.step()
            if self._stopped.is_set():
                break
            if self.wake.is_set():
                # poked inside the interval: coalesce, waking only for stop()
                if delay:
                    self._stopped.wait(delay)
            else:
                self.wake.wait(delay)
