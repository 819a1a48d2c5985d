//! capsid-vmm: a KVM virtual machine monitor for capsid's microVMs.
//!
//! `config` is data; `builder` turns it into a running VM; everything that
//! talks to KVM (and so holds the unsafe code) lives under `vstate`.

pub mod builder;
pub mod config;
pub mod legacy;
pub mod vstate;

/// Process exit status when the guest asked for a reset (i8042 or triple
/// fault on purpose): the normal way a capsid guest ends.
pub const EXIT_GUEST_RESET: u8 = 0;
/// Process exit status when the VMM itself failed.
pub const EXIT_VMM_ERROR: u8 = 1;
/// Process exit status when the guest crashed (KVM shutdown exit, internal
/// error, failed entry).
pub const EXIT_GUEST_CRASH: u8 = 3;
