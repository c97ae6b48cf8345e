"""scripts/qemu_monitor.py: what a frozen test VM's vCPUs were doing, named from the guest's kallsyms.

The monitor here is a unix socket server speaking as QEMU's human monitor does (a banner, the
"(qemu) " prompt, the command echoed back with terminal escapes); the real one is exercised by
scripts/conformance.sh when a boot freezes.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from tests import scriptload

mon = scriptload.load("scripts/qemu_monitor.py", "qemu_monitor")

REGISTERS = """CPU#0
RAX=0000000000000000 RBX=ffff8f0d40a9c000
RIP=ffffffff810012f0 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CPU#1
RAX=0000000000000001 RBX=ffff8f0d40a9c000
RIP=ffffffff81002010 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
"""


def serve(path: str, answers: dict[str, str]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode()
                    conn.sendall(b"\x1b[D" + line + b"\r\n" + answers.get(cmd, "unknown\r\n").encode() + b"(qemu) ")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_answers_come_back_per_command_and_instruction_pointers_get_kernel_names(tmp_path: Path) -> None:
    sock = str(tmp_path / "m.sock")
    t = serve(sock, {"info cpus": "* CPU #0: thread_id=1\r\n  CPU #1: thread_id=2\r\n",
                     "info registers -a": REGISTERS})
    cpus, regs = mon.ask(sock, ["info cpus", "info registers -a"])
    t.join(timeout=5)
    assert "thread_id=1" in cpus and "RIP=" not in cpus
    assert regs.startswith("CPU#0") and "RIP=ffffffff81002010" in regs
    syms = tmp_path / "kallsyms"
    syms.write_text("ffffffff81001000 T _stext\nffffffff810012e0 t native_safe_halt\n"
                    "ffffffff81002000 T csd_lock_wait\nffffffff81003000 d some_data\n")
    table = mon.load_kallsyms(syms)
    assert mon.symbol(0xFFFFFFFF810012F0, table) == "native_safe_halt+0x10"
    assert mon.symbol(0xFFFFFFFF81002010, table) == "csd_lock_wait+0x10"
    assert mon.symbol(0xFFFFFFFF81000000, table) == "?"  # below the kernel's text
