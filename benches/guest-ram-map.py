#!/usr/bin/env python3
"""Where a QEMU guest's RAM is resident on the host.

Reads /proc/PID/pagemap over QEMU's guest RAM mapping (the largest
`memory-backend` mapping: capsid gives QEMU a memfd) and prints, per chunk
of guest-physical address space, the MiB present on the host. Guest RAM
starts at address 0, so chunk N covers [N*chunk, (N+1)*chunk) MiB.

    benches/guest-ram-map.py PID [--chunk MIB]

Needs root (pagemap's present bit). Used for docs/kubernetes.md ("Booting
small gains little under QEMU").
"""
import argparse
import re
import struct
import sys

PAGE = 4096


def guest_ram(pid):
    best = None
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)", line)
            if not m or "memory-backend" not in m.group(3):
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if best is None or end - start > best[1] - best[0]:
                best = (start, end)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pid", type=int, help="QEMU's pid")
    p.add_argument("--chunk", type=int, default=16, help="MiB per line (default 16)")
    a = p.parse_args()
    if a.chunk <= 0:
        sys.exit("guest-ram-map: --chunk must be positive")
    try:
        ram = guest_ram(a.pid)
        if ram is None:
            sys.exit(f"guest-ram-map: no memory-backend mapping in /proc/{a.pid}/maps")
        start, end = ram
        pages = (end - start) // PAGE
        with open(f"/proc/{a.pid}/pagemap", "rb") as f:
            f.seek(start // PAGE * 8)
            data = f.read(pages * 8)
    except OSError as e:
        sys.exit(f"guest-ram-map: process {a.pid}: {e}")
    per_chunk = a.chunk * (1 << 20) // PAGE
    total = 0
    print(f"guest RAM: {(end - start) >> 20} MiB")
    for first in range(0, pages, per_chunk):
        present = sum(
            1
            for i in range(first, min(pages, first + per_chunk))
            if struct.unpack_from("<Q", data, i * 8)[0] >> 63
        )
        total += present
        if present:
            print(f"{first * PAGE >> 20:>6}-{(first + per_chunk) * PAGE >> 20:<6} MiB: {present * PAGE / (1 << 20):6.1f} MiB present")
    print(f"present in all: {total * PAGE / (1 << 20):.1f} MiB")


if __name__ == "__main__":
    main()
