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
        Ok(())
    }

    /// How many virtio-mmio devices the VM gets.
    pub fn virtio_device_count(&self) -> usize {
        self.drives.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.rng)
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
        assert_eq!(c.virtio_device_count(), 5);
        assert!(matches!(&c.boot, BootConfig::Linux { cmdline, .. } if cmdline == "quiet"));
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
                "control_socket": "/run/t/vmm-api.sock",
            })
        );
        // Absent options are left out, and read back as absent.
        let bare = VmConfig {
            serial: None,
            vsock: None,
            balloon: None,
            control_socket: None,
            ..c
        };
        let v = serde_json::to_value(&bare).unwrap();
        for key in ["serial", "vsock", "balloon", "control_socket"] {
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
    fn rejects_unknown_fields() {
        let e =
            serde_json::from_str::<VmConfig>(&GOOD.replace("\"vcpus\"", "\"cpus\"")).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
    }
}
