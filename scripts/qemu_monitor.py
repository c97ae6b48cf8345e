"""Ask a running test VM's QEMU where its vCPUs are: the evidence a frozen guest leaves.

The emulated guest of the conformance runs has frozen with both vCPU threads busy and nothing on
its console (docs/conformance.md). scripts/vm-run.sh opens a QEMU human monitor on a unix socket
when VM_MONITOR is set; this asks it for each vCPU's registers a few times, and names the kernel
function at each instruction pointer from the guest's own /proc/kallsyms (copied at boot), so a
freeze says whether the guest spins in one place (a lock, an IPI wait) or still moves.

    python3 scripts/qemu_monitor.py SOCKET [--samples 3] [--kallsyms FILE] > freeze.txt
"""

from __future__ import annotations

import argparse
import bisect
import re
import socket
import sys
import time
from pathlib import Path

PROMPT = b"(qemu) "


def ask(sock_path: str, commands: list[str], timeout: float = 20.0) -> list[str]:
    """Each command's answer from the human monitor (the text up to its next prompt)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)

        def until_prompt() -> bytes:
            buf = b""
            while not buf.endswith(PROMPT):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf[: -len(PROMPT)] if buf.endswith(PROMPT) else buf

        until_prompt()  # the banner
        answers = []
        for cmd in commands:
            s.sendall(cmd.encode() + b"\n")
            text = until_prompt().decode(errors="replace")
            # the monitor echoes the command line (with terminal escapes): drop the first line
            answers.append(text.split("\n", 1)[1] if "\n" in text else text)
        return answers


def load_kallsyms(path: Path) -> tuple[list[int], list[str]]:
    addrs: list[int] = []
    names: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            addr = int(parts[0], 16)
            if addr:
                addrs.append(addr)
                names.append(parts[2])
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


def symbol(rip: int, table: tuple[list[int], list[str]] | None) -> str:
    if not table or not table[0]:
        return ""
    i = bisect.bisect_right(table[0], rip) - 1
    return f"{table[1][i]}+{rip - table[0][i]:#x}" if i >= 0 else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("socket")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--kallsyms", type=Path)
    args = ap.parse_args()
    table = load_kallsyms(args.kallsyms) if args.kallsyms and args.kallsyms.is_file() else None
    try:
        for n in range(args.samples):
            if n:
                time.sleep(args.interval)
            cpus, regs = ask(args.socket, ["info cpus", "info registers -a"])
            print(f"== sample {n + 1} at {time.strftime('%H:%M:%S')}\n{cpus.strip()}")
            for cpu, rip in re.findall(r"CPU#(\d+).*?RIP=([0-9a-f]+)", regs, re.S):
                print(f"CPU#{cpu} RIP={rip} {symbol(int(rip, 16), table)}")
            print(regs.strip())
    except OSError as exc:
        print(f"qemu_monitor: {args.socket}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
