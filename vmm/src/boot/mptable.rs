//! The MP table (Intel MultiProcessor Specification 1.4): how a guest
//! without ACPI finds its CPUs, its IOAPIC and how ISA interrupts reach it.
//!
//! The floating pointer structure sits at the start of the EBDA, where
//! Linux scans for it, followed by the configuration table: one processor
//! entry per vCPU (APIC id = vCPU index, the first one the BSP), one ISA
//! bus, the IOAPIC, an I/O interrupt entry per IOAPIC pin (ISA IRQ n →
//! pin n, as KVM's default routing has it), and the local interrupts
//! (ExtINT on LINT0, NMI on LINT1) that the vCPUs' LAPICs are set up with.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, Result, APIC_START, EBDA_END, EBDA_START, IOAPIC_PINS, IOAPIC_START};

/// Floating pointer structure length.
const MPF_LEN: usize = 16;
/// Configuration table header length.
const MPC_HEADER_LEN: usize = 44;
/// Entry type: processor (20 bytes).
const MP_PROCESSOR: u8 = 0;
/// Entry type: bus (8 bytes).
const MP_BUS: u8 = 1;
/// Entry type: IOAPIC (8 bytes).
const MP_IOAPIC: u8 = 2;
/// Entry type: I/O interrupt assignment (8 bytes).
const MP_INTSRC: u8 = 3;
/// Entry type: local interrupt assignment (8 bytes).
const MP_LINTSRC: u8 = 4;
/// Interrupt type: vectored interrupt.
const MP_INT: u8 = 0;
/// Interrupt type: NMI.
const MP_NMI: u8 = 1;
/// Interrupt type: external (8259) interrupt.
const MP_EXTINT: u8 = 3;
/// Processor flags: usable.
const CPU_ENABLED: u8 = 1;
/// Processor flags: the bootstrap processor.
const CPU_BOOTPROCESSOR: u8 = 2;
/// Local APIC version reported (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version reported (KVM's IOAPIC).
const IOAPIC_VERSION: u8 = 0x11;
/// Processor signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// Processor feature flags: FPU and APIC (CPUID.1:EDX bits 0 and 9).
const CPU_FEATURES: u32 = 0x201;
/// MP spec revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// The ISA bus's id.
const BUS_ID_ISA: u8 = 0;

/// The IOAPIC's APIC id: the first one after the vCPUs'.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// A physical address the MP spec stores in 32 bits.
fn addr32(addr: u64) -> Result<u32> {
    u32::try_from(addr).map_err(|_| BootError::Write("the MP table"))
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer and configuration table for `vcpus` CPUs, as
/// the bytes to write at [`EBDA_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>> {
    // APIC ids are one byte and the IOAPIC takes the next one.
    if vcpus == 0 || vcpus >= 0xfe {
        return Err(BootError::TooManyCpus(vcpus));
    }
    let table_addr = EBDA_START + MPF_LEN as u64;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(vcpus);
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&addr32(IOAPIC_START)?.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Polarity and trigger mode "conforming to the bus": ISA, so
        // active high, edge triggered, which is what irqfd delivers.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, BUS_ID_ISA, pin, ioapic, pin]);
        count += 1;
    }
    // LINT0: ExtINT to the BSP (the virtual-wire 8259 path); LINT1: NMI
    // to every CPU.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, BUS_ID_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_len = MPC_HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(
        &u16::try_from(table_len)
            .map_err(|_| BootError::TooManyCpus(vcpus))?
            .to_le_bytes(),
    );
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"CAPSID  ");
    table.extend_from_slice(b"CAPSID-VMM  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&addr32(APIC_START)?.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_LEN + table.len());
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&addr32(table_addr)?.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    if EBDA_START + mpf.len() as u64 > EBDA_END {
        return Err(BootError::TooManyCpus(vcpus));
    }
    Ok(mpf)
}

/// Writes the MP table for `vcpus` CPUs into the EBDA.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<()> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|_| BootError::Write("the MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers() {
        let t = build(2).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, EBDA_START + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, bus, IOAPIC, 24 pins, 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xfee0_0000
        );
    }

    #[test]
    fn processors_and_ioapic() {
        let t = build(3).unwrap();
        let e = &t[16 + MPC_HEADER_LEN..];
        assert_eq!(
            &e[..4],
            &[
                MP_PROCESSOR,
                0,
                APIC_VERSION,
                CPU_ENABLED | CPU_BOOTPROCESSOR
            ]
        );
        assert_eq!(&e[20..24], &[MP_PROCESSOR, 1, APIC_VERSION, CPU_ENABLED]);
        assert_eq!(&e[40..44], &[MP_PROCESSOR, 2, APIC_VERSION, CPU_ENABLED]);
        assert_eq!(&e[60..68], b"\x01\x00ISA   ");
        assert_eq!(&e[68..72], &[MP_IOAPIC, 3, IOAPIC_VERSION, 1]);
        assert_eq!(
            u32::from_le_bytes(e[72..76].try_into().unwrap()),
            0xfec0_0000
        );
        // IRQ 5 → IOAPIC 3 pin 5.
        assert_eq!(
            &e[76 + 5 * 8..76 + 6 * 8],
            &[MP_INTSRC, MP_INT, 0, 0, 0, 5, 3, 5]
        );
    }

    #[test]
    fn largest_vm_fits_the_ebda() {
        assert!(build(crate::config::MAX_VCPUS).is_ok());
        assert!(build(0).is_err());
        assert!(build(0xfe).is_err());
    }
}
