//! Reads the PVH `hvm_start_info` the loader left for us (physical address in `ebx` at entry).
//!
//! Everything needed from it (the memory map, the RSDP address) is copied out at boot, before
//! memory is filled or the AP trampoline is written, so the loader may put it anywhere outside
//! the image.

use core::cell::UnsafeCell;
use core::ptr::{addr_of, read_volatile};

const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Most memory map entries kept; more are ignored.
pub const MAX_MEMMAP: usize = 32;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// `struct hvm_start_info` (version 1).
#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// What the guest keeps from the start info.
pub struct BootInfo {
    /// RSDP physical address, 0 if the loader gave none.
    pub rsdp: u64,
    pub memmap: [MemmapEntry; MAX_MEMMAP],
    pub memmap_len: usize,
}

struct BootInfoCell(UnsafeCell<BootInfo>);
// SAFETY: written once by the BSP at boot, read-only afterwards.
unsafe impl Sync for BootInfoCell {}
static BOOT_INFO: BootInfoCell = BootInfoCell(UnsafeCell::new(BootInfo {
    rsdp: 0,
    memmap: [MemmapEntry {
        addr: 0,
        size: 0,
        kind: 0,
        reserved: 0,
    }; MAX_MEMMAP],
    memmap_len: 0,
}));

impl BootInfo {
    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// All RAM (type 1) the map lists, in bytes.
    pub fn ram_bytes(&self) -> u64 {
        let mut total = 0;
        for e in self.memmap() {
            if e.kind == E820_RAM {
                total += e.size;
            }
        }
        total
    }
}

/// Copies what we need out of the start info at physical address `paddr` (once, on the BSP).
pub fn read(paddr: u32) -> &'static BootInfo {
    let si = paddr as usize as *const HvmStartInfo;
    // SAFETY: the PVH ABI says ebx points at a valid start info; memory is identity mapped.
    let (magic, version, rsdp, memmap, entries) = unsafe {
        (
            read_volatile(addr_of!((*si).magic)),
            read_volatile(addr_of!((*si).version)),
            read_volatile(addr_of!((*si).rsdp_paddr)),
            read_volatile(addr_of!((*si).memmap_paddr)),
            read_volatile(addr_of!((*si).memmap_entries)),
        )
    };
    if magic != HVM_START_MAGIC {
        panic!("hvm_start_info has a bad magic");
    }
    if version < 1 || memmap == 0 || entries == 0 {
        panic!("hvm_start_info has no memory map");
    }
    // SAFETY: called once at boot, before any other reference to BOOT_INFO exists.
    let info = unsafe { &mut *BOOT_INFO.0.get() };
    info.rsdp = rsdp;
    info.memmap_len = (entries as usize).min(MAX_MEMMAP);
    let table = memmap as usize as *const MemmapEntry;
    for i in 0..info.memmap_len {
        // SAFETY: the loader promises `memmap_entries` entries at `memmap_paddr`.
        unsafe {
            let e = table.add(i);
            info.memmap[i] = MemmapEntry {
                addr: read_volatile(addr_of!((*e).addr)),
                size: read_volatile(addr_of!((*e).size)),
                kind: read_volatile(addr_of!((*e).kind)),
                reserved: 0,
            };
        }
    }
    info
}
