//! The Intel MultiProcessor table (MP spec 1.4, chapter 4): how a kernel
//! without ACPI learns about the vCPUs, the IOAPIC and how ISA interrupt
//! lines reach it. Without it Linux runs on one CPU with the legacy PIC
//! only (IRQs 0–15); with it, every vCPU comes up and each virtio-mmio
//! line goes through the IOAPIC.
//!
//! Built as bytes by a pure function (the same recipe as Firecracker's
//! `arch/x86_64/mptable.rs`), written to [`MPTABLE_START`] by the caller.

use super::layout::{EBDA_END, IOAPIC_PINS, IOAPIC_START, LAPIC_START, MPTABLE_START};
use crate::machine::MAX_CPUS;

// MP spec 1.4 table 4-3 entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Table 4-7 / 4-11 interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
// Processor entry: "enabled" and "bootstrap processor" flags (table 4-4).
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 in the signature: any modern CPU; Linux only prints it.
const CPU_STEPPING: u32 = 0x600;
/// Feature flags of the processor entry: FPU and on-chip APIC (CPUID.1:EDX).
const CPU_FEATURES: u32 = 0x001 | 0x200;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Destination "all local APICs" for the NMI entry (table 4-11).
const ALL_LAPICS: u8 = 0xff;
const SPEC_REV: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{cpus} vCPUs requested; the built-in VMM supports 1 to {MAX_CPUS}")]
    Cpus { cpus: u8 },
}

/// The whole MP structure: floating pointer, then the configuration table
/// it points at, to be written at [`MPTABLE_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::Cpus { cpus });
    }
    let ioapic_id = cpus; // APIC ids 0..cpus are the vCPUs'.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // Polarity and trigger "conforming to the bus" (flags 0): edge,
        // active high for ISA, which is how irqfd delivers.
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, ALL_LAPICS, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUNASRT ");
    table.extend_from_slice(b"BUILTIN VMM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((MPTABLE_START as usize + FLOATING_POINTER_LEN) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = the table above, no IMCR
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    debug_assert!(MPTABLE_START + fp.len() as u64 <= EBDA_END);
    Ok(fp)
}

/// The byte that makes a structure's bytes sum to zero (MP spec 4.1).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn one_cpu_table_is_exact() {
        let t = build(1).unwrap();
        // Floating pointer: signature, pointer to the table right after it.
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
        assert_eq!(&t[8..10], &[1, 4]);
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(len, 44 + 20 + 8 + 8 + 24 * 8 + 2 * 8);
        assert_eq!(sum(table), 0);
        assert_eq!(u16::from_le_bytes(table[34..36].try_into().unwrap()), 1 + 1 + 1 + 24 + 2);
        assert_eq!(u32::from_le_bytes(table[36..40].try_into().unwrap()), 0xfee0_0000);
        // The processor entry: BSP, enabled, APIC id 0.
        assert_eq!(&table[44..48], &[MP_PROCESSOR, 0, APIC_VERSION, CPU_ENABLED | CPU_BSP]);
        // The bus, then the IOAPIC with id 1 at its default base.
        assert_eq!(&table[64..72], b"\x01\x00ISA   ");
        assert_eq!(&table[72..80], &[MP_IOAPIC, 1, IOAPIC_VERSION, 1, 0x00, 0x00, 0xc0, 0xfe]);
        // IRQ 5 (the first virtio disk) goes to IOAPIC 1 pin 5.
        assert_eq!(&table[80 + 5 * 8..80 + 6 * 8], &[MP_INTSRC, MP_INT, 0, 0, 0, 5, 1, 5]);
        assert_eq!(&table[len - 16..], &[4, 3, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0, 0xff, 1]);
    }

    #[test]
    fn every_cpu_gets_an_entry_and_only_the_first_boots() {
        for cpus in [2u8, 4, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert!(MPTABLE_START + t.len() as u64 <= EBDA_END, "{cpus} cpus overflow base memory");
            assert_eq!(sum(&t[16..]), 0);
            let flags: Vec<u8> = (0..cpus as usize).map(|i| t[16 + 44 + i * 20 + 3]).collect();
            assert_eq!(flags[0], 3);
            assert!(flags[1..].iter().all(|&f| f == 1), "{flags:?}");
            let ids: Vec<u8> = (0..cpus as usize).map(|i| t[16 + 44 + i * 20 + 1]).collect();
            assert_eq!(ids, (0..cpus).collect::<Vec<_>>());
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert_eq!(build(0), Err(Error::Cpus { cpus: 0 }));
        assert_eq!(build(MAX_CPUS + 1), Err(Error::Cpus { cpus: MAX_CPUS + 1 }));
    }
}
