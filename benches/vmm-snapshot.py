#!/usr/bin/env python3
"""capsid-vmm snapshot restore benchmark (not a test).

Boots one VM, pauses it, snapshots it (control API `snapshot`), and
restores that snapshot N times, one new capsid-vmm process each time
(`capsid-vmm --restore STATE --memory MEM --config CONFIG`, the config
giving each restored VM its own console, control socket and vsock socket).
Each restore is measured from launch (just before exec) to the restored
VM's first KVM_RUN (`first_kvm_run_monotonic_ns` in the VMM's `metrics`,
CLOCK_MONOTONIC, compared with time.monotonic_ns() taken before
spawning), as benches/vmm-startup.py measures a boot; the restored VM is
then ended with SIGTERM.

The VM has the devices of a capsid sandbox (vsock, rng, balloon). By
default it boots a tiny guest assembled here with GNU as/ld (binutils),
which touches --touch-mib of its RAM and then prints a dot now and then:
it runs under any KVM, PVM included. --kernel (and --initramfs) boot a
real kernel instead, snapshotted --boot-wait seconds after start (the
capsid guest kernel needs hardware-assisted KVM).

Reported: the snapshot (state file size, guest RAM written, time taken)
and the restores' min, median, p90 (nearest rank) and max; --per-run
prints every restore.

Usage: benches/vmm-snapshot.py [--runs N] [--vmm PATH] [--memory-mib N]
         [--touch-mib N] [--kernel PATH [--initramfs PATH] [--boot-wait S]]
         [--per-run]
Build first: cargo build --release -p capsid-vmm.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from vmm_bench import control, percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny guest: entered in 64-bit mode by capsid-vmm's boot protocol
# (an ELF without a PVH note), it fills TOUCH_MIB MiB from 16 MiB up,
# prints "UP", then a dot every few million pauses.
GUEST = r"""
    .intel_syntax noprefix
    .text
    .global _start
_start:
    mov rdi, 0x1000000
    mov rcx, TOUCH_BYTES / 8
    mov rax, 0x0101010101010101
    rep stosq
    mov dx, 0x3f8
    mov al, 'U'
    out dx, al
    mov al, 'P'
    out dx, al
    mov al, 10
    out dx, al
1:  mov ecx, 5000000
2:  pause
    dec ecx
    jnz 2b
    mov al, '.'
    out dx, al
    jmp 1b
"""

LINKER_SCRIPT = """
ENTRY(_start)
SECTIONS {
    .text 0x100000 : { *(.text*) *(.rodata*) *(.data*) }
    .bss : { *(.bss*) }
    /DISCARD/ : { *(.comment) *(.note.gnu*) *(.eh_frame*) }
}
"""


def assemble_guest(workdir, touch_mib):
    src = os.path.join(workdir, "guest.s")
    obj = os.path.join(workdir, "guest.o")
    lds = os.path.join(workdir, "guest.ld")
    elf = os.path.join(workdir, "guest.elf")
    with open(src, "w") as f:
        f.write(f".equ TOUCH_BYTES, {touch_mib << 20}\n{GUEST}")
    with open(lds, "w") as f:
        f.write(LINKER_SCRIPT)
    subprocess.run(["as", "--64", "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "--build-id=none",
                    "-T", lds, "-o", elf, obj], check=True)
    return elf




def vm_config(args, boot, workdir, tag):
    """The VM's config, its host-side paths in `workdir` named by `tag`."""
    return {
        "vcpus": 1,
        "memory_mib": args.memory_mib,
        "boot": boot,
        "serial": os.path.join(workdir, f"{tag}.console"),
        "vsock": {"guest_cid": 3, "uds_path": os.path.join(workdir, f"{tag}.vsock")},
        "rng": True,
        "balloon": {"deflate_on_oom": True, "free_page_reporting": True},
        "control_socket": os.path.join(workdir, f"{tag}.api"),
    }


def write_config(config, workdir, tag):
    path = os.path.join(workdir, f"{tag}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_console(path, text, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"capsid-vmm exited ({proc.returncode}) before its guest printed {text!r}")
        try:
            with open(path) as f:
                if text in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.005)
    sys.exit(f"the guest did not print {text!r} within {timeout} s")


def take_snapshot(args, boot, workdir):
    config = vm_config(args, boot, workdir, "source")
    cfg = write_config(config, workdir, "source")
    proc = subprocess.Popen([args.vmm, "--config", cfg], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if args.kernel:
            time.sleep(args.boot_wait)
        else:
            wait_console(config["serial"], "UP\n", proc, 30)
        r = control(config["control_socket"], {"op": "pause"})
        if not r.get("ok"):
            sys.exit(f"pause failed: {r}")
        state = os.path.join(workdir, "vm.state")
        memory = os.path.join(workdir, "vm.mem")
        r = control(config["control_socket"], {"op": "snapshot", "state": state, "memory": memory},
                    timeout=60)
        if not r.get("ok"):
            sys.exit(f"snapshot failed: {r}")
        return state, memory, r
    finally:
        stop(proc)


def restore_once(args, boot, workdir, state, memory, run):
    tag = f"restore{run}"
    config = vm_config(args, boot, workdir, tag)
    cfg = write_config(config, workdir, tag)
    t0 = time.monotonic_ns()
    proc = subprocess.Popen([args.vmm, "--restore", state, "--memory", memory, "--config", cfg],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                sys.exit(f"restore {run}: capsid-vmm exited ({proc.returncode}): "
                         f"{proc.stderr.read().decode().strip()}")
            m = control(config["control_socket"], {"op": "metrics"})
            first = m.get("first_kvm_run_monotonic_ns")
            if first:
                return (first - t0) / 1e6
            if time.monotonic() > deadline:
                sys.exit(f"restore {run}: no KVM_RUN within 10 s")
            time.sleep(0.0005)
    finally:
        stop(proc)
        for suffix in ("console", "json"):
            try:
                os.unlink(os.path.join(workdir, f"{tag}.{suffix}"))
            except OSError:
                pass




def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--vmm", default=os.path.join(ROOT, "target/release/capsid-vmm"))
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--touch-mib", type=int, default=64,
                   help="MiB of RAM the tiny guest fills before the snapshot")
    p.add_argument("--kernel", help="boot this kernel instead of the tiny guest")
    p.add_argument("--initramfs", help="with --kernel")
    p.add_argument("--boot-wait", type=float, default=5.0,
                   help="with --kernel: seconds between start and snapshot")
    p.add_argument("--per-run", action="store_true", help="print every restore")
    args = p.parse_args()
    if not os.path.exists(args.vmm):
        sys.exit(f"{args.vmm} is missing (cargo build --release -p capsid-vmm)")
    if not args.kernel and args.touch_mib + 16 > args.memory_mib:
        sys.exit("--touch-mib must leave the guest's first 16 MiB: raise --memory-mib")
    with tempfile.TemporaryDirectory() as workdir:
        if args.kernel:
            linux = {"kernel": os.path.abspath(args.kernel), "cmdline": "quiet"}
            if args.initramfs:
                linux["initramfs"] = os.path.abspath(args.initramfs)
            boot = {"linux": linux}
            guest = args.kernel
        else:
            boot = {"linux": {"kernel": assemble_guest(workdir, args.touch_mib)}}
            guest = f"tiny guest touching {args.touch_mib} MiB"
        state, memory, snap = take_snapshot(args, boot, workdir)
        times = [restore_once(args, boot, workdir, state, memory, run) for run in range(args.runs)]
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"{args.runs} restores of one snapshot; {guest}, {args.memory_mib} MiB, 1 vCPU, "
          f"vsock + rng + balloon; load average {load}")
    print(f"snapshot: state file {snap['state_bytes'] / 1024:.1f} KiB, guest RAM "
          f"{snap['memory_bytes'] >> 20} MiB of which {snap['memory_written_bytes'] / (1 << 20):.1f} "
          f"MiB written, took {snap['took_us'] / 1000:.1f} ms")
    if args.per_run:
        for i, ms in enumerate(times):
            print(f"  {i:3d} {ms:8.2f} ms")
    median = statistics.median(times)
    print(f"capsid-vmm --restore   launch->first KVM_RUN: min {min(times):.2f}, median {median:.2f}, "
          f"p90 {percentile(times, 90):.2f}, max {max(times):.2f} ms")


if __name__ == "__main__":
    main()
