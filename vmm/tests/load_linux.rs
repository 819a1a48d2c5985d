//! capsid-vmm loading the real guest kernel built by `make kernel`
//! (build/kernel/vmlinux and bzImage) with the real initramfs, inspected in
//! guest memory and vCPU registers before the first KVM_RUN: everything
//! the boot protocols promise the kernel is checked byte by byte. (This
//! host's KVM cannot run a standard kernel; these checks do not need to.)

// Test code: unwrap is how a test fails, and the image offsets read here
// are small.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::PathBuf;

use capsid_vmm::boot::{
    CMDLINE_START, EBDA_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use capsid_vmm::builder::{self, BASE_CMDLINE};
use capsid_vmm::config::{from_json, VmConfig};
use vm_memory::{Bytes, GuestAddress};

fn artifact(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../build")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make kernel initramfs`",
        path.display()
    );
    path
}

fn config(kernel: &str, memory_mib: u32, vcpus: u8, dir: &std::path::Path) -> VmConfig {
    from_json(
        &serde_json::json!({
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "boot": {"linux": {
                "kernel": artifact(kernel),
                "initramfs": artifact("initramfs.cpio.gz"),
                "cmdline": "quiet",
            }},
            "rng": true,
            "vsock": {"guest_cid": 3, "uds_path": dir.join("v.sock")},
        })
        .to_string(),
    )
    .unwrap()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn read(mem: &vm_memory::GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn expected_cmdline() -> String {
    format!(
        "{BASE_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 quiet"
    )
}

fn check_initramfs(mem: &vm_memory::GuestMemoryMmap, addr: u64, size: u64, memory_mib: u64) {
    let file = std::fs::read(artifact("initramfs.cpio.gz")).unwrap();
    assert_eq!(size, file.len() as u64);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= memory_mib << 20);
    assert!(
        addr + size > (memory_mib << 20) - 4096,
        "initramfs not at the top of RAM"
    );
    assert_eq!(read(mem, addr, file.len()), file);
}

fn check_mptable(mem: &vm_memory::GuestMemoryMmap, vcpus: usize) {
    let mpf = read(mem, EBDA_START, 16);
    assert_eq!(&mpf[..4], b"_MP_");
    assert_eq!(mpf.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    let table = read(mem, u64::from(u32_at(&mpf, 4)), 44);
    assert_eq!(&table[..4], b"PCMP");
    let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
    let table = read(mem, u64::from(u32_at(&mpf, 4)), len);
    assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    // Processor entries (type 0, 20 bytes each) come first.
    let mut at = 44;
    let mut n = 0;
    while table[at] == 0 {
        n += 1;
        at += 20;
    }
    assert_eq!(n, vcpus);
}

#[test]
fn vmlinux_is_entered_through_pvh() {
    let dir = tempfile::tempdir().unwrap();
    let machine = builder::build(&config("kernel/vmlinux", 256, 2, dir.path())).unwrap();
    let mem = machine.memory();

    // Every PT_LOAD segment is where its physical address says.
    let file = std::fs::read(artifact("kernel/vmlinux")).unwrap();
    let phoff = u64_at(&file, 0x20) as usize;
    let phnum = usize::from(u16::from_le_bytes([file[0x38], file[0x39]]));
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = &file[phoff + i * 56..phoff + (i + 1) * 56];
        let (ty, off, paddr, filesz) = (
            u32_at(ph, 0),
            u64_at(ph, 8),
            u64_at(ph, 0x18),
            u64_at(ph, 0x20),
        );
        if ty == 1 {
            let n = filesz.min(64 * 1024) as usize;
            assert_eq!(
                read(mem, paddr, n),
                &file[off as usize..off as usize + n],
                "segment at {paddr:#x}"
            );
        }
        if ty == 4 {
            // Xen note type 18: the PVH entry.
            let note = &file[off as usize..(off + filesz) as usize];
            let mut at = 0;
            while at + 12 <= note.len() {
                let (namesz, descsz, nty) = (
                    u32_at(note, at) as usize,
                    u32_at(note, at + 4) as usize,
                    u32_at(note, at + 8),
                );
                let name_end = at + 12 + namesz.next_multiple_of(4);
                if nty == 18 && &note[at + 12..at + 15] == b"Xen" {
                    pvh_entry = Some(u64::from(u32_at(note, name_end)));
                }
                at = name_end + descsz.next_multiple_of(4);
            }
        }
    }
    let pvh_entry = pvh_entry.expect("vmlinux has a PVH note (CONFIG_PVH)");

    // hvm_start_info, module, memory map.
    let info = read(mem, PVH_INFO_START, 56);
    assert_eq!(u32_at(&info, 0), 0x336e_c578);
    assert_eq!(u32_at(&info, 4), 1);
    assert_eq!(u32_at(&info, 12), 1);
    assert_eq!(u64_at(&info, 16), PVH_MODLIST_START);
    assert_eq!(u64_at(&info, 24), CMDLINE_START);
    assert_eq!(u64_at(&info, 32), 0, "no RSDP: no ACPI");
    assert_eq!(u64_at(&info, 40), PVH_MEMMAP_START);
    assert_eq!(u32_at(&info, 48), 3);
    let module = read(mem, PVH_MODLIST_START, 32);
    check_initramfs(mem, u64_at(&module, 0), u64_at(&module, 8), 256);
    let map = read(mem, PVH_MEMMAP_START, 72);
    assert_eq!(
        (u64_at(&map, 48), u64_at(&map, 56), u32_at(&map, 64)),
        (0x10_0000, (256 << 20) - 0x10_0000, 1)
    );

    let cmdline = expected_cmdline();
    let got = read(mem, CMDLINE_START, cmdline.len() + 1);
    assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(got[cmdline.len()], 0);
    check_mptable(mem, 2);

    // The boot vCPU: 32-bit protected mode, no paging, EBX = start info.
    let bsp = &machine.vcpus()[0];
    let regs = bsp.fd().get_regs().unwrap();
    assert_eq!(regs.rip, pvh_entry);
    assert_eq!(regs.rbx, PVH_INFO_START);
    assert_eq!(regs.rflags & (1 << 9), 0, "interrupts off");
    let sregs = bsp.fd().get_sregs().unwrap();
    assert_eq!(sregs.cr0 & 1, 1);
    assert_eq!(sregs.cr0 & (1 << 31), 0);
    assert_eq!(sregs.cr4, 0);
    assert_eq!(
        (sregs.cs.db, sregs.cs.l, sregs.cs.base, sregs.cs.limit),
        (1, 0, 0, 0xffff_ffff)
    );
    assert_eq!(
        (sregs.tr.base, sregs.tr.limit, sregs.tr.type_),
        (0, 0x67, 0xb)
    );
    // CPUID as the guest will see it: APIC ids and the hypervisor leaf.
    let lapic = machine.vcpus()[1].fd().get_lapic().unwrap();
    let lint0 = u32::from_le_bytes([
        lapic.regs[0x350] as u8,
        lapic.regs[0x351] as u8,
        lapic.regs[0x352] as u8,
        lapic.regs[0x353] as u8,
    ]);
    assert_eq!((lint0 >> 8) & 7, 7, "LINT0 is ExtINT");
}

#[test]
fn bzimage_is_entered_through_the_64bit_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let machine = builder::build(&config("kernel/bzImage", 128, 1, dir.path())).unwrap();
    let mem = machine.memory();
    let file = std::fs::read(artifact("kernel/bzImage")).unwrap();
    let setup_sects = usize::from(file[0x1f1]);
    let setup_len = (setup_sects + 1) * 512;

    // The protected-mode kernel at 1 MiB.
    let n = 256 * 1024;
    assert_eq!(read(mem, 0x10_0000, n), &file[setup_len..setup_len + n]);

    let zp = read(mem, ZERO_PAGE_START, 4096);
    // The setup header is the image's own (boot.rst: copy it), then the
    // loader's fields.
    assert_eq!(zp[0x1f1], file[0x1f1]);
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(&zp[0x206..0x208], &file[0x206..0x208]);
    assert_eq!(&zp[0x260..0x264], &file[0x260..0x264], "init_size");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    assert_eq!(u32_at(&zp, 0x228), CMDLINE_START as u32);
    check_initramfs(
        mem,
        u64::from(u32_at(&zp, 0x218)),
        u64::from(u32_at(&zp, 0x21c)),
        128,
    );
    // The initramfs stays clear of the decompression buffer.
    let init_size = u64::from(u32_at(&file, 0x260));
    let pref = u64_at(&file, 0x258);
    assert!(u64::from(u32_at(&zp, 0x218)) >= pref + init_size);
    assert_eq!(zp[0x1e8], 3);
    assert_eq!(u64_at(&zp, 0x2d0 + 40), 0x10_0000);
    assert_eq!(u64_at(&zp, 0x2d0 + 48), (128 << 20) - 0x10_0000);
    let cmdline = expected_cmdline();
    assert_eq!(
        &read(mem, CMDLINE_START, cmdline.len())[..],
        cmdline.as_bytes()
    );
    check_mptable(mem, 1);

    let bsp = &machine.vcpus()[0];
    let regs = bsp.fd().get_regs().unwrap();
    assert_eq!(regs.rip, 0x10_0200, "startup_64 of the bzImage");
    assert_eq!(regs.rsi, ZERO_PAGE_START);
    let sregs = bsp.fd().get_sregs().unwrap();
    assert_eq!(sregs.efer & 0x500, 0x500, "long mode");
    assert_eq!((sregs.cs.selector, sregs.cs.l), (0x10, 1));
    assert_eq!(sregs.ds.selector, 0x18);
    // The identity map covers the kernel, the zero page and the command line.
    let pml4: u64 = mem.read_obj(GuestAddress(sregs.cr3)).unwrap();
    let pdpt = pml4 & !0xfff;
    let pd: u64 = mem.read_obj(GuestAddress(pdpt)).unwrap();
    // The 2 MiB page holding the decompressed kernel at 16 MiB.
    let index = 0x100_0000u64 >> 21;
    let pde: u64 = mem
        .read_obj(GuestAddress((pd & !0xfff) + 8 * index))
        .unwrap();
    assert_eq!(pde, 0x100_0000 | 0x83);
}
