"""Host tests for ipvsproxy.dataplane.nft_wire: key decoding for every set shape
the companion uses, the dump request's layout, and a whole dump answered by a
fake netfilter peer (several messages, an interval set, errors). The kernel test
(tests/kernel/test_nft.py) checks the same reads against nft's own listing."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from ipvsproxy.dataplane.nft import SETS, _elem_from_json
from ipvsproxy.dataplane.nft_wire import NftWire, decode_key

NLMSG = struct.Struct("=IHHII")
NEWSETELEM = (10 << 8) | 12
GETSETELEM = (10 << 8) | 13
HAIRPIN = ("ipv4_addr", "inet_proto", "inet_service", "ipv4_addr")


def v4(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, a)


def pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0)) + pad(payload)


def elem(key: bytes, key_end: bytes | None = None, flags: int = 0) -> bytes:
    body = attr(1, attr(1, key), nested=True)
    if flags:
        body += attr(3, struct.pack(">I", flags))
    if key_end is not None:
        body += attr(10, attr(1, key_end), nested=True)
    return attr(1, body, nested=True)


def reply(seq: int, elems: list[bytes]) -> bytes:
    body = struct.pack("=BBH", 1, 0, 0) + attr(1, b"ipvsproxy\0") + attr(2, b"x\0") + attr(3, b"".join(elems), True)
    return NLMSG.pack(16 + len(body), NEWSETELEM, 2, seq, 0) + body


def done(seq: int, err: int = 0) -> bytes:
    return NLMSG.pack(20, 3 if not err else 2, 2, seq, 0) + struct.pack("=i", -err)


def test_decode_keys_of_every_shape() -> None:
    assert decode_key(("ipv4_addr",), v4("198.18.0.1")) == ("198.18.0.1",)
    assert decode_key(("ipv6_addr",), socket.inet_pton(socket.AF_INET6, "2001:2::1")) == ("2001:2::1",)
    key = v4("10.0.0.5") + bytes([6, 0, 0, 0]) + b"\x1f\x90\0\0" + v4("10.0.0.5")
    assert decode_key(HAIRPIN, key) == ("10.0.0.5", 6, 8080, "10.0.0.5")
    start = v4("10.0.0.1") + bytes([17, 0, 0, 0]) + b"\0\x35\0\0" + v4("192.168.0.0")
    end = v4("10.0.0.1") + bytes([17, 0, 0, 0]) + b"\0\x35\0\0" + v4("192.168.255.255")
    assert decode_key(HAIRPIN, start, end, cidr=3) == ("10.0.0.1", 17, 53, "192.168.0.0/16")
    odd = v4("10.0.0.1") + bytes([17, 0, 0, 0]) + b"\0\x35\0\0" + v4("192.168.0.4")
    assert decode_key(HAIRPIN, start, odd, cidr=3) == ("10.0.0.1", 17, 53, "192.168.0.0-192.168.0.4")


class FakeNetfilter:
    """Answers each GETSETELEM dump with canned messages, split over two datagrams."""

    def __init__(self, batches: list[list[bytes]], err: int = 0) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.batches, self.err = batches, err
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                data = self.theirs.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.requests.append(data)
            seq = NLMSG.unpack_from(data)[3]
            if self.err:
                self.theirs.send(done(seq, self.err))
                continue
            for batch in self.batches:
                self.theirs.send(b"".join(reply(seq, [e]) for e in batch))
            self.theirs.send(done(seq))

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def peer() -> Iterator[FakeNetfilter]:
    p = FakeNetfilter([
        [elem(v4("10.96.0.0")), elem(v4("10.112.0.0"), flags=1)],  # 10.96.0.0/12: start, then end
        [elem(v4("198.18.3.0")), elem(v4("198.18.5.0"), flags=1), elem(v4("255.255.255.0"))],  # the last: open
    ])
    yield p
    p.close()


def test_a_dump_request_and_an_interval_set_over_several_messages(peer: FakeNetfilter) -> None:
    wire = NftWire.for_socket(peer.ours)
    got = wire.elements("inet", "ipvsproxy", "cluster4", ("ipv4_addr",), interval=True, cidr=0)
    assert got == {("10.96.0.0/12",), ("198.18.3.0-198.18.4.255",), ("255.255.255.0/24",)}
    ln, ty, flags, _, _ = NLMSG.unpack_from(peer.requests[0])
    assert (ty, flags & 0x300, ln) == (GETSETELEM, 0x300, len(peer.requests[0]))
    body = peer.requests[0][16:]
    assert body[:4] == struct.pack("=BBH", 1, 0, 0)  # NFPROTO_INET, version 0
    assert b"ipvsproxy\0" in body and b"cluster4\0" in body


def test_a_missing_set_is_an_error_naming_it() -> None:
    p = FakeNetfilter([], err=errno.ENOENT)
    try:
        wire = NftWire.for_socket(p.ours)
        with pytest.raises(OSError, match="list set inet ipvsproxy vips4: No such file") as info:
            wire.elements("inet", "ipvsproxy", "vips4", ("ipv4_addr",))
        assert info.value.errno == errno.ENOENT
    finally:
        p.close()


def test_the_companion_reads_elements_through_its_reader_on_full_syncs_only() -> None:
    from tests.nftdriver import Firewall
    from tests.unit.test_nft import BASE, FakeNft, cfg, state

    kernel = FakeNft()
    asked: list[str] = []

    def reader(spec):  # type: ignore[no-untyped-def]
        asked.append(spec.name)
        return {_elem_from_json(e, spec) for e in kernel.elems(spec.name)}

    fw = Firewall(cfg(), nft=kernel, elements=reader)
    fw.sync_state(state(*BASE))
    kernel.elems("vips4").clear()  # drift
    asked.clear()
    listings = sum(1 for d in kernel.docs if any("list" in c and "table" in c["list"] for c in d["nftables"]))
    assert fw.sync_state(state(*BASE), scope=set()) == 0 and asked == []  # incremental: no read at all
    assert fw.sync_state(state(*BASE)) == 1  # full: every set read through the reader, drift repaired
    assert sorted(asked) == sorted(s.name for s in SETS)
    after = sum(1 for d in kernel.docs if any("list" in c and "table" in c["list"] for c in d["nftables"]))
    assert after == listings  # the periodic drift check lists no table: the reader is enough
    assert fw.elements()["vips4"] == {("10.96.0.10",)}
