//! Host directories and files in the guest: a sandbox's volumes, shared
//! over virtio-fs.
//!
//! Each host bind mount of a container's spec becomes one entry of a
//! per-sandbox share directory (`v0`, `v1`, ... under
//! `<state_dir>/.shares/<sandbox>`): the source is bind-mounted there
//! (read-only ones read-only, every one `nosuid,nodev`), and virtiofsd
//! exports the share and nothing else. The guest mounts it at
//! [`GUEST_SHARE_DIR`] and the container's spec binds
//! `GUEST_SHARE_DIR/vN` at the destination.
//!
//! The share is a private mount of its own, so the volume binds never
//! propagate into other mount namespaces. It is taken down by one lazy
//! unmount of the whole tree, then only `rmdir`/`unlink` of the
//! placeholders: nothing here ever removes recursively, so a volume's
//! contents cannot be deleted by cleanup even if an unmount failed (a
//! mount point cannot be unlinked, and a non-empty directory cannot be
//! rmdir'ed).

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

/// The virtio-fs tag of a sandbox's share.
pub const SHARE_TAG: &str = "capsid";
/// Where the agent mounts the share in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/capsid/volumes";

/// Errors preparing a share.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The source does not exist (or cannot be opened).
    #[error("volume source {source_path} (for {destination}) cannot be opened")]
    Source {
        /// The host path.
        source_path: PathBuf,
        /// Where it was to be mounted.
        destination: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source is (in, or holds) capsid's own state, or a kernel
    /// interface of the host.
    #[error(
        "volume source {source_path} (for {destination}) cannot be shared with a VM: {reason}"
    )]
    Forbidden {
        /// The host path.
        source_path: PathBuf,
        /// Where it was to be mounted.
        destination: PathBuf,
        /// Why.
        reason: String,
    },
    /// The source is not a directory or a regular file.
    #[error("volume source {source_path} (for {destination}) is a {kind}: only directories and regular files can be shared with the VM")]
    SourceKind {
        /// The host path.
        source_path: PathBuf,
        /// Where it was to be mounted.
        destination: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A writable volume on a read-only filesystem.
    #[error("volume source {source_path} is on a read-only filesystem but {destination} asks for it read-write: mount it read-only (ro)")]
    ReadOnlySource {
        /// The host path.
        source_path: PathBuf,
        /// Where it was to be mounted.
        destination: PathBuf,
    },
    /// The destination is not somewhere a volume may go.
    #[error("volume destination {destination:?}: {reason}")]
    Destination {
        /// Where it was to be mounted.
        destination: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// A step on the host failed.
    #[error("cannot {what} {}", path.display())]
    Host {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of volume operations.
pub type Result<T> = std::result::Result<T, VolumeError>;

/// One host path the container wants at `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The host file or directory.
    pub source: PathBuf,
    /// Where it goes in the container.
    pub destination: PathBuf,
    /// The container may not write to it.
    pub readonly: bool,
    /// Mounts under the source come along (`rbind`, Docker's default);
    /// `bind` alone takes the source's own mount only.
    pub recursive: bool,
}

impl Volume {
    /// Checks the destination: absolute, no `..`, not in `/proc` or `/sys`
    /// (the guest kernel's, which a host path must never shadow).
    pub fn check_destination(&self) -> Result<()> {
        let bad = |reason| {
            Err(VolumeError::Destination {
                destination: self.destination.clone(),
                reason,
            })
        };
        if !self.destination.is_absolute() {
            return bad("must be an absolute path");
        }
        if self
            .destination
            .components()
            .any(|c| c == Component::ParentDir)
        {
            return bad("must not contain `..`");
        }
        let first = self.destination.components().nth(1);
        match first {
            None => bad("cannot be the container's root"),
            Some(Component::Normal(d)) if d == "proc" || d == "sys" => {
                bad("is inside /proc or /sys, which belong to the guest kernel")
            }
            _ => Ok(()),
        }
    }
}

/// Whether `m` binds a host path (type `bind`, or a `bind`/`rbind` option).
pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Takes the host bind mounts out of `spec`: each becomes a [`Volume`] of
/// the share, and the spec binds the share's entry instead (`ro` and the
/// other options kept). A kubelet emptyDir with `medium: Memory` (a host
/// tmpfs under `kubernetes.io~empty-dir`) becomes a tmpfs of the guest's
/// of the same size instead: its memory is the VM's. Every destination is
/// checked; the sources are checked when the share is prepared.
pub fn take_volumes(spec: &mut Spec) -> Result<Vec<Volume>> {
    take_volumes_at(spec, Path::new(GUEST_SHARE_DIR))
}

/// [`take_volumes`] for volumes whose entries are `v0`, `v1`, ... under
/// the guest directory `guest_dir` (a pod container's entry of its pod's
/// share, [`crate::pod_share`]).
pub fn take_volumes_at(spec: &mut Spec, guest_dir: &Path) -> Result<Vec<Volume>> {
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(Vec::new());
    };
    let mut volumes = Vec::new();
    let mut out = Vec::with_capacity(mounts.len());
    for mut m in mounts {
        if !is_bind(&m) {
            out.push(m);
            continue;
        }
        let source = m.source().clone().unwrap_or_default();
        let options = m.options().clone().unwrap_or_default();
        let volume = Volume {
            source: source.clone(),
            destination: m.destination().clone(),
            readonly: options.iter().any(|o| o == "ro" || o == "rro"),
            recursive: !options.iter().any(|o| o == "bind"),
        };
        volume.check_destination()?;
        if let Some(size) = memory_empty_dir(&source) {
            out.push(guest_tmpfs(&m, size, volume.readonly));
            continue;
        }
        m.set_source(Some(guest_dir.join(entry_name(volumes.len()))));
        m.set_typ(Some("bind".into()));
        if !options.iter().any(|o| o == "bind" || o == "rbind") {
            let mut options = options;
            options.push("rbind".into());
            m.set_options(Some(options));
        }
        out.push(m);
        volumes.push(volume);
    }
    spec.set_mounts(Some(out));
    Ok(volumes)
}

/// The size of a kubelet emptyDir with `medium: Memory` at `source`: a
/// tmpfs the kubelet mounted under `.../volumes/kubernetes.io~empty-dir/`.
fn memory_empty_dir(source: &Path) -> Option<u64> {
    let parent = source.parent()?;
    if parent.file_name()? != "kubernetes.io~empty-dir" {
        return None;
    }
    let fs = nix::sys::statfs::statfs(source).ok()?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return None;
    }
    let stat = nix::sys::statvfs::statvfs(source).ok()?;
    Some(stat.blocks().saturating_mul(stat.fragment_size()))
}

fn guest_tmpfs(bind: &Mount, size: u64, readonly: bool) -> Mount {
    let mut options = vec![
        "nosuid".to_string(),
        "nodev".to_string(),
        "mode=1777".to_string(),
    ];
    if size > 0 {
        options.push(format!("size={size}"));
    }
    if readonly {
        options.push("ro".into());
    }
    let mut m = bind.clone();
    m.set_typ(Some("tmpfs".into()));
    m.set_source(Some(PathBuf::from("tmpfs")));
    m.set_options(Some(options));
    m
}

/// The guest path of share entry `index`.
pub fn guest_path(index: usize) -> PathBuf {
    Path::new(GUEST_SHARE_DIR).join(entry_name(index))
}

/// The name of volume `index`'s entry (`v{index}`).
pub(crate) fn entry_name(index: usize) -> String {
    format!("v{index}")
}

/// The share directory of sandbox `sandbox` under `state_dir`.
pub fn share_dir(state_dir: &Path, sandbox: &str) -> PathBuf {
    state_dir.join(".shares").join(sandbox)
}

/// A prepared share: the directory virtiofsd exports, with every volume
/// bound in. Dropping it takes it down ([`undo`]).
#[derive(Debug)]
pub struct Share {
    dir: PathBuf,
    armed: bool,
}

impl Share {
    /// Makes `dir` (0700) a mount of its own and binds each volume into
    /// it, in order (`volumes[i]` at `v{i}`); then the share's root is made
    /// read-only, so the guest can write only inside read-write volumes.
    /// No source may be inside a `protected` directory (capsid's state
    /// and cache directories) or hold one. A stale share at `dir` (a sandbox of the same name whose
    /// teardown failed) is taken down first. On error nothing is left:
    /// every bind made is undone and the directory removed.
    pub fn prepare(dir: &Path, volumes: &[Volume], protected: &[&Path]) -> Result<Self> {
        Self::prepare_with(dir, volumes, protected, false)
    }

    /// [`Self::prepare`] for a share that takes entries while its VM runs
    /// (a pod's, [`crate::pod_share`]): a writable peer of the share is
    /// kept at [`live_peer`] for the host to add them through.
    pub fn prepare_live(dir: &Path, volumes: &[Volume], protected: &[&Path]) -> Result<Self> {
        Self::prepare_with(dir, volumes, protected, true)
    }

    fn prepare_with(
        dir: &Path,
        volumes: &[Volume],
        protected: &[&Path],
        live: bool,
    ) -> Result<Self> {
        for v in volumes {
            v.check_destination()?;
        }
        undo(dir)?;
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(host("create", parent))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(host("create", dir))?;
        // From here on, dropping `share` undoes what was done.
        let share = Self {
            dir: dir.to_path_buf(),
            armed: true,
        };
        bind(dir, dir, MsFlags::empty()).map_err(host("bind-mount the share", dir))?;
        // Private first, to leave the parent's peer group (volume binds
        // never propagate to the host's other namespaces); then shared in
        // a peer group of its own, so virtiofsd's copy (a slave of it)
        // sees later changes, and the teardown reaches copies that a
        // namespace cloned meanwhile holds.
        for (flag, what) in [
            (MsFlags::MS_PRIVATE, "make private"),
            (MsFlags::MS_SHARED, "make shared"),
        ] {
            mount(None::<&str>, dir, None::<&str>, flag, None::<&str>).map_err(|e| {
                VolumeError::Host {
                    what,
                    path: dir.to_path_buf(),
                    source: e.into(),
                }
            })?;
        }
        let protected = canonical(protected);
        for (index, volume) in volumes.iter().enumerate() {
            add_volume(&dir.join(entry_name(index)), volume, &protected)?;
        }
        if live {
            // Bound before the share turns read-only: the peer stays
            // writable, and what is mounted under it reaches the share and
            // virtiofsd's copy (one peer group).
            let peer = live_peer(dir);
            for d in [peer.parent(), Some(peer.as_path())].into_iter().flatten() {
                match std::fs::DirBuilder::new().mode(0o700).create(d) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(host("create", d)(e))
                    }
                    _ => {}
                }
            }
            bind(dir, &peer, MsFlags::empty()).map_err(host("bind-mount the share on", &peer))?;
        }
        bind(
            dir,
            dir,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
        )
        .map_err(host("make read-only the share", dir))?;
        Ok(share)
    }

    /// The directory virtiofsd exports.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Leaves the share in place for [`undo`] to take down later (a
    /// process that hands it over to a record).
    pub fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.dir)
    }
}

/// The protected directories as the kernel names them (symlinks followed).
pub(crate) fn canonical(protected: &[&Path]) -> Vec<PathBuf> {
    protected
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
        .collect()
}

/// Binds `volume`'s source on `entry` (made here: a directory or an empty
/// file, 0700/0600), restricted: nosuid, nodev, read-only if asked.
pub(crate) fn add_volume(entry: &Path, volume: &Volume, protected: &[PathBuf]) -> Result<()> {
    let source_err = |source| VolumeError::Source {
        source_path: volume.source.clone(),
        destination: volume.destination.clone(),
        source,
    };
    // The source is opened once and bound through its descriptor, so a
    // path swapped after the checks cannot be what gets mounted.
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_CLOEXEC)
        .open(&volume.source)
        .map_err(source_err)?;
    let meta = fd.metadata().map_err(source_err)?;
    let ft = meta.file_type();
    let kind = if ft.is_dir() || ft.is_file() {
        None
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("device node")
    } else if ft.is_socket() {
        Some("socket")
    } else if ft.is_fifo() {
        Some("named pipe")
    } else {
        Some("special file")
    };
    if let Some(kind) = kind {
        return Err(VolumeError::SourceKind {
            source_path: volume.source.clone(),
            destination: volume.destination.clone(),
            kind,
        });
    }
    let forbidden = |reason: String| VolumeError::Forbidden {
        source_path: volume.source.clone(),
        destination: volume.destination.clone(),
        reason,
    };
    // Where the source really is, once every symlink was followed.
    let real =
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(source_err)?;
    if let Some(p) = protected
        .iter()
        .find(|p| real.starts_with(p) || p.starts_with(&real))
    {
        return Err(forbidden(format!(
            "{} is in or holds capsid's own directory {}",
            real.display(),
            p.display()
        )));
    }
    let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| source_err(e.into()))?;
    if let Some(name) = kernel_interface(fs.filesystem_type()) {
        return Err(forbidden(format!(
            "it is on the host's {name}, which no guest may see"
        )));
    }
    let stat = nix::sys::statvfs::fstatvfs(&fd).map_err(|e| source_err(e.into()))?;
    if !volume.readonly && stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(VolumeError::ReadOnlySource {
            source_path: volume.source.clone(),
            destination: volume.destination.clone(),
        });
    }
    if ft.is_dir() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(entry)
            .map_err(host("create", entry))?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(entry)
            .map_err(host("create", entry))?;
    }
    let from = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let recursive = if volume.recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    bind(&from, entry, recursive).map_err(host("bind-mount a volume on", entry))?;
    // A bind takes the source mounts' flags; ours are set on the whole
    // tree, submounts included. nodev: a device node inside a volume
    // never opens a host device through virtiofsd (which also refuses
    // to open special files). nosuid: belt and braces, nothing on the
    // share runs on the host.
    restrict_tree(entry, volume.readonly).map_err(host("restrict the volume on", entry))?;
    drop(fd);
    Ok(())
}

/// The writable peer of live share `dir` (`<parent>/.rw/<name>`: no
/// sandbox name starts with a dot).
pub fn live_peer(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap_or_default();
    dir.parent()
        .unwrap_or(Path::new("/"))
        .join(".rw")
        .join(name)
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = undo(&self.dir) {
                tracing::warn!(share = %self.dir.display(), error = %crate::record::chain(&e), "cannot take the volume share down");
            }
        }
    }
}

/// The host kernel interfaces a volume must never expose, by filesystem.
fn kernel_interface(fs: nix::sys::statfs::FsType) -> Option<&'static str> {
    use nix::sys::statfs as f;
    [
        (f::PROC_SUPER_MAGIC, "procfs"),
        (f::SYSFS_MAGIC, "sysfs"),
        (f::CGROUP_SUPER_MAGIC, "cgroup filesystem"),
        (f::CGROUP2_SUPER_MAGIC, "cgroup2 filesystem"),
        (f::DEBUGFS_MAGIC, "debugfs"),
        (f::TRACEFS_MAGIC, "tracefs"),
        (f::SECURITYFS_MAGIC, "securityfs"),
        (f::BPF_FS_MAGIC, "bpf filesystem"),
    ]
    .into_iter()
    .find(|(magic, _)| *magic == fs)
    .map(|(_, name)| name)
}

/// `mount_setattr(2)`'s argument (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// Sets nosuid, nodev (and read-only) on the mount at `path` and every
/// mount under it, in one call (a remount would reach the top one only).
pub fn restrict_tree(path: &Path, readonly: bool) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    if readonly {
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    }
    // SAFETY: mount_setattr reads `c_path` (a NUL-terminated string alive
    // for the call) and `size_of::<MountAttr>()` bytes of `attr` (a live,
    // properly laid out struct); it writes neither.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_mount_setattr,
            nix::libc::AT_FDCWD,
            c_path.as_ptr(),
            nix::libc::AT_RECURSIVE | nix::libc::AT_SYMLINK_NOFOLLOW,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(crate) fn bind(
    from: &Path,
    to: &Path,
    extra: MsFlags,
) -> std::result::Result<(), std::io::Error> {
    mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | extra,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

pub(crate) fn host(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Host { what, path, source }
}

/// Takes a share down: detaches the share mount and everything bound in
/// it, then removes the placeholders and the directory, never
/// recursively. Returns `Ok` when `dir` is gone (or never existed).
pub fn undo(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(host("inspect", dir)(e)),
        Ok(m) if !m.is_dir() => {
            return Err(host("take down (not a directory, left alone)", dir)(
                std::io::Error::from_raw_os_error(nix::libc::ENOTDIR),
            ))
        }
        Ok(_) => {}
    }
    // A live share's peer and the entries staged for it go first.
    let peer = live_peer(dir);
    if peer.exists() {
        undo(&peer)?;
        // The peers' directory goes with the last of them (other
        // sandboxes' keep it: rmdir refuses a non-empty directory).
        if let Some(parent) = peer.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    crate::pod_share::undo_staging(dir)?;
    // The share's own bind carries every volume under it: one lazy
    // unmount detaches the whole tree. Repeat for stacked mounts; EINVAL
    // says `dir` is no longer a mount point.
    for _ in 0..64 {
        match umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break,
            Err(e) => {
                return Err(VolumeError::Host {
                    what: "unmount",
                    path: dir.to_path_buf(),
                    source: e.into(),
                })
            }
        }
    }
    remove_placeholders(dir)?;
    std::fs::remove_dir(dir).map_err(host("remove", dir))
}

/// Removes the share's placeholders through a descriptor of `dir` opened
/// without following symlinks: empty directories and empty regular files
/// only. A placeholder still mounted on (EBUSY) or holding anything
/// (ENOTEMPTY) is refused by the kernel: its contents are safe.
fn remove_placeholders(dir: &Path) -> Result<()> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{fstatat, Mode, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let errno = |what, path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| VolumeError::Host {
            what,
            path,
            source: e.into(),
        }
    };
    let mut d = nix::dir::Dir::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open", dir))?;
    let names: Vec<std::ffi::CString> = d
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    let fd = std::os::fd::AsFd::as_fd(&d);
    for name in names {
        let path = dir.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
        let st = fstatat(fd, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(errno("inspect", &path))?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let how = if kind == SFlag::S_IFDIR {
            UnlinkatFlags::RemoveDir
        } else if kind == SFlag::S_IFREG && st.st_size == 0 {
            UnlinkatFlags::NoRemoveDir
        } else {
            return Err(VolumeError::Host {
                what: "remove (not an empty placeholder, left in place)",
                path,
                source: std::io::Error::from_raw_os_error(nix::libc::EEXIST),
            });
        };
        unlinkat(fd, name.as_c_str(), how).map_err(errno("remove", &path))?;
    }
    Ok(())
}

/// A read-only check that `path` is (still) a mount point of this mount
/// namespace, for tests and leak checks.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == wanted)
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(char::from(v));
                i += 4;
                continue;
            }
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(source: &Path, destination: &str, readonly: bool) -> Volume {
        Volume {
            source: source.to_path_buf(),
            destination: PathBuf::from(destination),
            readonly,
            recursive: true,
        }
    }

    #[test]
    fn destinations_are_checked() {
        let src = Path::new("/tmp");
        assert!(vol(src, "/data", false).check_destination().is_ok());
        for bad in ["data", "/proc/x", "/sys", "/a/../proc", "/"] {
            let e = vol(src, bad, false).check_destination().unwrap_err();
            assert!(matches!(e, VolumeError::Destination { .. }), "{bad}: {e}");
        }
        let e = vol(src, "/proc/sys/kernel", false)
            .check_destination()
            .unwrap_err();
        assert!(e.to_string().contains("/proc or /sys"), "{e}");
    }

    #[test]
    fn binds_become_share_entries() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
                {"destination": "/etc/token", "source": "/srv/token", "options": ["bind", "ro"]},
            ]
        }))
        .unwrap();
        let volumes = take_volumes(&mut spec).unwrap();
        assert_eq!(
            volumes,
            vec![
                vol(Path::new("/srv/data"), "/data", false),
                Volume {
                    recursive: false,
                    ..vol(Path::new("/srv/token"), "/etc/token", true)
                }
            ]
        );
        let mounts = spec.mounts().clone().unwrap();
        assert_eq!(mounts[0].typ().as_deref(), Some("proc"));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/capsid/volumes/v0"))
        );
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new("/run/capsid/volumes/v1"))
        );
        assert_eq!(mounts[2].typ().as_deref(), Some("bind"));
        assert!(mounts[2]
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string()));

        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/sys/kernel", "type": "bind", "source": "/srv"}]
        }))
        .unwrap();
        assert!(matches!(
            take_volumes(&mut spec),
            Err(VolumeError::Destination { .. })
        ));
    }

    #[test]
    fn guest_paths_name_entries() {
        assert_eq!(guest_path(3), PathBuf::from("/run/capsid/volumes/v3"));
    }

    /// Needs root (mounts); the e2e tests cover it too.
    #[test]
    fn share_binds_and_undoes_without_touching_contents() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("keep"), b"precious").unwrap();
        let file = tmp.path().join("token");
        std::fs::write(&file, b"t0k3n").unwrap();
        // A mount under the source comes along (rbind), restricted too.
        let sub = data.join("sub");
        std::fs::create_dir(&sub).unwrap();
        mount(
            Some("tmpfs"),
            &sub,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        std::fs::write(sub.join("on-submount"), b"s").unwrap();
        let dir = tmp.path().join("shares/s1");
        let state = tmp.path().join("state");
        let share = Share::prepare(
            &dir,
            &[
                vol(&data, "/data", false),
                vol(&file, "/token", true),
                vol(&data, "/data-ro", true),
            ],
            &[&state],
        )
        .unwrap();
        assert_eq!(std::fs::read(dir.join("v0/sub/on-submount")).unwrap(), b"s");
        let e = std::fs::write(dir.join("v2/sub/x"), b"x").unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(nix::libc::EROFS),
            "submount of a ro volume: {e}"
        );
        // The share's root takes no writes: only read-write volumes do.
        let e = std::fs::write(dir.join("planted"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}");
        assert_eq!(
            std::fs::read(dir.join("v0/keep")).unwrap(),
            b"precious".to_vec()
        );
        assert_eq!(std::fs::read(dir.join("v1")).unwrap(), b"t0k3n".to_vec());
        // Read-only really is.
        let e = std::fs::write(dir.join("v1"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}");
        std::fs::write(dir.join("v0/new"), b"n").unwrap();
        assert!(is_mount_point(&dir));
        drop(share);
        assert!(!dir.exists());
        assert!(!is_mount_point(&dir));
        assert_eq!(std::fs::read(data.join("keep")).unwrap(), b"precious");
        assert_eq!(std::fs::read(data.join("new")).unwrap(), b"n");
        assert_eq!(std::fs::read(&file).unwrap(), b"t0k3n");
        assert_eq!(std::fs::read(sub.join("on-submount")).unwrap(), b"s");
        umount2(&sub, MntFlags::MNT_DETACH).unwrap();
    }

    #[test]
    fn undo_leaves_anything_but_placeholders_and_never_follows_links() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        // A symlink where a share should be is not followed.
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("empty"), b"").unwrap();
        std::fs::create_dir(victim.join("emptydir")).unwrap();
        let link = tmp.path().join("shares/link");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(undo(&link).is_err());
        assert!(victim.join("empty").exists() && victim.join("emptydir").exists());
        // A stale share holding a file with data: that file stays.
        let stale = tmp.path().join("shares/stale");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("v0"), b"data").unwrap();
        std::fs::write(stale.join("v1"), b"").unwrap();
        let e = undo(&stale).unwrap_err();
        assert!(e.to_string().contains("not an empty placeholder"), "{e}");
        assert_eq!(std::fs::read(stale.join("v0")).unwrap(), b"data");
    }

    #[test]
    fn bad_sources_leave_nothing() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let dir = tmp.path().join("shares/s2");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("run1")).unwrap();
        std::os::unix::fs::symlink(state.join("run1"), tmp.path().join("sneaky")).unwrap();
        let cases = [
            (tmp.path().join("missing"), "cannot be opened"),
            (PathBuf::from("/dev/null"), "device node"),
            (state.join("run1"), "capsid's own directory"),
            (tmp.path().join("sneaky"), "capsid's own directory"),
            (tmp.path().to_path_buf(), "capsid's own directory"),
            (PathBuf::from("/proc/version"), "procfs"),
            (PathBuf::from("/sys/kernel"), "sysfs"),
        ];
        for (source, words) in cases {
            let e = Share::prepare(
                &dir,
                &[vol(&data, "/ok", false), vol(&source, "/bad", false)],
                &[&state],
            )
            .unwrap_err();
            assert!(e.to_string().contains(words), "{e}");
            assert!(!dir.exists(), "share left behind after: {e}");
            assert!(!is_mount_point(&dir));
        }
        // A read-only filesystem asked for read-write.
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        bind(&data, &ro, MsFlags::empty()).unwrap();
        bind(&ro, &ro, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY).unwrap();
        let e = Share::prepare(&dir, &[vol(&ro, "/rw", false)], &[&state]).unwrap_err();
        assert!(matches!(e, VolumeError::ReadOnlySource { .. }), "{e}");
        assert!(!dir.exists());
        Share::prepare(&dir, &[vol(&ro, "/ro", true)], &[&state]).unwrap();
        assert!(!dir.exists(), "dropped at once");
        umount2(&ro, MntFlags::MNT_DETACH).unwrap();
        let e = Share::prepare(&dir, &[vol(&data, "/proc/x", false)], &[&state]).unwrap_err();
        assert!(matches!(e, VolumeError::Destination { .. }), "{e}");
        assert!(!dir.exists());
    }
}
