//! PVH boot: load an ELF kernel with a Xen PVH entry note (as a Linux `vmlinux` has), describe RAM in
//! an `hvm_start_info`, and start vCPU 0 in 32-bit protected mode at the PVH entry with `ebx` pointing
//! at the start info. This is the path Linux takes under QEMU, Firecracker and Cloud Hypervisor.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::RamRegion;

/// GDT the boot vCPU's segments describe (null, unused, code, data, TSS), as in the PVH ABI.
pub const GDT_ADDR: u64 = 0x500;
/// Where `hvm_start_info` is written.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Where the memory map follows it.
pub const MEMMAP_ADDR: u64 = 0x6040;
/// Where the command line is written.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 4096;
/// End of conventional memory (the EBDA and BIOS area above it are not RAM for the guest).
const LOW_RAM_END: u64 = 0xa_0000;
/// Start of extended memory.
const HIGH_MEM_START: u64 = 0x10_0000;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// Why the kernel could not be loaded or the boot vCPU set up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: check --kernel")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The ELF loader refused the image.
    #[error("cannot load kernel {path} as a PVH ELF image: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The ELF has no PVH entry note.
    #[error(
        "kernel {path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it with PVH support"
    )]
    NoPvhEntry {
        /// The file.
        path: PathBuf,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    /// Writing boot structures into guest RAM failed.
    #[error("cannot write {what} into guest RAM")]
    Write {
        /// Which structure.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM ioctl on the boot vCPU failed.
    #[error("cannot set up the boot vCPU: {op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Loads the kernel's segments into guest RAM and returns its PVH entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEM_START))).map_err(|source| {
            BootError::Load {
                path: path.to_path_buf(),
                source,
            }
        })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry.0),
        _ => Err(BootError::NoPvhEntry {
            path: path.to_path_buf(),
        }),
    }
}

/// The E820-style map the guest gets: RAM minus the legacy hole between 640 KiB and 1 MiB.
pub fn memory_map(regions: &[RamRegion]) -> Vec<hvm_memmap_table_entry> {
    let mut map = Vec::new();
    for r in regions {
        let end = r.gpa + r.size;
        if r.gpa < LOW_RAM_END {
            map.push(entry(r.gpa, LOW_RAM_END.min(end) - r.gpa));
            if end > HIGH_MEM_START {
                map.push(entry(HIGH_MEM_START, end - HIGH_MEM_START));
            }
        } else {
            map.push(entry(r.gpa, r.size));
        }
    }
    map
}

fn entry(addr: u64, size: u64) -> hvm_memmap_table_entry {
    hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    }
}

/// Writes the start info, memory map, command line, ACPI tables and boot GDT into guest RAM.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    regions: &[RamRegion],
    cmdline: &str,
    vcpus: u8,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let write_err = |what| move |source| BootError::Write { what, source };
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(write_err("the command line"))?;
    let map = memory_map(regions);
    for (i, e) in map.iter().enumerate() {
        let at = MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(*e, GuestAddress(at))
            .map_err(write_err("the memory map"))?;
    }
    let rsdp = super::acpi::write_tables(mem, vcpus).map_err(write_err("the ACPI tables"))?;
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        rsdp_paddr: rsdp,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(START_INFO_ADDR))
        .map_err(write_err("hvm_start_info"))?;
    for (i, d) in gdt().iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(write_err("the boot GDT"))?;
    }
    Ok(())
}

/// Flat 4 GiB descriptors: null, null, code (0x10), data (0x18), TSS (0x20).
fn gdt() -> [u64; 5] {
    [
        0,
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0080_8b00_0000_0067,
    ]
}

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU at the PVH entry: 32-bit protected mode, paging off, flat segments, `ebx` =
/// start info, FPU in its reset state, LAPIC LINT0 as ExtINT and LINT1 as NMI.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), BootError> {
    let kvm = |op| move |source| BootError::Kvm { op, source };
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.cs = segment(0x10, 0xb, 1);
    let data = segment(0x18, 0x3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        g: 0,
        db: 0,
        s: 0,
        ..segment(0x20, 0xb, 0)
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt().len() * 8 - 1) as u16;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    regs.rip = entry;
    regs.rbx = START_INFO_ADDR;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as firmware leaves them for an OS.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), BootError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let kvm = |op| move |source| BootError::Kvm { op, source };
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::layout;

    #[test]
    fn memory_map_skips_legacy_hole_and_mmio_hole() {
        let map = memory_map(&layout(5 << 30));
        let spans: Vec<(u64, u64)> = map.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            spans,
            vec![
                (0, 0xa_0000),
                (0x10_0000, (3 << 30) - 0x10_0000),
                (4 << 30, 2 << 30)
            ]
        );
    }
}
