//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings that the host
//! backs only when the guest first touches a page, so RAM the guest never
//! uses costs the host nothing.
//!
//! Layout (x86-64): RAM from 0 up to the 32-bit MMIO gap, the rest above
//! 4 GiB.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Start of the hole below 4 GiB kept for MMIO devices (virtio-mmio, IOAPIC,
/// LAPIC).
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of that hole: RAM resumes here.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit this host's address space.
    #[error("{size} bytes of guest RAM do not fit the host address space")]
    TooLarge {
        /// Requested size.
        size: u64,
    },
    /// mmap of guest RAM failed.
    #[error("cannot map {size} bytes of guest RAM")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Result of memory operations.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// Bytes of RAM below the MMIO gap.
const LOW_RAM_MAX: usize = 0xC000_0000;

/// The guest-physical ranges that hold `size` bytes of RAM.
pub fn ram_ranges(size: usize) -> Vec<(GuestAddress, usize)> {
    let low = size.min(LOW_RAM_MAX);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Maps `size` bytes of guest RAM, lazily backed, with transparent huge
/// pages where the host allows them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap> {
    let bytes = usize::try_from(size).map_err(|_| MemoryError::TooLarge { size })?;
    let memory = GuestMemoryMmap::from_ranges(&ram_ranges(bytes))
        .map_err(|source| MemoryError::Map { size, source })?;
    for region in memory.iter() {
        advise_huge_pages(region);
    }
    Ok(memory)
}

/// Asks for transparent huge pages on a RAM region: a guest touching its
/// memory (and the VMM loading a kernel into it) takes one fault per
/// 2 MiB instead of per 4 KiB, and the guest's TLB covers more. Memory is
/// still only backed once touched, and the balloon's 4 KiB discards split
/// huge pages as needed. A host without THP refuses; that is fine.
fn advise_huge_pages(region: &GuestRegionMmap) {
    let Ok(len) = usize::try_from(region.len()) else {
        return;
    };
    // SAFETY: [as_ptr, as_ptr + len) is exactly the live anonymous mapping
    // the region owns; MADV_HUGEPAGE only changes how the kernel backs it
    // and never its contents.
    let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "no transparent huge pages for guest RAM");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), LOW_RAM_MAX));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), 1 << 30));
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn untouched_ram_costs_nothing() {
        let before = rss_kib();
        let mem = create_guest_memory(2 << 30).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let after_map = rss_kib();
        // 2 GiB mapped, almost nothing resident.
        assert!(
            after_map < before + 16 * 1024,
            "{before} -> {after_map} KiB"
        );
        mem.write_slice(&[1u8; 4096], GuestAddress(1 << 30))
            .unwrap();
        let mut back = [0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(1 << 30)).unwrap();
        assert_eq!(back, [1u8; 4096]);
    }
}
