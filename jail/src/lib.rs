//! capsid-jail confines one VM-side process (capsid-vmm, QEMU, a
//! capsid-vhost device backend): the process a hostile guest reaches first
//! when it breaks out of its virtual hardware.
//!
//! The jailer runs as root and, in this order:
//! 1. joins the sandbox's network namespace and cgroups, hands the
//!    sandbox's tap to the jail's uid, opens the files the jailed process
//!    may use (disks) as inherited descriptors, sets rlimits;
//! 2. unshares mount, pid, ipc and uts namespaces and forks: the child is
//!    pid 1 of the new pid namespace;
//! 3. the child builds a root of its own (a small tmpfs holding only bind
//!    mounts of what the process needs, a few device nodes and a private
//!    procfs), `pivot_root`s into it, drops every capability from its
//!    bounding set, switches to the sandbox's own uid/gid with no
//!    supplementary groups, sets `no_new_privs` and the parent-death
//!    signal, and execs the program;
//! 4. the parent drops to the same uid under a seccomp filter of its own,
//!    forwards termination signals and exits as the child did, so the
//!    caller supervises it as if it were the program itself.
//!
//! [`JailSpec`] is the command line, shared by the jailer and the code that
//! starts it, so neither spells the other's flags.

pub mod spec;

pub use spec::{BindMount, JailSpec, PassedFd, SpecError};
