"""Tiny test backends for the kernel tests: an HTTP server and a UDP echo, both naming themselves.

    python servers.py --name NAME [--http PORT]... [--udp PORT]... [--sctp PORT]... [--ready FILE]

Run inside a backend network namespace (`ip netns exec NS python servers.py ...`). Every socket
is dual-stack (bound to ::, IPv4 too). HTTP: every request is answered 200 with the body NAME
(HTTP/1.1, keep-alive unless the client says `Connection: close`; one thread per connection,
so many connections can be held open); headers X-Backend: NAME and X-Client: ADDR PORT (the
source address the backend saw). UDP: every datagram is answered with NAME. SCTP (optional):
like HTTP, over a one-to-one SCTP socket. Once every socket is bound, FILE is written (atomically)
with the pid. Only the standard library's light modules are imported: Python start-up inside the
emulated VM is slow. SIGTERM ends it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def parse(argv: list[str]) -> tuple[str, dict[str, list[int]], str | None]:
    name, ready, ports = "", None, {"http": [], "udp": [], "sctp": []}
    it = iter(argv)
    for arg in it:
        key, _, val = arg.partition("=")
        if not val:
            val = next(it, "")
        if key == "--name":
            name = val
        elif key == "--ready":
            ready = val
        elif key.lstrip("-") in ports:
            ports[key.lstrip("-")].append(int(val))
        else:
            sys.exit(f"servers.py: unknown argument {arg!r}")
    if not name:
        sys.exit("servers.py: --name is required")
    return name, ports, ready


def listener(kind: int, port: int, proto: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind, proto)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        s.listen(1024)  # before the ready file is written
    return s


def client_addr(peer: tuple) -> str:
    host = str(peer[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"{host} {peer[1]}"


def serve_conn(conn: socket.socket, peer: tuple, name: bytes) -> None:
    body = name
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > 1 << 20:
                    return
            sep = b"\r\n\r\n" if b"\r\n\r\n" in buf else b"\n\n"
            head, _, buf = buf.partition(sep)
            lines = head.decode("latin-1").splitlines()
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip().lower()
            length = int(headers.get("content-length", "0") or 0)
            while len(buf) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            buf = buf[length:]
            version = lines[0].split()[-1] if lines and lines[0].split() else "HTTP/1.0"
            close = headers.get("connection") == "close" or (
                version == "HTTP/1.0" and headers.get("connection") != "keep-alive")
            reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     b"X-Backend: %s\r\nX-Client: %s\r\nConnection: %s\r\n\r\n%s" % (
                         len(body), name, client_addr(peer).encode(),
                         b"close" if close else b"keep-alive", body))
            conn.sendall(reply)
            if close:
                return
    except OSError:
        return
    finally:
        conn.close()


def serve_stream(sock: socket.socket, name: bytes) -> None:
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            continue
        threading.Thread(target=serve_conn, args=(conn, peer, name), daemon=True).start()


def serve_udp(sock: socket.socket, name: bytes) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(65536)
            sock.sendto(name, peer)
        except OSError:
            continue


def main() -> None:
    name, ports, ready = parse(sys.argv[1:])
    bname = name.encode()
    jobs = []
    for port in ports["http"]:
        jobs.append((serve_stream, listener(socket.SOCK_STREAM, port)))
    for port in ports["sctp"]:
        jobs.append((serve_stream, listener(socket.SOCK_STREAM, port, socket.IPPROTO_SCTP)))
    for port in ports["udp"]:
        jobs.append((serve_udp, listener(socket.SOCK_DGRAM, port)))
    if not jobs:
        sys.exit("servers.py: give at least one of --http, --udp, --sctp")
    threads = [threading.Thread(target=fn, args=(sock, bname), daemon=True) for fn, sock in jobs]
    for t in threads:
        t.start()
    if ready:
        tmp = f"{ready}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, ready)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
