//! containerd-shim-capsid-v2: containerd's shim v2 runtime for capsid.
#![forbid(unsafe_code)]

pub mod sizing;
