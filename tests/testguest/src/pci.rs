//! PCI configuration space through mechanism #1 (address at port 0xcf8, data at 0xcfc), as an OS
//! reads it before it has ACPI's MCFG: enough to find a device on bus 0 and set it up.
//!
//! Runs at CPL 3 (the TSS I/O bitmap allows the ports); each access is two port accesses
//! (about 25 us each on the PVM hosts). Only the BSP uses it. A machine without PCI reads all
//! ones (vmmd answers unassigned ports with 0xff), which looks like "no device".

use crate::cpu::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const VENDOR_DEVICE: u8 = 0x00;
/// Command (bits 0..15) and status (bits 16..31: write 1 to clear, except read-only bits).
pub const COMMAND: u8 = 0x04;
pub const BAR0: u8 = 0x10;
pub const BAR1: u8 = 0x14;
/// Capabilities pointer (byte 0; bits 0..1 reserved), valid when the status register says so.
pub const CAP_PTR: u8 = 0x34;
/// Interrupt line (byte 0: the platform's routing of the pin, here an IOAPIC GSI), interrupt
/// pin (byte 1: 1 = INTA#).
pub const INTERRUPT: u8 = 0x3c;

pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// Interrupt Disable: the function must not assert INTx.
pub const COMMAND_INTX_DISABLE: u32 = 1 << 10;
/// Status register bit 4, Capabilities List (as bit 20 of the doubleword at [`COMMAND`]).
pub const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// Capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// At most this many capabilities are followed (48 fit in the 192 bytes after the header), so
/// that a list with a loop ends.
const MAX_CAPS: usize = 48;

/// A function on bus 0: device `dev` (0..31), function `func` (0..7).
#[derive(Clone, Copy)]
pub struct Bdf {
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// As stored by `edu` (`dev << 3 | func`).
    pub fn from_u8(v: u8) -> Bdf {
        Bdf {
            dev: v >> 3,
            func: v & 7,
        }
    }

    pub fn to_u8(self) -> u8 {
        self.dev << 3 | self.func
    }

    fn address(self, reg: u8) -> u32 {
        1 << 31 | (self.dev as u32) << 11 | (self.func as u32) << 8 | (reg & 0xfc) as u32
    }

    /// The configuration doubleword at `reg` (a multiple of 4).
    pub fn read(self, reg: u8) -> u32 {
        outl(CONFIG_ADDRESS, self.address(reg));
        inl(CONFIG_DATA)
    }

    /// Writes the configuration doubleword at `reg` (a multiple of 4).
    pub fn write(self, reg: u8, v: u32) {
        outl(CONFIG_ADDRESS, self.address(reg));
        outl(CONFIG_DATA, v);
    }

    /// The offset of the first capability with ID `id` in the capability list, if the status
    /// register has Capabilities List set and the list holds one. Each entry is read as the
    /// doubleword at its offset (ID in byte 0, next pointer in byte 1); pointers below 0x40
    /// (the header) end the list, as does 0.
    pub fn find_capability(self, id: u8) -> Option<u8> {
        if self.read(COMMAND) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut ptr = self.read(CAP_PTR) as u8 & 0xfc;
        for _ in 0..MAX_CAPS {
            if ptr < 0x40 {
                return None;
            }
            let cap = self.read(ptr);
            if cap as u8 == id {
                return Some(ptr);
            }
            ptr = (cap >> 8) as u8 & 0xfc;
        }
        None
    }
}

/// The first device on bus 0 (function 0 of devices 0..31) whose vendor and device IDs are
/// `id` (`device << 16 | vendor`). `tick` runs after each probe (heartbeats).
pub fn find(id: u32, tick: &mut dyn FnMut()) -> Option<Bdf> {
    for dev in 0..32 {
        let bdf = Bdf { dev, func: 0 };
        let found = bdf.read(VENDOR_DEVICE) == id;
        tick();
        if found {
            return Some(bdf);
        }
    }
    None
}
