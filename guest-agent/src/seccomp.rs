//! The spec's `linux.seccomp`, made to mean in libcontainer what it means
//! in runc, and applied to exec'd processes too.
//!
//! For `SCMP_CMP_MASKED_EQ` runc, containerd and Docker read an argument
//! rule as `(arg & value) == valueTwo` (value is the mask). libcontainer
//! 0.7 hands the two to libseccomp the other way round, and libseccomp then
//! masks the datum with it, so `(arg & 0) == 0` matches every call: Docker's
//! clone rule (no namespace flags) would allow any clone, and a deny rule
//! would deny everything. Swapping the two in the spec the agent passes on
//! restores runc's meaning.
//!
//! libcontainer 0.7 also builds an exec'd (tenant) process's spec without
//! the container's `linux.seccomp`, so it would run unfiltered. runc
//! filters it like the init; [`FilteredExecutor`] does that here, loading
//! the container's filter as the last step before exec.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator, Spec,
};

/// Errors loading a filter in an exec'd process. libcontainer's executor
/// takes a message, so each text quotes its error, not the error's causes
/// (what the runtime helper has always reported).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The unprivileged fallback could not set no_new_privs.
    #[error("setting no_new_privs for seccomp: {0}")]
    NoNewPrivs(nix::Error),
    /// libcontainer could not load the filter.
    #[error("loading the seccomp filter: {0}")]
    Load(libcontainer::seccomp::SeccompError),
}

/// Rewrites every masked comparison of `seccomp` into libcontainer's order.
pub fn adapt(seccomp: &mut LinuxSeccomp) {
    let Some(mut syscalls) = seccomp.syscalls().clone() else {
        return;
    };
    for syscall in &mut syscalls {
        let Some(mut args) = syscall.args().clone() else {
            continue;
        };
        for arg in &mut args {
            if arg.op() == LinuxSeccompOperator::ScmpCmpMaskedEq {
                *arg = swapped(arg);
            }
        }
        syscall.set_args(Some(args));
    }
    seccomp.set_syscalls(Some(syscalls));
}

/// The masked comparison with its mask and datum exchanged.
fn swapped(arg: &LinuxSeccompArg) -> LinuxSeccompArg {
    // The builder is the only way to set fields; every field is given, so
    // it cannot fail, and the original is kept if it ever did.
    LinuxSeccompArgBuilder::default()
        .index(arg.index())
        .value(arg.value_two().unwrap_or(0))
        .value_two(arg.value())
        .op(arg.op())
        .build()
        .unwrap_or(*arg)
}

/// Runs a process like libcontainer's default executor, under `filter`.
#[derive(Clone)]
pub struct FilteredExecutor {
    filter: LinuxSeccomp,
}

impl FilteredExecutor {
    /// An executor applying `filter` (already [`adapt`]ed).
    pub fn new(filter: LinuxSeccomp) -> Self {
        Self { filter }
    }

    fn load(&self) -> Result<(), SeccompError> {
        let listener = match libcontainer::seccomp::initialize_seccomp(&self.filter) {
            Ok(listener) => listener,
            // Loading a filter takes CAP_SYS_ADMIN or no_new_privs. runc
            // loads it before dropping capabilities; here they are already
            // dropped, so an unprivileged process gets no_new_privs.
            Err(_) => {
                nix::sys::prctl::set_no_new_privs().map_err(SeccompError::NoNewPrivs)?;
                libcontainer::seccomp::initialize_seccomp(&self.filter)
                    .map_err(SeccompError::Load)?
            }
        };
        // Nobody listens for SCMP_ACT_NOTIFY on exec'd processes: closing
        // the listener makes such calls fail with ENOSYS.
        if let Some(fd) = listener {
            let _ = nix::unistd::close(fd);
        }
        Ok(())
    }
}

impl Executor for FilteredExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.load().map_err(|e| {
            tracing::error!("{e}");
            ExecutorError::Other(e.to_string())
        })?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_comparisons_are_swapped_and_others_kept() {
        let text = r#"{
          "defaultAction": "SCMP_ACT_ERRNO",
          "syscalls": [
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            {"names": ["read"], "action": "SCMP_ACT_ALLOW"}
          ]
        }"#;
        let mut seccomp: LinuxSeccomp = serde_json::from_str(text).unwrap();
        adapt(&mut seccomp);
        let syscalls = seccomp.syscalls().as_ref().unwrap();
        let clone = syscalls[0].args().as_ref().unwrap()[0];
        assert_eq!((clone.value(), clone.value_two()), (0, Some(2114060288)));
        let personality = syscalls[1].args().as_ref().unwrap()[0];
        assert_eq!((personality.value(), personality.value_two()), (8, None));
        assert!(syscalls[2].args().is_none());
    }
}
