//! What capsid's shim and CLI share: the host configuration, the checks that
//! decide which VM backend this host can run, and (as they land) the backends
//! themselves and the agent client.

pub mod agent;
pub mod backend;
pub mod balloon;
pub mod check;
pub mod cni;
pub mod config;
pub mod image;
pub mod locate;
pub mod network;
pub mod sandbox;
pub mod seccomp;
pub mod spec;
pub mod stdio;
