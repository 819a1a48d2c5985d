//! The VM description capsid-vmm starts from: one JSON document, given whole
//! at start-up (no multi-call set-up on the start-up path). The document's
//! types and checks are capsid-vmm's wire, shared with its clients
//! (`capsid_vmm_api::config`, re-exported here); this module reads and
//! checks a file. The builder turns the result into a VM. docs/vmm.md
//! documents every field.

use std::path::{Path, PathBuf};

pub use capsid_vmm_api::config::*;

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
    #[error("invalid VM config")]
    Parse(#[source] serde_json::Error),
    /// A value is out of range.
    #[error("invalid VM config")]
    Invalid(#[from] InvalidConfig),
}

/// Result of config operations.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// Reads and validates a JSON VM description.
pub fn from_file(path: &Path) -> Result<VmConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_json(&text)
}

/// Parses and validates a JSON VM description.
pub fn from_json(text: &str) -> Result<VmConfig> {
    let config: VmConfig = serde_json::from_str(text).map_err(ConfigError::Parse)?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"vcpus":1,"memory_mib":16,
        "boot":{"real_mode":{"image":"/tmp/g.bin","load_addr":4096}},
        "serial":"/tmp/serial.log"}"#;

    /// The message capsid-vmm prints: the error and its sources.
    fn message(e: &ConfigError) -> String {
        capsid_devices::describe(e)
    }

    #[test]
    fn parses() {
        let c = from_json(GOOD).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_bytes(), 16 << 20);
        assert_eq!(c.virtio_device_count(), 0);
    }

    #[test]
    fn rejects_out_of_range_values() {
        let e = from_json(&GOOD.replace("\"vcpus\":1", "\"vcpus\":0")).unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid(InvalidConfig::Vcpus(0))),
            "{e}"
        );
        assert_eq!(
            message(&e),
            "invalid VM config: vcpus = 0 is not between 1 and 32"
        );
        let e = from_json(&GOOD.replace("4096", "1048576")).unwrap_err();
        assert!(message(&e).contains("load_addr"), "{e}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let e = from_json(&GOOD.replace("\"vcpus\"", "\"cpus\"")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse(_)), "{e}");
        assert!(
            message(&e).starts_with("invalid VM config: unknown field `cpus`"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/vm.json"), "{e}");
    }
}
