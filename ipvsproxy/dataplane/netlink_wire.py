"""A raw netlink socket that sends many requests per ``send`` and maps every
acknowledgement back to its request.

Shared by the IPVS codec (:mod:`.ipvs_wire`, generic netlink) and the address
codec (:mod:`.addr_wire`, rtnetlink): both pack their own messages; this
module owns the socket, sequence numbers and the batching protocol.

A batch is up to ``batch_size`` messages in one ``send`` (one kernel round
trip); the kernel handles them in order and answers each with an
``NLMSG_ERROR`` carrying the same sequence number (errno 0 = success), so
result *i* is the error of request *i* or None.  With ``ack_all=False`` only
a trailing barrier (an ``NLMSG_NOOP`` with ``NLM_F_ACK``) is acknowledged on
success; errors are always sent.  EINTR is retried by Python itself (PEP
475).  ENOBUFS/EMSGSIZE from ``send`` halves the batch and resends (nothing
was delivered); ENOBUFS from ``recv`` means acknowledgements were dropped,
so a barrier is sent and every request whose outcome is unknown gets an
ENOBUFS error.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import socket
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["NETLINK_NETFILTER", "NFGEN", "Counters", "NetlinkWire", "attrs", "error_text", "nla", "open_socket"]

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400  # on a new object: EEXIST if it is there
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

NETLINK_ROUTE = 0  # rtnetlink: addresses and links
NETLINK_NETFILTER = 12  # ctnetlink and nf_tables share it (nfnetlink)
NLMSG = struct.Struct("=IHHII")
NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version (NFNETLINK_V0), res_id (big-endian)
NLA = struct.Struct("=HH")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")

RECV_BUF = 1 << 20
SOCK_BUF = 8 << 20
ACK_TRUESIZE = 2048  # generous per-ack receive-buffer charge, to bound outstanding acks
REPLY_SHARE = 4  # a reply (one skb of about a page) charges the buffer some times an ack: fewer per batch
# What encoding a request may raise: it becomes that request's error, never the batch's.
ENCODE_ERRORS = (ValueError, OSError, TypeError, struct.error, UnicodeError)

Req = TypeVar("Req")
T = TypeVar("T")
Err = TypeVar("Err", bound=Exception)


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute: header, payload, padding to 4 bytes."""
    return NLA.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nfnl_message(subsystem: int, msg: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    """One nfnetlink request (ctnetlink, nf_tables): the netlink header, struct nfgenmsg
    (family, NFNETLINK_V0, resource id 0), then `body`."""
    header = NLMSG.pack(16 + NFGEN.size + len(body), (subsystem << 8) | msg, flags, seq, 0)
    return header + NFGEN.pack(family, 0, 0) + body


def attrs(buf: bytes | bytearray, off: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload offset, payload length) for attributes in buf[off:end]."""
    out: dict[int, tuple[int, int]] = {}
    unpack = NLA.unpack_from
    while off + 4 <= end:
        ln, ty = unpack(buf, off)
        if ln < 4:
            break
        out[ty & 0x3FFF] = (off + 4, ln - 4)
        off += (ln + 3) & ~3
    return out


def error_text(buf: bytes | bytearray, off: int, ln: int, flags: int) -> str:
    """The extended-ack message of an NLMSG_ERROR at buf[off:off+ln], if any."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    inner = off + 20
    tlv = inner + (16 if flags & NLM_F_CAPPED else U32.unpack_from(buf, inner)[0])
    w = attrs(buf, tlv, off + ln).get(NLMSGERR_ATTR_MSG)
    return bytes(buf[w[0]:w[0] + w[1]]).rstrip(b"\0").decode(errors="replace") if w else ""


@dataclass(slots=True)
class Counters:
    """Wire activity, for benchmarks."""

    messages_sent: int = 0
    sendmsg_calls: int = 0
    recv_calls: int = 0
    round_trips: int = 0


def open_socket(protocol: int) -> socket.socket:
    """A bound netlink socket with large buffers, capped/extended acks and a receive timeout."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_NETLINK, opt, 1)
        # A receive timeout in the kernel (no extra poll per recv): never hang forever.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 30, 0))
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class NetlinkWire:
    """One netlink socket: sequence numbers, a reusable receive buffer, batches."""

    _sock: socket.socket
    _buf: bytearray
    _seq: int
    _batch: int
    _ack_all: bool
    counters: Counters

    def _open(self, protocol: int, batch_size: int, ack_all: bool) -> None:
        """`_setup` on a new socket of `protocol`, closed again if that fails."""
        sock = open_socket(protocol)
        try:
            self._setup(sock, batch_size, ack_all)
        except BaseException:
            sock.close()
            raise

    def _setup(self, sock: socket.socket, batch_size: int, ack_all: bool) -> None:
        self._sock = sock
        self._ack_all = ack_all
        self._buf = bytearray(RECV_BUF)
        self._seq = int.from_bytes(os.urandom(2), "little") << 8
        try:
            rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            rcvbuf = SOCK_BUF
        self._batch = max(1, min(batch_size, rcvbuf // ACK_TRUESIZE))
        self.counters = Counters()

    def close(self) -> None:
        self._sock.close()

    def _timeout(self) -> Exception:
        return TimeoutError(_errno.ETIMEDOUT, "netlink: no reply from the kernel")

    # -- low level ------------------------------------------------------------------------
    def _next_seq(self, n: int = 1) -> int:
        seq = self._seq
        self._seq = (seq + n) & 0xFFFFFFFF
        return seq

    def _send(self, data: bytes, messages: int) -> None:
        self._sock.send(data)
        c = self.counters
        c.sendmsg_calls += 1
        c.messages_sent += messages
        c.round_trips += 1

    def _recv(self) -> int:
        try:
            n = self._sock.recv_into(self._buf)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise self._timeout() from exc
        self.counters.recv_calls += 1
        return n

    def _messages(self, n: int) -> Iterator[tuple[int, int, int, int, int]]:
        """The messages of one receive of `n` bytes in ``self._buf``: (offset, length, type,
        flags, sequence number) each, up to a malformed length."""
        buf, off = self._buf, 0
        while off + 16 <= n:
            ln, ty, fl, mseq, _ = NLMSG.unpack_from(buf, off)
            if ln < 16:
                return
            yield off, ln, ty, fl, mseq
            off += (ln + 3) & ~3

    def _drain(self) -> None:
        """Read and drop whatever is queued (e.g. the rest of an abandoned dump)."""
        while True:
            try:
                if self._sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT) <= 0:
                    return
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise

    # -- dumps ----------------------------------------------------------------------------
    def error(self, what: str, err: int, extra: str = "") -> Exception:
        """The exception for a kernel error on a request that is not batched
        (a subclass may raise its own type)."""
        msg = f"{what}: {os.strerror(err)}"
        return OSError(err, f"{msg}: {extra}" if extra else msg)

    def transact(self, request: Callable[[int], bytes], what: str) -> tuple[int, int, int] | None:
        """Send one request (``request(seq)`` packs the whole message) and wait
        for its answer: ``(type, offset, length)`` of the reply message in
        ``self._buf`` (valid until the next receive), or None for an
        acknowledgement without error. A kernel error raises ``self.error``."""
        seq = self._next_seq()
        self._send(request(seq), 1)
        buf = self._buf
        while True:
            for off, ln, ty, fl, mseq in self._messages(self._recv()):
                if mseq == seq:
                    if ty != NLMSG_ERROR:
                        return ty, off, ln
                    err = -I32.unpack_from(buf, off + 16)[0]
                    if err:
                        raise self.error(what, err, error_text(buf, off, ln, fl))
                    return None

    def dump(self, request: Callable[[int], bytes], decode: Callable[[int, int, int], T | None],
             what: str) -> list[T]:
        """Send one dump request (``request(seq)`` packs the whole message, with
        NLM_F_DUMP) and decode every reply message until NLMSG_DONE:
        ``decode(type, offset, length)`` reads the message from ``self._buf``
        and returns an item for the result (None: nothing). `pages` says how
        it is read; a restarted dump's items are counted once."""
        out: list[T] = []
        for page in self.pages(request, decode, what):
            if page is None:
                out.clear()
            else:
                out.extend(page)
        return out

    def pages(self, request: Callable[[int], bytes], decode: Callable[[int, int, int], T | None],
              what: str) -> Iterator[list[T] | None]:
        """One dump, read as the kernel fills it: a list of decoded items per receive, so a
        caller can read a few pages, do other work, and come back (on a socket of its own:
        netlink runs one dump per socket, and nothing else can be read on it meanwhile).

        Dumps cannot be pipelined, so each costs one send and as many receives as the
        replies fill. A kernel error ends the dump with ``self.error``. Replies dropped by
        a receive-buffer overrun (ENOBUFS), or EBUSY (a stale dump of an interrupted call
        still running), restart the dump from the beginning, up to five times: None is
        yielded first, and the items already yielded come again. ENOBUFS in the final
        message means the dump started but could not queue yet, and it goes on.
        """
        for attempt in range(5):
            if attempt:
                yield None
            seq = self._next_seq()
            self._send(request(seq), 1)
            restart = done = False
            while not (done or restart):
                try:
                    n = self._recv()
                except OSError as exc:
                    if exc.errno != _errno.ENOBUFS:
                        raise
                    restart = True
                    break
                buf = self._buf
                page: list[T] = []
                for off, ln, ty, fl, mseq in self._messages(n):
                    if mseq == seq:
                        if ty in (NLMSG_DONE, NLMSG_ERROR):
                            err = -I32.unpack_from(buf, off + 16)[0] if ln >= 20 else 0
                            if err == _errno.EBUSY:
                                restart = True
                            elif err and err != _errno.ENOBUFS:
                                raise self.error(what, err, error_text(buf, off, ln, fl))
                            elif not err:
                                done = True
                        else:
                            item = decode(ty, off, ln)
                            if item is not None:
                                page.append(item)
                if page:
                    yield page
            if done:
                return
            self._drain()
        raise self.error(what, _errno.EBUSY, "netlink dump kept failing (EBUSY/ENOBUFS)")

    def gets(self, requests: Sequence[Req], encode: Callable[[Req, int], bytes],
             decode: Callable[[int, int, int], T | None], absent: Collection[int],
             what: Callable[[Req], str]) -> list[T | None]:
        """Requests that each get one reply message (a GET without NLM_F_DUMP), many per
        ``send``: ``encode(request, seq)`` packs one whole message, ``decode(type, offset,
        length)`` reads its reply in place. Result i is request i's decoded reply, or None
        when the kernel answered with an errno in ``absent`` (e.g. "no such service"); any
        other kernel error raises ``self.error`` once the batch is read. One round trip per
        batch instead of one per request, and no message more (one GET: one request, as
        `transact`); a receive-buffer overrun (ENOBUFS: replies lost) reads the batch
        again, in smaller batches."""
        results: list[T | None] = [None] * len(requests)
        i = 0
        attempts = 0
        while i < len(requests):
            end = min(len(requests), i + max(1, self._batch // REPLY_SHARE))
            if self._gets_once(requests, i, end, encode, decode, absent, what, results):
                i, attempts = end, 0
                continue
            attempts += 1
            if attempts >= 5:
                raise self.error(what(requests[i]), _errno.ENOBUFS, "replies kept being lost (receive buffer overrun)")
            self._drain()
            self._batch = max(REPLY_SHARE, self._batch // 2)
        return results

    def _gets_once(self, requests: Sequence[Req], start: int, end: int, encode: Callable[[Req, int], bytes],
                   decode: Callable[[int, int, int], T | None], absent: Collection[int],
                   what: Callable[[Req], str], results: list[T | None]) -> bool:
        """One batch of `gets` (requests[start:end]); False when replies were lost. Each
        request is answered by exactly one message (its reply, or an error): no barrier."""
        count = end - start
        seq0 = self._next_seq(count)
        self._send(b"".join(encode(requests[j], (seq0 + j - start) & 0xFFFFFFFF) for j in range(start, end)),
                   count)
        buf = self._buf
        failure: Exception | None = None
        answered = bytearray(count)
        left = count
        while left:
            try:
                n = self._recv()
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise
                return False
            for off, ln, ty, fl, mseq in self._messages(n):
                k = (mseq - seq0) & 0xFFFFFFFF
                if k < count and not answered[k]:
                    answered[k] = 1
                    left -= 1
                    if ty != NLMSG_ERROR:
                        results[start + k] = decode(ty, off, ln)
                    else:
                        err = -I32.unpack_from(buf, off + 16)[0]
                        if err and err not in absent and failure is None:
                            failure = self.error(what(requests[start + k]), err, error_text(buf, off, ln, fl))
        if failure is not None:
            raise failure
        return True

    # -- batched requests -----------------------------------------------------------------
    def batch(self, requests: Sequence[Req], encode: Callable[[Req, int, int], bytes],
              error: Callable[[Req, int, str], Err],
              invalid: Callable[[Req, Exception], Err]) -> list[Err | None]:
        """Send ``requests`` in order, many per ``send``; result i is None or request i's error.

        ``encode(request, seq, flags)`` packs one complete message with that
        sequence number and flags; whatever it raises (ENCODE_ERRORS) becomes
        ``invalid(request, exc)`` and the request is not sent.  A kernel
        error becomes ``error(request, errno, extended_ack_text)``.
        Socket-level failures raise.
        """
        results: list[Err | None] = [None] * len(requests)
        i = 0
        while i < len(requests):
            i = self._batch_once(requests, i, min(len(requests), i + self._batch), encode, error,
                                 invalid, results)
        return results

    def _batch_once(self, requests: Sequence[Req], start: int, end: int,
                    encode: Callable[[Req, int, int], bytes],
                    error: Callable[[Req, int, str], Err], invalid: Callable[[Req, Exception], Err],
                    results: list[Err | None]) -> int:
        flags = NLM_F_REQUEST | (NLM_F_ACK if self._ack_all else 0)
        seq0 = seq = self._seq
        parts: list[bytes] = []
        index: list[int] = []  # message k (seq0 + k) -> request index
        for j in range(start, end):
            try:
                parts.append(encode(requests[j], seq, flags))
            except ENCODE_ERRORS as exc:
                results[j] = invalid(requests[j], exc)
                continue
            index.append(j)
            seq = (seq + 1) & 0xFFFFFFFF
        if not index:
            return end
        if not self._ack_all:  # barrier: a NOOP the kernel acks after all earlier messages
            parts.append(NLMSG.pack(16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, seq, 0))
            last = seq
            seq = (seq + 1) & 0xFFFFFFFF
        else:
            last = (seq - 1) & 0xFFFFFFFF
        self._seq = seq
        try:
            self._send(b"".join(parts), len(parts))
        except OSError as exc:
            if exc.errno in (_errno.ENOBUFS, _errno.EMSGSIZE, _errno.ENOMEM) and len(parts) > 1:
                self._batch = max(1, (end - start) // 2)  # nothing was delivered: retry smaller
                return start
            raise
        seen = bytearray(len(index))
        buf = self._buf
        lost = False
        while True:
            try:
                n = self._recv()
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise
                lost = True  # acks were dropped: fence with a barrier to learn where we are
                last = self._next_seq()
                self._send(NLMSG.pack(16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, last, 0), 1)
                continue
            done = False
            for off, ln, ty, fl, mseq in self._messages(n):
                if ty == NLMSG_ERROR:
                    k = (mseq - seq0) & 0xFFFFFFFF
                    if k < len(index):
                        seen[k] = 1
                        err = -I32.unpack_from(buf, off + 16)[0]
                        if err:
                            j = index[k]
                            results[j] = error(requests[j], err, error_text(buf, off, ln, fl))
                    if mseq == last:
                        done = True
            if done:
                break
        if lost:
            self._batch = max(1, (end - start) // 2)
            for k, j in enumerate(index):
                if not seen[k] and results[j] is None:
                    results[j] = error(
                        requests[j], _errno.ENOBUFS,
                        "outcome unknown: netlink acknowledgement lost (receive buffer overrun)")
        return end

