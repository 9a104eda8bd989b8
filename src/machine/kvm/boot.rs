//! Booting Linux through its 64-bit boot protocol (Documentation/arch/x86/
//! boot.rst, "64-bit Boot Protocol"): the kernel in RAM, the zero page
//! (`struct boot_params`) with the e820 map, command line and initramfs,
//! identity-mapped page tables, a flat GDT, and the vCPU entering long
//! mode at the kernel's 64-bit entry with %rsi pointing at the zero page.
//!
//! The pure functions here decide every byte (zero page, GDT, page tables,
//! command line, registers); [`load`] writes them into guest memory.

use std::fs::File;
use std::io::Seek;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    virtio_irq, virtio_mmio_addr, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, CMDLINE_START,
    HIMEM_START, MAX_DISKS, MMIO_GAP_START, MPTABLE_START, PDE_START, PDPTE_START, PML4_START, VIRTIO_MMIO_SIZE,
    ZERO_PAGE_START,
};
use super::memory::{self, GuestMemory};
use super::mptable;
use crate::machine::KernelImages;

// boot.rst, "The Real-Mode Kernel Header".
/// `boot_flag`: 0xAA55, the old boot sector signature.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: 0xFF, "undefined"; 0 would make the kernel ignore the
/// initramfs (DESIGN.md's trap).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` for a vmlinux (which has no header of its own):
/// CONFIG_PHYSICAL_ALIGN's default.
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// `xloadflags` bit 0, XLF_KERNEL_64: the bzImage has a 64-bit entry point
/// at 0x200 past its protected-mode code.
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `initrd_addr_max` when the kernel does not say (boot.rst: protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 0x1000;

// Control and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry bits: present, writable, and (in a PDE) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x80;

/// Errors loading the guest into memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the guest kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the guest kernel {path} (an x86-64 vmlinux ELF or a bzImage is needed)")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("the bzImage {path} has no 64-bit entry point (boot protocol {version:#06x}, xloadflags {xloadflags:#x}); fix: use an x86-64 kernel")]
    Not64Bit { path: PathBuf, version: u16, xloadflags: u16 },
    #[error("cannot open the initramfs {path}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the initramfs {path} ({size} bytes) does not fit in guest RAM between the kernel's end ({kernel_end:#x}) and {limit:#x}; fix: give the guest more memory (--memory)")]
    InitramfsTooLarge { path: PathBuf, size: u64, kernel_end: u64, limit: u64 },
    #[error("cannot copy the initramfs {path} into guest memory")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel command line is {len} bytes with the virtio_mmio.device= entries; x86 allows {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("{disks} disks requested; the built-in VMM has {MAX_DISKS} virtio-mmio slots")]
    TooManyDisks { disks: usize },
    #[error("cannot build the MP table")]
    MpTable(#[from] mptable::Error),
    #[error("cannot write the {what} at guest address {addr:#x}")]
    Write {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest physical).
    pub entry: u64,
    /// First byte past the kernel image in guest memory.
    pub end: u64,
    /// The bzImage's own setup header, to be copied into the zero page;
    /// `None` for a vmlinux, whose header we write from scratch.
    pub setup_header: Option<setup_header>,
}

/// What [`load`] put into guest memory.
#[derive(Debug, Clone, PartialEq)]
pub struct BootInfo {
    pub kernel: LoadedKernel,
    /// The command line the kernel receives, `virtio_mmio.device=` included.
    pub cmdline: String,
    /// Guest address and size of the initramfs.
    pub initramfs: Option<(u64, u64)>,
}

/// The full command line: the caller's, then one `virtio_mmio.device=`
/// per disk (kernel-parameters.txt: `<size>@<baseaddr>:<irq>`), in slot
/// order, which is the order the guest probes them.
pub fn cmdline(base: &str, disks: usize) -> Result<String, Error> {
    if disks > MAX_DISKS {
        return Err(Error::TooManyDisks { disks });
    }
    if base.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    let mut line = base.trim().to_string();
    for slot in 0..disks {
        line.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE >> 10,
            virtio_mmio_addr(slot),
            virtio_irq(slot)
        ));
    }
    // The terminating NUL counts against COMMAND_LINE_SIZE.
    if line.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong { len: line.len() + 1, max: CMDLINE_MAX_SIZE });
    }
    Ok(line.trim_start().to_string())
}

/// Loads the kernel: the uncompressed vmlinux when there is one (it boots
/// faster: no decompression), else the bzImage.
pub fn load_kernel(mem: &GuestMemory, images: &KernelImages) -> Result<LoadedKernel, Error> {
    let highmem = Some(GuestAddress(HIMEM_START));
    if let Some(path) = &images.vmlinux {
        let mut file = open(path)?;
        let loaded = Elf::load(mem, None, &mut file, highmem)
            .map_err(|source| Error::LoadKernel { path: path.clone(), source })?;
        return Ok(LoadedKernel { entry: loaded.kernel_load.0, end: loaded.kernel_end, setup_header: None });
    }
    let path = &images.bzimage;
    let mut file = open(path)?;
    let loaded = BzImage::load(mem, None, &mut file, highmem)
        .map_err(|source| Error::LoadKernel { path: path.clone(), source })?;
    let header = loaded.setup_header.expect("BzImage::load always returns the setup header");
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Not64Bit { path: path.clone(), version: header.version, xloadflags: header.xloadflags });
    }
    Ok(LoadedKernel {
        entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        end: loaded.kernel_end,
        setup_header: Some(header),
    })
}

fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::OpenKernel { path: path.to_path_buf(), source })
}

/// Where the initramfs goes: as high as possible in low RAM (below the
/// MMIO gap and the kernel's `initrd_addr_max`), page aligned, above the
/// kernel. `None` when it cannot fit.
pub fn initramfs_addr(size: u64, kernel: &LoadedKernel, low_ram_end: u64) -> Option<u64> {
    let addr_max = kernel
        .setup_header
        .map(|h| if h.initrd_addr_max == 0 { DEFAULT_INITRD_ADDR_MAX } else { u64::from(h.initrd_addr_max) })
        .unwrap_or(u64::from(u32::MAX >> 1));
    let limit = low_ram_end.min(addr_max + 1).min(MMIO_GAP_START);
    let addr = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel.end.max(HIMEM_START)).then_some(addr)
}

/// The zero page (boot.rst "Details of Header Fields", zero-page.rst).
pub fn zero_page(
    kernel: &LoadedKernel,
    cmdline: &str,
    initramfs: Option<(u64, u64)>,
    ram: &[(u64, u64)],
) -> boot_params {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size)) in ram.iter().take(params.e820_table.len()).enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: E820_RAM };
    }
    params.e820_entries = ram.len().min(params.e820_table.len()) as u8;
    params
}

/// One GDT descriptor (Intel SDM vol. 3, 3.4.5): `flags` holds the access
/// byte in bits 0–7 and the G/D/L/AVL nibble in bits 12–15.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT: null, 64-bit code (selector 0x08), data (0x10), TSS
/// (0x18), all flat. The kernel loads its own GDT almost at once.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // code: G, L, present, DPL 0, exec/read, accessed
    gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, present, read/write, accessed
    gdt_entry(0x808b, 0, 0xfffff), // TSS: G, present, busy 64-bit TSS
];

/// The KVM segment register value that loads GDT entry `index`.
pub fn segment(index: u16, entry: u64) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Long mode with paging on the identity map, flat segments from [`GDT`].
/// Starts from the vCPU's current sregs so KVM's defaults (APIC base,
/// other descriptor caches) stay.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3, GDT[3]);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The general registers at the 64-bit entry: %rsi = zero page, a stack,
/// interrupts off (boot.rst: "interrupt must be disabled").
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2, // bit 1 is reserved and always set
        ..Default::default()
    }
}

/// The identity page tables: PML4[0] → PDPT[0] → 512 2-MiB pages.
pub fn page_tables() -> (u64, u64, Vec<u64>) {
    let pml4e = PDPTE_START | PTE_PRESENT_RW;
    let pdpte = PDE_START | PTE_PRESENT_RW;
    let pdes = (0..512u64).map(|i| (i << 21) | PTE_PRESENT_RW | PDE_2M_PAGE).collect();
    (pml4e, pdpte, pdes)
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemory, what: &'static str, addr: u64, value: T) -> Result<(), Error> {
    mem.write_obj(value, GuestAddress(addr)).map_err(|source| Error::Write { what, addr, source })
}

fn write_bytes(mem: &GuestMemory, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| Error::Write { what, addr, source })
}

/// Everything the kernel needs in memory before its first instruction:
/// kernel, initramfs, command line, zero page, GDT/IDT, page tables and
/// the MP table for `cpus` vCPUs.
pub fn load(
    mem: &GuestMemory,
    images: &KernelImages,
    initramfs: &Path,
    base_cmdline: &str,
    disks: usize,
    cpus: u8,
) -> Result<BootInfo, Error> {
    let cmdline = cmdline(base_cmdline, disks)?;
    let mptable = mptable::build(cpus)?;
    let kernel = load_kernel(mem, images)?;

    let initramfs = load_initramfs(mem, initramfs, &kernel)?;

    let ranges: Vec<(GuestAddress, usize)> = mem.iter().map(|r| (r.start_addr(), r.len() as usize)).collect();
    let params = zero_page(&kernel, &cmdline, initramfs, &memory::usable_ram(&ranges));
    write(mem, "zero page", ZERO_PAGE_START, params)?;
    let mut line = cmdline.clone().into_bytes();
    line.push(0);
    write_bytes(mem, "kernel command line", CMDLINE_START, &line)?;
    for (i, entry) in GDT.iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0u64)?;
    let (pml4e, pdpte, pdes) = page_tables();
    write(mem, "PML4", PML4_START, pml4e)?;
    write(mem, "PDPT", PDPTE_START, pdpte)?;
    for (i, pde) in pdes.iter().enumerate() {
        write(mem, "page directory", PDE_START + i as u64 * 8, *pde)?;
    }
    write_bytes(mem, "MP table", MPTABLE_START, &mptable)?;
    Ok(BootInfo { kernel, cmdline, initramfs })
}

fn load_initramfs(mem: &GuestMemory, path: &Path, kernel: &LoadedKernel) -> Result<Option<(u64, u64)>, Error> {
    let open_err = |source| Error::OpenInitramfs { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.seek(std::io::SeekFrom::End(0)).map_err(open_err)?;
    file.rewind().map_err(open_err)?;
    if size == 0 {
        return Ok(None);
    }
    let low_ram_end = mem.iter().next().map_or(0, |r| r.start_addr().0 + r.len());
    let addr = initramfs_addr(size, kernel, low_ram_end).ok_or_else(|| Error::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end: kernel.end,
        limit: low_ram_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::ReadInitramfs { path: path.to_path_buf(), source })?;
    debug_assert!(GuestAddress(addr).checked_add(size).is_some());
    Ok(Some((addr, size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::ByteValued;

    fn mem(mib: u64) -> GuestMemory {
        memory::create(mib).unwrap()
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn cmdline_appends_one_device_per_disk() {
        let cases: &[(&str, usize, &str)] = &[
            ("console=ttyS0", 0, "console=ttyS0"),
            (
                "console=ttyS0 reboot=t",
                2,
                "console=ttyS0 reboot=t virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6",
            ),
            ("", 1, "virtio_mmio.device=4K@0xd0000000:5"),
        ];
        for (base, disks, want) in cases {
            assert_eq!(cmdline(base, *disks).unwrap(), *want);
        }
    }

    #[test]
    fn cmdline_limits() {
        assert!(matches!(cmdline("a", MAX_DISKS + 1), Err(Error::TooManyDisks { disks: 9 })));
        assert!(matches!(cmdline("a\0b", 0), Err(Error::CmdlineNul)));
        let long = "x".repeat(2047);
        assert!(cmdline(&long, 0).is_ok());
        assert!(matches!(cmdline(&"x".repeat(2048), 0), Err(Error::CmdlineTooLong { len: 2049, max: 2048 })));
        assert!(matches!(cmdline(&"x".repeat(2000), 2), Err(Error::CmdlineTooLong { .. })));
    }

    #[test]
    fn zero_page_bytes_for_a_vmlinux() {
        let kernel = LoadedKernel { entry: 0x100_0000, end: 0x200_0000, setup_header: None };
        let ram = [(0, 0x9fc00), (0x10_0000, 0x1ff0_0000)];
        let params = zero_page(&kernel, "console=ttyS0", Some((0x1f00_0000, 0x12345)), &ram);
        let b = params.as_slice();
        assert_eq!(b.len(), 4096);
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(b[0x1e8], 2, "e820_entries");
        assert_eq!(u16_at(b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(u32_at(b, 0x202), 0x5372_6448, "header");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(b, 0x218), 0x1f00_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x12345, "ramdisk_size");
        assert_eq!(u32_at(b, 0x228), 0x20000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0x230), 0x100_0000, "kernel_alignment");
        assert_eq!(u32_at(b, 0x238), 13, "cmdline_size");
        let e820: Vec<(u64, u64, u32)> =
            (0..3).map(|i| 0x2d0 + i * 20).map(|o| (u64_at(b, o), u64_at(b, o + 8), u32_at(b, o + 16))).collect();
        assert_eq!(e820, vec![(0, 0x9fc00, 1), (0x10_0000, 0x1ff0_0000, 1), (0, 0, 0)]);
        // Nothing else is set: every byte outside the fields above is zero.
        let set: &[(usize, usize)] = &[
            (0x1e8, 1),
            (0x1fe, 2),
            (0x202, 4),
            (0x210, 1),
            (0x218, 8),
            (0x228, 4),
            (0x230, 4),
            (0x238, 4),
            (0x2d0, 40),
        ];
        for (i, byte) in b.iter().enumerate() {
            if !set.iter().any(|&(o, l)| i >= o && i < o + l) {
                assert_eq!(*byte, 0, "byte {i:#x}");
            }
        }
    }

    #[test]
    fn zero_page_keeps_a_bzimage_header() {
        let header = setup_header {
            version: 0x020f,
            xloadflags: 1,
            initrd_addr_max: 0x7fff_ffff,
            setup_sects: 30,
            ..Default::default()
        };
        let kernel = LoadedKernel { entry: 0x10_0200, end: 0x30_0000, setup_header: Some(header) };
        let p = zero_page(&kernel, "quiet", None, &[(0, 0x9fc00)]);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.setup_sects }, 30);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
    }

    #[test]
    fn initramfs_goes_high_and_page_aligned() {
        let vmlinux = LoadedKernel { entry: 0x100_0000, end: 0x200_0000, setup_header: None };
        let low_end = 512 << 20;
        let cases: &[(u64, u64, Option<u64>)] = &[
            (0x1000, low_end, Some(low_end - 0x1000)),
            (0x1001, low_end, Some(low_end - 0x2000)),
            (low_end - 0x200_0000, low_end, Some(0x200_0000)),
            (low_end - 0x200_0000 + 1, low_end, None),
            (0x1000, 4 << 30, Some((1 << 31) - 0x1000)),
        ];
        for &(size, end, want) in cases {
            assert_eq!(initramfs_addr(size, &vmlinux, end), want, "size {size:#x} end {end:#x}");
        }
        let old = LoadedKernel { setup_header: Some(setup_header::default()), ..vmlinux };
        assert_eq!(initramfs_addr(0x1000, &old, 2 << 30), Some(0x3800_0000 - 0x1000));
    }

    #[test]
    fn gdt_and_segments() {
        assert_eq!(GDT, [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff]);
        let cs = segment(1, GDT[1]);
        assert_eq!(
            (cs.base, cs.limit, cs.selector, cs.type_, cs.present, cs.dpl, cs.db, cs.s, cs.l, cs.g, cs.unusable),
            (0, 0xffff_ffff, 8, 0xb, 1, 0, 0, 1, 1, 1, 0)
        );
        let tr = segment(3, GDT[3]);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.l), (0x18, 0xb, 0, 0));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_registers() {
        let s = long_mode_sregs(kvm_sregs { apic_base: 0xfee0_0900, ..Default::default() });
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x8000_0001, 0x9000, 0x20, 0x500));
        assert_eq!((s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit), (0x500, 31, 0x520, 7));
        assert_eq!((s.cs.selector, s.ds.selector, s.ss.selector, s.tr.selector), (8, 16, 16, 24));
        assert_eq!(s.apic_base, 0xfee0_0900, "KVM's own values are kept");
        let r = entry_regs(0x100_0000);
        assert_eq!((r.rip, r.rsp, r.rbp, r.rsi, r.rflags), (0x100_0000, 0x8ff0, 0x8ff0, 0x7000, 2));
    }

    #[test]
    fn identity_map_covers_the_first_gib() {
        let (pml4e, pdpte, pdes) = page_tables();
        assert_eq!((pml4e, pdpte), (0xa003, 0xb003));
        assert_eq!(pdes.len(), 512);
        assert_eq!((pdes[0], pdes[1], pdes[511]), (0x83, 0x20_0083, 0x3fe0_0083));
    }

    /// A minimal x86-64 ELF executable: one PT_LOAD of `payload` at `paddr`.
    fn tiny_elf(paddr: u64, payload: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(payload.len() as u64 + 0x1000).to_le_bytes());
        e.extend_from_slice(payload);
        e
    }

    /// A minimal bzImage: one setup sector after the boot sector, then
    /// the "protected-mode code".
    fn tiny_bzimage(xloadflags: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 2 * 512];
        b[0x1f1] = 1; // setup_sects
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(&0x5372_6448u32.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1; // loadflags: LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn load_writes_kernel_initramfs_and_boot_structures() {
        let m = mem(128);
        let kernel = temp_file(&tiny_elf(0x100_0000, b"\xf4kernel"));
        let initrd = temp_file(&[0x5a; 5000]);
        let images = KernelImages { bzimage: "/nonexistent".into(), vmlinux: Some(kernel.path().to_path_buf()) };
        let info = load(&m, &images, initrd.path(), "console=ttyS0", 1, 2).unwrap();
        assert_eq!(info.kernel, LoadedKernel { entry: 0x100_0000, end: 0x100_0000 + 7 + 0x1000, setup_header: None });
        assert_eq!(info.cmdline, "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(info.initramfs, Some(((128 << 20) - 0x2000, 5000)));

        let mut buf = [0u8; 7];
        m.read_slice(&mut buf, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&buf, b"\xf4kernel");
        let mut initrd_bytes = vec![0u8; 5000];
        m.read_slice(&mut initrd_bytes, GuestAddress((128 << 20) - 0x2000)).unwrap();
        assert!(initrd_bytes.iter().all(|&b| b == 0x5a));
        let mut line = vec![0u8; info.cmdline.len() + 1];
        m.read_slice(&mut line, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(line, [info.cmdline.as_bytes(), b"\0"].concat());
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(
            params.as_slice(),
            zero_page(&info.kernel, &info.cmdline, info.initramfs, &[(0, 0x9fc00), (0x10_0000, (127 << 20))])
                .as_slice()
        );
        assert_eq!(m.read_obj::<u64>(GuestAddress(BOOT_GDT_START + 8)).unwrap(), GDT[1]);
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDE_START + 8)).unwrap(), 0x20_0083);
        let mut mp = vec![0u8; mptable::build(2).unwrap().len()];
        m.read_slice(&mut mp, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(mp, mptable::build(2).unwrap());
    }

    #[test]
    fn bzimage_is_entered_at_its_64bit_entry() {
        let m = mem(64);
        let image = temp_file(&tiny_bzimage(XLF_KERNEL_64, b"compressed"));
        let images = KernelImages { bzimage: image.path().to_path_buf(), vmlinux: None };
        let k = load_kernel(&m, &images).unwrap();
        assert_eq!((k.entry, k.end), (0x10_0200, 0x10_0000 + 10));
        assert_eq!({ k.setup_header.unwrap().initrd_addr_max }, 0x7fff_ffff);
        let old = temp_file(&tiny_bzimage(0, b"compressed"));
        let images = KernelImages { bzimage: old.path().to_path_buf(), vmlinux: None };
        assert!(matches!(load_kernel(&m, &images), Err(Error::Not64Bit { version: 0x020f, .. })));
    }

    #[test]
    fn bad_kernels_name_their_path() {
        let m = mem(64);
        let junk = temp_file(b"not a kernel at all");
        for images in [
            KernelImages { bzimage: "/nonexistent".into(), vmlinux: Some(junk.path().to_path_buf()) },
            KernelImages { bzimage: junk.path().to_path_buf(), vmlinux: None },
        ] {
            let err = load_kernel(&m, &images).unwrap_err();
            assert!(matches!(err, Error::LoadKernel { .. }), "{err:?}");
            assert!(err.to_string().contains(&junk.path().display().to_string()));
        }
        let missing = KernelImages { bzimage: "/nonexistent/bzImage".into(), vmlinux: None };
        assert!(matches!(load_kernel(&m, &missing), Err(Error::OpenKernel { .. })));
    }

    #[test]
    fn an_initramfs_too_large_for_memory_is_refused() {
        let m = mem(64);
        let kernel = temp_file(&tiny_elf(0x100_0000, b"k"));
        let initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.as_file().set_len(60 << 20).unwrap();
        let images = KernelImages { bzimage: "/x".into(), vmlinux: Some(kernel.path().to_path_buf()) };
        let err = load(&m, &images, initrd.path(), "", 0, 1).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { .. }), "{err:?}");
        assert!(err.to_string().contains("--memory"));
    }
}
