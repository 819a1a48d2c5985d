#!/usr/bin/env python3
"""containerd start-up benchmark (not a test): capsid's shim against runc.

Runs `ctr run --rm IMAGE ID true` N times with each runtime, alternating,
against one private containerd (own root, state and sockets), and prints
median and min wall time per runtime. For capsid it also splits each run
by the shim's log lines (containerd copies them into its log):

  to-create     ctr launched -> the shim's Create began (containerd, shim
                `start`, daemon up)
  rootfs        snapshot -> cached disk (a cache hit after the warm-up)
  vm-spawn      the backend's processes spawned (QEMU, device backends)
  boot          guest kernel boot until its agent started (inside the guest)
  handshake     VM spawned -> agent connected, less the guest's boot
                (QEMU set-up, kernel load, vsock connection)
  in-guest      sandbox ready -> process exited (container create, start,
                run `true`, exit: agent RPCs and work inside the guest)
  stop          process exited -> task deleted (VM shutdown, cleanup)
  teardown      task deleted -> ctr exited (containerd, shim exit)

"outside the guest" = to-create + rootfs + vm-spawn + handshake + stop +
teardown: what the shim, the backend start and the agent handshake cost
on the host.

Usage: benches/shim-startup.py [--runs N] [--shim PATH] [--vhost PATH]
         [--backend auto|qemu-tcg|qemu-kvm|capsid-vmm]
Build first: make assets; cargo build --release -p containerd-shim-capsid-v2
-p capsid-devices (or pass debug binaries). Needs root, containerd, ctr, runc.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("CAPSID_BUILD_DIR", os.path.join(ROOT, "build"))
IMAGE = "docker.io/capsid/busybox:latest"


def binary(name, given):
    if given:
        return os.path.abspath(given)
    for profile in ("release", "debug"):
        path = os.path.join(ROOT, "target", profile, name)
        if os.path.exists(path):
            return path
    sys.exit(f"{name} is not built (cargo build --release -p ...)")


def log_time(line):
    """The timestamp of a shim log line (tracing's RFC 3339, UTC)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
    if not m:
        return None
    stamp = m.group(1)
    whole, frac = stamp.split(".")
    dt = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return dt.timestamp() + float("0." + frac)


def field(line, name):
    m = re.search(rf"\b{name}=(\d+)", line)
    return int(m.group(1)) if m else None


class Containerd:
    def __init__(self, capsid_config_text):
        self.dir = tempfile.mkdtemp(prefix="capsid-bench-ctrd")
        d = self.dir
        self.sock = f"{d}/containerd.sock"
        cfg = f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""
        with open(f"{d}/config.toml", "w") as f:
            f.write(cfg)
        self.capsid_config = f"{d}/capsid.toml"
        with open(self.capsid_config, "w") as f:
            f.write(capsid_config_text.replace("@DIR@", d))
        self.log_path = f"{d}/containerd.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["containerd", "--config", f"{d}/config.toml"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                sys.exit("containerd did not come up")
            time.sleep(0.05)

    def ctr(self, *args, check=True):
        return subprocess.run(["ctr", "-a", self.sock, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=check)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        mounts = open("/proc/self/mounts").read().split("\n")
        ours = sorted((l.split()[1] for l in mounts if l and self.dir in l.split()[1]),
                      key=len, reverse=True)
        for m in ours:
            subprocess.run(["umount", "-l", m])
        subprocess.run(["rm", "-rf", self.dir])


def timed_run(ctrd, runtime_args, cid):
    start = time.time()
    t0 = time.monotonic()
    r = subprocess.run(["ctr", "-a", ctrd.sock, "run", "--rm", *runtime_args, IMAGE, cid, "true"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"{cid} failed: {r.stderr}")
    return start, elapsed, time.time()


def capsid_phases(ctrd, cid, started, ended):
    """The phases of one capsid run, from the shim's lines in the log."""
    mine = re.compile(rf"(default-{re.escape(cid)}|container={re.escape(cid)})([\"\s]|$)")
    lines = [l for l in open(ctrd.log_path) if mine.search(l)]
    def first(text):
        return next((l for l in lines if text in l), None)
    create, ready = first(" create "), first("sandbox started")
    rootfs = first("rootfs cache hit") or first("rootfs disk built")
    exited, deleted = first("process exited"), first(" deleted")
    if not all((create, ready, rootfs, exited, deleted)):
        return None
    spawn, connected, boot = (field(ready, "vm_spawned_ms"), field(ready, "agent_connected_ms"),
                              field(ready, "guest_boot_ms"))
    p = {
        "to-create": (log_time(create) - started) * 1000,
        "rootfs": field(rootfs, "elapsed_ms"),
        "vm-spawn": spawn,
        "boot": boot,
        "handshake": connected - spawn - boot,
        "in-guest": (log_time(exited) - log_time(ready)) * 1000,
        "stop": (log_time(deleted) - log_time(exited)) * 1000,
        "teardown": (ended - log_time(deleted)) * 1000,
    }
    p["outside the guest"] = sum(p[k] for k in
                                 ("to-create", "rootfs", "vm-spawn", "handshake", "stop",
                                  "teardown"))
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--shim")
    ap.add_argument("--vhost")
    ap.add_argument("--backend", default="auto",
                    help="capsid backend: auto (as `capsid check` selects), qemu-tcg, ...")
    args = ap.parse_args()
    if args.runs < 1:
        sys.exit("--runs must be at least 1")
    shim = binary("containerd-shim-capsid-v2", args.shim)
    vhost = binary("capsid-vhost", args.vhost)
    config = f"""[paths]
kernel = "{BUILD}/kernel/vmlinux"
bzimage = "{BUILD}/kernel/bzImage"
initramfs = "{BUILD}/initramfs.cpio.gz"
images_dir = "{BUILD}/images"
cache_dir = "@DIR@/capsid-cache"
state_dir = "@DIR@/capsid-run"
vhost = "{vhost}"
[backend]
kind = "{args.backend}"
"""
    ctrd = Containerd(config)
    try:
        ctrd.ctr("images", "import", os.path.join(BUILD, "images", "busybox.tar"))
        runtimes = {
            "runc": ["--runtime", "io.containerd.runc.v2"],
            "capsid": ["--runtime", shim, "--runtime-config-path", ctrd.capsid_config],
        }
        # Warm-up: containerd's first task is slow, and capsid builds the
        # rootfs disk once.
        for name, rt in runtimes.items():
            timed_run(ctrd, rt, f"warm-{name}")
        times = {name: [] for name in runtimes}
        phases = []
        for i in range(args.runs):
            for name, rt in runtimes.items():
                cid = f"{name}-{i}"
                started, elapsed, ended = timed_run(ctrd, rt, cid)
                times[name].append(elapsed * 1000)
                if name == "capsid":
                    p = capsid_phases(ctrd, cid, started, ended)
                    if p:
                        phases.append(p)
        print(f"ctr run --rm {IMAGE} ID true, {args.runs} runs each, alternating "
              f"(shim {shim}, backend {args.backend})")
        print(f"{'runtime':<10}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
        for name, ts in times.items():
            print(f"{name:<10}{statistics.median(ts):>12.0f}{min(ts):>10.0f}{max(ts):>10.0f}")
        if phases:
            print(f"\ncapsid phases over {len(phases)} runs (median ms):")
            for key in phases[0]:
                print(f"  {key:<18}{statistics.median(p[key] for p in phases):>8.0f}")
    finally:
        ctrd.stop()


if __name__ == "__main__":
    main()
