//! What the kernel is handed at entry: the zero page (`struct
//! boot_params`, Documentation/x86/zero-page.rst and boot.rst) for the
//! 64-bit boot protocol, or `struct hvm_start_info` with its memory map
//! and module list for PVH (xen/include/public/arch-x86/hvm/start_info.h).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    BootError, MemoryMapEntry, Result, CMDLINE_MAX_SIZE, CMDLINE_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// `boot_flag`: the boot sector signature.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: a boot loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` stated for ELF images (CONFIG_PHYSICAL_ALIGN's
/// usual 16 MiB).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// `loadflags`: the protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 1;
/// Boot protocol version stated for ELF images (which carry no header).
pub const BOOT_PROTOCOL_VERSION: u16 = 0x020f;
/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Entries the zero page's e820 table holds.
pub const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Fills and writes the zero page. `header` is the bzImage's setup header
/// (copied as the protocol asks); for an ELF image one is made up.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<&setup_header>,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    map: &[MemoryMapEntry],
) -> Result<()> {
    let params = boot_params_for(header, initrd, cmdline_len, map)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write("the zero page"))
}

/// The zero page contents (see [`write_boot_params`]).
pub fn boot_params_for(
    header: Option<&setup_header>,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    map: &[MemoryMapEntry],
) -> Result<boot_params> {
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TooManyRegions(map.len()));
    }
    let mut params = boot_params::default();
    match header {
        Some(h) => params.hdr = *h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.version = BOOT_PROTOCOL_VERSION;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.loadflags = LOADED_HIGH;
            params.hdr.cmdline_size = u32::try_from(CMDLINE_MAX_SIZE - 1).unwrap_or(u32::MAX);
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // "normal" video mode: the kernel asks nothing of the (absent) VGA.
    params.hdr.vid_mode = 0xffff;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    // The kernel reads up to its own limit; the loader states the length.
    params.hdr.cmdline_size = params
        .hdr
        .cmdline_size
        .max(u32::try_from(cmdline_len).unwrap_or(u32::MAX));
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = (addr & 0xffff_ffff) as u32;
        params.hdr.ramdisk_size = (size & 0xffff_ffff) as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries =
        u8::try_from(map.len()).map_err(|_| BootError::TooManyRegions(map.len()))?;
    Ok(params)
}

/// Writes `hvm_start_info`, the module list (the initramfs) and the memory
/// map for a PVH entry.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    map: &[MemoryMapEntry],
) -> Result<()> {
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyRegions(map.len()));
    }
    let err = |_| BootError::Write("the PVH start info");
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + 24 * i as u64))
            .map_err(err)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: 0,
        modlist_paddr: 0,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(map.len())
            .map_err(|_| BootError::TooManyRegions(map.len()))?,
        reserved: 0,
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(err)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::{memory_map, E820_RAM, E820_RESERVED};

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_for_an_elf_kernel() {
        let mem = memory();
        let map = memory_map(&[(0, 64 << 20)]);
        write_boot_params(&mem, None, Some((0x300_0000, 0x1234)), 40, &map).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let h = p.hdr;
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!({ h.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ h.type_of_loader }, 0xff);
        assert_eq!(u64::from(h.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ h.ramdisk_image }, 0x300_0000);
        assert_eq!({ h.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[1];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (0x9_fc00, 0x400, E820_RESERVED)
        );
        let e = p.e820_table[2];
        assert_eq!(({ e.addr }, { e.r#type }), (0x10_0000, E820_RAM));
        // Byte offsets fixed by Documentation/x86/zero-page.rst.
        let mut raw = [0u8; 4096];
        vm_memory::Bytes::read_slice(&mem, &mut raw, GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(raw[0x1e8], 3);
        assert_eq!(&raw[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(&raw[0x202..0x206], b"HdrS");
        assert_eq!(raw[0x210], 0xff);
        assert_eq!(
            u32::from_le_bytes(raw[0x228..0x22c].try_into().unwrap()),
            0x2_0000
        );
        assert_eq!(
            u32::from_le_bytes(raw[0x218..0x21c].try_into().unwrap()),
            0x300_0000
        );
        assert_eq!(
            u64::from_le_bytes(raw[0x2d0 + 40..0x2d0 + 48].try_into().unwrap()),
            0x10_0000
        );
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            version: 0x020f,
            setup_sects: 27,
            init_size: 0x123_4000,
            ..Default::default()
        };
        let p = boot_params_for(Some(&hdr), None, 10, &[]).unwrap();
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.init_size }, 0x123_4000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn pvh_start_info() {
        let mem = memory();
        let map = memory_map(&[(0, 64 << 20)]);
        write_pvh_start_info(&mem, Some((0x300_0000, 99)), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 3);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 99));
        let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + 48)).unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (0x10_0000, (64 << 20) - 0x10_0000, 1)
        );
    }

    #[test]
    fn too_many_regions_are_refused() {
        let map = vec![
            MemoryMapEntry {
                addr: 0,
                size: 1,
                kind: 1
            };
            200
        ];
        assert!(boot_params_for(None, None, 0, &map).is_err());
        assert!(write_pvh_start_info(&memory(), None, &map).is_err());
    }
}
