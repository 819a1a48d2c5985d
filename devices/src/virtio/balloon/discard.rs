//! Giving guest pages back to the host: `madvise(MADV_DONTNEED)` on the
//! host mapping of guest RAM. This is the balloon's only unsafe code.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{BalloonError, Result, BALLOON_PAGE_SIZE};

/// Drops the host backing of guest-physical ranges.
pub trait PageDiscarder: Send {
    /// Discards `[addr, addr + len)`: afterwards the range reads as zeros
    /// and costs the host nothing until touched. `addr` and `len` are
    /// multiples of [`BALLOON_PAGE_SIZE`].
    fn discard(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<()>;
}

/// Discards through `madvise(MADV_DONTNEED)` on the anonymous private
/// mappings of guest RAM.
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
        // SAFETY: [host, host + len) lies inside one region of `mem` (checked
        // just above against the region's bounds), which is a live
        // anonymous private mapping owned by the GuestMemoryMmap and kept
        // mapped while `mem` is borrowed. MADV_DONTNEED only replaces those
        // pages' contents with zeros on next access; no Rust reference into
        // guest memory exists (vm-memory accesses it volatilely), and the
        // guest gave these pages up, so zeroing them is what it asked for.
        let rc = unsafe { libc::madvise(host.cast(), len_bytes, libc::MADV_DONTNEED) };
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
