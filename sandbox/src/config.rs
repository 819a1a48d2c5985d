//! capsid's host configuration, `/etc/capsid/config.toml`.
//!
//! Every key is optional; a missing file means all defaults. Paths default to
//! where `make install` puts things. docs/configuration.md lists every key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod memory;
mod network;
pub mod policy;
pub use memory::MemoryConfig;
pub use network::{check_ifname, parse_subnet, NetworkConfig};
pub use policy::PolicyConfig;

/// Where the configuration is read from unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/capsid/config.toml";
/// Environment variable naming another configuration file.
pub const CONFIG_ENV: &str = "CAPSID_CONFIG";
/// Where `make install` puts the guest kernel, initramfs and images.
pub const DEFAULT_SHARE_DIR: &str = "/usr/local/share/capsid";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config value {key}: {message}")]
    Value {
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Result of configuration operations.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// Which VM backend runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// capsid's own VMM on hardware-assisted KVM.
    CapsidVmm,
    /// QEMU microvm accelerated by KVM.
    QemuKvm,
    /// QEMU microvm with TCG software emulation (works everywhere, slowly).
    QemuTcg,
}

impl BackendKind {
    /// The name used in config files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CapsidVmm => "capsid-vmm",
            Self::QemuKvm => "qemu-kvm",
            Self::QemuTcg => "qemu-tcg",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "capsid-vmm" => Ok(Self::CapsidVmm),
            "qemu-kvm" => Ok(Self::QemuKvm),
            "qemu-tcg" => Ok(Self::QemuTcg),
            other => Err(format!(
                "unknown backend {other:?} (expected capsid-vmm, qemu-kvm or qemu-tcg)"
            )),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where binaries and assets are.
    pub paths: PathsConfig,
    /// Which backend to use.
    pub backend: BackendConfig,
    /// Default VM size.
    pub vm: VmConfig,
    /// The rootfs disk cache.
    pub cache: CacheConfig,
    /// The network `capsid run --network bridge` joins.
    pub network: NetworkConfig,
    /// Over-assignment and the balloon policy.
    pub memory: MemoryConfig,
    /// Host directories shared with guests (virtio-fs).
    pub volumes: VolumesConfig,
    /// How VM-side processes are confined.
    pub jail: JailConfig,
    /// How a Kubernetes pod's VM grows.
    pub pod: PodConfig,
    /// Pre-booted sandboxes ([`crate::pool`]).
    pub pool: PoolConfig,
}

/// `[pool]`: sandboxes booted ahead of time by `capsid-poold`, one set per
/// VM shape, each taken once by a container of that shape
/// (docs/pool.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Whether the shim looks for a pooled sandbox before booting one.
    pub enabled: bool,
    /// The shapes kept booted and how many of each.
    pub shapes: Vec<PoolShapeConfig>,
}

/// One shape of `[[pool.shapes]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolShapeConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM a waiting sandbox has, MiB.
    pub memory_mib: u32,
    /// How many are kept booted.
    pub size: u32,
    /// The VM's RAM, MiB: a waiting sandbox's balloon holds all but
    /// `memory_mib` of it, and a container of up to this much takes the
    /// sandbox, the balloon giving it its size. 0: `memory_mib`.
    #[serde(default)]
    pub max_memory_mib: u32,
}

impl PoolShapeConfig {
    /// The VM's RAM: `max_memory_mib`, or `memory_mib` without one.
    pub fn vm_memory_mib(&self) -> u32 {
        self.max_memory_mib.max(self.memory_mib)
    }
}

impl PoolConfig {
    /// Each shape must be a VM the policy allows, and a pool must not be
    /// larger than [`MAX_POOL_SIZE`]; whether the host can hold it is the
    /// over-assignment limit's to say, when `capsid-poold` starts.
    fn check(&self, vm: &VmConfig) -> std::result::Result<(), String> {
        for (i, shape) in self.shapes.iter().enumerate() {
            let name = format!(
                "shape {} ({} vCPUs, {} MiB)",
                i + 1,
                shape.vcpus,
                shape.memory_mib
            );
            if shape.memory_mib < MIN_MEMORY_MIB {
                return Err(format!(
                    "{name}: {} MiB is below the {MIN_MEMORY_MIB} MiB a guest needs",
                    shape.memory_mib
                ));
            }
            if shape.vcpus == 0 || shape.vcpus > MAX_VCPUS {
                return Err(format!(
                    "{name}: {} vCPUs is not between 1 and {MAX_VCPUS}",
                    shape.vcpus
                ));
            }
            if let Err((key, message)) = vm.policy.check(shape.vcpus, shape.memory_mib) {
                return Err(format!("{name}: {message} ({key})"));
            }
            if shape.max_memory_mib != 0 && shape.max_memory_mib < shape.memory_mib {
                return Err(format!(
                    "{name}: max_memory_mib = {} is below memory_mib",
                    shape.max_memory_mib
                ));
            }
            if shape.vm_memory_mib() > vm.policy.max_memory_mib {
                return Err(format!(
                    "{name}: {} MiB is above vm.policy.max_memory_mib = {}",
                    shape.vm_memory_mib(),
                    vm.policy.max_memory_mib
                ));
            }
            if shape.size > MAX_POOL_SIZE {
                return Err(format!(
                    "{name}: size {} is above {MAX_POOL_SIZE}",
                    shape.size
                ));
            }
            if self.shapes[..i]
                .iter()
                .any(|s| s.vcpus == shape.vcpus && s.memory_mib == shape.memory_mib)
            {
                return Err(format!("{name} is given twice"));
            }
        }
        Ok(())
    }
}

/// Most sandboxes of one shape a pool keeps booted.
pub const MAX_POOL_SIZE: u32 = 64;

/// `[pod]`: a Kubernetes pod's VM boots with `max_memory_mib` of RAM, all
/// but the pod's size held in its balloon, and grows (the balloon
/// deflates) as containers are added, up to this maximum
/// (docs/kubernetes.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodConfig {
    /// Most guest RAM a pod's VM may grow to, MiB; a pod whose own size
    /// is larger is refused. 0: a pod's VM keeps the size it boots with.
    pub max_memory_mib: u32,
}

/// Default `[pod] max_memory_mib`: the guest kernel keeps 64 bytes of page
/// descriptors per 4 KiB page of the maximum (1/64), so a larger default
/// would cost every pod memory it may never use.
/// Measured under QEMU-TCG: an idle pod booted at 2048 MiB used about
/// 56 MiB more host memory than one booted at its size
/// (docs/kubernetes.md).
pub const DEFAULT_POD_MAX_MEMORY_MIB: u32 = 1024;

impl Default for PodConfig {
    fn default() -> Self {
        Self {
            max_memory_mib: DEFAULT_POD_MAX_MEMORY_MIB,
        }
    }
}

impl PodConfig {
    /// Checks the maximum against the `[vm]` default (the size of a pod
    /// that gives none) and the policy's largest VM.
    fn check(&self, vm: &VmConfig) -> std::result::Result<(), String> {
        let max = self.max_memory_mib;
        if max == 0 {
            return Ok(());
        }
        if max < vm.memory_mib {
            return Err(format!(
                "{max} MiB is below vm.memory_mib = {}: a pod without resources would be refused",
                vm.memory_mib
            ));
        }
        if max > vm.policy.max_memory_mib {
            return Err(format!(
                "{max} MiB is above vm.policy.max_memory_mib = {}",
                vm.policy.max_memory_mib
            ));
        }
        Ok(())
    }
}

/// `[jail]`: every VM-side process (QEMU, capsid-vmm, capsid-vhost) runs
/// through capsid-jail as a uid of its sandbox's own (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// Off only to debug a VMM by hand: the processes then run as root.
    pub enabled: bool,
    /// The first uid (and gid) sandboxes run as; no user of the host may
    /// own one in the range.
    pub uid_base: u32,
    /// How many: the most sandboxes that can run at once.
    pub uid_count: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid_base: 2_000_000_000,
            uid_count: 65_536,
        }
    }
}

/// `[volumes]`: how host directories reach the guest (docs/volumes.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumesConfig {
    /// virtiofsd's cache mode: `auto` (default), `never` or `always`.
    pub cache: crate::backend::FsCache,
}

/// `[paths]`: binaries, guest assets and state directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PathsConfig {
    /// Uncompressed guest kernel (ELF with a PVH note).
    pub kernel: PathBuf,
    /// Compressed guest kernel, for VMMs that boot bzImage.
    pub bzimage: PathBuf,
    /// Guest initramfs whose `/init` is capsid-agent.
    pub initramfs: PathBuf,
    /// Bundled OCI images (`<name>.tar` archives or layout directories).
    pub images_dir: PathBuf,
    /// Cached read-only rootfs disk images.
    pub cache_dir: PathBuf,
    /// Per-sandbox runtime state: sockets, logs.
    pub state_dir: PathBuf,
    /// The QEMU binary (a name is looked up in PATH).
    pub qemu: PathBuf,
    /// The capsid-vmm binary.
    pub vmm: PathBuf,
    /// The capsid-vhost binary.
    pub vhost: PathBuf,
    /// virtiofsd, the virtio-fs daemon serving volumes (`make deps`
    /// installs it beside capsid).
    pub virtiofsd: PathBuf,
    /// capsid-jail, which starts VM-side processes confined.
    pub jailer: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        let share = Path::new(DEFAULT_SHARE_DIR);
        Self {
            kernel: share.join("vmlinux"),
            bzimage: share.join("bzImage"),
            initramfs: share.join("initramfs.cpio.gz"),
            images_dir: share.join("images"),
            cache_dir: PathBuf::from("/var/lib/capsid/cache"),
            state_dir: PathBuf::from("/run/capsid"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            vmm: PathBuf::from("capsid-vmm"),
            vhost: PathBuf::from("capsid-vhost"),
            virtiofsd: PathBuf::from("virtiofsd"),
            jailer: PathBuf::from("capsid-jail"),
        }
    }
}

/// `[backend]`: automatic choice, or a forced one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// `"auto"` (absent) lets `capsid check` decide; otherwise that backend
    /// is used, and an error says why if this host cannot run it.
    #[serde(with = "backend_choice")]
    pub kind: Option<BackendKind>,
}

/// `[vm]`: the size of a sandbox when nothing else says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs per sandbox.
    pub vcpus: u32,
    /// Guest RAM per sandbox, in MiB.
    pub memory_mib: u32,
    /// `[vm.policy]`: what a spec may ask of its VM (annotations, largest
    /// size). Here rather than top-level so that sizing, which is given
    /// the `[vm]` defaults, always has the bounds with them.
    pub policy: PolicyConfig,
    /// A VM that may grow (a pod's, a pool shape's with `max_memory_mib`)
    /// boots with `mem=` what it uses, rounded up to a 128 MiB block, and
    /// its agent adds blocks as it grows, instead of booting with all its
    /// RAM and the balloon holding the rest: the guest kernel then keeps
    /// page descriptors only for what it uses (crate::hotplug). Needs a
    /// guest kernel with memory hotplug (capsid's has it); false boots
    /// such VMs with all their RAM.
    pub memory_hotplug: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory_mib: 256,
            policy: PolicyConfig::default(),
            memory_hotplug: true,
        }
    }
}

/// `[cache]`: how much disk the cached rootfs images may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Most MiB the cached rootfs disks may take; past it the least
    /// recently used disks that no sandbox uses are removed. 0: no limit.
    pub max_size_mib: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size_mib: 10 * 1024,
        }
    }
}

/// Smallest guest RAM the guest kernel and agent boot in.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most vCPUs the guest kernel is built for (`CONFIG_NR_CPUS`).
pub const MAX_VCPUS: u32 = 32;

impl Config {
    /// Reads the configuration from `path`, or from `$CAPSID_CONFIG`, or from
    /// the default path; a default path that does not exist gives defaults.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        match path.map(Path::to_path_buf).or(env) {
            Some(explicit) => Self::read(&explicit),
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.exists() {
                    Self::read(default)
                } else {
                    Ok(Self::default())
                }
            }
        }
    }

    /// Reads and validates one file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.vm.vcpus == 0 || self.vm.vcpus > MAX_VCPUS {
            return Err(ConfigError::Value {
                key: "vm.vcpus",
                message: format!("{} is not between 1 and {MAX_VCPUS}", self.vm.vcpus),
            });
        }
        if self.vm.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::Value {
                key: "vm.memory_mib",
                message: format!(
                    "{} MiB is below the {MIN_MEMORY_MIB} MiB a guest needs",
                    self.vm.memory_mib
                ),
            });
        }
        if let Err((key, message)) = self.vm.policy.check(self.vm.vcpus, self.vm.memory_mib) {
            return Err(ConfigError::Value { key, message });
        }
        if let Err(message) = self.pod.check(&self.vm) {
            return Err(ConfigError::Value {
                key: "pod.max_memory_mib",
                message,
            });
        }
        if let Err(message) = self.pool.check(&self.vm) {
            return Err(ConfigError::Value {
                key: "pool.shapes",
                message,
            });
        }
        if let Err(message) = parse_subnet(&self.network.subnet) {
            return Err(ConfigError::Value {
                key: "network.subnet",
                message,
            });
        }
        if let Err(message) = check_ifname(&self.network.bridge) {
            return Err(ConfigError::Value {
                key: "network.bridge",
                message,
            });
        }
        if let Err((key, message)) = self.jail.check() {
            return Err(ConfigError::Value { key, message });
        }
        Ok(())
    }
}

impl JailConfig {
    /// The uid range must hold at least one uid, none of them root and none
    /// past the largest valid uid (`u32::MAX` is "no uid").
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.uid_base == 0 {
            return Err((
                "jail.uid_base",
                "0 is root: pick a range no user owns".into(),
            ));
        }
        if self.uid_count == 0 {
            return Err(("jail.uid_count", "must be at least 1".into()));
        }
        if self
            .uid_base
            .checked_add(self.uid_count)
            .is_none_or(|end| end > u32::MAX - 1)
        {
            return Err((
                "jail.uid_count",
                format!(
                    "{} uids from {} run past the largest uid ({})",
                    self.uid_count,
                    self.uid_base,
                    u32::MAX - 2
                ),
            ));
        }
        Ok(())
    }
}

mod backend_choice {
    //! `kind = "auto" | "capsid-vmm" | "qemu-kvm" | "qemu-tcg"`.

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use super::BackendKind;

    pub fn serialize<S: Serializer>(v: &Option<BackendKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.map_or("auto", BackendKind::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BackendKind>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "auto" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error with its sources, as the CLI and the shim print it.
    pub(super) fn message(e: &ConfigError) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn pool_shapes_are_checked() {
        let c = Config::parse(
            "[pool]\nenabled = true\n[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 2\n",
        )
        .unwrap();
        assert!(c.pool.enabled);
        assert_eq!(c.pool.shapes[0].size, 2);
        let zero = "[[pool.shapes]]\nvcpus = 1\nmemory_mib = 0\nsize = 1\n";
        let e = message(&Config::parse(&format!("[pool]\n{zero}")).unwrap_err());
        assert!(
            e.contains("pool.shapes") && e.contains("0 MiB is below"),
            "{e}"
        );
        let e = message(
            &Config::parse("[[pool.shapes]]\nvcpus = 0\nmemory_mib = 256\nsize = 1\n").unwrap_err(),
        );
        assert!(e.contains("0 vCPUs"), "{e}");
        let e = message(
            &Config::parse("[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 1000\n")
                .unwrap_err(),
        );
        assert!(e.contains("size 1000"), "{e}");
        let e = message(
            &Config::parse(
                "[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 1\nmax_memory_mib = 128\n",
            )
            .unwrap_err(),
        );
        assert!(e.contains("max_memory_mib = 128 is below"), "{e}");
        let e = message(
            &Config::parse(
                "[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 1\nmax_memory_mib = 100000\n",
            )
            .unwrap_err(),
        );
        assert!(e.contains("above vm.policy.max_memory_mib"), "{e}");
        let twice = "[[pool.shapes]]\nvcpus = 1\nmemory_mib = 256\nsize = 1\n";
        let e = message(&Config::parse(&format!("{twice}{twice}")).unwrap_err());
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn jail_ranges_are_checked() {
        let c = Config::parse("[jail]\nuid_base = 100000\nuid_count = 10\n").unwrap();
        assert!(c.jail.enabled);
        assert_eq!((c.jail.uid_base, c.jail.uid_count), (100_000, 10));
        let e = message(&Config::parse("[jail]\nuid_base = 0\n").unwrap_err());
        assert!(e.contains("jail.uid_base") && e.contains("root"), "{e}");
        let e = message(&Config::parse("[jail]\nuid_count = 0\n").unwrap_err());
        assert!(e.contains("jail.uid_count"), "{e}");
        let e = message(&Config::parse("[jail]\nuid_base = 4294967000\n").unwrap_err());
        assert!(e.contains("largest uid"), "{e}");
        let e = message(&Config::parse("[jail]\nuid = 1\n").unwrap_err());
        assert!(e.contains("uid"), "{e}");
        let off = Config::parse("[jail]\nenabled = false\n").unwrap();
        assert!(!off.jail.enabled);
    }

    #[test]
    fn keys_are_read() {
        let c = Config::parse(
            r#"
            [paths]
            kernel = "/k/vmlinux"
            [backend]
            kind = "qemu-tcg"
            [vm]
            vcpus = 2
            memory_mib = 512
            [cache]
            max_size_mib = 100
            "#,
        )
        .unwrap();
        assert_eq!(c.paths.kernel, PathBuf::from("/k/vmlinux"));
        assert_eq!(c.paths.initramfs, PathsConfig::default().initramfs);
        assert_eq!(c.backend.kind, Some(BackendKind::QemuTcg));
        assert_eq!(c.cache.max_size_mib, 100);
        assert_eq!(
            c.vm,
            VmConfig {
                vcpus: 2,
                memory_mib: 512,
                ..VmConfig::default()
            }
        );
    }

    #[test]
    fn the_pod_maximum_is_bounded() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.pod.max_memory_mib, DEFAULT_POD_MAX_MEMORY_MIB);
        assert_eq!(
            Config::parse("[pod]\nmax_memory_mib = 0\n")
                .unwrap()
                .pod
                .max_memory_mib,
            0
        );
        let e = message(&Config::parse("[pod]\nmax_memory_mib = 128\n").unwrap_err());
        assert!(
            e.contains("pod.max_memory_mib") && e.contains("below vm.memory_mib = 256"),
            "{e}"
        );
        let e = message(&Config::parse("[pod]\nmax_memory_mib = 9000\n").unwrap_err());
        assert!(
            e.contains("pod.max_memory_mib") && e.contains("vm.policy.max_memory_mib = 8192"),
            "{e}"
        );
        let c = Config::parse("[pod]\nmax_memory_mib = 8192\n").unwrap();
        assert_eq!(c.pod.max_memory_mib, 8192);
    }

    #[test]
    fn auto_backend_is_none() {
        let c = Config::parse("[backend]\nkind = \"auto\"\n").unwrap();
        assert_eq!(c.backend.kind, None);
    }

    #[test]
    fn unknown_backend_is_named() {
        let e = Config::parse("[backend]\nkind = \"firecracker\"\n").unwrap_err();
        assert!(message(&e).contains("firecracker"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = Config::parse("[vm]\nmemory = 5\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(message(&e).contains("memory"), "{e}");
    }

    #[test]
    fn tiny_memory_is_rejected() {
        let e = Config::parse("[vm]\nmemory_mib = 8\n").unwrap_err();
        assert!(e.to_string().contains("vm.memory_mib"), "{e}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/capsid.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }

    #[test]
    fn a_parse_error_names_the_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[vm]\nvcpus = 1\nmemory = 5\n").unwrap();
        let e = Config::read(&path).unwrap_err();
        let text = message(&e);
        assert!(
            text.starts_with(&format!("invalid config file {}: ", path.display())),
            "{text}"
        );
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("unknown field `memory`"), "{text}");
    }

    #[test]
    fn network_section_is_read_and_checked() {
        let c = Config::parse(
            "[network]\nsubnet = \"10.9.0.0/16\"\nbridge = \"br9\"\nplugin_dirs = [\"/x\"]\n",
        )
        .unwrap();
        assert_eq!(c.network.subnet, "10.9.0.0/16");
        assert_eq!(c.network.bridge, "br9");
        assert_eq!(c.network.plugin_dirs, [PathBuf::from("/x")]);
        let e = Config::parse("[network]\nsubnet = \"10.9.0.0\"\n").unwrap_err();
        assert!(e.to_string().contains("network.subnet"), "{e}");
        let e = Config::parse("[network]\nbridge = \"a-very-long-bridge\"\n").unwrap_err();
        assert!(e.to_string().contains("network.bridge"), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let mut c = Config::default();
        c.backend.kind = Some(BackendKind::CapsidVmm);
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
    }
}
