//! The container's root filesystem inside the guest: read-only image
//! layers from virtio-blk disks (found by serial), a writable upper layer,
//! joined by overlayfs; plus the files a container expects to find
//! (/etc/hostname, /etc/hosts, /etc/resolv.conf).

use std::fs;
use std::path::{Path, PathBuf};

use capsid_protocol::agent::Rootfs;
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

/// Mounts the layers and the overlay for container `id`.
pub fn assemble(id: &str, spec: &Rootfs) -> Result<BundleDirs> {
    if !valid_id(id) {
        return Err(RootfsError::Invalid(format!("container id {id:?}")));
    }
    if spec.layers.is_empty() {
        return Err(RootfsError::Invalid("no image layers".into()));
    }
    let dirs = BundleDirs::new(id);
    mkdir(&dirs.rootfs)?;
    // From here on a failure unmounts and removes whatever was made.
    let undo = Undo::new(|| teardown(id));
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

/// Unmounts and removes everything [`assemble`] made (best effort, and
/// safe to call more than once).
pub fn teardown(id: &str) {
    if !valid_id(id) {
        return;
    }
    let dirs = BundleDirs::new(id);
    let _ = umount2(&dirs.rootfs, MntFlags::MNT_DETACH);
    let _ = umount2(&dirs.rw(), MntFlags::MNT_DETACH);
    for i in 0.. {
        let layer = dirs.layer(i);
        if !layer.exists() {
            break;
        }
        let _ = umount2(&layer, MntFlags::MNT_DETACH);
    }
    let _ = fs::remove_dir_all(&dirs.bundle);
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
