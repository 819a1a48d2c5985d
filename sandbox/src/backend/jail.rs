//! Every VM-side process (QEMU, capsid-vmm, capsid-vhost) is started
//! through capsid-jail (crate `capsid-jail`): its own uid and gid per
//! sandbox, new mount/pid/ipc/uts namespaces, a root holding only what it
//! needs, no capabilities, `no_new_privs`, rlimits, and the sandbox's
//! cgroups. docs/security.md describes the layers.
//!
//! A sandbox's jail ([`SandboxJail`]) owns:
//! - its uid (= gid), taken from the configured range under an exclusive
//!   `flock` on `<state_dir>/.jail/uids/<uid>`, released by the kernel
//!   when the holder dies, so a crashed shim never leaks one;
//! - the VM's run directory, handed to that uid (its processes make their
//!   sockets and the console log there; nothing else of the host is
//!   theirs to write);
//! - one cgroup per hierarchy, under the caller's own, removed on drop.
//!
//! [`Launch`] builds one process's command line, jailed or (when the jail
//! is off in the config) as before.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use capsid_jail::{BindMount, JailSpec, PassedFd};

use super::{BackendError, Result};
use crate::config::JailConfig;

/// RLIMIT_NOFILE of a jailed process: QEMU and the VMM keep a few
/// descriptors per device and queue, vsock one per connection.
const MAX_FILES: u64 = 4096;
/// RLIMIT_FSIZE of a process that writes no disk: its stderr log and the
/// console log (capped at 2 MiB by capsid-vhost) stay under it.
pub const LOG_FILE_LIMIT: u64 = 16 << 20;
/// The first descriptor number used for passed files.
const FIRST_PASSED_FD: i32 = 10;

/// The jailer, as configured.
#[derive(Debug, Clone)]
pub struct Jailer {
    binary: PathBuf,
    uid_base: u32,
    uid_count: u32,
}

impl Jailer {
    /// The jailer `binary` (a bare name is looked up beside capsid's own
    /// binaries, then in PATH) with `config`'s uid range; `None` when the
    /// config turns jails off.
    pub fn from_config(binary: &Path, config: &JailConfig) -> Result<Option<Self>> {
        if !config.enabled {
            return Ok(None);
        }
        let binary = crate::locate::binary(binary)
            .ok_or_else(|| BackendError::BinaryNotFound(binary.display().to_string()))?;
        Ok(Some(Self {
            binary,
            uid_base: config.uid_base,
            uid_count: config.uid_count,
        }))
    }

    /// Makes the jail of the VM whose run directory (already made,
    /// root-owned, 0700, named after the sandbox) is `run_dir`, its
    /// processes in `cgroup` ([`crate::backend::VmSpec::cgroup`]); its
    /// locks live under `run_dir`'s parent (the state directory).
    pub fn enter(&self, run_dir: &Path, cgroup: Option<&Path>) -> Result<SandboxJail> {
        let name = run_dir
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or("sandbox");
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source: std::io::Error| BackendError::Jail {
                what,
                path: path.clone(),
                source,
            }
        };
        let state = run_dir.parent().unwrap_or(Path::new("/"));
        let jail_dir = state.join(".jail");
        let uids = jail_dir.join("uids");
        let root = jail_dir.join("root");
        for dir in [&jail_dir, &uids, &root] {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("make", dir)(e)),
            }
        }
        let (uid, lock) = self.take_uid(name, &uids)?;
        std::os::unix::fs::lchown(run_dir, Some(uid), Some(uid))
            .map_err(io("give the run directory to the jail's uid", run_dir))?;
        // Sockets the caller bound before the VM starts (the agent's
        // listener) are for the VM's vsock device to connect to.
        for entry in std::fs::read_dir(run_dir)
            .map_err(io("list", run_dir))?
            .flatten()
        {
            use std::os::unix::fs::FileTypeExt;
            if entry.file_type().is_ok_and(|t| t.is_socket()) {
                std::os::unix::fs::lchown(entry.path(), Some(uid), Some(uid))
                    .map_err(io("give to the jail's uid", &entry.path()))?;
            }
        }
        let cgroups = Cgroups::make(name, cgroup)?;
        Ok(SandboxJail {
            jailer: self.binary.clone(),
            uid,
            _lock: lock,
            root,
            run_dir: run_dir.to_path_buf(),
            cgroups,
        })
    }

    /// The jail of the VM `spec` describes ([`Self::enter`]), once its
    /// kernel and initramfs are known to be readable by the jail's uid;
    /// shared between the VM (which drops it last) and its start-up.
    pub fn for_vm(&self, spec: &super::VmSpec) -> Result<std::sync::Arc<SandboxJail>> {
        let jail = self.enter(&spec.run_dir, spec.cgroup.as_deref())?;
        jail.check_readable("kernel", &spec.kernel)?;
        jail.check_readable("initramfs", &spec.initramfs)?;
        Ok(std::sync::Arc::new(jail))
    }

    /// A free uid, probed from one derived from the name so that
    /// concurrent sandboxes rarely contend for the same lock.
    fn take_uid(&self, name: &str, uids: &Path) -> Result<(u32, File)> {
        use sha2::Digest;
        let count = self.uid_count.max(1);
        let digest = sha2::Sha256::digest(name.as_bytes());
        let start = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % count;
        for i in 0..count {
            let uid = self.uid_base + (start + i) % count;
            let path = uids.join(uid.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| BackendError::Jail {
                    what: "open the uid lock",
                    path: path.clone(),
                    source,
                })?;
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok((uid, file));
            }
        }
        Err(BackendError::InvalidSpec(format!(
            "every jail uid from {} to {} is in use (raise [jail] uid_count)",
            self.uid_base,
            self.uid_base + count - 1
        )))
    }
}

/// One sandbox's jail: its uid, run directory and cgroups.
#[derive(Debug)]
pub struct SandboxJail {
    jailer: PathBuf,
    uid: u32,
    /// Held for as long as the sandbox lives.
    _lock: File,
    root: PathBuf,
    run_dir: PathBuf,
    cgroups: Cgroups,
}

impl SandboxJail {
    /// The uid (and gid) the sandbox's processes run as.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Puts the process `cmd` starts in the sandbox's cgroups, for a
    /// VM-side process that is not jailed (virtiofsd, which must act for
    /// the guest's users as root and makes its own sandbox).
    pub fn join_cgroups(&self, cmd: &mut Command) {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::process::CommandExt;
        let files: Vec<std::ffi::CString> = self
            .cgroups
            .dirs
            .iter()
            .filter_map(|d| {
                std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok()
            })
            .collect();
        // SAFETY: between fork and exec the closure only calls open, write
        // and close (async-signal-safe) on strings made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for file in &files {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the writing process itself.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// Checks that the VM's processes, running as the jail's uid, can read
    /// the `what` at `path` (kernel, initramfs: bound into the jail, read
    /// by path): it must be readable by others.
    pub fn check_readable(&self, what: &'static str, path: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| BackendError::Jail {
                what: "read the permissions of",
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o004 == 0 {
            return Err(BackendError::InvalidSpec(format!(
                "{what} {} is not readable by others (mode {:o}): the VM's processes run as a uid of their own and read it; make it readable (chmod o+r)",
                path.display(),
                mode & 0o7777
            )));
        }
        Ok(())
    }

    /// Gives `path` (a socket a root process made for the VM's processes)
    /// to the jail's uid, without following a link.
    pub fn hand_over(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.uid)).map_err(|source| {
            BackendError::Jail {
                what: "give to the jail's uid",
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

/// One process's command line: jailed when a jail is given.
#[derive(Debug)]
pub struct Launch<'a> {
    jail: Option<&'a SandboxJail>,
    program: PathBuf,
    args: Vec<OsString>,
    binds: Vec<BindMount>,
    devices: Vec<PathBuf>,
    fds: Vec<PassedFd>,
    netns: Option<PathBuf>,
    taps: Vec<String>,
    max_file_size: Option<u64>,
}

impl<'a> Launch<'a> {
    /// `program`, in `jail` if there is one.
    pub fn new(jail: Option<&'a SandboxJail>, program: &Path) -> Self {
        Self {
            jail,
            program: program.to_path_buf(),
            args: Vec::new(),
            binds: Vec::new(),
            devices: Vec::new(),
            fds: Vec::new(),
            netns: None,
            taps: Vec::new(),
            max_file_size: None,
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// A file the process reads by path (kernel, initramfs): bound
    /// read-only. Such files must be readable by others (they are).
    pub fn read(&mut self, path: &Path) -> &mut Self {
        self.binds.push(BindMount {
            path: path.to_path_buf(),
            writable: false,
        });
        self
    }

    /// A disk: the path the process is to open it by (the host path when
    /// not jailed; a passed descriptor when jailed).
    pub fn disk(&mut self, path: &Path, writable: bool) -> PathBuf {
        if self.jail.is_none() {
            return path.to_path_buf();
        }
        let fd = FIRST_PASSED_FD + i32::try_from(self.fds.len()).unwrap_or(0);
        let passed = PassedFd {
            fd,
            path: path.to_path_buf(),
            writable,
        };
        let inside = passed.proc_path();
        self.fds.push(passed);
        inside
    }

    /// A character device (`/dev/kvm`).
    pub fn device(&mut self, path: &Path) -> &mut Self {
        self.devices.push(path.to_path_buf());
        self
    }

    /// Runs in this network namespace.
    pub fn netns(&mut self, ns: Option<&Path>) -> &mut Self {
        self.netns = ns.map(Path::to_path_buf);
        self
    }

    /// Attaches to this tap.
    pub fn tap(&mut self, name: &str) -> &mut Self {
        self.taps.push(name.to_string());
        self
    }

    /// Caps the size of any file the process writes.
    pub fn max_file_size(&mut self, bytes: u64) -> &mut Self {
        self.max_file_size = Some(bytes);
        self
    }

    /// The command to spawn.
    pub fn command(&self) -> Command {
        let Some(jail) = self.jail else {
            return match &self.netns {
                Some(ns) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net={}", ns.display()))
                        .arg(&self.program)
                        .args(&self.args);
                    c
                }
                None => {
                    let mut c = Command::new(&self.program);
                    c.args(&self.args);
                    c
                }
            };
        };
        let mut binds = vec![BindMount {
            path: jail.run_dir.clone(),
            writable: true,
        }];
        binds.extend(self.binds.iter().cloned());
        let spec = JailSpec {
            uid: jail.uid,
            gid: jail.uid,
            root: jail.root.clone(),
            binds,
            devices: self.devices.clone(),
            fds: self.fds.clone(),
            netns: self.netns.clone(),
            taps: self.taps.clone(),
            cgroups: jail.cgroups.dirs.clone(),
            max_files: MAX_FILES,
            max_file_size: self.max_file_size,
            // The binary itself, not a link to it: programs find their
            // own files next to their real path (QEMU's accelerator
            // modules), and only that path is in the jail.
            program: std::fs::canonicalize(&self.program).unwrap_or_else(|_| self.program.clone()),
            args: self.args.clone(),
        };
        let mut c = Command::new(&jail.jailer);
        c.args(spec.to_args());
        c
    }
}

/// The sandbox's cgroups: one directory per hierarchy, the spec's
/// cgroup (a pod's or container's `linux.cgroupsPath`) or else one named
/// after the sandbox under the cgroup this process is in; those made here
/// are removed on drop (once the processes in them are gone).
#[derive(Debug, Default)]
struct Cgroups {
    dirs: Vec<PathBuf>,
    /// Those of `dirs` that existed before (left on drop).
    found: Vec<PathBuf>,
}

/// v1 hierarchies whose controllers account for a VM's processes.
const V1_CONTROLLERS: [&str; 5] = ["memory", "pids", "cpu", "cpuacct", "blkio"];

impl Cgroups {
    fn make(name: &str, cgroup: Option<&Path>) -> Result<Self> {
        let mut made = Self::default();
        if let Some(cg) = cgroup {
            if !cg.is_absolute()
                || cg
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(BackendError::InvalidSpec(format!(
                    "cgroup {}: an absolute path without `..` (cgroupfs form)",
                    cg.display()
                )));
            }
        }
        let hierarchies = Self::hierarchies();
        if hierarchies.is_empty() {
            tracing::info!(sandbox = name, "no cgroup filesystem is mounted in this mount namespace: the VM's processes stay in the caller's cgroups");
        }
        for (mount, own) in hierarchies {
            let dir = match cgroup {
                Some(cg) => mount.join(cg.strip_prefix("/").unwrap_or(cg)),
                None => mount.join(own).join("capsid").join(name),
            };
            if cgroup.is_some() && dir.is_dir() {
                made.found.push(dir.clone());
                made.dirs.push(dir);
                continue;
            }
            // A leftover of a crashed shim with the same name: empty by now.
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir_all(&dir).map_err(|source| BackendError::Jail {
                what: "make the sandbox's cgroup",
                path: dir.clone(),
                source,
            })?;
            made.dirs.push(dir);
        }
        Ok(made)
    }

    /// Each hierarchy that counts, as mounted in this mount namespace: its
    /// mount point and this process's cgroup in it (relative). Where none
    /// is (`ip netns exec` mounts a sysfs of its own over /sys), the
    /// sandbox gets no cgroups of its own: its processes stay in the
    /// caller's.
    fn hierarchies() -> Vec<(PathBuf, PathBuf)> {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::hierarchies_in(&own, "/proc/self/mountinfo")
    }

    /// [`Self::hierarchies`] from one mount table.
    fn hierarchies_in(own: &str, mountinfo: &str) -> Vec<(PathBuf, PathBuf)> {
        let Ok(mountinfo) = std::fs::read_to_string(mountinfo) else {
            return Vec::new();
        };
        let own_path = |wanted: &dyn Fn(&str) -> bool| {
            own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                wanted(controllers).then(|| path.to_string())
            })
        };
        let mut bases = Vec::new();
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount_root), Some(mount), Some(fstype), Some(options)) = (
                fields.get(3),
                fields.get(4),
                fields.get(dash + 1),
                fields.get(dash + 3),
            ) else {
                continue;
            };
            let path = match *fstype {
                "cgroup2" => own_path(&|c| c.is_empty()),
                "cgroup" => {
                    let Some(controller) = options.split(',').find(|o| V1_CONTROLLERS.contains(o))
                    else {
                        continue;
                    };
                    own_path(&|c| c.split(',').any(|x| x == controller))
                }
                _ => continue,
            };
            // The mount shows the hierarchy from `mount_root` down.
            let Some(relative) = path.as_deref().and_then(|p| {
                Path::new(p)
                    .strip_prefix(mount_root)
                    .ok()
                    .map(Path::to_path_buf)
            }) else {
                continue;
            };
            bases.push((PathBuf::from(mount), relative));
        }
        bases
    }
}

/// Moves every process of the cgroups made for sandbox `name` under this
/// process's own (a pooled sandbox, booted before its container's cgroup
/// was known) into `to` (cgroupfs form, as [`VmSpec::cgroup`]), made where
/// it is missing; the emptied cgroups are removed. Hierarchies where the
/// sandbox has none are skipped.
pub fn move_sandbox_cgroups(name: &str, to: &Path) -> Result<()> {
    if !to.is_absolute()
        || to
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(BackendError::InvalidSpec(format!(
            "cgroup {}: an absolute path without `..` (cgroupfs form)",
            to.display()
        )));
    }
    let failed = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BackendError::Jail { what, path, source }
    };
    for (mount, own) in Cgroups::hierarchies() {
        let from = mount.join(own).join("capsid").join(name);
        if !from.is_dir() {
            continue;
        }
        let dest = mount.join(to.strip_prefix("/").unwrap_or(to));
        std::fs::create_dir_all(&dest).map_err(failed("make the container's cgroup", &dest))?;
        // A process forked while the list is read lands in the old
        // cgroup: read again until it is empty.
        for _ in 0..10 {
            let procs = std::fs::read_to_string(from.join("cgroup.procs"))
                .map_err(failed("read the processes of", &from))?;
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.lines() {
                match std::fs::write(dest.join("cgroup.procs"), pid) {
                    Ok(()) => {}
                    // Gone meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(failed("move a VM process into", &dest)(e)),
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(&from) {
            tracing::debug!(cgroup = %from.display(), error = %e, "the pooled sandbox's cgroup stays until the VM ends");
        }
    }
    Ok(())
}

/// Removes the cgroups a sandbox whose run directory was `run_dir` left
/// (its shim died before dropping them; their processes are gone); returns
/// those removed.
pub fn remove_leftover_cgroups(run_dir: &Path, cgroup: Option<&Path>) -> Vec<PathBuf> {
    let Some(name) = run_dir.file_name() else {
        return Vec::new();
    };
    Cgroups::hierarchies()
        .into_iter()
        .map(|(mount, own)| match cgroup {
            Some(cg) => mount.join(cg.strip_prefix("/").unwrap_or(cg)),
            None => mount.join(own).join("capsid").join(name),
        })
        .filter(|dir| std::fs::remove_dir(dir).is_ok())
        .collect()
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.dirs.iter().filter(|d| !self.found.contains(d)) {
            // The last processes may still be exiting: a few tries.
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove the sandbox's cgroup");
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unjailed_launches_are_as_before() {
        let mut l = Launch::new(None, Path::new("/usr/bin/qemu"));
        l.args(["-m", "256"]);
        assert_eq!(
            l.disk(Path::new("/var/d.img"), true),
            PathBuf::from("/var/d.img")
        );
        let c = l.command();
        assert_eq!(c.get_program(), "/usr/bin/qemu");
        l.netns(Some(Path::new("/run/netns/x")));
        let c = l.command();
        assert_eq!(c.get_program(), "nsenter");
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(args[0], "--net=/run/netns/x");
    }

    #[test]
    fn uids_are_exclusive_and_come_back_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let jailer = Jailer {
            binary: "/bin/true".into(),
            uid_base: 3_000_000,
            uid_count: 2,
        };
        let (a, lock_a) = jailer.take_uid("x", dir.path()).unwrap();
        let (b, _lock_b) = jailer.take_uid("x", dir.path()).unwrap();
        assert_ne!(a, b);
        assert!((3_000_000..3_000_002).contains(&a) && (3_000_000..3_000_002).contains(&b));
        let e = jailer.take_uid("y", dir.path()).unwrap_err().to_string();
        assert!(e.contains("uid_count"), "{e}");
        drop(lock_a);
        assert_eq!(jailer.take_uid("z", dir.path()).unwrap().0, a);
    }
}
