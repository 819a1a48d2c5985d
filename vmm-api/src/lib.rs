//! capsid-vmm's wire, shared by the VMM and its clients (the sandbox
//! library): the VM configuration document capsid-vmm starts from
//! ([`config`]) and the line-delimited JSON requests and replies of its
//! control socket ([`control`]). Data only: reading files, building the VM
//! and serving the socket stay in capsid-vmm. docs/vmm.md documents both.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
