//! Per-thread seccomp filters for capsid-vhost (docs/security.md).
//!
//! Each device process confines itself once its setup is done (the
//! vhost-user socket bound, the disk, tap or log opened): the main thread
//! installs its device kind's process-wide allow-list ([`Role::Process`])
//! before the vhost-user daemon starts its threads, which inherit it.
//! Threads with a narrower job then stack a stricter list on top (the
//! kernel runs every filter of a thread and the strictest verdict wins):
//!
//! * the daemon's queue workers, on their first event, before they touch
//!   anything the guest wrote ([`Role::Queues`]);
//! * the main thread once QEMU is connected: it only waits for the session
//!   to end and cleans up, or, for the console, copies the guest's output
//!   into the log ([`Role::Connected`]);
//! * net's vhost-user relay threads, which only pass messages on
//!   ([`Role::Relay`]).
//!
//! Under the process list goes one more filter ([`compile_refusals`]):
//! read-only opens fail with EACCES instead of killing, because glibc
//! opens `/proc/sys/vm/overcommit_memory` on its own and copes with a
//! refusal. So a process carries two filters, a stacked thread three.
//!
//! The thread that handles QEMU's vhost-user messages keeps the
//! process-wide list: mapping guest memory and taking ring descriptors is
//! most of what that list allows.
//!
//! The lists come from `strace -f` of capsid-vhost under the device tests
//! and real guests (tests/tests/device_*.rs) and from reading the code
//! for paths those runs do not take (see [`rules`]). A syscall outside the
//! list kills the process ([`Mode::Kill`]); QEMU then sees its backend go
//! and the VM ends. [`Mode::Log`] lets everything through and has the
//! kernel log what the lists lack (`dmesg | grep type=1326`), for hosts
//! whose libc or kernel call something new.

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// What a syscall outside the allow-lists does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Kill the process (the default).
    Kill,
    /// Allow it, and have the kernel log it (type=1326 in the kernel log):
    /// for building the lists on a new host.
    Log,
    /// Install no filter at all.
    Off,
}

/// The device a capsid-vhost process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk on a file or block device.
    Blk,
    /// virtio-net on a tap.
    Net,
    /// virtio-rng from getrandom(2).
    Rng,
    /// virtio-vsock with a Unix-socket host side.
    Vsock,
    /// QEMU's serial console into a capped log.
    Console,
}

impl Kind {
    /// Every kind, for tests and documentation.
    pub const ALL: [Kind; 5] = [Kind::Blk, Kind::Net, Kind::Rng, Kind::Vsock, Kind::Console];

    fn name(self) -> &'static str {
        match self {
            Kind::Blk => "blk",
            Kind::Net => "net",
            Kind::Rng => "rng",
            Kind::Vsock => "vsock",
            Kind::Console => "console",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the vsock device does with the host's Unix sockets, in
/// capsid-vhost and in capsid-vmm alike.
pub const VSOCK_HOST_SOCKETS: &[libc::c_long] = &[
    // Host clients on the vsock listener, and the guest's connections to
    // `<uds>_<port>`.
    libc::SYS_accept4,
    libc::SYS_connect,
    // Stream I/O (std's UnixStream read/write are recv/send) and
    // half-closes.
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // A non-blocking connect's outcome (SO_ERROR).
    libc::SYS_getsockopt,
];

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The whole process after setup: installed by the main thread before
    /// any other thread exists, inherited by all of them.
    Process,
    /// A vhost-user queue worker: the guest's requests.
    Queues,
    /// The main thread once the frontend is connected.
    Connected,
    /// The vhost-user relay in front of net's daemon.
    Relay,
}

impl Role {
    /// Every role, for tests and documentation.
    pub const ALL: [Role; 4] = [Role::Process, Role::Queues, Role::Connected, Role::Relay];

    fn name(self) -> &'static str {
        match self {
            Role::Process => "process",
            Role::Queues => "queue worker",
            Role::Connected => "connected main thread",
            Role::Relay => "relay",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile to BPF (a bug in the lists, or an
    /// architecture seccompiler does not know).
    #[error("cannot build the {role} seccomp filter of capsid-vhost {kind}")]
    Build {
        /// The device kind.
        kind: Kind,
        /// The thread role.
        role: Role,
        /// What seccompiler said.
        #[source]
        source: BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {role} seccomp filter of capsid-vhost {kind}")]
    Install {
        /// The device kind.
        kind: Kind,
        /// The thread role.
        role: Role,
        /// What seccompiler said (prctl or seccomp failing).
        #[source]
        source: seccompiler::Error,
    },
}

/// Syscall number → the rules that allow it (an empty list: always).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// How one capsid-vhost process confines its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confinement {
    kind: Kind,
    mode: Mode,
}

impl Confinement {
    /// The confinement of a `kind` process in `mode`.
    pub fn new(kind: Kind, mode: Mode) -> Self {
        if mode == Mode::Off {
            tracing::warn!(device = %kind, "seccomp is off: capsid-vhost runs without syscall filters");
        }
        Self { kind, mode }
    }

    /// The device kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Installs `role`'s filter on the calling thread (nothing when off).
    /// Threads it starts afterwards inherit it.
    pub fn install(&self, role: Role) -> Result<(), SeccompError> {
        let mismatch = match self.mode {
            Mode::Off => return Ok(()),
            Mode::Kill => SeccompAction::KillProcess,
            Mode::Log => SeccompAction::Log,
        };
        let install = |program: BpfProgram| {
            seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
                kind: self.kind,
                role,
                source,
            })
        };
        if role == Role::Process {
            // Refused opens: EACCES when killing, logged when logging.
            let refused = match self.mode {
                Mode::Log => SeccompAction::Log,
                _ => SeccompAction::Errno(libc::EACCES as u32),
            };
            install(compile_refusals(self.kind, refused)?)?;
        }
        install(compile(self.kind, role, mismatch)?)?;
        tracing::debug!(device = %self.kind, %role, "seccomp filter installed");
        Ok(())
    }
}

/// `role`'s filter for `kind`, as BPF, with `mismatch` for syscalls outside it.
pub fn compile(
    kind: Kind,
    role: Role,
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, role, source };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter = SeccompFilter::new(rules(kind, role), mismatch, SeccompAction::Allow, arch)
        .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The process's first filter, under the allow-lists: read-only opens
/// get `refused` (EACCES) instead of a kill, everything else passes on to
/// the lists. glibc opens `/proc/sys/vm/overcommit_memory` the first time
/// free() shrinks a thread's heap (seen killing vsock under a real guest)
/// and copes with the open failing; so do a panic's backtrace and
/// `sysconf`. The lists allow read-only opens so that this filter's error
/// is what the caller sees: no device thread can read a file.
pub fn compile_refusals(kind: Kind, refused: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let role = Role::Process;
    refusals_filter(refused).map_err(|source| SeccompError::Build { kind, role, source })
}

/// The refusals filter of [`compile_refusals`], for any process that
/// stacks allow-lists on it (capsid-vmm too): read-only opens get
/// `refused`, everything else passes on.
pub fn refusals_filter(refused: SeccompAction) -> Result<BpfProgram, seccompiler::BackendError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let mut r = Rules::new();
    read_only_opens(&mut r);
    BpfProgram::try_from(SeccompFilter::new(r, SeccompAction::Allow, refused, arch)?)
}

/// Allows, in an allow-list, the read-only opens the refusals filter turns
/// into EACCES: the list must let them pass for that error, not a kill,
/// to be what the caller sees.
pub fn allow_read_only_opens(r: &mut Rules) {
    read_only_opens(r);
}

/// openat (and open on x86_64) for reading only.
fn read_only_opens(r: &mut Rules) {
    let mask = libc::O_ACCMODE as u64;
    allow_masked(r, libc::SYS_openat, 2, mask, libc::O_RDONLY as u64);
    #[cfg(target_arch = "x86_64")]
    allow_masked(r, libc::SYS_open, 1, mask, libc::O_RDONLY as u64);
}

/// The allow-list of `role` in a `kind` process.
///
/// Built from pieces, each named for what needs it; the comments say why
/// the less obvious entries are there.
pub fn rules(kind: Kind, role: Role) -> Rules {
    let mut r = Rules::new();
    runtime(&mut r);
    match (kind, role) {
        (Kind::Console, Role::Process) => {
            stacking(&mut r);
            // The one connection from QEMU, and the socket claim dropped
            // right after it (unlock, remove the socket and lock file).
            allow(&mut r, &[libc::SYS_accept4, libc::SYS_flock]);
            allow_unlink(&mut r);
            console(&mut r);
        }
        (Kind::Console, _) => console(&mut r),
        (_, Role::Process) => {
            spawning(&mut r);
            stacking(&mut r);
            vhost_user(&mut r);
            session_end(&mut r);
            queues(&mut r);
            device(&mut r, kind);
            if kind == Kind::Net {
                // The relay threads start under this list.
                relay(&mut r);
            }
        }
        (_, Role::Queues) => {
            queues(&mut r);
            device(&mut r, kind);
        }
        (_, Role::Connected) => session_end(&mut r),
        (_, Role::Relay) => relay(&mut r),
    }
    r
}

/// Allows each of `syscalls` whatever its arguments.
fn allow(r: &mut Rules, syscalls: &[libc::c_long]) {
    for &nr in syscalls {
        r.insert(nr, Vec::new());
    }
}

/// Allows `syscall` when its argument `arg` is one of `values` (unless it
/// is already allowed whatever its arguments).
fn allow_arg(r: &mut Rules, syscall: libc::c_long, arg: u8, values: &[u64]) {
    if r.get(&syscall).is_some_and(Vec::is_empty) {
        return;
    }
    let entry = r.entry(syscall).or_default();
    for &value in values {
        // Only fails for an argument index above 5: ours are constants.
        if let Ok(cond) =
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        {
            if let Ok(rule) = SeccompRule::new(vec![cond]) {
                if !entry.contains(&rule) {
                    entry.push(rule);
                }
            }
        }
    }
}

/// What every thread of a Rust program may do whatever its job: memory,
/// locks, signals, time, logging, exit.
fn runtime(r: &mut Rules) {
    allow(
        r,
        &[
            // malloc, thread stacks and guest memory mappings: glibc grows
            // its per-thread arenas with mprotect and trims them with
            // madvise; mremap is realloc of large buffers.
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            // Mutexes, RwLocks, joins, condvars.
            libc::SYS_futex,
            libc::SYS_sched_yield,
            // Signal return and masks; sigaltstack: Rust's stack-overflow
            // handler sets one per thread and removes it at thread exit.
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            // abort() on a panic resets SIGABRT's handler before raising it.
            libc::SYS_rt_sigaction,
            // A syscall interrupted by SIGSTOP/SIGCONT is resumed by it.
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Usually the vDSO; a syscall where the clock source has none.
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            // HashMap keys of each new thread (std), and virtio-rng.
            libc::SYS_getrandom,
            // Logs to stderr, eventfd notifications (used rings, exit).
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            // raise(SIGABRT) on a panic: the process aborts with its own
            // message rather than being killed for the abort.
            libc::SYS_gettid,
            libc::SYS_getpid,
        ],
    );
    // ... and only at itself.
    allow_arg(r, libc::SYS_tgkill, 0, &[u64::from(std::process::id())]);
    // Debug builds of std check, as each descriptor is closed, that it
    // is still open (fcntl F_GETFD).
    allow_arg(r, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
    // Read-only opens pass here to be refused with EACCES by the filter
    // under this one (`compile_refusals`): glibc's malloc and others
    // handle that error, not a kill.
    read_only_opens(r);
}

/// Starting threads: the vhost-user daemon starts its queue workers and
/// its request thread after the process filter is in place.
fn spawning(r: &mut Rules) {
    allow(
        r,
        &[
            // glibc's pthread_create; then, in the new thread, its rseq
            // area and robust futex list.
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            // pthread_getattr_np (Rust's stack guard of a new thread).
            libc::SYS_sched_getaffinity,
        ],
    );
    // clone(2) is glibc's fallback where clone3 is missing: threads only,
    // never a new process.
    if let Ok(cond) = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    ) {
        if let Ok(rule) = SeccompRule::new(vec![cond]) {
            r.insert(libc::SYS_clone, vec![rule]);
        }
    }
    // Thread names.
    allow_arg(r, libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
}

/// Stacking a narrower filter on a thread: seccompiler sets no_new_privs
/// and adds the filter (no flags: no TSYNC, no user notification).
fn stacking(r: &mut Rules) {
    allow_arg(r, libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]);
    let rule = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::from(libc::SECCOMP_SET_MODE_FILTER),
    )
    .and_then(|mode| {
        let flags = SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?;
        SeccompRule::new(vec![mode, flags])
    });
    if let Ok(rule) = rule {
        r.insert(libc::SYS_seccomp, vec![rule]);
    }
}

/// The vhost-user request thread: QEMU's messages, with descriptors.
fn vhost_user(r: &mut Rules) {
    allow(
        r,
        &[
            // The one frontend connection (the main thread).
            libc::SYS_accept4,
            // Messages and the descriptors they carry (memory regions,
            // kick/call eventfds).
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            // The connection closed at the end of the session.
            libc::SYS_shutdown,
            // The daemon makes each worker's epoll and exit eventfd as it
            // starts them, after the filter.
            libc::SYS_epoll_create1,
            libc::SYS_eventfd2,
            // std's File::metadata (statx, fstat fallback) on a received
            // descriptor.
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
        ],
    );
    // Descriptor flags: std and vmm-sys-util check and set close-on-exec
    // and O_NONBLOCK, and duplicate with F_DUPFD_CLOEXEC.
    allow_arg(
        r,
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    );
}

/// The main thread once the frontend is connected: waits for the request
/// thread, tells the workers to exit, drops the socket claim.
fn session_end(r: &mut Rules) {
    // Dropping the claim: unlocking the lock file, removing it and the
    // socket (the frees, joins and eventfd writes are in `runtime`).
    allow(r, &[libc::SYS_flock]);
    allow_unlink(r);
}

/// A vhost-user queue worker: its epoll loop and eventfds.
fn queues(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_epoll_pwait,
            // The vring handler (un)registers kick fds as rings are
            // enabled and disabled.
            libc::SYS_epoll_ctl,
            // Kick eventfds.
            libc::SYS_read,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    allow(r, &[libc::SYS_epoll_wait]);
}

/// The host side of each device, as its queue worker touches it.
fn device(r: &mut Rules, kind: Kind) {
    match kind {
        Kind::Blk => allow(
            r,
            &[
                // Positioned I/O straight into and out of guest memory.
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                // Not called today (std's write_all_at is pwrite64); kept
                // so a vectored write path does not kill the disk.
                libc::SYS_preadv,
                libc::SYS_pwritev,
                // FLUSH: sync_data; fsync where a libc maps it so.
                libc::SYS_fdatasync,
                libc::SYS_fsync,
                // DISCARD and WRITE_ZEROES: punch hole, zero range.
                libc::SYS_fallocate,
            ],
        ),
        Kind::Net => {
            // Frames to and from the tap (opened O_NONBLOCK before the
            // filter) are read(2) and write(2); the vectored forms are
            // allowed so a scatter-gather frame path does not kill the NIC.
            allow(r, &[libc::SYS_readv, libc::SYS_writev]);
            // The tap's settings: the vnet header size follows the
            // features the guest acks (the request thread); endianness
            // and offloads are set at open, allowed again for a device
            // that changes them on feature negotiation.
            allow_arg(
                r,
                libc::SYS_ioctl,
                1,
                &[
                    ioctl_nr(libc::TUNSETVNETHDRSZ),
                    ioctl_nr(libc::TUNSETVNETLE),
                    ioctl_nr(libc::TUNSETOFFLOAD),
                    ioctl_nr(libc::TUNGETIFF),
                    ioctl_nr(libc::FIONBIO),
                ],
            );
        }
        // getrandom is in `runtime`.
        Kind::Rng => {}
        Kind::Vsock => {
            allow(r, VSOCK_HOST_SOCKETS);
            // New host sockets: Unix only.
            allow_arg(r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            // set_nonblocking on accepted clients.
            allow_arg(r, libc::SYS_ioctl, 1, &[ioctl_nr(libc::FIONBIO)]);
            allow_arg(
                r,
                libc::SYS_fcntl,
                1,
                &[
                    libc::F_GETFD as u64,
                    libc::F_SETFD as u64,
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                ],
            );
        }
        Kind::Console => console(r),
    }
}

/// net's relay threads: messages in, messages out.
fn relay(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            // read_exact/write_all on the streams.
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_read,
            libc::SYS_shutdown,
        ],
    );
}

/// The console's copy loop: the guest's output into the capped log.
fn console(r: &mut Rules) {
    allow(
        r,
        &[
            // QEMU's stream (std's UnixStream::read is recv).
            libc::SYS_read,
            libc::SYS_recvfrom,
            // Rotation: the log becomes `<log>.1` …
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_fstat,
            libc::SYS_statx,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    allow(r, &[libc::SYS_rename]);
    // … and a new one is created, write-only: the console never reads a
    // file, so a compromised copy loop cannot read host files either.
    allow_masked(
        r,
        libc::SYS_openat,
        2,
        libc::O_ACCMODE as u64,
        libc::O_WRONLY as u64,
    );
}

/// An ioctl request number as the filter compares it (`libc::Ioctl` is
/// `c_ulong` on glibc, `c_int` on musl).
#[allow(clippy::unnecessary_cast)]
fn ioctl_nr(request: libc::Ioctl) -> u64 {
    request as u64
}

/// Removing files: unlink on x86_64, unlinkat everywhere.
fn allow_unlink(r: &mut Rules) {
    allow(r, &[libc::SYS_unlinkat]);
    #[cfg(target_arch = "x86_64")]
    allow(r, &[libc::SYS_unlink]);
}

/// Allows `syscall` when `arg & mask == value`.
fn allow_masked(r: &mut Rules, syscall: libc::c_long, arg: u8, mask: u64, value: u64) {
    if let Ok(cond) = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    ) {
        if let Ok(rule) = SeccompRule::new(vec![cond]) {
            let entry = r.entry(syscall).or_default();
            if !entry.contains(&rule) {
                entry.push(rule);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in Kind::ALL {
            for role in Role::ALL {
                let prog = compile(kind, role, SeccompAction::KillProcess).unwrap();
                assert!(prog.len() < 4096, "{kind} {role}: {}", prog.len());
            }
        }
    }

    #[test]
    fn narrower_roles_are_subsets_of_the_process_list() {
        for kind in Kind::ALL {
            let process = rules(kind, Role::Process);
            for role in [Role::Queues, Role::Connected, Role::Relay] {
                if role == Role::Relay && kind != Kind::Net {
                    continue; // only net has a relay
                }
                for nr in rules(kind, role).keys() {
                    assert!(process.contains_key(nr), "{kind} {role}: syscall {nr}");
                }
            }
        }
    }

    #[test]
    fn queue_workers_cannot_start_threads_or_open_files() {
        for kind in Kind::ALL {
            let q = rules(kind, Role::Queues);
            for nr in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_execve] {
                assert!(!q.contains_key(&nr), "{kind}: {nr}");
            }
            // Only the read-only open the refusals filter turns into EACCES.
            let opens = if kind == Kind::Console { 2 } else { 1 };
            assert_eq!(
                q.get(&libc::SYS_openat).map(Vec::len),
                Some(opens),
                "{kind}"
            );
        }
        // Only vsock reaches the host's sockets from its queues.
        assert!(rules(Kind::Vsock, Role::Queues).contains_key(&libc::SYS_connect));
        assert!(!rules(Kind::Blk, Role::Process).contains_key(&libc::SYS_connect));
        assert!(!rules(Kind::Blk, Role::Process).contains_key(&libc::SYS_socket));
    }

    /// Runs `f` in a child process and returns how it ended.
    fn in_child(f: impl FnOnce() -> i32) -> nix::sys::wait::WaitStatus {
        // SAFETY: the child only runs `f` (no locks are taken between fork
        // and _exit beyond what `f` does with its own memory) and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = f();
                // SAFETY: _exit ends the child at once, as a forked child must.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    #[test]
    fn a_syscall_outside_the_list_kills_the_process() {
        use nix::sys::wait::WaitStatus;
        let status = in_child(|| {
            let c = Confinement::new(Kind::Rng, Mode::Kill);
            if c.install(Role::Queues).is_err() {
                return 2;
            }
            // getrandom is on the list; socket(2) is not.
            let mut buf = [0u8; 8];
            // SAFETY: the buffer is ours and 8 bytes long.
            if unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 8, 0) } != 8 {
                return 3;
            }
            // SAFETY: socket(2) takes no memory.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(
            matches!(
                status,
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{status:?}"
        );
    }

    #[test]
    fn log_mode_lets_the_call_through_and_off_installs_nothing() {
        use nix::sys::wait::WaitStatus;
        let status = in_child(|| {
            if Confinement::new(Kind::Rng, Mode::Log)
                .install(Role::Queues)
                .is_err()
            {
                return 2;
            }
            // SAFETY: socket(2) takes no memory.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                return 3;
            }
            0
        });
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
        let status = in_child(|| {
            if Confinement::new(Kind::Rng, Mode::Off)
                .install(Role::Queues)
                .is_err()
            {
                return 2;
            }
            let text = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
            if text.contains("Seccomp:\t0") {
                0
            } else {
                4
            }
        });
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    #[test]
    fn read_only_opens_are_refused_not_killed() {
        use nix::sys::wait::WaitStatus;
        let status = in_child(|| {
            let c = Confinement::new(Kind::Vsock, Mode::Kill);
            if c.install(Role::Process).is_err() || c.install(Role::Queues).is_err() {
                return 2;
            }
            // What glibc's free() does the first time it shrinks a heap.
            match std::fs::File::open("/proc/sys/vm/overcommit_memory") {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => 0,
                _ => 4,
            }
        });
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    #[test]
    fn console_may_create_its_log_but_not_read_a_file() {
        use nix::sys::wait::WaitStatus;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let log2 = log.clone();
        let status = in_child(move || {
            let c = Confinement::new(Kind::Console, Mode::Kill);
            if c.install(Role::Process).is_err() || c.install(Role::Connected).is_err() {
                return 2;
            }
            let ok = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&log2)
                .is_ok();
            if !ok {
                return 3;
            }
            // Reading a file is refused (EACCES, the process lives on) …
            match std::fs::File::open("/etc/hostname") {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
                _ => return 4,
            }
            // … and a socket kills it.
            // SAFETY: socket(2) takes no memory.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(
            matches!(
                status,
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "{status:?}"
        );
        assert!(log.exists());
    }
}
