//! The processor state a kernel is entered with: GDT, IDT, identity page
//! tables, and the special registers that point at them.
//!
//! * 64-bit boot protocol (Documentation/x86/boot.rst, "64-bit Boot
//!   Protocol"): long mode with paging on; a GDT with flat 4 GiB
//!   descriptors at `__BOOT_CS` (0x10, execute/read) and `__BOOT_DS` (0x18,
//!   read/write); CS = `__BOOT_CS`, DS = ES = SS = `__BOOT_DS`; the kernel,
//!   zero page and command line identity-mapped (here: the whole first
//!   4 GiB with 2 MiB pages).
//! * PVH (Xen `hvm_start_info` ABI): 32-bit protected mode, paging off;
//!   CS a 32-bit flat execute/read segment, DS/ES/SS flat read/write; TR a
//!   32-bit TSS with base 0 and limit 0x67; CR4 all clear.

use kvm_bindings::{kvm_dtable, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    BootError, Result, BOOT_GDT_START, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START,
};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Long mode, through our page tables (64-bit boot protocol).
    Long,
    /// 32-bit protected mode without paging (PVH).
    Protected32,
}

/// `__BOOT_CS`: the code segment selector.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: the data segment selector.
pub const BOOT_DS: u16 = 0x18;
/// The TSS selector.
pub const BOOT_TSS: u16 = 0x20;
/// GDT entries: null, unused, code, data, TSS (16 bytes in long mode).
pub const GDT_ENTRIES: usize = 6;

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.NW: not write-through.
pub const X86_CR0_NW: u64 = 1 << 29;
/// CR0.CD: cache disable.
pub const X86_CR0_CD: u64 = 1 << 30;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Page table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry flag: 2 MiB page.
const PDE_PAGE_SIZE: u64 = 0x80;

/// A GDT descriptor from access/flags bits (`flags` holds the access byte
/// in bits 0-7 and the G/DB/L/AVL nibble in bits 12-15), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The GDT for `mode`.
pub fn gdt(mode: EntryMode) -> [u64; GDT_ENTRIES] {
    let code = match mode {
        // G, L, present, DPL 0, code: execute/read, accessed.
        EntryMode::Long => gdt_entry(0xa09b, 0, 0xfffff),
        // G, D (32-bit), present, DPL 0, code: execute/read, accessed.
        EntryMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        // G, B, present, DPL 0, data: read/write, accessed.
        gdt_entry(0xc093, 0, 0xfffff),
        // Present, busy TSS, base 0, limit 0x67 (byte granular); the upper
        // half of the 16-byte long-mode form follows as zero.
        gdt_entry(0x008b, 0, 0x67),
        0,
    ]
}

/// The `kvm_segment` that loading `selector` from a GDT holding `entry`
/// would produce.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT for `mode`.
pub fn write_gdt_idt(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<()> {
    for (i, entry) in gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| BootError::Write("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::Write("the IDT"))
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let err = |_| BootError::Write("the page tables");
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err)?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + gib * 8))
            .map_err(err)?;
        let mut table = [0u8; 4096];
        for (i, e) in table.chunks_exact_mut(8).enumerate() {
            let phys = (gib << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(phys | PDE_PAGE_SIZE | PTE_PRESENT_RW).to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd)).map_err(err)?;
    }
    Ok(())
}

/// The special registers of the boot vCPU entering in `mode`, starting
/// from what KVM reports (`base`).
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let table = gdt(mode);
    let code = segment(table[2], BOOT_CS);
    let data = segment(table[3], BOOT_DS);
    let tss = segment(table[4], BOOT_TSS);
    sregs.gdt = kvm_dtable {
        base: BOOT_GDT_START,
        limit: u16::try_from(8 * GDT_ENTRIES - 1).unwrap_or(u16::MAX),
        padding: [0; 3],
    };
    sregs.idt = kvm_dtable {
        base: BOOT_IDT_START,
        limit: 7,
        padding: [0; 3],
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // Protected mode with caches on, as firmware hands over.
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !(X86_CR0_CD | X86_CR0_NW);
    match mode {
        EntryMode::Long => {
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Protected32 => {
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.cr0 &= !X86_CR0_PG;
            sregs.efer = 0;
        }
    }
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_as_intended() {
        let t = gdt(EntryMode::Long);
        let cs = segment(t[2], BOOT_CS);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.g, cs.s, cs.present),
            (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1)
        );
        let ds = segment(t[3], BOOT_DS);
        assert_eq!(
            (ds.limit, ds.type_, ds.db, ds.g, ds.l),
            (0xffff_ffff, 0x3, 1, 1, 0)
        );
        let tr = segment(t[4], BOOT_TSS);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.present, tr.g),
            (0, 0x67, 0xb, 0, 1, 0)
        );
        let cs32 = segment(gdt(EntryMode::Protected32)[2], BOOT_CS);
        assert_eq!((cs32.l, cs32.db, cs32.limit), (0, 1, 0xffff_ffff));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn selectors_match_the_boot_protocol() {
        // __BOOT_CS and __BOOT_DS are entries 2 and 3.
        assert_eq!(usize::from(BOOT_CS) / 8, 2);
        assert_eq!(usize::from(BOOT_DS) / 8, 3);
    }

    #[test]
    fn long_mode_sregs() {
        let base = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        let s = boot_sregs(base, EntryMode::Long);
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(s.cr4, X86_CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ss.selector, BOOT_DS);
        let p = boot_sregs(base, EntryMode::Protected32);
        assert_eq!(p.cr0 & X86_CR0_PG, 0);
        assert_eq!(p.cr4, 0);
        assert_eq!(p.efer, 0);
        assert_eq!(p.tr.limit, 0x67);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for gib in 0..4 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + gib * 0x1000) | 3);
        }
        // The entry mapping 0xfee00000 (the LAPIC).
        let idx = 0xfee0_0000u64 >> 21;
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + idx * 8)).unwrap();
        assert_eq!(pde, 0xfee0_0000 | 0x83);
    }
}
