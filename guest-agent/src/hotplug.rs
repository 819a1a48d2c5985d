//! Memory the VM has but the kernel was told not to use yet.
//!
//! A pod's VM is given its maximum RAM by the VMM and booted with `mem=`
//! its size (rounded up to a memory block), so the kernel keeps page
//! descriptors (1/64 of the RAM) only for what it uses. As the pod grows,
//! the host asks the agent to add RAM: the agent finds, in the firmware's
//! memory map (`/sys/firmware/memmap`, which `mem=` does not trim), the
//! memory blocks of RAM the kernel has no block device for, and adds the
//! lowest of them through `/sys/devices/system/memory/probe`. The kernel
//! brings them online itself (`MEMORY_HOTPLUG_DEFAULT_ONLINE`); a block it
//! left offline is onlined here.
//!
//! Works alike under any VMM: no ACPI, PCI or virtio-mem device.

use std::fs;
use std::path::{Path, PathBuf};

/// Errors adding memory.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// A sysfs file could not be read or written.
    #[error("{what} {path}")]
    Sysfs {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A sysfs file holds what the kernel does not write there.
    #[error("{path}: unexpected content {content:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held (cut short).
        content: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, HotplugError>;

/// Where the kernel says what it has.
#[derive(Debug, Clone)]
pub struct Sysfs {
    /// `/sys/firmware/memmap`.
    pub memmap: PathBuf,
    /// `/sys/devices/system/memory`.
    pub memory: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self {
            memmap: "/sys/firmware/memmap".into(),
            memory: "/sys/devices/system/memory".into(),
        }
    }
}

/// The guest's RAM as the firmware gave it and as the kernel uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of a memory block: the unit of hotplug.
    pub block_bytes: u64,
    /// Start addresses of the whole blocks of firmware RAM the kernel has
    /// not added, lowest first.
    pub absent: Vec<u64>,
}

impl Layout {
    /// Bytes of RAM not added.
    pub fn absent_bytes(&self) -> u64 {
        self.absent.len() as u64 * self.block_bytes
    }
}

fn read(path: &Path, what: &'static str) -> Result<String> {
    fs::read_to_string(path).map_err(|source| HotplugError::Sysfs {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn hex(path: &Path, what: &'static str) -> Result<u64> {
    let text = read(path, what)?;
    let t = text.trim();
    u64::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| HotplugError::Parse {
        path: path.to_path_buf(),
        content: t.chars().take(64).collect(),
    })
}

impl Sysfs {
    /// Reads the layout. A kernel without hotplug (no `block_size_bytes`)
    /// or without the firmware map has nothing absent.
    pub fn layout(&self) -> Result<Layout> {
        let size_file = self.memory.join("block_size_bytes");
        if !size_file.exists() || !self.memmap.is_dir() {
            return Ok(Layout {
                block_bytes: 0,
                absent: Vec::new(),
            });
        }
        let block_bytes = hex(&size_file, "reading the memory block size from")?;
        if block_bytes == 0 || !block_bytes.is_power_of_two() {
            return Err(HotplugError::Parse {
                path: size_file,
                content: format!("{block_bytes:#x}"),
            });
        }
        let mut ram = Vec::new();
        let entries = fs::read_dir(&self.memmap).map_err(|source| HotplugError::Sysfs {
            what: "listing",
            path: self.memmap.clone(),
            source,
        })?;
        for entry in entries {
            let dir = entry
                .map_err(|source| HotplugError::Sysfs {
                    what: "listing",
                    path: self.memmap.clone(),
                    source,
                })?
                .path();
            if read(&dir.join("type"), "reading")?.trim() != "System RAM" {
                continue;
            }
            let start = hex(&dir.join("start"), "reading")?;
            // `end` is inclusive.
            let end = hex(&dir.join("end"), "reading")?.saturating_add(1);
            ram.push((start, end));
        }
        let mut absent = Vec::new();
        for (start, end) in ram {
            let mut block = start.div_ceil(block_bytes) * block_bytes;
            while block.checked_add(block_bytes).is_some_and(|e| e <= end) {
                let index = block / block_bytes;
                if !self.memory.join(format!("memory{index}")).exists() {
                    absent.push(block);
                }
                block += block_bytes;
            }
        }
        absent.sort_unstable();
        absent.dedup();
        Ok(Layout {
            block_bytes,
            absent,
        })
    }

    /// Adds the lowest absent blocks until at most `keep_absent_bytes` of
    /// RAM is left absent, and brings each online. Returns the layout
    /// after.
    pub fn add_until(&self, keep_absent_bytes: u64) -> Result<Layout> {
        let mut layout = self.layout()?;
        while layout.absent_bytes() > keep_absent_bytes {
            let block = layout.absent[0];
            let probe = self.memory.join("probe");
            fs::write(&probe, format!("{block:#x}")).map_err(|source| HotplugError::Sysfs {
                what: "adding a memory block through",
                path: probe.clone(),
                source,
            })?;
            let index = block / layout.block_bytes;
            let state = self.memory.join(format!("memory{index}/state"));
            if read(&state, "reading the state of the block just added")?.trim() != "online" {
                fs::write(&state, "online").map_err(|source| HotplugError::Sysfs {
                    what: "onlining",
                    path: state.clone(),
                    source,
                })?;
            }
            tracing::info!(
                address = format_args!("{block:#x}"),
                bytes = layout.block_bytes,
                "memory block added"
            );
            layout.absent.remove(0);
        }
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A fake sysfs: firmware RAM ranges and the blocks present.
    fn fake(ram: &[(u64, u64)], present: &[u64]) -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let s = Sysfs {
            memmap: dir.path().join("memmap"),
            memory: dir.path().join("memory"),
        };
        for (i, (start, end)) in ram.iter().enumerate() {
            let d = s.memmap.join(i.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("start"), format!("{start:#x}\n")).unwrap();
            fs::write(d.join("end"), format!("{:#x}\n", end - 1)).unwrap();
            fs::write(d.join("type"), "System RAM\n").unwrap();
        }
        let d = s.memmap.join("99");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("start"), "0xf0000000\n").unwrap();
        fs::write(d.join("end"), "0xffffffff\n").unwrap();
        fs::write(d.join("type"), "Reserved\n").unwrap();
        fs::create_dir_all(&s.memory).unwrap();
        fs::write(s.memory.join("block_size_bytes"), "8000000\n").unwrap();
        for b in present {
            let m = s.memory.join(format!("memory{b}"));
            fs::create_dir_all(&m).unwrap();
            fs::write(m.join("state"), "online\n").unwrap();
        }
        (dir, s)
    }

    #[test]
    fn absent_blocks_are_the_whole_blocks_of_ram_without_a_device() {
        // 1024 MiB of RAM from 1 MiB (the low hole), booted with mem=256M:
        // blocks 0 and 1 present, 2..=7 absent; a range that ends mid-block
        // gives no block.
        let (_d, s) = fake(
            &[(0, 0x9fc00), (MIB, 1024 * MIB), (4096 * MIB, 4196 * MIB)],
            &[0, 1],
        );
        let l = s.layout().unwrap();
        assert_eq!(l.block_bytes, 128 * MIB);
        assert_eq!(l.absent, (2..8).map(|b| b * 128 * MIB).collect::<Vec<_>>());
        assert_eq!(l.absent_bytes(), 768 * MIB);
    }

    #[test]
    fn no_hotplug_means_nothing_absent() {
        let (_d, s) = fake(&[(MIB, 1024 * MIB)], &[0]);
        fs::remove_file(s.memory.join("block_size_bytes")).unwrap();
        assert_eq!(s.layout().unwrap().absent, Vec::<u64>::new());
    }

    #[test]
    fn garbage_in_sysfs_is_an_error_naming_the_file() {
        let (_d, s) = fake(&[(MIB, 1024 * MIB)], &[0]);
        fs::write(s.memory.join("block_size_bytes"), "zz\n").unwrap();
        let e = s.layout().unwrap_err().to_string();
        assert!(e.contains("block_size_bytes"), "{e}");
    }

    #[test]
    fn adding_writes_the_lowest_block_to_probe_and_needs_the_kernel_to_add_it() {
        let (_d, s) = fake(&[(MIB, 1024 * MIB)], &[0, 1]);
        fs::write(s.memory.join("probe"), "").unwrap();
        // Nothing to add: nothing written.
        let l = s.add_until(768 * MIB).unwrap();
        assert_eq!(l.absent_bytes(), 768 * MIB);
        assert_eq!(fs::read_to_string(s.memory.join("probe")).unwrap(), "");
        // A file is no kernel: the block written to probe does not appear,
        // and that is an error naming it.
        let e = s.add_until(512 * MIB).unwrap_err().to_string();
        assert_eq!(
            fs::read_to_string(s.memory.join("probe")).unwrap(),
            format!("{:#x}", 2 * 128 * MIB)
        );
        assert!(e.contains("memory2"), "{e}");
    }
}
