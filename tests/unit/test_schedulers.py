"""The scheduler registry: built-ins, flags, fallback, entry-point plug-ins."""

from __future__ import annotations

from typing import Any

import pytest

from ipvsproxy import schedulers
from ipvsproxy.model import F_SCHED1, F_SCHED2
from ipvsproxy.schedulers import BUILTIN, ENTRY_POINT_GROUP, Choice, Registry, Scheduler, default_registry

NAMES = ["rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "sed", "nq", "lblc", "lblcr", "fo", "ovf"]


def test_all_13_builtins_with_their_modules() -> None:
    reg = Registry()
    assert reg.names() == NAMES
    for name in NAMES:
        s = reg.get(name)
        assert s is not None and s.module == f"ip_vs_{name}" and s.builtin
        assert name in reg
    assert len(list(reg)) == 13 == len(BUILTIN)
    assert "nope" not in reg and reg.get("nope") is None


def test_only_sh_and_mh_take_flags() -> None:
    reg = Registry()
    assert {s.name for s in reg if s.flags} == {"sh", "mh"}


@pytest.mark.parametrize("sched,text,bits", [
    ("sh", "sh-fallback", F_SCHED1),
    ("sh", "sh-port", F_SCHED2),
    ("sh", "sh-fallback,sh-port", F_SCHED1 | F_SCHED2),
    ("sh", " sh-port , sh-fallback ,", F_SCHED1 | F_SCHED2),
    ("mh", "mh-fallback", F_SCHED1),
    ("mh", "mh-port", F_SCHED2),
    ("mh", "mh-port,mh-fallback", F_SCHED1 | F_SCHED2),
    ("sh", "", 0),
    ("sh", None, 0),
])
def test_flags_map_to_sched1_sched2(sched: str, text: str | None, bits: int) -> None:
    assert Registry().choose(sched, text, "rr") == Choice(sched, bits, None)


@pytest.mark.parametrize("requested", [None, "", "  "])
def test_no_annotation_gives_cluster_default(requested: str | None) -> None:
    assert Registry().choose(requested, None, "lc") == Choice("lc", 0, None)


def test_annotation_is_trimmed() -> None:
    assert Registry().choose(" wlc ", None, "rr") == Choice("wlc", 0, None)


@pytest.mark.parametrize("name", NAMES)
def test_each_builtin_can_be_chosen(name: str) -> None:
    assert Registry().choose(name, None, "rr") == Choice(name, 0, None)


def test_unknown_scheduler_falls_back_with_problem() -> None:
    c = Registry().choose("fastest", "sh-port", "lc")
    assert (c.scheduler, c.flags) == ("lc", 0)
    assert c.problem is not None and "fastest" in c.problem and "unknown" in c.problem


@pytest.mark.parametrize("sched,flags", [
    ("rr", "sh-port"), ("sh", "mh-port"), ("mh", "sh-fallback"), ("sh", "sh-port,bogus"), ("lc", "x"),
])
def test_foreign_flag_falls_back_to_default_with_problem(sched: str, flags: str) -> None:
    c = Registry().choose(sched, flags, "wrr")
    assert (c.scheduler, c.flags) == ("wrr", 0)
    assert c.problem is not None and "does not belong" in c.problem and sched in c.problem


def test_flags_without_scheduler_checked_against_default() -> None:
    c = Registry().choose(None, "sh-port", "rr")
    assert c.scheduler == "rr" and c.problem is not None
    assert Registry().choose(None, "sh-port", "sh") == Choice("sh", F_SCHED2, None)


def test_unusable_module_falls_back_with_problem() -> None:
    asked: list[str] = []

    def usable(name: str) -> bool:
        asked.append(name)
        return name != "mh"

    c = Registry().choose("mh", "mh-port", "rr", usable)
    assert (c.scheduler, c.flags) == ("rr", 0)
    assert c.problem is not None and "ip_vs_mh" in c.problem
    assert "mh" in asked
    assert Registry().choose("sh", None, "rr", usable) == Choice("sh", 0, None)


# ---- plug-ins ---------------------------------------------------------------------


class FakeEP:
    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value = name, value

    def load(self) -> Any:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


def _patch(monkeypatch: pytest.MonkeyPatch, eps: list[FakeEP]) -> list[str]:
    groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[FakeEP]:
        groups.append(group)
        return eps

    monkeypatch.setattr(schedulers, "entry_points", fake_entry_points)
    monkeypatch.setattr(schedulers, "_scanned", None)  # the process's one scan, redone on the fakes
    return groups


def test_plugin_scheduler_object_and_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = _patch(monkeypatch, [
        FakeEP("twos", Scheduler("twos", "ip_vs_twos", {"twos-x": F_SCHED1}, "random of two")),
        FakeEP("ring", {"name": "ring", "flags": {"ring-port": F_SCHED2}}),
        FakeEP("fact", lambda: Scheduler("fact", "ip_vs_fact")),
    ])
    reg = default_registry()
    assert groups == [ENTRY_POINT_GROUP] == ["ipvsproxy.schedulers"]
    twos, ring, fact = reg.get("twos"), reg.get("ring"), reg.get("fact")
    assert twos is not None and twos.module == "ip_vs_twos" and not twos.builtin
    assert ring is not None and ring.module == "ip_vs_ring" and ring.flags == {"ring-port": F_SCHED2}
    assert fact is not None and fact.module == "ip_vs_fact"
    assert reg.names()[:13] == NAMES
    assert reg.choose("twos", "twos-x", "rr") == Choice("twos", F_SCHED1, None)
    assert reg.choose("ring", "ring-port", "rr") == Choice("ring", F_SCHED2, None)
    assert reg.choose("ring", "twos-x", "rr").problem is not None


@pytest.mark.parametrize("value", [
    ImportError("no module named foo"),
    RuntimeError("boom"),
    42,
    {"module": "ip_vs_x"},
    {"name": "bad", "flags": {"f": "not-an-int"}},
    {"name": "bad", "flags": ["f"]},
    {"name": "owns", "flags": {"x": 0x20}},  # would fake the ownership mark
    {"name": "pers", "flags": {"x": 0x01}},  # would fake persistence
    Scheduler("hashed", "ip_vs_hashed", {"x": 0x02}),
])
def test_broken_plugin_reported_not_raised(monkeypatch: pytest.MonkeyPatch, value: Any) -> None:
    _patch(monkeypatch, [FakeEP("broken", value), FakeEP("good", {"name": "good"})])
    reg = Registry()
    problems = reg.load_plugins()
    assert len(problems) == 1 and "'broken'" in problems[0]
    assert "good" in reg
    assert reg.names()[:13] == NAMES and len(reg.names()) == 14


def test_the_installed_packages_are_scanned_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = _patch(monkeypatch, [FakeEP("good", {"name": "good"}), FakeEP("broken", RuntimeError("boom"))])
    regs = [default_registry() for _ in range(3)]
    assert groups == [ENTRY_POINT_GROUP]  # one scan for three registries
    assert all("good" in reg for reg in regs)
    assert Registry().load_plugins() == ["scheduler plug-in 'broken' ignored: boom"]  # reported each time


def test_no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch(monkeypatch, [])
    reg = Registry()
    assert reg.load_plugins() == [] and reg.names() == NAMES
