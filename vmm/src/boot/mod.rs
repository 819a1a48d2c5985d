//! Booting a guest: where everything goes in guest memory (the layout
//! below), loading the kernel and initramfs (`loader`), the Linux zero page
//! and PVH start info with their memory maps (`params`), the MP table
//! (`mptable`), and the GDT and identity page tables a 64-bit entry needs
//! (`tables`).
//!
//! The layout follows the x86 boot protocol (Documentation/x86/boot.rst)
//! and the Xen PVH ABI: everything the kernel is handed lives below
//! 640 KiB, the kernel at or above 1 MiB, the initramfs at the top of low
//! RAM below the kernel's `initrd_addr_max`.

pub mod loader;
pub mod mptable;
pub mod params;
pub mod tables;

use std::path::PathBuf;

/// The GDT (six 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// The IDT: one empty entry (interrupts stay disabled until the kernel has
/// its own).
pub const BOOT_IDT_START: u64 = 0x540;
/// `struct hvm_start_info` for a PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map (up to 160 entries of 24 bytes).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Room for PVH memory map entries before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 160;
/// The zero page (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (grows down below the page
/// tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) mapping 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line, NUL included (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here, where Linux looks.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of conventional memory (the VGA hole follows).
pub const EBDA_END: u64 = 0xa_0000;
/// Where high memory starts: kernels load at or above it.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// First virtio-mmio device; the next ones follow every 4 KiB.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// IOAPIC pins: GSIs 0 to 23.
pub const IOAPIC_PINS: u8 = 24;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// GSI of the i8042 keyboard.
pub const I8042_GSI: u32 = 1;
/// GSI of the first virtio-mmio device; the next ones follow.
pub const FIRST_VIRTIO_GSI: u32 = 5;

// The layout above does not overlap: checked when compiling.
const _: () = {
    assert!(BOOT_GDT_START + 6 * 8 <= BOOT_IDT_START);
    assert!(PVH_INFO_START + 56 <= PVH_MODLIST_START);
    assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
    assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + 4 * 4096 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Errors booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file cannot be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an x86-64 ELF nor a bzImage.
    #[error("kernel {0} is neither an x86-64 ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What linux-loader said.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// A bzImage older than boot protocol 2.12, or without a 64-bit entry.
    #[error(
        "bzImage {0} has no 64-bit entry point (boot protocol 2.12 with XLF_KERNEL_64 needed)"
    )]
    No64BitEntry(PathBuf),
    /// Guest memory is too small for the kernel, initramfs and boot data.
    #[error("{what} needs at least {needed_mib} MiB of guest memory; the VM has {have_mib} MiB")]
    MemoryTooSmall {
        /// What did not fit.
        what: &'static str,
        /// MiB that would do.
        needed_mib: u64,
        /// MiB the VM has.
        have_mib: u64,
    },
    /// The command line is invalid or too long.
    #[error(
        "the kernel command line is invalid or longer than this kernel takes ({capacity} bytes \
         with its NUL): check boot.linux.cmdline"
    )]
    Cmdline {
        /// Bytes the kernel takes, NUL included.
        capacity: usize,
        /// What linux-loader said.
        #[source]
        source: linux_loader::cmdline::Error,
    },
    /// The command line could not be written at [`CMDLINE_START`].
    #[error(
        "cannot write the kernel command line into guest memory at {CMDLINE_START:#x}: \
         this is a capsid-vmm bug, please report it"
    )]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// Writing boot data into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    Write(&'static str),
    /// Too many memory map entries for the boot structures.
    #[error("memory map has {0} entries, more than the boot structures hold")]
    TooManyRegions(usize),
    /// Too many vCPUs for the MP table.
    #[error("{0} vCPUs do not fit the MP table")]
    TooManyCpus(u8),
}

/// Result of boot operations.
pub type Result<T> = std::result::Result<T, BootError>;

/// One entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map handed to the kernel, for `ram` as laid out by
/// `vstate::memory` (RAM regions as (start, length)): conventional memory
/// below the EBDA, the EBDA reserved (it holds the MP table), then every
/// byte of RAM from 1 MiB up. The VGA hole and BIOS area between 640 KiB
/// and 1 MiB are left out, as on a PC.
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<MemoryMapEntry> {
    let mut map = Vec::new();
    for &(start, len) in ram {
        let end = start.saturating_add(len);
        if start < EBDA_START {
            map.push(MemoryMapEntry {
                addr: start,
                size: end.min(EBDA_START) - start,
                kind: E820_RAM,
            });
            if end > EBDA_START {
                map.push(MemoryMapEntry {
                    addr: EBDA_START,
                    size: EBDA_END - EBDA_START,
                    kind: E820_RESERVED,
                });
            }
        }
        let high = start.max(HIGH_MEMORY_START);
        if end > high {
            map.push(MemoryMapEntry {
                addr: high,
                size: end - high,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_of_small_vm() {
        let map = memory_map(&[(0, 256 << 20)]);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: EBDA_START,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                MemoryMapEntry {
                    addr: HIGH_MEMORY_START,
                    size: (256 << 20) - HIGH_MEMORY_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn memory_map_of_large_vm_has_ram_above_4g() {
        let map = memory_map(&[(0, 0xc000_0000), (1 << 32, 1 << 30)]);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            MemoryMapEntry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: E820_RAM
            }
        );
        assert_eq!(map[2].addr + map[2].size, 0xc000_0000);
    }

    #[test]
    fn memory_map_of_tiny_vm_has_no_high_memory() {
        let map = memory_map(&[(0, 1 << 20)]);
        assert_eq!(map.len(), 2);
    }
}
