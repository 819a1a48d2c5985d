//! What capsid's shim and CLI share: the host configuration, the checks that
//! decide which VM backend this host can run, and (as they land) the backends
//! themselves and the agent client.

pub mod backend;
pub mod check;
pub mod config;
pub mod locate;
