//! What a jail is made of, as capsid-jail's command line.

use std::ffi::OsString;
use std::path::PathBuf;

/// A command line that does not describe a jail.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A flag is missing its value or has a malformed one.
    #[error("capsid-jail: {0}")]
    Invalid(String),
}

/// A host path made visible in the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// File or directory.
    pub path: PathBuf,
    /// The jailed process may write through it.
    pub writable: bool,
}

/// A host file opened by the jailer and inherited by the jailed process as
/// descriptor `fd`: the process reaches it as `/proc/self/fd/<fd>` without
/// any right to its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedFd {
    /// The descriptor number in the jailed process (3 or more).
    pub fd: i32,
    /// The file.
    pub path: PathBuf,
    /// Opened read-write (else read-only).
    pub writable: bool,
}

impl PassedFd {
    /// The path the jailed process opens it by.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd))
    }
}

/// One jailed process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JailSpec {
    /// The uid and gid the process runs as (never 0).
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// An empty directory, root-owned: the jail's root is a tmpfs mounted
    /// on it in the jail's own mount namespace (the host sees nothing).
    pub root: PathBuf,
    /// What the process may see of the host.
    pub binds: Vec<BindMount>,
    /// Character devices recreated in the jail's `/dev`, owned by the jail
    /// uid (`/dev/kvm`).
    pub devices: Vec<PathBuf>,
    /// Files passed as descriptors.
    pub fds: Vec<PassedFd>,
    /// The network namespace to join.
    pub netns: Option<PathBuf>,
    /// A persistent tap (in that namespace) handed to the jail uid, so the
    /// process attaches to it without CAP_NET_ADMIN.
    pub taps: Vec<String>,
    /// cgroup directories (one per hierarchy) the process is placed in.
    pub cgroups: Vec<PathBuf>,
    /// RLIMIT_NOFILE.
    pub max_files: u64,
    /// RLIMIT_FSIZE in bytes, when the process writes no disk.
    pub max_file_size: Option<u64>,
    /// The program, by absolute path (it is bound into the jail).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl JailSpec {
    /// The jailer's command line for this jail.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: OsString| {
            a.push(name.into());
            a.push(value);
        };
        flag("--uid", self.uid.to_string().into());
        flag("--gid", self.gid.to_string().into());
        flag("--root", self.root.clone().into());
        for b in &self.binds {
            let mut v = OsString::from(if b.writable { "rw:" } else { "ro:" });
            v.push(&b.path);
            flag("--bind", v);
        }
        for d in &self.devices {
            flag("--dev", d.clone().into());
        }
        for f in &self.fds {
            let mut v = OsString::from(format!(
                "{}:{}:",
                f.fd,
                if f.writable { "rw" } else { "ro" }
            ));
            v.push(&f.path);
            flag("--fd", v);
        }
        if let Some(ns) = &self.netns {
            flag("--netns", ns.clone().into());
        }
        for t in &self.taps {
            flag("--tap", t.into());
        }
        for c in &self.cgroups {
            flag("--cgroup", c.clone().into());
        }
        flag("--max-files", self.max_files.to_string().into());
        if let Some(n) = self.max_file_size {
            flag("--max-file-size", n.to_string().into());
        }
        a.push("--".into());
        a.push(self.program.clone().into());
        a.extend(self.args.iter().cloned());
        a
    }

    /// Reads a jailer command line (without the program name).
    pub fn parse(args: &[OsString]) -> Result<Self, SpecError> {
        let bad = |m: String| SpecError::Invalid(m);
        let mut spec = JailSpec {
            max_files: 1024,
            ..JailSpec::default()
        };
        let mut it = args.iter();
        let (mut uid, mut gid) = (None, None);
        while let Some(arg) = it.next() {
            let name = arg.to_str().unwrap_or("");
            if name == "--" {
                let program = it.next().ok_or_else(|| bad("no program after --".into()))?;
                spec.program = PathBuf::from(program);
                spec.args = it.cloned().collect();
                break;
            }
            let value = it
                .next()
                .ok_or_else(|| bad(format!("{name} needs a value")))?;
            let text = || {
                value
                    .to_str()
                    .ok_or_else(|| bad(format!("{name}: not UTF-8")))
            };
            let number = |what: &str| -> Result<u64, SpecError> {
                text()?
                    .parse()
                    .map_err(|_| bad(format!("{what}: {value:?} is not a number")))
            };
            match name {
                "--uid" => uid = Some(number("--uid")?),
                "--gid" => gid = Some(number("--gid")?),
                "--root" => spec.root = PathBuf::from(value),
                "--bind" => {
                    let (mode, path) = split_mode(value, name)?;
                    spec.binds.push(BindMount {
                        path,
                        writable: mode,
                    });
                }
                "--dev" => spec.devices.push(PathBuf::from(value)),
                "--fd" => {
                    let t = text()?;
                    let (n, rest) = t
                        .split_once(':')
                        .ok_or_else(|| bad(format!("--fd {t}: expected N:ro|rw:PATH")))?;
                    let fd: i32 = n
                        .parse()
                        .ok()
                        .filter(|n| *n >= 3)
                        .ok_or_else(|| bad(format!("--fd {t}: {n} is not a descriptor ≥ 3")))?;
                    let (writable, path) = split_mode(&OsString::from(rest), name)?;
                    spec.fds.push(PassedFd { fd, path, writable });
                }
                "--netns" => spec.netns = Some(PathBuf::from(value)),
                "--tap" => spec.taps.push(text()?.to_string()),
                "--cgroup" => spec.cgroups.push(PathBuf::from(value)),
                "--max-files" => spec.max_files = number(name)?,
                "--max-file-size" => spec.max_file_size = Some(number(name)?),
                _ => return Err(bad(format!("unknown flag {name:?}"))),
            }
        }
        let id = |v: Option<u64>, what: &str| -> Result<u32, SpecError> {
            v.and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v != 0 && *v != u32::MAX)
                .ok_or_else(|| bad(format!("{what} must be given, not 0 (root) and not -1")))
        };
        spec.uid = id(uid, "--uid")?;
        spec.gid = id(gid, "--gid")?;
        if spec.root.as_os_str().is_empty() || !spec.root.is_absolute() {
            return Err(bad("--root must be an absolute path".into()));
        }
        if !spec.program.is_absolute() {
            return Err(bad(format!(
                "the program must be an absolute path, not {:?}",
                spec.program
            )));
        }
        for b in &spec.binds {
            if !b.path.is_absolute() || b.path == std::path::Path::new("/") {
                return Err(bad(format!(
                    "--bind {}: an absolute path other than /",
                    b.path.display()
                )));
            }
        }
        Ok(spec)
    }
}

/// `ro:PATH` or `rw:PATH`.
fn split_mode(value: &OsString, flag: &str) -> Result<(bool, PathBuf), SpecError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    let writable = match bytes.get(..3) {
        Some(b"rw:") => true,
        Some(b"ro:") => false,
        _ => {
            return Err(SpecError::Invalid(format!(
                "{flag} {value:?}: expected ro:PATH or rw:PATH"
            )))
        }
    };
    Ok((
        writable,
        PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[3..])),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JailSpec {
        JailSpec {
            uid: 2_000_000_001,
            gid: 2_000_000_001,
            root: "/run/capsid/s/root".into(),
            binds: vec![
                BindMount {
                    path: "/usr".into(),
                    writable: false,
                },
                BindMount {
                    path: "/run/capsid/s".into(),
                    writable: true,
                },
            ],
            devices: vec!["/dev/kvm".into()],
            fds: vec![PassedFd {
                fd: 10,
                path: "/var/cache/capsid/a b.img".into(),
                writable: true,
            }],
            netns: Some("/run/netns/x".into()),
            taps: vec!["tap0".into()],
            cgroups: vec!["/sys/fs/cgroup/capsid/s".into()],
            max_files: 4096,
            max_file_size: Some(4 << 20),
            program: "/usr/bin/qemu-system-x86_64".into(),
            args: vec!["-name".into(), "--uid".into()],
        }
    }

    #[test]
    fn a_spec_survives_its_command_line() {
        let s = sample();
        assert_eq!(JailSpec::parse(&s.to_args()).unwrap(), s);
        assert_eq!(s.fds[0].proc_path(), PathBuf::from("/proc/self/fd/10"));
    }

    #[test]
    fn bad_command_lines_are_named() {
        let with = |f: &dyn Fn(&mut JailSpec)| {
            let mut s = sample();
            f(&mut s);
            JailSpec::parse(&s.to_args()).unwrap_err().to_string()
        };
        assert!(with(&|s| s.uid = 0).contains("--uid"));
        assert!(with(&|s| s.gid = 0).contains("--gid"));
        assert!(with(&|s| s.root = "rel".into()).contains("--root"));
        assert!(with(&|s| s.program = "qemu".into()).contains("absolute"));
        assert!(with(&|s| s.binds[0].path = "/".into()).contains("--bind"));
        assert!(with(&|s| s.fds[0].fd = 2).contains("descriptor"));
        let e = JailSpec::parse(&["--uid".into()]).unwrap_err().to_string();
        assert!(e.contains("--uid needs a value"), "{e}");
        let e = JailSpec::parse(&["--nope".into(), "x".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--nope"), "{e}");
        let e = JailSpec::parse(&["--bind".into(), "/x".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ro:PATH"), "{e}");
    }
}
