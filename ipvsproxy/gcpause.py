"""Pause Python's cyclic garbage collector through bulk work; freeze what the cold start built.

Why: a cold start reads the whole cluster (10,000 Services x 10 endpoints is millions of
objects, nearly all of which stay alive) and plans ~160,000 operations. CPython runs a full
(generation 2) collection each time the number of tracked objects grows by a quarter, and
each one walks the whole heap, so a growing heap pays for itself several times over. At
10,000 x 10 on the development host, `run --once --from-file` spent 3.5 s of 10.6 s in 14
full collections (plus 0.5 s in young ones); with the collector off it took 6.5 s and its
peak RSS did not move (348 MB both ways): these objects are freed by reference counting,
there is next to no cyclic garbage to find (docs/benchmarks.md, "Garbage collection").

So the collector is paused (never left off):
- around `Agent.once` (read + sync) and every full sync (`core.sync(..., full=True)`, the one
  sync path of the daemon and the benchmark: the periodic resync and restart adoption walk the
  whole desired state);
- in the daemon from its start until the first sync has ended (the initial list runs in
  the source's threads), at most `STARTUP_LIMIT` seconds, so an API server that stays away
  cannot keep it off; then `gc.freeze()` moves the state the cold start built into the
  permanent generation, which later collections skip: the incremental syncs that follow do
  not pay for walking the whole cluster's state again. Frozen objects are still freed by
  reference counting when a change drops them.
- after every later full sync of the daemon (`core.sync(..., freeze=True)`; with --resync
  rolling, after the sync that ends a drift-check round): what the changes
  since the last freeze made and kept (slices, endpoints, virtual servers, real servers) is outside
  the permanent generation, and every full collection walks it again; without a refreeze it only
  grows with the cluster's churn. So each full sync (every --sync-period) freezes it too: a full
  collection then walks at most one period's churn (at 10,000 x 10 on the host, 100 changes/s, the
  longest full collection 207 -> 135 ms; a full collection in an incremental sync with nothing
  frozen at all took 830 ms). `refreeze` collects the garbage cycles first (a frozen one would be
  kept forever; that collection walks only what is not frozen, ~20 ms there), then freezes the rest.

Pauses nest and may come from several threads: the collector is back on when the last one
ends, and only if it was on when the first began.

When the last pause ends, the C heap's free pages go back to the kernel (glibc's
`malloc_trim`): bulk work frees most of what it allocated (list pages, a plan's operations),
and glibc keeps such pages resident. At 20,000 Services x 10 that was 5.2 MiB of the agent's
RSS after the cold start, for under a millisecond (docs/benchmarks.md, "Agent memory").
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STARTUP_LIMIT = 300.0  # seconds the daemon's start-up pause may last at most

_lock = threading.Lock()
_depth = 0
_was_enabled = False


def _libc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), from the symbols the interpreter already has loaded; a no-op
    where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


trim_heap = _libc_trim()  # called when the last pause ends


def pause() -> None:
    """Collector off until the matching `resume` (nests)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1


def resume() -> None:
    """End one `pause`; the last one restores the collector as the first found it."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        last = _depth == 0
        if last and _was_enabled:
            gc.enable()
    if last:
        trim_heap()


@contextmanager
def paused(*, freeze: bool = False) -> Iterator[None]:
    """The collector off for the block; with `freeze`, what is alive after it is frozen (`refreeze`)."""
    pause()
    try:
        yield
    finally:
        try:
            if freeze:
                refreeze()
        finally:
            resume()


def refreeze() -> None:
    """Collect the garbage cycles among the objects not yet frozen, then freeze everything alive:
    later collections walk only what is made after this."""
    gc.collect()
    gc.freeze()


class StartupPause:
    """The daemon's pause from its start to the end of its first sync (or `limit` seconds)."""

    def __init__(self, clock: Callable[[], float], limit: float = STARTUP_LIMIT) -> None:
        self.clock, self.limit = clock, limit
        self.since: float | None = None  # when it began; None: not active
        self.frozen = False
        self._lock = threading.Lock()  # end() comes from the runner's thread, expire() from the main one

    @property
    def active(self) -> bool:
        return self.since is not None

    def start(self) -> None:
        with self._lock:
            if self.since is not None:
                return
            self.since = self.clock()
        pause()

    def end(self, *, freeze: bool) -> None:
        """The first sync ended; `freeze` (it succeeded): what it built goes to the permanent
        generation."""
        with self._lock:
            if self.since is None:
                return
            self.since = None
            if freeze and not self.frozen:
                gc.freeze()
                self.frozen = True
        resume()

    def expire(self) -> None:
        """Called now and then (the daemon's main loop): ends a pause that outlived its limit."""
        since = self.since
        if since is not None and self.clock() - since >= self.limit:
            self.end(freeze=False)
