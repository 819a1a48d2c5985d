//! QEMU microvm as a capsid backend: `-M microvm,acpi=off` with KVM or TCG,
//! memfd-shared guest RAM, and capsid's own virtio devices served over
//! vhost-user by one `capsid-vhost` process per device. The VM lives as
//! long as QEMU and every device process do: a device process that dies
//! under a running VM ends it as a failure ([`DeviceWatch`]).

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::jail::{Jailer, Launch, SandboxJail, LOG_FILE_LIMIT};
use super::process::{end_for_dead_device, last_words, status_code, DeviceWatch, Supervised};
use super::{Backend, BackendError, Result, Vm, VmExit, VmSpec};
use crate::config::BackendKind;

/// The kernel command line every capsid guest gets under QEMU microvm.
/// QEMU's microvm has no i8042: the guest ends the VM with a triple-fault
/// reboot (`reboot=t`), which `-no-reboot` turns into QEMU exiting.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";
/// TCG with a 16 MiB translation cache. QEMU's default (1 GiB, touched
/// as it fills) keeps about 51 MiB of translated code resident in every
/// idle sandbox after boot and container start; 16 MiB brings an idle
/// 256 MiB sandbox's host overhead from 74 to 36 MiB, for about 0.2–0.4 s
/// more start-up (the cache is flushed and refilled during boot).
/// docs/performance.md has the measurements.
const TCG_ACCEL: &str = "tcg,tb-size=16";
/// How long device backends get to put up their sockets.
const DEVICE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU microvm.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    kind: BackendKind,
    qemu: PathBuf,
    vhost: PathBuf,
    jailer: Option<Jailer>,
}

impl QemuBackend {
    /// A QEMU backend accelerated as `kind` says (qemu-kvm or qemu-tcg),
    /// running `qemu` and `vhost` (capsid-vhost).
    pub fn new(kind: BackendKind, qemu: &Path, vhost: &Path) -> Result<Self> {
        if kind == BackendKind::CapsidVmm {
            return Err(BackendError::InvalidSpec(
                "QEMU cannot be the capsid-vmm backend".into(),
            ));
        }
        let find = |p: &Path| {
            crate::locate::binary(p)
                .ok_or_else(|| BackendError::BinaryNotFound(p.display().to_string()))
        };
        Ok(Self {
            kind,
            qemu: find(qemu)?,
            vhost: find(vhost)?,
            jailer: None,
        })
    }

    /// Runs QEMU and its device processes in jails (`None`: as root).
    pub fn with_jailer(mut self, jailer: Option<Jailer>) -> Self {
        self.jailer = jailer;
        self
    }

    fn accel(&self) -> (&'static str, &'static str) {
        match self.kind {
            BackendKind::QemuKvm => ("kvm", "host"),
            _ => (TCG_ACCEL, "max"),
        }
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        spec.validate()?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spec.run_dir)
            .map_err(|source| BackendError::RunDir {
                path: spec.run_dir.clone(),
                source,
            })?;
        let mut vm = QemuVm {
            vsock: spec.vsock_path(),
            serial: spec.serial_log(),
            run_dir: spec.run_dir.clone(),
            memory_mib: spec.memory_mib,
            qemu: None,
            devices: Vec::new(),
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
        let device_args = self.start_devices(spec, &mut vm, jail.as_deref())?;
        let qemu = Supervised::spawn(
            "qemu",
            self.command(spec, jail.as_deref(), &device_args),
            &spec.run_dir.join("qemu.log"),
        )?;
        vm.qemu = Some(qemu);
        Ok(Box::new(vm))
    }
}

impl QemuBackend {
    /// Starts one capsid-vhost per device and returns QEMU's arguments for them.
    fn start_devices(
        &self,
        spec: &VmSpec,
        vm: &mut QemuVm,
        jail: Option<&SandboxJail>,
    ) -> Result<Vec<String>> {
        let run = &spec.run_dir;
        let mut qemu_args = Vec::new();
        let mut sockets = Vec::new();
        // virtio-fs first: virtiofsd's socket is made by root and handed
        // to the jail's uid before any process of that uid runs.
        let mut fs_device = None;
        if let Some(fs) = &spec.fs {
            let daemon = super::virtiofsd::start(fs, run, jail)?;
            fs_device = Some((daemon.socket.clone(), daemon.process));
        }
        let add = |vm: &mut QemuVm, id: &str, mut launch: Launch| -> Result<PathBuf> {
            let socket = run.join(format!("vhost-{id}.sock"));
            launch.args([OsStr::new("--socket"), socket.as_os_str()]);
            vm.devices.push(Supervised::spawn(
                &format!("capsid-vhost {id}"),
                launch.command(),
                &run.join(format!("vhost-{id}.log")),
            )?);
            Ok(socket)
        };
        let vhost = |_: &QemuVm, args: Vec<OsString>| -> Launch<'_> {
            let mut l = Launch::new(jail, &self.vhost);
            l.args(args);
            l
        };

        let mut l = vhost(
            vm,
            vec![
                "vsock".into(),
                "--guest-cid".into(),
                spec.guest_cid.to_string().into(),
                "--uds-path".into(),
                spec.vsock_path().into(),
            ],
        );
        l.max_file_size(LOG_FILE_LIMIT);
        let s = add(vm, "vsock", l)?;
        qemu_args.extend(chardev("vsock", &s));
        qemu_args.extend([
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
        ]);
        sockets.push(s);

        // The serial console goes through capsid-vhost's capped log, not
        // straight into a file: the guest decides how much it prints.
        let mut l = vhost(
            vm,
            vec!["console".into(), "--log".into(), spec.serial_log().into()],
        );
        l.max_file_size(LOG_FILE_LIMIT);
        let s = add(vm, "console", l)?;
        qemu_args.extend(chardev("console", &s));
        qemu_args.extend(["-serial".into(), "chardev:console".into()]);
        sockets.push(s);

        let mut l = vhost(vm, vec!["rng".into()]);
        l.max_file_size(LOG_FILE_LIMIT);
        let s = add(vm, "rng", l)?;
        qemu_args.extend(chardev("rng", &s));
        qemu_args.extend(["-device".into(), "vhost-user-rng,chardev=rng".into()]);
        sockets.push(s);

        for (i, disk) in spec.disks.iter().enumerate() {
            let id = format!("blk{i}");
            let mut l = vhost(vm, vec!["blk".into()]);
            // Jailed, the disk is a descriptor the jailer opened.
            let path = l.disk(&disk.path, !disk.readonly);
            l.args([OsStr::new("--path"), path.as_os_str()]);
            l.args(["--serial", &disk.serial]);
            if disk.readonly {
                l.args(["--readonly"]);
            }
            let s = add(vm, &id, l)?;
            qemu_args.extend(chardev(&id, &s));
            qemu_args.extend([
                "-device".into(),
                format!("vhost-user-blk,chardev={id},num-queues=1"),
            ]);
            sockets.push(s);
        }

        // virtio-fs: virtiofsd is not a capsid-vhost, and the tag is QEMU's.
        if let (Some(fs), Some((socket, process))) = (&spec.fs, fs_device) {
            qemu_args.extend(chardev("fs0", &socket));
            qemu_args.extend([
                "-device".into(),
                format!("vhost-user-fs-device,chardev=fs0,tag={}", fs.tag),
            ]);
            vm.devices.push(process);
            // Its socket is already there: the wait below skips it.
            sockets.push(socket);
        }

        if let Some(net) = &spec.net {
            let mut l = vhost(
                vm,
                vec![
                    "net".into(),
                    "--tap".into(),
                    net.tap.clone().into(),
                    "--mac".into(),
                    net.mac.clone().into(),
                ],
            );
            l.netns(net.netns.as_deref()).tap(&net.tap);
            l.max_file_size(LOG_FILE_LIMIT);
            let s = add(vm, "net0", l)?;
            qemu_args.extend(chardev("net0", &s));
            qemu_args.extend([
                "-netdev".into(),
                "vhost-user,id=net0,chardev=net0".into(),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
            sockets.push(s);
        }

        // The sockets appear once each backend listens; a backend that dies
        // first (bad disk, missing tap) fails the start with its own words.
        let deadline = Instant::now() + DEVICE_START_TIMEOUT;
        for (socket, index) in sockets.iter().zip(0..) {
            while !socket.exists() {
                let dev = &mut vm.devices[index];
                if let Some(status) = dev.try_wait()? {
                    return Err(BackendError::StartFailed {
                        what: dev.what().to_string(),
                        detail: format!(
                            "exit status {}: {}",
                            status_code(status),
                            dev.last_words()
                        ),
                    });
                }
                if Instant::now() > deadline {
                    return Err(BackendError::StartFailed {
                        what: dev.what().to_string(),
                        detail: "its socket did not appear within 10 s".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(qemu_args)
    }

    fn command(
        &self,
        spec: &VmSpec,
        jail: Option<&SandboxJail>,
        device_args: &[String],
    ) -> Command {
        let (accel, cpu) = self.accel();
        let mem = format!("{}M", spec.memory_mib);
        let mut cmdline = String::from(BASE_CMDLINE);
        for arg in &spec.kernel_args {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        let mut cmd = Launch::new(jail, &self.qemu);
        // With a NIC in a network namespace, QEMU lives there too: it is the
        // VM's main process, whose pid names the container's namespace.
        cmd.netns(spec.net.as_ref().and_then(|n| n.netns.as_deref()))
            .read(&spec.kernel)
            // No RLIMIT_FSIZE: it caps the guest RAM's memfd too.
            .read(&spec.initramfs);
        if self.kind == BackendKind::QemuKvm {
            cmd.device(Path::new("/dev/kvm"));
        }
        cmd.args(["-name", &format!("capsid-{}", spec.name)])
            .args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args(["-accel", accel, "-cpu", cpu])
            .args(["-smp", &spec.vcpus.to_string(), "-m", &mem])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args([
                "-qmp",
                &format!(
                    "unix:{},server=on,wait=off",
                    spec.run_dir.join("qmp.sock").display()
                ),
            ])
            .args([OsStr::new("-kernel"), spec.kernel.as_os_str()])
            .args([OsStr::new("-initrd"), spec.initramfs.as_os_str()])
            .args(["-append", &cmdline])
            .args(device_args)
            // Memory the guest frees goes back to the host by itself, and an
            // inflated balloon gives way before the guest OOMs.
            .args([
                "-device",
                // The id gives it the QOM path the balloon's QMP client uses.
                "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=on",
            ])
            // QEMU's own seccomp filter: no obsolete or privilege-raising
            // calls, no exec of helpers, no scheduler or memory policy
            // changes.
            .args([
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]);
        cmd.command()
    }
}

fn chardev(id: &str, socket: &Path) -> [String; 2] {
    [
        "-chardev".into(),
        format!("socket,id={id},path={}", socket.display()),
    ]
}

/// A VM run by QEMU.
#[derive(Debug)]
pub struct QemuVm {
    vsock: PathBuf,
    serial: PathBuf,
    run_dir: PathBuf,
    memory_mib: u32,
    qemu: Option<Supervised>,
    devices: Vec<Supervised>,
    device_watch: DeviceWatch,
    exit: Option<VmExit>,
    stopping: bool,
    /// What the failed processes and the console said, once ended.
    last_words: String,
    /// Last: released once every process above is reaped.
    jail: Option<Arc<SandboxJail>>,
}

impl QemuVm {
    /// Reaps the device backends (they exit once QEMU is gone) and removes
    /// the run directory.
    fn clean_up(&mut self) {
        // Backends with no QEMU ever connected have nobody to hang up.
        let hang_up_by = std::time::Instant::now()
            + self
                .qemu
                .as_ref()
                .map_or(Duration::ZERO, |_| super::process::HANG_UP_GRACE);
        for dev in &mut self.devices {
            let _ = dev.stop_after_hang_up(hang_up_by, Duration::from_secs(2));
        }
        self.last_words = last_words(self.qemu.iter_mut().chain(&mut self.devices), &self.serial);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        // Its uid and cgroups go once the processes in them are reaped.
        self.jail = None;
    }

    fn exit_from(&self, status: std::process::ExitStatus) -> VmExit {
        if self.stopping {
            VmExit::Stopped
        } else if status.success() {
            VmExit::GuestShutdown
        } else {
            VmExit::Failed(status_code(status))
        }
    }
}

impl Vm for QemuVm {
    fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    fn serial_log(&self) -> &Path {
        &self.serial
    }

    fn pids(&self) -> Vec<u32> {
        self.qemu
            .iter()
            .chain(&self.devices)
            .map(Supervised::pid)
            .collect()
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        let Some(qemu) = self.qemu.as_mut() else {
            return Ok(None);
        };
        let exit = match qemu.try_wait()? {
            // QEMU itself sometimes gives up on a device whose backend
            // died (vsock in use): the dead device is the news then.
            Some(status) if !status.success() => match DeviceWatch::crashed(&mut self.devices)? {
                Some(dead) => end_for_dead_device(qemu, &self.devices[dead], &self.run_dir)?,
                None => self.exit_from(status),
            },
            Some(status) => self.exit_from(status),
            // Mostly QEMU runs on when a vhost-user backend dies (it waits
            // for a reconnect), leaving the guest with a dead device: a hung
            // disk, a vsock whose connections are gone. The VM ends with it.
            None => match self.device_watch.failed(&mut self.devices)? {
                Some(dead) => end_for_dead_device(qemu, &self.devices[dead], &self.run_dir)?,
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
        let status = match self.qemu.as_mut() {
            Some(qemu) => Some(qemu.terminate(grace)?),
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
            crate::balloon::BalloonEndpoint::Qmp {
                socket: self.run_dir.join("qmp.sock"),
            },
            self.memory_mib,
        ))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            if let Some(qemu) = self.qemu.as_mut() {
                let _ = qemu.terminate(Duration::from_millis(500));
            }
            self.clean_up();
        }
    }
}
