"""A plain stderr progress bar (no dependency) and small statistics helpers."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """`[#######.........]  45%  label  12.3s` redrawn at most 10 times a second.

    Disabled (silent) unless enabled; the CLI enables it when stderr is a
    terminal or --progress is given. Phase messages (`note`) are printed on
    their own line either way when enabled.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None, width: int = 30) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self._label = ""
        self._total = 0
        self._done = 0
        self._start = 0.0
        self._drawn = 0.0
        self._open = False

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        self._clear()
        self.stream.write(f"bench: {message}\n")
        self.stream.flush()

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done = label, max(total, 0), 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._draw(force=True)

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self.enabled and time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def finish(self) -> None:
        if not self.enabled:
            return
        self._done = self._total
        self._draw(force=True)
        self.stream.write("\n")
        self.stream.flush()
        self._open = False

    def iterate(self, items: Iterable[T], label: str, total: int, every: int = 256) -> Iterator[T]:
        """Yield items, advancing the bar every `every` items (cheap enough for timed loops)."""
        if not self.enabled or total < 2000:  # quick phases get no bar
            yield from items
            return
        self.start(label, total)
        n = 0
        for item in items:
            yield item
            n += 1
            if n % every == 0:
                self.advance(every)
        self._done = n
        self.finish()

    def _clear(self) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self._open = False

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        frac = min(1.0, self._done / self._total) if self._total else 0.0
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}%  {self._label}  {now - self._start:6.1f}s\033[K")
        self.stream.flush()
        self._open = True


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest-rank on sorted data; None when empty."""
    if not values:
        return None
    data = sorted(values)
    k = max(0, min(len(data) - 1, int(round(q / 100 * len(data) + 0.5)) - 1))
    return data[k]


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 6) -> dict[str, float | int | None]:
    """count, median, p99, max, mean of values (times `scale`)."""
    if not values:
        return {"count": 0, "median": None, "p99": None, "max": None, "mean": None}

    def r(v: float | None) -> float | None:
        return None if v is None else round(v * scale, digits)

    return {"count": len(values), "median": r(statistics.median(values)), "p99": r(percentile(values, 99)),
            "max": r(max(values)), "mean": r(statistics.fmean(values))}
