"""The scheduler registry: which IPVS schedulers exist and which flags each takes.

Built-in entries cover every scheduler the mainline kernel ships. Third-party
packages add more through the entry-point group ``ipvsproxy.schedulers``; an
entry point may load a :class:`Scheduler` or a mapping with the same fields.
Choosing a scheduler for a Service (annotation, flags, fallback) lives here too,
so it stays pure and testable; posting Events about bad choices is the caller's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .model import F_SCHED1, F_SCHED2, SCHED_FLAGS

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ipvsproxy.schedulers"
ANNOTATION = "ipvsproxy.io/scheduler"
FLAGS_ANNOTATION = "ipvsproxy.io/scheduler-flags"


@dataclass(frozen=True, slots=True)
class Scheduler:
    """One IPVS scheduler: its name, kernel module and the flags it accepts."""

    name: str
    module: str
    flags: Mapping[str, int] = field(default_factory=dict)
    description: str = ""
    builtin: bool = True


def _sched(name: str, description: str, flags: Mapping[str, int] | None = None) -> Scheduler:
    return Scheduler(name, f"ip_vs_{name}", dict(flags or {}), description)


BUILTIN: tuple[Scheduler, ...] = (
    _sched("rr", "round robin"),
    _sched("wrr", "weighted round robin"),
    _sched("lc", "least connection"),
    _sched("wlc", "weighted least connection"),
    _sched("sh", "source hashing", {"sh-fallback": F_SCHED1, "sh-port": F_SCHED2}),
    _sched("dh", "destination hashing"),
    _sched("mh", "maglev hashing", {"mh-fallback": F_SCHED1, "mh-port": F_SCHED2}),
    _sched("sed", "shortest expected delay"),
    _sched("nq", "never queue"),
    _sched("lblc", "locality-based least connection"),
    _sched("lblcr", "locality-based least connection with replication"),
    _sched("fo", "weighted failover"),
    _sched("ovf", "weighted overflow"),
)


class Choice(NamedTuple):
    """The scheduler a Service gets, and why it is not the one asked for."""

    scheduler: str
    flags: int
    problem: str | None = None


class Registry:
    """Schedulers by name; built-ins plus any registered plug-ins."""

    def __init__(self, schedulers: Iterable[Scheduler] = BUILTIN) -> None:
        self._by_name: dict[str, Scheduler] = {}
        for s in schedulers:
            self.add(s)

    def add(self, scheduler: Scheduler) -> None:
        self._by_name[scheduler.name] = scheduler

    def get(self, name: str) -> Scheduler | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Any:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return list(self._by_name)

    def load_plugins(self) -> list[str]:
        """Add schedulers from the entry-point group; returns one warning per bad plug-in."""
        problems = []
        for name, loaded in _plugins():
            try:
                if isinstance(loaded, Exception):  # its entry point did not load
                    problems.append(f"scheduler plug-in {name!r} ignored: {loaded}")
                    continue
                self.add(_coerce(loaded))
            except Exception as exc:  # a broken plug-in must not stop the agent
                problems.append(f"scheduler plug-in {name!r} ignored: {exc}")
        for p in problems:
            log.warning(p)
        return problems

    def choose(
        self,
        requested: str | None,
        flags_text: str | None,
        default: str,
        usable: Callable[[str], bool] | None = None,
    ) -> Choice:
        """Pick the scheduler for one Service from its annotations.

        An unknown scheduler, a flag that does not belong to it, or a scheduler
        the kernel cannot load falls back to ``default`` (with no flags) and
        returns the reason, so the caller can warn once and count it.
        """
        name = (requested or "").strip() or default
        sched = self._by_name.get(name)
        if sched is None:
            known = ", ".join(self._by_name)
            return Choice(default, 0, f"unknown scheduler {name!r} (known: {known})")
        if usable is not None and not usable(sched.name):
            return Choice(default, 0, f"scheduler {name!r}: kernel module {sched.module} unavailable")
        bits = 0
        for flag in filter(None, (f.strip() for f in (flags_text or "").split(","))):
            if flag not in sched.flags:
                allowed = ", ".join(sched.flags) or "none"
                return Choice(
                    default, 0, f"flag {flag!r} does not belong to scheduler {name!r} "
                    f"(allowed: {allowed})"
                )
            bits |= sched.flags[flag]
        return Choice(sched.name, bits)


def _coerce(obj: Any) -> Scheduler:
    sched = _coerce_any(obj)
    # Only the scheduler flag bits: others are persistence, HASHED or our ownership mark.
    bad = {k: v for k, v in sched.flags.items() if not v or v & ~SCHED_FLAGS}
    if bad:
        raise ValueError(f"flags {bad} are not IPVS scheduler flags (SCHED1 {F_SCHED1:#x}, SCHED2 {F_SCHED2:#x})")
    return sched


def _coerce_any(obj: Any) -> Scheduler:
    if isinstance(obj, Scheduler):
        return Scheduler(obj.name, obj.module, dict(obj.flags), obj.description, builtin=False)
    if callable(obj) and not isinstance(obj, Mapping):
        obj = obj()
        if isinstance(obj, Scheduler):
            return _coerce_any(obj)
    if isinstance(obj, Mapping) and isinstance(obj.get("name"), str):
        name = obj["name"]
        flags = {str(k): int(v) for k, v in dict(obj.get("flags") or {}).items()}
        return Scheduler(
            name, str(obj.get("module") or f"ip_vs_{name}"), flags, str(obj.get("description", "")),
            builtin=False,
        )
    raise TypeError("entry point must give a Scheduler or a mapping with 'name'")


def entry_points(*, group: str) -> Iterable[Any]:
    """The installed entry points of a group (importlib.metadata imported on first use)."""
    from importlib.metadata import entry_points as installed

    return installed(group=group)


# The plug-ins found by one scan of the installed packages: (entry point name, what it loaded or
# why it could not). A process builds several registries (the flags' check, the dataplane, the
# agent); the scan walks every installed distribution's metadata, ~0.5 s each in the emulated
# test VM, so it runs once per process.
_scanned: list[tuple[str, Any]] | None = None


def _plugins() -> list[tuple[str, Any]]:
    global _scanned
    if _scanned is None:
        found: list[tuple[str, Any]] = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                found.append((ep.name, ep.load()))
            except Exception as exc:  # reported by each registry that loads the plug-ins
                found.append((ep.name, exc))
        _scanned = found
    return _scanned


def default_registry() -> Registry:
    """Built-ins plus installed plug-ins."""
    reg = Registry()
    reg.load_plugins()
    return reg
