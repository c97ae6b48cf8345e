"""Reading nftables set elements straight from the kernel over netlink.

Why this exists: the nftables companion (:mod:`.nft`) must compare the
kernel's set contents with what it wants at every full sync, to repair drift.
``nft -j list table`` does that job at a cost that grows badly with the
table: 0.5 s for 17,000 elements on the host and more than the 60 s limit in
the emulated test VM (nft turns every element into expressions and JSON; the
4-field ``hairpin`` set alone is three quarters of it). The kernel's own dump
of the same elements is cheap; decoding it here with :mod:`struct` is about a
microsecond per element.

Element changes go the same way (``write_elements``): an incremental sync's
adds and deletes as one nf_tables batch (``NFNL_MSG_BATCH_BEGIN`` ...
``NFNL_MSG_BATCH_END``, all or nothing, as ``nft -f`` sends them). Starting
``nft`` for a change of two elements costs its process start and its cache
fill (3-12 ms on the host, ~160 ms in the emulated test VM, the bulk of a
one-endpoint change there); the batch costs one send. Table structure and
interval sets (ranges are split into start and end elements) stay with
``nft -j -f -``.

One ``NFT_MSG_GETSETELEM`` dump per set (``include/uapi/linux/netfilter/
nf_tables.h``): every element carries its key as raw bytes (``NFTA_DATA_VALUE``
inside ``NFTA_SET_ELEM_KEY``); a concatenation puts each field in a 32-bit
aligned slot; an interval set without concatenation stores each range as a
start element and an end element (``NFT_SET_ELEM_INTERVAL_END``, the first
address after the range); a concatenation with intervals carries the range
ends in ``NFTA_SET_ELEM_KEY_END``. Elements come back in the form the
companion counts them: addresses as text, protocol and port as numbers, and
the field that holds a CIDR as ``"a.b.c.d/n"``.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .netlink_wire import (
    I32,
    NETLINK_NETFILTER,
    NFGEN,
    NLA,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG,
    NetlinkWire,
    attrs,
    error_text,
    nfnl_message,
    nla,
)

__all__ = ["NftWire", "Unsent", "decode_key", "encode_key", "ElementChange", "FIELD_SIZES"]

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETSETELEM = 13
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY_END = 1, 3, 10
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 0x1
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NLMSG_ERROR = 2
NLM_F_ACK, NLM_F_CREATE = 0x4, 0x400
NLA_F_NESTED = 0x8000
# Elements per NEWSETELEM/DELSETELEM message: their list is one attribute, at most 64 KiB
# (an IPv6 hairpin element takes 52 bytes of it).
ELEMS_PER_MESSAGE = 512
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}

_BE32 = struct.Struct(">I")
_KEY_ONLY = struct.Struct("=HHHHHH")  # an element's, its key's and the key value's attribute headers
FIELD_SIZES = {"ipv4_addr": 4, "ipv6_addr": 16, "inet_proto": 1, "inet_service": 2}

Elem = tuple[Any, ...]
# One command of a transaction: add (True) or delete (False) these elements (tuples of the
# set's key fields, as decode_key gives them) in the set of that name, whose key fields are `types`.
ElementChange = tuple[bool, str, Sequence[str], Iterable[Elem]]


def _value(kind: str, raw: bytes) -> Any:
    if kind == "ipv4_addr":
        return socket.inet_ntop(socket.AF_INET, raw)
    if kind == "ipv6_addr":
        return socket.inet_ntop(socket.AF_INET6, raw)  # the kernel's spelling, as model.canonical_ip writes it
    if kind == "inet_proto":
        return raw[0]
    if kind == "inet_service":
        return int.from_bytes(raw[:2], "big")
    raise ValueError(f"set field type {kind!r} not handled")


def _fields(types: Sequence[str], data: bytes) -> list[bytes]:
    """Split a key into its fields (a concatenation aligns each field to 32 bits)."""
    if len(types) == 1:
        return [data[:FIELD_SIZES[types[0]]]]
    out, off = [], 0
    for kind in types:
        size = FIELD_SIZES[kind]
        out.append(data[off:off + size])
        off += (size + 3) & ~3
    return out


class Unsent(OSError):
    """A batch that did not reach the kernel (larger than the socket takes): nothing applied."""


def _raw(kind: str, value: Any) -> bytes:
    if kind == "ipv4_addr":
        return socket.inet_pton(socket.AF_INET, value)
    if kind == "ipv6_addr":
        return socket.inet_pton(socket.AF_INET6, value)
    if kind == "inet_proto":
        return bytes((value,))
    if kind == "inet_service":
        return int(value).to_bytes(2, "big")
    raise ValueError(f"set field type {kind!r} not handled")


def encode_key(types: Sequence[str], elem: Elem) -> bytes:
    """An element's key as the kernel holds it (decode_key's inverse, single values only:
    no ranges). A concatenation pads each field to 32 bits."""
    if len(types) != len(elem):
        raise ValueError(f"element {elem!r} does not have the set's {len(types)} fields")
    if len(types) == 1:
        return _raw(types[0], elem[0])
    out = b""
    for kind, value in zip(types, elem, strict=True):
        raw = _raw(kind, value)
        out += raw + b"\0" * (-len(raw) % 4)
    return out


def _span(kind: str, lo: bytes, hi: bytes) -> str:
    """A range of addresses as the companion writes it: one CIDR, else 'lo-hi'."""
    cls = ipaddress.IPv4Address if kind == "ipv4_addr" else ipaddress.IPv6Address
    first, last = cls(lo), cls(hi)
    nets = list(ipaddress.summarize_address_range(first, last))
    return str(nets[0]) if len(nets) == 1 else f"{first}-{last}"


_FIELD_CODES = {"ipv4_addr": "4s", "ipv6_addr": "16s", "inet_proto": "B", "inet_service": "H"}
_FAMILIES = {"ipv4_addr": socket.AF_INET, "ipv6_addr": socket.AF_INET6}


@functools.lru_cache(maxsize=64)
def key_decoder(types: tuple[str, ...]) -> Callable[[bytes], Elem]:
    """decode_key for one set's single-value keys (no range end, no CIDR field), made once per
    key shape: one struct unpack and an inet_ntop per address field, not a slice and a
    conversion per field (the drift check reads every element of the table: ~190,000 at
    10,000 Services)."""
    fmt = ">" + "".join(_FIELD_CODES[kind] + ("x" * (-FIELD_SIZES[kind] % 4) if len(types) > 1 else "")
                        for kind in types)
    unpack = struct.Struct(fmt).unpack_from
    addrs = [(i, _FAMILIES[kind]) for i, kind in enumerate(types) if kind in _FAMILIES]
    ntop = socket.inet_ntop
    if len(types) == 1 and addrs:
        family = addrs[0][1]
        return lambda raw: (ntop(family, unpack(raw)[0]),)

    def decode(raw: bytes) -> Elem:
        values = list(unpack(raw))
        for i, family in addrs:
            values[i] = ntop(family, values[i])
        return tuple(values)

    return decode


def decode_key(types: Sequence[str], key: bytes, key_end: bytes | None = None, cidr: int | None = None) -> Elem:
    """One element's key (and range end, for a concatenation with intervals)."""
    if key_end is None and cidr is None:
        return key_decoder(tuple(types))(key)
    starts = _fields(types, key)
    ends = _fields(types, key_end) if key_end is not None else starts
    out: list[Any] = []
    for i, kind in enumerate(types):
        if i == cidr:
            out.append(_span(kind, starts[i], ends[i]))
        else:
            out.append(_value(kind, starts[i]))
    return tuple(out)


def _intervals(kind: str, bounds: list[tuple[bytes, bool]]) -> set[Elem]:
    """Start and end elements of a plain interval set -> one element per range."""
    width = FIELD_SIZES[kind]
    top = (1 << (8 * width)) - 1
    points = sorted((int.from_bytes(raw[:width], "big"), not end) for raw, end in bounds)  # ends first
    out: set[Elem] = set()
    start: int | None = None
    for value, is_start in points:
        if is_start:
            start = value
        elif start is not None:
            out.add((_span(kind, start.to_bytes(width, "big"), (value - 1).to_bytes(width, "big")),))
            start = None
    if start is not None:
        out.add((_span(kind, start.to_bytes(width, "big"), top.to_bytes(width, "big")),))
    return out


class NftWire(NetlinkWire):
    """A netfilter netlink socket that dumps the elements of nftables sets."""

    def __init__(self) -> None:
        self._open(NETLINK_NETFILTER, 1, True)

    def __enter__(self) -> NftWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def for_socket(cls, sock: socket.socket) -> NftWire:
        """Wrap an already-open socket (tests, fakes)."""
        self = cls.__new__(cls)
        self._setup(sock, 1, True)
        return self

    def elements(self, family: str, table: str, name: str, types: Sequence[str], *,
                 interval: bool = False, cidr: int | None = None) -> set[Elem]:
        """Every element of set ``family table name`` whose key fields are ``types``.

        Raises OSError (ENOENT when the table or set does not exist).
        """
        request, decode, what = self._element_dump(family, table, name)
        if interval and len(types) == 1:  # start and end flags pair up across the whole dump
            raw = [e for batch in self.dump(request, decode, what) for e in batch]
            return _intervals(types[0], [(key, bool(flags & NFT_SET_ELEM_INTERVAL_END)) for key, _, flags in raw])
        out: set[Elem] = set()
        for page in self.element_pages(family, table, name, types, cidr=cidr):
            if page is None:
                out.clear()
            else:
                out.update(page)
        return out

    def element_pages(self, family: str, table: str, name: str, types: Sequence[str], *,
                      cidr: int | None = None) -> Iterator[list[Elem] | None]:
        """The elements of a set that is not a plain interval set, a page per receive as the
        kernel fills the dump (None: it restarted, elements come again; `NetlinkWire.pages`).
        Read on a socket of its own: nothing else can be read on it meanwhile."""
        request, decode, what = self._element_dump(family, table, name)
        fast = key_decoder(tuple(types)) if cidr is None else None
        for page in self.pages(request, decode, what):
            yield None if page is None else [
                fast(key) if fast is not None and key_end is None else decode_key(types, key, key_end, cidr)
                for batch in page for key, key_end, _ in batch]

    def _element_dump(self, family: str, table: str, name: str) -> tuple[
            Callable[[int], bytes], Callable[[int, int, int], list[tuple[bytes, bytes | None, int]] | None], str]:
        """The request, the per-message decoder (raw key, key end, flags of each element) and
        the words of one set's element dump."""
        body = (nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + nla(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"))
        nfproto = NFPROTO[family]

        def request(seq: int) -> bytes:
            return nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, seq, nfproto,
                                body)

        buf = self._buf

        def decode(ty: int, off: int, ln: int) -> list[tuple[bytes, bytes | None, int]] | None:
            if ty != ((NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_GETSETELEM - 1)):  # NFT_MSG_NEWSETELEM
                return None
            top = attrs(buf, off + 20, off + ln).get(NFTA_SET_ELEM_LIST_ELEMENTS)
            if top is None:
                return None
            found: list[tuple[bytes, bytes | None, int]] = []
            o, end = top[0], top[0] + top[1]
            while o + 4 <= end:
                eln, ety = NLA.unpack_from(buf, o)
                if eln < 4:
                    break
                if o + 12 <= end:  # the common shape, a key and nothing else: LIST_ELEM { KEY { VALUE } }
                    _, _, kln, kty, vln, vty = _KEY_ONLY.unpack_from(buf, o)
                    if (ety & 0x3FFF == NFTA_LIST_ELEM and kty & 0x3FFF == NFTA_SET_ELEM_KEY
                            and vty & 0x3FFF == NFTA_DATA_VALUE and kln == eln - 4 and kln - 4 == (vln + 3) & ~3 >= 4):
                        found.append((bytes(buf[o + 12:o + 8 + vln]), None, 0))
                        o += (eln + 3) & ~3
                        continue
                if ety & 0x3FFF == NFTA_LIST_ELEM:
                    a = attrs(buf, o + 4, o + eln)
                    key = _data(buf, a.get(NFTA_SET_ELEM_KEY))
                    if key is not None:
                        f = a.get(NFTA_SET_ELEM_FLAGS)
                        flags = _BE32.unpack_from(buf, f[0])[0] if f else 0
                        found.append((key, _data(buf, a.get(NFTA_SET_ELEM_KEY_END)), flags))
                o += (eln + 3) & ~3
            return found

        return request, decode, f"list set {family} {table} {name}"

    def present(self, family: str, table: str, name: str, types: Sequence[str], elems: Sequence[Elem]) -> list[bool]:
        """Whether each element is in set ``family table name`` (of a set that is not an
        interval set): one GETSETELEM request each, many per send (`NetlinkWire.gets`). A set's
        dump read while it changes may pass over an element (the kernel resumes it by count);
        this asks for exactly those elements."""
        nfproto = NFPROTO[family]
        reply = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_GETSETELEM - 1)  # NFT_MSG_NEWSETELEM

        def encode(elem: Elem, seq: int) -> bytes:
            return nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM, NLM_F_REQUEST, seq, nfproto,
                                _elements_body(table, name, [encode_key(types, elem)]))

        def decode(ty: int, off: int, ln: int) -> bool | None:
            return True if ty == reply else None

        found = self.gets(elems, encode, decode, (errno.ENOENT,), lambda e: f"get element {e} of set {name}")
        return [f is not None for f in found]

    def write_elements(self, family: str, table: str, changes: Sequence[ElementChange]) -> int:
        """Apply element adds and deletes as one nf_tables transaction, in order; returns
        the number of elements sent. An add of an element that is there is no error (no
        NLM_F_EXCL, as `nft add element`); a delete of one that is not is, and as any
        refusal it cancels the whole transaction (nothing applied) and raises OSError with
        the kernel's errno and words. A batch too large for the socket raises Unsent
        (nothing applied); no answer raises TimeoutError (the outcome unknown)."""
        nfproto = NFPROTO[family]
        seq0 = seq = self._next_seq(0)
        parts = [NLMSG.pack(16 + NFGEN.size, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0)
                 + NFGEN.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))]
        what: list[str] = []  # element message k (seq0 + 1 + k): what it does, for errors
        sent = 0
        for add, name, types, elems in changes:
            keys = [encode_key(types, e) for e in elems]
            sent += len(keys)
            msg, flags = (NFT_MSG_NEWSETELEM, NLM_F_CREATE) if add else (NFT_MSG_DELSETELEM, 0)
            for i in range(0, len(keys), ELEMS_PER_MESSAGE):
                seq = (seq + 1) & 0xFFFFFFFF
                parts.append(nfnl_message(NFNL_SUBSYS_NFTABLES, msg, NLM_F_REQUEST | NLM_F_ACK | flags, seq, nfproto,
                                          _elements_body(table, name, keys[i:i + ELEMS_PER_MESSAGE])))
                what.append(f"{'add' if add else 'delete'} element {family} {table} {name}")
        if not what:
            return 0
        seq = (seq + 1) & 0xFFFFFFFF
        parts.append(NLMSG.pack(16 + NFGEN.size, NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0)
                     + NFGEN.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES)))
        self._seq = (seq + 1) & 0xFFFFFFFF
        try:
            self._send(b"".join(parts), len(parts))
        except OSError as exc:  # a netlink send is whole or nothing: EMSGSIZE above the send buffer
            raise Unsent(exc.errno, f"nf_tables batch of {sent} elements not sent: {exc.strerror}") from None
        answered = 0
        failure: Exception | None = None
        buf = self._buf
        while answered < len(what):  # every element message is acknowledged, committed or not
            try:
                n = self._recv()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                raise TimeoutError(errno.ETIMEDOUT, "nf_tables batch: acknowledgements lost (receive "
                                   "buffer overrun); whether it was applied is unknown") from None
            for off, ln, ty, fl, mseq in self._messages(n):
                k = (mseq - seq0 - 1) & 0xFFFFFFFF
                if ty == NLMSG_ERROR and k < len(what):
                    answered += 1
                    err = -I32.unpack_from(buf, off + 16)[0]
                    if err and failure is None:
                        failure = self.error(what[k], err, error_text(buf, off, ln, fl))
                elif ty == NLMSG_ERROR and mseq in (seq0, seq):  # the batch itself refused (EPERM)
                    err = -I32.unpack_from(buf, off + 16)[0]
                    if err:
                        raise self.error(f"nf_tables transaction on {family} {table}", err,
                                         error_text(buf, off, ln, fl))
        if failure is not None:
            raise failure
        return sent


def _elements_body(table: str, name: str, keys: Sequence[bytes]) -> bytes:
    """NEWSETELEM/DELSETELEM attributes: table, set, and a list of elements by key."""
    elems = b"".join(nla(NFTA_LIST_ELEM | NLA_F_NESTED,
                         nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, nla(NFTA_DATA_VALUE, k))) for k in keys)
    return (nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + nla(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
            + nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems))


def _data(buf: bytes | bytearray, where: tuple[int, int] | None) -> bytes | None:
    """The NFTA_DATA_VALUE bytes inside a nested data attribute."""
    if where is None:
        return None
    v = attrs(buf, where[0], where[0] + where[1]).get(NFTA_DATA_VALUE)
    return bytes(buf[v[0]:v[0] + v[1]]) if v else None

