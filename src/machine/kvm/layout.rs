//! Where everything lives in the guest: every guest-physical address, I/O
//! port and interrupt line the built-in VMM uses, in one place.
//!
//! Low memory follows the x86 boot protocol's conventions (Documentation/
//! arch/x86/boot.rst) and Firecracker's `arch/x86_64/layout.rs`: the boot
//! structures sit below 640 KiB, the kernel above 1 MiB, the devices in a
//! 32-bit MMIO gap below 4 GiB that RAM skips over.

/// Real-mode interrupt vector table and BIOS data area: never RAM we hand
/// out, but the kernel expects to be able to read it.
pub const REAL_MODE_START: u64 = 0x0;

/// The boot GDT: null, 64-bit code, data, TSS (four 8-byte entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: u64 = 4;
/// The (empty) boot IDT: the kernel installs its own before enabling
/// interrupts; it only has to be loadable.
pub const BOOT_IDT_START: u64 = 0x520;

/// The zero page (`struct boot_params`, 4 KiB), passed in %rsi.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Bottom of the boot stack page; the stack grows down from
/// [`BOOT_STACK_POINTER`].
pub const BOOT_STACK_START: u64 = 0x8000;
/// Initial %rsp/%rbp (16-byte aligned, inside the stack page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity page tables for the 64-bit entry: one PML4, one PDPT and one
/// page directory of 2 MiB pages, mapping the first [`IDENTITY_MAP_SIZE`].
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The boot page tables map this much (512 × 2 MiB); the kernel builds its
/// own tables before touching anything above it.
pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;

/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86's COMMAND_LINE_SIZE: 2048 bytes including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The MP table (floating pointer + configuration table) lives in the last
/// KiB of base memory, the "EBDA" where Linux's `smp_scan_config` looks.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base memory (640 KiB): the VGA/BIOS hole follows.
pub const EBDA_END: u64 = 0xa0000;
/// Start of high memory: the bzImage protected-mode code is loaded here
/// (`code32_start`), and the ELF loader refuses entry points below it.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: RAM stops here and resumes at 4 GiB, so the
/// devices, the IOAPIC and the LAPIC have addresses a 32-bit driver can use.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Where RAM above the gap begins.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// First virtio-mmio device; device `i` is at `VIRTIO_MMIO_BASE + i *
/// VIRTIO_MMIO_SIZE` (virtio spec 1.2 §4.2.2: the register window is
/// 0x100 bytes plus config space; a page each keeps them aligned).
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window, as given in `virtio_mmio.device=`.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Virtio-mmio slots (one disk each). QEMU microvm has 8 as well, so a
/// job that fits one launcher fits the other.
pub const MAX_DISKS: usize = 8;

/// The IOAPIC's register window (its default base; the MP table says so).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Pins of KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS).
pub const IOAPIC_PINS: u8 = 24;
/// The local APIC's default base (MSR IA32_APIC_BASE).
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;
/// Three pages KVM needs for the real-mode TSS on Intel (KVM_SET_TSS_ADDR);
/// they must not overlap RAM or a device.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_TSS_SIZE: u64 = 0x3000;

/// COM1: the 8250 UART, our only console.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_SIZE: u16 = 8;
/// COM1's ISA interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// The i8042 keyboard controller: data port 0x60 … command port 0x64.
/// Only the reset command (0xfe to 0x64) matters: `reboot=k` uses it.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_SIZE: u16 = 5;

/// Ports KVM's in-kernel devices answer (PIT 0x40–0x43, the speaker port
/// 0x61 through KVM_PIT_SPEAKER_DUMMY, the two PICs): listed so the
/// overlap test covers them, never registered on our bus.
pub const PIT_PORT: u16 = 0x40;
pub const PIT_PORT_SIZE: u16 = 4;
pub const SPEAKER_PORT: u16 = 0x61;
pub const PIC_MASTER_PORT: u16 = 0x20;
pub const PIC_SLAVE_PORT: u16 = 0xa0;
pub const PIC_PORT_SIZE: u16 = 2;

/// Interrupt line of virtio-mmio slot `i` is `VIRTIO_IRQ_BASE + i`: the
/// first ISA line nothing else uses (0 timer, 1 keyboard, 2 cascade,
/// 3 COM2, 4 COM1). The MP table routes all of them through the IOAPIC.
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Guest-physical address of virtio-mmio slot `slot`.
pub const fn virtio_mmio_addr(slot: usize) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE
}

/// Interrupt line (GSI) of virtio-mmio slot `slot`.
pub const fn virtio_irq(slot: usize) -> u32 {
    VIRTIO_IRQ_BASE + slot as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every guest-physical range the VMM places something in.
    fn memory_ranges() -> Vec<(&'static str, u64, u64)> {
        let mut v = vec![
            ("real mode IVT/BDA", REAL_MODE_START, BOOT_GDT_START),
            ("gdt", BOOT_GDT_START, BOOT_GDT_START + BOOT_GDT_ENTRIES * 8),
            ("idt", BOOT_IDT_START, BOOT_IDT_START + 8),
            ("zero page", ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            ("boot stack", BOOT_STACK_START, BOOT_STACK_POINTER + 0x10),
            ("pml4", PML4_START, PML4_START + 0x1000),
            ("pdpte", PDPTE_START, PDPTE_START + 0x1000),
            ("pde", PDE_START, PDE_START + 0x1000),
            ("cmdline", CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            ("mptable", MPTABLE_START, EBDA_END),
            ("ioapic", IOAPIC_START, IOAPIC_START + IOAPIC_SIZE),
            ("lapic", LAPIC_START, LAPIC_START + LAPIC_SIZE),
            ("kvm tss", KVM_TSS_START, KVM_TSS_START + KVM_TSS_SIZE),
        ];
        for slot in 0..MAX_DISKS {
            v.push(("virtio-mmio", virtio_mmio_addr(slot), virtio_mmio_addr(slot) + VIRTIO_MMIO_SIZE));
        }
        v
    }

    fn assert_disjoint<T: Ord + Copy + std::fmt::Debug>(ranges: &[(&str, T, T)]) {
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.1 < a.2, "{} is empty or reversed", a.0);
            for b in &ranges[i + 1..] {
                assert!(a.2 <= b.1 || b.2 <= a.1, "{} {:?}..{:?} overlaps {} {:?}..{:?}", a.0, a.1, a.2, b.0, b.1, b.2);
            }
        }
    }

    #[test]
    fn memory_ranges_do_not_overlap() {
        assert_disjoint(&memory_ranges());
    }

    #[test]
    fn boot_structures_are_below_base_memory_end_and_devices_in_the_gap() {
        for (name, start, end) in memory_ranges() {
            let low = end <= EBDA_END;
            let gap = start >= MMIO_GAP_START && end <= MMIO_GAP_END;
            assert!(low || gap, "{name} {start:#x}..{end:#x} is neither in base memory nor in the MMIO gap");
        }
        const { assert!(BOOT_STACK_POINTER % 16 == 0) };
        const { assert!(IDENTITY_MAP_SIZE >= HIMEM_START, "the boot page tables must cover the kernel") };
    }

    #[test]
    fn ports_do_not_overlap() {
        assert_disjoint(&[
            ("pic master", PIC_MASTER_PORT, PIC_MASTER_PORT + PIC_PORT_SIZE),
            ("pit", PIT_PORT, PIT_PORT + PIT_PORT_SIZE),
            ("i8042", I8042_PORT, I8042_PORT + I8042_PORT_SIZE),
            ("pic slave", PIC_SLAVE_PORT, PIC_SLAVE_PORT + PIC_PORT_SIZE),
            ("com1", SERIAL_PORT, SERIAL_PORT + SERIAL_PORT_SIZE),
        ]);
        // The speaker port sits inside the i8042's span on a real PC; KVM's
        // PIT claims it before our bus sees it, and vm-superio's i8042 only
        // acts on offset 4 (0x64).
        assert_eq!(SPEAKER_PORT, I8042_PORT + 1);
    }

    #[test]
    fn irqs_are_distinct_and_routable() {
        let mut irqs = vec![0, 1, 2, SERIAL_IRQ];
        irqs.extend((0..MAX_DISKS).map(virtio_irq));
        let mut sorted = irqs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), irqs.len(), "{irqs:?}");
        assert!(irqs.iter().all(|&irq| irq < u32::from(IOAPIC_PINS)));
        assert_eq!((0..3).map(virtio_irq).collect::<Vec<_>>(), vec![5, 6, 7]);
        assert_eq!(virtio_mmio_addr(2), 0xd000_2000);
    }
}
