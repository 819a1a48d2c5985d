//! The shim's runtime options and host configuration: containerd hands
//! `start` a `runtimeoptions.v1.Options` (`ctr run --runtime-config-path
//! FILE`, CRI's `ConfigPath`) on stdin; its config path names capsid's
//! config file, else `$CAPSID_CONFIG`, else `/etc/capsid/config.toml`.

use std::path::{Path, PathBuf};

use capsid_sandbox::config::{Config, ConfigError};
use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{CodedInputStream, Message};

/// The message type containerd uses for a runtime's config path.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// Field number of `config_path` in `runtimeoptions.v1.Options`.
const CONFIG_PATH_FIELD: u32 = 2;

/// Errors reading the runtime options or the config.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// The bytes on stdin are not a protobuf `Any`.
    #[error(
        "the runtime options containerd gave on stdin are not a protobuf Any: \
         check the runtime's options in containerd's config"
    )]
    NotAny(#[source] containerd_shim_protos::protobuf::Error),
    /// The options are of a type the shim does not know.
    #[error("unsupported runtime options type {0:?} (expected {RUNTIME_OPTIONS_TYPE})")]
    UnknownType(String),
    /// The options message does not decode.
    #[error("malformed {RUNTIME_OPTIONS_TYPE} in the runtime options")]
    Malformed(#[source] containerd_shim_protos::protobuf::Error),
    /// The options message holds a field of an unknown wire type.
    #[error("malformed {RUNTIME_OPTIONS_TYPE} in the runtime options: wire type {0}")]
    WireType(u32),
    /// capsid's config file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Result of option handling.
pub type Result<T> = std::result::Result<T, OptionsError>;

/// The config path in the runtime options containerd gave `start` (raw
/// bytes of a protobuf `Any`); `None` when there are none or they name no
/// path.
pub fn config_path_from_start_input(input: &[u8]) -> Result<Option<PathBuf>> {
    if input.is_empty() {
        return Ok(None);
    }
    let any = Any::parse_from_bytes(input).map_err(OptionsError::NotAny)?;
    config_path_from_any(&any)
}

/// The config path in a runtime options `Any`.
pub fn config_path_from_any(any: &Any) -> Result<Option<PathBuf>> {
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS_TYPE {
        return Err(OptionsError::UnknownType(any.type_url.clone()));
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    while let Some(tag) = input
        .read_raw_tag_or_eof()
        .map_err(OptionsError::Malformed)?
    {
        let (field, wire) = (tag >> 3, tag & 7);
        let wire = WireType::new(wire).ok_or(OptionsError::WireType(wire))?;
        if field == CONFIG_PATH_FIELD && wire == WireType::LengthDelimited {
            path = Some(input.read_string().map_err(OptionsError::Malformed)?);
        } else {
            input.skip_field(wire).map_err(OptionsError::Malformed)?;
        }
    }
    Ok(path.filter(|p| !p.is_empty()).map(PathBuf::from))
}

/// Loads capsid's config: `path`, else `$CAPSID_CONFIG`, else the default
/// file (absent: defaults).
pub fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(Config::load(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedOutputStream;

    fn options(type_url: &str, path: &str) -> Vec<u8> {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, "io.containerd.capsid.v2").unwrap();
            out.write_string(CONFIG_PATH_FIELD, path).unwrap();
            out.flush().unwrap();
        }
        let any = Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        };
        any.write_to_bytes().unwrap()
    }

    #[test]
    fn config_path_is_read() {
        let input = options(RUNTIME_OPTIONS_TYPE, "/etc/capsid/other.toml");
        assert_eq!(
            config_path_from_start_input(&input).unwrap(),
            Some(PathBuf::from("/etc/capsid/other.toml"))
        );
        let input = options(&format!("types.example.com/{RUNTIME_OPTIONS_TYPE}"), "/x");
        assert_eq!(
            config_path_from_start_input(&input).unwrap(),
            Some(PathBuf::from("/x"))
        );
    }

    #[test]
    fn nothing_means_no_path() {
        assert_eq!(config_path_from_start_input(b"").unwrap(), None);
        let input = options(RUNTIME_OPTIONS_TYPE, "");
        assert_eq!(config_path_from_start_input(&input).unwrap(), None);
    }

    #[test]
    fn other_types_are_refused() {
        let input = options("containerd.runc.v1.Options", "/x");
        let e = config_path_from_start_input(&input).unwrap_err();
        assert!(e.to_string().contains("containerd.runc.v1.Options"), "{e}");
        assert!(config_path_from_start_input(b"\xff\xff").is_err());
    }

    #[test]
    fn garbage_on_stdin_keeps_the_decoder_error() {
        let e = config_path_from_start_input(b"\xff\xff").unwrap_err();
        assert!(matches!(e, OptionsError::NotAny(_)), "{e}");
        let text = crate::describe(&e);
        let decoder = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            decoder.is_some_and(|d| text.ends_with(&format!(": {d}"))),
            "{text}"
        );
    }
}
