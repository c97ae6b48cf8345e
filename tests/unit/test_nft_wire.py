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
from ipvsproxy.dataplane.nft_wire import NftWire, Unsent, decode_key, encode_key, key_decoder

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


def test_keys_encode_as_they_decode_for_every_set_without_ranges() -> None:
    samples = {"ipv4_addr": "10.96.0.10", "ipv6_addr": "fd00::a", "inet_proto": 17, "inet_service": 53}
    for spec in SETS:
        if spec.interval:
            continue
        value = tuple(samples[t] for t in spec.type)
        assert decode_key(spec.type, encode_key(spec.type, value)) == value, spec.name
    assert encode_key(HAIRPIN, ("10.0.0.5", 6, 8080, "10.0.0.5")) == (
        v4("10.0.0.5") + bytes([6, 0, 0, 0]) + b"\x1f\x90\0\0" + v4("10.0.0.5"))
    with pytest.raises(ValueError):
        encode_key(HAIRPIN, ("10.0.0.5", 6, 8080))


def test_the_one_unpack_decoder_reads_keys_as_the_field_by_field_one() -> None:
    samples = [{"ipv4_addr": "10.96.0.10", "ipv6_addr": "fd00::a", "inet_proto": 17, "inet_service": 53},
               {"ipv4_addr": "255.255.255.255", "ipv6_addr": "2001:db8::ffff:1", "inet_proto": 132,
                "inet_service": 65535},
               {"ipv4_addr": "0.0.0.0", "ipv6_addr": "::", "inet_proto": 0, "inet_service": 0}]
    for spec in SETS:
        if spec.interval:
            continue
        for sample in samples:
            value = tuple(sample[t] for t in spec.type)
            raw = encode_key(spec.type, value)
            # the field-by-field path (taken for a range's end), against the one made for the shape
            assert key_decoder(spec.type)(raw) == decode_key(spec.type, raw, raw) == value, spec.name


def test_elements_of_every_attribute_shape_come_out_of_a_page() -> None:
    hairpin = [v4(f"10.0.0.{i}") + bytes([6, 0, 0, 0]) + struct.pack(">H", 8080) + b"\0\0" + v4(f"10.0.0.{i}")
               for i in range(1, 4)]
    port = struct.pack(">H", 53)  # a key that is not a multiple of 4 bytes: padded in the message
    p = FakeNetfilter([[elem(hairpin[0]), elem(hairpin[1], flags=4)], [elem(hairpin[2])]])
    q = FakeNetfilter([[elem(port), elem(struct.pack(">H", 80), flags=4)]])
    try:
        pages = list(NftWire.for_socket(p.ours).element_pages("inet", "ipvsproxy", "hairpin4", HAIRPIN))
        assert sorted(e for page in pages if page for e in page) == [
            (f"10.0.0.{i}", 6, 8080, f"10.0.0.{i}") for i in range(1, 4)]
        got = NftWire.for_socket(q.ours).elements("inet", "t", "ports", ("inet_service",))
        assert got == {(53,), (80,)}
    finally:
        p.close()
        q.close()


def walk(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + 4 <= end:
        ln, ty = struct.unpack_from("=HH", data, off)
        yield ty & 0x3FFF, data[off + 4:off + ln]
        off += (ln + 3) & ~3


class FakeTables:
    """A netfilter peer that takes nf_tables batches of element changes as the kernel does:
    all or nothing, an error for a delete of a missing element, every message acknowledged."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sets: dict[str, set[bytes]] = {}
        self.batches: list[list[int]] = []  # message types of each batch received
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                data = self.theirs.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            msgs = []
            off = 0
            while off + 16 <= len(data):
                ln, ty, fl, seq, _ = NLMSG.unpack_from(data, off)
                msgs.append((ty, fl, seq, data[off + 20:off + ln]))
                off += (ln + 3) & ~3
            if msgs[0][0] == (10 << 8) | 13:  # GETSETELEM, one element each (NftWire.present)
                out = b""
                for _ty, fl, seq, body in msgs:
                    assert not fl & 0x300  # a GET, not a dump
                    a = dict(walk(body, 0, len(body)))
                    (_, e), = walk(a[3], 0, len(a[3]))
                    key = dict(walk(e, 0, len(e)))[1]
                    if dict(walk(key, 0, len(key)))[1] in self.sets.get(a[2].rstrip(b"\0").decode(), ()):
                        out += NLMSG.pack(20, (10 << 8) | 12, 0, seq, 0) + bytes(4)  # NEWSETELEM
                    else:
                        out += NLMSG.pack(36, 2, 0x100, seq, 0) + struct.pack("=i", -errno.ENOENT) + bytes(16)
                self.theirs.send(out)
                continue
            self.batches.append([m[0] for m in msgs])
            assert msgs[0][0] == 0x10 and msgs[-1][0] == 0x11  # BATCH_BEGIN ... BATCH_END
            assert data[16:20] == struct.pack("=BBH", 0, 0, socket.htons(10))  # res_id NFNL_SUBSYS_NFTABLES
            after = {k: set(v) for k, v in self.sets.items()}
            errs = []
            for ty, fl, seq, body in msgs[1:-1]:
                assert fl & 0x4  # NLM_F_ACK: every message is answered
                a = dict(walk(body, 0, len(body)))
                name = a[2].rstrip(b"\0").decode()
                keys = []
                for _, e in walk(a[3], 0, len(a[3])):  # LIST_ELEM { KEY { DATA_VALUE } }
                    key = dict(walk(e, 0, len(e)))[1]
                    keys.append(dict(walk(key, 0, len(key)))[1])
                err = 0
                have = after.setdefault(name, set())
                if ty == NEWSETELEM:
                    have.update(keys)
                elif any(k not in have for k in keys):
                    err = errno.ENOENT
                else:
                    have.difference_update(keys)
                errs.append((seq, err))
            if not any(e for _, e in errs):
                self.sets = after
            self.theirs.send(b"".join(NLMSG.pack(36, 2, 0x100, seq, 0) + struct.pack("=i", -e) + bytes(16)
                                      for seq, e in errs))

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def test_element_changes_go_as_one_all_or_nothing_batch() -> None:
    peer = FakeTables()
    try:
        wire = NftWire.for_socket(peer.ours)
        hairpins = [(f"10.1.{i // 250}.{i % 250}", 6, 80, f"10.1.{i // 250}.{i % 250}") for i in range(1000)]
        assert wire.write_elements("inet", "ipvsproxy", [
            (True, "hairpin4", HAIRPIN, hairpins), (True, "vips4", ("ipv4_addr",), [("10.96.0.1",)])]) == 1001
        assert peer.batches[0] == [0x10, NEWSETELEM, NEWSETELEM, NEWSETELEM, 0x11]  # 512 a message
        assert {decode_key(HAIRPIN, k) for k in peer.sets["hairpin4"]} == set(hairpins)
        # a delete of an element that is not there refuses the batch: the add before it is undone too
        with pytest.raises(OSError, match="delete element inet ipvsproxy vips4") as info:
            wire.write_elements("inet", "ipvsproxy", [(True, "vips4", ("ipv4_addr",), [("10.96.0.2",)]),
                                                      (False, "vips4", ("ipv4_addr",), [("10.96.0.3",)])])
        assert info.value.errno == errno.ENOENT
        assert peer.sets["vips4"] == {v4("10.96.0.1")}
        # add, then delete: accepted whether or not the element is there
        wire.write_elements("inet", "ipvsproxy", [(True, "vips4", ("ipv4_addr",), [("10.96.0.3",)]),
                                                  (False, "vips4", ("ipv4_addr",), [("10.96.0.3",), ("10.96.0.1",)])])
        assert peer.sets["vips4"] == set()
        assert wire.write_elements("inet", "ipvsproxy", [(True, "vips4", ("ipv4_addr",), [])]) == 0
        assert len(peer.batches) == 3  # nothing to send: no batch
    finally:
        peer.close()


def test_present_asks_for_each_element_and_tells_which_are_there() -> None:
    tables = FakeTables()
    try:
        wire = NftWire.for_socket(tables.ours)
        types = ("ipv4_addr", "inet_proto", "inet_service")
        there = [("10.96.0.1", 6, 80), ("10.96.0.2", 17, 53)]
        wire.write_elements("inet", "ipvsproxy", [(True, "services4", types, there)])
        asked = [there[0], ("10.96.0.3", 6, 443), there[1]]
        assert wire.present("inet", "ipvsproxy", "services4", types, asked) == [True, False, True]
        assert len(tables.batches) == 1  # the questions were no transaction
    finally:
        tables.close()


def test_a_batch_larger_than_the_socket_takes_is_unsent_and_nothing_is_applied() -> None:
    peer = FakeTables()
    try:
        peer.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        wire = NftWire.for_socket(peer.ours)
        many = [(f"10.2.{i // 250}.{i % 250}",) for i in range(5000)]
        with pytest.raises(Unsent):
            wire.write_elements("inet", "ipvsproxy", [(True, "vips4", ("ipv4_addr",), many)])
        assert peer.batches == [] and peer.sets == {}
        wire.write_elements("inet", "ipvsproxy", [(True, "vips4", ("ipv4_addr",), many[:10])])  # in step after
        assert len(peer.sets["vips4"]) == 10
    finally:
        peer.close()


@pytest.mark.parametrize("sndbuf", [None, 4096])
def test_the_companion_sends_element_changes_over_netlink_and_falls_back_to_nft(sndbuf: int | None) -> None:
    from ipvsproxy.dataplane.nft import NftFirewall
    from tests.nftdriver import Firewall
    from tests.unit.test_nft import BASE, FakeNft, cfg, state, svc

    peer = FakeTables()
    try:
        nft = FakeNft()
        fw = Firewall(cfg(), nft=nft)
        fw.sync_state(state(*BASE))  # a new table: structure, through nft
        assert isinstance(fw, NftFirewall) and fw.netlink_transactions == 0 and len(nft.transactions) == 1
        if sndbuf:
            peer.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        fw._wire, fw._use_wire = NftWire.for_socket(peer.ours), True  # a netlink socket to the fake
        more = [svc(f"10.97.{i // 250}.{i % 250 + 1}", 443, reals=((f"10.244.3.{i % 250}", 8443),))
                for i in range(1 if not sndbuf else 400)]
        assert fw.sync_state(state(*BASE, *more), scope={v.key for v in more}) > 0
        if not sndbuf:  # one batch over netlink, nft not started
            assert fw.netlink_transactions == 1 and len(nft.transactions) == 1
            assert {decode_key(("ipv4_addr",), k) for k in peer.sets["vips4"]} == {("10.97.0.1",)}
        else:  # too large for the socket: the same transaction through nft
            assert fw.netlink_transactions == 0 and len(nft.transactions) == 2 and peer.batches == []
            sent = {c["add"]["element"]["name"]: len(c["add"]["element"]["elem"]) for c in nft.transactions[1]}
            assert sent["vips4"] == 400 and sent["services4"] == 400
    finally:
        peer.close()
