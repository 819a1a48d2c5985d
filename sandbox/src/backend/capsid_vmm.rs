//! capsid-vmm as a capsid backend: one `capsid-vmm` process per VM, given
//! the whole VM as one JSON config (devices in-process: blk, net, vsock,
//! rng, balloon), stopped through its control socket (Ctrl-Alt-Del, then
//! the VMM's own deadline), then SIGTERM, then SIGKILL. A VM with a
//! virtio-fs share also gets a virtiofsd, started first (capsid-vmm
//! connects to it while building the VM) and reaped with the VM; if it
//! dies while the VM runs, the VM is ended as a failure ([`DeviceWatch`]).

use std::ffi::OsStr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsid_vmm_api::config::{
    BalloonConfig, BootConfig, DriveConfig, FsConfig, NetConfig, VmConfig, VsockConfig,
};
use capsid_vmm_api::control::Request;

use super::jail::{Jailer, Launch};
use super::process::{end_for_dead_device, last_words, status_code, DeviceWatch, Supervised};
use super::{Backend, BackendError, Result, Vm, VmExit, VmSpec};
use crate::config::BackendKind;
use crate::vmm_control;

/// How long capsid-vmm gets to build the VM and put up its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long virtiofsd gets to exit once the VMM (its only client) is gone.
const VIRTIOFSD_GRACE: Duration = Duration::from_secs(2);

/// capsid's own VMM.
#[derive(Debug, Clone)]
pub struct CapsidVmmBackend {
    vmm: PathBuf,
    jailer: Option<Jailer>,
}

impl CapsidVmmBackend {
    /// A backend running the capsid-vmm binary `vmm` (a bare name is looked
    /// up beside the running executable, then in PATH).
    pub fn new(vmm: &Path) -> Result<Self> {
        let vmm = crate::locate::binary(vmm)
            .ok_or_else(|| BackendError::BinaryNotFound(vmm.display().to_string()))?;
        Ok(Self { vmm, jailer: None })
    }

    /// Runs capsid-vmm in a jail (`None`: as root).
    pub fn with_jailer(mut self, jailer: Option<Jailer>) -> Self {
        self.jailer = jailer;
        self
    }

    /// The VM config capsid-vmm is given for `spec`.
    pub fn vm_config(spec: &VmSpec) -> Result<VmConfig> {
        let vcpus = u8::try_from(spec.vcpus)
            .map_err(|_| BackendError::InvalidSpec(format!("{} vCPUs", spec.vcpus)))?;
        Ok(VmConfig {
            vcpus,
            memory_mib: spec.memory_mib,
            boot: BootConfig::Linux {
                kernel: spec.kernel.clone(),
                initramfs: Some(spec.initramfs.clone()),
                cmdline: spec.kernel_args.join(" "),
            },
            serial: Some(spec.serial_log()),
            drives: spec
                .disks
                .iter()
                .map(|d| DriveConfig {
                    path: d.path.clone(),
                    read_only: d.readonly,
                    serial: Some(d.serial.clone()),
                })
                .collect(),
            net: spec
                .net
                .iter()
                .map(|n| NetConfig {
                    tap: n.tap.clone(),
                    mac: Some(n.mac.clone()),
                })
                .collect(),
            vsock: Some(VsockConfig {
                guest_cid: spec.guest_cid,
                uds_path: spec.vsock_path(),
            }),
            rng: true,
            // Memory the guest frees goes back to the host by itself, and an
            // inflated balloon gives way before the guest OOMs.
            balloon: Some(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                ..BalloonConfig::default()
            }),
            control_socket: Some(control_path(&spec.run_dir)),
            // virtiofsd (started first, by `start`) serves the share's
            // queues; the tag is the frontend's, in its config space.
            fs: spec.fs.as_ref().map(|fs| {
                FsConfig::new(super::virtiofsd::socket_path(&spec.run_dir), fs.tag.clone())
            }),
        })
    }
}

fn control_path(run_dir: &Path) -> PathBuf {
    run_dir.join("vmm-api.sock")
}

impl Backend for CapsidVmmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::CapsidVmm
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        spec.validate()?;
        let mut config = Self::vm_config(spec)?;
        let run_err = |source| BackendError::RunDir {
            path: spec.run_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spec.run_dir)
            .map_err(run_err)?;
        let mut vm = CapsidVm {
            vsock: spec.vsock_path(),
            serial: spec.serial_log(),
            run_dir: spec.run_dir.clone(),
            control: control_path(&spec.run_dir),
            memory_mib: spec.memory_mib,
            vmm: None,
            virtiofsd: None,
            device_watch: DeviceWatch::default(),
            exit: None,
            stopping: false,
            last_words: String::new(),
            jail: None,
        };
        // The VM holds the jail (its uid and cgroups) in its last field, so
        // they outlive the processes in them; an error from here on drops
        // `vm`, which also removes the run directory.
        vm.jail = self.jailer.as_ref().map(|j| j.for_vm(spec)).transpose()?;
        let jail = vm.jail.clone();
        let mut launch = Launch::new(jail.as_deref(), &self.vmm);
        // The tap lives in the sandbox's network namespace: so must the VMM.
        launch
            .netns(spec.net.as_ref().and_then(|n| n.netns.as_deref()))
            .read(&spec.kernel)
            .read(&spec.initramfs)
            .device(Path::new("/dev/kvm"));
        if let Some(net) = &spec.net {
            launch.tap(&net.tap);
        }
        // Jailed, each disk is a descriptor the jailer opened.
        for (drive, disk) in config.drives.iter_mut().zip(&spec.disks) {
            drive.path = launch.disk(&disk.path, !disk.readonly);
        }
        let document = serde_json::to_string(&config).map_err(BackendError::Encode)?;
        let config_path = spec.run_dir.join("vm.json");
        std::fs::write(&config_path, document).map_err(run_err)?;
        // virtiofsd first: capsid-vmm connects to its socket while building
        // the VM. It stays in this namespace (it makes its own sandbox);
        // only the VMM joins the tap's network namespace, and a Unix socket
        // path reaches across.
        if let Some(fs) = &spec.fs {
            let daemon = super::virtiofsd::start(fs, &spec.run_dir, jail.as_deref())?;
            vm.virtiofsd = Some(daemon.process);
        }
        if let Some(jail) = &jail {
            jail.hand_over(&config_path)?;
        }
        launch.args([OsStr::new("--config"), config_path.as_os_str()]);
        vm.vmm = Some(Supervised::spawn(
            "capsid-vmm",
            launch.command(),
            &spec.run_dir.join("vmm.log"),
        )?);
        drop(launch);
        // The control socket appears once the VM is built; a VMM that dies
        // first (bad kernel, missing disk) fails the start with its words,
        // and a virtiofsd that died with its own (the VMM cannot have its
        // share then).
        let deadline = Instant::now() + START_TIMEOUT;
        while !vm.control.exists() {
            if let Some(daemon) = vm.virtiofsd.as_mut() {
                if let Some(status) = daemon.try_wait()? {
                    return Err(BackendError::StartFailed {
                        what: "virtiofsd".into(),
                        detail: format!(
                            "exit status {}: {}",
                            status_code(status),
                            daemon.last_words()
                        ),
                    });
                }
            }
            let Some(vmm) = vm.vmm.as_mut() else {
                break;
            };
            if let Some(status) = vmm.try_wait()? {
                return Err(BackendError::StartFailed {
                    what: "capsid-vmm".into(),
                    detail: format!("exit status {}: {}", status_code(status), vmm.last_words()),
                });
            }
            if Instant::now() > deadline {
                return Err(BackendError::StartFailed {
                    what: "capsid-vmm".into(),
                    detail: "its control socket did not appear within 10 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Box::new(vm))
    }
}

/// A VM run by capsid-vmm.
#[derive(Debug)]
pub struct CapsidVm {
    vsock: PathBuf,
    serial: PathBuf,
    run_dir: PathBuf,
    control: PathBuf,
    memory_mib: u32,
    vmm: Option<Supervised>,
    /// The share's daemon, when the VM has one.
    virtiofsd: Option<Supervised>,
    device_watch: DeviceWatch,
    exit: Option<VmExit>,
    stopping: bool,
    /// What the failed processes and the console said, once ended.
    last_words: String,
    /// Last: released once every process above is reaped.
    jail: Option<std::sync::Arc<super::jail::SandboxJail>>,
}

impl CapsidVm {
    fn exit_from(&self, status: std::process::ExitStatus) -> VmExit {
        if self.stopping {
            VmExit::Stopped
        } else if status.success() {
            VmExit::GuestShutdown
        } else {
            VmExit::Failed(status_code(status))
        }
    }

    /// Reaps virtiofsd (it ends by itself once the VMM has hung up, else
    /// SIGTERM then SIGKILL) and removes the run directory.
    fn clean_up(&mut self) {
        if let Some(daemon) = self.virtiofsd.as_mut() {
            // A virtiofsd no VMM ever connected to has nobody to hang up.
            let hang_up_by = std::time::Instant::now()
                + self
                    .vmm
                    .as_ref()
                    .map_or(Duration::ZERO, |_| super::process::HANG_UP_GRACE);
            let _ = daemon.stop_after_hang_up(hang_up_by, VIRTIOFSD_GRACE);
        }
        self.last_words = last_words(self.vmm.iter_mut().chain(&mut self.virtiofsd), &self.serial);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        // Its uid and cgroups go once the processes in them are reaped.
        self.jail = None;
    }
}

impl Vm for CapsidVm {
    fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    fn serial_log(&self) -> &Path {
        &self.serial
    }

    fn pids(&self) -> Vec<u32> {
        // The VMM first, as the trait asks.
        self.vmm
            .iter()
            .chain(&self.virtiofsd)
            .map(Supervised::pid)
            .collect()
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        let Some(vmm) = self.vmm.as_mut() else {
            return Ok(None);
        };
        let exit = match vmm.try_wait()? {
            // A VMM that gave up on the share because virtiofsd died: the
            // dead daemon is the news.
            Some(status) if !status.success() => {
                match DeviceWatch::crashed(self.virtiofsd.as_mut_slice())? {
                    Some(dead) => {
                        end_for_dead_device(vmm, &self.virtiofsd.as_slice()[dead], &self.run_dir)?
                    }
                    None => self.exit_from(status),
                }
            }
            Some(status) => self.exit_from(status),
            // Without virtiofsd the guest's volume requests never complete:
            // the VM ends with it rather than hang its containers.
            None => match self.device_watch.failed(self.virtiofsd.as_mut_slice())? {
                Some(dead) => {
                    end_for_dead_device(vmm, &self.virtiofsd.as_slice()[dead], &self.run_dir)?
                }
                None => return Ok(None),
            },
        };
        self.exit = Some(exit);
        self.clean_up();
        Ok(Some(exit))
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit> {
        if let Some(exit) = self.try_wait()? {
            return Ok(exit);
        }
        self.stopping = true;
        // Ctrl-Alt-Del first; the VMM ends the VM itself when the guest
        // does not react within half the grace period.
        let half = grace / 2;
        let timeout_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let asked = vmm_control::exchange(
            &self.control,
            &Request::Shutdown {
                timeout_ms: Some(timeout_ms),
            },
        );
        let status = match self.vmm.as_mut() {
            Some(vmm) => {
                let waited = if asked.is_ok() {
                    vmm.wait_timeout(grace)?
                } else {
                    None
                };
                Some(match waited {
                    Some(status) => status,
                    None => vmm.terminate(half)?,
                })
            }
            None => None,
        };
        let exit = status.map_or(VmExit::Stopped, |s| self.exit_from(s));
        self.exit = Some(exit);
        self.clean_up();
        Ok(exit)
    }

    fn last_words(&self) -> String {
        self.last_words.clone()
    }

    fn balloon(&self) -> Option<crate::balloon::BalloonHandle> {
        Some(crate::balloon::BalloonHandle::new(
            crate::balloon::BalloonEndpoint::CapsidVmm {
                socket: self.control.clone(),
            },
            self.memory_mib,
        ))
    }
}

impl Drop for CapsidVm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            if let Some(vmm) = self.vmm.as_mut() {
                let _ = vmm.terminate(Duration::from_millis(500));
            }
            self.clean_up();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DiskSpec, NetSpec};

    #[test]
    fn config_carries_the_whole_spec() {
        let spec = VmSpec {
            name: "t".into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs".into(),
            kernel_args: vec!["quiet".into(), "capsid.x=1".into()],
            disks: vec![DiskSpec {
                path: "/d/root.img".into(),
                readonly: true,
                serial: "root".into(),
            }],
            net: Some(NetSpec {
                tap: "tap0".into(),
                mac: "52:54:00:00:00:01".into(),
                netns: None,
            }),
            fs: None,
            guest_cid: 7,
            run_dir: "/run/capsid/t".into(),
            cgroup: None,
        };
        let c = serde_json::to_value(CapsidVmmBackend::vm_config(&spec).unwrap()).unwrap();
        assert_eq!(c["vcpus"], 2);
        assert_eq!(c["boot"]["linux"]["cmdline"], "quiet capsid.x=1");
        assert_eq!(c["drives"][0]["read_only"], true);
        assert_eq!(c["drives"][0]["serial"], "root");
        assert_eq!(c["net"][0]["tap"], "tap0");
        assert_eq!(c["vsock"]["guest_cid"], 7);
        assert_eq!(c["vsock"]["uds_path"], "/run/capsid/t/vsock.sock");
        assert_eq!(c["serial"], "/run/capsid/t/console.log");
        assert_eq!(c["control_socket"], "/run/capsid/t/vmm-api.sock");
        assert_eq!(c["balloon"]["free_page_reporting"], true);
        // What capsid-vmm reads back is the spec, checked as it checks it.
        let read: VmConfig = serde_json::from_value(c).unwrap();
        read.validate().unwrap();
        assert_eq!(read.virtio_device_count(), 5);
        assert_eq!(
            read.balloon.map(|b| (b.target_mib, b.deflate_on_oom)),
            Some((0, true))
        );
        assert_eq!(
            read.boot,
            BootConfig::Linux {
                kernel: "/k/vmlinux".into(),
                initramfs: Some("/k/initramfs".into()),
                cmdline: "quiet capsid.x=1".into(),
            }
        );
        let too_many = VmSpec {
            vcpus: 256,
            ..spec.clone()
        };
        let e = CapsidVmmBackend::vm_config(&too_many).unwrap_err();
        assert!(matches!(e, BackendError::InvalidSpec(_)), "{e}");
        // No share: no virtio-fs device.
        let c = serde_json::to_value(CapsidVmmBackend::vm_config(&spec).unwrap()).unwrap();
        assert!(c.get("fs").is_none(), "{c}");
    }

    #[test]
    fn a_share_is_a_vhost_user_fs_device_on_virtiofsds_socket() {
        use crate::backend::{FsCache, FsSpec};
        let spec = VmSpec {
            name: "t".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs".into(),
            kernel_args: vec![],
            disks: vec![],
            net: None,
            fs: Some(FsSpec {
                daemon: "virtiofsd".into(),
                shared_dir: "/run/capsid/shares/t".into(),
                tag: "capsid-volumes".into(),
                cache: FsCache::Auto,
            }),
            guest_cid: 3,
            run_dir: "/run/capsid/t".into(),
            cgroup: None,
        };
        let c = CapsidVmmBackend::vm_config(&spec).unwrap();
        let fs = c.fs.clone().unwrap();
        assert_eq!(fs.tag, "capsid-volumes");
        // The socket virtiofsd::start puts up.
        assert_eq!(
            fs.socket,
            super::super::virtiofsd::socket_path(&spec.run_dir)
        );
        assert_eq!(fs.socket, Path::new("/run/capsid/t/virtiofsd.sock"));
        assert_eq!(fs.num_request_queues, 1);
        c.validate().unwrap();
        // vsock, rng, balloon and the share.
        assert_eq!(c.virtio_device_count(), 4);
    }

    #[test]
    fn missing_binary_is_named() {
        let e = CapsidVmmBackend::new(Path::new("/nonexistent/capsid-vmm")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/capsid-vmm"), "{e}");
    }
}
