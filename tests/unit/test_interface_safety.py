"""Which interfaces ipvsproxy may use, and the kernel's address spelling
(issue 14 items 1 and 4; the kernel side is tests/kernel/test_interface_safety.py)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from click.testing import CliRunner

from ipvsproxy.cli import common
from ipvsproxy.cli.main import cli, register
from ipvsproxy.dataplane.base import INTERFACE_MARK, InterfaceRefused
from ipvsproxy.dataplane.netlink import _kernel_link_local, interface_refusal
from ipvsproxy.model import canonical_ip

register()


@pytest.mark.parametrize(("name", "kind", "alias"), [
    ("ipvsproxy0", "dummy", INTERFACE_MARK),  # ours
    ("anything", "dummy", INTERFACE_MARK),  # handed over by the operator
    ("ipvsproxy0", "dummy", None),  # made by an older version: adopted
    ("ipvsproxy-b", "dummy", None),
    ("kube-ipvs0", "dummy", None),  # kube-proxy's, while migrating
])
def test_our_dummies_are_accepted(name: str, kind: str, alias: str | None) -> None:
    assert interface_refusal(name, kind, alias) is None


@pytest.mark.parametrize(("name", "kind", "alias", "says"), [
    ("eth9", None, None, "eth9 with no kind (a physical device)"),
    ("ipvsproxy0", None, None, "with no kind"),  # a NIC renamed ipvsproxy0 is still a NIC
    ("h14veth0", "veth", None, "of kind veth"),
    ("br0", "bridge", INTERFACE_MARK, "of kind bridge"),  # the mark on a non-dummy counts for nothing
    ("ipvsproxy0", "vxlan", None, "of kind vxlan"),
    ("nodelocaldns", "dummy", None, "did not create it (no alias"),
    ("kube-ipvs1", "dummy", None, "did not create it (no alias"),
    ("ipvsproxy0", "dummy", "node-local dns", "did not create it (alias 'node-local dns'"),
])
def test_anything_else_is_refused_naming_it_and_its_kind(name: str, kind: str | None, alias: str | None,
                                                         says: str) -> None:
    msg = interface_refusal(name, kind, alias)
    assert msg is not None and msg.startswith(f"--interface {name}: refusing") and says in msg


class RefusingDataplane:
    """What NetlinkDataplane does on a NIC: the first look at the interface raises."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def setup(self) -> None:
        raise InterfaceRefused(interface_refusal("eth9", None, None) or "")

    def observe(self) -> Any:
        raise InterfaceRefused(interface_refusal("eth9", None, None) or "")

    def apply(self, ops: Any) -> list[Any]:
        self.touched.append("apply")
        return []

    def local_addresses(self) -> set[str]:
        raise InterfaceRefused(interface_refusal("eth9", None, None) or "")

    def remove_interface(self) -> bool:
        self.touched.append("remove_interface")
        return True

    def close(self) -> None:
        pass


@pytest.mark.parametrize("args", [["cleanup", "--interface", "eth9"],
                                  ["run", "--once", "--interface", "eth9"],
                                  ["run", "--once", "--dry-run", "--interface", "eth9"]])
def test_the_cli_turns_a_refusal_into_exit_2(args: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    dp = RefusingDataplane()
    monkeypatch.setattr(common, "open_dataplane", lambda kind, cfg, **kw: dp)
    monkeypatch.setattr(common, "open_firewall", lambda kind, cfg: None)
    f = tmp_path / "c.yaml"
    f.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    extra = [] if args[0] == "cleanup" else ["--from-file", str(f), "--state-dir", str(tmp_path),
                                              "--healthz-bind-address", "", "--metrics-bind-address", ""]
    r = CliRunner().invoke(cli, [*args, *extra])
    assert r.exit_code == 2, r.output
    assert "ipvsproxy: error: --interface eth9: refusing" in r.stderr and "Traceback" not in r.stderr
    assert dp.touched == []


@pytest.mark.parametrize(("given", "kernel"), [
    ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),
    ("::ffff:a00:1", "::ffff:10.0.0.1"),  # Python 3.11's own spelling of it
    ("::FFFF:0A00:0001", "::ffff:10.0.0.1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1%eth0"),  # the scope is kept, for objects.py to refuse
    (" 10.0.0.1 ", "10.0.0.1"),
])
def test_canonical_ip_spells_addresses_as_the_kernel_does(given: str, kernel: str) -> None:
    assert canonical_ip(given) == kernel


def test_only_the_kernels_own_link_local_address_is_skipped() -> None:
    assert _kernel_link_local("fe80::a8c1:abff:fe12:3456", 0x80)  # permanent, DAD done: the kernel's
    assert not _kernel_link_local("fe80::142:1", 0x82)  # we bind with IFA_F_NODAD
    assert not _kernel_link_local("2001:2::1", 0)


@pytest.mark.parametrize("given", [
    "10.0.0.1", "0.0.0.0", "010.0.0.1", "1.2.3.04", "1.2.3", "256.1.1.1", "0x1.2.3.4", "\u0661.2.3.4",
    " 1.2.3.4", "1.2.3.4\n", "::", "::1", "2001:DB8::0001", "1::2::3", "1:2:3:4:5:6:7:8:9", "::ffff:1.2.3.4",
    "::ffff:01.2.3.4", " ::1", "fe80::1%eth0", "", "abc", "1.2.3.4\x00",
])
def test_canonical_ip_fast_path_answers_as_ipaddress_does(given: str) -> None:
    """The inet_pton fast path gives the slow path's answer, or the slow path's error."""
    try:
        ip = ipaddress.ip_address(given.strip())
        want: str | None = str(ip) if ip.version == 4 else (
            socket.inet_ntop(socket.AF_INET6, ip.packed) + (f"%{ip.scope_id}" if ip.scope_id else ""))
    except ValueError:
        want = None
    if want is None:
        with pytest.raises(ValueError):
            canonical_ip(given)
    else:
        assert canonical_ip(given) == want
