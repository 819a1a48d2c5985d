//! virtiofsd, the virtio-fs project's vhost-user-fs daemon, serving a
//! sandbox's share (crate::volumes) to either backend. One daemon per VM,
//! started before the VMM, in its namespace sandbox: it pivots into the
//! share, so a guest that owns its FUSE client still cannot name a host
//! path outside it (absolute symlinks, `..` from the root, and renames
//! racing a lookup all resolve inside the share).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::jail::SandboxJail;
use super::process::{status_code, Supervised};
use super::{BackendError, FsSpec, Result};

/// How long virtiofsd gets to put up its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The command line for `spec`, listening on `socket`.
///
/// * `--sandbox namespace`: own mount, pid and network namespaces, and a
///   pivot_root into the share; virtiofsd's seccomp filter kills it on an
///   unexpected system call.
/// * `--cache auto` (docs/volumes.md): the guest caches attributes and
///   names for a second and file data while a file stays open, so a file
///   changed on the host (a configMap swapped by the kubelet) is seen
///   within about a second, and metadata-heavy work is several times
///   faster than with `never` (docs/performance.md).
/// * `--announce-submounts`: every volume is a bind mount of its own in
///   the share, so the guest sees each as a separate filesystem (distinct
///   st_dev, no inode collisions between volumes).
/// * No `--tag`: the tag is the frontend's (QEMU's `tag=`, capsid-vmm's
///   config space); advertising it from the daemon crashes QEMU 7.1–8.0.
/// * `--modcaps=-mknod:-setfcap`: the guest's root cannot make device
///   nodes or set file capabilities in a volume (virtiofsd keeps the
///   capabilities it needs to act for the guest's users otherwise).
/// * No xattrs, no posix ACLs, no writeback cache, no direct I/O.
pub fn command(daemon: &Path, spec: &FsSpec, socket: &Path) -> Command {
    let mut cmd = Command::new(daemon);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(&spec.shared_dir)
        .args(["--sandbox", "namespace"])
        .args(["--seccomp", "kill"])
        .args(["--cache", spec.cache.as_arg()])
        .arg("--modcaps=-mknod:-setfcap")
        .arg("--announce-submounts")
        .args(["--log-level", "warn"]);
    cmd
}

/// A running virtiofsd and the vhost-user socket it listens on.
#[derive(Debug)]
pub struct Virtiofsd {
    /// The process.
    pub process: Supervised,
    /// Its vhost-user socket, for the VMM.
    pub socket: PathBuf,
}

/// Where the VM in `run_dir` finds virtiofsd's vhost-user socket.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("virtiofsd.sock")
}

/// Starts virtiofsd for `spec` with its socket and log in `run_dir`, and
/// waits for the socket. A daemon that dies first fails with its words.
///
/// With a jail, virtiofsd still runs as root (it acts for every user of
/// the guest, with the capabilities `--modcaps` leaves it) in its own
/// namespace sandbox, but in the sandbox's cgroups, and its socket is
/// handed to the jail's uid, which the VMM runs as.
pub fn start(spec: &FsSpec, run_dir: &Path, jail: Option<&SandboxJail>) -> Result<Virtiofsd> {
    let daemon = crate::locate::binary(&spec.daemon)
        .ok_or_else(|| BackendError::BinaryNotFound(spec.daemon.display().to_string()))?;
    let socket = socket_path(run_dir);
    let mut cmd = command(&daemon, spec, &socket);
    if let Some(jail) = jail {
        jail.join_cgroups(&mut cmd);
    }
    let mut process = Supervised::spawn("virtiofsd", cmd, &run_dir.join("virtiofsd.log"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    while !socket.exists() {
        if let Some(status) = process.try_wait()? {
            return Err(BackendError::StartFailed {
                what: "virtiofsd".into(),
                detail: format!(
                    "exit status {}: {}",
                    status_code(status),
                    process.last_words()
                ),
            });
        }
        if Instant::now() > deadline {
            return Err(BackendError::StartFailed {
                what: "virtiofsd".into(),
                detail: "its socket did not appear within 10 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(jail) = jail {
        jail.hand_over(&socket)?;
    }
    Ok(Virtiofsd { process, socket })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FsCache;

    #[test]
    fn the_daemon_is_sandboxed_and_never_advertises_the_tag() {
        let spec = FsSpec {
            daemon: PathBuf::from("/usr/local/bin/virtiofsd"),
            shared_dir: PathBuf::from("/run/capsid/shares/s1"),
            tag: "capsid".into(),
            cache: FsCache::Auto,
        };
        let cmd = command(&spec.daemon, &spec, Path::new("/run/x/virtiofsd.sock"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--sandbox namespace"), "{joined}");
        assert!(joined.contains("--seccomp kill"), "{joined}");
        assert!(joined.contains("--cache auto"), "{joined}");
        assert!(
            joined.contains("--shared-dir /run/capsid/shares/s1"),
            "{joined}"
        );
        assert!(!args.iter().any(|a| a == "--tag"), "{joined}");
        assert!(!args.iter().any(|a| a == "--xattr"), "{joined}");
        assert!(joined.contains("--modcaps=-mknod:-setfcap"), "{joined}");
    }
}
