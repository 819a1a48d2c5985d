//! The container's root filesystem inside the guest: read-only image
//! layers from virtio-blk disks (found by serial), a writable upper layer,
//! joined by overlayfs; or a directory of the sandbox's virtio-fs share
//! (a pod's container whose rootfs the host mounted there), bound in
//! place. Plus the files a container expects to find (/etc/hostname,
//! /etc/hosts, /etc/resolv.conf).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use capsid_protocol::agent::Rootfs;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::undo::Undo;

/// Where per-container bundles live in the guest.
pub const BUNDLES: &str = "/run/capsid/bundles";

/// Errors assembling a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The host named a disk the guest does not have.
    #[error("no disk with serial {0:?} is attached")]
    NoSuchDisk(String),
    /// The rootfs description is unusable.
    #[error("invalid rootfs: {0}")]
    Invalid(String),
    /// The process's program is not in the container (worded as Go's exec
    /// words it, which Docker turns into exit status 127 as with runc).
    #[error("{0}")]
    ProgramNotFound(String),
    /// A directory or file could not be made.
    #[error("cannot write {path}")]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The rootfs's directory in the share cannot be opened beneath the
    /// share (it is missing, not a directory, or leaves the share through
    /// a symlink).
    #[error("rootfs {path:?} cannot be opened beneath the share")]
    Share {
        /// The share path the host gave.
        path: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A mount of the rootfs could not be taken down, or what is left of
    /// the bundle could not be removed.
    #[error("cannot remove {path}")]
    Remove {
        /// What was being unmounted or removed.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of rootfs operations.
pub type Result<T> = std::result::Result<T, RootfsError>;

/// The directories of one container's bundle.
#[derive(Debug, Clone)]
pub struct BundleDirs {
    /// The bundle (config.json goes here).
    pub bundle: PathBuf,
    /// The assembled root filesystem.
    pub rootfs: PathBuf,
}

impl BundleDirs {
    /// The bundle of container `id`.
    pub fn new(id: &str) -> Self {
        let bundle = Path::new(BUNDLES).join(id);
        Self {
            rootfs: bundle.join("rootfs"),
            bundle,
        }
    }

    fn layer(&self, i: usize) -> PathBuf {
        self.bundle.join(format!("layer{i}"))
    }

    fn rw(&self) -> PathBuf {
        self.bundle.join("rw")
    }
}

/// Container ids become directory names: keep them to a safe alphabet.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

/// The block device whose virtio serial is `serial`, found in /sys/block.
pub fn find_disk(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(sys_block).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Some(Path::new("/dev").join(name));
        }
    }
    None
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| RootfsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| RootfsError::Mount {
        what: format!("{fstype} {source}"),
        target: target.to_path_buf(),
        source: e,
    })
}

/// Checks a rootfs request before anything is mounted for it: either
/// layers (and perhaps an upper disk), or a share path alone.
pub fn check(spec: &Rootfs) -> Result<()> {
    if spec.share_path.is_empty() {
        if spec.layers.is_empty() {
            return Err(RootfsError::Invalid("no image layers".into()));
        }
        return Ok(());
    }
    if !spec.layers.is_empty() || !spec.upper_disk_serial.is_empty() {
        return Err(RootfsError::Invalid(
            "a rootfs in the share has no image layers or upper disk".into(),
        ));
    }
    check_share_path(&spec.share_path)
}

/// A path relative to the share's root that names a directory beneath it:
/// not empty, not absolute, only plain components (no `..`, `.` or empty
/// one), no NUL. Symlinks are the kernel's to refuse ([`open_in_share`]).
pub fn check_share_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(RootfsError::Invalid(format!("share path {path:?}: {why}")));
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > 4096 || path.contains('\0') {
        return bad("not a path");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    for part in path.split('/') {
        match part {
            "" => return bad("empty component"),
            "." | ".." => return bad("`.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// Opens directory `path` (checked by [`check_share_path`]) beneath
/// `share_root`, as an `O_PATH` descriptor: `RESOLVE_BENEATH` refuses
/// every step out of the share (an absolute symlink, `..` in a link's
/// target that climbs above the root) and magic links; the canonical path
/// of what was opened is checked to be under the root as well.
pub fn open_in_share(share_root: &Path, path: &str) -> Result<OwnedFd> {
    check_share_path(path)?;
    let share_err = |source| RootfsError::Share {
        path: path.to_string(),
        source,
    };
    let root = nix::fcntl::open(
        share_root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(share_err)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(&root, path, how).map_err(share_err)?;
    let opened = fs::read_link(fd_path(&fd))
        .map_err(|e| share_err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    let canonical_root = fs::canonicalize(share_root)
        .map_err(|e| share_err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    if opened == canonical_root || !opened.starts_with(&canonical_root) {
        return Err(RootfsError::Invalid(format!(
            "share path {path:?} is {} and not beneath the share",
            opened.display()
        )));
    }
    Ok(fd)
}

/// The path through which `fd` can be named (a magic link).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Assembles container `id`'s rootfs: the layers joined by an overlay, or
/// the share's directory bound in place (`share_root` is where the share
/// is mounted).
pub fn assemble(id: &str, spec: &Rootfs, share_root: &Path) -> Result<BundleDirs> {
    if !valid_id(id) {
        return Err(RootfsError::Invalid(format!("container id {id:?}")));
    }
    check(spec)?;
    if !spec.share_path.is_empty() {
        return bind_from_share(id, &spec.share_path, share_root);
    }
    let dirs = BundleDirs::new(id);
    mkdir(&dirs.rootfs)?;
    // From here on a failure unmounts and removes whatever was made.
    let undo = Undo::new(|| {
        let _ = teardown(id);
    });
    let mut lowers = Vec::with_capacity(spec.layers.len());
    for (i, layer) in spec.layers.iter().enumerate() {
        if !matches!(layer.fs_type.as_str(), "erofs" | "ext4") {
            return Err(RootfsError::Invalid(format!(
                "layer filesystem {:?}",
                layer.fs_type
            )));
        }
        let disk = find_disk(Path::new("/sys/block"), &layer.disk_serial)
            .ok_or_else(|| RootfsError::NoSuchDisk(layer.disk_serial.clone()))?;
        let target = dirs.layer(i);
        mkdir(&target)?;
        do_mount(
            &disk.display().to_string(),
            &target,
            &layer.fs_type,
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None,
        )?;
        lowers.push(target);
    }
    let rw = dirs.rw();
    mkdir(&rw)?;
    if spec.upper_disk_serial.is_empty() {
        do_mount("tmpfs", &rw, "tmpfs", MsFlags::MS_NODEV, Some("mode=0755"))?;
    } else {
        let disk = find_disk(Path::new("/sys/block"), &spec.upper_disk_serial)
            .ok_or_else(|| RootfsError::NoSuchDisk(spec.upper_disk_serial.clone()))?;
        do_mount(
            &disk.display().to_string(),
            &rw,
            "ext4",
            MsFlags::MS_NODEV,
            None,
        )?;
    }
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    // overlayfs lists lower layers top first.
    let lowerdir = lowers
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    do_mount(
        "overlay",
        &dirs.rootfs,
        "overlay",
        MsFlags::empty(),
        Some(&data),
    )?;
    undo.disarm();
    Ok(dirs)
}

/// Binds the share's directory `path` at container `id`'s rootfs,
/// recursively (what the host mounted under it comes along). The bind is
/// `nodev` but not `nosuid`, as an image's rootfs is: the share itself is
/// mounted `nosuid`, and each bind decides (see [`crate::share`]).
fn bind_from_share(id: &str, path: &str, share_root: &Path) -> Result<BundleDirs> {
    let dirs = BundleDirs::new(id);
    let source = open_in_share(share_root, path)?;
    mkdir(&dirs.rootfs)?;
    let undo = Undo::new(|| {
        let _ = teardown(id);
    });
    let what = format!("share:{path}");
    let from = fd_path(&source);
    mount(
        Some(&from),
        &dirs.rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|source| RootfsError::Mount {
        what: what.clone(),
        target: dirs.rootfs.clone(),
        source,
    })?;
    remount_bind(&dirs.rootfs, &what, MsFlags::MS_NODEV)?;
    undo.disarm();
    Ok(dirs)
}

fn remount_bind(target: &Path, what: &str, flags: MsFlags) -> Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(|source| RootfsError::Mount {
        what: format!("{what} (remount {flags:?})"),
        target: target.to_path_buf(),
        source,
    })
}

/// Unmounts everything [`assemble`] made for container `id` (overlay or
/// share bind, upper layer, image layers) and removes its bundle. Safe to
/// call more than once, and on a half-made bundle.
///
/// The bundle is never removed recursively: its files are unlinked and
/// its directories (mount points, empty once unmounted) removed with
/// rmdir, which the kernel refuses for a mount point or a non-empty
/// directory. So a mount that could not be taken down never has its
/// contents deleted, above all not a host directory bound from the share.
/// Every step is tried; the first failure is returned.
pub fn teardown(id: &str) -> Result<()> {
    if !valid_id(id) {
        return Err(RootfsError::Invalid(format!("container id {id:?}")));
    }
    let dirs = BundleDirs::new(id);
    let mut first: Option<RootfsError> = None;
    let mut note = |e: RootfsError| {
        if first.is_none() {
            first = Some(e);
        }
    };
    let mut targets = vec![dirs.rootfs.clone(), dirs.rw()];
    for i in 0.. {
        let layer = dirs.layer(i);
        if !layer.exists() {
            break;
        }
        targets.push(layer);
    }
    for target in &targets {
        if let Err(e) = unmount(target) {
            note(e);
        }
    }
    if let Err(e) = remove_bundle(&dirs.bundle) {
        note(e);
    }
    first.map_or(Ok(()), Err)
}

/// Takes the mount at `target` down, with what is mounted under it; a
/// directory that is no mount point (or is gone) is fine.
fn unmount(target: &Path) -> Result<()> {
    // Lazily: the container's processes are gone, but the kernel may
    // still hold the mount for a moment (a mount namespace being freed).
    // Detached, it is out of the guest's tree at once and its memory is
    // freed with the last reference.
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(RootfsError::Remove {
            path: target.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Removes `bundle` without ever recursing into a directory.
fn remove_bundle(bundle: &Path) -> Result<()> {
    let remove_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RootfsError::Remove { path, source }
    };
    let entries = match fs::read_dir(bundle) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(remove_err(bundle)(e)),
    };
    let mut first = None;
    for entry in entries {
        let entry = entry.map_err(remove_err(bundle))?;
        let path = entry.path();
        // The entry's own type: a symlink is removed, never followed.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if is_dir {
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        if let Err(e) = removed {
            if e.kind() != std::io::ErrorKind::NotFound && first.is_none() {
                first = Some(remove_err(&path)(e));
            }
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    match fs::remove_dir(bundle) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(remove_err(bundle)(e)),
        _ => Ok(()),
    }
}

/// The largest /etc/hosts the host may give.
const MAX_HOSTS: usize = 64 << 10;

/// Writes /etc/hostname, /etc/hosts (the host's `hosts` when given, else
/// localhost and the hostname) and (when servers are given)
/// /etc/resolv.conf into the assembled rootfs, as runtimes do.
pub fn write_etc(
    rootfs: &Path,
    hostname: &str,
    hosts: &str,
    dns_servers: &[String],
    dns_search: &[String],
    dns_options: &[String],
) -> Result<()> {
    check_resolver(dns_servers, dns_search, dns_options)?;
    if hosts.len() > MAX_HOSTS || hosts.contains('\0') {
        return Err(RootfsError::Invalid(format!(
            "/etc/hosts of {} bytes: at most {MAX_HOSTS} bytes of text",
            hosts.len()
        )));
    }
    let etc = rootfs.join("etc");
    mkdir(&etc)?;
    let write = |name: &str, text: String| {
        let path = etc.join(name);
        // A symlink here (resolv.conf often is one) must not redirect the
        // write outside the rootfs: replace it.
        if path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = fs::remove_file(&path);
        }
        fs::write(&path, text).map_err(|source| RootfsError::Write { path, source })
    };
    if !hostname.is_empty() {
        write("hostname", format!("{hostname}\n"))?;
    }
    let own_hosts = || {
        format!(
            "127.0.0.1\tlocalhost{0}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            if hostname.is_empty() {
                String::new()
            } else {
                format!(" {hostname}")
            }
        )
    };
    write(
        "hosts",
        if hosts.is_empty() {
            own_hosts()
        } else {
            hosts.to_owned()
        },
    )?;
    if !dns_servers.is_empty() {
        let mut text: String = dns_servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        if !dns_search.is_empty() {
            text.push_str(&format!("search {}\n", dns_search.join(" ")));
        }
        if !dns_options.is_empty() {
            text.push_str(&format!("options {}\n", dns_options.join(" ")));
        }
        write("resolv.conf", text)?;
    }
    Ok(())
}

/// Name servers must be IP addresses; search domains and options single
/// printable words (each becomes part of one resolv.conf line).
fn check_resolver(servers: &[String], search: &[String], options: &[String]) -> Result<()> {
    if let Some(bad) = servers
        .iter()
        .find(|s| s.parse::<std::net::IpAddr>().is_err())
    {
        return Err(RootfsError::Invalid(format!(
            "DNS server {bad:?} is not an IP address"
        )));
    }
    let word = |w: &String| !w.is_empty() && w.chars().all(|c| c.is_ascii_graphic());
    if let Some(bad) = search.iter().chain(options).find(|w| !word(w)) {
        return Err(RootfsError::Invalid(format!(
            "DNS search domain or option {bad:?} is not one printable word"
        )));
    }
    Ok(())
}

/// Resolves `path` inside `rootfs`, following symlinks as the container
/// would see them (absolute targets are relative to the rootfs).
pub fn resolve_in(rootfs: &Path, path: &Path) -> Option<PathBuf> {
    let mut current = PathBuf::from("/");
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_os_string()),
            std::path::Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            current.pop();
            continue;
        }
        let next = current.join(&part);
        let host = rootfs.join(next.strip_prefix("/").ok()?);
        match fs::read_link(&host) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.is_absolute() {
                    current = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    match c {
                        std::path::Component::Normal(n) => pending.push(n.to_os_string()),
                        std::path::Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            Err(_) => current = next,
        }
    }
    Some(rootfs.join(current.strip_prefix("/").ok()?))
}

/// Checks that the program a process would run is something the kernel
/// can execute (ELF or `#!` script). The runtime's exec would otherwise
/// fall back to running the file with /bin/sh, as execvp does, and turn an
/// "exec format error" into a confusing shell message. A program found
/// nowhere is refused, unless it may be on one of `mount_points` (the
/// spec's mounts, not in place yet): then the runtime has the last word.
pub fn check_executable(
    rootfs: &Path,
    program: &str,
    path_env: &str,
    mount_points: &[PathBuf],
) -> Result<()> {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        path_env
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    let mut maybe_on_a_mount = false;
    for candidate in candidates {
        if mount_points
            .iter()
            .any(|m| m != Path::new("/") && candidate.starts_with(m))
        {
            maybe_on_a_mount = true;
            continue;
        }
        let Some(host) = resolve_in(rootfs, &candidate) else {
            continue;
        };
        if !host.is_file() {
            continue;
        }
        let mut magic = [0u8; 4];
        let n = fs::File::open(&host)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut magic))
            .unwrap_or(0);
        if (n >= 4 && magic == *b"\x7fELF") || (n >= 2 && magic[..2] == *b"#!") {
            return Ok(());
        }
        return Err(RootfsError::Invalid(format!(
            "exec format error: {program} is neither an ELF binary nor a #! script"
        )));
    }
    if maybe_on_a_mount {
        return Ok(());
    }
    Err(RootfsError::ProgramNotFound(if program.contains('/') {
        format!("exec: {program:?}: stat {program}: no such file or directory")
    } else {
        format!("exec: {program:?}: executable file not found in $PATH")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::write(bin.join("prog"), b"\x7fELF rest").unwrap();
        fs::write(bin.join("script"), b"#!/bin/sh\necho").unwrap();
        fs::write(bin.join("junk"), b"\x00\x01junk").unwrap();
        std::os::unix::fs::symlink("prog", bin.join("link")).unwrap();
        std::os::unix::fs::symlink("/bin/junk", bin.join("abs")).unwrap();
        for ok in ["prog", "script", "link", "/bin/prog"] {
            assert!(
                check_executable(dir.path(), ok, "/usr/bin:/bin", &[]).is_ok(),
                "{ok}"
            );
        }
        let e = check_executable(dir.path(), "missing", "/usr/bin:/bin", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "exec: \"missing\": executable file not found in $PATH"
        );
        let e = check_executable(dir.path(), "/opt/x", "/bin", &[]).unwrap_err();
        assert!(e.to_string().ends_with("no such file or directory"), "{e}");
        // On a mount that is not in place yet: the runtime decides.
        let mounts = [PathBuf::from("/opt")];
        assert!(check_executable(dir.path(), "/opt/x", "/bin", &mounts).is_ok());
        assert!(check_executable(dir.path(), "x", "/opt:/bin", &mounts).is_ok());
        for bad in ["junk", "/bin/junk", "abs"] {
            let e = check_executable(dir.path(), bad, "/bin", &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("exec format error"), "{bad}: {e}");
        }
    }

    #[test]
    fn share_paths_are_checked_lexically() {
        for ok in ["c3/rootfs", "c3", "a/b/c", "c3/root.fs", "..x/y", "x../y"] {
            assert!(check_share_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/c3/rootfs",
            "/",
            "..",
            "../c3",
            "c3/../../etc",
            "c3/..",
            "./c3",
            "c3/./rootfs",
            "c3//rootfs",
            "c3/rootfs/",
            "c3\0/rootfs",
        ] {
            let e = check_share_path(bad).unwrap_err();
            assert!(matches!(e, RootfsError::Invalid(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_share_rootfs_has_no_layers_or_upper_disk() {
        let mut spec = Rootfs::new();
        assert!(check(&spec).is_err(), "neither layers nor share path");
        spec.share_path = "c3/rootfs".into();
        assert!(check(&spec).is_ok());
        spec.upper_disk_serial = "scratch".into();
        assert!(matches!(check(&spec), Err(RootfsError::Invalid(_))));
        spec.upper_disk_serial.clear();
        spec.layers.push(capsid_protocol::agent::BlockLayer::new());
        assert!(matches!(check(&spec), Err(RootfsError::Invalid(_))));
        spec.share_path = "../c3".into();
        spec.layers.clear();
        assert!(matches!(check(&spec), Err(RootfsError::Invalid(_))));
        spec.share_path.clear();
        spec.layers.push(capsid_protocol::agent::BlockLayer::new());
        assert!(check(&spec).is_ok());
    }

    #[test]
    fn share_paths_are_opened_only_beneath_the_share() {
        use std::os::unix::fs::symlink;
        let top = tempfile::tempdir().unwrap();
        let share = top.path().join("share");
        let outside = top.path().join("outside");
        fs::create_dir_all(share.join("c3/rootfs/etc")).unwrap();
        fs::create_dir_all(share.join("c4")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(share.join("c3/file"), "x").unwrap();
        symlink("rootfs", share.join("c3/inside")).unwrap();
        symlink("../c3/rootfs", share.join("c4/rootfs")).unwrap();
        symlink(&outside, share.join("c3/absolute")).unwrap();
        symlink("../../outside", share.join("c3/relative")).unwrap();
        symlink("/proc/self/cwd", share.join("c3/magic")).unwrap();
        symlink(".", share.join("c3/here")).unwrap();
        symlink("..", share.join("c3/up")).unwrap();

        let opened = |p: &str| {
            let fd = open_in_share(&share, p).unwrap();
            fs::read_link(fd_path(&fd)).unwrap()
        };
        let canonical = fs::canonicalize(&share).unwrap();
        assert_eq!(opened("c3/rootfs"), canonical.join("c3/rootfs"));
        assert_eq!(opened("c3/rootfs/etc"), canonical.join("c3/rootfs/etc"));
        // Links that stay beneath the share are followed.
        assert_eq!(opened("c3/inside"), canonical.join("c3/rootfs"));
        assert_eq!(opened("c4/rootfs"), canonical.join("c3/rootfs"));
        assert_eq!(opened("c3/here"), canonical.join("c3"));

        for bad in ["c3/absolute", "c3/relative", "c3/magic", "c3/absolute/x"] {
            let e = open_in_share(&share, bad).unwrap_err();
            assert!(matches!(e, RootfsError::Share { .. }), "{bad}: {e}");
        }
        // The share's root itself is no container's rootfs.
        let e = open_in_share(&share, "c3/up").unwrap_err();
        assert!(matches!(e, RootfsError::Invalid(_)), "{e}");
        // Missing, or not a directory.
        for bad in ["c9/rootfs", "c3/file"] {
            let e = open_in_share(&share, bad).unwrap_err();
            assert!(matches!(e, RootfsError::Share { .. }), "{bad}: {e}");
        }
        // Lexically bad paths never reach the kernel.
        for bad in ["../outside", "/etc", "c3/../c3/rootfs"] {
            let e = open_in_share(&share, bad).unwrap_err();
            assert!(matches!(e, RootfsError::Invalid(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn teardown_never_recurses_into_the_bundle_s_directories() {
        // A directory of the bundle that is still full (a bind that could
        // not be taken down) keeps its contents; files go.
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("b");
        fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        fs::write(bundle.join("rootfs/bin/sh"), "keep").unwrap();
        fs::create_dir(bundle.join("layer0")).unwrap();
        fs::write(bundle.join("config.json"), "{}").unwrap();
        std::os::unix::fs::symlink("rootfs", bundle.join("link")).unwrap();
        let e = remove_bundle(&bundle).unwrap_err();
        assert!(matches!(e, RootfsError::Remove { .. }), "{e}");
        assert_eq!(
            fs::read_to_string(bundle.join("rootfs/bin/sh")).unwrap(),
            "keep"
        );
        assert!(!bundle.join("layer0").exists());
        assert!(!bundle.join("config.json").exists());
        assert!(!bundle.join("link").exists());
        fs::remove_file(bundle.join("rootfs/bin/sh")).unwrap();
        fs::remove_dir(bundle.join("rootfs/bin")).unwrap();
        remove_bundle(&bundle).unwrap();
        assert!(!bundle.exists());
        // Gone already: fine.
        remove_bundle(&bundle).unwrap();
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("abc-1_2.3"));
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn disks_are_found_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "capsid-root\0\0"), ("vdb", "scratch")] {
            fs::create_dir(dir.path().join(name)).unwrap();
            fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        assert_eq!(
            find_disk(dir.path(), "capsid-root"),
            Some(PathBuf::from("/dev/vda"))
        );
        assert_eq!(
            find_disk(dir.path(), "scratch"),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(find_disk(dir.path(), "nope"), None);
    }

    #[test]
    fn etc_files_are_written_and_symlinks_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        let outside = dir.path().join("outside");
        std::os::unix::fs::symlink(&outside, dir.path().join("etc/resolv.conf")).unwrap();
        write_etc(
            dir.path(),
            "box",
            "",
            &["10.0.0.1".into()],
            &["example.org".into()],
            &["ndots:2".into()],
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert!(fs::read_to_string(dir.path().join("etc/hosts"))
            .unwrap()
            .contains("localhost box"));
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap(),
            "nameserver 10.0.0.1\nsearch example.org\noptions ndots:2\n"
        );
        assert!(!outside.exists(), "write followed the symlink");

        // The host's hosts file, as Docker or the kubelet wrote it.
        let docker = "127.0.0.1\tlocalhost\n172.17.0.2\tbox\n10.1.1.1\textra.test\n";
        write_etc(dir.path(), "box", docker, &[], &[], &[]).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/hosts")).unwrap(),
            docker
        );
        let huge = "x".repeat(MAX_HOSTS + 1);
        let err = write_etc(dir.path(), "box", &huge, &[], &[], &[]).unwrap_err();
        assert!(matches!(err, RootfsError::Invalid(_)), "{err}");
    }

    #[test]
    fn bad_resolver_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = |v: &str| vec![v.to_string()];
        for (servers, search, options) in [
            (s("10.0.0.1\nnameserver 1.2.3.4"), vec![], vec![]),
            (s("dns.example"), vec![], vec![]),
            (s("10.0.0.1"), s("a b"), vec![]),
            (s("10.0.0.1"), vec![], s("")),
        ] {
            let err = write_etc(dir.path(), "", "", &servers, &search, &options).unwrap_err();
            assert!(matches!(err, RootfsError::Invalid(_)), "{err}");
        }
    }
}
