//! Network namespaces named by path: the named ones capsid makes itself, as
//! `ip netns add` does (a fresh namespace kept alive by a bind mount of its
//! nsfs file on `/run/netns/NAME`, so CNI plugins, `nsenter` and `ip -n` can
//! all find it), and iproute2's `ip` and `tc` run inside any namespace
//! (`/var/run/netns/NAME` or `/proc/PID/ns/net`) through `nsenter --net`,
//! with failures turned into one error that says what was run and why it
//! failed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

/// Errors of network namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file is missing.
    #[error("network namespace {} does not exist", path.display())]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// The name cannot be a file in the namespace directory.
    #[error("invalid network namespace name: {name:?} is not a file name")]
    BadName {
        /// The name.
        name: String,
    },
    /// The directory of named namespaces could not be made.
    #[error("creating {}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A named namespace could not be made (its file, the namespace or the
    /// bind mount pinning it).
    #[error("creating network namespace {}", path.display())]
    Create {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bind mount pinning a named namespace could not be undone.
    #[error("unmounting network namespace {}", path.display())]
    Unmount {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A named namespace's file could not be removed.
    #[error("removing network namespace {}", path.display())]
    Remove {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed inside the namespace.
    #[error("in network namespace {}: `{command}` failed: {reason}", netns.display())]
    Command {
        /// The namespace.
        netns: PathBuf,
        /// What was run.
        command: String,
        /// Its error output (or exit status).
        reason: String,
    },
    /// A command printed something that is not the JSON expected.
    #[error("unexpected output from `{command}`")]
    Json {
        /// What was run.
        command: String,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of network namespace operations.
pub type Result<T> = std::result::Result<T, NetnsError>;

/// Checks that the namespace file at `path` exists.
pub fn check_exists(path: &Path) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(NetnsError::Missing {
            path: path.to_owned(),
        })
    }
}

/// Whether two namespace files name the same namespace (same nsfs inode).
pub fn same_namespace(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `path` is a network namespace (an nsfs file, pinned by a bind
/// mount), not just the empty file left when the mount went away.
pub fn is_live(path: &Path) -> bool {
    /// `NSFS_MAGIC` of linux/magic.h.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// A network namespace that commands run in.
#[derive(Debug, Clone)]
pub(crate) struct Netns {
    path: PathBuf,
}

impl Netns {
    /// The namespace at `path`, which must exist.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        check_exists(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Whether the namespace file still exists.
    pub(crate) fn exists(path: &Path) -> bool {
        path.exists()
    }

    /// Runs `program args…` in the namespace; its stdout on success.
    pub(crate) fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut net = std::ffi::OsString::from("--net=");
        net.push(&self.path);
        let output = Command::new("nsenter")
            .arg(net)
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NetnsError::Spawn {
                program: "nsenter".into(),
                source,
            })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        Err(NetnsError::Command {
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
    pub(crate) fn ip(&self, args: &[&str]) -> Result<String> {
        self.run("ip", args)
    }

    /// `tc args…`.
    pub(crate) fn tc(&self, args: &[&str]) -> Result<String> {
        self.run("tc", args)
    }

    /// `ip -j args…`, parsed.
    pub(crate) fn ip_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full)?;
        // iproute2 prints nothing at all (not `[]`) for an empty list.
        let out = if out.trim().is_empty() { "[]" } else { &out };
        serde_json::from_str(out).map_err(|source| NetnsError::Json {
            command: format!("ip {}", full.join(" ")),
            source,
        })
    }

    /// The namespace's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A named network namespace that this process created. Deleted by
/// [`NamedNetns::delete`] (and, as a last resort, on drop).
#[derive(Debug)]
pub struct NamedNetns {
    path: PathBuf,
    deleted: bool,
}

impl NamedNetns {
    /// Creates `/run/netns/NAME`; refuses a name that already exists.
    pub fn create(name: &str) -> Result<Self> {
        Self::create_in(Path::new(NETNS_DIR), name)
    }

    /// [`NamedNetns::create`] in `dir`.
    pub fn create_in(dir: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(NetnsError::BadName {
                name: name.to_owned(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| NetnsError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        let path = dir.join(name);
        let failed = |source| NetnsError::Create {
            path: path.clone(),
            source,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(failed)?;
        // From here on, dropping `ns` removes the file (and the mount).
        let ns = Self {
            path: path.clone(),
            deleted: false,
        };
        // unshare() moves only the calling thread: do it on a thread of
        // its own so none of ours changes namespace, and pin the new
        // namespace with a bind mount before that thread ends.
        let target = path.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .map_err(|_| failed(std::io::Error::other("the thread creating it panicked")))?
        .map_err(failed)?;
        tracing::debug!(netns = %path.display(), "network namespace created");
        Ok(ns)
    }

    /// A namespace made earlier (by a process now gone), to delete it.
    /// Nothing is checked: deleting what is not there is no error.
    pub fn adopt(path: PathBuf) -> Self {
        Self {
            path,
            deleted: false,
        }
    }

    /// The namespace's path (`CNI_NETNS`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the namespace past this value (a record now owns it).
    pub fn keep(mut self) -> PathBuf {
        self.deleted = true;
        std::mem::take(&mut self.path)
    }

    /// Unmounts and removes the namespace file. The namespace itself ends
    /// when the last process in it exits.
    pub fn delete(mut self) -> Result<()> {
        self.deleted = true;
        remove(&self.path)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if !self.deleted {
            if let Err(e) = remove(&self.path) {
                tracing::warn!(error = %e, "removing a network namespace");
            }
        }
    }
}

fn remove(path: &Path) -> Result<()> {
    // EINVAL: not a mount point (creation failed before the bind mount).
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetnsError::Unmount {
                path: path.to_owned(),
                source: e.into(),
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn created_and_deleted() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ns = NamedNetns::create_in(dir.path(), "t1").unwrap();
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let theirs = std::fs::metadata(ns.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert_ne!(
            (theirs.dev(), theirs.ino()),
            (own.dev(), own.ino()),
            "{ours:?}"
        );
        assert!(is_live(ns.path()));
        assert!(!is_live(&dir.path().join("no-such")));
        std::fs::write(dir.path().join("plain"), b"").unwrap();
        assert!(!is_live(&dir.path().join("plain")));
        // The name is taken while it exists.
        assert!(NamedNetns::create_in(dir.path(), "t1").is_err());
        let path = ns.path().to_owned();
        ns.delete().unwrap();
        assert!(!path.exists());
        // Dropped without delete: still removed.
        let ns = NamedNetns::create_in(dir.path(), "t2").unwrap();
        let path = ns.path().to_owned();
        drop(ns);
        assert!(!path.exists());
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(NamedNetns::create_in(dir.path(), "").is_err());
        assert!(NamedNetns::create_in(dir.path(), "a/b").is_err());
        assert!(NamedNetns::create_in(dir.path(), "..").is_err());
        let err = NamedNetns::create_in(dir.path(), "a/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid network namespace name: \"a/b\" is not a file name"
        );
    }

    #[test]
    fn a_missing_namespace_is_named() {
        let path = Path::new("/var/run/netns/capsid-no-such-ns");
        let err = Netns::open(path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "network namespace /var/run/netns/capsid-no-such-ns does not exist"
        );
        assert!(check_exists(path).is_err());
        assert!(!Netns::exists(path));
    }
}
