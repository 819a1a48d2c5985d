//! sha256 content digests (OCI image spec, "Digests"): parsing them from
//! descriptors and verifying blobs against them while they stream.

use std::fmt;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// A sha256 digest, the only algorithm capsid accepts for image content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Parses `sha256:<64 lowercase hex digits>`; anything else is `None`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("sha256:")?;
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Self(bytes))
    }

    /// The digest of `data`.
    pub(crate) fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// The 64 hex digits, without the algorithm prefix.
    pub(crate) fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// How a verified stream differs from what it should be.
#[derive(Debug)]
pub(crate) enum Mismatch {
    /// The stream is not as long as its descriptor says.
    Size {
        /// Bytes read (capped at one past the expected size).
        actual: u64,
    },
    /// The bytes hash to another digest.
    Digest,
    /// Reading the rest of the stream failed.
    Io(io::Error),
}

/// A reader that hashes and counts what passes through it. It never reads
/// more than one byte past the expected size, so an oversized blob costs
/// nothing extra to reject.
#[derive(Debug)]
pub(crate) struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    digest: Sha256Digest,
    size: Option<u64>,
}

impl<R: Read> VerifyingReader<R> {
    /// Verifies `inner` against `digest` and, if given, `size`.
    pub(crate) fn new(inner: R, digest: Sha256Digest, size: Option<u64>) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
            digest,
            size,
        }
    }

    /// Reads what is left of the stream and checks size and digest.
    pub(crate) fn finish(&mut self) -> std::result::Result<(), Mismatch> {
        if let Err(e) = io::copy(self, &mut io::sink()) {
            if !self.oversized() {
                return Err(Mismatch::Io(e));
            }
        }
        if self.oversized() || self.size.is_some_and(|size| size != self.read) {
            return Err(Mismatch::Size { actual: self.read });
        }
        let actual = Sha256Digest(self.hasher.finalize_reset().into());
        if actual != self.digest {
            return Err(Mismatch::Digest);
        }
        Ok(())
    }

    /// The wrapped reader, unverified.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    fn oversized(&self) -> bool {
        self.size.is_some_and(|size| self.read > size)
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = match self.size {
            Some(size) => {
                if self.read > size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "blob is longer than its descriptor says",
                    ));
                }
                // One byte past the end is enough to notice an oversized blob.
                let left = size - self.read + 1;
                usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()))
            }
            None => buf.len(),
        };
        let n = self.inner.read(&mut buf[..room])?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn parses_and_prints() {
        let d = Sha256Digest::parse(HELLO).unwrap();
        assert_eq!(d.to_string(), HELLO);
        assert_eq!(d, Sha256Digest::of(b"hello"));
        assert!(Sha256Digest::parse("sha512:00").is_none());
        assert!(Sha256Digest::parse(&HELLO.to_uppercase()).is_none());
        assert!(Sha256Digest::parse(&HELLO[..70]).is_none());
        assert!(Sha256Digest::parse("sha256:../../../../etc/passwd").is_none());
    }

    #[test]
    fn verifies_while_reading() {
        let d = Sha256Digest::of(b"hello");
        let mut r = VerifyingReader::new(&b"hello"[..], d, Some(5));
        let mut first = [0u8; 2];
        r.read_exact(&mut first).unwrap();
        assert!(r.finish().is_ok());
    }

    #[test]
    fn rejects_wrong_content_and_size() {
        let d = Sha256Digest::of(b"hello");
        let mut r = VerifyingReader::new(&b"hellp"[..], d, Some(5));
        assert!(matches!(r.finish(), Err(Mismatch::Digest)));
        let mut r = VerifyingReader::new(&b"hell"[..], d, Some(5));
        assert!(matches!(r.finish(), Err(Mismatch::Size { actual: 4 })));
        let mut r = VerifyingReader::new(&b"hello, world"[..], d, Some(5));
        assert!(matches!(r.finish(), Err(Mismatch::Size { actual: 6 })));
        let mut r = VerifyingReader::new(&b"hello"[..], d, None);
        assert!(r.finish().is_ok());
    }

    #[test]
    fn oversized_stream_errors_on_read() {
        let d = Sha256Digest::of(b"hi");
        let mut r = VerifyingReader::new(&b"hi there"[..], d, Some(2));
        let mut sink = Vec::new();
        assert!(r.read_to_end(&mut sink).is_err());
        assert_eq!(sink.len(), 3);
    }
}
