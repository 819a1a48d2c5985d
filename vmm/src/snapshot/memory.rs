//! The memory file: guest RAM, region after region, nothing else (any
//! tool can read a guest page at its region's file offset plus its offset
//! in the region). Pages that are all zeros are not written: the file is
//! sparse, and costs the disk what the guest touched.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM is read and written this much at a time.
const CHUNK: usize = 1 << 20;
/// Zero pages are skipped at this granularity.
const PAGE: usize = 4096;

/// Errors writing the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file cannot be created, sized or written.
    #[error("cannot write the memory file {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Guest RAM could not be read (a bug: the regions are the VM's own).
    #[error("cannot read guest RAM at {addr:#x}")]
    Read {
        /// Where.
        addr: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result of memory file operations.
pub type Result<T> = std::result::Result<T, MemoryFileError>;

/// One region of guest RAM in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Where it starts in the file.
    pub file_offset: u64,
}

/// What the memory file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The file's size: all of guest RAM.
    pub size: u64,
    /// The regions, in file order.
    pub regions: Vec<RegionLayout>,
}

/// The layout `memory` has in a memory file.
pub fn layout(memory: &GuestMemoryMmap) -> MemoryLayout {
    let mut offset = 0;
    let regions = memory
        .iter()
        .map(|r| {
            let region = RegionLayout {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            region
        })
        .collect();
    MemoryLayout {
        size: offset,
        regions,
    }
}

/// Writes guest RAM to `path` (which it creates or replaces), skipping
/// zero pages; returns the layout and how many bytes it wrote. The guest
/// must not run meanwhile, nor any device write its memory.
pub fn write(memory: &GuestMemoryMmap, path: &Path) -> Result<(MemoryLayout, u64)> {
    let write_err = |source| MemoryFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let layout = layout(memory);
    let file = File::create(path).map_err(write_err)?;
    file.set_len(layout.size).map_err(write_err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for region in &layout.regions {
        let mut done = 0u64;
        while done < region.size {
            let len = usize::try_from(region.size - done).map_or(CHUNK, |rest| rest.min(CHUNK));
            let addr = region.guest_addr + done;
            let chunk = &mut buf[..len];
            memory
                .read_slice(chunk, GuestAddress(addr))
                .map_err(|source| MemoryFileError::Read { addr, source })?;
            written += write_nonzero(&file, chunk, region.file_offset + done).map_err(write_err)?;
            done += len as u64;
        }
    }
    file.sync_all().map_err(write_err)?;
    Ok((layout, written))
}

/// Writes the runs of pages of `chunk` that are not all zeros at `offset`
/// of `file` (already sized: what is skipped reads as zeros); returns the
/// bytes written.
fn write_nonzero(file: &File, chunk: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let pages = chunk.len().div_ceil(PAGE);
    for page in 0..=pages {
        let start = page * PAGE;
        let zero = chunk
            .get(start..(start + PAGE).min(chunk.len()))
            .is_none_or(|p| p.iter().all(|&b| b == 0));
        match (run, zero) {
            (None, false) => run = Some(start),
            (Some(from), true) => {
                let end = start.min(chunk.len());
                file.write_all_at(&chunk[from..end], offset + from as u64)?;
                written += (end - from) as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_file_is_the_regions_in_order_and_sparse() {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 3 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap();
        memory
            .write_slice(&[1u8; 10], GuestAddress(0x1000))
            .unwrap();
        memory
            .write_slice(&[3u8; 4096 * 3], GuestAddress((1 << 32) + (1 << 20) - 4096))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let (layout, written) = write(&memory, &path).unwrap();
        assert_eq!(layout.size, 5 << 20);
        assert_eq!(
            layout.regions,
            vec![
                RegionLayout {
                    guest_addr: 0,
                    size: 3 << 20,
                    file_offset: 0
                },
                RegionLayout {
                    guest_addr: 1 << 32,
                    size: 2 << 20,
                    file_offset: 3 << 20
                },
            ]
        );
        // One page, then three pages across a chunk boundary.
        assert_eq!(written, 4096 * 4);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 5 << 20);
        assert_eq!(&bytes[0x1000..0x100a], &[1u8; 10]);
        assert_eq!(bytes[0x100a], 0);
        let high = (3 << 20) + (1 << 20) - 4096;
        assert!(bytes[high..high + 4096 * 3].iter().all(|&b| b == 3));
        assert_eq!(
            bytes.iter().map(|&b| u64::from(b)).sum::<u64>(),
            10 + 3 * 3 * 4096
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    }
}
