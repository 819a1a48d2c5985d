//! containerd-shim-capsid-v2: containerd's shim v2 runtime for capsid. Each
//! task runs in its own microVM; the shim maps the bundle and the snapshot
//! mounts to a sandbox, wires stdio and publishes the task events.
#![forbid(unsafe_code)]

pub mod binlog;
pub mod bootstrap;
pub mod cleanup;
pub mod container;
pub mod create;
pub mod events;
pub mod hooks;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod network;
pub mod options;
pub mod pod;
pub mod pod_role;
pub mod pool_claim;
pub mod premounted;
pub mod process;
pub mod rootfs;
pub mod shutdown;
pub mod sizing;
pub mod spec;

pub mod task;
pub mod warm;

/// An error with its sources, as one line: `what: why: root cause`.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_chained_once() {
        let inner = std::io::Error::other("disk full");
        let e = cleanup_error(inner);
        assert_eq!(
            describe(&e),
            "cannot write the sandbox record /x: disk full"
        );
    }

    fn cleanup_error(source: std::io::Error) -> capsid_sandbox::record::RecordError {
        capsid_sandbox::record::RecordError::Write {
            path: "/x".into(),
            source,
        }
    }
}
