//! Guest RAM: `MAP_NORESERVE` mappings that the host backs only when the
//! guest first touches a page, so RAM the guest never uses costs the host
//! nothing.
//!
//! Two kinds: anonymous private mappings (the default), or, when a
//! vhost-user backend must reach guest memory itself, one memfd mapped
//! `MAP_SHARED` (sparse: its pages too exist only once touched), whose fd
//! the backend is given. The memfd is sealed against growing and
//! shrinking, so a backend cannot truncate it under the VMM's feet.
//!
//! Layout (x86-64): RAM from 0 up to the 32-bit MMIO gap, the rest above
//! 4 GiB.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
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
    /// A snapshot's memory file cannot be mapped.
    #[error("cannot map the {size}-byte memory file as guest RAM")]
    MapFile {
        /// Its size.
        size: u64,
        /// Why.
        #[source]
        source: FromRangesError,
    },
    /// The memfd behind shared guest RAM cannot be created, sized or sealed.
    #[error("cannot create {size} bytes of shared guest RAM ({step})")]
    Memfd {
        /// Requested size.
        size: u64,
        /// memfd_create, ftruncate or the seals.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory, only this process sees it.
    Private,
    /// A memfd mapped shared, which a vhost-user backend maps too.
    Shared,
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

/// Maps `size` bytes of guest RAM, lazily backed: private, or shared
/// through a memfd. Private RAM gets transparent huge pages only once
/// [`advise_huge_pages`] is called, after the boot image is in.
pub fn create_guest_memory(size: u64, backing: Backing) -> Result<GuestMemoryMmap> {
    let bytes = usize::try_from(size).map_err(|_| MemoryError::TooLarge { size })?;
    let ranges = ram_ranges(bytes);
    let memory = match backing {
        Backing::Private => GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|source| MemoryError::Map { size, source })?,
        Backing::Shared => {
            let file = Arc::new(ram_memfd(size)?);
            let mut offset = 0u64;
            let mut with_files = Vec::with_capacity(ranges.len());
            for (addr, len) in ranges {
                with_files.push((addr, len, Some(FileOffset::from_arc(file.clone(), offset))));
                offset += len as u64;
            }
            // No MADV_HUGEPAGE here: on shmem it only matters when the host
            // set shmem_enabled to `advise`, and then the balloon's 4 KiB
            // holes would split what it gave; RAM stays 4 KiB pages.
            GuestMemoryMmap::from_ranges_with_files(with_files)
                .map_err(|source| MemoryError::Map { size, source })?
        }
    };
    Ok(memory)
}

/// `size` bytes of guest RAM from a snapshot's memory `file` (the regions
/// of [`ram_ranges`] one after the other), mapped private and lazily:
/// copy-on-write, as Firecracker restores. A page the guest only reads is
/// the page cache's, shared by every VM restored from the file; the first
/// write to one gives this VM a copy of its own. The file is never
/// written, so it may be opened read-only and restored from again.
pub fn map_private_file(file: File, size: u64) -> Result<GuestMemoryMmap> {
    let usize_size = usize::try_from(size).map_err(|_| MemoryError::TooLarge { size })?;
    let map_err = |source| MemoryError::MapFile { size, source };
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(usize_size) {
        let region = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| map_err(FromRangesError::from(e)))?;
        regions.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| map_err(FromRangesError::InvalidGuestRegion))?,
        );
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(FromRangesError::from(e)))
}

/// A sparse memfd of `size` bytes, sealed at that size.
fn ram_memfd(size: u64) -> Result<File> {
    let err = |step| move |source| MemoryError::Memfd { size, step, source };
    // SAFETY: the name is a NUL-terminated literal and the flags are plain
    // bits; the call only creates a new fd.
    let fd = unsafe {
        libc::memfd_create(
            c"capsid-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(err("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns
    // it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(err("ftruncate"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd this function owns, with an int argument.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    };
    if rc != 0 {
        return Err(err("seals")(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Asks for transparent huge pages on private guest RAM (shared RAM is
/// left alone, see [`create_guest_memory`]): the guest touching its memory
/// takes one fault per 2 MiB instead of per 4 KiB, and its TLB covers
/// more. Memory is still only backed once touched, and the balloon's 4 KiB
/// discards split huge pages as needed. A host without THP refuses; that
/// is fine.
///
/// Before the VMM's own writes (kernel, initramfs, boot structures), call
/// it only when [`huge_pages_at_hand`] says the host has free 2 MiB blocks
/// to spare. Where the host's THP `defrag` setting is `madvise` (the
/// common default), a fault in an MADV_HUGEPAGE range that finds no free
/// 2 MiB block compacts memory (direct compaction, and reclaim) in the
/// faulting thread before it returns: the loader's dozen huge-page faults
/// then cost tens to hundreds of milliseconds of CPU (traced: 25 ms of a
/// 30 ms load in `mm_compaction_*`) on the path to the first KVM_RUN,
/// whereas 4 KiB faults do not compact. Free blocks, when there are some,
/// are faster than 4 KiB faults (5 ms against 15 ms for 26 MiB here).
/// Otherwise call it once those writes are done: the boot image stays in
/// 4 KiB pages (khugepaged may merge them later, off that path) and the
/// guest's own memory gets huge pages as before.
pub fn advise_huge_pages(memory: &GuestMemoryMmap) {
    for region in memory.iter().filter(|r| r.file_offset().is_none()) {
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        // SAFETY: [as_ptr, as_ptr + len) is exactly the live anonymous
        // mapping the region owns; MADV_HUGEPAGE only changes how the
        // kernel backs it and never its contents.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no transparent huge pages for guest RAM");
        }
    }
}

/// Whether this host can hand out `blocks` 2 MiB pages straight from its
/// free lists, without compacting: per zone, the free blocks of 2 MiB and
/// more (`/proc/buddyinfo`) that fit above the zone's low watermark
/// (`/proc/zoneinfo`), summed. A snapshot, so callers ask for a margin;
/// false when the files cannot be read.
pub fn huge_pages_at_hand(blocks: u64) -> bool {
    let (Ok(buddyinfo), Ok(zoneinfo)) = (
        std::fs::read_to_string("/proc/buddyinfo"),
        std::fs::read_to_string("/proc/zoneinfo"),
    ) else {
        return false;
    };
    free_huge_blocks(&buddyinfo, &zoneinfo) >= blocks
}

/// Order of a 2 MiB block of 4 KiB pages.
const HUGE_ORDER: usize = 9;

/// 2 MiB blocks the page allocator's fast path could hand out, from the
/// text of /proc/buddyinfo and /proc/zoneinfo.
fn free_huge_blocks(buddyinfo: &str, zoneinfo: &str) -> u64 {
    // (node, zone) -> (free pages, low watermark)
    let mut zones = std::collections::HashMap::new();
    let mut current = None;
    for line in zoneinfo.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Node", node, "zone", zone, ..] => {
                current = Some((node.trim_end_matches(',').to_string(), zone.to_string()));
            }
            ["pages", "free", n] => {
                if let (Some(key), Ok(n)) = (&current, n.parse::<u64>()) {
                    zones.insert(key.clone(), (n, None));
                }
            }
            ["low", n] => {
                if let Some(entry) = current.as_ref().and_then(|k| zones.get_mut(k)) {
                    if entry.1.is_none() {
                        entry.1 = n.parse::<u64>().ok();
                    }
                }
            }
            _ => {}
        }
    }
    let mut total = 0u64;
    for line in buddyinfo.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["Node", node, "zone", zone, counts @ ..] = words.as_slice() else {
            continue;
        };
        let blocks: u64 = counts
            .iter()
            .enumerate()
            .skip(HUGE_ORDER)
            .filter_map(|(order, n)| Some(n.parse::<u64>().ok()? << (order - HUGE_ORDER)))
            .sum();
        let key = (node.trim_end_matches(',').to_string(), zone.to_string());
        let headroom = match zones.get(&key) {
            Some((free, Some(low))) => free.saturating_sub(*low) >> HUGE_ORDER,
            _ => 0,
        };
        total += blocks.min(headroom);
    }
    total
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
        let mem = create_guest_memory(2 << 30, Backing::Private).unwrap();
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

    #[test]
    fn shared_ram_is_one_sealed_sparse_memfd() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;

        // Above the MMIO gap too: two regions, one file, consecutive offsets.
        let size = (3u64 << 30) + (64 << 20);
        let mem = create_guest_memory(size, Backing::Shared).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let regions: Vec<_> = mem.iter().collect();
        let (low, high) = (regions[0], regions[1]);
        let (lf, hf) = (low.file_offset().unwrap(), high.file_offset().unwrap());
        assert_eq!(lf.file().as_raw_fd(), hf.file().as_raw_fd());
        assert_eq!((lf.start(), hf.start()), (0, LOW_RAM_MAX as u64));
        assert_eq!(high.start_addr(), GuestAddress(MMIO_GAP_END));
        let file = lf.file();
        assert_eq!(file.metadata().unwrap().len(), size);
        // Nothing allocated until touched.
        assert_eq!(file.metadata().unwrap().blocks(), 0);
        mem.write_slice(&[5u8; 4096], GuestAddress(MMIO_GAP_END + 4096))
            .unwrap();
        assert!(file.metadata().unwrap().blocks() > 0);
        // What the guest wrote is in the file, where a backend sees it.
        let mut back = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut back, LOW_RAM_MAX as u64 + 4096)
            .unwrap();
        assert_eq!(back, [5u8; 4096]);
        // Sealed: nobody (a backend holding the fd) can shrink it.
        assert!(file.set_len(4096).is_err());
        assert!(file.set_len(size + 4096).is_err());
    }

    /// The VmFlags of the mapping that starts at `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn huge_pages_only_once_advised() {
        let mem = create_guest_memory(16 << 20, Backing::Private).unwrap();
        let addr = mem.iter().next().unwrap().as_ptr() as usize;
        // What the VMM writes before the guest runs must not take huge
        // page faults (they may compact host memory).
        assert!(!vm_flags(addr).split_whitespace().any(|f| f == "hg"));
        advise_huge_pages(&mem);
        let flags = vm_flags(addr);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if thp.is_ok_and(|t| !t.contains("[never]")) {
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
    }

    #[test]
    fn huge_blocks_above_the_low_watermark() {
        let buddyinfo = "\
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32  36816  15891   7155   4442   1189    442     88     25     34     13     24
Node 0, zone   Normal   2406    262    732    446    641     19      0      2      0      4      0
";
        let zoneinfo = "\
Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 1
  pages free     3840
        boost    0
        min      10
        low      13
        high     16
Node 0, zone    DMA32
  pages free     214836
        min      2111
        low      2883
        high     3655
Node 0, zone   Normal
  pages free     20574
        min      14773
        low      20179
        high     25585
";
        // DMA: 1 + 2 * 3 blocks, room for 7; DMA32: 13 + 2 * 24 blocks,
        // room for 413; Normal: 4 blocks but no room above its watermark.
        assert_eq!(free_huge_blocks(buddyinfo, zoneinfo), 7 + 61);
        assert_eq!(free_huge_blocks(buddyinfo, ""), 0);
        assert_eq!(free_huge_blocks("", zoneinfo), 0);
    }

    #[test]
    fn a_memory_file_maps_copy_on_write() {
        use std::io::Write;

        let size = 8u64 << 20;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let mut content = vec![0u8; usize::try_from(size).unwrap()];
        content[0x1234] = 0xab;
        content[(6 << 20) + 1] = 0xcd;
        file.write_all(&content).unwrap();
        let read_only = File::open(file.path()).unwrap();
        let mem = map_private_file(read_only, size).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), 0xab);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((6 << 20) + 1)).unwrap(),
            0xcd
        );
        // The guest writes; the file does not change.
        mem.write_obj(0x11u8, GuestAddress(0x1234)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), 0x11);
        assert_eq!(std::fs::read(file.path()).unwrap()[0x1234], 0xab);
        // Not shared memory: the balloon must not punch the file.
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        assert_eq!(region.flags() & libc::MAP_SHARED, 0);
    }

    #[test]
    fn private_ram_has_no_file() {
        let mem = create_guest_memory(16 << 20, Backing::Private).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }
}
