//! The state file's container: a fixed header that says what the file is,
//! which format and which capsid-vmm wrote it, how long it is and what its
//! SHA-256 is, then the capsid-vmm version string and the payload (the
//! machine state as JSON, `super::MachineState`).
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CAPSIDSN"
//!      8     4  format version, u32 little-endian (FORMAT_VERSION)
//!     12     4  length of the version string, u32 LE
//!     16     8  length of the payload, u64 LE
//!     24    32  SHA-256 of the version string followed by the payload
//!     56     …  the version string (UTF-8), then the payload
//! ```
//!
//! [`decode`] checks, in this order, and refuses with the first that
//! fails: the magic, the format version, the length (a file cut short or
//! with bytes after its end), the checksum (any flipped byte of the
//! version or payload), the capsid-vmm version. The state of a VM is
//! KVM's structures and capsid-vmm's device models of one release: a
//! snapshot is only restored by the capsid-vmm that wrote it.

use sha2::{Digest, Sha256};

/// What every state file starts with.
pub const MAGIC: [u8; 8] = *b"CAPSIDSN";
/// The container and payload layout this capsid-vmm writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the version string.
pub const HEADER_LEN: usize = 56;
/// The capsid-vmm that writes and reads snapshots.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Longest version string accepted (a corrupt length is not believed).
const MAX_VERSION_LEN: usize = 256;

const FORMAT_AT: usize = 8;
const VERSION_LEN_AT: usize = 12;
const PAYLOAD_LEN_AT: usize = 16;
const SHA_AT: usize = 24;

/// Why a file is not a state file this capsid-vmm restores.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The file does not start with [`MAGIC`].
    #[error("not a capsid-vmm snapshot state file (it does not start with \"CAPSIDSN\")")]
    Magic,
    /// Another container or payload layout.
    #[error(
        "snapshot format version {found}; this capsid-vmm reads format version {FORMAT_VERSION}"
    )]
    FormatVersion {
        /// In the file.
        found: u32,
    },
    /// Fewer bytes than the header says.
    #[error("truncated: {found} bytes, the snapshot is {expected} bytes long")]
    Truncated {
        /// In the file.
        found: u64,
        /// What the header says (or the header's own length).
        expected: u64,
    },
    /// More bytes than the header says.
    #[error("corrupt: {found} bytes, the header says {expected}")]
    Trailing {
        /// In the file.
        found: u64,
        /// What the header says.
        expected: u64,
    },
    /// The version string is implausibly long.
    #[error("corrupt: a version string of {0} bytes")]
    VersionLength(u64),
    /// The checksum does not match the content.
    #[error("corrupt: the SHA-256 checksum does not match the content")]
    Checksum,
    /// Written by another capsid-vmm.
    #[error("snapshot of capsid-vmm {found}; this is capsid-vmm {VMM_VERSION} and restores only its own snapshots")]
    Version {
        /// In the file.
        found: String,
    },
}

/// Wraps `payload` as a state file of this capsid-vmm.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    encode_as(VMM_VERSION, FORMAT_VERSION, payload)
}

/// [`encode`] as another capsid-vmm would (tests of the refusals).
pub fn encode_as(version: &str, format: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + version.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(version.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(version.as_bytes(), payload));
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn checksum(version: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut sha = Sha256::new();
    sha.update(version);
    sha.update(payload);
    sha.finalize().into()
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The payload of a state file written by this capsid-vmm, after every
/// check of the module's documentation.
pub fn decode(file: &[u8]) -> Result<&[u8], FormatError> {
    let found = file.len() as u64;
    let magic_len = file.len().min(MAGIC.len());
    if file[..magic_len] != MAGIC[..magic_len] || file.is_empty() {
        return Err(FormatError::Magic);
    }
    if file.len() < HEADER_LEN {
        // The format version is read when it is there: a short file of
        // another format is named as such.
        if file.len() >= FORMAT_AT + 4 && le_u32(file, FORMAT_AT) != FORMAT_VERSION {
            return Err(FormatError::FormatVersion {
                found: le_u32(file, FORMAT_AT),
            });
        }
        return Err(FormatError::Truncated {
            found,
            expected: HEADER_LEN as u64,
        });
    }
    let format = le_u32(file, FORMAT_AT);
    if format != FORMAT_VERSION {
        return Err(FormatError::FormatVersion { found: format });
    }
    let version_len = u64::from(le_u32(file, VERSION_LEN_AT));
    if version_len > MAX_VERSION_LEN as u64 {
        return Err(FormatError::VersionLength(version_len));
    }
    let payload_len = le_u64(file, PAYLOAD_LEN_AT);
    let expected = (HEADER_LEN as u64)
        .saturating_add(version_len)
        .saturating_add(payload_len);
    if found < expected {
        return Err(FormatError::Truncated { found, expected });
    }
    if found > expected {
        return Err(FormatError::Trailing { found, expected });
    }
    // Every length is now known to fit the file (`expected` == its length).
    let version_end = HEADER_LEN + usize::try_from(version_len).unwrap_or(0);
    let (version, payload) = (&file[HEADER_LEN..version_end], &file[version_end..]);
    if checksum(version, payload)[..] != file[SHA_AT..HEADER_LEN] {
        return Err(FormatError::Checksum);
    }
    if version != VMM_VERSION.as_bytes() {
        return Err(FormatError::Version {
            found: String::from_utf8_lossy(version).into_owned(),
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: &[u8] = br#"{"vcpus":[1,2,3]}"#;

    #[test]
    fn round_trips() {
        let file = encode(PAYLOAD);
        assert_eq!(&file[..8], b"CAPSIDSN");
        assert_eq!(file.len(), HEADER_LEN + VMM_VERSION.len() + PAYLOAD.len());
        assert_eq!(decode(&file), Ok(PAYLOAD));
        assert_eq!(decode(&encode(b"")), Ok(&b""[..]));
    }

    #[test]
    fn every_truncation_is_refused() {
        let file = encode(PAYLOAD);
        for len in 1..file.len() {
            let e = decode(&file[..len]).unwrap_err();
            assert!(
                matches!(e, FormatError::Truncated { found, .. } if found == len as u64),
                "{len}: {e}"
            );
        }
        assert_eq!(decode(&[]), Err(FormatError::Magic));
        let e = decode(&file[..60]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "truncated: 60 bytes, the snapshot is {} bytes long",
                file.len()
            )
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let file = encode(PAYLOAD);
        for at in 0..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            assert!(decode(&bad).is_err(), "flipped byte {at} accepted");
        }
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        assert_eq!(decode(&bad), Err(FormatError::Checksum));
        let mut long = file.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(FormatError::Trailing { .. })));
    }

    #[test]
    fn other_versions_and_formats_are_named() {
        let e = decode(&encode_as("0.0.1-other", FORMAT_VERSION, PAYLOAD)).unwrap_err();
        assert_eq!(
            e,
            FormatError::Version {
                found: "0.0.1-other".into()
            }
        );
        assert!(e.to_string().contains("capsid-vmm 0.0.1-other"), "{e}");
        let e = decode(&encode_as(VMM_VERSION, 7, PAYLOAD)).unwrap_err();
        assert_eq!(e, FormatError::FormatVersion { found: 7 });
        assert_eq!(
            e.to_string(),
            "snapshot format version 7; this capsid-vmm reads format version 1"
        );
        assert_eq!(decode(b"\x7fELF\x02\x01\x01"), Err(FormatError::Magic));
        assert_eq!(decode(b"{\"json\": 1}"), Err(FormatError::Magic));
    }
}
