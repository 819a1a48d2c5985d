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
    /// Moving from the initramfs to a tmpfs root failed.
    #[error("cannot leave the initramfs ({step})")]
    SwitchRoot {
        /// The step that failed.
        step: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

impl MountError {
    fn switch(step: &'static str, source: nix::Error) -> Self {
        Self::SwitchRoot { step, source }
    }
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

/// Moves PID 1 from the initramfs onto a tmpfs root. pivot_root(2) cannot
/// move away from the initial root mount (ramfs or tmpfs, it has no parent
/// mount), and container runtimes pivot_root into each container; from a
/// tmpfs mounted over it, they can.
///
/// The agent keeps running from its initramfs file, which becomes
/// unreachable by path under the tmpfs but stays in memory while it is
/// mapped (the runtime helper is started through `/proc/self/exe`, which
/// reaches it). Copying the binary into the tmpfs and re-executing it, as
/// `switch_root` does, would hold the same memory afterwards, but costs a
/// 9 MiB copy, a second exec of the binary and, for that moment, both
/// copies of guest RAM touched.
pub fn leave_initramfs() -> Result<()> {
    let new_root = Path::new("/newroot");
    let io = |step| {
        move |e: std::io::Error| {
            MountError::switch(
                step,
                nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        }
    };
    fs::create_dir_all(new_root).map_err(io("mkdir /newroot"))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| MountError::switch("mount tmpfs", e))?;
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc", "root", "mnt"] {
        fs::create_dir_all(new_root.join(dir)).map_err(io("mkdir"))?;
    }
    nix::unistd::chdir(new_root).map_err(|e| MountError::switch("chdir", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| MountError::switch("move to /", e))?;
    nix::unistd::chroot(".").map_err(|e| MountError::switch("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| MountError::switch("chdir /", e))?;
    Ok(())
}

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
