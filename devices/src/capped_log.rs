//! A log file the guest writes into that cannot grow without bound: the
//! VM's serial console (capsid-vmm's COM1, QEMU's serial through
//! `capsid-vhost console`). A hostile guest may print forever; the host
//! keeps at most two generations of `max_bytes` each — the file, and the
//! previous one as `<file>.1` — so the newest output (a panic's last
//! words) is always there, and `/run` cannot be filled from inside a VM.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The default size of one generation: 1 MiB (2 MiB per VM at most).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;

/// A size-capped, rotating log file.
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    written: u64,
    rotations: u64,
}

impl CappedLog {
    /// Opens (appends to) `path`, rotating once `max_bytes` were written
    /// into it (at least 4 KiB).
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(4096),
            file,
            written,
            rotations: 0,
        })
    }

    /// How many times the file was rotated (for tests and metrics).
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.written = 0;
        self.rotations += 1;
        if self.rotations == 1 {
            tracing::warn!(log = %self.path.display(), max_bytes = self.max_bytes, "guest output exceeds its cap: older output is dropped");
        }
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.max_bytes {
            self.rotate()?;
        }
        // Never past the cap: a huge write is cut at it (and the rest
        // comes back to the caller as a short write).
        let room = usize::try_from(self.max_bytes - self.written).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_keeps_two_generations_and_the_newest_output() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.log");
        let mut log = CappedLog::open(&path, 8192).unwrap();
        for i in 0..10_000u32 {
            writeln!(log, "line {i:05} of a guest that never stops").unwrap();
        }
        writeln!(log, "the last words").unwrap();
        log.flush().unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(tmp.path().join("console.log.1")).unwrap();
        assert!(current.len() <= 8192 && previous.len() <= 8192);
        assert!(current.ends_with("the last words\n"), "{current}");
        assert!(log.rotations() > 10);
        let files = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(files, 2);
    }

    #[test]
    fn one_huge_write_is_cut_at_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c.log");
        let mut log = CappedLog::open(&path, 4096).unwrap();
        let big = vec![b'x'; 1 << 20];
        log.write_all(&big).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
    }
}
