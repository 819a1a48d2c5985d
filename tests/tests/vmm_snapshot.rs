//! capsid-vmm snapshots with a tiny guest under this machine's KVM
//! (assembled when the test runs): a guest that fills a region of its
//! RAM with a known pattern, drives virtio-rng through its interrupt, and
//! counts in memory and on the serial console is paused, snapshotted and
//! restored, in a new process each time, from a memory file mapped
//! copy-on-write. The restored guest goes on where it stopped (its
//! console continues the line it was in, never boots again), its memory
//! is what the snapshot wrote, its device still answers, and twenty
//! restores of one snapshot print the same. State files that are
//! truncated, from another capsid-vmm or format, corrupt, or whose
//! memory file or config does not match are refused with one line that
//! says so, before any vCPU runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsid_tests::asm::{LIB64, VIRTIO64};
use capsid_tests::vmm::{monotonic_ns, Ended, Launch, Vmm};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The guest stops (i8042 reset) once its count reaches this.
const STOP: u64 = 20;
/// The test snapshots the guest once its count reaches this.
const SNAPSHOT_AT: u64 = 5;
/// The guest's source, stopping at `stop`.
fn counter_guest(stop: u64) -> String {
    COUNTER_GUEST
        .replace("@STOP@", &stop.to_string())
        .replace("@SNAPSHOT_AT@", &SNAPSHOT_AT.to_string())
}

/// Where the guest keeps its count, and its pattern's sum.
const COUNTER: u64 = 0x5_0000;
const SUM: u64 = 0x5_0008;
/// Where its pattern lies, and how long it is.
const REGION: u64 = 0x40_0000;
const REGION_LEN: u64 = 0x10_0000;
/// The pattern's seed (xorshift64).
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const MEMORY_MIB: u64 = 32;

/// Fills REGION with xorshift64 from SEED and keeps the sum of its 64-bit
/// words at SUM, prints "UP", sets virtio-rng up (queue 0, its interrupt
/// on GSI 5 at vector 0x30), then loops: one 16-byte entropy request
/// waited for through its interrupt, checks (the device's used index is
/// the number of requests, REGION still sums to SUM; "BAD …" otherwise),
/// the count at COUNTER incremented and "N <count>" printed (short lines:
/// every byte is a VM exit). Once it has printed SNAPSHOT_AT it waits for
/// the host's go, a balloon target (the balloon's `num_pages`, read from
/// its configuration space): the test pauses it there, sets the target
/// and snapshots, so every run from the snapshot is the same, whatever
/// the timing. At STOP it prints "END <sum>" and resets.
const COUNTER_GUEST: &str = r#"
    .equ MMIO, 0xd0000000
    .equ BALLOON, 0xd0001000
    .equ DESC, 0x30000
    .equ AVAIL, 0x31000
    .equ USED, 0x32000
    .equ BUF, 0x40000
    .equ COUNTER, 0x50000
    .equ SUM, 0x50008
    .equ REGION, 0x400000
    .equ REGION_LEN, 0x100000
    .equ SEED, 0x9e3779b97f4a7c15
    .equ STOP, @STOP@
    .equ SNAPSHOT_AT, @SNAPSHOT_AT@

    # The sum of REGION's 64-bit words, in R8.
    .macro region_sum
    mov rdi, REGION
    mov rcx, REGION_LEN / 8
    xor r8, r8
sum\@:
    add r8, [rdi]
    add rdi, 8
    dec rcx
    jnz sum\@
    .endm

    .text
    .global _start
_start:
    mov rdi, REGION
    mov rcx, REGION_LEN / 8
    mov rax, SEED
1:  mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    mov [rdi], rax
    add rdi, 8
    dec rcx
    jnz 1b
    region_sum
    mov rdi, SUM
    mov [rdi], r8
    report m_up
    irq_route irq_handler, 5, 0x30, 0x12000
    mov rbx, MMIO
    virtio_modern
    virtio_queue 0, 8, DESC, AVAIL, USED
    virtio_status 0xf
    virtio_desc DESC, 0, BUF, 16, 2

next:
    # One entropy request: descriptor 0 at the next available entry.
    mov rdi, AVAIL
    movzx eax, word ptr [rdi + 2]
    mov edx, eax
    and edx, 7
    mov word ptr [rdi + 4 + rdx * 2], 0
    inc eax
    mov word ptr [rdi + 2], ax
    mov dword ptr [rbx + 0x050], 0
    wait_flag got_irq
    mov byte ptr [rip + got_irq], 0
    # The device used every request so far, and the pattern is intact.
    mov rdi, COUNTER
    mov rax, [rdi]
    inc rax
    mov rdi, USED
    movzx edx, word ptr [rdi + 2]
    cmp rax, rdx
    je 2f
    report m_bad_used
2:  region_sum
    mov rdi, SUM
    cmp r8, [rdi]
    je 3f
    report m_bad_sum
3:  mov rdi, COUNTER
    inc qword ptr [rdi]
    lea rdi, [rip + m_n]
    call puts
    call putsp
    mov rdi, COUNTER
    mov rax, [rdi]
    call puthex
    call putnl
    # Once at SNAPSHOT_AT: wait for the go.
    mov rdi, COUNTER
    cmp qword ptr [rdi], SNAPSHOT_AT
    jne 5f
    mov rdi, BALLOON
4:  pause
    cmp dword ptr [rdi + 0x100], 0
    je 4b
5:  mov rdi, COUNTER
    cmp qword ptr [rdi], STOP
    jb next
    lea rdi, [rip + m_end]
    call puts
    call putsp
    mov rax, r8
    call puthex
    call putnl
    call reset

irq_handler:
    virtio_irq_handler MMIO, got_irq

m_up:       .asciz "UP"
m_n:        .asciz "N"
m_end:      .asciz "END"
m_bad_used: .asciz "BAD USED"
m_bad_sum:  .asciz "BAD SUM"
    .data
got_irq: .byte 0
"#;

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

/// The sum of REGION's words, as the guest computes it.
fn pattern_sum() -> u64 {
    let mut x = SEED;
    let mut sum = 0u64;
    for _ in 0..REGION_LEN / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum = sum.wrapping_add(x);
    }
    sum
}

/// The line the guest prints for `count`.
fn line(count: u64) -> String {
    format!("N {}\n", hex(count))
}

/// Everything the guest prints after "UP".
fn full_output() -> String {
    let mut out = String::from("UP\n");
    for count in 1..=STOP {
        out.push_str(&line(count));
    }
    out.push_str(&format!("END {}\n", hex(pattern_sum())));
    out
}

/// A snapshot of the counter guest, taken at SNAPSHOT_AT.
struct Snapshot {
    /// Holds the files.
    dir: tempfile::TempDir,
    state: PathBuf,
    memory: PathBuf,
    /// The config the guest ran with (without serial and control socket).
    config: Value,
    /// The source VM's console when the snapshot was taken.
    before: String,
    /// The source VM, paused.
    source: Vmm,
}

impl Snapshot {
    fn take() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kernel = capsid_tests::asm::elf(
            &format!("{VIRTIO64}{}{LIB64}", counter_guest(STOP)),
            dir.path(),
            "counter",
        );
        let config = json!({
            "vcpus": 1,
            "memory_mib": MEMORY_MIB,
            "boot": {"linux": {"kernel": kernel}},
            "rng": true,
            "balloon": {},
        });
        let mut vm = Vmm::start(config.clone());
        // The guest waits for its go there.
        vm.wait_serial(&line(SNAPSHOT_AT), TIMEOUT);
        let r = vm.control(json!({"op": "pause"}));
        assert_eq!(r["ok"], true, "{r}");
        let r = vm.control(json!({"op": "balloon_set", "target_mib": 1}));
        assert_eq!(r["ok"], true, "{r}");
        let before = vm.serial();
        assert!(before.ends_with(&line(SNAPSHOT_AT)), "{before}");
        let state = dir.path().join("vm.state");
        let memory = dir.path().join("vm.mem");
        let r = vm.control(json!({"op": "snapshot", "state": state, "memory": memory}));
        assert_eq!(r["ok"], true, "{r}\nstderr:\n{}", vm.stderr());
        assert_eq!(r["memory_bytes"], MEMORY_MIB << 20, "{r}");
        assert_eq!(
            r["state_bytes"].as_u64(),
            Some(std::fs::metadata(&state).unwrap().len()),
            "{r}"
        );
        // Touched pages only: the pattern, the kernel, rings, stack.
        let written = r["memory_written_bytes"].as_u64().unwrap();
        assert!(
            (REGION_LEN..8 << 20).contains(&written),
            "{written} bytes written"
        );
        eprintln!("snapshot: {r}");
        // Nothing ran while it was taken: the console is as it was.
        assert_eq!(vm.serial(), before);
        Self {
            dir,
            state,
            memory,
            config,
            before,
            source: vm,
        }
    }

    /// What every restore must print: the source's output from the
    /// snapshot on.
    fn after(&self) -> String {
        let full = full_output();
        assert!(
            full.starts_with(&self.before),
            "the source printed {:?}",
            self.before
        );
        full[self.before.len()..].to_string()
    }

    fn restore(&self) -> Vmm {
        Vmm::restore(
            &self.state,
            &self.memory,
            Some(self.config.clone()),
            &Launch::default(),
        )
    }

    /// Restores `state` with `memory` and `config`, expecting a refusal.
    fn refused(&self, state: &Path, memory: &Path, config: Option<Value>) -> Ended {
        let launch = Launch {
            env: vec![("CAPSID_LOG".into(), "info".into())],
            ..Launch::default()
        };
        let end = Vmm::restore(state, memory, config, &launch).wait(TIMEOUT);
        assert_eq!(end.code, 1, "stderr:\n{}", end.stderr);
        // No vCPU ran: nothing on the console (the file is not even
        // created), no first KVM_RUN.
        assert_eq!(end.serial, "", "{}", end.stderr);
        assert!(!end.stderr.contains("first KVM_RUN"), "{}", end.stderr);
        end
    }

    /// A copy of the state file with `edit` applied, in the snapshot's
    /// directory.
    fn edited(&self, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = std::fs::read(&self.state).unwrap();
        edit(&mut bytes);
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

/// When the restored `vm` first entered its guest (CLOCK_MONOTONIC ns).
fn first_kvm_run(vm: &Vmm) -> u64 {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let metrics = vm.control(json!({"op": "metrics"}));
        if let Some(ns) = metrics["first_kvm_run_monotonic_ns"].as_u64() {
            return ns;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no KVM_RUN: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The last line of capsid-vmm's stderr: what it says when it fails.
fn message(end: &Ended) -> &str {
    end.stderr.lines().last().unwrap_or_default()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn a_restored_guest_goes_on_where_it_stopped() {
    let snap = Snapshot::take();
    let after = snap.after();
    // The memory file is guest RAM: the count the guest stopped at, and
    // the pattern whose sum it prints.
    let ram = std::fs::read(&snap.memory).unwrap();
    assert_eq!(ram.len() as u64, MEMORY_MIB << 20);
    let count = u64_at(&ram, usize::try_from(COUNTER).unwrap());
    assert_eq!(count, SNAPSHOT_AT);
    assert_eq!(u64_at(&ram, usize::try_from(SUM).unwrap()), pattern_sum());
    let region =
        &ram[usize::try_from(REGION).unwrap()..usize::try_from(REGION + REGION_LEN).unwrap()];
    let sum = region.chunks(8).fold(0u64, |s, w| {
        s.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()))
    });
    assert_eq!(sum, pattern_sum());

    // Restored in a new process, it continues the source's output: no
    // "UP" again, the entropy device still answers (its used index goes
    // on with the count: no "BAD USED"), the pattern's sum is the same
    // (no "BAD SUM", and END prints it).
    let launched = monotonic_ns();
    let restored = snap.restore();
    let first = first_kvm_run(&restored);
    let end = restored.wait(TIMEOUT);
    assert_eq!(
        end.code, 0,
        "serial:\n{}\nstderr:\n{}",
        end.serial, end.stderr
    );
    assert_eq!(end.serial, after, "stderr:\n{}", end.stderr);
    assert!(end.serial.starts_with(&line(count + 1)), "{}", end.serial);
    assert!(!end.serial.contains("UP") && !end.serial.contains("BAD"));
    eprintln!(
        "restore: launch -> first KVM_RUN {:.2} ms",
        (first - launched) as f64 / 1e6
    );
    // The memory file is as the snapshot wrote it: the guest's writes
    // went to its private copy.
    assert_eq!(std::fs::read(&snap.memory).unwrap(), ram);

    // The source, resumed, prints the same.
    let r = snap.source.control(json!({"op": "resume"}));
    assert_eq!(r["ok"], true, "{r}");
    let source = snap.source;
    let end = source.wait(TIMEOUT);
    assert_eq!(end.code, 0, "{}", end.stderr);
    assert_eq!(end.serial, full_output());
}

#[test]
fn a_snapshot_restored_twenty_times_gives_the_same_run() {
    let snap = Snapshot::take();
    let after = snap.after();
    let mut times_ms = Vec::new();
    for run in 0..20 {
        let launched = monotonic_ns();
        let vm = snap.restore();
        let first = first_kvm_run(&vm);
        let end = vm.wait(TIMEOUT);
        assert_eq!(
            end.code, 0,
            "run {run}\nserial:\n{}\nstderr:\n{}",
            end.serial, end.stderr
        );
        assert_eq!(end.serial, after, "run {run}\nstderr:\n{}", end.stderr);
        times_ms.push((first - launched) as f64 / 1e6);
    }
    times_ms.sort_by(f64::total_cmp);
    eprintln!(
        "20 restores, launch -> first KVM_RUN: min {:.2}, median {:.2}, max {:.2} ms",
        times_ms[0], times_ms[10], times_ms[19]
    );
}

#[test]
fn snapshots_need_a_paused_vm_and_two_paths() {
    let dir = tempfile::tempdir().unwrap();
    // No balloon: the guest reads its go as all ones, and never waits.
    let kernel = capsid_tests::asm::elf(
        &format!("{VIRTIO64}{}{LIB64}", counter_guest(1_000_000_000)),
        dir.path(),
        "g",
    );
    let mut vm = Vmm::start(json!({
        "vcpus": 1,
        "memory_mib": MEMORY_MIB,
        "boot": {"linux": {"kernel": kernel}},
        "rng": true,
    }));
    vm.wait_serial("UP\n", TIMEOUT);
    let state = dir.path().join("vm.state");
    let memory = dir.path().join("vm.mem");
    let r = vm.control(json!({"op": "snapshot", "state": state, "memory": memory}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("not paused"), "{r}");
    assert!(!state.exists() && !memory.exists());
    assert_eq!(vm.control(json!({"op": "pause"}))["ok"], true);
    let r = vm.control(json!({"op": "snapshot", "state": state, "memory": state}));
    assert!(
        r["error"].as_str().unwrap().contains("two different paths"),
        "{r}"
    );
    let r =
        vm.control(json!({"op": "snapshot", "state": state, "memory": "/nonexistent/dir/vm.mem"}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/dir/vm.mem"),
        "{r}"
    );
    assert!(!state.exists());
    // The VM lives on, and resumes.
    assert_eq!(vm.control(json!({"op": "resume"}))["ok"], true);
    let printed = vm.serial().len();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while vm.serial().len() <= printed {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A state file with its version string replaced by `version` and its
/// format number by `format`, its checksum right (as another capsid-vmm
/// would write it; layout in docs/vmm.md).
fn rewrite_header(bytes: &mut Vec<u8>, version: &str, format: u32) {
    let version_len =
        usize::try_from(u32::from_le_bytes(bytes[12..16].try_into().unwrap())).unwrap();
    let payload = bytes[56 + version_len..].to_vec();
    let mut sha = Sha256::new();
    sha.update(version.as_bytes());
    sha.update(&payload);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&u32::try_from(version.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha.finalize());
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(&payload);
    *bytes = out;
}

#[test]
fn bad_snapshots_are_refused_before_any_vcpu_runs() {
    let snap = Snapshot::take();
    let (state, memory) = (&snap.state, &snap.memory);
    let config = || Some(snap.config.clone());
    let len = std::fs::metadata(state).unwrap().len();

    // Cut short, anywhere.
    for cut in [len / 2, 20, 3] {
        let bad = snap.edited(&format!("cut{cut}"), |b| {
            b.truncate(usize::try_from(cut).unwrap())
        });
        let end = snap.refused(&bad, memory, config());
        assert!(
            message(&end).contains(&format!("truncated: {cut} bytes")),
            "{}",
            end.stderr
        );
        assert!(
            message(&end).contains(&bad.display().to_string()),
            "{}",
            end.stderr
        );
    }
    // One flipped bit in the payload.
    let bad = snap.edited("flipped", |b| {
        let at = b.len() - 10;
        b[at] ^= 0x04;
    });
    let end = snap.refused(&bad, memory, config());
    assert!(
        message(&end).contains("checksum does not match"),
        "{}",
        end.stderr
    );
    // Another capsid-vmm, or another format.
    let bad = snap.edited("other-version", |b| rewrite_header(b, "0.0.1-elsewhere", 1));
    let end = snap.refused(&bad, memory, config());
    assert!(
        message(&end).contains("snapshot of capsid-vmm 0.0.1-elsewhere; this is capsid-vmm"),
        "{}",
        end.stderr
    );
    let header = std::fs::read(state).unwrap();
    let version_len =
        usize::try_from(u32::from_le_bytes(header[12..16].try_into().unwrap())).unwrap();
    let version = String::from_utf8(header[56..56 + version_len].to_vec()).unwrap();
    let bad = snap.edited("other-format", |b| rewrite_header(b, &version, 2));
    let end = snap.refused(&bad, memory, config());
    assert!(
        message(&end).contains("snapshot format version 2; this capsid-vmm reads format version 1"),
        "{}",
        end.stderr
    );
    // Not a state file at all.
    let end = snap.refused(memory, memory, config());
    assert!(
        message(&end).contains("not a capsid-vmm snapshot"),
        "{}",
        end.stderr
    );
    // The memory file: cut, missing.
    let short = snap.dir.path().join("short.mem");
    std::fs::write(&short, &std::fs::read(memory).unwrap()[..1 << 20]).unwrap();
    let end = snap.refused(state, &short, config());
    assert!(
        message(&end).contains(&format!(
            "is {} bytes; the snapshot's guest RAM is {} bytes",
            1 << 20,
            MEMORY_MIB << 20
        )),
        "{}",
        end.stderr
    );
    let end = snap.refused(state, &snap.dir.path().join("missing.mem"), config());
    assert!(
        message(&end).contains("cannot open the snapshot's memory file"),
        "{}",
        end.stderr
    );
    // A config that describes another machine.
    let mut other = snap.config.clone();
    other["memory_mib"] = json!(64);
    let end = snap.refused(state, memory, Some(other));
    assert!(
        message(&end).contains("does not describe the snapshot's VM: memory_mib differs"),
        "{}",
        end.stderr
    );
    let mut other = snap.config.clone();
    other["rng"] = json!(false);
    let end = snap.refused(state, memory, Some(other));
    assert!(message(&end).contains("rng differs"), "{}", end.stderr);

    // The good snapshot still restores after all that.
    let end = snap.restore().wait(TIMEOUT);
    assert_eq!(end.code, 0, "{}", end.stderr);
    assert_eq!(end.serial, snap.after());
}

/// Sets virtio-vsock up (rx, tx, event queues) with one 8-byte buffer
/// on the event queue filled with ones, prints "UP", waits for the go
/// (a balloon target, as the counter guest does), then prints the event
/// queue's used index and the buffer's first word, and resets.
const VSOCK_GUEST: &str = r#"
    .equ VSOCK, 0xd0000000
    .equ BALLOON, 0xd0001000
    .equ Q0, 0x30000
    .equ Q1, 0x34000
    .equ Q2, 0x38000
    .equ EVENT, 0x40000

    .text
    .global _start
_start:
    mov rbx, VSOCK
    virtio_modern
    virtio_queue 0, 8, Q0, Q0+0x1000, Q0+0x2000
    virtio_queue 1, 8, Q1, Q1+0x1000, Q1+0x2000
    virtio_queue 2, 8, Q2, Q2+0x1000, Q2+0x2000
    virtio_status 0xf
    mov rdi, EVENT
    mov qword ptr [rdi], -1
    virtio_desc Q2, 0, EVENT, 8, 2
    virtio_kick 2, Q2+0x1000
    report m_up
    mov rdi, BALLOON
1:  pause
    cmp dword ptr [rdi + 0x100], 0
    je 1b
    lea rdi, [rip + m_event]
    call puts
    call putsp
    mov rdi, Q2 + 0x2000
    movzx eax, word ptr [rdi + 2]
    call puthex
    call putsp
    mov rdi, EVENT
    mov eax, [rdi]
    call puthex
    call putnl
    call reset

m_up:    .asciz "UP"
m_event: .asciz "EVENT"
"#;

/// vsock connections cannot move to a new process: the restored device
/// tells its driver with a transport reset event (id 0) in its event
/// queue, before the guest runs again; the source, resumed, gets none.
#[test]
fn a_restored_vsock_device_announces_a_transport_reset() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = capsid_tests::asm::elf(
        &format!("{VIRTIO64}{VSOCK_GUEST}{LIB64}"),
        dir.path(),
        "vsock",
    );
    let config = |uds: &str| {
        json!({
            "vcpus": 1,
            "memory_mib": 16,
            "boot": {"linux": {"kernel": kernel}},
            "vsock": {"guest_cid": 3, "uds_path": dir.path().join(uds)},
            "balloon": {},
        })
    };
    let mut vm = Vmm::start(config("source.sock"));
    vm.wait_serial("UP\n", TIMEOUT);
    assert_eq!(vm.control(json!({"op": "pause"}))["ok"], true);
    assert_eq!(
        vm.control(json!({"op": "balloon_set", "target_mib": 1}))["ok"],
        true
    );
    let (state, memory) = (dir.path().join("vm.state"), dir.path().join("vm.mem"));
    let r = vm.control(json!({"op": "snapshot", "state": state, "memory": memory}));
    assert_eq!(r["ok"], true, "{r}");

    // The source still listens on its socket: the restore gets another.
    let end = Vmm::restore(
        &state,
        &memory,
        Some(config("restored.sock")),
        &Launch::default(),
    )
    .wait(TIMEOUT);
    assert_eq!(end.code, 0, "{}", end.stderr);
    assert_eq!(end.serial, format!("EVENT {} {}\n", hex(1), hex(0)));

    assert_eq!(vm.control(json!({"op": "resume"}))["ok"], true);
    let end = vm.wait(TIMEOUT);
    assert_eq!(end.code, 0, "{}", end.stderr);
    assert_eq!(
        end.serial,
        format!("UP\nEVENT {} {}\n", hex(0), hex(0xffff_ffff))
    );
}
