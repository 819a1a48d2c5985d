#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/: a handful of small,
meaningful inputs per fuzz target (valid chains, a valid image, a valid QMP
session, a valid agent reply, ...), each in the input format its target's
doc comment describes. Deterministic: running it again gives the same
files. Standard library only.

    python3 fuzz/make_seeds.py
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")

# --- guest memory and split queues -------------------------------------

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2


class Memory:
    """A guest memory image, grown as it is written."""

    def __init__(self):
        self.data = bytearray()

    def write(self, addr, data):
        end = addr + len(data)
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        self.data[addr:end] = data

    def queue(self, layout, chains, avail_extra=0):
        """Writes a split queue at layout (desc table, avail ring, used ring)
        holding `chains`: lists of (addr, len, flags) descriptors, linked in
        order; returns the number of descriptors used."""
        desc_table, avail, used = layout
        index = 0
        heads = []
        for chain in chains:
            heads.append(index)
            for i, (addr, length, flags) in enumerate(chain):
                last = i == len(chain) - 1
                if not last:
                    flags |= VRING_DESC_F_NEXT
                nxt = 0 if last else index + 1
                self.write(desc_table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))
                index += 1
        ring = struct.pack("<HH", 0, len(heads) + avail_extra)
        ring += b"".join(struct.pack("<H", h) for h in heads)
        self.write(avail, ring)
        # An empty used ring (flags, idx).
        self.write(used, struct.pack("<HH", 0, 0))
        return index

    def image(self, size=None):
        data = bytes(self.data)
        if size is not None:
            assert len(data) <= size, (len(data), size)
            data += bytes(size - len(data))
        return data


def write_seeds(target, seeds):
    d = os.path.join(SEEDS, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


# --- blk_request ----------------------------------------------------------

def blk_request():
    layout = (0x0, 0x100, 0x200)
    hdr, data, status = 0x400, 0x600, 0x800

    def request(kind, sector, data_len, data_flags, control=0):
        m = Memory()
        m.write(hdr, struct.pack("<IIQ", kind, 0, sector))
        chain = [(hdr, 16, 0)]
        if data_len:
            chain.append((data, data_len, data_flags))
        chain.append((status, 1, VRING_DESC_F_WRITE))
        m.queue(layout, [chain])
        return bytes([control]) + m.image()

    def discard(kind, control):
        m = Memory()
        m.write(hdr, struct.pack("<IIQ", kind, 0, 0))
        m.write(data, struct.pack("<QII", 8, 8, 0))
        m.queue(layout, [[(hdr, 16, 0), (data, 16, 0), (status, 1, VRING_DESC_F_WRITE)]])
        return bytes([control]) + m.image()

    write_seeds("blk_request", {
        "read": request(0, 1, 512, VRING_DESC_F_WRITE),
        "write": request(1, 2, 512, 0),
        "write-read-only-disk": request(1, 2, 512, 0, control=2),
        "flush": request(4, 0, 0, 0),
        "get-id": request(8, 0, 20, VRING_DESC_F_WRITE),
        "discard": discard(11, control=4),
        "write-zeroes": discard(13, control=8),
        "event-idx-read": request(0, 63, 512, VRING_DESC_F_WRITE, control=1),
    })


# --- vsock_packets --------------------------------------------------------

def vsock_hdr(op, src_port, dst_port, length=0, flags=0, buf_alloc=65536, fwd_cnt=0):
    # src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags,
                       buf_alloc, fwd_cnt)


def vsock_packets():
    rx, tx = (0x0, 0x100, 0x200), (0x400, 0x500, 0x600)

    def packets(pkts, control=0):
        m = Memory()
        chains = []
        addr = 0xc00
        for header, payload in pkts:
            m.write(addr, header)
            chain = [(addr, len(header), 0)]
            if payload:
                m.write(addr + 0x40, payload)
                chain.append((addr + 0x40, len(payload), 0))
            chains.append(chain)
            addr += 0x80
        m.queue(tx, chains)
        # Two receive buffers for the device's answers.
        m.queue(rx, [[(0x1000, 0x100, VRING_DESC_F_WRITE)], [(0x1100, 0x100, VRING_DESC_F_WRITE)]])
        return bytes([control]) + m.image()

    hello = b"hello"
    write_seeds("vsock_packets", {
        "connect": packets([(vsock_hdr(1, 1000, 1), b"")]),
        "connect-send": packets([
            (vsock_hdr(1, 1001, 1), b""),
            (vsock_hdr(5, 1001, 1, len(hello)), hello),
        ]),
        "connect-send-shutdown": packets([
            (vsock_hdr(1, 1002, 1), b""),
            (vsock_hdr(5, 1002, 1, len(hello)), hello),
            (vsock_hdr(4, 1002, 1, flags=3), b""),
        ], control=3),
        "credit-request": packets([
            (vsock_hdr(1, 1003, 1), b""),
            (vsock_hdr(7, 1003, 1), b""),
            (vsock_hdr(6, 1003, 1), b""),
        ]),
        "connect-unknown-port-rst": packets([
            (vsock_hdr(1, 1004, 99), b""),
            (vsock_hdr(3, 1004, 99), b""),
        ]),
    })


# --- mmio_transport -------------------------------------------------------

def mmio_ops():
    ops = bytearray()

    def read(offset, width=4):
        ops.extend(bytes([0]) + struct.pack("<H", offset) + bytes([{1: 0, 2: 1, 4: 2, 8: 3}[width]]))

    def write(offset, value, width=4):
        ops.extend(bytes([1]) + struct.pack("<H", offset) + bytes([{1: 0, 2: 1, 4: 2, 8: 3}[width]]))
        ops.extend(value.to_bytes(width, "little"))

    return ops, read, write


def mmio_seed(which, queues, memory):
    """A driver bringing the device up (virtio 1.2, 3.1.1) with `queues`
    (index, (desc, avail, used)) set up, then kicking each."""
    ops, read, write = mmio_ops()
    for off in (0x000, 0x004, 0x008, 0x00c):
        read(off)
    write(0x070, 1)  # ACKNOWLEDGE
    write(0x070, 3)  # DRIVER
    for sel in (0, 1):
        write(0x014, sel)
        read(0x010)
    write(0x024, 1)
    write(0x020, 1)  # VIRTIO_F_VERSION_1 (bit 32)
    write(0x024, 0)
    write(0x020, 0)
    write(0x070, 11)  # FEATURES_OK
    read(0x070)
    for index, (desc, avail, used) in queues:
        write(0x030, index)
        read(0x034)
        write(0x038, 16)
        write(0x080, desc)
        write(0x084, 0)
        write(0x090, avail)
        write(0x094, 0)
        write(0x0a0, used)
        write(0x0a4, 0)
        write(0x044, 1)
    write(0x070, 15)  # DRIVER_OK
    read(0x100, 4)
    for index, _ in queues:
        write(0x050, index)
        ops.extend(bytes([2, index]))  # the kick reaches the device
    ops.extend(bytes([3]))  # host-side event
    read(0x060)
    write(0x064, 1)
    ops.extend(bytes([4]))  # configuration change
    read(0x0fc)
    ops.extend(bytes([5]))  # a device request from the host side
    return bytes([which]) + memory.image(0x2000) + bytes(ops)


def mmio_transport():
    q0 = (0x0, 0x100, 0x200)
    q1 = (0x400, 0x500, 0x600)
    q2 = (0x800, 0x900, 0xa00)
    rng = Memory()
    rng.queue(q0, [[(0x1000, 64, VRING_DESC_F_WRITE)]])
    balloon = Memory()
    balloon.write(0x1000, struct.pack("<4I", 1, 2, 3, 0x1f))
    balloon.queue(q0, [[(0x1000, 16, 0)]])
    balloon.write(0x1100, struct.pack("<4I", 1, 2, 3, 0x1f))
    balloon.queue(q1, [[(0x1100, 16, 0)]])
    balloon.write(0x1200, struct.pack("<HQ", 4, 100 << 20) + struct.pack("<HQ", 5, 200 << 20))
    balloon.queue(q2, [[(0x1200, 20, 0)]])
    empty = Memory()
    write_seeds("mmio_transport", {
        "rng-bring-up": mmio_seed(0, [(0, q0)], rng),
        "balloon-bring-up": mmio_seed(1, [(0, q0), (1, q1), (2, q2)], balloon),
        "balloon-reporting-bring-up": mmio_seed(7, [(0, q0), (1, q1), (2, q2)], balloon),
        "rng-no-queues": mmio_seed(0, [], empty),
    })


# --- net_tx / net_rx --------------------------------------------------------

def eth_frame(payload_len=46, fill=0xab):
    dst, src = bytes([0x52, 0x54, 0, 0, 0, 1]), bytes([0x52, 0x54, 0, 0, 0, 2])
    return dst + src + b"\x08\x00" + bytes([fill]) * payload_len


def net_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, legacy=False):
    h = struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    return h if legacy else h + struct.pack("<H", 0)


def net_tx():
    tx = (0x400, 0x500, 0x600)

    def seed(chains, control):
        m = Memory()
        descs = []
        addr = 0x700
        for parts in chains:
            chain = []
            for part in parts:
                m.write(addr, part)
                chain.append((addr, len(part), 0))
                addr += (len(part) + 0xf) & ~0xf
            descs.append(chain)
        m.queue(tx, descs)
        return bytes([control]) + m.image()

    v1 = 2  # control: VIRTIO_F_VERSION_1
    frame = eth_frame()
    write_seeds("net_tx", {
        "header-and-frame": seed([[net_hdr(), frame]], v1),
        "one-descriptor": seed([[net_hdr() + frame]], v1),
        "legacy-header": seed([[net_hdr(legacy=True), frame]], 0),
        "checksum-offload": seed([[net_hdr(flags=1, csum_start=34, csum_offset=16), frame]], v1 | 4),
        "tso4": seed([[net_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448,
                               csum_start=34, csum_offset=16), eth_frame(1500)]], v1 | 4 | 8),
        "offload-not-negotiated": seed([[net_hdr(flags=1, gso_type=4), frame]], v1),
        "three-frames-event-idx": seed([[net_hdr(), frame]] * 3, v1 | 1),
        "tap-refuses": seed([[net_hdr(), frame]], v1 | 32),
    })


def net_rx():
    rx = (0x0, 0x100, 0x200)

    def seed(buffers, frames, control):
        m = Memory()
        m.queue(rx, buffers)
        out = bytearray(bytes([control]) + m.image(0x800))
        for f in frames:
            if isinstance(f, int):
                out += struct.pack("<H", f)
            else:
                out += struct.pack("<H", len(f)) + f
        return bytes(out)

    v1 = 2
    big = [(0x1000, 1526, VRING_DESC_F_WRITE)]
    frame = net_hdr() + eth_frame()
    write_seeds("net_rx", {
        "one-frame": seed([big], [frame], v1),
        "legacy-header": seed([big], [net_hdr(legacy=True) + eth_frame()], 0),
        "spread-over-descriptors": seed(
            [[(0x1000, 12, VRING_DESC_F_WRITE), (0x1100, 30, VRING_DESC_F_WRITE),
              (0x1200, 100, VRING_DESC_F_WRITE)]], [frame], v1),
        "more-frames-than-buffers": seed([big, [(0x2000, 1526, VRING_DESC_F_WRITE)]],
                                         [frame, frame, frame], v1 | 1),
        "buffer-too-small": seed([[(0x1000, 20, VRING_DESC_F_WRITE)]], [frame], v1),
        "offloaded-and-runt-frames": seed([big], [net_hdr(flags=1) + eth_frame(), b"\0" * 5, frame], v1),
        "too-long-interrupted-broken": seed([big], [0xffff, 0xfffe, frame, 0xfffd], v1 | 4),
    })


# --- balloon_stats ----------------------------------------------------------

def balloon_stats():
    inflate, deflate = (0x0, 0x100, 0x200), (0x400, 0x500, 0x600)
    stats, reporting = (0x800, 0x900, 0xa00), (0xc00, 0xd00, 0xe00)

    def stat_entries(entries):
        return b"".join(struct.pack("<HQ", tag, value) for tag, value in entries)

    def seed(control, stats_buf=None, inflate_pfns=None, deflate_pfns=None, reports=None):
        m = Memory()
        if stats_buf is not None:
            m.write(0xf00, stats_buf)
            m.queue(stats, [[(0xf00, len(stats_buf), 0)]])
        if inflate_pfns is not None:
            m.write(0xf80, struct.pack("<%dI" % len(inflate_pfns), *inflate_pfns))
            m.queue(inflate, [[(0xf80, 4 * len(inflate_pfns), 0)]])
        if deflate_pfns is not None:
            m.write(0xfc0, struct.pack("<%dI" % len(deflate_pfns), *deflate_pfns))
            m.queue(deflate, [[(0xfc0, 4 * len(deflate_pfns), 0)]])
        if reports is not None:
            m.queue(reporting, [[(a, n, VRING_DESC_F_WRITE) for a, n in reports]])
        return bytes([control]) + m.image()

    full = stat_entries([(0, 0), (1, 0), (2, 5), (3, 900), (4, 100 << 20), (5, 480 << 20),
                         (6, 300 << 20), (7, 40 << 20), (8, 0), (9, 0), (0xbeef, 1)])
    write_seeds("balloon_stats", {
        "stats": seed(0, stats_buf=full),
        "stats-requested-again": seed(4, stats_buf=full),
        "inflate-runs": seed(2, inflate_pfns=[1, 2, 3, 0x20, 0xffffffff]),
        "deflate": seed(0, deflate_pfns=[2, 3, 0x7fffffff]),
        "reports": seed(2, reports=[(0x2000, 0x2000), (0x3001, 0x1000), (0x3000, 0x2000)]),
        "all-queues-event-idx": seed(5, stats_buf=full, inflate_pfns=[2, 3], deflate_pfns=[3],
                                     reports=[(0x1000, 0x1000)]),
    })


# --- vhost_user_relay -------------------------------------------------------

def vu_msg(request, flags, body=b""):
    return struct.pack("<III", request, flags, len(body)) + body


def vhost_user_relay():
    get_features = vu_msg(1, 1)
    early_enable = vu_msg(18, 1, struct.pack("<II", 0, 1))
    early_enable_reply = vu_msg(18, 1 | 8, struct.pack("<II", 1, 1))
    set_features = vu_msg(2, 1, struct.pack("<Q", (1 << 30) | (1 << 32)))
    set_features_no_protocol = vu_msg(2, 1, struct.pack("<Q", 1 << 32))
    set_owner = vu_msg(3, 1)
    features_reply = vu_msg(1, 1 | 4, struct.pack("<Q", (1 << 30) | (1 << 32)))
    oversized = struct.pack("<III", 12, 1, 0x2000)

    def seed(control, qemu, daemon):
        return bytes([control]) + struct.pack("<H", len(qemu)) + qemu + daemon

    negotiation = get_features + set_owner + early_enable + early_enable_reply + set_features
    write_seeds("vhost_user_relay", {
        "negotiation": seed(0, negotiation, features_reply),
        "early-enables-without-protocol": seed(0, early_enable + early_enable_reply
                                               + set_features_no_protocol, b""),
        "pieces-with-fds": seed(1 | 2 | 4 | (4 << 4), negotiation, features_reply),
        "too-many-fds": seed(8, negotiation, features_reply),
        "header-in-bytes": seed(1, early_enable + set_features, features_reply),
        "oversized": seed(0, set_owner + oversized, features_reply),
        "daemon-talks-first": seed(4 | 1 | (11 << 4), b"", features_reply * 3),
    })


# --- oci_unpack -------------------------------------------------------------

def tar_bytes(entries, fmt=tarfile.GNU_FORMAT):
    """entries: (name, kind, data or link target, extra) with kind one of
    file, dir, symlink, hardlink, fifo, chr; extra: dict of TarInfo fields."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for name, kind, payload, extra in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            info.mode = 0o755 if kind == "dir" else 0o644
            body = None
            if kind == "file":
                body = payload.encode() if isinstance(payload, str) else payload
                info.size = len(body)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = payload
            for k, v in (extra or {}).items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(body) if body is not None else None)
    # Drop the zero padding tarfile adds past the two end blocks.
    data = out.getvalue()
    return data.rstrip(b"\0") + bytes(1024 + (-len(data.rstrip(b"\0"))) % 512)


def gnu_sparse(name, hole, data):
    """A GNU sparse file entry (type S): `hole` bytes of zeros, then `data`
    (512 bytes), in a tar of its own. tarfile cannot write these."""
    assert len(data) == 512

    def octal(n, width):
        field = ("%0*o" % (width - 1, n)).encode() + b"\0"
        assert len(field) == width
        return field

    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = octal(0o644, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = octal(len(data), 12)  # bytes stored in the archive
    h[136:148] = octal(1_600_000_000, 12)
    h[156:157] = b"S"
    h[257:265] = b"ustar  \0"  # the old GNU magic and version
    h[386:398] = octal(hole, 12)  # sparse[0].offset
    h[398:410] = octal(len(data), 12)  # sparse[0].numbytes
    h[483:495] = octal(hole + len(data), 12)  # realsize
    h[148:156] = b" " * 8
    h[148:156] = ("%06o" % sum(h)).encode() + b"\0 "
    return bytes(h) + data + bytes(1024)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_archive(layer):
    """An OCI archive (a tar of an image layout) with one plain tar layer."""
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
    }, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(layer), "size": len(layer)}],
    }, separators=(",", ":")).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": sha256(manifest), "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }, separators=(",", ":")).encode()
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    for blob in (config, manifest, layer):
        files.append(("blobs/sha256/" + sha256(blob)[7:], blob))
    return tar_bytes([(name, "file", data, None) for name, data in files],
                     fmt=tarfile.USTAR_FORMAT)


def oci_unpack():
    base = tar_bytes([
        ("etc/", "dir", None, None),
        ("etc/hostname", "file", "capsid\n", None),
        ("bin/busybox", "file", "#!/bin/sh\n", {"mode": 0o755}),
        ("bin/sh", "symlink", "busybox", None),
        ("bin/ls", "hardlink", "bin/busybox", None),
        ("lib", "symlink", "/usr/lib", None),
        ("usr/lib/", "dir", None, None),
        ("lib/libc.so", "file", "elf", None),
    ])
    upper = tar_bytes([
        ("etc/.wh.hostname", "file", "", None),
        ("usr/.wh..wh..opq", "file", "", None),
        ("usr/new", "file", "new", None),
        ("bin/sh", "file", "replaced", None),
    ])
    special = tar_bytes([
        ("dev/", "dir", None, None),
        ("dev/null", "chr", (1, 3), None),
        ("run/fifo", "fifo", None, None),
        ("owned", "file", "x", {"uid": 4000000, "gid": 7,
                                "pax_headers": {"SCHILY.xattr.user.capsid": "yes",
                                                "mtime": "1700000000.25"}}),
    ], fmt=tarfile.PAX_FORMAT)
    sparse = gnu_sparse("sparse", hole=4096, data=b"tail" * 128)
    # A directory recorded, then its parent replaced by a symlink that
    # climbs out of the root on the host: its time must not be set there.
    dir_behind_symlink = tar_bytes([
        ("a/", "dir", None, None),
        ("a/canary/", "dir", None, None),
        ("a", "symlink", "..", None),
    ])
    # Entries that must be refused: each climbs out of the root.
    escapes = {
        "dotdot": [("../canary/x", "file", "x", None)],
        "absolute": [("/etc/evil", "file", "x", None)],
        "through-symlink": [("up", "symlink", "../../..", None),
                            ("up/canary/evil", "file", "x", None)],
        "hardlink": [("hl", "hardlink", "../canary", None)],
    }

    def layers(control, *blobs):
        out = bytearray([control])
        for blob in blobs[:-1]:
            out += struct.pack("<H", len(blob)) + blob
        return bytes(out + blobs[-1])

    gz = gzip.compress(base, mtime=0)
    write_seeds("oci_unpack", {
        "layout-one-layer": layers(1, base),
        "layout-two-layers-whiteouts": layers(1 | (1 << 1), base, upper),
        "layout-gzip-layer": layers(1 | 8, gz),
        "layout-devices-pax": layers(1, special),
        "layout-dir-behind-symlink": layers(1, dir_behind_symlink),
        "layout-gnu-sparse": layers(1, sparse),
        "archive": bytes([0]) + oci_archive(base),
        **{"layout-escape-" + name: layers(1, tar_bytes(entries))
           for name, entries in escapes.items()},
    })


# --- qmp_reply --------------------------------------------------------------

def qmp_reply():
    def lines(*objs):
        return b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objs)

    greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}},
                        "capabilities": ["oob"]}}
    ok = {"return": {}}
    event = {"event": "BALLOON_CHANGE", "data": {"actual": 1 << 30},
             "timestamp": {"seconds": 1, "microseconds": 2}}
    stats = {"return": {"stats": {"stat-swap-in": 0, "stat-swap-out": 0,
                                  "stat-major-faults": 5, "stat-minor-faults": 900,
                                  "stat-free-memory": 100 << 20, "stat-total-memory": 240 << 20,
                                  "stat-available-memory": 150 << 20,
                                  "stat-disk-caches": -1, "stat-htlb-pgalloc": 0},
                        "last-update": 1_700_000_000}}
    # control: bit 0 capsid-vmm, bit 1 set a target, bits 2-7: VM size.
    vm_256 = 63 << 2
    write_seeds("qmp_reply", {
        "qmp-status": bytes([vm_256]) + lines(greeting, ok, {"return": {"actual": 200 << 20}},
                                              ok, event, stats),
        "qmp-set-target": bytes([vm_256 | 2]) + lines(greeting, ok, event, ok),
        "qmp-error": bytes([vm_256 | 2]) + lines(greeting, ok, {
            "error": {"class": "GenericError", "desc": "No balloon device has been activated"}}),
        "qmp-never-updated": bytes([vm_256]) + lines(
            greeting, ok, {"return": {"actual": 1 << 40}}, ok,
            {"return": {"stats": {"stat-free-memory": -1}, "last-update": 0}}),
        "vmm-status": bytes([vm_256 | 1]) + lines({
            "ok": True, "target_pages": 16384, "actual_pages": 8192, "target_mib": 64,
            "actual_mib": 32, "stats": {"free_memory": 100 << 20, "total_memory": 240 << 20,
                                        "available_memory": 150 << 20, "disk_caches": 7,
                                        "major_faults": 1, "minor_faults": 2}}),
        "vmm-set-target": bytes([vm_256 | 1 | 2]) + lines({"ok": True}),
        "vmm-refused": bytes([vm_256 | 1 | 2]) + lines({"ok": False, "error": "no balloon"}),
    })


# --- agent_reply ------------------------------------------------------------

def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_int(field, value):
    return varint(field << 3) + varint(value) if value else b""


def pb_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint((field << 3) | 2) + varint(len(data)) + data


def ttrpc_response(payload=b"", code=0, message=""):
    status = pb_int(1, code) + (pb_bytes(2, message) if message else b"")
    return (pb_bytes(1, status) if status else b"") + (pb_bytes(2, payload) if payload else b"")


def ttrpc_frame(body, stream_id=1, kind=2):
    return struct.pack(">IIBB", len(body), stream_id, kind, 0) + body


def agent_reply():
    health = (pb_bytes(1, "0.1.0") + pb_int(2, 120_000_000) + pb_int(3, 900_000_000)
              + pb_int(4, 1_500_000_000))
    pid = pb_int(1, 42)
    wait = pb_int(1, 137) + pb_int(2, 1_700_000_000_000_000_000) + pb_int(3, 1)
    processes = (pb_bytes(1, pb_int(1, 1) + pb_bytes(3, "sh"))
                 + pb_bytes(1, pb_int(1, 7) + pb_bytes(2, "e1") + pb_bytes(3, "sleep 9")))
    stats = (pb_bytes(1, pb_int(1, 1000) + pb_int(2, 600) + pb_int(3, 400))
             + pb_bytes(2, pb_int(1, 50 << 20) + pb_int(2, (1 << 64) - 1) + pb_int(3, 30 << 20)
                        + pb_int(5, 1))
             + pb_bytes(3, pb_int(1, 3) + pb_int(2, 100))
             + pb_bytes(4, pb_int(1, 4096) + pb_int(2, 8192) + pb_int(3, 1) + pb_int(4, 2))
             + pb_bytes(5, pb_int(1, 256 << 20) + pb_int(2, 100 << 20) + pb_int(3, 150 << 20)))
    exited = pb_bytes(1, "c") + pb_bytes(2, pb_bytes(1, "e") + pb_int(2, 7) + pb_int(3, -1)
                                          + pb_int(4, 1_700_000_000_000_000_000))
    oom = pb_bytes(1, "c") + pb_bytes(3, b"")
    # Direct decoding: control = kind << 1 (kinds as in the target).
    direct = {
        "health": (0, health), "create": (1, pid), "start": (2, pid), "exec": (3, pid),
        "wait": (4, wait), "list": (5, processes), "stats": (6, stats), "event-exit": (7, exited),
        "event-oom": (7, oom), "empty": (8, b""),
    }
    seeds = {}
    for name, (kind, payload) in direct.items():
        seeds["response-" + name] = bytes([kind << 1]) + ttrpc_response(payload)
    seeds["response-error"] = bytes([4 << 1]) + ttrpc_response(code=5, message="no such process")
    # Through the client: control = call << 1 | 1 (calls as in the target).
    wire = {
        "health": (0, health), "start": (1, pid), "wait": (2, wait), "signal": (3, b""),
        "list": (5, processes), "stats": (6, stats), "next-event": (9, exited),
    }
    for name, (call, payload) in wire.items():
        seeds["wire-" + name] = bytes([(call << 1) | 1]) + ttrpc_frame(ttrpc_response(payload))
    seeds["wire-error"] = bytes([(6 << 1) | 1]) + ttrpc_frame(
        ttrpc_response(code=2, message="cgroup gone"))
    seeds["wire-wrong-stream-then-reply"] = bytes([(2 << 1) | 1]) + ttrpc_frame(
        ttrpc_response(wait), stream_id=3) + ttrpc_frame(ttrpc_response(wait))
    write_seeds("agent_reply", seeds)


def main():
    for make in (blk_request, vsock_packets, mmio_transport, net_tx, net_rx, balloon_stats,
                 vhost_user_relay, oci_unpack, qmp_reply, agent_reply):
        make()
    total = 0
    for root, _, files in os.walk(SEEDS):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"seeds in {SEEDS}: {total} bytes")


if __name__ == "__main__":
    main()
