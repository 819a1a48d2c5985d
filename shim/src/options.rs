//! The shim's runtime options and host configuration: containerd hands
//! `start` a `runtimeoptions.v1.Options` (`ctr run --runtime-config-path
//! FILE`, CRI's `ConfigPath`, Docker's `ConfigPath`) on stdin; its config
//! path names capsid's config file, else `$CAPSID_CONFIG`, else
//! `/etc/capsid/config.toml`.
//!
//! Up to containerd 2.2 stdin holds the options' `Any` itself. From 2.3 it
//! holds a `containerd.runtime.bootstrap.v1.BootstrapParams` (instance id,
//! namespace, addresses, and the options as one of its `extensions`), and
//! containerd then also takes a `BootstrapResult` as `start`'s answer. The
//! two are told apart by content: the params' first field is the task's id,
//! which no options type is named.

use std::path::{Path, PathBuf};

use capsid_sandbox::config::{Config, ConfigError};
use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{CodedInputStream, CodedOutputStream, Message};

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
    /// containerd's `BootstrapParams` do not decode.
    #[error("malformed BootstrapParams from containerd on stdin")]
    Bootstrap(#[source] containerd_shim_protos::protobuf::Error),
    /// The `BootstrapResult` cannot be encoded.
    #[error(
        "cannot encode the BootstrapResult for containerd: this is a shim bug, please report it"
    )]
    EncodeResult(#[source] containerd_shim_protos::protobuf::Error),
    /// The `BootstrapParams` are for another task.
    #[error("BootstrapParams are for task {id:?} in namespace {namespace:?}, not the -id and -namespace given")]
    BootstrapMismatch {
        /// Their instance id.
        id: String,
        /// Their namespace.
        namespace: String,
    },
}

/// Result of option handling.
pub type Result<T> = std::result::Result<T, OptionsError>;

/// What containerd gave `start` on stdin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartInput {
    /// capsid's config file, if the runtime options name one.
    pub config_path: Option<PathBuf>,
    /// containerd sent `BootstrapParams` (2.3 and later): it takes a
    /// `BootstrapResult` as the answer.
    pub bootstrap: bool,
}

/// Reads `start`'s stdin for task `id` in `namespace`: the options' `Any`
/// (containerd up to 2.2) or `BootstrapParams` (2.3 and later), whose
/// instance id and namespace must be the flags'.
pub fn read_start_input(input: &[u8], id: &str, namespace: &str) -> Result<StartInput> {
    if input.is_empty() {
        return Ok(StartInput::default());
    }
    let legacy = Any::parse_from_bytes(input);
    let is_options = |any: &Any| {
        (any.type_url.is_empty() && any.value.is_empty())
            || any.type_url.rsplit('/').next() == Some(RUNTIME_OPTIONS_TYPE)
    };
    if let Ok(any) = &legacy {
        if is_options(any) || any.type_url != id {
            return Ok(StartInput {
                config_path: config_path_from_any(any)?,
                bootstrap: false,
            });
        }
    }
    let params = match BootstrapParams::parse(input) {
        Ok(params) => params,
        // Neither: say what an old containerd's input failed on.
        Err(e) => return Err(legacy.err().map_or(e, OptionsError::NotAny)),
    };
    if params.instance_id != id || params.namespace != namespace {
        return Err(OptionsError::BootstrapMismatch {
            id: params.instance_id,
            namespace: params.namespace,
        });
    }
    let mut config_path = None;
    for any in &params.options {
        if let Some(path) = config_path_from_any(any)? {
            config_path = Some(path);
        }
    }
    Ok(StartInput {
        config_path,
        bootstrap: true,
    })
}

/// The fields of `BootstrapParams` the shim uses.
#[derive(Debug, Default)]
struct BootstrapParams {
    /// Field 1: the task's id.
    instance_id: String,
    /// Field 2: its namespace.
    namespace: String,
    /// Field 8 (`Extension.value`, field 1): the runtime options.
    options: Vec<Any>,
}

impl BootstrapParams {
    fn parse(bytes: &[u8]) -> Result<Self> {
        let mut input = CodedInputStream::from_bytes(bytes);
        let mut params = Self::default();
        while let Some(tag) = input
            .read_raw_tag_or_eof()
            .map_err(OptionsError::Bootstrap)?
        {
            let (field, wire) = (tag >> 3, tag & 7);
            let wire = WireType::new(wire).ok_or(OptionsError::WireType(wire))?;
            match (field, wire) {
                (1, WireType::LengthDelimited) => {
                    params.instance_id = input.read_string().map_err(OptionsError::Bootstrap)?;
                }
                (2, WireType::LengthDelimited) => {
                    params.namespace = input.read_string().map_err(OptionsError::Bootstrap)?;
                }
                (8, WireType::LengthDelimited) => {
                    let extension = input.read_bytes().map_err(OptionsError::Bootstrap)?;
                    let mut ext = CodedInputStream::from_bytes(&extension);
                    while let Some(tag) =
                        ext.read_raw_tag_or_eof().map_err(OptionsError::Bootstrap)?
                    {
                        let wire = WireType::new(tag & 7).ok_or(OptionsError::WireType(tag & 7))?;
                        if tag >> 3 == 1 && wire == WireType::LengthDelimited {
                            let any = ext.read_bytes().map_err(OptionsError::Bootstrap)?;
                            params.options.push(
                                Any::parse_from_bytes(&any).map_err(OptionsError::Bootstrap)?,
                            );
                        } else {
                            ext.skip_field(wire).map_err(OptionsError::Bootstrap)?;
                        }
                    }
                }
                (_, wire) => input.skip_field(wire).map_err(OptionsError::Bootstrap)?,
            }
        }
        Ok(params)
    }
}

/// `start`'s answer to containerd 2.3 and later: a
/// `containerd.runtime.bootstrap.v1.BootstrapResult` (version 2: the task
/// v2 API, over ttrpc, at `address`).
pub fn bootstrap_result(address: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut w = CodedOutputStream::vec(&mut out);
        w.write_int32(1, 2).map_err(OptionsError::EncodeResult)?;
        w.write_string(2, address)
            .map_err(OptionsError::EncodeResult)?;
        w.write_string(3, "ttrpc")
            .map_err(OptionsError::EncodeResult)?;
        w.flush().map_err(OptionsError::EncodeResult)?;
    }
    Ok(out)
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

    fn start_path(input: &[u8]) -> Result<Option<PathBuf>> {
        read_start_input(input, "t1", "default").map(|i| i.config_path)
    }

    #[test]
    fn config_path_is_read() {
        let input = options(RUNTIME_OPTIONS_TYPE, "/etc/capsid/other.toml");
        assert_eq!(
            start_path(&input).unwrap(),
            Some(PathBuf::from("/etc/capsid/other.toml"))
        );
        let input = options(&format!("types.example.com/{RUNTIME_OPTIONS_TYPE}"), "/x");
        assert_eq!(start_path(&input).unwrap(), Some(PathBuf::from("/x")));
    }

    #[test]
    fn nothing_means_no_path() {
        assert_eq!(start_path(b"").unwrap(), None);
        let input = options(RUNTIME_OPTIONS_TYPE, "");
        assert_eq!(start_path(&input).unwrap(), None);
    }

    #[test]
    fn other_types_are_refused() {
        let input = options("containerd.runc.v1.Options", "/x");
        let e = start_path(&input).unwrap_err();
        assert!(e.to_string().contains("containerd.runc.v1.Options"), "{e}");
        assert!(start_path(b"\xff\xff").is_err());
    }

    /// `BootstrapParams` bytes as containerd 2.3 writes them.
    fn bootstrap_params(id: &str, namespace: &str, options: Option<&[u8]>) -> Vec<u8> {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, id).unwrap();
            out.write_string(2, namespace).unwrap();
            // log_level = DEBUG (-4): a negative enum, a 10-byte varint.
            out.write_int32(3, -4).unwrap();
            out.write_string(4, "v2.3.0").unwrap();
            out.write_string(5, "/run/containerd/containerd.sock.ttrpc")
                .unwrap();
            out.write_string(6, "/run/containerd/containerd.sock")
                .unwrap();
            out.write_string(7, "/usr/bin/containerd").unwrap();
            if let Some(any) = options {
                let mut ext = Vec::new();
                {
                    let mut e = CodedOutputStream::vec(&mut ext);
                    e.write_bytes(1, any).unwrap();
                    e.flush().unwrap();
                }
                out.write_bytes(8, &ext).unwrap();
            }
            out.write_string(9, "/run/containerd/s").unwrap();
            out.flush().unwrap();
        }
        value
    }

    #[test]
    fn containerd_2_3_bootstrap_params_are_read() {
        let any = options(RUNTIME_OPTIONS_TYPE, "/etc/capsid/k8s.toml");
        let input = bootstrap_params("task-1", "k8s.io", Some(&any));
        let got = read_start_input(&input, "task-1", "k8s.io").unwrap();
        assert_eq!(
            got,
            StartInput {
                config_path: Some(PathBuf::from("/etc/capsid/k8s.toml")),
                bootstrap: true,
            }
        );
        let input = bootstrap_params("task-1", "k8s.io", None);
        let got = read_start_input(&input, "task-1", "k8s.io").unwrap();
        assert_eq!((got.config_path, got.bootstrap), (None, true));
        let e = read_start_input(&input, "task-1", "default").unwrap_err();
        assert!(e.to_string().contains("\"k8s.io\""), "{e}");
        // Older containerd: the options' Any, or nothing.
        let legacy = read_start_input(&any, "task-1", "k8s.io").unwrap();
        assert_eq!(
            (legacy.config_path.unwrap(), legacy.bootstrap),
            (PathBuf::from("/etc/capsid/k8s.toml"), false)
        );
        assert_eq!(
            read_start_input(b"", "t", "n").unwrap(),
            StartInput::default()
        );
    }

    #[test]
    fn the_bootstrap_result_decodes_as_containerd_reads_it() {
        let bytes = bootstrap_result("unix:///run/containerd/s/abc").unwrap();
        let mut input = CodedInputStream::from_bytes(&bytes);
        let mut fields = Vec::new();
        while let Some(tag) = input.read_raw_tag_or_eof().unwrap() {
            match tag >> 3 {
                1 => fields.push(input.read_int32().unwrap().to_string()),
                _ => fields.push(input.read_string().unwrap()),
            }
        }
        assert_eq!(fields, ["2", "unix:///run/containerd/s/abc", "ttrpc"]);
    }

    #[test]
    fn garbage_on_stdin_keeps_the_decoder_error() {
        let e = start_path(b"\xff\xff").unwrap_err();
        assert!(matches!(e, OptionsError::NotAny(_)), "{e}");
        let text = crate::describe(&e);
        let decoder = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            decoder.is_some_and(|d| text.ends_with(&format!(": {d}"))),
            "{text}"
        );
    }
}
