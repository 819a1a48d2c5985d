//! Loading a Linux kernel (ELF vmlinux or bzImage, through linux-loader)
//! and its initramfs, and putting everything else the kernel is handed in
//! place: command line, zero page or PVH start info, MP table, GDT and page
//! tables.
//!
//! Before anything is loaded the image is probed for how much memory it
//! needs, so a VM too small for its kernel fails with that said plainly.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::params;
use super::tables::{self, EntryMode};
use super::{
    mptable, BootError, MemoryMapEntry, Result, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START,
};

/// `initrd_addr_max` of kernels that do not state one (boot protocol
/// before 2.03, and ELF images, which carry no setup header).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Offset of the 64-bit entry point from a bzImage's protected-mode code.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// ELF machine number of x86-64.
const EM_X86_64: u16 = 62;
/// Program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// Program headers read at most while probing.
const MAX_PROGRAM_HEADERS: u16 = 256;
const PAGE: u64 = 0x1000;
const MIB: u64 = 1 << 20;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Guest-physical entry address.
    pub addr: u64,
    /// Long mode with a zero page in RSI, or PVH with start info in RBX.
    pub mode: EntryMode,
}

/// What loading a kernel produced.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where and how to enter it.
    pub entry: BootEntry,
    /// The bzImage's setup header (None for ELF images).
    pub setup_header: Option<setup_header>,
    /// First byte above everything the kernel occupies while starting
    /// (for a bzImage: the decompression buffer).
    pub reserved_end: u64,
    /// Highest address the initramfs may occupy.
    pub initrd_addr_max: u64,
}

/// A kernel image's format and needs, read from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Elf {
        needed_end: u64,
    },
    BzImage {
        needed_end: u64,
        initrd_addr_max: u64,
    },
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// Reads the headers of `file` (positioned anywhere) and says what it is.
fn probe(file: &mut File, path: &Path) -> Result<Probe> {
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let not_a_kernel = || BootError::NotAKernel(path.to_path_buf());
    let mut head = vec![0u8; 0x268];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let n = read_up_to(file, &mut head).map_err(read_err)?;
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        // 64-bit, little-endian, x86-64.
        if head.get(4) != Some(&2) || head.get(5) != Some(&1) {
            return Err(not_a_kernel());
        }
        if le16(&head, 18) != Some(EM_X86_64) {
            return Err(not_a_kernel());
        }
        let phoff = le64(&head, 0x20).ok_or_else(not_a_kernel)?;
        let phnum = le16(&head, 0x38).ok_or_else(not_a_kernel)?;
        let mut needed_end = 0u64;
        let mut phdr = [0u8; 56];
        for i in 0..phnum.min(MAX_PROGRAM_HEADERS) {
            let at = phoff
                .checked_add(u64::from(i) * 56)
                .ok_or_else(not_a_kernel)?;
            file.seek(SeekFrom::Start(at)).map_err(read_err)?;
            file.read_exact(&mut phdr).map_err(|_| not_a_kernel())?;
            if le32(&phdr, 0) != Some(PT_LOAD) {
                continue;
            }
            let paddr = le64(&phdr, 0x18).ok_or_else(not_a_kernel)?;
            let memsz = le64(&phdr, 0x28).ok_or_else(not_a_kernel)?;
            needed_end = needed_end.max(paddr.checked_add(memsz).ok_or_else(not_a_kernel)?);
        }
        return Ok(Probe::Elf { needed_end });
    }
    // bzImage: boot sector signature and the "HdrS" setup header.
    if le16(&head, 0x1fe) != Some(0xaa55) || le32(&head, 0x202) != Some(0x5372_6448) {
        return Err(not_a_kernel());
    }
    let file_len = file.metadata().map_err(read_err)?.len();
    let version = le16(&head, 0x206).unwrap_or(0);
    let setup_sects = match head.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => u64::from(n),
    };
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    let mut needed_end = HIGH_MEMORY_START + payload;
    if version >= 0x020a {
        let pref = le64(&head, 0x258).unwrap_or(0);
        let init_size = u64::from(le32(&head, 0x260).unwrap_or(0));
        needed_end = needed_end.max(pref.max(HIGH_MEMORY_START).saturating_add(init_size));
    }
    let initrd_addr_max = if version >= 0x0203 {
        u64::from(le32(&head, 0x22c).unwrap_or(0))
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    Ok(Probe::BzImage {
        needed_end,
        initrd_addr_max,
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel at `path` into `mem`, whose low RAM ends at
/// `low_ram_end`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, low_ram_end: u64) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(|source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    })?;
    let probed = probe(&mut file, path)?;
    let needed_end = match probed {
        Probe::Elf { needed_end } | Probe::BzImage { needed_end, .. } => needed_end,
    };
    if needed_end > low_ram_end {
        return Err(BootError::MemoryTooSmall {
            what: "the kernel",
            needed_mib: mib_up(needed_end),
            have_mib: mib_up(mem.last_addr().0 + 1),
        });
    }
    let load_err = |source: linux_loader::loader::Error| BootError::Load {
        path: path.to_path_buf(),
        source,
    };
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    match probed {
        Probe::Elf { .. } => {
            let r = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    addr: addr.0,
                    mode: EntryMode::Protected32,
                },
                _ => BootEntry {
                    addr: r.kernel_load.0,
                    mode: EntryMode::Long,
                },
            };
            Ok(LoadedKernel {
                entry,
                setup_header: None,
                reserved_end: r.kernel_end.max(needed_end),
                initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
            })
        }
        Probe::BzImage {
            initrd_addr_max, ..
        } => {
            let r = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| BootError::NotAKernel(path.to_path_buf()))?;
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(path.to_path_buf()));
            }
            Ok(LoadedKernel {
                entry: BootEntry {
                    addr: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    mode: EntryMode::Long,
                },
                setup_header: Some(hdr),
                reserved_end: r.kernel_end.max(needed_end),
                initrd_addr_max,
            })
        }
    }
}

/// Loads the initramfs at `path` as high as the kernel allows in low RAM,
/// above everything the kernel needs. Returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(u64, u64)> {
    let read_err = |source| BootError::Read {
        what: "initramfs",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let ceiling = low_ram_end.min(kernel.initrd_addr_max.saturating_add(1));
    let floor = kernel.reserved_end.next_multiple_of(PAGE);
    let addr = ceiling.checked_sub(size).map(|a| a & !(PAGE - 1));
    let Some(addr) = addr.filter(|a| *a >= floor) else {
        return Err(BootError::MemoryTooSmall {
            what: "the kernel with its initramfs",
            needed_mib: mib_up(floor + size),
            have_mib: mib_up(mem.last_addr().0 + 1),
        });
    };
    let len = usize::try_from(size).map_err(|_| BootError::Write("the initramfs"))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BootError::Write("the initramfs"))?;
    Ok((addr, size))
}

/// The top of the RAM a kernel given `cmdline` uses: its last `mem=`
/// (`nn[KMGTPE]`, decimal or `0x` hex, as the kernel's memparse reads
/// it), or `None`.
pub fn mem_limit(cmdline: &str) -> Option<u64> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|arg| arg.strip_prefix("mem="))
        .and_then(|v| {
            let digits_end = v
                .find(|c: char| !(c.is_ascii_hexdigit() || c == 'x' || c == 'X'))
                .unwrap_or(v.len());
            // A hex digit may also be a suffix letter only for `E`, which
            // the kernel reads as a digit in hex and a suffix in decimal.
            let (number, suffix) = v.split_at(digits_end);
            let (number, suffix) = match number.strip_prefix("0x").or(number.strip_prefix("0X")) {
                Some(hex) => (u64::from_str_radix(hex, 16).ok()?, suffix),
                None => {
                    let (n, s) = match number.strip_suffix(['e', 'E']) {
                        Some(n) if suffix.is_empty() => (n, "E"),
                        _ => (number, suffix),
                    };
                    (n.parse::<u64>().ok()?, s)
                }
            };
            let shift = match suffix {
                "" => 0,
                "k" | "K" => 10,
                "m" | "M" => 20,
                "g" | "G" => 30,
                "t" | "T" => 40,
                "p" | "P" => 50,
                "e" | "E" => 60,
                _ => return None,
            };
            number.checked_mul(1u64.checked_shl(shift)?)
        })
        .filter(|m| *m > 0)
}

/// The command-line capacity the kernel accepts (NUL included).
pub fn cmdline_capacity(kernel_header: Option<&setup_header>) -> usize {
    match kernel_header {
        Some(h) if h.version >= 0x0206 => {
            let size = h.cmdline_size;
            usize::try_from(size)
                .unwrap_or(usize::MAX)
                .saturating_add(1)
                .min(CMDLINE_MAX_SIZE)
        }
        Some(_) => 256,
        None => CMDLINE_MAX_SIZE,
    }
}

/// Everything a Linux boot needs besides the kernel itself.
#[derive(Debug)]
pub struct LinuxBoot<'a> {
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initramfs, if any.
    pub initramfs: Option<&'a Path>,
    /// The full command line.
    pub cmdline: &'a str,
    /// The guest's memory map.
    pub memory_map: &'a [MemoryMapEntry],
    /// Where low RAM ends.
    pub low_ram_end: u64,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
}

/// Loads kernel and initramfs and writes every boot structure; returns
/// how to enter the kernel.
pub fn load_linux(mem: &GuestMemoryMmap, boot: &LinuxBoot<'_>) -> Result<BootEntry> {
    let kernel = load_kernel(mem, boot.kernel, boot.low_ram_end)?;
    // A kernel told `mem=` uses RAM only below it: an initramfs above it
    // would be copied down by the kernel, and its first copy would stay
    // written in RAM the guest never frees, resident on the host (a VM
    // that boots small and adds memory as it grows). So it goes below,
    // when it fits there.
    let initrd = match boot.initramfs {
        Some(p) => {
            let below_mem = mem_limit(boot.cmdline)
                .filter(|m| *m < boot.low_ram_end)
                .and_then(|m| load_initramfs(mem, p, &kernel, m).ok());
            match below_mem {
                Some(placed) => Some(placed),
                None => Some(load_initramfs(mem, p, &kernel, boot.low_ram_end)?),
            }
        }
        None => None,
    };
    let capacity = cmdline_capacity(kernel.setup_header.as_ref());
    let invalid = |source| BootError::Cmdline { capacity, source };
    let cmdline = Cmdline::try_from(boot.cmdline, capacity).map_err(invalid)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::CmdlineWrite)?;
    let cmdline_len = cmdline.as_cstring().map_err(invalid)?.as_bytes().len();
    match kernel.entry.mode {
        EntryMode::Long => params::write_boot_params(
            mem,
            kernel.setup_header.as_ref(),
            initrd,
            cmdline_len,
            boot.memory_map,
        )?,
        EntryMode::Protected32 => params::write_pvh_start_info(mem, initrd, boot.memory_map)?,
    }
    mptable::write(mem, boot.vcpus)?;
    tables::write_gdt_idt(mem, kernel.entry.mode)?;
    if kernel.entry.mode == EntryMode::Long {
        tables::write_page_tables(mem)?;
    }
    tracing::info!(
        kernel = %boot.kernel.display(),
        entry = format_args!("{:#x}", kernel.entry.addr),
        mode = ?kernel.entry.mode,
        initramfs = ?initrd.map(|(a, s)| format!("{s} bytes at {a:#x}")),
        "kernel loaded"
    );
    Ok(kernel.entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// A minimal bzImage: boot sector with the setup header, one setup
    /// sector, and `payload` bytes of protected-mode code.
    pub(crate) fn tiny_bzimage(payload: &[u8], init_size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn memory(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    #[test]
    fn bzimage_loads_at_1mib_with_64bit_entry() {
        let mem = memory(64);
        let f = file(&tiny_bzimage(&[0x90; 0x400], 0x80_0000));
        let k = load_kernel(&mem, f.path(), 64 << 20).unwrap();
        assert_eq!(
            k.entry,
            BootEntry {
                addr: 0x10_0200,
                mode: EntryMode::Long
            }
        );
        assert_eq!(k.reserved_end, 0x180_0000);
        assert_eq!(k.initrd_addr_max, 0x7fff_ffff);
        assert_eq!(cmdline_capacity(k.setup_header.as_ref()), 2048);
    }

    #[test]
    fn bzimage_too_big_for_memory_says_so() {
        let mem = memory(16);
        let f = file(&tiny_bzimage(&[0x90; 0x400], 0x80_0000));
        let e = load_kernel(&mem, f.path(), 16 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::MemoryTooSmall {
                    needed_mib: 24,
                    have_mib: 16,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn overlong_cmdline_names_the_capacity_and_keeps_the_loader_error() {
        let mem = memory(64);
        let f = file(&tiny_bzimage(&[0x90; 0x400], 0x80_0000));
        let cmdline = "x".repeat(3000);
        let boot = LinuxBoot {
            kernel: f.path(),
            initramfs: None,
            cmdline: &cmdline,
            memory_map: &[],
            low_ram_end: 64 << 20,
            vcpus: 1,
        };
        let e = load_linux(&mem, &boot).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::Cmdline {
                    capacity: 2048,
                    // linux-loader's word for "too long".
                    source: linux_loader::cmdline::Error::InvalidCapacity
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn old_bzimage_without_64bit_entry_is_refused() {
        let mem = memory(64);
        let mut img = tiny_bzimage(&[0x90; 0x400], 0x1000);
        img[0x236] = 0;
        let f = file(&img);
        let e = load_kernel(&mem, f.path(), 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::No64BitEntry(_)), "{e}");
    }

    #[test]
    fn junk_is_not_a_kernel() {
        let mem = memory(16);
        let f = file(b"#!/bin/sh\necho hello\n");
        let e = load_kernel(&mem, f.path(), 16 << 20).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)), "{e}");
        let mut elf32 = vec![0x7f, b'E', b'L', b'F', 1, 1, 1];
        elf32.resize(64, 0);
        let f = file(&elf32);
        let e = load_kernel(&mem, f.path(), 16 << 20).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)), "{e}");
        let e = load_kernel(&mem, Path::new("/nonexistent/vmlinux"), 16 << 20).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn mem_on_the_command_line_is_read_as_the_kernel_reads_it() {
        assert_eq!(mem_limit("console=ttyS0 mem=256M quiet"), Some(256 << 20));
        assert_eq!(mem_limit("mem=1G mem=512m"), Some(512 << 20));
        assert_eq!(mem_limit("mem=0x10000000"), Some(0x1000_0000));
        assert_eq!(mem_limit("mem=65536K"), Some(64 << 20));
        assert_eq!(mem_limit("mem=4096"), Some(4096));
        for none in [
            "",
            "quiet",
            "mem=",
            "mem=nopentium",
            "mem=12Q",
            "mem=0",
            "xmem=1G",
        ] {
            assert_eq!(mem_limit(none), None, "{none}");
        }
        assert_eq!(mem_limit("mem=99999999999E"), None);
    }

    #[test]
    fn initramfs_goes_high_but_above_the_kernel() {
        let mem = memory(64);
        let kernel = LoadedKernel {
            entry: BootEntry {
                addr: 0x100_0000,
                mode: EntryMode::Long,
            },
            setup_header: None,
            reserved_end: 0x200_0123,
            initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
        };
        let f = file(&[7u8; 5000]);
        let (addr, size) = load_initramfs(&mem, f.path(), &kernel, 64 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, ((64 << 20) - 5000) & !0xfff);
        // The cap of the kernel is honoured.
        let capped = LoadedKernel {
            initrd_addr_max: 0x2ff_ffff,
            ..kernel
        };
        let (addr, _) = load_initramfs(&mem, f.path(), &capped, 64 << 20).unwrap();
        assert!(addr + 5000 <= 0x300_0000);
        // No room between the kernel and the top: refused.
        let tight = LoadedKernel {
            reserved_end: (64 << 20) - 4096,
            ..kernel
        };
        let e = load_initramfs(&mem, f.path(), &tight, 64 << 20).unwrap_err();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
    }
}
