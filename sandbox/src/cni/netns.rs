//! Named network namespaces, as `ip netns add` makes them: a fresh
//! namespace kept alive by a bind mount of its nsfs file on
//! `/run/netns/NAME`, so CNI plugins, `nsenter` and `ip -n` can all find it.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::{CniError, Result};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

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
    pub(super) fn create_in(dir: &Path, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(CniError::Config {
                what: "network namespace name".into(),
                reason: format!("{name:?} is not a file name"),
            });
        }
        let io = |what: String| move |source| CniError::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(format!("creating network namespace {}", path.display())))?;
        // From here on, dropping `ns` removes the file (and the mount).
        let ns = Self {
            path: path.clone(),
            deleted: false,
        };
        // unshare() moves only the calling thread: do it on a thread of
        // its own so none of ours changes namespace, and pin the new
        // namespace with a bind mount before that thread ends.
        let target = path.clone();
        let made = std::thread::spawn(move || -> std::io::Result<()> {
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
        .map_err(|_| CniError::Io {
            what: format!("creating network namespace {}", path.display()),
            source: std::io::Error::other("the thread creating it panicked"),
        })?;
        made.map_err(io(format!("creating network namespace {}", path.display())))?;
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

/// Whether `path` is a network namespace (an nsfs file, pinned by a bind
/// mount), not just the empty file left when the mount went away.
pub fn is_live(path: &Path) -> bool {
    /// `NSFS_MAGIC` of linux/magic.h.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

fn remove(path: &Path) -> Result<()> {
    // EINVAL: not a mount point (creation failed before the bind mount).
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(CniError::Io {
                what: format!("unmounting network namespace {}", path.display()),
                source: e.into(),
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CniError::Io {
            what: format!("removing network namespace {}", path.display()),
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
    }
}
