"""Kernel tests for ipvsproxy.dataplane.link_wire (run inside the IPVS test VM).

The dummy interface's life (create, EEXIST on a taken name, mark, up, delete,
ENODEV after) and address dumps against the real rtnetlink, with `ip -j` as
the independent witness.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from ipvsproxy.dataplane.link_wire import LinkWire

pytestmark = pytest.mark.kernel

DEV, PEER = "linkwire0", "linkwire1"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def clean() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root (run inside the IPVS test VM)")
    for name in (DEV, PEER):
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    try:
        yield
    finally:
        for name in (DEV, PEER):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_a_dummy_is_created_marked_brought_up_and_deleted(clean: None) -> None:
    wire = LinkWire()
    try:
        assert wire.link(DEV) is None
        wire.add_dummy(DEV)
        link = wire.link(DEV)
        assert link is not None and (link.name, link.kind, link.alias) == (DEV, "dummy", None)
        assert link.index == socket.if_nametoindex(DEV)
        with pytest.raises(OSError) as taken:
            wire.add_dummy(DEV)
        assert taken.value.errno == errno.EEXIST
        wire.set_alias(link.index, "ipvsproxy")
        wire.set_up(link.index)
        shown = json.loads(ip("-j", "-d", "link", "show", "dev", DEV))[0]
        assert shown["ifalias"] == "ipvsproxy" and "UP" in shown["flags"]
        assert shown["linkinfo"]["info_kind"] == "dummy"
        again = wire.link(DEV)
        assert again is not None and again.alias == "ipvsproxy"
        wire.delete(link.index)
        assert wire.link(DEV) is None
        assert subprocess.run(["ip", "link", "show", DEV], capture_output=True).returncode != 0
        with pytest.raises(OSError) as gone:
            wire.set_up(link.index)
        assert gone.value.errno == errno.ENODEV and "cannot bring interface" in str(gone.value)
    finally:
        wire.close()


def test_kinds_and_addresses_read_as_ip_shows_them(clean: None) -> None:
    ip("link", "add", DEV, "type", "veth", "peer", "name", PEER)
    ip("address", "add", "198.18.61.1/32", "dev", DEV)
    ip("address", "add", "198.18.61.2", "peer", "198.18.61.3", "dev", PEER)  # IFA_LOCAL differs: a peer
    ip("address", "add", "2001:2:61::1/128", "dev", DEV, "nodad")
    ip("link", "set", DEV, "up")
    wire = LinkWire()
    try:
        link = wire.link(DEV)
        assert link is not None and link.kind == "veth"
        assert wire.link("lo") is not None and wire.link("lo").kind is None  # type: ignore[union-attr]
        v4 = {a.address for a in wire.addresses(socket.AF_INET, link.index)}
        assert v4 == {"198.18.61.1"}
        v6 = {a.address: a.flags for a in wire.addresses(socket.AF_INET6, link.index)}
        assert v6["2001:2:61::1"] & 0x02  # IFA_F_NODAD, as every bind of ours
        peer = [a for a in wire.addresses(socket.AF_INET) if a.index == socket.if_nametoindex(PEER)]
        assert [(a.local, a.address) for a in peer] == [("198.18.61.2", "198.18.61.3")]
        witness = set()
        for entry in json.loads(ip("-j", "address", "show")):
            witness |= {(entry["ifindex"], a["local"]) for a in entry.get("addr_info", [])}
        mine = {(a.index, a.local or a.address) for fam in (socket.AF_INET, socket.AF_INET6)
                for a in wire.addresses(fam)}
        assert mine == witness
    finally:
        wire.close()
