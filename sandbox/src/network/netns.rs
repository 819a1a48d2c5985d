//! Running iproute2's `ip` and `tc` inside a network namespace named by path
//! (`/var/run/netns/NAME` or `/proc/PID/ns/net`), through `nsenter --net`,
//! with failures turned into one error that says what was run and why it
//! failed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::NetworkError;

/// A network namespace that commands run in.
#[derive(Debug, Clone)]
pub(crate) struct Netns {
    path: PathBuf,
}

impl Netns {
    /// The namespace at `path`, which must exist.
    pub(crate) fn open(path: &Path) -> Result<Self, NetworkError> {
        if !path.exists() {
            return Err(NetworkError::NoNetns {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Whether the namespace file still exists.
    pub(crate) fn exists(path: &Path) -> bool {
        path.exists()
    }

    /// Runs `program args…` in the namespace; its stdout on success.
    pub(crate) fn run(&self, program: &str, args: &[&str]) -> Result<String, NetworkError> {
        let mut net = std::ffi::OsString::from("--net=");
        net.push(&self.path);
        let output = Command::new("nsenter")
            .arg(net)
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NetworkError::Spawn {
                program: "nsenter".into(),
                source,
            })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        Err(NetworkError::Command {
            netns: self.path.clone(),
            command: format!("{program} {}", args.join(" ")),
            reason: if stderr.is_empty() {
                format!("{}", output.status)
            } else {
                stderr.replace('\n', "; ")
            },
        })
    }

    /// `ip args…`.
    pub(crate) fn ip(&self, args: &[&str]) -> Result<String, NetworkError> {
        self.run("ip", args)
    }

    /// `tc args…`.
    pub(crate) fn tc(&self, args: &[&str]) -> Result<String, NetworkError> {
        self.run("tc", args)
    }

    /// `ip -j args…`, parsed.
    pub(crate) fn ip_json<T: serde::de::DeserializeOwned>(
        &self,
        args: &[&str],
    ) -> Result<T, NetworkError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full)?;
        // iproute2 prints nothing at all (not `[]`) for an empty list.
        let out = if out.trim().is_empty() { "[]" } else { &out };
        serde_json::from_str(out).map_err(|e| NetworkError::Parse {
            command: format!("ip {}", full.join(" ")),
            reason: e.to_string(),
        })
    }

    /// The namespace's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
