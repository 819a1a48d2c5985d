#!/usr/bin/env python3
"""virtio-fs volume benchmark (not a test): a share against the host.

Runs `capsid-guest-tool iobench` (tests/guest-tool) three ways, --runs
times each, in this order every run:

  host         natively on the host, in a temp dir
  share        in a guest, on that same dir mounted through virtio-fs:
               capsid run -v DIR:/data -v TOOLDIR:/tools:ro busybox --
               /tools/capsid-guest-tool iobench /data ...
  guest-local  in a guest, on the container's own rootfs (/tmp: the
               guest's overlay, in guest RAM), for reference

iobench measures sequential write (1 MiB writes, then fsync), sequential
read of read.bin (random data this script writes first, so the guest has
never read it; then again through a new open, then again on that same
open), random 4 KiB reads of read.bin and writes into the written file
(xorshift offsets, fixed seed; writes then fsync), and creating, stat-ing
and unlinking --files small files. guest-local has no read.bin: it reads
back the file it wrote.

Then one more guest per run watches files on the share while the host
changes them: a file rewritten in place (longer each time), a file
replaced by rename, and, as a kubelet updates a configMap, the `..data`
symlink of an atomic-writer directory swapped to a new timestamped
directory (the old one removed). The guest polls each name in a shell
loop (`read v < FILE`) and prints what it sees; the host notes how long
after each change the guest's line arrives (that includes the poll loop
and the way back of the container's stdout).

Prints the median of each metric per side, and share as % of host. A
guest value marked * comes from phases shorter than 50 ms: under TCG the
guest's clocksource is refined-jiffies, which moves in ticks of a few ms.
--cache writes `[volumes] cache = "..."` into a copy of --config
(virtiofsd's --cache: auto is capsid's default). Any failed run fails the
script.

Usage: benches/volumes.py --config FILE [--runs N] [--size-mib N] [--ops N]
         [--files N] [--cache never|auto|always] [--changes N]
         [--change-timeout SECS] [--capsid PATH] [--tool PATH] [--dir DIR] [--json FILE]
Build first: cargo build -p capsid; make guest-tool
"""

import argparse
import json
import os
import queue
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release", "capsid-guest-tool")
SIDES = ("host", "share", "guest-local")
# (iobench test, metric, label) in table order.
METRICS = (
    ("seq_write", "mib_s", "seq write + fsync (MiB/s)"),
    ("seq_read", "mib_s", "seq read, first (MiB/s)"),
    ("seq_reread", "mib_s", "seq read again, new open (MiB/s)"),
    ("seq_reread_same_fd", "mib_s", "seq read again, same open (MiB/s)"),
    ("rand_read", "iops", "rand 4 KiB read (IOPS)"),
    ("rand_write", "iops", "rand 4 KiB write + fsync (IOPS)"),
    ("create", "ops_s", "create 64 B files (ops/s)"),
    ("stat", "ops_s", "stat (ops/s)"),
    ("unlink", "ops_s", "unlink (ops/s)"),
)
CHANGES = ("inplace", "renamed", "configmap")
# The guest's watcher: prints `seen NAME VALUE` whenever a name reads
# differently, until /data/stop exists.
WATCH = """a=; b=; c=
while :; do
  read x < /data/inplace || x=error
  [ "$x" != "$a" ] && { echo "seen inplace $x"; a=$x; }
  read x < /data/renamed || x=error
  [ "$x" != "$b" ] && { echo "seen renamed $x"; b=$x; }
  read x < /data/config || x=error
  [ "$x" != "$c" ] && { echo "seen configmap $x"; c=$x; }
  [ -e /data/stop ] && break
done
echo stopped"""


def binary(given, default, what):
    path = os.path.abspath(given or default)
    if not os.path.exists(path):
        sys.exit(f"{what} not found at {path}")
    return path


def capsid_binary(given):
    if given:
        return binary(given, None, "capsid")
    for profile in ("release", "debug"):
        path = os.path.join(ROOT, "target", profile, "capsid")
        if os.path.exists(path):
            return path
    sys.exit("capsid is not built (cargo build -p capsid)")


def config_copy(src, cache, workdir):
    """--config, or a copy of it whose [volumes] says `cache`."""
    if cache is None:
        return src
    with open(src) as f:
        text = f.read()
    # Drop an existing [volumes] table (up to the next table header).
    text = re.sub(r"(?ms)^\[volumes\][^\[]*", "", text)
    path = os.path.join(workdir, "config.toml")
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + f'\n[volumes]\ncache = "{cache}"\n')
    return path


def parse_iobench(out, what):
    results = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            obj = json.loads(line)
            results[obj["test"]] = obj
    missing = [t for t, _, _ in METRICS if t not in results]
    if missing:
        raise RuntimeError(f"{what}: no result for {', '.join(missing)}:\n{out}")
    return results


def run(cmd, what, timeout=900):
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit status {r.returncode}): {' '.join(cmd)}\n"
                           f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r.stdout


def atomic_write(d, n):
    """The kubelet's atomic writer: a new timestamped dir, `..data` swapped
    to it by rename, the previous dir removed."""
    new = f"..v{n}"
    os.mkdir(os.path.join(d, new))
    with open(os.path.join(d, new, "config"), "w") as f:
        f.write(f"v{n}\n")
    tmp = os.path.join(d, "..data_tmp")
    os.symlink(new, tmp)
    os.rename(tmp, os.path.join(d, "..data"))
    old = os.path.join(d, f"..v{n - 1}")
    if os.path.isdir(old):
        shutil.rmtree(old)


def value(kind, n):
    # The in-place file grows with every change: a guest holding its old
    # size reads a cut line.
    return f"v{n}" + "." * (8 * n) if kind == "inplace" else f"v{n}"


def change(d, kind, n):
    if kind == "inplace":
        # One write at offset 0, longer than before, same inode.
        with open(os.path.join(d, "inplace"), "r+") as f:
            f.write(value(kind, n) + "\n")
    elif kind == "renamed":
        with open(os.path.join(d, "renamed.tmp"), "w") as f:
            f.write(f"v{n}\n")
        os.rename(os.path.join(d, "renamed.tmp"), os.path.join(d, "renamed"))
    else:
        atomic_write(d, n)


def coherence(capsid, config, workdir, changes, timeout, rng):
    """One guest watching host changes; {kind: [latency seconds or None]}."""
    d = os.path.join(workdir, "watch")
    shutil.rmtree(d, ignore_errors=True)
    os.mkdir(d)
    for name in ("inplace", "renamed"):
        with open(os.path.join(d, name), "w") as f:
            f.write(value(name, 1) + "\n")
    atomic_write(d, 1)
    os.symlink("..data/config", os.path.join(d, "config"))
    guest_timeout = 60 + changes * len(CHANGES) * (timeout + 2)
    cmd = [capsid, "--config", config, "run", "-v", f"{d}:/data", "busybox", "--",
           "timeout", str(guest_timeout), "sh", "-c", WATCH]
    stderr = open(os.path.join(workdir, "watch.stderr"), "w+")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=stderr, text=True)

    def words():
        stderr.seek(0)
        return stderr.read()

    lines = queue.Queue()

    def reader():
        for line in p.stdout:
            lines.put((time.monotonic(), line.strip()))
        lines.put((time.monotonic(), None))

    threading.Thread(target=reader, daemon=True).start()

    def wait_for(wanted, deadline):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                at, line = lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                raise RuntimeError("the watching guest ended early: " + words())
            if line == wanted:
                return at

    seen = {kind: [] for kind in CHANGES}
    try:
        for kind in CHANGES:
            if wait_for(f"seen {kind} {value(kind, 1)}", time.monotonic() + 120) is None:
                raise RuntimeError(f"the watching guest never read {kind}")
        for n in range(2, changes + 2):
            for kind in CHANGES:
                time.sleep(rng.uniform(0.3, 1.3))
                changed = time.monotonic()
                change(d, kind, n)
                at = wait_for(f"seen {kind} {value(kind, n)}", changed + timeout)
                seen[kind].append(None if at is None else at - changed)
        open(os.path.join(d, "stop"), "w").close()
        status = p.wait(timeout=guest_timeout + 60)
        if status != 0:
            raise RuntimeError(f"the watching guest failed (exit status {status}): " + words())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        stderr.close()
    return seen


def fmt(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="capsid config (backend, paths)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=64, help="read.bin and the written file")
    ap.add_argument("--ops", type=int, default=2000, help="random reads, and writes")
    ap.add_argument("--files", type=int, default=500, help="small files for the metadata ops")
    ap.add_argument("--cache", choices=("never", "auto", "always"),
                    help="[volumes] cache for the share (default: as --config says)")
    ap.add_argument("--changes", type=int, default=3,
                    help="host changes of each kind per run watched from the guest (0: none)")
    ap.add_argument("--change-timeout", type=float, default=3.0,
                    help="seconds to wait for the guest to see a change")
    ap.add_argument("--capsid", help="capsid binary (default target/{release,debug}/capsid)")
    ap.add_argument("--tool", help=f"capsid-guest-tool (default {TOOL})")
    ap.add_argument("--dir", help="where the temp dir goes (default: $TMPDIR)")
    ap.add_argument("--json", help="write every run's results here")
    args = ap.parse_args()
    if min(args.runs, args.size_mib, args.ops, args.files) < 1 or args.changes < 0:
        sys.exit("--runs, --size-mib, --ops and --files must be at least 1, --changes 0 or more")
    capsid = capsid_binary(args.capsid)
    tool = binary(args.tool, TOOL, "capsid-guest-tool (make guest-tool)")
    workdir = tempfile.mkdtemp(prefix="capsid-volumes-", dir=args.dir)
    try:
        config = config_copy(os.path.abspath(args.config), args.cache, workdir)
        cache = args.cache
        if cache is None:
            m = re.search(r'(?ms)^\[volumes\][^\[]*?^cache\s*=\s*"(\w+)"', open(config).read())
            cache = m.group(1) if m else "auto"
        data = os.path.join(workdir, "data")
        tools = os.path.join(workdir, "tools")
        os.mkdir(data)
        os.mkdir(tools)
        shutil.copy2(tool, os.path.join(tools, "capsid-guest-tool"))
        with open(os.path.join(data, "read.bin"), "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        bench_args = ["--size-mib", str(args.size_mib), "--ops", str(args.ops),
                      "--files", str(args.files)]
        guest = [capsid, "--config", config, "run", "-v", f"{tools}:/tools:ro"]
        commands = {
            "host": [os.path.join(tools, "capsid-guest-tool"), "iobench", data, *bench_args],
            "share": [*guest, "-v", f"{data}:/data", "busybox", "--",
                      "/tools/capsid-guest-tool", "iobench", "/data", *bench_args],
            "guest-local": [*guest, "busybox", "--",
                            "/tools/capsid-guest-tool", "iobench", "/tmp", *bench_args],
        }
        results = {side: [] for side in SIDES}
        watched = {kind: [] for kind in CHANGES}
        rng = random.Random(1)
        for i in range(args.runs):
            for side in SIDES:
                what = f"run {i + 1}/{args.runs} {side}"
                print(f"{what} ...", file=sys.stderr, flush=True)
                out = run(commands[side], what)
                results[side].append(parse_iobench(out, what))
                if sorted(os.listdir(data)) != ["read.bin"]:
                    raise RuntimeError(f"{what} left files behind: {os.listdir(data)}")
            if args.changes:
                print(f"run {i + 1}/{args.runs} watching host changes ...", file=sys.stderr,
                      flush=True)
                got = coherence(capsid, config, workdir, args.changes, args.change_timeout, rng)
                for kind in CHANGES:
                    watched[kind] += got[kind]
    except (RuntimeError, subprocess.TimeoutExpired, OSError, json.JSONDecodeError) as e:
        sys.exit(f"volumes.py: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"iobench, {args.size_mib} MiB, {args.ops} random ops, {args.files} files; "
          f"virtiofsd --cache {cache}; median of {args.runs} runs")
    print(f"{'':36}{'host':>10}{'share':>10}{'guest-local':>13}{'share/host':>12}")
    summary = {}
    for test, metric, label in METRICS:
        med = {side: statistics.median(r[test][metric] for r in results[side])
               for side in SIDES}
        summary[test] = {"metric": metric, **med}
        secs = {side: statistics.median(r[test]["secs"] for r in results[side])
                for side in SIDES}
        summary[test]["secs"] = secs
        cell = {side: fmt(med[side]) + ("*" if side != "host" and secs[side] < 0.05 else "")
                for side in SIDES}
        ratio = 100 * med["share"] / med["host"] if med["host"] else float("nan")
        print(f"{label:<36}{cell['host']:>10}{cell['share']:>10}"
              f"{cell['guest-local']:>13}{ratio:>11.1f}%")
    if args.changes:
        print(f"\nhost change -> seen in the guest (ms; {args.changes} per run, "
              f"gave up after {args.change_timeout:g} s)")
        for kind in CHANGES:
            got = [s * 1000 for s in watched[kind] if s is not None]
            missed = len(watched[kind]) - len(got)
            text = (f"median {statistics.median(got):.0f}, min {min(got):.0f}, "
                    f"max {max(got):.0f}" if got else "never")
            print(f"  {kind:<10} {text}; not seen: {missed}/{len(watched[kind])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": "capsid-bench-volumes/1", "cache": cache,
                       "size_mib": args.size_mib, "ops": args.ops, "files": args.files,
                       "runs": results, "medians": summary,
                       "changes_seen_s": watched}, f, indent=1)


if __name__ == "__main__":
    main()
