#!/usr/bin/env python3
"""capsid-vmm start-up benchmark (not a test).

Measures, in one run and with the same guest kernel and initramfs:
  * capsid-vmm: launch (just before exec) -> first KVM_RUN of vCPU 0, with
    the kernel and initramfs loaded and every device of a capsid sandbox
    (vsock, rng, balloon) set up; and the VMM's own RSS, i.e. the resident
    memory of every mapping except guest RAM (whose host ranges the
    VMM's `metrics` reports);
  * QEMU microvm (-accel kvm, same kernel, initramfs and memory): launch ->
    its first KVM_RUN ioctl (QEMU's `kvm_vcpu_ioctl` trace event, type
    0xae80), i.e. its time to the first guest instruction; and its RSS
    excluding the guest RAM memfd.

Timestamps: capsid-vmm records CLOCK_MONOTONIC at its first KVM_RUN
(compared with time.monotonic_ns() taken just before spawning); QEMU's
trace log carries gettimeofday (compared with time.time_ns()).

Usage: benches/vmm-startup.py [--runs N] [--vmm PATH] [--kernel PATH]
         [--initramfs PATH] [--memory-mib N]
Build first: cargo build --release -p capsid-vmm; make kernel initramfs.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def control(path, request, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005)
    with s:
        s.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def smaps_rss_kib(pid, exclude):
    """Sum of Rss over mappings of `pid` for which exclude(start, end, name)
    is false."""
    total = 0
    keep = True
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                keep = not exclude(start, end, m.group(3))
            elif line.startswith("Rss:") and keep:
                total += int(line.split()[1])
    return total


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_capsid_vmm(args, workdir):
    api = os.path.join(workdir, "api.sock")
    config = {
        "vcpus": 1,
        "memory_mib": args.memory_mib,
        "boot": {"linux": {"kernel": args.kernel, "initramfs": args.initramfs, "cmdline": "quiet"}},
        "serial": os.path.join(workdir, "console.log"),
        "vsock": {"guest_cid": 3, "uds_path": os.path.join(workdir, "vsock.sock")},
        "rng": True,
        "balloon": {"deflate_on_oom": True, "free_page_reporting": True},
        "control_socket": api,
    }
    cfg = os.path.join(workdir, "vm.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    t0 = time.monotonic_ns()
    proc = subprocess.Popen([args.vmm, "--config", cfg], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            m = control(api, {"op": "metrics"})
            first = m.get("first_kvm_run_monotonic_ns")
            if first:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("capsid-vmm: no KVM_RUN within 10 s")
            time.sleep(0.0005)
        ranges = [(r["host_addr"], r["host_addr"] + r["size"]) for r in m["guest_memory"]]
        own = smaps_rss_kib(proc.pid, lambda s, e, _n: any(s < b and e > a for a, b in ranges))
        total = vm_rss_kib(proc.pid)
        return (first - t0) / 1e6, own, total
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_qemu(args, workdir):
    mem = f"{args.memory_mib}M"
    cmd = [
        args.qemu, "-M", "microvm,acpi=off,memory-backend=mem", "-accel", "kvm", "-cpu", "host",
        "-m", mem, "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "null",
        "-kernel", args.kernel, "-initrd", args.initramfs, "-append", "console=ttyS0 quiet",
        "-msg", "timestamp=on", "-trace", "kvm_vcpu_ioctl",
    ]
    t0 = time.time_ns()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = None
        for line in proc.stderr:
            m = re.match(r"^\d+@(\d+)\.(\d+):kvm_vcpu_ioctl cpu_index 0, type 0xae80", line)
            if m:
                first = int(m.group(1)) * 10**9 + int(m.group(2)) * 1000
                break
        if first is None:
            raise RuntimeError("QEMU: no KVM_RUN in its trace")
        own = smaps_rss_kib(proc.pid, lambda _s, _e, n: "memfd:mem" in n)
        total = vm_rss_kib(proc.pid)
        return (first - t0) / 1e6, own, total
    finally:
        proc.kill()
        proc.wait()


def summary(name, results):
    ms = [r[0] for r in results]
    own = [r[1] for r in results]
    total = [r[2] for r in results]
    print(f"{name:<22} launch->first KVM_RUN: median {statistics.median(ms):7.2f} ms "
          f"(min {min(ms):.2f}, max {max(ms):.2f}); own RSS median {statistics.median(own) / 1024:6.2f} MiB "
          f"(total RSS {statistics.median(total) / 1024:.2f} MiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--vmm", default=os.path.join(ROOT, "target/release/capsid-vmm"))
    p.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    p.add_argument("--kernel", default=os.path.join(ROOT, "build/kernel/vmlinux"))
    p.add_argument("--initramfs", default=os.path.join(ROOT, "build/initramfs.cpio.gz"))
    p.add_argument("--memory-mib", type=int, default=256)
    args = p.parse_args()
    for path in (args.vmm, args.kernel, args.initramfs):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing (cargo build --release -p capsid-vmm; make kernel initramfs)")
    vmm, qemu = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            vmm.append(run_capsid_vmm(args, d))
        with tempfile.TemporaryDirectory() as d:
            qemu.append(run_qemu(args, d))
    print(f"{args.runs} runs each, alternating; kernel {args.kernel}, initramfs {args.initramfs}, "
          f"{args.memory_mib} MiB, 1 vCPU")
    summary("capsid-vmm", vmm)
    summary("QEMU microvm (KVM)", qemu)


if __name__ == "__main__":
    main()
