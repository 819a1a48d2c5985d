#!/usr/bin/env python3
"""Builds capsid's test images as OCI image layouts, without a registry.

Images:
  busybox   one layer: Debian's static busybox, its applet symlinks and a
            minimal /etc.
  layered   the busybox layer plus two more exercising whiteouts and opaque
            directories; the final tree has /data/keep.txt (no gone.txt),
            /opaque/new.txt only, and /etc/layer reading "3".
  pause     registry.k8s.io/pause:3.9 for the CRI tests: one layer holding
            /pause, a static binary built with gcc from images/pause.c
            (reaps children, exits 0 on SIGINT/SIGTERM), run as 65535 with
            PATH set, as Kubernetes' own pause image is.

For each image NAME this writes DIR/NAME/ (an OCI image layout) and DIR/NAME.tar
(the same layout as an OCI archive, accepted by `ctr images import`). Every
timestamp, owner and ordering is fixed, so rebuilding yields identical digests.

  images/build-oci.py [--out DIR] [--only NAME]   (default DIR: build/images)
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSYBOX = "/bin/busybox"
REGISTRY_PREFIX = "docker.io/capsid/"
TAG = "latest"
MTIME = 0

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = """\
root:x:0:
user:x:1000:
nogroup:x:65534:
"""

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

IMAGE_CONFIG = {
    "Env": [PATH_ENV],
    "Cmd": ["/bin/sh"],
    "WorkingDir": "/",
}

# The pause image stands in for the one containerd's CRI plugin pulls as its
# sandbox_image; the tests import it, so nothing is ever pulled.
PAUSE_REF = "registry.k8s.io/pause:3.9"
PAUSE_SOURCE = os.path.join(REPO_ROOT, "images", "pause.c")
PAUSE_CONFIG = {
    "Env": [PATH_ENV],
    "Entrypoint": ["/pause"],
    "User": "65535:65535",
    "WorkingDir": "/",
}


class BuildError(Exception):
    pass


class Layer:
    """The entries of one layer tarball, keyed by path relative to /."""

    def __init__(self, description):
        self.description = description
        self.entries = {}

    def dir(self, path, mode=0o755, uid=0, gid=0):
        self._add(path, tarfile.DIRTYPE, mode, uid=uid, gid=gid)

    def file(self, path, data, mode=0o644):
        if isinstance(data, str):
            data = data.encode()
        self._add(path, tarfile.REGTYPE, mode, data=data)

    def symlink(self, path, target):
        self._add(path, tarfile.SYMTYPE, 0o777, linkname=target)

    def whiteout(self, path):
        head, name = os.path.split(path.strip("/"))
        self.file(os.path.join(head, ".wh." + name), b"")

    def opaque(self, path):
        self.file(os.path.join(path.strip("/"), ".wh..wh..opq"), b"")

    def _add(self, path, kind, mode, data=b"", linkname="", uid=0, gid=0):
        name = path.strip("/")
        if name in self.entries:
            raise BuildError(f"{self.description}: duplicate entry /{name}")
        self.entries[name] = (kind, mode, data, linkname, uid, gid)

    def tar(self):
        """The uncompressed layer: entries sorted by path component."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self.entries, key=lambda n: n.split("/")):
                kind, mode, data, linkname, uid, gid = self.entries[name]
                info = tarfile.TarInfo(name)
                info.type = kind
                info.mode = mode
                info.uid, info.gid = uid, gid
                info.uname = info.gname = ""
                info.mtime = MTIME
                info.linkname = linkname
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return buf.getvalue()


def gzip_bytes(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_dynamic_elf(path):
    """True if the ELF at path has a PT_INTERP program header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise BuildError(f"{path} is not a 64-bit ELF executable")
        order = "little" if head[5] == 1 else "big"
        phoff = int.from_bytes(head[32:40], order)
        phentsize = int.from_bytes(head[54:56], order)
        phnum = int.from_bytes(head[56:58], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize:i * phentsize + 4], order) == 3:
            return True
    return False


def busybox_layer():
    install_hint = "install it with: apt-get install busybox-static"
    if not os.path.isfile(BUSYBOX):
        raise BuildError(f"{BUSYBOX} not found; {install_hint}")
    if is_dynamic_elf(BUSYBOX):
        raise BuildError(f"{BUSYBOX} is dynamically linked; {install_hint}")
    listing = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True)
    applets = sorted({a for a in listing.stdout.split() if a and a != "busybox"})
    if not applets:
        raise BuildError(f"{BUSYBOX} --list printed no applets")
    with open(BUSYBOX, "rb") as f:
        binary = f.read()

    layer = Layer("busybox base")
    for d in ("bin", "etc", "home", "proc", "sbin", "sys", "dev", "usr", "usr/bin", "usr/sbin", "var"):
        layer.dir(d)
    layer.dir("root", 0o700)
    layer.dir("tmp", 0o1777)
    layer.dir("home/user", uid=1000, gid=1000)
    layer.file("bin/busybox", binary, 0o755)
    for applet in applets:
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", PASSWD)
    layer.file("etc/group", GROUP)
    return layer


def pause_layer():
    """/pause, compiled static (gcc and libc.a from build-essential)."""
    install_hint = "install it with: apt-get install build-essential"
    with tempfile.TemporaryDirectory(prefix="capsid-pause-") as tmp:
        binary = os.path.join(tmp, "pause")
        cmd = ["gcc", "-Os", "-static", "-s", "-Wl,--build-id=none", "-o", binary, PAUSE_SOURCE]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise BuildError(f"gcc not found; {install_hint}")
        except subprocess.CalledProcessError as e:
            raise BuildError(f"{' '.join(cmd)} failed ({install_hint}):\n{e.stderr}")
        if is_dynamic_elf(binary):
            raise BuildError(f"gcc -static made a dynamic executable of {PAUSE_SOURCE}")
        with open(binary, "rb") as f:
            data = f.read()
    layer = Layer("pause")
    layer.file("pause", data, 0o755)
    return layer


def layered_layers(base):
    files = Layer("layered: files")
    files.dir("data")
    files.file("data/keep.txt", "keep\n")
    files.file("data/gone.txt", "gone\n")
    files.dir("opaque")
    files.file("opaque/old1.txt", "old1\n")
    files.file("opaque/old2.txt", "old2\n")
    files.dir("etc")
    files.file("etc/layer", "2\n")

    deletions = Layer("layered: whiteout and opaque directory")
    deletions.dir("data")
    deletions.whiteout("data/gone.txt")
    deletions.dir("opaque")
    deletions.opaque("opaque")
    deletions.file("opaque/new.txt", "new\n")
    deletions.dir("etc")
    deletions.file("etc/layer", "3\n")
    return [base, files, deletions]


class Blobs:
    def __init__(self):
        self.blobs = {}

    def add(self, media_type, data, **extra):
        digest = sha256(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def image_layout(name, layers, ref=None, image_config=None):
    """Returns {relative path: bytes} for the OCI image layout of one image,
    named `ref` (default: REGISTRY_PREFIX + name + ":" + TAG)."""
    ref = ref or f"{REGISTRY_PREFIX}{name}:{TAG}"
    tag = ref.rsplit(":", 1)[1]
    blobs = Blobs()
    layer_descs, diff_ids = [], []
    for layer in layers:
        raw = layer.tar()
        diff_ids.append(sha256(raw))
        layer_descs.append(blobs.add(MT_LAYER, gzip_bytes(raw)))

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": image_config or IMAGE_CONFIG,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"capsid images/build-oci.py: {layer.description}"} for layer in layers],
    }
    config_desc = blobs.add(MT_CONFIG, canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    manifest_desc = blobs.add(
        MT_MANIFEST,
        canonical_json(manifest),
        platform={"architecture": "amd64", "os": "linux"},
        annotations={
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": tag,
        },
    )
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [manifest_desc]}

    # manifest.json is the `docker save` index: Docker Engine's graphdriver
    # store loads only that, containerd reads index.json (and takes the tag
    # from both); Docker >= 25 writes the same pair.
    docker_manifest = [{
        "Config": "blobs/sha256/" + config_desc["digest"].split(":", 1)[1],
        "RepoTags": [ref],
        "Layers": ["blobs/sha256/" + d["digest"].split(":", 1)[1] for d in layer_descs],
    }]
    files = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical_json(index),
        "manifest.json": canonical_json(docker_manifest),
    }
    for digest, data in blobs.blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    return manifest_desc, files


def write_layout(path, files):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        dest = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def write_archive(path, files):
    entries = {}
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            entries["/".join(parts[:i])] = None
        entries[rel] = data

    tmp = path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries, key=lambda n: n.split("/")):
            data = entries[name]
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = MTIME
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def build(name, layers, out, ref=None, image_config=None):
    manifest_desc, files = image_layout(name, layers, ref, image_config)
    write_layout(os.path.join(out, name), files)
    archive = os.path.join(out, name + ".tar")
    write_archive(archive, files)
    print(f"{name:<8} {manifest_desc['digest']}  {len(layers)} layer(s)  "
          f"{os.path.getsize(archive)} bytes  {archive}")


def main():
    images = ("busybox", "layered", "pause")
    parser = argparse.ArgumentParser(
        description="Build capsid's test OCI images (image layout directory and OCI archive per image).")
    parser.add_argument("--out", metavar="DIR", default=os.path.join(REPO_ROOT, "build", "images"),
                        help="output directory (default: build/images in the repository)")
    parser.add_argument("--only", metavar="NAME", choices=images, help="build just this image: " + ", ".join(images))
    args = parser.parse_args()

    try:
        base = busybox_layer()
        recipes = {
            "busybox": lambda: ([base], None, None),
            "layered": lambda: (layered_layers(base), None, None),
            "pause": lambda: ([pause_layer()], PAUSE_REF, PAUSE_CONFIG),
        }
        os.makedirs(args.out, exist_ok=True)
        for name in images:
            if args.only in (None, name):
                layers, ref, image_config = recipes[name]()
                build(name, layers, args.out, ref, image_config)
    except BuildError as e:
        print(f"build-oci: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
