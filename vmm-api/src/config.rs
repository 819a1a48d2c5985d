//! The VM description capsid-vmm starts from: one JSON document, given whole
//! at start-up (no multi-call set-up on the start-up path). Data and its
//! checks only; capsid-vmm reads the file and its builder turns the
//! document into a VM. docs/vmm.md documents every field.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Guest RAM below which nothing useful boots.
pub const MIN_MEMORY_MIB: u32 = 1;
/// Guest RAM capsid-vmm accepts at most (the guest's physical address space
/// it lays out).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// vCPUs per VM at most (the guest kernel's `CONFIG_NR_CPUS`, and what the
/// MP table's one-byte APIC ids comfortably hold).
pub const MAX_VCPUS: u8 = 32;
/// virtio-mmio devices at most: one IOAPIC pin each, GSIs 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest drive serial (VIRTIO_BLK_ID_BYTES).
pub const MAX_DRIVE_SERIAL_LEN: usize = 20;
/// Real-mode images load and start below this address.
pub const REAL_MODE_LIMIT: u32 = 0x1_0000;
/// Serial output path meaning the VMM's standard output.
pub const SERIAL_STDOUT: &str = "-";
/// Longest virtio-fs tag (the `tag` field of its configuration space).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Most request queues a virtio-fs device gets (besides its hiprio queue).
pub const MAX_FS_REQUEST_QUEUES: u16 = 16;
/// Request queues of a virtio-fs device unless the config says otherwise.
pub const DEFAULT_FS_REQUEST_QUEUES: u16 = 1;
/// Size of each virtio-fs queue unless the config says otherwise.
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 128;

/// A value of a VM description that is out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidConfig {
    /// `vcpus` is 0 or above [`MAX_VCPUS`].
    Vcpus(u8),
    /// `memory_mib` is outside [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
    MemoryMib(u32),
    /// A real-mode `load_addr` is not below [`REAL_MODE_LIMIT`].
    LoadAddr(u32),
    /// More than [`MAX_VIRTIO_DEVICES`] virtio devices.
    TooManyDevices(usize),
    /// The drive with this path has a serial longer than
    /// [`MAX_DRIVE_SERIAL_LEN`] bytes.
    DriveSerial(PathBuf),
    /// `vsock.guest_cid` is one of the reserved CIDs (0 to 2).
    GuestCid(u32),
    /// The initial balloon is larger than the VM.
    BalloonTarget {
        /// `balloon.target_mib`.
        target_mib: u32,
        /// `memory_mib`.
        memory_mib: u32,
    },
    /// `fs.tag` is empty, longer than [`MAX_FS_TAG_LEN`] bytes, or holds a
    /// control character (NUL would cut it short in the guest).
    FsTag(String),
    /// `fs.num_request_queues` is 0 or above [`MAX_FS_REQUEST_QUEUES`].
    FsRequestQueues(u16),
    /// `fs.queue_size` is not a power of two.
    FsQueueSize(u16),
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vcpus(n) => write!(f, "vcpus = {n} is not between 1 and {MAX_VCPUS}"),
            Self::MemoryMib(n) => write!(
                f,
                "memory_mib = {n} is not between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
            ),
            Self::LoadAddr(a) => write!(
                f,
                "real_mode.load_addr = {a:#x} is not below {REAL_MODE_LIMIT:#x}"
            ),
            Self::TooManyDevices(n) => {
                write!(f, "{n} virtio devices; at most {MAX_VIRTIO_DEVICES} fit")
            }
            Self::DriveSerial(path) => write!(
                f,
                "drive {} has a serial longer than {MAX_DRIVE_SERIAL_LEN} bytes",
                path.display()
            ),
            Self::GuestCid(cid) => write!(f, "vsock.guest_cid = {cid} is reserved"),
            Self::BalloonTarget {
                target_mib,
                memory_mib,
            } => write!(
                f,
                "balloon.target_mib = {target_mib} exceeds memory_mib = {memory_mib}"
            ),
            Self::FsTag(tag) => write!(
                f,
                "fs.tag = {tag:?} is not 1 to {MAX_FS_TAG_LEN} bytes without control characters"
            ),
            Self::FsRequestQueues(n) => write!(
                f,
                "fs.num_request_queues = {n} is not between 1 and {MAX_FS_REQUEST_QUEUES}"
            ),
            Self::FsQueueSize(n) => {
                write!(f, "fs.queue_size = {n} is not a power of two")
            }
        }
    }
}

impl std::error::Error for InvalidConfig {}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// What the vCPUs start executing.
    pub boot: BootConfig,
    /// Where the guest's serial console (COM1) goes: a file (appended to),
    /// `-` for standard output; absent: discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<PathBuf>,
    /// Block devices, in order (the guest sees vda, vdb, ...).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interfaces on existing taps.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// The vsock device, with its hybrid Unix-socket host side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// The memory balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// An entropy device (virtio-rng) fed by the host's getrandom(2).
    #[serde(default)]
    pub rng: bool,
    /// A virtio-fs device whose queues a vhost-user backend (virtiofsd)
    /// serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsConfig>,
    /// Unix socket of the control API (line-delimited JSON, [`crate::control`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BootConfig {
    /// A Linux kernel: an ELF vmlinux (entered through PVH when it has the
    /// note, else through the 64-bit boot protocol) or a bzImage (64-bit
    /// boot protocol).
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// The initramfs, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        initramfs: Option<PathBuf>,
        /// Appended to capsid-vmm's own command line.
        #[serde(default)]
        cmdline: String,
    },
    /// A flat binary loaded at `load_addr` and entered in 16-bit real mode
    /// at that address with CS = 0 (firmware-like tiny guests).
    RealMode {
        /// The binary.
        image: PathBuf,
        /// Guest physical load and entry address (below 64 KiB).
        load_addr: u32,
    },
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// Id the guest reads (VIRTIO_BLK_T_GET_ID), at most 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// A virtio-net interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap interface in the VMM's network namespace.
    pub tap: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u32,
    /// Host Unix socket: clients connect and write `CONNECT <port>`; guest
    /// connections to port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// The memory balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Initial target in MiB (0: empty).
    #[serde(default)]
    pub target_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Ask the guest for statistics this often, in seconds (0: on request).
    #[serde(default)]
    pub stats_polling_interval_s: u32,
    /// Offer free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// A virtio-fs device: capsid-vmm is its vhost-user frontend (the
/// virtio-mmio registers, the configuration space, feature negotiation);
/// the backend behind `socket` (virtiofsd) serves its queues straight from
/// guest memory, which is then shared memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The backend's vhost-user socket (virtiofsd's `--socket-path`),
    /// connected to when the VM is built.
    pub socket: PathBuf,
    /// The name the guest mounts the share by (`mount -t virtiofs TAG`),
    /// 1 to 36 bytes.
    pub tag: String,
    /// Request queues besides the hiprio queue (1 to 16; the backend must
    /// serve that many).
    #[serde(default = "default_fs_request_queues")]
    pub num_request_queues: u16,
    /// Entries per queue at most (a power of two).
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
}

fn default_fs_request_queues() -> u16 {
    DEFAULT_FS_REQUEST_QUEUES
}

fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

impl FsConfig {
    /// A device on `socket` mounted by `tag`, with the default queues.
    pub fn new(socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        Self {
            socket: socket.into(),
            tag: tag.into(),
            num_request_queues: DEFAULT_FS_REQUEST_QUEUES,
            queue_size: DEFAULT_FS_QUEUE_SIZE,
        }
    }

    /// Checks the tag and the queues.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.tag.is_empty()
            || self.tag.len() > MAX_FS_TAG_LEN
            || self.tag.chars().any(char::is_control)
        {
            return Err(InvalidConfig::FsTag(self.tag.clone()));
        }
        if !(1..=MAX_FS_REQUEST_QUEUES).contains(&self.num_request_queues) {
            return Err(InvalidConfig::FsRequestQueues(self.num_request_queues));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(InvalidConfig::FsQueueSize(self.queue_size));
        }
        Ok(())
    }

    /// Queues of the device: hiprio, then the request queues.
    pub fn queue_count(&self) -> usize {
        1 + usize::from(self.num_request_queues)
    }
}

impl VmConfig {
    /// Checks every value against what capsid-vmm can build.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(InvalidConfig::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(InvalidConfig::MemoryMib(self.memory_mib));
        }
        if let BootConfig::RealMode { load_addr, .. } = &self.boot {
            if *load_addr >= REAL_MODE_LIMIT {
                return Err(InvalidConfig::LoadAddr(*load_addr));
            }
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return Err(InvalidConfig::TooManyDevices(self.virtio_device_count()));
        }
        for drive in &self.drives {
            if drive
                .serial
                .as_ref()
                .is_some_and(|s| s.len() > MAX_DRIVE_SERIAL_LEN)
            {
                return Err(InvalidConfig::DriveSerial(drive.path.clone()));
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return Err(InvalidConfig::GuestCid(vsock.guest_cid));
            }
        }
        if let Some(balloon) = &self.balloon {
            if balloon.target_mib > self.memory_mib {
                return Err(InvalidConfig::BalloonTarget {
                    target_mib: balloon.target_mib,
                    memory_mib: self.memory_mib,
                });
            }
        }
        if let Some(fs) = &self.fs {
            fs.validate()?;
        }
        Ok(())
    }

    /// How many virtio-mmio devices the VM gets.
    pub fn virtio_device_count(&self) -> usize {
        self.drives.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.rng)
            + usize::from(self.fs.is_some())
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GOOD: &str = r#"{"vcpus":1,"memory_mib":16,
        "boot":{"real_mode":{"image":"/tmp/g.bin","load_addr":4096}},
        "serial":"/tmp/serial.log"}"#;

    const LINUX: &str = r#"{"vcpus":2,"memory_mib":256,
        "boot":{"linux":{"kernel":"/k/vmlinux","initramfs":"/k/init.cpio.gz","cmdline":"quiet"}},
        "drives":[{"path":"/d/root.img","read_only":true,"serial":"root"}],
        "net":[{"tap":"tap0","mac":"52:54:00:12:34:56"}],
        "vsock":{"guest_cid":3,"uds_path":"/run/v.sock"},
        "balloon":{"target_mib":0,"deflate_on_oom":true,"free_page_reporting":true},
        "rng":true,
        "fs":{"socket":"/run/virtiofsd.sock","tag":"capsid"},
        "control_socket":"/run/api.sock"}"#;

    fn parse(text: &str) -> VmConfig {
        serde_json::from_str(text).unwrap()
    }

    fn invalid(text: &str) -> InvalidConfig {
        parse(text).validate().unwrap_err()
    }

    #[test]
    fn parses() {
        let c = parse(GOOD);
        c.validate().unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_bytes(), 16 << 20);
        assert_eq!(
            c.boot,
            BootConfig::RealMode {
                image: "/tmp/g.bin".into(),
                load_addr: 4096
            }
        );
        assert_eq!(c.virtio_device_count(), 0);
    }

    #[test]
    fn parses_a_full_linux_vm() {
        let c = parse(LINUX);
        c.validate().unwrap();
        assert_eq!(c.virtio_device_count(), 6);
        assert!(matches!(&c.boot, BootConfig::Linux { cmdline, .. } if cmdline == "quiet"));
        assert_eq!(
            c.fs,
            Some(FsConfig {
                socket: "/run/virtiofsd.sock".into(),
                tag: "capsid".into(),
                num_request_queues: 1,
                queue_size: 128,
            })
        );
        assert_eq!(c.fs.as_ref().map(FsConfig::queue_count), Some(2));
        assert_eq!(c.drives[0].serial.as_deref(), Some("root"));
        assert_eq!(c.balloon.unwrap().stats_polling_interval_s, 0);
        assert_eq!(c.control_socket, Some("/run/api.sock".into()));
    }

    #[test]
    fn a_document_round_trips() {
        let c = parse(LINUX);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(parse(&text), c);
        let c = parse(GOOD);
        assert_eq!(parse(&serde_json::to_string(&c).unwrap()), c);
    }

    #[test]
    fn a_typed_document_is_the_json_capsid_vmm_reads() {
        let c = VmConfig {
            vcpus: 2,
            memory_mib: 512,
            boot: BootConfig::Linux {
                kernel: "/k/vmlinux".into(),
                initramfs: Some("/k/initramfs".into()),
                cmdline: "quiet".into(),
            },
            serial: Some("/run/t/console.log".into()),
            drives: vec![DriveConfig {
                path: "/d/root.img".into(),
                read_only: true,
                serial: Some("root".into()),
            }],
            net: vec![NetConfig {
                tap: "tap0".into(),
                mac: Some("52:54:00:00:00:01".into()),
            }],
            vsock: Some(VsockConfig {
                guest_cid: 7,
                uds_path: "/run/t/vsock.sock".into(),
            }),
            balloon: Some(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                ..BalloonConfig::default()
            }),
            rng: true,
            fs: Some(FsConfig::new("/run/t/virtiofsd.sock", "capsid")),
            control_socket: Some("/run/t/vmm-api.sock".into()),
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({
                "vcpus": 2,
                "memory_mib": 512,
                "boot": {"linux": {
                    "kernel": "/k/vmlinux",
                    "initramfs": "/k/initramfs",
                    "cmdline": "quiet",
                }},
                "serial": "/run/t/console.log",
                "drives": [{"path": "/d/root.img", "read_only": true, "serial": "root"}],
                "net": [{"tap": "tap0", "mac": "52:54:00:00:00:01"}],
                "vsock": {"guest_cid": 7, "uds_path": "/run/t/vsock.sock"},
                "balloon": {
                    "target_mib": 0,
                    "deflate_on_oom": true,
                    "stats_polling_interval_s": 0,
                    "free_page_reporting": true,
                },
                "rng": true,
                "fs": {
                    "socket": "/run/t/virtiofsd.sock",
                    "tag": "capsid",
                    "num_request_queues": 1,
                    "queue_size": 128,
                },
                "control_socket": "/run/t/vmm-api.sock",
            })
        );
        // Absent options are left out, and read back as absent.
        let bare = VmConfig {
            serial: None,
            vsock: None,
            balloon: None,
            fs: None,
            control_socket: None,
            ..c
        };
        let v = serde_json::to_value(&bare).unwrap();
        for key in ["serial", "vsock", "balloon", "fs", "control_socket"] {
            assert!(v.get(key).is_none(), "{key} in {v}");
        }
        assert_eq!(serde_json::from_value::<VmConfig>(v).unwrap(), bare);
    }

    #[test]
    fn rejects_out_of_range_values() {
        let e = invalid(&GOOD.replace("\"vcpus\":1", "\"vcpus\":0"));
        assert_eq!(e, InvalidConfig::Vcpus(0));
        assert!(e.to_string().contains("vcpus"), "{e}");
        let e = invalid(&GOOD.replace("\"vcpus\":1", "\"vcpus\":200"));
        assert_eq!(e.to_string(), "vcpus = 200 is not between 1 and 32");
        let e = invalid(&GOOD.replace("16,", "0,"));
        assert!(e.to_string().contains("memory_mib"), "{e}");
        let e = invalid(&GOOD.replace("4096", "1048576"));
        assert_eq!(
            e.to_string(),
            "real_mode.load_addr = 0x100000 is not below 0x10000"
        );
        let e = invalid(&LINUX.replace("\"guest_cid\":3", "\"guest_cid\":2"));
        assert!(e.to_string().contains("guest_cid"), "{e}");
        let e = invalid(&LINUX.replace("\"target_mib\":0", "\"target_mib\":512"));
        assert!(e.to_string().contains("target_mib"), "{e}");
        let e = invalid(&LINUX.replace("\"root\"", "\"a-serial-longer-than-20\""));
        assert!(e.to_string().contains("serial"), "{e}");
    }

    #[test]
    fn rejects_too_many_devices() {
        let drives = vec![r#"{"path":"/d"}"#; MAX_VIRTIO_DEVICES + 1].join(",");
        let json = GOOD.replace("\"serial\"", &format!("\"drives\":[{drives}],\"serial\""));
        let e = invalid(&json);
        assert!(e.to_string().contains("virtio devices"), "{e}");
    }

    #[test]
    fn checks_the_fs_device() {
        let fs = |tag: &str, queues: u16, size: u16| {
            let mut c = parse(GOOD);
            c.fs = Some(FsConfig {
                num_request_queues: queues,
                queue_size: size,
                ..FsConfig::new("/run/v.sock", tag)
            });
            c.validate()
        };
        assert_eq!(fs("capsid", 1, 128), Ok(()));
        assert_eq!(fs(&"t".repeat(36), 16, 1024), Ok(()));
        assert_eq!(fs("", 1, 128), Err(InvalidConfig::FsTag(String::new())));
        let long = "t".repeat(37);
        assert_eq!(fs(&long, 1, 128), Err(InvalidConfig::FsTag(long.clone())));
        // 36 bytes, but fewer characters: bytes are what the config space holds.
        let wide = "é".repeat(19);
        assert_eq!(fs(&wide, 1, 128), Err(InvalidConfig::FsTag(wide.clone())));
        assert!(fs("a\0b", 1, 128).is_err());
        assert!(fs("a\nb", 1, 128).is_err());
        assert_eq!(fs("t", 0, 128), Err(InvalidConfig::FsRequestQueues(0)));
        assert_eq!(fs("t", 17, 128), Err(InvalidConfig::FsRequestQueues(17)));
        assert_eq!(fs("t", 1, 0), Err(InvalidConfig::FsQueueSize(0)));
        let e = fs("t", 1, 100).unwrap_err();
        assert_eq!(e.to_string(), "fs.queue_size = 100 is not a power of two");
        assert!(fs("t", 1, 32768).is_ok());
        // Defaults, and the count of devices.
        let c = parse(&GOOD.replace("\"serial\"", r#""fs":{"socket":"/s","tag":"t"},"serial""#));
        c.validate().unwrap();
        assert_eq!(c.fs, Some(FsConfig::new("/s", "t")));
        assert_eq!(c.virtio_device_count(), 1);
        let e = serde_json::from_str::<VmConfig>(&GOOD.replace(
            "\"serial\"",
            r#""fs":{"socket":"/s","tag":"t","cache":"auto"},"serial""#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("cache"), "{e}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let e =
            serde_json::from_str::<VmConfig>(&GOOD.replace("\"vcpus\"", "\"cpus\"")).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
    }
}
