"""Kernel modules compiled in count as present (issue 14 item 6).

With ``CONFIG_IP_VS_LC=y`` there is no ``/sys/module/ip_vs_lc`` (only modules
with parameters appear there), so looking only at sysfs after ``modprobe``
called the scheduler unavailable and every Service asking for it got an
InvalidScheduler Event from every node. These tests stand in a kernel with
fake sysfs and /lib/modules trees and a recording modprobe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.netlink import KernelModules, NetlinkDataplane


def kernel(tmp_path: Path, loaded: list[str], builtin: list[str], files: list[str],
           loadable: list[str] | None = None) -> tuple[KernelModules, list[str]]:
    """A kernel whose modprobe makes `loadable` modules appear in sysfs."""
    sysfs, lib = tmp_path / "sys" / "module", tmp_path / "lib"
    sysfs.mkdir(parents=True)
    lib.mkdir()
    for m in loaded:
        (sysfs / m).mkdir()
    (lib / "modules.builtin").write_text("".join(f"kernel/net/netfilter/ipvs/{m}.ko\n" for m in builtin))
    (lib / "modules.dep").write_text("".join(f"kernel/net/netfilter/ipvs/{m}.ko.xz: kernel/ip_vs.ko.xz\n"
                                             for m in files))
    probed: list[str] = []

    def modprobe(name: str) -> None:
        probed.append(name)
        if name in (loadable or []):
            (sysfs / name).mkdir()

    return KernelModules(str(sysfs), str(lib), modprobe), probed


def test_a_built_in_module_is_there_without_modprobe(tmp_path: Path) -> None:
    mods, probed = kernel(tmp_path, loaded=["ip_vs"], builtin=["ip_vs_lc", "ip_vs_rr"], files=[])
    assert mods.load("ip_vs_lc") and mods.load("ip_vs_rr")
    assert mods.available("ip_vs_lc") and mods.builtin("ip_vs_lc") and not mods.loaded("ip_vs_lc")
    assert probed == []  # nothing to load


def test_module_files_are_loaded_and_missing_ones_are_not_there(tmp_path: Path) -> None:
    mods, probed = kernel(tmp_path, loaded=[], builtin=[], files=["ip_vs_sh", "ip_vs_mh"], loadable=["ip_vs_sh"])
    assert mods.available("ip_vs_sh") and not mods.builtin("ip_vs_sh")
    assert mods.load("ip_vs_sh")
    assert not mods.load("ip_vs_mh")  # listed, but modprobe failed
    assert not mods.available("ip_vs_nope") and not mods.load("ip_vs_nope")
    assert not mods.load("../etc")  # never handed to modprobe
    assert probed == ["ip_vs_sh", "ip_vs_mh", "ip_vs_nope"]


def test_a_kernel_without_an_index_has_only_what_sysfs_shows(tmp_path: Path) -> None:
    mods = KernelModules(str(tmp_path / "sys"), str(tmp_path / "nowhere"), lambda name: None)
    assert not mods.available("ip_vs_lc") and not mods.load("ip_vs_lc")


def _dataplane(mods: KernelModules, load_modules: bool) -> NetlinkDataplane:
    """The dataplane's module logic without its netlink sockets (no IPVS on the host)."""
    none: Any = object()  # no socket is touched by scheduler_usable
    return NetlinkDataplane(AgentConfig(node_name="n", load_modules=load_modules), modules=mods,
                            links=none, wire=none, addr=none, conntrack=none)


def test_a_built_in_scheduler_is_usable_whether_or_not_the_agent_loads_modules(tmp_path: Path) -> None:
    mods, probed = kernel(tmp_path, loaded=["ip_vs"], builtin=["ip_vs_lc"], files=["ip_vs_sh"])
    for load in (True, False):
        dp = _dataplane(mods, load)
        assert dp.scheduler_usable("lc")
        assert dp.scheduler_usable("sh") is (not load)  # a module file: usable once loaded (modprobe fails here)
        assert not dp.scheduler_usable("mh")
    assert probed == ["ip_vs_sh", "ip_vs_mh"]
