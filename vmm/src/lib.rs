//! capsid-vmm: a KVM virtual machine monitor for capsid's microVMs.
//!
//! `config` is data (capsid-vmm-api's document, read from a file here);
//! `builder` turns it into a [`machine::Machine`], which runs it; `boot`
//! lays out and loads what the guest starts with; `vstate` holds everything
//! that talks to KVM; `devices` is the emulated hardware (virtio-mmio and,
//! in `devices::legacy`, the PC's serial port and i8042); `control` is the
//! API socket; `seccomp` the per-thread system call filters; `snapshot`
//! saves a paused VM to files and loads them for the builder to restore.

pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod machine;
pub mod metrics;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;

/// Process exit status when the guest asked for a reset (i8042, as
/// `reboot=k` does): the normal way a capsid guest ends.
pub const EXIT_GUEST_RESET: u8 = 0;
/// Process exit status when the VMM itself failed (bad config, missing or
/// unloadable kernel, KVM error); one line on stderr says why.
pub const EXIT_VMM_ERROR: u8 = 1;
/// Process exit status when the guest crashed (triple fault, failed entry,
/// KVM internal error).
pub const EXIT_GUEST_CRASH: u8 = 3;
/// Process exit status when the host ended the VM: SIGTERM/SIGINT, or a
/// `shutdown` request the guest did not answer within its timeout.
pub const EXIT_STOPPED: u8 = 4;
