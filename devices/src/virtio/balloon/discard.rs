//! Giving guest pages back to the host through the host mapping of guest
//! RAM. This is the balloon's only unsafe code.
//!
//! How depends on the mapping. Anonymous private RAM: `MADV_DONTNEED`
//! drops the pages, and the next touch maps a fresh zero page. RAM backed
//! by a file (a memfd, shared with a vhost-user backend): `MADV_DONTNEED`
//! would only unmap the pages, which stay in the file, hold their old
//! contents and keep costing the host; `MADV_REMOVE` punches the range out
//! of the file instead (as `fallocate(PUNCH_HOLE)` does), for every process
//! mapping it, and it reads as zeros afterwards. A file mapped privately
//! (a snapshot's memory file, copy-on-write): `MADV_DONTNEED` would drop
//! the private copies and show the file's old contents again, and
//! `MADV_REMOVE` is refused there; the range is mapped over with fresh
//! anonymous memory instead (`MAP_FIXED`), as Firecracker does, which
//! reads as zeros and costs nothing until touched.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{BalloonError, Result, BALLOON_PAGE_SIZE};

/// Drops the host backing of guest-physical ranges.
pub trait PageDiscarder: Send {
    /// Discards `[addr, addr + len)`: afterwards the range reads as zeros
    /// and costs the host nothing until touched. `addr` and `len` are
    /// multiples of [`BALLOON_PAGE_SIZE`].
    fn discard(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<()>;
}

/// Discards through the mappings of guest RAM: `MADV_DONTNEED` on
/// anonymous private regions, `MADV_REMOVE` on shared file mappings, fresh
/// anonymous memory over private file mappings.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostDiscarder;

impl PageDiscarder for HostDiscarder {
    fn discard(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<()> {
        let outside = || BalloonError::OutsideMemory { addr: addr.0, len };
        if len == 0 {
            return Ok(());
        }
        if !addr.0.is_multiple_of(BALLOON_PAGE_SIZE) || !len.is_multiple_of(BALLOON_PAGE_SIZE) {
            return Err(outside());
        }
        let region = mem.find_region(addr).ok_or_else(outside)?;
        let offset = addr
            .checked_offset_from(region.start_addr())
            .ok_or_else(outside)?;
        let end = offset.checked_add(len).ok_or_else(outside)?;
        if end > region.len() {
            return Err(outside());
        }
        let host = mem.get_host_address(addr).map_err(|_| outside())?;
        let len_bytes = usize::try_from(len).map_err(|_| outside())?;
        let shared = region.flags() & libc::MAP_SHARED != 0;
        let rc = if region.file_offset().is_some() && !shared {
            // SAFETY: [host, host + len) lies inside one region of `mem`
            // (checked just above against the region's bounds), a live
            // private file mapping owned by the GuestMemoryMmap and kept
            // mapped while `mem` is borrowed. MAP_FIXED replaces exactly
            // those pages with anonymous read-write memory of the same
            // protection, so the region stays one contiguous mapping that
            // its owner unmaps whole; no Rust reference into guest memory
            // exists (vm-memory accesses it volatilely), and the guest gave
            // these pages up, so zeroing them is what it asked for.
            let addr = unsafe {
                libc::mmap(
                    host.cast(),
                    len_bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                -1
            } else {
                0
            }
        } else {
            let advice = if shared {
                libc::MADV_REMOVE
            } else {
                libc::MADV_DONTNEED
            };
            // SAFETY: [host, host + len) lies inside one region of `mem`
            // (checked just above against the region's bounds), which is a
            // live mapping owned by the GuestMemoryMmap and kept mapped
            // while `mem` is borrowed: anonymous private (MADV_DONTNEED) or
            // a shared file mapping (MADV_REMOVE). Either only replaces
            // those pages' contents with zeros on next access; no Rust
            // reference into guest memory exists (vm-memory accesses it
            // volatilely), and the guest gave these pages up, so zeroing
            // them is what it asked for.
            unsafe { libc::madvise(host.cast(), len_bytes, advice) }
        };
        if rc != 0 {
            return Err(BalloonError::Discard {
                addr: addr.0,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn discarded_pages_read_as_zero() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[7u8; 0x3000], GuestAddress(0x1000))
            .unwrap();
        HostDiscarder
            .discard(&mem, GuestAddress(0x2000), 0x1000)
            .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 7);
    }

    fn memfd(size: u64) -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a NUL-terminated literal; the call creates a
        // new fd and touches no memory of ours.
        let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }

    fn allocated_bytes(file: &std::fs::File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn discarded_shared_pages_read_as_zero_and_leave_the_file() {
        use std::sync::Arc;
        use vm_memory::FileOffset;

        let file = Arc::new(memfd(0x20_0000));
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
            (
                GuestAddress(0),
                0x10_0000,
                Some(FileOffset::from_arc(file.clone(), 0)),
            ),
            (
                GuestAddress(0x40_0000),
                0x10_0000,
                Some(FileOffset::from_arc(file.clone(), 0x10_0000)),
            ),
        ])
        .unwrap();
        mem.write_slice(&[7u8; 0x3000], GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&[9u8; 0x2000], GuestAddress(0x40_1000))
            .unwrap();
        let before = allocated_bytes(&file);
        assert!(before >= 0x5000, "{before}");
        HostDiscarder
            .discard(&mem, GuestAddress(0x2000), 0x1000)
            .unwrap();
        HostDiscarder
            .discard(&mem, GuestAddress(0x40_1000), 0x2000)
            .unwrap();
        // The file gave the pages back (before anything reads them again:
        // a read of a hole in shmem allocates a fresh zero page).
        let after = allocated_bytes(&file);
        assert!(after <= before - 0x3000, "{before} -> {after}");
        // MADV_DONTNEED would leave both the old bytes and the file's pages.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_1000)).unwrap(), 0);
    }

    #[test]
    fn discarded_pages_of_a_private_file_mapping_read_as_zero() {
        use std::io::Write;
        use std::sync::Arc;
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{FileOffset, GuestRegionMmap};

        // A snapshot's memory file, mapped copy-on-write.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[5u8; 0x10_0000]).unwrap();
        let region = MmapRegionBuilder::new(0x10_0000)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(Arc::new(file.try_clone().unwrap()), 0))
            .build()
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_regions(vec![GuestRegionMmap::new(
            region,
            GuestAddress(0),
        )
        .unwrap()])
        .unwrap();
        mem.write_slice(&[7u8; 0x1000], GuestAddress(0x3000))
            .unwrap();
        HostDiscarder
            .discard(&mem, GuestAddress(0x2000), 0x2000)
            .unwrap();
        // Neither the file's bytes (0x2000) nor the private copy (0x3000)
        // show through; the pages around are untouched.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 5);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3fff)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 5);
        // Still guest RAM: writable, and the file never changes.
        mem.write_obj(9u8, GuestAddress(0x2000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 9);
        let mut back = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0x3000).unwrap();
        assert_eq!(back, [5]);
    }

    #[test]
    fn ranges_outside_or_across_regions_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        let mut d = HostDiscarder;
        assert!(d.discard(&mem, GuestAddress(0x10_0000), 0x1000).is_err());
        assert!(d.discard(&mem, GuestAddress(0xf_f000), 0x2000).is_err());
        assert!(d.discard(&mem, GuestAddress(0x1001), 0x1000).is_err());
        assert!(d
            .discard(&mem, GuestAddress(u64::MAX - 0xfff), 0x1000)
            .is_err());
        assert!(d
            .discard(&mem, GuestAddress(0x1000), u64::MAX - 0xfff)
            .is_err());
        assert!(d.discard(&mem, GuestAddress(0x20_0000), 0x10_0000).is_ok());
    }
}
