//! The backing store of a block device: one host file or block device,
//! opened once, accessed with positioned I/O straight into and out of guest
//! memory.

use std::fs::File;
use std::io::{self, ErrorKind, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestAddress, GuestMemory, Permissions, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::{BlkError, Result, SECTOR_SHIFT};

/// Zeroes written per call when the host cannot zero a range in place.
const ZERO_CHUNK: usize = 64 * 1024;

/// A disk image the device serves.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
}

impl Disk {
    /// Opens `path` read-write, or read-only when `read_only`; a path
    /// `/proc/self/fd/N` or `/dev/fd/N` is the inherited descriptor N
    /// (see [`crate::passed_fd`]).
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        // `/proc/self/fd/N` is a disk the jailer opened and passed.
        let file = crate::passed_fd::open(path, !read_only).map_err(|source| BlkError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let kind = file.metadata().map_err(BlkError::Size)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlkError::NotADisk(path.to_path_buf()));
        }
        Self::from_file(file, read_only)
    }

    /// Serves an already open file (it must be writable unless `read_only`).
    /// Its size is taken now; a trailing partial sector is not exposed.
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self> {
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let bytes = file.seek(SeekFrom::End(0)).map_err(BlkError::Size)?;
        if bytes % super::SECTOR_SIZE != 0 {
            tracing::warn!(
                bytes,
                "blk: backing file size is not a multiple of 512; the tail is not exposed"
            );
        }
        Ok(Self {
            file,
            capacity: bytes >> SECTOR_SHIFT,
            read_only,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fills guest memory `[addr, addr + len)` from the disk at byte
    /// `offset`. The caller has bounds-checked the disk range.
    pub(super) fn read_to_guest<M: GuestMemory>(
        &self,
        offset: u64,
        mem: &M,
        addr: GuestAddress,
        len: u32,
    ) -> io::Result<()> {
        let mut at = FileAt {
            file: &self.file,
            offset,
        };
        let slices = mem
            .get_slices(addr, len as usize, Permissions::Write)
            .map_err(io::Error::other)?;
        for slice in slices {
            let mut slice = slice.map_err(io::Error::other)?;
            at.read_exact_volatile(&mut slice).map_err(into_io)?;
        }
        Ok(())
    }

    /// Writes guest memory `[addr, addr + len)` to the disk at byte
    /// `offset`. The caller has bounds-checked the disk range.
    pub(super) fn write_from_guest<M: GuestMemory>(
        &self,
        offset: u64,
        mem: &M,
        addr: GuestAddress,
        len: u32,
    ) -> io::Result<()> {
        if self.read_only {
            return Err(ErrorKind::PermissionDenied.into());
        }
        let mut at = FileAt {
            file: &self.file,
            offset,
        };
        let slices = mem
            .get_slices(addr, len as usize, Permissions::Read)
            .map_err(io::Error::other)?;
        for slice in slices {
            let slice = slice.map_err(io::Error::other)?;
            at.write_all_volatile(&slice).map_err(into_io)?;
        }
        Ok(())
    }

    /// Makes completed writes stable.
    pub(super) fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`. Discarding is a hint: a host
    /// file system that cannot punch holes leaves the data in place.
    pub(super) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {
                tracing::debug!("blk: host cannot punch holes; discard ignored");
                Ok(())
            }
            other => other,
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes, deallocating them when
    /// `unmap`, keeping them allocated otherwise.
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            other => other,
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let end = offset.checked_add(len).ok_or(ErrorKind::InvalidInput)?;
        while offset < end {
            let n = usize::try_from(end - offset).map_or(ZERO_CHUNK, |r| r.min(ZERO_CHUNK));
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(ErrorKind::PermissionDenied.into());
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| ErrorKind::InvalidInput)?;
        let len = libc::off_t::try_from(len).map_err(|_| ErrorKind::InvalidInput)?;
        loop {
            // SAFETY: fallocate(2) only acts on the descriptor, which
            // `self.file` keeps open for the call; no memory is passed.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The host file system cannot do this kind of fallocate.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn into_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

/// A file cursor for vm-memory's volatile I/O traits that uses positioned
/// reads and writes, so the file's own offset is never touched.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off(&self) -> std::result::Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(ErrorKind::InvalidInput.into()))
    }

    /// Takes a pread/pwrite return value: a count to move on by, or (when
    /// negative) the error left in errno.
    fn advance(&mut self, n: isize) -> std::result::Result<usize, VolatileMemoryError> {
        let Ok(n) = usize::try_from(n) else {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        };
        self.offset = self.offset.saturating_add(n as u64);
        Ok(n)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> std::result::Result<usize, VolatileMemoryError> {
        let offset = self.off()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the guard keeps `buf`'s mapping alive for the call, and a
        // VolatileSlice is valid for writes of `buf.len()` bytes at its
        // pointer; the fd is open for as long as `self.file` is borrowed.
        // The kernel writes guest memory the guest may also be touching,
        // which is what volatile memory allows.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        // A failed read may still have written part of the buffer.
        let n = self
            .advance(n)
            .inspect_err(|_| buf.bitmap().mark_dirty(0, buf.len()))?;
        buf.bitmap().mark_dirty(0, n);
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> std::result::Result<usize, VolatileMemoryError> {
        let offset = self.off()?;
        let guard = buf.ptr_guard();
        // SAFETY: the guard keeps `buf`'s mapping alive for the call, and a
        // VolatileSlice is valid for reads of `buf.len()` bytes at its
        // pointer; the fd is open for as long as `self.file` is borrowed.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.advance(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn image(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn capacity_counts_whole_sectors() {
        let f = image(&[7u8; 1536 + 100]);
        let disk = Disk::open(f.path(), true).unwrap();
        assert_eq!(disk.capacity(), 3);
        assert!(disk.read_only());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Disk::open(Path::new("/nonexistent/capsid.img"), false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/capsid.img"), "{err}");
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Disk::open(dir.path(), true),
            Err(BlkError::NotADisk(_))
        ));
    }

    #[test]
    fn reads_and_writes_across_memory_regions() {
        let data: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
        let f = image(&data);
        let disk = Disk::open(f.path(), false).unwrap();
        // Two regions, so one guest range becomes two host slices.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        disk.read_to_guest(512, &mem, GuestAddress(0xf00), 1024)
            .unwrap();
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0xf00)).unwrap();
        assert_eq!(got, &data[512..1536]);

        mem.write_slice(&[0xaa; 512], GuestAddress(0x800)).unwrap();
        disk.write_from_guest(0, &mem, GuestAddress(0x800), 512)
            .unwrap();
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[..512], &[0xaa; 512][..]);
        assert_eq!(&on_disk[512..], &data[512..]);
    }

    #[test]
    fn read_past_end_of_file_fails() {
        let f = image(&[1u8; 512]);
        let disk = Disk::open(f.path(), true).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(disk.read_to_guest(0, &mem, GuestAddress(0), 1024).is_err());
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let f = image(&[1u8; 1024]);
        let disk = Disk::open(f.path(), true).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(disk
            .write_from_guest(0, &mem, GuestAddress(0), 512)
            .is_err());
        assert!(disk.write_zeroes(0, 512, false).is_err());
        assert!(disk.discard(0, 512).is_err());
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![1u8; 1024]);
    }

    #[test]
    fn write_zeroes_and_discard() {
        let f = image(&[9u8; 3 * 4096]);
        let disk = Disk::open(f.path(), false).unwrap();
        disk.write_zeroes(512, 1024, false).unwrap();
        disk.write_zeroes(4096, 4096, true).unwrap();
        disk.discard(8192, 4096).unwrap();
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(on_disk.len(), 3 * 4096, "size is kept");
        assert_eq!(&on_disk[..512], &[9u8; 512][..]);
        assert!(on_disk[512..1536].iter().all(|&b| b == 0));
        assert_eq!(&on_disk[1536..4096], &[9u8; 2560][..]);
        assert!(on_disk[4096..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn zero_fallback_writes_exact_range() {
        let f = image(&[5u8; 3 * ZERO_CHUNK]);
        let disk = Disk::open(f.path(), false).unwrap();
        disk.write_zero_bytes(100, (ZERO_CHUNK + 10) as u64)
            .unwrap();
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[..100], &[5u8; 100][..]);
        assert!(on_disk[100..ZERO_CHUNK + 110].iter().all(|&b| b == 0));
        assert!(on_disk[ZERO_CHUNK + 110..].iter().all(|&b| b == 5));
    }
}
