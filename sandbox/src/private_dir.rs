//! capsid's host directories are private: the state directory (run
//! directories with the VMs' sockets and logs, records, shares) and the
//! cache directory (rootfs disks, image staging) belong to the user capsid
//! runs as, mode 0700, and are never reached through a symlink. A local
//! user must not connect to a VM's QMP or agent socket, read a console
//! log, or walk into an image being unpacked.
//!
//! [`ensure_root`] checks (and makes) such a root; [`create_exclusive`]
//! makes a directory that must not exist yet (a sandbox's run directory),
//! so two sandboxes can never share one and a planted directory or
//! symlink is refused rather than used.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors preparing a private directory.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// The path exists but is not a directory (a symlink included).
    #[error("{} is not a directory (a symlink is not followed)", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Someone else owns it.
    #[error("{} belongs to uid {owner}, not to uid {me} that capsid runs as: refusing to keep state there", path.display())]
    ForeignOwner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Anyone may write to it.
    #[error("{} is writable by other users (mode {mode:o}): refusing to keep state there", path.display())]
    WorldWritable {
        /// The path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// It exists already (for a directory that must be new).
    #[error("{} exists already: another sandbox has this name, or a leftover was planted", path.display())]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of private directory operations.
pub type Result<T> = std::result::Result<T, PrivateDirError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PrivateDirError {
    let path = path.to_path_buf();
    move |source| PrivateDirError::Io { what, path, source }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Makes `root` (and missing parents) with mode 0700, or checks the one
/// there: a real directory (not a symlink), owned by this user, not
/// writable by others. A root of ours that others can read or enter
/// (made 0755 by an older capsid) is narrowed to 0700.
pub fn ensure_root(root: &Path) -> Result<()> {
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io("create", root))?;
            // A concurrent creator may have won: check what is there.
            check_root(root)
        }
        Err(e) => Err(io("inspect", root)(e)),
        Ok(_) => check_root(root),
    }
}

fn check_root(root: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(root).map_err(io("inspect", root))?;
    if !meta.file_type().is_dir() {
        return Err(PrivateDirError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let me = euid();
    if meta.uid() != me {
        return Err(PrivateDirError::ForeignOwner {
            path: root.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateDirError::WorldWritable {
            path: root.to_path_buf(),
            mode,
        });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io("make private", root))?;
    }
    Ok(())
}

/// Makes `dir` (mode 0700) under a root that [`ensure_root`] checked; it
/// must not exist: an existing directory or symlink is refused.
pub fn create_exclusive(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(PrivateDirError::Exists {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(io("create", dir)(e)),
    }
}

/// A VM's run directory belongs to its jail's uid (crate::backend::jail):
/// whatever a root process does there by path must not be turned by a
/// symlink the VM's processes planted. These are the ways in.
///
/// Connects to the Unix socket at `path` without following a symlink in
/// its last component: through an `O_PATH` descriptor of the socket itself.
pub fn connect_no_follow(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !handle.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// The last `max` bytes of the regular file at `path`, not through a
/// symlink.
pub fn read_tail_no_follow(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    file.seek(SeekFrom::Start(meta.len().saturating_sub(max)))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Creates (or truncates) the regular file at `path` for writing, not
/// through a symlink.
pub fn create_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Gives a socket this process bound in a run directory to the
/// directory's owner (the jail's uid, or root: then nothing changes), so
/// the VM's processes can connect to it. The link itself is changed, never
/// what it might point to.
pub fn give_to_dir_owner(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let meta = std::fs::symlink_metadata(dir)?;
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_root_is_private_and_an_old_one_is_narrowed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/state");
        ensure_root(&root).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&root), 0o700);
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_root(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn unsafe_roots_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = ensure_root(&open).unwrap_err();
        assert!(matches!(e, PrivateDirError::WorldWritable { .. }), "{e}");
        assert!(e.to_string().contains("writable by other users"), "{e}");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let e = ensure_root(&link).unwrap_err();
        assert!(matches!(e, PrivateDirError::NotADirectory { .. }), "{e}");

        if euid() == 0 {
            let foreign = tmp.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
            let e = ensure_root(&foreign).unwrap_err();
            assert!(matches!(e, PrivateDirError::ForeignOwner { .. }), "{e}");
            assert!(e.to_string().contains("uid 65534"), "{e}");
        }
    }

    #[test]
    fn exclusive_directories_are_new() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sb");
        create_exclusive(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let e = create_exclusive(&dir).unwrap_err();
        assert!(matches!(e, PrivateDirError::Exists { .. }), "{e}");
        let link = tmp.path().join("planted");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(create_exclusive(&link).is_err());
    }
}
