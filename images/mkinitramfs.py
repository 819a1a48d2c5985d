#!/usr/bin/env python3
"""Builds capsid's guest initramfs: a gzip'd newc cpio whose /init is capsid-agent.

The archive is written directly (no root, no mknod): the device nodes the
kernel needs before devtmpfs is mounted (/dev/console for init's stdio) are
cpio entries. Output is reproducible: fixed mtimes, sorted entries.

The agent goes in without its symbol table (`strip --strip-all`; the
binary under target/ keeps it for reading addresses of a crash), and the
gzip stream is stored, not compressed, by default (`--level 0`): every
guest inflates the initramfs at boot, and on an emulated CPU inflating
4 MiB of deflate took about 85 ms more than copying 9 MiB of stored
blocks (docs/performance.md). Stored gzip is still gzip, which every
kernel with CONFIG_RD_GZIP reads.

usage: mkinitramfs.py --agent target/.../capsid-agent --out build/initramfs.cpio.gz
       mkinitramfs.py --init FILE ...   (a test /init instead of the agent)
"""

import argparse
import gzip
import os
import stat
import subprocess
import sys
import tempfile

DIRS = ["dev", "proc", "sys", "run", "tmp", "mnt", "etc", "root", "sbin"]
# (path, mode, major, minor)
NODES = [
    ("dev/console", stat.S_IFCHR | 0o600, 5, 1),
    ("dev/null", stat.S_IFCHR | 0o666, 1, 3),
]


class Cpio:
    """Writes newc ("070701") entries."""

    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        name_b = name.encode() + b"\0"
        fields = [
            self.ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(name_b), 0,
        ]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out += header + name_b
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def directory(self, name, mode=0o755):
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def node(self, name, mode, major, minor):
        self._entry(name, mode, rdev=(major, minor))

    def file(self, name, data, mode=0o755):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return bytes(self.out)


def strip_symbols(path):
    """The bytes of `path` without its symbol table (binutils' strip)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "init")
        try:
            subprocess.run(["strip", "--strip-all", "-o", out, path], check=True)
        except FileNotFoundError:
            sys.exit("mkinitramfs: `strip` (binutils) is needed to strip the agent")
        except subprocess.CalledProcessError as e:
            sys.exit(f"mkinitramfs: strip {path} failed with status {e.returncode}")
        with open(out, "rb") as f:
            return f.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--agent", help="static capsid-agent binary, installed as /init")
    src.add_argument("--init", help="any static program or script to install as /init")
    ap.add_argument("--busybox", help="also install this static busybox as /bin/busybox with sh")
    ap.add_argument("--file", action="append", default=[], metavar="SRC:DEST",
                    help="also install SRC at DEST (mode 0755), e.g. a test tool")
    ap.add_argument("--out", required=True, help="output .cpio.gz")
    ap.add_argument("--level", type=int, default=0, choices=range(10),
                    help="gzip compression level (default 0: stored, fastest to boot)")
    args = ap.parse_args()

    init_path = args.agent or args.init
    try:
        with open(init_path, "rb") as f:
            init = f.read()
    except OSError as e:
        sys.exit(f"mkinitramfs: cannot read {init_path}: {e.strerror}")
    if args.agent and init[:4] != b"\x7fELF":
        sys.exit(f"mkinitramfs: {init_path} is not an ELF binary")
    if args.agent:
        init = strip_symbols(init_path)

    cpio = Cpio()
    for d in sorted(DIRS + (["bin"] if args.busybox else [])):
        cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    for name, mode, major, minor in NODES:
        cpio.node(name, mode, major, minor)
    if args.busybox:
        with open(args.busybox, "rb") as f:
            cpio.file("bin/busybox", f.read())
        cpio.symlink("bin/sh", "busybox")
    for spec in args.file:
        src, _, dest = spec.partition(":")
        if not dest:
            sys.exit(f"mkinitramfs: --file {spec}: expected SRC:DEST")
        try:
            with open(src, "rb") as f:
                cpio.file(dest.lstrip("/"), f.read())
        except OSError as e:
            sys.exit(f"mkinitramfs: cannot read {src}: {e.strerror}")
    cpio.file("init", init)
    data = cpio.finish()

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(data, compresslevel=args.level, mtime=0))
    os.replace(tmp, args.out)
    print(f"initramfs: {args.out} ({os.path.getsize(args.out)} bytes, /init from {init_path})")


if __name__ == "__main__":
    main()
