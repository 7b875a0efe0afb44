//! Power management through ACPI's PM1a control register, found the way an OS finds it.
//!
//! RSDP: `hvm_start_info.rsdp_paddr` if non-zero, else a scan of 0xE0000..0x100000 on 16-byte
//! boundaries for "RSD PTR " with a valid checksum. Then XSDT (ACPI 2.0+) or RSDT -> the "FACP"
//! table (FADT) -> PM1a_CNT_BLK (offset 64, a 32-bit I/O port), or X_PM1a_CNT_BLK (offset 172, a
//! generic address structure) when the former is zero. Without ACPI: port 0x604, vmmd's PM device.
//!
//! The same walk finds the MADT, whose processor entries tell the BSP how many APs to wait for.
//!
//! The lookup runs at boot, before RAM is filled with the test pattern: firmware (QEMU's SeaBIOS)
//! may have put the tables in memory the map calls RAM.

use crate::cpu::outw;
use crate::kernel::IDENTITY_MAP_BYTES;
use core::ptr::{read_unaligned, read_volatile};

/// vmmd's PM device: PM1a event block at 0x600, PM1a control at 0x604.
pub const DEFAULT_PM1A_CNT: u16 = 0x604;
/// PM1 control: SLP_EN.
const SLP_EN: u16 = 1 << 13;
/// PM1 control: SLP_TYP field shift.
const SLP_TYP_SHIFT: u16 = 10;
/// SLP_TYP values: S3 = 1, S5 = 0 (as in QEMU's and vmmd's \_S3 / \_S5 packages).
const SLP_TYP_S3: u16 = 1;
const SLP_TYP_S5: u16 = 0;

/// Where the PM1a control register is and how it was found.
#[derive(Clone, Copy)]
pub struct Pm {
    pub pm1a_cnt: u16,
    /// "acpi" when found through the FADT, "default" otherwise.
    pub source: &'static str,
}

impl Pm {
    /// Finds the PM1a control register (see the module comment).
    pub fn find(rsdp_hint: u64) -> Pm {
        match find_pm1a_cnt(rsdp_hint) {
            Some(port) => Pm {
                pm1a_cnt: port,
                source: "acpi",
            },
            None => Pm {
                pm1a_cnt: DEFAULT_PM1A_CNT,
                source: "default",
            },
        }
    }

    /// Requests S3. Under vmmd the vCPU continues right after the OUT once woken.
    pub fn suspend(&self) {
        outw(self.pm1a_cnt, (SLP_TYP_S3 << SLP_TYP_SHIFT) | SLP_EN);
    }

    /// Requests S5 (power off).
    pub fn poweroff(&self) {
        outw(self.pm1a_cnt, (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN);
    }
}

fn read_u8(paddr: u64) -> u8 {
    // SAFETY: callers only pass addresses inside the identity map (checked by `mapped`).
    unsafe { read_volatile(paddr as usize as *const u8) }
}

fn read_u32(paddr: u64) -> u32 {
    // SAFETY: as in `read_u8`.
    unsafe { read_unaligned(paddr as usize as *const u32) }
}

fn read_u64(paddr: u64) -> u64 {
    // SAFETY: as in `read_u8`.
    unsafe { read_unaligned(paddr as usize as *const u64) }
}

const RSDP_SIG: u64 = u64::from_le_bytes(*b"RSD PTR ");
const FACP_SIG: u32 = u32::from_le_bytes(*b"FACP");
const MADT_SIG: u32 = u32::from_le_bytes(*b"APIC");

/// True if `[paddr, paddr + len)` is non-null and inside the identity map.
fn mapped(paddr: u64, len: u64) -> bool {
    paddr != 0
        && paddr
            .checked_add(len)
            .is_some_and(|end| end <= IDENTITY_MAP_BYTES)
}

/// Sum of `len` bytes at `paddr`, modulo 256 (ACPI checksums make it 0).
fn checksum(paddr: u64, len: u64) -> u8 {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(read_u8(paddr + i));
    }
    sum
}

fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 {
        return mapped(hint, 36).then_some(hint);
    }
    let mut a = 0xe_0000u64;
    while a < 0x10_0000 {
        if read_u64(a) == RSDP_SIG && checksum(a, 20) == 0 {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// The ACPI table with signature `sig` (physical address), through the XSDT or RSDT.
fn find_table(rsdp_hint: u64, sig: u32) -> Option<u64> {
    let rsdp = find_rsdp(rsdp_hint)?;
    if read_u64(rsdp) != RSDP_SIG {
        return None;
    }
    let revision = read_u8(rsdp + 15);
    // XSDT (64-bit entries) when there is one, else RSDT (32-bit entries).
    let (sdt, entry_size) = match (revision >= 2).then(|| read_u64(rsdp + 24)) {
        Some(xsdt) if mapped(xsdt, 36) => (xsdt, 8),
        _ => (read_u32(rsdp + 16) as u64, 4),
    };
    if !mapped(sdt, 36) {
        return None;
    }
    let sdt_len = read_u32(sdt + 4) as u64;
    if !mapped(sdt, sdt_len) || sdt_len < 36 {
        return None;
    }
    let table = (0..(sdt_len - 36) / entry_size)
        .map(|i| {
            let at = sdt + 36 + i * entry_size;
            if entry_size == 8 {
                read_u64(at)
            } else {
                read_u32(at) as u64
            }
        })
        .find(|&t| mapped(t, 36) && read_u32(t) == sig)?;
    mapped(table, read_u32(table + 4) as u64).then_some(table)
}

/// How many enabled processors the MADT ("APIC" table) lists, if there is one. The BSP uses it
/// to stop waiting for APs as soon as all have checked in.
pub fn madt_cpus(rsdp_hint: u64) -> Option<usize> {
    let madt = find_table(rsdp_hint, MADT_SIG)?;
    let end = madt + read_u32(madt + 4) as u64;
    let (mut at, mut cpus) = (madt + 44, 0);
    while at + 2 <= end {
        let (kind, len) = (read_u8(at), read_u8(at + 1) as u64);
        if len < 2 || at + len > end {
            break;
        }
        // Processor local APIC (flags at 4) and local x2APIC (flags at 8); bit 0 = enabled.
        if (kind == 0 && len >= 8 && read_u32(at + 4) & 1 != 0)
            || (kind == 9 && len >= 16 && read_u32(at + 8) & 1 != 0)
        {
            cpus += 1;
        }
        at += len;
    }
    (cpus > 0).then_some(cpus)
}

fn find_pm1a_cnt(rsdp_hint: u64) -> Option<u16> {
    let fadt = find_table(rsdp_hint, FACP_SIG)?;
    let fadt_len = read_u32(fadt + 4) as u64;
    // PM1a_CNT_BLK: 32-bit I/O port at offset 64.
    if fadt_len >= 68 {
        let port = read_u32(fadt + 64);
        if port != 0 && port <= 0xffff {
            return Some(port as u16);
        }
    }
    // X_PM1a_CNT_BLK: generic address structure at offset 172 (space id 1 = system I/O).
    if fadt_len >= 184 && read_u8(fadt + 172) == 1 {
        let port = read_u64(fadt + 176);
        if port != 0 && port <= 0xffff {
            return Some(port as u16);
        }
    }
    None
}
