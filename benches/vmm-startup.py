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

Reported for each: min, median, p90 (nearest rank) and max, since a
start-up tail matters as much as the median. With --per-run, every
capsid-vmm run is printed with the CPU time its process had spent by the
first KVM_RUN (total, and the part spent by threads that had already
exited, i.e. the kernel loader; clock ticks, so 10 ms steps) and the
change of the host's THP and compaction counters in /proc/vmstat across
the run (host-wide: other work on the machine counts too). A slow run
with little CPU waited for a core; one with compact_stall counts paid for
memory compaction.

Usage: benches/vmm-startup.py [--runs N] [--vmm PATH] [--kernel PATH]
         [--initramfs PATH] [--memory-mib N] [--per-run] [--no-qemu]
         [--pause SECONDS]
Build first: cargo build --release -p capsid-vmm; make kernel initramfs.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from vmm_bench import control, percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




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


VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_fail",
               "allocstall_normal", "allocstall_movable")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def vmstat():
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in VMSTAT_KEYS:
                out[k] = int(v)
    return out


def cpu_ms(stat_path):
    """utime + stime of a /proc stat file, in ms."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


def cpu_split_ms(pid):
    """(CPU of the whole process, CPU of its threads that have exited), ms.
    A process's stat counts its dead threads; its tasks' stats do not."""
    total = cpu_ms(f"/proc/{pid}/stat")
    live = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            live += cpu_ms(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            pass
    return total, max(total - live, 0.0)


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
    before = vmstat()
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
        cpu = cpu_split_ms(proc.pid)
        after = vmstat()
        ranges = [(r["host_addr"], r["host_addr"] + r["size"]) for r in m["guest_memory"]]
        own = smaps_rss_kib(proc.pid, lambda s, e, _n: any(s < b and e > a for a, b in ranges))
        total = vm_rss_kib(proc.pid)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in VMSTAT_KEYS}
        return (first - t0) / 1e6, own, total, cpu, delta
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
    median = statistics.median(ms)
    p90 = percentile(ms, 90)
    print(f"{name:<22} launch->first KVM_RUN: min {min(ms):.2f}, median {median:.2f}, "
          f"p90 {p90:.2f}, max {max(ms):.2f} ms (p90/median {p90 / median:.2f}); "
          f"own RSS median {statistics.median(own) / 1024:.2f} MiB "
          f"(total RSS {statistics.median(total) / 1024:.2f} MiB)")


def per_run(results):
    print("capsid-vmm per run: ms, CPU ms (all threads / exited threads), "
          "host vmstat deltas")
    for i, (ms, _own, _total, (cpu, dead), delta) in enumerate(results):
        counters = " ".join(f"{k}={v}" for k, v in delta.items() if v)
        print(f"  {i:3d} {ms:8.2f} ms  cpu {cpu:6.1f} / {dead:6.1f}  {counters}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--vmm", default=os.path.join(ROOT, "target/release/capsid-vmm"))
    p.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    p.add_argument("--kernel", default=os.path.join(ROOT, "build/kernel/vmlinux"))
    p.add_argument("--initramfs", default=os.path.join(ROOT, "build/initramfs.cpio.gz"))
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--per-run", action="store_true",
                   help="print every capsid-vmm run with its CPU time and vmstat deltas")
    p.add_argument("--no-qemu", action="store_true", help="measure capsid-vmm only")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds to sleep before each capsid-vmm run (a few seconds let the "
                        "host reclaim or report what the previous run freed, as between "
                        "sandboxes started one at a time)")
    args = p.parse_args()
    for path in (args.vmm, args.kernel, args.initramfs):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing (cargo build --release -p capsid-vmm; make kernel initramfs)")
    vmm, qemu = [], []
    for _ in range(args.runs):
        time.sleep(args.pause)
        with tempfile.TemporaryDirectory() as d:
            vmm.append(run_capsid_vmm(args, d))
        if not args.no_qemu:
            with tempfile.TemporaryDirectory() as d:
                qemu.append(run_qemu(args, d))
    print(f"{args.runs} runs each, alternating; kernel {args.kernel}, initramfs {args.initramfs}, "
          f"{args.memory_mib} MiB, 1 vCPU; load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if args.per_run:
        per_run(vmm)
    summary("capsid-vmm", vmm)
    if qemu:
        summary("QEMU microvm (KVM)", qemu)


if __name__ == "__main__":
    main()
