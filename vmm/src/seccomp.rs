//! Per-thread seccomp filters (docs/security.md): every thread of
//! capsid-vmm that runs once the VM is built confines itself to the
//! system calls its kind of work needs, as Firecracker does. The filters
//! are compiled once, at start-up ([`init`]); each thread installs its own
//! ([`apply`], which acts on the calling thread only) at the top of its
//! body, after whatever needed more (files, sockets, KVM set-up) is done.
//!
//! The threads and their lists:
//!
//! * `vcpuN` ([`ThreadKind::Vcpu`]): KVM_RUN, port and MMIO exits to the
//!   bus — the serial console (a capped log that rotates: `rename`,
//!   `openat`), irqfd and ioeventfd writes, device activation and reset
//!   (epoll registrations, the tap's header size, the balloon's timer, the
//!   virtio-fs rings handed to virtiofsd over vhost-user with a watchdog
//!   thread); and, for a snapshot, the reads of its own KVM state
//!   (`KVM_GET_*`, never a `KVM_SET_*`).
//! * `devices` ([`ThreadKind::Devices`]): the event loop serving every
//!   virtio device: disk I/O, the tap, vsock's Unix sockets, balloon
//!   discards, random bytes, virtiofsd's call eventfds.
//! * `control` and `control-client` ([`ThreadKind::Control`]): the control
//!   socket; a client thread inherits its listener's filter.
//! * `signals` ([`ThreadKind::Signals`]): waits for SIGTERM/SIGINT.
//! * `vhost-user-watchdog` ([`ThreadKind::VhostUser`]): the deadline of
//!   one exchange with a vhost-user backend (virtio-fs's frontend runs its
//!   exchanges on the vCPU that activated the device, or on the main
//!   thread at the end; only the watchdog is a thread of its own).
//! * the main thread once every other thread runs ([`ThreadKind::Main`]):
//!   control requests, pause (signals to vCPU threads), snapshots (the
//!   VM's interrupt controllers, PIT and clock read; the memory and state
//!   files created, written and renamed into place), the end of the VM
//!   (joins, drops: sockets unlinked, the vhost-user rings taken back).
//!
//! Filters stack: a thread started by a filtered thread runs under its
//! parent's filter and its own. So the main thread installs its filter
//! after starting every other thread, and the lists of threads that start
//! threads (main, vCPUs, control) hold what a new thread does before its
//! own filter is in place.
//!
//! `--seccomp log` makes a mismatch a logged, allowed call (the kernel's
//! audit log names it: lists for a new host); `--seccomp off` installs
//! nothing.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// KVM_RUN: `_IO(KVMIO, 0x80)`, KVMIO being 0xAE.
pub const KVM_RUN: u64 = 0xAE80;

/// The KVM ioctls that read state for a snapshot, numbered as
/// linux/kvm.h does (`_IOR`/`_IOWR` over the structures' sizes).
mod kvm_get {
    #![allow(non_snake_case)]

    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs,
        kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    // KVM_GET_TSC_KHZ is _IO(KVMIO, 0xa3): no structure.
    pub const KVM_GET_TSC_KHZ: u64 = 0xAEA3;

    /// What a vCPU thread reads of its own vCPU.
    pub fn vcpu() -> Vec<u64> {
        vec![
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_XSAVE2(),
            KVM_GET_TSC_KHZ,
        ]
    }

    /// What the main thread reads of the VM.
    pub fn vm() -> Vec<u64> {
        vec![KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()]
    }
}

/// Errors compiling or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule or filter of a list is malformed (a bug in this module).
    #[error("invalid seccomp rule for the {kind} thread")]
    Rule {
        /// Whose list.
        kind: ThreadKind,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// This architecture has no lists.
    #[error("seccomp filters are not available on {0}")]
    Arch(&'static str),
    /// The kernel refused the filter (prctl or seccomp failed).
    #[error("cannot install the seccomp filter of the {kind} thread")]
    Install {
        /// Whose filter.
        kind: ThreadKind,
        /// What the kernel said.
        #[source]
        source: seccompiler::Error,
    },
    /// [`init`] was called twice.
    #[error("the seccomp filters are already set up")]
    AlreadySet,
}

/// Result of seccomp operations.
pub type Result<T> = std::result::Result<T, SeccompError>;

/// What a syscall outside a thread's list does (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// The kernel kills capsid-vmm (SIGSYS).
    #[default]
    Kill,
    /// The kernel logs the call and lets it through (for making lists on a
    /// new host).
    Log,
    /// No filter is installed.
    Off,
}

/// The kinds of threads, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM runs.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The device event loop.
    Devices,
    /// The control socket's listener and client threads.
    Control,
    /// The SIGTERM/SIGINT watcher.
    Signals,
    /// The watchdog of a vhost-user exchange.
    VhostUser,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        Self::Main,
        Self::Vcpu,
        Self::Devices,
        Self::Control,
        Self::Signals,
        Self::VhostUser,
    ];

    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Devices => "devices",
            Self::Control => "control",
            Self::Signals => "signals",
            Self::VhostUser => "vhost-user",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The compiled filters of the process.
#[derive(Debug)]
struct Filters {
    mode: SeccompMode,
    /// Installed first on every thread: read-only opens fail with EACCES
    /// (logged in `log` mode) instead of killing. glibc opens
    /// `/proc/sys/vm/overcommit_memory` by itself the first time free()
    /// shrinks a thread's heap, and copes with a refusal (a kill there
    /// took capsid-vhost down under a real guest). The lists let those
    /// opens through so that this error is what glibc sees.
    refusals: Option<BpfProgram>,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every thread's filter for `mode` and keeps them for [`apply`].
/// Without a call to `init` (the library used in tests), [`apply`] does
/// nothing. `off` logs a warning, once.
pub fn init(mode: SeccompMode) -> Result<()> {
    let mut programs = BTreeMap::new();
    let mut refusals = None;
    if mode == SeccompMode::Off {
        tracing::warn!(
            "seccomp is off (--seccomp off): capsid-vmm's threads may make any system call"
        );
    } else {
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, mode)?);
        }
        let refused = match mode {
            SeccompMode::Log => SeccompAction::Log,
            _ => SeccompAction::Errno(libc::EACCES as u32),
        };
        refusals = Some(
            capsid_devices::seccomp::refusals_filter(refused).map_err(|source| {
                SeccompError::Rule {
                    kind: ThreadKind::Main,
                    source,
                }
            })?,
        );
    }
    FILTERS
        .set(Filters {
            mode,
            refusals,
            programs,
        })
        .map_err(|_| SeccompError::AlreadySet)
}

/// The mode [`init`] set, if it was called.
pub fn mode() -> Option<SeccompMode> {
    FILTERS.get().map(|f| f.mode)
}

/// Installs the filter of `kind` on the calling thread (nothing when
/// [`init`] was not called or the mode is `off`).
pub fn apply(kind: ThreadKind) -> Result<()> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = filters.programs.get(&kind) else {
        return Ok(());
    };
    if let Some(refusals) = &filters.refusals {
        seccompiler::apply_filter(refusals)
            .map_err(|source| SeccompError::Install { kind, source })?;
    }
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })?;
    tracing::debug!(thread = %kind, mode = ?filters.mode, "seccomp filter installed");
    Ok(())
}

/// [`apply`] for a thread that has nobody to report a failure to: the
/// VMM ends (status 1) rather than run a thread unconfined.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        let message = capsid_devices::describe(&e);
        tracing::error!(error = %message, "ending the VMM");
        eprintln!("capsid-vmm: {message}");
        std::process::exit(i32::from(crate::EXIT_VMM_ERROR));
    }
}

/// The BPF program of `kind`'s list, a mismatch acting as `mode` says.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Kill | SeccompMode::Off => SeccompAction::KillProcess,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let rules = rules(kind).map_err(|source| SeccompError::Rule { kind, source })?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|source| SeccompError::Rule { kind, source })
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type BResult<T> = std::result::Result<T, seccompiler::BackendError>;

/// The syscalls `kind` may make (for documentation and tests).
pub fn allowed_syscalls(kind: ThreadKind) -> BResult<Vec<i64>> {
    Ok(rules(kind)?.into_keys().collect())
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> BResult<SeccompCondition> {
    SeccompCondition::new(arg, len, op, value)
}

/// Argument `arg` (an int or a request number: 32 bits) equals `value`.
fn arg_eq(arg: u8, value: u64) -> BResult<SeccompRule> {
    SeccompRule::new(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// One rule per allowed value of argument `arg`.
fn any_of(arg: u8, values: &[u64]) -> BResult<Vec<SeccompRule>> {
    values.iter().map(|&v| arg_eq(arg, v)).collect()
}

/// Argument `arg` has none of the bits of `mask`.
fn without_bits(arg: u8, mask: u64) -> BResult<SeccompRule> {
    SeccompRule::new(vec![cond(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )?])
}

/// Adds syscalls allowed whatever their arguments.
fn allow(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for &nr in syscalls {
        rules.insert(nr, Vec::new());
    }
}

/// Adds rules for `nr` to what it already has (a syscall already allowed
/// whatever its arguments stays so).
fn allow_if(rules: &mut Rules, nr: libc::c_long, new: Vec<SeccompRule>) {
    match rules.get_mut(&nr) {
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.extend(new),
        None => {
            rules.insert(nr, new);
        }
    }
}

/// Allows `ioctl` with these request numbers only.
fn allow_ioctls(rules: &mut Rules, requests: &[u64]) -> BResult<()> {
    allow_if(rules, libc::SYS_ioctl, any_of(1, requests)?);
    Ok(())
}

fn rules(kind: ThreadKind) -> BResult<Rules> {
    let mut r = base()?;
    match kind {
        ThreadKind::Main => main_thread(&mut r)?,
        ThreadKind::Vcpu => vcpu(&mut r)?,
        ThreadKind::Devices => devices(&mut r)?,
        ThreadKind::Control => control(&mut r)?,
        ThreadKind::Signals => signals(&mut r),
        ThreadKind::VhostUser => vhost_user_watchdog(&mut r),
    }
    Ok(r)
}

/// What every thread needs: the Rust runtime and glibc (memory, locks,
/// time, thread exit), logging to stderr, closing what it drops.
fn base() -> BResult<Rules> {
    let mut r = Rules::new();
    // Refused with EACCES by the filter installed under the lists.
    capsid_devices::seccomp::allow_read_only_opens(&mut r);
    allow(
        &mut r,
        &[
            // Logging (tracing to stderr, the console when it is stdout),
            // and reads and writes of eventfds (irqfds, ioeventfds, the
            // event loop's stop fd), timerfds and pipes.
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            // Locks, condition variables, channels, joins.
            libc::SYS_futex,
            // glibc's malloc: brk for the main arena, mmap/munmap/mremap
            // for large blocks and the arenas of other threads; thread
            // stacks and Rust's signal stacks are mapped and unmapped too.
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            // glibc gives freed memory back with MADV_DONTNEED (malloc
            // trim, a thread's stack at its exit; newer versions use other
            // advice for stack guards), the balloon with MADV_DONTNEED
            // (private RAM) or MADV_REMOVE (a shared memfd): any advice is
            // allowed rather than kill a VM on a newer glibc.
            libc::SYS_madvise,
            // Rust's stack-overflow handler (per thread), signals.
            libc::SYS_sigaltstack,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            // Thread and process end.
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_sched_yield,
            // Time: the vDSO normally, the syscall where the clocksource
            // has no vDSO path (some hypervisors); sleeps.
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_gettimeofday,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            // HashMap keys (once per thread), virtio-rng.
            libc::SYS_getrandom,
            libc::SYS_getpid,
            libc::SYS_gettid,
            // Metadata of an fd (std's File::metadata is statx).
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            // What glibc does when a thread starts (before its own filter
            // is installed, the new thread runs under its parent's): robust
            // futex list, restartable sequences, its attributes (Rust reads
            // its stack bounds through pthread_getattr_np, which asks for
            // the CPU affinity too).
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
        ],
    );
    // Memory is never made executable: no JIT, no dlopen here.
    let no_exec = libc::PROT_EXEC as u64;
    allow_if(&mut r, libc::SYS_mmap, vec![without_bits(2, no_exec)?]);
    allow_if(&mut r, libc::SYS_mprotect, vec![without_bits(2, no_exec)?]);
    // fd flags: std checks an fd is open before closing it in debug
    // builds (F_GETFD), try_clone duplicates (F_DUPFD_CLOEXEC), and
    // non-blocking files are set with F_GETFL/F_SETFL; never F_SETOWN,
    // F_SETSIG, leases or locks.
    allow_if(
        &mut r,
        libc::SYS_fcntl,
        any_of(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )?,
    );
    // A thread names itself (Rust's thread names: vcpu0, devices, ...).
    allow_if(
        &mut r,
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NAME as u64)?],
    );
    // abort() (a panic with panic=abort, a failed assertion in C) signals
    // the process itself: only this process's threads may be signalled.
    let pid = u64::from(std::process::id());
    allow_if(&mut r, libc::SYS_tgkill, vec![arg_eq(0, pid)?]);
    Ok(r)
}

/// What a thread that starts threads needs: glibc's pthread_create
/// (clone3, with clone as the fallback on older kernels; clone only for
/// threads, never a fork) and, since the new thread installs its own
/// filter under this one, what [`seccompiler::apply_filter`] calls.
fn starts_threads(r: &mut Rules, filtered_children: bool) -> BResult<()> {
    allow(r, &[libc::SYS_clone3]);
    let thread = libc::CLONE_THREAD as u64;
    allow_if(
        r,
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    if filtered_children {
        allow_if(
            r,
            libc::SYS_prctl,
            vec![arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?],
        );
        // Adding a filter only narrows what a thread may do.
        allow_if(
            r,
            libc::SYS_seccomp,
            vec![arg_eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))?],
        );
    }
    Ok(())
}

/// An exchange with a vhost-user backend (virtiofsd): messages with fds
/// (SET_MEM_TABLE's memfd, the rings' eventfds) both ways, shutdown of a
/// stuck connection, a watchdog thread per exchange.
fn vhost_user_frontend(r: &mut Rules) -> BResult<()> {
    allow(
        r,
        &[
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            // A failed device stops watching its call eventfds.
            libc::SYS_epoll_ctl,
        ],
    );
    starts_threads(r, true)
}

/// The main thread once every other thread is started: control requests
/// (the balloon, pause, Ctrl-Alt-Del: device locks and irqfd writes;
/// snapshots), kicks (a signal to a vCPU thread), and the end: threads
/// stopped and joined, every device dropped.
fn main_thread(r: &mut Rules) -> BResult<()> {
    allow(
        r,
        &[
            // Dropping the control socket's and vsock's claims unlocks
            // and removes the socket and its lock file.
            libc::SYS_flock,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            // The console is flushed at the end.
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            // The balloon statistics timer is disarmed or re-armed.
            libc::SYS_timerfd_settime,
        ],
    );
    // Dropping virtio-fs takes its rings back from virtiofsd, under a
    // watchdog thread.
    vhost_user_frontend(r)?;
    // A snapshot: the VM's interrupt controllers, PIT and clock are read
    // (never written: a restore sets them while the VM is built, before
    // any filter), and the memory and state files are written next to
    // their final paths (created, sized, written at offsets, synced) and
    // renamed into place.
    allow_ioctls(r, &kvm_get::vm())?;
    allow(
        r,
        &[
            libc::SYS_ftruncate,
            libc::SYS_pwrite64,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
        ],
    );
    let create = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;
    allow_if(r, libc::SYS_openat, vec![arg_eq(2, create)?]);
    allow_if(r, libc::SYS_open, vec![arg_eq(1, create)?]);
    // A vCPU's KVM_RUN is interrupted by SIGRTMIN, sent with tgkill
    // (already allowed to this process's threads by the base list).
    Ok(())
}

/// A vCPU thread.
fn vcpu(r: &mut Rules) -> BResult<()> {
    // KVM_RUN, and the reads of its state a snapshot asks of a parked
    // vCPU (never a write: a restore sets them while the VM is built);
    // TUNSETVNETHDRSZ is set when the guest's virtio-net driver
    // acknowledges its features (a register write, on the vCPU that
    // made it).
    allow_ioctls(r, &[KVM_RUN, libc::TUNSETVNETHDRSZ])?;
    allow_ioctls(r, &kvm_get::vcpu())?;
    allow(
        r,
        &[
            // The console log rotates when full: the current file becomes
            // `<file>.1` (rename; renameat(2) on other libcs) and a new one
            // is created.
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            // Activation and reset register or drop a device's host-side
            // fd with the event loop; vsock's reset closes its streams.
            libc::SYS_epoll_ctl,
            // The balloon's statistics timer, armed when the driver
            // acknowledges features, disarmed at reset.
            libc::SYS_timerfd_settime,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
        ],
    );
    // The console log's new generation: openat(AT_FDCWD, path,
    // O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC); no other file is opened.
    let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;
    allow_if(r, libc::SYS_openat, vec![arg_eq(2, flags)?]);
    allow_if(r, libc::SYS_open, vec![arg_eq(1, flags)?]);
    // A virtio-fs driver's DRIVER_OK and reset hand the rings to
    // virtiofsd and take them back, on this thread.
    vhost_user_frontend(r)
}

/// The device event loop.
fn devices(r: &mut Rules) -> BResult<()> {
    allow(
        r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            libc::SYS_epoll_ctl,
            // virtio-blk: positioned reads and writes (vectored too: the
            // volatile-memory I/O of vm-memory), FLUSH, DISCARD and
            // WRITE_ZEROES (fallocate), the tap's frames (read/write).
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            // vsock's listener also by plain accept.
            libc::SYS_accept,
            // The balloon's statistics timer.
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
        ],
    );
    // vsock: host connections accepted on the listener, guest connections
    // made to `<uds>_<port>` (connect on a fresh socket), their streams
    // read, written and shut down: as in capsid-vhost.
    allow(r, capsid_devices::seccomp::VSOCK_HOST_SOCKETS);
    allow_if(r, libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
    // An accepted vsock stream is made non-blocking with FIONBIO (std's
    // set_nonblocking); the tap's header length is set again should a
    // device reset and renegotiate from here.
    allow_ioctls(r, &[libc::FIONBIO, libc::TUNSETVNETHDRSZ])
}

/// The control socket: accepting clients, a thread per client, lines read
/// (recv) and written.
fn control(r: &mut Rules) -> BResult<()> {
    allow(
        r,
        &[
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
        ],
    );
    // Client threads inherit this filter and install none of their own.
    starts_threads(r, false)
}

/// The signal watcher: sigwait, then one message to the main thread.
fn signals(r: &mut Rules) {
    allow(r, &[libc::SYS_rt_sigtimedwait]);
}

/// The watchdog of a vhost-user exchange: waits on a channel, and shuts
/// the connection down when the backend does not answer in time.
fn vhost_user_watchdog(r: &mut Rules) {
    allow(r, &[libc::SYS_shutdown]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Kill, SeccompMode::Log] {
                let program = compile(kind, mode).unwrap();
                eprintln!(
                    "{kind}: {} syscalls, {} BPF instructions",
                    allowed_syscalls(kind).unwrap().len(),
                    program.len()
                );
                assert!(!program.is_empty(), "{kind}");
                // The kernel takes at most 4096 instructions per filter.
                assert!(program.len() < 4096, "{kind}: {}", program.len());
            }
        }
    }

    #[test]
    fn kvm_run_is_the_kernels_number() {
        vmm_sys_util::ioctl_io_nr!(KVM_RUN_NR, 0xAE, 0x80);
        assert_eq!(KVM_RUN_NR(), KVM_RUN);
    }

    #[test]
    fn snapshot_ioctls_are_the_kernels_numbers() {
        // From linux/kvm.h on x86-64 (as strace prints them).
        assert_eq!(
            kvm_get::vcpu(),
            vec![
                0x8090_AE81, // KVM_GET_REGS
                0x8138_AE83, // KVM_GET_SREGS
                0xC008_AE88, // KVM_GET_MSRS
                0x8400_AE8E, // KVM_GET_LAPIC
                0x8004_AE98, // KVM_GET_MP_STATE
                0x8040_AE9F, // KVM_GET_VCPU_EVENTS
                0x8080_AEA1, // KVM_GET_DEBUGREGS
                0x9000_AEA4, // KVM_GET_XSAVE
                0x8188_AEA6, // KVM_GET_XCRS
                0x9000_AECF, // KVM_GET_XSAVE2
                0xAEA3,      // KVM_GET_TSC_KHZ
            ]
        );
        assert_eq!(
            kvm_get::vm(),
            vec![
                0xC208_AE62, // KVM_GET_IRQCHIP
                0x8030_AE7C, // KVM_GET_CLOCK
                0x8070_AE9F, // KVM_GET_PIT2
            ]
        );
    }

    #[test]
    fn kvm_state_is_read_only_where_threads_read_it() {
        // Reads of KVM state on the vCPU and main threads only; no thread
        // may write it once the VM runs.
        for kind in ThreadKind::ALL {
            let allowed = ioctl_rules_allow(kind, kvm_get::KVM_GET_REGS());
            assert_eq!(allowed, kind == ThreadKind::Vcpu, "{kind}");
            let allowed = ioctl_rules_allow(kind, kvm_get::KVM_GET_IRQCHIP());
            assert_eq!(allowed, kind == ThreadKind::Main, "{kind}");
        }
    }

    /// Whether `kind`'s list has a rule for exactly this ioctl request.
    fn ioctl_rules_allow(kind: ThreadKind, request: u64) -> bool {
        let rules = rules(kind).unwrap();
        let Some(ioctl) = rules.get(&libc::SYS_ioctl) else {
            return false;
        };
        let wanted = arg_eq(1, request).unwrap();
        ioctl
            .iter()
            .any(|r| format!("{r:?}") == format!("{wanted:?}"))
    }

    #[test]
    fn the_test_syscall_is_in_no_list() {
        for kind in ThreadKind::ALL {
            let syscalls = allowed_syscalls(kind).unwrap();
            for forbidden in [libc::SYS_reboot, libc::SYS_ptrace, libc::SYS_mount] {
                assert!(!syscalls.contains(&forbidden), "{kind} allows {forbidden}");
            }
        }
    }

    #[test]
    fn ioctl_is_narrowed_where_it_is_allowed() {
        for kind in ThreadKind::ALL {
            let rules = rules(kind).unwrap();
            if let Some(ioctl) = rules.get(&libc::SYS_ioctl) {
                assert!(!ioctl.is_empty(), "{kind} allows every ioctl");
            }
        }
        assert!(rules(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_ioctl));
        // The main thread's ioctls are the snapshot's reads of the VM.
        assert_eq!(
            rules(ThreadKind::Main).unwrap()[&libc::SYS_ioctl].len(),
            kvm_get::vm().len()
        );
    }

    #[test]
    fn only_threads_that_start_threads_may_clone() {
        for kind in ThreadKind::ALL {
            let clones = rules(kind).unwrap().contains_key(&libc::SYS_clone3);
            let expected = matches!(
                kind,
                ThreadKind::Main | ThreadKind::Vcpu | ThreadKind::Control
            );
            assert_eq!(clones, expected, "{kind}");
        }
    }
}
