//! What capsid's shim, CLI, benches and tests share: the host configuration
//! and checks that pick a VM backend; the backends (capsid-vmm, QEMU
//! microvm); a [`sandbox::Sandbox`] (a VM with its agent connected) and the
//! one path that puts containers and processes in it ([`container`]); images
//! as cached rootfs disks ([`image`]); networks ([`network`] for a tap in a
//! namespace someone else made, [`cni`] for the networks capsid makes); the
//! record of what a sandbox made on the host and its undo ([`record`]); and
//! the memory policy ([`balloon`]).

pub mod agent;
pub mod backend;
pub mod balloon;
pub mod check;
pub mod cni;
pub mod config;
pub mod container;
pub mod dns_relay;
pub mod hotplug;
pub mod image;
pub mod locate;
pub mod netns;
pub mod network;
pub mod pod_share;
pub mod pool;
pub mod pool_claim;
pub mod pool_daemon;
pub mod private_dir;
pub mod process;
pub mod record;
pub mod sandbox;
pub mod seccomp;
pub mod spec;
pub mod stdio;
pub mod vmm_control;
pub mod volumes;
