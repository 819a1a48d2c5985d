//! The guest's own filesystems: what PID 1 mounts before anything else.

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Errors setting up the guest's filesystems.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount point could not be created.
    #[error("cannot create mount point {path}")]
    Mkdir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// Result of mount operations.
pub type Result<T> = std::result::Result<T, MountError>;

/// One pseudo filesystem of the guest.
struct PseudoFs {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// What PID 1 mounts, in order (sysfs before cgroup2, which lives in it).
const PSEUDO_FILESYSTEMS: &[PseudoFs] = &[
    PseudoFs {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    PseudoFs {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    PseudoFs {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    PseudoFs {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    PseudoFs {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    PseudoFs {
        fstype: "tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    PseudoFs {
        fstype: "tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    PseudoFs {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Mounts proc, sys, dev, devpts, shm, run, tmp and the cgroup2 hierarchy.
///
/// A filesystem that is already mounted (the kernel may have mounted
/// devtmpfs itself) is left as it is.
pub fn pseudo_filesystems() -> Result<()> {
    for fs in PSEUDO_FILESYSTEMS {
        fs::create_dir_all(fs.target).map_err(|source| MountError::Mkdir {
            path: fs.target.to_string(),
            source,
        })?;
        if is_mount_point(fs.target) {
            continue;
        }
        mount(
            Some(fs.fstype),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            fs.data,
        )
        .map_err(|source| MountError::Mount {
            fstype: fs.fstype,
            target: fs.target,
            source,
        })?;
    }
    Ok(())
}

/// A directory is a mount point when it sits on another device than its
/// parent (the initramfs root has no parent mount to compare with).
fn is_mount_point(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new(path);
    let (Ok(meta), Some(parent)) = (fs::metadata(path), path.parent()) else {
        return false;
    };
    fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev())
}
