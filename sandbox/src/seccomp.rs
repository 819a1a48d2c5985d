//! Seccomp for `capsid run`: a default allowlist profile in the spirit of
//! Docker's and containerd's, no filter at all, or a profile from a file.
//!
//! The default refuses what an unprivileged container has no business
//! doing even inside its own VM (namespaces, mounts, modules, kexec,
//! reboot, clock setting, keyrings, BPF, perf, vsock sockets that would
//! reach the host), and allows the ordinary system interface. Unknown
//! calls fail with EPERM; `clone3` fails with ENOSYS so that C libraries
//! fall back to `clone`, whose flags can be checked.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// Errors choosing a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile file cannot be read.
    #[error("seccomp profile {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The profile file is not an OCI `linux.seccomp` object.
    #[error("seccomp profile {path}: not an OCI linux.seccomp object: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The profile would stop the container before it starts.
    #[error("seccomp profile {path}: {reason}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// oci-spec refused a value of the built-in profile.
    #[error("seccomp default profile: {0}")]
    Build(String),
}

/// Result of profile building.
pub type Result<T> = std::result::Result<T, SeccompError>;

/// What `--seccomp` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeccompChoice {
    /// The built-in profile ([`default_profile`]).
    Default,
    /// No filter.
    Unconfined,
    /// An OCI `linux.seccomp` JSON file.
    File(PathBuf),
}

impl SeccompChoice {
    /// Parses `default`, `unconfined` or a file path.
    pub fn parse(value: &str) -> Self {
        match value {
            "default" => Self::Default,
            "unconfined" => Self::Unconfined,
            path => Self::File(PathBuf::from(path)),
        }
    }

    /// The `linux.seccomp` section it stands for (`None`: unconfined).
    pub fn profile(&self) -> Result<Option<LinuxSeccomp>> {
        match self {
            Self::Default => default_profile().map(Some),
            Self::Unconfined => Ok(None),
            Self::File(path) => load(path).map(Some),
        }
    }
}

/// Reads an OCI `linux.seccomp` object from `path`.
pub fn load(path: &Path) -> Result<LinuxSeccomp> {
    let text = std::fs::read(path).map_err(|source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let profile: LinuxSeccomp =
        serde_json::from_slice(&text).map_err(|source| SeccompError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    // Like runc: a notify default would need a listener for every call,
    // the runtime's own writes included.
    if profile.default_action() == LinuxSeccompAction::ScmpActNotify {
        return Err(SeccompError::Unusable {
            path: path.to_path_buf(),
            reason: "SCMP_ACT_NOTIFY cannot be the default action",
        });
    }
    Ok(profile)
}

/// `clone` flags that create namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET): refused to `clone`.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
/// `personality` values that are harmless: Linux, 32-bit, UNAME26 (and
/// both), and the query 0xffffffff.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];
/// Linux errno values.
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
/// socket(2) family of vsock: the VM's channel to the host is the agent's.
const AF_VSOCK: u64 = 40;

/// Allowed without conditions, by theme (names separated by blanks).
const ALLOWED: &[&str] = &[
    // Processes, threads, sessions, credentials.
    "execve execveat exit exit_group fork vfork wait4 waitid waitpid kill tkill tgkill \
     getpid getppid gettid getpgid setpgid getpgrp getsid setsid set_tid_address \
     set_robust_list get_robust_list rseq prctl arch_prctl modify_ldt get_thread_area \
     set_thread_area capget capset getuid geteuid getgid getegid getuid32 geteuid32 \
     getgid32 getegid32 setuid setgid setreuid setregid setresuid setresgid getresuid \
     getresgid setfsuid setfsgid setuid32 setgid32 setreuid32 setregid32 setresuid32 \
     setresgid32 getresuid32 getresgid32 setfsuid32 setfsgid32 getgroups setgroups \
     getgroups32 setgroups32 getpriority setpriority getrlimit setrlimit ugetrlimit \
     prlimit64 getrusage times pidfd_open pidfd_send_signal pidfd_getfd process_mrelease \
     ptrace process_vm_readv process_vm_writev seccomp landlock_create_ruleset \
     landlock_add_rule landlock_restrict_self ioprio_get ioprio_set",
    // Scheduling.
    "sched_yield sched_getaffinity sched_setaffinity sched_getparam sched_setparam \
     sched_getscheduler sched_setscheduler sched_getattr sched_setattr \
     sched_get_priority_max sched_get_priority_min sched_rr_get_interval \
     sched_rr_get_interval_time64 getcpu",
    // Signals.
    "rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigsuspend rt_sigtimedwait \
     rt_sigtimedwait_time64 rt_sigqueueinfo rt_tgsigqueueinfo sigaction sigprocmask \
     sigreturn sigpending sigsuspend signal sigaltstack signalfd signalfd4 pause \
     restart_syscall alarm",
    // Memory.
    "brk mmap mmap2 munmap mremap mprotect madvise msync mincore mlock mlock2 mlockall \
     munlock munlockall membarrier memfd_create memfd_secret remap_file_pages pkey_alloc \
     pkey_free pkey_mprotect map_shadow_stack",
    // Files and descriptors.
    "read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 open openat \
     openat2 creat close close_range dup dup2 dup3 fcntl fcntl64 ioctl lseek _llseek pipe \
     pipe2 sendfile sendfile64 splice tee vmsplice copy_file_range readahead fadvise64 \
     fadvise64_64 fallocate flock fsync fdatasync sync syncfs sync_file_range truncate \
     truncate64 ftruncate ftruncate64 stat stat64 lstat lstat64 fstat fstat64 newfstatat \
     fstatat64 statx statfs statfs64 fstatfs fstatfs64 access faccessat faccessat2 getcwd \
     chdir fchdir getdents getdents64 readlink readlinkat mkdir mkdirat mknod mknodat rmdir \
     rename renameat renameat2 link linkat symlink symlinkat unlink unlinkat chmod fchmod \
     fchmodat fchmodat2 chown fchown lchown fchownat chown32 fchown32 lchown32 umask utime \
     utimes utimensat utimensat_time64 futimesat getxattr lgetxattr fgetxattr setxattr \
     lsetxattr fsetxattr listxattr llistxattr flistxattr removexattr lremovexattr \
     fremovexattr name_to_handle_at cachestat inotify_init inotify_init1 inotify_add_watch \
     inotify_rm_watch fanotify_mark",
    // Waiting and events.
    "select _newselect pselect6 pselect6_time64 poll ppoll ppoll_time64 epoll_create \
     epoll_create1 epoll_ctl epoll_ctl_old epoll_wait epoll_wait_old epoll_pwait \
     epoll_pwait2 eventfd eventfd2 futex futex_time64 futex_waitv futex_wait futex_wake \
     futex_requeue io_setup io_destroy io_submit io_cancel io_getevents io_pgetevents \
     io_pgetevents_time64",
    // Time.
    "time gettimeofday clock_gettime clock_gettime64 clock_getres clock_getres_time64 \
     clock_nanosleep clock_nanosleep_time64 nanosleep getitimer setitimer timer_create \
     timer_delete timer_gettime timer_gettime64 timer_settime timer_settime64 \
     timer_getoverrun timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime \
     timerfd_settime64 adjtimex clock_adjtime clock_adjtime64",
    // Sockets (socket itself is checked below).
    "socketpair bind connect listen accept accept4 getsockname getpeername getsockopt \
     setsockopt shutdown send sendto sendmsg sendmmsg recv recvfrom recvmsg recvmmsg \
     recvmmsg_time64 socketcall",
    // System V and POSIX IPC.
    "ipc msgget msgsnd msgrcv msgctl semget semop semtimedop semtimedop_time64 semctl \
     shmget shmat shmdt shmctl mq_open mq_unlink mq_timedsend mq_timedsend_time64 \
     mq_timedreceive mq_timedreceive_time64 mq_notify mq_getsetattr",
    // Information.
    "uname sysinfo getrandom",
];

fn build_err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build(e.to_string())
}

fn rule(
    names: &[&str],
    action: LinuxSeccompAction,
    errno: Option<u32>,
    arg: Option<(usize, LinuxSeccompOperator, u64, u64)>,
) -> Result<LinuxSyscall> {
    let mut builder = LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .action(action);
    if let Some(errno) = errno {
        builder = builder.errno_ret(errno);
    }
    if let Some((index, op, value, value_two)) = arg {
        let arg = LinuxSeccompArgBuilder::default()
            .index(index)
            .op(op)
            .value(value)
            .value_two(value_two)
            .build()
            .map_err(build_err)?;
        builder = builder.args(vec![arg]);
    }
    builder.build().map_err(build_err)
}

/// The built-in profile: EPERM unless allowed.
pub fn default_profile() -> Result<LinuxSeccomp> {
    use LinuxSeccompAction::{ScmpActAllow as Allow, ScmpActErrno as Errno};
    use LinuxSeccompOperator::{ScmpCmpEq as Eq, ScmpCmpMaskedEq as MaskedEq, ScmpCmpNe as Ne};

    let names: Vec<&str> = ALLOWED
        .iter()
        .flat_map(|group| group.split_whitespace())
        .collect();
    let mut syscalls = vec![rule(&names, Allow, None, None)?];
    // A namespace-free clone (fork, threads); (flags & mask) == 0.
    syscalls.push(rule(
        &["clone"],
        Allow,
        None,
        Some((0, MaskedEq, CLONE_NAMESPACE_FLAGS, 0)),
    )?);
    // clone3 passes its flags in memory, out of seccomp's sight.
    syscalls.push(rule(&["clone3"], Errno, Some(ENOSYS), None)?);
    for value in PERSONALITIES {
        syscalls.push(rule(
            &["personality"],
            Allow,
            None,
            Some((0, Eq, value, 0)),
        )?);
    }
    syscalls.push(rule(&["socket"], Allow, None, Some((0, Ne, AF_VSOCK, 0)))?);
    LinuxSeccompBuilder::default()
        .default_action(Errno)
        .default_errno_ret(EPERM)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
        .map_err(build_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(profile: &LinuxSeccomp, name: &str) -> bool {
        profile.syscalls().as_ref().unwrap().iter().any(|s| {
            s.action() == LinuxSeccompAction::ScmpActAllow
                && s.args().is_none()
                && s.names().iter().any(|n| n == name)
        })
    }

    #[test]
    fn default_profile_allows_the_ordinary_and_refuses_the_rest() {
        let p = default_profile().unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(EPERM));
        for name in [
            "read",
            "execve",
            "mkdir",
            "futex",
            "rt_sigaction",
            "connect",
        ] {
            assert!(allowed(&p, name), "{name}");
        }
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "reboot",
            "kexec_load",
            "init_module",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "settimeofday",
            "clock_settime",
            "swapon",
            "pivot_root",
            "chroot",
            "open_by_handle_at",
            "socket",
            "clone",
        ] {
            assert!(!allowed(&p, name), "{name} is allowed unconditionally");
        }
        let syscalls = p.syscalls().as_ref().unwrap();
        let clone3 = syscalls.iter().find(|s| s.names() == &["clone3"]).unwrap();
        assert_eq!(clone3.errno_ret(), Some(ENOSYS));
        let clone = syscalls.iter().find(|s| s.names() == &["clone"]).unwrap();
        let arg = clone.args().as_ref().unwrap()[0];
        assert_eq!(
            (arg.value(), arg.value_two()),
            (CLONE_NAMESPACE_FLAGS, Some(0))
        );
        // No name twice: a duplicate would be a rule libseccomp refuses.
        let mut names: Vec<&String> = syscalls
            .iter()
            .filter(|s| s.args().is_none())
            .flat_map(|s| s.names())
            .collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all);
    }

    #[test]
    fn choices_parse_and_files_are_checked() {
        assert_eq!(SeccompChoice::parse("default"), SeccompChoice::Default);
        assert_eq!(
            SeccompChoice::parse("unconfined"),
            SeccompChoice::Unconfined
        );
        assert_eq!(SeccompChoice::Unconfined.profile().unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("p.json");
        std::fs::write(
            &good,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let p = SeccompChoice::parse(good.to_str().unwrap())
            .profile()
            .unwrap()
            .unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"defaultAction":"SCMP_ACT_SOMETIMES"}"#).unwrap();
        let e = load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("linux.seccomp"), "{e}");
        let e = load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::write(&bad, r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).unwrap();
        assert!(load(&bad)
            .unwrap_err()
            .to_string()
            .contains("SCMP_ACT_NOTIFY"));
    }
}
