//! The VM description capsid-vmm starts from: one JSON document, given whole
//! at start-up (no multi-call set-up on the start-up path). Data only.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Guest RAM below which nothing useful boots.
pub const MIN_MEMORY_MIB: u32 = 1;
/// Guest RAM capsid-vmm accepts at most (the guest's physical address space
/// it lays out).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// vCPUs per VM at most (the guest kernel's `CONFIG_NR_CPUS`).
pub const MAX_VCPUS: u8 = 32;

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
    /// Where the guest's serial console (COM1) goes; absent: discarded.
    #[serde(default)]
    pub serial: Option<PathBuf>,
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BootConfig {
    /// A flat binary loaded at `load_addr` and entered in 16-bit real mode
    /// at that address with CS = 0 (firmware-like tiny guests).
    RealMode {
        /// The binary.
        image: PathBuf,
        /// Guest physical load and entry address (below 1 MiB).
        load_addr: u32,
    },
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
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "vcpus = {} is not between 1 and {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Invalid(format!(
                "memory_mib = {} is not between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}",
                self.memory_mib
            )));
        }
        match &self.boot {
            BootConfig::RealMode { load_addr, .. } if *load_addr >= 0xA_0000 => {
                Err(ConfigError::Invalid(format!(
                    "real_mode.load_addr = {load_addr:#x} is not in conventional memory (below 0xa0000)"
                )))
            }
            BootConfig::RealMode { .. } => Ok(()),
        }
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
    }

    #[test]
    fn rejects_unknown_fields() {
        let e = VmConfig::from_json(&GOOD.replace("\"vcpus\"", "\"cpus\"")).unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
    }
}
