//! The OCI runtime spec of a container started by `capsid run`: runc's
//! defaults (namespaces, capabilities, mounts, masked paths), with the
//! image's config and the user's flags on top.

use std::collections::HashMap;

use oci_spec::runtime::{
    LinuxBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, LinuxSeccomp, PosixRlimit,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, Spec, UserBuilder,
};

/// Errors building a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A user-given value is malformed.
    #[error("{what} {value:?}: {reason}")]
    Invalid {
        /// Which flag or field.
        what: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Nothing to run.
    #[error("no command: the image has no entrypoint or cmd, and none was given")]
    NoCommand,
    /// oci-spec's builder refused a part capsid put together (builders fail
    /// only on a missing field, so this is capsid's mistake, not the user's).
    #[error("cannot build the OCI spec's {what}: this is a capsid bug, please report it")]
    Build {
        /// Which part, by its path in the spec (`process.user`, `linux`, ...).
        what: &'static str,
        /// What oci-spec said.
        #[source]
        source: oci_spec::OciSpecError,
    },
}

/// Result of spec building.
pub type Result<T> = std::result::Result<T, SpecError>;

/// A host path bound into the container (`capsid run -v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host file or directory.
    pub source: std::path::PathBuf,
    /// Where it goes in the container.
    pub destination: std::path::PathBuf,
    /// Read-only.
    pub readonly: bool,
}

/// Appends `binds` to `spec`'s mounts as OCI bind mounts (as runc and
/// Docker write them: `rbind`, `ro` or `rw`), after the defaults, so a
/// bind may cover a default mount point.
pub fn add_binds(spec: &mut Spec, binds: &[Bind]) -> Result<()> {
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for b in binds {
        let mode = if b.readonly { "ro" } else { "rw" };
        let m = oci_spec::runtime::MountBuilder::default()
            .destination(b.destination.clone())
            .typ("bind")
            .source(b.source.clone())
            .options(vec!["rbind".to_string(), mode.to_string()])
            .build()
            .map_err(|source| SpecError::Build {
                what: "mounts",
                source,
            })?;
        mounts.push(m);
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// What the image says about how to run it (from its config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// ENV (K=V).
    pub env: Vec<String>,
    /// WORKDIR.
    pub working_dir: String,
    /// USER.
    pub user: String,
}

impl ImageDefaults {
    /// The defaults an image's configuration sets (absent fields empty).
    pub fn from_image(config: &oci_spec::image::ImageConfiguration) -> Self {
        let c = config.config().clone().unwrap_or_default();
        Self {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().unwrap_or_default(),
            user: c.user().clone().unwrap_or_default(),
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Command and arguments (replace the image's CMD; ENTRYPOINT stays).
    pub command: Vec<String>,
    /// Extra environment (K=V), overriding the image's.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// `uid[:gid]`.
    pub user: Option<String>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Hostname.
    pub hostname: String,
    /// Read-only root filesystem.
    pub read_only: bool,
    /// cgroup memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Resource limits, `nofile=SOFT[:HARD]`.
    pub rlimits: Vec<String>,
    /// The `linux.seccomp` section (`None`: no filter, as with runc).
    pub seccomp: Option<LinuxSeccomp>,
}

/// Wraps an oci-spec builder error, naming the part being built.
fn build_error(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> SpecError {
    move |source| SpecError::Build { what, source }
}

fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        what,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses `uid[:gid]` (numeric; `root` means 0).
pub fn parse_user(value: &str) -> Result<(u32, u32)> {
    let num = |s: &str| -> Result<u32> {
        if s == "root" {
            return Ok(0);
        }
        s.parse()
            .map_err(|_| invalid("user", value, "only numeric uid[:gid] is supported"))
    };
    match value.split_once(':') {
        Some((u, g)) => Ok((num(u)?, num(g)?)),
        None => {
            let uid = num(value)?;
            Ok((uid, uid))
        }
    }
}

fn parse_rlimit(value: &str) -> Result<PosixRlimit> {
    let (name, limits) = value
        .split_once('=')
        .ok_or_else(|| invalid("rlimit", value, "expected NAME=SOFT[:HARD]"))?;
    let typ = match name.to_ascii_lowercase().as_str() {
        "nofile" => PosixRlimitType::RlimitNofile,
        "nproc" => PosixRlimitType::RlimitNproc,
        "core" => PosixRlimitType::RlimitCore,
        "stack" => PosixRlimitType::RlimitStack,
        "fsize" => PosixRlimitType::RlimitFsize,
        "memlock" => PosixRlimitType::RlimitMemlock,
        "as" => PosixRlimitType::RlimitAs,
        "cpu" => PosixRlimitType::RlimitCpu,
        other => return Err(invalid("rlimit", value, format!("unknown limit {other:?}"))),
    };
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| invalid("rlimit", value, "limits are numbers"))
    };
    let (soft, hard) = match limits.split_once(':') {
        Some((s, h)) => (num(s)?, num(h)?),
        None => (num(limits)?, num(limits)?),
    };
    if soft > hard {
        return Err(invalid("rlimit", value, "soft limit above hard limit"));
    }
    PosixRlimitBuilder::default()
        .typ(typ)
        .soft(soft)
        .hard(hard)
        .build()
        .map_err(build_error("process.rlimits entry"))
}

/// Merges K=V lists: later entries win, order of first appearance kept.
fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut order = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    for kv in base.iter().chain(over) {
        let key = kv
            .split_once('=')
            .map_or(kv.as_str(), |(k, _)| k)
            .to_string();
        if !values.contains_key(&key) {
            order.push(key.clone());
        }
        values.insert(key, kv.clone());
    }
    order
        .into_iter()
        .filter_map(|k| values.remove(&k))
        .collect()
}

/// Builds the spec.
pub fn build(image: &ImageDefaults, opts: &RunOptions) -> Result<Spec> {
    let cmd = if opts.command.is_empty() {
        &image.cmd
    } else {
        &opts.command
    };
    let args: Vec<String> = image.entrypoint.iter().chain(cmd).cloned().collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let mut defaults =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    if opts.tty {
        defaults.push("TERM=xterm".into());
    }
    if !opts.hostname.is_empty() {
        defaults.push(format!("HOSTNAME={}", opts.hostname));
    }
    let env = merge_env(&merge_env(&defaults, &image.env), &opts.env);
    let user_text = opts.user.clone().unwrap_or_else(|| image.user.clone());
    let (uid, gid) = if user_text.is_empty() {
        (0, 0)
    } else {
        parse_user(&user_text)?
    };
    let cwd = opts
        .workdir
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| {
            if image.working_dir.is_empty() {
                "/".into()
            } else {
                image.working_dir.clone()
            }
        });
    if !cwd.starts_with('/') {
        return Err(invalid("workdir", &cwd, "must be an absolute path"));
    }
    let mut rlimits = vec![parse_rlimit("nofile=1024:1024")?];
    for r in &opts.rlimits {
        let limit = parse_rlimit(r)?;
        rlimits.retain(|l| l.typ() != limit.typ());
        rlimits.push(limit);
    }

    let mut spec = Spec::default();
    let default_process = spec.process().clone().unwrap_or_default();
    // Like containerd and Docker: no ambient capabilities, so a non-root
    // process ends up with none effective after exec.
    let mut caps = default_process.capabilities().clone().unwrap_or_default();
    caps.set_ambient(None);
    let process = ProcessBuilder::default()
        .terminal(opts.tty)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(build_error("process.user"))?,
        )
        .rlimits(rlimits)
        .no_new_privileges(true)
        .capabilities(caps)
        .build()
        .map_err(build_error("process"))?;
    spec.set_process(Some(process));
    if !opts.hostname.is_empty() {
        spec.set_hostname(Some(opts.hostname.clone()));
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(opts.read_only));
    spec.set_root(Some(root));
    let default_linux = spec.linux().clone().unwrap_or_default();
    let mut linux = LinuxBuilder::default()
        .namespaces(default_linux.namespaces().clone().unwrap_or_default())
        .masked_paths(default_linux.masked_paths().clone().unwrap_or_default())
        .readonly_paths(default_linux.readonly_paths().clone().unwrap_or_default())
        .build()
        .map_err(build_error("linux"))?;
    if let Some(limit) = opts.memory_limit {
        let memory = LinuxMemoryBuilder::default()
            .limit(limit)
            .swap(limit)
            .build()
            .map_err(build_error("linux.resources.memory"))?;
        let resources = LinuxResourcesBuilder::default()
            .memory(memory)
            .build()
            .map_err(build_error("linux.resources"))?;
        linux.set_resources(Some(resources));
    }
    linux.set_seccomp(opts.seccomp.clone());
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: "/work".into(),
            user: String::new(),
        }
    }

    #[test]
    fn command_replaces_cmd_and_keeps_entrypoint() {
        let mut img = image();
        img.entrypoint = vec!["/entry".into()];
        let spec = build(
            &img,
            &RunOptions {
                command: vec!["echo".into(), "hi".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/entry", "echo", "hi"]
        );
    }

    #[test]
    fn env_merges_with_user_winning() {
        let opts = RunOptions {
            env: vec!["A=user".into(), "B=2".into()],
            ..Default::default()
        };
        let spec = build(&image(), &opts).unwrap();
        let env = spec.process().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(env, ["PATH=/bin", "A=user", "B=2"]);
    }

    #[test]
    fn user_workdir_rlimits_and_memory() {
        let opts = RunOptions {
            user: Some("1000:1000".into()),
            workdir: Some("/tmp".into()),
            rlimits: vec!["nofile=64:128".into()],
            memory_limit: Some(64 << 20),
            read_only: true,
            hostname: "box".into(),
            ..Default::default()
        };
        let spec = build(&image(), &opts).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1000));
        assert_eq!(p.cwd().to_str(), Some("/tmp"));
        let nofile = p
            .rlimits()
            .as_ref()
            .unwrap()
            .iter()
            .find(|r| r.typ() == PosixRlimitType::RlimitNofile)
            .unwrap();
        assert_eq!((nofile.soft(), nofile.hard()), (64, 128));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        let mem = spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap()
            .memory()
            .as_ref()
            .unwrap();
        assert_eq!(mem.limit(), Some(64 << 20));
    }

    #[test]
    fn bad_values_are_named() {
        let e = build(
            &image(),
            &RunOptions {
                user: Some("alice".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("alice"), "{e}");
        let e = build(
            &image(),
            &RunOptions {
                rlimits: vec!["nofile=9:1".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("soft limit above hard"), "{e}");
        let e = build(
            &image(),
            &RunOptions {
                workdir: Some("rel".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let mut img = image();
        img.cmd.clear();
        assert!(matches!(
            build(&img, &RunOptions::default()),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn defaults_are_safe() {
        let spec = build(&image(), &RunOptions::default()).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.user().uid(), 0);
        assert_eq!(p.cwd().to_str(), Some("/work"));
        let linux = spec.linux().as_ref().unwrap();
        assert!(!linux.masked_paths().as_ref().unwrap().is_empty());
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps.bounding().as_ref().unwrap().len() < 20);
        assert!(caps.ambient().as_ref().is_none_or(|a| a.is_empty()));
    }
}
