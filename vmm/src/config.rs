//! The VM description capsid-vmm starts from: one JSON document, given whole
//! at start-up (no multi-call set-up on the start-up path). Data only; the
//! builder turns it into a VM. docs/vmm.md documents every field.

use std::path::{Path, PathBuf};

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
/// Serial output path meaning the VMM's standard output.
pub const SERIAL_STDOUT: &str = "-";

/// Errors in a VM description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read VM config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The document is not valid JSON for this schema.
    #[error("invalid VM config: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid VM config: {0}")]
    Invalid(String),
}

/// Result of config operations.
pub type Result<T> = std::result::Result<T, ConfigError>;

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
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// Block devices, in order (the guest sees vda, vdb, ...).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interfaces on existing taps.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// The vsock device, with its hybrid Unix-socket host side.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The memory balloon.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// An entropy device (virtio-rng) fed by the host's getrandom(2).
    #[serde(default)]
    pub rng: bool,
    /// Unix socket of the control API (line-delimited JSON).
    #[serde(default)]
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
        #[serde(default)]
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
    #[serde(default)]
    pub serial: Option<String>,
}

/// A virtio-net interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap interface in the VMM's network namespace.
    pub tap: String,
    /// The guest's MAC address.
    #[serde(default)]
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
    /// Reads and validates a JSON VM description.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates a JSON VM description.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid(format!(
                "vcpus = {} is not between 1 and {MAX_VCPUS}",
                self.vcpus
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return invalid(format!(
                "memory_mib = {} is not between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}",
                self.memory_mib
            ));
        }
        if let BootConfig::RealMode { load_addr, .. } = &self.boot {
            if *load_addr >= 0x1_0000 {
                return invalid(format!(
                    "real_mode.load_addr = {load_addr:#x} is not below 0x10000"
                ));
            }
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return invalid(format!(
                "{} virtio devices; at most {MAX_VIRTIO_DEVICES} fit",
                self.virtio_device_count()
            ));
        }
        for drive in &self.drives {
            if drive.serial.as_ref().is_some_and(|s| s.len() > 20) {
                return invalid(format!(
                    "drive {} has a serial longer than 20 bytes",
                    drive.path.display()
                ));
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return invalid(format!("vsock.guest_cid = {} is reserved", vsock.guest_cid));
            }
        }
        if let Some(balloon) = &self.balloon {
            if balloon.target_mib > self.memory_mib {
                return invalid(format!(
                    "balloon.target_mib = {} exceeds memory_mib = {}",
                    balloon.target_mib, self.memory_mib
                ));
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

    #[test]
    fn parses() {
        let c = VmConfig::from_json(GOOD).unwrap();
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
        let c = VmConfig::from_json(LINUX).unwrap();
        assert_eq!(c.virtio_device_count(), 5);
        assert!(matches!(&c.boot, BootConfig::Linux { cmdline, .. } if cmdline == "quiet"));
        assert_eq!(c.drives[0].serial.as_deref(), Some("root"));
        assert_eq!(c.balloon.unwrap().stats_polling_interval_s, 0);
        assert_eq!(c.control_socket, Some("/run/api.sock".into()));
    }

    #[test]
    fn rejects_out_of_range_values() {
        let e = VmConfig::from_json(&GOOD.replace("\"vcpus\":1", "\"vcpus\":0")).unwrap_err();
        assert!(e.to_string().contains("vcpus"), "{e}");
        let e = VmConfig::from_json(&GOOD.replace("\"vcpus\":1", "\"vcpus\":200")).unwrap_err();
        assert!(e.to_string().contains("vcpus"), "{e}");
        let e = VmConfig::from_json(&GOOD.replace("16,", "0,")).unwrap_err();
        assert!(e.to_string().contains("memory_mib"), "{e}");
        let e = VmConfig::from_json(&GOOD.replace("4096", "1048576")).unwrap_err();
        assert!(e.to_string().contains("load_addr"), "{e}");
        let e =
            VmConfig::from_json(&LINUX.replace("\"guest_cid\":3", "\"guest_cid\":2")).unwrap_err();
        assert!(e.to_string().contains("guest_cid"), "{e}");
        let e = VmConfig::from_json(&LINUX.replace("\"target_mib\":0", "\"target_mib\":512"))
            .unwrap_err();
        assert!(e.to_string().contains("target_mib"), "{e}");
        let e = VmConfig::from_json(&LINUX.replace("\"root\"", "\"a-serial-longer-than-20\""))
            .unwrap_err();
        assert!(e.to_string().contains("serial"), "{e}");
    }

    #[test]
    fn rejects_too_many_devices() {
        let drives = vec![r#"{"path":"/d"}"#; MAX_VIRTIO_DEVICES + 1].join(",");
        let json = GOOD.replace("\"serial\"", &format!("\"drives\":[{drives}],\"serial\""));
        let e = VmConfig::from_json(&json).unwrap_err();
        assert!(e.to_string().contains("virtio devices"), "{e}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let e = VmConfig::from_json(&GOOD.replace("\"vcpus\"", "\"cpus\"")).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
    }
}
