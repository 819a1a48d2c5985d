#!/usr/bin/env python3
"""Docker Engine start-up benchmark (not a test): capsid against runc.

Runs `docker run --rm --runtime R capsid/busybox:latest true` N times per
runtime, alternating, against one private dockerd 26.1 on a private
containerd 1.7 (Debian 13's, unpacked by contrib/clients/fetch.sh), both in
a network namespace of their own, and prints the median and minimum wall
time per runtime. One warm-up run per runtime comes first (dockerd's and
containerd's first task are slow, and capsid builds the image's rootfs
disk then); every capsid run after it must be a rootfs cache hit, which is
counted from the shim's "rootfs cache hit" log lines.

Usage: benches/docker-run.py [--runs N] [--backend auto|qemu-tcg|qemu-kvm|capsid-vmm]
         [--json FILE]
Build first: make assets clients; cargo build --release --workspace
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "capsid/busybox:latest"


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


class Daemons:
    """containerd 1.7 + dockerd in a network namespace, torn down by stop()."""

    def __init__(self, clients, capsid_config):
        self.dir = tempfile.mkdtemp(prefix="capsid-docker-bench")
        d = self.dir
        self.netns = f"capsid-bench-{os.getpid()}"
        sh("ip", "netns", "add", self.netns)
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        shims = f"{d}/shims"
        os.makedirs(shims)
        os.symlink(f"{REPO}/target/release/containerd-shim-capsid-v2",
                   f"{shims}/containerd-shim-capsid-v2")
        with open(f"{d}/containerd.toml", "w") as f:
            f.write(f"""version = 2
root = "{d}/ctrd-root"
state = "{d}/ctrd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
""")
        with open(f"{d}/daemon.json", "w") as f:
            json.dump({"runtimes": {"capsid": {
                "runtimeType": "io.containerd.capsid.v2",
                "options": {"ConfigPath": capsid_config}}}}, f)
        env = dict(os.environ)
        env["PATH"] = ":".join([shims, f"{clients}/usr/bin", f"{clients}/usr/sbin", env["PATH"]])
        self.ctrd_log = f"{d}/containerd.log"
        self.procs = []
        nsenter = ["nsenter", f"--net=/run/netns/{self.netns}"]
        self.procs.append(subprocess.Popen(
            nsenter + [f"{clients}/usr/bin/containerd", "--config", f"{d}/containerd.toml"],
            stdout=open(self.ctrd_log, "w"), stderr=subprocess.STDOUT, env=env))
        time.sleep(1)
        self.sock = f"unix://{d}/docker.sock"
        self.procs.append(subprocess.Popen(
            nsenter + [f"{clients}/usr/sbin/dockerd", "--config-file", f"{d}/daemon.json",
                       "--containerd", f"{d}/containerd.sock", "--data-root", f"{d}/data",
                       "--exec-root", f"{d}/exec", "--pidfile", f"{d}/dockerd.pid",
                       "-H", self.sock],
            stdout=open(f"{d}/dockerd.log", "w"), stderr=subprocess.STDOUT, env=env))
        self.docker_bin = f"{clients}/usr/bin/docker"
        deadline = time.time() + 60
        while self.docker("version", check=False).returncode != 0:
            if time.time() > deadline:
                sys.exit("dockerd did not come up")
            time.sleep(0.2)

    def docker(self, *args, check=True):
        return sh(self.docker_bin, "-H", self.sock, *args, check=check)

    def stop(self):
        out = self.docker("ps", "-aq", check=False).stdout.split()
        if out:
            self.docker("rm", "-f", *out, check=False)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        mounts = [l.split()[1] for l in open("/proc/self/mounts") if self.dir in l.split()[1]]
        for m in sorted(mounts, key=len, reverse=True):
            sh("umount", "-l", m, check=False)
        sh("ip", "netns", "del", self.netns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--backend", default="qemu-tcg")
    ap.add_argument("--json", help="write the samples and summary here")
    args = ap.parse_args()

    clients = sh("bash", f"{REPO}/contrib/clients/fetch.sh", "trixie").stdout.strip()
    work = tempfile.mkdtemp(prefix="capsid-docker-bench-state")
    build = f"{REPO}/build"
    config = f"{work}/capsid.toml"
    backend = "" if args.backend == "auto" else f'[backend]\nkind = "{args.backend}"\n'
    with open(config, "w") as f:
        f.write(f"""[paths]
kernel = "{build}/kernel/vmlinux"
bzimage = "{build}/kernel/bzImage"
initramfs = "{build}/initramfs.cpio.gz"
images_dir = "{build}/images"
cache_dir = "{work}/cache"
state_dir = "{work}/run"
vmm = "{REPO}/target/release/capsid-vmm"
vhost = "{REPO}/target/release/capsid-vhost"
{backend}""")
    daemons = Daemons(clients, config)
    try:
        daemons.docker("load", "-i", f"{build}/images/busybox.tar")
        runtimes = ["runc", "capsid"]
        for rt in runtimes:
            daemons.docker("run", "--rm", "--runtime", rt, IMAGE, "true")
        hits_before = open(daemons.ctrd_log).read().count("rootfs cache hit")
        samples = {rt: [] for rt in runtimes}
        for _ in range(args.runs):
            for rt in runtimes:
                t0 = time.monotonic()
                daemons.docker("run", "--rm", "--runtime", rt, IMAGE, "true")
                samples[rt].append((time.monotonic() - t0) * 1000)
        hits = open(daemons.ctrd_log).read().count("rootfs cache hit") - hits_before
    finally:
        daemons.stop()
        shutil.rmtree(work, ignore_errors=True)

    summary = {rt: {"median_ms": statistics.median(s), "min_ms": min(s), "runs": len(s)}
               for rt, s in samples.items()}
    print(f"docker run --rm --runtime R {IMAGE} true   ({args.runs} runs each, "
          f"capsid backend {args.backend})")
    print(f"{'runtime':<8} {'median ms':>10} {'min ms':>8}")
    for rt, s in summary.items():
        print(f"{rt:<8} {s['median_ms']:>10.0f} {s['min_ms']:>8.0f}")
    print(f"capsid rootfs cache hits after the warm-up: {hits} of {args.runs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "samples_ms": samples, "cache_hits": hits,
                       "backend": args.backend}, f, indent=1)
    if hits != args.runs:
        sys.exit("not every capsid run after the warm-up was a rootfs cache hit")


if __name__ == "__main__":
    main()
