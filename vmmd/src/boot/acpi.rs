//! Minimal ACPI tables, so a guest finds its devices the way an OS does on real hardware: RSDP → XSDT →
//! FADT (the PM1a event/control registers of [`crate::devices::pm`]) + DSDT (`\_S3`, `\_S5` sleep types)
//! and MADT (one local APIC per vCPU, the IOAPIC, IRQ0 → GSI 2).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::pm::{PM1_CNT_OFFSET, PM_BASE};

/// Where the RSDP goes: the BIOS read-only area an OS scans (and `hvm_start_info.rsdp_paddr`).
pub const RSDP_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = RSDP_ADDR + 0x40;
const FADT_ADDR: u64 = RSDP_ADDR + 0x100;
const DSDT_ADDR: u64 = RSDP_ADDR + 0x300;
const MADT_ADDR: u64 = RSDP_ADDR + 0x400;

const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const SCI_IRQ: u16 = 9;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// A table under construction: header first, body appended, length and checksum fixed at the end.
struct Table(Vec<u8>);

impl Table {
    fn new(signature: &[u8; 4], revision: u8) -> Table {
        let mut t = Vec::with_capacity(256);
        t.extend_from_slice(signature);
        t.extend_from_slice(&[0; 4]); // length
        t.push(revision);
        t.push(0); // checksum
        t.extend_from_slice(b"VMMD  ");
        let mut table_id = *b"VMMD    ";
        table_id[4..].copy_from_slice(signature);
        t.extend_from_slice(&table_id);
        t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        t.extend_from_slice(b"VMMD");
        t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Table(t)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A Generic Address Structure for a system-I/O register.
    fn io_gas(&mut self, port: u16, bits: u8) -> &mut Self {
        let access = if bits >= 32 { 3 } else { 2 };
        self.u8(1).u8(bits).u8(0).u8(access).u64(u64::from(port))
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

fn fadt() -> Vec<u8> {
    let pm1_cnt = PM_BASE + PM1_CNT_OFFSET;
    let mut t = Table::new(b"FACP", 6);
    t.u32(0) // FIRMWARE_CTRL: no FACS
        .u32(DSDT_ADDR as u32)
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ)
        .u32(0) // SMI_CMD: none, the machine is always in ACPI mode
        .bytes(&[0; 4]) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .u32(u32::from(PM_BASE)) // PM1a_EVT_BLK
        .u32(0)
        .u32(u32::from(pm1_cnt)) // PM1a_CNT_BLK
        .u32(0)
        .u32(0) // PM2_CNT_BLK
        .u32(0) // PM_TMR_BLK
        .u32(0)
        .u32(0) // GPE0/1
        .u8(4) // PM1_EVT_LEN
        .u8(2) // PM1_CNT_LEN
        .bytes(&[0; 6]) // PM2_CNT_LEN .. CST_CNT
        .u16(0xffff) // P_LVL2_LAT: C2 unsupported
        .u16(0xffff) // P_LVL3_LAT
        .bytes(&[0; 9]) // FLUSH_SIZE, FLUSH_STRIDE, DUTY_OFFSET .. CENTURY
        .u16(0) // IAPC_BOOT_ARCH
        .u8(0)
        .u32(1 | 1 << 4 | 1 << 5) // flags: WBINVD, no fixed power or sleep button
        .bytes(&[0; 12]) // RESET_REG
        .u8(0) // RESET_VALUE
        .u16(0) // ARM_BOOT_ARCH
        .u8(0) // minor version
        .u64(0) // X_FIRMWARE_CTRL
        .u64(DSDT_ADDR)
        .io_gas(PM_BASE, 32) // X_PM1a_EVT_BLK
        .bytes(&[0; 12])
        .io_gas(pm1_cnt, 16) // X_PM1a_CNT_BLK
        .bytes(&[0; 12 * 5]) // X_PM1b_CNT, X_PM2_CNT, X_PM_TMR, X_GPE0, X_GPE1
        .bytes(&[0; 24]) // sleep control/status
        .u64(0); // hypervisor vendor
    t.finish()
}

fn dsdt() -> Vec<u8> {
    let mut t = Table::new(b"DSDT", 2);
    // Name (_S3_, Package () { 1, 1, 0, 0 })  Name (_S5_, Package () { 0, 0, 0, 0 })
    for (name, typ) in [(b"_S3_", 1u8), (b"_S5_", 0u8)] {
        t.u8(0x08).bytes(name).u8(0x12).u8(6).u8(4);
        t.bytes(&[typ, typ, 0, 0]);
    }
    t.finish()
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Table::new(b"APIC", 4);
    t.u32(LAPIC_ADDR).u32(1); // PCAT_COMPAT: there are 8259s too
    for id in 0..vcpus {
        t.u8(0).u8(8).u8(id).u8(id).u32(1); // processor local APIC, enabled
    }
    t.u8(1).u8(12).u8(0).u8(0).u32(IOAPIC_ADDR).u32(0);
    t.u8(2).u8(10).u8(0).u8(0).u32(2).u16(0); // IRQ0 → GSI 2
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ as u8)
        .u32(u32::from(SCI_IRQ))
        .u16(0xd); // SCI: level, active high
    t.finish()
}

fn xsdt() -> Vec<u8> {
    let mut t = Table::new(b"XSDT", 1);
    t.u64(FADT_ADDR).u64(MADT_ADDR);
    t.finish()
}

fn rsdp() -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(b"VMMD  ");
    r.push(2); // revision: ACPI 2.0+, use the XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&XSDT_ADDR.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Writes all tables into guest RAM; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, table) in [
        (RSDP_ADDR, rsdp()),
        (XSDT_ADDR, xsdt()),
        (FADT_ADDR, fadt()),
        (DSDT_ADDR, dsdt()),
        (MADT_ADDR, madt(vcpus)),
    ] {
        mem.write_slice(&table, GuestAddress(addr))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_well_formed() {
        for t in [fadt(), dsdt(), madt(2), xsdt()] {
            assert_eq!(checksum(&t), 0, "{:?} checksum", &t[..4]);
            assert_eq!(
                u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize,
                t.len()
            );
        }
        let f = fadt();
        assert_eq!(f.len(), 276, "ACPI 6 FADT length");
        assert_eq!(u32::from_le_bytes([f[64], f[65], f[66], f[67]]), 0x604);
        assert_eq!(
            u64::from_le_bytes(f[172 + 4..172 + 12].try_into().expect("8 bytes")),
            0x604
        );
        let r = rsdp();
        assert_eq!(checksum(&r[..20]), 0);
        assert_eq!(checksum(&r), 0);
        // Tables must not overlap.
        assert!(XSDT_ADDR + xsdt().len() as u64 <= FADT_ADDR);
        assert!(FADT_ADDR + f.len() as u64 <= DSDT_ADDR);
        assert!(DSDT_ADDR + dsdt().len() as u64 <= MADT_ADDR);
    }
}
