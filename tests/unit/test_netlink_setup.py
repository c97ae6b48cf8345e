"""NetlinkDataplane.setup() and its interface rules on the host, with every
kernel handle injected: a fake link handle (link_wire.LinkWire's surface),
recorded sysctls, a fake module tree, a stand-in IPVS wire. What the VM tests
prove against the kernel (tests/kernel/test_interface_safety.py), here for the
decisions: what is written, created, marked, refused, and in which order."""

from __future__ import annotations

import errno
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from ipvsproxy.config import AgentConfig
from ipvsproxy.dataplane.base import INTERFACE_MARK, DataplaneError, InterfaceRefused
from ipvsproxy.dataplane.ipvs_wire import Cmd, IPVSError
from ipvsproxy.dataplane.link_wire import AddrInfo, LinkInfo
from ipvsproxy.dataplane.netlink import STRICT_ARP, SYSCTLS, NetlinkDataplane
from ipvsproxy.dataplane.netlink_wire import Counters
from ipvsproxy.model import AF_INET, VirtualServer, VSKey
from ipvsproxy.plan import Op, OpKind
from tests.unit.test_kernel_modules import kernel


class FakeLinks:
    """The links of a node: index -> (name, kind, alias, up); records every change. Fails as
    link_wire.LinkWire does: OSError in the kernel's words, ENODEV for an index that is not there."""

    def __init__(self, links: dict[str, tuple[str | None, str | None]] | None = None,
                 refuse_add: bool = False) -> None:
        self.links: dict[int, dict[str, Any]] = {}
        for name, (kind, alias) in (links or {}).items():
            self._new(name, kind, alias)
        self.refuse_add = refuse_add
        self.calls: list[tuple[Any, ...]] = []

    def _new(self, name: str, kind: str | None, alias: str | None) -> int:
        idx = len(self.links) + 1
        self.links[idx] = {"name": name, "kind": kind, "alias": alias, "up": False}
        return idx

    def _get(self, index: int, what: str) -> dict[str, Any]:
        if index not in self.links:
            raise OSError(errno.ENODEV, f"cannot {what} interface {index}: No such device")
        return self.links[index]

    def link(self, name: str) -> LinkInfo | None:
        for i, link in self.links.items():
            if link["name"] == name:
                return LinkInfo(i, name, link["kind"], link["alias"])
        return None

    def add_dummy(self, name: str) -> None:
        self.calls.append(("add_dummy", name))
        if self.refuse_add:
            raise OSError(errno.EOPNOTSUPP, f"cannot create dummy interface {name}: Operation not supported: "
                          "Unknown device type")
        if self.link(name) is not None:
            raise OSError(errno.EEXIST, f"cannot create dummy interface {name}: File exists")
        self._new(name, "dummy", None)

    def set_alias(self, index: int, alias: str) -> None:
        self.calls.append(("set_alias", index, alias))
        self._get(index, "set the alias of")["alias"] = alias

    def set_up(self, index: int) -> None:
        self.calls.append(("set_up", index))
        self._get(index, "bring up")["up"] = True

    def delete(self, index: int) -> None:
        self.calls.append(("delete", index))
        self._get(index, "delete")
        del self.links[index]

    def addresses(self, family: int, index: int | None = None,
                  other_than: Collection[int | None] = ()) -> list[AddrInfo]:
        return []

    def close(self) -> None:
        pass


class FakeWire:
    """IPVS or addresses: records timeouts and requests; answers each with the
    errno `errors` names for its command (None: success)."""

    def __init__(self, errors: dict[Any, int] | None = None) -> None:
        self.config: tuple[int, int, int] | None = None
        self.executed: list[Any] = []
        self.errors = errors or {}
        self.counters = Counters()

    def set_config(self, tcp: int, tcpfin: int, udp: int) -> None:
        self.config = (tcp, tcpfin, udp)

    def execute(self, requests: Any) -> list[Any]:
        self.executed += requests
        out: list[Any] = []
        for req in requests:
            code = self.errors.get(getattr(req, "cmd", None))
            out.append(IPVSError(code, "refused", req) if code else None)
        return out

    def close(self) -> None:
        pass


class Sysctls:
    def __init__(self) -> None:
        self.written: dict[str, str] = {}

    def write(self, path: str, value: str) -> None:
        self.written[path] = value


def dataplane(tmp_path: Path, links: FakeLinks, wire: FakeWire | None = None,
              **cfg: Any) -> tuple[NetlinkDataplane, Sysctls, list[str]]:
    mods, probed = kernel(tmp_path, loaded=["ip_vs"], builtin=["dummy"], files=[],
                          loadable=["ip_vs_rr", "nf_conntrack"])
    sysctls = Sysctls()
    dp = NetlinkDataplane(AgentConfig(node_name="n", **cfg), modules=mods, sysctls=sysctls, links=links,
                          wire=wire or FakeWire(), addr=FakeWire(), conntrack=object())  # type: ignore[arg-type]
    return dp, sysctls, probed


def test_setup_loads_modules_sets_sysctls_and_creates_a_marked_dummy(tmp_path: Path) -> None:
    links = FakeLinks({"eth0": (None, None)})
    dp, sysctls, probed = dataplane(tmp_path, links, strict_arp=True, tcp_timeout=900, udp_timeout=60)
    dp.setup()
    assert probed == ["ip_vs_rr", "nf_conntrack"]  # ip_vs loaded, dummy built in: no modprobe for them
    assert sysctls.written == SYSCTLS | STRICT_ARP
    ours = links.link("ipvsproxy0")
    assert ours is not None
    assert links.links[ours.index] == {"name": "ipvsproxy0", "kind": "dummy", "alias": INTERFACE_MARK, "up": True}
    assert links.calls == [("add_dummy", "ipvsproxy0"), ("set_alias", ours.index, INTERFACE_MARK),
                           ("set_up", ours.index)]
    assert dp.wire.config == (900, 0, 60)  # type: ignore[attr-defined]


def test_without_strict_arp_or_timeouts_nothing_more_is_written(tmp_path: Path) -> None:
    dp, sysctls, _ = dataplane(tmp_path, FakeLinks())
    dp.setup()
    assert sysctls.written == SYSCTLS
    assert dp.wire.config is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("links", [
    {"ipvsproxy0": (None, None)},  # a physical device
    {"ipvsproxy0": ("veth", None)},
    {"ipvsproxy0": ("dummy", "nodelocaldns")},  # another tool's dummy
])
def test_an_interface_not_ours_is_refused_before_anything_changes(
        tmp_path: Path, links: dict[str, tuple[str | None, str | None]]) -> None:
    fake = FakeLinks(links)
    dp, sysctls, probed = dataplane(tmp_path, fake)
    with pytest.raises(InterfaceRefused, match="refusing to use"):
        dp.setup()
    assert sysctls.written == {} and probed == [] and fake.calls == []
    failures = dp.apply([Op(OpKind.BIND, address="198.18.0.1")])  # binds are refused too, one by one
    assert [f.op.kind for f in failures] == [OpKind.BIND] and "refusing to use" in failures[0].message


def test_an_unmarked_dummy_of_ours_is_adopted_and_marked(tmp_path: Path) -> None:
    links = FakeLinks({"kube-ipvs0": ("dummy", None)})
    dp, _, _ = dataplane(tmp_path, links, interface="kube-ipvs0")
    dp.setup()
    assert links.links[1]["alias"] == INTERFACE_MARK and links.links[1]["up"]
    assert not any(c[0] == "add_dummy" for c in links.calls)


def test_a_dummy_that_cannot_be_created_is_one_clear_error(tmp_path: Path) -> None:
    dp, _, _ = dataplane(tmp_path, FakeLinks(refuse_add=True))
    with pytest.raises(DataplaneError, match=r"^cannot create dummy interface ipvsproxy0: Operation not supported: "
                       r"Unknown device type \(is the 'dummy' kernel module available\?\)$"):
        dp.setup()


def test_the_kernel_s_refusals_go_through_the_shared_harmless_rule(tmp_path: Path) -> None:
    wire = FakeWire({Cmd.DEL_SERVICE: errno.ESRCH, Cmd.SET_SERVICE: errno.ESRCH})
    dp, _, _ = dataplane(tmp_path, FakeLinks(), wire=wire)
    key = VSKey(AF_INET, 6, "198.18.0.1", 80)
    assert dp.apply([Op(OpKind.DEL_VS, key)]) == [] and dp.counters.ops["del-vs"] == 1  # gone: done
    (failure,) = dp.apply([Op(OpKind.EDIT_VS, key, vs=VirtualServer(key))])
    assert failure.errno == errno.ESRCH and failure.message == "edit virtual server TCP 198.18.0.1:80: No such process"
