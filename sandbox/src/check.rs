//! Host checks: what this host can do, and which VM backend capsid uses here.
//!
//! Probing is separate from deciding: [`HostReport::gather`] looks at the
//! host (ioctls on /dev/kvm, QEMU's own help output, device nodes), and
//! [`select_backend`] is a pure function of those facts, so the decision is
//! unit-tested without the hardware.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

use crate::config::{BackendKind, Config};
use crate::locate;

/// KVM capabilities capsid-vmm cannot run without.
const REQUIRED_KVM_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// What kind of KVM this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavor {
    /// Hardware-assisted (Intel VT-x or AMD-V): runs standard Linux guests.
    Hardware,
    /// PVM, KVM in software: runs only specially built guest kernels.
    Pvm,
    /// /dev/kvm answers but neither of the above is visible.
    Unknown,
}

/// /dev/kvm as seen from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmReport {
    /// /dev/kvm exists.
    pub present: bool,
    /// KVM_GET_API_VERSION, when /dev/kvm could be opened.
    pub api_version: Option<i32>,
    /// Capabilities capsid-vmm needs that this KVM lacks.
    pub missing_caps: Vec<String>,
    /// Which kind of KVM it is.
    pub flavor: KvmFlavor,
    /// `vmx` or `svm`, when the CPU flags show one.
    pub cpu_virt: Option<String>,
    /// Two-dimensional paging (EPT/NPT), where the module parameter shows it.
    pub tdp: Option<bool>,
    /// Why /dev/kvm could not be used, if it could not.
    pub error: Option<String>,
}

impl KvmReport {
    /// KVM that runs a standard Linux guest with everything capsid-vmm needs.
    pub fn runs_standard_guests(&self) -> bool {
        self.api_version.is_some() && self.flavor == KvmFlavor::Hardware
    }
}

/// The QEMU binary as seen from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuReport {
    /// Where it is.
    pub path: PathBuf,
    /// `QEMU emulator version X` as printed by `--version`.
    pub version: String,
    /// It has the `microvm` machine.
    pub microvm: bool,
    /// It has the vhost-user devices capsid uses (blk, vsock, rng, net).
    pub vhost_user: bool,
}

/// The guest kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssetsReport {
    /// Path and presence of the uncompressed kernel.
    pub kernel: Asset,
    /// Path and presence of the bzImage.
    pub bzimage: Asset,
    /// Path and presence of the initramfs.
    pub initramfs: Asset,
}

/// One file capsid needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Asset {
    /// Where it is expected.
    pub path: PathBuf,
    /// It is a readable regular file.
    pub present: bool,
}

impl Asset {
    fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            present: fs::File::open(path).is_ok_and(|f| f.metadata().is_ok_and(|m| m.is_file())),
        }
    }
}

/// The backend capsid will use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// The backend, or none when this host cannot run any.
    pub backend: Option<BackendKind>,
    /// One line saying why.
    pub reason: String,
    /// What the chosen backend means for isolation, when the user must be
    /// told: set for qemu-tcg ([`TCG_WARNING`]).
    pub isolation_warning: Option<String>,
}

/// What running guests under TCG means, said by `capsid check` and logged
/// once per process when a sandbox starts under TCG. QEMU's security policy
/// (its docs/system/security.rst) holds only the "virtualization use case",
/// guests run with hardware virtualization extensions, to security
/// requirements; of TCG it says that bugs affecting it "are not considered
/// security bugs at this time". capsid picks TCG on its own where KVM cannot
/// run standard guests (PVM, no KVM), so a user may not know.
pub const TCG_WARNING: &str = "QEMU with TCG (CPU emulation) is not a security boundary: \
     QEMU's security policy does not treat bugs a TCG guest can reach as security bugs; \
     run only guests you trust here, or use a host with hardware-assisted KVM";

/// [`TCG_WARNING`] for qemu-tcg, nothing for the KVM backends.
pub fn isolation_warning(backend: BackendKind) -> Option<&'static str> {
    match backend {
        BackendKind::QemuTcg => Some(TCG_WARNING),
        BackendKind::CapsidVmm | BackendKind::QemuKvm => None,
    }
}

/// Logs [`TCG_WARNING`] the first time this process starts a sandbox under
/// qemu-tcg, naming that sandbox; later sandboxes of the process start
/// without it. Once per process, not per sandbox: the backend is chosen
/// once per process (see `sandbox::backend_for`), so one line says all there
/// is to say; `capsid run` starts one sandbox and the shim one per pod, so
/// there it comes to once per sandbox anyway, while a bench or a test
/// starting hundreds is not flooded.
pub fn warn_once_if_tcg(backend: BackendKind, sandbox: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Some(warning) = isolation_warning(backend) {
        WARNED.call_once(|| {
            tracing::warn!(sandbox, backend = backend.as_str(), "{warning}");
        });
    }
}

/// The jail: on or off, where capsid-jail is, which uids sandboxes get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JailReport {
    /// `[jail] enabled`.
    pub enabled: bool,
    /// capsid-jail, when found.
    pub jailer: Option<PathBuf>,
    /// The first and last uid sandboxes run as.
    pub uids: (u32, u32),
    /// Users of the host whose uid falls in that range (a clash: such a
    /// user could signal or trace a sandbox's processes).
    pub clashing_users: Vec<String>,
}

impl JailReport {
    /// Looks at the config, the jailer binary and /etc/passwd.
    pub fn probe(config: &Config) -> Self {
        let first = config.jail.uid_base;
        let last = first.saturating_add(config.jail.uid_count.saturating_sub(1));
        let clashing_users = std::fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let uid: u32 = f.nth(1)?.parse().ok()?;
                (first..=last).contains(&uid).then(|| name.to_string())
            })
            .collect();
        Self {
            enabled: config.jail.enabled,
            jailer: locate::binary(&config.paths.jailer),
            uids: (first, last),
            clashing_users,
        }
    }

    /// One line for `capsid check`.
    pub fn summary(&self) -> String {
        if !self.enabled {
            return "off ([jail] enabled = false): VM processes run as root".into();
        }
        let Some(jailer) = &self.jailer else {
            return "capsid-jail not found: no VM can start (make install)".into();
        };
        let mut line = format!(
            "uids {}–{}, one per sandbox ({})",
            self.uids.0,
            self.uids.1,
            jailer.display()
        );
        if !self.clashing_users.is_empty() {
            line.push_str(&format!(
                "; WARNING: host users in that range: {}",
                self.clashing_users.join(", ")
            ));
        }
        line
    }
}

/// Everything `capsid check` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    /// /dev/kvm.
    pub kvm: KvmReport,
    /// /dev/net/tun can be opened (tap devices for networking).
    pub tun: bool,
    /// /dev/vhost-vsock exists.
    pub vhost_vsock: bool,
    /// /dev/vhost-net exists.
    pub vhost_net: bool,
    /// QEMU, when found.
    pub qemu: Option<QemuReport>,
    /// capsid-vmm, when found.
    pub capsid_vmm: Option<PathBuf>,
    /// capsid-vhost (vhost-user device backends for QEMU), when found.
    pub capsid_vhost: Option<PathBuf>,
    /// virtiofsd (volumes), when found: its path and `--version`.
    pub virtiofsd: Option<(PathBuf, String)>,
    /// How VM-side processes are confined (docs/security.md).
    pub jail: JailReport,
    /// `containerd --version`, when containerd is installed.
    pub containerd: Option<String>,
    /// Guest kernel and initramfs.
    pub assets: AssetsReport,
    /// The decision.
    pub selection: Selection,
    /// With `[memory] enabled`, whether a balloon coordinator
    /// (`capsid-balloond`) runs for the state directory; `None` when the
    /// memory policy is off.
    pub balloon_coordinator: Option<CoordinatorReport>,
    /// The pool of pre-booted sandboxes (docs/pool.md).
    pub pool: PoolReport,
}

/// The pool of pre-booted sandboxes: whether shims look for one, whether
/// `capsid-poold` keeps it filled, and what it says of each shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolReport {
    /// `[pool] enabled`: shims look for a pooled sandbox first.
    pub enabled: bool,
    /// `capsid-poold` answered on its status socket.
    pub daemon_running: bool,
    /// Each shape as the daemon reported it (empty when it did not).
    pub shapes: Vec<crate::pool_daemon::ShapeStatus>,
    /// Why the daemon could not be asked, when it could not.
    pub error: Option<String>,
}

/// How long `capsid check` waits for the pool daemon's answer.
const POOL_STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

impl PoolReport {
    /// Asks the daemon of `config`'s state directory.
    fn probe(config: &Config) -> Self {
        use crate::pool_daemon::{query, DaemonState};
        let enabled = config.pool.enabled;
        match query(config, POOL_STATUS_TIMEOUT) {
            Ok(DaemonState::Running(status)) => Self {
                enabled,
                daemon_running: true,
                shapes: status.shapes,
                error: None,
            },
            Ok(DaemonState::NotRunning) => Self {
                enabled,
                ..Self::default()
            },
            Err(e) => Self {
                enabled,
                error: Some(e.to_string()),
                ..Self::default()
            },
        }
    }
}

/// Whether the balloon coordinator runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoordinatorReport {
    /// A coordinator holds the state directory's role.
    pub running: bool,
    /// Why it could not be told, when it could not.
    pub error: Option<String>,
}

impl CoordinatorReport {
    /// Asks the registry of `config`'s state directory.
    fn probe(config: &Config) -> Option<Self> {
        if !config.memory.enabled {
            return None;
        }
        let registry = crate::balloon::registry::Registry::new(&config.paths.state_dir);
        Some(match registry.coordinator_running() {
            Ok(running) => Self {
                running,
                error: None,
            },
            Err(e) => Self {
                running: false,
                error: Some(e.to_string()),
            },
        })
    }
}

impl HostReport {
    /// Probes this host.
    pub fn gather(config: &Config) -> Self {
        let kvm = probe_kvm(Path::new("/dev/kvm"));
        let qemu = locate::binary(&config.paths.qemu).and_then(|p| probe_qemu(&p));
        let capsid_vmm = locate::binary(&config.paths.vmm);
        let capsid_vhost = locate::binary(&config.paths.vhost);
        let assets = AssetsReport {
            kernel: Asset::at(&config.paths.kernel),
            bzimage: Asset::at(&config.paths.bzimage),
            initramfs: Asset::at(&config.paths.initramfs),
        };
        let facts = BackendFacts {
            kvm: &kvm,
            qemu: qemu.as_ref(),
            capsid_vmm: capsid_vmm.is_some(),
            capsid_vhost: capsid_vhost.is_some(),
        };
        let mut selection = select_backend(&facts, config.backend.kind);
        if selection.backend.is_some() && !(assets.kernel.present && assets.initramfs.present) {
            let missing = [&assets.kernel, &assets.initramfs]
                .into_iter()
                .filter(|a| !a.present)
                .map(|a| a.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            selection = Selection {
                backend: None,
                reason: format!("guest assets missing: {missing} (run `make install`)"),
                isolation_warning: None,
            };
        }
        Self {
            kvm,
            tun: fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .is_ok(),
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
            vhost_net: Path::new("/dev/vhost-net").exists(),
            qemu,
            capsid_vmm,
            capsid_vhost,
            virtiofsd: locate::binary(&config.paths.virtiofsd).map(|p| {
                let version = command_first_line(&p, &["--version"]).unwrap_or_default();
                (p, version)
            }),
            containerd: command_first_line("containerd", &["--version"]),
            jail: JailReport::probe(config),
            assets,
            selection,
            balloon_coordinator: CoordinatorReport::probe(config),
            pool: PoolReport::probe(config),
        }
    }
}

/// The facts the backend decision rests on.
#[derive(Debug, Clone, Copy)]
pub struct BackendFacts<'a> {
    /// /dev/kvm.
    pub kvm: &'a KvmReport,
    /// QEMU, when found.
    pub qemu: Option<&'a QemuReport>,
    /// capsid-vmm is installed.
    pub capsid_vmm: bool,
    /// capsid-vhost is installed.
    pub capsid_vhost: bool,
}

/// Picks the backend: capsid-vmm on hardware KVM, else QEMU microvm with KVM,
/// else QEMU microvm with TCG; `forced` (from the config) is honoured or
/// refused with the reason. A qemu-tcg choice, automatic or forced, carries
/// [`TCG_WARNING`].
pub fn select_backend(facts: &BackendFacts<'_>, forced: Option<BackendKind>) -> Selection {
    let kvm = facts.kvm;
    let kvm_ok = kvm.runs_standard_guests();
    let kvm_why = || match (&kvm.error, kvm.flavor) {
        (Some(e), _) => format!("/dev/kvm unusable: {e}"),
        (None, KvmFlavor::Pvm) => "KVM is PVM, which cannot run standard guest kernels".into(),
        (None, KvmFlavor::Unknown) => "KVM shows no hardware virtualization (vmx/svm)".into(),
        (None, KvmFlavor::Hardware) => "KVM is hardware-assisted".into(),
    };
    let qemu_ok = facts.qemu.is_some_and(|q| q.microvm && q.vhost_user) && facts.capsid_vhost;
    let qemu_why = || match facts.qemu {
        None => "qemu-system-x86_64 not found".to_string(),
        Some(q) if !q.microvm => format!("{} has no microvm machine", q.path.display()),
        Some(q) if !q.vhost_user => format!("{} lacks vhost-user devices", q.path.display()),
        Some(_) => "capsid-vhost not found".to_string(),
    };
    let vmm_ok = kvm_ok && kvm.missing_caps.is_empty() && facts.capsid_vmm;
    let vmm_why = || {
        if !kvm_ok {
            kvm_why()
        } else if !kvm.missing_caps.is_empty() {
            format!("KVM lacks {}", kvm.missing_caps.join(", "))
        } else {
            "capsid-vmm not found".to_string()
        }
    };
    let pick = |backend, reason: String| Selection {
        backend: Some(backend),
        reason,
        isolation_warning: isolation_warning(backend).map(str::to_string),
    };
    let refuse = |reason: String| Selection {
        backend: None,
        reason,
        isolation_warning: None,
    };

    match forced {
        Some(BackendKind::CapsidVmm) if vmm_ok => {
            pick(BackendKind::CapsidVmm, "forced by config".into())
        }
        Some(BackendKind::CapsidVmm) => {
            refuse(format!("config forces capsid-vmm, but {}", vmm_why()))
        }
        Some(BackendKind::QemuKvm) if qemu_ok && kvm_ok => {
            pick(BackendKind::QemuKvm, "forced by config".into())
        }
        Some(BackendKind::QemuKvm) if !qemu_ok => {
            refuse(format!("config forces qemu-kvm, but {}", qemu_why()))
        }
        Some(BackendKind::QemuKvm) => refuse(format!("config forces qemu-kvm, but {}", kvm_why())),
        Some(BackendKind::QemuTcg) if qemu_ok => {
            pick(BackendKind::QemuTcg, "forced by config".into())
        }
        Some(BackendKind::QemuTcg) => refuse(format!("config forces qemu-tcg, but {}", qemu_why())),
        None if vmm_ok => pick(
            BackendKind::CapsidVmm,
            "hardware-assisted KVM with every capability capsid-vmm needs".into(),
        ),
        None if kvm_ok && qemu_ok => pick(
            BackendKind::QemuKvm,
            format!(
                "hardware-assisted KVM, but capsid-vmm unusable: {}",
                vmm_why()
            ),
        ),
        None if qemu_ok => pick(
            BackendKind::QemuTcg,
            format!(
                "{}; QEMU microvm with TCG works everywhere (slowly)",
                kvm_why()
            ),
        ),
        None => refuse(format!(
            "no usable backend: {}; and {}",
            vmm_why(),
            qemu_why()
        )),
    }
}

/// Probes `dev` (normally /dev/kvm) with ioctls, and the host for its flavour.
pub fn probe_kvm(dev: &Path) -> KvmReport {
    let cpu_virt = cpu_virt_flag(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    let flavor = if Path::new("/sys/module/kvm_pvm").exists() {
        KvmFlavor::Pvm
    } else if cpu_virt.is_some() {
        KvmFlavor::Hardware
    } else {
        KvmFlavor::Unknown
    };
    let tdp = [
        "/sys/module/kvm_intel/parameters/ept",
        "/sys/module/kvm_amd/parameters/npt",
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok())
    .map(|v| matches!(v.trim(), "Y" | "1"));
    let mut report = KvmReport {
        present: dev.exists(),
        api_version: None,
        missing_caps: Vec::new(),
        flavor,
        cpu_virt,
        tdp,
        error: None,
    };
    if !report.present {
        report.error = Some(format!("{} does not exist", dev.display()));
        return report;
    }
    let opened = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes())
        .map_err(|_| "path has a NUL byte".to_string())
        .and_then(|path| Kvm::new_with_path(&path).map_err(|e| e.to_string()));
    let kvm = match opened {
        Ok(kvm) => kvm,
        Err(e) => {
            report.error = Some(format!("cannot open {}: {e}", dev.display()));
            return report;
        }
    };
    report.api_version = Some(kvm.get_api_version());
    report.missing_caps = REQUIRED_KVM_CAPS
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(_, name)| (*name).to_string())
        .collect();
    report
}

fn cpu_virt_flag(cpuinfo: &str) -> Option<String> {
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    flags
        .split_whitespace()
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_string)
}

/// Asks QEMU what it is and what it has.
pub fn probe_qemu(path: &Path) -> Option<QemuReport> {
    let version = command_first_line(path, &["--version"])?;
    let machines = command_output(path, &["-machine", "help"]).unwrap_or_default();
    let devices = command_output(path, &["-device", "help"]).unwrap_or_default();
    let microvm = machines
        .lines()
        .any(|l| l.split_whitespace().next() == Some("microvm"));
    let vhost_user = [
        "vhost-user-blk",
        "vhost-user-vsock-device",
        "vhost-user-rng",
    ]
    .iter()
    .all(|d| devices.contains(&format!("\"{d}\"")));
    Some(QemuReport {
        path: path.to_path_buf(),
        version,
        microvm,
        vhost_user,
    })
}

fn command_output(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn command_first_line(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Option<String> {
    command_output(program, args)?
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(flavor: KvmFlavor) -> KvmReport {
        KvmReport {
            present: true,
            api_version: Some(12),
            missing_caps: vec![],
            flavor,
            cpu_virt: None,
            tdp: None,
            error: None,
        }
    }

    fn qemu(microvm: bool) -> QemuReport {
        QemuReport {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            version: "QEMU emulator version 7.2.0".into(),
            microvm,
            vhost_user: true,
        }
    }

    fn facts<'a>(kvm: &'a KvmReport, qemu: Option<&'a QemuReport>, vmm: bool) -> BackendFacts<'a> {
        BackendFacts {
            kvm,
            qemu,
            capsid_vmm: vmm,
            capsid_vhost: true,
        }
    }

    #[test]
    fn pvm_selects_tcg() {
        let k = kvm(KvmFlavor::Pvm);
        let q = qemu(true);
        let s = select_backend(&facts(&k, Some(&q), true), None);
        assert_eq!(s.backend, Some(BackendKind::QemuTcg));
        assert!(s.reason.contains("PVM"), "{}", s.reason);
        // Chosen automatically, so said plainly.
        assert_eq!(s.isolation_warning.as_deref(), Some(TCG_WARNING));
        assert!(TCG_WARNING.contains("not a security boundary"));
    }

    #[test]
    fn only_tcg_carries_the_isolation_warning() {
        let q = qemu(true);
        let hw = kvm(KvmFlavor::Hardware);
        for vmm in [true, false] {
            let s = select_backend(&facts(&hw, Some(&q), vmm), None);
            assert!(s.backend.is_some());
            assert_eq!(s.isolation_warning, None, "{:?}", s.backend);
        }
        // Forced TCG on a KVM host is warned about too.
        let s = select_backend(&facts(&hw, Some(&q), true), Some(BackendKind::QemuTcg));
        assert_eq!(s.backend, Some(BackendKind::QemuTcg));
        assert_eq!(s.isolation_warning.as_deref(), Some(TCG_WARNING));
        // Nothing selected, nothing to warn about.
        let pvm = kvm(KvmFlavor::Pvm);
        let s = select_backend(&facts(&pvm, None, false), None);
        assert_eq!((s.backend, s.isolation_warning), (None, None));
    }

    #[test]
    fn hardware_selects_capsid_vmm() {
        let k = kvm(KvmFlavor::Hardware);
        let q = qemu(true);
        let s = select_backend(&facts(&k, Some(&q), true), None);
        assert_eq!(s.backend, Some(BackendKind::CapsidVmm));
    }

    #[test]
    fn hardware_without_vmm_selects_qemu_kvm() {
        let k = kvm(KvmFlavor::Hardware);
        let q = qemu(true);
        let s = select_backend(&facts(&k, Some(&q), false), None);
        assert_eq!(s.backend, Some(BackendKind::QemuKvm));
        assert!(s.reason.contains("capsid-vmm not found"), "{}", s.reason);
    }

    #[test]
    fn missing_caps_rule_out_capsid_vmm() {
        let mut k = kvm(KvmFlavor::Hardware);
        k.missing_caps = vec!["KVM_CAP_IRQFD".into()];
        let q = qemu(true);
        let s = select_backend(&facts(&k, Some(&q), true), None);
        assert_eq!(s.backend, Some(BackendKind::QemuKvm));
        assert!(s.reason.contains("KVM_CAP_IRQFD"), "{}", s.reason);
    }

    #[test]
    fn nothing_usable_says_why() {
        let mut k = kvm(KvmFlavor::Unknown);
        k.api_version = None;
        k.error = Some("/dev/kvm does not exist".into());
        let s = select_backend(&facts(&k, None, false), None);
        assert_eq!(s.backend, None);
        assert!(s.reason.contains("/dev/kvm does not exist"), "{}", s.reason);
        assert!(
            s.reason.contains("qemu-system-x86_64 not found"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn qemu_without_microvm_is_not_usable() {
        let k = kvm(KvmFlavor::Pvm);
        let q = qemu(false);
        let s = select_backend(&facts(&k, Some(&q), false), None);
        assert_eq!(s.backend, None);
        assert!(s.reason.contains("no microvm machine"), "{}", s.reason);
    }

    #[test]
    fn forced_backend_is_refused_with_reason() {
        let k = kvm(KvmFlavor::Pvm);
        let q = qemu(true);
        let s = select_backend(&facts(&k, Some(&q), true), Some(BackendKind::CapsidVmm));
        assert_eq!(s.backend, None);
        assert!(
            s.reason.contains("config forces capsid-vmm"),
            "{}",
            s.reason
        );
        let s = select_backend(&facts(&k, Some(&q), true), Some(BackendKind::QemuKvm));
        assert_eq!(s.backend, None);
        let s = select_backend(&facts(&k, Some(&q), true), Some(BackendKind::QemuTcg));
        assert_eq!(s.backend, Some(BackendKind::QemuTcg));
    }

    #[test]
    fn cpu_flags_are_found() {
        let info = "processor: 0\nflags\t\t: fpu vme sse2 vmx ept\n";
        assert_eq!(cpu_virt_flag(info).as_deref(), Some("vmx"));
        assert_eq!(cpu_virt_flag("flags: fpu sse2\n"), None);
    }

    #[test]
    fn missing_device_is_reported() {
        let r = probe_kvm(Path::new("/nonexistent/kvm"));
        assert!(!r.present);
        assert!(r.error.unwrap().contains("does not exist"));
    }
}
